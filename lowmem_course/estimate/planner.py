"""The planner: which recipes fit a memory budget, cheapest compute first, and what each costs."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem_course.estimate.config import config_fields, load_config, shape_of
from lowmem_course.estimate.memory import (CHECKPOINTING, EXPERTS_SUFFIX, PRECISIONS, Estimate, Setup,
                                           estimate, recipe_of)
from lowmem_course.recipe import base_weights

# Compute cost of each technique relative to bf16 full fine-tuning (forward + backward = 6 x params
# x tokens): rough, published-order-of-magnitude factors used to rank, not to predict time.
COST = {"full": 1.0, "lora": 0.7, "qlora": 0.85, "inference": 0.33, "checkpointing": 1.33, "fp32": 2.0,
        "zero": 1.1, "tensor": 1.1}
DEFAULT_PRECISIONS = ("bf16-mixed", "bf16")  # what ``plan`` tries unless told: GPUs with bf16


@dataclass(frozen=True)
class PlanOption:
    """One setup that fits: its estimate, recipe (``qlora+bf16-mixed+checkpointing``) and relative cost."""

    estimate: Estimate
    recipe: str
    cost: float

    def command(self, model: str, data: str = "data.jsonl") -> str:
        """The command that runs this option: ``lowmem train`` for a training recipe (one replica per
        GPU), ``lowmem estimate`` for the others (serving and ZeRO are estimated, not run)."""
        s = self.estimate.setup
        name = shlex.quote(str(model))
        if s.mode != "inference" and not s.zero:
            run = f"runs/{Path(str(model)).name.lower()}-{self.recipe.replace('+', '-')}"
            extra = f" --lora-rank {s.lora_rank}" if s.mode != "full" and s.lora_rank != 16 else ""
            return (f"lowmem train --model {name} --recipe {self.recipe} --data {shlex.quote(data)} "
                    f"--out {shlex.quote(run)} --batch {s.batch} --max-tokens {s.seq}{extra}")
        gpus = f" --gpus {s.gpus}" if s.gpus > 1 else ""
        return f"lowmem estimate {name} --recipe {self.recipe} --batch {s.batch} --seq {s.seq}{gpus}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: cost and the estimate (which carries the recipe)."""
        return {"cost": round(self.cost, 3), **self.estimate.to_dict()}


def cost(setup: Setup) -> float:
    """Relative compute cost of ``setup`` (``COST``: bf16 full fine-tuning = 1), for ranking only."""
    cost = COST[setup.mode]
    if setup.mode != "inference" and setup.checkpointing == "full":
        cost *= COST["checkpointing"]
    if setup.precision == "fp32":
        cost *= COST["fp32"]
    if setup.zero:
        cost *= COST["zero"]
    if setup.parallel == "tensor":
        cost *= COST["tensor"]
    return cost


def check_precisions(precisions: Any) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(precisions))
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad or not chosen:
        raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}, got {', '.join(map(str, bad)) or 'none'}")
    return chosen


def candidates(mode: str | None, batch: int, seq: int, gpus: int, precisions: Any = DEFAULT_PRECISIONS,
               moe: bool = False, device: str = "cuda") -> list[Setup]:
    """The setups ``plan`` tries (every mode when ``mode`` is None) in the allowed ``precisions``.

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
        for precision in (allowed if m == "full" else [p for p in allowed if p != "bf16"]):
            for optimizer in ("adamw", "adamw8bit"):
                for ckpt in CHECKPOINTING:
                    for zero in ((0, 1, 2, 3) if gpus > 1 and m == "full" else (0,)):
                        out.append(Setup(mode=m, precision=precision, optimizer=optimizer, batch=batch, seq=seq,
                                         checkpointing=ckpt, gpus=gpus, zero=zero, device=device))
    return out


def plan(model: str | Path | Any, gpu_memory: int, mode: str | None = None, batch: int = 1, seq: int = 1024,
         gpus: int = 1, precisions: Any = DEFAULT_PRECISIONS, device: str = "cuda") -> list[PlanOption]:
    """The setups whose estimated peak per GPU fits ``gpu_memory`` bytes, cheapest compute first
    (ties: least memory first). ``precisions`` restricts the precisions tried (a T4 has no bf16:
    ``("fp16-mixed", "fp32")``); ``device`` picks the attention kernels (``Setup.device``);
    ``candidates`` lists what is tried."""
    fields = load_config(model) if isinstance(model, (str, Path)) else config_fields(model)
    moe = shape_of(fields).experts > 0
    fits = []
    for setup in candidates(mode, batch, seq, gpus, precisions, moe, device):
        e = estimate(fields, setup)
        if e.bytes["total"] <= gpu_memory:
            fits.append(PlanOption(estimate=e, recipe=str(recipe_of(setup)), cost=cost(setup)))
    return sorted(fits, key=lambda o: (o.cost, o.estimate.bytes["total"]))
