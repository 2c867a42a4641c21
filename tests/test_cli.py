"""The ``lowmem`` command: its JSON contract, its tables and its exit codes."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_course import cli, family, gpus
from lowmem_course.cmdline import positive_int
from lowmem_course.estimate import DEFAULT_SEQ, Setup, estimate, setup_of
from lowmem_course.units import GiB, MiB, parse_bytes

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
    assert data["bytes"] == estimate("r1", Setup(seq=DEFAULT_SEQ)).bytes
    assert data["job"] == "training" and data["budget"] is None and data["fits"] is None


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
    e = estimate("r1-distill-qwen-1.5b", Setup(mode="inference", precision="bf16", seq=DEFAULT_SEQ))
    assert code == 0
    assert out.startswith("Inference of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B with recipe inference+bf16, "
                          "batch 1 x seq 4,096 on 1 GPU; budget: none given")
    assert "gradients" not in out and "optimizer" not in out  # an inference row has neither
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


def test_plan_lora_rank_reaches_every_adapter_row_and_its_command(capsys):
    """torchtune's Llama 8B LoRA recipe trains rank-8 adapters: ``plan --lora-rank 8`` plans those, each
    row's estimate is that of rank 8 and its command says so (rank 16, the default, goes unsaid)."""
    argv = ["plan", "r1-distill-llama-8b", "--gpu-memory", "24GiB", "--batch", "2", "--seq", "2048"]
    code, out, _ = run(capsys, *argv, "--lora-rank", "8", "--json")
    data = json.loads(out)
    adapted = [f for f in data["fits"] if f["setup"]["mode"] in ("lora", "qlora")]
    assert code == 0 and data["job"]["lora_rank"] == 8 and {f["setup"]["mode"] for f in adapted} == {"lora", "qlora"}
    for f in adapted:
        setup = setup_of(f["recipe"], batch=2, seq=2048, lora_rank=8)
        assert f["setup"] == setup.__dict__ and f["bytes"] == estimate("r1-distill-llama-8b", setup).bytes
        assert f["command"].endswith("--lora-rank 8")
    assert all(f["setup"]["lora_rank"] == 16 for f in data["fits"] if f not in adapted)
    code, out, _ = run(capsys, *argv, "--mode", "lora")
    assert code == 0 and "--lora-rank" not in out and "--recipe lora+" in out
    code, out, _ = run(capsys, *argv, "--mode", "lora", "--lora-rank", "8")
    assert code == 0 and out.count("--lora-rank 8") == out.count("lowmem train ") > 0


def test_plan_with_nothing_fitting_exits_1(capsys):
    code, out, _ = run(capsys, "plan", "r1", "--gpu-memory", "1GiB")
    assert code == 1 and out.count("nothing fits in 1.00 GiB per GPU") == 2  # training and inference


def test_estimate_and_plan_share_their_defaults():
    estimate_args = cli.parser().parse_args(["estimate", "r1"])
    plan_args = cli.parser().parse_args(["plan", "r1", "--gpu", "h200"])
    for name in ("batch", "seq", "gpus", "device", "json", "lora_rank"):
        assert getattr(estimate_args, name) == getattr(plan_args, name), name
    assert plan_args.seq == DEFAULT_SEQ == 4096 and plan_args.batch == 1


def test_plan_without_a_mode_groups_training_and_inference(capsys):
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-14b", "--gpu", "rtx-4090", "--seq", "8192")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("Training and inference of deepseek-ai/DeepSeek-R1-Distill-Qwen-14B, "
                                             "batch 1 x seq 8,192 on 1 x rtx-4090; budget: 23.24 GiB usable per GPU")
    training = next(i for i, line in enumerate(lines) if line.startswith("Training (full fine-tuning, LoRA, QLoRA): "))
    inference = next(i for i, line in enumerate(lines) if line.startswith("Inference: 2 setups fit"))
    assert training < inference and "cost relative to serving bf16 weights from one GPU" in lines[inference]
    assert "cost relative to bf16 full fine-tuning" in lines[training]
    assert lines[training + 1].split() == ["cost", "weights", "grads", "optim", "activ", "total", "host"]
    assert "a serving command comes in a later release" in lines[inference]
    assert "bf16 full fine-tuning" not in "\n".join(lines[inference:])
    assert lines[inference + 1].split() == ["cost", "weights", "activ", "kv", "total"]
    assert lines[inference + 3].strip() == "inference+bf16+nf4-dq"  # each row: numbers, recipe, command


