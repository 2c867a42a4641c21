"""Tests of lowmem_course.checkpointing: policies, identical gradients, chunked loss, exact bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowmem_course import checkpointing, family, host, measure, steps

POLICIES = ("none", "full", "every-2", "attention", "mlp")


def _twin(name: str = "r1-distill-qwen-1.5b", **overrides) -> torch.nn.Module:
    model = family.build(family.tiny(name, num_hidden_layers=4, use_cache=False, **overrides))
    return model.train()


def _grads(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    checkpointing.causal_lm_loss(model, ids, **kwargs).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "r1"])
def test_every_policy_gives_the_same_gradients(name):
    model = _twin(name)
    ids = steps.random_batch(model.config.vocab_size, 2, 32)
    reference = _grads(model, ids)
    for policy in POLICIES[1:]:
        checkpointing.enable(model, policy)
        got = _grads(model, ids)
        for n in reference:
            torch.testing.assert_close(got[n], reference[n], rtol=0, atol=1e-6, msg=f"{policy}: {n}")


def test_policies_are_applied_and_removed():
    model = _twin()
    layers = model.model.layers
    checkpointing.enable(model, "every-2")
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]
    checkpointing.enable(model, "attention")  # replaces the previous policy
    assert not model.is_activation_checkpointing
    assert all("forward" in layer.self_attn.__dict__ and "forward" not in layer.mlp.__dict__ for layer in layers)
    checkpointing.enable(model, "full")
    assert [layer.gradient_checkpointing for layer in layers] == [True] * 4
    assert not any("forward" in layer.self_attn.__dict__ for layer in layers)
    checkpointing.disable(model)
    assert not model.is_activation_checkpointing and not any(layer.gradient_checkpointing for layer in layers)


@pytest.mark.parametrize("bad", ["every-0", "every", "selective", "Full"])
def test_unknown_policy_is_refused(bad):
    with pytest.raises(ValueError, match="unknown checkpointing policy"):
        checkpointing.enable(_twin(), bad)


def test_not_a_causal_lm_is_refused():
    with pytest.raises(ValueError, match=r"has no model\.layers"):
        checkpointing.enable(torch.nn.Linear(2, 2), "attention")


def test_full_checkpointing_keeps_a_fraction_of_the_activations():
    model = _twin()
    ids = steps.random_batch(model.config.vocab_size, 1, 256)
    kept = {}
    for policy in ("none", "full"):
        checkpointing.enable(model, policy)
        with measure.track(model) as m:
            model.model(input_ids=ids)
        kept[policy] = m.breakdown["activations"]
    layer_inputs = 4 * 256 * model.config.hidden_size * 4  # what full checkpointing must keep (fp32)
    assert layer_inputs < kept["full"] < kept["none"] / 3


@pytest.mark.parametrize("policy", ["none", "full", "mlp"])
def test_offloaded_keeps_gradients_exact(policy):
    model = _twin()
    ids = steps.random_batch(model.config.vocab_size, 1, 16)
    reference = _grads(model, ids)
    checkpointing.enable(model, policy)
    with checkpointing.offloaded("cpu"):
        loss = checkpointing.causal_lm_loss(model, ids)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], rtol=0, atol=0)


def test_offloaded_copies_each_saved_activation_once_and_leaves_parameters_on_the_device():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(32, 64, requires_grad=True)  # 8 KiB, saved by both matmuls
    small = torch.randn(16, requires_grad=True)  # 64 B: under MIN_OFFLOAD_BYTES

    def loss() -> torch.Tensor:  # the weight is saved as itself and as a view (weight.t())
        return F.linear(x, weight).sum() + (x @ weight.t()).sum() + (small * small).sum()

    reference = torch.autograd.grad(loss(), (weight, x, small))
    held_before = host.HOST.bytes  # other tests' host storages that are still alive
    with measure.track() as m:
        with checkpointing.offloaded("cpu"):
            value = loss()
        grads = torch.autograd.grad(value, (weight, x, small))
    assert m.host_peak_bytes == 32 * 64 * 4  # x, once; not the weight, not the small tensor
    assert host.HOST.bytes == held_before  # the host copy went with the graph
    for got, want in zip(grads, reference):
        assert torch.equal(got, want)


def test_the_loss_and_offloading_live_beside_the_step_and_read_from_here():
    assert checkpointing.offloaded is host.offloaded
    assert checkpointing.causal_lm_loss is steps.causal_lm_loss
    assert checkpointing.chunked_cross_entropy is steps.chunked_cross_entropy


def test_shift_labels():
    assert checkpointing.shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


def test_chunked_cross_entropy_matches_the_plain_loss():
    torch.manual_seed(0)
    hidden = torch.randn(100, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (100,))
    labels[::7] = checkpointing.IGNORE_INDEX
    plain = F.cross_entropy(hidden @ weight.T, labels)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    chunked = checkpointing.chunked_cross_entropy(hidden, weight, labels, chunk_tokens=13)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain.float())
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want)


def test_chunked_loss_never_holds_the_full_logits():
    tokens, vocab, hidden_size, chunk = 512, 8192, 16, 64
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden_size))
    labels = torch.randint(0, vocab, (tokens,))
    logits_bytes = tokens * vocab * 4
    with measure.track(hidden, weight) as plain:
        F.cross_entropy(hidden @ weight.T, labels).backward()
    with measure.track(hidden, weight) as chunked:
        checkpointing.chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk).backward()
    states = hidden.numel() * 4 + weight.numel() * 4  # the two inputs (gradients of the same size come on top)
    assert plain.peak_bytes >= states + 2 * logits_bytes
    assert chunked.peak_bytes <= 2 * states + 4 * chunk * vocab * 4  # a few chunk-sized buffers at most
    assert chunked.peak_bytes < 0.25 * plain.peak_bytes


def test_chunked_causal_lm_loss_matches_the_model_loss():
    model = _twin()
    ids = steps.random_batch(model.config.vocab_size, 2, 24)
    plain = _grads(model, ids)
    chunked = _grads(model, ids, chunk_tokens=10)
    torch.testing.assert_close(checkpointing.causal_lm_loss(model, ids, chunk_tokens=10),
                               model(input_ids=ids, labels=ids).loss)
    for n in plain:
        torch.testing.assert_close(chunked[n], plain[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [(dict(chunk_tokens=0), "chunk_tokens must be positive"),
                                            (dict(labels=torch.zeros(3, dtype=torch.long)), "expected hidden")])
def test_chunked_cross_entropy_bad_input(kwargs, message):
    args = dict(hidden=torch.zeros(4, 2), head=torch.zeros(5, 2), labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        checkpointing.chunked_cross_entropy(**{**args, **kwargs})


# ---- the tiled MLP ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["r1-distill-llama-8b", "r1"])  # a SwiGLU MLP and a MoE block
@pytest.mark.parametrize("policy", ["none", "full"])
def test_a_tiled_mlp_gives_the_same_gradients(name, policy):
    model = _twin(name)
    ids = steps.random_batch(model.config.vocab_size, 2, 80)  # 160 tokens: tiles of 64, the last one short
    reference = _grads(model, ids)
    checkpointing.enable(model, policy)
    checkpointing.tile_mlp(model)
    got = _grads(model, ids)
    assert got.keys() == reference.keys()
    for n in reference:
        torch.testing.assert_close(got[n], reference[n], rtol=0, atol=1e-6, msg=n)


def test_a_tiled_mlp_steps_each_parameter_once_with_its_whole_gradient():
    from lowmem_course import optimizers

    model = _twin("r1-distill-llama-8b")
    checkpointing.enable(model, "full")
    checkpointing.tile_mlp(model)
    steps_seen: dict[str, int] = {}

    def seen(name: str) -> None:
        steps_seen[name] = steps_seen.get(name, 0) + 1

    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: seen(name))
    optimizer = optimizers.make_optimizer(model, "adamw", step_in_backward=True)
    ids = steps.random_batch(model.config.vocab_size, 1, 200)  # 4 tiles of 64 tokens
    steps.train_step(model, optimizer, ids)
    assert set(steps_seen.values()) == {1}  # one accumulation per parameter: the tiles' gradients summed first


def test_a_tiled_mlp_holds_one_tiles_intermediates():
    model = _twin("r1-distill-llama-8b", vocab_size=256, intermediate_size=1024)
    ids = steps.random_batch(model.config.vocab_size, 1, 2048)
    checkpointing.enable(model, "full")
    peaks = {}
    for tiled in (False, True):
        if tiled:
            checkpointing.tile_mlp(model)
        with measure.track(model) as m:
            checkpointing.causal_lm_loss(model, ids).backward()
        model.zero_grad(set_to_none=True)
        peaks[tiled] = m.breakdown["activations"] + m.breakdown["temporaries"]
    widest = 2048 * 1024 * 4  # one of the untiled MLP's fp32 intermediates (tokens x intermediate size)
    assert peaks[False] - peaks[True] > 3 * widest


def test_evaluation_runs_the_mlp_untiled():
    model = _twin("r1-distill-llama-8b")
    ids = steps.random_batch(model.config.vocab_size, 1, 100)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        checkpointing.tile_mlp(model)
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)
