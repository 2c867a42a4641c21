# %% [markdown]
# # 04 · Pruning — solutions
#
# Worked answers to the exercises of notebook 04. Each one runs the package, prints what it
# measured, explains it in a few bullets, and ends with `assert`s that fail if the answer is wrong.
# Generation is the slow part on a CPU, so accuracies here use 100 held-out problems (notebook 04:
# 200; one standard error is up to 5 points) and, where accuracy cannot tell two models apart, the
# teacher-forced loss decides.

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
import contextlib
import copy
import io
import types

import matplotlib.pyplot as plt
import torch

from lowmem_course import family, plots, prune, reasoning, student
from lowmem_course.estimate import Setup, count, estimate, shape_of
from lowmem_course.units import format_bytes

torch.set_num_threads(1)  # models of a few MB: a second thread costs more than it saves, and the numbers stay put
with contextlib.redirect_stderr(io.StringIO()):  # bitsandbytes' note about optional CPU kernels
    import peft  # noqa: F401  (used by prune.recover_with_lora)
N_EVAL = 100
prompts = [p.prompt for p in reasoning.sample(64, seed=1, split="train")]  # notebook 04's calibration prompts

# %% [markdown]
# ## Exercise 1
# *(easy)* Rerun section 2 with 2:4 on the DeepseekV3 student's linear layers. Which method wins?

# %%
moe, moe_tok = student.load_student("deepseek_v3")
moe_calib = prune.generated_calibration(moe, moe_tok, prompts)
linears = prune.prunable_linears(moe)
covered = sum(m.weight.numel() for m in linears.values()) / sum(p.numel() for p in moe.model.layers.parameters())
r1_count, student_count = count(shape_of(family.config("r1"))), count(shape_of(moe.config))
r1_covered = r1_count.linear / sum(r1_count.per_layer)
print(f"dense: accuracy {student.accuracy(moe, moe_tok, n=N_EVAL, progress=False):.2f}, loss {student.heldout_loss(moe, moe_tok):.3f}")
print(f"nn.Linear share of the decoder's parameters: {covered:.1%} in the student, {r1_covered:.1%} in R1 (estimator)")


def pruned_24(method: str, only: str = "") -> torch.nn.Module:
    """A copy of the MoE student with 2:4 masks on its decoder linears whose names contain ``only``."""
    model = copy.deepcopy(moe)
    modules = {n: m for n, m in prune.prunable_linears(model).items() if only in n}
    norms = prune.input_norms(model, moe_calib, modules) if method == "wanda" else {}
    scores = {n: prune.wanda_scores(m.weight, norms[n]) if method == "wanda" else prune.magnitude_scores(m.weight)
              for n, m in modules.items()}
    prune.apply_masks(model, {n: prune.semi_structured_mask(s) for n, s in scores.items()})
    return model


grams = prune.input_grams(moe, moe_calib)
whole = {}
for method in ("magnitude", "wanda"):
    model = copy.deepcopy(moe)
    masks = prune.prune_unstructured(model, method, calibration=moe_calib, pattern="2:4")  # section 2's call
    error = sum(prune.relative_output_error(m.weight, masks[n], grams[n]) for n, m in linears.items()) / len(linears)
    whole[method] = dict(accuracy=student.accuracy(model, moe_tok, n=N_EVAL, progress=False), loss=student.heldout_loss(model, moe_tok),
                         zeros=prune.zero_fraction(prune.prunable_linears(model).values()), error=error)
    print(f"2:4 {method:<9} accuracy {whole[method]['accuracy']:.2f}  loss {whole[method]['loss']:.3f}  "
          f"zeros {whole[method]['zeros']:.0%}  mean relative output error {error:.4f}")
block_loss = {(only, method): student.heldout_loss(pruned_24(method, only), moe_tok)
              for only in ("self_attn", "mlp") for method in ("magnitude", "wanda")}
for (only, method), loss in block_loss.items():
    print(f"2:4 only {only:<9} {method:<9} loss {loss:.3f}")

