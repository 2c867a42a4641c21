# %% [markdown]
# # 01 · Mixed precision
#
# R1-Distill-Qwen-1.5B ships in bf16, but a plain PyTorch training loop runs it in fp32: 4 bytes
# per weight, per gradient, per activation. Mixed precision computes in 16 bits while keeping fp32
# master weights; pure bf16 goes further and stores the weights in 16 bits. Each rung saves memory
# and time, and each has a trap. DeepSeek-V3 itself trained in FP8.
#
# **What you will learn**
# - what autocast (bf16, fp16) and pure bf16 weights save, byte by byte, against the estimator
# - why fp16 needs a `GradScaler`, and how the scaler recovers from an overflow
# - why small updates vanish in bf16 weights, and how stochastic rounding keeps them
# - what each precision does to the reasoning student's accuracy
# - what the R1 family needs at each precision, and what DeepSeek-V3's FP8 recipe changed

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
import functools
import time
import warnings

import matplotlib.pyplot as plt
import torch

from lowmem_course import family, measure, plots, precision, steps
from lowmem_course.estimate import Setup, estimate
from lowmem_course.reasoning import sample
from lowmem_course.student import accuracy, load_student, make_batch, student_config
from lowmem_course.units import GiB, format_bytes

course = lab.course_model("r1-distill-qwen-1.5b")  # LOWMEM_MODEL=<Hub id> swaps in the real model
cfg = course.config
BATCH, SEQ = 2, 256
batch = steps.random_batch(cfg.vocab_size, BATCH, SEQ, device=device)
print(f"{course.name}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}; "
      f"batch {BATCH} x seq {SEQ}")
print(f"bf16 supported on {device.type}: {precision.bf16_supported(device)} -> autocast in {precision.autocast_dtype(device)}")

# %% [markdown]
# ## 1 · Predict
#
# | precision | weights | gradients | AdamW state | activations |
# |---|---|---|---|---|
# | fp32 | 4 | 4 | 8 | fp32 |
# | bf16-mixed / fp16-mixed | 4 (master) | 4 | 8 | mostly 16-bit |
# | bf16 (pure) | 2 | 2 | 4 | 16-bit |
#
# Autocast does **not** shrink the model states: it shrinks the activations. The estimator:

# %%
LADDER = list(precision.PRECISIONS)  # fp32, bf16-mixed, fp16-mixed, bf16
predicted = {p: estimate(cfg, Setup(mode="full", precision=p, optimizer="adamw", batch=BATCH, seq=SEQ)).bytes
             for p in LADDER}
for p, e in predicted.items():
    print(f"{p:<11} weights {format_bytes(e['weights']):>10}  optimizer {format_bytes(e['optimizer']):>10}  "
          f"activations {format_bytes(e['activations']):>10}  peak {format_bytes(e['total']):>10}")

# %% [markdown]
# ## 2 · Measure the ladder
#
# One steady-state AdamW step per rung, measured by `measure.measure_train_step` (a warm-up step,
# then the tracked one). The step is `steps.train_step` with autocast in `precision.compute_dtype`
# and loss scaling from `precision.make_scaler` (a no-op except for fp16).
# On this CPU fp16 is emulated and about 20× slower than bf16, so it runs one step only.

# %%
def measured_step(prec: str) -> measure.Measurement:
    """Peak bytes of one steady-state training step of the course model in ``prec``."""
    model = family.build(cfg, device=device, dtype=precision.parameter_dtype(prec))
    dtype = precision.compute_dtype(prec)
    step = functools.partial(steps.train_step, autocast_dtype=dtype, scaler=precision.make_scaler(device, dtype))
    return measure.measure_train_step(model, measure.make_optimizer(model), batch, label=prec, step=step)


measured = {p: measured_step(p) for p in LADDER}
print(f"{'precision':<11}{'params':>11}{'optimizer':>11}{'activations':>13}{'peak':>11}{'estimator':>11}")
for p, m in measured.items():
    b = m.breakdown
    print(f"{p:<11}{format_bytes(b['parameters']):>11}{format_bytes(b['optimizer']):>11}"
          f"{format_bytes(b['activations']):>13}{format_bytes(m.peak_bytes):>11}{format_bytes(predicted[p]['total']):>11}")

# %%
fig, (ax_bars, ax_pred) = plt.subplots(1, 2, figsize=(12, 4))
plots.breakdown_bars({p: m.breakdown for p, m in measured.items()}, title="One training step", ax=ax_bars)
plots.predicted_vs_measured([predicted[p]["total"] for p in LADDER], [measured[p].peak_bytes for p in LADDER],
                            LADDER, title="Estimator against the tracker", ax=ax_pred)
