from mtpkit.models.loader import EMBEDDED_ALIAS, Target, TargetLoadError, load_target

__all__ = ["EMBEDDED_ALIAS", "Target", "TargetLoadError", "load_target"]
