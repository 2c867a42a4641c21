"""The training command: recipes, bad data, and a run that survives being killed."""

import json
import os
import signal
import subprocess
import sys

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
    ("qlora+checkpointing+bf16", Recipe("qlora", "bf16", True)),
    ("full", Recipe("full", "fp32", False)),
    ("BF16 + lora", Recipe("lora", "bf16", False)),
])
def test_recipes_parse_and_print_back(text, expected):
    assert Recipe.parse(text) == expected
    assert Recipe.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "bf16", "lora+qlora", "lora+bf16+fp16", "lora+turbo", "lora+lora"])
def test_bad_recipes_are_refused(text):
    with pytest.raises(ValueError, match="cannot read recipe"):
        Recipe.parse(text)


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
    assert train.main(args(data, out, "--resume", "--recipe", "lora+bf16")) == 2
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
