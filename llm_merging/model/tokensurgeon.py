"""Tokenizer transplant: a model re-indexed to another model's tokenizer (mergekit 0.1.5's ``tokensurgeon``).

``transplant(MODEL, DONOR, OUT)`` writes OUT = MODEL with DONOR's tokenizer. Every vocabulary matrix of MODEL
(its input embeddings and, when untied, its LM head) is rebuilt in DONOR's token order:

* a donor token MODEL also has keeps MODEL's row exactly. Tokens are compared after mergekit's
  normalisation (`normalized_vocabulary`): a word-start marker (``Ġ`` for GPT-2-style tokenizers, ``▁`` for
  SentencePiece-style ones) is removed and remembered, so ``Ġthe`` and ``▁the`` are the same token, and a
  special token is known by its role (the ``bos_token`` of one is the ``bos_token`` of the other, whatever
  their text). Optionally (``byte_match``) a one-character token matches a ``<0xNN>`` byte token and back,
  and (``prefix_match``) a token takes the row of its longest prefix MODEL has;
* every other donor token gets a row *approximated* from the tokens both tokenizers share (``method``):

  - ``omp`` (the default): orthogonal matching pursuit in DONOR's embedding space picks ``k`` shared tokens
    and least-squares coefficients that best rebuild the donor row of the new token; the same coefficients
    applied to MODEL's rows of those ``k`` tokens give its new row (`omp`, `combine`);
  - ``common_interpolation``: the ``k`` shared tokens nearest the new token in DONOR's space (Euclidean, or
    cosine with ``cosine_similarity``), weighted by ``weight_scheme`` (`common_interpolation`):
    ``distance_proportional`` (inverse distance, or similarity, normalised to sum 1), ``barycentric``
    (least squares with weights summing to 1) or ``least_squares``;
  - ``subword``: MODEL's tokenizer splits the token's text and the rows of the pieces are combined
    (``subword_method``: ``mean``, ``sum``, ``weighted_mean`` (later pieces weigh more in the input
    embeddings, earlier ones in the LM head), ``first_last`` (the last piece's row for the input embeddings,
    the first's for the LM head));
  - ``mean`` (the mean of all MODEL's rows) or ``zero``.

  ``omp`` and ``common_interpolation`` need DONOR's weights (its embedding matrices); the other methods
  need only its tokenizer. A tied DONOR's input embeddings stand for its LM head.

The config's ``vocab_size`` becomes the donor tokenizer's size and its special token ids (``bos``, ``eos``,
``pad``, ``unk``, ``mask``) DONOR's; the generation config's ids too. Everything else is MODEL's, copied tensor
by tensor (`transplant` streams: at most one vocabulary matrix of each model is in memory at a time).

Where this differs from mergekit 0.1.5 (by design): additional special tokens (a list-valued role) are matched
by their text (mergekit gives them all one key, so all but one of their rows stay zero); a tokenizer of a
class mergekit does not know has its word-start marker read from its pre-tokenizer (mergekit assumes ``Ġ``);
``prefix_match``/``byte_match`` ``embed`` applies to the input embeddings and ``lm_head`` to the LM head
(mergekit 0.1.5 swaps the two); ``weighted_mean`` weighs the last piece most in the input embeddings, as
``first_last`` picks it (mergekit 0.1.5's code weighs the first most there, against its own comment); new
tokens are approximated in donor id order (results do not depend on it); OMP solves its least-squares steps on
the Gram matrix in float64 instead of an incremental QR in float32 (the same selections and coefficients up to
rounding).
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from llm_merging.core.devices import check_device
from llm_merging.core.errors import (
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    first_line,
)
from llm_merging.core.io import check_new_dir
from llm_merging.model import auto_model_class
from llm_merging.model.checkpoint import CheckpointReader, match_names, shape_str
from llm_merging.model.refs import resolve_ref
from llm_merging.model.save import NotStreamable, StreamingSave
from llm_merging.model.tokenizer_union import (
    TokenSource,
    align_rows,
    has_tokenizer,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

METHODS = ("omp", "common_interpolation", "subword", "mean", "zero")
#: methods that read DONOR's embedding matrices
DONOR_WEIGHT_METHODS = ("omp", "common_interpolation")
WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")
SUBWORD_METHODS = ("mean", "sum", "weighted_mean", "first_last")
#: ``prefix_match`` / ``byte_match``: where a match is allowed
MATCH_SCOPES = ("no", "yes", "embed", "lm_head")
DEFAULT_K = 64
DEFAULT_BATCH_SIZE = 512
#: config keys taken from DONOR (mergekit's list)
TOKEN_ID_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "mask_token_id", "padding_side")

WORD_START = "word_start"
SPECIAL = "special"
#: a token after normalisation: its text, or (WORD_START, text without the marker), or (SPECIAL, role)
NormToken = Union[str, tuple]

_GPT2_STYLE = {"GPT2Tokenizer", "GPT2TokenizerFast", "OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast",
               "Qwen2Tokenizer", "Qwen2TokenizerFast"}
_SP_STYLE = {"LlamaTokenizer", "LlamaTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "GemmaTokenizer",
             "GemmaTokenizerFast"}


# --------------------------------------------------------------------------------------------------------
# token normalisation and matching
# --------------------------------------------------------------------------------------------------------
def word_start_marker(tokenizer) -> str:
    """The character a tokenizer puts in front of a word's first piece: ``Ġ`` (byte-level BPE, GPT-2 style)
    or ``▁`` (SentencePiece style). Known classes as mergekit decides (a SentencePiece-style class with a
    ``Ġhello`` token is byte-level); other classes from their pre-tokenizer/normaliser (``▁`` when it inserts
    one), else ``Ġ``."""
    names = {c.__name__ for c in type(tokenizer).__mro__}
    if names & _GPT2_STYLE:
        return "Ġ"
    if names & _SP_STYLE:
        return "Ġ" if "Ġhello" in tokenizer.get_vocab() else "▁"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # pragma: no cover - a backend that cannot describe itself
            spec = {}
        text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
        if "▁" in text:
            return "▁"
    return "Ġ"


def special_roles(tokenizer) -> dict[str, str]:
    """Special token text -> its role (``bos_token`` ...), single-token roles only, first role first."""
    roles: dict[str, str] = {}
    for role, value in (getattr(tokenizer, "special_tokens_map", None) or {}).items():
        if isinstance(value, str):
            roles.setdefault(value, role)
    return roles


def normalize_token(token: str, roles: dict[str, str], marker: str) -> NormToken:
    """mergekit's normal form of a token: ``(WORD_START, rest)`` when it starts with ``marker``, else
    ``(SPECIAL, role)`` for a special token, else the text itself."""
    if token.startswith(marker):
        return (WORD_START, token[len(marker):])
    role = roles.get(token)
    return (SPECIAL, role) if role is not None else token


def token_text(token: NormToken) -> str:
    """The text a normalised token stands for (a word start as a leading space; a special token: its role)."""
    if isinstance(token, tuple):
        return (" " + token[1]) if token[0] == WORD_START else token[1]
    return token


def normalized_vocabulary(tokenizer) -> dict[NormToken, int]:
    """Normalised token -> id for every token of ``tokenizer`` (`normalize_token`); on a clash the lower id."""
    marker = word_start_marker(tokenizer)
    roles = special_roles(tokenizer)
    out: dict[NormToken, int] = {}
    for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        out.setdefault(normalize_token(tok, roles, marker), idx)
    return out


def byte_match(token: NormToken, vocab: dict[NormToken, int]) -> int | None:
    """The id in ``vocab`` of the byte token ``<0xNN>`` for a one-character token (code point < 256), or of
    the character for a byte token; None when there is none."""
    if not isinstance(token, str):
        return None
    if len(token) == 1 and ord(token) < 256:
        return vocab.get(f"<0x{ord(token):02X}>")
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return vocab.get(chr(int(token[3:5], 16)))
        except ValueError:
            return None
    return None


def prefix_match(token: NormToken, vocab: dict[NormToken, int]) -> int | None:
    """The id in ``vocab`` of the longest proper prefix of ``token`` (same word-start marker; special tokens
    and prefixes that are only white space never match); None when there is none."""
    marker = None
    if isinstance(token, tuple):
        marker, token = token
        if marker == SPECIAL:
            return None
    for end in range(len(token) - 1, 0, -1):
        prefix = token[:end]
        if not prefix.strip():
            return None
        hit = vocab.get((marker, prefix) if marker is not None else prefix)
        if hit is not None:
            return hit
    return None


@dataclass
class VocabMatch:
    """How one vocabulary matrix of MODEL maps onto the donor's vocabulary.

    ``index_map[j]``: MODEL's row for output row ``j`` (-1: none); ``new_tokens``/``new_ids``: donor-only tokens
    and their output rows (= donor ids), to approximate; ``shared_model``/``shared_donor``: MODEL's and DONOR's
    rows of the exactly shared tokens (the basis of the approximations), in donor id order."""

    rows: int
    index_map: torch.Tensor
    new_tokens: list
    new_ids: torch.Tensor
    shared_model: torch.Tensor
    shared_donor: torch.Tensor
    counts: dict[str, int] = field(default_factory=dict)


def match_vocabularies(model_vocab: dict[NormToken, int], donor_vocab: dict[NormToken, int], model_rows: int,
                       donor_rows: int | None = None, *, allow_byte: bool = False,
                       allow_prefix: bool = False) -> VocabMatch:
    """Match the donor's tokens to MODEL's (exact normalised token, then byte token, then prefix when
    allowed); tokens whose id is >= a matrix's ``*_rows`` are left out of that side (a donor token beyond
    ``donor_rows`` gets a zero row, as in mergekit)."""
    rows = max(len(donor_vocab), max(donor_vocab.values()) + 1)
    model_vocab = {t: i for t, i in model_vocab.items() if i < model_rows}
    donor_rows = rows if donor_rows is None else donor_rows
    index_map = torch.full((rows,), -1, dtype=torch.long)
    counts = {"exact": 0, "byte": 0, "prefix": 0, "approximated": 0, "beyond_donor_rows": 0}
    new_tokens, new_ids, shared = [], [], []
    for tok, did in sorted(donor_vocab.items(), key=lambda kv: kv[1]):
        if did >= donor_rows:
            counts["beyond_donor_rows"] += 1
            continue
        mid = model_vocab.get(tok)
        if mid is not None:
            index_map[did] = mid
            shared.append((mid, did))
            counts["exact"] += 1
        elif allow_byte and (mid := byte_match(tok, model_vocab)) is not None:
            index_map[did] = mid
            counts["byte"] += 1
        elif allow_prefix and (mid := prefix_match(tok, model_vocab)) is not None:
            index_map[did] = mid
            counts["prefix"] += 1
        else:
            new_tokens.append(tok)
            new_ids.append(did)
            counts["approximated"] += 1
    shared_t = torch.tensor(shared, dtype=torch.long).reshape(-1, 2)
    return VocabMatch(rows, index_map, new_tokens, torch.tensor(new_ids, dtype=torch.long), shared_t[:, 0],
                      shared_t[:, 1], counts)


# --------------------------------------------------------------------------------------------------------
# approximations (pure tensor math)
# --------------------------------------------------------------------------------------------------------
def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit, batched: for each row of ``targets`` (B, D) pick ``k`` rows of ``atoms``
    (N, D) one at a time (the unpicked atom whose inner product with the current residual is largest in
    absolute value), each time refitting the least-squares coefficients of all picked atoms. Returns the
    picked atom indices (B, k) in the order picked and their final coefficients (B, k, float32)."""
    n, d = atoms.shape
    b = targets.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot pick k={k} of {n} atoms")
    x = targets.to(torch.float32)
    a = atoms.to(device=x.device, dtype=torch.float32)
    picked = torch.zeros((b, k), dtype=torch.long, device=x.device)
    used = torch.zeros((b, n), dtype=torch.bool, device=x.device)
    chosen = torch.empty((b, k, d), dtype=torch.float32, device=x.device)
    gram_s = torch.zeros((b, k, k), dtype=torch.float64, device=x.device)
    rhs = torch.zeros((b, k), dtype=torch.float64, device=x.device)
    batch = torch.arange(b, device=x.device)
    residual = x
    coef = torch.zeros((b, 0), dtype=torch.float64, device=x.device)
    for t in range(k):
        score = (residual @ a.T).abs_()
        score.masked_fill_(used, -math.inf)
        j = score.argmax(dim=1)
        del score
        picked[:, t] = j
        used[batch, j] = True
        atom = a.index_select(0, j)
        chosen[:, t] = atom
        g = torch.bmm(chosen[:, :t + 1], atom.unsqueeze(-1)).squeeze(-1).double()
        gram_s[:, t, :t + 1] = g
        gram_s[:, :t + 1, t] = g
        rhs[:, t] = (atom * x).sum(dim=1).double()
        coef = _solve_spd(gram_s[:, :t + 1, :t + 1], rhs[:, :t + 1])
        residual = x - torch.bmm(coef.float().unsqueeze(1), chosen[:, :t + 1]).squeeze(1)
    return picked, coef.float()


