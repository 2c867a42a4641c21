"""The estimator: exact counts and formulas, and its predictions against measurement.

Measured on tiny twins of the three architectures (real steps, exact bytes) and at the real size of
R1-Distill-Qwen-1.5B under FakeTensorMode (``measure.simulate`` and a LoRA step built the same way).
"""

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem_course import family, measure, steps, validate
from lowmem_course.estimate import (
    ARCHITECTURES,
    Setup,
    cost,
    count,
    estimate,
    job_of,
    kv_cache_per_token,
    load_config,
    model_states,
    plan,
    recipe_of,
    setup_of,
    shape_of,
    shortfall,
    variants,
)
from lowmem_course.recipe import Recipe, RecipeError
from lowmem_course.units import GiB, MiB

QWEN = "r1-distill-qwen-1.5b"


# ---- exact: parameter counts, model-state formulas, KV cache ----------------------------------

@pytest.mark.parametrize("name", list(family.MEMBERS))
def test_parameter_counts_equal_the_built_model(name):
    for cfg in (family.config(name), family.tiny(name)):
        expected = family.count_parameters(cfg)
        counted = count(shape_of(cfg))
        assert (counted.total, counted.active) == (expected.total, expected.active)


def test_r1_counts_671b_total_and_37b_active():
    e = estimate("r1", Setup(mode="inference"))
    assert e.parameters == 671_026_404_352
    assert e.active_parameters == 37_552_282_624


def test_names_hub_ids_and_config_files_give_the_same_estimate(tmp_path):
    cfg = family.config("r1-distill-llama-8b")
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    setup = Setup(mode="lora", seq=2048)
    by_name = estimate("r1-distill-llama-8b", setup).bytes
    assert estimate("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", setup).bytes == by_name
    assert estimate(tmp_path, setup).bytes == by_name
    assert estimate(tmp_path / "config.json", setup).bytes == by_name
    assert estimate(cfg, setup).bytes == by_name


def test_architectures_are_the_familys():
    assert ARCHITECTURES == family.SUPPORTED_ARCHITECTURES


@pytest.mark.parametrize("stage,per_param", [(0, (2 + 2 + 12) * 8), (1, 4 * 8 + 12), (2, 2 * 8 + 14), (3, 16)])
def test_zero_model_states_per_rank_follow_the_zero_paper(stage, per_param):
    """2 + 2 + 12 bytes/param; per rank over N=8: stage 1 4P+12P/N, stage 2 2P+14P/N, stage 3 16P/N."""
    n = count(shape_of(load_config(QWEN))).total
    gpus = 8 if stage else 1
    m = model_states(QWEN, Setup(precision="bf16-mixed", gpus=gpus, zero=stage))
    assert (m.weights + m.gradients + m.optimizer) * 8 == per_param * n


def test_fp32_adamw_holds_16_bytes_per_parameter():
    n = count(shape_of(load_config(QWEN))).total
    m = model_states(QWEN, Setup(precision="fp32"))
    assert (m.weights, m.gradients, m.optimizer) == (4 * n, 4 * n, 8 * n)


def test_optimizers_state_sizes():
    n = count(shape_of(load_config(QWEN))).total
    assert model_states(QWEN, Setup(precision="bf16", optimizer="sgd")).optimizer == 0
    assert model_states(QWEN, Setup(precision="bf16", optimizer="sgd-momentum")).optimizer == 2 * n
    assert model_states(QWEN, Setup(precision="bf16", optimizer="adamw")).optimizer == 4 * n
    assert model_states(QWEN, Setup(precision="bf16", optimizer="adamw8bit")).optimizer == int(n * (2 + 8 / 2048))


def test_kv_cache_per_token_gqa_and_mla():
    qwen = shape_of(load_config(QWEN))
    assert kv_cache_per_token(qwen, 2) == 28 * 2 * 2 * 128 * 2  # layers x (K, V) x kv heads x head_dim x bf16
    r1 = shape_of(load_config("r1"))
    assert kv_cache_per_token(r1, 1) == 35_136  # (512 latent + 64 rope key) x 61 layers
    e = estimate("r1", Setup(mode="inference", seq=4096))
    assert e.bytes["kv_cache"] == 35_136 * 2 * 4096


