# %% [markdown]
# # 07 · Capstone: plan a budget, combine the techniques, train with one command — solutions
#
# Worked answers to the exercises of notebook 07. Each one runs the package, prints what it
# planned or measured, explains it in a few bullets, and ends with `assert`s that fail if the answer is wrong.

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
import tempfile
from dataclasses import replace
from pathlib import Path


from lowmem_course import capstone, estimate, quantize  # noqa: F401 (imports bitsandbytes once)
from lowmem_course.capstone import Budget
from lowmem_course.units import GiB, MiB, parse_bytes

work = Path(tempfile.mkdtemp(prefix="lowmem-capstone-solutions-"))

# %% [markdown]
# ## Exercise 1
# *(easy)* Plan R1-Distill-Qwen-14B at 2,048 tokens on a 24 GB card. Which recipe is chosen?

# %%
fourteen = Budget("14B, seq 2048, 24 GB", "r1-distill-qwen-14b", parse_bytes("24GiB"), seq=2048)
options = capstone.plan(fourteen)
choice = capstone.choose(fourteen, options)
for o in options:
    print(f"{'->' if o is choice else '  '} cost {o.cost:4.2f} {o.total / GiB:7.2f} GiB{'  trainable here' if o.train_recipe else ''}")
    print(f"     {o.recipe}")
print(choice.command(fourteen.model))
shape = estimate.shape_of(estimate.load_config(fourteen.model))
bf16_base = estimate.frozen_weight_bytes(shape, estimate.count(shape), "bf16")
print(f"the 14B's frozen bf16 base alone: {bf16_base / GiB:.1f} GiB")

# %% [markdown]
# - **QLoRA + checkpointing + bf16**, with the techniques that cost nothing added because each saves
#   memory: the checkpointed inputs offloaded to the host, the chunked loss, the step in backward;
#   about 10.7 GiB (plain AdamW: 8-bit moments only when needed)
# - LoRA is out before any activation is counted: the frozen 16-bit base alone exceeds 24 GiB
# - only the 4-bit base leaves room, and at 2,048 tokens the activations still need checkpointing

# %%
assert choice.train_recipe.startswith("qlora+bf16-mixed+checkpointing") and choice.total <= fourteen.gpu_memory
assert choice.estimate.setup.optimizer == "adamw"
assert {o.estimate.setup.mode for o in options} == {"qlora"}
assert bf16_base > fourteen.gpu_memory

# %% [markdown]
# ## Exercise 2
# *(medium)* Run `"qlora+fp16-mixed"` and `"full+bf16-mixed"` through the miniature on the student. Do their ratios
# to fp32 full fine-tuning match the estimator's within 10%? Which one saves the most, and why does bf16
# autocast save so little for full fine-tuning?

# %%
data = capstone.write_data(work / "subtraction.jsonl", n=32, seed=0)
ratios, measured, predicted = capstone.miniature("student-qwen2", ["qlora+fp16-mixed", "full+bf16-mixed"], data, work / "mini")
for r in ratios:
    print(f"{r.recipe:<18} / full: estimated {r.predicted:.3f}, measured {r.measured:.3f} ({r.error:+.1%})")
print(f"{'recipe':<18} " + " ".join(f"{k:>12}" for k in ("weights", "optimizer", "activations", "total")) + "  (MiB, measured)")
for recipe, m in measured.items():
    print(f"{recipe:<18} " + " ".join(f"{m[k] / MiB:12.2f}" for k in ("weights", "optimizer", "activations", "total")))

# %% [markdown]
# - both match the estimator within 10%
# - **QLoRA + fp16 saves the most**: a 4-bit frozen base and optimizer state for the adapters only
# - **bf16 autocast barely helps full fine-tuning**: the fp32 master weights, gradients and AdamW's two
#   moments (16 bytes per parameter) do not move; only the activations shrink, and autocast adds 16-bit
#   copies of the weights it keeps for backward