# %% [markdown]
# - **both break the student** (exact match 0); the loss table puts the damage in the attention
#   (MLA) projections, while 2:4 on the MLP linears alone costs almost nothing
# - **magnitude wins** on the held-out loss, the opposite of the qwen2 student (section 2: Wanda
#   0.375 vs magnitude 0.150). Wanda again wins the layer-wise output error it optimises and still
#   loses the model: as at 50% on qwen2, the loss is decided in the attention
# - the routed experts are 3-D tensors, not `nn.Linear`, so `prune_unstructured` leaves them dense:
#   2:4 touches only about a third of this decoder, and about 2% of R1's

# %%
assert whole["magnitude"]["zeros"] == whole["wanda"]["zeros"] == 0.5             # 2:4 zeroes exactly half
assert max(w["accuracy"] for w in whole.values()) <= 0.1 and min(w["loss"] for w in whole.values()) > 1
assert whole["magnitude"]["loss"] < whole["wanda"]["loss"]                        # magnitude wins the model
assert whole["wanda"]["error"] < whole["magnitude"]["error"]                      # Wanda wins its objective
assert block_loss[("self_attn", "magnitude")] < block_loss[("self_attn", "wanda")]
assert max(block_loss[("mlp", m)] for m in ("magnitude", "wanda")) < 0.1 < min(block_loss[("self_attn", m)] for m in ("magnitude", "wanda"))
assert covered == student_count.linear / sum(student_count.per_layer) and 0.2 < covered < 0.5 and r1_covered < 0.03

# %% [markdown]
# ## Exercise 2
# *(medium)* Keep 50%, 25% and 10% of the MLP channels and plot accuracy before and after recovery.
# Where does LoRA stop helping?
#
# **Scaled down for CI:** 10 LoRA steps of 32 problems per recovery (notebook 04: 20 steps), and 100
# problems per accuracy. Each recovery takes a second or two on a 2-core CPU; run `RECOVERY_STEPS = 20` to
# see the full recipe.

# %%
qwen, tok = student.load_student("qwen2")  # tokenizer keeps <think> and </think> as single tokens
calib = prune.generated_calibration(qwen, tok, prompts)
RECOVERY_STEPS = 10
KEEP = [0.5, 0.25, 0.1]
before, after, mlp_bytes = [], [], []
for keep in KEEP:
    pruned = copy.deepcopy(qwen)
    prune.prune_mlp_channels(pruned, keep, calib)
    before.append(student.accuracy(pruned, tok, n=N_EVAL, progress=False))
    batches = (student.make_batch(reasoning.sample(32, seed=1000 + i, split="train"), tok) for i in range(RECOVERY_STEPS))
    torch.manual_seed(0)
    recovered = prune.recover_with_lora(pruned, batches, rank=8, lr=3e-3)
    after.append(student.accuracy(recovered, tok, n=N_EVAL, progress=False))
    mlp_bytes.append(prune.parameter_bytes(recovered))
dense_bytes = prune.parameter_bytes(qwen)
print(f"{'MLP channels kept':>17}{'parameters':>12}{'x dense':>9}   accuracy: pruned -> after {RECOVERY_STEPS} LoRA steps")
for keep, b, a, n in zip(KEEP, before, after, mlp_bytes):
    print(f"{keep:>17.0%}{format_bytes(n):>12}{n / dense_bytes:>9.2f}   {b:.2f} -> {a:.2f} ({(a - b) * 100:+.0f} points)")
plots.lines([k * 100 for k in KEEP], {"pruned": before, f"after {RECOVERY_STEPS} LoRA steps": after},
            "MLP channels kept (%)", "exact-match accuracy", title="Pruning the qwen2 student's MLP")
plt.show()