fig.tight_layout()
plt.show()

# %% [markdown]
# - **bf16-mixed / fp16-mixed**: the same parameters and AdamW state as fp32 (fp32 master weights),
#   fewer activation bytes: the matmul outputs are 16-bit
# - **bf16**: everything halves, weights, gradients, moments and activations
#
# ## 3 · Loss and speed over the same steps
#
# Memory is not the whole story: does the model still learn? Each rung trains the reasoning
# student's architecture from scratch on the same addition traces (fp16: 3 steps only, on a CPU).

# %%
# NBVAL_IGNORE_OUTPUT
STEPS, FP16_STEPS = 12, 3
student_cfg = student_config("qwen2")
tok = load_student("qwen2")[1]
train_batches = [make_batch(sample(16, seed=s, split="train"), tok) for s in range(STEPS)]


def train_curve(prec: str, n_steps: int) -> tuple[list[float], float]:
    """Losses (nats/token) of ``n_steps`` AdamW steps in ``prec`` from the same seed, and seconds per step."""
    model = family.build(student_cfg, device=device, dtype=precision.parameter_dtype(prec), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    dtype = precision.compute_dtype(prec)
    scaler = precision.make_scaler(device, dtype)
    losses, start = [], time.perf_counter()
    for input_ids, labels in train_batches[:n_steps]:
        losses.append(steps.train_step(model, opt, input_ids.to(device), labels.to(device), autocast_dtype=dtype,
                                       scaler=scaler).item())
    return losses, (time.perf_counter() - start) / n_steps


curves = {p: train_curve(p, FP16_STEPS if p == "fp16-mixed" else STEPS) for p in LADDER}
for p, (losses, sec) in curves.items():
    print(f"{p:<11} loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps, {1000 * sec:.0f} ms/step")
plots.lines(range(1, STEPS + 1), {p: c[0] + [float("nan")] * (STEPS - len(c[0])) for p, c in curves.items()},
            xlabel="step", ylabel="loss (nats/token)", title="Same data, same seed")
plt.show()

# %% [markdown]
# ## 4 · Quality: the student at each inference precision
#
# The shipped reasoning student (fp32) cast to bf16 and fp16 for inference, exact-match accuracy
# on 50 held-out addition problems (greedy decoding).

# %%
INFERENCE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
student_accuracy = {}
for name, dtype in INFERENCE.items():
    student, tok = load_student("qwen2", dtype=dtype)
    student_accuracy[name] = accuracy(student.to(device), tok, n=50, seed=0, progress=False)
    print(f"{name}: accuracy {student_accuracy[name]:.2f}")

# %% [markdown]
# ## 5 · fp16's range, and the loss scaler
#
# fp16 has 5 exponent bits: nothing above 65,504, nothing below 6e-8. bf16 keeps fp32's 8
# exponent bits (and loses mantissa instead).

# %%
values = torch.tensor([70000.0, 1.0, 1e-5, 1e-8])
for dtype in (torch.float16, torch.bfloat16):
    print(f"{dtype!s:<15}", [f"{v:.3g}" for v in values.to(dtype).float().tolist()])

# %% [markdown]
# Real gradients of the student architecture after one fp32 step: how many would underflow to
# zero in fp16, before and after multiplying the loss by the scaler's default 2^16?

# %%
grad_model = family.build(student_cfg, device=device, seed=0)
input_ids, labels = train_batches[0]
grad_model(input_ids=input_ids.to(device), labels=labels.to(device)).loss.backward()
grads = torch.cat([p.grad.flatten() for p in grad_model.parameters()])
nonzero = grads[grads != 0]
underflow = ((nonzero.half() == 0).float().mean().item(),
             ((nonzero * 2.0**16).half() == 0).float().mean().item())
smallest_grad = nonzero.abs().min().item()
print(f"{nonzero.numel():,} non-zero gradients; smallest |g| ≈{smallest_grad:.1e} (fp16's smallest: {2**-24:.1e})")
print(f"lost in fp16: ≈{underflow[0]:.3%} unscaled, ≈{underflow[1]:.3%} scaled by 2^16")

# %% [markdown]
# - this tiny model's gradients are mostly large enough; Micikevicius et al. found a large share
#   of the activation gradients of real networks below fp16's range, hence the scaler
#
# The other direction: a scale that is too large overflows. `GradScaler` finds inf/NaN in the
# gradients, **skips** that optimizer step and halves the scale, until the gradients are finite.
# Start it deliberately at 2^24 and step until one update goes through:

# %%
scaler_model = family.build(student_cfg, device=device, seed=0)
scaler_opt = torch.optim.AdamW(scaler_model.parameters(), lr=3e-3)
scaler = precision.make_scaler(device, torch.float16, init_scale=2.0**24)
scaler_log = []
for input_ids, labels in train_batches:
    before = {n: p.detach().clone() for n, p in scaler_model.named_parameters()}
    scale = scaler.get_scale()
    steps.train_step(scaler_model, scaler_opt, input_ids.to(device), labels.to(device), autocast_dtype=torch.float16,
                     scaler=scaler)
    moved = 1 - min(precision.unchanged_fraction(before, scaler_model).values())
    scaler_log.append((scale, scaler.get_scale() < scale, moved))
    print(f"scale 2^{int(torch.tensor(scale).log2())}: {'skipped' if scaler_log[-1][1] else 'applied'}, "
          f"weights changed: {moved > 0}")
    if moved > 0:
        break

# %% [markdown]
# ## 6 · Pure bf16 weights: small updates vanish
#
# bf16 has 8 bits of mantissa: next to 1.0 the nearest values are 1 - 2^-8 and 1 + 2^-7. An
# update of 1e-4 to a weight of 1.0 rounds back to 1.0, every time. Add 1e-4 a hundred times:

# %%
generator = torch.Generator().manual_seed(0)
w32, w16, w_sr = torch.ones(10_000), torch.ones(10_000, dtype=torch.bfloat16), torch.ones(10_000, dtype=torch.bfloat16)
for _ in range(100):
    w32 += 1e-4
    w16 += 1e-4                                                              # round to nearest
    w_sr = precision.stochastic_round_to_bf16(w_sr.float() + 1e-4, generator)  # round at random
small_update = {"fp32": w32.mean().item(), "bf16 nearest": w16.float().mean().item(),
                "bf16 stochastic": w_sr.float().mean().item()}
for k, v in small_update.items():
    print(f"{k:<16} mean weight {v:.4f}")

# %% [markdown]
# In a real model: one pure-bf16 AdamW step at lr 1e-4. Adam's first update is about lr in size;
# RMSNorm weights sit at 1.0, where that is below half a bf16 step.

# %%
bf16_model = family.build(cfg, device=device, dtype=torch.bfloat16)
bf16_opt = measure.make_optimizer(bf16_model, lr=1e-4)
before = {n: p.detach().clone() for n, p in bf16_model.named_parameters()}
steps.train_step(bf16_model, bf16_opt, batch)
unchanged = precision.unchanged_fraction(before, bf16_model)
norm_unchanged = min(v for n, v in unchanged.items() if "norm" in n)
linear_unchanged = sum(v for n, v in unchanged.items() if "proj" in n) / sum("proj" in n for n in unchanged)
print(f"RMSNorm weights unchanged: {norm_unchanged:.0%}; projection weights unchanged: ≈{linear_unchanged:.0%} (mean)")

# %% [markdown]
# The fixes: keep an fp32 copy of the weights (that is bf16-mixed), keep the optimizer state and
# the update in fp32, or round the update stochastically as above (unbiased on average).
#
# ## 7 · At full size
#
# The estimator for the family: one training step with AdamW, batch 1 × seq 1,024, per precision.

# %%
print(f"{'model':<22}" + "".join(f"{p:>12}" for p in LADDER))
family_peaks = {}
for name in family.MEMBERS:
    real = family.config(name)
    family_peaks[name] = {p: estimate(real, Setup(mode="full", precision=p, batch=1, seq=1024)).bytes for p in LADDER}
    print(f"{name:<22}" + "".join(f"{family_peaks[name][p]['total'] / GiB:>9.0f}GiB" for p in LADDER))

# %%
plots.breakdown_bars({p: family_peaks["r1-distill-qwen-1.5b"][p] for p in LADDER},
                     title="R1-Distill-Qwen-1.5B, batch 1 x seq 1024 (estimator)")
plt.show()

# %% [markdown]
# **DeepSeek-V3's FP8 recipe, on paper** (arXiv 2412.19437): GEMMs in FP8 (e4m3, 1×128 activation
# tiles, 128×128 weight blocks with one fp32 scale each), AdamW moments in bf16, fp32 master
# weights and gradients. Model states per parameter, from those facts:

# %%
r1_params = family.count_parameters(family.config("r1")).total
RECIPES = {"bf16-mixed AdamW (ZeRO paper)": 2 + 2 + 12, "DeepSeek-V3 FP8 training": 4 + 4 + 2 + 2}
for recipe, per_param in RECIPES.items():
    print(f"{recipe:<30} {per_param:>2} bytes/param -> {per_param * r1_params / GiB:,.0f} GiB for R1's {r1_params / 1e9:.0f}B")
fp8_weights = r1_params * (1 + 4 / (128 * 128))  # one byte per weight + one fp32 scale per 128x128 block
print(f"FP8 weights for inference: {fp8_weights / GiB:,.0f} GiB (bf16: {2 * r1_params / GiB:,.0f} GiB)")

# %% [markdown]
# ## 8 · Pitfalls
#
# - **fp16 without a scaler** loses the small gradients (section 5); bf16 needs none.
# - **pure bf16 without care** freezes weights near 1.0 (section 6).
# - **`torch.cuda.amp` is deprecated**: use `torch.amp.autocast(device_type, ...)` and
#   `torch.amp.GradScaler(device_type)`, which also work on CPU and MPS:

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.cuda.amp.GradScaler(enabled=False)
deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
print("\n".join(deprecations))

# %% [markdown]
# ## Summary
# - Autocast (bf16 or fp16) keeps fp32 master weights: it shrinks activations, not model states.
# - Pure bf16 halves everything but rounds small updates away; fp32 state or stochastic rounding fixes it.
# - fp16 needs a `GradScaler` (underflow), which backs off on overflow by skipping steps.
# - The estimator predicts every rung; the student keeps its accuracy in bf16 and fp16.
#
# ## Exercises
# 1. *(easy)* Measure the ladder's step at `SEQ = 512`. Which bars double?
# 2. *(medium)* Train the pure-bf16 curve with `lr=1e-4` instead of `2e-3`. Compare with bf16-mixed and explain.
# 3. *(hard)* Write a pure-bf16 AdamW step that keeps fp32 moments and rounds the update with
#    `precision.stochastic_round_to_bf16`. Measure its bytes per parameter.
#
# ## Further reading
# - Micikevicius et al., *Mixed Precision Training* (arXiv 1710.03740)
# - Kalamkar et al., *A Study of BFLOAT16 for Deep Learning Training* (arXiv 1905.12322)
# - DeepSeek-AI, *DeepSeek-V3 Technical Report* (arXiv 2412.19437), section 3.3 (FP8 training)
# - PyTorch, *Automatic Mixed Precision package - torch.amp*

# %% [markdown]
# ## Self-check
# Each claim above, asserted on the numbers this notebook measured.

# %%
param_bytes = measured["fp32"].breakdown["parameters"]
for p in LADDER:                                                             # estimator within 5% of the tracker
    assert abs(measured[p].peak_bytes / predicted[p]["total"] - 1) < 0.05, p
for p in ("bf16-mixed", "fp16-mixed"):                                       # fp32 master weights and state
    assert measured[p].breakdown["parameters"] == param_bytes
    assert measured[p].breakdown["optimizer"] == measured["fp32"].breakdown["optimizer"]
    assert measured[p].breakdown["activations"] < 0.8 * measured["fp32"].breakdown["activations"]
assert 2 * measured["bf16"].breakdown["parameters"] == param_bytes          # pure bf16 halves the weights
assert measured["bf16"].peak_bytes < measured["bf16-mixed"].peak_bytes < measured["fp32"].peak_bytes
assert all(c[0][-1] < c[0][0] for c in curves.values())                     # every rung learns
assert abs(curves["bf16-mixed"][0][-1] / curves["fp32"][0][-1] - 1) < 0.1    # bf16-mixed tracks fp32
assert student_accuracy["fp32"] > 0.9
assert all(abs(a - student_accuracy["fp32"]) <= 0.03 for a in student_accuracy.values())
assert smallest_grad < 2**-24 and 0 < underflow[0] < 1e-3                   # a few gradients underflow fp16
assert underflow[1] < underflow[0]                                           # scaling by 2^16 keeps more of them
assert scaler_log[0][1] and scaler_log[0][2] == 0 and not scaler_log[-1][1] and scaler_log[-1][2] > 0
assert small_update["bf16 nearest"] == 1.0 and abs(small_update["bf16 stochastic"] - small_update["fp32"]) < 1e-3
assert norm_unchanged == 1.0 and linear_unchanged < 0.5
assert all(family_peaks[n]["bf16"]["total"] < family_peaks[n]["fp32"]["total"] for n in family_peaks)
assert RECIPES["DeepSeek-V3 FP8 training"] < RECIPES["bf16-mixed AdamW (ZeRO paper)"]
assert any("torch.amp.GradScaler" in d for d in deprecations)
print("all self-checks passed")
