"""The capstone planner, its recipe mapping, and the plan checked in miniature through `lowmem train`."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_course import capstone, estimate, family, train
from lowmem_course.capstone import Budget
from lowmem_course.recipe import Recipe
from lowmem_course.units import GiB

T4 = Budget("1.5B on a T4", "r1-distill-qwen-1.5b", 15 * GiB, seq=1024, bf16=False)
SEVEN = Budget("7B on 24 GB", "r1-distill-qwen-7b", 24 * GiB, seq=4096)
SEVENTY = Budget("70B on 2 x 80 GB", "r1-distill-llama-70b", 80 * GiB, gpus=2, seq=4096)
R1 = Budget("serve R1", "r1", 80 * GiB, gpus=8, task="serve", batch=8, seq=8192)


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="finetune"), "task must be one of train, serve"),
    (dict(gpus=0), "gpus must be a positive integer"),
    (dict(seq=True), "seq must be a positive integer"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget("x", "r1-distill-qwen-1.5b", GiB, **kwargs)


def test_without_bf16_the_plan_is_estimate_plan_in_fp16_mixed_and_fp32():
    options = capstone.plan(T4)
    assert {o.estimate.setup.precision for o in options} == {"fp16-mixed", "fp32"}
    stock = estimate.plan(T4.model, T4.gpu_memory, seq=T4.seq, precisions=("fp16-mixed", "fp32"))
    assert [(o.recipe, o.total, o.cost) for o in options] == [
        (o.recipe, o.estimate.bytes["total"], o.cost) for o in stock if o.estimate.setup.mode != "inference"]


def test_with_bf16_the_training_plan_is_the_stock_plan_minus_inference():
    stock = [(o.recipe, o.estimate.bytes["total"]) for o in estimate.plan(SEVEN.model, SEVEN.gpu_memory, seq=SEVEN.seq)
             if o.estimate.setup.mode != "inference"]
    assert [(o.recipe, o.total) for o in capstone.plan(SEVEN)] == stock


@pytest.mark.parametrize("budget, recipe, train_recipe", [
    (T4, "lora+fp16-mixed+chunked-loss", "lora+fp16-mixed+chunked-loss"),
    (SEVEN, "lora+bf16-mixed+checkpointing+offload-activations+chunked-loss",
     "lora+bf16-mixed+checkpointing+offload-activations+chunked-loss"),
    (SEVENTY, "qlora+bf16-mixed+checkpointing+offload-activations+chunked-loss+step-in-backward",
     "qlora+bf16-mixed+checkpointing+offload-activations+chunked-loss+step-in-backward"),
    (R1, "inference+bf16+nf4-dq+experts+tp8", None),
])
def test_the_four_budgets_get_their_recipes(budget, recipe, train_recipe):
    options = capstone.plan(budget)
    chosen = capstone.choose(budget, options)
    assert (chosen.recipe, chosen.train_recipe) == (recipe, train_recipe)
    assert all(o.total <= budget.gpu_memory for o in options)
    assert capstone.naive(budget).bytes["total"] > budget.gpu_memory
    kind = "train --model" if train_recipe else "estimate"
    assert chosen.command(budget.model).startswith(f"lowmem {kind} {budget.model} --recipe {recipe} ")


def test_r1_fits_8_x_80_gb_only_split_and_with_its_experts_in_4_bits():
    options = capstone.plan(R1)
    assert [(o.experts_4bit, o.estimate.setup.parallel) for o in options] == [(True, "tensor")]
    split = estimate.Setup(mode="inference", precision="bf16", weights="nf4-dq", batch=8, seq=8192, gpus=8,
                           parallel="tensor")
    assert estimate.estimate("r1", split).bytes["total"] > R1.gpu_memory


def test_serving_prefers_16_bit_replicas_when_they_fit():
    budget = Budget("7B on 8 x 80 GB", "r1-distill-qwen-7b", 80 * GiB, gpus=8, task="serve", batch=8, seq=8192)
    options = capstone.plan(budget)
    assert {o.estimate.setup.parallel for o in options} == {"data", "tensor"}
    chosen = capstone.choose(budget, options)
    assert (chosen.estimate.setup.weights, chosen.estimate.setup.parallel) == (None, "data")
    assert chosen.recipe == "inference+bf16"


@pytest.mark.parametrize("setup, expected", [
    (estimate.Setup(mode="lora", precision="fp16-mixed"), "lora+fp16-mixed"),
    (estimate.Setup(mode="qlora", precision="bf16-mixed", checkpointing="full"), "qlora+bf16-mixed+checkpointing"),
    (estimate.Setup(mode="full", precision="fp32"), "full+fp32"),
    (estimate.Setup(mode="lora", optimizer="adamw8bit"), "lora+bf16-mixed+adamw8bit"),
    (estimate.Setup(mode="full", precision="bf16"), "full+bf16"),
    (estimate.Setup(mode="lora", optimizer="paged-adamw8bit"), None),
    (estimate.Setup(mode="full", gpus=2, zero=3), None),
    (estimate.Setup(mode="inference", precision="bf16"), None),
])
def test_train_recipe_names_what_lowmem_train_runs(setup, expected):
    option = capstone.Option(estimate=estimate.estimate("r1-distill-qwen-1.5b", setup),
                             recipe=str(estimate.recipe_of(setup)), cost=estimate.cost(setup))
    assert option.train_recipe == expected


@pytest.mark.parametrize("recipe", ["full+fp32", "full+bf16", "lora+fp32+checkpointing",
                                    "qlora+fp16-mixed+checkpointing",
                                    "qlora+bf16-mixed+checkpointing+offload-activations+chunked-loss+accum8",
                                    "full+bf16+step-in-backward", "full+bf16-mixed+offload-optimizer"])
def test_setup_of_and_recipe_of_round_trip(recipe):
    setup = estimate.setup_of(recipe, batch=8, seq=32, device="cpu")
    assert (setup.batch, setup.seq, setup.device, setup.optimizer) == (8, 32, "cpu", "adamw")
    assert str(estimate.recipe_of(setup)) == recipe and Recipe.parse(recipe) == estimate.recipe_of(setup)


def test_train_flops_follow_the_6nt_rule():
    n, t = 1_000, 10
    assert capstone.train_flops(n, t, estimate.Setup(mode="full")) == 60_000
    assert capstone.train_flops(n, t, estimate.Setup(mode="lora")) == 40_000
    assert capstone.train_flops(n, t, estimate.Setup(mode="qlora", checkpointing="full")) == 60_000


def test_write_data_is_read_back_by_lowmem_train(tmp_path):
    path = capstone.write_data(tmp_path / "d.jsonl", n=5, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and all("-" in r["prompt"] for r in rows)
    assert [e.prompt for e in train.read_examples(path)] == [r["prompt"] for r in rows]


def test_estimator_config_of_a_twin_and_of_the_student():
    assert capstone.estimator_config("tiny:r1-distill-qwen-1.5b")["vocab_size"] == 32
    student = capstone.estimator_config("student-qwen2")
    assert (student["model_type"], student["hidden_size"], student["vocab_size"]) == ("qwen2", 96, 32)


def test_the_miniature_ratios_match_the_estimator(tmp_path):
    data = capstone.write_data(tmp_path / "d.jsonl", n=16)
    ratios, measured, predicted = capstone.miniature(
        "tiny:r1-distill-qwen-1.5b", ["lora", "qlora+bf16-mixed+checkpointing"], data, tmp_path / "runs")
    assert [r.recipe for r in ratios] == ["lora", "qlora+bf16-mixed+checkpointing"]
    assert set(measured) == set(predicted) == {"full", "lora", "qlora+bf16-mixed+checkpointing"}
    assert all(abs(r.error) <= 0.10 for r in ratios)
    assert ratios[1].measured < 0.5 * ratios[0].measured  # QLoRA + checkpointing under half of LoRA's peak
    assert measured["full"]["weights"] == 4 * family.count_parameters(
        family.tiny("r1-distill-qwen-1.5b", vocab_size=32)).total + 64  # fp32 weights + the rope buffer


@settings(max_examples=15, deadline=None)
@given(gib=st.integers(min_value=1, max_value=200), seq=st.sampled_from([256, 1024, 4096]), bf16=st.booleans())
def test_every_planned_option_fits_and_the_plan_is_sorted(gib, seq, bf16):
    budget = Budget("x", "r1-distill-qwen-1.5b", gib * GiB, seq=seq, bf16=bf16)
    options = capstone.plan(budget)
    assert all(o.total <= budget.gpu_memory for o in options)
    assert [(o.cost, o.total) for o in options] == sorted((o.cost, o.total) for o in options)
    chosen = capstone.choose(budget, options)
    runnable = [o for o in options if o.train_recipe]
    plain = [o for o in runnable if o.estimate.setup.optimizer == "adamw"]
    assert chosen is (plain or runnable or [None])[0]