def test_one_setup_is_singular(capsys):
    code, out, _ = run(capsys, "plan", "r1", "--gpu-memory", "80GiB", "--gpus", "8", "--mode", "inference")
    assert code == 0 and "Inference: 1 setup fits," in out and "setups" not in out


# ---- the learner's three questions ------------------------------------------------------------

def test_question_1_qlora_14b_on_a_4090_at_8k(capsys):
    """"Can I fine-tune R1-Distill-Qwen-14B on my 24 GB RTX 4090 at 8k context?" Yes, with checkpointed
    inputs offloaded and the loss chunked; at 128k no (64k fits with the tiled MLP): how far, and the longest
    context that fits."""
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-14b", "--gpu", "rtx-4090", "--seq", "8192", "--mode", "qlora",
                       "--json")
    budget = gpus.gpu("rtx-4090").usable
    best = json.loads(out)["fits"][0]
    assert code == 0 and best["bytes"]["total"] <= budget and "offload-activations" in best["recipe"]
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-14b", "--gpu", "rtx-4090", "--seq", "131072", "--mode", "qlora",
                       "--json")
    short = json.loads(out)["nothing_fits"]["training"]
    lean = estimate("r1-distill-qwen-14b", setup_of(short["leanest"]["recipe"], seq=131072))
    assert code == 1 and short["over"] == lean.bytes["total"] - budget > 0
    assert short["weights"] == lean.bytes["weights"] < budget
    assert short["fewest_gpus"] is None  # QLoRA keeps a whole model per GPU: more GPUs cannot help
    longest = short["longest_seq"]
    assert 8192 < longest < 131072
    fits = estimate("r1-distill-qwen-14b", setup_of(short["at_longest_seq"]["recipe"], seq=longest))
    too_long = estimate("r1-distill-qwen-14b", setup_of(short["at_longest_seq"]["recipe"], seq=longest + 1))
    assert fits.bytes["total"] <= budget < too_long.bytes["total"]
    assert short["at_longest_seq"]["command"].startswith("lowmem train --model r1-distill-qwen-14b --recipe qlora")
    assert f"--max-tokens {longest}" in short["at_longest_seq"]["command"]
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-14b", "--gpu", "rtx-4090", "--seq", "131072", "--mode", "qlora")
    assert f"the longest context that fits on 1 GPU at batch 1: {longest:,} tokens" in out
    assert "more GPUs cannot help" in out and "shorten" not in out


def test_question_2_serving_70b_at_32k_on_two_80_gb_cards(capsys):
    """"How much VRAM to serve R1-Distill-Llama-70B at 32k?" bf16 split over 2 H100s fits; the unit is said."""
    argv = ["plan", "r1-distill-llama-70b", "--gpus", "2", "--seq", "32768", "--mode", "inference", "--json"]
    by_card = json.loads(run(capsys, *argv, "--gpu", "h100-80gb")[1])
    assert "inference+bf16+tp2" in {f["recipe"] for f in by_card["fits"]}
    assert by_card["budget"]["bytes"] == 81559 * MiB - gpus.CUDA_RESERVE
    decimal = json.loads(run(capsys, *argv, "--gpu-memory", "80GB")[1])
    assert "inference+bf16+tp2" not in {f["recipe"] for f in decimal["fits"]}  # 80 GB are 74.51 GiB
    assert decimal["budget"]["said"] == "74.51 GiB (80GB = 80,000,000,000 bytes, decimal) per GPU"
    code, out, _ = run(capsys, *argv[:-1], "--gpu-memory", "80GB")
    assert code == 0 and "budget: 74.51 GiB (80GB = 80,000,000,000 bytes, decimal) per GPU" in out.splitlines()[0]
    code, out, _ = run(capsys, "estimate", "r1-distill-llama-70b", "--recipe", "inference+bf16+tp2", "--seq", "32768",
                       "--gpu", "h100-80gb")
    assert code == 0 and out.startswith("Inference of") and "fits: " in out


