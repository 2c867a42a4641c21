# %% [markdown]
# # 05 · Sharding with FSDP: from one device to a cluster
#
# Full fine-tuning of R1-Distill-Qwen-7B needs about 16 bytes per parameter for the weights,
# gradients and AdamW state alone: some 120 GB, more than any single 80 GB GPU. Every GPU of a
# data-parallel job holds all of it, twice, eight times. **Sharding** splits those bytes over the
# GPUs instead: N ranks, 1/N each. PyTorch does it with FSDP2 (`fully_shard`); this notebook runs
# it on two real processes that talk over gloo, measures what each rank holds, kills one mid-run and
# resumes without losing a step.
#
# **What you will learn**
# - launch a training script on N ranks from a notebook with `torchrun`, and read back what each rank measured
# - the ZeRO stages as FSDP2 options, measured per rank against the ZeRO formulas; mixed precision and CPU offload
# - save sharded training state with `torch.distributed.checkpoint`, survive a killed rank, resume bitwise, reshard on load
# - what FSDP + QLoRA needs (`bnb_4bit_quant_storage`), run here
# - the multi-node command, and how many 80 GB GPUs each R1 model needs

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from safetensors import safe_open

from lowmem_course import family, plots, shard
from lowmem_course.estimate import Setup, estimate
from lowmem_course.units import format_bytes

NAME = "r1-distill-qwen-1.5b"  # the ranks train the tiny twin of this member
WORLD = 2                      # ranks (processes) on this machine
cfg = family.tiny(NAME)
n_params = family.count_parameters(cfg).total
print(f"tiny twin of {NAME}: {n_params:,} parameters, {cfg.num_hidden_layers} layers")

# %% [markdown]
# ## 1 · Predict
#
# The ZeRO paper (Rajbhandari et al., 2020) counts, per rank, for Ψ parameters in fp32 with AdamW:
# - **ZeRO-0** (plain data parallel, DDP): 4Ψ weights + 4Ψ gradients + 8Ψ optimizer = 16Ψ
# - **ZeRO-1**: optimizer state split over N ranks
# - **ZeRO-2**: gradients split too
# - **ZeRO-3**: parameters split too: 16Ψ / N

# %%
predicted = {stage: shard.zero_state_bytes(n_params, WORLD, stage) for stage in range(4)}
for stage, parts in predicted.items():
    print(f"ZeRO-{stage}: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
          + f" -> {format_bytes(sum(parts.values()))} per rank")
est = estimate(cfg, Setup(mode="full", precision="fp32", batch=2, seq=64, gpus=WORLD, zero=3)).bytes
print(f"course estimator, ZeRO-3 on {WORLD} ranks: weights {format_bytes(est['weights'])}, "
      f"optimizer {format_bytes(est['optimizer'])} per rank")

# %% [markdown]
# ## 2 · Launch two ranks
#
# `lowmem_course/shard_train.py` is an ordinary training script; `torchrun` starts it once per rank
# and each copy learns its rank from the environment. A launch costs seconds (every rank imports
# PyTorch), so **one job** does three things in a row:
# 1. measures 8 configurations (below), each for 3 steps, every rank reporting its own bytes
# 2. trains the fully sharded twin for 8 steps without interruption: the **reference**
# 3. trains the same 8 steps again, saving a checkpoint every 2 steps, and **rank 1 SIGKILLs itself
#    after step 5**, as a crashed node would (section 4 picks it up)
#
# `shard.launch` runs `sys.executable -m torch.distributed.run --standalone` (a free port each time)
# with a timeout, and turns a dead rank into an exception naming its exit code.

# %%
work = Path(tempfile.mkdtemp(prefix="lowmem-05-"))
STRATEGIES = ["ddp", "zero1", "zero2", "zero3", "zero3-bf16", "zero3-offload", "qlora", "qlora-uint8"]
STEPS, EVERY, KILL_AT = 8, 2, 5
job = ["--model", NAME, "--measure", ",".join(STRATEGIES), "--out", str(work / "bytes.json"),
       "--train-steps", str(STEPS), "--reference", str(work / "reference.safetensors"),
       "--ckpt-dir", str(work / "ckpt"), "--ckpt-every", str(EVERY), "--kill-rank", "1", "--kill-step", str(KILL_AT)]