def test_qlora_weights_nf4_with_double_quantization():
    s = shape_of(load_config("r1-distill-qwen-7b"))
    n = count(s)
    e = estimate("r1-distill-qwen-7b", Setup(mode="qlora"))
    lora = e.trainable_parameters * 4
    # 4.127 bits per quantized weight; embeddings, lm_head and norms stay bf16
    assert e.bytes["weights"] - lora == int(n.linear * (0.5 + 1 / 64 + 4 / (64 * 256))) + 2 * (n.total - n.linear)
    assert 5.2 * GiB < e.bytes["weights"] < 5.5 * GiB


def test_checkpointing_keeps_only_layer_inputs_at_full_size():
    base = estimate(QWEN, Setup(seq=4096))
    ckpt = estimate(QWEN, Setup(seq=4096, checkpointing="full"))
    logits = 3 * 4096 * 151936 * 4  # logits, their gradient and log-softmax's, fp32: not checkpointed
    assert logits < ckpt.bytes["activations"] < 0.5 * base.bytes["activations"]
    assert ckpt.bytes["weights"] == base.bytes["weights"]


def test_eager_attention_adds_the_score_matrix():
    sdpa = estimate(QWEN, Setup(seq=4096)).bytes["activations"]
    eager = estimate(QWEN, Setup(seq=4096, attention="eager")).bytes["activations"]
    assert eager - sdpa > 28 * 12 * 4096 * 4096 * 4  # one fp32 s x s matrix per head and layer, at least


def test_plan_ranks_training_then_inference_each_by_cost():
    options = plan(QWEN, 24 * GiB, seq=1024)
    assert options and all(o.estimate.bytes["total"] <= 24 * GiB for o in options)
    jobs = [job_of(o.estimate.setup.mode) for o in options]
    assert jobs == sorted(jobs, key=["training", "inference"].index) and set(jobs) == {"training", "inference"}
    for job in ("training", "inference"):  # two baselines: bf16 full fine-tuning, bf16 serving on one GPU
        costs = [o.cost for o in options if job_of(o.estimate.setup.mode) == job]
        assert costs == sorted(costs)
    assert options[0].recipe.startswith("lora") and min(costs) == 1.0
    for o in options:  # training on one GPU runs as printed; serving is estimated
        kind = "estimate" if o.estimate.setup.mode == "inference" else "train --model"
        assert o.command(QWEN).startswith(f"lowmem {kind} {QWEN} --recipe {o.recipe} ")
        assert o.recipe == str(recipe_of(o.estimate.setup)) and setup_of(o.recipe, seq=1024) == o.estimate.setup
    best = json.loads(json.dumps(options[0].to_dict()))  # what `lowmem plan --json` prints per option
    assert (best["recipe"], best["bytes"], best["setup"]) == (options[0].recipe, options[0].estimate.bytes,
                                                              options[0].estimate.setup.__dict__)
    assert best["cost"] == round(options[0].cost, 3) and best["bytes"]["total"] <= 24 * GiB


@pytest.mark.parametrize("bad", [dict(batch=0), dict(seq=-1), dict(gpus=0), dict(mode="pretrain"),
                                 dict(precision="fp8"), dict(zero=4), dict(weights="int3")])
def test_bad_setups_are_refused(bad):
    with pytest.raises(ValueError):
        Setup(**bad)


def test_bad_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        estimate("gpt-5")
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(ValueError, match="unsupported architecture 'bert'"):
        estimate(bert)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        estimate(broken)


# ---- properties ---------------------------------------------------------------------------------

SETUPS = st.builds(Setup, mode=st.sampled_from(["inference", "full", "lora", "qlora"]),
                   precision=st.sampled_from(["fp32", "bf16-mixed", "bf16"]),
                   optimizer=st.sampled_from(["adamw", "adamw8bit", "sgd"]),
                   batch=st.integers(1, 8), seq=st.integers(1, 16384),
                   checkpointing=st.sampled_from(["none", "full"]), gpus=st.integers(1, 16),
                   zero=st.integers(0, 3), attention=st.sampled_from(["sdpa", "eager"]),
                   device=st.sampled_from(["cuda", "cpu"]))
