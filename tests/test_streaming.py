"""Chunked merges (ops.streaming, the engine's chunked path) equal the whole-tensor ones bit for bit."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_merging import ops
from llm_merging.model import tiny
from llm_merging.merging.DareLinear import DareLinear
from llm_merging.merging.DareTies import DareTies
from llm_merging.merging.Linear import Linear
from llm_merging.merging.TaskArithmetic import TaskArithmetic
from llm_merging.merging.TiesMerge import TiesMerge
from llm_merging.model import engine
from llm_merging.ops import masks
from llm_merging.ops import streaming as st

W = [0.5, 0.3, 0.2]


def _fp16_task_vectors(shape, n=3, seed=0):
    """Task vectors of fp16 fine-tunes computed in fp32 (many exact ties in |τ|), one model with zeros."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).half().float()
    tvs = [(base + 0.01 * torch.randn(shape, generator=g)).half().float() - base for _ in range(n)]
    tvs[1][: shape[0] // 3] = 0.0
    return base, tvs


def _reader(base, tvs):
    fb, ft = base.reshape(-1), [t.reshape(-1) for t in tvs]
    return lambda s, e: (fb[s:e], [t[s:e] for t in ft])


def _run(chunks, n):
    out = torch.full((n,), float("nan"))
    for s, e, m in chunks:
        out[s:e] = m
    return out


SMALL_BLOCK = 256
CHUNKS = (SMALL_BLOCK, 3 * SMALL_BLOCK, 1 << 22)
SHAPE = (40, 251)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 256 entries, so that small tensors span many chunks (the real BLOCK: see the last tests)."""
    monkeypatch.setattr(masks, "BLOCK", SMALL_BLOCK)
    monkeypatch.setattr(st, "BLOCK", SMALL_BLOCK)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kwargs", [
    {},
    {"keep_count": "floor", "weighted_sign": True, "divisor": "weight_sum"},
    {"sign_method": "frequency", "divisor": None},
])
def test_ties_chunks_equal_ties(chunk, kwargs):
    base, tvs = _fp16_task_vectors(SHAPE)
    n = base.numel()
    dens = [0.5, 0.13, 1.0]
    ref = ops.ties(tvs, density=dens, weights=W, scale=0.9, **kwargs)
    kc = kwargs.pop("keep_count", "round")
    got = _run(st.ties_chunks(_reader(base, tvs), n, dens, W, 0.9, n_models=3, keep_count_mode=kc, chunk=chunk,
                              **kwargs), n)
    assert torch.equal(got, ref.reshape(-1))


@pytest.mark.parametrize("chunk", CHUNKS[:2])
def test_magnitude_prune_chunks_equal_magnitude_prune(chunk):
    base, tvs = _fp16_task_vectors(SHAPE, seed=1)
    n = base.numel()
    ref = ops.magnitude_prune(tvs, [0.3, 0.6, 0.05], W)
    got = _run(st.magnitude_prune_chunks(_reader(base, tvs), n, [0.3, 0.6, 0.05], W, n_models=3, chunk=chunk), n)
    assert torch.equal(got, ref.reshape(-1))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("rescale", ["inverse", "l1", None])
@pytest.mark.parametrize("consensus", [None, "ties"])
def test_dare_chunks_equal_dare(chunk, rescale, consensus):
    base, tvs = _fp16_task_vectors(SHAPE, seed=2)
    n = base.numel()
    dens = [0.5, 0.3, 1.0]
    extra = {"weighted_sign": True, "divisor": None} if consensus else {}
    ref = ops.dare(tvs, dens, W, 1.1, consensus, rescale, seed=11, **extra)
    got = _run(st.dare_chunks(_reader(base, tvs), n, dens, W, 1.1, consensus, rescale, 11, n_models=3, chunk=chunk,
                              **extra), n)
    assert torch.equal(got, ref.reshape(-1))


def test_thresholds_are_the_exact_kth_largest():
    base, tvs = _fp16_task_vectors(SHAPE, seed=3)
    n = base.numel()
    a = tvs[0].reshape(-1).abs()
    for k in (1, 2, 777, n // 2, n - 1):
        t, need = st.magnitude_thresholds(_reader(base, tvs), n, [k, n, n + 5], chunk=SMALL_BLOCK)[0]
        kth = torch.kthvalue(a, n - k + 1).values.item()
        assert t == kth and need == k - int((a > kth).sum()) and need >= 1
    assert st.magnitude_thresholds(_reader(base, tvs), n, [n, n, n])[1:] == [None, None]


def test_real_block_size_chunks_equal_whole_tensor(monkeypatch):
    monkeypatch.undo()  # the real BLOCK
    assert st.BLOCK == masks.BLOCK == 1 << 16
    base, tvs = _fp16_task_vectors((97, 2048), seed=4)
    n = base.numel()
    ref_t = ops.ties(tvs, density=0.4, weights=W)
    ref_d = ops.dare(tvs, 0.4, W, 1.0, "ties", "l1", seed=5)
    for chunk in (st.BLOCK, 2 * st.BLOCK):
        assert torch.equal(_run(st.ties_chunks(_reader(base, tvs), n, 0.4, W, n_models=3, chunk=chunk), n),
                           ref_t.reshape(-1))
        assert torch.equal(_run(st.dare_chunks(_reader(base, tvs), n, 0.4, W, 1.0, "ties", "l1", 5, n_models=3,
                                               chunk=chunk), n), ref_d.reshape(-1))


def test_l1_norm_blocks_do_not_depend_on_chunking():
    x = torch.randn(5 * st.BLOCK + 123)
    whole = masks.abs_sum64(x)
    parts = masks.abs_sum64(x[: 2 * st.BLOCK]) + masks.abs_sum64(x[2 * st.BLOCK:])
    assert whole == parts and len(whole) == 6
    assert abs(sum(whole) - float(x.double().abs().sum())) < 1e-9 * float(x.abs().sum())


def test_chunk_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple"):
        st.chunk_ranges(10, st.BLOCK + 1)


# ------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def fp16_models(tmp_path_factory):
    """The tiny base and three full fine-tunes saved in fp16 (ties at the top-k thresholds)."""
    root = tmp_path_factory.mktemp("fp16")
    paths = []
    for i, src in enumerate([tiny.base_dir("decoder")] + [tiny.full_expert_dir("decoder", i) for i in range(3)]):
        model = AutoModelForCausalLM.from_pretrained(str(src)).half()
        out = root / (f"expert{i - 1}" if i else "base")
        model.save_pretrained(str(out))
        tiny.build_tokenizer(out)
        paths.append(out)
    return paths[0], paths[1:]


def _merged(cls, base, experts, **hp):
    m = cls()
    m.base_model_name, m.list_models = str(base), [str(p) for p in experts]
    m.device, m.dtype, m.progress = "cpu", "float16", False
    m.set_hyperparameters(hp)
    m.merge()
    return m.merge_stats, {n: p.detach().clone() for n, p in m.base_model.named_parameters()}


CASES = [
    (TiesMerge, {"density": [0.5, 0.2, 0.7], "weights": W, "keep_count": "floor", "weighted_sign": True,
                 "divisor": "weight_sum"}),
    (DareTies, {"density": 0.5, "weights": W, "rescale": "l1", "weighted_sign": True, "divisor": "none"}),
    (DareLinear, {"density": [0.4, 0.6, 0.5], "divisor": "weight_sum"}),
    (Linear, {"weights": [1.0, 2.0, 0.5]}),
    (Linear, {"weights": W, "normalize": False}),
    (TaskArithmetic, {"weights": W, "scale": 0.8, "divisor": "weight_sum"}),
]


@pytest.mark.parametrize("cache", [0, 1 << 30])
@pytest.mark.parametrize("cls,hp", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)])
def test_engine_chunked_equals_whole_tensor(fp16_models, monkeypatch, cls, hp, cache):
    base, experts = fp16_models
    monkeypatch.setattr(engine, "CHUNK_CPU", 16 * SMALL_BLOCK)  # the tiny embedding spans several chunks
    monkeypatch.setattr(engine, "CACHE_BYTES", cache)
    stats, chunked = _merged(cls, base, experts, **hp)
    assert stats["tensors_chunked"] == stats["tensors_merged"] > 0
    with monkeypatch.context() as m:
        m.setattr(engine.RangeReader, "open", classmethod(lambda *a, **k: None))
        stats_whole, whole = _merged(cls, base, experts, **hp)
    assert stats_whole["tensors_chunked"] == 0
    assert chunked.keys() == whole.keys()
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name


def test_a_merge_tensor_override_is_not_bypassed(fp16_models):
    class Halved(TiesMerge):
        def merge_tensor(self, name, base, task_vectors):
            return 0.5 * super().merge_tensor(name, base, task_vectors)

    class HalvedLinear(Linear):
        def merge_tensor(self, name, base, task_vectors):
            return 0.5 * super().merge_tensor(name, base, task_vectors)

    base, experts = fp16_models
    for cls in (Halved, HalvedLinear):
        stats, _ = _merged(cls, base, experts)
        assert stats["tensors_chunked"] == 0 and stats["tensors_merged"] > 0


def test_lora_experts_take_the_whole_tensor_path():
    adapters = [tiny.lora_expert_dir("decoder", i) for i in range(2)]
    stats, _ = _merged(TiesMerge, tiny.base_dir("decoder"), adapters, density=0.5)
    # tensors an adapter touches cannot be read in ranges; none is chunked
    assert stats["tensors_chunked"] == 0 and stats["tensors_merged"] > 0
