"""The package's shape, read from its source with ``ast``: import arrows point one way, no circles, one
reader of the cluster environment, only the CLI exits; and ``deepsports --help`` stays cheap.

Every import counts, also one inside a function: a lazy import hides a circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

from tests.e2e_helpers import REPO, subprocess_env

PACKAGE = REPO / "deepsports"

#: Who may import whom, by room (the first name below ``deepsports``); a room may import itself.
#: docs/development.md ("Code layout") draws the same picture.
ALLOWED = {
    "cli": {"tune", "train", "slurm", "data", "tracking", "config", "errors"},
    "tune": {"train", "tracking", "slurm", "config", "errors"},
    "train": {"data", "model", "tracking", "slurm", "config", "errors"},
    "data": {"config", "errors"},
    "model": {"config", "errors"},
    "tracking": {"config", "errors"},
    "slurm": {"config", "errors"},
    "config": {"errors"},
    "errors": set(),
    "fileio": {"errors"},
    "locate": {"errors"},
    "signals": {"errors"},
    "_lazy": set(),
    "tags": set(),
    "__main__": {"cli"},
    "__init__": {"config", "errors"},
}

#: The one reader of the cluster environment (stdlib and errors only). train/ sees the cluster only through
#: it (ranks, job ids); tracking/ is told the job's ids (RunTracker.start's ``cluster``), it never reads them.
ENV_READER = "deepsports.slurm.env"
TRAIN_MAY_USE_FROM_SLURM = {ENV_READER}

#: Modules at the bottom that every room may use: fileio (the one atomic writer and the one torch-file
#: reader; standard library at import time), locate (the shipped named files), _lazy (package faces),
#: signals (process signals) and tags (every run tag and study attribute name).
TAGS = "deepsports.tags"
BOTTOM = {"deepsports.fileio", "deepsports.locate", "deepsports._lazy", "deepsports.signals", TAGS}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


@functools.cache
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(path): (path, ast.parse(path.read_text(), filename=str(path)))
            for path in sorted(PACKAGE.rglob("*.py"))}


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _imports(module: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """The deepsports modules ``module`` imports (``from pkg import mod`` names the submodule)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    result = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith("deepsports") and name != module:
            result.add(name)
    return result


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, tree, known) for name, (path, tree) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_graph_sees_lazy_imports():
    """The reader counts function-level imports and resolves ``from pkg import module``."""
    graph = _graph()
    assert "deepsports.tune.worker" in graph["deepsports.cli.studies"]  # imported inside _cmd_tune
    assert "deepsports.slurm.preemption" in graph["deepsports.cli.main"]  # imported inside _cmd_train


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_one_way():
    wrong = []
    for module, targets in _graph().items():
        room = _room(module)
        for target in sorted(targets):
            other = _room(target)
            if other == room or other == "__init__" or (target in BOTTOM and room != "errors"):
                continue
            if other not in ALLOWED[room]:
                wrong.append(f"{module} -> {target}")
            elif room == "train" and other == "slurm" and target not in TRAIN_MAY_USE_FROM_SLURM:
                wrong.append(f"{module} -> {target} (train/ may use slurm.env only)")
    assert wrong == []


_SLURM_NAME = re.compile(r"SLURMD?_[A-Z0-9_]*")


def _slurm_literals(tree: ast.Module) -> list[str]:
    """String literals naming a SLURM variable (or the ``SLURM_`` prefix): an environment read by name."""
    return sorted({node.value for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)
                   and _SLURM_NAME.fullmatch(node.value)})


def test_only_slurm_reads_the_cluster_environment():
    readers = {}
    for module, (_path, tree) in _modules().items():
        if _room(module) != "slurm" and (names := _slurm_literals(tree)):
            readers[module] = names
    assert readers == {}


def test_the_bottom_modules_import_only_errors():
    graph = _graph()
    bottom = BOTTOM | {ENV_READER}
    assert {module: graph[module] - {"deepsports.errors"} for module in bottom} == dict.fromkeys(bottom, set())


def _calls(tree: ast.Module, names: set[tuple[str, str]]) -> list[int]:
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in names]


#: Modules that rename into place what fileio.atomic_write cannot write, each with its reason.
OWN_RENAMES = {
    "deepsports.data.synth": "renames a finished dataset directory into place (a tree, not a file)",
}


def test_files_are_written_and_torch_files_read_only_through_fileio():
    loads, writes = {}, {}
    for module, (_path, tree) in _modules().items():
        if module == "deepsports.fileio":
            continue
        if lines := _calls(tree, {("torch", "load")}):
            loads[module] = lines
        if module not in OWN_RENAMES and (lines := _calls(tree, {("os", "replace"), ("os", "rename"),
                                                                          ("tempfile", "mkstemp")})):
            writes[module] = lines
    assert (loads, writes) == ({}, {})