# %% [markdown]
# - **50%**: nothing to recover, the pruned student is already at 1.0 (LoRA cannot help; its few
#   steps may cost a point)
# - **25%**: the cut costs about 40 points and 10 LoRA steps win nearly all of them back (0.96)
# - **10%**: the cut breaks the student; LoRA wins back the most points but ends near 0.5, far from
#   dense: a rank-8 adapter on 56 channels cannot redo what 504 deleted channels computed. LoRA
#   stops being enough between 25% and 10% kept; more steps narrow the gap (try
#   `RECOVERY_STEPS = 20`), they do not restore the capacity

# %%
assert mlp_bytes == sorted(mlp_bytes, reverse=True) and mlp_bytes[0] < dense_bytes  # the bytes really shrink
assert before[0] >= 0.9                                        # half the channels: nearly free
assert before == sorted(before, reverse=True) and before[2] <= 0.2  # accuracy falls with the cut
assert after[1] >= before[1] + 0.2 and after[2] >= before[2] + 0.3  # LoRA recovers the deeper cuts
assert after[1] >= 0.9 and after[2] < after[1] - 0.2           # but not the deepest one

# %% [markdown]
# ## Exercise 3
# *(hard)* Keep the group-limited routing when pruning experts: drop the same number of experts in
# every group, and compare the accuracy with `prune.prune_experts`.
#
# The student routes 2 of 8 experts, in `n_group = 4` groups of 2, from the best `topk_group = 2`
# groups. The only even cut is **1 expert per group** (4 kept). A group's score is the sum of its
# top-2 expert scores, which a group of one cannot give, so our router generalises it to the top
# `min(2, group size)` (R1 itself, 32 experts per group, never meets that case).

# %%
counts = prune.expert_counts(moe, moe_calib)


def grouped_forward(self, hidden_states):
    """DeepseekV3's group-limited top-k router, with a group score of the top min(2, size) experts."""
    router_logits = torch.nn.functional.linear(hidden_states.view(-1, self.hidden_dim).float(), self.weight.float())
    scores = router_logits.sigmoid()
    choice = scores + self.e_score_correction_bias
    per_group = self.num_experts // self.num_group
    group_scores = choice.view(-1, self.num_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], 1)
    allowed = group_mask.repeat_interleave(per_group, dim=1).bool()
    top_k_index = choice.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1)[1]
    weights = scores.gather(1, top_k_index)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) if self.norm_topk_prob else weights
    return router_logits, weights * self.routed_scaling_factor, top_k_index


def prune_experts_per_group(model: torch.nn.Module, keep_per_group: int) -> dict[str, list[int]]:
    """Keep the ``keep_per_group`` most-chosen experts of every group; keep the group-limited router."""
    modules = dict(model.named_modules())
    blocks = {name: modules[name] for name in counts}  # the MoE blocks, as expert_counts named them
    groups, topk_group = {n: (b.gate.num_group, b.gate.topk_group) for n, b in blocks.items()}.popitem()[1]
    kept, select = {}, {}
    for name in blocks:
        by_group = counts[name].view(groups, -1)
        chosen = by_group.topk(keep_per_group, dim=1).indices + torch.arange(groups)[:, None] * by_group.shape[1]
        kept[name] = sorted(chosen.flatten().tolist())
        select[name] = torch.zeros_like(counts[name]).index_fill_(0, chosen.flatten(), 1)
    prune.prune_experts(model, keep_per_group * groups, select)  # keeps the highest "counts": exactly these
    for block in blocks.values():
        block.gate.num_group, block.gate.topk_group = groups, topk_group  # prune_experts set one group
        block.gate.forward = types.MethodType(grouped_forward, block.gate)
    return kept


check = copy.deepcopy(moe)
for gate in (dict(check.named_modules())[name].gate for name in counts):
    gate.forward = types.MethodType(grouped_forward, gate)
with torch.no_grad():
    same_router = torch.equal(check(**moe_calib).logits, moe(**moe_calib).logits)
print(f"our router reproduces DeepseekV3's on the unpruned student: {same_router}")

