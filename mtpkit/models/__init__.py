from mtpkit.models.loader import (
    DTYPES,
    EMBEDDED_ALIAS,
    Target,
    TargetLoadError,
    capture_layers,
    load_target,
    stack_layers,
)

__all__ = [
    "DTYPES",
    "EMBEDDED_ALIAS",
    "Target",
    "TargetLoadError",
    "capture_layers",
    "load_target",
    "stack_layers",
]
