"""The output tokenizer of a merge, and every model's vocabulary matrices re-indexed to it.

Models whose tokenizers differ (an expert that added tokens, or a different tokenizer altogether) cannot
be merged row by row: row ``i`` of one embedding is not the same token as row ``i`` of another. This module
follows mergekit 0.1.5's ``tokenizer_source: base | union | <model>`` (and its ``tokenizer: {source, tokens,
pad_to_multiple_of}`` form) so mergekit recipes transfer:

* `build_tokenizer` builds the output tokenizer and, for the base and each model, the source row of every
  output row (its *index map*; -1 where the model lacks the token);
* `align_rows` (pure tensor math; `TokenizerPlan.align` binds it to a plan) re-indexes each model's input
  embedding or LM head to the output vocabulary and fills the rows a model lacks, before the merge runs.

Rules (mergekit 0.1.5, ``mergekit/tokenizer/build.py`` and ``embed.py``):

* **base tokenizer**: the base's tokenizer with every token whose id is >= the base's ``config.vocab_size``
  removed (BPE tokenizers only; others raise);
* **union**: a copy of that base tokenizer, so the base's tokens keep their ids; then every model's regular
  tokens the base lacks, appended as added tokens in model order (ours: in each model's id order; mergekit
  iterates ``get_vocab()``, whose order is arbitrary); then every model's added tokens (special flags kept;
  a token added by several models keeps the first model's settings). Tokens whose id is >= their model's
  ``config.vocab_size`` are left out;
* ``source="base"``: the stripped base tokenizer; ``source=<model dir>``: that model's tokenizer as saved;
* ``tokens``: every key missing from the output tokenizer is added to it;
* **rows**: a model that has a token keeps its own row (unless the token's ``force`` is set). Rows a model
  lacks get the token's *default embedding*: the ``tokens`` override's source if there is one; else the row
  of the only model that has the token; else the base's row when the base has it; else the mean of the rows
  of the models that have it; zeros when no model has it. ``force`` gives every model the default embedding;
* **padding** (``pad_to_multiple_of``): the vocabulary is rounded up to a multiple and each model's extra
  rows are the mean of its own (aligned) token rows;
* the output tokenizer keeps its source's chat template unless ``chat_template`` sets one.

Models taking part in one `align_rows` call are the ones whose matrix is given (a ``None`` entry is left out,
as mergekit leaves out a model without the weight): the "only model", "base" and "mean" rules count only them.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from llm_merging.core.errors import ConfigError, MergeError, ModelNotFoundError, first_line
from llm_merging.core.io import scratch_directory

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "sentencepiece.bpe.model")
ADAPTER_CONFIG = "adapter_config.json"

# Built-in chat template names (as mergekit's ``chat_template: chatml``); the standard ChatML format, with
# the same text (line breaks included) as mergekit 0.1.5 writes, so saved tokenizer configs are identical.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}\n"
    ),
}


# --------------------------------------------------------------------------------------------------------
# per-token overrides
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSource:
    """Where the default embedding of one output token comes from (a resolved ``tokens:`` entry).

    ``kind``: ``"auto"`` (the default rule: only model / base / mean / zeros), ``"zero"``, ``"model"`` (model
    ``model``'s row for this token) or ``"model_row"`` (row ``row`` of model ``model``'s own matrix).
    ``model`` indexes the list given to `align_rows` (0 = base). ``force``: every model gets it.
    """

    kind: str = "auto"
    model: int | None = None
    row: int | None = None
    force: bool = False


# --------------------------------------------------------------------------------------------------------
# pure tensor math
# --------------------------------------------------------------------------------------------------------
def _runs(dst: torch.Tensor, src: torch.Tensor, most: int = 64) -> list[tuple[int, int, int]] | None:
    """``dst``/``src`` row indices as at most ``most`` blocks ``(dst start, src start, length)`` where both
    run consecutively (slice copies then replace a gather), else None."""
    if dst.numel() == 0:
        return []
    breaks = ((dst[1:] - dst[:-1] != 1) | (src[1:] - src[:-1] != 1)).nonzero().flatten() + 1
    if breaks.numel() >= most:
        return None
    starts = [0] + breaks.tolist()
    ends = starts[1:] + [dst.numel()]
    return [(int(dst[a]), int(src[a]), e - a) for a, e in zip(starts, ends)]


def align_rows(
    rows_by_model: Sequence[torch.Tensor | None],
    index_maps: Sequence[torch.Tensor],
    vocab_size: int | None = None,
    *,
    n_tokens: int | None = None,
    base: int | None = 0,
    overrides: dict[int, TokenSource] | None = None,
    axis: int = 0,
    names: Sequence[str] | None = None,
    consume: bool = False,
) -> list[torch.Tensor | None]:
    """Re-index each model's vocabulary matrix to the output vocabulary (mergekit's ``PermutedVocabulary``).

    ``rows_by_model[k]``: model ``k``'s matrix in its own vocabulary (vocabulary along ``axis``), or None
    when the model lacks this weight (it is then left out, and None is returned for it).
    ``index_maps[k][j]``: the row of model ``k`` holding output token ``j``, -1 where it lacks the token.
    ``vocab_size``: output rows (default ``len(index_maps[0])``); rows ``n_tokens..vocab_size-1`` are
    padding (default ``n_tokens = vocab_size``), each model's filled with the mean of its token rows.
    ``base``: which entry is the base model (None: no base). ``overrides``: output token id -> `TokenSource`.
    Results are in the promoted dtype of the inputs, on the device of the first one.
    ``consume`` (``rows_by_model`` a list): each input entry is set to None once its result is made, so
    the caller holding no other reference, at most one result more than the inputs is alive at a time.
    """
    names = list(names) if names is not None else [f"model {k}" for k in range(len(rows_by_model))]
    if len(index_maps) != len(rows_by_model):
        raise ValueError(f"{len(rows_by_model)} matrices but {len(index_maps)} index maps")
    present = [k for k, t in enumerate(rows_by_model) if t is not None]
    if not present:
        return [None] * len(rows_by_model)
    vocab_size = int(len(index_maps[0]) if vocab_size is None else vocab_size)
    n_tokens = vocab_size if n_tokens is None else int(n_tokens)
    if not 0 < n_tokens <= vocab_size:
        raise ValueError(f"n_tokens={n_tokens} must be in 1..vocab_size={vocab_size}")
    overrides = dict(overrides or {})

    device = rows_by_model[present[0]].device
    dtype = rows_by_model[present[0]].dtype
    views: dict[int, torch.Tensor] = {}
    for k in present:
        t = rows_by_model[k]
        if not 0 <= axis < t.ndim:
            raise MergeError(f"{names[k]}: vocabulary axis {axis} is out of range for a {t.ndim}-d matrix")
        views[k] = t.movedim(axis, 0)
        dtype = torch.promote_types(dtype, t.dtype)
    del t
    token_shape = views[present[0]].shape[1:]
    for k in present:
        if views[k].shape[1:] != token_shape:
            raise MergeError(f"{names[k]}: vocabulary matrix rows have shape {tuple(views[k].shape[1:])}, "
                             f"others {tuple(token_shape)}")

    maps: dict[int, torch.Tensor] = {}
    for k in present:
        m = torch.as_tensor(index_maps[k], dtype=torch.long).cpu()
        if m.numel() < n_tokens:
            raise ValueError(f"index map of {names[k]} has {m.numel()} entries, need {n_tokens}")
        m = m[:n_tokens]
        top = int(m.max()) if m.numel() else -1
        if top >= views[k].shape[0]:
            raise MergeError(f"{names[k]}: its tokenizer needs vocabulary row {top} but its matrix has "
                             f"{views[k].shape[0]} rows")
        maps[k] = m
    has = {k: maps[k] >= 0 for k in present}
    n_present = torch.zeros(n_tokens, dtype=torch.long)
    for k in present:
        n_present += has[k].long()

    forced = torch.zeros(n_tokens, dtype=torch.bool)
    for j, src in overrides.items():
        if not 0 <= j < n_tokens:
            raise ValueError(f"override for token id {j} is outside the vocabulary (0..{n_tokens - 1})")
        if src.force:
            forced[j] = True
    # tokens that need a default embedding: forced, or missing from at least one participating model
    need = forced | (n_present < len(present))

    def fetch(k: int, src_rows: torch.Tensor) -> torch.Tensor:
        return views[k].index_select(0, src_rows.to(views[k].device)).to(device=device, dtype=dtype)

    # default embeddings, only for the tokens that need one (slot pos[j] of the table for token j)
    need_ids = need.nonzero().flatten()
    pos = torch.full((n_tokens,), -1, dtype=torch.long)
    pos[need_ids] = torch.arange(need_ids.numel())
    default = torch.zeros((need_ids.numel(), *token_shape), dtype=dtype, device=device)
    auto = need.clone()
    for j, src in overrides.items():
        if not need[j] or src.kind == "auto":
            continue
        auto[j] = False
        if src.kind == "zero":
            continue
        k = src.model
        label = names[k] if k is not None and 0 <= k < len(names) else f"model {k}"
        if k is None or k not in views:
            raise MergeError(f"token id {j} takes its embedding from {label}, which lacks this weight")
        if src.kind == "model":
            r = int(maps[k][j])
            if r < 0:
                raise MergeError(f"token id {j} takes its embedding from {label}, which lacks that token")
        elif src.kind == "model_row":
            r = int(src.row)
            if not 0 <= r < views[k].shape[0]:
                raise MergeError(f"token row {r} is out of range for {label} ({views[k].shape[0]} rows)")
        else:
            raise ValueError(f"unknown token source kind {src.kind!r}")
        default[int(pos[j])] = views[k][r].to(device=device, dtype=dtype)

    def put(mask: torch.Tensor, values_of) -> None:
        sel = mask.nonzero().flatten()
        if sel.numel():
            default[pos[sel].to(device)] = values_of(sel)

    # the default rule: the only model that has the token; else the base when it has it; else the mean
    only = auto & (n_present == 1)
    base_has = has[base] if base is not None and base in has else torch.zeros(n_tokens, dtype=torch.bool)
    for k in present:
        put(only & has[k], lambda sel, k=k: fetch(k, maps[k][sel]))
    put(auto & (n_present > 1) & base_has, lambda sel: fetch(base, maps[base][sel]))

    def mean_of(sel: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros((sel.numel(), *token_shape), dtype=dtype, device=device)
        for k in present:  # models in order, added one at a time onto zeros (mergekit's order of additions)
            pick = has[k][sel]
            if pick.any():
                pd = pick.to(device)
                acc[pd] = acc[pd] + fetch(k, maps[k][sel[pick]])
        return acc / n_present[sel].to(device=device, dtype=dtype).view(-1, *([1] * len(token_shape)))

    put(auto & (n_present > 1) & ~base_has, mean_of)
    none = auto & (n_present == 0)
    if none.any():
        logger.warning("%d output token(s) are in no model; their rows are zeros", int(none.sum()))

    out: list[torch.Tensor | None] = [None] * len(rows_by_model)
    for k in present:
        new = torch.empty((vocab_size, *token_shape), dtype=dtype, device=device)
        own = has[k] & ~forced
        sel = own.nonzero().flatten()
        if sel.numel():
            src_rows = maps[k][sel]
            runs = _runs(sel, src_rows)
            if runs is not None:  # the usual case: a few blocks of rows kept in order
                for a, b, n in runs:
                    new[a:a + n].copy_(views[k][b:b + n])
            else:
                new.index_copy_(0, sel.to(device), fetch(k, src_rows))
        lack = (~own).nonzero().flatten()  # all of them need a default (forced, or missing from model k)
        if lack.numel():
            new.index_copy_(0, lack.to(device), default.index_select(0, pos[lack].to(device)))
        if vocab_size > n_tokens:  # padding rows: mean of the token rows (mergekit)
            new[n_tokens:] = torch.mean(new[:n_tokens], dim=0)
        out[k] = new.movedim(0, axis)
        if consume:  # model k's input is no longer needed (the default rows are made)
            views.pop(k)
            rows_by_model[k] = None
    return out


# --------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------
@dataclass
class TokenizerPlan:
    """The output tokenizer and how every model's vocabulary maps onto it.

    ``names[0]``/``index_maps[0]``/``source_rows[0]`` are the base's, then one per model in the order given.
    ``source_rows[k]``: the vocabulary rows model ``k``'s matrices have (its ``config.vocab_size``).
    ``n_tokens``: tokens of the output tokenizer; ``vocab_size``: rows after padding (set this as the merged
    model's ``config.vocab_size``).
    """

    tokenizer: object
    vocab_size: int
    n_tokens: int
    index_maps: list[torch.Tensor]
    names: list[str]
    source_rows: list[int]
    overrides: dict[int, TokenSource] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        """True when every model already has the output vocabulary in the same order and size (and no
        ``force`` override): then no matrix needs re-indexing."""
        if any(s.force for s in self.overrides.values()):
            return False
        ar = torch.arange(self.vocab_size)
        return all(len(m) == self.vocab_size and torch.equal(m, ar) and rows == self.vocab_size
                   for m, rows in zip(self.index_maps, self.source_rows))

    def align(self, rows_by_model: Sequence[torch.Tensor | None], axis: int = 0,
              consume: bool = False) -> list[torch.Tensor | None]:
        """`align_rows` with this plan's maps: base's matrix first, then each model's (None: lacks it)."""
        return align_rows(rows_by_model, self.index_maps, self.vocab_size, n_tokens=self.n_tokens, base=0,
                          overrides=self.overrides, axis=axis, names=self.names, consume=consume)

    def save(self, out_dir: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
def has_tokenizer(path: Path) -> bool:
    """Whether the directory ``path`` holds tokenizer files (`TOKENIZER_FILES`)."""
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: Path, label: str):
    """``AutoTokenizer`` of the local directory ``path``; a `ModelNotFoundError` naming ``label`` when it fails."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelNotFoundError(f"cannot load the tokenizer of {label} ({path}): {first_line(exc)}") from None


def _config_vocab_size(path: Path) -> int | None:
    """``vocab_size`` from ``config.json`` (or its ``text_config``), None when there is none."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    for c in (cfg, cfg.get("text_config") or {}, cfg.get("llm_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def _copy_tokenizer(tok):
    """An independent copy (save and reload), so edits never touch a tokenizer loaded for another role."""
    from transformers import AutoTokenizer

    with scratch_directory("tok") as tmp:
        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _strip_tokenizer(tok, vocab_size: int, label: str):
    """Drop tokens whose id is >= ``vocab_size`` (tokens with no row in the model), as mergekit does."""
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    from tokenizers import Tokenizer

    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        raise ModelNotFoundError(f"{label}: its tokenizer has {len(unused)} token(s) beyond the model's "
                                 f"{vocab_size} rows and is not a fast tokenizer, so they cannot be removed")
    spec = json.loads(backend.to_str())
    kind = spec["model"]["type"]
    if kind != "BPE":
        raise ModelNotFoundError(f"{label}: its {kind} tokenizer has {len(unused)} token(s) beyond the model's "
                                 f"{vocab_size} rows; only BPE tokenizers can have them removed")
    spec["added_tokens"] = [e for e in spec.get("added_tokens") or [] if e["id"] < vocab_size]
    for t in unused:
        spec["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:  # mergekit checks the parts only; a merge making a removed token must go too
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in parts) and "".join(parts) not in unused

    spec["model"]["merges"] = [m for m in spec["model"].get("merges") or [] if keep(m)]
    tok = _copy_tokenizer(tok)
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    tok = _copy_tokenizer(tok)  # reload so the wrapper's added-token bookkeeping matches the new backend
    logger.info("%s: %d tokenizer token(s) beyond its %d vocabulary rows left out", label, len(unused), vocab_size)
    return tok


@dataclass
class _Model:
    label: str
    path: Path
    tokenizer: object  # the model's own tokenizer, or the base's (adapters without one)
    tokenizer_path: Path
    rows: int


def _resolve_dir(ref, label: str) -> Path:
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{label} {ref} does not exist (a local directory is needed)")
    return path.resolve()


def _load_models(base_dir, model_dirs) -> list[_Model]:
    base_path = _resolve_dir(base_dir, "base model")
    base_label = f"base model {base_dir}"
    if not has_tokenizer(base_path):
        raise ModelNotFoundError(f"base model {base_dir} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")
    base_tok = load_tokenizer(base_path, base_label)
    base_rows = _config_vocab_size(base_path)
    if base_rows is not None:
        base_tok = _strip_tokenizer(base_tok, base_rows, base_label)
    else:
        base_rows = len(base_tok.get_vocab())
    out = [_Model(base_label, base_path, base_tok, base_path, base_rows)]
    for ref in model_dirs:
        label = f"model {ref}"
        path = _resolve_dir(ref, "model")
        is_adapter = (path / ADAPTER_CONFIG).is_file()
        rows = _config_vocab_size(path)
        if has_tokenizer(path):
            tok = load_tokenizer(path, label)
            if rows is None:
                rows = len(tok.get_vocab())
            out.append(_Model(label, path, tok, path, rows))
            continue
        # no tokenizer of its own: the base's (an adapter always; a full model as mergekit assumes)
        if rows is not None and rows != base_rows and not is_adapter:
            raise ModelNotFoundError(f"model {ref} has no tokenizer and its vocabulary ({rows} rows) differs "
                                     f"from the base's ({base_rows})")
        if not is_adapter:
            logger.warning("model %s has no tokenizer; assuming the base's", ref)
        out.append(_Model(label, path, base_tok, base_path, base_rows if is_adapter or rows is None else rows))
    return out


def _find_model(models: list[_Model], ref) -> int | None:
    """Index of the model ``ref`` names (a path equal to the base's or one model's), None if none."""
    if ref is None:
        return None
    try:
        p = Path(ref).expanduser().resolve()
    except (TypeError, ValueError, OSError):
        return None
    for k, m in enumerate(models):
        if m.path == p:
            return k
    return None


# --------------------------------------------------------------------------------------------------------
# building the output tokenizer
# --------------------------------------------------------------------------------------------------------
def _union_tokenizer(models: list[_Model]):
    base_tok = models[0].tokenizer
    new_regular: dict[str, None] = {}
    added: dict[str, object] = {}
    warned: set[str] = set()
    seen_tokenizers: set[int] = set()
    for m in models:
        if id(m.tokenizer) in seen_tokenizers:  # an adapter sharing the base's tokenizer adds nothing
            continue
        seen_tokenizers.add(id(m.tokenizer))
        decoder = m.tokenizer.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for tok, idx in sorted(m.tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if idx >= m.rows:
                logger.warning("%s: token %r has id %d >= its %d vocabulary rows; left out", m.label, tok, idx,
                               m.rows)
                continue
            if tok not in added_names:
                new_regular.setdefault(tok)
        for idx, info in sorted(decoder.items()):
            if idx >= m.rows:
                continue
            tok = info.content
            if tok in added:
                if added[tok] != info and tok not in warned:
                    logger.warning("token %r is added with different settings by several models; using the first",
                                   tok)
                    warned.add(tok)
                continue
            added[tok] = info
    res = _copy_tokenizer(base_tok)
    base_vocab = base_tok.get_vocab()
    regular = [t for t in new_regular if t not in added and t not in base_vocab]
    if regular:
        res.add_tokens(regular)
    if added:
        res.add_tokens(list(added.values()))
    # also list the models' extra special tokens as such (ids unchanged; mergekit leaves them unlisted)
    named = set(res.special_tokens_map.values())
    have = set(res.all_special_tokens)
    vocab = res.get_vocab()
    extra: list[str] = []
    for m in models:
        for s in getattr(m.tokenizer, "all_special_tokens", []) or []:
            if s not in have and s not in named and s in vocab and s in added and s not in extra:
                extra.append(s)
    if extra:
        try:
            res.add_special_tokens({"extra_special_tokens": [added[s] for s in extra]},
                                   replace_extra_special_tokens=False)
        except Exception as exc:  # bookkeeping only: the tokens themselves are in place
            logger.debug("could not list extra special tokens %s: %s", extra, exc)
    return res


def _token_overrides(tokens: dict | None, models: list[_Model], vocab: dict[str, int]) -> dict[int, TokenSource]:
    """Resolve mergekit's ``tokens:`` entries into `TokenSource`s keyed by output token id."""
    result: dict[int, TokenSource] = {}
    for token, cfg in (tokens or {}).items():
        where = f"tokenizer tokens[{token!r}]"
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where} must be a mapping with 'source' and/or 'force', got {cfg!r}")
        unknown = set(cfg) - {"source", "force"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                              "(expected 'source', 'force')")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{where}: 'force' must be true or false, got {force!r}")
        src = cfg.get("source")
        if src is None:
            ts = TokenSource("auto", force=force)
        elif isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero":
                if set(src) - {"kind"}:
                    raise ConfigError(f"{where}: source of kind 'zero' takes no other keys")
                ts = TokenSource("zero", force=force)
            elif kind == "model_token":
                if set(src) - {"kind", "model", "token", "token_id"}:
                    raise ConfigError(f"{where}: source of kind 'model_token' takes 'model' and 'token' or 'token_id'")
                k = _find_model(models, src.get("model"))
                if k is None:
                    raise ConfigError(f"{where}: source model {src.get('model')!r} is not the base or one of the models")
                has_id, has_tok = src.get("token_id") is not None, src.get("token") is not None
                if has_id == has_tok:
                    raise ConfigError(f"{where}: give exactly one of 'token' and 'token_id'")
                if has_id:
                    row = src["token_id"]
                    if not isinstance(row, int) or isinstance(row, bool) or row < 0:
                        raise ConfigError(f"{where}: token_id must be a non-negative integer, got {row!r}")
                else:
                    row = models[k].tokenizer.get_vocab().get(src["token"])
                    if row is None:
                        raise ConfigError(f"{where}: token {src['token']!r} is not in the tokenizer of {models[k].label}")
                ts = TokenSource("model_row", model=k, row=row, force=force)
            else:
                raise ConfigError(f"{where}: source kind must be 'zero' or 'model_token', got {kind!r}")
        else:
            k = _find_model(models, src)
            if k is None:
                raise ConfigError(f"{where}: source model {src!r} is not the base or one of the models")
            ts = TokenSource("model", model=k, force=force)
        result[vocab[token]] = ts
    return result


def _chat_template_of(tok):
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


def _resolve_chat_template(chat_template: str, models: list[_Model]) -> str | None:
    """mergekit's ``chat_template``: ``auto`` (the most common among the models), a built-in name, a model
    directory (its template), or a template string."""
    if chat_template == "auto":
        found = [t.strip() for t in (_chat_template_of(m.tokenizer) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if "{" not in chat_template and len(chat_template) < 4096 and "\n" not in chat_template:
        k = _find_model(models, chat_template)
        path = models[k].tokenizer_path if k is not None else Path(chat_template).expanduser()
        if k is not None or path.is_dir():
            tok = models[k].tokenizer if k is not None else load_tokenizer(path, f"chat template model {chat_template}")
            t = _chat_template_of(tok)
            if not t:
                raise ConfigError(f"chat_template: {chat_template} has no chat template")
            return t
    if len(chat_template) < 20 or "{" not in chat_template:
        raise ConfigError(f"chat_template {chat_template!r} is not a template, a model directory, 'auto' or one of "
                          f"{', '.join(sorted(CHAT_TEMPLATES))}")
    return chat_template


def build_tokenizer(
    base_dir,
    model_dirs: Sequence,
    source: str = "union",
    tokens: dict | None = None,
    pad_to_multiple_of: int | None = None,
    chat_template: str | None = None,
) -> TokenizerPlan:
    """Build the output tokenizer of a merge and every model's index map onto it (mergekit 0.1.5 rules).

    ``base_dir``, ``model_dirs``: local model or LoRA adapter directories (an adapter without a tokenizer
    uses the base's). ``source``: ``"union"``, ``"base"`` or a directory whose tokenizer to use as is.
    ``tokens``: mergekit's ``tokenizer.tokens`` -- token -> ``{"source": ..., "force": bool}`` where source
    is None (the default rule), a model directory (that model's row for the token), ``{"kind": "zero"}``
    or ``{"kind": "model_token", "model": dir, "token": str | "token_id": int}``; tokens missing from the
    output tokenizer are added. ``pad_to_multiple_of``: round the vocabulary rows up. ``chat_template``:
    None keeps the source tokenizer's; else a template string, a model directory, ``"auto"`` or ``"chatml"``.

    Raises `ModelNotFoundError` (a model or its tokenizer cannot be loaded) or `ConfigError` (bad options).
    """
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int)
                                           or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1):
        raise ConfigError(f"tokenizer pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise ConfigError(f"tokenizer source must be 'union', 'base' or a model directory, got {source!r}")
    if tokens is not None and not isinstance(tokens, dict):
        raise ConfigError(f"tokenizer tokens must be a mapping of token -> settings, got {type(tokens).__name__}")
    if chat_template is not None and (not isinstance(chat_template, str) or not chat_template):
        raise ConfigError(f"chat_template must be a non-empty string, got {chat_template!r}")
    models = _load_models(base_dir, list(model_dirs))

    if source == "union":
        out = _union_tokenizer(models)
    elif source == "base":
        out = _copy_tokenizer(models[0].tokenizer)
    else:
        k = _find_model(models, source)
        if k is not None:
            path, label = models[k].tokenizer_path, models[k].label
        else:
            path = Path(source).expanduser()
            label = f"tokenizer source {source}"
            if not path.is_dir():
                raise ConfigError(f"tokenizer source {source!r} is not 'union', 'base' or an existing directory")
            if not has_tokenizer(path):
                raise ModelNotFoundError(f"tokenizer source {source} has no tokenizer")
        out = load_tokenizer(path, label)  # as saved (not stripped), as mergekit loads it

    if tokens:
        have = out.get_vocab()
        missing = [t for t in tokens if t not in have]
        for t in missing:  # one at a time, in the order given (as mergekit)
            out.add_tokens(t)

    if chat_template is not None:
        out.chat_template = _resolve_chat_template(chat_template, models)

    vocab = out.get_vocab()
    n_tokens = len(vocab)
    if vocab and max(vocab.values()) >= n_tokens:
        logger.warning("output tokenizer ids have gaps (%d tokens, largest id %d); gap rows are zeros",
                       n_tokens, max(vocab.values()))
        n_tokens = max(vocab.values()) + 1
    vocab_size = n_tokens
    if pad_to_multiple_of and vocab_size % pad_to_multiple_of:
        vocab_size = math.ceil(vocab_size / pad_to_multiple_of) * pad_to_multiple_of

    ids = torch.tensor(list(vocab.values()), dtype=torch.long)
    index_maps = []
    for m in models:
        model_vocab = m.tokenizer.get_vocab()
        src = torch.tensor([model_vocab.get(t, -1) for t in vocab], dtype=torch.long)
        src[src >= m.rows] = -1  # a token beyond the model's rows is one it lacks
        imap = torch.full((vocab_size,), -1, dtype=torch.long)
        imap[ids] = src
        index_maps.append(imap)

    overrides = _token_overrides(tokens, models, vocab)
    plan = TokenizerPlan(tokenizer=out, vocab_size=vocab_size, n_tokens=n_tokens, index_maps=index_maps,
                         names=[m.label for m in models], source_rows=[m.rows for m in models],
                         overrides=overrides)
    logger.info("output tokenizer (%s): %d tokens, %d rows%s", source, n_tokens, vocab_size,
                "; vocabularies already aligned" if plan.is_identity else "")
    return plan


def tokenizer_with_chat_template(base_dir, model_dirs: Sequence, chat_template: str):
    """The base's tokenizer as saved, with ``chat_template`` set (a recipe's ``chat_template`` without a
    ``tokenizer_source``: mergekit 0.1.5 re-saves the base's tokenizer with the template). ``chat_template``
    takes the forms of `build_tokenizer`'s."""
    if not isinstance(chat_template, str) or not chat_template:
        raise ConfigError(f"chat_template must be a non-empty string, got {chat_template!r}")
    models = _load_models(base_dir, list(model_dirs))
    tok = _copy_tokenizer(load_tokenizer(models[0].path, models[0].label))
    tok.chat_template = _resolve_chat_template(chat_template, models)
    return tok


def _map_token_sources(tokens: dict | None, local) -> dict | None:
    if not tokens:
        return tokens
    out = {}
    for token, cfg in tokens.items():
        if isinstance(cfg, dict):
            cfg = dict(cfg)
            src = cfg.get("source")
            if isinstance(src, str):
                cfg["source"] = local(src)
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                cfg["source"] = {**src, "model": local(src["model"])}
        out[token] = cfg
    return out


def recipe_tokenizer(tokenizer: dict | None, chat_template: str | None, base_dir, model_dirs: Sequence,
                     local=None):
    """``(plan, output tokenizer)`` for a recipe's ``tokenizer_source`` / ``tokenizer:`` (``tokenizer``:
    ``{"source", "tokens", "pad_to_multiple_of"}`` as `llm_merging.merging.recipe.Recipe` holds it) and
    ``chat_template``. No tokenizer setting: no plan (mergekit re-indexes nothing), and the base's
    tokenizer with the template when ``chat_template`` is set, else ``(None, None)``.
    ``local(ref)`` maps a model reference of the recipe to its local directory (default: as given)."""
    local = local or (lambda ref: ref)
    if tokenizer is None:
        if not chat_template:
            return None, None
        return None, tokenizer_with_chat_template(base_dir, model_dirs, local(chat_template))
    source = tokenizer.get("source") or "union"
    if source not in ("union", "base"):
        source = local(source)
    plan = build_tokenizer(base_dir, model_dirs, source, _map_token_sources(tokenizer.get("tokens"), local),
                           tokenizer.get("pad_to_multiple_of"), local(chat_template) if chat_template else None)
    return plan, plan.tokenizer


NO_TOKENIZER_NOTE = ("vocabularies differ and the recipe sets no tokenizer_source: the merge keeps the base's "
                     "tokenizer and rows; rows beyond an expert's vocabulary keep the base's values and an expert's "
                     "rows beyond the base's are dropped (set tokenizer_source: union to merge the vocabularies)")


def vocabulary_report(plan: TokenizerPlan | None, experts: Sequence, source=None, stats: dict | None = None):
    """What report.json says about the vocabulary: the output tokenizer of ``plan`` (and the tensors
    re-indexed, from the engine's ``stats``), or, without a plan, the experts' vocabulary mismatches
    (``FullExpert.vocab_mismatch``) and what was done about them; None when there is nothing to say."""
    mismatch = {}
    for e in experts:
        vm = getattr(e, "vocab_mismatch", None) or {}
        if vm:
            mismatch[getattr(e, "name", str(e))] = {p: {"base_rows": int(b), "expert_rows": int(r)}
                                                    for p, (b, r) in vm.items()}
    if plan is None:
        if not mismatch:
            return None
        return {"mismatch": mismatch, "tokenizer_source": None, "note": NO_TOKENIZER_NOTE}
    out = {"tokenizer_source": str(source) if source is not None else None, "rows": plan.vocab_size,
           "tokens": plan.n_tokens, "base_rows": plan.source_rows[0],
           "model_rows": dict(zip(plan.names, plan.source_rows)), "identity": plan.is_identity,
           "re_indexed": list((stats or {}).get("tensors", []))}
    return out
