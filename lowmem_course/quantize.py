"""Quantize: weights in 8 and 4 bits (bitsandbytes), and QLoRA on top of them.

The formats are bitsandbytes' own, loaded the way a learner loads a Hub model
(``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``):

- ``int8``: LLM.int8(), one int8 per weight and one fp32 scale per output row;
- ``fp4`` / ``nf4``: 4-bit codes in blocks of 64 weights with one fp32 absmax per block;
- ``nf4-dq``: NF4 with double quantization, the absmax themselves in 8 bits (QLoRA's format).

The module also closes the gaps users fall into: bitsandbytes' CPU repacking of 4-bit weights
(``disable_cpu_repacking``) and the fused 3-D expert weights of transformers 5's MoE layers that 4-bit
loading leaves in 16 bits (``quantize_experts``). Byte counts are bytes; bits per weight are bits.
The 8-bit optimizers are in ``lowmem_course.optimizers``; the QLoRA run that teaches the 4-bit
student a new skill, and its shipped adapter, in ``lowmem_course.skills``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.functional import QuantState
from transformers import BitsAndBytesConfig

from lowmem_course import family, measure

Format = Literal["int8", "fp4", "nf4", "nf4-dq", "fp4-dq"]
FORMATS: tuple[str, ...] = get_args(Format)
FUSED_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # transformers 5's 3-D MoE expert parameters


def bnb_config(fmt: Format, compute_dtype: torch.dtype = torch.bfloat16,
               skip_modules: list[str] | None = None) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` that loads a model in ``fmt`` (one of ``FORMATS``).

    ``compute_dtype`` is the dtype 4-bit weights are dequantized to for each matmul;
    ``skip_modules`` names modules to keep unquantized (transformers always keeps ``lm_head``).
    """
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt.removesuffix("-dq"),
                              bnb_4bit_use_double_quant=fmt.endswith("-dq"),
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


_CPU_DEQUANTIZE_FIXED = False


def fix_cpu_dequantize() -> None:
    """Route bitsandbytes' CPU 4-bit dequantization to its own generic implementation (idempotent).

    The native CPU kernel (AVX-512) indexes the absmax of each 64-weight block per row, so on any
    weight whose rows are not a multiple of 64 long (the twins' 96-wide layers) it dequantizes with
    the wrong scales: 25% relative weight error instead of NF4's 9%. The generic implementation that
    bitsandbytes itself uses for odd shapes is exact. This replaces the CPU kernel process-wide;
    CUDA is untouched.
    """
    global _CPU_DEQUANTIZE_FIXED
    if _CPU_DEQUANTIZE_FIXED:
        return
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                        shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        packed = A.view(torch.uint8).reshape(-1)
        n = math.prod(shape)
        values = _get_4bit_code(quant_type, A.device)[torch.stack([packed >> 4, packed & 15], -1).reshape(-1).long()]
        blocks = torch.nn.functional.pad(values, (0, absmax.numel() * blocksize - values.numel()))
        return (blocks.view(-1, blocksize) * absmax.float()[:, None]).reshape(-1)[:n].reshape(shape).to(dtype)

    with warnings.catch_warnings():  # torch warns that it replaces the registered CPU kernel: we mean to
        warnings.simplefilter("ignore", UserWarning)
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
    _CPU_DEQUANTIZE_FIXED = True


