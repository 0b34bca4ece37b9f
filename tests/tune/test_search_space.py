"""Search-space files: validation errors, and sampling through real Optuna studies (no training)."""

from __future__ import annotations

import hashlib
import math
import textwrap
import warnings
from decimal import Decimal
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsports.config import Config, build_config, config_fields
from deepsports.errors import ConfigError, SearchSpaceError
from deepsports.tune.search_space import load_search_space

REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE_EXPERIMENT = {"dataset": "synthetic", "synth_clips": 64, "momentum": 0.75, "topology": [32, 16], "dropout": [0.1, 0.2]}

EVERY_KIND = """\
description: one of every kind of parameter
base_config: experiments/base.yaml       # found via the parent of the file's directory
fixed: {epochs: 3, loss_mse_weight: 1.5}
params:
  optimizer: {type: categorical, choices: [Adam, adamw, SGD, RMSProp]}
  momentum: {type: float, low: 0.5, high: 0.99, when: {optimizer: [SGD, RMSProp]}}
  amsgrad: {type: categorical, choices: [true, false], when: {optimizer: [Adam, AdamW]}}
  learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
  grad_clip_norm: {type: float, low: 0.0, high: 2.0, step: 0.25}
  batch_size: {type: int, low: 4, high: 16, step: 4}
  frame_num: {type: int, low: 2, high: 32, log: true}
  activation: {type: categorical, choices: [none, relu, leakyrelu, elu, gelu]}
  use_decoder: {type: categorical, choices: [false, true]}
  topology: {type: layers, n_layers: {low: 1, high: 3}, units: {low: 16, high: 256, log: true},
             when: {use_decoder: [false]}}
  dropout: {type: per_layer, of: topology, low: 0.0, high: 0.6, step: 0.1}
  loss_spcoef_weight: {type: float, low: 0.0, high: 1.0}
"""


def _write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    (tmp_path / "experiments").mkdir(exist_ok=True)
    (tmp_path / "experiments" / "base.yaml").write_text(yaml.safe_dump(BASE_EXPERIMENT))
    (tmp_path / "spaces").mkdir(exist_ok=True)
    path = tmp_path / "spaces" / name
    path.write_text(textwrap.dedent(text))
    return path


def _study(sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    return optuna.create_study(direction="maximize", sampler=sampler)


def _tpe(seed: int = 0) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():  # multivariate/group are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)


def _dummy_objective(config: Config) -> float:
    """Something for TPE to model: prefers lr near 1e-3 and small heads."""
    return -abs(math.log10(config.learning_rate) + 3) - 0.001 * sum(config.topology)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_sampler,n_trials", [(_tpe, 200), (lambda: optuna.samplers.RandomSampler(seed=1), 300)],
                         ids=["tpe-multivariate-group", "random"])
def test_every_kind_samples_only_valid_configs(tmp_path, make_sampler, n_trials):
    space = load_search_space(_write_space(tmp_path, EVERY_KIND))
    study = _study(make_sampler())
    configs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for _ in range(n_trials):
            trial = study.ask()
            config = space.build_config(trial)
            study.tell(trial, _dummy_objective(config))
            configs.append(config)

    branches = {"sgd_like": 0, "adam_like": 0, "decoder": 0, "depths": set()}
    for frozen, config in zip(study.trials, configs):
        params = frozen.params
        assert build_config(config.to_dict()) == config  # passes validation again from plain values
        assert config.epochs == 3 and config.loss_mse_weight == 1.5 and config.synth_clips == 64  # fixed + base
        # conditional params exist exactly when their condition holds; otherwise the base value stays
        if config.optimizer in ("SGD", "RMSProp"):
            branches["sgd_like"] += 1
            assert "momentum" in params and "amsgrad" not in params
            assert 0.5 <= config.momentum <= 0.99
        else:
            branches["adam_like"] += 1
            assert "amsgrad" in params and "momentum" not in params
            assert config.momentum == 0.75 and config.amsgrad is params["amsgrad"]
        if config.use_decoder:
            branches["decoder"] += 1
            assert not any(name.startswith(("n_layers", "units_l", "dropout_l")) for name in params)
            assert config.topology == (32, 16) and config.dropout == (0.1, 0.2)
        else:
            depth = params["n_layers"]
            branches["depths"].add(depth)
            assert len(config.topology) == len(config.dropout) == depth
            assert config.topology == tuple(params[f"units_l{i}"] for i in range(depth))
            assert config.dropout == tuple(params[f"dropout_l{i}"] for i in range(depth))
            assert all(16 <= u <= 256 for u in config.topology)
            assert all(0.0 <= d <= 0.6 and _on_grid(d, 0.0, 0.1) for d in config.dropout)
        assert 1e-5 <= config.learning_rate <= 1e-2
        assert config.batch_size in (4, 8, 12, 16)
        assert 2 <= config.frame_num <= 32
        assert 0.0 <= config.grad_clip_norm <= 2.0 and _on_grid(config.grad_clip_norm, 0.0, 0.25)
        assert config.activation in ("none", "relu", "leakyrelu", "elu", "gelu")
        # a finished trial rebuilds the same config (what `deepsports best` does)
        assert space.config_from_params(params) == config
        assert space.build_config(frozen) == config
    assert branches["sgd_like"] and branches["adam_like"] and branches["decoder"]
    assert branches["depths"] == {1, 2, 3}


