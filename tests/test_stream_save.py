"""Writing the merged model while merging (``--no-eval --save full``): the same directory, byte for byte, as
merging in memory and saving with ``save_pretrained``; nothing left behind when the merge fails."""
import hashlib
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, T5Config, T5ForConditionalGeneration

from llm_merging.model import tiny
from llm_merging.main import main
from llm_merging.model.save import StreamingSave
from llm_merging.pipeline.phases import MergePhase


def _digests(directory, skip=("README.md",)):
    return {f: hashlib.sha256((directory / f).read_bytes()).hexdigest()
            for f in sorted(os.listdir(directory)) if f not in skip}


def _tiny_model(kind: str, tied: bool = False):
    torch.manual_seed(0)
    if kind == "t5":  # keeps its `wo` weights in float32: shards of mixed dtypes
        return T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=2, num_heads=4,
                                                   d_kv=8, decoder_start_token_id=0))
    if kind == "marian":  # has _keys_to_ignore_on_save (its sinusoidal positions), which save_pretrained drops
        from transformers import MarianConfig, MarianMTModel

        return MarianMTModel(MarianConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                          encoder_attention_heads=4, decoder_attention_heads=4,
                                          encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                          pad_token_id=0, decoder_start_token_id=0))
    if kind == "gpt2":
        return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4))
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied))


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("gpt2", True), ("t5", True),
                                       ("marian", True)])
@pytest.mark.parametrize("shard", ["20KB", "5GB"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_streamed_directory_equals_save_pretrained(tmp_path, kind, tied, shard, dtype):
    src = _tiny_model(kind, tied).to(torch.float16)
    src.save_pretrained(tmp_path / "src")
    model = type(src).from_pretrained(tmp_path / "src", dtype=torch.float16)  # loaded as the engine has it
    writer = StreamingSave(model, tmp_path / "streamed", dtype=dtype, max_shard_size=shard)
    # a merge writes some parameters in pieces, others whole; the writer adds the ones it left alone
    new = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if i % 3 == 2:
            continue
        value = (p.detach().float() + 0.5).to(p.dtype).reshape(-1)
        new[name] = value
        for s in range(0, value.numel(), 100):
            writer.put(name, s, value[s:s + 100].float())  # any dtype in: cast to the saved one
    assert writer.finish(None) == tmp_path / "streamed"
    for name, value in new.items():
        model.get_parameter(name).data = value.view(model.get_parameter(name).shape)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(tmp_path / "reference", max_shard_size=shard)
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "reference")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    """One pwrite writes at most ~2 GiB on Linux: a tensor past that must still be written whole."""
    model = _tiny_model("llama")
    model.save_pretrained(tmp_path / "reference")
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, memoryview(data).cast("B")[:100], offset))
    StreamingSave(model, tmp_path / "streamed").finish(None)
    monkeypatch.undo()
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "reference")


def test_incomplete_stream_is_refused_and_removed(tmp_path):
    model = _tiny_model("llama")
    writer = StreamingSave(model, tmp_path / "out")
    name, p = next(iter(model.named_parameters()))
    writer.put(name, 0, p.detach().reshape(-1)[:10])
    with pytest.raises(ValueError, match="bytes were written"):
        writer.finish(None)
    assert list(tmp_path.iterdir()) == []
    writer.abort()  # idempotent


def _run(out, args, monkeypatch=None, in_memory=False):
    if in_memory:
        monkeypatch.setattr(MergePhase, "streams_to_disk", lambda self, ctx: False)
    code = main([*args, "--quiet", "--no-eval", "--output_folder", str(out)])
    if in_memory:
        monkeypatch.undo()
    return code


FULL = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
LORA = [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]


