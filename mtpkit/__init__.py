"""mtpkit: multi-token-prediction draft heads for frozen LLMs, from data collection to acceptance."""

import os

# mtpkit works from local files only. huggingface_hub, transformers and datasets read these
# at import time, so set them before any of them is imported; a user may still override.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
