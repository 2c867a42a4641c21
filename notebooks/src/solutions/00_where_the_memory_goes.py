# %% [markdown]
# # 00 · Where the memory goes — solutions
#
# Worked answers to the exercises of notebook 00. Each one runs the package, prints what it
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
import copy

from lowmem_course import family, measure, steps
from lowmem_course.units import GiB, format_bytes

cfg = lab.course_model("r1-distill-qwen-1.5b").config
BATCH, SEQ = 4, 256


def adamw_or_sgd_step(seq: int, optimizer: str = "adamw") -> measure.Measurement:
    """One steady-state training step of a fresh course model, as in notebook 00."""
    model = family.build(cfg, device=device)
    batch = steps.random_batch(cfg.vocab_size, BATCH, seq, device=device)
    return measure.measure_train_step(model, measure.make_optimizer(model, optimizer), batch, label=f"{optimizer} seq {seq}")

# %% [markdown]
# ## Exercise 1
# *(easy)* Double `SEQ`. Which bars grow, and by how much?

# %%
short, long = adamw_or_sgd_step(SEQ), adamw_or_sgd_step(2 * SEQ)
growth = {k: long.breakdown[k] / short.breakdown[k] for k in short.breakdown if short.breakdown[k]}
for k, ratio in growth.items():
    print(f"{k:<12} {format_bytes(short.breakdown[k]):>10} -> {format_bytes(long.breakdown[k]):>10}  x{ratio:.2f}")
print(f"peak         {format_bytes(short.peak_bytes):>10} -> {format_bytes(long.peak_bytes):>10}  x{long.peak_bytes / short.peak_bytes:.2f}")

# %% [markdown]
# - **activations and temporaries double**: every saved tensor is batch × seq × something, and the
#   attention kernel (SDPA) saves no seq × seq matrix, so nothing grows faster than linearly
# - **parameters and optimizer state do not move**: they depend on the model, not on the data
# - so the peak grows by less than 2×: the fixed model states dilute the doubling

# %%
assert long.breakdown["parameters"] == short.breakdown["parameters"]
assert long.breakdown["optimizer"] == short.breakdown["optimizer"]
assert 1.95 < growth["activations"] < 2.05 and 1.95 < growth["temporaries"] < 2.05
assert 1.5 < long.peak_bytes / short.peak_bytes < 2

# %% [markdown]
# ## Exercise 2
# *(medium)* Swap AdamW for `measure.make_optimizer(model, "sgd")`. Predict the new peak, then measure it.
#
# Prediction: plain SGD keeps no state, so the peak loses AdamW's two moments (8 bytes per
# parameter) and nothing else: the peak is still reached inside forward/backward.

# %%
sgd = adamw_or_sgd_step(SEQ, "sgd")
predicted_sgd = short.peak_bytes - short.breakdown["optimizer"]
print(f"AdamW peak {format_bytes(short.peak_bytes)}, of which optimizer state {format_bytes(short.breakdown['optimizer'])}")
print(f"SGD predicted {format_bytes(predicted_sgd)}, measured {format_bytes(sgd.peak_bytes)} "
      f"({sgd.peak_bytes / predicted_sgd - 1:+.2%})")

# %% [markdown]
# - the prediction holds to the byte or nearly: SGD without momentum has no state at all
# - on the twin the saving is small (about a tenth) because activations dominate; on a real 1.5B
#   model at a short sequence the 8 bytes/param are most of the peak (notebook 00, section 4)

# %%
assert sgd.breakdown["optimizer"] == 0
assert abs(sgd.peak_bytes / predicted_sgd - 1) < 0.01
assert sgd.peak_bytes < short.peak_bytes

# %% [markdown]
# ## Exercise 3
# *(hard)* Simulate R1-Distill-Qwen-1.5B at seq 4096. What fraction of the peak are the logits?
#
# **Scaled down for CI:** the full 28-layer simulation takes about 14 s on a 2-core CPU. Every
# decoder layer adds the same bytes, so we simulate the real config (real hidden size and vocabulary,
# seq 4,096) with 1, 2 and 3 layers, check that the peak grows by the same amount per layer, and
# extrapolate to 28. (Run `measure.simulate(family.config("r1-distill-qwen-1.5b"), seq=4096)` to
# check: it gives the same byte count.)

# %%
full = family.config("r1-distill-qwen-1.5b")
SEQ_FULL = 4096


def simulate_layers(n_layers: int, vocab_size: int | None = None) -> measure.Measurement:
    """``measure.simulate`` of the real 1.5B config cut to ``n_layers`` decoder layers."""
    cut = copy.deepcopy(full)
    cut.num_hidden_layers = n_layers
    cut.vocab_size = vocab_size or cut.vocab_size
    return measure.simulate(cut, mode="train", batch=1, seq=SEQ_FULL)


by_layers = {n: simulate_layers(n) for n in (1, 2, 3)}
per_layer = by_layers[2].peak_bytes - by_layers[1].peak_bytes
peak_28 = by_layers[1].peak_bytes + (full.num_hidden_layers - 1) * per_layer
logits_bytes = SEQ_FULL * full.vocab_size * 4  # one fp32 copy of the logits
print(f"per decoder layer: +{format_bytes(per_layer)}; extrapolated 28-layer peak: {format_bytes(peak_28)}")
print(f"one copy of the fp32 logits (4096 x {full.vocab_size} x 4 B): {format_bytes(logits_bytes)} "
      f"= {logits_bytes / peak_28:.1%} of the peak")
print(f"temporaries at the peak: {format_bytes(by_layers[1].breakdown['temporaries'])} "
      f"= {by_layers[1].breakdown['temporaries'] / logits_bytes:.2f} copies of the logits")

# %% [markdown]
# How many bytes at the peak does the vocabulary's output cost in all? Halve the vocabulary: the
# peak drops by the embedding and head rows (weights + Adam state) plus every logits-sized buffer.

# %%
half = simulate_layers(1, full.vocab_size // 2)
state_saved = sum(by_layers[1].breakdown[k] - half.breakdown[k] for k in ("parameters", "gradients", "optimizer"))
logits_buffers = 2 * (by_layers[1].peak_bytes - half.peak_bytes - state_saved)  # halving the vocab halves them
print(f"logits-sized buffers at the peak: {format_bytes(logits_buffers)} = {logits_buffers / logits_bytes:.2f} copies "
      f"= {logits_buffers / peak_28:.1%} of the 28-layer peak")

# %% [markdown]
# - one fp32 copy of the logits is 2.3 GiB, about 5% of the 47.7 GiB peak
# - but the loss holds more than one copy at the peak (log-softmax output, its gradient, the
#   logits' gradient): the logits-sized buffers are about three copies, some 15% of the step
# - the rest is the 8 bytes/param of AdamW, the weights, and 28 layers of activations at seq 4,096;
#   chunking the loss (notebook 02) removes most of the logits' share

# %%
assert by_layers[3].peak_bytes - by_layers[2].peak_bytes == per_layer          # every layer adds the same bytes
assert 47 * GiB < peak_28 < 48.5 * GiB                                       # the full run's 47.7 GiB
assert 0.04 < logits_bytes / peak_28 < 0.06                                  # one copy: about 5%
assert by_layers[1].breakdown["temporaries"] == 2 * logits_bytes            # two more copies in the loss
assert 2.5 < logits_buffers / logits_bytes < 3.5                             # about three copies in all
print("all answers checked")
