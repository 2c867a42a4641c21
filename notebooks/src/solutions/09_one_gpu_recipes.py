# %% [markdown]
# # 09 · One GPU: the optimizer side, and every technique at once — solutions
#
# Worked answers to the exercises of notebook 09. Each one runs the package, prints what it
# predicted or measured, explains it in a few bullets, and ends with `assert`s that fail if the
# answer is wrong.

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
from lowmem_course import family, gpus, validate
from lowmem_course.estimate import estimate, plan, setup_of
from lowmem_course.recipe import Recipe
from lowmem_course.units import GiB, MiB

REAL = family.config("r1-distill-llama-8b")
CARD = gpus.GPUS["rtx-4090"]
BATCH, SEQ = 2, 2048
LEAN = ("checkpointing", "offload-activations", "chunked-loss")


def full(*tokens: str) -> str:
    """A full fine-tuning recipe in pure bf16 with ``tokens`` added (as in notebook 09)."""
    return str(Recipe.parse("+".join(["full", "bf16", *tokens])))

# %% [markdown]
# ## Exercise 1
# *(easy)* Predict the 8B's full fine-tuning with `lean+step-in-backward+adamw8bit`. Does it fit
# the RTX 4090? What does it keep on the host, against `lean+offload-optimizer`?

# %%
RECIPES = {"lean+step-in-backward+adamw8bit": (*LEAN, "step-in-backward", "adamw8bit"),
           "lean+offload-optimizer": (*LEAN, "offload-optimizer")}
one = {label: estimate(REAL, setup_of(full(*tokens), batch=BATCH, seq=SEQ)) for label, tokens in RECIPES.items()}
print(f"{'full+bf16':<34}{'weights':>8}{'grads':>7}{'optim':>7}{'activ':>7}{'device':>8}{'host':>8}  (GiB)")
for label, e in one.items():
    b = e.bytes
    print(f"{label:<34}{b['weights'] / GiB:8.2f}{b['gradients'] / GiB:7.2f}{b['optimizer'] / GiB:7.2f}"
          f"{b['activations'] / GiB:7.2f}{b['total'] / GiB:8.2f}{e.host_bytes['total'] / GiB:8.2f}")
print(f"the RTX 4090 gives {CARD.usable / GiB:.2f} GiB")

# %% [markdown]
# - no: 8-bit AdamW still keeps its two moments on the GPU, 1 byte each per parameter (15 GiB for
#   8B parameters), on top of 15 GiB of bf16 weights: 32 GiB
# - its host memory is only the offloaded checkpointed inputs (about 1 GiB), against 120 GiB for
#   AdamW on the host: it is the recipe for a card of 40 GB with a small host (exercise 3)

# %%
lean_8bit, lean_host = (one[label] for label in RECIPES)
assert lean_8bit.bytes["total"] > CARD.usable >= lean_host.bytes["total"]
assert lean_8bit.host_bytes["total"] < 2 * GiB < 100 * GiB < lean_host.host_bytes["total"]
assert lean_8bit.bytes["optimizer"] >= 2 * lean_8bit.trainable_parameters * 0.99                # 2 bytes/param

# %% [markdown]
# ## Exercise 2
# *(medium)* Measure `lean+offload-optimizer+accum2` on the twin at 256 tokens and compare it with
# the estimate. Where do the accumulated gradients live, and why does accumulation cost the device
# nothing in gradients here, unlike `+accum2` above?

# %%
course = lab.course_model("r1-distill-llama-8b")
cfg = (family.tiny("r1-distill-llama-8b", hidden_size=128, head_dim=32, intermediate_size=448, vocab_size=4096,
                   num_hidden_layers=8) if course.is_twin else course.config)
n_params = family.count_parameters(cfg).total
kind = "cuda" if device.type == "cuda" else "cpu"
TWIN = {"lean+accum2": (*LEAN, "accum2"), "lean+offload-optimizer": (*LEAN, "offload-optimizer"),
        "lean+offload-optimizer+accum2": (*LEAN, "offload-optimizer", "accum2")}
runs = {label: validate.compare(course.name, setup_of(full(*tokens), batch=2, seq=256, device=kind), device, config=cfg)
        for label, tokens in TWIN.items()}