# %%
grouped, ungrouped = copy.deepcopy(moe), copy.deepcopy(moe)
kept_grouped = prune_experts_per_group(grouped, 1)
prune.prune_experts(ungrouped, 4, counts)
kept_ungrouped = {name: sorted(c.topk(4).indices.tolist()) for name, c in counts.items()}  # what prune_experts keeps
compare = {}
print(f"{'cut':<26}{'experts kept, per layer':<30}{'weights':>10}{'accuracy':>10}{'loss':>8}{'choices kept':>14}")
for label, model, kept in (("1 per group, grouped", grouped, kept_grouped),
                           ("prune_experts, ungrouped", ungrouped, kept_ungrouped)):
    share = sum(int(counts[n][k].sum()) for n, k in kept.items()) / sum(int(c.sum()) for c in counts.values())
    compare[label] = (prune.parameter_bytes(model), student.accuracy(model, moe_tok, n=N_EVAL, progress=False),
                      student.heldout_loss(model, moe_tok), share)
    print(f"{label:<26}{list(kept.values())!s:<30}{format_bytes(compare[label][0]):>10}{compare[label][1]:>10.2f}"
          f"{compare[label][2]:>8.3f}{share:>14.0%}")
print("choices kept: the share of the router's choices on the calibration set that went to kept experts")
# with one expert per group, picking the 2 best groups is picking the 2 best experts: the routing is ungrouped
regrouped = copy.deepcopy(grouped)
for gate in (dict(regrouped.named_modules())[name].gate for name in counts):
    gate.num_group = gate.topk_group = 1
with torch.no_grad():
    same_routing = torch.equal(grouped(**moe_calib).logits, regrouped(**moe_calib).logits)
print(f"grouped routing over groups of one = ungrouped routing over the same experts: {same_routing}")

# %%
r1, bf16 = family.config("r1"), Setup(mode="inference", precision="bf16", batch=1, seq=1024)
half_ungrouped = prune.pruned_config(r1, experts=0.5)  # what prune_experts gives: 128 experts, one group
half_grouped = copy.deepcopy(half_ungrouped)
half_grouped.n_group, half_grouped.topk_group = r1.n_group, r1.topk_group  # 16 per group, routing kept
r1_bytes = {label: estimate(c, bf16).bytes["weights"] for label, c in (("grouped", half_grouped), ("ungrouped", half_ungrouped))}
print(f"R1: {r1.n_routed_experts} experts in {r1.n_group} groups of {r1.n_routed_experts // r1.n_group}, keeping half: "
      + ", ".join(f"{label} {n / 2**30:.1f} GiB" for label, n in r1_bytes.items()) + " of bf16 weights")

# %% [markdown]
# - **same bytes**: both keep 4 experts per layer; the cut's shape changes which experts survive,
#   not the memory (on R1 too: half the experts is the same 641 GiB however they are picked)
# - **the per-group cut is worse here**: it must keep each group's best expert even when a whole
#   group is rarely chosen, so it keeps fewer of the router's calibration choices, and its loss and
#   accuracy are worse than those of `prune_experts`' global top 4
# - on this student the group limit itself changes nothing after the cut: with one expert per group,
#   choosing the 2 best groups is choosing the 2 best experts (checked above). On R1, 16 experts per
#   group keep the limit meaningful (it bounds each token's experts to 4 groups, i.e. 4 nodes), and
#   that locality, not accuracy, is why one would keep it

# %%
assert same_router and same_routing and r1_bytes["grouped"] == r1_bytes["ungrouped"]
assert compare["1 per group, grouped"][0] == compare["prune_experts, ungrouped"][0]             # same bytes
assert compare["1 per group, grouped"][3] < compare["prune_experts, ungrouped"][3]              # fewer choices kept
assert compare["1 per group, grouped"][2] > compare["prune_experts, ungrouped"][2]              # higher loss
assert compare["1 per group, grouped"][1] <= compare["prune_experts, ungrouped"][1]             # no better accuracy
assert all(len(k) == 4 for k in kept_grouped.values()) and kept_grouped != kept_ungrouped
print("all answers checked")
