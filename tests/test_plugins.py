"""A new merge class in one file plus one entry point is discovered after reinstall and runs."""
import os
import shutil
import subprocess
import sys


from conftest import REPO_ROOT

NEW_METHOD = '''
"""A test plugin: half of task arithmetic."""
from llm_merging import ops
from llm_merging.merging.Linear import Linear


class HalfMerge(Linear):
    """Half task arithmetic (plugin discovery test)."""

    def merge_tensor(self, name, base, task_vectors):
        return ops.task_arithmetic(task_vectors, scale=0.5)
'''


def test_new_method_file_and_entry_point_discovered_after_reinstall(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(".git", "output", "*.egg-info", "__pycache__", "build"))
    (src / "llm_merging" / "merging" / "HalfMerge.py").write_text(NEW_METHOD)
    setup = (src / "setup.py").read_text()
    marker = "for name, target in builtin_methods().items()]"
    assert marker in setup
    setup = setup.replace(marker, marker + ' + ["half_merge = llm_merging.merging.HalfMerge:HalfMerge"]')
    (src / "setup.py").write_text(setup)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(site), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import llm_merging, importlib.metadata as md;"
         "print(llm_merging.__file__);"
         "print([e.value for e in md.entry_points(group='llm_merging.merging.Merges') if e.name == 'half_merge'])"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert str(site) in probe.stdout and "llm_merging.merging.HalfMerge:HalfMerge" in probe.stdout
    run = subprocess.run(
        [sys.executable, "-m", "llm_merging.main", "-m", "half_merge", "--tiny", "--no-eval", "--save", "none",
         "--quiet", "--output_folder", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "half_merge: ok" in run.stdout
    listing = subprocess.run([sys.executable, "-m", "llm_merging.main", "--list"], capture_output=True, text=True,
                             env=env, cwd=str(tmp_path), timeout=120)
    assert "Half task arithmetic" in listing.stdout
