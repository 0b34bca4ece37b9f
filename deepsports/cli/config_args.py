"""The config keys on a command line: ``--config FILE``, ``key=value`` overrides and one ``--key`` flag per
config field (the original ``train.py`` flags keep their names). Shared by ``train``/``prepare``/``config``
(cli/main.py) and ``submit``'s check of a job's arguments (cli/studies.py).
"""

from __future__ import annotations

import argparse
from typing import Any

from deepsports.config import Config, config_fields, format_value, load_config
from deepsports.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="experiment YAML: a path or a name under experiments/ (e.g. seed_best)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3 topology=512,256")
    group = parser.add_argument_group("config keys (the original train.py flags keep their names)")
    for name, spec in config_fields().items():
        multi = spec.kind in ("int_list", "float_list", "videos")
        default = format_value(spec.default)
        group.add_argument(f"--{name}", dest=f"cfg_{name}", default=None, nargs="+" if multi else None,
                           metavar=name.upper(), help=f"{spec.help} [{default}; {spec.describe_allowed()}]")


def config_from_args(args: argparse.Namespace) -> Config:
    """Experiment file, then the command line's ``key=value`` overrides and ``--key value`` flags.

    One key given twice in one style: the later wins (as argparse does for flags). Given once in each style
    (``epochs=3 --epochs 5``): refused, since argparse keeps no order between the two styles and a silent
    pick would depend on the style, not on the order typed.
    """
    from deepsports.config import parse_overrides

    overrides = list(args.overrides or [])
    flags: dict[str, Any] = {}
    for name in config_fields():
        raw = getattr(args, f"cfg_{name}", None)
        if isinstance(raw, list):
            # `--videos 01 02 epochs=3`: a list flag swallows the key=value overrides after it.
            overrides += [item for item in raw if "=" in item]
            raw = [item for item in raw if "=" not in item] or None
            raw = " ".join(raw) if raw else None
        if raw is not None:
            flags[name] = raw
    given = parse_overrides(overrides)
    for name in sorted(set(given) & set(flags)):
        raise ConfigError(f"{name} is given twice on the command line, as {name}={given[name]} and --{name} "
                          f"{flags[name]}: give it once (key=value and --key value are not ordered against each "
                          "other)", keys=(name,))
    return load_config(args.config, {**given, **flags}, overrides_source="the command line")
