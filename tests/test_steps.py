"""lowmem_course.steps: the one training step and loop (accumulation, schedule, clipping, loss scaling)."""

import copy
import functools

import pytest
import torch

from lowmem_course import family, measure, optimizers, quantize, steps


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


@pytest.mark.parametrize("techniques", [{}, dict(chunked_loss=True, offload_activations=True)])
def test_train_loop_returns_one_loss_per_step_and_learns(tmp_path, techniques):
    """QLoRA: NF4 base (its LM head stays 16-bit), LoRA adapters; the techniques pass through the loop."""
    family.build(family.tiny("r1-distill-qwen-1.5b", vocab_size=64)).save_pretrained(tmp_path)
    model = quantize.add_lora(quantize.load_quantized(tmp_path, "nf4-dq"), rank=4)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = steps.train_loop(model, optimizers.make_optimizer(model, lr=1e-2), lambda step: (ids, ids), steps=20,
                              **techniques)
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]
    assert not model.training
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        steps.train_loop(model, optimizers.make_optimizer(model), lambda step: (ids, ids), steps=0)


# ---- the one-GPU techniques of the step: chunked loss, offloaded activations -------------------

class _Gradients(torch.optim.Optimizer):
    """An optimizer that keeps a copy of the step's gradients instead of stepping."""

    def __init__(self, params) -> None:
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None) -> None:
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 rows of 40 tokens: prompts without targets (labels -100), rows 3 and 4 right-padded (mask 0)."""
    ids = steps.random_batch(family.TINY_VOCAB, 4, 40, seed=5)
    labels, mask = ids.clone(), torch.ones_like(ids)
    for row, (prompt, length) in enumerate([(5, 40), (9, 40), (3, 31), (12, 22)]):
        labels[row, :prompt] = steps.IGNORE_INDEX
        labels[row, length:], mask[row, length:] = steps.IGNORE_INDEX, 0
    return ids, labels, mask


def _grads_of(model: torch.nn.Module, batch: tuple, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    optimizer = _Gradients([p for p in model.parameters() if p.requires_grad])
    loss = steps.train_step(model, optimizer, *batch, **options)
    return loss, optimizer.grads


@pytest.mark.parametrize("lora,accumulate,autocast", [(False, 1, None), (False, 2, None), (True, 1, None),
                                                      (False, 1, torch.bfloat16), (True, 2, torch.bfloat16)])
def test_the_chunked_loss_gives_the_plain_steps_loss_and_gradients(monkeypatch, lora, accumulate, autocast):
    monkeypatch.setattr(steps, "LOSS_CHUNK_TOKENS", 24)  # 160 tokens: 6 chunks and a remainder of 16
    model = _twin()
    if lora:
        model = quantize.add_lora(model, rank=4)
    batch = _padded_batch()
    options = dict(accumulate=accumulate, autocast_dtype=autocast)
    loss, grads = _grads_of(model, batch, **options)
    chunked_loss, chunked_grads = _grads_of(model, batch, chunked_loss=True, **options)
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-6)  # the sums run in another order
    # fp32: rounding only; bf16: the LM head's gradient is rounded to bf16 once per chunk instead of
    # once for the whole batch (a couple of bf16 ulps, 2^-8 each, on a few entries)
    tolerance = 1e-6 if autocast is None else 1e-2
    assert len(chunked_grads) == len(grads) == len([p for p in model.parameters() if p.requires_grad])
    for got, want in zip(chunked_grads, grads):
        assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_the_chunked_loss_never_holds_the_full_logits():
    cfg = family.tiny("r1-distill-qwen-1.5b", vocab_size=8192)
    ids = steps.random_batch(cfg.vocab_size, 2, 256)  # 512 tokens: 2 chunks
    peaks = {}
    for chunked in (False, True):
        model = family.build(cfg, seed=0)
        step = functools.partial(steps.train_step, chunked_loss=chunked)
        peaks[chunked] = measure.measure_train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), ids, step=step)
    logits = 512 * cfg.vocab_size * 4  # one fp32 copy of the whole batch's logits: 16 MiB
    held = {c: m.breakdown["activations"] + m.breakdown["temporaries"] for c, m in peaks.items()}
    assert held[True] <= held[False] - logits
    assert peaks[True].peak_bytes <= peaks[False].peak_bytes - logits


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_activations_go_to_the_host_and_keep_the_step_exact(checkpointing):
    cfg = family.tiny("r1-distill-qwen-1.5b")
    b, s, h, layers = 2, 128, cfg.hidden_size, cfg.num_hidden_layers
    ids = steps.random_batch(cfg.vocab_size, b, s)
    runs = {}
    for offload in (False, True):
        model = family.build(cfg, seed=0).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        optimizer = _Gradients(model.parameters())
        step = functools.partial(steps.train_step, chunked_loss=True, offload_activations=offload)
        m = measure.measure_train_step(model, optimizer, ids, step=step)
        runs[offload] = m, step(model, optimizer, ids), optimizer.grads
    (plain, loss, grads), (offloaded, offloaded_loss, offloaded_grads) = runs[False], runs[True]
    assert torch.equal(offloaded_loss, loss)
    assert all(torch.equal(got, want) for got, want in zip(offloaded_grads, grads))  # bitwise
    assert plain.host_peak_bytes == 0
    if checkpointing:
        # the layers' inputs (fp32 residual stream), then what the final norm and the loss save: the
        # norm's input, normalised input, output (the LM head's input) and per-token 1/rms, the token
        # ids (the embedding's backward) and the targets (the loss's)
        assert offloaded.host_peak_bytes == (layers + 3) * b * s * h * 4 + b * s * 4 + 2 * b * s * 8
    else:
        assert offloaded.breakdown["activations"] < 4 * 1024  # only tensors under MIN_OFFLOAD_BYTES stay
        assert offloaded.host_peak_bytes == pytest.approx(plain.breakdown["activations"], rel=0.05)
        assert offloaded.peak_bytes < 0.6 * plain.peak_bytes


def test_a_step_in_backward_refuses_what_needs_every_gradient_at_once():
    ids, labels = _batch()
    model = _twin()
    optimizer = optimizers.make_optimizer(model, "sgd", step_in_backward=True)
    for options, reason in [(dict(grad_clip=1.0), "no global gradient norm"),
                            (dict(scaler=torch.amp.GradScaler("cpu")), "cannot take a loss scaler"),
                            (dict(accumulate=2), "no gradient left to accumulate 2 micro-batches")]:
        with pytest.raises(ValueError, match=reason):
            steps.train_step(model, optimizer, ids, labels, **options)
