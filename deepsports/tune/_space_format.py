"""The search-space file format: parameter specs and their validation (see :mod:`deepsports.tune.search_space`).

Parsing is separate from sampling so that each stays small; everything here raises
:class:`SearchSpaceError` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from deepsports.config import FieldSpec, config_fields, format_value, parse_value, read_config_file, unknown_key_message
from deepsports.errors import ConfigError, SearchSpaceError

TOP_LEVEL_KEYS = ("description", "base_config", "fixed", "params")
PARAM_TYPES = ("float", "int", "categorical", "layers", "per_layer")
_RANGE_FIELDS = ("low", "high", "step", "log")
_FIELDS_BY_TYPE = {
    "float": ("type", *_RANGE_FIELDS, "when"),
    "int": ("type", *_RANGE_FIELDS, "when"),
    "categorical": ("type", "choices", "when"),
    "layers": ("type", "n_layers", "units", "when"),
    "per_layer": ("type", "of", *_RANGE_FIELDS),
}
#: Config keys whose lists must have one entry per layer of the key (the config rejects other lengths).
_PER_LAYER_OF = {"topology": "dropout"}
LIST_KINDS = ("int_list", "float_list", "videos")


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


@dataclass(frozen=True)
class Range:
    """A numeric Optuna distribution: ``kind`` is "float" or "int"; bounds are inclusive."""

    kind: str
    low: float
    high: float
    step: float | None = None
    log: bool = False

    def suggest(self, trial: Any, name: str) -> float | int:
        if self.kind == "float":
            return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)

    def describe(self) -> str:
        extra = (" log" if self.log else "") + (f" step {self.step:g}" if self.step else "")
        return f"{self.kind} [{self.low:g}, {self.high:g}]{extra}"


@dataclass(frozen=True)
class Param:
    """One entry of ``params``: the config ``key``, its ``type`` and its sampling rule."""

    key: str
    type: str
    when: tuple[tuple[str, tuple], ...] = ()
    range: Range | None = None          # float, int, per_layer
    choices: tuple | None = None        # categorical (Optuna-storable values)
    n_layers: Range | None = None       # layers
    units: Range | None = None          # layers
    of: str | None = None               # per_layer

    def active(self, sampled: Mapping[str, Any]) -> bool:
        return all(sampled.get(key, _ABSENT) in values for key, values in self.when)

    def suggest(self, trial: Any, sampled: Mapping[str, Any]) -> Any:
        """The value the trial picks (a list for list keys); Optuna names as in the module docstring."""
        if self.type in ("float", "int"):
            return self.range.suggest(trial, self.key)
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "layers":
            depth = self.n_layers.suggest(trial, "n_layers")
            return [self.units.suggest(trial, f"units_l{i}") for i in range(depth)]
        return [self.range.suggest(trial, f"{self.key}_l{i}") for i in range(len(sampled[self.of]))]

    def describe(self) -> str:
        if self.type == "categorical":
            text = "categorical {" + ", ".join(format_value(c) for c in self.choices) + "}"
        elif self.type == "layers":
            text = f"layers n_layers {self.n_layers.describe()}, units {self.units.describe()}"
        elif self.type == "per_layer":
            text = f"per_layer of {self.of}: {self.range.describe()}"
        else:
            text = self.range.describe()
        for key, values in self.when:
            text += f"  when {key} in {{{', '.join(format_value(v) for v in values)}}}"
        return text


_ABSENT = object()


@dataclass(frozen=True)
class ParsedFile:
    """What a search-space file says, validated key by key (relations are checked by the caller)."""

    description: str
    base_config_path: Path | None
    base_values: dict[str, Any]
    fixed: dict[str, Any]
    params: tuple[Param, ...]


def parse_document(path: Path, text: str) -> ParsedFile:
    """Validate the YAML ``text`` of the search-space file at ``path``."""
    ctx = Context(path)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ctx.error("", f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ctx.error("", f"must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {type(data).__name__}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ctx.error("", f"unknown top-level key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ctx.error("description", "must be a string")
    base_path, base_values = _load_base(ctx, data.get("base_config"))
    fixed = _parse_fixed(ctx, data.get("fixed"))
    params = _parse_params(ctx, data.get("params"), fixed)
    _check_per_layer_keys(ctx, params, {**base_values, **fixed})
    return ParsedFile(description, base_path, base_values, fixed, tuple(params))


@dataclass(frozen=True)
class Context:
    """Where errors come from: the search-space file."""

    path: Path

    def error(self, where: str, message: str) -> SearchSpaceError:
        return SearchSpaceError(f"search space {self.path}: {where + ': ' if where else ''}{message}")


def _load_base(ctx: Context, raw: Any) -> tuple[Path | None, dict[str, Any]]:
    if raw is None:
        return None, {}
    if not isinstance(raw, str) or not raw.strip():
        raise ctx.error("base_config", f"{raw!r} must be an experiment name or a path to its YAML file")
    relative = Path(raw) if Path(raw).suffix in (".yaml", ".yml") else Path("experiments") / f"{raw}.yaml"
    roots = [Path(), ctx.path.parent, ctx.path.parent.parent]
    candidates = [relative] if relative.is_absolute() else [root / relative for root in roots]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ctx.error("base_config", f"{raw!r} not found (looked at {', '.join(map(str, candidates))})")
    try:
        return found, read_config_file(found)
    except ConfigError as exc:
        raise ctx.error("base_config", str(exc)) from exc


def _parse_fixed(ctx: Context, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ctx.error("fixed", f"must be a mapping of config key: value, got {type(raw).__name__}")
    fixed = {}
    for key, value in raw.items():
        _spec(ctx, "fixed", key)
        try:
            parse_value(key, value)
        except ConfigError as exc:
            raise ctx.error(f"fixed.{key}", str(exc)) from exc
        fixed[key] = value
    return fixed


def _spec(ctx: Context, section: str, key: Any) -> FieldSpec:
    fields = config_fields()
    if key not in fields:
        raise SearchSpaceError(unknown_key_message(str(key), f"search space {ctx.path} ({section})"))
    return fields[key]


def _parse_params(ctx: Context, raw: Any, fixed: Mapping[str, Any]) -> list[Param]:
    if not isinstance(raw, dict) or not raw:
        raise ctx.error("params", "must be a non-empty mapping of config key: {type: ..., ...}")
    params: dict[str, Param] = {}
    for key, entry in raw.items():
        spec = _spec(ctx, "params", key)
        where = f"params.{key}"
        if key in fixed:
            raise ctx.error(where, "is also under fixed: a key is either fixed or sampled")
        if not isinstance(entry, dict):
            raise ctx.error(where, f"must be a mapping with a type ({', '.join(PARAM_TYPES)}); "
                                   f"put constant values under fixed:, got {entry!r}")
        kind = entry.get("type")
        if kind not in PARAM_TYPES:
            raise ctx.error(where, f"type {kind!r} is not one of {', '.join(PARAM_TYPES)}")
        for name in entry:
            if name not in _FIELDS_BY_TYPE[kind]:
                raise ctx.error(where, f"unknown field {name!r} for type {kind} "
                                       f"(allowed: {', '.join(_FIELDS_BY_TYPE[kind])})")
        when = _parse_when(ctx, where, entry.get("when"), params, list(raw))
        params[key] = _parse_one(ctx, where, spec, kind, entry, params, when)
    return list(params.values())


def _parse_one(ctx: Context, where: str, spec: FieldSpec, kind: str, entry: dict, earlier: Mapping[str, Param],
               when: tuple) -> Param:
    key = spec.name
    if kind in ("float", "int"):
        if spec.kind != kind:
            raise ctx.error(where, f"type {kind} does not fit the config key {key}, which is {spec.describe_allowed()}"
                                   f"{_suggest_type(spec)}")
        return Param(key, kind, when, range=_parse_range(ctx, where, entry, kind, key))
    if kind == "categorical":
        return Param(key, kind, when, choices=_parse_choices(ctx, where, entry.get("choices"), spec))
    if kind == "layers":
        if spec.kind != "int_list":
            raise ctx.error(where, f"type layers needs a list-of-integers key (topology); {key} is "
                                   f"{spec.describe_allowed()}{_suggest_type(spec)}")
        for name in ("n_layers", "units"):
            if not isinstance(entry.get(name), dict):
                raise ctx.error(where, f"{name} must be a mapping {{low: ..., high: ...[, step, log]}}")
            for field_name in entry[name]:
                if field_name not in _RANGE_FIELDS:
                    raise ctx.error(f"{where}.{name}", f"unknown field {field_name!r} "
                                                       f"(allowed: {', '.join(_RANGE_FIELDS)})")
        n_layers = _parse_range(ctx, f"{where}.n_layers", entry["n_layers"], "int", None)
        if n_layers.low < 1:
            raise ctx.error(f"{where}.n_layers", f"low={n_layers.low:g}: a head needs at least 1 layer")
        return Param(key, kind, when, n_layers=n_layers,
                     units=_parse_range(ctx, f"{where}.units", entry["units"], "int", key))
    if spec.kind not in ("int_list", "float_list"):
        raise ctx.error(where, f"type per_layer needs a list key (dropout); {key} is {spec.describe_allowed()}"
                               f"{_suggest_type(spec)}")
    of = entry.get("of")
    layers = [name for name, p in earlier.items() if p.type == "layers"]
    if of not in earlier or earlier[of].type != "layers":
        raise ctx.error(where, f"of={of!r} must name an earlier param of type layers "
                               f"(earlier layers params: {', '.join(layers) or 'none'})")
    return Param(key, kind, range=_parse_range(ctx, where, entry, spec.kind.removesuffix("_list"), key), of=of)


def _suggest_type(spec: FieldSpec) -> str:
    hint = {"float": "float or categorical", "int": "int or categorical", "int_list": "layers or categorical",
            "float_list": "per_layer or categorical"}.get(spec.kind, "categorical")
    return f"; use type {hint}"


def _number(ctx: Context, where: str, value: Any, kind: str) -> float | int:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # PyYAML reads 1e-5 (no dot) as text
            raise ctx.error(where, f"{value!r} is a string; YAML reads exponents without a dot as text: "
                                   f"write e.g. 1.0e-5")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.error(where, f"{value!r} is not {'an integer' if kind == 'int' else 'a finite number'}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ctx.error(where, f"{value!r} is not an integer")
        return int(value)
    return float(value)


def _parse_range(ctx: Context, where: str, raw: Mapping, kind: str, key: str | None) -> Range:
    """``{low, high[, step, log]}``, checked for Optuna and, for a config ``key``, against the config's bounds."""
    for name in ("low", "high"):
        if name not in raw:
            raise ctx.error(where, f"{name} is required")
    low, high = (_number(ctx, f"{where}.{n}", raw[n], kind) for n in ("low", "high"))
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ctx.error(f"{where}.log", f"{log!r} must be true or false")
    step = None if raw.get("step") is None else _number(ctx, f"{where}.step", raw["step"], kind)
    if low > high:
        raise ctx.error(where, f"low={low:g} is greater than high={high:g}")
    if log and low <= 0:
        raise ctx.error(where, f"log: true needs low > 0, got low={low:g}")
    if step is not None:
        if log:
            raise ctx.error(where, "step and log: true cannot be combined (Optuna samples either on a grid "
                                   "or log-uniformly)")
        if step <= 0:
            raise ctx.error(f"{where}.step", f"{step:g} must be > 0")
        # Decimal of the printed values, as Optuna checks it: else Optuna silently lowers `high`.
        span, d_step = Decimal(str(high)) - Decimal(str(low)), Decimal(str(step))
        if span % d_step:
            raise ctx.error(where, f"high - low = {span} is not a multiple of step={step:g} "
                                   f"(high={float(span // d_step * d_step + Decimal(str(low))):g} would be)")
    if key is not None:
        element = config_fields()[key].kind.endswith("_list")
        for name, value in (("low", low), ("high", high)):
            try:
                parse_value(key, [value] if element else value)
            except ConfigError as exc:
                raise ctx.error(f"{where}.{name}", f"{value:g} is outside what the config allows: {exc}") from exc
    return Range(kind, low, high, step, log)


