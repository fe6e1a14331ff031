"""Chained merges (mergekit-multi's multi-document recipes): dependency order, one-line errors in preflight,
intermediates in memory or in a temporary folder, recipe.yml of the whole chain."""
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import dir_tensors

from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.merging.chain import load_chain, substitute
from llm_merging.model import tiny
from llm_merging.pipeline.phases import chain as chain_phase
from llm_merging.pipeline.phases.merge import MergePhase


@pytest.fixture(scope="module")
def models():
    return str(tiny.base_dir("decoder")), [str(tiny.full_expert_dir("decoder", i)) for i in range(3)]


# Three merges: b reads a, the final one reads a and b; written final first (the file order does not matter).
FINAL = """merge_method: slerp
base_model: a
models:
  - model: a
  - model: b
parameters: {t: [0.2, 0.7]}
"""
A = """merge_method: task_arithmetic
base_model: BASE
models:
  - model: E0
    parameters: {weight: 0.6}
  - model: E1
    parameters: {weight: 0.4}
"""
B = """merge_method: ties
base_model: BASE
models:
  - model: a
    parameters: {weight: 0.5, density: 0.7}
  - model: E2
    parameters: {weight: 0.5, density: [1.0, 0.5]}
"""


def fill(text, models):
    base, experts = models
    for i, e in enumerate(experts):
        text = text.replace(f"E{i}", e)
    return text.replace("BASE", base)


def chain_file(tmp_path, models, name="chain.yml"):
    path = tmp_path / name
    path.write_text(fill(f"{FINAL}---\nname: a\n{A}---\nname: b\n{B}", models))
    return path


def run(capsys, out, *args):
    code = main(["--output_folder", str(out), "--quiet", "--no-eval", *args])
    return code, capsys.readouterr().err.strip().splitlines()




def assert_same(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def ours_left(folder: Path) -> list[str]:
    """Scratch folders of this process's chains left in ``folder``."""
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith("llm-merging-chain.") and f"-{os.getpid()}-" in p.name]


# ------------------------------------------------------------------ reading and ordering (no weights)
def test_chain_runs_in_dependency_order_whatever_the_file_order(tmp_path, models):
    chain = load_chain(chain_file(tmp_path, models))
    assert [s.name for s in chain.steps] == ["a", "b", None]
    assert [s.index for s in chain.steps] == [2, 3, 1]
    assert chain.final.inputs == ["a", "b"] and chain.step("b").inputs == ["a"]
    assert chain.last_use() == {"a": 2, "b": 2}
    doc = substitute(chain.final.document, {"a": "/x/a", "b": "/x/b"})
    assert doc["base_model"] == "/x/a" and [m["model"] for m in doc["models"]] == ["/x/a", "/x/b"]
    assert chain.final.document["base_model"] == "a"  # the original is left as written
    lora = substitute({"base_model": "a", "models": ["a+/l/o", "c"], "tokenizer_source": "union"}, {"a": "/x/a"})
    assert lora == {"base_model": "/x/a", "models": ["/x/a+/l/o", "c"], "tokenizer_source": "union"}


def test_intermediates_alive_at_once_and_what_is_not_a_reference(tmp_path, models):
    path = tmp_path / "line.yml"
    c = B.replace("model: a\n", "model: b\n").replace("E2", "E0")
    path.write_text(fill(f"name: a\n{A}---\nname: b\n{B}---\nname: c\n{c}---\n"
                         f"{FINAL.replace('model: a', 'model: c').replace('model: b', 'model: E1').replace('base_model: a', 'base_model: c')}"
                         "chat_template: chatml\n", models))
    chain = load_chain(path)
    assert [s.name for s in chain.steps] == ["a", "b", "c", None] and chain.final.inputs == ["c"]
    # a is removed once b is made, b once c is: at most a and b exist at once
    assert chain_phase.peak_bytes(chain, {"a": 10, "b": 20, "c": 5}) == 30
    with pytest.raises(ConfigError, match="has no revisions"):
        bad = tmp_path / "rev.yml"
        bad.write_text(fill(f"name: a\n{A}---\n{FINAL.replace('model: b', 'model: a@main')}", models))
        load_chain(bad)


def test_a_named_last_merge_is_the_final_one_without_an_unnamed_document(tmp_path, models):
    path = tmp_path / "named.yml"
    path.write_text(fill(f"name: a\n{A}---\nname: top\n{FINAL.replace('- model: b', '- model: E2')}", models))
    chain = load_chain(path)
    assert [s.name for s in chain.steps] == ["a", "top"]