print(" ".join(["python", *shard.torchrun_command(job, WORLD)[1:]]).replace(str(work), "$WORK"))

# %%
failure = None
try:
    shard.launch(job, nproc=WORLD, timeout_s=300)
except shard.RankFailed as err:  # expected: the drill kills rank 1
    failure = err
print(failure)

# %% [markdown]
# ## 3 · Measure: what each rank holds
#
# Every rank summed the storages of its **local** tensors after an optimizer step (a sharded
# parameter is a `DTensor`; `to_local()` is this rank's piece), so padding and buckets count.
# - `ddp`: `DistributedDataParallel`, nothing sharded (ZeRO-0)
# - `zero1`: DDP + `ZeroRedundancyOptimizer` (optimizer state sharded)
# - `zero2`: `fully_shard(layer, reshard_after_forward=False)`; `zero3`: `fully_shard(layer)`
# - `zero3-bf16`: + `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`; `zero3-offload`: + `CPUOffloadPolicy`

# %%
measured = json.loads((work / "bytes.json").read_text())
rows = {(r["strategy"], r["rank"]): r for r in measured["results"]}
unsharded = sum(rows["ddp", 0]["state"].values())
print(f"{'strategy':<14}{'rank':>5}{'parameters':>14}{'gradients':>14}{'optimizer':>14}{'total':>14}{'of ddp':>8}")
for (strategy, rank), r in rows.items():
    s = r["state"]
    print(f"{strategy:<14}{rank:>5}" + "".join(f"{format_bytes(v):>14}" for v in s.values())
          + f"{format_bytes(sum(s.values())):>14}{sum(s.values()) / unsharded:>8.1%}")

# %%
plots.breakdown_bars({s: rows[s, 0]["state"] for s in STRATEGIES}, title="Rank 0's model states after a step")
plt.show()

# %% [markdown]
# The measured totals against the ZeRO formulas (rank 0):

# %%
stage_of = {"ddp": 0, "zero1": 1, "zero3": 3}
pred = [sum(predicted[stage].values()) for stage in stage_of.values()]
meas = [sum(rows[s, 0]["state"].values()) for s in stage_of]
for s, p, m in zip(stage_of, pred, meas):
    print(f"{s:<6} predicted {format_bytes(p)}, measured {format_bytes(m)} ({m / p - 1:+.2%})")
plots.predicted_vs_measured(pred, meas, labels=list(stage_of), title="Per-rank model states, 2 ranks")
plt.show()

# %% [markdown]
# - Measured = formula + Adam's 4-byte step counters (one per tensor) and FSDP's padding (none here:
#   every first dimension divides by 2).
# - `zero2` holds the **same** bytes as `zero3` at rest: FSDP2 always reshards after backward. The
#   difference is *during* the step: with `reshard_after_forward=False` each layer keeps its gathered
#   parameters from forward until its backward. The peak of one step (`measure.track`) shows it
#   (`≈`: the peak moves by about 1% from run to run, with the moment each rank's collective frees its
#   buffers; the order of the three is asserted at the end):

# %%
peaks = {s: rows[s, 0]["peak_bytes"] for s in ["zero2", "zero3", "zero3-bf16"]}
for s, b in peaks.items():
    print(f"{s:<11} peak of one training step on rank 0: ≈{format_bytes(b)}")

# %% [markdown]
# - `zero2` trades memory for speed: one all-gather per layer instead of two (forward and backward).
# - `MixedPrecisionPolicy` keeps the fp32 shards (same model states) but gathers and computes in bf16:
#   half-size gathered parameters and activations, and a lower peak.
# - `CPUOffloadPolicy` moves the shards, their gradients and the optimizer step to host memory; on a
#   GPU the device then holds only the layer being computed. Here the "device" *is* the CPU, so the
#   bytes are the same; the state lives on:

