"""One typed configuration for training, derived everywhere else.

Every argument of the original ``train.py`` keeps its name and meaning; the platform adds a few
keys of its own. This module is the single place that defines names, types, defaults, allowed
values and help text: the CLI flags, the MLproject parameters and the search-space keys are all
derived from :func:`config_fields` (``tests/cli/test_config.py`` checks that they agree).

Values are validated when a :class:`Config` is built; a bad value raises :class:`ConfigError`
naming the key, the value and what is allowed. Nothing is ever silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepsports.errors import ConfigError

FRAME_METHODS = ("random", "spaced_fixed", "spaced_varied", "spaced_fixed_new", "spaced_varied_new")
ACTIVATIONS = ("none", "relu", "leakyrelu", "elu", "gelu")
ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time")
OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSProp")
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKBONES = ("tiny", "small", "base")
DATASETS = ("synthetic", "mtl_aqa")
DIST_BACKENDS = ("auto", "nccl", "gloo")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULERS = ("none", "cosine")
RESUME_MODES = ("auto", "never")
FEATURE_NORMS = ("batchnorm", "none")
CACHE_GEOMETRIES = ("fit", "original")
#: Replaces the default ``cache_dir`` when the config is built (an explicit ``cache_dir`` wins).
CACHE_DIR_ENV = "DEEPSPORTS_CACHE_DIR"
#: Replaces ``checkpoints/`` in the default checkpoint folder ``checkpoints/<mlflow run id>``.
CHECKPOINT_ROOT_ENV = "DEEPSPORTS_CHECKPOINT_ROOT"
#: The original's intermediate frame, (height, width): 256 px high, 16:9.
ORIGINAL_FRAME_SIZE = (256, 455)

#: Keys that say where files are, not what is trained: MLflow gets them as tags ``deepsports.config.<key>``, not
#: params (params are what runs are compared by), and the MLproject leaves them out (``-P key=value`` still works).
LOCATION_KEYS = ("root_dir", "train_path", "test_path", "annotation_path", "output", "cache_dir", "checkpoint_dir")

#: Keys whose allowed values are matched case-insensitively and stored in their canonical case.
_CANONICAL_CASE = {"optimizer": OPTIMIZERS, "activation": ACTIVATIONS, "loglevel": LOGLEVELS}

# What a YAML file may already write (PyYAML reads yes/no/on/off as booleans), so that a key=value, a
# --flag and an MLproject -P accept the same spellings as an experiment file; anything else is refused.
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _opt(default: Any, help: str, *, original: Any = dataclasses.MISSING, choices: tuple | None = None,
         min: float | None = None, max: float | None = None, min_exclusive: bool = False,
         max_exclusive: bool = False, group: str = "original") -> Any:
    """A dataclass field with the metadata the CLI, MLproject and search spaces derive from."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive, "group": group,
            "original_default": default if original is dataclasses.MISSING else original}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def _platform(default: Any, help: str, **kw: Any) -> Any:
    return _opt(default, help, group="platform", **kw)