@pytest.mark.parametrize("text, message", [
    # a cycle: a reads b, b reads a
    (f"name: a\n{A.replace('E1', 'b')}---\nname: b\n{B}---\n{FINAL}", "form a cycle"),
    # a merge that reads itself
    (f"name: a\n{A.replace('E1', 'a')}---\nname: b\n{B}---\n{FINAL}", "form a cycle"),
    # a name used twice
    (f"name: a\n{A}---\nname: a\n{B.replace('model: a', 'model: E0')}---\n{FINAL}", "document 2: name: 'a' is also"),
    # two documents without a name
    (f"name: a\n{A}---\n{B}---\n{FINAL}", "document 3: no name, and document 2"),
    # a merge the final one does not use
    (f"name: a\n{A}---\nname: b\n{B}---\nname: c\n{A}---\n{FINAL}", "document 3 ('c'): not used by the final merge"),
    # a misspelt name leaves its merge unused: the error points at the reference
    (f"name: a\n{A}---\nname: b\n{B}---\n{FINAL}".replace("- model: b", "- model: bb"),
     "document 2 ('b'): not used by the final merge (document 3), directly or through other merges; "
     "document 3 (the final merge) reads 'bb': did you mean 'b'?"),
    # two merges no other uses, no unnamed document
    (f"name: a\n{A}---\nname: b\n{A}", "are each used by no other merge"),
    # a name that cannot be a folder
    (f"name: a/b\n{A}---\n{FINAL}", "document 1: name"),
    # a bad document: the error names it
    (f"name: a\n{A}foo: 1\n---\nname: b\n{B}---\n{FINAL}", "document 1 ('a'): foo: unknown key"),
    # keys of several types (YAML allows any key)
    (f"name: a\n{A}---\nname: b\n{B}7: 1\nfoo: 2\n---\n{FINAL}", "document 2 ('b'): 7: unknown key"),
    # not valid YAML: the line
    (f"name: a\n{A}---\nname: b\n{B}x: [1\n---\n{FINAL}", "not valid YAML at line"),
])
def test_bad_chains_are_one_line_errors(tmp_path, models, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(fill(text, models))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_chain(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("text, message", [
    (f"name: a\n{A}---\nname: b\n{B.replace('model: a', 'model: aa')}---\n{FINAL}",
     "document 2 ('b'): 'aa' is neither a merge of this file (a, b) nor a model (did you mean the merge 'a'?): "),
    (f"name: a\n{A.replace('E1', 'b')}---\nname: b\n{B}---\n{FINAL}", "form a cycle"),
    (f"name: a\n{A}---\nname: a\n{B.replace('model: a', 'model: E0')}---\n{FINAL}", "name: 'a' is also"),
])
def test_cli_refuses_bad_chains_in_preflight_with_nothing_written(capsys, tmp_path, models, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(fill(text, models))
    out = tmp_path / "out"
    code, err = run(capsys, out, "--recipe", str(path))
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
    assert ours_left(chain_phase.MEMORY_DIR) == [] and ours_left(Path(tempfile.gettempdir())) == []


def test_options_that_do_not_fit_a_chain_are_refused(capsys, tmp_path, models):
    path = chain_file(tmp_path, models)
    code, err = run(capsys, tmp_path / "o1", "--recipe", str(path), "--set", "t=0.5")
    assert code == 2 and "--set" in err[0] and "chains 3 merges" in err[0]
    code, err = run(capsys, tmp_path / "o2", "--recipe", str(path), "--save", "adapter")
    assert code == 2 and "--save adapter" in err[0] and "'a'" in err[0]
    clash = tmp_path / "clash.yml"
    final = FINAL.replace(": a\n", ": merged_model\n").replace("- model: b", "- model: E2")
    clash.write_text(fill(f"name: merged_model\n{A}---\n{final}", models))
    code, err = run(capsys, tmp_path / "o4", "--recipe", str(clash), "--save-intermediates")
    assert code == 2 and "'merged_model' is an output of the run itself" in err[0], err
    single = tmp_path / "one.yml"
    single.write_text(fill(A, models))
    code, err = run(capsys, tmp_path / "o3", "--recipe", str(single), "--save-intermediates")
    assert code == 2 and "--save-intermediates" in err[0]


# ------------------------------------------------------------------ end to end
def separate_runs(capsys, tmp_path, models) -> dict[str, Path]:
    """The three merges as three runs, one after another, each reading the previous ones from disk."""
    out = {}
    a = tmp_path / "a.yml"
    a.write_text(fill(A, models))
    assert run(capsys, tmp_path / "sep-a", "--recipe", str(a))[0] == 0
    out["a"] = tmp_path / "sep-a" / "task_arithmetic" / "merged_model"
    b = tmp_path / "b.yml"
    b.write_text(fill(B, models).replace("model: a\n", f"model: {out['a']}\n"))
    assert run(capsys, tmp_path / "sep-b", "--recipe", str(b))[0] == 0
    out["b"] = tmp_path / "sep-b" / "ties_merge" / "merged_model"
    final = tmp_path / "final.yml"
    final.write_text(FINAL.replace("a\n", f"{out['a']}\n").replace("model: b", f"model: {out['b']}"))
    assert run(capsys, tmp_path / "sep-final", "--recipe", str(final))[0] == 0
    out["final"] = tmp_path / "sep-final" / "slerp" / "merged_model"
    return out


def test_three_step_chain_equals_three_runs_through_disk_and_recipe_yml_reproduces_it(capsys, tmp_path, models):
    want = separate_runs(capsys, tmp_path, models)
    code, err = run(capsys, tmp_path / "chain", "--recipe", str(chain_file(tmp_path, models)))
    assert code == 0, err
    folder = tmp_path / "chain" / "slerp"
    assert_same(dir_tensors(folder / "merged_model"), dir_tensors(want["final"]))
    assert not (folder / "a").exists() and not (folder / "b").exists()  # only the final merge is saved
    report = json.loads((folder / "report.json").read_text())
    chain = report["chain"]
    assert [m["name"] for m in chain["merges"]] == ["a", "b"] and chain["final"] == {"document": 1, "name": None}
    assert chain["intermediates"] in ("memory", "disk")
    if chain_phase.fits_in_memory(chain["intermediate_bytes_at_once"], 0):
        assert chain["intermediates"] == "memory"
    assert [e.get("chain_merge") for e in report["models"]["experts"]] == ["a", "b"]
    assert ours_left(chain_phase.MEMORY_DIR) == [] and ours_left(Path(tempfile.gettempdir())) == []

    # recipe.yml holds the whole chain (names, not the temporary folders), and reproduces it byte for byte
    text = (folder / "recipe.yml").read_text()
    assert text.count("---") == 3 and "name: a" in text and "name: b" in text and "/dev/shm" not in text
    code, err = run(capsys, tmp_path / "again", "--recipe", str(folder / "recipe.yml"))
    assert code == 0, err
    again = tmp_path / "again" / "slerp"
    assert (again / "recipe.yml").read_text() == text
    assert_same(dir_tensors(again / "merged_model"), dir_tensors(folder / "merged_model"))


def test_temporary_folder_mode_gives_the_same_result_and_leaves_nothing(capsys, tmp_path, models, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(chain_phase, "available_bytes", lambda device: 0)  # nothing fits in memory
    path = chain_file(tmp_path, models)
    code, err = run(capsys, tmp_path / "disk", "--recipe", str(path))
    assert code == 0, err
    report = json.loads((tmp_path / "disk" / "slerp" / "report.json").read_text())
    assert report["chain"]["intermediates"] == "disk"
    assert list(scratch.iterdir()) == []
    monkeypatch.undo()
    code, err = run(capsys, tmp_path / "mem", "--recipe", str(path))
    assert code == 0, err
    assert_same(dir_tensors(tmp_path / "disk" / "slerp" / "merged_model"), dir_tensors(tmp_path / "mem" / "slerp" / "merged_model"))


def test_interrupted_chain_leaves_no_intermediate_behind(capsys, tmp_path, models, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for mode, available in (("memory", None), ("disk", 0)):
        if available is not None:
            monkeypatch.setattr(chain_phase, "available_bytes", lambda device: available)
        calls = []
        real = MergePhase.run

        def second_interrupted(self, ctx):
            calls.append(ctx.out_dir)
            if len(calls) == 2:  # merge 'b', after 'a' was written
                raise KeyboardInterrupt
            return real(self, ctx)

        monkeypatch.setattr(MergePhase, "run", second_interrupted)
        code, err = run(capsys, tmp_path / f"int-{mode}", "--recipe", str(chain_file(tmp_path, models)))
        monkeypatch.setattr(MergePhase, "run", real)
        assert code == 130, err
        assert len(calls) == 2
        assert list(scratch.iterdir()) == [] and ours_left(chain_phase.MEMORY_DIR) == []
        assert not (tmp_path / f"int-{mode}" / "slerp" / "merged_model").exists()


def test_save_intermediates_keeps_each_merge_as_a_model_with_its_recipe(capsys, tmp_path, models):
    code, err = run(capsys, tmp_path / "keep", "--recipe", str(chain_file(tmp_path, models)), "--save-intermediates")
    assert code == 0, err
    folder = tmp_path / "keep" / "slerp"
    for name in ("a", "b"):
        assert (folder / name / "merged_model" / "config.json").is_file()
    report = json.loads((folder / "report.json").read_text())
    assert report["chain"]["intermediates"] == "saved"
    written = set(report["outputs"]["written"]) if isinstance(report["outputs"].get("written"), list) else None
    if written is not None:
        assert any(w.startswith("a/merged_model/") for w in written)
    # b's own recipe.yml reproduces it from the saved a (its reference to a is the saved folder)
    code, err = run(capsys, tmp_path / "b-again", "--recipe", str(folder / "b" / "recipe.yml"))
    assert code == 0, err
    assert_same(dir_tensors(tmp_path / "b-again" / "ties_merge" / "merged_model"), dir_tensors(folder / "b" / "merged_model"))
