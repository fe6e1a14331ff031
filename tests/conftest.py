"""Test setup: offline, and a private tiny-model cache built once per session."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
KIT_DATA = os.path.join(SHARED, "starter_kit")
REAL_ADAPTERS = os.path.join(SHARED, "real_adapters", "gpt2")


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """All tests share one tiny-model cache, private to this test session."""
    path = tmp_path_factory.mktemp("tiny-cache")
    old = os.environ.get("LLM_MERGING_TINY_CACHE")
    os.environ["LLM_MERGING_TINY_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LLM_MERGING_TINY_CACHE", None)
    else:
        os.environ["LLM_MERGING_TINY_CACHE"] = old
