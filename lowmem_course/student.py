"""The course's quality yardstick: small R1-style students distilled from the reasoning teacher.

Two students learn the addition traces of ``lowmem_course.reasoning``: one with the
R1-Distill-Qwen architecture (Qwen2) and one with the full R1 architecture (DeepseekV3: MLA + MoE).
Both are tiny twins, a few MB, shipped with the package. A memory technique that hurts a model shows
up as lost exact-match accuracy::

    from lowmem_course.student import load_student, accuracy
    model, tok = load_student("qwen2")
    accuracy(model, tok, n=200, seed=0)   # -> 1.0 for the shipped students; a broken model gets ~0

Reproduce or check a student from the command line (training writes to its own ``--out``, never
over the shipped student)::

    python -m lowmem_course.student train --arch qwen2 --out runs/student-qwen2
    python -m lowmem_course.student eval --arch qwen2 --n 500 --seed 0
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from lowmem_course import family, optimizers, steps
from lowmem_course.cmdline import Parser, check_out_folder, positive_int
from lowmem_course.reasoning import MODEL_VOCAB_SIZE, Problem, check_available, make_tokenizer, parse_answer, sample

ARCHS = family.STUDENT_ARCHS  # student arch -> family member
EVAL_N, EVAL_SEED = 500, 0  # the held-out set each recipe.json records
TARGET_ACCURACY = {"qwen2": 0.90, "deepseek_v3": 0.80}  # what a shipped student must reach on it
STEPS = {"qwen2": 1000, "deepseek_v3": 2000}  # training steps of the shipped students
MAX_NEW_TOKENS = 40  # longest completion (33 tokens with <eos>) plus slack


def student_dir(arch: str) -> Path:
    """Where the shipped student of ``arch`` lives (what ``family.load("student-...")`` reads)."""
    return family.STUDENTS_DIR / arch


def student_config(arch: str) -> PretrainedConfig:
    """The tiny-twin config of a student: the family twin with the reasoning vocabulary.

    The DeepseekV3 twin gets a wider hidden size and wider experts than ``family.tiny("r1")`` so
    that it learns addition in a few minutes; MLA, MoE routing and the dense first layer are kept.
    """
    tok = make_tokenizer()
    ids = dict(vocab_size=MODEL_VOCAB_SIZE, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, max_position_embeddings=tok.model_max_length)
    if arch == "qwen2":
        return family.tiny(ARCHS[arch], **ids)
    if arch == "deepseek_v3":
        return family.tiny(ARCHS[arch], hidden_size=128, intermediate_size=256, moe_intermediate_size=64, **ids)
    raise ValueError(f"unknown student arch {arch!r}: choose from {', '.join(ARCHS)}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a student run (nanoGPT style: plain values, one place)."""

    arch: str = "qwen2"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3  # peak AdamW learning rate, after linear warmup
    warmup: int = 100  # steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50  # steps between printed losses

    @classmethod
    def for_arch(cls, arch: str, **overrides) -> TrainConfig:
        """The recipe of the shipped ``arch`` student, with ``overrides`` (e.g. ``seed=1``)."""
        return cls(**{"arch": arch, "steps": STEPS[arch], **overrides})


