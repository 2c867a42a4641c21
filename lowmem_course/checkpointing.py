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

``tile_mlp(model)`` goes further inside each layer (ALST's TiledMLP): the MLP
runs over the sequence a tile of ``hidden_size`` tokens at a time and saves only its input, so its
wide intermediates exist for one tile, in forward and in backward, whatever the context length.

Two companions, defined where the training step can reach them and importable from here too:
``offloaded(device)`` (``lowmem_course.host``) keeps what backward needs in host memory instead (with
a whole-layer policy: the layers' inputs); ``chunked_cross_entropy`` and ``causal_lm_loss``
(``lowmem_course.steps``) are the same idea for the loss: the logits of a 150k vocabulary are never
held whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from lowmem_course.family import decoder_layers
from lowmem_course.host import offloaded
from lowmem_course.steps import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy, shift_labels

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "chunked_cross_entropy", "disable", "enable", "offloaded",
           "shift_labels", "tile_mlp"]

_EVERY = re.compile(r"every-([1-9][0-9]*)")


def _checkpoint_module(module: torch.nn.Module) -> None:
    """Make ``module`` recompute its forward in backward (non-reentrant) while training."""
    forward = module.forward

    def checkpointed_forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed_forward


class _TiledMLP(torch.autograd.Function):
    """``forward`` (an MLP's) over ``x`` one tile of ``tile`` tokens at a time, saving only ``x``.

    Forward runs without autograd, each tile's output copied into one output tensor; backward runs
    each tile's forward again, then its backward, and returns the input's gradient and the summed
    gradients of ``params`` (the MLP's trainable ones), so autograd accumulates each parameter's
    gradient once, as without tiling (an optimizer stepped in backward sees whole gradients). No
    dropout in these MLPs: no RNG state to replay.
    """

    @staticmethod
    def forward(ctx, forward: Callable[[torch.Tensor], torch.Tensor], tile: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp_forward, ctx.tile, ctx.params = forward, tile, params
        ctx.autocast = {"device_type": x.device.type, "enabled": torch.is_autocast_enabled(x.device.type),
                        "dtype": torch.get_autocast_dtype(x.device.type)}
        ctx.save_for_backward(x)
        out = None
        for i, part in enumerate(x.detach().reshape(1, -1, x.shape[-1]).split(tile, dim=1)):
            y = forward(part)
            if out is None:
                out = y.new_empty(1, x[..., 0].numel(), y.shape[-1])
            out[:, i * tile:i * tile + part.shape[1]] = y
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        flat, grad = x.reshape(1, -1, x.shape[-1]), grad.reshape(1, -1, grad.shape[-1])
        x_grad = torch.empty_like(flat) if x.requires_grad else None
        param_grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        for i, (part, part_grad) in enumerate(zip(flat.split(ctx.tile, dim=1), grad.split(ctx.tile, dim=1))):
            part = part.detach().requires_grad_(x.requires_grad)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                y = ctx.mlp_forward(part)
            grads = torch.autograd.grad(y, ([part] if x_grad is not None else []) + list(ctx.params), part_grad,
                                        allow_unused=True)
            if x_grad is not None:
                x_grad[:, i * ctx.tile:i * ctx.tile + part.shape[1]] = grads[0]
                grads = grads[1:]
            param_grads = [g if a is None else a if g is None else a.add_(g) for a, g in zip(param_grads, grads)]
        return None, None, None if x_grad is None else x_grad.view_as(x), *param_grads


def tile_mlp(model: torch.nn.Module) -> None:
    """Run every decoder layer's MLP (or MoE block) a tile of ``hidden_size`` tokens at a time
    while training (``_TiledMLP``); its intermediates exist for one tile only.

    Tiles of ``hidden_size`` tokens, after ALST (Arctic Long Sequence Training, 2025): a tile's
    widest intermediates (tokens x intermediate size) are then about one MLP weight matrix. Costs
    one more forward of the MLP in backward; meant inside checkpointed layers (``lowmem train``'s
    ``tiled-mlp`` needs ``checkpointing``)."""
    tile = model.config.hidden_size
    for layer in decoder_layers(model):
        mlp = layer.mlp
        forward = mlp.forward

        def tiled_forward(x: torch.Tensor, mlp: torch.nn.Module = mlp, forward=forward) -> torch.Tensor:
            if not (mlp.training and torch.is_grad_enabled()):
                return forward(x)
            return _TiledMLP.apply(forward, tile, x, *(p for p in mlp.parameters() if p.requires_grad))

        mlp.forward = tiled_forward


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
