"""`lowmem train` never destroys work: run folders, --overwrite, checkpoints that are checked, kills.

Each kill is deterministic: the run kills itself (SIGKILL) at a named point of a named step
(``train.KILL_AT``), so a test can neither miss its window nor pass without having been killed.
"""

import fcntl
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_course import integrity, precision, train
from lowmem_course.reasoning import make_tokenizer, sample

MODEL = "tiny:r1-distill-qwen-1.5b"


def write_data(path: Path) -> Path:
    rows = [{"prompt": p.prompt, "response": p.completion} for p in sample(64, 1, "train", "subtraction")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "data.jsonl")


def args(data, out, *extra) -> list[str]:
    return ["--model", MODEL, "--recipe", "lora", "--data", str(data), "--out", str(out), "--steps", "12",
            "--batch", "2", "--save-every", "3", "--lr", "1e-2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run of 12 steps, checkpointed every 3."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(args(data, out)) == 0
    return out


@pytest.fixture(scope="module")
def six_steps(data, tmp_path_factory) -> Path:
    """A run folder whose checkpoint is at step 6 (of 12)."""
    out = tmp_path_factory.mktemp("six") / "run"
    assert train.main(args(data, out, "--steps", "6")) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str]) -> str:
    """Run ``lowmem train argv``, check it exits 2 with one line on stderr, return that line."""
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowmem train: ") and "Traceback" not in err, err
    return err.strip()


def same_weights(run: Path, reference: Path) -> bool:
    """True when the two runs' final checkpoints hold bitwise-equal weights and optimizer states."""
    mine, theirs = run / "checkpoint", reference / "checkpoint"
    a, b = load_file(mine / "trainable.safetensors"), load_file(theirs / "trainable.safetensors")
    opt_a, opt_b = (torch.load(p / "optimizer.pt", weights_only=True)["state"] for p in (mine, theirs))
    return (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            and all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_b for k in opt_b[i]))


# ---- --out, --overwrite and the run folder ------------------------------------------------------

def test_overwrite_never_removes_a_folder_lowmem_train_did_not_create(data, tmp_path, capsys):
    folder = tmp_path / "p"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "t.tex").write_text("x")
    before = snapshot(folder)
    for extra in (["--data", str(folder / "missing.jsonl")], ["--model", "nosuch"], []):
        line = refused(capsys, args(data, folder, "--steps", "1", "--overwrite", *extra))
        assert f"{folder} holds files that lowmem train did not write" in line
        assert "--overwrite only replaces a run folder" in line
    assert train.main(args(data, folder, "--steps", "1")) == 2  # nor without --overwrite
    assert snapshot(folder) == before


