"""The estimator's view of a config: its fields checked, its shape, its linear maps and parameters.

Pure arithmetic on ``config.json`` fields (no torch, no transformers): ``count`` equals
``family.count_parameters``, which builds a meta model (a test checks it).
"""

from __future__ import annotations

import functools
import json
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    looks_like_path = "/" in str(name_or_path) and not str(name_or_path).lower().startswith("deepseek-ai/")
    if path.suffix == ".json" or looks_like_path:
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


@functools.lru_cache(maxsize=64)
def layer_linears(s: Shape, moe: bool) -> tuple[Linear, ...]:
    """The linear maps of one decoder layer (routed experts as one ``Linear`` with ``count`` experts).
    Cached: the planner asks for the same layers thousands of times."""
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
        return tuple(attn + _mlp(h, s.intermediate, s.mlp_bias))
    shared = [Linear(f"shared_experts.{x.name}", x.d_in, x.d_out) for x in _mlp(h, s.moe_intermediate * s.shared)]
    return tuple(attn + shared + [Linear("router", h, s.experts),
                                  Linear("experts.gate_up_proj", h, 2 * s.moe_intermediate, count=s.experts),
                                  Linear("experts.down_proj", s.moe_intermediate, h, count=s.experts)])


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


@functools.lru_cache(maxsize=64)
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



# LoRA adapts every linear map of attention and of the MLP (QLoRA's "all-linear"), lm_head excluded.
# DeepseekV3 adapts attention only: on transformers 5, peft turns any gate/up/down_proj target into
# adapters on the fused routed experts of every MoE layer (its v4-compatibility mapping), so an MLP
# target cannot mean "the dense and shared-expert MLPs" there.
@functools.lru_cache(maxsize=64)
def lora_targets(s: Shape, moe: bool) -> tuple[Linear, ...]:
    """The linear maps of one layer that carry a LoRA adapter."""
    attention_only = s.arch == "deepseek_v3"
    return tuple(x for x in layer_linears(s, moe) if x.count == 1 and x.name != "router"
                 and not (attention_only and x.name.endswith(("gate_proj", "up_proj", "down_proj"))))