print(f"{'full+bf16':<31}{'grads':>7}{'optim':>7}{'activ':>7}{'device':>8}{'est':>8}{'err':>7}{'host':>7}{'est':>7}")
for label, c in runs.items():
    m, p = c.measured, c.predicted
    print(f"{label:<31}{m['gradients'] / MiB:7.2f}{m['optimizer'] / MiB:7.2f}{m['activations'] / MiB:7.2f}"
          f"{m['total'] / MiB:8.2f}{p['total'] / MiB:8.2f}{c.error():+7.1%}{m['host'] / MiB:7.2f}{p['host'] / MiB:7.2f}")
print(f"MiB; all the gradients in bf16: {2 * n_params / MiB:.2f} MiB, in fp32 on the host {4 * n_params / MiB:.2f} MiB")

# %% [markdown]
# - with AdamW on the host, each micro-batch's gradient goes to the host as soon as it is made and
#   is *added* there into the fp32 gradient (`HostAdamW`): accumulation happens on the host, so the
#   device holds no gradient between micro-batches, where `lean+accum2` holds all of them
# - the host holds a little more than 16 bytes per parameter: a later micro-batch's gradient is
#   copied to the host before it is added (one parameter's at a time), which the estimator leaves out
# - the estimate is within 1% on the device: each micro-batch has 256 tokens, one chunk of the
#   chunked loss, so no LM-head gradient builds up over chunks, and the estimator counts none

# %%
acc, host_only, both = (runs[label].measured for label in TWIN)
assert acc["gradients"] == 2 * n_params and both["gradients"] == 0 == both["optimizer"]
assert both["total"] < host_only["total"] < acc["total"]                       # micro-batches halve the loss chunk
assert 16 * n_params <= both["host"] < 16 * n_params + 4 * max(p.numel() for p in family.build(cfg, device="meta").parameters())
assert all(abs(c.error()) <= 0.01 for label, c in runs.items() if "accum2" in label)  # within 1%
assert abs(runs["lean+offload-optimizer"].error()) <= 0.05

# %% [markdown]
# ## Exercise 3
# *(hard)* How much host memory does the 8B's full fine-tuning on one RTX 4090 need at least?
# Find the smallest `cpu_memory` (to 1 GiB) for which `plan` finds a setup, and the smallest
# card on which full fine-tuning fits with only 64 GiB of host memory.

# %%
def fits_with(host_gib: int) -> bool:
    return bool(plan(REAL, CARD.usable, mode="full", batch=BATCH, seq=SEQ, cpu_memory=host_gib * GiB))


low, high = 1, 1024  # plan finds something with 1 TiB; bisect for the least host memory
while low < high:
    middle = (low + high) // 2
    low, high = (low, middle) if fits_with(middle) else (middle + 1, high)
least_host = low
needed = plan(REAL, CARD.usable, mode="full", batch=BATCH, seq=SEQ, cpu_memory=least_host * GiB)[0]
print(f"least host memory: {least_host} GiB; {needed.recipe} keeps "
      f"{needed.estimate.host_bytes['total'] / GiB:.2f} GiB there "
      f"({needed.estimate.host_bytes['total'] / needed.estimate.trainable_parameters:.2f} bytes per parameter)")

cards = sorted(gpus.GPUS.values(), key=lambda g: g.usable)
small_host = next((g, options[0]) for g in cards
                  if (options := plan(REAL, g.usable, mode="full", batch=BATCH, seq=SEQ, precisions=g.precisions,
                                      cpu_memory=64 * GiB)))
card64, option64 = small_host
print(f"with 64 GiB of host memory the smallest card is {card64.name} ({card64.usable / GiB:.2f} GiB usable): "
      f"{option64.estimate.bytes['total'] / GiB:.2f} GiB on the GPU, {option64.estimate.host_bytes['total'] / GiB:.2f} "
      f"GiB on the host\n    {option64.recipe}")

# %% [markdown]
# - AdamW on the host needs 16 bytes per parameter there (fp32 master copy, fp32 gradient, two fp32
#   moments): 120 GiB for the 8B, so a 128 GiB machine. The offloaded checkpointed inputs add
#   nothing: backward brings them back before the gradients fill the host
# - with 64 GiB of host memory the optimizer must stay on the GPU: in 8 bits and stepped in
#   backward, the plan of exercise 1, which needs a 40 GB card
# - host memory is cheaper than GPU memory, but it is not free: give the planner `--cpu-memory`

# %%
assert least_host == 120 and needed.estimate.setup.offload_optimizer
assert not fits_with(least_host - 1)
assert card64.name == "a100-40gb" and option64.estimate.setup.step_in_backward
assert option64.estimate.setup.optimizer == "adamw8bit" and option64.estimate.host_bytes["total"] <= 64 * GiB
print("all answers check out")
