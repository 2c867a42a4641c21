"""The ``lowmem`` command: estimate a setup, plan what fits a GPU, list GPUs, validate the estimator here.

    lowmem plan r1-distill-qwen-14b --gpu rtx-4090 --seq 8192 --mode qlora
    lowmem plan r1-distill-llama-70b --gpu h100-80gb --gpus 2 --seq 32768 --mode inference
    lowmem estimate r1-distill-qwen-7b --recipe lora+bf16-mixed --seq 4096 --gpu-memory 24GiB --json
    lowmem gpus
    lowmem validate
    lowmem train --model student-qwen2 --recipe qlora+bf16-mixed+checkpointing --data d.jsonl --out runs/q
    lowmem doctor

Every answer of ``estimate`` and ``plan`` starts with the job: training or inference, the recipe (or
the modes tried), the run's shape and the budget per GPU in GiB (``--gpu NAME`` from
``lowmem_course.gpus``, or ``--gpu-memory`` with a unit: ``24GB`` is decimal, said in GiB too). The two
commands share their defaults (batch 1, ``DEFAULT_SEQ`` tokens, 1 GPU, CUDA kernels). When nothing of a
job fits, ``plan`` says how far off the leanest recipe is, what the weights alone need, the fewest
GPUs of that size that fit, and the longest context and largest batch that fit (``estimate.shortfall``).
Offloading recipes keep bytes in host memory: both commands show them; ``plan --cpu-memory 64GiB``
offers only recipes whose host bytes fit it (without it, host bytes are shown and not limited).

A recipe (``lowmem_course.recipe``) names every memory choice of a run; ``plan`` prints recipes
with the command that runs each, ``estimate --recipe`` and ``train --recipe`` read them.
``train`` and ``doctor`` hand their arguments to ``lowmem_course.train`` and ``lowmem_course.doctor``.
Exit codes: 0 success, 1 ``validate`` found a total off by more than 5% (or ``plan`` found nothing
that fits any job asked), 2 bad input (one line on stderr, never a traceback). ``estimate``, ``plan``
and ``gpus`` import neither torch nor transformers for config files (family names need transformers' table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lowmem_course import estimate as est
from lowmem_course import family, gpus
from lowmem_course.cmdline import Parser, one_line, positive_int, printable
from lowmem_course.recipe import Recipe
from lowmem_course.units import GiB, MiB, describe_bytes, parse_bytes

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "kv_cache", "total")
COLUMNS = {"training": ("weights", "gradients", "optimizer", "activations", "total"),  # the parts each job has
           "inference": ("weights", "activations", "kv_cache", "total")}
HEADINGS = {"weights": "weights", "gradients": "grads", "optimizer": "optim", "activations": "activ",
            "kv_cache": "kv", "total": "total"}
# what ``lowmem estimate`` assumes without --recipe (fp16-mixed on a card without bf16)
DEFAULT_RECIPE = "full+bf16-mixed"
SHOWN = 10  # setups ``plan`` lists per job unless --all
MODE_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "inference": "inference"}
FORWARDED_HELP = {  # subcommands with their own parser: `lowmem train --help` shows theirs
    "train": "train with a recipe (e.g. qlora+bf16-mixed+checkpointing, as lowmem plan prints), resumable",
    "doctor": "check this machine for the course: versions, device, bf16, memory, students",
}
EXAMPLES = f"""examples:
  lowmem plan r1-distill-qwen-14b --gpu rtx-4090 --seq 8192 --mode qlora     # can I fine-tune it at 8k?
  lowmem plan r1-distill-llama-70b --gpu h100-80gb --gpus 2 --seq 32768 --mode inference
  lowmem plan r1 --gpu h100-80gb --gpus 2 --mode inference                   # how many GPUs would do?
  lowmem estimate r1-distill-qwen-7b --recipe qlora+bf16-mixed+checkpointing --gpu-memory 24GiB
  lowmem plan r1-distill-llama-8b --gpu rtx-4090 --batch 2 --seq 2048 --mode full --cpu-memory 128GiB
  lowmem gpus                                                                # the cards --gpu knows

