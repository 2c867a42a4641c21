"""KV cache: formulas, measured cache bytes, latent attention, the int8/int4 cache, capacity."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, QuantizedCache

from lowmem_course import family, kvcache

# (kv bytes per token in bf16, plain multi-head bytes per token in bf16), from the published configs
EXPECTED_BF16 = {
    "r1-distill-qwen-1.5b": (2 * 28 * 2 * 128 * 2, 2 * 28 * 12 * 128 * 2),
    "r1-distill-qwen-7b": (2 * 28 * 4 * 128 * 2, 2 * 28 * 28 * 128 * 2),
    "r1-distill-llama-8b": (2 * 32 * 8 * 128 * 2, 2 * 32 * 32 * 128 * 2),
    "r1-distill-qwen-14b": (2 * 48 * 8 * 128 * 2, 2 * 48 * 40 * 128 * 2),
    "r1-distill-qwen-32b": (2 * 64 * 8 * 128 * 2, 2 * 64 * 40 * 128 * 2),
    "r1-distill-llama-70b": (2 * 80 * 8 * 128 * 2, 2 * 80 * 64 * 128 * 2),
    "r1": ((512 + 64) * 61 * 2, 128 * (192 + 128) * 61 * 2),
}


@pytest.mark.parametrize("name", list(EXPECTED_BF16))
def test_bytes_per_token_of_every_member(name: str) -> None:
    cfg = family.config(name)
    assert (kvcache.kv_bytes_per_token(cfg), kvcache.mha_bytes_per_token(cfg)) == EXPECTED_BF16[name]
    assert kvcache.kv_bytes_per_token(cfg, bytes_per_value=1) * 2 == EXPECTED_BF16[name][0]


def test_r1_mla_figure() -> None:
    assert kvcache.kv_bytes_per_token(family.config("r1")) == 70_272


def _prompt(batch: int = 1, seq: int = 6) -> torch.Tensor:
    return torch.randint(0, family.TINY_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "r1"])
def test_measured_cache_bytes_match_formula_at_every_step(name: str) -> None:
    cfg = family.tiny(name)
    model = family.build(cfg).eval()
    sequences, record = kvcache.cache_growth(model, _prompt(), max_new_tokens=5)
    assert sequences.shape == (1, 11)
    assert [tokens for tokens, _ in record] == [6, 7, 8, 9, 10]
    assert all(n_bytes == tokens * kvcache.kv_bytes_per_token(cfg, bytes_per_value=4) for tokens, n_bytes in record)


def test_stock_deepseek_v3_caches_the_latent_not_expanded_keys() -> None:
    cfg = family.tiny("r1")
    model = family.build(cfg).eval()
    with torch.no_grad():
        cache = model(_prompt(batch=2), use_cache=True).cache
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(2, 1, 6, cfg.kv_lora_rank)] * 3
    assert [tuple(layer.values.shape) for layer in cache.layers] == [(2, 1, 6, cfg.qk_rope_head_dim)] * 3
    assert kvcache.cache_bytes(cache) == 2 * 6 * (16 + 8) * 3 * 4


def test_latent_attention_generates_the_same_tokens() -> None:
    model = family.build(family.tiny("r1")).eval()
    prompt = _prompt(batch=3, seq=8)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # a left-padded row exercises the attention mask
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        stock_logits = model(prompt, attention_mask=mask).logits
        stock = model.generate(prompt, **kwargs)
        assert kvcache.use_latent_attention(model) == 3
        latent_logits = model(prompt, attention_mask=mask).logits
        latent = model.generate(prompt, **kwargs)
    assert torch.equal(stock, latent)
    real = mask.bool()  # padded positions attend to nothing; their logits are never used
    torch.testing.assert_close(latent_logits[real], stock_logits[real], rtol=1e-4, atol=1e-5)
    kvcache.use_latent_attention(model, enable=False)
    assert type(model.model.layers[0].self_attn).__name__ == "DeepseekV3Attention"


def test_latent_attention_rejects_models_without_mla() -> None:
    model = family.build(family.tiny("r1-distill-qwen-1.5b"))
    with pytest.raises(ValueError, match="no DeepseekV3"):
        kvcache.use_latent_attention(model)


@pytest.mark.parametrize("nbits", [8, 4])
def test_int_quantization_round_trip_and_storage(nbits: int) -> None:
    layer = kvcache.IntQuantizedLayer(nbits=nbits, q_group_size=8)
    x = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(0))
    q, scale = layer._quantize(x, axis=-1)
    assert q.dtype == (torch.int8 if nbits == 8 else torch.uint8)
    assert q.shape == (2, 3, 10, 2, 8 * nbits // 8)
    assert scale.shape == (2, 3, 10, 2, 1)
    error = (layer._dequantize((q, scale)) - x).abs().unflatten(-1, (2, 8))
    assert bool((error <= scale / 2 + 1e-6).all())  # at most half a quantization step


def test_int_quantized_layer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="nbits must be 4 or 8"):
        kvcache.IntQuantizedLayer(nbits=3)
    with pytest.raises(ValueError, match="not a multiple of q_group_size"):
        kvcache.IntQuantizedLayer(q_group_size=12)._quantize(torch.zeros(1, 1, 2, 16), axis=-1)
    with pytest.raises(ValueError, match="an even one for int4"):
        kvcache.IntQuantizedLayer(nbits=4, q_group_size=5)._quantize(torch.zeros(1, 1, 2, 5), axis=-1)


@pytest.mark.parametrize("nbits", [8, 4])
def test_quantized_cache_bytes(nbits: int) -> None:
    """Prefill of 6 tokens is quantized whole; the next 2 tokens wait in the bf16 residual."""
    cfg = family.tiny("r1-distill-qwen-1.5b")  # 4 layers, 1 kv head of 16 values
    model = family.build(cfg, dtype=torch.bfloat16).eval()
    cache = kvcache.quantized_cache(cfg, nbits=nbits, q_group_size=8, residual_length=4)
    _, record = kvcache.cache_growth(model, _prompt(), max_new_tokens=3, cache=cache)
    assert [tokens for tokens, _ in record] == [6, 7, 8]
    quantized = 6 * 16 * nbits // 8 + 6 * 2 * 2  # packed values + one bf16 scale per group of 8
    residual = 2 * 16 * 2
    assert record[-1][1] == 4 * 2 * (quantized + residual)  # 4 layers, keys and values


@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "r1"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_fully_quantized_cache_matches_its_formula(name: str, nbits: int) -> None:
    cfg = family.tiny(name)
    model = family.build(cfg, dtype=torch.bfloat16).eval()
    cache = kvcache.quantized_cache(cfg, nbits=nbits, q_group_size=8, residual_length=1)
    _, record = kvcache.cache_growth(model, _prompt(), max_new_tokens=3, cache=cache)
    per_token = kvcache.quantized_kv_bytes_per_token(cfg, nbits, q_group_size=8)
    assert record == [(tokens, tokens * per_token) for tokens in (6, 7, 8)]


def test_quantized_bytes_per_token_at_full_size() -> None:
    qwen, r1 = family.config("r1-distill-qwen-7b"), family.config("r1")
    assert kvcache.quantized_kv_bytes_per_token(qwen, 8) == 2 * 28 * 4 * (128 + 2 * 2)
    assert kvcache.quantized_kv_bytes_per_token(qwen, 4) == 2 * 28 * 4 * (64 + 2 * 2)
    assert kvcache.quantized_kv_bytes_per_token(r1, 4) == 61 * (256 + 8 * 2 + 32 + 1 * 2)


def test_using_cache_swaps_the_default_cache_inside_the_block_only() -> None:
    cfg = family.tiny("r1-distill-qwen-1.5b")
    model = family.build(cfg).eval()
    with kvcache.using_cache(model, lambda: kvcache.quantized_cache(cfg, nbits=4, q_group_size=8, residual_length=1)):
        _, inside = kvcache.cache_growth(model, _prompt(), max_new_tokens=2)
    _, after = kvcache.cache_growth(model, _prompt(), max_new_tokens=2)
    assert after[-1][1] == 7 * kvcache.kv_bytes_per_token(cfg, bytes_per_value=4)
    assert inside[-1][1] == 4 * 2 * 7 * (8 + 2 * 4)  # every token quantized: 8 bytes + two fp32 scales
    assert not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize(("backend", "nbits"), [("quanto", 4), ("hqq", 8)])
def test_cache_bytes_of_optional_quantized_backends(backend: str, nbits: int) -> None:
    """transformers' own integer backends, when their package is installed (not a course dependency)."""
    pytest.importorskip({"quanto": "optimum.quanto", "hqq": "hqq"}[backend], reason=f"{backend} is not installed")
    cfg = family.tiny("r1-distill-qwen-1.5b")
    model = family.build(cfg).eval()
    axes = dict(axis_key=1, axis_value=1) if backend == "hqq" else {}
    cache = QuantizedCache(backend, cfg, nbits=nbits, q_group_size=16, residual_length=1, **axes)
    _, record = kvcache.cache_growth(model, _prompt(), max_new_tokens=3, cache=cache)
    assert [tokens for tokens, _ in record] == [6, 7, 8]
    # packed values plus fp32 scales and zero points: at most 2 x nbits per value, far under fp32
    assert 0 < record[-1][1] <= 8 * kvcache.kv_bytes_per_token(cfg, bytes_per_value=2 * nbits / 8)


def test_cache_bytes_of_an_empty_cache() -> None:
    assert kvcache.cache_bytes(DynamicCache()) == 0


def test_longest_trace() -> None:
    assert kvcache.longest_trace(gpu_bytes=1000, weights_bytes=400, bytes_per_token=7) == 85
    assert kvcache.longest_trace(1000, 400, 7, batch=2, reserved_bytes=100) == 35
    assert kvcache.longest_trace(1000, 2000, 7) == 0
    with pytest.raises(ValueError, match="must be positive"):
        kvcache.longest_trace(1000, 400, 0)


def test_paged_tokens() -> None:
    assert kvcache.paged_tokens([1, 16, 17, 0], block_size=16) == 16 + 16 + 32
    with pytest.raises(ValueError, match="block_size must be positive"):
        kvcache.paged_tokens([5], block_size=0)
