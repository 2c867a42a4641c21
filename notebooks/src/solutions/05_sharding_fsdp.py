# %% [markdown]
# # 05 · Sharding with FSDP — solutions
#
# Worked answers to the exercises of notebook 05. Each one runs the package, prints what it
# measured, explains it in a few bullets, and ends with `assert`s that fail if the answer is wrong.

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
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from lowmem_course import family, measure, shard, shard_train, steps
from lowmem_course.units import format_bytes

NAME = "r1-distill-qwen-1.5b"
cfg = family.tiny(NAME)
n_params = family.count_parameters(cfg).total
n_tensors = len(list(family.build(cfg).parameters()))  # AdamW keeps one 4-byte step counter per tensor
cpu = torch.device("cpu")
print(f"tiny twin of {NAME}: {n_params:,} parameters in {n_tensors} tensors")

# %% [markdown]
# ## Exercise 1
# *(easy)* Set `WORLD = 4` and check that `zero3` now holds a quarter of `ddp` per rank, and `zero1` 8Ψ + 8Ψ/4.
#
# **Scaled down for CI:** four `torchrun` processes run (4 ranks share the 2 cores), but their start
# alone costs over 30 s of CPU here. What a rank *holds* does not need the other ranks to exist:
# PyTorch's **fake process group** (`backend="fake"`, used by its own FSDP tests) lets this one process
# play rank r of a 4-rank job. `fully_shard` and `ZeroRedundancyOptimizer` allocate exactly what a
# real rank does; only the collectives do nothing, so the losses are meaningless and not shown.
# - `zero3`: `shard_train.wrap(model, "zero3")`, as in the notebook; at `world=1` it shards nothing: ZeRO-0
# - `zero1`: `ZeroRedundancyOptimizer` without the DDP wrapper (DDP's all-reduce hook cannot run on a
#   fake group; its gradient buckets are views of gradients of the same size, so the bytes do not change)