MODELS = st.sampled_from(["r1-distill-qwen-1.5b", "r1-distill-llama-8b", "r1"])


@settings(max_examples=60, deadline=None)
@given(model=MODELS, setup=SETUPS, more_batch=st.integers(0, 4), more_seq=st.integers(0, 4096))
def test_more_tokens_never_need_less_memory(model, setup, more_batch, more_seq):
    from dataclasses import replace

    base = estimate(model, setup).bytes["total"]
    assert estimate(model, replace(setup, batch=setup.batch + more_batch)).bytes["total"] >= base
    assert estimate(model, replace(setup, seq=setup.seq + more_seq)).bytes["total"] >= base


@settings(max_examples=60, deadline=None)
@given(model=MODELS, setup=SETUPS, more_gpus=st.integers(0, 64))
def test_more_gpus_never_mean_more_state_per_gpu(model, setup, more_gpus):
    from dataclasses import replace

    assume(setup.mode != "inference")  # inference has no model states to shard
    few = model_states(model, setup)
    many = model_states(model, replace(setup, gpus=setup.gpus + more_gpus))
    assert many.weights + many.gradients + many.optimizer <= few.weights + few.gradients + few.optimizer
    assert estimate(model, replace(setup, gpus=setup.gpus + more_gpus)).bytes["total"] <= \
        estimate(model, setup).bytes["total"]


@settings(max_examples=40, deadline=None)
@given(model=MODELS, setup=SETUPS)
def test_total_is_the_sum_of_the_components(model, setup):
    b = estimate(model, setup).bytes
    assert all(isinstance(v, int) and v >= 0 for v in b.values())
    assert b["total"] == sum(b[k] for k in ("weights", "gradients", "optimizer", "activations", "kv_cache"))


# ---- predicted against measured: tiny twins, real steps -----------------------------------------

MEASURED = [
    # three architectures x (full fp32, bf16 mixed, checkpointing, LoRA, inference, eager) over three
    # lengths; eager inference on the dense models (MLA's eager prefill is predicted 7% low: not asserted)
    (name, setup) for name in validate.GRID_MODELS for setup in (
        Setup(mode="full", precision="fp32", batch=2, seq=256),
        Setup(mode="full", precision="bf16-mixed", batch=2, seq=128),
        Setup(mode="full", precision="fp32", batch=2, seq=64, checkpointing="full"),
        Setup(mode="full", precision="bf16-mixed", batch=2, seq=256, checkpointing="full"),
        Setup(mode="lora", precision="bf16-mixed", batch=2, seq=128),
        Setup(mode="inference", precision="bf16", batch=2, seq=256),
        Setup(mode="full", precision="bf16-mixed", batch=2, seq=128, attention="eager"),
    )
] + [(name, Setup(mode="inference", precision="bf16", batch=2, seq=256, attention="eager"))
     for name in ("r1-distill-qwen-1.5b", "r1-distill-llama-8b")
] + [(name, setup) for name in validate.GRID_MODELS for setup in validate.TECHNIQUE_SETUPS]


@pytest.mark.parametrize("name,setup", MEASURED, ids=[f"{n}-{validate.describe(s)}" for n, s in MEASURED])
def test_estimate_matches_measurement_on_tiny_twins(name, setup):
    c = validate.run_grid("cpu", [(name, setup)])[0]
    assert abs(c.error()) <= 0.05, (c.predicted, c.measured)
    for key, err in c.component_errors().items():
        assert abs(err) <= 0.10, (key, c.predicted, c.measured)
    assert c.measured["total"] > 2 * MiB


