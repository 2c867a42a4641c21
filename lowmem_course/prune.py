"""Prune: zero weights (unstructured, 2:4) or remove whole units (heads, MLP channels, layers, experts).

Two families of pruning, with very different memory stories:

* **Masks** (``prune_unstructured``): magnitude or Wanda scores pick weights to zero, and
  ``torch.nn.utils.prune.custom_from_mask`` applies the mask, which stays in force through every
  later optimizer step. The tensors keep their shape: a dense matrix full of zeros costs the same
  bytes (more, while the mask is attached). Only a sparse format (``measure.storage_bytes`` counts
  one) or a 2:4 kernel on a GPU turns the zeros into saved memory.
* **Structured** (``prune_heads``, ``prune_mlp_channels``, ``drop_layers``, ``prune_experts``):
  rebuild smaller modules (``nn.Linear`` with fewer rows or columns, fewer decoder layers, fewer
  routed experts), chosen from statistics on calibration tokens. The parameter bytes really shrink.

Wanda (Sun et al., arXiv 2306.11695) scores a weight by ``|W_ij| * ||X_j||_2``, the L2 norm of its
input feature over all calibration tokens, and compares scores within each output row
(``per="row"``, the paper's choice). Magnitude pruning, the paper's baseline, compares ``|W|``
across the whole matrix (``per="layer"``, as ``torchao.sparsity.WandaSparsifier`` also does).
Those are the defaults of ``prune_unstructured``; either method takes either group.

Calibration batches are ``input_ids`` plus ``attention_mask`` (padding excluded everywhere);
``generated_calibration`` makes them from the model's own greedy completions, token ids as
generated (special tokens such as ``<think>`` included, nothing re-tokenized).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from transformers import PretrainedConfig

from lowmem_course import family, measure, optimizers, steps
from lowmem_course.family import decoder_layers

Method = Literal["magnitude", "wanda"]
Pattern = Literal["unstructured", "2:4"]
Group = Literal["layer", "row"]
METHODS, PATTERNS, GROUPS = get_args(Method), get_args(Pattern), get_args(Group)

Batch = dict[str, torch.Tensor]  # ``input_ids`` and optionally ``attention_mask``, shape (batch, tokens)


def prunable_linears(model: nn.Module, only: str | None = None) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder layers, by qualified name (embeddings, lm_head excluded).

    ``only`` keeps those whose name contains it (e.g. "mlp", "self_attn.q_proj"); ``ValueError``
    when none does.
    """
    decoder_layers(model)
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.startswith("model.layers.") and (only is None or only in name)}
    if not linears:
        raise ValueError(f"no decoder nn.Linear of {type(model).__name__} has a name containing {only!r}")
    return linears


def _batches(calibration: Batch | Iterable[Batch]) -> list[Batch]:
    return [calibration] if isinstance(calibration, dict) else list(calibration)


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run(model: nn.Module, batches: list[Batch], token_mask: list[torch.Tensor]) -> None:
    """Forward every batch, publishing the current batch's token mask in ``token_mask[0]``.

    Positions count real tokens only (as ``generate`` does), so left-padded rows see the same
    rotary positions as right-padded ones.
    """
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        token_mask[:] = [mask.bool()]
        positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)


