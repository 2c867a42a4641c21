"""Check the estimator against the ruler: run a ``Setup`` on a real model, measure it, compare.

This is the only module that reads both ``estimate`` and ``measure``; it sits above them. The grid
uses tiny twins of the three architectures (Qwen2, Llama, DeepseekV3), sized so that every
component of the breakdown is well above 1 MiB while each step takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from lowmem_course import checkpointing, family, measure, precision, steps
from lowmem_course.estimate import Estimate, Setup, estimate
from lowmem_course.recipe import FLAGS, ONE_GPU_TECHNIQUES, base_weights
from lowmem_course.units import MiB

TOLERANCE = 0.05  # on the total
COMPONENT_TOLERANCE = 0.10  # on each component over 1 MiB
GRID_VOCAB = 4096
GRID_MODELS = ("r1-distill-qwen-1.5b", "r1-distill-llama-8b", "r1")


def grid_config(name: str) -> Any:
    """The tiny twin the grid runs: a 4096-token vocabulary makes the logits a real part of the peak."""
    return family.tiny(name, vocab_size=GRID_VOCAB)


def _autocast_dtype(setup: Setup) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(setup.precision)


def build_for(cfg: Any, setup: Setup, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of ``setup``: its weights as ``recipe.base_weights`` says, checkpointing on, LoRA adapters
    attached as ``lowmem train`` attaches them (``quantize.add_lora``)."""
    if setup.mode in ("qlora", "inference") and setup.weights not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"measuring {setup.weights} weights needs bitsandbytes on CUDA; not run here")
    dtype = precision.DTYPES[base_weights(setup.mode, setup.precision)]
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = setup.attention
    model = family.build(cfg, device=device, dtype=dtype)
    if setup.mode == "inference":
        return model.eval()
    recompute = setup.checkpointing == "full"
    if setup.mode in ("lora", "qlora"):
        from lowmem_course import quantize

        model = quantize.add_lora(model, rank=setup.lora_rank, alpha=2 * setup.lora_rank, checkpointing=recompute)
    elif recompute:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if setup.tiled_mlp:
        checkpointing.tile_mlp(model)
    return model.train()


def measure_setup(cfg: Any, setup: Setup, device: str | torch.device = "cpu") -> measure.Measurement:
    """Run one steady-state step of ``setup`` on a real model of ``cfg`` and measure it.

    The training techniques of ``setup`` run as ``lowmem train`` runs them: ``accumulate``
    micro-batches, the chunked loss and offloaded activations in ``steps.train_step``, the optimizer
    stepped in backward or on the host by ``optimizers.make_optimizer``.
    """
    model = build_for(cfg, setup, device)
    ids = steps.random_batch(cfg.vocab_size, setup.batch, setup.seq, device=device)
    label = describe(setup)
    if setup.mode == "inference":
        with measure.track(model, label=label) as m:
            cache = steps.prefill_step(model, ids)
            del cache
        return m
    optimizer = measure.make_optimizer(model, setup.optimizer, step_in_backward=setup.step_in_backward,
                                       offload=setup.offload_optimizer)
    step = functools.partial(steps.train_step, autocast_dtype=_autocast_dtype(setup), accumulate=setup.accumulate,
                             chunked_loss=setup.chunked_loss, offload_activations=setup.offload_activations)
    return measure.measure_train_step(model, optimizer, ids, label=label, step=step)


def describe(setup: Setup) -> str:
    """A short label such as ``full bf16-mixed ckpt s=256``, or ``full fp32 offload-optimizer accum2 b=2 s=256``."""
    parts = [setup.mode, setup.precision] + ["ckpt"] * (setup.checkpointing == "full")
    parts += [token for token in ONE_GPU_TECHNIQUES if getattr(setup, FLAGS[token])]
    parts += [f"accum{setup.accumulate}"] * (setup.accumulate > 1)
    return " ".join([*parts, f"b={setup.batch}", f"s={setup.seq}"])


def measured_components(m: measure.Measurement) -> dict[str, int]:
    """A measurement's breakdown in the estimator's words (activations include temporaries; for
    inference the KV cache is inside activations, so it is compared as a sum). On CUDA the total is
    the allocator's peak (what an out-of-memory error is about), on CPU the tracker's. ``host`` is
    the peak of the host memory that offloaded tensors held (not part of the total)."""
    b = m.breakdown
    return {"weights": b["parameters"] + b["buffers"], "gradients": b["gradients"], "optimizer": b["optimizer"],
            "activations": b["activations"] + b["temporaries"] + b["other"],
            "total": m.allocator_peak_bytes if m.allocator_peak_bytes is not None else m.peak_bytes,
            "host": m.host_peak_bytes}


