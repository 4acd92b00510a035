"""v4compile: compile DeepSeek-V4-class models into validated engines."""

from v4compile.errors import (CheckpointError, ConfigError, EngineError, ExportError, InputError, ParityError, TargetError,
                              UnsupportedOpError, V4Error)
from v4compile.model.config import ModelConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "V4Error", "ConfigError", "CheckpointError", "EngineError", "InputError", "ParityError", "TargetError",
           "UnsupportedOpError", "ExportError", "__version__"]
