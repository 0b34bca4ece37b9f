"""Reading checkpoints and fitting their weights to a model, through one filter function.

Three layouts are understood, told apart by their keys:

- ``timesformer``: the official ``.pyth`` files (``{"model_state": {"model.cls_token": ...}}``);
- ``vit``: an image ViT in timm's layout (no temporal parts). The spatial blocks load from it; for
  divided attention ``temporal_attn``/``temporal_norm1`` are copied from the spatial ones (as the
  official loader does) and ``temporal_fc`` and the time embedding start at zero, so the video
  model starts out computing the image model's per-frame features;
- ``deepsports``: this project's training checkpoints (``{"model": AQAModel.state_dict(), ...}``).
  The backbone loads strictly; the output projection and the scoring head load when their shapes
  match the model's and are otherwise left newly initialised (reported).

Position embeddings are resized over the patch grid (bicubic, class token kept), time embeddings
over frames (linear: 96 -> 48 averages neighbouring frames); the pretraining classifier ``head.*``
is dropped. Everything else must match: an unexplained key or a shape that cannot be resized raises
:class:`~deepsports.errors.CheckpointError` naming the keys. Files are only read with
``torch.load(weights_only=True)`` (:func:`deepsports.fileio.read_torch_file`, the reader of every torch file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deepsports.errors import CheckpointError
from deepsports.fileio import read_torch_file
from deepsports.model.embeddings import grid_of, resize_pos_embed, resize_time_embed
from deepsports.model.timesformer import TimeSformer

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model_state", "state_dict", "model")
_PREFIXES = ("module.", "model.")
_OWN_PREFIX = "backbone."
_PROJECTION = "feature_proj."
_TEMPORAL_FROM_SPATIAL = (("temporal_attn.", "attn."), ("temporal_norm1.", "norm1."))


@dataclass
class LoadReport:
    """What loading a checkpoint did.

    ``dropped`` names checkpoint keys (after unwrapping and prefix stripping); every other field names
    the model's keys (``backbone.blocks.0...`` for an ``AQAModel``).
    """

    source: str
    layout: str  # "timesformer" | "vit" | "deepsports"
    loaded: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)  # model key -> where its value came from
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not used
    initialised: list[str] = field(default_factory=list)  # left at their fresh values on purpose
    missing: list[str] = field(default_factory=list)  # only non-empty with strict=False
    unexpected: list[str] = field(default_factory=list)  # only non-empty with strict=False

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded from {self.source} ({self.layout} layout)"]
        if self.resized:
            parts.append("resized " + ", ".join(f"{k} {list(a)}->{list(b)}" for k, (a, b) in self.resized.items()))
        if self.derived:
            parts.append(f"{len(self.derived)} derived (temporal parts / time embedding)")
        if self.dropped:
            parts.append("dropped " + _brief(self.dropped))
        if self.initialised:
            parts.append("newly initialised " + _brief(self.initialised))
        if self.missing or self.unexpected:
            parts.append(f"missing {_brief(self.missing)}; unexpected {_brief(self.unexpected)}")
        return "; ".join(parts)


def _brief(keys: Mapping[str, Any] | list[str], limit: int = 8) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


#: ``torch.load(path, weights_only=True, map_location="cpu")`` with :class:`CheckpointError` for a
#: missing file, a truncated or corrupt file, and a file that would need to run code to load.
read_checkpoint = read_torch_file


def _unwrap(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` of a checkpoint, wrapper dicts opened and prefixes stripped."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint {source} holds a {type(checkpoint).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    not_tensors = [str(k) for k, v in checkpoint.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise CheckpointError(f"checkpoint {source} is not a state dict of tensors (entries "
                              f"{_brief(not_tensors)}); expected a mapping name -> tensor, optionally under "
                              f"one of {_WRAPPER_KEYS}")
    out = {}
    for key, value in checkpoint.items():
        # DataParallel adds "module.", the official wrapper class "model." (sometimes both).
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _find_backbone(model: nn.Module) -> tuple[str, TimeSformer]:
    for name, module in model.named_modules():
        if isinstance(module, TimeSformer):
            return (name + "." if name else ""), module
    raise CheckpointError(f"{type(model).__name__} holds no TimeSformer backbone to load weights into")


def _layout(keys: list[str]) -> str:
    if any(k.startswith(_OWN_PREFIX) for k in keys):
        return "deepsports"
    if any(".temporal_" in k or k == "time_embed" for k in keys):
        return "timesformer"
    return "vit"


def _adapt_backbone(weights: dict[str, torch.Tensor], net: TimeSformer, report: LoadReport, prefix: str,
                    source_prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map backbone weights (keys relative to the backbone) onto ``net``; returns them and shape errors.

    ``prefix``: where the backbone sits in the model; ``source_prefix``: where it sat in the checkpoint.
    """
    target = net.state_dict()
    weights = dict(weights)

    def drop(key: str, reason: str) -> None:
        report.dropped[source_prefix + key] = reason
        del weights[key]

    for key in [k for k in weights if k.startswith("head.")]:
        drop(key, "classifier of the pretraining task")

    conv = weights.get("patch_embed.proj.weight")
    want = target["patch_embed.proj.weight"]
    if conv is not None and conv.ndim == 2 and conv.numel() == want.numel():
        # Some ViT exports store the patch embedding as a Linear over flattened patches.
        weights["patch_embed.proj.weight"] = conv.reshape(want.shape)

    if net.attention_type != "divided_space_time":
        for key in [k for k in weights if ".temporal_" in k]:
            drop(key, f"{net.attention_type} has no temporal attention")
    elif not any(".temporal_" in k for k in weights):
        _derive_temporal(weights, target, len(net.blocks), report, prefix)
    if "time_embed" in weights and "time_embed" not in target:
        drop("time_embed", f"{net.attention_type} has no time embedding")
    elif "time_embed" in target and "time_embed" not in weights:
        weights["time_embed"] = torch.zeros_like(target["time_embed"])
        report.derived[prefix + "time_embed"] = "zeros (checkpoint has no time embedding)"

    errors = _resize_embeddings(weights, target, report, prefix)
    for key in [k for k in weights if k.startswith(_PROJECTION)]:
        if key in target and weights[key].shape != target[key].shape:
            drop(key, f"output projection {list(weights[key].shape)} does not fit the model's "
                      f"{list(target[key].shape)} (embed_dim differs)")
    for key, value in weights.items():
        if key in target and value.shape != target[key].shape:
            errors.append(f"{key}: checkpoint {list(value.shape)} vs model {list(target[key].shape)}")
    return weights, errors


