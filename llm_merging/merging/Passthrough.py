"""``passthrough``: copy tensors unchanged from one model per slice, optionally scaled (mergekit's
``passthrough``, ``merge_methods/passthrough.py``). With recipe ``slices`` it stacks layer ranges of
several models ("frankenmerges", e.g. SOLAR's depth up-scaling, Kim et al. 2023): the output model has
as many layers as the slices hold, and its config says so.

Output layer ``j`` of slice ``k`` (source ``m``, ``layer_range [a, b)``) is layer ``a + (j − start_k)`` of
``m``; the embeddings come from the first slice's model and everything after the layers (final norm,
head) from the last slice's, as mergekit plans them. ``scale`` multiplies a copied tensor (usually with a
filter, e.g. ``o_proj``/``down_proj`` at 0.5); unset, the tensor is copied bit for bit.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from llm_merging.core.errors import BudgetExceeded, CheckpointError, ConfigError
from llm_merging.merging import settings
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param
from llm_merging.merging.Merges import Merges
from llm_merging.model import auto_model_class
from llm_merging.model.checkpoint import FullExpert
from llm_merging.model.engine import check_base_files, config_param_shapes
from llm_merging.model.lora import LoraAdapter
from llm_merging.model.refs import ModelRef, hf_token

logger = logging.getLogger(__name__)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _layer_count(config: dict) -> tuple[str, int]:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    raise ConfigError(f"cannot tell the number of layers from the config (none of {', '.join(LAYER_COUNT_KEYS)})")


class Passthrough(TaskVectorMerge):
    """Passthrough: copy one model's tensors (with slices: stack layer ranges of several models)."""

    expert_count = (1, 1)  # without recipe slices; a recipe's slices name their own models
    base_optional = True  # the config and tokenizer are the base model's, else the first model's

    hyperparameters = {
        "scale": Param(None, "multiply every copied tensor by this factor (unset: exact copy)", optional=True),
    }

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.is_peft = None
        self.slices: list[tuple[str, tuple[int, int]]] | None = None  # (model, [start, end)) per output slice

    def validate_hyperparameters(self) -> None:
        if self.slices is not None:  # the slices name the models
            return Merges.validate_hyperparameters(self)
        super().validate_hyperparameters()

    # ---------------------------------------------------------------- plan
    def _config(self, path) -> dict:
        try:
            return json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {exc}") from None

    def _plan(self) -> tuple[dict, list[tuple[ModelRef, int]]]:
        """The output config and, per output layer, (source model, source layer)."""
        token = hf_token()
        refs = {str(r.id): r for r in self.model_refs()}
        base_path = self.base_ref().resolve(token)
        if self.slices is None:
            if len(refs) != 1:
                raise ConfigError(f"method '{self.name}' copies exactly one model, got {len(refs)}; use recipe slices to stack layers")
            ref = next(iter(refs.values()))
            _, n = _layer_count(self._config(self._source_dir(ref, base_path)))
            slices = [(str(ref.id), (0, n))]
        else:
            slices = self.slices
        layers: list[tuple[ModelRef, int]] = []
        for k, (model, (start, end)) in enumerate(slices):
            ref = refs.get(model) or ModelRef.parse(model)
            _, n = _layer_count(self._config(self._source_dir(ref, base_path)))
            if end > n:
                raise ConfigError(f"slices[{k}]: layer_range [{start}, {end}) goes beyond model '{model}', which has {n} layers")
            layers += [(ref, i) for i in range(start, end)]
        config = self._config(base_path)
        key, _ = _layer_count(config)
        config[key] = len(layers)
        if isinstance(config.get("layer_types"), list):  # per-layer attention kinds follow their layers
            types = []
            for ref, i in layers:
                src = self._config(self._source_dir(ref, base_path)).get("layer_types") or config["layer_types"]
                types.append(src[i])
            config["layer_types"] = types
        return config, layers

    def _source_dir(self, ref: ModelRef, base_path):
        path = ref.resolve(hf_token())
        # a LoRA adapter's config is its base model's
        return base_path if (path / "adapter_config.json").is_file() else path

    # ---------------------------------------------------------------- preflight
    def _check_compatibility(self, base_path) -> None:
        check_base_files(base_path)
        recipe = self.recipe
        if recipe is not None and (recipe.tokenizer is not None or recipe.chat_template is not None):
            raise ConfigError(f"recipe {recipe.path}: passthrough keeps the first model's tokenizer; "
                              "tokenizer_source / tokenizer / chat_template are not supported with it")
        config, layers = self._plan()
        self.slice_lengths = [end - start for _, (start, end) in self.slices] if self.slices else None
        names = [f"model.layers.{j}.x" for j in range(len(layers))]
        self.check_all_tensors(names + ["model.embed_tokens.weight", "lm_head.weight"])
        self.output_layers = len(layers)

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self):
        from transformers import AutoConfig
        from transformers.initialization import no_init_weights

        self._check_architecture()
        self._load_tokenizer_if_any()
        token = hf_token()
        base_path = self.base_ref().resolve(token)
        config_dict, layers = self._plan()
        t0 = time.time()
        config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "transformers_version"})
        with no_init_weights():
            model = auto_model_class(self.architecture).from_config(config, dtype=self.torch_dtype())
        names = [n for n, _ in model.named_parameters()]
        self.layout = settings.Layout(names, self.slice_lengths)

        readers: dict[str, Any] = {}

        def reader(ref: ModelRef):
            key = str(ref.resolve(token))
            if key not in readers:
                path = ref.resolve(token)
                if (path / "adapter_config.json").is_file():  # BASE+LORA: θ = θ₀ + ΔW
                    lora = LoraAdapter.load(path, name=str(ref))
                    shapes = config_param_shapes(base_path, self.architecture)
                    lora.bind(shapes)
                    full = FullExpert(base_path, name="base")
                    full.bind(shapes)
                    readers[key] = (full, lora)
                else:
                    full = FullExpert(path, name=str(ref))
                    full.bind(config_param_shapes(path, self.architecture))
                    readers[key] = (full, None)
            return readers[key]

        first, last = layers[0][0], layers[-1][0]
        from tqdm.auto import tqdm

        for name, param in tqdm(list(model.named_parameters()), desc="passthrough", unit="tensor",
                                disable=not self.progress, leave=False):
            if self.should_stop is not None and self.should_stop():
                raise BudgetExceeded(f"time budget ran out while copying (at parameter '{name}'); nothing was saved")
            found = settings.layer_index(name)
            if found is not None:
                prefix, j = found
                ref, i = layers[j]
                source_name = f"{prefix}.{i}.{name[len(prefix) + 1 + len(str(j)) + 1:]}"
            else:
                ref = first if self.layout.position(name).slice == 0 else last
                source_name = name
            full, lora = reader(ref)
            like = torch.empty(param.shape, dtype=torch.float32)
            value = full.tensor(source_name, like)
            if value is None:
                raise CheckpointError(f"model '{ref}' has no tensor '{source_name}' (for output '{name}')")
            if lora is not None:
                delta = lora.delta(source_name, value)
                if delta is not None:
                    value = value + delta
            scale = self.resolve_hparams(name, 0)["scale"]
            if scale is not None:
                value = value * scale
            param.copy_(value.to(param.dtype))
        for full, lora in readers.values():
            full.close()
            if lora is not None:
                lora.close()
        self.merge_stats = {"tensors_copied": len(names), "output_layers": len(layers), "seconds": round(time.time() - t0, 3)}
        device = self.torch_device()
        self.base_model = model.to(device).eval()
        self.merged_model = self.base_model
        return self.base_model
