"""lowmem_course.steps: the one training step and loop (accumulation, schedule, clipping, loss scaling)."""

import copy

import pytest
import torch

from lowmem_course import family, optimizers, quantize, steps


def _twin() -> torch.nn.Module:
    return family.build(family.tiny("r1-distill-qwen-1.5b"), seed=0)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows of 12 tokens whose labels carry 11, 8, 5 and 2 targets: micro-batches of unequal weight."""
    ids = steps.random_batch(family.TINY_VOCAB, 4, 12, seed=3)
    labels = ids.clone()
    for row, ignored in enumerate((0, 3, 6, 9)):
        labels[row, :ignored] = steps.IGNORE_INDEX
    return ids, labels


def _update(model: torch.nn.Module, before: torch.nn.Module) -> torch.Tensor:
    """Every parameter's change in one flat vector."""
    return torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), before.parameters())])


@pytest.mark.parametrize("accumulate", [2, 4])
def test_accumulated_micro_batches_equal_the_whole_batch(accumulate):
    ids, labels = _batch()
    whole, micro = _twin(), _twin()
    before = copy.deepcopy(whole)
    loss = steps.train_step(whole, torch.optim.SGD(whole.parameters(), lr=1.0), ids, labels)
    accumulated = steps.train_step(micro, torch.optim.SGD(micro.parameters(), lr=1.0), ids, labels,
                                   accumulate=accumulate)
    assert accumulated.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(_update(micro, before), _update(whole, before), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"accumulate must be in 1\.\.4"):
        steps.train_step(micro, torch.optim.SGD(micro.parameters()), ids, labels, accumulate=5)


def test_warmup_cosine_values():
    lr = steps.warmup_cosine(1e-2, warmup=10, steps=100, min_lr_ratio=0.1)
    assert lr(0) == pytest.approx(1e-3) and lr(9) == pytest.approx(1e-2)  # linear warmup
    assert lr(10) == pytest.approx(1e-2)  # the peak, then cosine decay
    assert lr(55) == pytest.approx(0.55e-2)  # half-way: the mean of peak and floor
    assert lr(100) == pytest.approx(1e-3)  # the floor, lr * min_lr_ratio
    with pytest.raises(ValueError, match="warmup >= 0"):
        steps.warmup_cosine(1e-2, warmup=-1, steps=100)


def test_clipping_bounds_the_update_of_the_trainable_parameters():
    ids, labels = _batch()
    model = _twin()
    model.lm_head.requires_grad_(False)
    before = copy.deepcopy(model)
    steps.train_step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
                     ids, labels, grad_clip=1e-3)
    assert _update(model, before).norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_the_scaler_clips_true_gradients_and_skips_an_overflowing_step():
    ids, labels = _batch()
    model = _twin()
    before = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    steps.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), ids, labels, scaler=scaler, grad_clip=1e-3)
    assert _update(model, before).norm().item() == pytest.approx(1e-3, rel=1e-4)  # unscaled before clipping
    before = copy.deepcopy(model)
    overflowing = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss is inf
    steps.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), ids, labels, scaler=overflowing)
    assert overflowing.get_scale() == 2.0**126
    assert _update(model, before).abs().max().item() == 0.0  # the step was skipped


def test_train_loop_sets_the_schedule_resumes_and_reports_every_step():
    ids, labels = _batch()
    model = _twin()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    losses = steps.train_loop(model, opt, lambda step: (ids, labels), 5, start=2,
                              schedule=lambda step: 0.1 * step,
                              on_step=lambda step, loss: seen.append((step, opt.param_groups[0]["lr"], loss)))
    assert [(s, lr) for s, lr, _ in seen] == [(2, 0.2), (3, pytest.approx(0.3)), (4, 0.4)]
    assert [loss for _, _, loss in seen] == losses and not model.training
    with pytest.raises(ValueError, match=r"start must be in 0\.\.5"):
        steps.train_loop(model, opt, lambda step: (ids, labels), 5, start=6)


def test_train_loop_returns_one_loss_per_step_and_learns(tmp_path):
    family.build(family.tiny("r1-distill-qwen-1.5b", vocab_size=64)).save_pretrained(tmp_path)
    model = quantize.add_lora(quantize.load_quantized(tmp_path, "nf4-dq"), rank=4)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = steps.train_loop(model, optimizers.make_optimizer(model, lr=1e-2), lambda step: (ids, ids), steps=20)
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]
    assert not model.training
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        steps.train_loop(model, optimizers.make_optimizer(model), lambda step: (ids, ids), steps=0)