def _derive_temporal(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], depth: int,
                     report: LoadReport, prefix: str) -> None:
    """An image checkpoint for divided attention: temporal parts copied from the spatial ones, ``temporal_fc`` zero."""
    for index in range(depth):
        for temporal, spatial in _TEMPORAL_FROM_SPATIAL:
            for name in (n for n in target if n.startswith(f"blocks.{index}.{temporal}")):
                source = name.replace(temporal, spatial, 1)
                if source in weights:
                    weights[name] = weights[source].clone()
                    report.derived[prefix + name] = f"copied from {source}"
        for name in (f"blocks.{index}.temporal_fc.weight", f"blocks.{index}.temporal_fc.bias"):
            weights[name] = torch.zeros_like(target[name])
            report.derived[prefix + name] = "zeros (image checkpoint: the block starts as a spatial one)"


def _resize_embeddings(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], report: LoadReport,
                       prefix: str) -> list[str]:
    """Resize the position (2-D) and time (1-D) embeddings in place; returns what cannot be resized."""
    errors = []
    for key, resize in (("pos_embed", _resize_pos), ("time_embed", _resize_time)):
        if key in weights and key in target and weights[key].shape != target[key].shape:
            old = weights[key]
            if old.ndim != 3 or old.shape[0] != 1 or old.shape[2] != target[key].shape[2]:
                errors.append(f"{key}: checkpoint {list(old.shape)} vs model {list(target[key].shape)} (width differs)")
                continue
            try:
                weights[key] = resize(old, target[key])
            except ValueError as exc:
                errors.append(f"{key}: {exc}")
                continue
            report.resized[prefix + key] = (tuple(old.shape), tuple(target[key].shape))
    return errors


