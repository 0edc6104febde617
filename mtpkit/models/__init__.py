from mtpkit.models.loader import (
    DTYPES,
    EMBEDDED_ALIAS,
    Target,
    TargetLoadError,
    capture_layers,
    fast_bfloat16,
    load_target,
    stack_layers,
)

__all__ = [
    "DTYPES",
    "EMBEDDED_ALIAS",
    "Target",
    "TargetLoadError",
    "capture_layers",
    "fast_bfloat16",
    "load_target",
    "stack_layers",
]
