"""The memory model: the peak bytes per device of one setup, phase by phase, from a config's shape.

Model states (weights, gradients, optimizer state; ZeRO), what autograd saves per token in this
family's layers as transformers runs them, the transient peaks of backward, the KV cache and the
prefill temporaries of inference. Bytes, always.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from lowmem_course.estimate.config import (
    Linear,
    Parameters,
    Shape,
    config_fields,
    count,
    is_moe,
    layer_linears,
    load_config,
    lora_targets,
    shape_of,
)
from lowmem_course.recipe import (
    FLAGS,
    MODES,
    ONE_GPU_TECHNIQUES,
    OPTIMIZERS,
    PRECISIONS,
    WEIGHTS,
    Mode,
    OptimizerName,
    Precision,
    Recipe,
    RecipeError,
    base_weights,
)

Checkpointing = Literal["none", "full"]
CHECKPOINTING: tuple[str, ...] = get_args(Checkpointing)
EXPERTS_SUFFIX = "+experts"  # the routed MoE experts quantized too (``quantize.quantize_experts``), inference only
WEIGHT_FORMATS = ("fp32", "bf16", "fp16", *WEIGHTS, "nf4-dq" + EXPERTS_SUFFIX)
Parallel = Literal["data", "tensor"]
PARALLEL: tuple[str, ...] = get_args(Parallel)
Attention = Literal["sdpa", "eager"]
ATTENTION: tuple[str, ...] = get_args(Attention)
HOST_PARTS = ("weights", "gradients", "optimizer", "activations", "total")  # Estimate.host_bytes' keys
Device = Literal["cuda", "cpu"]
DEVICES: tuple[str, ...] = get_args(Device)


@dataclass(frozen=True)
class Setup:
    """One way to run a model; every byte count the estimator returns for it is per device.

    ``batch`` and ``seq`` count sequences and tokens per device. ``precision`` "bf16-mixed" is
    torch autocast over fp32 weights (full fine-tuning) or over a 16-bit frozen base (LoRA); "bf16"
    is pure bf16. ``weights`` is the storage of the frozen base (``None``: the precision's own
    16/32-bit format; NF4 with double quantization under QLoRA). ``checkpointing="full"``
    recomputes every decoder layer in backward. ``zero`` shards optimizer state (1), gradients
    (2) and parameters (3) over ``gpus``. ``device`` picks the attention kernels ("cpu": MLA falls
    back to SDPA's math path); ``attention="eager"`` materialises the s x s scores.

    ``parallel="tensor"`` (inference only) serves one model from ``gpus`` GPUs: attention heads,
    MLPs, embeddings and lm_head split over them (tensor parallel), routed experts dealt out whole
    (expert parallel). ``batch`` then counts the sequences the whole group serves (every GPU works on
    all of them). ``weights="nf4-dq+experts"`` (inference only) stores the fused MoE experts in NF4-dq
    as well, which bitsandbytes loading alone leaves in 16 bits.

    Training techniques (the recipe tokens of the same names): ``accumulate`` runs the ``batch`` as
    that many micro-batches of ``batch // accumulate`` sequences; ``chunked_loss`` makes the loss's
    logits a chunk of tokens at a time; ``offload_activations`` keeps what backward needs (with
    checkpointing: the layers' inputs) in host memory; ``step_in_backward`` steps each parameter as
    its gradient is made and frees the gradient; ``offload_optimizer`` keeps AdamW's state, and
    steps, on the host; ``tiled_mlp`` (with full checkpointing) runs each MLP a tile of
    ``hidden`` tokens at a time, saving only its input.
    """

    mode: Mode = "full"
    precision: Precision = "bf16-mixed"
    optimizer: OptimizerName = "adamw"
    batch: int = 1
    seq: int = 1024
    checkpointing: Checkpointing = "none"
    gpus: int = 1
    zero: int = 0
    lora_rank: int = 16
    weights: str | None = None  # one of WEIGHT_FORMATS
    attention: Attention = "sdpa"
    device: Device = "cuda"
    parallel: Parallel = "data"
    accumulate: int = 1
    chunked_loss: bool = False
    offload_activations: bool = False
    step_in_backward: bool = False
    offload_optimizer: bool = False
    tiled_mlp: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                              ("checkpointing", CHECKPOINTING), ("attention", ATTENTION),
                              ("device", DEVICES), ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        for name in ("batch", "seq", "gpus", "lora_rank", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.parallel == "tensor" and (self.mode != "inference" or self.zero):
            raise ValueError("parallel='tensor' models inference only, without ZeRO")
        if self.batch % self.accumulate:
            raise ValueError(f"accumulate ({self.accumulate}) must divide the batch ({self.batch}) into equal "
                             "micro-batches")
        training_only = [FLAGS[token] for token in ONE_GPU_TECHNIQUES if getattr(self, FLAGS[token])]
        if self.mode == "inference" and (training_only or self.accumulate > 1):
            raise ValueError(f"{', '.join(training_only) or 'accumulate'} applies to training, not inference")
        if self.tiled_mlp and self.mode != "inference" and self.checkpointing != "full":
            raise ValueError("tiled_mlp tiles the MLP inside checkpointed layers: needs checkpointing='full'")
        if self.weights and self.weights.endswith(EXPERTS_SUFFIX) and self.mode != "inference":
            raise ValueError(f"weights={self.weights!r} is for inference only: training would save every "
                             "layer's dequantized experts for backward")


@dataclass(frozen=True)
class Estimate:
    """The predicted peak of one setup, per device, in bytes."""

    model: str
    setup: Setup
    parameters: int
    active_parameters: int
    trainable_parameters: int
    bytes: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""  # the moment of the step the peak falls in, e.g. "loss backward"
    host_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOST_PARTS, 0))  # offloaded

    @property
    def recipe(self) -> str | None:
        """The setup's recipe (``recipe_of``), or None when no recipe describes it."""
        try:
            return str(recipe_of(self.setup))
        except RecipeError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``lowmem estimate --json`` output), with the recipe."""
        return {"model": self.model, "recipe": self.recipe, "setup": self.setup.__dict__, "parameters": self.parameters,
                "active_parameters": self.active_parameters,
                "trainable_parameters": self.trainable_parameters, "peak_phase": self.peak_phase,
                "bytes": dict(self.bytes), "host_bytes": dict(self.host_bytes)}



# ----------------------------------------------------------------------------------------------
# Bytes per element under each precision.

@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of each kind of tensor under one precision."""

    param: int  # trainable parameters (fp32 master weights under mixed precision)
    compute: int  # matmul outputs and what the kernels save
    residual: int  # the residual stream between layers (autocast keeps it in fp32)
    mixed: bool  # autocast: every matmul casts its inputs (and weights) to 16 bits and saves the copies


def dtypes(precision: str) -> Dtypes:
    """The element sizes of ``precision`` (fp32, bf16-mixed, fp16-mixed, pure bf16 or fp16)."""
    if precision == "fp32":
        return Dtypes(param=4, compute=4, residual=4, mixed=False)
    if precision in ("bf16", "fp16"):
        return Dtypes(param=2, compute=2, residual=2, mixed=False)
    return Dtypes(param=4, compute=2, residual=4, mixed=True)


# Bytes per weight of the frozen base under each storage format. 4-bit formats keep one absmax per
# block of 64 weights: fp32 (0.5 bits/weight) or, with double quantization, 8-bit absmax plus one fp32
# constant per 256 blocks (0.127 bits/weight); int8 keeps one fp32 scale per output row (not counted
# here: it is per row, added in ``weight_bytes``).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64,
                "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256), "fp4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}


