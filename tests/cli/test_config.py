"""The typed config: every original argument, strict parsing, clear errors, and one source of truth."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deepsports.cli.config_args import config_from_args
from deepsports.cli.main import build_parser
from deepsports.cli.mlproject import render_mlproject
from deepsports.config import (
    LOCATION_KEYS,
    ORIGINAL_ARGUMENTS,
    Config,
    build_config,
    config_fields,
    format_value,
    load_config,
    parse_value,
)
from deepsports.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# The argument table of the original README, as committed there (names in bold in the first column).
ORIGINAL_NAMES = ["loglevel", "gpu", "root_dir", "train_path", "test_path", "batch_size", "epochs", "learning_rate",
                  "weight_decay", "momentum", "train_val_split_ratio", "frame_num", "frame_method", "spatial_size",
                  "freeze", "dropout", "activation", "topology", "output", "annotation_path", "attention_type",
                  "optimizer", "patch_size", "embed_dim", "pretrained_model", "evaluate", "normalize", "data_aug",
                  "amsgrad", "videos", "loss_mse_weight", "loss_spcoef_weight", "use_decoder"]


def test_every_original_argument_is_a_config_key():
    assert list(ORIGINAL_ARGUMENTS) == ORIGINAL_NAMES


def test_defaults_build_and_types_are_real():
    config = Config()
    assert config.gpu is True and config.freeze is False
    assert config.topology == (512, 256) and config.dropout == (0.5, 0.5)
    assert config.videos == "all"
    assert config.frame_size == (112, 112)  # cache_geometry=fit without data_aug: what training reads


@pytest.mark.parametrize("key,value,needle", [
    ("frame_method", "space_fixed", "one of random, spaced_fixed"),
    ("optimizer", "Adagrad", "one of Adam, AdamW, SGD, RMSProp"),
    ("activation", "swish", "one of none, relu"),
    ("attention_type", "axial", "one of divided_space_time"),
    ("train_val_split_ratio", 0.0, "> 0 and < 1"),
    ("train_val_split_ratio", 1.5, "> 0 and < 1"),
    ("batch_size", -2, ">= 1"),
    ("spatial_size", 0, ">= 1"),
    ("patch_size", -16, ">= 1"),
    ("epochs", "ten", "an integer"),
    ("epochs", 2.5, "an integer"),
    ("learning_rate", "fast", "a number"),
    ("gpu", "maybe", "a boolean"),
    ("freeze", 2, "a boolean"),
    ("topology", "512,abc", "a list of integers"),
    ("topology", [], "a list of integers"),
    ("topology", [512, 0], ">= 1"),
    ("dropout", [0.2, 1.2], "<= 1"),
    ("videos", "01 xx", "video ids"),
    ("loglevel", "LOUD", "one of DEBUG"),
])
def test_invalid_values_name_key_value_and_allowed(key, value, needle):
    with pytest.raises(ConfigError) as info:
        build_config({key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and needle in message


def test_dropout_length_must_match_topology():
    with pytest.raises(ConfigError, match=r"dropout=\[0.2\] has 1 values but topology=\[512, 256\] has 2"):
        build_config({"dropout": [0.2]})


def test_unknown_key_is_an_error_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*did you mean learning_rate"):
        build_config({"learning_rat": 0.1})


def test_paths_are_refused_with_the_synthetic_dataset():
    with pytest.raises(ConfigError, match="root_dir='/data' is only used with dataset=mtl_aqa"):
        build_config({"root_dir": "/data"})
    assert build_config({"dataset": "mtl_aqa", "root_dir": "/data"}).root_dir == "/data"


def test_strict_booleans_and_lists_from_strings():
    config = build_config({"freeze": "TRUE", "normalize": "0", "topology": "[512, 512]", "dropout": "0.2 0.2",
                           "activation": "LeakyReLU", "optimizer": "rmsprop", "videos": "1 02"})
    assert config.freeze is True and config.normalize is False
    assert config.topology == (512, 512) and config.dropout == (0.2, 0.2)
    assert config.activation == "leakyrelu" and config.optimizer == "RMSProp"
    assert config.videos == ("01", "02")
    for bad in ("yes please", "tru", ""):
        with pytest.raises(ConfigError):
            parse_value("freeze", bad)


def test_seed_best_reproduces_the_original_best_config():
    config = load_config(REPO / "experiments" / "seed_best.yaml")
    assert config.pretrained_model.endswith("TimeSformer_divST_96x32_224_HowTo100M.pyth")
    assert (config.frame_num, config.frame_method, config.spatial_size) == (48, "spaced_varied_new", 224)
    assert config.normalize and config.data_aug and config.amsgrad
    assert (config.optimizer, config.learning_rate, config.weight_decay) == ("AdamW", 1e-5, 1e-5)
    assert (config.batch_size, config.epochs, config.activation) == (8, 200, "leakyrelu")
    assert config.topology == (512, 512) and config.dropout == (0.2, 0.2)
    assert config.backbone == "base" and config.use_decoder is False


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    load_config(path)


def test_experiment_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learnin_rate' in .*bad.yaml"):
        load_config(bad)
    bad.write_text("epochs: [3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("epochs: -3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: epochs=-3 is invalid"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("epochs: 3\nbatch_size: 4\n")
    config = load_config(path, ["epochs=5", "topology=64", "dropout=0.1"])
    assert (config.epochs, config.batch_size, config.topology, config.dropout) == (5, 4, (64,), (0.1,))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(path, ["epochs"])


def test_cli_flags_are_derived_from_the_config():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest.removeprefix("cfg_") for a in train._actions if a.dest.startswith("cfg_")}
    assert flags == set(config_fields())
    args = parser.parse_args(["train", "--epochs", "10", "--topology", "512", "256", "--dropout", "0.2", "0.2",
                              "--freeze", "true", "--videos", "01", "02", "batch_size=2"])
    config = config_from_args(args)
    assert (config.epochs, config.topology, config.dropout, config.freeze, config.videos, config.batch_size) == \
        (10, (512, 256), (0.2, 0.2), True, ("01", "02"), 2)


def test_cli_rejects_bad_flag_values_with_exit_code(capsys):
    from deepsports.cli.main import main

    assert main(["config", "--frame_method", "bogus"]) == 2
    assert "frame_method='bogus' is invalid" in capsys.readouterr().err


def test_mlproject_is_rendered_from_the_config():
    committed = (REPO / "MLproject").read_text()
    assert committed == render_mlproject(), "MLproject is stale: run `python -m deepsports.cli.mlproject > MLproject`"
    spec = yaml.safe_load(committed)
    for entry in ("main", "prepare"):
        params = spec["entry_points"][entry]["parameters"]
        # The path keys are not MLproject parameters (MLflow would log them shell-quoted; -P still passes them).
        hyper = {name: spec for name, spec in config_fields().items() if name not in LOCATION_KEYS}
        assert set(params) == set(hyper)
        for name, field_spec in hyper.items():
            assert params[name]["default"] == format_value(field_spec.default)
            assert build_config({name: params[name]["default"]}) == Config()  # the defaults parse back unchanged
    assert {"main", "prepare", "synth", "tune"} <= set(spec["entry_points"])
    assert spec["conda_env"] == "conda.yaml"


def test_conda_env_mirrors_the_package_dependencies():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in deps}
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    conda_names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in pip_section}
    assert names - conda_names == set()
    # The same bounds (torch and torchvision: the Makefile's exact pins, inside the bounds).
    assert {d.split("#")[0].strip() for d in deps if not d.startswith("torch")} <= set(pip_section)
    # torchsort (the `spearman` extra) is built by scripts/install-torchsort.sh, which every MLproject entry
    # point runs first
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [re.split(r"[<>=\[ ]", d)[0] for d in extras["spearman"]] == ["torchsort"]
    assert "install-torchsort.sh" in (REPO / "MLproject").read_text()