@torch.no_grad()
def generated_calibration(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> Batch:
    """Calibration tokens from the model's own greedy completions of ``prompts``.

    Each row is the prompt's token ids followed by the generated ids up to and including the first
    ``eos_token_id``, exactly as generated (special tokens kept, no decode/re-encode round trip),
    right-padded with ``pad_token_id``. Returns ``input_ids`` and ``attention_mask``, int64,
    shape (len(prompts), longest row).
    """
    if not prompts:
        raise ValueError("need at least one prompt")
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    out = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id).cpu()
    rows = []
    for i in range(len(prompts)):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        generated = out[i, enc["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
        rows.append(prompt + generated)
    input_ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _input_sums(model: nn.Module, calibration: Batch | Iterable[Batch], modules: dict[str, nn.Module],
                stat) -> dict[str, torch.Tensor]:
    """Sum ``stat(x)`` over the calibration batches, ``x`` the (tokens, in_features) fp32 input of each module."""
    sums: dict[str, torch.Tensor] = {}
    token_mask: list[torch.Tensor] = []

    def hook(name: str):
        def accumulate(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])[token_mask[0].flatten()].float()  # padding dropped
            sums[name] = sums.get(name, 0) + stat(x)
        return accumulate

    with _hooks([m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]):
        _run(model, _batches(calibration), token_mask)
    return sums


def input_norms(model: nn.Module, calibration: Batch | Iterable[Batch],
                modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """The L2 norm of each input feature of each module over the calibration tokens (padding excluded).

    ``modules`` defaults to ``prunable_linears(model)``; each result is an fp32 tensor of shape
    ``(in_features,)``: ``sqrt(sum over tokens of x_j ** 2)``.
    """
    modules = prunable_linears(model) if modules is None else modules
    sums = _input_sums(model, calibration, modules, lambda x: x.pow(2).sum(dim=0))
    return {name: s.sqrt() for name, s in sums.items()}


def input_grams(model: nn.Module, calibration: Batch | Iterable[Batch],
                modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """``X^T X`` of each module's inputs over the calibration tokens (fp32, ``(in_features, in_features)``).

    Its diagonal is ``input_norms ** 2``; the whole matrix gives ``relative_output_error``.
    """
    modules = prunable_linears(model) if modules is None else modules
    return _input_sums(model, calibration, modules, lambda x: x.T @ x)


def relative_output_error(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (W * mask)^T - X W^T||^2 / ||X W^T||^2`` on the calibration tokens (``gram = X^T X``).

    The layer-wise objective that Wanda approximates (with only the diagonal of ``gram``).
    """
    w = weight.detach().float()
    delta = w * ~mask
    return float(((delta @ gram) * delta).sum() / ((w @ gram) * w).sum())


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude pruning's importance of each weight: ``|W|``."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance of each weight: ``|W_ij| * ||X_j||_2`` (``input_norm`` from ``input_norms``)."""
    if input_norm.shape != weight.shape[1:]:
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}, expected ({weight.shape[1]},)")
    return weight.detach().abs().float() * input_norm.float()


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: Group = "layer") -> torch.Tensor:
    """A boolean keep-mask zeroing the ``int(n * sparsity)`` lowest scores of each group exactly.

    ``per="layer"`` compares all weights of the matrix (n = its size), ``per="row"`` each output row
    on its own (n = in_features), as the Wanda paper does.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if per not in GROUPS:
        raise ValueError(f"per must be one of {', '.join(GROUPS)}, got {per!r}")
    groups = scores.reshape(1, -1) if per == "layer" else scores.reshape(scores.shape[0], -1)
    n_pruned = int(groups.shape[1] * sparsity)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(1, groups.argsort(dim=1)[:, :n_pruned], False)
    return mask.reshape(scores.shape)


def semi_structured_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """An N:M keep-mask: in every ``m`` consecutive weights of a row, the ``n`` highest scores survive.

    2:4 (the default) is the pattern NVIDIA's sparse tensor cores accelerate (exactly 50% zeros).
    """
    if not 0 < n < m or scores.shape[-1] % m:
        raise ValueError(f"need 0 < n < m and in_features divisible by m, got n={n}, m={m}, "
                         f"in_features={scores.shape[-1]}")
    blocks = scores.reshape(-1, m)
    mask = torch.ones_like(blocks, dtype=torch.bool)
    mask.scatter_(1, blocks.argsort(dim=1)[:, : m - n], False)
    return mask.reshape(scores.shape)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach each mask to its module's ``weight`` with ``torch.nn.utils.prune.custom_from_mask``.

    The module then holds ``weight_orig`` (the trainable parameter), the ``weight_mask`` buffer and
    recomputes ``weight = weight_orig * weight_mask`` before every forward, so pruned weights stay
    zero through optimizer steps. ``make_permanent`` folds the mask back into a plain parameter.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        torch_prune.custom_from_mask(modules[name], "weight", mask.to(modules[name].weight.device))


def make_permanent(model: nn.Module) -> None:
    """Remove every pruning re-parametrisation: ``weight`` becomes a plain parameter, zeros included."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")


DEFAULT_GROUP = {"magnitude": "layer", "wanda": "row"}  # the Wanda paper's choices for each method


def prune_unstructured(model: nn.Module, method: Method = "wanda", sparsity: float = 0.5,
                       calibration: Batch | Iterable[Batch] | None = None, pattern: Pattern = "unstructured",
                       per: Group | None = None, only: str | None = None) -> dict[str, torch.Tensor]:
    """Zero weights of every decoder ``nn.Linear`` with masks; returns the masks, by module name.

    ``method`` "magnitude" ranks ``|W|``; "wanda" ranks ``|W| * ||X||`` and needs ``calibration``
    batches. ``per`` is the comparison group ("layer": the whole matrix, "row": each output row);
    ``None`` takes the paper's choice (``DEFAULT_GROUP``: magnitude per layer, Wanda per row).
    ``pattern`` "2:4" ignores ``sparsity`` and ``per`` (always 2 of every 4 weights of a row).
    ``only`` prunes just the linears whose name contains it (``prunable_linears``). Embeddings and
    ``lm_head`` are never pruned.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if method == "wanda" and calibration is None:
        raise ValueError("wanda needs calibration batches (input_ids of real text)")
    per = DEFAULT_GROUP[method] if per is None else per
    modules = prunable_linears(model, only)
    norms = input_norms(model, calibration, modules) if method == "wanda" else {}
    masks = {}
    for name, module in modules.items():
        scores = wanda_scores(module.weight, norms[name]) if method == "wanda" else magnitude_scores(module.weight)
        masks[name] = (semi_structured_mask(scores) if pattern == "2:4"
                       else unstructured_mask(scores, sparsity, per=per))
    apply_masks(model, masks)
    return masks


def zero_fraction(modules: Iterable[nn.Module]) -> float:
    """The share of exactly-zero entries in the ``weight`` of ``modules`` (0..1)."""
    weights = [m.weight for m in modules]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model`` (shared storages counted once)."""
    return measure.storage_bytes(*model.parameters(), *model.buffers())


# Structured pruning: rebuild smaller modules.

def slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None,
                 in_index: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding only the rows ``out_index`` and the columns ``in_index`` of ``linear``.

    On the kept units it computes exactly what ``linear`` computed; the dropped rows and columns
    are no longer stored.
    """
    weight = linear.weight.detach()
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    bias = linear.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach() if out_index is None else bias.detach()[out_index])
    return new


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"keep must be in 1..{scores.numel()}, got {keep}")
    return scores.topk(keep).indices.sort().values


def prune_mlp_channels(model: nn.Module, keep_ratio: float, calibration: Batch | Iterable[Batch]) -> dict[str, int]:
    """Remove the least important intermediate channels of every dense SwiGLU MLP (gate/up/down).

    A channel's importance is ``||X_j|| * ||W_down[:, j]||`` on the calibration tokens (the Wanda
    score summed over the channel's output column). Keeps ``round(keep_ratio * width)`` channels;
    returns the new width of each MLP, by module name.
    """
    mlps = {name: m for name, m in model.named_modules()
            if name.startswith("model.layers.") and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))}
    norms = input_norms(model, calibration, {name: m.down_proj for name, m in mlps.items()})
    widths = {}
    for name, mlp in mlps.items():
        score = norms[name] * mlp.down_proj.weight.detach().float().norm(dim=0)
        kept = _keep_top(score, max(1, round(keep_ratio * score.numel())))
        mlp.gate_proj = slice_linear(mlp.gate_proj, out_index=kept)
        mlp.up_proj = slice_linear(mlp.up_proj, out_index=kept)
        mlp.down_proj = slice_linear(mlp.down_proj, in_index=kept)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = kept.numel()
        widths[name] = kept.numel()
    return widths


def prune_heads(model: nn.Module, keep_per_group: int, calibration: Batch | Iterable[Batch]) -> dict[str, int]:
    """Remove query heads of every GQA attention (Qwen2, Llama), keeping ``keep_per_group`` per KV head.

    A head's importance is the L2 norm of its slice of the ``o_proj`` input (its output over the
    calibration tokens) times the norm of its ``o_proj`` columns. ``q_proj`` loses the rows of the
    dropped heads, ``o_proj`` their columns; the KV heads are untouched. Returns the new number of
    query heads of each attention, by module name.
    """
    attns = {name: m for name, m in model.named_modules()
             if name.startswith("model.layers.") and hasattr(m, "num_key_value_groups") and hasattr(m, "q_proj")}
    if not attns:
        raise ValueError(f"{type(model).__name__} has no GQA attention with q_proj (MLA is not supported)")
    norms = input_norms(model, calibration, {name: m.o_proj for name, m in attns.items()})
    heads = {}
    for name, attn in attns.items():
        d, groups = attn.head_dim, attn.num_key_value_groups
        if not 0 < keep_per_group <= groups:
            raise ValueError(f"keep_per_group must be in 1..{groups}, got {keep_per_group}")
        column_norm = attn.o_proj.weight.detach().float().norm(dim=0)
        score = (norms[name] * column_norm).reshape(-1, groups, d).norm(dim=-1)  # (kv heads, group)
        kept_heads = torch.cat([g * groups + _keep_top(s, keep_per_group) for g, s in enumerate(score)])
        channels = (kept_heads[:, None] * d + torch.arange(d)).flatten()
        attn.q_proj = slice_linear(attn.q_proj, out_index=channels)
        attn.o_proj = slice_linear(attn.o_proj, in_index=channels)
        attn.num_key_value_groups = keep_per_group
        heads[name] = kept_heads.numel()
    return heads


@torch.no_grad()
def layer_influence(model: nn.Module, calibration: Batch | Iterable[Batch]) -> torch.Tensor:
    """Each decoder layer's block influence (ShortGPT, arXiv 2403.03853): ``1 - cos(h_in, h_out)``.

    Averaged over calibration tokens (padding excluded); shape ``(layers,)``. A layer that barely
    turns the residual stream scores near 0 and is the cheapest to drop.
    """
    layers = decoder_layers(model)
    totals = torch.zeros(len(layers))
    count = [0]
    token_mask: list[torch.Tensor] = []

    def hook(i: int):
        def measure(_module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = (args[0] if args else kwargs["hidden_states"])[token_mask[0]]
            h_out = (output[0] if isinstance(output, tuple) else output)[token_mask[0]]
            totals[i] += (1 - nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)).sum()
            if i == 0:
                count[0] += h_in.shape[0]
        return measure

    with _hooks([layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]):
        _run(model, _batches(calibration), token_mask)
    return totals / count[0]


def drop_layers(model: nn.Module, indices: Iterable[int]) -> None:
    """Delete the decoder layers ``indices`` and renumber the rest (cache slots, ``config``)."""
    layers = decoder_layers(model)
    drop = set(indices)
    if not drop or not drop <= set(range(len(layers))) or len(drop) == len(layers):
        raise ValueError(f"indices must name some but not all of the {len(layers)} layers, got {sorted(drop)}")
    kept = [i for i in range(len(layers)) if i not in drop]
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    cfg = model.config
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    cfg.num_hidden_layers = len(kept)


def _moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """MoE blocks (a ``gate`` router plus 3-D ``experts`` weights), by module name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "gate_up_proj")}


