"""The DeepSeek-R1 family: real-size configs, tiny twins, building and loading.

Every member is a real ``transformers`` architecture (Qwen2, Llama or DeepseekV3). The real-size
configs carry the numbers of the published ``config.json`` files; ``tiny(name)`` scales one down
while keeping what matters for memory: the class, the GQA ratio, MLA's low-rank projections and
rope/nope split, the routed + shared experts with a dense first layer, and untied embeddings.

Nothing is downloaded here: ``load`` is the only function that may reach the Hub, and only when it
is given a Hub id. ``get_device`` says where the course runs them, ``decoder_layers`` where their
layers are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load lazily: `lowmem estimate` answers without them
    import torch
    from transformers import PretrainedConfig


def get_device() -> torch.device:
    """The best device here: CUDA, then Apple's MPS, then the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Member:
    """One model of the family, as published."""

    name: str  # short name, e.g. "r1-distill-qwen-1.5b"
    hub_id: str  # e.g. "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    architecture: str  # transformers model_type: "qwen2", "llama" or "deepseek_v3"
    published_parameters: int  # total parameters as published (model card / paper)
    fields: dict[str, Any]  # config.json fields that differ from the class defaults


def _qwen2(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, theta: float) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, bos_token_id=151646, eos_token_id=151643,
    )


def _llama(hidden: int, layers: int, heads: int, kv: int, inter: int) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=128256,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    )


_R1_FIELDS: dict[str, Any] = dict(
    hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
    intermediate_size=18432, moe_intermediate_size=2048, first_k_dense_replace=3,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280,
    tie_word_embeddings=False, max_position_embeddings=163840, rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    },
    num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
)

MEMBERS: dict[str, Member] = {
    m.name: m
    for m in [
        Member("r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "qwen2",
               1_780_000_000, _qwen2(1536, 28, 12, 2, 8960, 151936, 10000.0)),
        Member("r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2",
               7_620_000_000, _qwen2(3584, 28, 28, 4, 18944, 152064, 10000.0)),
        Member("r1-distill-llama-8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama",
               8_030_000_000, _llama(4096, 32, 32, 8, 14336)),
        Member("r1-distill-qwen-14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "qwen2",
               14_800_000_000, _qwen2(5120, 48, 40, 8, 13824, 152064, 1000000.0)),
        Member("r1-distill-qwen-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2",
               32_800_000_000, _qwen2(5120, 64, 40, 8, 27648, 152064, 1000000.0)),
        Member("r1-distill-llama-70b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama",
               70_600_000_000, _llama(8192, 80, 64, 8, 28672)),
        Member("r1", "deepseek-ai/DeepSeek-R1", "deepseek_v3", 671_000_000_000, _R1_FIELDS),
    ]
}

SUPPORTED_ARCHITECTURES = ("qwen2", "llama", "deepseek_v3")


def _config_class(architecture: str) -> type[PretrainedConfig]:
    """The transformers config class of ``architecture`` (imports transformers on first use)."""
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config

    return {"qwen2": Qwen2Config, "llama": LlamaConfig, "deepseek_v3": DeepseekV3Config}[architecture]

# What a tiny twin keeps small. Real head counts are divided down to their GQA ratio.
TINY_HEAD_DIM = 16
TINY_LAYERS = 4
TINY_VOCAB = 1024


def resolve(name: str) -> Member:
    """The member called ``name``: a short name or a Hub id, case-insensitive.

    Raises ``ValueError`` naming the known members when nothing matches.
    """
    key = name.strip().lower()
    for member in MEMBERS.values():
        if key in (member.name, member.hub_id.lower(), member.hub_id.split("/")[-1].lower()):
            return member
    known = ", ".join(MEMBERS)
    raise ValueError(f"unknown model {name!r}: known models are {known} (or their deepseek-ai/... Hub ids)")


def config(name: str) -> PretrainedConfig:
    """The real-size transformers config of a member (nothing is allocated or downloaded)."""
    member = resolve(name)
    cfg = _config_class(member.architecture)(**member.fields)
    cfg.name_or_path = member.hub_id
    return cfg


