"""The ``lowmem`` command: its JSON contract, its tables and its exit codes."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_course import cli, family
from lowmem_course.cmdline import positive_int
from lowmem_course.estimate import Setup, estimate
from lowmem_course.units import GiB, parse_bytes

KEYS = {"weights", "gradients", "optimizer", "activations", "kv_cache", "total"}


def run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_contract(capsys):
    code, out, err = run(capsys, "estimate", "r1", "--json")
    data = json.loads(out)
    assert code == 0 and err == ""
    assert data["parameters"] == 671_026_404_352 and data["active_parameters"] == 37_552_282_624
    assert set(data["bytes"]) >= KEYS and all(isinstance(v, int) for v in data["bytes"].values())
    assert data["bytes"] == estimate("r1", Setup()).bytes


def test_estimate_recipe_and_flags_reach_the_setup(capsys):
    argv = ["estimate", "r1-distill-qwen-7b", "--recipe", "full+bf16-mixed+checkpointing+sgd+zero2",
            "--batch", "2", "--seq", "512", "--gpus", "4", "--lora-rank", "8", "--device", "cpu", "--json"]
    code, out, _ = run(capsys, *argv)
    setup = Setup(mode="full", precision="bf16-mixed", optimizer="sgd", batch=2, seq=512, checkpointing="full",
                  gpus=4, zero=2, lora_rank=8, device="cpu")
    assert code == 0
    data = json.loads(out)
    assert data["bytes"] == estimate("r1-distill-qwen-7b", setup).bytes
    assert data["recipe"] == "full+bf16-mixed+checkpointing+sgd+zero2" and data["setup"] == setup.__dict__


def test_recipes_read_in_any_order_and_print_in_one(capsys):
    for text in ("checkpointing+qlora+bf16-mixed", "QLoRA + bf16-mixed + checkpointing"):
        code, out, _ = run(capsys, "estimate", "r1-distill-qwen-7b", "--recipe", text, "--json")
        assert code == 0 and json.loads(out)["recipe"] == "qlora+bf16-mixed+checkpointing"


@pytest.mark.parametrize("recipe, message", [
    ("lora+turbo", "unknown token 'turbo'"), ("bf16-mixed", "names no mode"), ("lora+qlora", "names its mode twice"),
    ("lora+bf16", "lora trains fp32 adapters"), ("inference+bf16-mixed", "autocast is for training"),
    ("full+nf4", "a quantized base"), ("inference+bf16+nf4-dq+tp8", "splits the model over 8 GPUs, but the run has 2"),
])
def test_a_bad_recipe_is_one_line_naming_the_problem(capsys, recipe, message):
    extra = ["--gpus", "2"] if "tp8" in recipe else []
    code, out, err = run(capsys, "estimate", "r1-distill-qwen-7b", "--recipe", recipe, *extra)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_estimate_table_in_gib(capsys):
    code, out, _ = run(capsys, "estimate", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "--recipe", "inference+bf16")
    e = estimate("r1-distill-qwen-1.5b", Setup(mode="inference", precision="bf16"))
    assert code == 0
    assert f"{'total':<12} {e.bytes['total'] / GiB:9.2f}\n" in out
    assert f"{'kv_cache':<12} {e.bytes['kv_cache'] / GiB:9.2f}\n" in out and "GiB/GPU" in out


def test_estimate_reads_a_config_file_and_a_model_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text(family.config("r1-distill-llama-8b").to_json_string())
    by_name = json.loads(run(capsys, "estimate", "r1-distill-llama-8b", "--json")[1])["bytes"]
    assert json.loads(run(capsys, "estimate", str(tmp_path), "--json")[1])["bytes"] == by_name
    assert json.loads(run(capsys, "estimate", str(tmp_path / "config.json"), "--json")[1])["bytes"] == by_name


def test_plan_lists_fitting_recipes(capsys):
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-7b", "--gpu-memory", "24GiB", "--json")
    fits = json.loads(out)["fits"]
    assert code == 0 and fits
    assert all(f["bytes"]["total"] <= 24 * GiB for f in fits)
    assert all("+" in f["recipe"] for f in fits)
    assert all(f["command"].startswith("lowmem " + ("estimate" if f["setup"]["mode"] == "inference" else "train"))
               for f in fits)
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-7b", "--gpu-memory", "24GB")
    assert code == 0 and "lowmem train --model r1-distill-qwen-7b --recipe lora+bf16-mixed" in out


def test_plan_with_nothing_fitting_exits_1(capsys):
    code, out, _ = run(capsys, "plan", "r1", "--gpu-memory", "1GiB")
    assert code == 1 and "nothing fits" in out


BAD = [
    ["estimate", "gpt-5"],
    ["estimate", "r1", "--batch", "0"],
    ["estimate", "r1", "--seq", "-5"],
    ["estimate", "r1", "--recipe", "pretrain"],
    ["estimate", "r1", "--recipe", "full+zero4"],
    ["plan", "r1", "--gpu-memory", "lots"],
    ["plan", "r1", "--gpu-memory", "0GB"],
    ["estimate", "no/such/config.json"],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_is_one_line_on_stderr_and_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(cli.main(argv))
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("content,message", [('{"model_type": "bert", "hidden_size": 768}', "unsupported architecture"),
                                             ("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_config_files_exit_2(capsys, tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    code, out, err = run(capsys, "estimate", str(path))
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "lowmem_course", "estimate", "r1", "--json"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert json.loads(done.stdout)["parameters"] == 671_026_404_352
    bad = subprocess.run([sys.executable, "-m", "lowmem_course", "plan", "r1", "--gpu-memory", "24 parsecs"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@settings(max_examples=200, deadline=None)
@given(value=st.integers(1, 10**6), unit=st.sampled_from(["GB", "GiB", "MB", "MiB", "gib", "TB"]))
def test_gpu_memory_parses_every_documented_form(value, unit):
    scale = {"gb": 10**9, "gib": 2**30, "mb": 10**6, "mib": 2**20, "tb": 10**12}[unit.lower()]
    assert cli._memory(f"{value}{unit}") == value * scale


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=12))
def test_gpu_memory_parser_accepts_or_refuses_cleanly(text):
    try:
        assert parse_bytes(text) > 0
    except ValueError:
        with pytest.raises(Exception, match="memory size|cannot read"):
            cli._memory(text)


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(st.text(max_size=8), st.integers(-10, 10).map(str)))
def test_positive_int_parser(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is not None and value > 0:
        assert positive_int(text) == value
    else:
        with pytest.raises(Exception, match="positive integer"):
            positive_int(text)


def test_validate_prints_the_grid_and_exits_0_when_within_5_percent(capsys, monkeypatch):
    from lowmem_course import validate

    monkeypatch.setattr(validate, "grid", lambda: [("r1-distill-llama-8b", Setup(mode="inference", precision="bf16",
                                                                                 batch=2, seq=128))])
    code, out, _ = run(capsys, "validate")
    assert code == 0
    assert "r1-distill-llama-8b" in out and "worst total error" in out


def test_validate_exits_1_when_a_total_is_off(capsys, monkeypatch):
    from lowmem_course import validate

    setup = Setup(mode="inference")
    off = validate.Comparison(model="r1", setup=setup, predicted={"total": 106}, measured={"total": 100})
    monkeypatch.setattr(validate, "run_grid", lambda device, items: [off])
    code, out, _ = run(capsys, "validate", "--quick")
    assert code == 1 and "OFF" in out and "+6.00%" in out


def test_plan_precisions_restricts_the_plan(capsys):
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-1.5b", "--gpu-memory", "15GiB", "--precisions",
                       "fp16-mixed,fp32", "--json")
    fits = json.loads(out)["fits"]
    assert code == 0 and {f["setup"]["precision"] for f in fits} == {"fp16-mixed", "fp16", "fp32"}
    assert "lora+fp16-mixed" in {f["recipe"] for f in fits}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "r1-distill-qwen-1.5b", "--gpu-memory", "15GiB", "--precisions", "fp8,fp32"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "precisions must be among" in err


def test_plan_splits_r1_over_8_gpus_with_4_bit_experts(capsys):
    code, out, _ = run(capsys, "plan", "r1", "--gpu-memory", "80GiB", "--gpus", "8", "--batch", "8", "--seq", "8192",
                       "--mode", "inference", "--json")
    fits = json.loads(out)["fits"]
    assert code == 0 and [f["recipe"] for f in fits] == ["inference+bf16+nf4-dq+experts+tp8"]
    setup = Setup(**fits[0]["setup"])
    assert fits[0]["bytes"] == estimate("r1", setup).bytes
    code, out, _ = run(capsys, "plan", "r1", "--gpu-memory", "80GiB", "--gpus", "8", "--batch", "8", "--seq", "8192",
                       "--mode", "inference")
    line = "lowmem estimate r1 --recipe inference+bf16+nf4-dq+experts+tp8 --batch 8 --seq 8192 --gpus 8"
    assert line in out  # the estimate line reproduces it
    code, out, _ = run(capsys, *line.split()[1:], "--json")
    assert code == 0 and json.loads(out)["bytes"] == fits[0]["bytes"]
