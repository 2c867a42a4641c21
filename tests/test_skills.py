"""lowmem_course.skills: QLoRA teaches the 4-bit student subtraction; the shipped adapter and its CLI."""

import dataclasses

import pytest
import torch

from lowmem_course import quantize, skills


def test_skill_config_warms_up_then_decays():
    cfg = skills.SkillConfig(lr=1e-2, warmup=10, steps=100, min_lr_ratio=0.1)
    assert cfg.learning_rate(0) == pytest.approx(1e-3)
    assert cfg.learning_rate(9) == pytest.approx(1e-2)
    assert cfg.learning_rate(10) == pytest.approx(1e-2)
    assert cfg.learning_rate(100) == pytest.approx(1e-3)


def test_teach_save_and_load_adapter_round_trip(tmp_path):
    cfg = skills.SkillConfig(steps=2, batch_size=4, warmup=1)
    model, _, losses = skills.teach(cfg, progress=False)
    assert len(losses) == 2 and not model.training
    assert quantize.trainable_parameters(model) == 82_432  # rank 8 on 7 maps x 4 layers of the qwen2 student
    skills.save_adapter(model, tmp_path, losses, {"skill_config": dataclasses.asdict(cfg)})
    assert (tmp_path / "adapter_model.safetensors").is_file()
    rows = [f"{i + 1},{loss:.6f}" for i, loss in enumerate(losses)]
    assert (tmp_path / "loss.csv").read_text().splitlines() == ["step,loss", *rows]
    loaded, _, recipe = skills.load_adapter(tmp_path)
    ids = skills.skill_batches(cfg)(0)[0]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert recipe["skill_config"]["steps"] == 2


def test_shipped_subtraction_adapter_reproduces_its_recorded_accuracy():
    from lowmem_course import student

    model, tok, recipe = skills.load_adapter("subtraction")
    assert recipe["skill_config"] == dataclasses.asdict(skills.SkillConfig())  # the default recipe
    assert recipe["accuracy_before"] < 0.05 and recipe["accuracy"] >= skills.ADAPTER_TARGET_ACCURACY
    acc = student.accuracy(model, tok, n=recipe["eval_n"], seed=recipe["eval_seed"], task="subtraction",
                           progress=False)
    assert acc == pytest.approx(recipe["accuracy"], abs=0.01)


def test_cli_rejects_an_unknown_adapter(capsys):
    with pytest.raises(SystemExit) as exit_info:
        skills.main(["eval", "division"])
    assert exit_info.value.code == 2
    assert "no adapter at 'division'" in capsys.readouterr().err
