"""Test setup: offline, and a private tiny-model cache built once per session."""
import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
KIT_DATA = os.path.join(SHARED, "starter_kit")
REAL_ADAPTERS = os.path.join(SHARED, "real_adapters", "gpt2")


def mergekit_tool(name: str) -> str | None:
    """The mergekit executable ``name`` (``mergekit-yaml``, ``mergekit-moe``, ...): ``$MERGEKIT_VENV/bin/name``,
    else ``name`` on PATH; None when absent (the tests that need it skip)."""
    venv = os.environ.get("MERGEKIT_VENV")
    exe = os.path.join(venv, "bin", name) if venv else None
    if exe and os.path.isfile(exe) and os.access(exe, os.X_OK):
        return exe
    return shutil.which(name)


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


def write_lines(path, lines) -> str:
    """Write ``lines`` as a text file (one per line); return its path as a string."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def merged_method(method_name, experts, prompts_file, values=None, **attrs):
    """A data-aware method merged in process over the tiny decoder base, with ``prompts_file`` as its
    calibration data and ``attrs`` set on it before preflight."""
    from llm_merging.merging.factory import instantiate
    from llm_merging.model import tiny

    m = instantiate(method_name)
    m.base_model_name, m.base_model_revision_id = str(tiny.base_dir("decoder")), None
    m.list_models, m.is_peft, m.device, m.progress = list(experts), None, "cpu", False
    m.calibration_files = [prompts_file]
    for k, v in attrs.items():
        setattr(m, k, v)
    m.set_hyperparameters(values or {})
    m.preflight()
    m.merge()
    return m


def engine_method(cls, base, models, **hp):
    """A merge method of class ``cls`` on ``base`` and ``models`` (paths), on the CPU, quiet, with
    hyperparameters ``hp``: for tests that merge through the engine."""
    m = cls()
    m.base_model_name = str(base)
    m.list_models = [str(p) for p in models]
    m.device = "cpu"
    m.progress = False
    m.set_hyperparameters(hp)
    return m


def dir_tensors(path) -> dict:
    """Every tensor of the ``*.safetensors`` files of a model directory, in one dict."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