def test_a_tiled_mlp_is_estimated_where_a_layers_backward_holds_the_peak():
    """A Llama twin with a wide MLP (1024) and a 256-token vocabulary at 2,048 tokens: without tiling, the
    MLP's intermediates set the peak; tiled, one tile's do, beside two sets of the MLP's gradients (the
    tiles' sum and a tile's own)."""
    cfg = family.tiny("r1-distill-llama-8b", vocab_size=256, intermediate_size=1024)
    setup = Setup(mode="full", precision="fp32", batch=1, seq=2048, checkpointing="full", chunked_loss=True,
                  tiled_mlp=True, device="cpu")
    c = validate.compare("r1-distill-llama-8b", setup, "cpu", config=cfg)
    assert c.predicted["total"] < c.measured["total"] * 1.05 and c.predicted["total"] > c.measured["total"] * 0.95
    assert estimate(cfg, setup).peak_phase == "bottom layer backward"
    untiled = validate.compare("r1-distill-llama-8b", replace(setup, tiled_mlp=False), "cpu", config=cfg)
    assert c.measured["activations"] < untiled.measured["activations"] / 5


def test_validate_measures_each_training_technique_with_its_host_bytes():
    cfg = validate.grid_config("r1-distill-qwen-1.5b")
    base = Setup(mode="full", precision="fp32", batch=2, seq=256)
    tokens = {"plain": {}, "chunked": {"chunked_loss": True}, "offload-activations": {"offload_activations": True},
              "step-in-backward": {"step_in_backward": True}, "offload-optimizer": {"offload_optimizer": True},
              "accum2": {"accumulate": 2}}
    measured = {t: validate.measured_components(validate.measure_setup(cfg, Setup(**{**base.__dict__, **o})))
                for t, o in tokens.items()}
    sizes = [p.numel() * 4 for p in family.build(cfg, device="meta").parameters()]
    plain = measured["plain"]
    assert plain["host"] == 0 and plain["optimizer"] == 2 * sum(sizes) + 4 * len(sizes)
    assert measured["offload-optimizer"]["optimizer"] == 0
    assert measured["offload-optimizer"]["host"] == 4 * sum(sizes) + 4 * len(sizes)
    assert measured["step-in-backward"]["gradients"] <= max(sizes)
    assert measured["offload-activations"]["host"] > 0
    for token in ("chunked", "offload-activations", "accum2"):
        assert measured[token]["activations"] < plain["activations"], token
    assert all(measured[t]["total"] <= plain["total"] for t in tokens)  # step-in-backward: the peak is the loss's
    assert validate.describe(Setup(**{**base.__dict__, "offload_optimizer": True, "accumulate": 2})) == \
        "full fp32 offload-optimizer accum2 b=2 s=256"


# A DeepseekV3 twin none of the above uses: 4 layers, 16 routed experts (top 4) of width 48 and a
# 2048-token vocabulary, small enough that a layer's backward, not the loss, holds the peak. On CPU its
# MLA runs SDPA's math path, whose backward makes two fp32 s x s gradients per head beside the
# probabilities: with checkpointing at seq 512 the estimate missed them and was 9% low.
HELD_OUT_R1 = dict(vocab_size=2048, num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4,
                   moe_intermediate_size=48)


@pytest.mark.slow
@pytest.mark.parametrize("setup", [Setup(mode="full", precision="fp32", batch=2, seq=512, checkpointing="full"),
                                   Setup(mode="full", precision="bf16-mixed", batch=1, seq=1024,
                                         checkpointing="full")], ids=validate.describe)
def test_mla_checkpointed_peak_in_attention_backward_matches_measurement(setup):
    cfg = family.tiny("r1", **HELD_OUT_R1)
    c = validate.compare("r1", setup, "cpu", config=cfg)
    assert abs(c.error()) <= 0.05, (c.predicted, c.measured)
    for key, err in c.component_errors().items():
        assert abs(err) <= 0.10, (key, c.predicted, c.measured)
    assert estimate(cfg, replace(setup, device="cpu")).peak_phase.endswith("attention backward")


# LoRA whose peak is a layer's backward, not the loss: the twins with a 64-token vocabulary (the grid's
# 4096-token logits hold its LoRA peaks in the loss). Batch 8 x 32 with checkpointing is the capstone's
# miniature run of the student (notebook 07). With the adapters reading their 16-bit input as it is, an
# adapted down_proj's input is freed before the product's backward: the estimate counting peft's input
# copies and the transient they made was 5-9% high here, 17% on the activations.
SMALL_VOCAB_LORA = [(name, setup) for name in ("r1-distill-qwen-1.5b", "r1-distill-llama-8b") for setup in (
    Setup(mode="lora", precision="bf16-mixed", batch=2, seq=256),
    Setup(mode="lora", precision="bf16-mixed", batch=8, seq=32, checkpointing="full"),
    Setup(mode="lora", precision="bf16-mixed", batch=2, seq=256, checkpointing="full"),
)] + [("r1", Setup(mode="lora", precision="bf16-mixed", batch=8, seq=32, checkpointing="full"))]


