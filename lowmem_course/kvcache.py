"""The KV cache at inference: how many bytes a token costs, and four ways to pay less.

* ``kv_bytes_per_token`` / ``mha_bytes_per_token`` / ``quantized_kv_bytes_per_token``: the formulas
  (GQA, MLA, plain multi-head, int8/int4).
* ``cache_bytes`` / ``cache_growth``: measure the bytes a ``transformers`` cache really holds,
  step by step during ``generate``.
* ``use_latent_attention``: DeepseekV3's Multi-head Latent Attention with the key and value
  up-projection absorbed into the query and the output, so attention runs on the cached latent
  and the expanded keys and values are never built.
* ``IntQuantizedLayer`` / ``quantized_cache`` / ``using_cache``: an int8 or int4 cache on the KIVI
  scheme of ``transformers.QuantizedCache`` (no extra dependency), and a way to hand any cache
  to every ``generate`` call (``student.accuracy`` included).
* ``longest_trace`` and ``paged_tokens``: how many cached tokens fit beside the weights on a GPU,
  and what a paged allocator (vLLM's PagedAttention) holds for a batch of traces.

Bytes everywhere; a "value" is one cached number (2 bytes in bf16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, PretrainedConfig
from transformers.cache_utils import QuantizedLayer
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)


def _is_mla(cfg: PretrainedConfig) -> bool:
    return getattr(cfg, "kv_lora_rank", None) is not None


def _head_dim(cfg: PretrainedConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _cached_vectors(cfg: PretrainedConfig) -> list[tuple[int, int]]:
    """(how many, length) of the vectors one token adds to the cache, over all layers."""
    layers = cfg.num_hidden_layers
    if _is_mla(cfg):
        return [(layers, cfg.kv_lora_rank), (layers, cfg.qk_rope_head_dim)]
    return [(2 * layers * cfg.num_key_value_heads, _head_dim(cfg))]


def kv_bytes_per_token(cfg: PretrainedConfig, bytes_per_value: float = 2) -> int:
    """Bytes of KV cache one token of one sequence costs, over all layers.

    GQA (Qwen2, Llama): ``2 x layers x kv_heads x head_dim x bytes`` (a key and a value per kv head).
    MLA (DeepseekV3): ``(kv_lora_rank + qk_rope_head_dim) x layers x bytes`` (the compressed latent
    and the one rope key that all heads share). 70,272 bytes for R1 in bf16.
    """
    return round(sum(count * length for count, length in _cached_vectors(cfg)) * bytes_per_value)


def quantized_kv_bytes_per_token(cfg: PretrainedConfig, nbits: int, q_group_size: int = 64,
                                 scale_bytes: int = 2) -> int:
    """Bytes per token of an ``IntQuantizedLayer`` cache once quantized: packed values plus one
    ``scale_bytes`` scale per group of ``q_group_size`` values (groups never span two vectors)."""
    return sum(count * (length * nbits // 8 + -(-length // min(q_group_size, length)) * scale_bytes)
               for count, length in _cached_vectors(cfg))


def mha_bytes_per_token(cfg: PretrainedConfig, bytes_per_value: float = 2) -> int:
    """Bytes per token if every attention head cached its own key and value (plain multi-head).

    For MLA this is the expanded cache: ``heads x (qk_nope + qk_rope + v_head_dim) x layers x bytes``.
    """
    if _is_mla(cfg):
        per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        per_head = 2 * _head_dim(cfg)
    return round(cfg.num_hidden_layers * cfg.num_attention_heads * per_head * bytes_per_value)


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    """The plain tensors in ``obj``: itself, inside tuples, lists and dicts, or inside a tensor wrapper."""
    if isinstance(obj, torch.Tensor) and hasattr(obj, "__tensor_flatten__"):  # a wrapper (optimum-quanto's)
        for name in obj.__tensor_flatten__()[0]:
            yield from _tensors(getattr(obj, name))
    elif isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def cache_bytes(cache: Cache) -> int:
    """Bytes of every tensor a ``transformers`` cache holds: keys, values, quantized data, scales.

    Read from the tensors' storages (each counted once), so a quantized cache counts its packed
    integers, its scales and its full-precision residual, whatever the backend calls them.
    """
    storages: dict[tuple[int, torch.device], int] = {}
    for layer in cache.layers:
        for tensor in _tensors(list(vars(layer).values())):
            storage = tensor.untyped_storage()
            storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(storages.values())


def cache_growth(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 **generate_kwargs) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Greedy ``generate`` of exactly ``max_new_tokens`` tokens, weighing the cache after every forward.

    Returns the generated sequences and ``(cached tokens, cache bytes)`` pairs, one per forward
    pass (the prompt's prefill first). ``generate_kwargs`` go to ``generate`` (``cache=``,
    ``attention_mask=``, ``pad_token_id=``).
    """
    record: list[tuple[int, int]] = []

    def after_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        record.append((output.cache.get_seq_length(), cache_bytes(output.cache)))

    handle = model.register_forward_hook(after_forward, with_kwargs=True)
    try:
        sequences = model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                   do_sample=False, **generate_kwargs)
    finally:
        handle.remove()
    return sequences, record


