"""A user's ``pip install``: the built wheel in a fresh venv, without torchsort, trains from outside the clone.

The fresh venv has no site packages of its own but the wheel: its other dependencies come from the test
interpreter's site-packages directories, named in a ``.pth`` file (those directories' own ``.pth`` files,
such as the clone's editable install, are not read, so ``deepsports`` is the wheel's). torchsort is
installed there (`make install` builds it), so a start-up hook of the venv refuses to import it while
``DEEPSPORTS_TEST_NO_TORCHSORT`` is set: the user who never installed the ``spearman`` extra.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.e2e_helpers import REPO, as_args, copy_store, tiny_overrides

pytestmark = pytest.mark.slow

_BLOCKER = '''\
import os, sys


class _NoTorchsort:
    """Refuses torchsort while DEEPSPORTS_TEST_NO_TORCHSORT is set (a machine without the spearman extra)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchsort" or name.startswith("torchsort."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if os.environ.get("DEEPSPORTS_TEST_NO_TORCHSORT"):
    sys.meta_path.insert(0, _NoTorchsort())
'''


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> dict:
    """The project's wheel (built from a copy of the sources), pip-installed into a fresh venv."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO / "deepsports", src / "deepsports", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((root / "dist").glob("deepsports-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "_deepsports_no_torchsort.py").write_text(_BLOCKER)
    (purelib / "_deepsports_no_torchsort.pth").write_text("import _deepsports_no_torchsort\n")
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "zz_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return {"wheel": wheel, "python": python, "bin": venv / "bin"}


def _user_env(venv: dict, tracking_uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_RUN_ID", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{venv['bin']}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def test_the_wheel_trains_from_outside_the_clone_without_torchsort_and_with_the_extra_ranks(wheel_venv, tmp_path, tiny_cache_dir,
                                                                     migrated_store):
    metadata = zipfile.ZipFile(wheel_venv["wheel"]).read(
        next(n for n in zipfile.ZipFile(wheel_venv["wheel"]).namelist() if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: spearman" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [line for line in requires if "torchsort" in line] == \
        ['Requires-Dist: torchsort<0.2,>=0.1.10; extra == "spearman"']
    user = tmp_path / "user"
    user.mkdir()
    uri = copy_store(migrated_store, user)
    env = _user_env(wheel_venv, uri, DEEPSPORTS_TEST_NO_TORCHSORT="1")
    where = subprocess.run([str(wheel_venv["python"]), "-c", "import deepsports, importlib.util; "
                            "print(deepsports.__file__); print(importlib.util.find_spec('torch') is not None); "
                            "import torchsort"], env=env, cwd=user, capture_output=True, text=True, timeout=120)
    assert where.returncode == 1 and "No module named 'torchsort'" in where.stderr, where.stderr
    assert where.stdout.splitlines() == [str(Path(wheel_venv["python"]).parent.parent / "lib" /
                                             f"python{sys.version_info.major}.{sys.version_info.minor}" /
                                             "site-packages" / "deepsports" / "__init__.py"), "True"]
    args = as_args(tiny_overrides(tmp_path, cache_dir=tiny_cache_dir, epochs=1, evaluate="false"))

    # The soft-Spearman loss asked for without torchsort: one line naming the install command, no run.
    refused = subprocess.run(["deepsports", "train", *args, "loss_spcoef_weight=0.5"], env=env, cwd=user,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        "deepsports: error: loss_spcoef_weight=0.5 needs torchsort, which is not installed: pip install "
        "--no-build-isolation torchsort==0.1.10 (after torch; `make install` in a clone does it; docs/install.md)"]

    done = subprocess.run(["deepsports", "train", *args], env=env, cwd=user, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs(["0", "1"], max_results=10)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(summary["run_id"], "FINISHED")]
    assert (user / "checkpoints" / summary["run_id"] / "best.pt").is_file()

    # With the extra (torchsort importable), the installed soft-Spearman loss trains: a gradient step raises it.
    with_extra = subprocess.run([str(wheel_venv["python"]), "-c", _SPEARMAN_STEP], env=_user_env(wheel_venv, uri),
                                cwd=user, capture_output=True, text=True, timeout=300)
    assert with_extra.returncode == 0, with_extra.stderr[-4000:]
    before, after, module = with_extra.stdout.split()
    assert float(after) > float(before) and module.startswith(str(wheel_venv["bin"].parent))


_SPEARMAN_STEP = """
import torch, torchsort
from deepsports.train.losses import aqa_loss
torch.manual_seed(0)
outputs = torch.rand(16, 2, requires_grad=True)
targets = torch.rand(16, 2)
loss, parts = aqa_loss(outputs, targets, mse_weight=0.0, spcoef_weight=1.0)
loss.backward()
with torch.no_grad():
    outputs -= 10.0 * outputs.grad
print(parts["soft_spearman"].item(), aqa_loss(outputs, targets, 0.0, 1.0)[1]["soft_spearman"].item(), torchsort.__file__ and
      __import__("deepsports").__file__)
"""
