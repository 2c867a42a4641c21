"""One training command for every recipe: full, LoRA or QLoRA, with checkpointing and mixed precision.

    python -m lowmem_course.train --model student-qwen2 --recipe qlora+checkpointing+bf16 \\
        --data data.jsonl --out runs/qlora --steps 200

``--model`` is a family Hub id (``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B``), a local
``save_pretrained`` directory, a shipped student (``student-qwen2``) or ``tiny:<member>`` (a tiny
twin that speaks the student's alphabet, for trying recipes offline). ``--data`` is a JSON-lines
file of ``{"prompt": ..., "response": ...}`` objects; the loss is taken on the responses only.

The run saves its trainable weights, optimizer state and step to ``OUT/checkpoint`` every
``--save-every`` steps (atomically: a run killed mid-save keeps the previous checkpoint), and
``--resume`` continues from there with no step lost or repeated: step ``i`` always trains on the same
examples, so an interrupted and resumed run ends with the same weights as an uninterrupted one.
At the end it saves the LoRA adapters (or the full model) with ``save_pretrained`` and prints the
memory of its last step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lowmem_course import family, lab, measure, precision
from lowmem_course.recipe import Recipe


class TrainError(Exception):
    """A problem with the run's inputs, reported to the learner as one line."""


@dataclass(frozen=True)
class Example:
    """One prompt/response pair from the data file."""

    prompt: str
    response: str


def read_examples(path: Path) -> list[Example]:
    """The examples of a JSON-lines file; ``TrainError`` names the first bad line's number."""
    if not path.is_file():
        raise TrainError(f"{path}: no such data file")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "response")):
            raise TrainError(f'{path}:{number}: expected an object with string "prompt" and "response"')
        examples.append(Example(row["prompt"], row["response"]))
    if not examples:
        raise TrainError(f"{path}: no examples")
    return examples


