"""Estimate memory: predict the peak bytes per device of any R1-family setup, without running it.

The estimator is pure arithmetic on a config: it never builds a model and never reads
``measure`` (the ruler must not read the forecast). Its numbers are checked against measurement in
``tests/test_estimate.py``, in notebook 08 and by ``lowmem validate``.
"""

from __future__ import annotations

import json
import reprlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


MODES = ("inference", "full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd-momentum")
CHECKPOINTING = ("none", "full")
WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq", "fp4-dq", "nf4-dq+experts")
EXPERTS_SUFFIX = "+experts"  # the routed MoE experts quantized too (``quantize.quantize_experts``), inference only
PARALLEL = ("data", "tensor")
ATTENTION = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")


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
    """

    mode: str = "full"
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    batch: int = 1
    seq: int = 1024
    checkpointing: str = "none"
    gpus: int = 1
    zero: int = 0
    lora_rank: int = 16
    weights: str | None = None
    attention: str = "sdpa"
    device: str = "cuda"
    parallel: str = "data"

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                              ("checkpointing", CHECKPOINTING), ("attention", ATTENTION),
                              ("device", DEVICES), ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        for name in ("batch", "seq", "gpus", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.parallel == "tensor" and (self.mode != "inference" or self.zero):
            raise ValueError("parallel='tensor' models inference only, without ZeRO")
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``lowmem estimate --json`` output)."""
        return {"model": self.model, "setup": self.setup.__dict__, "parameters": self.parameters,
                "active_parameters": self.active_parameters,
                "trainable_parameters": self.trainable_parameters, "peak_phase": self.peak_phase,
                "bytes": dict(self.bytes)}


ARCHITECTURES = ("qwen2", "llama", "deepseek_v3")  # = family.SUPPORTED_ARCHITECTURES (a test checks it)


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """The config fields of a family name, Hub id, ``config.json`` path or local model directory.

    Reads plain JSON (no transformers, no torch: the CLI answers in well under 2 s for files). Raises
    ``ValueError`` with a one-line reason for an unknown name, a missing or malformed file or an
    architecture outside the course (the CLI prints it and exits 2). The fields themselves are
    checked by ``shape_of`` (``validate_fields``).
    """
    try:
        path = Path(str(name_or_path)).expanduser()
    except RuntimeError as err:  # "~nosuchuser/...": no such home folder
        raise ValueError(f"{name_or_path}: {err}") from None
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{path.parent} has no config.json")
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except ValueError as err:  # malformed JSON, not UTF-8, an integer of more than 4300 digits
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        except RecursionError:
            raise ValueError(f"{path} is not a config: its JSON is nested too deeply to read") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        fields.setdefault("name_or_path", str(path.parent if path.name == "config.json" else path))
        _check_architecture(fields.get("model_type"), str(path))
        return fields
    if path.suffix == ".json" or "/" in str(name_or_path) and not str(name_or_path).lower().startswith("deepseek-ai/"):
        raise ValueError(f"{name_or_path}: no such file or directory")
    from lowmem_course import family  # names only: family imports torch lazily

    member = family.resolve(str(name_or_path))
    return {**member.fields, "model_type": member.architecture, "name_or_path": member.hub_id}


def _check_architecture(kind: Any, where: str) -> None:
    if kind not in ARCHITECTURES:
        raise ValueError(f"{where}: unsupported architecture {kind!r}; the estimator covers {', '.join(ARCHITECTURES)}")


def config_fields(cfg: Any) -> dict[str, Any]:
    """The fields of a transformers config object, or of a dict of config.json fields."""
    return dict(cfg) if isinstance(cfg, dict) else cfg.to_dict()


# ----------------------------------------------------------------------------------------------
# Parameters, counted from the config (equal to ``family.count_parameters``; a test checks it).

