"""lowmem_course.quantize: exact byte counts of the bitsandbytes formats, the CPU fixes, QLoRA plumbing."""

import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from lowmem_course import family, quantize


def _save_twin(tmp_path, name="r1-distill-qwen-1.5b", **overrides):
    model = family.build(family.tiny(name, vocab_size=64, **overrides))
    model.save_pretrained(tmp_path)
    return model


def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def test_bnb_config_matches_each_format():
    assert quantize.bnb_config("int8").load_in_8bit
    fp4 = quantize.bnb_config("fp4")
    assert fp4.load_in_4bit and fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    dq = quantize.bnb_config("nf4-dq", compute_dtype=torch.float32)
    assert dq.bnb_4bit_quant_type == "nf4" and dq.bnb_4bit_use_double_quant
    assert dq.bnb_4bit_compute_dtype == torch.float32
    with pytest.raises(ValueError, match="unknown format 'int4'"):
        quantize.bnb_config("int4")


def test_nf4_double_quant_bytes_are_exact(tmp_path):
    reference = _save_twin(tmp_path)
    model = quantize.load_quantized(tmp_path, "nf4-dq")
    linears = _decoder_linears(reference)
    sizes = [m.in_features * m.out_features for m in linears.values()]
    s = quantize.storage_breakdown(model)
    assert s.quantized_weights == sum(sizes)
    assert s.codes == sum(sizes) // 2  # two 4-bit codes per byte
    blocks = [math.ceil(n / 64) for n in sizes]
    # one 8-bit absmax per block of 64, one fp32 absmax per 256 blocks, one fp32 offset per tensor
    assert s.constants == sum(b + 4 * math.ceil(b / 256) + 4 for b in blocks)
    assert s.tables == len(sizes) * (16 + 256) * 4  # NF4 code and the 8-bit dynamic code, fp32
    non_linear = sum(p.numel() for n, p in reference.named_parameters()
                     if n.removesuffix(".weight") not in linears or n.endswith(".bias"))
    buffers = sum(b.numel() * b.element_size() for b in reference.buffers())
    assert s.other == 2 * non_linear + buffers  # bf16 embeddings, norms, biases, lm_head; fp32 rope buffers
    assert s.bits_per_weight_without_tables <= 4.2


def test_real_size_layer_takes_4_127_bits_per_weight():
    layer = bnb.nn.Linear4bit(1536, 8960, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.load_state_dict(torch.nn.Linear(1536, 8960, bias=False, dtype=torch.bfloat16).state_dict())
    layer = layer.to("cpu")
    s = quantize.storage_breakdown(layer)
    n, blocks = 1536 * 8960, 1536 * 8960 // 64
    assert (s.codes, s.constants, s.tables) == (n // 2, blocks + 4 * math.ceil(blocks / 256) + 4, 1088)
    assert s.bits_per_weight == pytest.approx(4.1276, abs=1e-4)


def test_int8_keeps_one_fp32_scale_per_row(tmp_path):
    reference = _save_twin(tmp_path)
    model = quantize.load_quantized(tmp_path, "int8")
    linears = _decoder_linears(reference).values()
    s = quantize.storage_breakdown(model)
    assert s.quantized_weights == s.codes == sum(m.in_features * m.out_features for m in linears)
    assert s.constants == 4 * sum(m.out_features for m in linears)
    assert s.tables == 0


def test_layer_errors_rank_the_formats(tmp_path):
    reference = _save_twin(tmp_path)
    errors = {fmt: quantize.layer_errors(reference, quantize.load_quantized(tmp_path, fmt)) for fmt in quantize.FORMATS}
    assert set(errors["nf4"]) == set(_decoder_linears(reference))
    worst = {fmt: max(e.values()) for fmt, e in errors.items()}
    assert worst["int8"] < 0.01 < worst["nf4"] < 0.11 < worst["fp4"] < 0.14  # NF4 ~9% on Gaussian weights


def test_cpu_dequantize_is_exact_on_rows_not_a_multiple_of_the_block():
    quantize.fix_cpu_dequantize()
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], -1).reshape(-1).long()
    expected = (state.code[codes].view(-1, 64) * state.absmax[:, None]).reshape(64, 96)
    assert torch.equal(bnbF.dequantize_4bit(packed, state), expected)


@pytest.mark.parametrize("hidden", [96, 128])  # 128: rows a multiple of 64, where bitsandbytes repacks
def test_eval_then_train_keeps_gradients_on_every_lora_parameter(tmp_path, hidden):
    _save_twin(tmp_path, hidden_size=hidden, num_attention_heads=hidden // 16, num_key_value_heads=2,
               intermediate_size=2 * hidden)
    model = quantize.add_lora(quantize.load_quantized(tmp_path, "nf4-dq"), rank=4)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * 4  # A and B on 7 linear maps of 4 layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora if "lora_B" in n)
    assert all(p.grad is not None for _, p in lora)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # B is still zero: same function


def test_lora_with_checkpointing_gets_input_gradients(tmp_path):
    _save_twin(tmp_path)
    model = quantize.add_lora(quantize.load_quantized(tmp_path, "nf4-dq"), rank=4, checkpointing=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_upcast_doubles_the_unquantized_bytes(tmp_path):
    _save_twin(tmp_path)
    plain = quantize.storage_breakdown(quantize.load_quantized(tmp_path, "nf4-dq"))
    upcast_model = quantize.add_lora(quantize.load_quantized(tmp_path, "nf4-dq"), rank=4, upcast=True)
    upcast = quantize.storage_breakdown(upcast_model)
    lora = quantize.add_lora(quantize.load_quantized(tmp_path, "nf4-dq"), rank=4)
    adapters = 4 * quantize.trainable_parameters(lora)
    buffers = sum(b.numel() * b.element_size() for n, b in lora.named_buffers() if "rotary" in n)
    assert quantize.storage_breakdown(lora).other == plain.other + adapters
    assert upcast.other == 2 * (plain.other - buffers) + buffers + adapters
    assert upcast.codes == plain.codes


def test_quantize_experts_stores_them_in_4_bits(tmp_path):
    reference = _save_twin(tmp_path, name="r1")
    model = quantize.load_quantized(tmp_path, "nf4-dq")
    before = quantize.storage_breakdown(model)
    experts = quantize.fused_expert_modules(model)
    expert_weights = sum(p.numel() for m in experts for p in m.parameters())
    assert len(experts) == 2 and expert_weights == 2 * 8 * 3 * 64 * 32
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_logits = reference(input_ids=ids).logits
    assert quantize.quantize_experts(model) == 4
    after = quantize.storage_breakdown(model)
    assert after.quantized_weights == before.quantized_weights + expert_weights
    assert after.codes == before.codes + expert_weights // 2
    assert after.other == before.other - 2 * expert_weights
    assert quantize.fused_expert_modules(model) == []
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    assert ((logits - reference_logits).norm() / reference_logits.norm()).item() < 0.2
    assert all(not hasattr(m, "gate_up_proj") for m in experts)  # dequantized copies are dropped