@torch.no_grad()
def expert_counts(model: nn.Module, calibration: Batch | Iterable[Batch]) -> dict[str, torch.Tensor]:
    """How many calibration tokens each routed expert of each MoE block is chosen for (padding excluded).

    Read from the router's own top-k choice; shape ``(n_experts,)`` per block, int64.
    """
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no routed experts")
    counts = {name: torch.zeros(m.gate.num_experts, dtype=torch.long) for name, m in blocks.items()}
    token_mask: list[torch.Tensor] = []

    def hook(name: str):
        def count(_module: nn.Module, _args: tuple, output: tuple) -> None:
            chosen = output[2][token_mask[0].flatten()]  # (tokens, top_k) expert indices
            counts[name] += torch.bincount(chosen.flatten(), minlength=counts[name].numel())
        return count

    with _hooks([m.gate.register_forward_hook(hook(name)) for name, m in blocks.items()]):
        _run(model, _batches(calibration), token_mask)
    return counts


def prune_experts(model: nn.Module, keep: int, counts: dict[str, torch.Tensor]) -> None:
    """Keep the ``keep`` most-chosen routed experts of each MoE block (``counts`` from ``expert_counts``).

    The 3-D expert weights, the router rows and its score-correction bias shrink to the kept
    experts. Group-limited routing (``n_group`` groups) needs the expert count to split into groups
    of at least two, so the pruned router chooses its top-k over all kept experts (one group).
    """
    for name, moe in _moe_blocks(model).items():
        gate, experts = moe.gate, moe.experts
        if not gate.top_k <= keep <= gate.num_experts:
            raise ValueError(f"keep must be in {gate.top_k}..{gate.num_experts} (top_k..n_experts), got {keep}")
        kept = _keep_top(counts[name].float(), keep)
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[kept].clone())
        experts.down_proj = nn.Parameter(experts.down_proj.detach()[kept].clone())
        gate.weight = nn.Parameter(gate.weight.detach()[kept].clone())
        gate.e_score_correction_bias = gate.e_score_correction_bias[kept].clone()
        experts.num_experts = gate.num_experts = keep
        gate.num_group = gate.topk_group = 1


