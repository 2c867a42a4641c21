# %% [markdown]
# # 01 · Mixed precision — solutions
#
# Worked answers to the exercises of notebook 01. Each one runs the package, prints what it
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
import functools

import torch

from lowmem_course import family, measure, precision, steps
from lowmem_course.reasoning import sample
from lowmem_course.student import load_student, make_batch, student_config
from lowmem_course.units import format_bytes

cfg = lab.course_model("r1-distill-qwen-1.5b").config
BATCH = 2


def measured_step(prec: str, seq: int, make_opt=measure.make_optimizer) -> measure.Measurement:
    """One steady-state training step of the course model in ``prec`` (notebook 01's ``measured_step``)."""
    model = family.build(cfg, device=device, dtype=precision.parameter_dtype(prec))
    dtype = precision.compute_dtype(prec)
    step = functools.partial(steps.train_step, autocast_dtype=dtype, scaler=precision.make_scaler(device, dtype))
    batch = steps.random_batch(cfg.vocab_size, BATCH, seq, device=device)
    return measure.measure_train_step(model, make_opt(model), batch, label=f"{prec} seq {seq}", step=step)

# %% [markdown]
# ## Exercise 1
# *(easy)* Measure the ladder's step at `SEQ = 512`. Which bars double?
#
# fp16-mixed is left out: on a CPU it is emulated and about 20× slower, and it holds the same bars
# as bf16-mixed (notebook 01, section 2).

# %%
RUNGS = ["fp32", "bf16-mixed", "bf16"]
at = {seq: {p: measured_step(p, seq) for p in RUNGS} for seq in (256, 512)}
ratio = {p: {k: at[512][p].breakdown[k] / at[256][p].breakdown[k]
             for k in ("parameters", "optimizer", "activations", "temporaries") if at[256][p].breakdown[k]}
         for p in RUNGS}
parts = list(dict.fromkeys(k for p in RUNGS for k in ratio[p]))
print(f"{'':<12}{'seq 512 / seq 256':^{13 * len(parts)}}".rstrip())
print(f"{'precision':<12}" + "".join(f"{k:>13}" for k in parts) + f"{'peak at seq 256 -> 512':>26}")
for p in RUNGS:
    peaks = f"{format_bytes(at[256][p].peak_bytes)} -> {format_bytes(at[512][p].peak_bytes)}"
    print(f"{p:<12}" + "".join(f"{'x' + format(ratio[p][k], '.2f') if k in ratio[p] else '-':>13}" for k in parts)
          + f"{peaks:>26}")

# %% [markdown]
# - **activations and temporaries double**, at every precision: they are batch × seq × width
# - **parameters and optimizer state stay put**: they depend on the model, not the sequence
# - the activations stay smaller in 16 bits at both lengths, so mixed precision's saving grows with seq

# %%
for p in RUNGS:
    assert ratio[p]["parameters"] == 1 and ratio[p]["optimizer"] == 1, p
    assert 1.9 < ratio[p]["activations"] < 2.1 and 1.9 < ratio[p]["temporaries"] < 2.1, p
assert at[512]["bf16-mixed"].breakdown["activations"] < at[512]["fp32"].breakdown["activations"]

# %% [markdown]
# ## Exercise 2
# *(medium)* Train the pure-bf16 curve with `lr=1e-4` instead of `2e-3`. Compare with bf16-mixed and explain.
#
# Same student architecture, data and seed as notebook 01's section 3; bf16-mixed is trained at
# both learning rates for a fair comparison. We also count the weights that never moved.

# %%
STEPS = 12
student_cfg = student_config("qwen2")
tok = load_student("qwen2")[1]
train_batches = [make_batch(sample(16, seed=s, split="train"), tok) for s in range(STEPS)]


