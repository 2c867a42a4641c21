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


# ---- adapters read their 16-bit input as it is under autocast (share_adapter_inputs) --------------

def _add_lora(base, share=True, **options):
    """``quantize.add_lora``; ``share=False``: with the adapters as peft leaves them (each casting its input
    to its own dtype, fp32)."""
    with pytest.MonkeyPatch.context() as patch:
        if not share:
            patch.setattr(quantize, "share_adapter_inputs", lambda model: 0)
        return quantize.add_lora(base, **options)


def _lora_twin(share=True, checkpointing=False):
    """The Llama grid twin in bf16 with rank-8 adapters, in train mode."""
    from lowmem_course import validate

    base = family.build(validate.grid_config("r1-distill-llama-8b"), dtype=torch.bfloat16)
    return _add_lora(base, share, rank=8, checkpointing=checkpointing).train()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_under_autocast_each_adapter_reads_its_layers_input_itself(checkpointing):
    """lora_A is called on the very tensor its LoRA layer received (same storage, 16 bits), so what it
    saves for backward is that tensor, not a copy; in the forward and in checkpointing's recompute."""
    from peft.tuners.lora import Linear as LoraLinear

    model = _lora_twin(checkpointing=checkpointing)
    calls = []
    for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
        layer.register_forward_pre_hook(lambda m, args: calls.append(("layer", args[0])))
        layer.lora_A["default"].register_forward_pre_hook(lambda m, args: calls.append(("A", args[0])))
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    forward = len(calls)
    loss.backward()
    assert forward == 2 * 7 * 4 and len(calls) == forward * (2 if checkpointing else 1)  # 7 adapters, 4 layers
    for (kind, x), (kind_a, a) in zip(calls[::2], calls[1::2]):
        assert (kind, kind_a) == ("layer", "A")
        assert a.dtype == torch.bfloat16 and a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_peft_alone_gives_each_adapter_an_fp32_copy_of_its_input():
    """What ``share_adapter_inputs`` removes (and what the test above would catch)."""
    from peft.tuners.lora import Linear as LoraLinear

    model = _lora_twin(share=False)
    seen = []
    for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
        layer.lora_A["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert seen and set(seen) == {torch.float32}


def test_without_autocast_the_adapters_still_cast_their_input():
    """A bf16 base with fp32 adapters outside autocast: peft's cast is needed (no dtype mismatch), and
    the model keeps it there; under autocast the same model shares."""
    model = _lora_twin()
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert not any(m.cast_input_dtype_enabled for m in layers)
    assert quantize.share_adapter_inputs(model) == len(layers)  # idempotent: one hook per layer
    assert all(len(m._forward_pre_hooks) == 1 for m in layers)


def test_sharing_frees_8_hidden_bytes_per_token_and_layer(monkeypatch):
    """Measured on the Llama twin (bf16-mixed LoRA, batch 2 x 64): peft's seven input copies per layer,
    2 x (6 hidden + intermediate) bytes a token, become the tensors the adapters read, saved once:
    the attention norm's output (q, k, v), attention's output (o_proj's; SDPA saves it anyway), the
    MLP norm's output (gate, up) and the SwiGLU product (down_proj's), 2 x (2 hidden + intermediate).
    The difference, 8 x hidden bytes per token and layer, is the drop of the measured activations."""
    from lowmem_course import validate
    from lowmem_course.estimate import Setup

    cfg = validate.grid_config("r1-distill-llama-8b")
    setup = Setup(mode="lora", precision="bf16-mixed", batch=2, seq=64)

    def activations() -> int:
        return validate.measured_components(validate.measure_setup(cfg, setup))["activations"]

    shared = activations()
    monkeypatch.setattr(quantize, "share_adapter_inputs", lambda model: 0)
    copied = activations()
    assert copied - shared == 8 * cfg.hidden_size * cfg.num_hidden_layers * setup.batch * setup.seq


TRAINING = [("lora bf16-mixed", "lora", torch.bfloat16, torch.bfloat16, False),
            ("lora fp16-mixed checkpointing", "lora", torch.float16, torch.float16, True),
            ("qlora bf16-mixed", "qlora", torch.bfloat16, torch.bfloat16, False),
            ("lora bf16 base, no autocast", "lora", torch.bfloat16, None, False)]


@pytest.mark.parametrize("mode,dtype,autocast,checkpointing", [t[1:] for t in TRAINING], ids=[t[0] for t in TRAINING])
def test_sharing_leaves_training_unchanged_bit_for_bit(tmp_path, mode, dtype, autocast, checkpointing):
    """Three AdamW steps with and without ``share_adapter_inputs``: the same losses and adapters, bit for
    bit. Under autocast the adapters' matmul sees the same 16-bit input either way (fp32 holds every
    16-bit value exactly, and autocast casts the copy back); the input's gradient arrives in 16 bits
    either way. Without autocast nothing changes."""
    from lowmem_course import optimizers, steps

    if mode == "qlora":
        _save_twin(tmp_path, "r1-distill-llama-8b")

    def train(share: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        base = (quantize.load_quantized(tmp_path, "nf4-dq", dtype=dtype) if mode == "qlora"
                else family.build(family.tiny("r1-distill-llama-8b", vocab_size=64), dtype=dtype))
        model = _add_lora(base, share, rank=4, checkpointing=checkpointing)
        optimizer = optimizers.make_optimizer(model, "adamw", 1e-2, fused=False)
        batches = lambda step: (torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step)),)  # noqa: E731
        losses = steps.train_loop(model, optimizer, batches, 3, autocast_dtype=autocast)
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    (losses, adapters), (peft_losses, peft_adapters) = train(share=True), train(share=False)
    assert losses == peft_losses and len(set(losses)) == 3
    assert adapters.keys() == peft_adapters.keys() and all(torch.equal(adapters[k], peft_adapters[k]) for k in adapters)
    assert any(peft_adapters[k].abs().sum() > 0 for k in adapters if "lora_B" in k)
