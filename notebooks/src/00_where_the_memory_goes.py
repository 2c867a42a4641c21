# %% [markdown]
# # 00 · Where the memory goes
#
# You load DeepSeek-R1-Distill-Qwen-1.5B (3.6 GB of bf16 weights) on a 16 GB GPU, start fine-tuning,
# and get `CUDA out of memory`. The weights were never the problem: a training step holds the
# weights **and** their gradients, the optimizer's state and every activation that backward needs.
# This notebook measures each of them, byte for byte, before any technique tries to cut them.
#
# **What you will learn**
# - the five things a training step keeps in memory, measured with PyTorch's own tracker
# - the bytes-per-parameter rules (16 for AdamW training, 2 for bf16 inference, 0.5 for 4-bit)
# - why the logits of a 150k-token vocabulary are one of the largest buffers
# - how to measure a full-size step of a 1.5B model on a laptop, without allocating it
# - what the whole R1 family needs, from 1.5B to the 671B mixture-of-experts

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
# NBVAL_IGNORE_OUTPUT
# Is this machine ready for the whole course? (`lowmem doctor` in a terminal prints the full report.)
from lowmem_course import doctor
print(doctor.summary())

# %%
import matplotlib.pyplot as plt

from lowmem_course import family, measure, plots, steps
from lowmem_course.units import GiB, MiB, format_bytes

