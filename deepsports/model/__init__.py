"""TimeSformer backbone, scoring heads and checkpoint loading.

``build_model(config)`` is the entry point; ``load_pretrained``/``checkpoint_filter_fn`` fit the
official TimeSformer ``.pyth`` files, timm image-ViT state dicts and this project's checkpoints.
"""

from deepsports.model.aqa import AQAModel, BuiltModel, build_model, count_parameters, trainable_parameter_count
from deepsports.model.attention import ATTENTION_BACKENDS, Attention, attention_backend
from deepsports.model.heads import DecoderHead, MLPHead, make_activation
from deepsports.model.presets import PRESETS, BackbonePreset, get_preset
from deepsports.model.pretrained import LoadReport, checkpoint_filter_fn, load_pretrained, read_checkpoint
from deepsports.model.timesformer import TimeSformer

__all__ = [
    "AQAModel", "BuiltModel", "build_model", "count_parameters", "trainable_parameter_count",
    "ATTENTION_BACKENDS", "Attention", "attention_backend",
    "LoadReport", "checkpoint_filter_fn", "load_pretrained", "read_checkpoint",
    "DecoderHead", "MLPHead", "make_activation",
    "PRESETS", "BackbonePreset", "get_preset",
    "TimeSformer",
]