def test_slurm_literal_finder():
    tree = ast.parse('import os\nos.environ.get("SLURM_JOB_ID")\nx = {"SLURMD_NODENAME": 1}\n"""SLURM_X in a docstring"""')
    assert _slurm_literals(tree) == ["SLURMD_NODENAME", "SLURM_JOB_ID"]


_DOTTED = re.compile(r"deepsports(\.[A-Za-z_][A-Za-z0-9_]*)*\.?")


def _tag_literals(tree: ast.Module, modules: set[str]) -> list[str]:
    """String literals (f-string pieces included) spelled like a ``deepsports.`` tag: dotted names under
    ``deepsports`` that are not a module of the package (``"deepsports.cli"`` for ``python -m``, a logger's
    or a generator's module name), or a prefix ending in a dot (``f"deepsports.config.{key}"``)."""
    return sorted({node.value for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)
                   and node.value.startswith("deepsports.") and _DOTTED.fullmatch(node.value)
                   and node.value not in modules})


def test_tags_are_spelled_only_in_the_tag_module():
    modules = _modules()
    spelled = {module: names for module, (_path, tree) in modules.items()
               if module != TAGS and (names := _tag_literals(tree, set(modules)))}
    assert spelled == {}


def test_tag_literal_finder():
    tree = ast.parse('"""deepsports.resumes in a docstring"""\nt = {"deepsports.resumes": "0", f"deepsports.config.{k}": 1}\n'
                     'run(["python", "-m", "deepsports.cli"])\nfiles("deepsports.data")\nx = "deepsports.cli.main:main"')
    assert _tag_literals(tree, {"deepsports.cli", "deepsports.data"}) == ["deepsports.config.", "deepsports.resumes"]


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines at top level (functions, classes, assignments), not those it imports."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_package_faces_name_the_module_that_defines_each_name():
    """A package's ``_EXPORTS`` (PEP 562 face) points each name at its definition, not at a re-export."""
    modules = _modules()
    wrong = []
    for package, (path, tree) in modules.items():
        if path.name != "__init__.py":
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["_EXPORTS"]:
                for name, where in ast.literal_eval(node.value).items():
                    if name not in _defined_names(modules[f"{package}.{where}"][1]):
                        wrong.append(f"{package}.{name} -> {where}")
    assert wrong == []


#: The one module that touches Optuna's private attributes (``study._storage``, ``trial._trial_id``...).
OPTUNA_COMPAT = "deepsports.tune._optuna_compat"
#: Other private attributes of an object not its own class's that a module reads, each with its reason.
PRIVATE_ATTRIBUTES = {
    ("deepsports.signals", "_exit"): "os._exit: how a forked DataLoader worker leaves (the standard library's, public)",
    ("deepsports.tune.recovery", "_exit"): "os._exit: how a fenced worker ends without writing anything more "
                                           "(the standard library's, public)",
    ("deepsports.cli.studies", "_subparsers"): "argparse keeps the subcommand parsers there (no public accessor)",
    ("deepsports.cli.studies", "_group_actions"): "argparse keeps the subcommand parsers there (no public accessor)",
    ("deepsports.tracking.runs", "_log_batch"): "MetricBuffer sends through its RunTracker (one module, one writer)",
    ("deepsports.tracking.system_metrics", "_logging_step"): "MLflow's SystemMetricsMonitor has no public way to choose "
                                                             "its first step (samples count from 1, not 0)",
}


def _foreign_privates(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, attribute)`` of each ``x._name`` where ``x`` is not ``self``/``cls`` (dunders aside)."""
    return sorted((node.lineno, node.attr) for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")))


def test_private_attributes_of_other_objects_only_where_named():
    """Optuna's private API (``study._storage``, ``trial._trial_id``) lives in tune/_optuna_compat.py alone."""
    found = {module: [(line, attr) for line, attr in _foreign_privates(tree) if (module, attr) not in PRIVATE_ATTRIBUTES]
             for module, (_path, tree) in _modules().items() if module != OPTUNA_COMPAT}
    assert {module: lines for module, lines in found.items() if lines} == {}
    compat = {attr for _line, attr in _foreign_privates(_modules()[OPTUNA_COMPAT][1])}
    assert compat == {"_rng", "_random_sampler", "_storage", "_study_id", "_trial_id"}  # the finder sees them there
    tree = ast.parse("a = study._storage\nb = self._x\nc = t._trial_id\nd = x.__class__\ne = cls._y")
    assert _foreign_privates(tree) == [(1, "_storage"), (3, "_trial_id")]


