"""Bad input to the estimator and the command lines: one line on stderr, exit 2, never a traceback or a hang."""

import json
import shlex
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_course import cli, estimate, family, integrity, reasoning, skills, student
from lowmem_course.cmdline import printable

BASES = {name: estimate.load_config(name) for name in ("r1-distill-qwen-7b", "r1-distill-llama-8b", "r1")}
# every integer field the estimator reads, and whether 0 is a valid value for it
POSITIVE = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size"]
POSITIVE_MOE = ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"]
NON_NEGATIVE_MOE = ["q_lora_rank", "first_k_dense_replace", "n_shared_experts"]
FLAGS = ["tie_word_embeddings", "attention_bias", "mlp_bias"]
OPTIONAL = {"num_key_value_heads", "head_dim", "q_lora_rank", "first_k_dense_replace", "n_shared_experts", "n_group",
            "topk_group"}  # absent or null: a default


def fields_of(base: str) -> list[str]:
    return POSITIVE + FLAGS + (POSITIVE_MOE + NON_NEGATIVE_MOE if base == "r1" else [])


NOT_AN_INTEGER = st.one_of(st.text(max_size=6), st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True),
                           st.booleans(), st.lists(st.integers(), max_size=2),
                           st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
NOT_A_FLAG = st.one_of(st.text(max_size=6), st.integers(), st.floats(), st.lists(st.booleans(), max_size=2))


@st.composite
def broken_configs(draw):
    """A real config with one field the estimator reads made wrong: (config, the field)."""
    base = draw(st.sampled_from(sorted(BASES)))
    field = draw(st.sampled_from(fields_of(base)))
    if field in FLAGS:
        bad = draw(NOT_A_FLAG)
    else:
        floor = 0 if field in NON_NEGATIVE_MOE else 1
        missing = st.nothing() if field in OPTIONAL else st.none()
        bad = draw(st.one_of(NOT_AN_INTEGER, missing, st.integers(max_value=floor - 1),
                             st.integers(min_value=2**24 + 1)))
    return {**BASES[base], field: bad}, field


@settings(max_examples=300, deadline=2000)
@given(broken=broken_configs())
def test_a_wrong_config_field_is_refused_in_one_line(broken):
    fields, name = broken
    with pytest.raises(ValueError) as error:
        estimate.estimate(fields)
    message = str(error.value)
    assert f"config field {name!r}" in message and "\n" not in message


@st.composite
def inconsistent_configs(draw):
    """A real config whose fields are each fine but do not fit together: (config, the field named)."""
    kind = draw(st.sampled_from(["top_k", "kv_heads", "hidden", "topk_group", "n_group"]))
    if kind == "top_k":
        experts = draw(st.integers(1, 300))
        return {**BASES["r1"], "n_routed_experts": experts, "n_group": None,
                "num_experts_per_tok": draw(st.integers(experts + 1, experts + 1000))}, "num_experts_per_tok"
    if kind == "kv_heads":
        heads = draw(st.integers(2, 128))
        kv = draw(st.integers(1, heads).filter(lambda k: heads % k))
        return {**BASES["r1-distill-qwen-7b"], "num_attention_heads": heads,
                "num_key_value_heads": kv}, "num_key_value_heads"
    if kind == "hidden":
        heads = draw(st.integers(2, 64))
        hidden = draw(st.integers(1, 10_000).filter(lambda h: h % heads))
        return {**BASES["r1-distill-qwen-7b"], "num_attention_heads": heads, "num_key_value_heads": heads,
                "hidden_size": hidden}, "hidden_size"
    if kind == "topk_group":
        groups = draw(st.sampled_from([1, 2, 4, 8]))
        return {**BASES["r1"], "n_group": groups, "topk_group": draw(st.integers(groups + 1, 64))}, "topk_group"
    groups = draw(st.integers(3, 255).filter(lambda g: 256 % g))
    return {**BASES["r1"], "n_group": groups, "topk_group": 1}, "n_group"


@settings(max_examples=150, deadline=2000)
@given(broken=inconsistent_configs())
def test_fields_that_do_not_fit_together_are_refused(broken):
    fields, name = broken
    with pytest.raises(ValueError, match=f"config field '{name}'"):
        estimate.estimate(fields)