def pruned_config(cfg: PretrainedConfig, heads: float = 1.0, mlp: float = 1.0, layers: float = 1.0,
                  experts: float = 1.0) -> PretrainedConfig:
    """The config of ``cfg`` after uniform structured pruning, for the estimator or ``count_parameters``.

    Each argument is the share kept (0 < share <= 1), rounded as the pruning functions round it:
    ``heads`` of the query heads per KV head (GQA models), ``mlp`` of the MLP channels
    (``intermediate_size``; Qwen2/Llama), ``layers`` of the decoder layers, ``experts`` of the routed
    experts per MoE layer (DeepseekV3, routed ungrouped as ``prune_experts`` does).
    """
    shares = {"heads": heads, "mlp": mlp, "layers": layers, "experts": experts}
    for name, share in shares.items():
        if not 0.0 < share <= 1.0:
            raise ValueError(f"{name} must be a share in (0, 1], got {share}")
    moe = cfg.model_type == "deepseek_v3"
    if moe and (heads, mlp) != (1.0, 1.0):
        raise ValueError("heads and mlp pruning are supported on GQA models (Qwen2, Llama), not DeepseekV3")
    if not moe and experts != 1.0:
        raise ValueError(f"{cfg.model_type} has no routed experts")
    new = copy.deepcopy(cfg)
    if heads != 1.0:
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        new.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        new.num_attention_heads = max(1, round(heads * group)) * cfg.num_key_value_heads
    if mlp != 1.0:
        new.intermediate_size = max(1, round(mlp * cfg.intermediate_size))
    if layers != 1.0:
        new.num_hidden_layers = max(1, round(layers * cfg.num_hidden_layers))
        if getattr(cfg, "layer_types", None) is not None:
            new.layer_types = cfg.layer_types[: new.num_hidden_layers]
    if experts != 1.0:
        new.n_routed_experts = max(cfg.num_experts_per_tok, round(experts * cfg.n_routed_experts))
        new.n_group = new.topk_group = 1
    return new


def recover_with_lora(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], rank: int = 8,
                      lr: float = 2e-3) -> nn.Module:
    """Fine-tune LoRA adapters (peft) on a pruned model, then merge them back in; returns the merged model.

    ``batches`` yields ``(input_ids, labels)`` pairs (labels -100 where no loss is taken), one
    AdamW step each (``steps.train_loop``). Merging folds ``B @ A`` into every adapted ``nn.Linear``,
    so the returned model has exactly the pruned model's shapes and parameter bytes.
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=family.lora_modules(model)))
    # torch's default AdamW kernel (not the fused one): the recovery notebook 04 records, bit for bit
    optimizer = optimizers.make_optimizer(peft_model, "adamw", lr, fused=False)
    batches = list(batches)
    steps.train_loop(peft_model, optimizer, lambda step: batches[step], len(batches))
    return peft_model.merge_and_unload().eval()
