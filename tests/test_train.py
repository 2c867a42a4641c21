"""The training command: recipes, bad data, and a run that survives being killed."""

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lowmem_course import train
from lowmem_course.reasoning import sample
from lowmem_course.recipe import Recipe


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": p.prompt, "response": p.completion} for p in sample(64, 1, "train", "subtraction")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def args(data, out, *extra):
    return ["--model", "tiny:r1-distill-qwen-1.5b", "--recipe", "lora", "--data", str(data), "--out", str(out),
            "--steps", "12", "--batch", "2", "--save-every", "3", "--lr", "1e-2", *extra]


@pytest.mark.parametrize("text, expected", [
    ("qlora+checkpointing+bf16-mixed", Recipe("qlora", "bf16-mixed", checkpointing=True)),
    ("full", Recipe("full", "fp32")),
    ("BF16-MIXED + lora", Recipe("lora", "bf16-mixed")),
    ("full+bf16+adamw8bit", Recipe("full", "bf16", optimizer="adamw8bit")),
    ("inference+bf16+nf4-dq+experts+tp8",
     Recipe("inference", "bf16", tensor_parallel=8, weights="nf4-dq", experts=True)),
    ("full+fp16-mixed+checkpointing+zero3+sgd-momentum", Recipe("full", "fp16-mixed", "sgd-momentum", True, zero=3)),
    ("accum4+chunked-loss+checkpointing+offload-activations+lora+bf16-mixed",
     Recipe("lora", "bf16-mixed", checkpointing=True, offload_activations=True, chunked_loss=True, accumulate=4)),
    ("full+bf16+step-in-backward", Recipe("full", "bf16", step_in_backward=True)),
    ("full+bf16-mixed+offload-optimizer+accum2", Recipe("full", "bf16-mixed", offload_optimizer=True, accumulate=2)),
])
def test_recipes_parse_and_print_back(text, expected):
    assert Recipe.parse(text) == expected
    assert Recipe.parse(str(expected)) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty recipe"), ("bf16-mixed", "names no mode"), ("lora+qlora", "names its mode twice"),
    ("lora+bf16-mixed+fp16-mixed", "names its precision twice"), ("lora+turbo", "unknown token 'turbo'"),
    ("lora+lora", "names its mode twice"), ("qlora+bf16", "qlora trains fp32 adapters"),
    ("full+fp16", "pure fp16 training"), ("inference+checkpointing", "no backward pass"),
    ("lora+zero2", "ZeRO shards full fine-tuning"), ("full+tp2", "inference only"),
    ("lora+bf16-mixed+experts", "experts"), ("inference+bf16+chunked-loss", "no backward pass"),
    ("inference+accum2", "no backward pass"), ("full+accum0", "unknown token 'accum0'"),
    ("full+step-in-backward+offload-optimizer", "choose one"), ("full+step-in-backward+accum2", "no gradient"),
    ("full+fp16-mixed+step-in-backward", "loss scaler"), ("full+adamw8bit+offload-optimizer", "with adamw"),
    ("full+bf16-mixed+step-in-backward+zero2", "not with ZeRO"), ("full+accum2+accum4", "names its accumulate twice"),
])
def test_bad_recipes_are_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as error:
        Recipe.parse(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, base", [("full", "fp32"), ("full+bf16-mixed", "fp32"), ("full+bf16", "bf16"),
                                         ("lora", "fp32"), ("lora+fp16-mixed", "fp16"), ("qlora+bf16-mixed", "nf4-dq"),
                                         ("qlora+bf16-mixed+int8", "int8"), ("inference+fp16", "fp16")])
def test_one_place_decides_the_base_weights(text, base):
    assert Recipe.parse(text).base_weights == base


@pytest.mark.parametrize("recipe, message", [
    ("inference+bf16", "is an inference recipe"), ("full+bf16-mixed+zero2", "shards over 2+ GPUs"),
    ("lora+paged-adamw8bit", "paged optimizers"),
])
def test_recipes_lowmem_train_cannot_run_here_are_one_line(data, tmp_path, capsys, recipe, message):
    assert train.main(args(data, tmp_path / "out", "--recipe", recipe)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "out").exists()