models: {", ".join(family.MEMBERS)} (or a Hub id, a config.json, a model directory)
GPUs (--gpu): {", ".join(gpus.GPUS)}; or --gpu-memory 24GiB (24G is the same; 24GB is decimal: 22.35 GiB)
defaults shared by estimate and plan: batch 1, seq {est.DEFAULT_SEQ}, 1 GPU, cuda kernels"""


@dataclass(frozen=True)
class Budget:
    """Memory per GPU: ``bytes``, how the command line gave it (``said``, in GiB), and the card when named."""

    bytes: int
    said: str
    gpu: gpus.Gpu | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: bytes, the sentence, and the card's name (None for --gpu-memory)."""
        return {"bytes": self.bytes, "said": self.said, "gpu": self.gpu.name if self.gpu else None}


def _memory(text: str) -> Budget:
    try:
        return Budget(parse_bytes(text), describe_bytes(text) + " per GPU")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _host_memory(text: str) -> Budget:
    try:
        return Budget(parse_bytes(text), describe_bytes(text) + " of host memory")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _gpu(text: str) -> Budget:
    try:
        g = gpus.gpu(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    said = (f"{g.usable / GiB:.2f} GiB usable per GPU ({g.name}: {g.total // MiB:,} MiB total "
            f"less {gpus.CUDA_RESERVE // MiB} MiB for CUDA)")
    return Budget(g.usable, said, g)


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
    """The arguments ``estimate`` and ``plan`` share, with the same defaults, and each one's own."""
    p.add_argument("model", help="family name (r1-distill-qwen-7b), Hub id, config.json or model directory")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per GPU (default 1)")
    p.add_argument("--seq", type=positive_int, default=est.DEFAULT_SEQ,
                   help=f"tokens per sequence, prompt and reasoning (default {est.DEFAULT_SEQ})")
    p.add_argument("--gpus", type=positive_int, default=None, help="GPUs (default: 1, or N for a tpN recipe)")
    p.add_argument("--device", choices=est.DEVICES, default="cuda",
                   help="whose attention kernels set the peak: cuda (default) or cpu (predicting a run here)")
    budget = p.add_mutually_exclusive_group(required=plan)
    budget.add_argument("--gpu", type=_gpu, dest="budget", help=f"the card by name: {', '.join(gpus.GPUS)}")
    budget.add_argument("--gpu-memory", type=_memory, dest="budget",
                        help="memory per GPU with its unit: 24GiB (= 24G), 24GB (decimal), 24000MiB")
    p.add_argument("--lora-rank", type=positive_int, default=16,
                   help="rank of the LoRA and QLoRA adapters (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    if plan:
        p.add_argument("--cpu-memory", type=_host_memory, default=None,
                       help="host memory (RAM) offloading may use, e.g. 64GiB (default: shown, not limited)")
        p.add_argument("--all", action="store_true", help=f"list every setup that fits (default: the first {SHOWN})")
        p.add_argument("--mode", choices=est.MODES, default=None,
                       help="only recipes of this mode (default: training and inference, each under its heading)")
        p.add_argument("--precisions", type=_precisions, default=None,
                       help="comma-separated precisions to try (default: what the --gpu runs, "
                            "bf16-mixed,bf16; a card without bf16 such as a T4: fp16-mixed,fp32)")
        return
    p.add_argument("--recipe", type=_recipe, default=None,
                   help=f"the run's memory choices, e.g. qlora+bf16-mixed+checkpointing (default {DEFAULT_RECIPE}); "
                        "the recipes lowmem plan prints")
    p.add_argument("--attention", choices=est.ATTENTION, default="sdpa")


def parser() -> argparse.ArgumentParser:
    """The ``lowmem`` argument parser."""
    root = Parser(prog="lowmem", description="Will this R1-family setup fit? Estimate, plan, validate.",
                  epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = root.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, text, plan in (("estimate", "predict the peak memory per GPU of one recipe", False),
                             ("plan", "the recipes that fit a GPU, cheapest compute first; what to do when none does",
                              True)):
        _setup_args(sub.add_parser(name, help=text, description=text, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter), plan=plan)
    g = sub.add_parser("gpus", help="the cards --gpu knows: usable memory, bf16, FP8")
    g.add_argument("--json", action="store_true")
    v = sub.add_parser("validate", help="measure the estimator's grid on this machine's device")
    v.add_argument("--quick", action="store_true", help="one sequence length instead of three")
    v.add_argument("--json", action="store_true")
    for name, text in FORWARDED_HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return root


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f}"


def _shape(batch: int, seq: int, n_gpus: int, budget: Budget | None) -> str:
    card = f" x {budget.gpu.name}" if budget and budget.gpu else f" GPU{'s' if n_gpus > 1 else ''}"
    return f"batch {batch} x seq {seq:,} on {n_gpus}{card}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_estimate(e: est.Estimate, budget: Budget | None = None, default_recipe: bool = False) -> str:
    """One estimate: the job first, then the components per GPU in GiB, and the verdict against ``budget``."""
    s = e.setup
    job = est.job_of(s.mode)
    rows = [job.capitalize() + (f" ({MODE_NAMES[s.mode]})" if job == "training" else "")
            + f" of {printable(e.model)} with recipe {e.recipe}"
            + (" (the default: --recipe picks another)" if default_recipe else "")
            + f", {_shape(s.batch, s.seq, s.gpus, budget)}; budget: "
            + (budget.said if budget else "none given (--gpu or --gpu-memory)"),
            f"{e.parameters / 1e9:.2f}B parameters ({e.active_parameters / 1e9:.2f}B active), "
            f"{e.trainable_parameters / 1e9:.3f}B trainable"
            + (f", LoRA rank {s.lora_rank}" if s.mode in ("lora", "qlora") else "") + f", {s.device} kernels",
            f"{'component':<12} {'GiB/GPU':>9}"]
    rows += [f"{k:<12} {_gib(e.bytes[k])}" for k in COLUMNS[job]]
    rows.append(f"(peak during {e.peak_phase})")
    if e.host_bytes["total"]:
        parts = ", ".join(f"{k} {e.host_bytes[k] / GiB:.2f}" for k in est.HOST_PARTS[:-1] if e.host_bytes[k])
        rows.append(f"host memory (offloaded): {e.host_bytes['total'] / GiB:.2f} GiB ({parts} GiB)")
    if budget:
        spare = budget.bytes - e.bytes["total"]
        rows.append(f"fits: {spare / GiB:.2f} GiB to spare" if spare >= 0
                    else f"does not fit: {-spare / GiB:.2f} GiB over (lowmem plan says what fits)")
    return "\n".join(rows)


def _no_bf16(budget: Budget | None, precisions: Sequence[str]) -> None:
    """``ValueError`` when ``budget`` names a card without bf16 and ``precisions`` ask for it."""
    if budget and budget.gpu and not budget.gpu.bf16 and any(p.startswith("bf16") for p in precisions):
        raise ValueError(f"{budget.gpu.name} has no bf16: use fp16-mixed or fp32 "
                         f"(e.g. {DEFAULT_RECIPE.replace('bf16', 'fp16')})")


def _estimate(args: argparse.Namespace) -> int:
    budget: Budget | None = args.budget
    default = args.recipe is None
    card_lacks_bf16 = budget and budget.gpu and not budget.gpu.bf16
    recipe = args.recipe or Recipe.parse(DEFAULT_RECIPE.replace("bf16", "fp16") if card_lacks_bf16 else DEFAULT_RECIPE)
    _no_bf16(budget, [recipe.precision])
    setup = est.setup_of(recipe, batch=args.batch, seq=args.seq, gpus=args.gpus, lora_rank=args.lora_rank,
                         attention=args.attention, device=args.device)
    e = est.estimate(args.model, setup)
    if args.json:
        answer = {"job": est.job_of(setup.mode), **e.to_dict(), "budget": budget.to_dict() if budget else None,
                  "fits": e.bytes["total"] <= budget.bytes if budget else None}
        print(json.dumps(answer))
    else:
        print(format_estimate(e, budget, default))
    return 0


def _table(job: str, options: list[est.PlanOption], model: str) -> list[str]:
    """The rows of one job's plan: cost and GiB per GPU by component (host GiB when any recipe
    offloads), then the recipe and the command that runs it, each on its own line (recipes are long)."""
    columns = COLUMNS[job]
    host = any(o.estimate.host_bytes["total"] for o in options)
    rows = [f"{'cost':>5} " + " ".join(f"{HEADINGS[k]:>7}" for k in columns) + (f" {'host':>7}" if host else "")]
    for o in options:
        rows.append(f"{o.cost:5.2f} " + " ".join(f"{o.estimate.bytes[k] / GiB:7.2f}" for k in columns)
                    + (f" {o.estimate.host_bytes['total'] / GiB:7.2f}" if host else ""))
        rows += [f"    {o.recipe}", f"    {printable(o.command(model))}"]
    return rows


def _advice(short: est.Shortfall, model: str, args: argparse.Namespace, budget: Budget) -> list[str]:
    """What a job of which nothing fits can do instead, each line with the command that shows it."""
    lean, n_gpus = short.leanest, args.gpus or 1
    per_gpu = f"{budget.bytes / GiB:.2f} GiB"
    rows = [f"  the leanest recipe, {lean.recipe}, needs {lean.estimate.bytes['total'] / GiB:.2f} GiB per GPU: "
            f"{short.over / GiB:.2f} GiB over {per_gpu}"] if short.over > 0 else []
    weights_over = short.weights > budget.bytes
    rows.append(f"  its weights alone need {short.weights / GiB:.2f} GiB per GPU"
                + (": no shorter context or smaller batch can help" if weights_over else ""))
    card = budget.gpu.name if budget.gpu else f"{per_gpu} GPUs"
    if short.at_gpus:
        rows.append(f"  the fewest {card} that fit: {short.gpus}, with {short.at_gpus.recipe} "
                    f"({short.at_gpus.estimate.bytes['total'] / GiB:.2f} GiB per GPU)")
        rows.append(f"      {printable(short.at_gpus.command(model))}")
    elif args.mode in ("lora", "qlora"):
        rows.append(f"  more GPUs cannot help: {MODE_NAMES[args.mode]} keeps a whole model on every GPU here")
    else:
        rows.append(f"  not even {est.GPU_COUNTS[-1]} x {card} fit")
    if short.at_seq:
        rows.append(f"  the longest context that fits on {n_gpus} GPU{'s' if n_gpus > 1 else ''} "
                    f"at batch {args.batch}: {short.seq:,} tokens, {short.at_seq.recipe} "
                    f"({short.at_seq.estimate.bytes['total'] / GiB:.2f} GiB)")
        rows.append(f"      {printable(short.at_seq.command(model))}")
    elif not weights_over:
        rows.append(f"  no context fits on {n_gpus} GPU{'s' if n_gpus > 1 else ''} at batch {args.batch}")
    if short.batch:
        rows.append(f"  the largest batch that fits at seq {args.seq:,}: {short.batch}")
    if short.host_short:
        o = short.host_short
        rows.append(f"  {o.recipe} fits the GPU ({o.estimate.bytes['total'] / GiB:.2f} GiB) but keeps "
                    f"{o.estimate.host_bytes['total'] / GiB:.2f} GiB in host memory, over --cpu-memory "
                    f"{args.cpu_memory.bytes / GiB:.2f} GiB")
    return rows


def _plan(args: argparse.Namespace) -> int:
    budget: Budget = args.budget
    precisions = args.precisions or (budget.gpu.precisions if budget.gpu else est.DEFAULT_PRECISIONS)
    _no_bf16(budget, precisions)
    fields = est.load_config(args.model)
    n_gpus = args.gpus or 1
    host: Budget | None = args.cpu_memory
    cpu = host.bytes if host else None
    options = est.plan(fields, budget.bytes, mode=args.mode, batch=args.batch, seq=args.seq, gpus=n_gpus,
                       precisions=precisions, device=args.device, cpu_memory=cpu, lora_rank=args.lora_rank)
    jobs = [est.job_of(args.mode)] if args.mode else list(est.JOBS)
    by_job = {job: [o for o in options if est.job_of(o.estimate.setup.mode) == job] for job in jobs}
    short = {job: est.shortfall(fields, budget.bytes, job, mode=args.mode, batch=args.batch, seq=args.seq,
                                gpus=n_gpus, precisions=precisions, device=args.device, cpu_memory=cpu,
                                lora_rank=args.lora_rank)
             for job in jobs if not by_job[job]}
    what = MODE_NAMES[args.mode] if args.mode else "training and inference"
    first = (f"{what[0].upper()}{what[1:]} of {printable(fields.get('name_or_path'))}, "
             f"{_shape(args.batch, args.seq, n_gpus, budget)}; budget: {budget.said}"
             + (f", {host.said}" if host else ""))
    if args.json:
        print(json.dumps({"job": {"jobs": jobs, "mode": args.mode, "model": fields.get("name_or_path"),
                                  "batch": args.batch, "seq": args.seq, "gpus": n_gpus, "device": args.device,
                                  "precisions": list(precisions), "lora_rank": args.lora_rank, "said": first},
                          "budget": budget.to_dict(), "cpu_memory": host.to_dict() if host else None,
                          "fits": [{"job": est.job_of(o.estimate.setup.mode), **o.to_dict(),
                                    "command": o.command(args.model)} for o in options],
                          "nothing_fits": {job: s.to_dict(args.model) for job, s in short.items()}}))
        return 0 if options else 1
    print(first)
    for job in jobs:
        modes = ", ".join(MODE_NAMES[m] for m in ([args.mode] if args.mode else est.JOBS[job]))
        fits = by_job[job]
        print(f"\n{job.capitalize()}" + (f" ({modes})" if job == "training" else "") + ": ", end="")
        if not fits:
            print(f"nothing fits in {budget.bytes / GiB:.2f} GiB per GPU")
            print("\n".join(_advice(short[job], args.model, args, budget)))
            continue
        print(f"{_plural(len(fits), 'setup')} fit{'s' if len(fits) == 1 else ''}, cheapest compute first "
              f"(cost relative to {est.COST_BASELINE[job]}; GiB per GPU)"
              + ("; each command re-checks its estimate, a serving command comes in a later release"
                 if job == "inference" else ""))
        shown = fits if args.all else fits[:SHOWN]
        print("\n".join(_table(job, shown, args.model)))
        if len(shown) < len(fits):
            print(f"... and {len(fits) - len(shown)} more that fit (--all lists them)")
    return 0 if options else 1


def _gpus(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([{**g.__dict__, "usable": g.usable, "precisions": list(g.precisions)}
                          for g in gpus.GPUS.values()]))
    else:
        print(gpus.table())
    return 0


def _validate(args: argparse.Namespace) -> int:
    from lowmem_course import validate

    device = family.get_device()
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
        return {"estimate": _estimate, "plan": _plan, "gpus": _gpus, "validate": _validate}[args.command](args)
    except BrokenPipeError:  # the reader stopped early (`lowmem plan ... | head`): it has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        return 0
    except (ValueError, OSError) as err:
        sys.stderr.write(f"lowmem {args.command}: error: {one_line(err)}\n")
        return 2

