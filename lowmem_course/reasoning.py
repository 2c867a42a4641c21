"""R1-style reasoning traces: verifiable problems, a teacher that writes the steps, a tokenizer.

The teacher is a program. For ``482+357=`` it writes the column method, units column first, each
step as ``top+bottom+carry=`` followed by two digits (the new carry, then the digit written down)::

    482+357=<think>2+7+0=09,8+5+0=13,4+3+1=08</think>839

Subtraction (the skill the student has *not* seen, taught later with QLoRA) uses the same layout,
with a borrow instead of a carry::

    482-357=<think>2-7-0=15,8-5-1=02,4-3-0=01</think>125

Every problem belongs to exactly one split, decided by a hash of its prompt, so problems drawn for
evaluation (any seed) are never problems the student was trained on.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

DIGITS = 3  # operands have exactly this many digits (100..999)
HELDOUT_PERCENT = 10  # share of all problems reserved for evaluation
THINK, END_THINK = "<think>", "</think>"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
VOCAB = [PAD, BOS, EOS, UNK, THINK, END_THINK, *"0123456789+-=,"]
MODEL_VOCAB_SIZE = 32  # embedding rows: len(VOCAB) rounded up to a multiple of 16

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Problem:
    """One problem with its teacher solution."""

    prompt: str  # e.g. "482+357="
    trace: str  # "<think>...</think>", the reasoning steps
    answer: str  # e.g. "839", the verifiable final answer

    @property
    def completion(self) -> str:
        """What the model must write after the prompt: the trace, then the answer."""
        return self.trace + self.answer

    @property
    def text(self) -> str:
        """The whole training example, prompt included."""
        return self.prompt + self.completion


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """Digit pairs of ``a`` and ``b``, units first."""
    return [(a // 10**i % 10, b // 10**i % 10) for i in range(DIGITS)]


def addition(a: int, b: int) -> Problem:
    """``a+b`` solved column by column with carries."""
    steps, carry = [], 0
    for x, y in _columns(a, b):
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return Problem(f"{a}+{b}=", THINK + ",".join(steps) + END_THINK, str(a + b))


def subtraction(a: int, b: int) -> Problem:
    """``a-b`` (``a >= b``) solved column by column with borrows: ``x-y-borrow=`` then borrow, digit."""
    if a < b:
        raise ValueError(f"subtraction needs a >= b, got {a}-{b}")
    steps, borrow = [], 0
    for x, y in _columns(a, b):
        diff = x - y - borrow
        new_borrow = int(diff < 0)
        steps.append(f"{x}-{y}-{borrow}={new_borrow}{diff % 10}")
        borrow = new_borrow
    return Problem(f"{a}-{b}=", THINK + ",".join(steps) + END_THINK, str(a - b))


def _random_addition(rng: random.Random) -> Problem:
    lo, hi = 10 ** (DIGITS - 1), 10**DIGITS - 1
    return addition(rng.randint(lo, hi), rng.randint(lo, hi))


def _random_subtraction(rng: random.Random) -> Problem:
    lo, hi = 10 ** (DIGITS - 1), 10**DIGITS - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return subtraction(max(a, b), min(a, b))


TASKS: dict[str, Callable[[random.Random], Problem]] = {
    "addition": _random_addition,  # the skill the shipped students learned
    "subtraction": _random_subtraction,  # a new skill, for the QLoRA notebook
}


# How many distinct problems each split holds (counted over every operand pair by
# tests/test_reasoning_limits.py): ``sample`` refuses to draw more, instead of searching forever.
SPLIT_SIZES: dict[tuple[str, Split], int] = {
    ("addition", "train"): 729_263, ("addition", "heldout"): 80_737,  # of 900 x 900 ordered pairs
    ("subtraction", "train"): 364_871, ("subtraction", "heldout"): 40_579,  # of 900 x 901 / 2 pairs a >= b
}


def split_of(prompt: str) -> Split:
    """The split a problem belongs to, from a hash of its prompt (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def check_available(n: int, split: Split, task: str) -> None:
    """``ValueError`` (one line) unless ``split`` holds ``n`` distinct problems of ``task`` (``SPLIT_SIZES``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: known tasks are {', '.join(TASKS)}")
    if (task, split) not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}: the splits are train and heldout")
    if n > SPLIT_SIZES[task, split]:
        raise ValueError(f"the {split} split holds {SPLIT_SIZES[task, split]:,} {task} problems, "
                         f"fewer than the {n:,} asked for")


def sample(n: int, seed: int, split: Split = "heldout", task: str = "addition") -> list[Problem]:
    """``n`` distinct problems of ``task`` from ``split``, the same ones for the same seed.

    ``ValueError`` when the split holds fewer than ``n`` problems (``check_available``).
    """
    check_available(n, split, task)
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < n:
        problem = TASKS[task](rng)
        if problem.prompt not in seen and split_of(problem.prompt) == split:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems


def parse_answer(completion: str) -> str:
    """The final answer in a generated completion: the text after ``</think>`` ("" if none)."""
    _, sep, answer = completion.partition(END_THINK)
    return answer.strip() if sep else ""


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (``<think>`` and ``</think>`` are one token each).

    It prepends ``<bos>``, pads on the left (for batched generation) and round-trips every trace:
    ``decode(encode(text), skip_special_tokens=True) == text``.
    """
    core = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"</?think>|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB.index(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=64)
