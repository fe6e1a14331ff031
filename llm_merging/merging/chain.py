"""Chained merges: a multi-document recipe as ``mergekit-multi`` (mergekit 0.1.5) reads it.

Each YAML document is one merge (a recipe, :mod:`llm_merging.merging.recipe`) with a ``name``; a model
reference in another merge (``base_model``, ``models``, slice sources, ``BASE+LORA``'s base,
``tokenizer_source``, ``chat_template``) that equals a name stands for that merge's result. As in
mergekit, a reference that is not a name is a model path or hub id, the names win over paths, and the
document order does not matter: the merges run in dependency order. The final merge (saved and evaluated)
is the one document without a ``name`` (at most one), else the only merge no other merge uses.

Everything here is pure (no weights, no model resolution): reading, checking and ordering the documents,
and writing references to the places the intermediate merges are kept (:func:`substitute`).
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_merging.core.errors import ConfigError
from llm_merging.core.io import read_yaml_documents
from llm_merging.merging.recipe import Recipe, parse_recipe

#: a merge's name: it becomes a folder name (``--save-intermediates``)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: words a name cannot be: ``tokenizer_source`` values
RESERVED = {"base", "union"}


@dataclass
class Step:
    """One merge of a chain: its document (without ``name``) and the recipe read from it."""

    index: int  # 1-based position of its document in the file
    name: str | None  # None: the final merge, written without a name
    document: dict[str, Any]
    recipe: Recipe  # references as written: names of other merges are not resolved
    inputs: list[str] = field(default_factory=list)  # the merges it reads, in order of first use

    @property
    def label(self) -> str:
        """``document 2 ('soup')``: how errors and the report name it."""
        return f"document {self.index} " + (f"('{self.name}')" if self.name is not None else "(the final merge)")


@dataclass
class MergeChain:
    """The merges of a multi-document recipe in the order they run (each after the merges it reads; the
    final one last)."""

    path: str
    steps: list[Step]

    @property
    def final(self) -> Step:
        return self.steps[-1]

    @property
    def names(self) -> list[str]:
        """The names of the merges made before the final one, in the order they run."""
        return [s.name for s in self.steps[:-1] if s.name is not None]

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def last_use(self) -> dict[str, int]:
        """For each intermediate merge, the position (in ``steps``) of the last merge that reads it."""
        out: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for name in step.inputs:
                out[name] = i
        return out


def is_chain(path: str | Path) -> bool:
    """Whether the recipe file is a chain: several documents, or a document with a ``name``. False when it
    cannot be read (reading it as one recipe then says why)."""
    try:
        docs = read_yaml_documents(path, f"recipe {path}")
    except ConfigError:
        return False
    return len(docs) > 1 or any(isinstance(doc, dict) and "name" in doc for _, doc in docs)


def load_chain(path: str | Path) -> MergeChain:
    """Read and check a chained recipe before any weight is loaded: every document a valid recipe, names
    valid and used once, at most one document without a name, no cycle, every merge used by the final one.
    Every error is one line naming the file and the document."""
    path = str(path)
    docs = read_yaml_documents(path, f"recipe {path}")
    if not docs:
        raise ConfigError(f"recipe {path}: no merge in the file")
    steps: list[Step] = []
    seen: dict[str, Step] = {}
    unnamed: Step | None = None
    for index, doc in docs:
        where = f"recipe {path} document {index}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a mapping (a merge with a name), got {type(doc).__name__}")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None:
            if not isinstance(name, str) or not NAME.match(name):
                raise ConfigError(f"{where}: name: expected letters, digits, '.', '_' or '-' (a folder name), "
                                  f"got {name!r}")
            if name in RESERVED:
                raise ConfigError(f"{where}: name: '{name}' is a tokenizer_source value; choose another name")
            if name in seen:
                raise ConfigError(f"{where}: name: '{name}' is also the name of {seen[name].label}; "
                                  "each merge needs its own name")
        label = f"{path} document {index}" + (f" ('{name}')" if name is not None else "")
        step = Step(index=index, name=name, document=doc, recipe=parse_recipe(doc, label))
        if name is None:
            if unnamed is not None:
                raise ConfigError(f"{where}: no name, and {unnamed.label} has none either; only the final merge "
                                  "may go without a name")
            unnamed = step
        else:
            seen[name] = step
        steps.append(step)

    for step in steps:  # which merges each one reads (a chat template may name one too)
        chat = step.recipe.chat_template
        for ref in [*references(step.recipe), *([chat] if chat in seen else [])]:
            if ref in seen:
                if ref not in step.inputs:
                    step.inputs.append(ref)
            elif ref.partition("@")[0] in seen:
                raise ConfigError(f"recipe {path} {step.label}: '{ref}': the merge '{ref.partition('@')[0]}' of "
                                  "this file has no revisions; write its name alone")
    _check_cycles(path, steps, seen)
    final = unnamed if unnamed is not None else _final(path, steps)
    order = _order(final, seen)
    ordered = {s.index for s in order}
    unused = [s for s in steps if s.index not in ordered]
    if unused:
        step = unused[0]
        hint = ""
        for other in steps:  # a misspelt reference to it, read as a model
            close = difflib.get_close_matches(step.name, [r for r in references(other.recipe) if r not in seen],
                                              n=1, cutoff=0.6)
            if close:
                hint = f"; {other.label} reads '{close[0]}': did you mean '{step.name}'?"
                break
        raise ConfigError(f"recipe {path} {step.label}: not used by the final merge (document {final.index}), "
                          f"directly or through other merges{hint}")
    return MergeChain(path=path, steps=order)


def references(recipe: Recipe) -> list[str]:
    """Every model a recipe reads, as written: base model, models (a LoRA's base included), slice
    sources, and the tokenizer sources that name a model (not a chat template, which may be a template)."""
    refs = [recipe.base_model, *recipe.models, *(m for m, _ in recipe.slices or [])]
    tok = (recipe.tokenizer or {}).get("source")
    if isinstance(tok, str) and tok not in RESERVED:
        refs.append(tok)
    for entry in ((recipe.tokenizer or {}).get("tokens") or {}).values():
        source = entry.get("source") if isinstance(entry, dict) else None
        if isinstance(source, dict):
            source = source.get("model")
        if isinstance(source, str) and source not in RESERVED:
            refs.append(source)
    for ref in recipe.document.get("models") or []:  # BASE+LORA: the base the adapter applies to
        model = ref.get("model") if isinstance(ref, dict) else ref
        if isinstance(model, str) and "+" in model:
            refs.append(model.partition("+")[0].strip())
    for sl in recipe.document.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            model = src.get("model") if isinstance(src, dict) else None
            if isinstance(model, str) and "+" in model:
                refs.append(model.partition("+")[0].strip())
    return list(dict.fromkeys(r for r in refs if isinstance(r, str)))


def _check_cycles(path: str, steps: list[Step], named: dict[str, Step]) -> None:
    """ConfigError naming the documents of the first cycle found (a merge that reads itself included)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in named[name].inputs:
            if state.get(dep) == 1:
                loop = trail[trail.index(dep):] + [dep]
                text = " -> ".join(named[n].label for n in loop)
                raise ConfigError(f"recipe {path}: {text}: the merges form a cycle (each needs the one after it)")
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for step in steps:
        if step.name is not None and step.name not in state:
            visit(step.name, [step.name])


def _final(path: str, steps: list[Step]) -> Step:
    """Without an unnamed document: the only merge that no other merge reads."""
    used = {name for s in steps for name in s.inputs}
    tops = [s for s in steps if s.name not in used]
    if len(tops) != 1:  # never 0: the merges form no cycle
        listed = ", ".join(s.label for s in tops)
        raise ConfigError(f"recipe {path}: {listed} are each used by no other merge: a chain has one final merge "
                          "(the document without a name, or the only merge no other uses)")
    return tops[0]


def _order(final: Step, named: dict[str, Step]) -> list[Step]:
    """The merges the final one needs, each after the merges it reads (ties in document order), final last."""
    order: list[Step] = []
    done: set[int] = set()

    def visit(step: Step) -> None:
        for dep in sorted(step.inputs, key=lambda n: named[n].index):
            if named[dep].index not in done:
                visit(named[dep])
        done.add(step.index)
        order.append(step)

    visit(final)
    return order


def substitute(document: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """A copy of ``document`` whose references to the merges in ``paths`` (name -> model directory) point
    to those directories (``NAME+LORA``: the base part), as mergekit-multi rewrites them."""
    doc = copy.deepcopy(document)

    def sub(ref: Any) -> Any:
        if not isinstance(ref, str):
            return ref
        model, plus, lora = ref.partition("+")
        key = model.strip()
        return (paths[key] + plus + lora) if key in paths else ref

    if "base_model" in doc:
        doc["base_model"] = sub(doc["base_model"])
    for i, entry in enumerate(doc.get("models") or []):
        if isinstance(entry, dict):
            entry["model"] = sub(entry.get("model"))
        else:
            doc["models"][i] = sub(entry)
    for sl in doc.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            if isinstance(src, dict):
                src["model"] = sub(src.get("model"))
    if doc.get("tokenizer_source") not in (None, "base", "union"):
        doc["tokenizer_source"] = sub(doc["tokenizer_source"])
    tok = doc.get("tokenizer")
    if isinstance(tok, dict):
        if tok.get("source") not in (None, "base", "union"):
            tok["source"] = sub(tok["source"])
        for entry in (tok.get("tokens") or {}).values() if isinstance(tok.get("tokens"), dict) else []:
            source = entry.get("source") if isinstance(entry, dict) else None
            if isinstance(source, dict) and "model" in source:  # {kind: model_token, model: ...}
                source["model"] = sub(source["model"])
            elif source not in (None, "base", "union"):
                entry["source"] = sub(source)
    if isinstance(doc.get("chat_template"), str):
        doc["chat_template"] = sub(doc["chat_template"])
    return doc


def unknown_hint(ref: str, chain: MergeChain) -> str:
    """`` (did you mean the merge 'soup'?)`` when ``ref`` is close to the name of a merge of ``chain``."""
    close = difflib.get_close_matches(ref, chain.names, n=1, cutoff=0.6)
    return f" (did you mean the merge '{close[0]}'?)" if close else ""
