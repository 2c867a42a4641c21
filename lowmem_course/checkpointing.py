"""Activation checkpointing: keep fewer activations, recompute them in backward.

Policies, from most memory to least:

    "none"       every layer keeps what its backward needs
    "mlp"        selective: only the MLP (or MoE) of each layer is recomputed
    "attention"  selective: only the attention of each layer is recomputed
    "every-k"    whole layers, every k-th one (transformers' ``every_n_layers``)
    "full"       every decoder layer keeps only its input

Whole-layer policies use transformers' own ``activation_checkpointing_enable`` (non-reentrant
``torch.utils.checkpoint``); the selective ones wrap the attention or MLP module's ``forward`` the
same way.

Two companions, defined where the training step can reach them and importable from here too:
``offloaded(device)`` (``lowmem_course.host``) keeps what backward needs in host memory instead (with
a whole-layer policy: the layers' inputs); ``chunked_cross_entropy`` and ``causal_lm_loss``
(``lowmem_course.steps``) are the same idea for the loss: the logits of a 150k vocabulary are never
held whole.
"""

from __future__ import annotations

import re

import torch
from torch.utils.checkpoint import checkpoint

from lowmem_course.family import decoder_layers
from lowmem_course.host import offloaded
from lowmem_course.steps import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy, shift_labels

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "chunked_cross_entropy", "disable", "enable", "offloaded",
           "shift_labels"]

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
