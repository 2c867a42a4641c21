"""Capstone: plan a recipe for a real memory budget, check it in miniature, train it with one command.

Three steps, each a few calls::

    budget = Budget("7B on a 24 GB card", "r1-distill-qwen-7b", 24 * GiB, seq=4096)
    options = plan(budget)                    # what fits, cheapest compute first
    best = choose(budget, options)            # the one `lowmem train` can run (or the serving setup)
    best.train_recipe                         # "lora+bf16-mixed+checkpointing"

    ratios, measured, predicted = miniature("student-qwen2", ["lora"], data, workdir)  # ratios to "full"

``plan`` is ``estimate.plan`` for one budget: the budget's precisions (a T4 has no bf16: fp16-mixed
and fp32 only), its task (training setups or serving setups) and its GPUs (serving on several tries
the model split over them and, for a MoE model, its experts in 4 bits, as ``quantize.quantize_experts``
stores them). ``miniature`` runs recipes through ``lowmem_course.train`` (the ``lowmem train`` command)
on a tiny model and compares the ratios of the measured peaks with the estimator's ratios for the
same config and batch. Bytes are bytes; nothing here converts to GiB.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem_course import estimate as est

TASKS = ("train", "serve")
Setup = est.Setup
# Serving weight formats, least quantized first (``choose`` keeps the most quality that fits).
SERVING_FORMATS = (None, "bf16", "fp16", "fp32", "int8", "nf4-dq", "nf4-dq" + est.EXPERTS_SUFFIX)


@dataclass(frozen=True)
class Budget:
    """A memory budget: what to run (``task`` "train" or "serve") on which GPUs.

    ``gpu_memory`` is the usable bytes of one GPU; ``batch`` and ``seq`` count sequences and tokens
    per GPU (serving split over the GPUs: served by all of them together). ``bf16=False`` describes
    GPUs without bf16 (T4, V100): setups then use fp16-mixed or fp32, never bf16.
    """

    label: str
    model: str
    gpu_memory: int
    gpus: int = 1
    task: str = "train"
    batch: int = 1
    seq: int = 1024
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("gpu_memory", "gpus", "batch", "seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The estimator precisions this GPU runs (``estimate.plan``'s ``precisions``)."""
        return est.DEFAULT_PRECISIONS if self.bf16 else ("fp16-mixed", "fp32")


@dataclass(frozen=True)
class Option(est.PlanOption):
    """One setup that fits a budget: ``estimate.PlanOption`` (estimate per GPU, recipe, relative cost)."""

    @property
    def train_recipe(self) -> str | None:
        """The recipe when ``lowmem train`` runs it here (training, one replica per GPU; paged
        optimizers need CUDA), else None (serving, ZeRO sharded over several GPUs)."""
        s = self.estimate.setup
        return self.recipe if s.mode != "inference" and not s.zero and s.optimizer != "paged-adamw8bit" else None

    @property
    def total(self) -> int:
        """Predicted peak bytes per GPU."""
        return self.estimate.bytes["total"]

    @property
    def experts_4bit(self) -> bool:
        """True when the MoE experts are stored in 4 bits as well (``nf4-dq+experts``)."""
        return (self.estimate.setup.weights or "").endswith(est.EXPERTS_SUFFIX)


def plan(budget: Budget) -> list[Option]:
    """``estimate.plan`` for ``budget``: the setups of its task, in its precisions, whose estimated
    peak per GPU fits; cheapest compute first (ties: least memory first)."""
    mode = "inference" if budget.task == "serve" else None
    options = est.plan(budget.model, budget.gpu_memory, mode=mode, batch=budget.batch, seq=budget.seq,
                       gpus=budget.gpus, precisions=budget.precisions)
    return [Option(estimate=o.estimate, recipe=o.recipe, cost=o.cost)
            for o in options if budget.task == "serve" or o.estimate.setup.mode != "inference"]


def choose(budget: Budget, options: list[Option]) -> Option | None:
    """The option to run. Training: the cheapest one ``lowmem train`` can run, with plain AdamW
    when that fits (8-bit moments change the optimizer's arithmetic: only when needed). Serving: the
    least-quantized weights that fit (most quality), replicas before a split model, then least memory."""
    if budget.task == "serve":
        return min(options, key=lambda o: (SERVING_FORMATS.index(o.estimate.setup.weights),
                                           o.estimate.setup.parallel != "data", o.total), default=None)
    runnable = [o for o in options if o.train_recipe]
    return next((o for o in runnable if o.estimate.setup.optimizer == "adamw"), runnable[0] if runnable else None)


