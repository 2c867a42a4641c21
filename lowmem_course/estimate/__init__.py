"""Estimate memory: predict the peak bytes per device of any R1-family setup, without running it.

The estimator is pure arithmetic on a config: it never builds a model, never imports torch and
never reads ``measure`` (the ruler must not read the forecast). Its numbers are checked against
measurement in ``tests/test_estimate.py``, in notebook 08 and by ``lowmem validate``. Three parts:

- ``config``: a config's fields checked, its shape, linear maps and exact parameter counts;
- ``memory``: ``Setup`` (a recipe on a run of some shape) and ``estimate``, its peak per device;
- ``planner``: the recipes that fit a budget, cheapest compute first (``plan``).
"""

from lowmem_course.estimate.config import (ARCHITECTURES, MAX_LAYERS, Linear, Parameters, Shape, config_fields,
                                           count, layer_linears, load_config, lora_targets, shape_of,
                                           validate_fields)
from lowmem_course.estimate.memory import (ATTENTION, CHECKPOINTING, DEVICES, EXPERTS_SUFFIX, MODES, OPTIMIZERS,
                                           PARALLEL, PRECISIONS, WEIGHT_BYTES, WEIGHT_FORMATS, Estimate,
                                           ModelStates, Setup, estimate, frozen_weight_bytes, kv_cache_per_token,
                                           model_states, recipe_of, setup_of)
from lowmem_course.estimate.planner import (COST, DEFAULT_PRECISIONS, PlanOption, candidates, check_precisions,
                                            cost, plan)

__all__ = [
    "ARCHITECTURES", "ATTENTION", "CHECKPOINTING", "COST", "DEFAULT_PRECISIONS", "DEVICES", "EXPERTS_SUFFIX",
    "MAX_LAYERS", "MODES", "OPTIMIZERS", "PARALLEL", "PRECISIONS", "WEIGHT_BYTES", "WEIGHT_FORMATS", "Estimate",
    "Linear", "ModelStates", "Parameters", "PlanOption", "Setup", "Shape", "candidates", "check_precisions",
    "config_fields", "cost", "count", "estimate", "frozen_weight_bytes", "kv_cache_per_token", "layer_linears",
    "load_config", "lora_targets", "model_states", "plan", "recipe_of", "setup_of", "shape_of", "validate_fields",
]