@pytest.mark.parametrize("name,setup", SMALL_VOCAB_LORA,
                         ids=[f"{n}-{validate.describe(s)}" for n, s in SMALL_VOCAB_LORA])
def test_lora_peak_in_a_layers_backward_matches_measurement(name, setup):
    cfg = family.tiny(name, vocab_size=64)
    c = validate.compare(name, setup, "cpu", config=cfg)
    assert abs(c.error()) <= 0.05, (c.predicted, c.measured)
    for key, err in c.component_errors().items():
        assert abs(err) <= 0.10, (key, c.predicted, c.measured)
    if setup.checkpointing == "full":
        assert estimate(cfg, replace(setup, device="cpu")).peak_phase.endswith("layer backward")


# ---- predicted against simulated: R1-Distill-Qwen-1.5B at full size -------------------------------

def _simulated_lora(cfg, seq: int) -> measure.Measurement:
    """A steady-state LoRA step (bf16 base, fp32 adapters, bf16 autocast) on fake tensors.

    The adapters are attached as ``lowmem train`` attaches them (``quantize.add_lora``) on the meta
    device (moving a FakeTensor parameter fails in ``Module._apply``), then every parameter and buffer
    is replaced by a fake CPU tensor of the same shape and dtype.
    """
    from lowmem_course import quantize

    model = quantize.add_lora(family.build(cfg, device="meta", dtype=torch.bfloat16), rank=16, alpha=32)
    with FakeTensorMode():
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                 requires_grad=p.requires_grad)
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = torch.zeros(b.shape, dtype=b.dtype)
        ids = steps.random_batch(cfg.vocab_size, 1, seq)
        return measure.measure_train_step(model, measure.make_optimizer(model), ids, autocast_dtype=torch.bfloat16)


@pytest.mark.parametrize("mode,precision,seq", [("full", "fp32", 1024), ("full", "bf16-mixed", 4096),
                                                ("lora", "bf16-mixed", 1024), ("lora", "bf16-mixed", 4096)])
def test_estimate_matches_simulated_full_size_step(mode, precision, seq):
    cfg = family.config(QWEN)
    if mode == "lora":  # wrapping 28 fake layers in peft takes 12 s: 4 real-size layers, same widths and vocab
        cfg.num_hidden_layers = 4
    if mode == "full":
        autocast = torch.bfloat16 if precision == "bf16-mixed" else None
        m = measure.simulate(cfg, "train", batch=1, seq=seq, autocast_dtype=autocast)
    else:
        m = _simulated_lora(cfg, seq)
    e = estimate(cfg, Setup(mode=mode, precision=precision, seq=seq, device="cpu"))
    predicted, measured = validate.predicted_components(e), validate.measured_components(m)
    assert abs(predicted["total"] - measured["total"]) <= 0.05 * measured["total"], (predicted, measured)
    for key in ("weights", "optimizer", "activations"):
        assert abs(predicted[key] - measured[key]) <= 0.10 * max(measured[key], MiB), (key, predicted, measured)


# ---- planning: public cost, precision filter, serving split over GPUs, 4-bit experts -------------

def test_cost_is_public_and_multiplies_the_technique_factors():
    from lowmem_course.estimate import COST, cost

    assert cost(Setup(mode="full")) == 1.0 == cost(Setup(mode="inference", precision="bf16"))
    assert cost(Setup(mode="lora", checkpointing="full", precision="fp32")) == 0.7 * 1.33 * 2.0
    assert cost(Setup(mode="inference", gpus=8, parallel="tensor")) == COST["inference"] * COST["tensor"]