def test_question_3_full_r1_on_two_h100s(capsys):
    """"Can I run the full R1 on 2 x H100 80GB?" No, whatever the context: 8 of them at 4 bits."""
    code, out, _ = run(capsys, "plan", "r1", "--gpu", "h100-80gb", "--gpus", "2", "--mode", "inference", "--json")
    short = json.loads(out)["nothing_fits"]["inference"]
    assert code == 1 and short["weights"] > gpus.gpu("h100-80gb").usable
    assert short["longest_seq"] is None and short["largest_batch"] is None
    assert short["fewest_gpus"] == 8 and short["at_fewest_gpus"]["recipe"] == "inference+bf16+nf4-dq+experts+tp8"
    code, out, _ = run(capsys, "plan", "r1", "--gpu", "h100-80gb", "--gpus", "2", "--mode", "inference")
    assert "no shorter context or smaller batch can help" in out and "the fewest h100-80gb that fit: 8" in out
    assert "--seq" not in out.replace("--seq 4096", "")  # never "shorten --seq"


def test_gpu_by_name_follows_the_card(capsys):
    code, out, _ = run(capsys, "plan", "r1-distill-qwen-1.5b", "--gpu", "t4", "--json")
    data = json.loads(out)
    assert code == 0 and data["job"]["precisions"] == ["fp16-mixed", "fp32"]
    assert not any("bf16" in f["recipe"] for f in data["fits"])
    code, out, _ = run(capsys, "estimate", "r1-distill-qwen-1.5b", "--gpu", "T4", "--json")
    assert code == 0 and json.loads(out)["recipe"] == "full+fp16-mixed"
    for argv in (["estimate", "r1", "--gpu", "t4", "--recipe", "lora+bf16-mixed"],
                 ["plan", "r1", "--gpu", "t4", "--precisions", "bf16-mixed"]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, "") and err.count("\n") == 1 and "t4 has no bf16" in err


def test_lowmem_gpus_lists_the_table(capsys):
    code, out, _ = run(capsys, "gpus")
    assert code == 0 and all(name in out for name in gpus.GPUS)
    code, out, _ = run(capsys, "gpus", "--json")
    rows = {g["name"]: g for g in json.loads(out)}
    assert rows["t4"]["bf16"] is False and rows["h100-80gb"]["fp8"] is True
    assert rows["h200"]["usable"] == 143771 * MiB - gpus.CUDA_RESERVE


def test_help_shows_examples_and_model_names(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "lowmem plan r1-distill-qwen-14b --gpu rtx-4090" in out
    assert all(name in out for name in family.MEMBERS) and all(name in out for name in gpus.GPUS)


BAD = [
    ["estimate", "gpt-5"],
    ["estimate", "r1", "--batch", "0"],
    ["estimate", "r1", "--seq", "-5"],
    ["estimate", "r1", "--recipe", "pretrain"],
    ["estimate", "r1", "--recipe", "full+zero4"],
    ["plan", "r1", "--gpu-memory", "lots"],
    ["plan", "r1", "--gpu-memory", "0GB"],
    ["plan", "r1", "--gpu-memory", "24"],
    ["plan", "r1", "--gpu", "a800"],
    ["plan", "r1", "--gpu", "h100-80gb", "--gpu-memory", "80GiB"],
    ["plan", "r1"],
    ["plan", "r1", "--gpu", "h200", "--gpus", "two"],
    ["estimate", "r1", "--gpu-memory", "24 parsecs"],
    ["estimate", "no/such/config.json"],
    ["plan", "r1", "--gpu", "h200", "--lora-rank", "0"],
    ["plan", "r1", "--gpu", "h200", "--lora-rank", "-8"],
    ["plan", "r1", "--gpu", "h200", "--lora-rank", "8.5"],
    ["estimate", "r1", "--lora-rank", "eight"],
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
@given(value=st.integers(1, 10**6), unit=st.sampled_from(["GB", "GiB", "G", "MB", "MiB", "m", "gib", "TB", "T"]))
def test_gpu_memory_parses_every_documented_form(value, unit):
    scale = {"gb": 10**9, "gib": 2**30, "g": 2**30, "mb": 10**6, "mib": 2**20, "m": 2**20, "tb": 10**12,
             "t": 2**40}[unit.lower()]
    budget = cli._memory(f"{value}{unit}")
    assert budget.bytes == value * scale
    assert budget.said.startswith(f"{value * scale / GiB:.2f} GiB")
    assert ("decimal" in budget.said) == (unit.lower() in ("gb", "mb", "tb")) and budget.gpu is None


@settings(max_examples=100, deadline=None)
@given(digits=st.from_regex(r"[0-9]{1,6}(\.[0-9]{1,3})?", fullmatch=True))
def test_a_size_without_a_unit_is_refused(digits):
    with pytest.raises(Exception, match="has no unit"):
        cli._memory(digits)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.sampled_from(sorted(gpus.GPUS)), st.text(max_size=12)))