# %%
def held(strategy: str, rank: int, world: int) -> dict[str, int]:
    """Bytes rank ``rank`` of ``world`` holds after 3 AdamW steps of ``strategy`` ("zero1" or "zero3")."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        model = family.build(cfg, seed=0)
        if strategy == "zero3":
            model = shard_train.wrap(model, "zero3", cpu)
        opt = shard_train.make_optimizer(model, strategy)
        for step in range(3):
            steps.train_step(model, opt, shard_train.batch_for(step, rank, cfg.vocab_size, 2, 64, cpu))
        ids = shard_train.batch_for(3, rank, cfg.vocab_size, 2, 64, cpu)
        model(input_ids=ids, labels=ids).loss.backward()  # the gradients exist, as in shard_train's count
        params = list(model.parameters())
        return {"parameters": measure.storage_bytes(*params),
                "gradients": measure.storage_bytes(*(p.grad for p in params)),
                "optimizer": measure.storage_bytes(*shard_train.optimizer_tensors(opt))}
    finally:
        dist.destroy_process_group()


WORLD = 4
ddp = held("zero3", 0, world=1)  # nothing sharded: what every DDP rank holds
rows = {("ddp", 0): ddp} | {(s, r): held(s, r, WORLD) for s in ("zero1", "zero3") for r in range(WORLD)}
print(f"{'strategy':<9}{'rank':>5}{'parameters':>13}{'gradients':>13}{'optimizer':>13}{'total':>13}{'of ddp':>8}")
for (s, r), b in rows.items():
    print(f"{s:<9}{r:>5}" + "".join(f"{format_bytes(v):>13}" for v in b.values())
          + f"{format_bytes(sum(b.values())):>13}{sum(b.values()) / sum(ddp.values()):>8.1%}")
for stage in (0, 1, 3):
    z = shard.zero_state_bytes(n_params, WORLD, stage)
    print(f"ZeRO-{stage} formula on {WORLD} ranks: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in z.items()))

# %% [markdown]
# - **`zero3` holds 25.0% of `ddp` on every rank**: parameters, gradients and Adam's moments all
#   split 4 ways, with no padding (every first dimension divides by 4). The few bytes over Ψ·16/4 are
#   Adam's step counters: one per tensor on *every* rank, so they do not shrink
# - **`zero1` holds 4Ψ + 4Ψ + about 8Ψ/4**: weights and gradients whole, optimizer state split. Not
#   exactly 8Ψ/4: `ZeroRedundancyOptimizer` hands out *whole tensors* to ranks (largest first), so
#   two ranks get about 0.5% more than a quarter and two 0.5% less; the parts add up to the unsharded state
# - the real 4-process run gives the same bytes: `shard.launch(["--model", NAME, "--measure",
#   "ddp,zero1,zero3", "--out", "bytes.json"], nproc=4, timeout_s=300)`

# %%
psi = n_params
assert ddp == {"parameters": 4 * psi, "gradients": 4 * psi, "optimizer": 8 * psi + 4 * n_tensors}
for r in range(WORLD):
    assert rows["zero3", r] == {"parameters": psi, "gradients": psi, "optimizer": 2 * psi + 4 * n_tensors}
    assert abs(sum(rows["zero3", r].values()) / sum(ddp.values()) - 1 / WORLD) < 0.001  # a quarter of ddp
    z1 = rows["zero1", r]
    assert z1["parameters"] == z1["gradients"] == 4 * psi                           # not sharded by ZeRO-1
    assert abs(z1["optimizer"] / (8 * psi / WORLD) - 1) < 0.01                       # 8Ψ/4, give or take a tensor
assert sum(rows["zero1", r]["optimizer"] for r in range(WORLD)) == ddp["optimizer"]  # the parts add up

# %% [markdown]
# ## Exercise 2
# *(medium)* Set `--ckpt-every 3` and `--kill-step 7`: which step does the run resume from, and how many steps are lost?
#
# Prediction: checkpoints are written after steps 3 and 6 (step 9 never comes); rank 1 dies after
# step 7, so the restart loads step 6 and step 7 is trained again: **one step lost**. The drill,
# once, on 2 ranks (the notebook's reference run and the measurements are left out to keep it short):

# %%
work = Path(tempfile.mkdtemp(prefix="lowmem-05-solutions-"))
drill = ["--model", NAME, "--train-steps", "8", "--ckpt-dir", str(work / "ckpt"), "--ckpt-every", "3",
         "--kill-rank", "1", "--kill-step", "7"]
failure = None
try:
    shard.launch(drill, nproc=2, timeout_s=300)
except shard.RankFailed as err:  # expected: rank 1 kills itself after step 7
    failure = err
print(failure)
saved = sorted(int(p.parent.name.removeprefix("step_")) for p in (work / "ckpt").glob("step_*/.done"))
path, resume_step = shard.check_checkpoint(work / "ckpt", cfg)  # what `--resume` loads (shard_train.latest_checkpoint)
print(f"complete checkpoints after steps {saved}; --resume starts from step {resume_step} ({path.name})")
redo = list(range(resume_step + 1, 8))
print(f"killed after step 7: step(s) {redo} are trained again -> {len(redo)} step(s) lost")

# %% [markdown]
# - the run resumes from **step 6**, the newest checkpoint with its `.done` marker, and loses
#   **1 step** (step 7); the batch is a function of step and rank, so the redo trains on the same
#   data (notebook 05 checks that a resumed run ends bitwise equal to an uninterrupted one)
# - in general a kill after step k loses `k mod every` steps: at most `every - 1`. A kill right
#   after a save loses none (the save comes before the kill in `shard_train.train`)
# - checkpointing more often loses less but writes the full sharded model **and** optimizer
#   state each time (16Ψ bytes in fp32 with AdamW): the usual trade of I/O against lost work

# %%
assert failure is not None and (failure.rank, failure.exit_code) == (1, -9), failure
assert saved == [3, 6] and resume_step == 6
assert redo == [7]
shutil.rmtree(work)

# %% [markdown]
# ## Exercise 3
# *(hard)* On a machine with 2 GPUs, measure `zero3-offload` against `zero3` with the CUDA allocator
# (`measure.track` reports `allocator_peak_bytes`) and explain the difference.
#
# **Not run here: it needs 2 CUDA GPUs.** What can be worked out without them is the prediction:
# - `CPUOffloadPolicy` keeps each rank's sharded parameters, their gradients and the AdamW state in
#   host memory, and runs the optimizer step on the CPU. The GPU receives a layer's shard just in
#   time, all-gathers it, computes, and frees it again
# - so the **allocator peak drops by the whole at-rest state of the rank**, 16Ψ/N (plus the optimizer
#   step's temporaries, which now live on the host); what stays is the same in both runs: the
#   gathered layers in flight, the activations and the logits
# - `measure.track`'s *tracker* peak does **not** drop: it counts tensors wherever they live, and the
#   offloaded shards are still tensors (on the CPU). Only the CUDA allocator sees the difference.
#   One more trap: `track` picks its device from the model's first parameter, which is on the CPU once
#   offloaded, so it does not read the CUDA allocator for that run; call `torch.cuda.max_memory_allocated` yourself
#
# The prediction for the twin on 2 ranks (measured with the fake group as in exercise 1) and for
# R1-Distill-Qwen-7B (ZeRO formula, fp32 AdamW):

# %%
at_rest_twin = held("zero3", 0, world=2)
n_7b = family.count_parameters(family.config("r1-distill-qwen-7b")).total
at_rest_7b = shard.zero_state_bytes(n_7b, 2, 3)
print(f"twin, zero3 on 2 ranks: {format_bytes(sum(at_rest_twin.values()))} per GPU leave the device with offloading")
print(f"r1-distill-qwen-7b, zero3 on 2 ranks: {format_bytes(sum(at_rest_7b.values()))} per GPU "
      f"leave the device ({n_7b / 1e9:.2f}B parameters x 16 B / 2)")

# %% [markdown]
# On a 2-GPU machine this cell measures it (it skips elsewhere). A small script, started by torchrun
# on both GPUs, trains each strategy for 3 steps and reads the allocator peak of the third:

# %%
SCRIPT = '''
import json, torch, torch.distributed as dist
from lowmem_course import family, shard_train, steps
dist.init_process_group("nccl")
rank = dist.get_rank()
device = torch.device("cuda", rank)
torch.cuda.set_device(device)
cfg = family.tiny("r1-distill-qwen-1.5b")
peaks = {}
for strategy in ("zero3", "zero3-offload"):
    model = shard_train.wrap(family.build(cfg, device=device, seed=0), strategy, device)
    opt = shard_train.make_optimizer(model, strategy)
    for step in range(3):
        if step == 2:
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        steps.train_step(model, opt, shard_train.batch_for(step, rank, cfg.vocab_size, 2, 64, device))
    torch.cuda.synchronize()
    peaks[strategy] = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
if rank == 0:
    print(json.dumps(peaks))
dist.destroy_process_group()
'''
if torch.cuda.device_count() >= 2:
    script = Path(tempfile.mkdtemp()) / "offload_peaks.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=300, check=True)
    gpu_peaks = json.loads(run.stdout.strip().splitlines()[-1])
    print({k: format_bytes(v) for k, v in gpu_peaks.items()},
          f"difference {format_bytes(gpu_peaks['zero3'] - gpu_peaks['zero3-offload'])}, "
          f"predicted about {format_bytes(sum(at_rest_twin.values()))}")
else:
    gpu_peaks = None
    print(f"skipped: {torch.cuda.device_count()} CUDA GPU(s) here, the measurement needs 2")

# %%
assert at_rest_twin == {"parameters": 2 * psi, "gradients": 2 * psi, "optimizer": 4 * psi + 4 * n_tensors}
assert sum(at_rest_7b.values()) == 8 * n_7b                                  # 16Ψ / 2 ranks
if gpu_peaks is not None:  # on 2 GPUs: offloading frees at least the at-rest state
    assert gpu_peaks["zero3"] - gpu_peaks["zero3-offload"] >= 0.9 * sum(at_rest_twin.values())
print("all answers checked")
