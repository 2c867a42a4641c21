"""One training command for every recipe: full, LoRA or QLoRA, with checkpointing and mixed precision.

    python -m lowmem_course.train --model student-qwen2 --recipe qlora+bf16-mixed+checkpointing \\
        --data data.jsonl --out runs/qlora --steps 200

``--model`` is a family Hub id (``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B``), a local
``save_pretrained`` directory, a shipped student (``student-qwen2``) or ``tiny:<member>`` (a tiny
twin that speaks the student's alphabet, for trying recipes offline). ``--data`` is a JSON-lines
file of ``{"prompt": ..., "response": ...}`` objects; the loss is taken on the responses only.

The run writes only under ``--out``, its run folder, and never destroys work:

- every input (recipe, ``--out``, data, model) is checked before anything is written; a rejected
  run leaves nothing behind. The folder is created with ``report.json`` (the run's record, completed
  at the end), which is what makes it a run folder: ``--overwrite`` empties only a run folder, and no
  run writes into a folder that holds other files.
- one run at a time per folder (an ``flock`` on it).
- every ``--save-every`` steps it saves its trainable weights, optimizer state, loss scaler and step
  to ``OUT/checkpoint``, atomically (written to ``checkpoint.tmp``, then renamed over the previous
  one, which is ``checkpoint.old`` between the two renames), with the sha256 of each file.
- ``--resume`` verifies those hashes before it loads anything, recovers a save the kill interrupted
  between its renames, cuts ``log.jsonl`` back to the checkpoint's step, and continues with no step
  lost or repeated: step ``i`` always trains on the same examples, so an interrupted and resumed run
  ends with the same weights, bit for bit, as an uninterrupted one. A checkpoint that fails its
  check is refused (one line naming the file) and left as it is.
- a checkpoint (or a ``.tmp``/``.old`` one) blocks a new run unless ``--resume`` or ``--overwrite``.
- a loss that is not finite stops the run; weights that are not finite are never saved.

At the end it saves the LoRA adapters (or the full model) with ``save_pretrained`` and prints the
memory of its last step. Bad input gets one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import reprlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowmem_course import checkpointing, family, integrity, measure, optimizers, precision, steps
from lowmem_course.cmdline import Parser, check_out_folder, one_line, positive_int
from lowmem_course.recipe import Recipe

RECORD = "report.json"  # written when the run folder is created, completed at the end: marks a run folder
WRITTEN_BY = "lowmem train"  # the record's "written_by"
LOG = "log.jsonl"
CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt")  # hashed in state.json
# Tests only: LOWMEM_TRAIN_KILL_AT="POINT:STEP" makes the run kill -9 itself at that point of that step.
KILL_AT = "LOWMEM_TRAIN_KILL_AT"
KILL_POINTS = ("step", "tmp-half", "tmp-written", "renamed-old", "renamed-new")


class TrainError(Exception):
    """A problem with the run's inputs, reported to the learner as one line."""


@dataclass(frozen=True)
class Example:
    """One prompt/response pair from the data file."""

    prompt: str
    response: str


def read_examples(path: Path) -> list[Example]:
    """The examples of a JSON-lines file; ``TrainError`` names the file and the first bad line's number."""
    if not path.is_file():
        raise TrainError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TrainError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise TrainError(f"{path}:{number}: not valid JSON ({getattr(error, 'msg', error)})") from None
        except RecursionError:
            raise TrainError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "response")):
            raise TrainError(f'{path}:{number}: expected an object with string "prompt" and "response"')
        examples.append(Example(row["prompt"], row["response"]))
    if not examples:
        raise TrainError(f"{path}: no examples")
    return examples