def load_quantized(name_or_path: str | Path, fmt: Format, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> torch.nn.Module:
    """Load a model (save_pretrained directory, shipped student or Hub id) with its linear maps in ``fmt``.

    Everything bitsandbytes does not quantize (embeddings, norms, ``lm_head``, MoE routers and fused
    experts) is loaded in ``dtype``. CPU repacking is switched off (see ``disable_cpu_repacking``).
    """
    fix_cpu_dequantize()
    model = family.load(name_or_path, quantization_config=bnb_config(fmt, compute_dtype=dtype),
                        dtype=dtype, device_map={"": str(device)}, **kwargs)
    disable_cpu_repacking(model)
    return model


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on CPU; returns the number of ``Linear4bit`` layers.

    On a CPU with AVX512-BF16, a ``Linear4bit`` that runs forward in eval mode without gradients
    rewrites its weight into an inference-only layout; training afterwards fails on layers with a
    bias and silently drops the gradient of the layer's input on the others (so LoRA adapters below
    it stop learning). This sets ``support_avx512bf16_for_cpu = False`` on every layer and undoes
    any repacking already done. Harmless on CUDA.
    """
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(
                layer.weight.data, layer.weight.quant_state)
    return len(layers)


# ----------------------------------------------------------------------------------------------
# What a quantized model holds, byte for byte.

@dataclass(frozen=True)
class StorageBytes:
    """The bytes of a model's weights, split by role; shared storages are counted once.

    ``quantized_weights`` is the number of weights stored in 8 or 4 bits; their ``codes`` (the
    packed 8/4-bit values), ``constants`` (absmax / row scales, nested absmax and offsets) and
    ``tables`` (the per-tensor 16- or 256-entry lookup tables of the 4-bit formats) hold them.
    ``other`` is every other parameter and buffer (embeddings, norms, lm_head, unquantized experts).
    """

    quantized_weights: int
    codes: int
    constants: int
    tables: int
    other: int

    @property
    def total(self) -> int:
        """Every byte of the model's parameters, buffers and quantization state."""
        return self.codes + self.constants + self.tables + self.other

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, counting codes, constants and lookup tables."""
        return 8 * (self.codes + self.constants + self.tables) / self.quantized_weights

    @property
    def bits_per_weight_without_tables(self) -> float:
        """Bits per quantized weight from the buffers that grow with the weight count."""
        return 8 * (self.codes + self.constants) / self.quantized_weights


def _quant_state_tensors(state: QuantState) -> Iterator[tuple[str, torch.Tensor]]:
    """(role, tensor) for every tensor of a 4-bit quant state: constants, then tables."""
    yield "constants", state.absmax
    yield "tables", state.code
    if state.nested:
        yield "constants", state.offset
        yield "constants", state.state2.absmax
        yield "tables", state.state2.code


def _expert_states(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, QuantState]]:
    return getattr(module, "_lowmem_4bit", {})


def storage_breakdown(model: torch.nn.Module) -> StorageBytes:
    """Measure the bytes of ``model``'s weights from its real buffers, by role (see ``StorageBytes``).

    ``measure.storage_bytes`` counts each storage once, in the first role that claims it.
    """
    counted: set[tuple[str, int]] = set()
    sums = dict.fromkeys(("codes", "constants", "tables", "other"), 0)
    quantized = 0

    def add(role: str, tensor: torch.Tensor) -> None:
        sums[role] += measure.storage_bytes(tensor, counted=counted)

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            quantized += module.in_features * module.out_features
            add("codes", module.weight)
            for role, tensor in _quant_state_tensors(module.weight.quant_state):
                add(role, tensor)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            quantized += module.weight.numel()
            add("codes", module.weight)
            add("constants", module.weight.SCB)
        for packed, state in _expert_states(module).values():
            quantized += state.shape.numel()
            add("codes", packed)
            for role, tensor in _quant_state_tensors(state):
                add(role, tensor)
    for tensor in [*model.parameters(), *model.buffers()]:
        add("other", tensor)
    return StorageBytes(quantized_weights=quantized, **sums)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a quantized linear layer computes with (fp32, shape out x in)."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach().float()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def layer_errors(reference: torch.nn.Module, quantized: torch.nn.Module) -> dict[str, float]:
    """Relative error ``||W_q - W|| / ||W||`` (Frobenius) of every quantized linear layer, by name."""
    ref = dict(reference.named_modules())
    errors = {}
    for name, module in quantized.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            w = ref[name].weight.detach().float()
            errors[name] = ((dequantized_weight(module) - w).norm() / w.norm()).item()
    return errors


# ----------------------------------------------------------------------------------------------
# MoE experts: transformers 5 stores them as fused 3-D parameters, which 4-bit loading skips.

def fused_expert_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules holding fused 3-D expert weights (``gate_up_proj``, ``down_proj``)."""
    return [m for m in model.modules()
            if any(isinstance(m._parameters.get(n), torch.Tensor) and m._parameters[n].dim() == 3
                   for n in FUSED_EXPERT_WEIGHTS)]


def _dequantize_experts(module: torch.nn.Module, args: tuple) -> None:
    for name, (packed, state) in _expert_states(module).items():
        setattr(module, name, bnbF.dequantize_4bit(packed, state))


def _drop_dequantized(module: torch.nn.Module, args: tuple, output: Any) -> None:
    for name in _expert_states(module):
        delattr(module, name)


