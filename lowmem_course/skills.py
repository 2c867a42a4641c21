"""Teach the 4-bit student a skill it never saw, with QLoRA: the recipe, the run, the shipped adapter.

The student learned addition only; ``teach`` trains LoRA adapters on its frozen NF4 base to do
another task of ``lowmem_course.reasoning`` (subtraction). The result ships as an adapter under
``students/adapters/<task>/`` with the recipe and the accuracy it reached::

    python -m lowmem_course.skills teach --out runs/subtraction   # retrain the shipped adapter (~5 min CPU)
    python -m lowmem_course.skills eval subtraction   # its accuracy on 500 held-out problems
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowmem_course import family, optimizers, quantize, reasoning, steps, student
from lowmem_course.cmdline import Parser, check_out_folder, positive_int

ADAPTERS_DIR = family.STUDENTS_DIR / "adapters"  # shipped QLoRA adapters, one folder per skill
ADAPTER_EVAL_N, ADAPTER_EVAL_SEED = 500, 0  # the held-out set each adapter's recipe.json records
ADAPTER_TARGET_ACCURACY = 0.80  # what a shipped adapter must reach on its task


@dataclass(frozen=True)
class SkillConfig:
    """The recipe of a QLoRA run that teaches the shipped ``arch`` student a ``task`` of ``reasoning``.

    The base is the student in ``fmt`` (frozen), the adapters LoRA of ``rank`` on every linear map;
    AdamW at ``lr`` after ``warmup`` linear steps, cosine decay to ``lr * min_lr_ratio``
    (``steps.warmup_cosine``); ``batch_size`` fresh training-split problems per step.
    ``checkpointing`` recomputes each decoder layer in backward (as the QLoRA paper does): same
    gradients, fewer saved activations.
    """

    task: str = "subtraction"
    arch: str = "qwen2"
    fmt: quantize.Format = "nf4-dq"
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-2
    warmup: int = 20
    min_lr_ratio: float = 0.1
    steps: int = 400
    batch_size: int = 64
    grad_clip: float = 1.0
    checkpointing: bool = True
    seed: int = 0

    def learning_rate(self, step: int) -> float:
        """The learning rate of ``step`` (0-based): ``steps.warmup_cosine`` with this recipe's lr, warmup and floor."""
        return steps.warmup_cosine(self.lr, self.warmup, self.steps, self.min_lr_ratio)(step)


def skill_batches(cfg: SkillConfig) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batches(step)``: ``cfg.batch_size`` training-split ``cfg.task`` problems, fresh and seeded per step.

    Tokenized with ``reasoning.make_tokenizer()``, the tokenizer the students were trained with (it
    keeps ``<think>`` and ``</think>`` as one token each in the traces).
    """
    tok = reasoning.make_tokenizer()

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        problems = reasoning.sample(cfg.batch_size, seed=cfg.seed * 1_000_003 + step, split="train", task=cfg.task)
        return student.make_batch(problems, tok)

    return batches


def teach(cfg: SkillConfig, device: str | torch.device = "cpu", progress: bool = True,
          batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
          ) -> tuple[torch.nn.Module, Any, list[float]]:
    """Run ``cfg``: the 4-bit student with fresh adapters, trained on ``cfg.task``.

    ``batches(step) -> (input_ids, labels)`` replaces ``skill_batches(cfg)`` (say, to mix tasks).
    Returns the PeftModel (eval mode), the student's tokenizer and the loss of every step (nats per
    target token). Seeded: the same config gives the same adapters on the same machine.
    """
    torch.manual_seed(cfg.seed)
    model = quantize.add_lora(quantize.load_quantized(student.student_dir(cfg.arch), cfg.fmt, device=device),
                              rank=cfg.rank, alpha=cfg.alpha, checkpointing=cfg.checkpointing, seed=cfg.seed)
    # torch's default AdamW kernel (not the fused one), as the shipped adapter was trained: bit for bit
    optimizer = optimizers.make_optimizer(model, "adamw", cfg.lr, fused=False)
    losses = steps.train_loop(model, optimizer, batches or skill_batches(cfg), cfg.steps,
                              schedule=cfg.learning_rate,
                              grad_clip=cfg.grad_clip, progress=progress, desc="train adapters")
    return model, reasoning.make_tokenizer(), losses


def adapter_dir(name: str) -> Path:
    """Where the shipped adapter ``name`` lives (``adapter_model.safetensors`` + ``recipe.json``)."""
    return ADAPTERS_DIR / name


def adapter_recipe(name_or_path: str | Path) -> tuple[Path, dict]:
    """The folder and recipe of a saved adapter: a shipped adapter's name ("subtraction") or a
    directory written by ``save_adapter``. ``FileNotFoundError`` without ``recipe.json``, ``ValueError``
    (one line) when it is not a recipe with a ``skill_config``."""
    path = Path(name_or_path)
    if not path.is_dir():
        path = adapter_dir(str(name_or_path))
    if not (path / "recipe.json").is_file():
        raise FileNotFoundError(f"no adapter at {name_or_path!r}: expected a folder with recipe.json "
                                f"(shipped: {', '.join(sorted(p.name for p in ADAPTERS_DIR.glob('*'))) or 'none'})")
    try:
        recipe = json.loads((path / "recipe.json").read_text())
        SkillConfig(**recipe["skill_config"])
    except (ValueError, RecursionError, TypeError, KeyError) as err:  # not JSON, not an object, unknown fields
        raise ValueError(f"{path / 'recipe.json'} is not an adapter recipe with a skill_config "
                         f"({type(err).__name__}: {err})") from None
    return path, recipe


def load_adapter(name_or_path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, dict]:
    """The 4-bit student with a saved adapter on top, the reasoning tokenizer and the adapter's recipe.

    ``name_or_path`` is a shipped adapter's name ("subtraction") or a directory written by
    ``save_adapter`` (``adapter_recipe``). The base is loaded in the recipe's format, CPU repacking
    switched off.
    """
    from peft import PeftModel

    path, recipe = adapter_recipe(name_or_path)
    cfg = SkillConfig(**recipe["skill_config"])
    base = quantize.load_quantized(student.student_dir(cfg.arch), cfg.fmt, device=device)
    model = PeftModel.from_pretrained(base, path).eval()
    quantize.disable_cpu_repacking(model)
    return model, reasoning.make_tokenizer(), recipe


def save_adapter(model: torch.nn.Module, out: Path, losses: list[float], recipe: dict) -> None:
    """Write the adapters (``save_pretrained``: safetensors + adapter config), ``loss.csv`` and ``recipe.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    quantize.name_base(out, f"student-{recipe.get('skill_config', {}).get('arch', SkillConfig.arch)}")
    student.write_record(out, list(enumerate(losses, start=1)), recipe)