def test_gpu_names_are_read_or_refused_in_one_line(text):
    key = text.strip().lower().replace("_", "-").replace(" ", "-")
    if key in gpus.GPUS:
        budget = cli._gpu(text)
        assert budget.bytes == gpus.GPUS[key].usable and budget.gpu is gpus.GPUS[key]
    else:
        with pytest.raises(Exception, match="unknown GPU") as error:
            cli._gpu(text)
        assert "\n" not in str(error.value).replace(repr(text), "")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=12))
def test_gpu_memory_parser_accepts_or_refuses_cleanly(text):
    try:
        assert parse_bytes(text) > 0
    except ValueError:
        with pytest.raises(Exception, match=r"memory size|cannot read"):
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
                       "fp16-mixed,fp32", "--seq", "1024", "--json")
    fits = json.loads(out)["fits"]
    assert code == 0 and {f["setup"]["precision"] for f in fits} == {"fp16-mixed", "fp16", "fp32"}
    assert "lora+fp16-mixed+chunked-loss" in {f["recipe"] for f in fits}
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
    line = "lowmem estimate r1 --recipe inference+bf16+nf4-dq+experts+tp8 --batch 8 --seq 8192"  # tp8: 8 GPUs
    assert line in out  # the estimate line reproduces it
    code, out, _ = run(capsys, *line.split()[1:], "--json")
    assert code == 0 and json.loads(out)["bytes"] == fits[0]["bytes"]


def test_a_reader_that_stops_early_gets_no_error():
    # `lowmem plan ... | head`: a reader that closes the pipe before lowmem writes (here `true`, which reads
    # nothing) must not get a "Broken pipe" error from lowmem
    reader = subprocess.run(["bash", "-o", "pipefail", "-c",
                             f"{sys.executable} -m lowmem_course plan r1-distill-qwen-7b --gpu rtx-4090 | true"],
                            capture_output=True, text=True, timeout=120)
    assert (reader.returncode, reader.stderr) == (0, "")


def test_cpu_memory_limits_the_offloading_recipes_and_says_why_when_nothing_fits(capsys):
    argv = ["plan", "r1-distill-llama-8b", "--gpu", "rtx-4090", "--batch", "2", "--seq", "2048", "--mode", "full"]
    code, out, _ = run(capsys, *argv)
    header = next(line for line in out.splitlines() if line.lstrip().startswith("cost"))
    assert code == 0 and header.split()[-1] == "host" and "offload-optimizer" in out
    code, out, _ = run(capsys, *argv, "--cpu-memory", "64GiB")
    assert code == 1 and "64.00 GiB of host memory" in out.splitlines()[0]
    assert "in host memory, over --cpu-memory 64.00 GiB" in out
    answer = json.loads(run(capsys, *argv, "--cpu-memory", "64GiB", "--json")[1])
    assert answer["cpu_memory"]["bytes"] == 64 * GiB and answer["nothing_fits"]["training"]["over_host_memory"]
    code, _, err = run(capsys, *argv, "--cpu-memory", "64")
    assert code == 2 and err.count("\n") == 1 and "has no unit" in err


def test_plan_lists_ten_setups_unless_all(capsys):
    argv = ["plan", "r1-distill-qwen-1.5b", "--gpu", "a100-80gb", "--seq", "1024"]
    out = run(capsys, *argv)[1]
    more = next(line for line in out.splitlines() if line.startswith("... and "))
    hidden = int(more.split()[2])
    assert out.count("lowmem train") == cli.SHOWN and hidden > 0
    assert run(capsys, *argv, "--all")[1].count("lowmem train") == cli.SHOWN + hidden


def test_estimate_shows_what_offloading_keeps_on_the_host(capsys):
    code, out, _ = run(capsys, "estimate", "r1-distill-llama-8b", "--recipe",
                       "full+bf16+checkpointing+offload-activations+chunked-loss+offload-optimizer", "--batch", "2",
                       "--seq", "2048", "--gpu", "rtx-4090")
    assert code == 0 and "host memory (offloaded): " in out and "fits: " in out
    data = json.loads(run(capsys, "estimate", "r1-distill-llama-8b", "--recipe", "full+bf16+offload-optimizer",
                          "--json")[1])
    assert data["host_bytes"]["optimizer"] == 8 * data["trainable_parameters"]