@st.composite
def valid_configs(draw):
    """Small, consistent Qwen2/Llama/DeepseekV3 configs with arbitrary sizes."""
    base = draw(st.sampled_from(sorted(BASES)))
    kv = draw(st.integers(1, 8))
    heads = kv * draw(st.integers(1, 8))
    fields = {**BASES[base], "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": None,
              "hidden_size": heads * draw(st.integers(1, 64)), "num_hidden_layers": draw(st.integers(1, 64)),
              "intermediate_size": draw(st.integers(1, 4096)), "vocab_size": draw(st.integers(1, 200_000))}
    if base == "r1":
        experts = draw(st.sampled_from([1, 2, 4, 8, 16, 64]))
        groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if experts % g == 0]))
        fields.update(n_routed_experts=experts, num_experts_per_tok=draw(st.integers(1, experts)), n_group=groups,
                      topk_group=draw(st.integers(1, groups)), q_lora_rank=draw(st.integers(0, 256)),
                      first_k_dense_replace=draw(st.integers(0, 70)), n_shared_experts=draw(st.integers(0, 2)))
    return fields


@settings(max_examples=150, deadline=2000)
@given(fields=valid_configs(), mode=st.sampled_from(estimate.MODES))
def test_an_accepted_config_gives_possible_numbers(fields, mode):
    e = estimate.estimate(fields, estimate.Setup(mode=mode))
    assert 0 < e.active_parameters <= e.parameters
    assert all(v >= 0 for v in e.bytes.values()) and e.bytes["total"] > 0


def test_a_billion_layers_are_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'num_hidden_layers' must be an integer from 1 to 1,024, got 1000000000"):
        estimate.plan({**BASES["r1"], "num_hidden_layers": 10**9}, 80 * 2**30)
    assert time.perf_counter() - start < 1
    start = time.perf_counter()  # the largest accepted R1-like config still plans in seconds
    assert estimate.plan({**BASES["r1"], "num_hidden_layers": estimate.MAX_LAYERS}, 2**60)
    assert time.perf_counter() - start < 20


# ---- the lowmem command ----------------------------------------------------------------------

def lowmem(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_info:  # a usage error
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv: str) -> str:
    code, out, err = lowmem(capsys, *argv)
    assert (code, out) == (2, "") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_deeply_nested_config_is_one_line(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert one_line_error(capsys, "estimate", str(path)) == (
        f"lowmem estimate: error: {path} is not a config: its JSON is nested too deeply to read\n")


def test_a_huge_gpu_memory_is_one_line(capsys):
    err = one_line_error(capsys, "plan", "r1", "--gpu-memory", "1" + "0" * 400 + "GB")
    assert err == "lowmem plan: error: argument --gpu-memory: memory size with 401 digits is too large to count\n"


def test_a_home_folder_that_does_not_exist_is_one_line(capsys):
    err = one_line_error(capsys, "estimate", "~nosuchuser/config.json")
    assert err.startswith("lowmem estimate: error: ~nosuchuser/config.json: ")


def test_impossible_configs_are_refused_not_planned(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASES["r1-distill-qwen-7b"], "num_key_value_heads": -400}))
    assert one_line_error(capsys, "plan", str(path), "--gpu-memory", "1MB") == (
        "lowmem plan: error: config field 'num_key_value_heads' must be an integer from 1 to 16,384, got -400\n")
    path.write_text(json.dumps({**BASES["r1"], "num_experts_per_tok": 300}))
    assert one_line_error(capsys, "estimate", str(path)) == (
        "lowmem estimate: error: config field 'num_experts_per_tok' (300) exceeds 'n_routed_experts' (256)\n")
    for field, value in (("num_key_value_heads", "2"), ("head_dim", "x"), ("first_k_dense_replace", "3"),
                         ("first_k_dense_replace", -1), ("q_lora_rank", -1), ("head_dim", -128)):
        path.write_text(json.dumps({**BASES["r1"], field: value}))
        assert f"config field {field!r} must be an integer" in one_line_error(capsys, "estimate", str(path))


def test_terminal_escapes_in_a_config_are_printed_escaped(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASES["r1-distill-qwen-7b"], "name_or_path": "\x1b[2J\x1b[31mred\nline"}))
    code, out, _ = lowmem(capsys, "estimate", str(path))
    assert code == 0
    assert out.splitlines()[0].startswith("Training (full fine-tuning) of \\x1b[2J\\x1b[31mred\\nline with recipe")
    assert "\x1b" not in out
    assert printable("tab\there\x9b") == "tab\\there\\x9b"


def test_plan_quotes_the_paths_it_prints(capsys, tmp_path):
    folder = tmp_path / "my model; rm -rf ~"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BASES["r1-distill-qwen-7b"]))
    code, out, _ = lowmem(capsys, "plan", str(folder), "--gpu-memory", "80GiB", "--mode", "qlora")
    commands = [shlex.split(line) for line in out.splitlines() if line.strip().startswith("lowmem train ")]
    assert code == 0 and commands
    for words in commands:  # the model's path and the run folder named after it are one word each
        assert words[:4] == ["lowmem", "train", "--model", str(folder)]
        assert words[words.index("--out") + 1].startswith("runs/my model; rm -rf ~-qlora")


