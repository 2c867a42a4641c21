"""GPUs by name: how much memory a card gives a PyTorch program, and whether it runs bf16 and FP8.

``lowmem plan MODEL --gpu rtx-4090`` and ``lowmem estimate ... --gpu t4`` read this table; ``lowmem
gpus`` prints it. Two numbers per card, both in bytes:

- ``total``: the memory the driver reports (``nvidia-smi``'s ``memory.total``, in MiB), as printed on
  a fresh card in the public logs named beside each row. It is less than the vendor's marketed size
  (an "80 GB" H100 reports 81,559 MiB = 79.6 GiB; the "24 GB" of an RTX 4090 are 24,564 MiB).
- ``usable``: ``total`` minus ``CUDA_RESERVE``, an allowance (not measured here) for what a PyTorch
  process cannot allocate: the memory CUDA keeps from the driver's total (a T4's deviceQuery reports
  15,102 MiB of nvidia-smi's 15,360 MiB) and the CUDA context PyTorch creates (a few hundred MiB,
  depending on the driver, the CUDA version and lazy module loading). On your card,
  ``torch.cuda.mem_get_info()[0]`` right after ``torch.cuda.init()`` says the real figure: pass it
  as ``--gpu-memory`` for an exact plan.

bf16 needs compute capability 8.0 (Ampere) or newer; FP8 matmuls need 8.9 (Ada) or newer. The
estimator has no FP8 recipe yet; the column says which cards would run one.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_course.units import GiB, MiB

CUDA_RESERVE = 768 * MiB  # bytes a PyTorch process cannot allocate (an allowance, see the module docstring)


@dataclass(frozen=True)
class Gpu:
    """One card: its name on the command line, the driver's memory total in bytes, and its 16/8-bit support."""

    name: str  # what --gpu reads, e.g. "rtx-4090"
    product: str  # the name nvidia-smi prints
    spec: str  # the vendor's marketed memory
    total: int  # bytes: nvidia-smi's memory.total on a fresh card
    bf16: bool  # bf16 tensor cores: compute capability >= 8.0
    fp8: bool  # FP8 tensor cores: compute capability >= 8.9

    @property
    def usable(self) -> int:
        """Bytes a PyTorch process can allocate: ``total`` minus ``CUDA_RESERVE``."""
        return self.total - CUDA_RESERVE

    @property
    def precisions(self) -> tuple[str, ...]:
        """The training precisions the planner tries on this card (no bf16 before Ampere: fp16 autocast, fp32)."""
        return ("bf16-mixed", "bf16") if self.bf16 else ("fp16-mixed", "fp32")


# memory.total (MiB) as nvidia-smi prints it on an idle card; the public log quoted for each row.
GPUS: dict[str, Gpu] = {g.name: g for g in (
    # Tesla T4 (Turing, sm75), vendor spec 16 GB GDDR6; nvidia-smi "0MiB / 15360MiB" (e.g. Colab's free tier)
    Gpu("t4", "Tesla T4", "16 GB GDDR6", 15360 * MiB, bf16=False, fp8=False),
    # L4 (Ada, sm89), vendor spec 24 GB GDDR6 with ECC; nvidia-smi "0MiB / 23034MiB"
    Gpu("l4", "NVIDIA L4", "24 GB GDDR6", 23034 * MiB, bf16=True, fp8=True),
    # GeForce RTX 3090 (Ampere, sm86), vendor spec 24 GB GDDR6X; nvidia-smi "1MiB / 24576MiB"
    Gpu("rtx-3090", "NVIDIA GeForce RTX 3090", "24 GB GDDR6X", 24576 * MiB, bf16=True, fp8=False),
    # GeForce RTX 4090 (Ada, sm89), vendor spec 24 GB GDDR6X; nvidia-smi "0MiB / 24564MiB"
    Gpu("rtx-4090", "NVIDIA GeForce RTX 4090", "24 GB GDDR6X", 24564 * MiB, bf16=True, fp8=True),
    # A100 40GB (Ampere, sm80), vendor spec 40 GB HBM2; nvidia-smi "0MiB / 40960MiB"
    Gpu("a100-40gb", "NVIDIA A100-SXM4-40GB", "40 GB HBM2", 40960 * MiB, bf16=True, fp8=False),
    # L40S (Ada, sm89), vendor spec 48 GB GDDR6 with ECC; nvidia-smi "0MiB / 46068MiB"
    Gpu("l40s", "NVIDIA L40S", "48 GB GDDR6", 46068 * MiB, bf16=True, fp8=True),
    # A100 80GB (Ampere, sm80), vendor spec 80 GB HBM2e; nvidia-smi "0MiB / 81920MiB"
    Gpu("a100-80gb", "NVIDIA A100-SXM4-80GB", "80 GB HBM2e", 81920 * MiB, bf16=True, fp8=False),
    # H100 SXM 80GB (Hopper, sm90), vendor spec 80 GB HBM3; nvidia-smi "0MiB / 81559MiB"
    Gpu("h100-80gb", "NVIDIA H100 80GB HBM3", "80 GB HBM3", 81559 * MiB, bf16=True, fp8=True),
    # H200 (Hopper, sm90), vendor spec 141 GB HBM3e; nvidia-smi "0MiB / 143771MiB"
    Gpu("h200", "NVIDIA H200", "141 GB HBM3e", 143771 * MiB, bf16=True, fp8=True),
)}


def gpu(name: str) -> Gpu:
    """The card called ``name`` (case and ``_``/`` `` for ``-`` ignored); ``ValueError`` naming the known ones."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}: choose one of {', '.join(GPUS)} (lowmem gpus lists them), "
                         "or give --gpu-memory")
    return GPUS[key]


def table() -> str:
    """The table ``lowmem gpus`` prints: each card's spec, driver total and usable memory in GiB, bf16 and FP8."""
    rows = [f"{'--gpu':<11} {'card':<24} {'vendor spec':<13} {'total GiB':>9} {'usable GiB':>10}  bf16  fp8"]
    for g in GPUS.values():
        rows.append(f"{g.name:<11} {g.product:<24} {g.spec:<13} {g.total / GiB:9.2f} {g.usable / GiB:10.2f}  "
                    f"{'yes' if g.bf16 else 'no':<4}  {'yes' if g.fp8 else 'no'}")
    rows.append(f"usable = the driver's total (nvidia-smi) minus {CUDA_RESERVE // MiB} MiB for CUDA and its context, "
                "an allowance; torch.cuda.mem_get_info() on your card gives the real figure (--gpu-memory)")
    return "\n".join(rows)
