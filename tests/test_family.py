"""The R1 family: real configs match the published figures, twins keep the architecture, loading works."""

import json

import pytest
import torch

from lowmem_course import family

PUBLISHED = {  # total parameters from the model cards (reference/r1-family.md)
    "r1-distill-qwen-1.5b": 1.78e9, "r1-distill-qwen-7b": 7.62e9, "r1-distill-llama-8b": 8.03e9,
    "r1-distill-qwen-14b": 14.8e9, "r1-distill-qwen-32b": 32.8e9, "r1-distill-llama-70b": 70.6e9,
    "r1": 671e9,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_published_within_half_a_percent(name):
    counts = family.count_parameters(family.config(name))
    assert abs(counts.total / PUBLISHED[name] - 1) < 0.005


def test_exact_counts_of_the_smallest_distill_and_r1():
    assert family.count_parameters(family.config("r1-distill-qwen-1.5b")).total == 1_777_088_000
    r1 = family.count_parameters(family.config("r1"))
    assert r1.total == 671_026_404_352
    assert r1.active == 37_552_282_624  # about 37B active per token, as published
    assert abs(r1.active / 37e9 - 1) < 0.02


def test_dense_members_have_all_parameters_active():
    counts = family.count_parameters(family.config("r1-distill-llama-8b"))
    assert counts.active == counts.total


@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                                  "DeepSeek-R1-Distill-Qwen-1.5B", " R1-DISTILL-QWEN-1.5B "])
def test_short_names_and_hub_ids_resolve(name):
    assert family.resolve(name).name == "r1-distill-qwen-1.5b"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="r1-distill-llama-70b"):
        family.resolve("gpt-2")


@pytest.mark.parametrize("name", list(family.MEMBERS))
def test_tiny_twin_keeps_the_architecture(name):
    real, twin = family.config(name), family.tiny(name)
    assert type(twin) is type(real)
    assert twin.tie_word_embeddings is False
    assert twin.num_attention_heads // twin.num_key_value_heads == real.num_attention_heads // real.num_key_value_heads
    assert getattr(twin, "attention_bias", False) == getattr(real, "attention_bias", False)
    model = family.build(twin)
    assert type(model).__name__ == type(family.build(real, device="meta")).__name__
    assert family.count_parameters(twin).total < 2_000_000


def test_tiny_r1_keeps_mla_and_moe():
    twin = family.tiny("r1")
    model = family.build(twin)
    attention = model.model.layers[0].self_attn
    assert attention.q_a_proj.out_features == twin.q_lora_rank
    assert attention.kv_a_proj_with_mqa.out_features == twin.kv_lora_rank + twin.qk_rope_head_dim
    assert twin.qk_nope_head_dim != twin.qk_rope_head_dim  # the rope/nope split is there
    assert not hasattr(model.model.layers[0].mlp, "experts")  # dense first layer
    moe = model.model.layers[1].mlp
    assert moe.experts.gate_up_proj.shape[0] == twin.n_routed_experts
    assert hasattr(moe, "shared_experts")
    counts = family.count_parameters(twin)
    assert counts.active < counts.total


def test_tiny_training_step_runs_and_learns():
    from lowmem_course import measure, steps
    cfg = family.tiny("r1-distill-qwen-1.5b")
    model = family.build(cfg)
    optimizer = measure.make_optimizer(model, lr=1e-2)
    batch = steps.random_batch(cfg.vocab_size, 2, 32)
    losses = [steps.train_step(model, optimizer, batch).item() for _ in range(5)]
    assert losses[-1] < losses[0]


def test_build_on_meta_allocates_nothing():
    model = family.build(family.config("r1-distill-qwen-7b"), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_build_rejects_unsupported_architecture():
    from transformers import BertConfig
    with pytest.raises(ValueError, match="unsupported architecture 'bert'"):
        family.build(BertConfig())


@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "r1-distill-llama-8b", "r1"])
def test_load_round_trips_a_saved_twin_with_identical_logits(tmp_path, name):
    model = family.build(family.tiny(name)).eval()
    model.save_pretrained(tmp_path)
    loaded = family.load(tmp_path).eval()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_names_the_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        family.load(tmp_path)


def test_load_names_the_missing_weights(tmp_path):
    family.tiny("r1-distill-qwen-1.5b").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        family.load(tmp_path)


def test_load_never_trusts_remote_code(tmp_path):
    with pytest.raises(ValueError, match="remote code"):
        family.load("r1", trust_remote_code=True)


def test_load_refuses_pickle_weights(tmp_path):
    model = family.build(family.tiny("r1-distill-qwen-1.5b"))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        family.load(tmp_path)


def test_saved_config_records_the_architecture(tmp_path):
    family.tiny("r1").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_importing_the_package_downloads_nothing(monkeypatch):
    import importlib
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access at import time")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for module in ("lowmem_course", "lowmem_course.family", "lowmem_course.measure", "lowmem_course.lab"):
        importlib.reload(importlib.import_module(module))