# %%
print({s: rows[s, 0]["state_device"] for s in ["zero3", "zero3-offload"]})

# %% [markdown]
# ## 4 · Quality: same maths, nothing lost when a rank dies
#
# Sharding changes who stores what, not the result: each rank's loss in its 3 measured steps,
# unsharded against fully sharded.

# %%
for rank in range(WORLD):
    ddp, zero3 = rows["ddp", rank]["losses"], rows["zero3", rank]["losses"]
    print(f"rank {rank}: ddp  " + " ".join(f"≈{x:.5f}" for x in ddp))
    print(f"rank {rank}: zero3 " + " ".join(f"≈{x:.5f}" for x in zero3)
          + f"   largest difference from ddp: ≈{max(abs(a - b) for a, b in zip(ddp, zero3)):.0e}")

# %% [markdown]
# The drill's run saved its sharded model **and optimizer** state with
# `torch.distributed.checkpoint` (`get_state_dict` → `dcp.save`) every 2 steps: one file per rank,
# plus metadata. Rank 1 died after step 5, so the newest complete checkpoint is step 4:

# %%
print(sorted(str(p.relative_to(work)) for p in (work / "ckpt").rglob("*") if p.is_file()))
path, last_step = shard.check_checkpoint(work / "ckpt", cfg)
print(f"resume from {path.name} (step {last_step})")

# %% [markdown]
# Restart the job with `--resume`: every rank loads its shards (`dcp.load` → `set_state_dict`),
# steps 5 to 8 run again on the same data (the batch is a function of step and rank), and the
# final weights are compared with the uninterrupted reference.

# %%
resume = ["--model", NAME, "--train-steps", str(STEPS), "--ckpt-dir", str(work / "ckpt"),
          "--ckpt-every", str(EVERY), "--resume", "--final", str(work / "resumed.safetensors")]
shard.launch(resume, nproc=WORLD, timeout_s=300)
reference = shard.read_weights(work / "reference.safetensors")
resumed = shard.read_weights(work / "resumed.safetensors")
with safe_open(work / "resumed.safetensors", "pt") as f:
    print(f"resumed from step {f.metadata()['resumed_from_step']}")
identical = all(torch.equal(resumed[k], reference[k]) for k in reference)
print(f"{len(reference)} tensors, bitwise identical to the uninterrupted run: {identical}")

# %% [markdown]
# **Reshard on load**: DCP stores each shard with its place in the full tensor, so a checkpoint
# saved by 2 ranks loads on any number of processes: here, this one notebook process.

# %%
single = shard.load_resharded(work / "ckpt", cfg).state_dict()
same_as_final = all(torch.equal(single[k], resumed[k]) for k in resumed)
print(f"2-rank checkpoint of step {shard.check_checkpoint(work / 'ckpt', cfg)[1]} loaded into one process; "
      f"equals the final weights: {same_as_final}")

# %% [markdown]
# ## 5 · FSDP + QLoRA
#
# - bitsandbytes packs two 4-bit weights per byte, in uint8 tensors by default, beside bf16 norms
#   and adapters.
# - FSDP1 flattens a layer into **one** `FlatParameter` of one dtype, so FSDP-QLoRA (Answer.AI,
#   accelerate) sets `BitsAndBytesConfig(..., bnb_4bit_quant_storage=torch.bfloat16)`: the packed data
#   then lives in bf16 tensors and shards like every other bf16 parameter.
# - FSDP2 shards each parameter on its own (a `DTensor` per parameter). The job above ran both:
#   `qlora` (bf16 storage, `MixedPrecisionPolicy(param_dtype=bf16)`) and `qlora-uint8` (default storage).

# %%
print(f"{'job, rank 0':<12}{'trainable (LoRA)':>18}" + "".join(f"{k:>12}" for k in rows["qlora", 0]["state"])
      + f"{'first loss':>12}")