def predicted_components(e: Estimate) -> dict[str, int]:
    """An estimate's breakdown on the same keys as ``measured_components`` (``host``: what it keeps
    in host memory, ``Estimate.host_bytes``)."""
    b = e.bytes
    return {"weights": b["weights"], "gradients": b["gradients"], "optimizer": b["optimizer"],
            "activations": b["activations"] + b["kv_cache"], "total": b["total"], "host": e.host_bytes["total"]}


@dataclass(frozen=True)
class Comparison:
    """Predicted and measured bytes of one setup, component by component."""

    model: str
    setup: Setup
    predicted: dict[str, int]
    measured: dict[str, int]

    def error(self, key: str = "total") -> float:
        """Relative error of ``key``: (predicted - measured) / measured."""
        return (self.predicted[key] - self.measured[key]) / max(self.measured[key], 1)

    def component_errors(self) -> dict[str, float]:
        """Relative errors of the components (host bytes too, where both sides have them) of which
        either side is over 1 MiB."""
        keys = [k for k in ("weights", "gradients", "optimizer", "activations", "host")
                if k in self.predicted and k in self.measured]
        return {k: self.error(k) for k in keys if max(self.predicted[k], self.measured[k]) > MiB}

    @property
    def ok(self) -> bool:
        """Total within 5%, every component over 1 MiB within 10%."""
        return abs(self.error()) <= TOLERANCE and all(abs(v) <= COMPONENT_TOLERANCE
                                                      for v in self.component_errors().values())


def compare(name: str, setup: Setup, device: str | torch.device = "cpu", config: Any = None) -> Comparison:
    """Estimate and measure ``setup`` on the grid twin of ``name``, or on ``config`` (another twin of it)."""
    cfg = grid_config(name) if config is None else config
    kind = "cpu" if torch.device(device).type == "cpu" else "cuda"
    predicted = predicted_components(estimate(cfg, replace(setup, device=kind)))
    measured = measured_components(measure_setup(cfg, setup, device))
    return Comparison(model=name, setup=setup, predicted=predicted, measured=measured)


TECHNIQUE_SETUPS = (  # every one-GPU technique token at least once (seq 128: in ``lowmem validate --quick``)
    Setup(mode="full", precision="bf16-mixed", batch=2, seq=128, chunked_loss=True),
    Setup(mode="full", precision="fp32", batch=2, seq=128, checkpointing="full", offload_activations=True),
    Setup(mode="full", precision="bf16-mixed", batch=2, seq=128, offload_optimizer=True),
    Setup(mode="full", precision="bf16", batch=2, seq=128, checkpointing="full", step_in_backward=True,
          chunked_loss=True),
    Setup(mode="lora", precision="bf16-mixed", batch=2, seq=128, checkpointing="full", offload_activations=True,
          chunked_loss=True, accumulate=2),
    Setup(mode="full", precision="fp32", batch=2, seq=128, checkpointing="full", tiled_mlp=True),
)


def grid() -> list[tuple[str, Setup]]:
    """The validation grid: 3 architectures x modes x precisions x checkpointing x 3 lengths, and
    each training technique (``TECHNIQUE_SETUPS``)."""
    setups = []
    for seq in (64, 128, 256):
        setups += [Setup(mode="full", precision="fp32", batch=2, seq=seq),
                   Setup(mode="full", precision="bf16-mixed", batch=2, seq=seq),
                   Setup(mode="full", precision="fp32", batch=2, seq=seq, checkpointing="full"),
                   Setup(mode="lora", precision="bf16-mixed", batch=2, seq=seq),
                   Setup(mode="inference", precision="bf16", batch=2, seq=seq)]
    return [(name, s) for name in GRID_MODELS for s in (*setups, *TECHNIQUE_SETUPS)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_grid(device: str | torch.device = "cpu", items: list[tuple[str, Setup]] | None = None) -> list[Comparison]:
    """Compare every setup of the grid (or ``items``) on ``device``."""
    with _quiet():
        return [compare(name, setup, device) for name, setup in (items if items is not None else grid())]
