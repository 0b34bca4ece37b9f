"""Search spaces of Optuna studies: YAML files validated against the config before any trial runs.

File format (``search_spaces/*.yaml``)::

    description: free text, shown by describe()               # optional
    base_config: experiments/demo.yaml                         # optional: the experiment trials start from
    fixed: {epochs: 10}                                        # optional: constant config values
    params:                                                    # required: what each trial samples, in order
      learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      batch_size:    {type: int, low: 4, high: 16, step: 4}
      optimizer:     {type: categorical, choices: [Adam, AdamW, SGD, RMSProp]}
      momentum:      {type: float, low: 0.5, high: 0.99, when: {optimizer: [SGD, RMSProp]}}
      topology:      {type: layers, n_layers: {low: 1, high: 3}, units: {low: 64, high: 1024, log: true}}
      dropout:       {type: per_layer, of: topology, low: 0.0, high: 0.6}

Every key under ``fixed`` and ``params`` is a config key (:func:`deepsports.config.config_fields`).
Parameter types:

``float`` / ``int``
    ``low``, ``high`` (inclusive), optional ``log`` (needs ``low > 0``, excludes ``step``) and ``step``
    (``high - low`` must be a multiple of it). The type must match the key's type in the config.
``categorical``
    ``choices``: a non-empty list; each choice is checked by the config's own parser (booleans, the
    allowed names of optimizer/activation/..., lists written as ``"512,256"`` or ``[512, 256]``).
``layers`` (list-of-int keys: ``topology``)
    ``n_layers: {low, high[, step, log]}`` and ``units: {low, high[, step, log]}``; Optuna names the
    parameters ``n_layers`` and ``units_l0``, ``units_l1``, ... .
``per_layer`` (list keys: ``dropout``)
    ``of: <a layers param>`` and ``low``/``high``/``step``/``log``: one value per layer of ``of``
    (Optuna names ``dropout_l0``, ...), so the two lists always have the same length. It is sampled
    exactly when ``of`` is; when ``topology`` is a ``layers`` param, ``dropout`` must be ``per_layer``
    of it (the config requires one dropout per layer).

Any param except ``per_layer`` may carry ``when: {key: [values, ...], ...}``: it is sampled only if
every named *earlier* categorical param was sampled with one of the listed values; otherwise the
config keeps its base/fixed value. Conditional spaces need ``TPESampler(multivariate=True, group=True)``.

A config is ``base_config`` values, then ``fixed``, then the sampled values. ``base_config`` is an
experiment name (``demo`` -> ``experiments/demo.yaml``) or a path; relative paths are looked up in the
current directory, next to the search-space file, then in its parent directory (so
``experiments/demo.yaml`` works from ``search_spaces/*.yaml`` wherever the study runs).

Loading validates everything (unknown keys, types, ranges against the config's bounds, conditions)
and builds the configs at the low and the high corner of the space, so relational mistakes (e.g.
``warmup_epochs >= epochs``) fail before the first trial. Errors are :class:`SearchSpaceError`
naming the file, the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from deepsports.config import Config, build_config, config_fields, format_value, parse_value
from deepsports.errors import ConfigError, SearchSpaceError
from deepsports.tune._space_format import LIST_KINDS, PARAM_TYPES, TOP_LEVEL_KEYS, Param, Range, parse_document

__all__ = ["PARAM_TYPES", "TOP_LEVEL_KEYS", "Param", "Range", "SearchSpace", "check_corners", "load_search_space",
           "resolve_search_space_path"]


@dataclass(frozen=True)
class SearchSpace:
    """A loaded, validated search space (see the module docstring for the file format)."""

    path: Path
    sha256: str
    params: tuple[Param, ...]
    fixed: Mapping[str, Any]
    base_values: Mapping[str, Any]
    base_config_path: Path | None = None
    description: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        """Config keys the space samples."""
        return tuple(p.key for p in self.params)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample config overrides from an Optuna trial (``Trial``, ``FixedTrial``, ``FrozenTrial``)."""
        sampled: dict[str, Any] = {}
        for param in self.params:
            active = param.active(sampled) and (param.of is None or param.of in sampled)
            if active:
                sampled[param.key] = param.suggest(trial, sampled)
        return {key: _config_value(key, value) for key, value in sampled.items()}

    def values(self, trial_or_params: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The raw config mapping of a trial: base_config, fixed, ``overrides``, then the sampled values."""
        overrides = dict(overrides or {})
        clash = sorted(set(overrides) & set(self.keys))
        if clash:
            raise SearchSpaceError(f"search space {self.path}: cannot override {', '.join(clash)}: the study samples "
                                   f"{'it' if len(clash) == 1 else 'them'} (sampled keys: {', '.join(self.keys)})")
        if isinstance(trial_or_params, FrozenTrial):
            trial_or_params = trial_or_params.params
        if isinstance(trial_or_params, Mapping):
            replay = _ReplayTrial(trial_or_params, self.path)
            sampled = self.suggest(replay)
            replay.check_all_used()
        else:
            sampled = self.suggest(trial_or_params)
        return {**self.base_values, **self.fixed, **overrides, **sampled}

    def build_config(self, trial_or_params: Any, overrides: Mapping[str, Any] | None = None) -> Config:
        """The validated :class:`Config` of a trial, or of a finished trial's params (Optuna names)."""
        values = self.values(trial_or_params, overrides)
        try:
            return build_config(values)
        except ConfigError as exc:
            sampled = {key: values[key] for key in self.keys if key in values}
            raise SearchSpaceError(f"search space {self.path}: the sampled values {sampled} give an invalid "
                                   f"config: {exc}") from exc

    def config_from_params(self, params: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
        """Rebuild the config of a finished trial from its Optuna params (e.g. the study's best trial)."""
        return self.build_config(dict(params), overrides)

    def describe(self) -> str:
        lines = [f"search space {self.path} (sha256 {self.sha256[:16]})"]
        if self.description:
            lines.append(f"  {self.description.strip()}")
        lines.append(f"  base config: {self.base_config_path or '(config defaults)'}")
        if self.fixed:
            lines.append("  fixed: " + ", ".join(f"{k}={format_value(v)}" for k, v in self.fixed.items()))
        width = max(len(p.key) for p in self.params)
        lines += [f"  {p.key:<{width}}  {p.describe()}" for p in self.params]
        return "\n".join(lines)


def _config_value(key: str, value: Any) -> Any:
    """Sampled value -> the plain config value (categorical list choices are stored as ``"512,256"``)."""
    if config_fields()[key].kind in LIST_KINDS and isinstance(value, str):
        parsed = parse_value(key, value)
        return list(parsed) if isinstance(parsed, tuple) else parsed
    return value


class _ReplayTrial:
    """Answers suggestions from a finished trial's params, checking each against its distribution."""

    def __init__(self, params: Mapping[str, Any], path: Path):
        self.params, self.path, self.used = dict(params), path, set()

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise SearchSpaceError(f"search space {self.path}: parameter {name!r} is missing from the given params "
                                   f"{self.params} (did the search space change since the trial ran?)")
        self.used.add(name)
        return self.params[name]

    def _bad(self, name: str, value: Any, allowed: str) -> SearchSpaceError:
        return SearchSpaceError(f"search space {self.path}: parameter {name}={value!r} is outside the space: "
                                f"expected {allowed}")

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self._bad(name, value, f"a number in [{low:g}, {high:g}]")
        return float(value)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        value = self._get(name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or (value - low) % step:
            raise self._bad(name, value, f"an integer in [{low}, {high}] with step {step}")
        return value

    def suggest_categorical(self, name: str, choices: tuple) -> Any:
        value = self._get(name)
        if value not in choices:
            raise self._bad(name, value, "one of " + ", ".join(map(format_value, choices)))
        return value

    def check_all_used(self) -> None:
        unused = sorted(set(self.params) - self.used)
        if unused:
            raise SearchSpaceError(f"search space {self.path}: params {', '.join(unused)} are not sampled by this "
                                   "space for these values (did the search space change since the trial ran?)")


class _CornerTrial:
    """Answers every suggestion with its low end (or high end); categoricals with the first (or last) choice."""

    def __init__(self, high: bool):
        self.high, self.params = high, {}

    def _pick(self, name: str, value: Any) -> Any:
        self.params[name] = value
        return value

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return self._pick(name, high if self.high else low)

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return self._pick(name, high if self.high else low)

    def suggest_categorical(self, name: str, choices: tuple) -> Any:
        return self._pick(name, choices[-1] if self.high else choices[0])


def resolve_search_space_path(name_or_path: str | os.PathLike, directory: str | os.PathLike = "search_spaces") -> Path:
    """``head`` -> ``search_spaces/head.yaml`` (here, else the one shipped with DeepSports); a path is used as it is."""
    if str(directory) == "search_spaces":
        from deepsports.locate import find_named

        return find_named(name_or_path, "search_spaces", "search space file", error=SearchSpaceError)
    path = Path(name_or_path)
    candidate = path if path.suffix in (".yaml", ".yml") or path.exists() else Path(directory) / f"{path}.yaml"
    if not candidate.is_file():
        raise SearchSpaceError(f"search space file {str(candidate)!r} does not exist "
                               "(give search_spaces/<name>.yaml, a name, or a path)")
    return candidate


def load_search_space(path: str | os.PathLike) -> SearchSpace:
    """Read and validate a search-space file; raises :class:`SearchSpaceError` naming file, key and what is allowed."""
    path = resolve_search_space_path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SearchSpaceError(f"search space {path}: not UTF-8 text: {exc}") from exc
    parsed = parse_document(path, text)
    space = SearchSpace(path=path, sha256=hashlib.sha256(raw).hexdigest(), params=parsed.params, fixed=parsed.fixed,
                        base_values=parsed.base_values, base_config_path=parsed.base_config_path,
                        description=parsed.description)
    check_corners(space)
    return space


def check_corners(space: SearchSpace, overrides: Mapping[str, Any] | None = None, what: str = "") -> None:
    """Build the configs of the trials with every parameter at its low and at its high end (with
    ``overrides``, described by ``what``): relational mistakes fail here, before any trial."""
    for high in (False, True):
        corner = _CornerTrial(high)
        try:
            space.build_config(corner, overrides)
        except SearchSpaceError as exc:
            end = "high" if high else "low"
            raise SearchSpaceError(f"search space {space.path}{' ' + what if what else ''}: the trial with every "
                                   f"parameter at its {end} end ({corner.params}) gives an invalid config: "
                                   f"{exc.__cause__ or exc}") from exc