for s in ["qlora", "qlora-uint8"]:
    q = rows[s, 0]
    first_loss = f"≈{q['losses'][0]:.5f}"
    print(f"{s:<12}{q['local_trainable_parameters']:>18,}" + "".join(f"{format_bytes(v):>12}" for v in q["state"].values())
          + f"{first_loss:>12}")
print(f"fp32 zero3 rank 0 for comparison: {format_bytes(sum(rows['zero3', 0]['state'].values()))}")

# %%
# NBVAL_IGNORE_OUTPUT
# bf16 QLoRA steps on this CPU are not bitwise reproducible from run to run: the 3rd decimal moves
for s in ["qlora", "qlora-uint8"]:
    print(f"{s:<12} rank 0 losses: {' '.join(f'{x:.4f}' for x in rows[s, 0]['losses'])}")

# %% [markdown]
# - Same first loss with both storages (the same 4-bit model), and both train: with FSDP2 on this
#   stack the uint8 default works too; bf16 storage is what FSDP1 needs, and costs nothing here.
# - Per rank, the 4-bit model with its adapters holds a small fraction of the fp32 full fine-tuning states.

# %% [markdown]
# ## 6 · At full size: scaling out
#
# On a cluster the script is unchanged; only torchrun's options change. Run this on every node,
# each with its own `--node-rank`, all pointing at node 0's rendezvous endpoint (on GPUs the
# script picks NCCL by itself). After a failure, the same command with `--resume` picks up the last
# checkpoint on the shared disk:

# %%
for node_rank in range(2):
    cmd = shard.torchrun_command(["--train-steps", "1000", "--ckpt-dir", "/shared/ckpt", "--ckpt-every", "100",
                                  "--final", "/shared/final.safetensors"],
                                 nproc_per_node=8, nnodes=2, node_rank=node_rank, rdzv_endpoint="node0:29500")
    print(" ".join(["python", *cmd[1:]]))

# %% [markdown]
# How many 80 GB GPUs each R1 model needs, from the course estimator (batch 1, 1,024 tokens; training
# in bf16 mixed precision with AdamW and activation checkpointing; ZeRO-3 sharding beyond one GPU;
# the smallest power of two that fits):

# %%
GPU = 80 * 10**9
MODES = ["full", "lora", "qlora", "inference"]
need = {name: [shard.gpus_needed(name, mode, GPU) for mode in MODES] for name in family.MEMBERS}
print(f"{'model':<22}" + "".join(f"{m:>11}" for m in MODES))
for name, counts in need.items():
    print(f"{name:<22}" + "".join(f"{c if c else '> 4096':>11}" for c in counts))

# %% [markdown]
# - Full fine-tuning of the 671B R1 needs hundreds of 80 GB GPUs; inference (bf16) a few nodes.
# - The estimator keeps the **frozen** base of LoRA/QLoRA whole on every GPU (data-parallel LoRA),
#   so those columns stop where the base no longer fits one GPU; sharding the frozen base too, as in
#   section 5, is what lets FSDP-QLoRA go further.
#
# ## 7 · Pitfalls
#
# **Resuming from a directory that is not there** (a typo, another node's local disk) fails before
# any process starts:

# %%
try:
    shard.check_checkpoint(work / "ckpt-typo", cfg)
except FileNotFoundError as err:
    print(f"FileNotFoundError: {err}".replace(str(work), "$WORK"))

# %% [markdown]
# **Resuming another model's checkpoint**: DCP would load whatever keys match; the checkpoint's
# metadata says which model wrote it:

# %%
try:
    shard.check_checkpoint(work / "ckpt", family.tiny("r1"))
except ValueError as err:
    print(f"ValueError: {err}".replace(str(work), "$WORK"))

# %% [markdown]
# **A hung job**: a rank stuck in a collective waits for the others forever (the default timeout is
# 10 minutes or more). `shard.launch` kills the whole job at its timeout and says so:

# %%
try:
    shard.launch(["--model", NAME, "--train-steps", "100", "--final", str(work / "never.safetensors")],
                 nproc=WORLD, timeout_s=0.5)
