"""The ruler: exact bytes on known tensors, a steady-state training step, and full-size simulation."""

import pytest
import torch

from lowmem_course import family, host, measure, steps
from lowmem_course.units import KiB, MiB


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_a_known_allocation_is_measured_to_the_byte():
    with measure.track(label="one tensor") as m:
        x = torch.empty(1024, 256, dtype=torch.float32)
        y = torch.empty(100, dtype=torch.bfloat16)
        del x, y
    assert m.peak_bytes == 1024 * 256 * 4 + 100 * 2


def test_a_freed_tensor_does_not_count_twice():
    with measure.track() as m:
        for _ in range(3):
            x = torch.empty(MiB, dtype=torch.uint8)
            del x
    assert m.peak_bytes == MiB


def test_parameters_are_counted_exactly():
    model = family.build(family.tiny("r1-distill-llama-8b"))
    with measure.track(model) as m:
        pass
    assert m.breakdown["parameters"] == param_bytes(model)
    assert m.peak_bytes == param_bytes(model) + m.breakdown["buffers"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steady_state_step_holds_params_and_adam_moments(dtype):
    model = family.build(family.tiny("r1-distill-qwen-1.5b"), dtype=dtype)
    optimizer = measure.make_optimizer(model)
    batch = steps.random_batch(model.config.vocab_size, 2, 64)
    m = measure.measure_train_step(model, optimizer, batch)
    n_tensors = len(list(model.parameters()))
    assert m.breakdown["parameters"] == param_bytes(model)
    # two moments in the parameters' dtype, plus one fp32 step counter per parameter tensor
    assert m.breakdown["optimizer"] == 2 * param_bytes(model) + 4 * n_tensors
    assert m.breakdown["activations"] > 0
    assert m.peak_bytes == sum(m.breakdown.values())


def test_measurement_prints_in_readable_units():
    with measure.track(label="demo") as m:
        x = torch.empty(3 * MiB, dtype=torch.uint8)
        del x
    assert "demo on cpu: peak 3.00 MiB" in str(m)
    assert m.to_dict()["peak_bytes"] == 3 * MiB


def test_unknown_optimizer_is_refused():
    model = family.build(family.tiny("r1-distill-qwen-1.5b"))
    refusal = "unknown optimizer 'lion': choose from adamw, adamw8bit, paged-adamw8bit, sgd, sgd-momentum"
    with pytest.raises(ValueError, match=refusal):
        measure.make_optimizer(model, "lion")


def test_simulated_full_size_fp32_adamw_step_peaks_at_16_bytes_per_parameter():
    """R1-Distill-Qwen-1.5B at full size: params + grads + Adam moments = 4 + 4 + 8 bytes each."""
    cfg = family.config("r1-distill-qwen-1.5b")
    n_params = family.count_parameters(cfg).total
    n_tensors = len(list(family.build(cfg, device="meta").parameters()))
    m = measure.simulate(cfg, mode="train", batch=1, seq=16)
    assert m.breakdown["parameters"] == 4 * n_params
    assert m.breakdown["optimizer"] == 8 * n_params + 4 * n_tensors
    # the peak falls in the embedding's backward: its gradient is still a temporary, beside the
    # gradient of the hidden states flowing into it (seq x hidden fp32)
    assert m.breakdown["gradients"] + m.breakdown["temporaries"] == 4 * n_params + 16 * cfg.hidden_size * 4
    assert 0 <= m.peak_bytes - 16 * n_params < MiB


def test_simulated_inference_holds_bf16_weights_and_a_kv_cache():
    cfg = family.config("r1-distill-qwen-1.5b")
    n_params = family.count_parameters(cfg).total
    seq = 1024
    m = measure.simulate(cfg, mode="inference", seq=seq, dtype=torch.bfloat16)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * seq * 2
    assert m.breakdown["parameters"] == 2 * n_params
    assert m.breakdown["activations"] >= kv_bytes


def test_simulate_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="'train' or 'inference'"):
        measure.simulate(family.tiny("r1"), mode="serve")


def test_random_batch_rejects_empty_shapes():
    with pytest.raises(ValueError, match="must be positive"):
        steps.random_batch(100, 0, 8)


def test_a_partly_frozen_model_is_measured():
    """LoRA-style: frozen base weights count as parameters, only trainable ones get gradients."""
    model = family.build(family.tiny("r1-distill-qwen-1.5b"))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("lm_head"))
    optimizer = measure.make_optimizer(model)
    m = measure.measure_train_step(model, optimizer, steps.random_batch(model.config.vocab_size, 1, 32))
    assert m.breakdown["parameters"] == param_bytes(model)
    assert m.breakdown["optimizer"] == 2 * model.lm_head.weight.numel() * 4 + 4