def encode(examples: list[Example], tokenizer, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example: labels are -100 on the prompt, the response is learned."""
    rows = []
    for number, example in enumerate(examples, start=1):
        prompt = tokenizer(example.prompt)["input_ids"]
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_tokens]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise TrainError(f"example {number}: characters this model's tokenizer cannot encode")
        rows.append((ids, ([-100] * len(prompt) + response)[:max_tokens]))
    return rows


def batch_for_step(rows: list[tuple[list[int], list[int]]], step: int, batch: int, seed: int,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of step ``step``: the same examples every time, whatever happened before."""
    chosen = random.Random(seed * 1_000_003 + step).choices(rows, k=batch)
    length = max(len(ids) for ids, _ in chosen)
    input_ids = torch.full((batch, length), pad_id)
    labels = torch.full((batch, length), -100)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i, (ids, target) in enumerate(chosen):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(target)] = torch.tensor(target)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def load_model(name: str, recipe: Recipe, lora_rank: int, workdir: Path, seed: int = 0):
    """The model and tokenizer of a run, with the recipe's techniques applied."""
    from lowmem_course import quantize

    if name.startswith("tiny:"):
        from lowmem_course.reasoning import MODEL_VOCAB_SIZE, make_tokenizer

        tokenizer = make_tokenizer()
        path = workdir / "base"
        family.build(family.tiny(name.removeprefix("tiny:"), vocab_size=MODEL_VOCAB_SIZE)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        path = family.student_path(name) or Path(name)
        tokenizer = family.load_tokenizer(path)
    # The base is loaded in the recipe's dtype, never the checkpoint's (Hub checkpoints are bf16):
    # full fine-tuning keeps fp32 master weights; a frozen LoRA base is 16-bit under bf16/fp16;
    # QLoRA stores it in NF4 with double quantization and computes in 16 bits.
    half = torch.float16 if recipe.precision == "fp16" else torch.bfloat16
    if recipe.mode == "qlora":
        model = quantize.load_quantized(path, "nf4-dq", device=lab.get_device(), dtype=half)
    else:
        frozen_half = recipe.mode == "lora" and recipe.precision != "fp32"
        model = family.load(path, dtype=half if frozen_half else torch.float32).to(lab.get_device())
    if recipe.mode == "full":
        if recipe.checkpointing:
            model.activation_checkpointing_enable()
    else:
        model = quantize.add_lora(model, rank=lora_rank, alpha=2 * lora_rank,
                                  checkpointing=recipe.checkpointing, seed=seed)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (all of them for full fine-tuning, the adapters for LoRA)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def run_fingerprint(args: argparse.Namespace) -> dict:
    """What a checkpoint must match to be resumed: the model, recipe, data and seed."""
    return {"model": args.model, "recipe": str(Recipe.parse(args.recipe)), "lora_rank": args.lora_rank,
            "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(), "seed": args.seed,
            "batch": args.batch}


def save_checkpoint(out: Path, step: int, model, optimizer, fingerprint: dict) -> None:
    """Write ``out/checkpoint`` atomically: into a temporary folder, then renamed over the old one."""
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **fingerprint}, indent=1))
    old = out / "checkpoint.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(out: Path, model, optimizer, fingerprint: dict) -> int:
    """Load ``out/checkpoint`` into the model and optimizer; returns the next step to run."""
    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").is_file():
        raise TrainError(f"{out} has no checkpoint to resume from")
    state = json.loads((ckpt / "state.json").read_text())
    different = {k: (state.get(k), v) for k, v in fingerprint.items() if state.get(k) != v}
    if different:
        raise TrainError(f"the checkpoint in {out} is from another run: "
                         + ", ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in different.items()))
    trainable = dict(model.named_parameters())
    for name, tensor in load_file(ckpt / "trainable.safetensors").items():
        trainable[name].data.copy_(tensor)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return state["step"]


def train(args: argparse.Namespace) -> dict:
    """Run the training described by the parsed command line; returns the final report."""
    recipe = Recipe.parse(args.recipe)
    out = Path(args.out)
    has_checkpoint = (out / "checkpoint" / "state.json").is_file()
    if has_checkpoint and not (args.resume or args.overwrite):
        raise TrainError(f"{out} already holds a run's checkpoint: pass --resume to continue it or --overwrite to start over")
    if args.overwrite:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    examples = read_examples(Path(args.data))
    fingerprint = run_fingerprint(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, recipe, args.lora_rank, out, args.seed)
    rows = encode(examples, tokenizer, args.max_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start = restore_checkpoint(out, model, optimizer, fingerprint) if args.resume and has_checkpoint else 0
    compute_dtype = precision.compute_dtype(recipe.estimator_precision)
    scaler = precision.make_scaler(model.device, compute_dtype)
    model.train()
    log = (out / "log.jsonl").open("a")
    last_step: measure.Measurement | None = None
    for step in tqdm(range(start, args.steps), desc=f"train {recipe}", initial=start, total=args.steps,
                     disable=getattr(args, "no_progress", False)):
        input_ids, labels, mask = (t.to(model.device) for t in batch_for_step(
            rows, step, args.batch, args.seed, tokenizer.pad_token_id))

        def one_step() -> torch.Tensor:
            with precision.autocast(model.device, compute_dtype):
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        if step == args.steps - 1:  # the last step is measured, in steady state
            with measure.track(model, optimizer, label=f"{args.model} {recipe}") as last_step:
                loss = one_step()
        else:
            loss = one_step()
        log.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 6)}) + "\n")
        log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(out, step + 1, model, optimizer, fingerprint)
    log.close()
    final = out / ("adapter" if recipe.mode != "full" else "model")
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    report = {"out": str(final), "steps": args.steps, "recipe": str(recipe),
              "memory": last_step.to_dict() if last_step else None}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if last_step:
        print(last_step)
    return report


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lowmem_course.train`` (and ``lowmem train``)."""
    p = argparse.ArgumentParser(prog="lowmem train", description="Train with a memory recipe.")
    p.add_argument("--model", required=True, help="Hub id, local directory, student-qwen2 or tiny:<member>")
    p.add_argument("--recipe", required=True, help="e.g. full, lora+bf16, qlora+checkpointing+bf16")
    p.add_argument("--data", required=True, help="JSON lines of {\"prompt\": ..., \"response\": ...}")
    p.add_argument("--out", required=True, help="output directory (checkpoint, log, adapters)")
    p.add_argument("--steps", type=_positive, default=100)
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--max-tokens", type=_positive, default=512, help="truncate examples to this many tokens")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-rank", type=_positive, default=16)
    p.add_argument("--save-every", type=_positive, default=50, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs, scripts and notebooks)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    group.add_argument("--overwrite", action="store_true", help="delete --out and start over")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 with a one-line message on bad input."""
    args = parser().parse_args(argv)
    try:
        Recipe.parse(args.recipe)
        train(args)
    except (TrainError, ValueError, FileNotFoundError) as error:
        print(f"lowmem train: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
