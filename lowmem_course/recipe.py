"""Recipes: the techniques of one training run, written as ``qlora+checkpointing+bf16``.

A recipe names a mode (``full``, ``lora`` or ``qlora``), optionally ``checkpointing``, and optionally
a mixed precision (``bf16`` or ``fp16``; fp32 when absent), joined by ``+`` in any order. It is the
shared language of ``lowmem plan`` (which recommends one) and ``lowmem train`` (which runs one).
Light on purpose: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe."""

    mode: str = "full"
    precision: str = "fp32"  # autocast dtype of the forward pass; "fp32" means no autocast
    checkpointing: bool = False

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """Read ``"qlora+checkpointing+bf16"``; ``ValueError`` names the part it cannot read."""
        parts = [p.strip().lower() for p in text.split("+") if p.strip()]
        modes = [p for p in parts if p in MODES]
        precisions = [p for p in parts if p in PRECISIONS]
        unknown = [p for p in parts if p not in (*MODES, *PRECISIONS, "checkpointing")]
        if unknown or len(modes) != 1 or len(precisions) > 1 or len(parts) != len(set(parts)):
            raise ValueError(f"cannot read recipe {text!r}: write one of {'/'.join(MODES)}, then optionally "
                             f"+checkpointing and +{'/+'.join(PRECISIONS[1:])}, e.g. qlora+checkpointing+bf16")
        return cls(mode=modes[0], precision=precisions[0] if precisions else "fp32",
                   checkpointing="checkpointing" in parts)

    def __str__(self) -> str:
        parts = [self.mode] + (["checkpointing"] if self.checkpointing else [])
        return "+".join(parts + ([self.precision] if self.precision != "fp32" else []))

    @property
    def estimator_precision(self) -> str:
        """The estimator's name for this precision ("fp32", "bf16-mixed" or "fp16-mixed")."""
        return self.precision if self.precision == "fp32" else f"{self.precision}-mixed"
