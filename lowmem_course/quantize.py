"""Quantize: weights in 8 and 4 bits (bitsandbytes), and QLoRA on top of them.

The formats are bitsandbytes' own, loaded the way a learner loads a Hub model
(``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``):

- ``int8``: LLM.int8(), one int8 per weight and one fp32 scale per output row;
- ``fp4`` / ``nf4``: 4-bit codes in blocks of 64 weights with one fp32 absmax per block;
- ``nf4-dq``: NF4 with double quantization, the absmax themselves in 8 bits (QLoRA's format).

The module also closes the gaps users fall into: bitsandbytes' CPU repacking of 4-bit weights
(``disable_cpu_repacking``), the fused 3-D expert weights of transformers 5's MoE layers that 4-bit
loading leaves in 16 bits (``quantize_experts``), and the small optimizer states of LoRA adapters
(``make_optimizer``). Byte counts are bytes; bits per weight are bits.

QLoRA teaches the 4-bit student a skill it never saw (``SkillConfig``, ``teach``); the result ships
as an adapter under ``students/adapters/<task>/`` with the recipe and accuracy it reached::

    python -m lowmem_course.quantize teach --out runs/subtraction   # retrain the shipped adapter (~5 min CPU)
    python -m lowmem_course.quantize eval subtraction   # its accuracy on 500 held-out problems
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from bitsandbytes.functional import QuantState
from transformers import BitsAndBytesConfig

from lowmem_course import family

FORMATS = ("int8", "fp4", "nf4", "nf4-dq", "fp4-dq")
FUSED_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # transformers 5's 3-D MoE expert parameters
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw8bit")


def bnb_config(fmt: str, compute_dtype: torch.dtype = torch.bfloat16,
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


def load_quantized(name_or_path: str | Path, fmt: str, device: str | torch.device = "cpu",
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


def storage_bytes(model: torch.nn.Module) -> StorageBytes:
    """Measure the bytes of ``model``'s weights from its real buffers (see ``StorageBytes``)."""
    seen: set[int] = set()
    sums = dict.fromkeys(("codes", "constants", "tables", "other"), 0)
    quantized = 0

    def add(role: str, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            sums[role] += tensor.untyped_storage().nbytes()

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

def add_lora(model: torch.nn.Module, rank: int = 8, alpha: int = 16, upcast: bool = False,
             checkpointing: bool = False, seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` in PEFT LoRA adapters on every linear map (QLoRA's "all-linear"); returns the PeftModel.

    ``upcast=True`` runs ``peft.prepare_model_for_kbit_training`` first, which casts every
    non-quantized parameter (embeddings, norms, lm_head) to fp32: more stable in fp16, but it costs
    2 extra bytes per such parameter. ``checkpointing=True`` turns on activation checkpointing with
    the input gradients LoRA needs. CPU repacking is switched off first.
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
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: torch.nn.Module, name: str = "adamw", lr: float = 1e-3,
                   min_8bit_size: int = 4096) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters: "adamw", "adamw8bit" or "paged-adamw8bit".

    The 8-bit AdamW of bitsandbytes keeps both moments in 1 byte (blockwise quantized) instead of 4,
    but only for tensors of at least ``min_8bit_size`` elements; smaller ones (the LoRA matrices of a
    small model) keep fp32 moments. "paged" moments live in CUDA unified memory, which the driver
    moves to CPU RAM when the GPU runs out; on a CPU there is nothing to page and bitsandbytes falls
    back to the plain 8-bit optimizer (with a warning).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, min_8bit_size=min_8bit_size)
    if name == "paged-adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, min_8bit_size=min_8bit_size)
    raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")


def train_adapters(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int,
                   schedule: Callable[[int], float] | None = None, grad_clip: float | None = None,
                   progress: bool = False) -> list[float]:
    """Train for ``steps`` steps on ``batches(step) -> (input_ids, labels)``; returns the losses (nats/token).

    Plain loop: forward with labels, backward, optimizer step. ``schedule(step)`` sets the learning
    rate of every step (default: the optimizer's), ``grad_clip`` clips the trainable parameters'
    gradient norm. The model is left in eval mode.
    """
    if steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    model.train()
    for step in tqdm(range(steps), desc="train adapters", disable=not progress):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
        input_ids, labels = batches(step)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# A new skill for the 4-bit student: the recipe, the run, the shipped adapter.

ADAPTERS_DIR = family.STUDENTS_DIR / "adapters"  # shipped QLoRA adapters, one folder per skill
ADAPTER_EVAL_N, ADAPTER_EVAL_SEED = 500, 0  # the held-out set each adapter's recipe.json records
ADAPTER_TARGET_ACCURACY = 0.80  # what a shipped adapter must reach on its task


@dataclass(frozen=True)
class SkillConfig:
    """The recipe of a QLoRA run that teaches the shipped ``arch`` student a ``task`` of ``reasoning``.

    The base is the student in ``fmt`` (frozen), the adapters LoRA of ``rank`` on every linear map;
    AdamW at ``lr`` after ``warmup`` linear steps, cosine decay to ``lr * min_lr_ratio``;
    ``batch_size`` fresh training-split problems per step. ``checkpointing`` recomputes each
    decoder layer in backward (as the QLoRA paper does): same gradients, fewer saved activations.
    """

    task: str = "subtraction"
    arch: str = "qwen2"
    fmt: str = "nf4-dq"
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-2
    warmup: int = 20
    min_lr_ratio: float = 0.1
    steps: int = 400
    batch_size: int = 64
    grad_clip: float = 1.0
    checkpointing: bool = True
    seed: int = 0

    def learning_rate(self, step: int) -> float:
        """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def skill_batches(cfg: SkillConfig) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batches(step)``: ``cfg.batch_size`` training-split ``cfg.task`` problems, fresh and seeded per step.

    Tokenized with ``reasoning.make_tokenizer()``, the tokenizer the students were trained with (it
    keeps ``<think>`` and ``</think>`` as one token each in the traces).
    """
    from lowmem_course import reasoning, student

    tok = reasoning.make_tokenizer()

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        problems = reasoning.sample(cfg.batch_size, seed=cfg.seed * 1_000_003 + step, split="train", task=cfg.task)
        return student.make_batch(problems, tok)

    return batches


def teach(cfg: SkillConfig, device: str | torch.device = "cpu", progress: bool = True,
          batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
          ) -> tuple[torch.nn.Module, Any, list[float]]:
    """Run ``cfg``: the 4-bit student with fresh adapters, trained on ``cfg.task``.

    ``batches(step) -> (input_ids, labels)`` replaces ``skill_batches(cfg)`` (say, to mix tasks).
    Returns the PeftModel (eval mode), the student's tokenizer and the loss of every step (nats per
    target token). Seeded: the same config gives the same adapters on the same machine.
    """
    from lowmem_course import reasoning, student

    torch.manual_seed(cfg.seed)
    base = student.student_dir(cfg.arch)
    tok = reasoning.make_tokenizer()
    model = add_lora(load_quantized(base, cfg.fmt, device=device), rank=cfg.rank, alpha=cfg.alpha,
                     checkpointing=cfg.checkpointing, seed=cfg.seed)
    optimizer = make_optimizer(model, "adamw", lr=cfg.lr)
    losses = train_adapters(model, optimizer, batches or skill_batches(cfg), cfg.steps, schedule=cfg.learning_rate,
                            grad_clip=cfg.grad_clip, progress=progress)
    return model, tok, losses


def adapter_dir(name: str) -> Path:
    """Where the shipped adapter ``name`` lives (``adapter_model.safetensors`` + ``recipe.json``)."""
    return ADAPTERS_DIR / name


def adapter_recipe(name_or_path: str | Path) -> tuple[Path, dict]:
    """The folder and recipe of a saved adapter: a shipped adapter's name ("subtraction") or a
    directory written by ``save_adapter``. ``FileNotFoundError`` without ``recipe.json``, ``ValueError``
    (one line) when it is not a recipe with a ``skill_config``."""
    import json

    path = Path(name_or_path)
    if not path.is_dir():
        path = adapter_dir(str(name_or_path))
    if not (path / "recipe.json").is_file():
        raise FileNotFoundError(f"no adapter at {name_or_path!r}: expected a folder with recipe.json "
                                f"(shipped: {', '.join(sorted(p.name for p in ADAPTERS_DIR.glob('*'))) or 'none'})")
    try:
        recipe = json.loads((path / "recipe.json").read_text())
        SkillConfig(**recipe["skill_config"])
    except (ValueError, RecursionError, TypeError, KeyError) as err:  # not JSON, not an object, unknown fields
        raise ValueError(f"{path / 'recipe.json'} is not an adapter recipe with a skill_config "
                         f"({type(err).__name__}: {err})") from None
    return path, recipe


def load_adapter(name_or_path: str | Path, device: str | torch.device = "cpu",
                 ) -> tuple[torch.nn.Module, Any, dict]:
    """The 4-bit student with a saved adapter on top, the reasoning tokenizer and the adapter's recipe.

    ``name_or_path`` is a shipped adapter's name ("subtraction") or a directory written by
    ``save_adapter`` (``adapter_recipe``). The base is loaded in the recipe's format, CPU repacking
    switched off.
    """
    from peft import PeftModel

    from lowmem_course import reasoning, student

    path, recipe = adapter_recipe(name_or_path)
    cfg = SkillConfig(**recipe["skill_config"])
    base = student.student_dir(cfg.arch)
    model = PeftModel.from_pretrained(load_quantized(base, cfg.fmt, device=device), path).eval()
    disable_cpu_repacking(model)
    return model, reasoning.make_tokenizer(), recipe


def save_adapter(model: torch.nn.Module, out: Path, losses: list[float], recipe: dict) -> None:
    """Write the adapters (``save_pretrained``: safetensors + adapter config), ``loss.csv`` and ``recipe.json``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    name_base(out, f"student-{recipe.get('skill_config', {}).get('arch', SkillConfig.arch)}")
    from lowmem_course.student import write_record

    write_record(out, list(enumerate(losses, start=1)), recipe)


def name_base(adapter: Path, base: str) -> None:
    """Record ``base`` (a name such as ``student-qwen2``) as the base model in a saved adapter's
    ``adapter_config.json``, instead of the path PEFT wrote (this machine's, maybe a temporary folder)."""
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``teach`` a skill with QLoRA into ``--out``, or ``eval`` a saved adapter; bad input: one line, exit 2."""
    import shlex
    import sys
    import time
    from dataclasses import asdict

    from lowmem_course import reasoning, student
    from lowmem_course.cmdline import Parser, check_out_folder, positive_int

    parser = Parser(prog="python -m lowmem_course.quantize",
                    description="QLoRA adapters that teach the 4-bit student a new skill")
    sub = parser.add_subparsers(dest="command", required=True)
    p_teach = sub.add_parser("teach", help="train an adapter from its seed and save it to --out")
    p_teach.add_argument("--task", choices=sorted(reasoning.TASKS), default=SkillConfig.task)
    p_teach.add_argument("--out", type=Path, required=True,
                         help="directory to save to (outside the package: the shipped adapter is never overwritten)")
    p_teach.add_argument("--steps", type=positive_int, default=SkillConfig.steps)
    p_teach.add_argument("--seed", type=int, default=SkillConfig.seed)
    p_eval = sub.add_parser("eval", help="exact-match accuracy of a saved adapter on the 4-bit student")
    p_eval.add_argument("adapter", help="a shipped adapter's name (e.g. subtraction) or a directory")
    p_eval.add_argument("--n", type=positive_int, default=ADAPTER_EVAL_N, help="number of held-out problems")
    p_eval.add_argument("--seed", type=int, default=ADAPTER_EVAL_SEED, help="seed that draws the held-out problems")
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            path, recipe = adapter_recipe(args.adapter)
            task = recipe["skill_config"]["task"]
            reasoning.check_available(args.n, "heldout", task)
            model, tok, _ = load_adapter(path)
            print(f"{task} accuracy: {student.accuracy(model, tok, n=args.n, seed=args.seed, task=task):.3f}")
            return 0
        check_out_folder(args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.fail(err)
    cfg = SkillConfig(task=args.task, steps=args.steps, seed=args.seed)
    fix_cpu_dequantize()
    before_model = load_quantized(student.student_dir(cfg.arch), cfg.fmt)
    start = time.perf_counter()
    model, tok, losses = teach(cfg)
    wall = time.perf_counter() - start
    before = student.accuracy(before_model, tok, n=ADAPTER_EVAL_N, seed=ADAPTER_EVAL_SEED, task=cfg.task)
    acc = student.accuracy(model, tok, n=ADAPTER_EVAL_N, seed=ADAPTER_EVAL_SEED, task=cfg.task)
    args_text = shlex.join(argv if argv is not None else sys.argv[1:])
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python -m lowmem_course.quantize {args_text}"
    save_adapter(model, args.out, losses, dict(
        command=command, skill_config=asdict(cfg), trainable_parameters=trainable_parameters(model),
        wall_seconds=round(wall, 1), final_loss=round(sum(losses[-10:]) / len(losses[-10:]), 6),
        accuracy_before=before, accuracy=acc, eval_n=ADAPTER_EVAL_N, eval_seed=ADAPTER_EVAL_SEED,
        eval_split="heldout", threads=torch.get_num_threads(), torch=torch.__version__))
    print(f"saved to {args.out} ({wall:.0f} s)")
    print(f"{cfg.task} accuracy: {before:.3f} -> {acc:.3f}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
