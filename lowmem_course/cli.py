"""The ``lowmem`` command: estimate a setup, plan what fits, validate the estimator here.

    lowmem estimate r1-distill-qwen-7b --recipe lora+bf16-mixed --seq 4096 --json
    lowmem plan r1-distill-qwen-7b --gpu-memory 24GiB
    lowmem plan r1-distill-qwen-1.5b --gpu-memory 15GiB --precisions fp16-mixed,fp32   # a T4: no bf16
    lowmem validate
    lowmem train --model student-qwen2 --recipe qlora+bf16-mixed+checkpointing --data d.jsonl --out runs/q

A recipe (``lowmem_course.recipe``) names every memory choice of a run; ``plan`` prints recipes
with the command that runs each, ``estimate --recipe`` and ``train --recipe`` read them.
    lowmem doctor

``train`` and ``doctor`` hand their arguments to ``lowmem_course.train`` and ``lowmem_course.doctor``.
Exit codes: 0 success, 1 ``validate`` found a total off by more than 5% (or ``plan`` found nothing
that fits), 2 bad input (one line on stderr, never a traceback). ``estimate`` and ``plan`` import
neither torch nor transformers for config files (family names need transformers' table).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lowmem_course import estimate as est
from lowmem_course.cmdline import Parser, one_line, positive_int, printable
from lowmem_course.recipe import Recipe
from lowmem_course.units import GiB, parse_bytes

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "kv_cache", "total")
DEFAULT_RECIPE = "full+bf16-mixed"  # what ``lowmem estimate`` assumes without --recipe
FORWARDED_HELP = {  # subcommands with their own parser: `lowmem train --help` shows theirs
    "train": "train with a recipe (e.g. qlora+bf16-mixed+checkpointing, as lowmem plan prints), resumable",
    "doctor": "check this machine for the course: versions, device, bf16, memory, students",
}


def _memory(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _precisions(text: str) -> tuple[str, ...]:
    try:
        return est.check_precisions(p.strip() for p in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _recipe(text: str) -> Recipe:
    try:
        return Recipe.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _setup_args(p: argparse.ArgumentParser, plan: bool) -> None:
    p.add_argument("model", help="family name (r1-distill-qwen-7b), Hub id, config.json or model directory")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per GPU (default 1)")
    p.add_argument("--seq", type=positive_int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--gpus", type=positive_int, default=None, help="GPUs (default: 1, or N for a tpN recipe)")
    p.add_argument("--device", choices=est.DEVICES, default="cuda",
                   help="whose attention kernels set the peak: cuda (default) or cpu (predicting a run here)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    if plan:
        p.add_argument("--mode", choices=est.MODES, default=None, help="only recipes of this mode")
        p.add_argument("--gpu-memory", type=_memory, required=True, help="memory per GPU: 24GiB, 24GB, 24000MB")
        p.add_argument("--precisions", type=_precisions, default=est.DEFAULT_PRECISIONS,
                       help="comma-separated precisions to try (default bf16-mixed,bf16; "
                            "a GPU without bf16 such as a T4: fp16-mixed,fp32)")
        return
    p.add_argument("--recipe", type=_recipe, default=Recipe.parse(DEFAULT_RECIPE),
                   help=f"the run's memory choices, e.g. qlora+bf16-mixed+checkpointing (default {DEFAULT_RECIPE}); "
                        "the recipes lowmem plan prints")
    p.add_argument("--lora-rank", type=positive_int, default=16)
    p.add_argument("--attention", choices=est.ATTENTION, default="sdpa")


def parser() -> argparse.ArgumentParser:
    """The ``lowmem`` argument parser."""
    root = Parser(prog="lowmem", description="Will this R1-family setup fit? Estimate, plan, validate.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=Parser)
    _setup_args(sub.add_parser("estimate", help="predict the peak memory per GPU of one setup"), plan=False)
    _setup_args(sub.add_parser("plan", help="the setups that fit a GPU, cheapest compute first"), plan=True)
    v = sub.add_parser("validate", help="measure the estimator's grid on this machine's device")
    v.add_argument("--quick", action="store_true", help="one sequence length instead of three")
    v.add_argument("--json", action="store_true")
    for name, text in FORWARDED_HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return root


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f}"


def format_estimate(e: est.Estimate) -> str:
    """A readable table of one estimate, in GiB."""
    s = e.setup
    rows = [f"{printable(e.model)}: {e.parameters / 1e9:.2f}B parameters ({e.active_parameters / 1e9:.2f}B active), "
            f"{e.trainable_parameters / 1e9:.3f}B trainable",
            f"recipe {e.recipe}: batch {s.batch} x seq {s.seq}, {s.gpus} GPU(s)"
            + (f", LoRA rank {s.lora_rank}" if s.mode in ("lora", "qlora") else "") + f", {s.device} kernels",
            f"{'component':<12} {'GiB/GPU':>9}"]
    rows += [f"{k:<12} {_gib(e.bytes[k])}" for k in COMPONENTS]
    rows.append(f"(peak during {e.peak_phase})")
    return "\n".join(rows)


def _estimate(args: argparse.Namespace) -> int:
    setup = est.setup_of(args.recipe, batch=args.batch, seq=args.seq, gpus=args.gpus, lora_rank=args.lora_rank,
                         attention=args.attention, device=args.device)
    e = est.estimate(args.model, setup)
    print(json.dumps(e.to_dict()) if args.json else format_estimate(e))
    return 0


def _plan(args: argparse.Namespace) -> int:
    fields = est.load_config(args.model)
    options = est.plan(fields, args.gpu_memory, mode=args.mode, batch=args.batch, seq=args.seq, gpus=args.gpus or 1,
                       precisions=args.precisions, device=args.device)
    if args.json:
        print(json.dumps({"model": fields.get("name_or_path"), "gpu_memory": args.gpu_memory,
                          "fits": [{**o.to_dict(), "command": o.command(args.model)} for o in options]}))
        return 0 if options else 1
    if not options:
        print(f"nothing fits in {args.gpu_memory / GiB:.1f} GiB per GPU: "
              "add GPUs, shorten --seq or use a smaller model")
        return 1
    print(f"{len(options)} setups fit in {args.gpu_memory / GiB:.1f} GiB per GPU, cheapest compute first "
          f"(cost relative to bf16 full fine-tuning; GiB per GPU):")
    print(f"{'recipe':<44} {'cost':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'kv':>8} {'total':>8}")
    for o in options:
        b = o.estimate.bytes
        print(f"{o.recipe:<44} {o.cost:5.2f} " + " ".join(f"{b[k] / GiB:8.2f}" for k in COMPONENTS))
        print(f"    {printable(o.command(args.model))}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from lowmem_course import lab, validate

    device = lab.get_device()
    items = validate.grid()
    if args.quick:
        items = [(n, s) for n, s in items if s.seq == 128]
    rows = validate.run_grid(device, items)
    if args.json:
        print(json.dumps([{"model": c.model, "recipe": str(est.recipe_of(c.setup)), "setup": c.setup.__dict__,
                           "predicted": c.predicted,
                           "measured": c.measured, "error": c.error()} for c in rows]))
    else:
        print(f"estimator vs measurement on {device} (MiB; error = predicted/measured - 1)")
        for c in rows:
            flag = "ok" if abs(c.error()) <= validate.TOLERANCE else "OFF"
            print(f"{c.model:<22} {validate.describe(c.setup):<32} {c.predicted['total'] / 2**20:9.2f} "
                  f"{c.measured['total'] / 2**20:9.2f} {c.error():+7.2%} {flag}")
    worst = max(rows, key=lambda c: abs(c.error()))
    print(f"worst total error: {worst.error():+.2%} ({worst.model}, {validate.describe(worst.setup)})",
          file=sys.stderr if args.json else sys.stdout)
    return 0 if all(abs(c.error()) <= validate.TOLERANCE for c in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lowmem``; returns the exit code (bad input: one line on stderr and 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED_HELP:
        from lowmem_course import doctor, train

        return {"train": train.main, "doctor": doctor.main}[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    try:
        return {"estimate": _estimate, "plan": _plan, "validate": _validate}[args.command](args)
    except (ValueError, OSError) as err:
        sys.stderr.write(f"lowmem {args.command}: error: {one_line(err)}\n")
        return 2