def train_curve(prec: str, lr: float) -> tuple[list[float], dict[str, float]]:
    """Losses of ``STEPS`` AdamW steps in ``prec`` at ``lr``, and each parameter's unchanged fraction."""
    model = family.build(student_cfg, device=device, dtype=precision.parameter_dtype(prec), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [steps.train_step(model, opt, x.to(device), y.to(device), autocast_dtype=precision.compute_dtype(prec)).item()
              for x, y in train_batches]
    return losses, precision.unchanged_fraction(before, model)


runs = {(p, lr): train_curve(p, lr) for p, lr in (("bf16", 2e-3), ("bf16", 1e-4), ("bf16-mixed", 1e-4))}
frozen = {}
print(f"{'':<38}{'never moved (mean per tensor)':^36}".rstrip())
print(f"{'precision':<11} {'lr':>5}  {'loss: first -> last':<19}{'of RMSNorm weights':>20}{'of all weights':>16}")
for (p, lr), (losses, unchanged) in runs.items():
    norms = [v for n, v in unchanged.items() if "norm" in n]
    frozen[p, lr] = (sum(norms) / len(norms), sum(unchanged.values()) / len(unchanged))
    loss = f"≈{losses[0]:.3f} -> ≈{losses[-1]:.3f}"
    norm_frozen, all_frozen = f"≈{frozen[p, lr][0]:.0%}", f"≈{frozen[p, lr][1]:.1%}"
    print(f"{p:<11} {lr:.0e}  {loss:<19}{norm_frozen:>20}{all_frozen:>16}")

# %% [markdown]
# - at lr 1e-4 every Adam update is about 1e-4 in size; next to a bf16 weight `w` the spacing is
#   about `|w| / 128`, and an update under half of it rounds away: every `|w|` above roughly
#   0.03-0.05 is frozen. The RMSNorm weights (all 1.0) never move, nor the larger matrix entries
# - bf16-mixed applies the same updates to fp32 master weights, so nothing is lost
# - over 12 steps the two losses nearly coincide: the small weights that do move carry most of
#   the early progress; the frozen norms and large weights make pure bf16 fall behind on longer runs
# - both learn far less than at 2e-3: lr 1e-4 is simply slow for 12 steps

# %%
mixed, bf16_slow, bf16_fast = runs["bf16-mixed", 1e-4][0], runs["bf16", 1e-4][0], runs["bf16", 2e-3][0]
assert frozen["bf16", 1e-4][0] == 1.0                 # every RMSNorm weight stuck at 1.0
assert frozen["bf16-mixed", 1e-4][0] < 0.01           # fp32 master weights: all of them move
assert frozen["bf16", 1e-4][1] > 10 * frozen["bf16-mixed", 1e-4][1]
assert frozen["bf16", 1e-4][1] > frozen["bf16", 2e-3][1]  # smaller lr, more updates rounded away
assert abs(bf16_slow[-1] - mixed[-1]) < 0.05          # over 12 steps the curves nearly coincide
assert bf16_fast[-1] < bf16_slow[-1] - 0.3            # lr 1e-4 learns much less in 12 steps
assert bf16_slow[-1] < bf16_slow[0]                   # but it does learn

# %% [markdown]
# ## Exercise 3
# *(hard)* Write a pure-bf16 AdamW step that keeps fp32 moments and rounds the update with
# `precision.stochastic_round_to_bf16`. Measure its bytes per parameter.

# %%
class StochasticBF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights: fp32 moments, the update done in fp32, the result rounded at random."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                g = p.grad.float()
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["exp_avg"] / (1 - b1 ** state["step"])
                v_hat = state["exp_avg_sq"] / (1 - b2 ** state["step"])
                w = p.float() * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
                p.copy_(precision.stochastic_round_to_bf16(w, self.generator))


n_params = sum(p.numel() for p in family.build(cfg).parameters())
sr_step = measured_step("bf16", 256, make_opt=lambda m: StochasticBF16AdamW(m.parameters()))
plain_bf16 = at[256]["bf16"]
per_param = {k: sr_step.breakdown[k] / n_params for k in ("parameters", "optimizer")}
print(f"{n_params:,} parameters")
print(f"weights {per_param['parameters']:.2f} B/param, optimizer state {per_param['optimizer']:.2f} B/param, "
      f"+ bf16 gradients 2 B/param -> {per_param['parameters'] + per_param['optimizer'] + 2:.1f} B/param of model states")
print(f"plain pure-bf16 AdamW: optimizer {plain_bf16.breakdown['optimizer'] / n_params:.2f} B/param; "
      f"step peak {format_bytes(plain_bf16.peak_bytes)} vs {format_bytes(sr_step.peak_bytes)} with fp32 moments")

# %% [markdown]
# Does it keep the small updates? One step at lr 1e-4 from the same start, plain pure-bf16 AdamW
# against the stochastic one: the fraction of RMSNorm weights that moved.

# %%
def norms_moved(make_opt) -> float:
    model = family.build(cfg, device=device, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps.train_step(model, make_opt(model), steps.random_batch(cfg.vocab_size, BATCH, 256, device=device))
    norms = [v for n, v in precision.unchanged_fraction(before, model).items() if "norm" in n]
    return 1 - sum(norms) / len(norms)


moved = {"round to nearest": norms_moved(lambda m: measure.make_optimizer(m, lr=1e-4)),
         "stochastic": norms_moved(lambda m: StochasticBF16AdamW(m.parameters(), lr=1e-4, weight_decay=0.0))}
for k, v in moved.items():
    print(f"{k:<17} RMSNorm weights moved by one step: {v:.1%}")

# %% [markdown]
# - 2 (bf16 weights) + 2 (bf16 gradients) + 8 (two fp32 moments) = **12 bytes per parameter**,
#   against 16 for bf16-mixed and 8 for plain pure bf16 (whose moments are bf16)
# - the step counter is a Python int here, not a tensor, so the state is exactly 8 B/param
# - one step at 1e-4 moves about 1e-4 / (2^-7) ≈ 1-2% of the norm weights up by one bf16 step,
#   so on average they move by the right amount; round-to-nearest moves none of them

# %%
assert sr_step.breakdown["parameters"] == 2 * n_params                   # bf16 weights
assert sr_step.breakdown["optimizer"] == 8 * n_params                    # two fp32 moments, nothing else
assert plain_bf16.breakdown["optimizer"] < sr_step.breakdown["optimizer"]  # plain pure bf16 keeps bf16 moments
assert moved["round to nearest"] == 0 and 0.002 < moved["stochastic"] < 0.05
print("all answers checked")