course = lab.course_model("r1-distill-qwen-1.5b")  # LOWMEM_MODEL=<Hub id> swaps in the real model
cfg = course.config
model = family.build(cfg, device=device)
n_params = sum(p.numel() for p in model.parameters())
print(f"{course.name}: {type(model).__name__}, {n_params:,} parameters, "
      f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")

# %% [markdown]
# ## 1 · Predict
#
# Count bytes per parameter for plain fp32 training with AdamW:
# - weights 4 bytes, gradients 4 bytes, Adam's two moments 4 + 4 bytes: **16 bytes per parameter**
# - activations come on top, and grow with batch × sequence length
#
# The model states are easy to predict; the activations are what we have to measure.

# %%
BATCH, SEQ = 4, 256
predicted_model_states = 16 * n_params
print(f"predicted model states (16 B/param): {format_bytes(predicted_model_states)}")

# %% [markdown]
# ## 2 · Measure
#
# `measure.measure_train_step` runs one warm-up step (so Adam's state exists, as in every step but
# the first), then records a full step with `torch.distributed._tools.mem_tracker.MemTracker`.
# The tracker sees every tensor PyTorch creates and frees, and labels it. (Process RSS, what `htop`
# shows, is no substitute: it mixes in the libraries and the allocator's cached pages, and shows
# the current size, not the peak. On CUDA, `measure.track` also reads the allocator's own peak.)

# %%
optimizer = measure.make_optimizer(model)
batch = steps.random_batch(cfg.vocab_size, BATCH, SEQ, device=device)
step = measure.measure_train_step(model, optimizer, batch, label=f"fp32 AdamW step, batch {BATCH} x seq {SEQ}")
print(step)

# %%
plots.breakdown_bars({"fp32 AdamW step": step.breakdown}, title="One training step of the twin")
plt.show()

# %% [markdown]
# What the peak holds, in words:
# - **parameters**: the weights, 4 bytes each in fp32
# - **optimizer**: Adam's two moments, twice the weights (plus a 4-byte step counter per tensor)
# - **activations**: what forward saved for backward, including the logits
# - **gradients / temporaries**: gradients written so far, and buffers of the op being run
#
# The peak is reached inside forward/backward, not in the optimizer step: the activations weigh
# more than the gradients that replace them.

# %%
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
logits_bytes = BATCH * SEQ * cfg.vocab_size * 4  # fp32 logits of one forward pass
print(f"parameters measured {format_bytes(step.breakdown['parameters'])} = numel x 4 bytes: {format_bytes(param_bytes)}")
print(f"optimizer measured  {format_bytes(step.breakdown['optimizer'])} (2 x parameters = {format_bytes(2 * param_bytes)})")
print(f"activations         {format_bytes(step.breakdown['activations'])}, "
      f"of which one copy of the logits is {format_bytes(logits_bytes)}")

# %% [markdown]
# ## 3 · The logits: a small model with a huge vocabulary
#
# The distills keep their base models' vocabularies: 151,936 tokens (Qwen) and 128,256 (Llama).
# One sequence of 4,096 tokens makes `4096 × 151936 × 4` bytes of fp32 logits, and the loss makes
# more copies (upcast, log-softmax, its gradient). Measure the forward + loss alone as the vocabulary grows:

# %%
def loss_peak(vocab_size: int) -> int:
    """Peak bytes of forward + loss + backward of the twin with ``vocab_size`` tokens."""
    twin = family.build(family.tiny("r1-distill-qwen-1.5b", vocab_size=vocab_size))
    ids = steps.random_batch(vocab_size, 1, SEQ)
    with measure.track(twin) as m:
        twin(input_ids=ids, labels=ids).loss.backward()
    return m.peak_bytes - sum(p.numel() * 4 for p in twin.parameters())

vocab_sizes = [1024, 8192, 32768]
loss_peaks = [loss_peak(v) for v in vocab_sizes]
for v, b in zip(vocab_sizes, loss_peaks):
    print(f"vocab {v:>6}: forward+backward needs {format_bytes(b)} beyond the weights")

# %%
plots.lines(vocab_sizes, {"forward + backward beyond the weights": [b / MiB for b in loss_peaks]},
            xlabel="vocabulary size (tokens)", ylabel="memory (MiB)", title=f"Twin, one sequence of {SEQ} tokens")
plt.show()

# %% [markdown]
# ## 4 · At full size, without the hardware
#
# `measure.simulate` builds the **real** R1-Distill-Qwen-1.5B (1.78B parameters) under PyTorch's
# `FakeTensorMode`: every tensor has its shape and dtype but no storage. The same training step
# runs, the tracker counts the bytes it would need, and nothing is allocated.

# %%
full_cfg = family.config("r1-distill-qwen-1.5b")
full_params = family.count_parameters(full_cfg).total
full_step = measure.simulate(full_cfg, mode="train", batch=1, seq=1024)
print(full_step)
print(f"16 bytes/param rule: {format_bytes(16 * full_params)}")

# %%
plots.breakdown_bars({"twin (measured)": step.breakdown, "1.5B, seq 1024 (simulated)": full_step.breakdown},
                     title="Same step, two sizes")
plt.show()

# %% [markdown]
# A 1.5B model needs about 26 GiB for plain fp32 AdamW training at a sequence of 1,024: more than a
# 24 GB card, for a model whose bf16 weights are 3.3 GiB. The rest of the course cuts each bar.
#
# ## 5 · Bytes per parameter
#
# | setting | weights | gradients | optimizer | total |
# |---|---|---|---|---|
# | fp32 training, AdamW | 4 | 4 | 8 | 16 |
# | mixed precision (bf16 compute, fp32 master), AdamW | 2 + 4 master | 2 | 8 | 16 |
# | bf16 inference | 2 | – | – | 2 |
# | int8 inference | 1 | – | – | 1 |
# | 4-bit (NF4) inference | ≈ 0.52 | – | – | ≈ 0.52 |
#
# Mixed precision does not shrink the model states (ZeRO paper: 2 + 2 + 12 = 16 bytes per
# parameter); it shrinks activations and speeds up the maths. Notebook 01 measures it.

# %% [markdown]
# ## 6 · The family, from 1.5B to 671B
#
# Exact parameter counts, from the real configs built on PyTorch's `meta` device (no memory), and
# the bytes of the weights alone. For the mixture-of-experts R1, only 8 of 256 routed experts run
# per token: the *active* parameters set the compute, but all 671B must sit in memory.

# %%
BITS = {"fp32": 32, "bf16": 16, "int8": 8, "4-bit": 4}
family_rows = []
print(f"{'model':<22}{'params':>10}{'active':>10}" + "".join(f"{k:>10}" for k in BITS))
for name in family.MEMBERS:
    counts = family.count_parameters(family.config(name))
    weights = {k: counts.total * bits // 8 for k, bits in BITS.items()}
    family_rows.append((name, counts, weights))
    print(f"{name:<22}{counts.total / 1e9:>9.2f}B{counts.active / 1e9:>9.2f}B"
          + "".join(f"{w / GiB:>7.1f}GiB" for w in weights.values()))

# %%
fig, ax = plt.subplots(figsize=(8, 4))
for k in BITS:
    ax.plot([r[0].removeprefix("r1-distill-") for r in family_rows], [r[2][k] / GiB for r in family_rows], marker="o", label=k)
ax.axhline(80, color="grey", linestyle="--", label="one 80 GB GPU")
ax.set_yscale("log"); ax.set_ylabel("weights alone (GiB)"); ax.set_xlabel("model")
ax.set_title("Weights of the R1 family by precision"); ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# ## 7 · Pitfalls
#
# **Keeping the model output alive.** `out = model(...)` held across `backward()` and `step()` keeps
# the logits alive into the optimizer step. `steps.train_step` keeps only the loss.

# %%
def step_keeping_output() -> None:
    out = model(input_ids=batch, labels=batch)  # the whole output object survives the step
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

with measure.track(model, optimizer, label="output kept") as kept:
    step_keeping_output()
extra = kept.peak_bytes - step.peak_bytes
print(f"peak with the output kept: {format_bytes(kept.peak_bytes)} (+{format_bytes(extra)})")

# %% [markdown]
# **The first step is not the steady state.** Adam creates its state lazily, inside the first
# `optimizer.step()`. Measuring step 1 hides 8 bytes per parameter that every later step holds.

# %%
fresh = family.build(cfg, device=device)
fresh_optimizer = measure.make_optimizer(fresh)
first = measure.measure_train_step(fresh, fresh_optimizer, batch, warmup_steps=0, label="first step")
print(f"optimizer state at the first step's peak: {format_bytes(first.breakdown['optimizer'])}; "
      f"in steady state: {format_bytes(step.breakdown['optimizer'])}")

# %% [markdown]
# ## Summary
# - A training step holds weights, gradients, optimizer state and activations; AdamW alone makes it
#   16 bytes per parameter before a single activation.
# - Activations (with the logits) scale with batch × sequence and the vocabulary.
# - `measure.simulate` gives exact full-size numbers on any laptop.
#
# ## Exercises
# 1. *(easy)* Double `SEQ`. Which bars grow, and by how much?
# 2. *(medium)* Swap AdamW for `measure.make_optimizer(model, "sgd")`. Predict the new peak, then measure it.
# 3. *(hard)* Simulate R1-Distill-Qwen-1.5B at seq 4096. What fraction of the peak are the logits?
#
# ## Further reading
# - Rajbhandari et al., *ZeRO: Memory Optimizations Toward Training Trillion Parameter Models* (arXiv 1910.02054)
# - Korthikanti et al., *Reducing Activation Recomputation in Large Transformer Models* (arXiv 2205.05198)
# - PyTorch, *Understanding CUDA Memory Usage* (pytorch.org/docs/stable/torch_cuda_memory.html)
# - DeepSeek-AI, *DeepSeek-R1* (arXiv 2501.12948)

# %% [markdown]
# ## Self-check
# Each claim above, asserted on the numbers this notebook measured.

# %%
assert step.breakdown["parameters"] == param_bytes                      # weights: numel x 4 bytes, exactly
assert 2 * param_bytes <= step.breakdown["optimizer"] < 2 * param_bytes + MiB  # Adam: two moments
assert step.peak_bytes > predicted_model_states                          # activations come on top
assert step.breakdown["gradients"] < param_bytes                         # peak inside forward/backward
assert step.breakdown["activations"] > logits_bytes                      # the logits are inside the activations
assert loss_peaks[0] < loss_peaks[1] < loss_peaks[2]                     # bigger vocabulary, more memory
assert full_step.breakdown["parameters"] == 4 * full_params              # exact at full size
assert 16 * full_params <= full_step.peak_bytes                          # at least the 16 B/param rule
assert full_step.peak_bytes > 24 * GiB                                   # does not fit a 24 GB card
r1 = {r[0]: r[1] for r in family_rows}["r1"]
assert abs(r1.total / 671e9 - 1) < 0.005 and abs(r1.active / 37e9 - 1) < 0.02
assert kept.peak_bytes > step.peak_bytes                                 # keeping the output costs memory
assert first.breakdown["optimizer"] < step.breakdown["optimizer"]        # step 1 hides Adam's state
print("all self-checks passed")