@pytest.mark.parametrize("method,models,extra", [
    ("ties_merge", FULL, []),                          # chunked path
    ("dare_ties", FULL, ["--set", "density=0.6"]),     # chunked, random masks
    ("della", FULL, []),                               # whole-tensor path
    ("task_arithmetic", LORA, []),                     # LoRA experts: whole tensors from the factors
])
def test_cli_streamed_save_equals_in_memory_save(tmp_path, monkeypatch, method, models, extra):
    args = ["-m", method, "--base-model", str(tiny.base_dir("decoder")), "--models", *models, *extra]
    assert _run(tmp_path / "mem", args, monkeypatch, in_memory=True) == 0
    assert _run(tmp_path / "stream", args) == 0
    mem = json.loads((tmp_path / "mem" / method / "report.json").read_text())
    stream = json.loads((tmp_path / "stream" / method / "report.json").read_text())
    assert mem["saved"]["written_while_merging"] is False and stream["saved"]["written_while_merging"] is True
    assert _digests(tmp_path / "stream" / method / "merged_model") == _digests(tmp_path / "mem" / method / "merged_model")


def test_recipe_out_dtype_is_written_while_merging(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: ties\nbase_model: {}\nout_dtype: bfloat16\nparameters:\n  density: 0.5\n"
                      "models:\n".format(tiny.base_dir("decoder"))
                      + "".join(f"- model: {m}\n  parameters:\n    weight: 0.5\n" for m in FULL))
    assert _run(tmp_path / "mem", ["--recipe", str(recipe)], monkeypatch, in_memory=True) == 0
    assert _run(tmp_path / "stream", ["--recipe", str(recipe)]) == 0
    [mem] = (tmp_path / "mem").glob("*/merged_model")
    [stream] = (tmp_path / "stream").glob("*/merged_model")
    assert json.loads((stream / "config.json").read_text())["dtype"] == "bfloat16"
    assert _digests(stream) == _digests(mem)


def test_failed_merge_leaves_no_model_behind(tmp_path, monkeypatch):
    from llm_merging.model import engine

    calls = []
    real = engine._merge_chunked

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_merge_chunked", failing)
    out = tmp_path / "out"
    assert main(["-m", "ties_merge", "--base-model", str(tiny.base_dir("decoder")), "--models", *FULL, "--quiet",
                 "--no-eval", "--output_folder", str(out)]) == 1
    run_dir = out / "ties_merge"
    assert not (run_dir / "merged_model").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    assert "disk on fire" in json.loads((run_dir / "report.json").read_text())["error"]


@pytest.mark.parametrize("in_kernel", ["yes", "refused", "zero"])
def test_shard_writer_writes_what_safetensors_writes(tmp_path, monkeypatch, in_kernel):
    """ShardWriter, tensors written or copied from another file in any order (the kernel's copy, or through
    memory where the system refuses it or copies nothing): the file safetensors' save_file writes, byte for byte."""
    import errno

    from safetensors.torch import save_file

    from llm_merging.model.checkpoint import CheckpointReader
    from llm_merging.model.save import ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(300, 70, generator=g).half(), "a.bias": torch.randn(70, generator=g),
               "c.weight": torch.randn(5, 3, generator=g).bfloat16(), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "want.safetensors"), metadata={"format": "pt"})
    if in_kernel != "yes":
        def no_copy_range(*args):
            if in_kernel == "zero":
                return 0
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", no_copy_range)
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    reader = CheckpointReader(tmp_path / "want.safetensors")
    writer.write("c.weight", tensors["c.weight"])
    file, offset, nbytes, dtype = reader.span("b.weight")
    assert dtype == torch.float16 and nbytes == 300 * 70 * 2
    writer.copy("b.weight", file, offset, nbytes)
    with pytest.raises(ValueError, match="not written.*a.bias"):
        writer.finish()
    writer.write("a.bias", tensors["a.bias"])
    writer.write("empty", tensors["empty"])
    with pytest.raises(ValueError, match="expected"):
        writer.write("a.bias", tensors["a.bias"].double())
    writer.finish()
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()
    other = ShardWriter(tmp_path / "out", {"x": ((100_000,), torch.float32)})
    with pytest.raises(OSError, match="early"):  # a source shorter than the span: a clear error, not zeros
        other.copy("x", tmp_path / "want.safetensors", offset, 400_000)
    other.close()