# ---- python -m lowmem_course.student and .skills -------------------------------------------

def exits_2_in_one_line(capsys, main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_eval_beyond_the_held_out_split_is_one_line(capsys):
    start = time.perf_counter()
    err = exits_2_in_one_line(capsys, student.main, ["eval", "--arch", "qwen2", "--n", "81000"])
    assert err == ("python -m lowmem_course.student: error: the heldout split holds 80,737 addition problems, "
                   "fewer than the 81,000 asked for\n")
    err = exits_2_in_one_line(capsys, skills.main, ["eval", "subtraction", "--n", "41000"])
    assert err == ("python -m lowmem_course.skills: error: the heldout split holds 40,579 subtraction problems, "
                   "fewer than the 41,000 asked for\n")
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("main, argv, message", [
    (student.main, ["train", "--arch", "qwen2", "--steps", "1"], "the following arguments are required: --out"),
    (student.main, ["train", "--arch", "qwen2", "--out", "x", "--steps", "0"],
     "argument --steps: expected a positive integer, got 0"),
    (student.main, [], "the following arguments are required: command"),
    (skills.main, ["teach", "--steps", "1"], "the following arguments are required: --out"),
    (skills.main, ["eval", "subtraction", "--n", "-1"], "argument --n: expected a positive integer, got -1"),
])
def test_usage_errors_are_one_line(capsys, main, argv, message):
    assert message in exits_2_in_one_line(capsys, main, argv)


@pytest.mark.parametrize("main, argv", [
    (student.main, ["train", "--arch", "qwen2", "--steps", "1", "--out"]),
    (skills.main, ["teach", "--steps", "1", "--out"]),
])
@pytest.mark.parametrize("where", ["students/qwen2", "students/adapters/subtraction", "students/new"])
def test_no_command_writes_the_shipped_files(capsys, main, argv, where):
    out = family.STUDENTS_DIR.parent / where
    err = exits_2_in_one_line(capsys, main, [*argv, str(out)])
    assert "is inside the shipped students" in err
    assert integrity.shipped_changes() == [] and not (family.STUDENTS_DIR / "new").exists()


def test_an_out_that_is_a_file_is_refused_before_training(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    err = exits_2_in_one_line(capsys, student.main, ["train", "--arch", "qwen2", "--out", str(a_file)])
    assert err.endswith(f"--out {a_file} is a file, not a folder\n")
    err = exits_2_in_one_line(capsys, skills.main, ["teach", "--out", "/dev/null/adapter"])
    assert err.endswith("--out /dev/null/adapter cannot be created: /dev/null is not a folder\n")
    assert a_file.read_text() == "keep"


@pytest.mark.parametrize("recipe", ["{not json", "[1]", '{"skill_config": {"no_such_field": 1}}', "{}"])
def test_an_adapter_with_a_bad_recipe_is_one_line(capsys, tmp_path, recipe):
    (tmp_path / "recipe.json").write_text(recipe)
    err = exits_2_in_one_line(capsys, skills.main, ["eval", str(tmp_path)])
    assert f"{tmp_path / 'recipe.json'} is not an adapter recipe with a skill_config" in err


# ---- the reasoning splits --------------------------------------------------------------------

def test_the_split_sizes_are_counted_over_every_problem():
    """Every problem the generators can draw, counted per split: ``sample(SPLIT_SIZES[...])`` can finish
    (drawing a whole split by rejection takes 40 s, so the count is checked instead)."""
    operands = range(10 ** (reasoning.DIGITS - 1), 10**reasoning.DIGITS)
    problems = {"addition": [reasoning.addition(a, b) for a in operands for b in operands],
                "subtraction": [reasoning.subtraction(a, b) for a in operands for b in operands if a >= b]}
    counted = {(task, split): 0 for task in problems for split in ("train", "heldout")}
    for task, all_of_them in problems.items():
        for problem in all_of_them:
            counted[task, reasoning.split_of(problem.prompt)] += 1
    assert counted == reasoning.SPLIT_SIZES


@pytest.mark.parametrize("task, split", sorted(reasoning.SPLIT_SIZES))
def test_sample_refuses_more_than_the_split_holds_at_once(task, split):
    size = reasoning.SPLIT_SIZES[task, split]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"the {split} split holds {size:,} {task} problems, fewer than the"):
        reasoning.sample(size + 1, seed=0, split=split, task=task)
    assert time.perf_counter() - start < 0.1


def test_sample_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        reasoning.sample(1, seed=0, split="test")