def test_storage_bytes_counts_each_shared_storage_once():
    weight = torch.zeros(16, 8)
    tied = torch.nn.Parameter(weight)  # a tied weight: the same storage under two names
    assert measure.storage_bytes(weight, tied, weight[2:4], weight.t()) == 16 * 8 * 4
    assert measure.storage_bytes(weight[0]) == 16 * 8 * 4  # a view holds its whole storage alive
    counted: set = set()
    assert measure.storage_bytes(weight, counted=counted) == 512
    assert measure.storage_bytes(weight, torch.zeros(3, dtype=torch.bfloat16), counted=counted) == 6


def test_storage_bytes_counts_a_dtensors_local_shard():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        sharded = distribute_tensor(torch.zeros(16, 8), init_device_mesh("cpu", (4,)), [Shard(0)])
        assert measure.storage_bytes(sharded) == 16 * 8 * 4 // 4  # this rank's quarter
    finally:
        dist.destroy_process_group()


def test_measure_train_step_measures_the_step_it_is_given():
    model = family.build(family.tiny("r1-distill-qwen-1.5b"))
    optimizer = measure.make_optimizer(model, "sgd")
    calls = []

    def forward_only(model, optimizer, input_ids):
        calls.append(input_ids.shape)
        with torch.no_grad():
            model(input_ids=input_ids)

    batch = steps.random_batch(model.config.vocab_size, 1, 16)
    m = measure.measure_train_step(model, optimizer, batch, step=forward_only, warmup_steps=2)
    assert calls == [batch.shape] * 3 and "gradients" not in {k for k, v in m.breakdown.items() if v}
    with pytest.raises(ValueError, match="autocast_dtype applies to the default step only"):
        measure.measure_train_step(model, optimizer, batch, autocast_dtype=torch.bfloat16, step=forward_only)


def test_offloaded_bytes_leave_the_device_pool_and_count_as_host_bytes():
    held_before = host.HOST.bytes  # other tests' host storages that are still alive
    with measure.track(label="offload") as m:
        device = torch.ones(256, 1024)  # 1 MiB on the device
        offloaded = host.HOST.copy(device)  # offloaded: 1 MiB on the host
        del device
        with host.HOST.computing():  # work done on the host is not device memory
            offloaded.mul_(2)
            scratch = torch.empty(3 * MiB, dtype=torch.uint8)
            del scratch
        back = offloaded.to("cpu", copy=True)  # brought back: a new device copy
        del offloaded
        del back
    assert m.peak_bytes == MiB
    assert m.host_peak_bytes == MiB
    assert host.HOST.bytes == held_before
    assert "host peak    1.00 MiB" in str(m)


def test_host_pool_counts_a_storage_once_until_its_last_view_is_freed():
    pool = host.HostPool()
    t = torch.empty(1000, dtype=torch.float32)
    pool.keep(t)
    pool.keep(t[10:20])
    view = t[:5]
    del t
    assert pool.bytes == 4000 and pool.holds(view)
    del view
    assert pool.bytes == 0 and pool.peak == 4000


def test_host_bytes_count_what_the_tracked_objects_hold_and_what_the_block_adds():
    leftover = host.HOST.copy(torch.ones(256, 1024))  # 1 MiB held by earlier work: not this block's
    held = host.HOST.copy(torch.ones(128, 1024))  # 512 KiB held by a tracked object (an optimizer's state)
    with measure.track(held) as m:
        del leftover  # earlier work freed during the block: not a saving of this block's
        added = host.HOST.copy(torch.ones(64, 1024))  # 256 KiB made in the block
        del added
    assert m.host_peak_bytes == 512 * KiB + 256 * KiB
    assert m.peak_bytes == 256 * KiB  # the device tensor it copied
    del held


def test_a_model_run_again_in_one_block_is_measured():
    """Micro-batches run the model once each, a chunked loss the LM head once per chunk."""
    model = family.build(family.tiny("r1-distill-qwen-1.5b"))
    ids = steps.random_batch(model.config.vocab_size, 1, 16)
    with torch.no_grad():
        with measure.track(model) as once:
            model(input_ids=ids)
        with measure.track(model) as twice:
            model(input_ids=ids)
            model(input_ids=ids)
    assert twice.peak_bytes == once.peak_bytes > param_bytes(model)
