"""Activation checkpointing: keep fewer activations, recompute them in backward.

Policies, from most memory to least:

    "none"       every layer keeps what its backward needs
    "mlp"        selective: only the MLP (or MoE) of each layer is recomputed
    "attention"  selective: only the attention of each layer is recomputed
    "every-k"    whole layers, every k-th one (transformers' ``every_n_layers``)
    "full"       every decoder layer keeps only its input

Whole-layer policies use transformers' own ``activation_checkpointing_enable`` (non-reentrant
``torch.utils.checkpoint``); the selective ones wrap the attention or MLP module's ``forward`` the
same way. ``offloaded`` moves whatever backward keeps to host memory instead
(``torch.autograd.graph.save_on_cpu``). ``chunked_cross_entropy`` is the same idea for the loss:
the logits of a 150k vocabulary are never held whole.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lowmem_course.family import decoder_layers
from lowmem_course.steps import IGNORE_INDEX

_EVERY = re.compile(r"every-([1-9][0-9]*)")


def _checkpoint_module(module: torch.nn.Module) -> None:
    """Make ``module`` recompute its forward in backward (non-reentrant) while training."""
    forward = module.forward

    def checkpointed_forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed_forward


def enable(model: torch.nn.Module, policy: str) -> None:
    """Apply ``policy`` ("none", "full", "every-k" with k >= 1, "attention" or "mlp") to ``model``.

    Any policy applied before is removed first, so policies do not stack.
    """
    disable(model)
    every = _EVERY.fullmatch(policy)
    if policy == "none":
        return
    if policy == "full" or every:
        model.activation_checkpointing_enable({"use_reentrant": False},
                                              every_n_layers=int(every.group(1)) if every else 1)
    elif policy in ("attention", "mlp"):
        for layer in decoder_layers(model):
            _checkpoint_module(layer.self_attn if policy == "attention" else layer.mlp)
    else:
        raise ValueError(f"unknown checkpointing policy {policy!r}: choose none, full, every-K (e.g. every-2), "
                         "attention or mlp")


def disable(model: torch.nn.Module) -> None:
    """Remove every checkpointing policy from ``model`` (whole-layer and selective)."""
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    for layer in decoder_layers(model):
        for module in (layer.self_attn, layer.mlp):
            module.__dict__.pop("forward", None)


def offloaded(device: str | torch.device) -> contextlib.AbstractContextManager:
    """A context in which the tensors autograd saves for backward are kept in host memory.

    Forward copies each one to the host (pinned when ``device`` is CUDA, so the copies can
    overlap) and backward copies it back. On a CPU the host *is* the device: nothing is saved.
    """
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.device(device).type == "cuda")


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``labels``, ``chunk_tokens`` rows at a time.

    ``hidden`` is (tokens, hidden size), ``weight`` the LM head (vocab, hidden size), ``labels``
    (tokens,) with ``IGNORE_INDEX`` where there is no target. Each chunk's logits are made, reduced
    and freed in forward, and made again in backward (non-reentrant checkpoint), so at most one chunk
    of (chunk_tokens x vocab) fp32 logits exists at any time instead of all of them.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (tokens, hidden) and labels (tokens,), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    total = sum(checkpoint(_chunk_loss, h, weight, y, use_reentrant=False)
                for h, y in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens)))
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: ``labels`` moved one place left, ``IGNORE_INDEX`` after the last token."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """The causal-LM loss of a ``...ForCausalLM``: plain when ``chunk_tokens`` is None, else chunked.

    Plain is what ``model(input_ids, labels=labels).loss`` computes (full fp32 logits); chunked
    gives the same value and gradients while holding one chunk of logits at a time.
    """
    labels = input_ids if labels is None else labels
    if chunk_tokens is None:
        return model(input_ids=input_ids, labels=labels).loss
    hidden = model.model(input_ids=input_ids).last_hidden_state
    return chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, shift_labels(labels).flatten(),
                                 chunk_tokens)