class LatentAttention(DeepseekV3Attention):
    """MLA that attends in the latent space: the cache holds the latent and the rope key only.

    ``kv_b_proj`` maps the latent ``c`` (kv_lora_rank values) to each head's key ``W_uk c`` and value
    ``W_uv c``. Since ``q . (W_uk c) = (W_uk^T q) . c``, the query is projected into the latent
    space once, attention runs against the cached latents themselves (one shared "kv head"), and
    ``W_uv`` is applied to the attention output: the expanded keys and values never exist, and a
    decode step holds one score per head and cached token instead of every head's keys and values.
    """

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        batch, seq = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q_nope, q_rot = q.view(batch, seq, -1, self.qk_head_dim).transpose(1, 2).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(batch, 1, seq, self.kv_lora_rank)
        k_rot = k_rot.view(batch, 1, seq, self.qk_rope_head_dim)
        rope = apply_rotary_pos_emb_interleave if self.config.rope_interleave else apply_rotary_pos_emb
        q_rot, k_rot = rope(q_rot, k_rot, *position_embeddings)
        if cache is not None:  # the same two tensors the stock module caches
            latent, k_rot = cache.update(latent, k_rot, self.layer_idx)

        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        heads, cached = self.num_heads, latent.shape[-2]
        # Heads are folded into the query rows, so every head reads the same cached latent, unexpanded.
        q_latent = (q_nope @ w_uk).reshape(batch, 1, heads * seq, self.kv_lora_rank)
        q_rot = q_rot.reshape(batch, 1, heads * seq, self.qk_rope_head_dim)
        scores = (q_latent @ latent.transpose(-1, -2) + q_rot @ k_rot.transpose(-1, -2)) * self.scaling
        scores = scores.view(batch, heads, seq, cached)
        if attention_mask is None:  # sdpa leaves the mask out when it is plain causal
            attention_mask = torch.ones(seq, cached, dtype=torch.bool, device=scores.device).tril(cached - seq)
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        out = probs.view(batch, 1, heads * seq, cached) @ latent  # values are the latents themselves
        out = out.view(batch, heads, seq, self.kv_lora_rank) @ w_uv.transpose(1, 2)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out), None


