"""Recipes: every memory choice of one run, written as ``qlora+bf16-mixed+checkpointing``.

The one language of ``lowmem plan`` (which prints recipes), ``lowmem estimate --recipe`` and
``lowmem train --recipe`` (which read them). A recipe is ``+``-joined tokens, in any order on input
and in this order on output:

=================  ============================================================================
mode (one)         ``full`` fine-tuning, ``lora``, ``qlora`` (LoRA on a 4-bit base) or ``inference``
precision          ``fp32`` (no autocast; the default), ``bf16-mixed`` / ``fp16-mixed`` (autocast
                   over fp32 master weights, or over a 16-bit frozen LoRA base), ``bf16`` (pure:
                   the weights themselves in bf16), ``fp16`` (pure, inference only)
base weights       ``int8``, ``nf4``, ``fp4``, ``nf4-dq``, ``fp4-dq``: the frozen base stored quantized
                   (``qlora`` alone means ``nf4-dq``; inference: any); ``experts``: the routed MoE
                   experts quantized too (inference)
checkpointing      ``checkpointing``: every decoder layer recomputed in backward
activations        ``offload-activations``: what backward keeps (with ``checkpointing``: the
                   layers' inputs) moved to host memory in forward, back in backward
loss               ``chunked-loss``: the logits made and reduced a chunk of tokens at a time
optimizer          ``adamw`` (the default), ``adamw8bit``, ``paged-adamw8bit`` (CUDA), ``sgd``,
                   ``sgd-momentum``
optimizer step     ``step-in-backward``: each parameter stepped as soon as its gradient is
                   made, then the gradient freed; ``offload-optimizer``: AdamW's state (and the
                   step) on the host, each gradient moved there as it is made
accumulation       ``accumN``: each step's batch run as N micro-batches (gradient accumulation)
sharding           ``zero1`` / ``zero2`` / ``zero3`` (full fine-tuning over several GPUs),
                   ``tpN`` (inference: one model split over N GPUs)
=================  ============================================================================

Light on purpose: no torch import, so the estimator answers in milliseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["full", "lora", "qlora", "inference"]
MODES: tuple[str, ...] = get_args(Mode)
Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
WEIGHTS: tuple[str, ...] = ("int8", "nf4", "fp4", "nf4-dq", "fp4-dq")  # quantized storage of a frozen base
FOUR_BIT: tuple[str, ...] = ("nf4", "fp4", "nf4-dq", "fp4-dq")
OptimizerName = Literal["adamw", "adamw8bit", "paged-adamw8bit", "sgd", "sgd-momentum"]  # optimizers.make_optimizer's
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
CHECKPOINTING, EXPERTS = "checkpointing", "experts"
OFFLOAD_ACTIVATIONS, CHUNKED_LOSS = "offload-activations", "chunked-loss"
STEP_IN_BACKWARD, OFFLOAD_OPTIMIZER = "step-in-backward", "offload-optimizer"
TILED_MLP = "tiled-mlp"
FLAGS = {CHECKPOINTING: "checkpointing", EXPERTS: "experts", OFFLOAD_ACTIVATIONS: "offload_activations",
         CHUNKED_LOSS: "chunked_loss", STEP_IN_BACKWARD: "step_in_backward",
         OFFLOAD_OPTIMIZER: "offload_optimizer", TILED_MLP: "tiled_mlp"}  # token -> Recipe field, on/off tokens
# the on/off tokens that trade speed or host memory for device memory on any number of GPUs
ONE_GPU_TECHNIQUES = (CHUNKED_LOSS, OFFLOAD_ACTIVATIONS, TILED_MLP, STEP_IN_BACKWARD, OFFLOAD_OPTIMIZER)
QLORA_WEIGHTS = "nf4-dq"  # QLoRA's base: NF4 with double quantization (Dettmers et al., 2023)
_ZERO = re.compile(r"zero([123])")
_TP = re.compile(r"tp([1-9][0-9]*)")
_ACCUM = re.compile(r"accum([1-9][0-9]*)")
KNOWN = (f"{'/'.join(MODES)}; {'/'.join(PRECISIONS)}; {'/'.join(WEIGHTS)}, {EXPERTS}; {CHECKPOINTING}; "
         f"{OFFLOAD_ACTIVATIONS}; {CHUNKED_LOSS}; {TILED_MLP}; {'/'.join(OPTIMIZERS)}; {STEP_IN_BACKWARD}, "
         f"{OFFLOAD_OPTIMIZER}; accumN; zero1/zero2/zero3, tpN")
TRAINING_ONLY = (CHECKPOINTING, OFFLOAD_ACTIVATIONS, CHUNKED_LOSS, TILED_MLP, STEP_IN_BACKWARD, OFFLOAD_OPTIMIZER)


class RecipeError(ValueError):
    """A recipe that cannot be read, or whose choices do not go together (one line)."""


@dataclass(frozen=True)
class Recipe:
    """Every memory choice of one run; ``Recipe.parse(text)`` reads one, ``str(recipe)`` writes it back."""

    mode: Mode = "full"
    precision: str = "fp32"
    optimizer: OptimizerName = "adamw"
    checkpointing: bool = False
    zero: int = 0  # ZeRO stage (full fine-tuning sharded over several GPUs)
    tensor_parallel: int = 1  # GPUs one served model is split over (inference)
    weights: str | None = None  # quantized storage of the frozen base; None: 16/32-bit (qlora: nf4-dq)
    experts: bool = False  # the routed MoE experts stored in ``weights`` as well (inference)
    offload_activations: bool = False  # saved activations (checkpointed inputs) kept in host memory
    chunked_loss: bool = False  # the loss's logits made a chunk of tokens at a time
    step_in_backward: bool = False  # the optimizer step fused into backward, one parameter at a time
    offload_optimizer: bool = False  # AdamW's state and step on the host
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    tiled_mlp: bool = False  # each layer's MLP run a tile of hidden-size tokens at a time (with checkpointing)

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise RecipeError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise RecipeError(f"unknown base weights {self.weights!r}: choose one of {', '.join(WEIGHTS)}")
        inference = self.mode == "inference"
        if inference and self.precision not in ("fp32", "bf16", "fp16"):
            raise RecipeError(f"inference runs in fp32, bf16 or fp16, not {self.precision}: autocast is for training")
        if not inference and self.precision == "fp16":
            raise RecipeError("pure fp16 training overflows and underflows: "
                              "write fp16-mixed (autocast with a loss scaler)")
        if self.mode in ("lora", "qlora") and self.precision == "bf16":
            raise RecipeError(f"{self.mode} trains fp32 adapters: write {self.mode}+bf16-mixed for a bf16 base and "
                              "bf16 autocast (pure bf16 is for full fine-tuning)")
        if inference and (self.checkpointing or self.optimizer != "adamw" or self.zero or self.accumulate > 1
                          or self.offload_activations or self.chunked_loss or self.step_in_backward
                          or self.offload_optimizer or self.tiled_mlp):
            raise RecipeError(f"inference has no backward pass: no {', '.join(TRAINING_ONLY)}, optimizer, "
                              "accumN or ZeRO")
        if self.tiled_mlp and not self.checkpointing and not inference:
            raise RecipeError(f"{TILED_MLP} tiles the MLP inside checkpointed layers: add {CHECKPOINTING} (without it "
                              "the layers' other activations still grow with the whole context)")
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise RecipeError(f"accumN needs N >= 1 micro-batches, got {self.accumulate!r}")
        if self.step_in_backward and self.offload_optimizer:
            raise RecipeError(f"{STEP_IN_BACKWARD} steps on the device and {OFFLOAD_OPTIMIZER} on the host: "
                              "choose one")
        if self.step_in_backward and self.accumulate > 1:
            raise RecipeError(f"{STEP_IN_BACKWARD} steps as each gradient is made: there is no gradient left to "
                              f"accumulate {self.accumulate} micro-batches into (drop accum{self.accumulate})")
        if self.step_in_backward and self.precision == "fp16-mixed":
            raise RecipeError(f"{STEP_IN_BACKWARD} cannot run under fp16-mixed: the loss scaler must see every "
                              "gradient before any step (use bf16-mixed)")
        if self.offload_optimizer and self.optimizer != "adamw":
            raise RecipeError(f"{OFFLOAD_OPTIMIZER} keeps AdamW's fp32 state on the host: write it with adamw, "
                              f"not {self.optimizer}")
        if (self.step_in_backward or self.offload_optimizer or self.tiled_mlp) and self.zero:
            raise RecipeError(f"{STEP_IN_BACKWARD}, {OFFLOAD_OPTIMIZER} and {TILED_MLP} are modelled on one GPU, "
                              "not with ZeRO")
        if self.weights and self.mode in ("full", "lora"):
            raise RecipeError(f"{self.mode} trains a 16/32-bit model: a quantized base ({self.weights}) is qlora")
        if self.experts and not (inference and self.weights in FOUR_BIT):
            raise RecipeError("experts (routed experts in 4 bits) goes with inference and a 4-bit format, e.g. "
                              "inference+bf16+nf4-dq+experts")
        if self.zero and self.mode != "full":
            raise RecipeError(f"ZeRO shards full fine-tuning's states; {self.mode} is not sharded here")
        if self.tensor_parallel > 1 and not inference:
            raise RecipeError("tensor parallelism (tpN) is modelled for inference only")

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """Read a recipe such as ``"qlora+bf16-mixed+checkpointing"``; ``RecipeError`` (one line) names
        the token it cannot read, or the choices that do not go together."""
        tokens = [t.strip().lower() for t in str(text).split("+")]
        if not any(tokens):
            raise RecipeError(f"empty recipe: write tokens joined by '+', "
                              f"e.g. qlora+bf16-mixed+checkpointing ({KNOWN})")
        fields: dict[str, object] = {}

        def put(name: str, value: object, token: str) -> None:
            if name in fields:
                raise RecipeError(f"recipe {text!r} names its {name} twice ({token!r})")
            fields[name] = value

        for token in tokens:
            zero, tp, accum = _ZERO.fullmatch(token), _TP.fullmatch(token), _ACCUM.fullmatch(token)
            if token in MODES:
                put("mode", token, token)
            elif token in PRECISIONS:
                put("precision", token, token)
            elif token in WEIGHTS:
                put("weights", token, token)
            elif token in OPTIMIZERS:
                put("optimizer", token, token)
            elif token in FLAGS:
                put(FLAGS[token], True, token)
            elif accum:
                put("accumulate", int(accum.group(1)), token)
            elif zero:
                put("zero", int(zero.group(1)), token)
            elif tp:
                put("tensor_parallel", int(tp.group(1)), token)
            else:
                raise RecipeError(f"unknown token {token!r} in recipe {text!r}: known tokens are {KNOWN}")
        if "mode" not in fields:
            raise RecipeError(f"recipe {text!r} names no mode: start it with {', '.join(MODES)}")
        return cls(**fields)  # type: ignore[arg-type]

    def __str__(self) -> str:
        parts = [self.mode, self.precision]
        if self.weights and not (self.mode == "qlora" and self.weights == QLORA_WEIGHTS):
            parts.append(self.weights)
        parts += [EXPERTS] * self.experts + [CHECKPOINTING] * self.checkpointing
        parts += [OFFLOAD_ACTIVATIONS] * self.offload_activations + [CHUNKED_LOSS] * self.chunked_loss
        parts += [TILED_MLP] * self.tiled_mlp
        if self.optimizer != "adamw":
            parts.append(self.optimizer)
        parts += [OFFLOAD_OPTIMIZER] * self.offload_optimizer + [STEP_IN_BACKWARD] * self.step_in_backward
        if self.accumulate > 1:
            parts.append(f"accum{self.accumulate}")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.tensor_parallel > 1:
            parts.append(f"tp{self.tensor_parallel}")
        return "+".join(parts)

    @property
    def base_weights(self) -> str:
        """The format the model's weights are stored in (``base_weights``)."""
        return base_weights(self.mode, self.precision, self.weights)

    @property
    def autocast(self) -> str | None:
        """The autocast dtype of the forward pass ("bf16" or "fp16"), None without autocast."""
        return {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(self.precision)

    @property
    def gpus_needed(self) -> int:
        """The fewest GPUs the recipe runs on: ``tpN`` needs N; ZeRO is meaningless on fewer than 2."""
        return max(self.tensor_parallel, 2 if self.zero else 1)


def base_weights(mode: str, precision: str, weights: str | None = None) -> str:
    """The one answer to "in which format are the model's weights stored?", for the estimator and
    for ``lowmem train`` alike.

    Full fine-tuning: the trainable weights, fp32 master weights unless pure bf16. QLoRA: its
    quantized base (``nf4-dq`` unless named). A named quantized format otherwise. LoRA and inference:
    the 16-bit dtype of the precision (bf16 for bf16-mixed or bf16, fp16 for fp16-mixed or fp16),
    fp32 for fp32. Quantized formats name the linear maps; the rest of the model stays 16-bit.
    """
    if mode == "qlora":
        return weights or QLORA_WEIGHTS
    if weights:
        return weights
    if mode == "full":
        return "bf16" if precision == "bf16" else "fp32"
    return {"fp32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16", "fp16-mixed": "fp16", "fp16": "fp16"}[precision]