def quantize_experts(model: torch.nn.Module, quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Store the fused 3-D expert weights of every MoE layer in 4 bits; returns how many tensors.

    Each ``gate_up_proj`` / ``down_proj`` is quantized with bitsandbytes' blockwise 4-bit format
    (the one ``Linear4bit`` uses) and kept as a buffer of packed codes; a forward pre-hook
    dequantizes it to its original dtype for the layer's forward only, so at rest the experts take
    4.1-4.5 bits per weight. The experts become frozen (use LoRA on the other layers to train).
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    fix_cpu_dequantize()
    count = 0
    for module in fused_expert_modules(model):
        states = {}
        for name in FUSED_EXPERT_WEIGHTS:
            weight = module._parameters.pop(name).detach()
            packed, state = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                               quant_type=quant_type)
            module.register_buffer(f"{name}_4bit", packed)
            states[name] = (packed, state)
            count += 1
        module._lowmem_4bit = states
        module.register_forward_pre_hook(_dequantize_experts)
        module.register_forward_hook(_drop_dequantized)
    return count


# ----------------------------------------------------------------------------------------------
# QLoRA: LoRA adapters on the frozen 4-bit base.

def _cast_outside_autocast(layer: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a LoRA layer: peft casts the adapters' input to their dtype only where no
    autocast runs on the input's device (see ``share_adapter_inputs``)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        kind = x.device.type
        layer.cast_input_dtype_enabled = not (torch.amp.is_autocast_available(kind)
                                              and torch.is_autocast_enabled(kind))


def share_adapter_inputs(model: torch.nn.Module) -> int:
    """Let every LoRA adapter of ``model`` read its input as it is under autocast; returns the number
    of adapted layers. ``add_lora`` calls it; call it yourself on a model wrapped by ``get_peft_model``.

    peft casts each adapter's input to the adapter's dtype (``x.to(lora_A.weight.dtype)``: fp32
    adapters on a 16-bit base), so that ``lora_A``'s matmul sees matching dtypes. Under autocast the
    cast is pointless and costly: autocast casts that fp32 copy straight back to 16 bits for the
    matmul, and autograd saves that 16-bit copy for ``lora_A``'s backward, so each adapter keeps its
    own copy of its input. Without the cast, ``lora_A`` saves the very tensor the layer received, one
    tensor for all the adapters that read it (q, k and v read the same norm output, gate and up
    another). On an 8B Llama the seven copies are 76 KiB per token and layer, the tensors they copy
    44 KiB: 32 KiB (8 x hidden bytes) per token and layer saved. The numbers are the same, bit for bit
    (with ``add_lora``'s dropout of 0): fp32 holds every 16-bit value exactly, autocast casts the
    copy back, and the input's gradient arrives in 16 bits either way. Without autocast the cast is
    needed (a bf16 input against fp32 adapters fails with a dtype mismatch): there peft keeps casting.
    (peft's 4- and 8-bit layers already skip the cast under CUDA's autocast, not under the CPU's.)

    The choice is made at every call, from the autocast state on the input's device, by a forward
    pre-hook on each layer (peft's ``cast_input_dtype_enabled``). It stays on the model: a
    checkpointed layer's recompute in backward runs under the autocast state of its forward (torch's
    checkpoint restores it), so it shares too, where a context manager around the step would have
    ended. Idempotent.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        if not getattr(layer, "_lowmem_shares_input", False):
            layer.register_forward_pre_hook(_cast_outside_autocast)
            layer._lowmem_shares_input = True
    return len(layers)


def add_lora(model: torch.nn.Module, rank: int = 8, alpha: int = 16, upcast: bool = False,
             checkpointing: bool = False, seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` in PEFT LoRA adapters on ``family.lora_modules`` (QLoRA's "all-linear": every linear
    map of attention and the MLP; attention only on DeepSeek-V3, as the estimator counts); returns the PeftModel.

    ``upcast=True`` runs ``peft.prepare_model_for_kbit_training`` first, which casts every
    non-quantized parameter (embeddings, norms, lm_head) to fp32: more stable in fp16, but it costs
    2 extra bytes per such parameter. ``checkpointing=True`` turns on activation checkpointing with
    the input gradients LoRA needs. CPU repacking is switched off first. Under autocast the adapters
    read their 16-bit input as it is, without a copy of their own (``share_adapter_inputs``); without
    autocast they compute in their own dtype, as peft does.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    disable_cpu_repacking(model)
    if upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        model.activation_checkpointing_enable()  # also sets input gradients (enable_input_require_grads)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=family.lora_modules(model),
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    share_adapter_inputs(model)
    return model


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def name_base(adapter: Path, base: str) -> None:
    """Record ``base`` (a name such as ``student-qwen2``) as the base model in a saved adapter's
    ``adapter_config.json``, instead of the path PEFT wrote (this machine's, maybe a temporary folder)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