def main(argv: list[str] | None = None) -> int:
    """``teach`` a skill with QLoRA into ``--out``, or ``eval`` a saved adapter; bad input: one line, exit 2."""
    parser = Parser(prog="python -m lowmem_course.skills",
                    description="QLoRA adapters that teach the 4-bit student a new skill")
    sub = parser.add_subparsers(dest="command", required=True)
    p_teach = sub.add_parser("teach", help="train an adapter from its seed and save it to --out")
    p_teach.add_argument("--task", choices=sorted(reasoning.TASKS), default=SkillConfig.task)
    p_teach.add_argument("--out", type=Path, required=True,
                         help="directory to save to (outside the package: the shipped adapter is never overwritten)")
    p_teach.add_argument("--steps", type=positive_int, default=SkillConfig.steps)
    p_teach.add_argument("--seed", type=int, default=SkillConfig.seed)
    p_eval = sub.add_parser("eval", help="exact-match accuracy of a saved adapter on the 4-bit student")
    p_eval.add_argument("adapter", help="a shipped adapter's name (e.g. subtraction) or a directory")
    p_eval.add_argument("--n", type=positive_int, default=ADAPTER_EVAL_N, help="number of held-out problems")
    p_eval.add_argument("--seed", type=int, default=ADAPTER_EVAL_SEED, help="seed that draws the held-out problems")
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            path, recipe = adapter_recipe(args.adapter)
            task = recipe["skill_config"]["task"]
            reasoning.check_available(args.n, "heldout", task)
            model, tok, _ = load_adapter(path)
            print(f"{task} accuracy: {student.accuracy(model, tok, n=args.n, seed=args.seed, task=task):.3f}")
            return 0
        check_out_folder(args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.fail(err)
    cfg = SkillConfig(task=args.task, steps=args.steps, seed=args.seed)
    quantize.fix_cpu_dequantize()
    before_model = quantize.load_quantized(student.student_dir(cfg.arch), cfg.fmt)
    start = time.perf_counter()
    model, tok, losses = teach(cfg)
    wall = time.perf_counter() - start
    before = student.accuracy(before_model, tok, n=ADAPTER_EVAL_N, seed=ADAPTER_EVAL_SEED, task=cfg.task)
    acc = student.accuracy(model, tok, n=ADAPTER_EVAL_N, seed=ADAPTER_EVAL_SEED, task=cfg.task)
    args_text = shlex.join(argv if argv is not None else sys.argv[1:])
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python -m lowmem_course.skills {args_text}"
    save_adapter(model, args.out, losses, dict(
        command=command, skill_config=asdict(cfg), trainable_parameters=quantize.trainable_parameters(model),
        wall_seconds=round(wall, 1), final_loss=round(sum(losses[-10:]) / len(losses[-10:]), 6),
        accuracy_before=before, accuracy=acc, eval_n=ADAPTER_EVAL_N, eval_seed=ADAPTER_EVAL_SEED,
        eval_split="heldout", threads=torch.get_num_threads(), torch=torch.__version__))
    print(f"saved to {args.out} ({wall:.0f} s)")
    print(f"{cfg.task} accuracy: {before:.3f} -> {acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
