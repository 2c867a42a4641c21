"""The training and inference steps that every measurement in the course runs.

Kept in one place so that a measured step, a simulated full-size step and a notebook's step are
the same code.
"""

from __future__ import annotations

import contextlib

import torch


def random_batch(vocab_size: int, batch: int, seq: int, device: str | torch.device = "cpu",
                 seed: int = 0) -> torch.Tensor:
    """Token ids of shape ``(batch, seq)``, drawn uniformly from the vocabulary."""
    if batch <= 0 or seq <= 0:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator).to(device)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One causal-LM training step (forward, loss, backward, optimizer step, zero grads).

    The model output is dropped as soon as the loss is taken, so only what autograd saved stays
    alive, as in a real training loop. ``autocast_dtype`` (bf16 or fp16) runs the forward pass
    under ``torch.autocast``. Returns the detached loss.
    """
    device_type = input_ids.device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def prefill_step(model: torch.nn.Module, input_ids: torch.Tensor) -> object:
    """The inference forward pass over a prompt; returns the KV cache it filled."""
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    return out.cache