# ----------------------------------------------------------------------------------------------
# Activations: what autograd saves, per token, for this family's layers as transformers runs them.

def _norm(d: int, x: int, consumers: int, t: Dtypes, frozen: bool = False) -> int:
    """Bytes per token an RMSNorm of width ``d`` saves on an input of ``x`` bytes per element.

    It saves its input in fp32 (the input itself, or an fp32 copy), 1/rms, the normalised input
    (only when its weight trains) and its output; under autocast each consuming linear saves its
    own 16-bit cast of the output instead.
    """
    output = consumers * d * 2 if t.mixed else (0 if consumers == 0 else d * x)
    return d * 4 + 4 + (0 if frozen else d * x) + output


def _attention_kernel(s: Shape, setup: Setup) -> str:
    """"flash" (fused SDPA: saves q, k, v, out, log-sum-exp), "math" (SDPA's fallback) or "eager".

    On CPU, SDPA's fused kernel needs equal q/k and v head sizes; MLA's (192 vs 128) falls back to
    the math path, which materialises the s x s probabilities like eager attention does.
    """
    if setup.attention == "eager":
        return "eager"
    if s.arch == "deepseek_v3" and setup.device == "cpu" and s.qk_nope + s.qk_rope != s.v_head_dim:
        return "math"
    return "flash"


def _attention_saved(s: Shape, setup: Setup, t: Dtypes) -> int:
    """Bytes per token saved by one attention block (projections, RoPE, SDPA/eager), norm excluded."""
    a, seq, kernel = t.compute, setup.seq, _attention_kernel(s, setup)
    if s.arch != "deepseek_v3":
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        if kernel == "flash":
            return (2 * q + 2 * kv) * a + 4 * s.heads
        rep = q if s.kv_heads != s.heads else kv  # eager repeats k and v to every head
        probs = s.heads * seq * (4 + (a if a != 4 else 0))
        return (2 * q + 2 * rep) * a + probs
    qk, v = s.qk_nope + s.qk_rope, s.v_head_dim
    query = s.heads * qk * max(a, t.residual)  # RoPE on the rope part promotes to the residual dtype
    q_path = (s.q_lora_rank * a + _norm(s.q_lora_rank, a, 1, t) - s.q_lora_rank * 4) if s.q_lora_rank else 0
    kv_in = (s.kv_lora_rank + s.qk_rope) * a if a == 4 else s.kv_lora_rank * 4
    kv_path = kv_in + 4 + s.kv_lora_rank * a + (s.kv_lora_rank * 2 if t.mixed else s.kv_lora_rank * a)
    kv_b = s.heads * (s.qk_nope + v) * a
    out = s.heads * v * a
    if kernel == "flash":
        return q_path + kv_path + kv_b + s.heads * qk * a * 2 + out + 4 * s.heads + (query - s.heads * qk * a)
    if kernel == "math":
        return q_path + kv_path + kv_b + out + s.heads * (2 * qk + v + seq) * 4
    return q_path + kv_path + kv_b + out + s.heads * (2 * qk) * a + s.heads * seq * (4 + (a if a != 4 else 0))