@pytest.mark.parametrize("bad, message", [
    (["--data", "missing.jsonl"], "missing.jsonl: no such data file"),
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--recipe", "lora+turbo"], "unknown token 'turbo' in recipe 'lora+turbo'"),
    (["--max-tokens", "1"], "example 1: its prompt (9 tokens) fills --max-tokens 1"),
])
def test_overwrite_checks_every_input_before_it_removes_anything(data, six_steps, tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    before = snapshot(out)
    line = refused(capsys, args(data, out, "--overwrite", *bad))
    assert message in line
    assert snapshot(out) == before


def test_overwrite_replaces_a_run_folder_with_a_fresh_run(data, six_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    (out / "notes.txt").write_text("mine, inside the run folder")
    assert train.main(args(data, out, "--overwrite", "--steps", "2")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint", "log.jsonl", "report.json"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "report.json").read_text())["written_by"] == "lowmem train"


@pytest.mark.parametrize("bad, message", [
    (["--data", "missing.jsonl"], "no such data file"),
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--model", "~nosuchuser/model"], "--model ~nosuchuser/model:"),
    (["--resume"], "has no checkpoint to resume from"),
])
def test_a_rejected_run_leaves_no_out_behind(data, tmp_path, capsys, bad, message):
    out = tmp_path / "new" / "run"
    assert message in refused(capsys, args(data, out, *bad))
    assert not (tmp_path / "new").exists()


def test_a_model_that_fails_to_load_leaves_no_out_behind(data, tmp_path, capsys):
    from lowmem_course import family

    model = tmp_path / "model"  # a tokenizer and a config, but no weights
    make_tokenizer().save_pretrained(model)
    family.tiny("r1-distill-qwen-1.5b").save_pretrained(model)
    out = tmp_path / "new" / "run"
    assert f"{model} has no model.safetensors" in refused(capsys, args(data, out, "--model", str(model)))
    assert not (tmp_path / "new").exists()


def test_out_must_be_a_folder(data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert f"--out {a_file} is a file, not a folder" in refused(capsys, args(data, a_file))
    assert "--out /dev/null/run cannot be created: /dev/null is not a folder" in refused(
        capsys, args(data, "/dev/null/run"))
    assert a_file.read_text() == "keep me"


def test_training_never_writes_into_the_shipped_students(data, capsys):
    from lowmem_course import family

    line = refused(capsys, args(data, family.STUDENTS_DIR / "qwen2-retrained"))
    assert "is inside the shipped students" in line
    assert not (family.STUDENTS_DIR / "qwen2-retrained").exists()


def test_a_second_run_into_a_locked_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # what a running `lowmem train` holds
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = refused(capsys, args(data, out, "--steps", "1"))
        assert line == (f"lowmem train: another lowmem train run is using {out}: "
                        "wait for it to end or choose another --out")
        assert list(out.iterdir()) == []
    finally:
        os.close(held)
    assert train.main(args(data, out, "--steps", "1")) == 0  # the lock went with its holder


# ---- checkpoints: artifacts block a fresh run, a bad one is never resumed -----------------------

@pytest.mark.parametrize("layout", [("checkpoint",), ("checkpoint.old",), ("checkpoint.tmp",),
                                    ("checkpoint.tmp", "checkpoint.old")])
def test_any_checkpoint_blocks_a_fresh_run(data, six_steps, tmp_path, capsys, layout):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    (out / "checkpoint").rename(out / layout[0])
    for name in layout[1:]:
        shutil.copytree(out / layout[0], out / name)
    before = snapshot(out)
    line = refused(capsys, args(data, out))
    assert line.endswith("already holds a run's checkpoint: pass --resume to continue it or --overwrite to start over")
    assert snapshot(out) == before


def garble(path: Path) -> None:
    """Overwrite 64 KiB in the middle of ``path`` with random bytes (a safetensors header stays intact)."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle: middle + 65536] = random.Random(0).randbytes(65536)
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_state(ckpt: Path, **fields) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, **fields}))


class Payload:
    """A pickle that would create a file when loaded, if torch.load let it run."""

    def __reduce__(self):
        return Path.touch, (Path(os.environ["PAYLOAD_MARKER"]),)


def refused_pickle(ckpt: Path) -> None:
    """optimizer.pt replaced by a pickle with code in it, and state.json's hash updated to match."""
    with open(ckpt / "optimizer.pt", "wb") as file:
        pickle.dump(Payload(), file)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["optimizer.pt"] = integrity.sha256(ckpt / "optimizer.pt")
    (ckpt / "state.json").write_text(json.dumps(state))


CORRUPTIONS = {
    "garbled weights": (lambda c: garble(c / "trainable.safetensors"),
                        "trainable.safetensors does not match the sha256 in state.json"),
    "truncated weights": (lambda c: truncate(c / "trainable.safetensors"),
                          "trainable.safetensors does not match the sha256 in state.json"),
    "truncated optimizer": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt does not match the sha256"),
    "step as a string": (lambda c: edit_state(c, step="12"), "state.json: 'step' must be a positive integer, got '12'"),
    "no hashes": (lambda c: edit_state(c, files=None),
                  "state.json: no sha256 of trainable.safetensors and optimizer.pt"),
    "state.json not JSON": (lambda c: (c / "state.json").write_text('{"step": 6,'), "state.json: not valid JSON"),
    "state.json missing": (lambda c: (c / "state.json").unlink(), "state.json is missing"),
    "refused pickle": (refused_pickle, "optimizer.pt cannot be loaded: UnpicklingError"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_bad_checkpoint_is_refused_naming_the_file_and_nothing_changes(
        data, six_steps, tmp_path, capsys, monkeypatch, corruption):
    corrupt, message = CORRUPTIONS[corruption]
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    monkeypatch.setenv("PAYLOAD_MARKER", str(tmp_path / "payload-ran"))
    corrupt(out / "checkpoint")
    before = snapshot(out)
    line = refused(capsys, args(data, out, "--resume"))
    assert f"{out / 'checkpoint'}/" in line and message in line, line
    assert snapshot(out) == before
    assert not (tmp_path / "payload-ran").exists()


def test_a_bad_checkpoint_in_the_rename_window_is_refused_too(data, six_steps, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    (out / "checkpoint").rename(out / "checkpoint.tmp")
    shutil.copytree(out / "checkpoint.tmp", out / "checkpoint.old")
    garble(out / "checkpoint.tmp" / "trainable.safetensors")
    before = snapshot(out)
    assert "checkpoint.tmp/trainable.safetensors does not match" in refused(capsys, args(data, out, "--resume"))
    assert snapshot(out) == before


def test_a_checkpoint_beyond_steps_is_refused(data, six_steps, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    before = snapshot(out)
    assert "is at step 6, beyond --steps 4" in refused(capsys, args(data, out, "--resume", "--steps", "4"))
    assert snapshot(out) == before


# ---- non-finite losses and weights --------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(capsys, args(data, out, "--lr", "1e30", "--save-every", "1"))  # step 1 blows the weights up
    assert line == (f"lowmem train: step 2: the loss is nan; stopped, {out / 'checkpoint'} (step 1) is kept. "
                    "Try a lower --lr, or check the data")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint" / "trainable.safetensors").values())
    log = (out / "log.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == [1] and "NaN" not in log
    assert not (out / "adapter").exists()


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = precision.make_scaler("cpu", torch.float32)
    train.save_checkpoint(tmp_path, 3, model, optimizer, scaler, {})
    before = snapshot(tmp_path)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(train.TrainError, match="step 6: the weights are no longer finite"):
        train.save_checkpoint(tmp_path, 6, model, optimizer, scaler, {})
    assert snapshot(tmp_path) == before


# ---- kills: in every window of the save, and at random points -----------------------------------

def kill(data, out, point: str, step: int) -> None:
    """Run the 12-step training in a subprocess that kills itself (SIGKILL) at ``point`` of ``step``."""
    done = subprocess.run([sys.executable, "-m", "lowmem_course.train", *args(data, out)], capture_output=True,
                          env={**os.environ, train.KILL_AT: f"{point}:{step}"}, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]


def resume_and_compare(data, out, reference, resumed_from: int | None) -> None:
    """Resume (or, with no checkpoint to resume, start over) and check the run equals the reference."""
    if resumed_from is None:
        assert train.main(args(data, out, "--resume")) == 2
        assert train.main(args(data, out, "--overwrite")) == 0
    else:
        assert train._latest_checkpoint(out)[1]["step"] == resumed_from
        assert train.main(args(data, out, "--resume")) == 0
    assert train.checkpoints_in(out) == ["checkpoint"]  # leftovers of the interrupted save are gone
    log = (out / "log.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == list(range(1, 13))
    assert log == (reference / "log.jsonl").read_text()  # each step once, with the same loss
    assert same_weights(out, reference)  # bitwise


# point, step -> the checkpoint folders the kill leaves and the step --resume continues from
WINDOWS = {
    ("tmp-half", 6): (["checkpoint", "checkpoint.tmp"], 3),  # killed while writing checkpoint.tmp
    ("tmp-written", 6): (["checkpoint", "checkpoint.tmp"], 3),  # .tmp complete, not yet renamed
    ("renamed-old", 6): (["checkpoint.tmp", "checkpoint.old"], 6),  # between the two renames
    ("renamed-new", 6): (["checkpoint", "checkpoint.old"], 6),  # before the old one is removed
    ("tmp-written", 3): (["checkpoint.tmp"], 3),  # the first save, complete, not yet renamed
    ("tmp-half", 3): (["checkpoint.tmp"], None),  # the first save, half written: nothing to resume
}


@pytest.mark.slow
@pytest.mark.parametrize("point, step", WINDOWS, ids=[f"{p}:{s}" for p, s in WINDOWS])
def test_a_kill_during_a_save_resumes_bitwise_equal(data, reference, tmp_path, point, step):
    out = tmp_path / "run"
    kill(data, out, point, step)
    left, resumed_from = WINDOWS[point, step]
    assert train.checkpoints_in(out) == left
    resume_and_compare(data, out, reference, resumed_from)


def expected_resume(point: str, step: int) -> int | None:
    """The step ``--resume`` continues from after a kill at ``point`` of ``step`` (saves every 3 steps)."""
    if point == "step":
        return step // 3 * 3 or None
    if point == "tmp-half":
        return step - 3 or None
    if point == "tmp-written":
        return step - 3 or step
    return step  # after the .tmp became complete and was renamed


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(3))
def test_a_kill_at_a_random_point_resumes_bitwise_equal(data, reference, tmp_path, draw):
    rng = random.Random()
    point = rng.choice(train.KILL_POINTS)
    step = rng.randint(1, 12) if point == "step" else rng.choice([3, 6, 9, 12])
    out = tmp_path / "run"
    kill(data, out, point, step)
    try:
        resume_and_compare(data, out, reference, expected_resume(point, step))
    except AssertionError as error:
        raise AssertionError(f"killed at {point}:{step}") from error


@pytest.mark.slow
def test_an_fp16_resume_after_an_overflow_is_bitwise_equal(data, tmp_path, monkeypatch):
    # a loss scale of 2**20 overflows fp16 at steps 1 and 2 (skipped, scale halved twice), then trains
    monkeypatch.setattr(precision, "make_scaler", partial(precision.make_scaler, init_scale=2.0**20))
    fp16 = partial(args, data)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train.main(fp16(reference, "--recipe", "lora+fp16-mixed", "--steps", "6")) == 0
    assert train.main(fp16(resumed, "--recipe", "lora+fp16-mixed", "--steps", "3")) == 0
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["scaler"]["scale"] == 2.0**18
    assert train.main(fp16(resumed, "--recipe", "lora+fp16-mixed", "--steps", "6", "--resume")) == 0
    # restarting the scaler at 2**20 would skip steps 4 and 5 as well
    assert same_weights(resumed, reference)
    assert (resumed / "log.jsonl").read_text() == (reference / "log.jsonl").read_text()
    states = [json.loads((run / "checkpoint" / "state.json").read_text()) for run in (resumed, reference)]
    assert states[0]["scaler"] == states[1]["scaler"] == {
        "scale": 2.0**18, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 4}


# ---- the data and the adapter -------------------------------------------------------------------

def test_a_data_file_that_is_not_utf8_is_named(data, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9", "response": "1"}\n'.encode("latin-1"))
    assert refused(capsys, args(bad, tmp_path / "run")) == (
        f"lowmem train: {bad}: not UTF-8 text (invalid continuation byte at byte 15)")


def test_a_megabyte_line_costs_what_a_short_one_does():
    tok = make_tokenizer()
    long = train.Example("512-128=", "4" * 5_000_000)
    short = train.Example("512-128=", "4" * 2_000)
    assert train.encode([long], tok, 512) == train.encode([short], tok, 512)
    ids, labels = train.encode([long], tok, 512)[0]
    assert len(ids) == len(labels) == 512


def test_the_adapter_records_the_model_given_not_a_path(reference):
    config = json.loads((reference / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == MODEL
    assert "tmp" not in (reference / "adapter" / "adapter_config.json").read_text()


def test_a_hub_model_without_network_is_one_line(data, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "lowmem_course.train",
                           *args(data, out, "--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lowmem train: ") and "Traceback" not in done.stderr
    assert "huggingface.co" in done.stderr or "offline" in done.stderr.lower()
    assert not out.exists()


def test_usage_errors_are_one_line(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(data, tmp_path / "run", "--steps", "0"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "lowmem train: error: argument --steps: expected a positive integer, got 0\n"