def test_a_malformed_line_is_named_by_its_number(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n\n{"prompt": "2+2=", "response": \n')
    assert train.main(args(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:3: not valid JSON" in err


def test_a_line_without_a_response_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    with pytest.raises(train.TrainError, match=r":1: expected an object"):
        train.read_examples(bad)


def test_another_runs_checkpoint_is_never_overwritten(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(args(data, out, "--steps", "3")) == 0
    before = (out / "checkpoint" / "trainable.safetensors").read_bytes()
    assert train.main(args(data, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "checkpoint" / "trainable.safetensors").read_bytes() == before
    assert train.main(args(data, out, "--resume", "--recipe", "lora+bf16-mixed")) == 2
    assert "from another run" in capsys.readouterr().err


def test_killed_run_resumes_with_no_lost_steps(data, tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert train.main(args(data, reference)) == 0

    # the run kills itself (kill -9) right after logging step 7: deterministic on any machine
    killed = subprocess.run([sys.executable, "-m", "lowmem_course.train", *args(data, interrupted)],
                            env={**os.environ, train.KILL_AT: "step:7"}, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    log = interrupted / "log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 8))
    saved_step = json.loads((interrupted / "checkpoint" / "state.json").read_text())["step"]
    assert saved_step == 6

    assert train.main(args(data, interrupted, "--resume")) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 13))  # every step once: step 7 was cut from the log and ran again
    assert log.read_text() == (reference / "log.jsonl").read_text()  # the same losses, digit for digit
    final = load_file(interrupted / "checkpoint" / "trainable.safetensors")
    expected = load_file(reference / "checkpoint" / "trainable.safetensors")
    assert final.keys() == expected.keys()
    assert all((final[k] == expected[k]).all() for k in final)  # bitwise equal
    assert (interrupted / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((interrupted / "report.json").read_text())
    assert report["memory"]["breakdown"]["parameters"] > 0


def test_no_progress_switches_the_progress_bar_off(data, tmp_path, capsys):
    assert train.main(args(data, tmp_path / "bar", "--steps", "2")) == 0
    assert "train lora" in capsys.readouterr().err  # tqdm writes its bar to stderr
    assert train.main(args(data, tmp_path / "quiet", "--steps", "2", "--no-progress")) == 0
    out, err = capsys.readouterr()
    assert "train lora" not in err and "peak" in out  # the memory report is still printed
    assert train.parser().parse_args(args(data, tmp_path, "--no-progress")).no_progress


def plan_commands(model: str, mode: str) -> list[list[str]]:
    """The `lowmem train` commands `lowmem plan MODEL --mode MODE --gpu-memory 24GiB` prints, as words."""
    from lowmem_course import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["plan", model, "--mode", mode, "--gpu-memory", "24GiB", "--seq", "256"]) == 0
    return [shlex.split(line) for line in out.getvalue().splitlines() if line.strip().startswith("lowmem train ")]


def run_as_printed(words: list[str], twin: str, data: Path, out: Path) -> int:
    """Run a printed `lowmem train` command on a tiny twin, our data and folder, for 2 steps."""
    argv = words[2:]
    for flag, value in (("--model", twin), ("--data", str(data)), ("--out", str(out))):
        argv[argv.index(flag) + 1] = value
    return train.main([*argv, "--steps", "2", "--no-progress"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_every_recipe_plan_recommends_for_one_gpu_runs_as_printed(data, tmp_path, capsys, mode):
    commands = plan_commands("r1-distill-qwen-1.5b", mode)
    recipes = [words[words.index("--recipe") + 1] for words in commands]
    assert commands and all(r.startswith(mode + "+") for r in recipes)
    for i, words in enumerate(commands):
        assert run_as_printed(words, "tiny:r1-distill-qwen-1.5b", data, tmp_path / f"run{i}") == 0, \
            (recipes[i], capsys.readouterr().err)
        report = json.loads((tmp_path / f"run{i}" / "report.json").read_text())
        assert report["status"] == "done" and report["recipe"] == recipes[i]


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["tiny:r1-distill-llama-8b", "tiny:r1"])
def test_the_other_architectures_run_the_planned_recipes_of_each_mode(data, tmp_path, capsys, twin):
    for mode in ("full", "lora", "qlora"):
        words = plan_commands("r1-distill-qwen-1.5b", mode)[0]
        assert run_as_printed(words, twin, data, tmp_path / mode) == 0, capsys.readouterr().err


def final_loss(data: Path, out: Path, recipe: str, *extra: str) -> float:
    argv = ["--model", "tiny:r1-distill-qwen-1.5b", "--recipe", recipe, "--data", str(data), "--out", str(out),
            "--steps", "6", "--batch", "4", "--save-every", "6", "--lr", "1e-3", "--no-progress", *extra]
    assert train.main(argv) == 0
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"]


TECHNIQUES = ("chunked-loss", "checkpointing+offload-activations", "step-in-backward", "offload-optimizer", "accum2",
              "accum4+chunked-loss", "checkpointing+tiled-mlp")


@pytest.mark.slow
def test_each_technique_trains_to_the_plain_recipes_loss(data, tmp_path):
    """Same data, same steps, fp32: each technique changes only where bytes live and the order of sums, so
    the loss after 6 AdamW steps agrees with the plain recipe's to 1e-4 (relative; float32 rounding of
    sums over a 4 x 1024-token batch, amplified by 6 steps at lr 1e-3, stays below 1e-5 here)."""
    plain = final_loss(data, tmp_path / "plain", "full+fp32")
    for i, technique in enumerate(TECHNIQUES):
        out = tmp_path / f"run{i}"
        assert final_loss(data, out, f"full+fp32+{technique}") == pytest.approx(plain, rel=1e-4), technique
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "done" and technique.split("+")[-1] in report["recipe"]
        if "offload" in technique:
            assert report["memory"]["host_peak_bytes"] > 0, technique  # what the last step kept on the host


@pytest.mark.parametrize("recipe", ["lora+bf16-mixed+checkpointing", "qlora+bf16-mixed"])
def test_adapters_of_an_autocast_run_read_their_16_bit_input_as_it_is(recipe):
    """The trainer's model (``quantize.add_lora``): under autocast no adapter casts its input to fp32, so
    none saves a copy of it (``quantize.share_adapter_inputs``); the estimator counts no copy."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lowmem_course import steps

    r = Recipe.parse(recipe)
    model = train.load_model("tiny:r1-distill-qwen-1.5b", r, lora_rank=4)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    ids = torch.arange(8)[None] % model.config.vocab_size
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    steps.train_step(model, optimizer, ids, autocast_dtype=torch.bfloat16)
    assert len(layers) == 7 * 4 and not any(m.cast_input_dtype_enabled for m in layers)


def test_a_batch_that_does_not_split_into_the_micro_batches_is_one_line(data, tmp_path, capsys):
    argv = ["--model", "tiny:r1-distill-qwen-1.5b", "--recipe", "lora+accum3", "--data", str(data), "--out",
            str(tmp_path / "run"), "--batch", "4"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not split into 3 equal micro-batches" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lora+step-in-backward", "lora+offload-optimizer"])
def test_a_run_whose_step_is_in_backward_or_on_the_host_resumes_bit_for_bit(data, tmp_path, recipe):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    base = ["--recipe", recipe, "--steps", "6"]
    assert train.main([*args(data, reference), *base]) == 0
    assert train.main([*args(data, interrupted), *base[:2], "--steps", "3"]) == 0
    assert train.main([*args(data, interrupted), *base, "--resume"]) == 0
    final = load_file(interrupted / "checkpoint" / "trainable.safetensors")
    expected = load_file(reference / "checkpoint" / "trainable.safetensors")
    assert all((final[k] == expected[k]).all() for k in expected)  # bitwise equal