def tiny(name: str, **overrides: Any) -> PretrainedConfig:
    """An architecture-faithful tiny twin of a member; ``overrides`` replace any config field.

    Qwen2/Llama twins keep the GQA ratio (heads per kv head), the MLP's width ratio and the
    attention bias; the DeepseekV3 twin keeps MLA (q and kv LoRA ranks, rope/nope split), a dense
    first layer, then MoE layers with routed experts, a shared expert and group-limited routing.
    """
    member = resolve(name)
    real = config(name)
    if member.architecture == "deepseek_v3":
        fields: dict[str, Any] = dict(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=TINY_VOCAB,
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    else:
        group = real.num_attention_heads // real.num_key_value_heads
        hidden = group * TINY_HEAD_DIM
        mlp_ratio = real.intermediate_size / real.hidden_size
        fields = dict(
            hidden_size=hidden, num_hidden_layers=TINY_LAYERS, num_attention_heads=group,
            num_key_value_heads=1, head_dim=TINY_HEAD_DIM,
            intermediate_size=16 * math.ceil(hidden * mlp_ratio / 16), vocab_size=TINY_VOCAB,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": real.rope_parameters["rope_theta"]},
        )
    fields.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    fields.update(overrides)
    cfg = _config_class(member.architecture)(**{**member.fields, **fields})
    cfg.name_or_path = f"tiny-{member.name}"
    return cfg


def build(cfg: PretrainedConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
          seed: int | None = 0) -> torch.nn.Module:
    """A randomly initialised ``...ForCausalLM`` for ``cfg`` on ``device`` ("cpu", "cuda", "meta").

    ``dtype`` (default fp32) is the dtype the parameters are created in; building on "meta"
    allocates nothing, which is how the full-size members are inspected.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {cfg.model_type!r}: "
                         f"the course covers {', '.join(SUPPORTED_ARCHITECTURES)}")
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a ``...ForCausalLM`` (``model.model.layers``), inside a PEFT model too;
    ``ValueError`` for another model."""
    import torch

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: expected a transformers ...ForCausalLM")
    return layers


def lora_modules(model: torch.nn.Module) -> list[str]:
    """Full names of the linear maps that carry a LoRA adapter: the estimator's targets
    (``estimate.lora_targets``: every linear map of attention and of the MLP, lm_head and the routed
    experts excluded; attention only on DeepSeek-V3), so a run adapts exactly what its estimate counts."""
    import torch

    from lowmem_course.estimate import lora_targets, shape_of

    names = {x.name.split(".")[-1] for x in lora_targets(shape_of(model.config), False)}
    return [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
            and n.split(".")[-1] in names and ".experts." not in n and n != "lm_head"]


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model: all of them, and those one token passes through."""

    total: int
    active: int  # equal to ``total`` for dense models; MoE counts only the top-k routed experts


def count_parameters(cfg: PretrainedConfig) -> ParameterCount:
    """Exact parameter counts of ``cfg``, read from a model built on the meta device.

    For MoE models ``active`` counts the shared experts and ``num_experts_per_tok`` of the
    ``n_routed_experts`` routed experts in every MoE layer (the router itself is always active).
    """
    model = build(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if cfg.model_type == "deepseek_v3":
        for module in model.modules():
            experts = getattr(module, "experts", None)
            if experts is None or not hasattr(module, "gate"):
                continue
            expert_params = sum(p.numel() for p in experts.parameters())
            per_expert = expert_params // cfg.n_routed_experts
            inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return ParameterCount(total=total, active=total - inactive)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
STUDENTS_DIR = Path(__file__).parent / "students"  # the trained students shipped with the package
STUDENT_ARCHS = {"qwen2": "r1-distill-qwen-1.5b", "deepseek_v3": "r1"}  # shipped student arch -> the member it twins


def refuse_shipped(path: Path) -> None:
    """``ValueError`` when ``path`` lies inside the shipped students and adapters (``STUDENTS_DIR``).

    No command writes there: retraining a student or an adapter writes to its own ``--out``, and
    ``lowmem doctor`` checks the shipped files against their manifest.
    """
    if Path(path).resolve().is_relative_to(STUDENTS_DIR.resolve()):
        raise ValueError(f"{path} is inside the shipped students ({STUDENTS_DIR}), which no command writes: "
                         "choose an --out outside the package")


def student_path(name: str) -> Path | None:
    """The directory of a shipped student ("student-qwen2", "student-deepseek-v3"), else None."""
    key = name.strip().lower()
    folder = STUDENTS_DIR / key.removeprefix("student-").replace("-", "_")
    if key.startswith("student-") and folder.is_dir():
        return folder
    return None


def load(name_or_path: str | Path, **kwargs: Any) -> torch.nn.Module:
    """Load pretrained weights the way a learner would: ``from_pretrained``, safetensors only.

    ``name_or_path`` is a local directory (``save_pretrained`` output), a shipped student
    ("student-qwen2", "student-deepseek-v3") or a family Hub id (then the Hub is used, so a network
    is needed). ``kwargs`` go to ``from_pretrained`` (``dtype``,
    ``quantization_config``, ``device_map``, ...). Remote code is never trusted. A local directory
    without ``config.json`` or without safetensors weights raises ``FileNotFoundError`` naming the
    missing file.
    """
    from transformers import AutoModelForCausalLM

    path = student_path(str(name_or_path)) or Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: is it a save_pretrained directory?")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(f"{path} has no model.safetensors (nor model.safetensors.index.json): "
                                    "the course loads safetensors weights only")
        source = str(path)
    elif path.exists():
        raise ValueError(f"{path} is a file, not a model directory")
    else:
        source = resolve(str(name_or_path)).hub_id
    kwargs.setdefault("use_safetensors", True)
    if kwargs.get("trust_remote_code"):
        raise ValueError("the course never runs remote code: drop trust_remote_code")
    return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, **kwargs)


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer that goes with ``load(name_or_path)``.

    A directory whose ``tokenizer_config.json`` names the generic ``TokenizersBackend`` (the shipped
    students, and anything saved from a ``tokenizers`` object) is loaded as exactly that: its
    ``tokenizer.json`` decides everything. ``AutoTokenizer`` would substitute the model type's own
    class (``Qwen2Tokenizer`` for a qwen2 config), whose pre-tokenizer splits the students'
    ``<think>`` token into characters. Everything else goes through ``AutoTokenizer``.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = student_path(str(name_or_path)) or Path(name_or_path).expanduser()
    if path.is_dir():
        settings = path / "tokenizer_config.json"
        if settings.is_file() and json.loads(settings.read_text()).get("tokenizer_class") == "TokenizersBackend":
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(resolve(str(name_or_path)).hub_id)