def make_batch(problems: list[Problem], tok: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (shape batch x tokens) for teacher forcing (``steps.pad_right``).

    Labels are -100 on the prompt and the padding: the student learns to write the trace, the
    answer and ``<eos>``, not to guess the random numbers it is asked about. No attention mask:
    the padding comes last, after every token that carries a loss, and the students train without one.
    """
    rows = []
    for p in problems:
        prompt = tok(p.prompt)["input_ids"]
        target = tok(p.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt + target, [steps.IGNORE_INDEX] * len(prompt) + target))
    input_ids, labels, _ = steps.pad_right(rows, tok)
    return input_ids, labels


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` (0-based): ``steps.warmup_cosine`` with the config's lr, warmup and floor."""
    return steps.warmup_cosine(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)(step)


def train(cfg: TrainConfig, progress: bool = True,
          ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, list[tuple[int, float]]]:
    """Train a student from scratch on fresh training-split problems every step (``steps.train_loop``).

    Returns the model (fp32, CPU, eval mode), its tokenizer and the loss log: (step, mean loss over
    the last ``log_every`` steps) pairs, loss in nats per target token.
    """
    tok = make_tokenizer()
    model = family.build(student_config(cfg.arch), seed=cfg.seed)
    model.generation_config = GenerationConfig(
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    # torch's default AdamW kernel (not the fused one), as the shipped students were trained: bit for bit
    optimizer = optimizers.make_optimizer(model, "adamw", cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                          fused=False)
    rng = random.Random(cfg.seed)
    seeds = [rng.getrandbits(64) for _ in range(cfg.steps)]  # the problems of each step
    log, window = [], []

    def record(step: int, loss: float) -> None:
        window.append(loss)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.append((step + 1, sum(window) / len(window)))
            window.clear()
            tqdm.write(f"step {step + 1:5d}  loss {log[-1][1]:.4f}")

    steps.train_loop(model, optimizer,
                     lambda step: make_batch(sample(cfg.batch_size, seed=seeds[step], split="train"), tok),
                     cfg.steps, schedule=lambda step: learning_rate(step, cfg),
                     grad_clip=cfg.grad_clip, on_step=record, progress=progress, desc=f"train {cfg.arch}")
    return model, tok, log


@torch.no_grad()
def solve(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[str], batch_size: int = 100,
          progress: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` (batched, left-padded), decoded without special tokens."""
    completions = []
    device = next(model.parameters()).device
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="solve", disable=not progress):
        enc = tok(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        completions += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return completions


def accuracy(model: torch.nn.Module, tok: PreTrainedTokenizerBase, n: int = 200, seed: int = 0,
             task: str = "addition", progress: bool = True) -> float:
    """Exact-match accuracy (0..1) of the final answer on ``n`` held-out ``task`` problems.

    The model can be in any dtype, quantized or pruned, on any device: only ``generate`` is called.
    """
    problems = sample(n, seed=seed, split="heldout", task=task)
    completions = solve(model, tok, [p.prompt for p in problems], progress=progress)
    return sum(parse_answer(c) == p.answer for c, p in zip(completions, problems)) / n


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tok: PreTrainedTokenizerBase, n: int = 64, seed: int = 0,
                 task: str = "addition") -> float:
    """Teacher-forced loss (nats per target token) on ``n`` held-out ``task`` problems, in eval mode.

    Finer than exact-match accuracy: it moves before a single answer becomes right. The model's
    train/eval mode is restored afterwards.
    """
    input_ids, labels = make_batch(sample(n, seed=seed, split="heldout", task=task), tok)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss.item()
    model.train(was_training)
    return loss


def load_student(arch: str = "qwen2", **kwargs) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The shipped student of ``arch`` ("qwen2" or "deepseek_v3") and its tokenizer, offline.

    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``quantization_config``, ``device_map``, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown student arch {arch!r}: choose from {', '.join(ARCHS)}")
    path = student_dir(arch)
    return family.load(path, **kwargs).eval(), family.load_tokenizer(path)


def save(model: torch.nn.Module, tok: PreTrainedTokenizerBase, out: Path, log: list[tuple[int, float]],
         recipe: dict) -> None:
    """Write the student (``save_pretrained``), ``loss.csv`` and ``recipe.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_record(out, log, recipe)


def write_record(out: Path, log: list[tuple[int, float]], recipe: dict) -> None:
    """How a shipped artefact was made: ``loss.csv`` ((step, loss) rows) and ``recipe.json`` in ``out``."""
    (out / "loss.csv").write_text("step,loss\n" + "".join(f"{step},{loss:.6f}\n" for step, loss in log))
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``train`` a student into ``--out`` or ``eval`` the shipped one; bad input: one line, exit 2."""
    parser = Parser(prog="python -m lowmem_course.student", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a student from its seed and save it to --out")
    p_train.add_argument("--arch", choices=ARCHS, required=True)
    p_train.add_argument("--out", type=Path, required=True,
                         help="directory to save to (outside the package: the shipped student is never overwritten)")
    p_train.add_argument("--steps", type=positive_int, help="default: the shipped student's recipe")
    p_train.add_argument("--seed", type=int, default=TrainConfig.seed)
    p_eval = sub.add_parser("eval", help="exact-match accuracy of the shipped student")
    p_eval.add_argument("--arch", choices=ARCHS, required=True)
    p_eval.add_argument("--n", type=positive_int, default=EVAL_N, help="number of held-out problems")
    p_eval.add_argument("--seed", type=int, default=EVAL_SEED, help="seed that draws the held-out problems")
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            check_available(args.n, "heldout", "addition")
            model, tok = load_student(args.arch)
            print(f"accuracy: {accuracy(model, tok, n=args.n, seed=args.seed):.3f}")
            return 0
        check_out_folder(args.out)
    except ValueError as err:
        parser.fail(err)
    cfg = TrainConfig.for_arch(args.arch, seed=args.seed)
    cfg = replace(cfg, steps=args.steps) if args.steps else cfg
    start = time.perf_counter()
    model, tok, log = train(cfg)
    wall = time.perf_counter() - start
    acc = accuracy(model, tok, n=EVAL_N, seed=EVAL_SEED)
    args_text = shlex.join(argv if argv is not None else sys.argv[1:])
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python -m lowmem_course.student {args_text}"
    save(model, tok, args.out, log, dict(
        command=command, train_config=asdict(cfg), seed=cfg.seed, steps=cfg.steps,
        wall_seconds=round(wall, 1), final_loss=round(log[-1][1], 6), accuracy=acc,
        eval_n=EVAL_N, eval_seed=EVAL_SEED, eval_split="heldout", task="addition",
        threads=torch.get_num_threads(), torch=torch.__version__))
    print(f"saved to {args.out} ({wall:.0f} s)")
    print(f"accuracy: {acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
