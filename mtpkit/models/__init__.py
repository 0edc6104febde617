from mtpkit.models.loader import DTYPES, EMBEDDED_ALIAS, Target, TargetLoadError, load_target

__all__ = ["DTYPES", "EMBEDDED_ALIAS", "Target", "TargetLoadError", "load_target"]