def _on_grid(value: float, low: float, step: float) -> bool:
    ratio = (value - low) / step
    return abs(ratio - round(ratio)) < 1e-6


def test_categorical_choices_of_list_keys_become_lists(tmp_path):
    space = load_search_space(_write_space(tmp_path, """\
        fixed: {dropout: [0.1, 0.2]}
        params:
          topology: {type: categorical, choices: ["64,32", [128, 64]]}
        """))
    study = _study(optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        assert space.suggest(trial)["topology"] in ([64, 32], [128, 64])
        seen.add(space.build_config(trial).topology)
        study.tell(trial, 0.0)
    assert seen == {(64, 32), (128, 64)}
    assert {t.params["topology"] for t in study.trials} == {"64,32", "128,64"}  # what Optuna stores


def test_overrides_apply_under_sampled_values_and_cannot_replace_them(tmp_path):
    space = load_search_space(_write_space(tmp_path, EVERY_KIND))
    params = {"optimizer": "SGD", "momentum": 0.9, "learning_rate": 1e-3, "grad_clip_norm": 0.5, "batch_size": 8,
              "frame_num": 4, "activation": "gelu", "use_decoder": True, "loss_spcoef_weight": 0.0}
    config = space.config_from_params(params, overrides={"epochs": 5, "evaluate": False})
    assert (config.epochs, config.evaluate, config.optimizer, config.momentum) == (5, False, "SGD", 0.9)
    with pytest.raises(SearchSpaceError, match=r"cannot override learning_rate: the study samples it"):
        space.config_from_params(params, overrides={"learning_rate": 0.1})


@pytest.mark.parametrize("change,message", [
    ({"learning_rate": None}, "parameter 'learning_rate' is missing"),
    ({"learning_rate": 0.5}, r"learning_rate=0.5 is outside the space: expected a number in \[1e-05, 0.01\]"),
    ({"batch_size": 6}, r"batch_size=6 is outside the space: expected an integer in \[4, 16\] with step 4"),
    ({"optimizer": "Adagrad"}, "optimizer='Adagrad' is outside the space"),
    ({"n_layers": 2}, "params n_layers are not sampled by this space"),
], ids=["missing", "float-range", "int-step", "choice", "unused"])
def test_params_of_a_different_space_are_refused(tmp_path, change, message):
    path = _write_space(tmp_path, EVERY_KIND)
    space = load_search_space(path)
    params = {"optimizer": "SGD", "momentum": 0.9, "learning_rate": 1e-3, "grad_clip_norm": 0.5, "batch_size": 8,
              "frame_num": 4, "activation": "gelu", "use_decoder": True, "loss_spcoef_weight": 0.0}
    params.update(change)
    params = {k: v for k, v in params.items() if v is not None}
    with pytest.raises(SearchSpaceError, match=message) as info:
        space.config_from_params(params)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# Validation errors: each names the file, the key, and what is allowed
# --------------------------------------------------------------------------------------------

_OK_LR = "learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}"
BAD_FILES = {
    "unknown-top-level-key": ("parms: {}\n",
                              ["unknown top-level key 'parms'", "allowed: description, base_config, fixed, params"]),
    "not-a-mapping": ("- learning_rate\n", ["must be a mapping"]),
    "duplicate-key": (f"params:\n  {_OK_LR}\n  {_OK_LR}\n", ["duplicate key 'learning_rate'"]),
    "no-params": ("fixed: {epochs: 2}\n", ["params: must be a non-empty mapping"]),
    "unknown-param-key": ("params:\n  learnin_rate: {type: float, low: 0.1, high: 0.2}\n",
                          ["unknown config key 'learnin_rate'", "did you mean learning_rate", "allowed keys:", "(params)"]),
    "unknown-fixed-key": (f"fixed: {{epoch: 2}}\nparams:\n  {_OK_LR}\n",
                          ["unknown config key 'epoch'", "allowed keys:", "(fixed)"]),
    "bad-fixed-value": (f"fixed: {{optimizer: Adagrad}}\nparams:\n  {_OK_LR}\n",
                        ["fixed.optimizer", "one of Adam, AdamW, SGD, RMSProp"]),
    "fixed-and-sampled": (f"fixed: {{learning_rate: 0.1}}\nparams:\n  {_OK_LR}\n",
                          ["params.learning_rate", "also under fixed"]),
    "scalar-param": ("params:\n  epochs: 3\n", ["params.epochs", "put constant values under fixed"]),
    "unknown-type": ("params:\n  epochs: {type: integer, low: 1, high: 3}\n",
                     ["params.epochs", "type 'integer' is not one of float, int, categorical, layers, per_layer"]),
    "unknown-field": ("params:\n  epochs: {type: int, low: 2, high: 3, lo: 1}\n",
                      ["params.epochs", "unknown field 'lo'", "allowed: type, low, high, step, log, when"]),
    "missing-high": ("params:\n  epochs: {type: int, low: 2}\n", ["params.epochs", "high is required"]),
    "dropout-above-1": ("params:\n  topology: {type: layers, n_layers: {low: 1, high: 2}, units: {low: 8, high: 64}}\n"
                        "  dropout: {type: per_layer, of: topology, low: 0.0, high: 1.5}\n",
                        ["params.dropout.high", "outside what the config allows", "<= 1"]),
    "negative-learning-rate": ("params:\n  learning_rate: {type: float, low: -0.1, high: 0.1}\n",
                               ["params.learning_rate.low", "outside what the config allows", ">= 0"]),
    "exclusive-bound": ("params:\n  train_val_split_ratio: {type: float, low: 0.5, high: 1.0}\n",
                        ["params.train_val_split_ratio.high", "< 1"]),
    "int-for-float-key": ("params:\n  learning_rate: {type: int, low: 1, high: 3}\n",
                          ["params.learning_rate", "type int does not fit", "a number >= 0", "use type float or categorical"]),
    "float-for-int-key": ("params:\n  batch_size: {type: float, low: 1, high: 3}\n",
                          ["params.batch_size", "type float does not fit", "an integer >= 1"]),
    "fractional-int-bound": ("params:\n  batch_size: {type: int, low: 1.5, high: 3}\n",
                             ["params.batch_size.low", "1.5 is not an integer"]),
    "exponent-read-as-text": ("params:\n  learning_rate: {type: float, low: 1e-5, high: 1.0e-2, log: true}\n",
                              ["params.learning_rate.low", "'1e-5' is a string", "write e.g. 1.0e-5"]),
    "rejected-choice": ("params:\n  optimizer: {type: categorical, choices: [Adam, Adagrad]}\n",
                        ["params.optimizer.choices", "'Adagrad' is rejected", "one of Adam, AdamW, SGD, RMSProp"]),
    "rejected-bool-choice": ("params:\n  amsgrad: {type: categorical, choices: [true, maybe]}\n",
                             ["params.amsgrad.choices", "'maybe'", "a boolean"]),
    "empty-choices": ("params:\n  optimizer: {type: categorical, choices: []}\n",
                      ["params.optimizer.choices", "non-empty list"]),
    "low-above-high": ("params:\n  weight_decay: {type: float, low: 0.1, high: 0.01}\n",
                       ["params.weight_decay", "low=0.1 is greater than high=0.01"]),
    "log-with-zero-low": ("params:\n  weight_decay: {type: float, low: 0.0, high: 0.01, log: true}\n",
                          ["params.weight_decay", "log: true needs low > 0"]),
    "log-with-step": ("params:\n  batch_size: {type: int, low: 2, high: 8, step: 2, log: true}\n",
                      ["params.batch_size", "step and log: true cannot be combined"]),
    "step-not-dividing": ("params:\n  batch_size: {type: int, low: 4, high: 15, step: 4}\n",
                          ["params.batch_size", "not a multiple of step=4"]),
    "when-unknown-param": ("params:\n  momentum: {type: float, low: 0.5, high: 0.9, when: {optimiser: [SGD]}}\n",
                           ["params.momentum.when", "'optimiser'", "not a param of this file"]),
    "when-later-param": ("params:\n  momentum: {type: float, low: 0.5, high: 0.9, when: {optimizer: [SGD]}}\n"
                         "  optimizer: {type: categorical, choices: [Adam, SGD]}\n",
                         ["params.momentum.when", "'optimizer'", "defined after it", "only use earlier categorical"]),
    "when-non-categorical": ("params:\n  weight_decay: {type: float, low: 0.0, high: 0.01}\n"
                             "  momentum: {type: float, low: 0.5, high: 0.9, when: {weight_decay: [0.0]}}\n",
                             ["params.momentum.when", "'weight_decay' of type float"]),
    "when-value-not-a-choice": ("params:\n  optimizer: {type: categorical, choices: [Adam, SGD]}\n"
                                "  momentum: {type: float, low: 0.5, high: 0.9, when: {optimizer: [RMSProp]}}\n",
                                ["params.momentum.when.optimizer", "'RMSProp' is not among its choices (Adam, SGD)"]),
    "of-non-layers-param": ("params:\n  learning_rate: {type: float, low: 0.001, high: 0.01}\n"
                            "  dropout: {type: per_layer, of: learning_rate, low: 0.0, high: 0.5}\n",
                            ["params.dropout", "of='learning_rate' must name an earlier param of type layers",
                             "earlier layers params: none"]),
    "layers-on-scalar-key": ("params:\n  batch_size: {type: layers, n_layers: {low: 1, high: 2}, units: {low: 1, high: 4}}\n",
                             ["params.batch_size", "type layers needs a list-of-integers key (topology)"]),
    "layers-zero-depth": ("params:\n  topology: {type: layers, n_layers: {low: 0, high: 2}, units: {low: 8, high: 64}}\n"
                          "  dropout: {type: per_layer, of: topology, low: 0.0, high: 0.5}\n",
                          ["params.topology.n_layers", "at least 1 layer"]),
    "topology-without-per-layer-dropout": (
        "params:\n  topology: {type: layers, n_layers: {low: 1, high: 3}, units: {low: 8, high: 64}}\n",
        ["params.topology", "dropout must be {type: per_layer, of: topology"]),
    "invalid-corner-config": ("fixed: {warmup_epochs: 2}\nparams:\n  epochs: {type: int, low: 1, high: 5}\n",
                              ["every parameter at its low end", "warmup_epochs=2 is longer than the run (epochs=1)"]),
    "missing-base-config": (f"base_config: experiments/nowhere.yaml\nparams:\n  {_OK_LR}\n",
                            ["base_config", "'experiments/nowhere.yaml' not found"]),
}


@pytest.mark.parametrize("text,fragments", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_search_space_files_are_refused_with_file_key_and_allowed_values(tmp_path, text, fragments):
    path = _write_space(tmp_path, text)
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    assert isinstance(info.value, ConfigError)  # the CLI maps it to the config exit code
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_search_space_file_is_named(tmp_path):
    with pytest.raises(SearchSpaceError, match="nope.yaml' does not exist"):
        load_search_space(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------------------------
# Property: any valid range spec samples within its bounds
# --------------------------------------------------------------------------------------------

# Keys without cross-key relations in the config, so any of their values builds a valid config.
_FLOAT_KEYS = ("learning_rate", "weight_decay", "momentum", "loss_mse_weight", "loss_spcoef_weight", "grad_clip_norm",
               "drop_path_rate", "train_val_split_ratio")
_INT_KEYS = ("batch_size", "frame_num", "seed", "synth_seed", "num_workers", "log_every_steps")
_CATEGORICAL_KEYS = ("optimizer", "activation", "frame_method", "attention_type", "precision", "amsgrad", "freeze",
                     "normalize", "data_aug", "use_decoder")


def _bounds(key: str, span: float) -> tuple[float, float]:
    spec = config_fields()[key]
    low = (spec.min or 0.0) + (1e-6 if spec.min_exclusive else 0.0)
    high = spec.max - (1e-6 if spec.max_exclusive else 0.0) if spec.max is not None else low + span
    return low, high


@st.composite
def _float_spec(draw, key):
    low_bound, high_bound = _bounds(key, 100.0)
    mode = draw(st.sampled_from(["plain", "log", "step"]))
    if mode == "step":  # a grid Optuna accepts exactly: decimal low and step
        step = draw(st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.25, 1.0, 5.0]))
        low = round(draw(st.floats(low_bound, high_bound - step, allow_nan=False)), 3) if high_bound - step > low_bound \
            else None
        if low is not None and low_bound <= low:
            k = draw(st.integers(0, int((high_bound - low) / step)))
            return {"type": "float", "low": low, "high": float(Decimal(str(low)) + k * Decimal(str(step))), "step": step}
    low, high = sorted(draw(st.floats(low_bound, high_bound, allow_nan=False)) for _ in range(2))
    spec = {"type": "float", "low": low, "high": high}
    if mode == "log" and low > 0:
        spec["log"] = True
    return spec


@st.composite
def _int_spec(draw, key):
    low_bound, _ = _bounds(key, 0)
    if key == "batch_size":  # the default feature_norm=batchnorm needs two clips per batch
        low_bound = max(low_bound, 2)
    low = draw(st.integers(int(low_bound), int(low_bound) + 50))
    if draw(st.booleans()):
        step = draw(st.integers(1, 5))
        return {"type": "int", "low": low, "high": low + step * draw(st.integers(0, 10)), "step": step}
    spec = {"type": "int", "low": low, "high": low + draw(st.integers(0, 200))}
    if low > 0 and draw(st.booleans()):
        spec["log"] = True
    return spec


@st.composite
def _categorical_spec(draw, key):
    spec = config_fields()[key]
    options = list(spec.choices) if spec.choices else [True, False]
    return {"type": "categorical", "choices": draw(st.lists(st.sampled_from(options), min_size=1, unique=True))}


@st.composite
def _space(draw):
    keys = draw(st.lists(st.sampled_from(_FLOAT_KEYS + _INT_KEYS + _CATEGORICAL_KEYS), min_size=1, max_size=6,
                         unique=True))
    strategy = {**{k: _float_spec for k in _FLOAT_KEYS}, **{k: _int_spec for k in _INT_KEYS},
                **{k: _categorical_spec for k in _CATEGORICAL_KEYS}}
    return {key: draw(strategy[key](key)) for key in keys}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=_space(), seed=st.integers(0, 2**16))