def _resize_pos(old: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return resize_pos_embed(old, grid_of(old), grid_of(want))


def _resize_time(old: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return resize_time_embed(old, want.shape[1])


def _filter(checkpoint: Any, model: nn.Module, *, strict: bool, source: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    weights = _unwrap(checkpoint, source)
    layout = _layout(list(weights))
    report = LoadReport(source=source, layout=layout)
    prefix, net = _find_backbone(model)
    target = model.state_dict()
    rest_target = {k: v for k, v in target.items() if not k.startswith(prefix)} if prefix else {}

    source_prefix = _OWN_PREFIX if layout == "deepsports" else ""
    backbone = {k[len(source_prefix):]: v for k, v in weights.items() if k.startswith(source_prefix)}
    rest = {k: v for k, v in weights.items() if not k.startswith(source_prefix)}
    backbone, errors = _adapt_backbone(backbone, net, report, prefix, source_prefix)
    if errors:
        raise CheckpointError(f"checkpoint {source} does not fit the model ({type(net).__name__} "
                              f"{net.preset.name}, {net.attention_type}); shapes that cannot be resized: "
                              + "; ".join(errors))

    state = {prefix + k: v for k, v in backbone.items()}
    # The scoring head loads only as a whole: a checkpoint trained with another topology keeps none of it.
    head_fits = bool(rest) and set(rest) == set(rest_target) and all(
        rest[k].shape == rest_target[k].shape for k in rest)
    if head_fits:
        state.update(rest)
    else:
        for key in rest:
            report.dropped[key] = ("scoring head of another topology/shape" if rest_target
                                   else "scoring head (the model has none)")

    unexpected = sorted(k for k in state if k not in target)
    intended_new = [k for k in target if k not in state and (k.startswith(prefix + _PROJECTION) or k in rest_target)]
    missing = [k for k in target if k not in state and k not in intended_new]
    if (unexpected or missing) and strict:
        raise CheckpointError(f"checkpoint {source} ({layout} layout) does not match the model: unexpected keys "
                              f"[{_brief(unexpected, 20)}], missing keys [{_brief(missing, 20)}]")
    for key in unexpected:
        del state[key]
    report.unexpected, report.missing, report.initialised = unexpected, missing, intended_new
    report.loaded = sorted(state)
    return state, report


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a checkpoint's weights to ``model`` (an ``AQAModel`` or a bare ``TimeSformer``).

    Unwraps ``model_state``/``state_dict``/``model``, strips ``module.``/``model.`` prefixes, maps
    image-ViT weights onto the video blocks, resizes pos/time embeddings and drops the pretraining
    classifier. Returns a state dict keyed like ``model.state_dict()`` that may lack only the new
    parts (output projection, scoring head). Raises :class:`CheckpointError` for anything else.
    """
    state, _ = _filter(state_dict, model, strict=True, source="state dict")
    return state


def load_pretrained(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], *,
                    strict: bool = True) -> LoadReport:
    """Load a checkpoint file (or an already loaded dict) into ``model`` through :func:`checkpoint_filter_fn`.

    With ``strict=False`` unexplained missing/unexpected keys are reported instead of raising
    (shape mismatches always raise).
    """
    if isinstance(checkpoint, Mapping):
        source, loaded = "state dict", checkpoint
    else:
        source, loaded = repr(str(checkpoint)), read_checkpoint(checkpoint)
    state, report = _filter(loaded, model, strict=strict, source=source)
    model.load_state_dict(state, strict=False)
    log.info("pretrained weights: %s", report.summary())
    return report
