"""The training and inference steps that every measurement and every training run in the course runs.

Kept in one place so that a measured step, a simulated full-size step, a notebook's step and the
runs of ``lowmem train``, the students, the skills experiment and pruning's recovery are the same code:

- ``train_step``: one optimizer step: forward with labels (and an attention mask) under autocast,
  backward (through a loss scaler for fp16; over ``accumulate`` micro-batches), clip, step, zero grads;
  optionally with the loss made a chunk of tokens at a time and the saved activations in host memory;
- ``causal_lm_loss``: the loss the step takes, plain (transformers' own) or chunked
  (``chunked_cross_entropy``: the full logits never exist);
- ``train_loop``: ``train_step`` for each step of a run: the step's batch and learning rate, a start
  step to resume from, a callback after each step (logging, checkpoints), an optional progress bar;
- ``warmup_cosine``: the learning-rate schedule of the course's runs;
- ``pad_right``: a training batch from token ids and labels, padded by the tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from lowmem_course import host, precision
from lowmem_course.optimizers import StepInBackward

IGNORE_INDEX = -100  # label of positions that carry no loss (Hugging Face's convention)
Batch = tuple[torch.Tensor, ...]  # (input_ids, labels) or (input_ids, labels, attention_mask), batch x tokens
# Tokens per chunk of the chunked loss: one chunk's fp32 logits are 256 x 151,936 x 4 B = 148 MiB for
# Qwen's vocabulary, whatever the sequence length, and a 256-row matmul still runs at full speed on a
# GPU. torchtune cuts the sequence into 8 chunks instead (a chunk grows with the sequence); Liger's
# fused kernel picks about tokens x hidden / vocab rows, so a chunk's logits are the size of the
# hidden states, and writes the gradients in the same pass.
LOSS_CHUNK_TOKENS = 256


def random_batch(vocab_size: int, batch: int, seq: int, device: str | torch.device = "cpu",
                 seed: int = 0) -> torch.Tensor:
    """Token ids of shape ``(batch, seq)``, drawn uniformly from the vocabulary."""
    if batch <= 0 or seq <= 0:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator).to(device)


def pad_right(rows: Sequence[tuple[Sequence[int], Sequence[int]]], tokenizer: Any) -> Batch:
    """A training batch from ``(token ids, labels)`` rows: ``(input_ids, labels, attention_mask)``.

    ``input_ids`` are right-padded with the tokenizer's pad token by ``tokenizer.pad`` (whatever
    side it pads for generation), ``labels`` with ``IGNORE_INDEX``, and ``attention_mask`` is 0 on
    the padding; int64, shape (rows, longest row). Each row's ids and labels have the same length.
    """
    if not rows or any(len(ids) != len(labels) for ids, labels in rows):
        raise ValueError("need at least one row, each with as many labels as token ids")
    encoded = tokenizer.pad({"input_ids": [list(ids) for ids, _ in rows]}, padding_side="right",
                            return_attention_mask=True, return_tensors="pt")
    labels = pad_sequence([torch.tensor(labels) for _, labels in rows], batch_first=True, padding_value=IGNORE_INDEX)
    return encoded["input_ids"], labels, encoded["attention_mask"]


def _chunk_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.Tensor | torch.nn.Module, labels: torch.Tensor,
                          chunk_tokens: int = LOSS_CHUNK_TOKENS,
                          num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy (nats per target token) of the logits ``head(hidden)``, ``chunk_tokens`` rows at a time.

    ``hidden`` is (tokens, hidden size); ``head`` the LM head's weight (vocab, hidden size) or the
    module that maps hidden states to logits (a LoRA-wrapped head); ``labels`` (tokens,) with
    ``IGNORE_INDEX`` where there is no target. Each chunk's logits are made in the autocast dtype,
    upcast to fp32 as transformers' loss does, reduced and freed in forward, and made again in
    backward (non-reentrant checkpoint), so at most one chunk of (chunk_tokens x vocab) logits exists
    at any time instead of all of them. The summed loss is divided by the number of targets, or by
    ``num_items_in_batch`` (the whole batch's targets, when this is one micro-batch of it).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (tokens, hidden) and labels (tokens,), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    project = head if isinstance(head, torch.nn.Module) else functools.partial(F.linear, weight=head)
    total = sum(checkpoint(_chunk_loss, h, project, y, use_reentrant=False)
                for h, y in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens)))
    if num_items_in_batch is None:
        num_items_in_batch = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / num_items_in_batch


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: ``labels`` moved one place left, ``IGNORE_INDEX`` after the last token."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, *, chunk_tokens: int | None = None,
                   num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
    """The causal-LM loss (nats per target token) of a ``...ForCausalLM`` or a PEFT model around one.

    Plain when ``chunk_tokens`` is None: ``model(input_ids, attention_mask, labels).loss``,
    transformers' own loss over full fp32 logits. Chunked otherwise: the decoder runs to its last
    hidden states and ``chunked_cross_entropy`` takes the loss over the LM head (the base model's
    output embeddings, whatever wraps them), so the full logits never exist; same value and gradients
    up to rounding. ``labels`` default to ``input_ids``; ``num_items_in_batch`` divides the summed
    loss instead of this batch's target count (transformers' name: accumulation over micro-batches).
    """
    labels = input_ids if labels is None else labels
    items = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    if chunk_tokens is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **items).loss
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return chunked_cross_entropy(hidden.flatten(0, 1), base.get_output_embeddings(), shift_labels(labels).flatten(),
                                 chunk_tokens, num_items_in_batch)


def _refuse_with_step_in_backward(scaler: torch.amp.GradScaler | None, grad_clip: float | None,
                                  accumulate: int) -> None:
    if grad_clip is not None:
        raise ValueError("a step in backward steps each parameter as soon as its gradient is made: there is no "
                         "global gradient norm to clip by (drop grad_clip)")
    if scaler is not None:
        raise ValueError("a step in backward cannot take a loss scaler: the scaler must unscale and check every "
                         "gradient before any step (use bf16 autocast)")
    if accumulate > 1:
        raise ValueError("a step in backward steps each parameter as soon as its gradient is made: there is no "
                         f"gradient left to accumulate {accumulate} micro-batches into (accumulate=1)")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
               autocast_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               grad_clip: float | None = None, accumulate: int = 1, chunked_loss: bool = False,
               offload_activations: bool = False) -> torch.Tensor:
    """One causal-LM training step; returns the detached loss (nats per target token).

    Forward with ``labels`` (default: ``input_ids``) and ``attention_mask`` under
    ``torch.autocast(autocast_dtype)`` (None or float32: no autocast); backward, through ``scaler``
    when one is given (a ``torch.amp.GradScaler``: ``precision.make_scaler``); the trainable
    parameters' gradient norm clipped to ``grad_clip`` (the gradients the optimizer steps); the
    optimizer step; gradients set to None. The model output is dropped as soon as the loss is taken,
    so only what autograd saved stays alive, as in every real training loop.

    ``accumulate`` > 1 splits the batch into that many micro-batches (along dim 0) and runs forward
    and backward on each before the one optimizer step: the activations of one micro-batch at a
    time, the gradients of the whole batch. Each micro-batch's loss is its summed token losses over
    the whole batch's target tokens (transformers' ``num_items_in_batch``), so loss and gradients
    equal the whole batch's up to rounding.

    ``chunked_loss`` takes the loss ``LOSS_CHUNK_TOKENS`` tokens at a time (``causal_lm_loss``), so
    the full logits never exist. ``offload_activations`` runs each forward in ``host.offloaded``:
    what autograd saves goes to host memory and comes back in backward. An optimizer that steps in
    backward (``optimizers.StepInBackward``) refuses ``grad_clip``, ``scaler`` and ``accumulate`` > 1.
    """
    if not 1 <= accumulate <= input_ids.shape[0]:
        raise ValueError(f"accumulate must be in 1..{input_ids.shape[0]} (the batch size), got {accumulate}")
    if isinstance(optimizer, StepInBackward):
        _refuse_with_step_in_backward(scaler, grad_clip, accumulate)
    labels = input_ids if labels is None else labels
    # a micro-batch's loss is its summed token losses over the whole batch's targets
    targets = None if accumulate == 1 else (labels[..., 1:] != IGNORE_INDEX).sum()
    masks = [None] * accumulate if attention_mask is None else attention_mask.tensor_split(accumulate)
    loss = torch.zeros((), device=input_ids.device)
    for ids, micro_labels, mask in zip(input_ids.tensor_split(accumulate), labels.tensor_split(accumulate), masks):
        offloaded = host.offloaded(input_ids.device) if offload_activations else contextlib.nullcontext()
        with precision.autocast(input_ids.device, autocast_dtype or torch.float32), offloaded:
            part = causal_lm_loss(model, ids, micro_labels, mask, num_items_in_batch=targets,
                                  chunk_tokens=LOSS_CHUNK_TOKENS if chunked_loss else None)
        (part if scaler is None else scaler.scale(part)).backward()
        loss += part.detach()
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when the fp16 gradients hold inf or NaN
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def warmup_cosine(lr: float, warmup: int, steps: int, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """The learning rate of each step (0-based) of a ``steps``-step run: linear warmup over the first
    ``warmup`` steps up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at step ``steps``."""
    if lr <= 0 or warmup < 0 or steps <= 0 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"need lr > 0, warmup >= 0, steps > 0 and 0 <= min_lr_ratio <= 1, got lr={lr}, "
                         f"warmup={warmup}, steps={steps}, min_lr_ratio={min_lr_ratio}")

    def learning_rate(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return learning_rate


def train_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[int], Batch],
               steps: int, *, start: int = 0, schedule: Callable[[int], float] | None = None,
               on_step: Callable[[int, float], None] | None = None,
               around_step: Callable[[int], contextlib.AbstractContextManager] | None = None,
               autocast_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               grad_clip: float | None = None, accumulate: int = 1, chunked_loss: bool = False,
               offload_activations: bool = False, progress: bool = False, desc: str = "train") -> list[float]:
    """Train steps ``start`` to ``steps - 1`` with ``train_step``; returns their losses (nats per target token).

    Step ``i`` trains on ``batches(i)`` (``(input_ids, labels[, attention_mask])``, moved to the
    model's device) at the learning rate ``schedule(i)`` (default: the optimizer's own), with the
    step options of ``train_step``. ``start`` > 0 resumes a run: the steps before it are not run.
    ``on_step(i, loss)`` runs after each step (logging, checkpoints; an exception stops the run),
    ``around_step(i)`` is a context the step runs in (say, a memory measurement of the last one).
    ``progress`` shows a tqdm bar labelled ``desc``. The model trains in train mode and is left in
    eval mode.
    """
    if steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not 0 <= start <= steps:
        raise ValueError(f"start must be in 0..{steps} (steps), got {start}")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    losses = []
    model.train()
    for step in tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
        batch = tuple(t.to(device) for t in batches(step))
        with around_step(step) if around_step is not None else contextlib.nullcontext():
            loss = train_step(model, optimizer, *batch, autocast_dtype=autocast_dtype, scaler=scaler,
                              grad_clip=grad_clip, accumulate=accumulate, chunked_loss=chunked_loss,
                              offload_activations=offload_activations).item()
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    model.eval()
    return losses


def prefill_step(model: torch.nn.Module, input_ids: torch.Tensor) -> object:
    """The inference forward pass over a prompt; returns the KV cache it filled."""
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    return out.cache
