"""The code examples of README.md and docs/*.md stay true.

* every ```python block runs (offline, on CPU, in a temporary directory); a block that defines a merge class
  for the command line (``class X(...Merge...)``) runs through ``llm_merging/main.py -m module:X --tiny``;
* every ```yaml / ```yml block parses, and a recipe (one with ``merge_method``) loads with ``load_recipe``;
* every command line of a ```bash / ```sh / ```console block that runs ``llm_merging/main.py`` or
  ``llm-merging`` parses with the CLI's own parser (a command such as ``analyze`` with its own), so
  documented flags cannot rot;
* relative links between the pages point at files and headings that exist.

A block preceded by ``<!-- no-test -->`` (e.g. one that needs a GPU or real Hub models) is skipped.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PAGES = [Path(REPO_ROOT, "README.md"), *sorted(Path(REPO_ROOT, "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NO_TEST = "<!-- no-test -->"
MERGE_CLASS = re.compile(r"^class (\w+)\((?:[\w.]*\.)?(\w*Merges?)\):", re.M)
SHELL = ("bash", "sh", "shell", "console")


def _blocks() -> list[tuple[str, str, str, bool]]:
    """(id, language, code, skipped) of every fenced block of every page."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            skipped = text[: match.start()].rstrip().endswith(NO_TEST)
            name = page.relative_to(REPO_ROOT).as_posix()
            found.append((f"{name}:{line}", match.group(1).lower(), match.group(2), skipped))
    return found


BLOCKS = _blocks()


def _of(*languages: str) -> list:
    return [pytest.param(lang, code, skipped, id=block_id)
            for block_id, lang, code, skipped in BLOCKS if lang in languages]


def _skip_if(skipped: bool) -> None:
    if skipped:
        pytest.skip(f"marked {NO_TEST}")


# -- python -------------------------------------------------------------------------------------------------

def _run_merge_class(code: str, class_name: str, tmp_path: Path) -> None:
    module = "doc_merge_example"
    (tmp_path / f"{module}.py").write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, f"{REPO_ROOT}/llm_merging/main.py", "-m", f"{module}:{class_name}", "--tiny", "--quiet",
         "--no-eval", "--save", "none", "--output_folder", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("lang, code, skipped", _of("python", "py"))
def test_python_block_runs(lang, code, skipped, tmp_path, monkeypatch):
    _skip_if(skipped)
    merge_class = MERGE_CLASS.search(code)
    if merge_class:  # a merge method meant for the command line
        _run_merge_class(code, merge_class.group(1), tmp_path)
        return
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


def test_required_python_examples_exist():
    codes = [code for _, lang, code, _ in BLOCKS if lang == "python"]
    assert any("ops.ties(task_vectors" in code for code in codes)
    assert any("class MyMerge" in code for code in codes)


# -- yaml ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lang, code, skipped", _of("yaml", "yml"))
def test_yaml_block_parses(lang, code, skipped, tmp_path):
    import yaml

    from llm_merging.merging.chain import load_chain
    from llm_merging.merging.recipe import load_recipe

    _skip_if(skipped)
    docs = [d for d in yaml.safe_load_all(code) if d is not None]
    if len(docs) > 1:  # a chained recipe (mergekit-multi): every merge read and ordered
        path = tmp_path / "chain.yml"
        path.write_text(code, encoding="utf-8")
        assert load_chain(path).final.recipe.method
        return
    data = docs[0] if docs else None
    if not (isinstance(data, dict) and "merge_method" in data):
        return  # not a recipe (e.g. an lm-eval task): valid YAML is enough
    path = tmp_path / "recipe.yml"
    path.write_text(code, encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.models and recipe.method


def test_recipe_examples_exist():
    recipes = [code for _, lang, code, _ in BLOCKS if lang in ("yaml", "yml") and "merge_method:" in code]
    assert len(recipes) >= 3


# -- command lines ------------------------------------------------------------------------------------------

def _logical_lines(code: str) -> list[str]:
    """Lines of a shell block with ``\\`` continuations joined and console prompts removed."""
    lines, current = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if not current and line.startswith("$ "):
            line = line[2:]
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return lines


def _cli_args(command: list[str]) -> list[str] | None:
    """The arguments given to our CLI by one shell command, or None when it does not run the CLI."""
    while command and re.match(r"^[A-Za-z_]\w*=", command[0]):  # VAR=value prefixes
        command = command[1:]
    if not command:
        return None
    if command[0] == "llm-merging":
        args = command[1:]
    elif re.match(r"^python(3(\.\d+)?)?$", command[0]) and command[1:3] == ["-m", "llm_merging.main"]:
        args = command[3:]
    else:  # python llm_merging/main.py ..., and launchers: accelerate launch ... llm_merging/main.py ...
        at = next((i for i, word in enumerate(command) if word.endswith("llm_merging/main.py")), None)
        if at is None:
            return None
        args = command[at + 1:]
    return args


def _commands(code: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in _logical_lines(code):
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                args = _cli_args(command)
                if args is not None:
                    found.append((line, args))
                command = []
            else:
                command.append(word)
    return found


def _shell_commands() -> list:
    params = []
    for block_id, lang, code, skipped in BLOCKS:
        if lang in SHELL:
            for line, args in _commands(code):
                label = re.sub(r"[^\w.:=/-]+", "_", " ".join(args))[:60]
                params.append(pytest.param(line, args, skipped, id=f"{block_id}:{label}"))
    return params


@pytest.mark.parametrize("line, args, skipped", _shell_commands())
def test_command_line_parses(line, args, skipped, capsys):
    from llm_merging import cli
    from llm_merging.main import build_parser

    _skip_if(skipped)
    if args and args[0] in cli.COMMANDS:  # `llm-merging analyze ...`: that command's own parser
        parser, args = getattr(cli, cli.COMMANDS[args[0]]).build_parser(), args[1:]
    else:
        parser = build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"documented command does not parse (exit {exc.code}): {line}\n{capsys.readouterr().err}")


def test_command_lines_found():
    assert len(_shell_commands()) >= 20
    assert any("--tiny" in args for _, args, _ in (p.values for p in _shell_commands()))


# -- links --------------------------------------------------------------------------------------------------

def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
