from __future__ import annotations

import pytest

from mtpkit.models import load_target


@pytest.fixture(scope="session")
def tiny_llama():
    return load_target("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model; the first load in a fresh cache converts the GGUF (~18 s)."""
    return load_target("smollm2-135m-instruct")