@dataclass(frozen=True)
class Shape:
    """The dimensions of one config that memory depends on (counts of elements, not bytes)."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool  # bias on q, k, v (Qwen2 always; Llama and DeepseekV3 when attention_bias)
    o_bias: bool
    mlp_bias: bool
    # MLA / MoE (DeepseekV3 only; zero elsewhere)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head_dim: int = 0
    dense_layers: int = 0
    experts: int = 0
    top_k: int = 0
    shared: int = 0
    moe_intermediate: int = 0


# Generous upper bounds on a config's sizes, ten times and more beyond any published model (R1: 61
# layers, hidden 7168, 128 heads, 129,280 tokens, 256 experts): the estimator's per-layer
# arithmetic stays under about a second for ``plan``, and an absurd config is refused, not computed.
MAX_LAYERS = 1024
MAX_WIDTH = 2**20  # hidden, MLP, head and LoRA-rank sizes, in elements
MAX_HEADS = 2**14
MAX_VOCAB = 2**24
MAX_EXPERTS = 2**16

# The integer fields ``shape_of`` reads: (smallest, largest, required). Optional ones may be absent or null.
_COMMON_INTS = {
    "hidden_size": (1, MAX_WIDTH, True), "num_hidden_layers": (1, MAX_LAYERS, True),
    "num_attention_heads": (1, MAX_HEADS, True), "num_key_value_heads": (1, MAX_HEADS, False),
    "head_dim": (1, MAX_WIDTH, False), "intermediate_size": (1, MAX_WIDTH, True), "vocab_size": (1, MAX_VOCAB, True),
}
_MLA_MOE_INTS = {
    "q_lora_rank": (0, MAX_WIDTH, False), "kv_lora_rank": (1, MAX_WIDTH, True),
    "qk_nope_head_dim": (1, MAX_WIDTH, True), "qk_rope_head_dim": (1, MAX_WIDTH, True),
    "v_head_dim": (1, MAX_WIDTH, True), "first_k_dense_replace": (0, MAX_LAYERS, False),
    "n_routed_experts": (1, MAX_EXPERTS, True), "num_experts_per_tok": (1, MAX_EXPERTS, True),
    "n_shared_experts": (0, MAX_EXPERTS, False), "moe_intermediate_size": (1, MAX_WIDTH, True),
    "n_group": (1, MAX_EXPERTS, False), "topk_group": (1, MAX_EXPERTS, False),
}
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def validate_fields(fields: dict[str, Any]) -> None:
    """Check every config field the estimator reads, before any arithmetic on them.

    Integers must be JSON integers (not strings, floats or booleans) within ``_COMMON_INTS`` /
    ``_MLA_MOE_INTS``'s bounds; flags must be booleans; the heads must divide into key/value heads
    (and the hidden size into heads when there is no ``head_dim``); DeepseekV3's top-k cannot exceed
    its routed experts, nor ``topk_group`` its ``n_group`` (which must divide the experts). Raises
    ``ValueError`` naming the first bad field, in one line.
    """
    kind = fields.get("model_type")
    _check_architecture(kind, str(fields.get("name_or_path") or "config"))
    ints = {**_COMMON_INTS, **(_MLA_MOE_INTS if kind == "deepseek_v3" else {})}
    value = {}
    for key, (low, high, required) in ints.items():
        got = fields.get(key)
        if got is None and not required:
            continue
        if not isinstance(got, int) or isinstance(got, bool) or not low <= got <= high:
            raise ValueError(f"config field {key!r} must be an integer from {low} to {high:,}, got {reprlib.repr(got)}")
        value[key] = got
    for key in _BOOLS:
        if fields.get(key) is not None and not isinstance(fields[key], bool):
            raise ValueError(f"config field {key!r} must be true or false, got {reprlib.repr(fields[key])}")
    heads, kv_heads = value["num_attention_heads"], value.get("num_key_value_heads", value["num_attention_heads"])
    if heads % kv_heads:
        raise ValueError(f"config field 'num_key_value_heads' ({kv_heads}) must divide 'num_attention_heads' ({heads})")
    if "head_dim" not in value and value["hidden_size"] % heads:
        raise ValueError(f"config field 'hidden_size' ({value['hidden_size']}) must be a multiple of "
                         f"'num_attention_heads' ({heads}) when there is no 'head_dim'")
    if kind != "deepseek_v3":
        return
    experts, top_k = value["n_routed_experts"], value["num_experts_per_tok"]
    if top_k > experts:
        raise ValueError(f"config field 'num_experts_per_tok' ({top_k}) exceeds 'n_routed_experts' ({experts})")
    groups = value.get("n_group")
    if groups is not None and experts % groups:
        raise ValueError(f"config field 'n_group' ({groups}) must divide 'n_routed_experts' ({experts})")
    if groups is not None and value.get("topk_group", 0) > groups:
        raise ValueError(f"config field 'topk_group' ({value['topk_group']}) exceeds 'n_group' ({groups})")


def shape_of(cfg: Any) -> Shape:
    """The memory-relevant dimensions of a Qwen2, Llama or DeepseekV3 config (object or dict).

    ``validate_fields`` checks the fields first: a bad one raises ``ValueError``.
    """
    f = config_fields(cfg)
    validate_fields(f)
    kind = f["model_type"]
    heads = f["num_attention_heads"]
    common = dict(arch=kind, hidden=f["hidden_size"], layers=f["num_hidden_layers"], heads=heads,
                  kv_heads=f.get("num_key_value_heads") or heads,
                  head_dim=f.get("head_dim") or f["hidden_size"] // heads,
                  intermediate=f["intermediate_size"], vocab=f["vocab_size"],
                  tied=bool(f.get("tie_word_embeddings", False)))
    bias = bool(f.get("attention_bias", False))
    if kind == "qwen2":
        return Shape(**common, qkv_bias=True, o_bias=False, mlp_bias=False)
    if kind == "llama":
        return Shape(**common, qkv_bias=bias, o_bias=bias, mlp_bias=bool(f.get("mlp_bias", False)))
    return Shape(**common, qkv_bias=bias, o_bias=bias, mlp_bias=False, q_lora_rank=f.get("q_lora_rank") or 0,
                 kv_lora_rank=f["kv_lora_rank"], qk_nope=f["qk_nope_head_dim"],
                 qk_rope=f["qk_rope_head_dim"], v_head_dim=f["v_head_dim"],
                 dense_layers=min(f.get("first_k_dense_replace") or 0, common["layers"]),
                 experts=f["n_routed_experts"], top_k=f["num_experts_per_tok"],
                 shared=f.get("n_shared_experts") or 0, moe_intermediate=f["moe_intermediate_size"])


@dataclass(frozen=True)
class Linear:
    """One linear map of a layer: ``count`` matrices of ``d_in`` x ``d_out`` (count > 1: routed experts)."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    count: int = 1

    @property
    def parameters(self) -> int:
        """Weights and biases, in elements."""
        return self.count * (self.d_in * self.d_out + (self.d_out if self.bias else 0))


