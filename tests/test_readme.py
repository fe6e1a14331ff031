"""The README's code examples run."""
import re
import subprocess
import sys

from conftest import REPO_ROOT


def _blocks():
    text = open(f"{REPO_ROOT}/README.md", encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_library_ops_example_runs():
    block = next(b for b in _blocks() if "ops.ties(task_vectors" in b)
    exec(compile(block, "README", "exec"), {})


def test_new_method_example_runs(tmp_path):
    block = next(b for b in _blocks() if "class MyMerge" in b)
    (tmp_path / "mymerge.py").write_text(block)
    proc = subprocess.run(
        [sys.executable, f"{REPO_ROOT}/llm_merging/main.py", "-m", "mymerge:MyMerge", "--tiny", "--quiet",
         "--no-eval", "--save", "none", "--output_folder", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr


def test_recipe_examples_parse(tmp_path):
    from llm_merging.merging.recipe import load_recipe

    text = open(f"{REPO_ROOT}/README.md", encoding="utf-8").read()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        path = tmp_path / f"r{i}.yml"
        path.write_text(block)
        recipe = load_recipe(path)
        assert recipe.models and recipe.method