@dataclass(frozen=True)
class Config:
    """The training configuration (see the argument table in docs/configuration.md)."""

    # --- the original train.py's arguments (same names, same meaning) -------------------------
    loglevel: str = _opt("INFO", "Logging level.", choices=LOGLEVELS)
    gpu: bool = _opt(True, "Use a CUDA GPU when one is present (falls back to CPU with a warning).")
    root_dir: str = _opt("./", "Dataset root holding whole_videos/NN.mp4 (dataset=mtl_aqa).")
    train_path: str = _opt("", "Train split pickle/JSON (dataset=mtl_aqa; '' = MTL-AQA's split 0 shipped with DeepSports).",
                           original="./train_split_0.pkl")
    test_path: str = _opt("", "Test split pickle/JSON (dataset=mtl_aqa; '' = MTL-AQA's split 0 shipped with DeepSports).",
                          original="./test_split_0.pkl")
    batch_size: int = _opt(8, "Batch size.", original=4, min=1)
    epochs: int = _opt(10, "Number of training epochs.", original=5, min=1)
    learning_rate: float = _opt(3e-4, "Learning rate.", original=1e-5, min=0.0)
    weight_decay: float = _opt(1e-5, "Weight decay.", min=0.0)
    momentum: float = _opt(0.9, "Momentum of the SGD/RMSProp optimizers.", min=0.0)
    train_val_split_ratio: float = _opt(0.8, "Fraction of the train split used for training; the rest validates.",
                                        min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    frame_num: int = _opt(8, "Frames sampled from each clip.", min=1)
    frame_method: str = _opt("spaced_fixed", "How frames are sampled from a clip.", choices=FRAME_METHODS)
    spatial_size: int = _opt(112, "Side in pixels of the square frames fed to the model.", original=224, min=1)
    freeze: bool = _opt(False, "Freeze the backbone except its output projection.")
    dropout: tuple[float, ...] = _opt((0.5, 0.5), "Dropout before each linear layer of the MLP head; one per topology entry.",
                                      min=0.0, max=1.0)
    activation: str = _opt("none", "Activation of the MLP head.", choices=ACTIVATIONS)
    topology: tuple[int, ...] = _opt((512, 256), "Hidden units of the MLP head between backbone and output.", min=1)
    output: str = _opt("./losses.png", "File name of the loss-curve figure (logged as an MLflow artifact).")
    annotation_path: str = _opt("", "Annotations pickle/JSON (dataset=mtl_aqa; '' = MTL-AQA's annotations shipped with "
                                "DeepSports).", original="./final_annotations_dict.pkl")
    attention_type: str = _opt("divided_space_time", "Attention of the TimeSformer.", choices=ATTENTION_TYPES)
    optimizer: str = _opt("AdamW", "Optimizer.", choices=OPTIMIZERS)
    patch_size: int = _opt(16, "Patch side in pixels.", min=1)
    embed_dim: int = _opt(768, "Size of the backbone feature handed to the head.", min=1)
    pretrained_model: str = _opt("scratch", "Checkpoint to start from (.pyth, timm ViT state dict, or ours), or scratch/none.")
    evaluate: bool = _opt(True, "Evaluate the best checkpoint on the test split at the end.", original=False)
    normalize: bool = _opt(False, "Normalise RGB with the original's mean/std.")
    data_aug: bool = _opt(False, "Random crop to spatial_size + horizontal flip (else resize).")
    amsgrad: bool = _opt(False, "AMSGrad variant of Adam/AdamW.")
    videos: str | tuple[str, ...] = _opt("all", "Videos to use: all, or a list of video ids (e.g. 01 02).")
    loss_mse_weight: float = _opt(1.0, "Weight of the MSE loss.")
    loss_spcoef_weight: float = _opt(0.0, "Weight of the differentiable Spearman loss (subtracted).")
    use_decoder: bool = _opt(False, "Use a transformer-decoder head instead of the MLP.")

    # --- platform keys ----------------------------------------------------------------------
    dataset: str = _platform("synthetic", "synthetic: generated diving clips (default, cached); "
                                          "mtl_aqa: root_dir and the paths above.",
                             choices=DATASETS)
    synth_clips: int = _platform(600, "Number of synthetic clips (dataset=synthetic).", min=8)
    synth_seed: int = _platform(0, "Seed of the synthetic dataset (dataset=synthetic).", min=0)
    backbone: str = _platform("tiny", "Backbone size preset (base = published TimeSformer-B).", choices=BACKBONES)
    feature_norm: str = _platform("batchnorm", "Standardise the backbone feature before the MLP head: batchnorm keeps a "
                                  "from-scratch head well conditioned; none is the original.", choices=FEATURE_NORMS)
    drop_path_rate: float = _platform(0.0, "Stochastic depth rate of the backbone.", min=0.0, max=1.0, max_exclusive=True)
    seed: int = _platform(0, "Seed of model init, data split, sampling and augmentation.", min=0)
    deterministic: bool = _platform(False, "Use deterministic algorithms (slower; for debugging).")
    num_workers: int = _platform(2, "DataLoader worker processes.", min=0)
    dist_backend: str = _platform("auto", "Process-group backend under torchrun/srun: auto (nccl on CUDA, else gloo), "
                                  "nccl, gloo. batch_size stays the global batch.", choices=DIST_BACKENDS)
    precision: str = _platform("auto", "Mixed precision: auto (bf16 on CUDA where supported, else fp32), fp32, bf16 (on a CPU "
                               "with AVX-512 BF16/AMX the tiny step runs ~1.3x faster), fp16 (CUDA only).",
                               choices=PRECISIONS)
    compile: bool = _platform(False, "torch.compile the model for training: on a GPU 1.3-1.4x faster steps (base, H200; "
                              "benchmarks/README.md), the first step compiles for ~40-70 s, again after a resume; "
                              "no gain on the CPU.")
    lr_scheduler: str = _platform("cosine", "Learning-rate schedule over the epochs.", choices=LR_SCHEDULERS)
    warmup_epochs: int = _platform(1, "Linear warm-up epochs of the schedule (at most epochs; a one-epoch run warms up "
                                   "all along).", min=0)
    grad_clip_norm: float = _platform(1.0, "Clip the gradient norm to this value (0 = off).", min=0.0)
    cache_dir: str = _platform("~/.cache/deepsports", "Where synthetic data and the clip cache live "
                                                      "($DEEPSPORTS_CACHE_DIR replaces the default; the value used "
                                                      "is the one printed and logged).")
    cache_geometry: str = _platform("fit", "Frames the clip cache holds: fit = what training reads (spatial_size square; "
                                    "with data_aug the 16:9 frame the crops come from, spatial_size * 256/224 high); "
                                    "original = the original's 256x455 intermediate.", choices=CACHE_GEOMETRIES)
    cache_height: int = _platform(0, "Height of cached frames (0 = set by cache_geometry; else spatial_size * 256/224 "
                                  "when only cache_width is given).", min=0)
    cache_width: int = _platform(0, "Width of cached frames (0 = set by cache_geometry, or 16:9 of cache_height).", min=0)
    checkpoint_dir: str = _platform("", "Checkpoint directory ('' = checkpoints/<mlflow run id>; $DEEPSPORTS_CHECKPOINT_ROOT "
                                    "replaces checkpoints/). With resume=auto the newest "
                                    "valid checkpoint there (epoch-NNNN[-partial].pt) is resumed into its MLflow run.")
    resume: str = _platform("auto", "auto: resume from checkpoint_dir when it holds a checkpoint; never: start fresh.",
                            choices=RESUME_MODES)
    experiment_name: str = _platform("deepsports", "MLflow experiment.")
    run_name: str = _platform("", "MLflow run name ('' = generated).")
    log_model: bool = _platform(True, "Log the final model with mlflow.pytorch.log_model (torch.export / pt2: "
                                "loads without unpickling; docs/ui.md).")
    log_checkpoint: bool = _platform(True, "Log the best checkpoint (best.pt) as an MLflow artifact; it stays in "
                                     "checkpoint_dir either way.")
    system_metrics_interval_s: float = _platform(10.0, "Seconds between samples of MLflow's system metrics (system/*: "
                                                 "CPU, memory, disk, network; GPU with nvidia-ml-py), logged on every "
                                                 "training run (0 = off; else at least 1; overhead "
                                                 "benchmarks/README.md).", min=0.0)
    log_every_steps: int = _platform(20, "Without a terminal, print a progress line every this many steps.", min=1)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        if self.cache_dir == _FIELDS["cache_dir"].default and os.environ.get(CACHE_DIR_ENV):
            # What is recorded (config.yaml, the cache_dir tag, a trial's config) is what is used.
            object.__setattr__(self, "cache_dir", os.environ[CACHE_DIR_ENV])
        self._check_relations()

    def _check_relations(self) -> None:
        if 0 < self.system_metrics_interval_s < 1:
            raise ConfigError(f"system_metrics_interval_s={format_value(self.system_metrics_interval_s)} is invalid: "
                              "expected 0 (off) or at least 1 (seconds)", keys=("system_metrics_interval_s",))
        if len(self.dropout) != len(self.topology):
            raise _relation_error(f"dropout={list(self.dropout)!r} has {len(self.dropout)} values but topology="
                                  f"{list(self.topology)!r} has {len(self.topology)}: give one dropout per topology entry",
                                  "dropout", "topology")
        if self.dataset == "synthetic":
            for key in ("root_dir", "train_path", "test_path", "annotation_path"):
                if getattr(self, key) != _FIELDS[key].default:
                    raise _relation_error(f"{key}={getattr(self, key)!r} is only used with dataset=mtl_aqa "
                                          f"(dataset is 'synthetic'); set dataset=mtl_aqa or drop {key}", key, "dataset")
        if self.feature_norm == "batchnorm" and self.batch_size == 1 and not self.use_decoder:
            raise _relation_error("feature_norm=batchnorm needs batch_size >= 2 (batch statistics of one clip are "
                                  "undefined); use feature_norm=none with batch_size=1", "feature_norm", "batch_size")
        if self.spatial_size % self.patch_size:
            raise _relation_error(f"spatial_size={self.spatial_size} is not a multiple of patch_size={self.patch_size}: "
                                  "the frame must split into whole patches", "spatial_size", "patch_size")
        if self.cache_height and self.cache_height < self.spatial_size:
            raise _relation_error(f"cache_height={self.cache_height} is smaller than spatial_size={self.spatial_size}",
                                  "cache_height", "spatial_size")
        if self.warmup_epochs > self.epochs and self.lr_scheduler != "none":
            raise _relation_error(f"warmup_epochs={self.warmup_epochs} is longer than the run (epochs={self.epochs}): "
                                  "use warmup_epochs <= epochs or lr_scheduler=none", "warmup_epochs", "epochs")

    # --- derived values -------------------------------------------------------------------
    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the frames stored in the clip cache (see ``cache_geometry``)."""
        intermediate = round(self.spatial_size * ORIGINAL_FRAME_SIZE[0] / 224)
        if self.cache_height or self.cache_width:  # explicit pixels win
            height = self.cache_height or intermediate
            return height, self.cache_width or round(height * 16 / 9)
        if self.cache_geometry == "original":
            return ORIGINAL_FRAME_SIZE
        if self.data_aug:  # random crops of the 16:9 frame scaled to spatial_size (the original's 256x455 at 224)
            return intermediate, round(intermediate * 16 / 9)
        return self.spatial_size, self.spatial_size  # the whole frame squeezed to a square, as training reads it

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

    # --- conversions ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-friendly values (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_params(self) -> dict[str, str]:
        """Every value as a readable string (lists as ``512,256``), for MLflow params."""
        return {name: format_value(value) for name, value in self.to_dict().items()}

    def replace(self, **changes: Any) -> Config:
        return build_config({**self.to_dict(), **changes})


def _relation_error(message: str, *keys: str) -> ConfigError:
    return ConfigError(message, keys=keys)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def format_value(value: Any) -> str:
    """The string form used for params, CLI round-trips and MLproject defaults."""
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------------------------
# Field introspection
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    """What the CLI, MLproject and search spaces need to know about one config key."""

    name: str
    kind: str  # "bool" | "int" | "float" | "str" | "int_list" | "float_list" | "videos"
    default: Any
    original_default: Any
    help: str
    group: str
    choices: tuple | None
    min: float | None
    max: float | None
    min_exclusive: bool
    max_exclusive: bool

    def describe_allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        base = {"bool": "a boolean (true/false, yes/no, on/off, 1/0)", "int": "an integer", "float": "a number",
                "str": "a string",
                "int_list": "a list of integers", "float_list": "a list of numbers",
                "videos": "'all' or a list of video ids like 01 02"}[self.kind]
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            bounds.append(f"{'<' if self.max_exclusive else '<='} {self.max:g}")
        if bounds:
            base += (" with each value " if self.kind.endswith("_list") else " ") + " and ".join(bounds)
        return base


def _kind(tp: Any) -> str:
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "str"
    if tp == tuple[int, ...]:
        return "int_list"
    if tp == tuple[float, ...]:
        return "float_list"
    if isinstance(tp, types.UnionType):
        return "videos"
    raise TypeError(f"unsupported config type {tp!r}")


def _build_specs() -> dict[str, FieldSpec]:
    hints = typing.get_type_hints(Config)
    specs = {}
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        m = f.metadata
        specs[f.name] = FieldSpec(name=f.name, kind=_kind(hints[f.name]), default=default,
                                  original_default=m["original_default"], help=m["help"], group=m["group"],
                                  choices=m["choices"], min=m["min"], max=m["max"],
                                  min_exclusive=m["min_exclusive"], max_exclusive=m["max_exclusive"])
    return specs


def config_fields() -> dict[str, FieldSpec]:
    """Every config key with its type, default, help text and allowed values, in declaration order."""
    return dict(_FIELDS)


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------

def _fail(spec: FieldSpec, value: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"{spec.name}={value!r} is invalid{extra}: expected {spec.describe_allowed()}", keys=(spec.name,))


def _split_list(raw: str) -> list[str]:
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part for part in text.replace(",", " ").split() if part]


def _scalar(spec: FieldSpec, kind: str, value: Any, whole: Any) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _fail(spec, whole)
    if kind == "int":
        if isinstance(value, bool):
            raise _fail(spec, whole)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _fail(spec, whole)
    if kind == "float":
        if isinstance(value, bool):
            raise _fail(spec, whole)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _fail(spec, whole)
    if kind == "str":
        if isinstance(value, str):
            return value
        if value is None and spec.choices and "none" in spec.choices:
            return "none"
        raise _fail(spec, whole)
    raise AssertionError(kind)


def _check_bounds(spec: FieldSpec, number: float, whole: Any) -> None:
    if not math.isfinite(number):  # NaN or infinite: no key has a use for either
        raise _fail(spec, whole, " (not a finite number)")
    if spec.min is not None and (number < spec.min or (spec.min_exclusive and number == spec.min)):
        raise _fail(spec, whole)
    if spec.max is not None and (number > spec.max or (spec.max_exclusive and number == spec.max)):
        raise _fail(spec, whole)


def parse_value(name: str, value: Any) -> Any:
    """Parse and validate one value (a YAML/Python value or a command-line string) for key ``name``."""
    if name not in _FIELDS:
        raise ConfigError(unknown_key_message(name))
    spec = _FIELDS[name]
    if spec.kind in ("int_list", "float_list"):
        items = _split_list(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise _fail(spec, value, " (an empty or non-list value)")
        item_kind = spec.kind.removesuffix("_list")
        parsed = tuple(_scalar(spec, item_kind, item, value) for item in items)
        for item in parsed:
            _check_bounds(spec, item, value)
        return parsed
    if spec.kind == "videos":
        return _parse_videos(spec, value)
    parsed = _scalar(spec, spec.kind, value, value)
    if spec.choices:
        lookup = {c.lower(): c for c in spec.choices}
        key = parsed.lower() if name in _CANONICAL_CASE else parsed
        if key not in (lookup if name in _CANONICAL_CASE else spec.choices):
            raise _fail(spec, value)
        parsed = lookup[key] if name in _CANONICAL_CASE else parsed
    if spec.kind in ("int", "float"):
        _check_bounds(spec, parsed, value)
    return parsed


def _parse_videos(spec: FieldSpec, value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    items = _split_list(value) if isinstance(value, str) else value
    if isinstance(items, (list, tuple)) and list(items) == ["all"]:
        return "all"
    if not isinstance(items, (list, tuple)) or not items:
        raise _fail(spec, value)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise _fail(spec, value)
        text = str(item).strip()
        if not text.isdigit():
            raise _fail(spec, value, f" (video id {item!r} is not a number)")
        out.append(f"{int(text):02d}")
    if len(set(out)) != len(out):
        raise _fail(spec, value, " (a video id is repeated)")
    return tuple(out)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    return parse_value(f.name, value)


#: How to add the soft-Spearman loss's torchsort to an installed DeepSports (docs/install.md: why not
#: ``pip install deepsports[spearman]`` alone: torchsort ships no wheel and its isolated build cannot see torch).
TORCHSORT_INSTALL = "pip install --no-build-isolation torchsort==0.1.10"


def torchsort_installed() -> bool:
    """Whether torchsort (the ``spearman`` extra) can be imported, without importing it (or torch)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torchsort") is not None
    except (ImportError, ValueError):
        return False


def require_torchsort(what: str) -> None:
    """Raise :class:`ConfigError` naming the install command when torchsort is missing."""
    if not torchsort_installed():
        raise ConfigError(f"{what} needs torchsort, which is not installed: {TORCHSORT_INSTALL} "
                          "(after torch; `make install` in a clone does it; docs/install.md)",
                          keys=("loss_spcoef_weight",))


def check_installed(config: Config, source: str = "") -> None:
    """What ``config`` needs beyond the core dependencies is installed (before any run is created):
    ``loss_spcoef_weight != 0`` needs torchsort."""
    if config.loss_spcoef_weight != 0:
        where = f" ({source})" if source else ""
        require_torchsort(f"loss_spcoef_weight={format_value(config.loss_spcoef_weight)}{where}")


def unknown_key_message(name: str, where: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(name, list(_FIELDS), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    src = f" in {where}" if where else ""
    return f"unknown config key {name!r}{src}{hint} (allowed keys: {', '.join(_FIELDS)})"


def build_config(values: Mapping[str, Any] | None = None, *, source: str = "",
                 sources: Mapping[str, str] | None = None) -> Config:
    """Build a validated :class:`Config` from a mapping of key -> value; unknown keys are errors.

    ``sources`` says where each value came from (key -> e.g. a file name, ``the command line``),
    ``source`` where the others did; an error names the origin of every value it is about.
    """
    values = dict(values or {})
    origin = {key: (sources or {}).get(key) or source for key in values}
    for key in values:
        if key not in _FIELDS:
            raise ConfigError(unknown_key_message(str(key), origin[key]))
    try:
        return Config(**values)
    except ConfigError as exc:
        raise ConfigError(_with_origins(exc, origin), keys=exc.keys) from None


def _with_origins(exc: ConfigError, origin: Mapping[str, str]) -> str:
    if len(exc.keys) == 1 and origin.get(exc.keys[0]):
        return f"{origin[exc.keys[0]]}: {exc}"
    if len(exc.keys) > 1 and any(origin.get(key) for key in exc.keys):
        where = "; ".join(f"{key} from {origin.get(key) or 'the defaults'}" for key in exc.keys)
        return f"{exc} ({where})"
    return str(exc)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["epochs=3", "topology=512,256"]`` -> raw (unparsed) mapping; validation happens in build_config."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if key not in _FIELDS:
            raise ConfigError(unknown_key_message(key, "overrides"))
        out[key] = raw
    return out


def resolve_experiment_path(name_or_path: str | os.PathLike, experiments_dir: str | os.PathLike | None = None) -> Path:
    """``seed_best`` -> ``experiments/seed_best.yaml`` (here, else the one shipped with DeepSports); a path is used
    as it is."""
    if experiments_dir is None:
        from deepsports.locate import find_named

        return find_named(name_or_path, "experiments", "config file")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        candidate = path
    else:
        base = Path(experiments_dir) if experiments_dir else Path("experiments")
        candidate = base / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"config file {str(candidate)!r} does not exist (give experiments/<name>.yaml or a path)")
    return candidate


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Raw key -> value mapping of an experiment YAML (validated later by :func:`build_config`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            raise ConfigError(unknown_key_message(str(key), str(path)))
    return data


def load_config(config: str | os.PathLike | None = None, overrides: Mapping[str, Any] | Iterable[str] | None = None,
                overrides_source: str = "the overrides") -> Config:
    """Experiment file (name or path, optional) + overrides (``key=value`` strings or a mapping)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config:
        path = resolve_experiment_path(config)
        values.update(read_config_file(path))
        sources.update(dict.fromkeys(values, str(path)))
    if overrides:
        given = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        values.update(given)
        sources.update(dict.fromkeys(given, overrides_source))
    return build_config(values, sources=sources)


def check_writable_dirs(config: Config | None = None, *, cache_dir: str | None = None,
                        checkpoint_dir: str | None = None, what: str = "") -> None:
    """The folders a run writes accept files, checked before any run or study exists: else one
    :class:`ConfigError` (exit 2) naming the key, the folder, the system's reason and the way out.

    ``config`` gives ``cache_dir`` and ``checkpoint_dir`` (its ``''`` default is
    ``$DEEPSPORTS_CHECKPOINT_ROOT`` or ``checkpoints``); keywords replace either (a study's checkpoint root).
    """
    from deepsports.fileio import unwritable_reason

    cache = cache_dir if cache_dir is not None else (config.cache_dir if config is not None else None)
    ckpt = checkpoint_dir if checkpoint_dir is not None else (config.checkpoint_dir if config is not None else None)
    checks = []
    if cache is not None:
        from_env = os.environ.get(CACHE_DIR_ENV) == cache
        checks.append(("cache_dir", cache, f" (from ${CACHE_DIR_ENV})" if from_env else "",
                       f"set cache_dir=DIR or ${CACHE_DIR_ENV} to a writable folder"))
    if ckpt is not None:
        root = os.environ.get(CHECKPOINT_ROOT_ENV)
        where = "" if ckpt else (f" (the checkpoint root ${CHECKPOINT_ROOT_ENV})" if root else
                                 " (the default checkpoints/ in the working directory)")
        checks.append(("checkpoint_dir", ckpt or root or "checkpoints", where,
                       "set checkpoint_dir=DIR" + ("" if ckpt else f" or ${CHECKPOINT_ROOT_ENV}") + " to a writable folder"))
    for key, folder, source, way_out in checks:
        reason = unwritable_reason(folder)
        if reason is not None:
            raise ConfigError(f"{what}{key} {folder!r}{source} is not writable: {reason}; {way_out}", keys=(key,))


_FIELDS: dict[str, FieldSpec] = _build_specs()

#: The original train.py's argument names, in the order of its README table.
ORIGINAL_ARGUMENTS = tuple(name for name, spec in _FIELDS.items() if spec.group == "original")
