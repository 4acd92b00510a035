"""v4compile: compile DeepSeek-V4-class models into validated engines."""

from v4compile.errors import (CheckpointError, ConfigError, EngineError, ExportError, InputError, ParityError, TargetError,
                              UnsupportedOpError, V4Error)
from v4compile.model.config import ModelConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "V4Error", "ConfigError", "CheckpointError", "EngineError", "InputError", "ParityError", "TargetError",
           "UnsupportedOpError", "ExportError", "__version__"]

_LAZY = {  # heavy imports (export, inductor) only when asked for
    "build": "v4compile.api", "load_engine": "v4compile.runtime.engine", "Engine": "v4compile.runtime.engine",
    "ReferenceModel": "v4compile.model.reference", "load_checkpoint": "v4compile.model.checkpoint",
    "save_checkpoint": "v4compile.model.checkpoint", "random_checkpoint": "v4compile.model.checkpoint",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'v4compile' has no attribute {name!r}")