def use_latent_attention(model: torch.nn.Module, enable: bool = True) -> int:
    """Switch every DeepseekV3 attention module of ``model`` to ``LatentAttention`` (or back).

    The weights are untouched; returns how many modules were switched. Raises ``ValueError`` on a
    model without MLA attention.
    """
    modules = [m for m in model.modules() if isinstance(m, DeepseekV3Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no DeepseekV3 (MLA) attention to switch")
    for module in modules:
        module.__class__ = LatentAttention if enable else DeepseekV3Attention
    return len(modules)


class IntQuantizedLayer(QuantizedLayer):
    """A cache layer stored as int8 or int4 (two per byte), KIVI style, with no extra dependency.

    Every group of ``q_group_size`` consecutive values along the head dimension gets one absmax scale
    (kept in the cache's dtype); the newest ``residual_length`` tokens stay in full precision and
    are quantized together when the residual fills up (``transformers.cache_utils.QuantizedLayer``).
    """

    def __init__(self, nbits: int = 8, q_group_size: int = 64, residual_length: int = 128):
        if nbits not in (4, 8):
            raise ValueError(f"nbits must be 4 or 8, got {nbits!r}")
        super().__init__(nbits=nbits, axis_key=-1, axis_value=-1, q_group_size=q_group_size,
                         residual_length=residual_length)
        self.qmax = 2 ** (nbits - 1) - 1  # symmetric range: 127 for int8, 7 for int4

    def _quantize(self, tensor: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        group = min(self.q_group_size, tensor.shape[axis])
        if tensor.shape[axis] % group or (self.nbits == 4 and group % 2):
            raise ValueError(f"head dimension {tensor.shape[axis]} is not a multiple of q_group_size {group} "
                             "(an even one for int4)")
        groups = tensor.unflatten(axis, (-1, group))
        scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(tensor.dtype).tiny) / self.qmax
        q = torch.round(groups / scale).clamp(-self.qmax, self.qmax).to(torch.int8)
        if self.nbits == 4:  # two values per byte, offset into 1..15
            q = (q + 8).to(torch.uint8)
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        return q, scale

    def _dequantize(self, qtensor: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, scale = qtensor
        if self.nbits == 4:
            q = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2).to(torch.int8) - 8
        return (q.to(scale.dtype) * scale).flatten(-2)


def quantized_cache(cfg: PretrainedConfig, nbits: int = 8, q_group_size: int = 64,
                    residual_length: int = 128) -> Cache:
    """A fresh int8/int4 cache for a model of ``cfg`` (one ``IntQuantizedLayer`` per layer)."""
    return Cache(layers=[IntQuantizedLayer(nbits, q_group_size, residual_length)
                         for _ in range(cfg.num_hidden_layers)])


@contextlib.contextmanager
def using_cache(model: torch.nn.Module, make_cache: Callable[[], Cache]) -> Iterator[None]:
    """Inside the block, every ``generate`` of ``model`` starts from ``make_cache()``.

    ``generate`` creates a ``DynamicCache`` when it is given none; this swaps it for a fresh cache
    from ``make_cache`` on the first forward pass, so callers that do not take a cache argument
    (``student.accuracy``) run with it too.
    """
    def swap(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = kwargs.get("cache")
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            kwargs["cache"] = make_cache()
        return args, kwargs

    handle = model.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def longest_trace(gpu_bytes: int, weights_bytes: int, bytes_per_token: int, batch: int = 1,
                  reserved_bytes: int = 0) -> int:
    """Most cached tokens per sequence that fit on a GPU of ``gpu_bytes`` beside the weights.

    ``(gpu_bytes - weights_bytes - reserved_bytes) // (batch x bytes_per_token)``, 0 when the
    weights alone do not fit. ``reserved_bytes`` covers activations and the CUDA context.
    """
    if min(gpu_bytes, bytes_per_token, batch) <= 0 or min(weights_bytes, reserved_bytes) < 0:
        raise ValueError("gpu_bytes, bytes_per_token and batch must be positive, the other sizes non-negative")
    return max(0, (gpu_bytes - weights_bytes - reserved_bytes) // (batch * bytes_per_token))


def paged_tokens(lengths: list[int], block_size: int = 16) -> int:
    """Cache slots a paged allocator holds for sequences of ``lengths`` tokens.

    Each sequence gets whole blocks of ``block_size`` tokens, so at most ``block_size - 1`` slots
    per sequence are wasted, against ``max_len - length`` when every request reserves its maximum.
    """
    if block_size <= 0 or any(n < 0 for n in lengths):
        raise ValueError("block_size must be positive and lengths non-negative")
    return sum(-(-n // block_size) * block_size for n in lengths)