def encode(examples: list[Example], tokenizer, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example: labels are -100 on the prompt, the response is learned.

    Each text is cut to ``2 * max_tokens`` times the longest token (in characters) before it is
    tokenized: no token covers more characters, so the first ``max_tokens`` tokens are those of the
    whole text (unless one word is longer than the margin), and a megabyte-long line costs no more
    than a short one. ``TrainError`` names an example with characters the tokenizer cannot encode,
    or with no response token left to learn within ``max_tokens``.
    """
    limit = 2 * max_tokens * max(map(len, tokenizer.get_vocab()))  # characters
    rows = []
    for number, example in enumerate(examples, start=1):
        prompt = tokenizer(example.prompt[:limit])["input_ids"]
        response = tokenizer(example.response[:limit], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_tokens]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise TrainError(f"example {number}: characters this model's tokenizer cannot encode")
        if len(prompt) >= max_tokens:
            raise TrainError(f"example {number}: its prompt ({len(prompt)} tokens) fills --max-tokens {max_tokens}, "
                             "leaving no response token to learn")
        rows.append((ids, ([steps.IGNORE_INDEX] * len(prompt) + response)[:max_tokens]))
    return rows


def batch_for_step(rows: list[tuple[list[int], list[int]]], step: int, batch: int, seed: int,
                   tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of step ``step`` (``input_ids``, ``labels``, ``attention_mask``, right-padded by
    ``steps.pad_right``): the same examples every time, whatever happened before."""
    return steps.pad_right(random.Random(seed * 1_000_003 + step).choices(rows, k=batch), tokenizer)


def _model_path(name: str) -> Path:
    """The folder (or Hub id, as a path) of ``--model``: a shipped student's folder or ``name`` itself."""
    try:
        return family.student_path(name) or Path(name).expanduser()
    except RuntimeError as error:  # "~nosuchuser/model"
        raise TrainError(f"--model {name}: {error}") from None


def load_tokenizer(name: str):
    """The tokenizer of ``--model`` (with a pad token): loads in a moment and checks the name before
    the model is loaded. ``tiny:<member>`` twins speak the students' alphabet."""
    if name.startswith("tiny:"):
        from lowmem_course.reasoning import make_tokenizer

        family.resolve(name.removeprefix("tiny:"))
        tokenizer = make_tokenizer()
    else:
        tokenizer = family.load_tokenizer(_model_path(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, recipe: Recipe, lora_rank: int, seed: int = 0) -> torch.nn.Module:
    """The model of a run, with the recipe's techniques applied.

    A ``tiny:<member>`` base is built in a temporary folder, deleted once loaded: the run writes
    nothing outside its ``--out``.
    """
    if name.startswith("tiny:"):
        from lowmem_course.reasoning import MODEL_VOCAB_SIZE

        cfg = family.tiny(name.removeprefix("tiny:"), vocab_size=MODEL_VOCAB_SIZE)
        with tempfile.TemporaryDirectory(prefix="lowmem-tiny-") as base:
            family.build(cfg).save_pretrained(base)
            return _with_recipe(Path(base), recipe, lora_rank, seed)
    return _with_recipe(_model_path(name), recipe, lora_rank, seed)


def _with_recipe(path: Path, recipe: Recipe, lora_rank: int, seed: int) -> torch.nn.Module:
    from lowmem_course import quantize

    # The base is loaded in the recipe's format (``recipe.base_weights``, as the estimator assumes),
    # never the checkpoint's (Hub checkpoints are bf16): fp32 master weights for full fine-tuning
    # (bf16 when pure bf16), a 16-bit frozen LoRA base under autocast, QLoRA's quantized base
    # computing in 16 bits.
    fmt = recipe.base_weights
    if recipe.mode == "qlora":
        half = torch.float16 if recipe.autocast == "fp16" else torch.bfloat16
        model = quantize.load_quantized(path, fmt, device=family.get_device(), dtype=half)
    else:
        model = family.load(path, dtype=precision.DTYPES[fmt]).to(family.get_device())
    if recipe.mode == "full":
        if recipe.checkpointing:
            model.activation_checkpointing_enable()
    else:
        model = quantize.add_lora(model, rank=lora_rank, alpha=2 * lora_rank, checkpointing=recipe.checkpointing,
                                  seed=seed)
    if recipe.tiled_mlp:
        checkpointing.tile_mlp(model)
    return model


def trainable(recipe: Recipe, batch: int) -> Recipe:
    """``recipe`` if this command can run it here on ``batch`` sequences a step, else ``TrainError``
    saying why (one line)."""
    if recipe.mode == "inference":
        raise TrainError(f"{recipe} is an inference recipe: lowmem train trains (lowmem estimate predicts serving)")
    if recipe.gpus_needed > 1:
        raise TrainError(f"{recipe} shards over {recipe.gpus_needed}+ GPUs: lowmem train runs one process "
                         "(estimate it with lowmem estimate --recipe ... --gpus N)")
    if batch % recipe.accumulate:
        raise TrainError(f"--batch {batch} does not split into {recipe.accumulate} equal micro-batches "
                         f"(accum{recipe.accumulate}): choose a multiple of {recipe.accumulate}")
    if recipe.optimizer == "paged-adamw8bit" and family.get_device().type != "cuda":
        raise TrainError(f"{recipe}: paged optimizers page CUDA memory to the host and need a CUDA GPU; "
                         "adamw8bit holds the same bytes without paging")
    return recipe


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (all of them for full fine-tuning, the adapters for LoRA)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def run_fingerprint(args: argparse.Namespace) -> dict:
    """What a checkpoint must match to be resumed: the model, recipe, data and seed."""
    return {"model": args.model, "recipe": str(Recipe.parse(args.recipe)), "lora_rank": args.lora_rank,
            "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(), "seed": args.seed,
            "batch": args.batch}


# ----------------------------------------------------------------------------------------------
# The run folder: recognised by its record, locked while a run uses it.

def is_run_folder(out: Path) -> bool:
    """True when ``out`` holds the record (``report.json``) that ``lowmem train`` writes on creating it."""
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("written_by") == WRITTEN_BY


def checkpoints_in(out: Path) -> list[str]:
    """The checkpoint folders in ``out``: ``checkpoint`` and the ``.tmp``/``.old`` a save leaves when killed."""
    return [name for name in (CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD) if (out / name).exists()]


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an ``--out`` this run must not use; changes nothing.

    ``out`` must be (or be creatable as) a folder outside the package; a non-empty one must be a run
    folder; its checkpoints need ``--resume`` or ``--overwrite``; ``--resume`` needs one.
    """
    try:
        check_out_folder(out)
    except ValueError as error:
        raise TrainError(str(error)) from None
    if out.is_dir() and any(out.iterdir()) and not is_run_folder(out):
        raise TrainError(f"{out} holds files that lowmem train did not write (no {RECORD} of a run): "
                         f"{'--overwrite only replaces a run folder; ' if overwrite else ''}"
                         "choose a new or empty --out")
    found = checkpoints_in(out)
    if resume and not found:
        raise TrainError(f"{out} has no checkpoint to resume from")
    if found and not (resume or overwrite):
        raise TrainError(f"{out} already holds a run's checkpoint: "
                         "pass --resume to continue it or --overwrite to start over")


@contextlib.contextmanager
def claimed(out: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``out`` for this run: create it, lock it against a second run (``flock`` on the folder,
    released when the block ends) and check it again. Folders it created are removed again, if
    still empty, when the block fails before the run wrote its record."""
    created = []
    for folder in (out.absolute(), *out.absolute().parents):
        if folder.exists():
            break
        created.append(folder)
    out.mkdir(parents=True, exist_ok=True)
    lock = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainError(f"another lowmem train run is using {out}: "
                             "wait for it to end or choose another --out") from None
        check_out(out, resume, overwrite)  # again: it may have changed since the first check
        yield
    except BaseException:
        for folder in created if not (out / RECORD).exists() else []:
            with contextlib.suppress(OSError):  # not empty: leave it
                folder.rmdir()
        raise
    finally:
        os.close(lock)


def empty(out: Path) -> None:
    """Remove everything in the run folder ``out`` (``--overwrite``; ``check_out`` made sure it is one)."""
    for entry in out.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextlib.contextmanager
def library_progress_bars(shown: bool) -> Iterator[None]:
    """transformers' and the Hub's progress bars (loading, saving, downloading) hidden inside the block
    unless ``shown``; as they were afterwards."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not shown:
            hf_logging.enable_progress_bar()


def write_json(path: Path, value: object) -> None:
    """Write ``value`` as strict JSON (no NaN) to ``path`` atomically: a kill leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Checkpoints: saved atomically with the hash of each file, verified before they are resumed.

def _kill_point(point: str, step: int) -> None:
    """For the kill tests: kill -9 this process at ``point`` of ``step`` when ``LOWMEM_TRAIN_KILL_AT`` says so."""
    if os.environ.get(KILL_AT) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(out: Path, step: int, model, optimizer, scaler, fingerprint: dict) -> None:
    """Write ``out/checkpoint`` atomically: into ``checkpoint.tmp``, then renamed over the old one.

    ``state.json`` records the step, the sha256 of each file, the loss scaler's state and the run's
    fingerprint. Weights that are not finite are never saved (``TrainError``; the old checkpoint stays).
    """
    tmp, final, old = out / CHECKPOINT_TMP, out / CHECKPOINT, out / CHECKPOINT_OLD
    weights = trainable_state(model)
    if not all(torch.isfinite(t).all() for t in weights.values()):
        raise TrainError(f"step {step}: the weights are no longer finite; stopped without saving them")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, tmp / "trainable.safetensors")
    _kill_point("tmp-half", step)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    files = {name: integrity.sha256(tmp / name) for name in CHECKPOINT_FILES}
    write_json(tmp / "state.json", {"step": step, "files": files, "scaler": scaler.state_dict(), **fingerprint})
    _kill_point("tmp-written", step)
    shutil.rmtree(old, ignore_errors=True)  # an earlier save's leftover: `final` is complete
    if final.exists():
        final.rename(old)
    _kill_point("renamed-old", step)
    tmp.rename(final)
    _kill_point("renamed-new", step)
    shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(folder: Path) -> dict:
    """The ``state.json`` of a checkpoint folder whose files all match their recorded sha256.

    ``TrainError`` names the first file that is missing, malformed or changed.
    """
    path = folder / "state.json"
    if not path.is_file():
        raise TrainError(f"{path} is missing: the checkpoint cannot be resumed (--overwrite starts over)")
    try:
        state = json.loads(path.read_text())
    except (ValueError, RecursionError) as error:
        raise TrainError(f"{path}: not valid JSON ({getattr(error, 'msg', error)})") from None
    if not isinstance(state, dict):
        raise TrainError(f"{path}: expected a JSON object")
    step, files = state.get("step"), state.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise TrainError(f"{path}: 'step' must be a positive integer, got {reprlib.repr(step)}")
    if (not isinstance(files, dict) or sorted(files) != sorted(CHECKPOINT_FILES)
            or not all(isinstance(h, str) for h in files.values())):
        raise TrainError(f"{path}: no sha256 of {' and '.join(CHECKPOINT_FILES)} (written by an older lowmem train?)")
    if not isinstance(state.get("scaler"), dict):
        raise TrainError(f"{path}: 'scaler' must be the loss scaler's state (an object)")
    bad = integrity.changed(folder, files)
    if bad:
        raise TrainError(f"{folder / bad[0]} does not match the sha256 in state.json (corrupted or truncated); "
                         "nothing was changed")
    return state


def _latest_checkpoint(out: Path) -> tuple[Path, dict]:
    """The checkpoint to resume and its verified state: ``checkpoint`` (a ``.tmp`` beside it is an
    unfinished save), or, when a kill fell between a save's two renames, the newer of ``.tmp`` and
    ``.old``. Every folder it considers must verify: a bad one is an error, never skipped."""
    if (out / CHECKPOINT).exists():
        return out / CHECKPOINT, verify_checkpoint(out / CHECKPOINT)
    found = [(out / name, verify_checkpoint(out / name)) for name in (CHECKPOINT_TMP, CHECKPOINT_OLD)
             if (out / name).exists()]
    if not found:
        raise TrainError(f"{out} has no checkpoint to resume from")
    return max(found, key=lambda f: f[1]["step"])


def checkpoint_to_resume(out: Path, fingerprint: dict, steps: int) -> tuple[Path, dict]:
    """The verified checkpoint folder of ``out`` that ``--resume`` continues, and its state.

    ``TrainError`` when it fails its hashes, belongs to another run (``fingerprint``) or is past ``steps``.
    """
    folder, state = _latest_checkpoint(out)
    different = {k: (state.get(k), v) for k, v in fingerprint.items() if state.get(k) != v}
    if different:
        raise TrainError(f"the checkpoint in {out} is from another run: "
                         + ", ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in different.items()))
    if state["step"] > steps:
        raise TrainError(f"the checkpoint in {out} is at step {state['step']}, beyond --steps {steps}")
    return folder, state


def restore_checkpoint(out: Path, folder: Path, state: dict, model, optimizer, scaler) -> int:
    """Load the checkpoint ``folder`` (verified by ``checkpoint_to_resume``); returns the next step to run.

    Nothing on disk changes until it has loaded: then an interrupted save is completed (``folder``
    becomes ``checkpoint``, leftovers go) and ``log.jsonl`` is cut back to the checkpoint's step.
    """
    path = folder / "trainable.safetensors"
    try:
        tensors = load_file(path)
    except Exception as error:
        raise TrainError(f"{path} cannot be read: {error}") from None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if {n: t.shape for n, t in tensors.items()} != {n: p.shape for n, p in trainable.items()}:
        raise TrainError(f"{path} holds other tensors than this model trains")
    path = folder / "optimizer.pt"
    try:
        optimizer_state = torch.load(path, weights_only=True)
        for name, tensor in tensors.items():
            trainable[name].data.copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    except Exception as error:
        raise TrainError(f"{path} cannot be loaded: {type(error).__name__}: {error}") from None
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if folder.name != CHECKPOINT:  # the kill fell between the save's renames: finish that save
        folder.rename(out / CHECKPOINT)
    for leftover in (CHECKPOINT_TMP, CHECKPOINT_OLD):
        shutil.rmtree(out / leftover, ignore_errors=True)
    truncate_log(out / LOG, state["step"])
    return state["step"]


def truncate_log(log: Path, step: int) -> None:
    """Keep the lines of steps 1 to ``step`` of ``log``, each once (a kill can leave later steps, or half a line)."""
    kept = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step") == len(kept) + 1 <= step:
            kept.append(line + "\n")
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, log)


# ----------------------------------------------------------------------------------------------
# The run.

def train(args: argparse.Namespace) -> dict:
    """Run the training described by the parsed command line; returns the final report.

    Every input is checked before the first write: the recipe, ``--out``, the data, the model's
    name and tokenizer (with the examples encoded), a checkpoint to resume, then the model itself.
    Problems raise ``TrainError``, ``ValueError`` or ``OSError`` with a one-line message.
    """
    recipe = trainable(Recipe.parse(args.recipe), args.batch)
    out = Path(args.out)
    check_out(out, args.resume, args.overwrite)
    examples = read_examples(Path(args.data))
    fingerprint = run_fingerprint(args)
    with library_progress_bars(not args.no_progress):
        tokenizer = load_tokenizer(args.model)
        rows = encode(examples, tokenizer, args.max_tokens)
        with claimed(out, args.resume, args.overwrite):
            resumed = checkpoint_to_resume(out, fingerprint, args.steps) if args.resume else None
            torch.manual_seed(args.seed)
            model = load_model(args.model, recipe, args.lora_rank, args.seed)
            optimizer = optimizers.make_optimizer(model, recipe.optimizer, args.lr,
                                                  step_in_backward=recipe.step_in_backward,
                                                  offload=recipe.offload_optimizer)
            scaler = precision.make_scaler(model.device, precision.compute_dtype(recipe.precision))
            if resumed:
                start = restore_checkpoint(out, *resumed, model, optimizer, scaler)
            else:
                start = 0
                if args.overwrite:
                    empty(out)
                write_json(out / RECORD, {"written_by": WRITTEN_BY, "status": "running", **fingerprint})
                (out / LOG).write_text("")
            report, last_step = _steps(args, recipe, out, model, tokenizer, rows, optimizer, scaler, fingerprint, start)
    if last_step:
        print(last_step)
    return report


def _steps(args: argparse.Namespace, recipe: Recipe, out: Path, model, tokenizer, rows, optimizer, scaler,
           fingerprint: dict, start: int) -> tuple[dict, measure.Measurement | None]:
    """Steps ``start`` to ``args.steps``, each logged, checkpointed every ``--save-every``, then the final
    save and report; returns the report and the last step's measurement."""
    last_step: measure.Measurement | None = None
    saved = start

    @contextlib.contextmanager
    def measured(step: int) -> Iterator[None]:
        """The last step is measured, in steady state."""
        nonlocal last_step
        if step != args.steps - 1:
            yield
            return
        with measure.track(model, optimizer, label=f"{args.model} {recipe}") as last_step:
            yield

    def after(step: int, loss: float) -> None:
        """Stop on a loss that is not finite, log the step, checkpoint every ``--save-every``."""
        nonlocal saved
        if not math.isfinite(loss):  # the weights may be broken now: nothing more is saved
            kept = f"{out / CHECKPOINT} (step {saved}) is kept" if saved else "no checkpoint was saved"
            raise TrainError(f"step {step + 1}: the loss is {loss}; stopped, {kept}. "
                             "Try a lower --lr, or check the data")
        log.write(json.dumps({"step": step + 1, "loss": round(loss, 6)}, allow_nan=False) + "\n")
        log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(out, step + 1, model, optimizer, scaler, fingerprint)
            saved = step + 1
        _kill_point("step", step + 1)

    with (out / LOG).open("a") as log:
        steps.train_loop(model, optimizer, lambda step: batch_for_step(rows, step, args.batch, args.seed, tokenizer),
                         args.steps, start=start, on_step=after, around_step=measured,
                         autocast_dtype=precision.compute_dtype(recipe.precision),
                         scaler=scaler if scaler.is_enabled() else None, accumulate=recipe.accumulate,
                         chunked_loss=recipe.chunked_loss, offload_activations=recipe.offload_activations,
                         progress=not args.no_progress, desc=f"train {recipe}")
    final = out / ("adapter" if recipe.mode != "full" else "model")
    if recipe.mode == "full":
        model.save_pretrained(final)
    else:  # no embedding was resized: PEFT need not look for the base's config to check
        from lowmem_course import quantize

        model.save_pretrained(final, save_embedding_layers=False)
        quantize.name_base(final, args.model)  # the --model given, not a temporary or local path
    tokenizer.save_pretrained(final)
    report = {"written_by": WRITTEN_BY, "status": "done", "out": str(final), "steps": args.steps,
              "recipe": str(recipe), "memory": last_step.to_dict() if last_step else None}
    write_json(out / RECORD, report)
    return report, last_step


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lowmem_course.train`` (and ``lowmem train``)."""
    p = Parser(prog="lowmem train", description="Train with a memory recipe.")
    p.add_argument("--model", required=True, help="Hub id, local directory, student-qwen2 or tiny:<member>")
    p.add_argument("--recipe", required=True, help="the run's memory choices as lowmem plan prints them, e.g. "
                   "full+bf16-mixed, lora+fp16-mixed, qlora+bf16-mixed+checkpointing+adamw8bit")
    p.add_argument("--data", required=True, help="JSON lines of {\"prompt\": ..., \"response\": ...}")
    p.add_argument("--out", required=True, help="the run folder (checkpoint, log, adapters); created if needed")
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--batch", type=positive_int, default=8,
                   help="sequences per optimizer step (an accumN recipe runs them as N micro-batches)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="truncate examples to this many tokens")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-rank", type=positive_int, default=16)
    p.add_argument("--save-every", type=positive_int, default=50, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs, scripts and notebooks)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    group.add_argument("--overwrite", action="store_true", help="empty the run folder --out and start over")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 with a one-line message on bad input."""
    args = parser().parse_args(argv)
    try:
        train(args)
    except (TrainError, ValueError, OSError) as error:
        print(f"lowmem train: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
