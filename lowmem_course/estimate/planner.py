"""The planner: which recipes fit a memory budget, cheapest compute first, what each costs, and, when
nothing fits, how far off the leanest recipe is and what would fit instead (``shortfall``)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lowmem_course.estimate.config import config_fields, load_config, shape_of
from lowmem_course.estimate.memory import (
    CHECKPOINTING,
    EXPERTS_SUFFIX,
    PRECISIONS,
    Estimate,
    Setup,
    estimate,
    recipe_of,
)
from lowmem_course.recipe import FLAGS, ONE_GPU_TECHNIQUES, RecipeError, base_weights

# Compute cost of each technique, rough published-order-of-magnitude factors used to rank, not to
# predict time. Training relative to bf16 full fine-tuning (forward + backward = 6 x params x tokens),
# inference relative to serving the bf16 model from one GPU: the two are never ranked together.
COST = {"full": 1.0, "lora": 0.7, "qlora": 0.85, "inference": 1.0, "checkpointing": 1.33, "fp32": 2.0,
        "zero": 1.1, "tensor": 1.1, "offload_optimizer": 1.2, "accumulate": 1.02, "tiled_mlp": 1.19}
# The chunked loss, activation offloading and the step in backward cost about nothing: torchtune's README
# ("Optimization flags", Llama 3.2 3B on an A100) measured 8998 -> 9174 tokens/s adding the chunked loss,
# 7210 -> 7309 fusing the step into backward, 7309 -> 7301 offloading activations. AdamW on the host:
# torchao's CPUOffloadOptimizer benchmark, 1.27 -> 1.52 s per step (x 1.2). Micro-batches: smaller matmuls
# (a tie-breaker, not measured here). The tiled MLP runs each MLP forward a third time (forward, the
# layer's recompute, the tile's): checkpointing costs 4 forward-units a layer (forward, recompute,
# backward = 2), and the MLP holds about 3/4 of a distill's layer FLOPs, so 4.75 / 4 = 1.19.
TECHNIQUES: tuple[tuple[str, ...], ...] = (
    (), ("chunked_loss",), ("chunked_loss", "offload_activations"), ("chunked_loss", "step_in_backward"),
    ("chunked_loss", "offload_activations", "step_in_backward"), ("chunked_loss", "offload_optimizer"),
    ("chunked_loss", "offload_activations", "offload_optimizer"), ("chunked_loss", "tiled_mlp"),
    ("chunked_loss", "offload_activations", "tiled_mlp"),
    ("chunked_loss", "offload_activations", "tiled_mlp", "step_in_backward"),
    ("chunked_loss", "offload_activations", "tiled_mlp", "offload_optimizer"),
)  # the sets ``variants`` tries on a training setup
COST_BASELINE = {"training": "bf16 full fine-tuning", "inference": "serving bf16 weights from one GPU"}
DEFAULT_PRECISIONS = ("bf16-mixed", "bf16")  # what ``plan`` tries unless told: GPUs with bf16
DEFAULT_SEQ = 4096  # tokens per sequence unless told: room for a reasoning model's thinking
JOBS = {"training": ("full", "lora", "qlora"), "inference": ("inference",)}  # the two jobs and their modes
GPU_COUNTS = tuple(2**k for k in range(1, 11))  # what ``shortfall`` tries: 2, 4, ..., 1024 GPUs


def job_of(mode: str) -> str:
    """"training" for full, lora and qlora; "inference" for inference."""
    return next(job for job, modes in JOBS.items() if mode in modes)


@dataclass(frozen=True)
class PlanOption:
    """One setup that fits: its estimate, recipe (``qlora+bf16-mixed+checkpointing``) and relative cost."""

    estimate: Estimate
    recipe: str
    cost: float

    def command(self, model: str, data: str = "data.jsonl") -> str:
        """The command that runs this option: ``lowmem train`` for a training recipe (one replica per
        GPU), ``lowmem estimate`` for the others (serving and ZeRO are estimated, not run; a serving
        command comes in a later release). Only flags that change the row: ``--gpus`` for ZeRO
        (``tpN`` names its GPUs; replicas are per GPU), ``--lora-rank`` when not 16, ``--device cpu``."""
        s = self.estimate.setup
        name = shlex.quote(str(model))
        rank = f" --lora-rank {s.lora_rank}" if s.mode in ("lora", "qlora") and s.lora_rank != 16 else ""
        if s.mode != "inference" and not s.zero:
            run = f"runs/{Path(str(model)).name.lower()}-{s.mode}"
            return (f"lowmem train --model {name} --recipe {self.recipe} --data {shlex.quote(data)} "
                    f"--out {shlex.quote(run)} --batch {s.batch} --max-tokens {s.seq}{rank}")
        gpus = f" --gpus {s.gpus}" if s.zero else ""
        device = f" --device {s.device}" if s.device != "cuda" else ""
        return f"lowmem estimate {name} --recipe {self.recipe} --batch {s.batch} --seq {s.seq}{gpus}{rank}{device}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: cost and the estimate (which carries the recipe)."""
        return {"cost": round(self.cost, 3), **self.estimate.to_dict()}


