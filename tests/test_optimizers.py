"""lowmem_course.optimizers: one factory, keyed by the recipes' optimizer names."""

import bitsandbytes as bnb
import pytest
import torch

from lowmem_course import measure, optimizers, recipe


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
