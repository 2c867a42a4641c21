"""Tests of lowmem_course.precision: autocast choice, the no-op scaler, bf16 rounding, exact bytes."""

from __future__ import annotations

import pytest
import torch

from lowmem_course import family, measure, precision, steps


def _twin(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return family.build(family.tiny("r1-distill-qwen-1.5b", num_hidden_layers=1), dtype=dtype)


def test_cpu_computes_in_bf16():
    assert precision.bf16_supported("cpu")
    assert precision.autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_follows_the_hardware():
    expected = torch.cuda.get_device_capability()[0] >= 8
    assert precision.bf16_supported("cuda") == expected
    assert precision.autocast_dtype("cuda") == (torch.bfloat16 if expected else torch.float16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU (see the test above)")
def test_cuda_without_gpu_is_not_bf16():
    assert not precision.bf16_supported("cuda")
    assert precision.autocast_dtype("cuda") == torch.float16


def test_autocast_context_dtypes():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with precision.autocast("cpu"):
        assert lin(x).dtype == torch.bfloat16
    with precision.autocast("cpu", torch.float32):
        assert lin(x).dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        precision.autocast("cpu", torch.int8)


def test_precision_names_map_to_dtypes():
    assert [precision.parameter_dtype(p) for p in precision.PRECISIONS] == [torch.float32] * 3 + [torch.bfloat16]
    assert [precision.compute_dtype(p) for p in precision.PRECISIONS] == [
        torch.float32, torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.compute_dtype("fp8")


def test_scaler_only_scales_fp16():
    assert precision.make_scaler("cpu", torch.float16).is_enabled()
    for dtype in (torch.bfloat16, torch.float32):
        scaler = precision.make_scaler("cpu", dtype)
        loss = torch.tensor(3.0)
        assert not scaler.is_enabled() and scaler.scale(loss) is loss


def test_scaler_skips_an_overflowing_step_and_backs_off():
    model = _twin()
    opt = measure.make_optimizer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = precision.make_scaler("cpu", torch.float16, init_scale=2.0**120)  # scaled grads overflow fp16
    ids = steps.random_batch(model.config.vocab_size, 1, 8)
    steps.train_step(model, opt, ids, autocast_dtype=torch.float16, scaler=scaler)
    assert scaler.get_scale() == 2.0**119
    assert precision.unchanged_fraction(before, model) == dict.fromkeys(before, 1.0)


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    g = torch.Generator().manual_seed(0)
    exact = torch.tensor([1.0, -0.5, 3.0, 0.0])
    assert torch.equal(precision.stochastic_round_to_bf16(exact, g).float(), exact)
    x = torch.full((100_000,), 1.001)
    rounded = precision.stochastic_round_to_bf16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}  # the two bf16 neighbours of 1.001
    assert abs(rounded.mean().item() - 1.001) < 1e-4
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]  # round-to-nearest loses the 0.001
    with pytest.raises(ValueError, match="float32"):
        precision.stochastic_round_to_bf16(x.half())


@pytest.mark.parametrize("prec,bytes_per_param", [("fp32", 4), ("bf16", 2)])
def test_model_states_bytes(prec, bytes_per_param):
    model = _twin(precision.parameter_dtype(prec))
    opt = measure.make_optimizer(model)
    numel = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    ids = steps.random_batch(model.config.vocab_size, 1, 16)
    steps.train_step(model, opt, ids, autocast_dtype=precision.compute_dtype(prec))
    with measure.track(model, opt) as m:
        steps.train_step(model, opt, ids, autocast_dtype=precision.compute_dtype(prec))
    assert m.breakdown["parameters"] == bytes_per_param * numel
    assert m.breakdown["optimizer"] == 2 * bytes_per_param * numel + 4 * tensors  # two moments + fp32 step counters


def test_small_updates_vanish_in_bf16_weights():
    """AdamW's first update (lr = 1e-4) is below half a bf16 ulp at 1.0: RMSNorm weights never move."""
    for dtype, expected in ((torch.bfloat16, 1.0), (torch.float32, 0.0)):
        model = _twin(dtype)
        opt = measure.make_optimizer(model, lr=1e-4)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        steps.train_step(model, opt, steps.random_batch(model.config.vocab_size, 2, 16))
        unchanged = precision.unchanged_fraction(before, model)
        assert unchanged["model.norm.weight"] == expected