except TimeoutError as err:
    print(f"TimeoutError: {err}")

# %% [markdown]
# **A rank that dies** is reported with its rank and exit code (-9 is SIGKILL, e.g. the kernel's OOM
# killer), as the drill showed; uncaught, `shard.launch` raises `RankFailed` and the cell fails.
#
# ## Summary
#
# - FSDP2's `fully_shard` per layer divides parameters, gradients and optimizer state over N ranks:
#   measured here at half per rank on 2 ranks, the ZeRO-3 formula plus a few bytes.
# - `reshard_after_forward`, `MixedPrecisionPolicy` and `CPUOffloadPolicy` trade memory for
#   communication, precision and host bandwidth.
# - DCP checkpoints of model + optimizer make a killed rank cost only the steps since the last save,
#   with bitwise-identical results, and reshard to any number of processes on load.
#
# ## Exercises
#
# 1. *Easy*: set `WORLD = 4` (4 processes share the 2 cores: slower, but they run) and check that
#    `zero3` now holds a quarter of `ddp` per rank, and `zero1` 8Ψ + 8Ψ/4.
# 2. *Medium*: set `--ckpt-every 3` and `--kill-step 7`: which step does the run resume from, and
#    how many steps are lost?
# 3. *Hard*: on a GPU machine with 2 GPUs, measure `zero3-offload` against `zero3` with the CUDA
#    allocator (`measure.track` reports `allocator_peak_bytes`) and explain the difference.
#
# ## Further reading
#
# - Rajbhandari et al., *ZeRO: Memory Optimizations Toward Training Trillion Parameter Models* (2020)
# - PyTorch FSDP2 tutorial: https://pytorch.org/tutorials/intermediate/FSDP_tutorial.html
# - Distributed checkpoint (DCP): https://pytorch.org/docs/stable/distributed.checkpoint.html
# - torchrun: https://pytorch.org/docs/stable/elastic/run.html
# - Answer.AI, *You can now train a 70b language model at home* (FSDP + QLoRA, 2024)
#
# ## Self-check

# %%
assert failure is not None and (failure.rank, failure.exit_code) == (1, -9), failure
for rank in range(WORLD):
    zero3 = sum(rows["zero3", rank]["state"].values())
    assert zero3 <= (1 / WORLD + 0.05) * unsharded, (rank, zero3, unsharded)  # the target: 1/N + 5%
    assert rows["ddp", rank]["state"]["parameters"] == 4 * n_params
    assert rows["zero1", rank]["state"]["optimizer"] < 0.55 * rows["ddp", rank]["state"]["optimizer"]
    assert rows["zero2", rank]["state"] == rows["zero3", rank]["state"]
    assert max(abs(a - b) for a, b in zip(rows["ddp", rank]["losses"], rows["zero3", rank]["losses"])) < 1e-5
for s, p, m in zip(stage_of, pred, meas):
    assert abs(m / p - 1) < 0.01, (s, p, m)
assert peaks["zero2"] > peaks["zero3"] > peaks["zero3-bf16"]
assert rows["zero3-offload", 0]["state"] == rows["zero3", 0]["state"]
for rank in range(WORLD):
    assert sum(rows["qlora", rank]["state"].values()) < 0.15 * sum(rows["zero3", rank]["state"].values())
    qlora, uint8 = rows["qlora", rank]["losses"], rows["qlora-uint8", rank]["losses"]
    assert qlora[0] == uint8[0] and max(abs(a - b) for a, b in zip(qlora, uint8)) < 5e-3
assert rows["zero3-offload", 0]["state_device"] == "cpu"  # on a GPU too: offloaded shards live in host memory
assert last_step == 4 and identical and same_as_final
assert need["r1"][0] > need["r1-distill-llama-70b"][0] > need["r1-distill-qwen-1.5b"][0] == 1

# %%
import shutil

shutil.rmtree(work)  # the jobs' checkpoints and weights (tens of MB) do not outlive the notebook