def _mlp(d: int, inner: int, bias: bool = False) -> list[Linear]:
    return [Linear("gate_proj", d, inner, bias), Linear("up_proj", d, inner, bias), Linear("down_proj", inner, d, bias)]


def layer_linears(s: Shape, moe: bool) -> list[Linear]:
    """The linear maps of one decoder layer (routed experts as one ``Linear`` with ``count`` experts)."""
    h = s.hidden
    if s.arch == "deepseek_v3":
        qk = s.qk_nope + s.qk_rope
        q = ([Linear("q_a_proj", h, s.q_lora_rank, s.qkv_bias), Linear("q_b_proj", s.q_lora_rank, s.heads * qk)]
             if s.q_lora_rank else [Linear("q_proj", h, s.heads * qk)])
        attn = q + [Linear("kv_a_proj_with_mqa", h, s.kv_lora_rank + s.qk_rope, s.qkv_bias),
                    Linear("kv_b_proj", s.kv_lora_rank, s.heads * (s.qk_nope + s.v_head_dim)),
                    Linear("o_proj", s.heads * s.v_head_dim, h, s.o_bias)]
    else:
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        attn = [Linear("q_proj", h, q, s.qkv_bias), Linear("k_proj", h, kv, s.qkv_bias),
                Linear("v_proj", h, kv, s.qkv_bias), Linear("o_proj", q, h, s.o_bias)]
    if not moe:
        return attn + _mlp(h, s.intermediate, s.mlp_bias)
    shared = [Linear(f"shared_experts.{x.name}", x.d_in, x.d_out) for x in _mlp(h, s.moe_intermediate * s.shared)]
    return attn + shared + [Linear("router", h, s.experts),
                            Linear("experts.gate_up_proj", h, 2 * s.moe_intermediate, count=s.experts),
                            Linear("experts.down_proj", s.moe_intermediate, h, count=s.experts)]