def _solve_spd(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Solve the batched normal equations ``g c = r`` (a singular system: its minimum-norm solution)."""
    sol, info = torch.linalg.solve_ex(g, r.unsqueeze(-1))
    sol = sol.squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=1)
    if bad.any():
        sol[bad] = (torch.linalg.pinv(g[bad]) @ r[bad].unsqueeze(-1)).squeeze(-1)
    return sol


def common_interpolation(targets: torch.Tensor, atoms: torch.Tensor, k: int, *, cosine: bool = False,
                         weight_scheme: str = "distance_proportional") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` atoms nearest each target (Euclidean distance, or 1 - cosine similarity) and their weights:
    ``distance_proportional`` (1/distance, or the similarity, normalised to sum 1), ``barycentric``
    (least squares under sum 1) or ``least_squares``. Returns indices (B, k) and weights (B, k, float32)."""
    if weight_scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown weight scheme {weight_scheme!r}")
    n = atoms.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot pick k={k} of {n} atoms")
    x = targets.to(torch.float32)
    a = atoms.to(device=x.device, dtype=torch.float32)
    if cosine:
        norms = x.norm(dim=1, keepdim=True) * a.norm(dim=1).unsqueeze(0)
        dist = 1 - (x @ a.T) / norms.clamp_min(1e-6)
    else:
        dist = torch.cdist(x, a)
    near, idx = torch.topk(dist, k, dim=1, largest=False)
    del dist
    if weight_scheme == "distance_proportional":
        w = (1 - near) if cosine else 1 / near.clamp_min(1e-6)
        return idx, w / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
    pts = a[idx].double()  # (B, k, D)
    xt = x.double()
    if weight_scheme == "least_squares":
        w = torch.linalg.lstsq(pts.transpose(1, 2), xt.unsqueeze(-1)).solution.squeeze(-1)
        return idx, w.float()
    # barycentric: minimise |sum_i w_i p_i - x|^2 subject to sum_i w_i = 1 (the KKT system, least squares)
    bsz = xt.shape[0]
    kkt = torch.zeros((bsz, k + 1, k + 1), dtype=torch.float64, device=x.device)
    kkt[:, :k, :k] = torch.bmm(pts, pts.transpose(1, 2))
    kkt[:, :k, k] = 1
    kkt[:, k, :k] = 1
    rhs = torch.ones((bsz, k + 1, 1), dtype=torch.float64, device=x.device)
    rhs[:, :k, 0] = torch.bmm(pts, xt.unsqueeze(-1)).squeeze(-1)
    w = torch.linalg.lstsq(kkt, rhs).solution.squeeze(-1)[:, :k]
    return idx, w.float()


def combine(indices: torch.Tensor, coefficients: torch.Tensor, rows: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``sum_i coefficients[b, i] * rows[indices[b, i]]`` for each b (float32), ``chunk`` targets at a time
    (the picked rows of a chunk are all that is gathered)."""
    rows = rows.to(device=coefficients.device)
    out = torch.empty((indices.shape[0], rows.shape[1]), dtype=torch.float32, device=coefficients.device)
    for s in range(0, indices.shape[0], chunk):
        idx = indices[s:s + chunk]
        picked = rows.index_select(0, idx.reshape(-1)).to(torch.float32).reshape(*idx.shape, rows.shape[1])
        out[s:s + chunk] = torch.bmm(coefficients[s:s + chunk].to(torch.float32).unsqueeze(1), picked).squeeze(1)
    return out


def subword_rows(rows: torch.Tensor, pieces: Sequence[Sequence[int]], method: str = "mean",
                 is_lm_head: bool = False) -> torch.Tensor:
    """One row per token from the rows of its pieces (``pieces[i]``: MODEL's ids of token i's text):
    ``mean``, ``sum``, ``weighted_mean`` (weights 1..n, the largest on the last piece for the input
    embeddings, on the first for the LM head) or ``first_last`` (the last piece, or the first for the LM
    head). A token with no pieces gets zeros. float32."""
    if method not in SUBWORD_METHODS:
        raise ValueError(f"unknown subword method {method!r}")
    out = torch.zeros((len(pieces), rows.shape[1]), dtype=torch.float32)
    for i, ids in enumerate(pieces):
        ids = [int(t) for t in ids if 0 <= int(t) < rows.shape[0]]
        if not ids:
            continue
        r = rows[ids].to(torch.float32)
        if method == "sum":
            out[i] = r.sum(dim=0)
        elif method == "mean":
            out[i] = r.mean(dim=0)
        elif method == "weighted_mean":
            w = torch.arange(1, len(ids) + 1, dtype=torch.float32)
            if is_lm_head:
                w = w.flip(0)
            out[i] = (w.unsqueeze(1) * r).sum(dim=0) / w.sum()
        else:
            out[i] = r[0] if is_lm_head else r[-1]
    return out


@dataclass
class Options:
    """The approximation settings (mergekit-tokensurgeon's flags)."""

    method: str = "omp"
    k: int = DEFAULT_K
    cosine_similarity: bool = False
    weight_scheme: str = "distance_proportional"
    subword_method: str = "mean"
    batch_size: int = DEFAULT_BATCH_SIZE
    prefix_match: str = "no"
    byte_match: str = "no"
    new_vocab_scale: float | None = None
    #: where approximations are computed: ``cpu``, ``cuda[:N]`` or ``auto`` (the GPU when there is one)
    device: str = "cpu"

    def check(self) -> None:
        """One-line `ConfigError` for a bad setting."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown approximation method {self.method!r} (choose from {', '.join(METHODS)})")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise ConfigError(f"-k must be a positive integer, got {self.k!r}")
        if self.weight_scheme not in WEIGHT_SCHEMES:
            raise ConfigError(f"unknown weight scheme {self.weight_scheme!r} (choose from {', '.join(WEIGHT_SCHEMES)})")
        if self.subword_method not in SUBWORD_METHODS:
            raise ConfigError(f"unknown subword method {self.subword_method!r} "
                              f"(choose from {', '.join(SUBWORD_METHODS)})")
        for name in ("prefix_match", "byte_match"):
            if getattr(self, name) not in MATCH_SCOPES:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(MATCH_SCOPES)}, "
                                  f"got {getattr(self, name)!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool):
            raise ConfigError(f"--batch-size must be an integer (0 or less: all at once), got {self.batch_size!r}")
        scale = self.new_vocab_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ConfigError(f"--new-vocab-scale must be a finite positive number, got {scale!r}")
        check_device(str(self.device))

    def torch_device(self) -> torch.device:
        """``device`` as a torch device (``auto``: the GPU when there is one, else the CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def allows(self, which: str, is_lm_head: bool) -> bool:
        scope = getattr(self, which)
        return scope == "yes" or scope == ("lm_head" if is_lm_head else "embed")


def approximate_rows(model_rows: torch.Tensor, donor_rows: torch.Tensor | None, match: VocabMatch,
                     options: Options, *, tokenizer=None, is_lm_head: bool = False,
                     progress: bool = False) -> torch.Tensor:
    """MODEL's new rows for ``match.new_tokens`` (in that order, float32) by ``options.method``.
    ``donor_rows``: DONOR's matrix (``omp``, ``common_interpolation``); ``tokenizer``: MODEL's (``subword``)."""
    n_new, hidden = len(match.new_tokens), model_rows.shape[1]
    if n_new == 0:
        return torch.zeros((0, hidden), dtype=torch.float32)
    method = options.method
    if method == "zero":
        return torch.zeros((n_new, hidden), dtype=torch.float32)
    if method == "mean":
        return model_rows.to(torch.float32).mean(dim=0).expand(n_new, hidden).clone()
    if method == "subword":
        if tokenizer is None:
            raise ValueError("the subword method needs MODEL's tokenizer")
        texts = [token_text(t) for t in match.new_tokens]
        pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return subword_rows(model_rows, pieces, options.subword_method, is_lm_head)
    if donor_rows is None:
        raise ValueError(f"the {method} method needs DONOR's embedding matrix")
    device = options.torch_device()
    atoms = donor_rows.index_select(0, match.shared_donor).to(device=device, dtype=torch.float32)
    basis = model_rows.index_select(0, match.shared_model).to(device=device)
    targets_all = donor_rows.index_select(0, match.new_ids)
    step = n_new if options.batch_size <= 0 else options.batch_size
    out = torch.empty((n_new, hidden), dtype=torch.float32)
    for s in tqdm(range(0, n_new, step), desc=f"approximating {n_new} tokens ({method})", unit="batch",
                  disable=not progress or n_new <= step):
        targets = targets_all[s:s + step].to(device=device, dtype=torch.float32)
        if method == "omp":
            idx, coef = omp(targets, atoms, options.k)
        else:
            idx, coef = common_interpolation(targets, atoms, options.k, cosine=options.cosine_similarity,
                                             weight_scheme=options.weight_scheme)
        out[s:s + step] = combine(idx, coef, basis).cpu()
    return out


def build_matrix(model_rows: torch.Tensor, donor_rows: torch.Tensor | None, match: VocabMatch,
                 options: Options, *, tokenizer=None, is_lm_head: bool = False, progress: bool = False,
                 name: str = "matrix") -> torch.Tensor:
    """MODEL's vocabulary matrix ``model_rows`` (V, H) rebuilt in the donor's order (``match.rows``, H), in
    its dtype: matched rows copied exactly, new rows approximated (`approximate_rows`), the rest zeros."""
    zero = TokenSource("zero")
    overrides = {int(j): zero for j in (match.index_map < 0).nonzero().flatten().tolist()}
    out = align_rows([model_rows], [match.index_map], match.rows, base=0, overrides=overrides, names=[name])[0]
    new = approximate_rows(model_rows, donor_rows, match, options, tokenizer=tokenizer, is_lm_head=is_lm_head,
                           progress=progress)
    if options.new_vocab_scale is not None:
        new = new * options.new_vocab_scale
    if len(match.new_ids):
        out[match.new_ids] = new.to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------------
# models: where the embeddings are
# --------------------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One model of the transplant: its directory, tokenizer, normalised vocabulary and, with weights, its
    reader and the checkpoint keys of its input embeddings and (untied) LM head."""

    label: str
    path: Path
    tokenizer: Any
    vocab: dict
    config: Any = None
    reader: CheckpointReader | None = None
    key_of: dict[str, str] = field(default_factory=dict)  # model parameter name -> checkpoint key
    embed_param: str | None = None
    head_param: str | None = None  # None: tied to the input embeddings
    embed_key: str | None = None
    head_key: str | None = None

    def matrix(self, is_lm_head: bool) -> torch.Tensor:
        key = self.head_key if is_lm_head and self.head_key is not None else self.embed_key
        return self.reader.get(key)


def _meta_model(config, dtype: torch.dtype | None = None):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return auto_model_class("decoder").from_config(config, **kwargs)


def _param_name(model, module) -> str | None:
    for name, mod in model.named_modules():
        if mod is module:
            return f"{name}.weight" if name else "weight"
    return None


def _open_side(ref: str, path: Path, label: str, need_weights: bool) -> Side:
    """``ref`` (resolved to ``path``) as one side of the transplant, ``label`` (``MODEL``/``DONOR``) naming it in
    errors; ``need_weights``: its config, checkpoint and embedding keys are read too."""
    if not has_tokenizer(path):
        raise ModelNotFoundError(f"{label} {ref} has no tokenizer (looked for tokenizer.json, tokenizer_config.json, "
                                 "tokenizer.model, vocab.json ...)")
    tok = load_tokenizer(path, f"{label} {ref}")
    side = Side(label=f"{label} {ref}", path=path, tokenizer=tok, vocab=normalized_vocabulary(tok))
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        try:
            side.config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelNotFoundError(f"cannot read the config of {side.label}: {first_line(exc)}") from None
    if not need_weights:
        return side
    if side.config is None:
        raise ModelNotFoundError(f"{side.label} has no config.json (its weights are needed)")
    if getattr(side.config, "is_encoder_decoder", False):
        raise ConfigError(f"{side.label} is an encoder-decoder model; tokensurgeon handles decoder-only models")
    side.reader = CheckpointReader(path)
    try:
        model = _meta_model(side.config)
    except Exception as exc:
        raise ModelNotFoundError(f"{side.label}: cannot build its model from config.json "
                                 f"({first_line(exc)})") from None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    side.embed_param = _param_name(model, emb) if isinstance(emb, torch.nn.Module) else None
    state = model.state_dict()
    side.key_of = {v: k for k, v in match_names(side.reader.keys(), state.keys()).items()}
    side.embed_key = side.key_of.get(side.embed_param) if side.embed_param else None
    if side.embed_key is None:
        raise CheckpointError(f"{side.label}: no input embeddings found in its checkpoint "
                              f"(expected '{side.embed_param or 'an embedding matrix'}')")
    if isinstance(head, torch.nn.Module) and getattr(head, "weight", None) is not None \
            and head.weight is not emb.weight:
        side.head_param = _param_name(model, head)
        side.head_key = side.key_of.get(side.head_param)
        if side.head_key is None:
            raise CheckpointError(f"{side.label}: its LM head '{side.head_param}' is not in its checkpoint "
                                  "and the model does not tie it to the input embeddings")
    for key in (side.embed_key, side.head_key):
        if key is not None and len(side.reader.shape(key)) != 2:
            raise CheckpointError(f"{side.label}: '{key}' has shape {shape_str(side.reader.shape(key))}, "
                                  "not a (vocabulary, hidden) matrix")
    return side


# --------------------------------------------------------------------------------------------------------
# the transplant
# --------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything checked before a weight is read: both models, the output, the matches."""

    model: Side
    donor: Side
    out: Path
    options: Options
    rows: int
    matches: dict[str, VocabMatch]  # "embed" and, when MODEL's LM head is untied, "lm_head"


def plan_transplant(model: str, donor: str, out: str, options: Options | None = None) -> Plan:
    """Check the inputs (models, tokenizers, embeddings, options, output directory) and match the
    vocabularies; reads checkpoint headers and tokenizers only. One-line `LLMMergingError`s."""
    options = options or Options()
    options.check()
    _, model_dir = resolve_ref(str(model), "MODEL")
    _, donor_dir = resolve_ref(str(donor), "DONOR")
    out_path = check_new_dir(Path(out).expanduser(), "OUT", inputs=(model_dir, donor_dir))
    m = _open_side(str(model), model_dir, "MODEL", need_weights=True)
    d = _open_side(str(donor), donor_dir, "DONOR", need_weights=options.method in DONOR_WEIGHT_METHODS)
    matches: dict[str, VocabMatch] = {}
    for which, key in (("embed", m.embed_key), ("lm_head", m.head_key)):
        if key is None:
            continue
        is_head = which == "lm_head"
        model_rows = m.reader.shape(key)[0]
        donor_rows = None
        if d.reader is not None:
            donor_rows = d.reader.shape(d.head_key if is_head and d.head_key else d.embed_key)[0]
        matches[which] = match_vocabularies(m.vocab, d.vocab, model_rows, donor_rows,
                                            allow_byte=options.allows("byte_match", is_head),
                                            allow_prefix=options.allows("prefix_match", is_head))
    rows = matches["embed"].rows
    if options.method in DONOR_WEIGHT_METHODS:
        shared = min(len(x.shared_model) for x in matches.values())
        if any(x.new_tokens for x in matches.values()) and options.k > shared:
            raise ConfigError(f"-k {options.k} is more than the {shared} tokens the two tokenizers share "
                              f"(the {options.method} method picks k of them)")
    return Plan(m, d, out_path, options, rows, matches)


def _new_config(plan: Plan):
    cfg = plan.model.config
    cfg = type(cfg).from_dict(cfg.to_dict())
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.vocab_size = plan.rows
    if text is not cfg and hasattr(cfg, "vocab_size"):
        cfg.vocab_size = plan.rows
    if plan.donor.config is not None:
        for key in TOKEN_ID_KEYS:
            if hasattr(plan.donor.config, key):
                setattr(cfg, key, getattr(plan.donor.config, key))
    else:  # a tokenizer alone: its special token ids
        tok = plan.donor.tokenizer
        for key in TOKEN_ID_KEYS[:5]:
            if hasattr(cfg, key):
                setattr(cfg, key, getattr(tok, key, None))
    return cfg


def _generation_config(plan: Plan, cfg):
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(plan.model.path), local_files_only=True)
    except Exception:
        gen = GenerationConfig.from_model_config(cfg)
    donor_gen = None
    try:
        if (plan.donor.path / "generation_config.json").is_file():
            donor_gen = GenerationConfig.from_pretrained(str(plan.donor.path), local_files_only=True)
    except Exception:
        donor_gen = None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(donor_gen, key, None) if donor_gen is not None else None
        setattr(gen, key, value if value is not None else getattr(cfg, key, None))
    return gen


def transplant(model: str, donor: str, out: str, options: Options | None = None, *, progress: bool = True,
               plan: Plan | None = None) -> dict[str, Any]:
    """Write ``out`` = ``model`` with ``donor``'s tokenizer (module docstring); returns what was done
    (token counts per matrix, output rows, seconds). The output is written under a temporary name and
    renamed into place when complete."""
    import time

    t0 = time.perf_counter()
    plan = plan or plan_transplant(model, donor, out, options)
    options = plan.options
    m, d = plan.model, plan.donor
    cfg = _new_config(plan)
    dtype = _stored_dtype(m.reader, m.embed_key)
    try:
        out_model = _meta_model(cfg, dtype=dtype)
    except Exception as exc:
        raise CheckpointError(f"{m.label}: cannot build the output model ({first_line(exc)})") from None
    out_model.generation_config = _generation_config(plan, cfg)
    state_shapes = {n: tuple(t.shape) for n, t in out_model.state_dict().items()}
    try:
        writer = StreamingSave(out_model, plan.out)
    except NotStreamable as exc:
        raise CheckpointError(f"{m.label}: its weights cannot be written tensor by tensor ({exc})") from None
    report: dict[str, Any] = {"rows": plan.rows, "method": options.method, "matrices": {}}
    try:
        missing = [n for n in writer.source if n not in m.key_of]
        if missing:
            raise CheckpointError(f"{m.label}: tensor(s) {', '.join(missing[:5])} of the model are not in its "
                                  "checkpoint")
        targets = {m.embed_param: ("embed", False)}
        if m.head_param is not None:
            targets[m.head_param] = ("lm_head", True)
        for param, (which, is_head) in targets.items():
            name = writer.alias.get(param, param)
            match = plan.matches[which]
            donor_rows = d.matrix(is_head) if d.reader is not None else None
            logger.info("%s: %s", param, ", ".join(f"{v} {k}" for k, v in match.counts.items() if v))
            new = build_matrix(m.matrix(is_head), donor_rows, match, options, tokenizer=m.tokenizer,
                               is_lm_head=is_head, progress=progress, name=m.label)
            del donor_rows
            writer.put(name, 0, new)
            report["matrices"][param] = dict(match.counts)
            del new
        done = {writer.alias.get(p, p) for p in targets}
        rest = [n for n in writer.source if n not in done]
        for name in tqdm(rest, desc="copying tensors", unit="tensor", disable=not progress):
            key = m.key_of[name]
            t = m.reader.get(key)
            want = state_shapes[name]
            if tuple(t.shape) != want:
                t = _remap_auxiliary(t, want, plan.matches["embed"], name, m.label)
            writer.put(name, 0, t)
            del t
        writer.finish(d.tokenizer, {"tokensurgeon": {"model": str(model), "donor": str(donor),
                                                      "method": options.method, "k": options.k}})
    except BaseException as exc:
        writer.abort(exc)
        raise
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["output"] = str(plan.out)
    return report


def _stored_dtype(reader: CheckpointReader, key: str) -> torch.dtype:
    return reader.get_range(key, 0, 0).dtype if reader.range_readable(key) else reader.get(key).dtype


def _remap_auxiliary(t: torch.Tensor, want: tuple, match: VocabMatch, name: str, label: str) -> torch.Tensor:
    """A tensor with a vocabulary axis first (an LM head bias ...) re-indexed: exactly shared tokens keep
    their entries, the others are zeros (mergekit)."""
    if t.ndim != len(want) or tuple(t.shape[1:]) != tuple(want[1:]) or want[0] != match.rows:
        raise CheckpointError(f"{label}: '{name}' has shape {shape_str(t.shape)}, the output model needs "
                              f"{shape_str(want)}")
    out = torch.zeros(want, dtype=t.dtype)
    keep = match.shared_model < t.shape[0]
    out[match.shared_donor[keep]] = t[match.shared_model[keep]]
    return out