def _mlp_saved(s: Shape, moe: bool, setup: Setup, t: Dtypes) -> int:
    """Bytes per token saved by one MLP block: SwiGLU, or router + top-k experts + shared experts."""
    a, h = t.compute, s.hidden
    frozen = setup.mode != "full" and not any(x.name.endswith("down_proj") for x in lora_targets(s, moe))
    products = 3 if frozen else 4  # a frozen down_proj does not keep its input; an adapted one's adapter does
    if not moe:
        return products * s.intermediate * a
    shared = products * s.moe_intermediate * s.shared * a
    router = 4 * s.experts + 12 * s.top_k + (h * 4 if t.residual == 2 and not frozen else 0)
    e = 4 if t.param == 4 else 2  # grouped_mm is not autocast: experts compute in the weights' dtype
    experts = s.top_k * ((h * (1 if frozen else 2) + products * s.moe_intermediate) * e + 12)
    return shared + router + experts


_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def _lora_saved(s: Shape, moe: bool, setup: Setup, t: Dtypes, mlp: bool | None = None) -> int:
    """Bytes per token the adapters add: each saves A's output (rank r). Its input is the tensor its base
    layer reads, saved once for all the adapters that read it (counted with the norm, attention or MLP
    that makes it): under autocast too, where ``lowmem train`` lets the adapters read their 16-bit
    input as it is (``quantize.share_adapter_inputs``) instead of each saving its own 16-bit copy.

    ``mlp`` True counts the MLP's adapters only, False attention's only, None all of them.
    """
    if setup.mode not in ("lora", "qlora"):
        return 0
    return sum(setup.lora_rank * t.compute for x in lora_targets(s, moe)
               if mlp is None or x.name.endswith(_MLP_NAMES) == mlp)


def _layer_halves(s: Shape, layer: int, setup: Setup) -> tuple[int, int]:
    """Bytes per token decoder layer ``layer`` saves for backward: (attention half, MLP half).

    The attention half is the input norm, attention and its adapters; the MLP half the
    post-attention norm, the MLP (or router and experts) and its adapters. Backward runs the MLP
    half first and frees what it saved before attention's backward starts.
    """
    t = activation_dtypes(setup)
    moe = is_moe(s, layer)
    attn_consumers = 2 if s.arch == "deepseek_v3" else 3
    mlp_consumers = 2
    frozen = setup.mode != "full"
    attention = (_norm(s.hidden, t.residual, attn_consumers, t, frozen) + _attention_saved(s, setup, t)
                 + _lora_saved(s, moe, setup, t, mlp=False))
    mlp = (_norm(s.hidden, t.residual, mlp_consumers, t, frozen) + _mlp_saved(s, moe, setup, t)
           + _lora_saved(s, moe, setup, t, mlp=True))
    if moe and t.mixed:
        mlp += s.hidden * 4  # the router reads the norm's fp32 output itself
    if setup.tiled_mlp:  # the tiled MLP saves its input, the norm's output as it is; the rest lives in a tile
        mlp = _norm(s.hidden, t.residual, 0, t, frozen) + s.hidden * t.residual
    return attention, mlp


def tile_tokens(s: Shape, tokens: int) -> int:
    """Tokens of one tile of a tiled MLP (``Setup.tiled_mlp``): the hidden size (ALST's rule), at most ``tokens``."""
    return min(tokens, s.hidden)


def _tile_saved_per_token(s: Shape, layer: int, setup: Setup) -> int:
    """Bytes per token that one tile of layer ``layer``'s tiled MLP saves while its backward runs:
    what the MLP half saves untiled, but the norm's own tensors and (without autocast) its output,
    which is the tile's input."""
    t = activation_dtypes(setup)
    untiled = _layer_halves(s, layer, replace(setup, tiled_mlp=False))[1]
    return untiled - _norm(s.hidden, t.residual, 0, t, setup.mode != "full") - (0 if t.mixed else s.hidden * t.residual)


def layer_saved_per_token(s: Shape, layer: int, setup: Setup) -> int:
    """Bytes per token that decoder layer ``layer`` keeps for the backward pass (no checkpointing)."""
    return sum(_layer_halves(s, layer, setup))


# ----------------------------------------------------------------------------------------------
# Model states: weights, gradients and optimizer state per device.

def _optimizer_bytes_per_param(setup: Setup, param_bytes: int) -> float:
    """Optimizer state per trainable parameter (AdamW: two moments in the parameters' dtype)."""
    eight_bit = 2 + 8 / 2048  # two 1-byte moments, one fp32 absmax per block of 2048 (paged: the same bytes)
    return {"adamw": 2 * param_bytes, "adamw8bit": eight_bit, "paged-adamw8bit": eight_bit, "sgd": 0,
            "sgd-momentum": param_bytes}[setup.optimizer]