def _norm_parameters(s: Shape) -> int:
    """RMSNorm weights of one layer (two per layer, plus MLA's q_a and kv_a norms)."""
    mla = (s.q_lora_rank + s.kv_lora_rank) if s.arch == "deepseek_v3" else 0
    return 2 * s.hidden + mla


def is_moe(s: Shape, layer: int) -> bool:
    return s.arch == "deepseek_v3" and layer >= s.dense_layers


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of a config, in elements."""

    total: int
    active: int
    embedding: int  # embed_tokens (+ lm_head when untied)
    per_layer: tuple[int, ...]
    linear: int  # in nn.Linear layers of the decoder (what 4/8-bit loading quantizes), lm_head excluded
    experts: int = 0  # in the routed experts' fused 3-D weights (what 4/8-bit loading leaves in 16 bits)


def count(s: Shape) -> Parameters:
    """Exact parameter counts (``family.count_parameters`` builds a meta model to get the same)."""
    per_layer, inactive, linear, experts = [], 0, 0, 0
    for i in range(s.layers):
        linears = layer_linears(s, is_moe(s, i))
        per_layer.append(sum(x.parameters for x in linears) + _norm_parameters(s))
        linear += sum(x.parameters for x in linears if x.count == 1 and x.name != "router")
        experts += sum(x.parameters for x in linears if x.count > 1)
        if is_moe(s, i):
            inactive += sum(x.parameters // x.count for x in linears if x.count > 1) * (s.experts - s.top_k)
    embedding = s.vocab * s.hidden * (1 if s.tied else 2)
    total = embedding + sum(per_layer) + s.hidden
    return Parameters(total=total, active=total - inactive, embedding=embedding, per_layer=tuple(per_layer),
                      linear=linear, experts=experts)


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
    """The element sizes of ``precision`` (fp32, bf16-mixed, fp16-mixed, bf16)."""
    if precision == "fp32":
        return Dtypes(param=4, compute=4, residual=4, mixed=False)
    if precision == "bf16":
        return Dtypes(param=2, compute=2, residual=2, mixed=False)
    return Dtypes(param=4, compute=2, residual=4, mixed=True)


# Bytes per weight of the frozen base under each storage format. 4-bit formats keep one absmax per
# block of 64 weights: fp32 (0.5 bits/weight) or, with double quantization, 8-bit absmax plus one fp32
# constant per 256 blocks (0.127 bits/weight); int8 keeps one fp32 scale per output row (not counted
# here: it is per row, added in ``weight_bytes``).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64,
                "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256), "fp4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}

# LoRA adapts every linear map of attention and of the MLP (QLoRA's "all-linear"), lm_head excluded.
# DeepseekV3 adapts attention only: on transformers 5, peft turns any gate/up/down_proj target into
# adapters on the fused routed experts of every MoE layer (its v4-compatibility mapping), so an MLP
# target cannot mean "the dense and shared-expert MLPs" there.
def lora_targets(s: Shape, moe: bool) -> list[Linear]:
    """The linear maps of one layer that carry a LoRA adapter."""
    attention_only = s.arch == "deepseek_v3"
    return [x for x in layer_linears(s, moe) if x.count == 1 and x.name != "router"
            and not (attention_only and x.name.endswith(("gate_proj", "up_proj", "down_proj")))]


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
    products = 3 if frozen or _lora_casts(setup) else 4  # a frozen down_proj does not keep its input
    if not moe:
        return products * s.intermediate * a
    shared = products * s.moe_intermediate * s.shared * a
    router = 4 * s.experts + 12 * s.top_k + (h * 4 if t.residual == 2 and not frozen else 0)
    e = 4 if t.param == 4 else 2  # grouped_mm is not autocast: experts compute in the weights' dtype
    experts = s.top_k * ((h * (1 if frozen else 2) + products * s.moe_intermediate) * e + 12)
    return shared + router + experts


def _lora_casts(setup: Setup) -> bool:
    """True when each adapter keeps its own 16-bit copy of its input (peft casts it to the fp32
    adapter's dtype, autocast back to 16 bits), instead of sharing the tensor its base layer reads."""
    return setup.mode in ("lora", "qlora") and setup.precision != "fp32"


def _lora_saved(s: Shape, moe: bool, setup: Setup, t: Dtypes) -> int:
    """Bytes per token the adapters add: each saves A's output (rank r) and, under autocast, its input copy."""
    if setup.mode not in ("lora", "qlora"):
        return 0
    casts = _lora_casts(setup)
    return sum((setup.lora_rank + (x.d_in if casts else 0)) * t.compute for x in lora_targets(s, moe))


def layer_saved_per_token(s: Shape, layer: int, setup: Setup) -> int:
    """Bytes per token that decoder layer ``layer`` keeps for the backward pass (no checkpointing)."""
    t = activation_dtypes(setup)
    moe = is_moe(s, layer)
    attn_consumers = 0 if _lora_casts(setup) else (2 if s.arch == "deepseek_v3" else 3)
    mlp_adapted = any(x.name.endswith("up_proj") for x in lora_targets(s, moe))
    mlp_consumers = 0 if _lora_casts(setup) and mlp_adapted else 2
    frozen = setup.mode != "full"
    norms = (_norm(s.hidden, t.residual, attn_consumers, t, frozen)
             + _norm(s.hidden, t.residual, mlp_consumers, t, frozen))
    if moe and t.mixed:
        norms += s.hidden * 4  # the router reads the norm's fp32 output itself
    return norms + _attention_saved(s, setup, t) + _mlp_saved(s, moe, setup, t) + _lora_saved(s, moe, setup, t)


# ----------------------------------------------------------------------------------------------
# Model states: weights, gradients and optimizer state per device.

def _optimizer_bytes_per_param(setup: Setup, param_bytes: int) -> float:
    """Optimizer state per trainable parameter (AdamW: two moments in the parameters' dtype)."""
    return {"adamw": 2 * param_bytes, "adamw8bit": 2 + 8 / 2048, "sgd": 0,
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
    """Storage format of the base weights: the explicit ``weights``, else what the mode implies."""
    if setup.weights:
        return setup.weights
    if setup.mode == "qlora":
        return "nf4-dq"
    if setup.mode == "full":
        return "fp32" if dtypes(setup.precision).param == 4 else "bf16"
    return "fp32" if setup.precision == "fp32" else "bf16"


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


def estimate(model: str | Path | Any, setup: Setup | None = None) -> Estimate:
    """Predict the peak bytes per device of running ``model`` (a name, path or config) as ``setup``.

    Training peaks at one of a step's phases: the loss's backward (all activations, the logits
    and two logits-sized gradients), the lm_head's, the top or bottom layer's backward, or the
    embedding's (all gradients). Inference holds the weights, the KV cache and one layer's
    temporaries. ``bytes`` gives the components at the peak phase.
    """
    setup = setup or Setup()
    fields = load_config(model) if isinstance(model, (str, Path)) else config_fields(model)
    s = shape_of(fields)
    n = count(s)
    name = fields.get("name_or_path") or fields.get("_name_or_path") or s.arch
    tokens = setup.batch * setup.seq
    if setup.mode == "inference":
        return _inference(name, s, n, setup, tokens)
    t = activation_dtypes(setup)
    full = setup.mode == "full"
    st = _model_states(s, n, setup)
    weights, optimizer, grad_total = st.weights, st.optimizer, st.gradients
    trainable, g_bytes, shard_g, gpus = st.trainable, st.grad_bytes, st.grad_shards, setup.gpus
    deepspeed = st.deepspeed

    def grads_of(params: int) -> int:
        return params * g_bytes // shard_g if full else 0

    def layer_grads(i: int) -> int:
        if full:
            return grads_of(n.per_layer[i])
        return sum(setup.lora_rank * (x.d_in + x.d_out) for x in lora_targets(s, is_moe(s, i))) * g_bytes // shard_g

    saved = [layer_saved_per_token(s, i, setup) * tokens for i in range(s.layers)]
    copies = [0] * s.layers
    head_copy = 0
    if full and t.mixed and not deepspeed:  # autocast's cached 16-bit weights, saved for backward
        copies = [2 * sum(x.parameters for x in layer_linears(s, is_moe(s, i)) if x.count == 1 and x.name != "router")
                  for i in range(s.layers)]
        head_copy = 2 * s.vocab * s.hidden
    inputs = [tokens * s.hidden * t.residual] * s.layers
    kept = inputs if setup.checkpointing == "full" else saved
    final = _norm(s.hidden, t.residual, 1, t) * tokens
    logits = tokens * s.vocab * 4
    gathered = 0
    if full and setup.zero >= 3 and gpus > 1:  # one layer's sharded parameters gathered in 16 bits (a LoRA base is not sharded)
        gathered = max(n.per_layer) * 2
    transient = [_backward_transient(s, i, setup, tokens) + gathered for i in range(s.layers)]
    recompute = [saved[i] if setup.checkpointing == "full" else 0 for i in range(s.layers)]
    g_head = grads_of(s.vocab * s.hidden * (0 if s.tied else 1) + s.hidden)
    acts = sum(kept) + sum(copies) + head_copy + final
    top, bottom = s.layers - 1, 0
    phases = [
        _Phase("loss backward", 0, acts + 3 * logits + gathered),
        _Phase("lm_head backward", g_head, acts + logits + (logits // 2 if t.compute == 2 else 0) + gathered),
        _Phase("top layer backward", g_head, acts - final - head_copy + recompute[top] + transient[top]),
        _Phase("bottom layer backward", g_head + sum(layer_grads(i) for i in range(1, s.layers)),
               kept[bottom] + copies[bottom] + recompute[bottom] + transient[bottom]),
        _Phase("embedding backward", grad_total, tokens * s.hidden * t.residual + gathered),
    ]
    peak = max(phases, key=lambda p: p.gradients + p.activations)
    parts = {"weights": weights, "gradients": peak.gradients, "optimizer": optimizer,
             "activations": peak.activations, "kv_cache": 0}
    parts["total"] = sum(parts.values())
    return Estimate(model=name, setup=setup, parameters=n.total, active_parameters=n.active,
                    trainable_parameters=trainable, bytes=parts, peak_phase=peak.name)


def _backward_transient(s: Shape, layer: int, setup: Setup, tokens: int) -> int:
    """Bytes alive only while one layer's backward runs: gradients of the widest intermediates."""
    t = activation_dtypes(setup)
    inner = s.intermediate if not is_moe(s, layer) else s.moe_intermediate * (s.top_k + s.shared)
    return tokens * (3 * inner * t.compute + 2 * s.hidden * 4)


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


# ----------------------------------------------------------------------------------------------
# Planning: which combinations of techniques fit a memory budget, cheapest compute first.

# Compute cost of each technique relative to bf16 full fine-tuning (forward + backward = 6 x params
# x tokens): rough, published-order-of-magnitude factors used to rank, not to predict time.
COST = {"full": 1.0, "lora": 0.7, "qlora": 0.85, "inference": 0.33, "checkpointing": 1.33, "fp32": 2.0,
        "zero": 1.1, "tensor": 1.1}
DEFAULT_PRECISIONS = ("bf16-mixed", "bf16")  # what ``plan`` tries unless told: GPUs with bf16


@dataclass(frozen=True)
class PlanOption:
    """One setup that fits: its estimate, recipe (``qlora+checkpointing+bf16``) and relative cost."""

    estimate: Estimate
    recipe: str
    cost: float

    def command(self, model: str) -> str:
        """The ``lowmem estimate`` line that reproduces this option."""
        s = self.estimate.setup
        flags = [f"--mode {s.mode}", f"--precision {s.precision}", f"--batch {s.batch}", f"--seq {s.seq}"]
        if s.mode != "inference":
            flags += [f"--optimizer {s.optimizer}", f"--checkpointing {s.checkpointing}"]
        if s.weights:
            flags.append(f"--weights {s.weights}")
        if s.gpus > 1:
            flags.append(f"--gpus {s.gpus}")
            flags.append("--parallel tensor" if s.parallel == "tensor" else f"--zero {s.zero}")
        return f"lowmem estimate {shlex.quote(str(model))} " + " ".join(flags)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: recipe, cost, command-line flags and the estimate."""
        return {"recipe": self.recipe, "cost": round(self.cost, 3), **self.estimate.to_dict()}


def recipe(setup: Setup) -> str:
    """The ``+``-joined technique names of a setup, e.g. ``qlora+checkpointing+bf16-mixed+adamw8bit``."""
    parts = [setup.mode, setup.precision]
    if setup.weights and setup.mode == "inference":
        parts.append(setup.weights)
    if setup.mode != "inference":
        if setup.checkpointing == "full":
            parts.append("checkpointing")
        if setup.optimizer != "adamw":
            parts.append(setup.optimizer)
    if setup.gpus > 1 and setup.zero:
        parts.append(f"zero{setup.zero}")
    if setup.parallel == "tensor":
        parts.append(f"tp{setup.gpus}")
    return "+".join(parts)


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


def _check_precisions(precisions: Any) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(precisions))
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad or not chosen:
        raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}, got {', '.join(map(str, bad)) or 'none'}")
    return chosen


def candidates(mode: str | None, batch: int, seq: int, gpus: int, precisions: Any = DEFAULT_PRECISIONS,
               moe: bool = False) -> list[Setup]:
    """The setups ``plan`` tries (every mode when ``mode`` is None) in the allowed ``precisions``.

    Full fine-tuning tries each precision; LoRA and QLoRA each but pure bf16 (their adapters train
    in fp32 anyway); inference serves 16-bit weights in bf16 (from "bf16" or "bf16-mixed"), in fp16
    (from "fp16-mixed") or fp32, each with the weights as they are, int8 or NF4-dq, and for a MoE
    model (``moe``) NF4-dq with the experts too. On several GPUs, inference is tried both as
    replicas and split over the GPUs (``parallel="tensor"``), full fine-tuning with each ZeRO stage.
    """
    allowed = _check_precisions(precisions)
    modes = [mode] if mode else ["full", "lora", "qlora", "inference"]
    out = []
    for m in modes:
        if m == "inference":
            served = dict.fromkeys("bf16" if p.startswith("bf16") else p for p in allowed)
            formats = (None, "int8", "nf4-dq") + (("nf4-dq" + EXPERTS_SUFFIX,) if moe else ())
            out += [Setup(mode=m, precision=p, weights=w, batch=batch, seq=seq, gpus=gpus, parallel=par)
                    for p in served for par in (("data", "tensor") if gpus > 1 else ("data",)) for w in formats]
            continue
        for precision in (allowed if m == "full" else [p for p in allowed if p != "bf16"]):
            for optimizer in ("adamw", "adamw8bit"):
                for ckpt in CHECKPOINTING:
                    for zero in ((0, 1, 2, 3) if gpus > 1 and m == "full" else (0,)):
                        out.append(Setup(mode=m, precision=precision, optimizer=optimizer, batch=batch, seq=seq,
                                         checkpointing=ckpt, gpus=gpus, zero=zero))
    return out


def plan(model: str | Path | Any, gpu_memory: int, mode: str | None = None, batch: int = 1, seq: int = 1024,
         gpus: int = 1, precisions: Any = DEFAULT_PRECISIONS) -> list[PlanOption]:
    """The setups whose estimated peak per GPU fits ``gpu_memory`` bytes, cheapest compute first
    (ties: least memory first). ``precisions`` restricts the precisions tried (a T4 has no bf16:
    ``("fp16-mixed", "fp32")``); ``candidates`` lists what is tried."""
    fields = load_config(model) if isinstance(model, (str, Path)) else config_fields(model)
    moe = shape_of(fields).experts > 0
    fits = []
    for setup in candidates(mode, batch, seq, gpus, precisions, moe):
        e = estimate(fields, setup)
        if e.bytes["total"] <= gpu_memory:
            fits.append(PlanOption(estimate=e, recipe=recipe(setup), cost=cost(setup)))
    return sorted(fits, key=lambda o: (o.cost, o.estimate.bytes["total"]))
