"""The shipped students, their trainer and their evaluation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lowmem_course import family
from lowmem_course.reasoning import addition, make_tokenizer, sample
from lowmem_course.student import (
    ARCHS,
    EVAL_N,
    EVAL_SEED,
    TARGET_ACCURACY,
    TrainConfig,
    accuracy,
    heldout_loss,
    learning_rate,
    load_student,
    make_batch,
    student_config,
    student_dir,
    train,
)

TOK = make_tokenizer()


def recipe(arch: str) -> dict:
    return json.loads((student_dir(arch) / "recipe.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_student_reaches_its_recorded_accuracy(arch: str):
    model, tok = load_student(arch)
    acc = accuracy(model, tok, n=EVAL_N, seed=EVAL_SEED, progress=False)
    rec = recipe(arch)
    assert (rec["eval_n"], rec["eval_seed"], rec["steps"]) == (EVAL_N, EVAL_SEED, TrainConfig.for_arch(arch).steps)
    assert abs(acc - rec["accuracy"]) <= 0.01
    assert acc >= TARGET_ACCURACY[arch]



@pytest.mark.parametrize("arch, name", [("qwen2", "student-qwen2"),
                                        ("deepseek_v3", "student-deepseek-v3")])
def test_family_loads_the_shipped_student(arch: str, name: str):
    model = family.load(name)
    assert model.config.model_type == arch
    assert model.config.vocab_size == 32 and model.config.eos_token_id == TOK.eos_token_id
    expected = student_config(arch)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert getattr(model.config, field) == getattr(expected, field)
    weights = student_dir(arch) / "model.safetensors"
    assert weights.stat().st_size < 5 * 2**20  # bytes: small enough to quantize/prune in seconds
    assert (student_dir(arch) / "loss.csv").read_text().startswith("step,loss\n")


def test_student_accuracy_survives_bfloat16():
    model, tok = load_student("qwen2", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert accuracy(model, tok, n=100, seed=1, progress=False) >= 0.8


def test_unseen_task_is_not_known_yet():
    model, tok = load_student("qwen2")
    assert accuracy(model, tok, n=50, seed=0, task="subtraction", progress=False) <= 0.1


def _token_accuracy(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Teacher-forced next-token accuracy on the labelled (trace and answer) positions."""
    with torch.no_grad():
        predicted = model(input_ids=input_ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    return ((predicted == target) & scored).sum().item() / scored.sum().item()


def test_short_training_run_learns():
    # 40 small steps (seconds here): too few for exact-match answers, which need the shipped
    # students' 1000 steps (checked through their recorded accuracy), but the next-token accuracy on
    # held-out traces must rise far above an untrained model's (chance is 1 in 20 characters).
    cfg = replace(TrainConfig.for_arch("qwen2"), steps=40, batch_size=16, warmup=10, log_every=20)
    model, tok, log = train(cfg, progress=False)
    assert [s for s, _ in log] == [20, 40]
    assert log[0][1] > 1.8 and log[-1][1] < 0.8 * log[0][1]  # nats per target token
    held_out = make_batch(sample(64, seed=1, split="heldout"), tok)
    untrained = family.build(student_config("qwen2"), seed=0)
    assert _token_accuracy(untrained, *held_out) < 0.1
    assert _token_accuracy(model, *held_out) > 0.4


def test_make_batch_masks_prompt_and_padding():
    problems = [addition(482, 357), addition(999, 999)]  # answers of 3 and 4 digits
    input_ids, labels = make_batch(problems, TOK)
    assert input_ids.shape == labels.shape == (2, 1 + 8 + 28 + 4 + 1)
    assert (labels[:, :9] == -100).all()  # <bos> and the prompt
    assert labels[0, 9].item() == TOK.convert_tokens_to_ids("<think>")
    assert labels[0, -2].item() == TOK.eos_token_id and labels[1, -1].item() == TOK.eos_token_id
    assert input_ids[0, -1].item() == TOK.pad_token_id and labels[0, -1].item() == -100
    assert TOK.decode(input_ids[0], skip_special_tokens=True) == problems[0].text


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup=100, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1e-5)
    assert learning_rate(99, cfg) == pytest.approx(1e-3)
    assert learning_rate(550, cfg) == pytest.approx(0.55e-3)
    assert learning_rate(1000, cfg) == pytest.approx(1e-4)


def test_eval_cli_prints_accuracy_last():
    out = subprocess.run([sys.executable, "-m", "lowmem_course.student", "eval", "--arch", "qwen2", "--n", "50"],
                         capture_output=True, text=True, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"accuracy: \d\.\d{3}", last)
    model, tok = load_student("qwen2")
    assert float(last.split()[-1]) == pytest.approx(accuracy(model, tok, n=50, seed=0, progress=False))


@pytest.mark.parametrize("args", [["eval", "--arch", "llama"], ["eval", "--arch", "qwen2", "--n", "0"],
                                  ["train", "--arch", "qwen2", "--steps", "x"], []])
def test_cli_rejects_bad_arguments(args: list[str]):
    out = subprocess.run([sys.executable, "-m", "lowmem_course.student", *args], capture_output=True, text=True)
    assert out.returncode == 2
    assert re.fullmatch(r"python -m lowmem_course\.student( train| eval)?: error: [^\n]+\n", out.stderr), out.stderr


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
def test_the_shipped_tokenizer_encodes_like_the_training_one(arch: str):
    # AutoTokenizer would pick Qwen2Tokenizer for these configs, which splits <think> into characters
    trace = "482+357=<think>2+7+0=09,5+5+0=10,4+3+1=08</think>839"
    loaded = family.load_tokenizer(f"student-{arch.replace('_', '-')}")
    assert loaded(trace).input_ids == TOK(trace).input_ids
    assert loaded.convert_tokens_to_ids("<think>") in loaded(trace).input_ids


def test_heldout_loss_separates_known_and_unknown_skills_and_keeps_the_mode():
    model, tok = load_student("qwen2")
    model.train()
    known, unknown = heldout_loss(model, tok, n=16), heldout_loss(model, tok, n=16, task="subtraction")
    assert known < 0.05 < 1.0 < unknown  # nats per target token: it adds, it never saw subtraction
    assert model.training