#: Modules that configure the package's root logger (``deepsports``, the parent of every module's logger).
ROOT_LOGGER_MODULES = {"deepsports.train.runtime": "setup_logging: the level and the one handler"}


def _hand_named_loggers(tree: ast.Module) -> list[int]:
    """Lines calling ``getLogger`` with anything but ``__name__`` (a hand-written name, or the root logger)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "getLogger"
                                               or getattr(node.func, "id", None) == "getLogger")
            and [ast.dump(arg) for arg in node.args] != [ast.dump(ast.Name("__name__", ast.Load()))]]


def test_loggers_are_named_by_their_module():
    found = {module: lines for module, (_path, tree) in _modules().items()
             if module not in ROOT_LOGGER_MODULES and (lines := _hand_named_loggers(tree))}
    assert found == {}
    tree = ast.parse('import logging\na = logging.getLogger(__name__)\nb = logging.getLogger("deepsports.x")\n'
                     'c = logging.getLogger()\nfrom logging import getLogger\nd = getLogger("x")')
    assert _hand_named_loggers(tree) == [3, 4, 6]


def _exit_calls(tree: ast.Module) -> list[int]:
    return _calls(tree, {("sys", "exit"), ("os", "_exit")})


#: Library modules that may end a process, each with the reason (never the user's main process).
EXITING_MODULES = {
    "deepsports.signals": "a forked DataLoader worker leaves at once when its parent shuts the loader "
                          "down (as torch's own worker handler does); the main process never exits there",
    "deepsports.tune.recovery": "fencing (TrialLease): a worker cut off from its study for longer than its lease "
                                "ends at once with os._exit, so that nothing more is written (no checkpoint, no "
                                "MLflow request still being retried) once another worker may take its trial over",
}


def test_only_the_cli_exits():
    exits = {module: lines for module, (_path, tree) in _modules().items()
             if _room(module) != "cli" and module not in EXITING_MODULES and (lines := _exit_calls(tree))}
    assert exits == {}


#: Functions longer than MAX_FUNCTION_LINES, each with the reason it stays whole.
LONG_FUNCTIONS = {
    "deepsports.data.video.decode_clips": "one generator whose decode state (pending and active clips, the "
                                          "frame iterator, its position) lives across yields; pieces would pass it all",
}
MAX_FUNCTION_LINES = 60

#: Modules longer than MAX_MODULE_LINES, each with the reason it stays one module.
LONG_MODULES = {
    "deepsports.config": "the one source of truth: every key's type, default, help and check side by side",
}
#: Lines of a module outside its top-level imports (ruff's import sorter writes a long import one name a line).
MAX_MODULE_LINES = 450


def _long_functions() -> dict[str, int]:
    found = {}
    for module, (_path, tree) in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{module}.{node.name}"] = length
    return found


def test_no_long_function_without_a_reason():
    found = _long_functions()
    assert {name: length for name, length in found.items() if name not in LONG_FUNCTIONS} == {}
    assert set(LONG_FUNCTIONS) - set(found) == set(), "no longer long: drop it from LONG_FUNCTIONS"


def _module_lines(path: Path, tree: ast.Module) -> int:
    imports = sum(node.end_lineno - node.lineno + 1 for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
    return len(path.read_text().splitlines()) - imports


def test_no_long_module_without_a_reason():
    found = {module: _module_lines(path, tree) for module, (path, tree) in _modules().items()}
    found = {module: lines for module, lines in found.items() if lines > MAX_MODULE_LINES}
    assert {module: lines for module, lines in found.items() if module not in LONG_MODULES} == {}
    assert set(LONG_MODULES) - set(found) == set(), "no longer long: drop it from LONG_MODULES"


def _imported_at_startup(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    # `python -m deepsports` (the package's __main__), as a user's `deepsports` console script starts.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "deepsports", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=subprocess_env("sqlite:///unused.db"))
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    return proc, modules


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in {"torch", "mlflow"})


def test_help_imports_neither_torch_nor_mlflow():
    proc, modules = _imported_at_startup("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deepsports.cli.main" in modules  # the reader sees this process's imports
    assert _heavy(modules) == []


def test_tune_workers_start_before_torch(tmp_path):
    """``tune --workers 2``: the parent checks the arguments and starts the workers; they import torch,
    each in its own process (``-X importtime`` is not passed on, so every line read here is the parent's).
    The workers stop at once: a grace period not above the heartbeat is refused by each worker's settings."""
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    proc, modules = _imported_at_startup("tune", str(space), "--study", "arch", "--workers", "2", "--heartbeat", "5",
                                         "--grace-period", "5", "--storage", str(tmp_path / "journal.log"))
    assert "2 of 2 tune workers failed" in proc.stderr, proc.stderr[-2000:]
    assert "deepsports.cli.studies" in modules
    assert _heavy(modules) == []
