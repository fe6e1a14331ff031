"""Install llm_merging: ``pip install .`` (tests: ``pip install .[test,lm-eval]``; lm-eval tasks: ``.[lm-eval]``)."""
import ast
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def builtin_methods() -> dict:
    """Read BUILTIN_METHODS from llm_merging/merging/__init__.py (its one home) without importing it."""
    tree = ast.parse((HERE / "llm_merging" / "merging" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BUILTIN_METHODS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("BUILTIN_METHODS not found")


def requirements() -> list:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="llm_merging",
    version="0.1.0",
    description="Merge expert LLMs (LoRA adapters or full fine-tunes) into one model, exactly and fast, and evaluate it",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["llm_merging", "llm_merging.*"]),
    package_data={"llm_merging": ["sample_data/*"]},
    install_requires=requirements(),
    # lm-eval: --lm-eval (lm-evaluation-harness tasks); the range is llm_merging.lm_eval_tasks.REQUIREMENT's
    extras_require={"test": ["pytest>=8"], "lm-eval": ["lm-eval>=0.4.12,<0.5"]},
    entry_points={
        "llm_merging.merging.Merges": [f"{name} = {target}" for name, target in builtin_methods().items()],
        "console_scripts": ["llm-merging = llm_merging.main:cli"],
    },
)
