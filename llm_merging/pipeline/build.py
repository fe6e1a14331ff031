"""A run's configured merge method: the registered method, or the one a recipe names (each merge of a
chained recipe too), with the run's models, device, dtype, seed, calibration data and ``--set`` values."""
from __future__ import annotations

from llm_merging.core.errors import ConfigError
from llm_merging.merging.factory import configure, instantiate
from llm_merging.merging.Merges import Merges
from llm_merging.merging.recipe import Recipe, apply_recipe
from llm_merging.pipeline.config import RunConfig
from llm_merging.pipeline.context import RunContext


def configured_method(config: RunConfig, ctx: RunContext, recipe: Recipe | None = None) -> Merges:
    """``recipe``'s method (else ``config.method``) configured for the run ``config`` describes; nothing
    is loaded (the hyperparameters are checked, the models are not resolved)."""
    method = instantiate(config.method if recipe is None else recipe.method)
    if recipe is not None:
        apply_recipe(method, recipe)
    configure(method, config.method_options(method.name, method.all_hyperparameters()))
    if ctx.processes.world > 1:  # one device per process
        method.device = ctx.processes.device_for(config.device or method.device)
    if recipe is not None and method.hparams != method.recipe_hparams and (
            recipe.slice_lengths is not None or recipe.tokenizer is not None or recipe.chat_template is not None):
        raise ConfigError(f"--recipe {config.recipe} has slices or a tokenizer setting: put the --set values in the "
                          "recipe itself (recipe.yml must reproduce the run)")
    config.check_calibration(type(method))
    method.should_stop = ctx.budget.expired
    method.tokenizer_optional = not config.evaluate
    return method
