"""lowmem_course.optimizers: one factory, keyed by the recipes' optimizer names."""

import functools
import io

import bitsandbytes as bnb
import pytest
import torch

from lowmem_course import family, measure, optimizers, recipe, steps


@pytest.mark.parametrize("name, cls, moments", [
    ("adamw", torch.optim.AdamW, {"exp_avg", "exp_avg_sq"}),
    ("adamw8bit", bnb.optim.AdamW8bit, {"state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}),  # 8-bit blocks
    ("sgd", torch.optim.SGD, set()),
    ("sgd-momentum", torch.optim.SGD, {"momentum_buffer"}),
])
def test_each_recipe_name_makes_its_optimizer_over_the_trainable_parameters(name, cls, moments):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 4))
    model[1].requires_grad_(False)  # frozen, as a LoRA base is
    opt = optimizers.make_optimizer(model, name, lr=0.5)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["params"] == list(model[0].parameters())
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    assert {key for key in opt.state[model[0].weight] if key != "step"} == moments


def test_the_names_are_the_recipes_and_measure_uses_the_same_factory():
    assert optimizers.OPTIMIZERS is recipe.OPTIMIZERS
    assert measure.make_optimizer is optimizers.make_optimizer


def test_make_optimizer_keeps_small_tensors_in_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 4))
    opt = optimizers.make_optimizer(model, "adamw8bit")
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    states = [opt.state[p]["state1"].dtype for p in model.parameters()]
    assert states == [torch.uint8, torch.float32, torch.float32, torch.float32]  # 8192 >= 4096 elements
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        optimizers.make_optimizer(model, "lion")


# ---- a step in backward, an optimizer on the host -------------------------------------------------

def _twin() -> torch.nn.Module:
    return family.build(family.tiny("r1-distill-qwen-1.5b"), seed=0).train()


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps_: range, **options) -> None:
    """Steps of a run whose learning rate changes every step (set through ``param_groups``)."""
    for step in steps_:
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        steps.train_step(model, optimizer, steps.random_batch(family.TINY_VOCAB, 2, 32, seed=step), **options)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _resumed(make, trained_for: int, then: int, **options) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights after ``trained_for + then`` steps in one run, and in a run resumed from a checkpoint
    (weights, then ``torch.save``d optimizer state, loaded as ``lowmem train`` does) after ``trained_for``."""
    model = _twin()
    optimizer = make(model)
    _train(model, optimizer, range(trained_for), **options)
    weights, buffer = _weights(model), io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    _train(model, optimizer, range(trained_for, trained_for + then), **options)
    resumed = _twin()
    for p, w in zip(resumed.parameters(), weights):
        p.data.copy_(w)
    resumed_optimizer = make(resumed)
    resumed_optimizer.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    _train(resumed, resumed_optimizer, range(trained_for, trained_for + then), **options)
    return _weights(model), _weights(resumed)


@pytest.mark.parametrize("name", ["adamw", "sgd-momentum", "adamw8bit"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_a_step_in_backward_trains_bitwise_as_the_plain_step(name, autocast):
    plain, fused = _twin(), _twin()
    _train(plain, optimizers.make_optimizer(plain, name), range(3), autocast_dtype=autocast)
    optimizer = optimizers.make_optimizer(fused, name, step_in_backward=True)
    assert isinstance(optimizer, optimizers.StepInBackward) and isinstance(optimizer, torch.optim.Optimizer)
    _train(fused, optimizer, range(3), autocast_dtype=autocast)
    # the same kernel on the same numbers, one tensor at a time: the same bits
    assert _bitwise_equal(_weights(fused), _weights(plain))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2 / 3] * len(list(plain.parameters()))


def test_a_step_in_backward_holds_one_gradient_at_a_time():
    ids = steps.random_batch(family.TINY_VOCAB, 1, 4)  # few activations: the gradients make the peak
    runs = {}
    for in_backward in (False, True):
        model = _twin()
        optimizer = optimizers.make_optimizer(model, step_in_backward=in_backward)
        runs[in_backward] = measure.measure_train_step(model, optimizer, ids)
    sizes = [p.numel() * 4 for p in model.parameters()]
    plain, fused = runs[False], runs[True]
    assert plain.breakdown["gradients"] >= sum(sizes) - max(sizes)  # all of them, but the one being made
    assert fused.breakdown["gradients"] <= max(sizes)
    assert fused.breakdown["optimizer"] == plain.breakdown["optimizer"] == 2 * sum(sizes) + 4 * len(sizes)
    assert fused.peak_bytes <= plain.peak_bytes - (sum(sizes) - 2 * max(sizes))


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_a_step_in_backward_resumes_from_its_state_dict(name):
    state = optimizers.make_optimizer(_twin(), name, step_in_backward=True).state_dict()
    assert len(state["param_groups"]) == len(list(_twin().parameters()))  # one group per parameter
    uninterrupted, resumed = _resumed(lambda m: optimizers.make_optimizer(m, name, step_in_backward=True), 2, 2)
    assert _bitwise_equal(resumed, uninterrupted)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_host_adamw_trains_bitwise_as_adamw(accumulate, autocast):
    plain, offloaded = _twin(), _twin()
    _train(plain, optimizers.make_optimizer(plain), range(3), autocast_dtype=autocast, accumulate=accumulate)
    optimizer = optimizers.make_optimizer(offloaded, offload=True)
    assert isinstance(optimizer, optimizers.HostAdamW)
    _train(offloaded, optimizer, range(3), autocast_dtype=autocast, accumulate=accumulate)
    # fp32 weights: the host's fp32 copies are the weights, stepped by the same fused kernel
    assert _bitwise_equal(_weights(offloaded), _weights(plain))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_host_adamw_keeps_its_state_on_the_host(accumulate):
    model = _twin()
    optimizer = optimizers.make_optimizer(model, offload=True)
    m = measure.measure_train_step(model, optimizer, steps.random_batch(family.TINY_VOCAB, 2, 32),
                                   step=functools.partial(steps.train_step, accumulate=accumulate))
    sizes = [p.numel() * 4 for p in model.parameters()]
    assert m.breakdown["optimizer"] == 0
    assert m.breakdown["gradients"] <= max(sizes)
    # fp32 copy, gradient and two moments of every parameter, a 4-byte step count per tensor; a later
    # micro-batch's gradient is staged on the host before it is added, one at a time
    assert m.host_peak_bytes == 4 * sum(sizes) + 4 * len(sizes) + (max(sizes) if accumulate > 1 else 0)


def test_the_host_adamw_resumes_from_its_state_dict_and_clips_the_host_gradients():
    uninterrupted, resumed = _resumed(lambda m: optimizers.make_optimizer(m, offload=True), 2, 2)
    assert _bitwise_equal(resumed, uninterrupted)
    plain, offloaded = _twin(), _twin()
    _train(plain, optimizers.make_optimizer(plain), range(2), grad_clip=0.1)
    _train(offloaded, optimizers.make_optimizer(offloaded, offload=True), range(2), grad_clip=0.1)
    assert _bitwise_equal(_weights(offloaded), _weights(plain))


@pytest.mark.parametrize("options,message", [
    (dict(name="sgd", offload=True), "offload keeps AdamW's fp32 state on the host: not sgd"),
    (dict(offload=True, step_in_backward=True), "choose one"),
    (dict(step_in_backward=True, zero=True), "not with zero"),
])
def test_the_one_gpu_ways_refuse_what_they_cannot_do(options, message):
    with pytest.raises(ValueError, match=message):
        optimizers.make_optimizer(torch.nn.Linear(2, 2), **options)
