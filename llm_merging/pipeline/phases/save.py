"""The save phase: ``recipe.yml`` and the merged model (``--save full|kit|adapter|none``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm_merging.core.errors import ConfigError
from llm_merging.merging.recipe import recipe_document, write_recipe
from llm_merging.model.save import adapter_estimate, estimate_saved_bytes, fused_expert_tensor, is_dora, save_full
from llm_merging.pipeline.context import Phase, RunContext

#: what each --save mode writes in OUTPUT/METHOD/ besides recipe.yml
SAVED = {"full": ["merged_model/"], "kit": ["safetensor.pt"], "adapter": ["adapter/"], "none": []}


class SavePhase(Phase):
    name = "save"
    section = "saved"
    checks_budget = False  # a finished merge is always saved, even past the budget
    processes = "main"
    needs_weights = False  # it completes a model written while merging, or writes the one in memory

    def check(self, ctx: RunContext) -> None:
        if ctx.config.save != "adapter":
            return
        if not ctx.method.uses_engine():
            raise ConfigError(f"--save adapter needs an engine-based method; '{ctx.config.method}' overrides merge()")
        method = ctx.method  # the --set aliases too: a rank or an energy, not both
        if method.adapter_rank is not None and method.adapter_energy is not None:
            raise ConfigError("--save adapter: adapter_rank and adapter_energy both choose the adapter's rank: give one")
        if method.adapter_rank is None and method.adapter_energy is None:  # the default: the summed input ranks
            for e in ctx.report["models"]["experts"]:
                what = "a full fine-tune" if e["kind"] == "full" else "a DoRA adapter" if is_dora(e) else None
                if what:  # its ΔW has no input rank (DoRA's is not low rank)
                    raise ConfigError(f"--save adapter: '{e['id']}' is {what}; choose the adapter's rank with "
                                      "--adapter-rank R or --adapter-energy E")

        models = ctx.report["models"]
        fused = fused_expert_tensor(models["experts"], models["base"]["path"], method.architecture)
        if fused is not None:
            raise ConfigError(f"--save adapter: parameter '{fused[0]}' is a {len(fused[1])}-D tensor {fused[1]} (the fused "
                              "experts of a mixture-of-experts model) that a PEFT LoRA adapter cannot hold; use --save full")

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        return ["recipe.yml", *SAVED[ctx.config.save]]

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        """The merged model in its saved dtype (from the base checkpoint's headers), or the adapter."""
        mode, method = ctx.config.save, ctx.method
        needs = [(ctx.out_dir, 64 << 10, "recipe.yml")]
        if mode in ("full", "kit"):
            recipe = method.recipe
            dtype = getattr(torch, recipe.out_dtype) if recipe is not None and recipe.out_dtype else method.torch_dtype()
            base = Path(ctx.report["models"]["base"]["path"])
            what = "the merged model" + (" (merged_model/)" if mode == "full" else " (safetensor.pt)")
            needs.append((ctx.out_dir, estimate_saved_bytes(base, dtype, weights_only=mode == "kit"), what))
        elif mode == "adapter":
            models = ctx.report["models"]
            size = adapter_estimate(models["experts"], models["base"]["path"],
                                    method.adapter_rank or method.adapter_max_rank)
            needs.append((ctx.out_dir, size, "the adapter (adapter/)"))
        return needs

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        method, mode = ctx.method, ctx.config.save
        info = {"method": ctx.config.method, **ctx.report.get("models", {}), "hyperparameters": method.hparams}
        doc = recipe_document(method, ctx.report.get("models"), dtype=ctx.report.get("dtype"), seed=method.seed)
        ctx.report["recipe_out"] = str(write_recipe(ctx.out_dir / "recipe.yml", doc))  # reproduces the merge
        if mode == "none":
            return None
        if mode == "kit":
            method.save_model(str(ctx.out_dir))
            return {"format": "kit", "path": str(ctx.out_dir / "safetensor.pt")}
        if mode == "full":
            tok = method.output_tokenizer  # a recipe's tokenizer_source / chat_template
            if tok is None:
                tok = method.tokenizer if method.architecture == "encoder_decoder" else method.input_tokenizer
            writer = method.stream_writer
            if writer is not None:  # the weights were written while merging
                path = writer.finish(tok, info)
            else:
                path = save_full(method.base_model, tok, ctx.out_dir / "merged_model", info)
            saved = {"format": "full", "path": str(path), "written_while_merging": writer is not None}
            if tok is None and method.tokenizer_note:
                saved["tokenizer"] = method.tokenizer_note
            return saved
        writer = method.delta_sink
        if writer is None:
            raise ConfigError("--save adapter: the merge collected no adapter factors")
        path = writer.save(ctx.out_dir / "adapter", ctx.report["models"]["base"]["id"], info)
        errors = writer.errors
        return {"format": "adapter", "path": str(path),
                "options": {"rank": method.adapter_rank, "energy": method.adapter_energy,
                            "max_rank": method.adapter_max_rank},
                "max_relative_error": round(max(errors.values()), 6) if errors else 0.0,
                "relative_error_by_module": {m: round(e, 6) for m, e in errors.items()},
                "extraction": writer.report()}