def test_plan_tries_only_the_precisions_it_is_given():
    t4 = plan(QWEN, 15 * GiB, seq=1024, precisions=("fp16-mixed", "fp32"))
    assert {o.estimate.setup.precision for o in t4 if o.estimate.setup.mode != "inference"} == {"fp16-mixed", "fp32"}
    assert {o.estimate.setup.precision for o in t4 if o.estimate.setup.mode == "inference"} == {"fp16", "fp32"}
    assert any(o.recipe == "lora+fp16-mixed+chunked-loss" for o in t4)
    assert {o.estimate.setup.precision for o in plan(QWEN, 15 * GiB)} == {"bf16-mixed", "bf16"}  # the default
    with pytest.raises(ValueError, match="precisions must be among"):
        plan(QWEN, 15 * GiB, precisions=("fp8",))


def test_tensor_parallel_splits_the_weights_and_the_gqa_cache():
    """Llama-8B has 8 kv heads: over 8 GPUs the KV cache splits 8 ways and the weights nearly so
    (norms stay whole); Qwen-1.5B has 2 kv heads, so over 8 GPUs each GPU keeps one of the two."""
    one = estimate("r1-distill-llama-8b", Setup(mode="inference", precision="bf16", seq=4096))
    tp = estimate("r1-distill-llama-8b", Setup(mode="inference", precision="bf16", seq=4096, gpus=8, parallel="tensor"))
    assert tp.bytes["kv_cache"] * 8 == one.bytes["kv_cache"]
    assert one.bytes["weights"] / 8 < tp.bytes["weights"] < 1.001 * one.bytes["weights"] / 8
    assert tp.bytes["activations"] == one.bytes["activations"]  # not divided: an upper bound
    qwen = [estimate(QWEN, Setup(mode="inference", precision="bf16", seq=4096, gpus=g, parallel="tensor"))
            for g in (1, 8)]
    assert qwen[1].bytes["kv_cache"] * 2 == qwen[0].bytes["kv_cache"]
    assert qwen[0].bytes == estimate(QWEN, Setup(mode="inference", precision="bf16", seq=4096)).bytes


def test_tensor_parallel_cannot_split_mla_latents_but_deals_out_the_experts():
    setup = Setup(mode="inference", precision="bf16", weights="nf4-dq+experts", batch=8, seq=8192)
    one, tp = estimate("r1", setup), estimate("r1", Setup(**{**setup.__dict__, "gpus": 8, "parallel": "tensor"}))
    assert tp.bytes["kv_cache"] == one.bytes["kv_cache"] == 35_136 * 2 * 8 * 8192
    assert one.bytes["weights"] / 8 < tp.bytes["weights"] < 1.05 * one.bytes["weights"] / 8  # q_a, kv_a replicated


def test_routed_experts_are_counted_and_quantized_only_on_request():
    from lowmem_course import quantize
    from lowmem_course.estimate import WEIGHT_BYTES

    meta = family.build(family.config("r1"), device="meta")
    fused = sum(p.numel() for m in quantize.fused_expert_modules(meta) for p in m.parameters())
    n = count(shape_of(load_config("r1")))
    assert n.experts == fused == 653_908_770_816
    assert count(shape_of(load_config("r1-distill-qwen-7b"))).experts == 0
    nf4 = estimate("r1", Setup(mode="inference", precision="bf16", weights="nf4-dq"))
    four = estimate("r1", Setup(mode="inference", precision="bf16", weights="nf4-dq+experts"))
    saved = nf4.bytes["weights"] - four.bytes["weights"]
    assert abs(saved - n.experts * (2 - WEIGHT_BYTES["nf4-dq"])) <= 1
    one_layer = 2 * n.experts // (61 - 3)  # one MoE layer's experts, dequantized to bf16 for its forward
    assert four.bytes["activations"] - nf4.bytes["activations"] == one_layer


@pytest.mark.parametrize("bad", [dict(mode="lora", weights="nf4-dq+experts"), dict(mode="full", parallel="tensor"),
                                 dict(mode="inference", parallel="tensor", gpus=8, zero=3), dict(parallel="pipeline")])
def test_setups_the_estimator_does_not_model_are_refused(bad):
    with pytest.raises(ValueError):
        Setup(**bad)