def _per_gpu(s: Shape, x: Linear, tp: int) -> int:
    """Elements of linear map ``x`` that each of ``tp`` tensor-parallel GPUs holds.

    Heads and MLP columns/rows split evenly; GQA keeps at least one key/value head per GPU (the
    heads are replicated when there are fewer than GPUs); MLA's down-projections (q_a, kv_a) and the
    router are replicated; routed experts are dealt out whole (expert parallel). Biases of row-parallel
    maps are counted as split (a few elements).
    """
    if tp == 1 or x.name in ("router", "q_a_proj", "kv_a_proj_with_mqa"):
        return x.parameters
    if x.name in ("k_proj", "v_proj"):
        width = -(-s.kv_heads // tp) * s.head_dim
        return x.d_in * width + (width if x.bias else 0)
    if x.count > 1:
        return -(-x.count // tp) * (x.parameters // x.count)
    return -(-x.parameters // tp)


def frozen_weight_bytes(s: Shape, n: Parameters, fmt: str, tp: int = 1) -> int:
    """Bytes of a frozen model stored as ``fmt``, per GPU when split over ``tp`` GPUs (tensor and
    expert parallel, see ``_per_gpu``; embeddings and lm_head split by vocabulary, norms replicated).

    8/4-bit formats quantize the decoder's linear maps only: embeddings, lm_head, norms and routed
    experts (3-D parameters) stay 16-bit, the router fp32; ``nf4-dq+experts`` quantizes the
    routed experts too. int8's per-row fp32 scales are split with the rows (4 bytes per row).
    """
    linears = [x for i in range(s.layers) for x in layer_linears(s, is_moe(s, i))]
    quantizable = [x for x in linears if x.count == 1 and x.name != "router"]
    linear = sum(_per_gpu(s, x, tp) for x in quantizable)
    router = sum(x.parameters for x in linears if x.name == "router")
    experts = sum(_per_gpu(s, x, tp) for x in linears if x.count > 1)
    norms = n.total - n.linear - n.experts - router - n.embedding
    rest = experts + -(-n.embedding // tp) + norms  # 16-bit under 8/4-bit formats (tp=1: total - linear - router)
    if fmt == "fp32":
        return 4 * (linear + router + rest)
    if fmt in ("bf16", "fp16"):
        return 2 * (linear + router + rest) + 2 * router
    base = fmt.removesuffix(EXPERTS_SUFFIX)
    quantized_experts = experts if fmt.endswith(EXPERTS_SUFFIX) else 0
    rows = -(-sum(x.d_out for x in quantizable) // tp) if base == "int8" else 0
    return (int((linear + quantized_experts) * WEIGHT_BYTES[base]) + 4 * rows
            + 2 * (rest - quantized_experts) + 4 * router)


def _weights_format(setup: Setup) -> str:
    """Storage format of the base weights (``recipe.base_weights``, the one place that decides it),
    with ``+experts`` when the routed experts are quantized too."""
    return setup.weights or base_weights(setup.mode, setup.precision)


def recipe_of(setup: Setup) -> Recipe:
    """The recipe a setup runs (``str()`` of it is what ``lowmem plan`` prints); ``RecipeError`` for
    a setup no recipe describes (say, LoRA in pure bf16). Inference names its 16-bit dtype
    (bf16-mixed serves bf16 weights)."""
    weights = (setup.weights or "").removesuffix(EXPERTS_SUFFIX)
    precision = setup.precision
    if setup.mode == "inference":
        precision = base_weights("inference", precision)
    return Recipe(mode=setup.mode, precision=precision, optimizer=setup.optimizer,
                  checkpointing=setup.checkpointing == "full", zero=setup.zero, accumulate=setup.accumulate,
                  chunked_loss=setup.chunked_loss, offload_activations=setup.offload_activations,
                  step_in_backward=setup.step_in_backward, offload_optimizer=setup.offload_optimizer,
                  tiled_mlp=setup.tiled_mlp, tensor_parallel=setup.gpus if setup.parallel == "tensor" else 1,
                  weights=weights if weights in WEIGHTS else None,
                  experts=bool(setup.weights and setup.weights.endswith(EXPERTS_SUFFIX)))


def setup_of(recipe: Recipe | str, batch: int = 1, seq: int = 1024, gpus: int | None = None, lora_rank: int = 16,
             attention: str = "sdpa", device: str = "cuda") -> Setup:
    """The estimator's ``Setup`` of ``recipe`` (a ``Recipe`` or its text) on a run of that shape.

    ``gpus`` defaults to what the recipe needs (``tpN``: N); a ``tpN`` recipe on another number of
    GPUs is refused. ``batch`` is the whole batch of a step per GPU (``accumN`` splits it).
    """
    r = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    gpus = gpus or r.gpus_needed
    if r.tensor_parallel > 1 and gpus != r.tensor_parallel:
        raise ValueError(f"recipe {r} splits the model over {r.tensor_parallel} GPUs, but the run has {gpus}")
    weights = r.weights and r.weights + (EXPERTS_SUFFIX if r.experts else "")
    return Setup(mode=r.mode, precision=r.precision, optimizer=r.optimizer, batch=batch, seq=seq,
                 checkpointing="full" if r.checkpointing else "none", gpus=gpus, zero=r.zero, lora_rank=lora_rank,
                 weights=weights, attention=attention, device=device,
                 parallel="tensor" if r.tensor_parallel > 1 else "data", accumulate=r.accumulate,
                 chunked_loss=r.chunked_loss, offload_activations=r.offload_activations,
                 step_in_backward=r.step_in_backward, offload_optimizer=r.offload_optimizer, tiled_mlp=r.tiled_mlp)


def adapter_parameters(s: Shape, rank: int) -> int:
    """LoRA parameters (A: r x d_in, B: d_out x r) over every target of every layer."""
    return sum(rank * (x.d_in + x.d_out) for i in range(s.layers) for x in lora_targets(s, is_moe(s, i)))


# ----------------------------------------------------------------------------------------------
# The estimate: the peak over the phases of a step.

@dataclass(frozen=True)
class _Phase:
    name: str
    gradients: int
    activations: int


def activation_dtypes(setup: Setup) -> Dtypes:
    """Element sizes of the activations: LoRA on a 16-bit (or 4-bit) base runs in 16 bits
    throughout, autocast's casts of the base's inputs and weights being no-ops."""
    if setup.mode in ("lora", "qlora") and setup.precision != "fp32":
        return dtypes("bf16")
    return dtypes(setup.precision)


@dataclass(frozen=True)
class ModelStates:
    """Per-device bytes of the model states of a training setup (gradients: all of them, as after backward)."""

    weights: int
    gradients: int
    optimizer: int
    trainable: int  # trainable parameters (all of them, or the adapters')
    grad_bytes: int  # bytes per gradient element
    grad_shards: int  # how many ranks the gradients are split over
    deepspeed: bool  # mixed precision under ZeRO: 16-bit weights and gradients, fp32 master in the optimizer


def _model_states(s: Shape, n: Parameters, setup: Setup) -> ModelStates:
    """Weights, gradients and optimizer state per rank.

    ZeRO (stage 1: optimizer state, 2: + gradients, 3: + parameters sharded over ``gpus``) with mixed
    precision uses DeepSpeed's layout, 2 + 2 + 12 bytes per parameter (16-bit weights and gradients;
    fp32 master weights and moments in the optimizer). Without ZeRO, autocast keeps fp32 weights and
    gradients (4 + 4 + 8). LoRA trains fp32 adapters on a frozen base, which is never sharded.
    """
    full = setup.mode == "full"
    trainable = n.total if full else adapter_parameters(s, setup.lora_rank)
    deepspeed = full and setup.zero > 0 and dtypes(setup.precision).mixed
    p_bytes = 2 if deepspeed else (dtypes(setup.precision).param if full else 4)
    o_per = _optimizer_bytes_per_param(setup, 4 if deepspeed else p_bytes) + (4 if deepspeed else 0)
    shard_p = setup.gpus if setup.zero >= 3 else 1
    shard_g = setup.gpus if setup.zero >= 2 else 1
    shard_o = setup.gpus if setup.zero >= 1 else 1
    base = 0 if full else frozen_weight_bytes(s, n, _weights_format(setup))
    return ModelStates(weights=base + trainable * p_bytes // shard_p, gradients=trainable * p_bytes // shard_g,
                       optimizer=int(trainable * o_per) // shard_o, trainable=trainable, grad_bytes=p_bytes,
                       grad_shards=shard_g, deepspeed=deepspeed)


def model_states(model: str | Path | Any, setup: Setup) -> ModelStates:
    """The model states of training ``model`` as ``setup``, per rank (see ``_model_states``)."""
    s = shape_of(load_config(model) if isinstance(model, (str, Path)) else config_fields(model))
    return _model_states(s, count(s), setup)


CHUNK_TOKENS = 256  # tokens per chunk of the chunked loss (= ``steps.LOSS_CHUNK_TOKENS``; a test checks it)


def estimate(model: str | Path | Any, setup: Setup | None = None) -> Estimate:
    """Predict the peak bytes per device of running ``model`` (a name, path or config) as ``setup``.

    Training peaks at one of a step's phases: the loss's backward (all activations, the logits
    and two logits-sized gradients), the loss's forward (under autocast: every layer's cached 16-bit
    weights, checkpointing or not, and the logits in 16 and 32 bits), the lm_head's backward, a
    layer's backward (the layers below it keep what they saved, the layers above have made their
    gradients; its MLP's backward, then its attention's, ``_attention_backward_transient``), or the
    embedding's (all gradients). Inference holds the weights, the KV cache and one layer's
    temporaries. ``bytes`` gives the components at the peak phase (device bytes), ``host_bytes``
    what offloading keeps in host memory (its peak; zeros without offloading).

    The techniques: ``accumulate`` runs ``batch // accumulate`` sequences at a time, while every
    gradient of the step is already held from the earlier micro-batches; ``chunked_loss`` holds one
    chunk of ``CHUNK_TOKENS`` tokens' logits instead of all; ``offload_activations`` keeps what
    backward needs on the host, bringing back one layer's at a time; ``step_in_backward`` and
    ``offload_optimizer`` free each gradient as soon as it is made, so at most the largest one
    parameter's gradient is alive; ``offload_optimizer`` keeps the optimizer state, an fp32 copy of
    the trainable parameters and their fp32 gradients on the host (16 bytes per parameter).
    """
    setup = setup or Setup()
    fields = load_config(model) if isinstance(model, (str, Path)) else config_fields(model)
    s = shape_of(fields)
    n = count(s)
    name = fields.get("name_or_path") or fields.get("_name_or_path") or s.arch
    if setup.mode == "inference":
        return _inference(name, s, n, setup, setup.batch * setup.seq)
    tokens = setup.batch // setup.accumulate * setup.seq  # one micro-batch
    t = activation_dtypes(setup)
    full = setup.mode == "full"
    st = _model_states(s, n, setup)
    weights, optimizer, grad_total = st.weights, st.optimizer, st.gradients
    trainable, g_bytes, shard_g, gpus = st.trainable, st.grad_bytes, st.grad_shards, setup.gpus
    deepspeed = st.deepspeed
    one_at_a_time = setup.step_in_backward or setup.offload_optimizer  # each gradient freed once made

    def layer_params(i: int) -> list[int]:
        """Elements of each trainable tensor of layer ``i`` (a whole MoE expert stack is one tensor)."""
        if full:
            return [x.parameters for x in layer_linears(s, is_moe(s, i))] + [s.hidden]
        return [setup.lora_rank * d for x in lora_targets(s, is_moe(s, i)) for d in (x.d_in, x.d_out)]

    def alive(total: int, largest: int) -> int:
        """Gradient bytes alive once tensors of ``total`` elements (the largest of ``largest``) have
        theirs: all of them, the largest alone when each is freed as it is made, all of the step's
        when accumulating micro-batches."""
        if one_at_a_time:
            return largest * g_bytes
        if setup.accumulate > 1:
            return grad_total
        return total * g_bytes // shard_g

    def mlp_params(i: int) -> list[int]:  # what the MLP's backward makes gradients for, before attention's
        moe = is_moe(s, i)
        if full:  # the post-attention norm, the MLP or the router, shared and routed experts
            return [s.hidden] + [x.parameters for x in layer_linears(s, moe)
                                 if x.name.endswith(_MLP_NAMES) or x.name == "router"]
        return [setup.lora_rank * d for x in lora_targets(s, moe) if x.name.endswith(_MLP_NAMES)
                for d in (x.d_in, x.d_out)]

    top, bottom = s.layers - 1, 0
    kinds = {is_moe(s, i): i for i in range(s.layers)}  # dense and MoE layers save alike within their kind
    half = {moe: _layer_halves(s, i, setup) for moe, i in kinds.items()}
    saved = [sum(half[is_moe(s, i)]) * tokens for i in range(s.layers)]
    mlp_saved = [half[is_moe(s, i)][1] * tokens for i in range(s.layers)]
    ckpt = setup.checkpointing == "full"
    copies, mlp_copies, o_copy, head_copy = [0] * s.layers, [0] * s.layers, 0, 0
    if full and t.mixed and not deepspeed:  # autocast's cached 16-bit weights, saved for backward
        def copy_bytes(i: int, mlp: bool | None = None) -> int:
            return 2 * sum(x.parameters for x in layer_linears(s, is_moe(s, i)) if x.count == 1 and x.name != "router"
                           and (mlp is None or x.name.endswith(_MLP_NAMES) == mlp))
        copies = [copy_bytes(i) for i in range(s.layers)]
        mlp_copies = [copy_bytes(i, mlp=True) for i in range(s.layers)]
        o_copy = 2 * next(x.parameters for x in layer_linears(s, False) if x.name == "o_proj")
        head_copy = 2 * s.vocab * s.hidden
    # with checkpointing the forward saves no copy (autocast's cache goes when the forward ends): a
    # layer's recompute casts its own weights again, which live until its backward has run
    stack_copies, live_copies = ([0] * s.layers, copies) if ckpt else (copies, [0] * s.layers)
    inputs = [tokens * s.hidden * t.residual] * s.layers
    kept = inputs if ckpt else saved
    if ckpt and _attention_kernel(s, setup) == "eager":
        # eager's causal mask (batch x 1 x seq x seq, the residual dtype): every checkpointed layer
        # keeps it, an argument of its recompute, until that layer's backward has run
        kept[bottom] = kept[bottom] + setup.batch * setup.seq ** 2 * t.residual
    final = _norm(s.hidden, t.residual, 1, t) * tokens
    logits = min(tokens, CHUNK_TOKENS if setup.chunked_loss else tokens) * s.vocab * 4
    gathered = 0
    # one layer's sharded parameters gathered in 16 bits (a LoRA base is not sharded)
    if full and setup.zero >= 3 and gpus > 1:
        gathered = max(n.per_layer) * 2
    transient = [_backward_transient(s, i, setup, tokens) + gathered for i in range(s.layers)]
    attention_transient = _attention_backward_transient(s, setup, tokens) + gathered
    # at the softmax's backward the MLP half and what attention's backward consumed are freed
    # (and the copies of the MLP's weights and o_proj's)
    freed = [mlp_saved[i] + _attention_consumed(s, setup, t) * tokens + mlp_copies[i] + o_copy
             for i in range(s.layers)]
    # the recompute's input norm saves the layer's input, already kept, when it needs no fp32 copy of it
    reread = tokens * s.hidden * 4 if t.residual == 4 else 0
    recompute = [saved[i] - reread if ckpt else 0 for i in range(s.layers)]
    # what forward leaves for backward: on the device, or (offloaded) on the host, each layer's
    # brought back for its backward
    offload = setup.offload_activations
    left = sum(kept) + sum(stack_copies) + head_copy + final
    # offloaded: what forward saved, and the loss's fp32 log-probabilities unless the loss is chunked
    host_activations = left + (0 if setup.chunked_loss else logits) if offload else 0
    acts = 0 if offload else left
    here = [kept[i] + stack_copies[i] if offload else 0 for i in range(s.layers)]
    head_params = ([s.vocab * s.hidden] if full and not s.tied else []) + ([s.hidden] if full else [])
    g_head = alive(sum(head_params), max(head_params, default=0))
    # the forward's end: autocast's cache holds every layer's 16-bit weights until the forward ends
    # (with checkpointing too), beside the logits (compute dtype), their fp32 copy and log-softmax
    upcast = logits if t.compute != 4 else 0
    forward = ((0 if offload else sum(kept) + final) + sum(copies) + head_copy + logits // 4 * t.compute
               + upcast + logits)
    # chunked: the LM head's gradient builds up in autograd's buffer, one chunk after another
    # (one chunk, at most CHUNK_TOKENS tokens: nothing builds up, as without chunking)
    head_buffer = g_bytes * s.vocab * s.hidden if setup.chunked_loss and full and tokens > CHUNK_TOKENS else 0
    phases = [
        _Phase("loss backward", alive(0, 0), acts + 3 * logits + gathered + head_buffer),
        _Phase("loss forward", alive(0, 0), forward + gathered),
        _Phase("lm_head backward", g_head, acts + logits + (logits // 2 if t.compute == 2 else 0) + gathered),
    ]
    # layer i's backward: the layers below keep their inputs (or what they saved), those above have
    # made their gradients; first its MLP's backward, then its attention's (the MLP half freed)
    below = 0 if offload else acts - final - head_copy
    above, largest = sum(head_params), max(head_params, default=0)
    for i in reversed(range(s.layers)):
        where = "top layer" if i == top else "bottom layer" if i == bottom else f"layer {i}"
        layer = below + here[i] + live_copies[i] + recompute[i]
        own = max(layer_params(i)) if one_at_a_time else 0
        mlp = mlp_params(i)
        grads = alive(above, max(largest, own))
        if setup.tiled_mlp and mlp:
            # a tile's backward makes the MLP's parameter gradients beside the tiles' sum of them: two sets
            tiles = 2 * sum(mlp) * g_bytes
            grads = max(grads, tiles) if one_at_a_time else grads + tiles
        phases.append(_Phase(f"{where} backward", grads, layer + transient[i]))
        phases.append(_Phase(f"{where} attention backward", alive(above + sum(mlp), max(largest, own)),
                             layer - freed[i] + attention_transient))
        below -= 0 if offload else kept[i] + stack_copies[i]
        above += n.per_layer[i] if full else sum(layer_params(i))
        largest = max(largest, own)
    phases += [
        _Phase("embedding backward", (s.vocab * s.hidden if full else largest) * g_bytes if one_at_a_time
               else grad_total, tokens * s.hidden * t.residual + gathered),
    ]
    if setup.chunked_loss:  # the lm_head's backward runs inside each chunk's, in "loss backward"
        phases = [p for p in phases if p.name != "lm_head backward"]
    peak = max(phases, key=lambda p: p.gradients + p.activations)
    parts = {"weights": weights, "gradients": peak.gradients, "optimizer": 0 if setup.offload_optimizer else optimizer,
             "activations": peak.activations, "kv_cache": 0}
    parts["total"] = sum(parts.values())
    host = {"weights": trainable * 4 if setup.offload_optimizer else 0,
            "gradients": trainable * 4 if setup.offload_optimizer else 0,
            "optimizer": trainable * 8 if setup.offload_optimizer else 0, "activations": host_activations}
    # the gradients reach the host as backward brings the activations back: the peak holds the larger
    host["total"] = host["weights"] + host["optimizer"] + max(host["gradients"], host["activations"])
    return Estimate(model=name, setup=setup, parameters=n.total, active_parameters=n.active,
                    trainable_parameters=trainable, bytes=parts, peak_phase=peak.name, host_bytes=host)


def _backward_transient(s: Shape, layer: int, setup: Setup, tokens: int) -> int:
    """Bytes alive only while one layer's backward runs: gradients of the widest intermediates.

    LoRA with an adapted down_proj: the product it reads is saved for its adapter alone, whose
    backward runs first and frees it before the product's backward makes its two gradients, so one
    inner-sized tensor fewer is alive than it adds; the residual stream's gradients are in the
    activations' dtype (measured on the small-vocabulary twins, tests/test_estimate.py). A tiled MLP
    has the intermediates' gradients for one tile, beside that tile's recomputed activations
    (``_tile_saved_per_token``).
    """
    t = activation_dtypes(setup)
    moe = is_moe(s, layer)
    inner = s.intermediate if not moe else s.moe_intermediate * (s.top_k + s.shared)
    lora_down = setup.mode != "full" and any(x.name.endswith("down_proj") for x in lora_targets(s, moe))
    widest, residual = (2, t.residual) if lora_down else (3, 4)
    gradients = tokens * 2 * s.hidden * residual  # the residual stream's
    if setup.tiled_mlp:
        tile = tile_tokens(s, tokens)
        return tile * (widest * inner * t.compute + _tile_saved_per_token(s, layer, setup)) + gradients
    return tokens * widest * inner * t.compute + gradients


def _attention_backward_transient(s: Shape, setup: Setup, tokens: int) -> int:
    """Bytes alive only while one layer's attention backward runs the softmax's backward.

    The math path and eager attention backpropagate through the s x s probabilities: the gradient
    of the probabilities (dP = dO V^T) and the softmax's backward output (dS), both fp32 (the math
    path computes in fp32 on CPU; eager's softmax runs in fp32 and its 16-bit dP is cast up before
    the softmax's backward), 2 x heads x seq x 4 bytes per token beside the saved probabilities. A
    fused kernel (flash) tiles them. Plus the residual stream's gradient and the values' (dV, every
    head), fp32.
    """
    scores = 0 if _attention_kernel(s, setup) == "flash" else 2 * s.heads * setup.seq * 4
    v = s.v_head_dim if s.arch == "deepseek_v3" else s.head_dim
    return tokens * (scores + s.hidden * 4 + s.heads * v * 4)


def _attention_consumed(s: Shape, setup: Setup, t: Dtypes) -> int:
    """Bytes per token of attention's saved tensors freed before the softmax's backward runs.

    By then o_proj's backward has used its input (the attention output) and dP = dO V^T the values
    and (eager) the probabilities' 16-bit copy, so these are gone; a fused kernel (flash) needs all
    of its inputs until its single backward ends. MLA's values are views of kv_b_proj's output
    (its whole storage goes); the math path keeps its own fp32 copy of them too.
    """
    kernel = _attention_kernel(s, setup)
    if kernel == "flash":
        return 0
    a = t.compute
    probs_copy = s.heads * setup.seq * a if kernel == "eager" and a != 4 else 0
    if s.arch != "deepseek_v3":  # the output and the values (eager repeats them to every head)
        return 2 * s.heads * s.head_dim * a + probs_copy
    out, kv_b = s.heads * s.v_head_dim * a, s.heads * (s.qk_nope + s.v_head_dim) * a
    values = s.heads * s.v_head_dim * 4 if kernel == "math" else 0
    return out + kv_b + values + probs_copy


def kv_cache_per_token(s: Shape, element_bytes: int, tp: int = 1) -> int:
    """KV-cache bytes per token over all layers, as transformers stores it (per GPU over ``tp``
    tensor-parallel GPUs).

    GQA: a key and a value of ``head_dim`` per kv head; tensor parallelism splits the kv heads (at
    least one per GPU). MLA: transformers caches the compressed latent (``kv_lora_rank``) and the
    shared rope key (``qk_rope_head_dim``), not expanded heads; every head reads the whole latent,
    so tensor parallelism cannot split it: each GPU holds all of it (as in vLLM and SGLang).
    """
    if s.arch == "deepseek_v3":
        return s.layers * (s.kv_lora_rank + s.qk_rope) * element_bytes
    return s.layers * 2 * -(-s.kv_heads // tp) * s.head_dim * element_bytes


def _inference(name: str, s: Shape, n: Parameters, setup: Setup, tokens: int) -> Estimate:
    """Prefill of ``seq`` tokens: weights, the full KV cache, and the widest layer's temporaries.

    Under ``parallel="tensor"`` the weights and the KV cache are per GPU (``frozen_weight_bytes``,
    ``kv_cache_per_token``); the temporaries are not divided (an upper bound: the residual stream is
    replicated, the MLP's intermediates would split). With the experts in 4 bits, one MoE layer's
    experts (this GPU's share) are dequantized to 16 bits for its forward (``quantize_experts``).
    """
    fmt = _weights_format(setup)
    a = 4 if setup.precision == "fp32" else 2
    tp = setup.gpus if setup.parallel == "tensor" else 1
    weights = frozen_weight_bytes(s, n, fmt, tp) // (setup.gpus if setup.zero >= 3 else 1)
    kv = kv_cache_per_token(s, a, tp) * tokens
    inner = max(s.intermediate, s.moe_intermediate * (s.top_k + s.shared))
    # the MLP's gate/act, up and product beside the residual, the norm's output and the rope tables
    temporaries = tokens * (3 * inner * a + 4 * s.hidden * a + 36)
    kernel = _attention_kernel(s, setup)
    if kernel == "math":  # fp32 copies of q, k, v, the scores and probabilities, a causal mask
        qk = s.qk_nope + s.qk_rope
        states = (2 * qk + s.qk_nope + s.v_head_dim) * a + 2 * (2 * qk + s.v_head_dim) * 4
        attention = tokens * (s.heads * (2 * setup.seq * 4 + states) + 2 * s.hidden * a) + setup.seq ** 2
        temporaries = max(temporaries, attention)
    elif kernel == "eager":  # scores, scaled and masked copies, fp32 softmax and its cast; the mask
        scores = s.heads * setup.seq * (3 * a + 4) + setup.seq * a
        temporaries = max(temporaries, tokens * (scores + 2 * s.hidden * a))
    if fmt.endswith(EXPERTS_SUFFIX) and s.experts:
        temporaries += a * sum(_per_gpu(s, x, tp) for x in layer_linears(s, True) if x.count > 1)
    parts = {"weights": weights, "gradients": 0, "optimizer": 0, "activations": temporaries, "kv_cache": kv}
    parts["total"] = sum(parts.values())
    return Estimate(model=name, setup=setup, parameters=n.total, active_parameters=n.active,
                    trainable_parameters=0, bytes=parts, peak_phase="prefill")


