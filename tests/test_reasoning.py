"""The teacher's traces, the train/held-out split and the character tokenizer."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lowmem_course.reasoning import (
    END_THINK,
    THINK,
    VOCAB,
    addition,
    make_tokenizer,
    parse_answer,
    sample,
    split_of,
    subtraction,
)

operand = st.integers(min_value=100, max_value=999)
TOK = make_tokenizer()


def test_addition_trace_is_the_column_method():
    p = addition(482, 357)
    assert p.prompt == "482+357="
    assert p.trace == "<think>2+7+0=09,8+5+0=13,4+3+1=08</think>"
    assert p.answer == "839"
    assert p.text == "482+357=<think>2+7+0=09,8+5+0=13,4+3+1=08</think>839"
    assert addition(999, 999).completion == "<think>9+9+0=18,9+9+1=19,9+9+1=19</think>1998"


def test_subtraction_trace_borrows():
    assert subtraction(482, 357).completion == "<think>2-7-0=15,8-5-1=02,4-3-0=01</think>125"
    assert subtraction(500, 499).completion == "<think>0-9-0=11,0-9-1=10,5-4-1=00</think>1"
    with pytest.raises(ValueError, match="a >= b"):
        subtraction(100, 101)


@given(operand, operand)
def test_addition_steps_rebuild_the_answer(a: int, b: int):
    p = addition(a, b)
    steps = re.findall(r"(\d)\+(\d)\+(\d)=(\d)(\d)", p.trace)
    assert len(steps) == 3
    carry, digits = 0, ""
    for x, y, c, new_carry, digit in steps:
        assert int(c) == carry and int(x) + int(y) + carry == 10 * int(new_carry) + int(digit)
        carry, digits = int(new_carry), digit + digits
    assert p.answer == str(int(f"{carry}{digits}")) == str(a + b)


@given(operand, operand)
def test_subtraction_steps_rebuild_the_answer(a: int, b: int):
    a, b = max(a, b), min(a, b)
    p = subtraction(a, b)
    steps = re.findall(r"(\d)-(\d)-(\d)=(\d)(\d)", p.trace)
    assert len(steps) == 3
    borrow, digits = 0, ""
    for x, y, c, new_borrow, digit in steps:
        assert int(c) == borrow and int(x) - int(y) - borrow == int(digit) - 10 * int(new_borrow)
        borrow, digits = int(new_borrow), digit + digits
    assert borrow == 0 and p.answer == str(int(digits)) == str(a - b)


@given(operand, operand, st.sampled_from([addition, subtraction]))
def test_tokenizer_round_trips_every_trace(a: int, b: int, task):
    text = task(max(a, b), min(a, b)).text
    ids = TOK(text)["input_ids"]
    assert ids[0] == TOK.bos_token_id and TOK.unk_token_id not in ids
    # one token per character, except <think> and </think> which are one token each
    assert len(ids) == 1 + len(text) - (len(THINK) - 1) - (len(END_THINK) - 1)
    assert TOK.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_vocabulary_and_specials():
    assert len(TOK) == len(VOCAB) == 20
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id) == (0, 1, 2)
    assert TOK.convert_ids_to_tokens(TOK("1+2=<think>")["input_ids"]) == ["<bos>", "1", "+", "2", "=", "<think>"]


def test_tokenizer_saves_and_loads_with_autotokenizer(tmp_path):
    TOK.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = addition(123, 456).text
    assert loaded(text)["input_ids"] == TOK(text)["input_ids"]
    batch = loaded(["1+2=", "482+357="], padding=True)
    assert batch["input_ids"][0][:4] == [0, 0, 0, 0]  # left padding, for batched generation
    assert batch["attention_mask"][0] == [0, 0, 0, 0, 1, 1, 1, 1, 1]


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.sampled_from(["addition", "subtraction"]))
def test_splits_never_overlap(seed: int, task: str):
    heldout = sample(200, seed, "heldout", task)
    train = sample(200, seed, "train", task)
    assert all(split_of(p.prompt) == "heldout" for p in heldout)
    assert all(split_of(p.prompt) == "train" for p in train)
    assert not {p.prompt for p in heldout} & {p.prompt for p in train}


def test_heldout_is_a_tenth_of_all_problems():
    prompts = [f"{a}+{b}=" for a in range(100, 1000) for b in range(100, 1000, 7)]
    share = sum(split_of(p) == "heldout" for p in prompts) / len(prompts)
    assert 0.095 < share < 0.105


def test_sample_is_deterministic_and_distinct():
    first = sample(500, seed=0)
    assert first == sample(500, seed=0)
    assert len({p.prompt for p in first}) == 500
    assert first != sample(500, seed=1)
    with pytest.raises(ValueError, match="unknown task"):
        sample(1, 0, task="division")


@pytest.mark.parametrize("completion, answer", [
    ("<think>2+7+0=09</think>839", "839"),
    ("<think>2+7+0=09</think>", ""),
    ("<think>2+7+0=09,8+5", ""),
    ("839", ""),
])
def test_parse_answer(completion: str, answer: str):
    assert parse_answer(completion) == answer