# %%
by_recipe = {r.recipe: r for r in ratios}
assert all(abs(r.error) <= 0.10 for r in ratios)
assert by_recipe["qlora+fp16-mixed"].measured < 0.6 < 0.75 < by_recipe["full+bf16-mixed"].measured
assert measured["full+bf16-mixed"]["weights"] == measured["full"]["weights"]
assert measured["full+bf16-mixed"]["optimizer"] == measured["full"]["optimizer"]
assert measured["full+bf16-mixed"]["activations"] < 0.8 * measured["full"]["activations"]

# %% [markdown]
# ## Exercise 3
# *(hard)* Serving R1 on 8 × 80 GB with the chosen setup: how many 8,192-token requests fit at once? Why does
# doubling to 16 GPUs buy fewer extra requests than the weights it frees suggest?
#
# The estimator is arithmetic, so a bisection over the batch costs nothing.

# %%
serve = Budget("serve R1 on 8 x 80 GB", "r1", parse_bytes("80GiB"), gpus=8, task="serve", batch=8, seq=8192)
setup = capstone.choose(serve, capstone.plan(serve)).estimate.setup
r1 = estimate.load_config("r1")


def most_requests(gpus: int) -> int:
    """The largest batch of ``setup`` on ``gpus`` GPUs whose estimate fits one GPU's memory."""
    fits = lambda batch: estimate.estimate(r1, replace(setup, batch=batch, gpus=gpus)).bytes["total"] <= serve.gpu_memory
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        low, high = ((low + high) // 2, high) if fits((low + high) // 2) else (low, (low + high) // 2)
    return low


print(f"setup: {estimate.recipe_of(setup)}")
most, per_request, weights = {}, {}, {}
print(f"{'':<14}{'GiB per GPU':^34}{'each extra request adds':^24}".rstrip())
print(f"{'GPUs':>4}{'requests':>10}{'weights':>10}{'KV':>10}{'temporaries':>14}{'KV':>10}{'temporaries':>14}")
for gpus in (8, 16):
    most[gpus] = most_requests(gpus)
    e = estimate.estimate(r1, replace(setup, batch=most[gpus], gpus=gpus)).bytes
    weights[gpus] = e["weights"]
    one = estimate.estimate(r1, replace(setup, batch=1, gpus=gpus)).bytes
    two = estimate.estimate(r1, replace(setup, batch=2, gpus=gpus)).bytes
    per_request[gpus] = {k: two[k] - one[k] for k in ("kv_cache", "activations")}
    print(f"{gpus:>4}{most[gpus]:>10}{e['weights'] / GiB:>10.1f}{e['kv_cache'] / GiB:>10.1f}{e['activations'] / GiB:>14.1f}"
          f"{per_request[gpus]['kv_cache'] / GiB:>10.2f}{per_request[gpus]['activations'] / GiB:>14.2f}")

# %% [markdown]
# - 8 GPUs serve 19 requests of 8,192 tokens at once; 16 GPUs free ~20 GiB of weights per GPU but serve only 31
# - the weights split over the GPUs; what each request adds does not: MLA caches one latent that every
#   head reads, so under tensor parallelism each GPU keeps every request's whole cache
# - the prefill temporaries per request are not divided either (an upper bound in the estimator: the
#   residual stream is replicated, the MLP's intermediates would split); shorter prefill chunks shrink them
# - further: SGLang's data-parallel attention for DeepSeek models splits the *requests* over the GPUs
#   for attention, so each GPU caches only its own

# %%
assert (most[8], most[16]) == (19, 31) and weights[8] - weights[16] > 19 * GiB
assert most[16] < 2 * most[8]                                                  # doubling GPUs does not double requests
assert per_request[16]["kv_cache"] == per_request[8]["kv_cache"] > 0           # the MLA cache is not split
assert estimate.estimate(r1, replace(setup, batch=most[8] + 1)).bytes["total"] > serve.gpu_memory
