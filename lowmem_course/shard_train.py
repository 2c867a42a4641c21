"""The training script that ``torchrun`` starts on every rank: a tiny twin trained with FSDP2.

Launch it through ``lowmem_course.shard.launch`` (or by hand)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m lowmem_course.shard_train \\
        --measure ddp,zero1,zero3 --out results.json

The same command runs on a cluster by changing only torchrun's options (``--nnodes``,
``--rdzv-endpoint``): the script reads its rank and world size from the environment torchrun sets.
On GPUs it uses NCCL, on CPUs gloo.

Two jobs, which one launch runs one after the other (a torchrun start costs seconds):

* ``--measure STRATEGIES`` trains each strategy for a few steps and records, per rank, the bytes of
  its local parameters, gradients and optimizer state (at rest, after an optimizer step) and the
  peak of one training step (``measure.track``). Strategies are the ZeRO stages as PyTorch options:
  ``ddp`` (nothing sharded), ``zero1`` (DDP + ``ZeroRedundancyOptimizer``: optimizer state sharded),
  ``zero2`` (``fully_shard(reshard_after_forward=False)``), ``zero3`` (``fully_shard``), ``zero3-bf16``
  (+ ``MixedPrecisionPolicy``), ``zero3-offload`` (+ ``CPUOffloadPolicy``) and ``qlora`` (``fully_shard``
  over an NF4 model stored in bf16, ``bnb_4bit_quant_storage=torch.bfloat16``, with LoRA adapters;
  ``qlora-uint8``: the same with bitsandbytes' default uint8 storage).
* ``--train-steps N`` trains with full sharding on a deterministic batch per step and rank:
  ``--reference FILE`` first trains uninterrupted and writes the final full weights; then, with
  ``--ckpt-dir`` or ``--final``, it trains saving the sharded training state with
  ``torch.distributed.checkpoint`` every ``--ckpt-every`` steps, resuming from the last checkpoint
  with ``--resume``, and writes the final full weights to ``--final``. ``--kill-rank R --kill-step S``
  makes rank R SIGKILL itself after step S of that run (the fault drill).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lowmem_course import family, measure, optimizers, steps
from lowmem_course.cmdline import positive_int

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3-bf16", "zero3-offload", "qlora", "qlora-uint8")
META_FILE = "lowmem_shard_meta.json"  # written beside every checkpoint: which model it belongs to
LR = 1e-3  # AdamW's learning rate in every run here


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of an optimizer's state on this rank (Adam's moments and step counters)."""
    inner = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def build_qlora(cfg, device: torch.device, seed: int, storage: torch.dtype) -> torch.nn.Module:
    """The twin quantized to NF4, its packed 4-bit data stored in tensors of ``storage`` dtype (bf16: FSDP
    shards it like any bf16 tensor), LoRA adapters on the attention projections, ready for ``fully_shard``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_quant_storage=storage)
    # from_pretrained is what quantizes: rank 0 saves the twin (transformers writes on rank 0 only), all load it
    shared = [tempfile.mkdtemp(prefix="lowmem-twin-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared)
    if dist.get_rank() == 0:
        family.build(cfg, seed=seed).save_pretrained(shared[0])
    dist.barrier()
    model = family.load(shared[0], quantization_config=quant, dtype=torch.bfloat16, device_map={"": device})
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(shared[0])
    for module in model.modules():  # CPU only: keep bnb from repacking the weights (breaks training)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    lora = LoraConfig(r=8, target_modules=family.lora_modules(model))
    return get_peft_model(model, lora).base_model.model  # the causal LM with adapters injected, base frozen


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """``model`` made data-parallel by ``strategy`` (one of ``STRATEGIES``).

    FSDP strategies shard each decoder layer, then the root (embeddings, final norm, head).
    """
    if strategy in ("ddp", "zero1"):
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    options: dict = {"reshard_after_forward": strategy != "zero2"}
    if strategy.startswith("qlora"):
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    if strategy == "zero3-bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if strategy == "zero3-offload":
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in family.decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def make_optimizer(model: torch.nn.Module, strategy: str) -> torch.optim.Optimizer:
    """AdamW at ``LR`` over ``model`` (torch's default kernel, ``fused=False``, as these runs always used);
    for ``zero1`` wrapped in ``ZeroRedundancyOptimizer`` (each rank keeps 1/N of the state)."""
    return optimizers.make_optimizer(model, "adamw", LR, zero=strategy == "zero1", fused=False)


def batch_for(step: int, rank: int, vocab: int, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """The batch rank ``rank`` trains on at ``step``: the same on every run, so runs can be compared bitwise."""
    return steps.random_batch(vocab, batch, seq, device=device, seed=10_000 * step + rank)


def measure_strategy(cfg, strategy: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One strategy's bytes on this rank: model states at rest and the peak of one training step."""
    rank = dist.get_rank()
    if strategy.startswith("qlora"):
        built = build_qlora(cfg, device, args.seed, torch.uint8 if strategy == "qlora-uint8" else torch.bfloat16)
    else:
        built = family.build(cfg, device=device, seed=args.seed)
    model = wrap(built, strategy, device)
    opt = make_optimizer(model, strategy)
    losses = []
    for step in range(2):  # warm-up: the optimizer state exists from here on, as in a real run
        ids = batch_for(step, rank, cfg.vocab_size, args.batch, args.seq, device)
        losses.append(steps.train_step(model, opt, ids).item())
    ids = batch_for(2, rank, cfg.vocab_size, args.batch, args.seq, device)
    with measure.track(model, opt, label=strategy) as peak:
        losses.append(steps.train_step(model, opt, ids).item())
    # DDP's gradient buckets are allocated when it wraps the model, out of the tracker's sight: no DDP peak
    peak_bytes = None if strategy in ("ddp", "zero1") else peak.peak_bytes
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params = list(model.parameters())
    trainable = sum(_local(p).numel() for p in params if p.requires_grad)
    state = {"parameters": measure.storage_bytes(*params),
             "gradients": measure.storage_bytes(*(p.grad for p in params if p.grad is not None)),
             "optimizer": measure.storage_bytes(*optimizer_tensors(opt))}
    opt.zero_grad(set_to_none=True)
    return {"strategy": strategy, "rank": rank, "state": state, "peak_bytes": peak_bytes,
            "state_device": str(_local(params[0]).device),
            "local_trainable_parameters": trainable, "losses": losses}


def checkpoint_meta(cfg) -> dict:
    """What a checkpoint must match to be loaded into a model: architecture and every shape-setting field."""
    return {"model_type": cfg.model_type, "name": cfg.name_or_path,
            "parameters": family.count_parameters(cfg).total,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size}


def latest_checkpoint(ckpt_dir: Path, cfg) -> tuple[Path, int]:
    """The newest complete checkpoint in ``ckpt_dir`` and its step.

    Raises ``FileNotFoundError`` when there is none, ``ValueError`` when it belongs to another model.
    """
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    meta_path = ckpt_dir / META_FILE
    done = sorted(ckpt_dir.glob("step_*/.done"))
    if not meta_path.is_file() or not done:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete lowmem checkpoint (no {META_FILE} or step_*/.done)")
    saved, expected = json.loads(meta_path.read_text()), checkpoint_meta(cfg)
    if saved != expected:
        diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        raise ValueError(f"{ckpt_dir} is a checkpoint of another model: (saved, this model) differ in {diff}")
    latest = done[-1].parent
    return latest, int(latest.name.removeprefix("step_"))


def train(cfg, args: argparse.Namespace, device: torch.device, ckpt_dir: Path | None, final: str | None,
          resume: bool = False, kill: bool = False) -> None:
    """Train ``args.train_steps`` fully sharded steps; write the full weights to ``final`` (rank 0).

    With ``ckpt_dir``, the sharded model and optimizer state are saved with DCP every
    ``args.ckpt_every`` steps (``resume``: start from the newest one); ``kill`` arms the drill.
    """
    rank = dist.get_rank()
    model = wrap(family.build(cfg, device=device, seed=args.seed), "zero3", device)
    opt = make_optimizer(model, "zero3")
    start = 0
    if resume:
        path, start = latest_checkpoint(ckpt_dir, cfg)
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    elif ckpt_dir is not None:
        if any(ckpt_dir.glob("step_*")):
            raise FileExistsError(f"{ckpt_dir} already holds checkpoints: resume from them or pick an empty directory")
        dist.barrier()  # every rank has looked before rank 0 writes
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / META_FILE).write_text(json.dumps(checkpoint_meta(cfg)))
    def after(step: int, loss: float) -> None:
        done = step + 1
        if ckpt_dir is not None and done % args.ckpt_every == 0:
            model_sd, optim_sd = get_state_dict(model, opt)
            path = ckpt_dir / f"step_{done:04d}"
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
            dist.barrier()
            if rank == 0:
                (path / ".done").touch()  # written only once every rank has saved its shard
        if kill and rank == args.kill_rank and done == args.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    losses = steps.train_loop(model, opt,
                              lambda step: (batch_for(step, rank, cfg.vocab_size, args.batch, args.seq, device),),
                              args.train_steps, start=start, on_step=after)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0 and final:
        save_file({k: v.detach().clone().contiguous() for k, v in full.items()}, final,
                  metadata={"resumed_from_step": str(start), "losses": json.dumps(losses)})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="r1-distill-qwen-1.5b", help="family member whose tiny twin is trained")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seq", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", default="", help=f"comma-separated strategies among {', '.join(STRATEGIES)}")
    p.add_argument("--out", help="JSON file rank 0 writes the measurements to")
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--ckpt-dir")
    p.add_argument("--ckpt-every", type=positive_int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--final", help="safetensors file rank 0 writes the final full weights to")
    p.add_argument("--reference", help="first train uninterrupted, without checkpoints, and write the final "
                                       "weights to this safetensors file")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    args = p.parse_args(argv)
    args.strategies = [s for s in args.measure.split(",") if s]
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}: choose among {', '.join(STRATEGIES)}")
    if args.strategies and not args.out:
        p.error("--measure needs --out")
    if args.resume and not args.ckpt_dir:
        p.error("--resume needs --ckpt-dir")
    return args


@record  # an uncaught exception is written to torchrun's error file: shard.launch names the rank and why
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        cfg = family.tiny(args.model)
        results = [measure_strategy(cfg, s, args, device) for s in args.strategies]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        if dist.get_rank() == 0 and args.out:
            Path(args.out).write_text(json.dumps({
                "world_size": dist.get_world_size(), "device": device.type,
                "parameters": family.count_parameters(cfg).total,
                "results": [r for per_rank in gathered for r in per_rank]}, indent=1))
        if args.train_steps and args.reference:
            train(cfg, args, device, ckpt_dir=None, final=args.reference)
        if args.train_steps and (args.ckpt_dir or args.final):
            train(cfg, args, device, ckpt_dir=Path(args.ckpt_dir) if args.ckpt_dir else None, final=args.final,
                  resume=args.resume, kill=True)
        # Every rank waits here before the group is torn down: a rank that tore down gloo while rank 0
        # was still writing the final weights sometimes aborted ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
