"""DeepSports: Action Quality Assessment of diving videos with tracked, searchable, resumable experiments."""

from deepsports.config import Config, build_config, config_fields, load_config
from deepsports.errors import (
                               CheckpointError,
                               ConfigError,
                               DataError,
                               DeepSportsError,
                               SearchSpaceError,
                               StorageError,
                               TrainingError,
)

__version__ = "0.1.0"

__all__ = ["Config", "build_config", "config_fields", "load_config", "DeepSportsError", "ConfigError", "DataError",
           "CheckpointError", "TrainingError", "SearchSpaceError", "StorageError", "__version__"]