def _choice_value(key: str, value: Any) -> Any:
    """A validated choice in a form Optuna can store (list-valued keys become ``"a,b"`` strings)."""
    parsed = parse_value(key, value)
    return format_value(parsed) if isinstance(parsed, tuple) else parsed


def _parse_choices(ctx: Context, where: str, raw: Any, spec: FieldSpec) -> tuple:
    if not isinstance(raw, list) or not raw:
        raise ctx.error(f"{where}.choices", f"must be a non-empty list of values ({spec.describe_allowed()})")
    choices = []
    for value in raw:
        try:
            choices.append(_choice_value(spec.name, value))
        except ConfigError as exc:
            raise ctx.error(f"{where}.choices", f"choice {value!r} is rejected by the config: {exc}") from exc
    if len(set(map(repr, choices))) != len(choices):
        raise ctx.error(f"{where}.choices", f"{raw!r} lists a value twice")
    return tuple(choices)


def _parse_when(ctx: Context, where: str, raw: Any, earlier: Mapping[str, Param], order: list) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise ctx.error(f"{where}.when", "must be a mapping {earlier_categorical_param: [values, ...]}")
    conditions = []
    allowed = f"conditions may only use earlier categorical params ({', '.join(_categoricals(earlier)) or 'none'})"
    for key, values in raw.items():
        if key not in earlier:
            position = "is defined after it" if key in order else "is not a param of this file"
            raise ctx.error(f"{where}.when", f"refers to {key!r}, which {position}; {allowed}")
        if earlier[key].type != "categorical":
            raise ctx.error(f"{where}.when", f"refers to {key!r} of type {earlier[key].type}; {allowed}")
        values = values if isinstance(values, list) else [values]
        canonical = []
        for value in values:
            try:
                choice = _choice_value(key, value)
            except ConfigError as exc:
                raise ctx.error(f"{where}.when.{key}", str(exc)) from exc
            if choice not in earlier[key].choices:
                raise ctx.error(f"{where}.when.{key}", f"{value!r} is not among its choices "
                                                       f"({', '.join(map(format_value, earlier[key].choices))})")
            canonical.append(choice)
        conditions.append((key, tuple(canonical)))
    return tuple(conditions)


def _categoricals(params: Mapping[str, Param]) -> list[str]:
    return [key for key, p in params.items() if p.type == "categorical"]


def _check_per_layer_keys(ctx: Context, params: list[Param], constants: Mapping[str, Any]) -> None:
    """A sampled topology changes its length, so its dropout must follow it layer by layer."""
    for layers in (p for p in params if p.type == "layers"):
        partner = _PER_LAYER_OF.get(layers.key)
        if partner is None or any(p.type == "per_layer" and p.key == partner and p.of == layers.key for p in params):
            continue
        fixed_len = len(parse_value(partner, constants.get(partner, config_fields()[partner].default)))
        if not layers.n_layers.low == layers.n_layers.high == fixed_len:
            raise ctx.error(f"params.{layers.key}", f"samples a number of layers, so {partner} must be "
                                                    f"{{type: per_layer, of: {layers.key}, low: ..., high: ...}} "
                                                    f"(the config needs one {partner} per {layers.key} entry)")