def cost(setup: Setup) -> float:
    """Relative compute cost of ``setup`` for ranking only (``COST``): training against bf16 full
    fine-tuning = 1, inference against serving bf16 weights from one GPU = 1."""
    cost = COST[setup.mode]
    if setup.mode != "inference" and setup.checkpointing == "full":
        cost *= COST["checkpointing"]
    if setup.precision == "fp32":
        cost *= COST["fp32"]
    if setup.zero:
        cost *= COST["zero"]
    if setup.parallel == "tensor":
        cost *= COST["tensor"]
    if setup.mode != "inference" and setup.offload_optimizer:
        cost *= COST["offload_optimizer"]
    if setup.mode != "inference" and setup.accumulate > 1:
        cost *= COST["accumulate"]
    if setup.mode != "inference" and setup.tiled_mlp:
        cost *= COST["tiled_mlp"]
    return cost


def _techniques(setup: Setup) -> int:
    return sum(getattr(setup, FLAGS[token]) for token in ONE_GPU_TECHNIQUES)


def variants(base: Setup) -> list[Setup]:
    """``base`` (a training setup) with each set of ``TECHNIQUES`` and each split of its batch into
    micro-batches (1, 2, 4, ... sequences, and the batch) that a recipe can run; cheapest first, then
    fewest techniques, then fewest micro-batches. Activations are offloaded only with checkpointing
    (the layers' inputs, Unsloth's offloaded checkpointing), as torchtune allows. Inference: ``[base]``."""
    if base.mode == "inference":
        return [base]
    splits = sorted({base.batch // m for m in (2**k for k in range(base.batch.bit_length())) if base.batch % m == 0})
    out = []
    for techniques in TECHNIQUES:
        if {"offload_activations", "tiled_mlp"} & set(techniques) and base.checkpointing == "none":
            continue  # every activation would cross PCIe each step (torchtune refuses it too); tiles go in
            # checkpointed layers
        for accumulate in splits:
            setup = replace(base, accumulate=accumulate, **dict.fromkeys(techniques, True))
            try:
                recipe_of(setup)  # the recipe's rules: what can run together
            except RecipeError:
                continue
            out.append(setup)
    return sorted(out, key=lambda v: (cost(v), _techniques(v), v.accumulate))


def check_precisions(precisions: Any) -> tuple[str, ...]:
    """``precisions`` as a tuple without repeats; ``ValueError`` for an unknown one or none."""
    chosen = tuple(dict.fromkeys(precisions))
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad or not chosen:
        raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}, got {', '.join(map(str, bad)) or 'none'}")
    return chosen


def candidates(mode: str | None, batch: int, seq: int, gpus: int, precisions: Any = DEFAULT_PRECISIONS,
               moe: bool = False, device: str = "cuda", lora_rank: int = 16) -> list[Setup]:
    """The setups ``plan`` tries (every mode when ``mode`` is None) in the allowed ``precisions``, LoRA
    and QLoRA with adapters of rank ``lora_rank``.

    Full fine-tuning tries each precision; LoRA and QLoRA each but pure bf16 (their adapters train
    in fp32 anyway); inference serves 16-bit weights in bf16 (from "bf16" or "bf16-mixed"), in fp16
    (from "fp16-mixed" or "fp16") or fp32, each with the weights as they are, int8 or NF4-dq, and for a MoE
    model (``moe``) NF4-dq with the experts too. On several GPUs, inference is tried both as
    replicas and split over the GPUs (``parallel="tensor"``), full fine-tuning with each ZeRO stage.
    """
    allowed = check_precisions(precisions)
    modes = [mode] if mode else ["full", "lora", "qlora", "inference"]
    out = []
    for m in modes:
        if m == "inference":
            served = dict.fromkeys(base_weights("inference", p) for p in allowed)
            formats = (None, "int8", "nf4-dq") + (("nf4-dq" + EXPERTS_SUFFIX,) if moe else ())
            out += [Setup(mode=m, precision=p, weights=w, batch=batch, seq=seq, gpus=gpus, parallel=par, device=device)
                    for p in served for par in (("data", "tensor") if gpus > 1 else ("data",)) for w in formats]
            continue
        rank = {"lora_rank": lora_rank} if m in ("lora", "qlora") else {}
        for precision in (allowed if m == "full" else [p for p in allowed if p != "bf16"]):
            for optimizer in ("adamw", "adamw8bit"):
                for ckpt in CHECKPOINTING:
                    for zero in ((0, 1, 2, 3) if gpus > 1 and m == "full" else (0,)):
                        out.append(Setup(mode=m, precision=precision, optimizer=optimizer, batch=batch, seq=seq,
                                         checkpointing=ckpt, gpus=gpus, zero=zero, device=device, **rank))
    return out


def plan(model: str | Path | Any, gpu_memory: int, mode: str | None = None, batch: int = 1, seq: int = DEFAULT_SEQ,
         gpus: int = 1, precisions: Any = DEFAULT_PRECISIONS, device: str = "cuda",
         cpu_memory: int | None = None, lora_rank: int = 16) -> list[PlanOption]:
    """The setups whose estimated peak per GPU fits ``gpu_memory`` bytes (and whose host bytes fit
    ``cpu_memory``, when given): training first, then inference, each cheapest compute first (ties:
    least memory first). Each training setup of ``candidates`` comes with the cheapest of its
    ``variants`` that fits (the techniques it needs, and the micro-batch; ``_first_fit``).
    ``precisions`` restricts the precisions tried (a T4 has no bf16: ``("fp16-mixed", "fp32")``); ``device`` picks the
    attention kernels (``Setup.device``); ``lora_rank`` the rank of LoRA's and QLoRA's adapters."""
    fields = load_config(model) if isinstance(model, (str, Path)) else config_fields(model)
    fits = []
    for base in candidates(mode, batch, seq, gpus, precisions, shape_of(fields).experts > 0, device, lora_rank):
        option = _first_fit(fields, variants(base), gpu_memory, cpu_memory)
        if option:
            fits.append(option)
    return sorted(fits, key=lambda o: (job_of(o.estimate.setup.mode) != "training", o.cost, o.estimate.bytes["total"]))


def _option(fields: dict[str, Any], setup: Setup) -> PlanOption:
    return PlanOption(estimate=estimate(fields, setup), recipe=str(recipe_of(setup)), cost=cost(setup))


def _fits(o: PlanOption, gpu_memory: int, cpu_memory: int | None) -> bool:
    return o.estimate.bytes["total"] <= gpu_memory and (cpu_memory is None
                                                         or o.estimate.host_bytes["total"] <= cpu_memory)


WORTH = 0.01  # a technique that costs nothing is added when it saves at least this fraction of the peak


def _first_fit(fields: dict[str, Any], setups: list[Setup], gpu_memory: int,
               cpu_memory: int | None) -> PlanOption | None:
    """Of ``setups`` (cheapest first, then fewest techniques), the first that fits both budgets, or
    a later one of the same cost that needs ``WORTH`` less memory: techniques that cost nothing (the
    chunked loss, say) are taken whenever they save memory. None when nothing fits."""
    best = None
    for setup in setups:
        option = _option(fields, setup)
        if best and option.cost > best.cost:
            break
        if _fits(option, gpu_memory, cpu_memory) and (
                best is None or option.estimate.bytes["total"] < (1 - WORTH) * best.estimate.bytes["total"]):
            best = option
    return best


def _options(fields: dict[str, Any], mode: str | None, batch: int, seq: int, gpus: int, precisions: Any,
             device: str, lora_rank: int = 16) -> list[PlanOption]:
    """Every candidate setup with every variant (``variants``) and its estimate, fitting or not."""
    moe = shape_of(fields).experts > 0
    return [_option(fields, v) for base in candidates(mode, batch, seq, gpus, precisions, moe, device, lora_rank)
            for v in variants(base)]


@dataclass(frozen=True)
class Shortfall:
    """What ``plan`` answers for a job (training or inference) of which nothing fits the budget.

    ``leanest`` is the candidate needing the least memory per GPU, ``over`` the bytes it needs beyond
    the budget and ``weights`` the bytes per GPU of its weights alone (when they exceed the budget, no
    shorter context or smaller batch can help). ``gpus``/``at_gpus``: the fewest GPUs of the same
    budget (among ``GPU_COUNTS``) on which something fits at the asked batch and context, and the
    cheapest thing that does; None when more GPUs cannot help (LoRA and QLoRA keep a whole model
    per GPU here) or when even 1024 are not enough. ``seq``: the longest context that fits on the
    GPUs asked for at the asked batch (``at_seq`` the cheapest option there), ``batch`` the largest
    batch that fits at the asked context; None when not even 1 fits (or the batch asked was 1).
    ``host_short``: with a host budget, the cheapest option that fits the GPU but needs more host
    memory than that budget (None when there is none, or no host budget).
    """

    job: str
    budget: int
    leanest: PlanOption
    gpus: int | None
    at_gpus: PlanOption | None
    seq: int | None
    at_seq: PlanOption | None
    batch: int | None
    host_short: PlanOption | None = None

    @property
    def over(self) -> int:
        """Bytes per GPU the leanest candidate needs beyond the budget."""
        return self.leanest.estimate.bytes["total"] - self.budget

    @property
    def weights(self) -> int:
        """Bytes per GPU of the leanest candidate's weights alone."""
        return self.leanest.estimate.bytes["weights"]

    def to_dict(self, model: str) -> dict[str, Any]:
        """JSON-ready: every number in bytes, tokens, sequences or GPUs, with the commands that fit."""
        def option(o: PlanOption | None) -> dict[str, Any] | None:
            return None if o is None else {"recipe": o.recipe, "total": o.estimate.bytes["total"],
                                           "host": o.estimate.host_bytes["total"], "command": o.command(model)}

        return {"job": self.job, "leanest": option(self.leanest), "over": self.over, "weights": self.weights,
                "fewest_gpus": self.gpus, "at_fewest_gpus": option(self.at_gpus),
                "longest_seq": self.seq, "at_longest_seq": option(self.at_seq), "largest_batch": self.batch,
                "over_host_memory": option(self.host_short)}


def _cheapest_fit(options: list[PlanOption], budget: int, cpu_memory: int | None = None) -> PlanOption | None:
    fits = [o for o in options if _fits(o, budget, cpu_memory)]
    return min(fits, key=lambda o: (o.cost, o.estimate.bytes["total"]), default=None)


def _largest(fits: Any, low: int, high: int) -> int | None:
    """The largest n in [low, high] with ``fits(n)`` (``fits`` true up to some n, false after), or None."""
    if high < low or not fits(low):
        return None
    while low < high:  # fits(low) holds
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def shortfall(model: str | Path | Any, gpu_memory: int, job: str, mode: str | None = None, batch: int = 1,
              seq: int = DEFAULT_SEQ, gpus: int = 1, precisions: Any = DEFAULT_PRECISIONS,
              device: str = "cuda", cpu_memory: int | None = None, lora_rank: int = 16) -> Shortfall:
    """What to say when nothing of ``job`` ("training" or "inference"; only ``mode`` when given)
    fits ``gpu_memory`` bytes per GPU at ``batch`` x ``seq`` on ``gpus`` GPUs (see ``Shortfall``).

    Pure arithmetic: the longest context and the largest batch are bisections over the estimate
    (memory grows with each), the fewest GPUs a scan of ``GPU_COUNTS`` above ``gpus``.
    """
    fields = load_config(model) if isinstance(model, (str, Path)) else config_fields(model)
    modes = [mode] if mode else list(JOBS[job])

    def options(b: int, s: int, n: int) -> list[PlanOption]:
        return [o for m in modes for o in _options(fields, m, b, s, n, precisions, device, lora_rank)]

    def fits(b: int, s: int) -> bool:
        return _cheapest_fit(options(b, s, gpus), gpu_memory, cpu_memory) is not None

    asked = options(batch, seq, gpus)
    leanest = min(asked, key=lambda o: o.estimate.bytes["total"])
    host_short = None if cpu_memory is None else _cheapest_fit(asked, gpu_memory)
    at_gpus, fewest = None, None
    if "full" in modes or "inference" in modes:  # ZeRO and tensor parallelism divide the model
        for n in (c for c in GPU_COUNTS if c > gpus):
            at_gpus = _cheapest_fit(options(batch, seq, n), gpu_memory, cpu_memory)
            if at_gpus:
                fewest = n
                break
    longest = _largest(lambda s: fits(batch, s), 1, seq - 1)
    largest = _largest(lambda b: fits(b, seq), 1, batch - 1)
    at_seq = _cheapest_fit(options(batch, longest, gpus), gpu_memory, cpu_memory) if longest else None
    return Shortfall(job=job, budget=gpu_memory, leanest=leanest, gpus=fewest, at_gpus=at_gpus, seq=longest,
                     at_seq=at_seq, batch=largest, host_short=host_short)