def test_random_valid_specs_sample_within_their_bounds(tmp_path, params, seed):
    path = tmp_path / "generated.yaml"  # overwritten by each example
    path.write_text(yaml.safe_dump({"params": params}, sort_keys=False))
    space = load_search_space(path)
    study = _study(optuna.samplers.RandomSampler(seed=seed))
    for _ in range(10):
        trial = study.ask()
        config = space.build_config(trial)
        study.tell(trial, 0.0)
        for key, spec in params.items():
            value = getattr(config, key)
            if spec["type"] == "categorical":
                assert value in spec["choices"]
                continue
            assert spec["low"] - 1e-12 <= value <= spec["high"] + 1e-12, (key, value, spec)
            assert isinstance(value, float if spec["type"] == "float" else int)
            if "step" in spec:
                assert _on_grid(value, spec["low"], spec["step"]), (key, value, spec)


# --------------------------------------------------------------------------------------------
# Shipped files
# --------------------------------------------------------------------------------------------

SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


def test_head_and_demo_are_shipped():
    assert {p.name for p in SHIPPED} >= {"head.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_search_spaces_load_and_sample_from_any_directory(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)  # base_config must resolve relative to the file, not the working directory
    space = load_search_space(path)
    assert space.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert space.base_config_path is not None and space.base_config_path.is_file()
    description = space.describe()
    assert all(key in description for key in space.keys)
    study = _study(_tpe(seed=3))
    for _ in range(25):
        trial = study.ask()
        config = space.build_config(trial)
        assert len(config.topology) == len(config.dropout)
        study.tell(trial, _dummy_objective(config))


def test_head_space_covers_the_requested_study():
    space = load_search_space(REPO / "search_spaces" / "head.yaml")
    kinds = {p.key: p for p in space.params}
    assert set(kinds) >= {"topology", "dropout", "activation", "optimizer", "momentum", "amsgrad", "learning_rate",
                          "weight_decay", "loss_mse_weight", "loss_spcoef_weight"}
    assert kinds["topology"].type == "layers" and kinds["dropout"].of == "topology"
    assert kinds["learning_rate"].range.log and kinds["weight_decay"].range.log
    assert dict(kinds["momentum"].when) == {"optimizer": ("SGD", "RMSProp")}
    assert dict(kinds["amsgrad"].when) == {"optimizer": ("Adam", "AdamW")}
    assert space.build_config({**_head_params()}).dataset == "synthetic"


def _head_params() -> dict:
    return {"optimizer": "SGD", "momentum": 0.9, "learning_rate": 1e-3, "weight_decay": 1e-4, "activation": "gelu",
            "n_layers": 2, "units_l0": 256, "units_l1": 64, "dropout_l0": 0.1, "dropout_l1": 0.2,
            "loss_mse_weight": 1.0, "loss_spcoef_weight": 0.5}


def test_hash_follows_the_file_contents(tmp_path):
    path = _write_space(tmp_path, EVERY_KIND)
    first = load_search_space(path).sha256
    assert load_search_space(path).sha256 == first
    path.write_text(path.read_text().replace("high: 0.99", "high: 0.95"))
    assert load_search_space(path).sha256 != first