def test_4bit_experts_match_measurement_on_the_tiny_r1(tmp_path):
    """bitsandbytes NF4-dq on the linear maps plus ``quantize.quantize_experts``: a real prefill on CPU."""
    from lowmem_course import quantize

    cfg = validate.grid_config("r1")
    family.build(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = quantize.load_quantized(tmp_path, "nf4-dq", device="cpu", dtype=torch.bfloat16).eval()
    assert quantize.quantize_experts(model) == 2 * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    ids = steps.random_batch(cfg.vocab_size, 2, 256)
    with measure.track(model) as m:
        cache = steps.prefill_step(model, ids)
        del cache
    e = estimate(cfg, Setup(mode="inference", precision="bf16", weights="nf4-dq+experts", batch=2, seq=256,
                            device="cpu"))
    predicted, measured = validate.predicted_components(e), validate.measured_components(m)
    assert abs(predicted["total"] / measured["total"] - 1) <= 0.05, (predicted, measured)
    assert abs(predicted["weights"] / measured["weights"] - 1) <= 0.02, (predicted, measured)


# ---- the one-GPU techniques (issue 20) -------------------------------------------------------

LLAMA8 = "r1-distill-llama-8b"  # the Llama-3.1-8B shape of torchtune's memory table


def test_each_technique_lowers_the_device_peak_and_offloading_says_what_the_host_holds():
    lora = Setup(mode="lora", precision="bf16-mixed", batch=2, seq=2048, checkpointing="full")
    chunked = estimate(LLAMA8, replace(lora, chunked_loss=True))
    assert chunked.bytes["activations"] < estimate(LLAMA8, lora).bytes["activations"]
    offloaded = estimate(LLAMA8, replace(lora, chunked_loss=True, offload_activations=True))
    inputs = 32 * 2 * 2048 * 4096 * 2  # the checkpointed layers' bf16 inputs
    assert offloaded.bytes["total"] < chunked.bytes["total"]
    assert inputs < offloaded.host_bytes["activations"] < inputs * 1.15  # and the final norm's saved tensors
    base = Setup(mode="full", precision="bf16", batch=2, seq=2048, checkpointing="full")
    plain = estimate(LLAMA8, base)
    assert plain.host_bytes["total"] == 0
    in_backward = estimate(LLAMA8, replace(base, step_in_backward=True))
    largest = 128_256 * 4096 * 2  # one gradient alive: the embedding's, in bf16
    assert in_backward.bytes["gradients"] <= largest < plain.bytes["gradients"]
    assert in_backward.bytes["total"] < plain.bytes["total"]
    host = estimate(LLAMA8, replace(base, offload_optimizer=True))
    n = host.trainable_parameters
    assert host.bytes["optimizer"] == 0 and host.host_bytes["optimizer"] == 8 * n
    assert host.host_bytes["total"] == 16 * n  # fp32 copy, fp32 gradient, two fp32 moments per parameter


def test_a_micro_batch_holds_the_steps_gradients_and_must_divide_the_batch():
    lora = Setup(mode="lora", precision="bf16-mixed", batch=4, seq=512)
    micro = estimate(LLAMA8, replace(lora, accumulate=4))
    assert micro.bytes["gradients"] == model_states(LLAMA8, lora).gradients
    assert micro.bytes["activations"] < estimate(LLAMA8, lora).bytes["activations"]
    with pytest.raises(ValueError, match="must divide the batch"):
        Setup(batch=3, accumulate=2)
    with pytest.raises(ValueError, match="applies to training"):
        Setup(mode="inference", chunked_loss=True)


def test_variants_run_together_only_what_a_recipe_can_and_come_cheapest_first():
    base = Setup(mode="full", precision="bf16-mixed", batch=4, seq=1024)
    found = variants(base)
    assert all(not (v.step_in_backward and v.accumulate > 1) for v in found)
    assert all(not v.offload_activations for v in found)  # offloading goes with checkpointing
    assert {v.accumulate for v in found} == {1, 2, 4}
    assert [cost(v) for v in found] == sorted(cost(v) for v in found)
    assert found[0] == base
    assert any(v.offload_activations for v in variants(replace(base, checkpointing="full")))
    assert variants(Setup(mode="inference")) == [Setup(mode="inference")]


@pytest.mark.parametrize("mode, published", [("full", 18.9), ("lora", 16.2), ("qlora", 7.4)])
def test_plans_for_torchtunes_8b_jobs_are_at_or_below_its_published_peaks(mode, published):
    """torchtune's README memory table (Llama 3.1 8B, batch 2, packed sequences of 2048 tokens, one
    RTX 4090): full fine-tuning 18.9 GiB, LoRA 16.2 GiB, QLoRA 7.4 GiB (its configs: rank 8). The
    plan's leanest row is at or below."""
    options = plan(LLAMA8, 23 * GiB, mode=mode, batch=2, seq=2048, lora_rank=8)
    assert options and min(o.estimate.bytes["total"] for o in options) <= published * GiB


def test_unsloths_8b_qlora_context_on_a_24_gb_card_fits_with_the_tiled_mlp():
    """Unsloth's README / blog (unsloth.ai/blog/llama3-3): Llama 3.1 8B, 4-bit QLoRA of every linear layer at
    rank 32, batch 1, 78,475 tokens on a 24 GB card. Without tiling the MLP, nothing fits; with it, the plan does."""
    from lowmem_course import gpus

    budget = gpus.gpu("rtx-4090").usable
    job = Setup(mode="qlora", precision="bf16-mixed", optimizer="adamw8bit", batch=1, seq=78_475, lora_rank=32,
                checkpointing="full", chunked_loss=True, offload_activations=True)
    assert estimate(LLAMA8, job).bytes["total"] > budget
    tiled = estimate(LLAMA8, replace(job, tiled_mlp=True))
    assert tiled.bytes["total"] <= budget and tiled.peak_phase.endswith("backward")
    options = plan(LLAMA8, budget, mode="qlora", batch=1, seq=78_475)
    assert options and options[0].estimate.setup.tiled_mlp


def test_a_tiled_mlp_needs_checkpointing_and_saves_one_tile():
    with pytest.raises(ValueError, match="needs checkpointing='full'"):
        Setup(mode="lora", tiled_mlp=True)
    with pytest.raises(RecipeError, match="add checkpointing"):
        Recipe.parse("lora+bf16-mixed+tiled-mlp")
    assert str(Recipe.parse("lora+bf16-mixed+checkpointing+tiled-mlp")) == "lora+bf16-mixed+checkpointing+tiled-mlp"
    lora = Setup(mode="lora", precision="bf16-mixed", batch=1, seq=32_768, checkpointing="full", chunked_loss=True,
                 offload_activations=True)
    tiled = estimate(LLAMA8, replace(lora, tiled_mlp=True))
    assert tiled.bytes["activations"] < estimate(LLAMA8, lora).bytes["activations"] / 2
    assert recipe_of(tiled.setup).tiled_mlp and cost(tiled.setup) > cost(lora)
    assert not any(v.tiled_mlp for v in variants(replace(lora, checkpointing="none")))


def test_a_host_budget_keeps_out_what_it_cannot_hold():
    unlimited = plan(LLAMA8, 23 * GiB, mode="full", batch=2, seq=2048)
    assert unlimited and all(o.estimate.setup.offload_optimizer for o in unlimited)
    assert plan(LLAMA8, 23 * GiB, mode="full", batch=2, seq=2048, cpu_memory=64 * GiB) == []
    short = shortfall(LLAMA8, 23 * GiB, "training", mode="full", batch=2, seq=2048, cpu_memory=64 * GiB)
    assert short.host_short is not None and short.host_short.estimate.host_bytes["total"] > 64 * GiB
    roomy = plan(LLAMA8, 23 * GiB, mode="full", batch=2, seq=2048, cpu_memory=256 * GiB)
    assert [o.recipe for o in roomy] == [o.recipe for o in unlimited]


def test_the_estimator_chunks_the_loss_as_the_step_does():
    from lowmem_course.estimate import CHUNK_TOKENS

    assert CHUNK_TOKENS == steps.LOSS_CHUNK_TOKENS