def naive(budget: Budget) -> est.Estimate:
    """What one would try first: full fine-tuning with autocast, or serving 16-bit weights on one GPU."""
    precision = "bf16-mixed" if budget.bf16 else "fp16-mixed"
    if budget.task == "serve":
        setup = Setup(mode="inference", precision="bf16", batch=budget.batch, seq=budget.seq)
    else:
        setup = Setup(mode="full", precision=precision, batch=budget.batch, seq=budget.seq)
    return est.estimate(budget.model, setup)


# ----------------------------------------------------------------------------------------------
# Compute: what memory techniques do not buy.

def train_flops(parameters: int, tokens: int, setup: Setup) -> int:
    """Floating-point operations to train on ``tokens`` tokens (the 6 N T rule).

    Forward 2 N T, backward 4 N T for full fine-tuning; LoRA and QLoRA skip the weight gradients of
    the frozen base (backward 2 N T, the adapters being negligible); checkpointing runs the forward
    twice (+2 N T). Quantized weights save no operations: they are dequantized for every matmul.
    """
    backward = 4 if setup.mode == "full" else 2
    recompute = 2 if setup.checkpointing == "full" else 0
    return (2 + backward + recompute) * parameters * tokens


# ----------------------------------------------------------------------------------------------
# The plan in miniature: run recipes through `lowmem train` and compare ratios with the estimator.

def write_data(path: str | Path, n: int = 32, seed: int = 0, task: str = "subtraction") -> Path:
    """Write ``n`` teacher traces of ``task`` (``lowmem_course.reasoning``) as ``lowmem train`` data."""
    from lowmem_course.reasoning import sample

    path = Path(path)
    rows = (json.dumps({"prompt": p.prompt, "response": p.completion}) for p in sample(n, seed, "train", task))
    path.write_text("".join(row + "\n" for row in rows))
    return path


def train_argv(model: str, recipe: str, data: str | Path, out: str | Path, steps: int = 2, batch: int = 8,
               max_tokens: int = 32, *extra: str) -> list[str]:
    """The ``lowmem train`` arguments of one run (every example is cut to ``max_tokens`` tokens)."""
    return ["--model", model, "--recipe", recipe, "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--batch", str(batch), "--max-tokens", str(max_tokens), *extra]


def estimator_config(model: str) -> dict[str, Any]:
    """The config fields of a ``lowmem train --model`` value, as the estimator reads them."""
    from lowmem_course import family

    if model.startswith("tiny:"):
        from lowmem_course.reasoning import MODEL_VOCAB_SIZE

        return est.config_fields(family.tiny(model.removeprefix("tiny:"), vocab_size=MODEL_VOCAB_SIZE))
    return est.load_config(family.student_path(model) or model)


def measure_recipe(model: str, recipe: str, data: str | Path, out: str | Path, batch: int = 8,
                   seq: int = 32, steps: int = 2) -> dict[str, int]:
    """Run ``recipe`` through ``lowmem_course.train`` and return its last step's measured components
    (``validate.measured_components``: weights, gradients, optimizer, activations, total)."""
    from lowmem_course import measure, train, validate

    args = train.parser().parse_args(train_argv(model, recipe, data, out, steps, batch, seq, "--overwrite",
                                                "--save-every", str(steps), "--no-progress"))
    with contextlib.redirect_stdout(io.StringIO()):  # the run prints its memory report
        report = train.train(args)
    m = measure.Measurement(**report["memory"])
    return validate.measured_components(m)


@dataclass(frozen=True)
class Ratio:
    """Peak bytes of ``recipe`` over those of ``baseline`` on one model: estimated and measured."""

    model: str
    recipe: str
    baseline: str
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """Relative error of the predicted ratio: predicted / measured - 1."""
        return self.predicted / self.measured - 1


def miniature(model: str, recipes: list[str], data: str | Path, workdir: str | Path, baseline: str = "full",
              batch: int = 8, seq: int = 32,
              ) -> tuple[list[Ratio], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Run ``baseline`` and ``recipes`` on ``model`` (``tiny:<member>``, a student or a directory)
    through ``lowmem train``; returns the ratios and the measured and predicted components by recipe.

    Every example is cut to ``seq`` tokens, so each batch is exactly ``batch`` x ``seq``, the
    shape the estimator is given.
    """
    from lowmem_course import validate

    fields = estimator_config(model)
    measured, predicted = {}, {}
    for recipe in dict.fromkeys([baseline, *recipes]):
        out = Path(workdir) / f"{model.replace(':', '_')}-{recipe}"
        measured[recipe] = measure_recipe(model, recipe, data, out, batch, seq)
        setup = est.setup_of(recipe, batch=batch, seq=seq, device="cpu")
        predicted[recipe] = validate.predicted_components(est.estimate(fields, setup))
    ratios = [Ratio(model=model, recipe=r, baseline=baseline,
                    predicted=predicted[r]["total"] / predicted[baseline]["total"],
                    measured=measured[r]["total"] / measured[baseline]["total"]) for r in recipes]
    return ratios, measured, predicted
