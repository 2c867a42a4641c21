# %% [markdown]
# # 07 · Capstone: plan a budget, combine the techniques, train with one command
#
# You have one GPU (or eight) and one R1-family model in mind. Each earlier notebook cut one bar of
# the memory breakdown; a real run needs several cuts at once, and the right mix depends on the card.
# This notebook plans four real budgets with the estimator, checks the plans in miniature by running
# the same recipes through the course's training command, and then uses that command the way you
# would on real hardware: resumable checkpoints, a memory report, clear errors.
#
# **What you will learn**
# - how to turn "this GPU, this model, this sequence length" into a recipe (`capstone.plan`)
# - why a T4 needs a different recipe (no bf16) and why R1 needs its weights split over 8 GPUs *and* its experts in 4 bits
# - how to check a plan on a tiny model: the chosen recipes' measured ratios match the estimator's
# - `python -m lowmem_course.train`: progress, memory report, `--resume`, and how it refuses bad input
# - what memory techniques do not buy: compute time and quality

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

from lowmem_course import capstone, estimate, family, plots, quantize
from lowmem_course.capstone import Budget
from lowmem_course.units import GiB, MiB, parse_bytes

work = Path(tempfile.mkdtemp(prefix="lowmem-capstone-"))  # every file this notebook writes goes here

# %% [markdown]
# ## 1 · Plan: four real budgets
#
# Usable memory per GPU, as `nvidia-smi` reports it: a "16 GB" T4 shows 15 GiB (ECC takes the rest),
# a 24 GB RTX 3090/4090 24 GiB, an 80 GB A100 80 GiB.
# - fine-tune **R1-Distill-Qwen-1.5B on a T4**: no bf16 on that card, so fp16 autocast or fp32
# - fine-tune **R1-Distill-Qwen-7B at 4,096 tokens on a 24 GB card**
# - fine-tune **R1-Distill-Llama-70B on 2 × 80 GB**, 4,096 tokens
# - **serve DeepSeek-R1 (671B)** on one node of 8 × 80 GB: 8 requests of 8,192 tokens at once

# %%
BUDGETS = [
    Budget("1.5B on a T4", "r1-distill-qwen-1.5b", parse_bytes("15GiB"), seq=1024, bf16=False),
    Budget("7B, seq 4096, 24 GB", "r1-distill-qwen-7b", parse_bytes("24GiB"), seq=4096),
    Budget("70B on 2 x 80 GB", "r1-distill-llama-70b", parse_bytes("80GiB"), gpus=2, seq=4096),
    Budget("serve R1 on 8 x 80 GB", "r1", parse_bytes("80GiB"), gpus=8, task="serve", batch=8, seq=8192),
]

# %% [markdown]
# `lowmem plan` (Python: `estimate.plan`) lists every setup that fits, cheapest compute first. Unless
# told otherwise it tries bf16 setups, which a T4 cannot run; `precisions=` (`--precisions`) says what the card runs
# (here fp16 autocast or fp32 for training, and so pure fp16 weights for serving):

# %%
t4 = BUDGETS[0]
stock = estimate.plan(t4.model, t4.gpu_memory, seq=t4.seq)
no_bf16 = estimate.plan(t4.model, t4.gpu_memory, seq=t4.seq, precisions=t4.precisions)
for name, options in (("default", stock), (f"precisions={t4.precisions}", no_bf16)):
    print(f"estimate.plan for the T4, {name}: {len(options)} options, "
          f"precisions {sorted({o.estimate.setup.precision for o in options})}")

# %% [markdown]
# `capstone.plan(budget)` is `estimate.plan` with the budget's precisions, task (training setups for a
# fine-tune, serving setups for serving) and GPUs. On several GPUs the planner also tries serving one
# model split over them (`parallel="tensor"`: heads and MLPs split, experts dealt out) and, for a MoE
# model, NF4 weights *with* the routed experts (`nf4-dq+experts`: notebook 03's `quantize.quantize_experts`).
# `capstone.choose` picks the cheapest option that `lowmem train` can run (AdamW, one GPU) or, for
# serving, the least-quantized weights that fit. A recipe is one string that names every choice
# (mode+precision+weights+checkpointing+optimizer+sharding); `lowmem estimate --recipe`, `lowmem plan`
# and `lowmem train --recipe` read and write the same strings, and each option prints its command:

# %%
plans, chosen = {}, {}
for b in BUDGETS:
    plans[b.label] = capstone.plan(b)
    chosen[b.label] = capstone.choose(b, plans[b.label])
    naive_total = capstone.naive(b).bytes["total"]
    print(f"{b.label} ({b.model}, {b.gpus} x {b.gpu_memory / GiB:.0f} GiB, batch {b.batch} x seq {b.seq}): "
          f"{len(plans[b.label])} options fit; the naive setup needs {naive_total / GiB:,.0f} GiB per GPU")
    for o in plans[b.label][:6]:
        mark = "->" if o is chosen[b.label] else "  "
        print(f"  {mark} cost {o.cost:4.2f} {o.total / GiB:7.2f} GiB{'  trainable here' if o.train_recipe else ''}")
        print(f"       {o.recipe}")
    print(f"     {chosen[b.label].command(b.model)}")

# %% [markdown]
# What the plans say:
# - **T4**: LoRA with fp16 autocast fits without checkpointing; full fine-tuning needs ~28 GiB.
# - **7B at 4,096 tokens**: LoRA on the bf16 base fits 24 GiB only with activation checkpointing; QLoRA
#   has room to spare but costs more compute (dequantization).
# - **70B**: only QLoRA + checkpointing fits, and it fits *one* 80 GB GPU. The frozen base is not
#   sharded by LoRA, so the second GPU adds throughput (a data-parallel copy), not memory.
# - **R1**: see below.
#
# Every serving setup the planner tried for R1, fitting or not, per GPU:

# %%
serve = BUDGETS[-1]
r1_fields = estimate.load_config(serve.model)
r1_count = estimate.count(estimate.shape_of(r1_fields))
print(f"R1: {r1_count.experts / 1e9:.0f}B of its {r1_count.total / 1e9:.0f}B parameters are routed experts "
      "(fused 3-D weights that bitsandbytes leaves in 16 bits)")
r1_totals = {}
for setup in estimate.candidates("inference", serve.batch, serve.seq, serve.gpus, serve.precisions, moe=True):
    e = estimate.estimate(r1_fields, setup)
    r1_totals[e.recipe] = e.bytes["total"]
    print(f"  {e.recipe:<38} weights {e.bytes['weights'] / GiB:6.1f}  KV {e.bytes['kv_cache'] / GiB:4.1f}  "
          f"total {e.bytes['total'] / GiB:6.1f} GiB  {'fits' if e.bytes['total'] <= serve.gpu_memory else ''}")

# %% [markdown]
# - replicas (no `+tp8`) need the whole model on each GPU: hopeless at 671B
# - split 8 ways (`+tp8`), 16-bit weights still take ~160 GiB per GPU, and NF4 on the linear maps barely
#   helps while the experts (97% of the parameters) stay in 16 bits: only NF4 *with* the experts fits
# - the KV cache does not shrink with the split: MLA caches one latent that every head reads, so each
#   GPU keeps all of it (GQA models split their kv heads instead)
#
# The same planner from the command line (the T4, `--precisions`, JSON output), read back and compared:

# %%
cli = subprocess.run([sys.executable, "-m", "lowmem_course", "plan", t4.model, "--gpu-memory", "15GiB",
                      "--seq", str(t4.seq), "--precisions", "fp16-mixed,fp32", "--json"], capture_output=True, text=True)
cli_fits = {f["recipe"]: f["bytes"]["total"] for f in json.loads(cli.stdout)["fits"]}
t4_choice = chosen[t4.label]
print(f"lowmem plan exit code {cli.returncode}; {len(cli_fits)} setups fit, among them {t4_choice.recipe}: "
      f"{cli_fits[t4_choice.recipe] / GiB:.2f} GiB (capstone.plan: {t4_choice.total / GiB:.2f} GiB)")
print("to reproduce it:", t4_choice.command(t4.model))

# %% [markdown]
# Each chosen recipe's breakdown per GPU, against the budget (dashed):

# %%
fig, axes = plt.subplots(1, len(BUDGETS), figsize=(15, 4))
for ax, b in zip(axes, BUDGETS):
    o = chosen[b.label]
    plots.breakdown_bars({o.train_recipe or o.recipe.replace("+", "\n+"): o.estimate.bytes}, title=b.label, ax=ax)
    ax.axhline(b.gpu_memory / GiB, color="black", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.1 * b.gpu_memory / GiB)
    ax.tick_params(axis="x", labelsize="small")
    if ax is not axes[-1]:
        ax.get_legend().remove()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · Verify the plan in miniature
#
# A plan is a prediction. Before paying for a GPU, check it on a model small enough for this CPU:
# run the recipes through the same training command (`lowmem_course.train`, in-process here),
# measure the last step, and compare the **ratios** between recipes with the estimator's ratios for
# the same tiny config, batch and sequence. If the ratios hold in miniature, the estimator's
# accounting of each technique holds; at full size only the sizes change.
#
# - models: the tiny twin of R1-Distill-Llama-70B (`tiny:r1-distill-llama-70b`) and the shipped student
# - data: teacher traces of subtraction (`lowmem_course.reasoning`), cut to 32 tokens, batch 8
# - recipes: the three recipes the plans chose (T4, 7B, 70B), each divided by plain fp32 full fine-tuning
# - `lowmem train` loads the frozen base in the recipe's dtype (fp16 for `lora+fp16-mixed`, bf16 for
#   `lora+bf16-mixed`, NF4 for QLoRA: `recipe.base_weights`), the way the estimator assumes, and runs the
#   recipe's techniques (checkpointing, offloaded activations, the chunked loss, the step in backward)

# %%
# NBVAL_IGNORE_OUTPUT
data = capstone.write_data(work / "subtraction.jsonl", n=32, seed=0)
RECIPES = [chosen[b.label].train_recipe for b in BUDGETS if b.task == "train"]
MODELS = ["tiny:r1-distill-llama-70b", "student-qwen2"]
ratios, measured, predicted = [], {}, {}
for model in lab.progress(MODELS, desc="miniature runs"):
    r, measured[model], predicted[model] = capstone.miniature(model, RECIPES, data, work / "miniature")
    ratios += r

# %%
print(f"{'model':<26} {'estimated':>9} {'measured':>9} {'error':>7}  (recipe / full fine-tuning, below)")
for r in ratios:
    print(f"{r.model:<26} {r.predicted:9.3f} {r.measured:9.3f} {r.error:+7.1%}")
    print(f"    {r.recipe}")
worst_ratio = max(abs(r.error) for r in ratios)
total_errors = {(m, r): predicted[m][r]["total"] / measured[m][r]["total"] - 1 for m in MODELS for r in measured[m]}
worst_total = max(map(abs, total_errors.values()))
print(f"worst ratio error: {worst_ratio:.1%}; worst error on the peak itself: {worst_total:.1%}")

# %%
labels = [f"{m.split(':')[-1].replace('r1-distill-', '')} {r}" for m in MODELS for r in measured[m]]
plots.predicted_vs_measured([predicted[m][r]["total"] for m in MODELS for r in predicted[m]],
                            [measured[m][r]["total"] for m in MODELS for r in measured[m]], labels=labels,
                            tolerance=0.10, title="lowmem train, last step: estimated vs measured peak (CPU)")
plt.show()

# %% [markdown]
# ## 3 · One command for real hardware
#
# ```
# python -m lowmem_course.train --model deepseek-ai/DeepSeek-R1-Distill-Llama-70B \
#     --recipe qlora+bf16-mixed+checkpointing --data traces.jsonl --out runs/70b --steps 2000 --batch 1 --max-tokens 4096
# ```
# (or `lowmem train ...`). It shows a tqdm progress bar, checkpoints the adapters and the optimizer
# every `--save-every` steps, saves the adapters with `save_pretrained` at the end and prints the
# memory of its last step. Here it runs on the student with the 70B plan's recipe, launched the way a
# learner launches it, as a subprocess (add `--no-progress` in logs and scripts):

# %%
def lowmem_train(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m lowmem_course.train ARGS` and return its exit code and output."""
    return subprocess.run([sys.executable, "-m", "lowmem_course.train", *args], capture_output=True, text=True)

RECIPE = chosen["70B on 2 x 80 GB"].train_recipe
run_dir = work / "run"
common = ["--model", "student-qwen2", "--recipe", RECIPE, "--data", str(data), "--out", str(run_dir),
          "--batch", "4", "--max-tokens", "48", "--save-every", "2"]
first = lowmem_train(*common, "--steps", "4")
print(f"exit code {first.returncode}\n{first.stdout}")

# %%
def logged_steps(out: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

def checkpoint_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "state.json").read_text())["step"]

def describe_log(out: Path) -> str:
    steps, losses = zip(*logged_steps(out))
    return f"steps logged {list(steps)}; loss ≈{losses[0]:.2f} at step {steps[0]}, ≈{losses[-1]:.2f} at step {steps[-1]}"

print(f"checkpoint at step {checkpoint_step(run_dir)}; files: {sorted(p.name for p in run_dir.iterdir())}")
print(describe_log(run_dir))

# %% [markdown]
# **Resume.** The run stopped at step 4 (an interruption looks the same: the last checkpoint is on
# disk). `--resume` loads the adapters and the optimizer state and continues to the requested step.
# Step *i* always trains on the same examples, so no step is lost or repeated.

# %%
resumed = lowmem_train(*common, "--steps", "8", "--resume")
print(f"exit code {resumed.returncode}; checkpoint at step {checkpoint_step(run_dir)}")
print(describe_log(run_dir))
adapter_files = sorted(p.name for p in (run_dir / "adapter").iterdir())
print("adapters saved with save_pretrained:", adapter_files)

# %% [markdown]
# **Bad input is refused in one line, with exit code 2.** A malformed line in the data names its
# line number, and an output folder that already holds a run's checkpoint is never overwritten
# unless you say `--resume` or `--overwrite`.

# %%
bad = work / "bad.jsonl"
bad.write_text(data.read_text().splitlines()[0] + "\n" + data.read_text().splitlines()[1] + "\n"
               + '{"prompt": "512-128=", "response": "<think>2-8-0=14\n')
malformed = lowmem_train("--model", "student-qwen2", "--recipe", "lora", "--data", str(bad),
                         "--out", str(work / "bad-run"), "--steps", "2")
malformed_message = malformed.stderr.strip().splitlines()[-1]
print(f"exit code {malformed.returncode}: {malformed_message.replace(str(work), '$WORK')}")

# %%
before = (run_dir / "checkpoint" / "trainable.safetensors").read_bytes()
refused = lowmem_train(*common, "--steps", "8")  # same folder, neither --resume nor --overwrite
refused_message = refused.stderr.strip().splitlines()[-1]
print(f"exit code {refused.returncode}: {refused_message.replace(str(work), '$WORK')}")
untouched = (run_dir / "checkpoint" / "trainable.safetensors").read_bytes() == before

# %% [markdown]
# ## 4 · Pitfalls
#
# **Your own loop, with the base as the checkpoint stores it.** `lowmem train` loads the frozen base in
# the recipe's dtype. A hand-written loop that calls `from_pretrained` without a dtype keeps the
# checkpoint's: fp32 for the student (the Hub's R1 checkpoints are bf16, which is right for bf16 but not
# for fp16). Under bf16 autocast an fp32 base costs 4 bytes per weight instead of 2, and the casts add
# 16-bit copies and an fp32 residual stream.
#
# **Your own loop, still in eval mode.** `from_pretrained` returns the model in eval mode, and
# transformers checkpoints activations only in training mode: without `model.train()`,
# `checkpointing=True` silently saves nothing.
#
# The 7B plan's recipe (LoRA, checkpointing, bf16 autocast) by hand, three ways:

# %%
from lowmem_course import measure, steps

SEVEN = chosen["7B, seq 4096, 24 GB"].train_recipe
seven_estimate = predicted["student-qwen2"][SEVEN]["total"]
HAND = {"no dtype (fp32 base), train()": ({}, True), "dtype=bf16, train()": ({"dtype": torch.bfloat16}, True),
        "dtype=bf16, no train()": ({"dtype": torch.bfloat16}, False)}
own_peaks, own_errors = {}, {}
for label, (kwargs, training) in HAND.items():
    own = quantize.add_lora(family.load("student-qwen2", **kwargs), rank=16, alpha=32, checkpointing=True)
    own.train(training)
    ids = steps.random_batch(own.config.vocab_size, 8, 32)
    peak = measure.measure_train_step(own, measure.make_optimizer(own), ids, autocast_dtype=torch.bfloat16).peak_bytes
    own_peaks[label], own_errors[label] = peak, seven_estimate / peak - 1
    print(f"by hand, {label:<30} measured {peak / MiB:6.2f} MiB, estimated {seven_estimate / MiB:.2f} MiB "
          f"({own_errors[label]:+.1%})")
train_error = total_errors[("student-qwen2", SEVEN)]
print(f"{'lowmem train (bf16 base, train())':<39} measured {measured['student-qwen2'][SEVEN]['total'] / MiB:6.2f} MiB, "
      f"estimated {seven_estimate / MiB:.2f} MiB ({train_error:+.1%})")
t4_copies = 2 * estimate.count(estimate.shape_of(estimate.load_config(t4.model))).linear
print(f"at full size on the T4, a bf16 checkpoint under fp16 autocast adds {t4_copies / GiB:.1f} GiB of fp16 weight copies")

# %% [markdown]
# - the estimate is far too low for the hand-written loop, and right for `lowmem train`, on the same recipe
# - on the T4, a bf16 checkpoint under fp16 autocast pays 2 bytes per linear weight for the copies
# - the fix: pass `dtype=` to `from_pretrained` (what `lowmem train` does), or convert the checkpoint once

# %% [markdown]
# ## 5 · What none of this buys you
#
# **Compute.** Memory techniques make a run *possible*; none makes it faster. Training costs about
# 6 × parameters × tokens operations (LoRA skips the base's weight gradients: ~4; checkpointing runs
# the forward twice: +2). For 10,000 traces of the planned length, at 40% of each card's spec-sheet
# dense peak (T4 65 TFLOP/s fp16, RTX 4090 165 bf16, A100 312 bf16):

# %%
PEAK = {"1.5B on a T4": 65e12, "7B, seq 4096, 24 GB": 165e12, "70B on 2 x 80 GB": 312e12}
hours, flops_of = {}, {}
print(f"{'budget':<22}{'operations':>11}{'GPU-hours':>11}{'6 x N x D':>11}  (recipe below)")
for b in BUDGETS[:3]:
    o = chosen[b.label]
    tokens = 10_000 * b.seq
    flops = capstone.train_flops(o.estimate.parameters, tokens, o.estimate.setup)
    hours[b.label] = flops / (0.4 * PEAK[b.label]) / 3600
    flops_of[b.label] = flops / (o.estimate.parameters * tokens)  # operations per parameter per token
    print(f"{b.label:<22}{flops:>11.2e}{hours[b.label]:>11.1f}{6 * o.estimate.parameters * tokens:>11.2e}")
    print(f"    {o.train_recipe}")
print("6 x N x D: full fine-tuning without checkpointing, 6 x parameters x tokens")

# %% [markdown]
# **Quality.** A recipe that fits says nothing about what the model learns: that comes from the data and
# the number of steps. The 8 steps above lowered the loss, but the student still cannot subtract:

# %%
from peft import PeftModel

from lowmem_course import student

tuned_base, tok = student.load_student("qwen2")
tuned = PeftModel.from_pretrained(tuned_base, run_dir / "adapter").eval()
subtraction_accuracy = student.accuracy(tuned, tok, n=20, seed=0, task="subtraction", progress=False)
losses = [loss for _, loss in logged_steps(run_dir)]
print(f"loss ≈{losses[0]:.2f} -> ≈{losses[-1]:.2f} over 8 steps; subtraction accuracy {subtraction_accuracy:.0%}")

# %% [markdown]
# ## Summary
# - `capstone.plan` is `estimate.plan` for a budget: LoRA + fp16 on a T4 (`precisions=`, `--precisions`),
#   LoRA + checkpointing for the 7B at 4k tokens on 24 GB, QLoRA + checkpointing for the 70B, NF4
#   weights *and experts* split over 8 GPUs to serve R1.
# - In miniature, the chosen recipes' measured ratios match the estimator's within 10%.
# - Load the frozen base in the recipe's dtype; the checkpoint's dtype is not a plan.
# - `python -m lowmem_course.train` runs any of the training recipes with progress, a memory report,
#   resumable checkpoints, `save_pretrained` adapters, and one-line errors with exit code 2.
# - Memory is one constraint; compute hours and data quality are the others.
#
# ## Exercises
# 1. *(easy)* Plan R1-Distill-Qwen-14B at 2,048 tokens on a 24 GB card. Which recipe is chosen?
# 2. *(medium)* Run `"qlora+fp16-mixed"` and `"full+bf16-mixed"` through the miniature on the student. Do their
#    ratios to fp32 full fine-tuning match the estimator's within 10%? Which one saves the most, and why
#    does bf16 autocast save so little for full fine-tuning?
# 3. *(hard)* Serving R1 on 8 × 80 GB with the chosen setup: how many 8,192-token requests fit at once?
#    Why does doubling to 16 GPUs buy fewer extra requests than the weights it frees suggest?
#
# ## Further reading
# - Dettmers et al., *QLoRA: Efficient Finetuning of Quantized LLMs* (arXiv 2305.14314)
# - Chen et al., *Training Deep Nets with Sublinear Memory Cost* (arXiv 1604.06174)
# - Kaplan et al., *Scaling Laws for Neural Language Models* (arXiv 2001.08361): the 6 N T rule
# - Kwon et al., *Efficient Memory Management for LLM Serving with PagedAttention* (arXiv 2309.06180)
# - DeepSeek-AI, *DeepSeek-R1* (arXiv 2501.12948); Hugging Face PEFT docs, *LoRA* and *Quantization*

# %% [markdown]
# ## Self-check
# Each claim above, asserted on the numbers this notebook computed and measured.

# %%
assert not any(o.estimate.setup.precision in ("fp16-mixed", "fp32") for o in stock)         # default plan: bf16 only
assert {o.estimate.setup.precision for o in no_bf16} == {"fp16-mixed", "fp32", "fp16"}      # precisions= honoured (serving: fp16)
for b in BUDGETS:
    o = chosen[b.label]
    assert o is not None and o.total <= b.gpu_memory                                         # fits its budget
    assert capstone.naive(b).bytes["total"] > b.gpu_memory                                   # and the naive setup does not
assert chosen["1.5B on a T4"].train_recipe == "lora+fp16-mixed+chunked-loss"
assert chosen["7B, seq 4096, 24 GB"].train_recipe == "lora+bf16-mixed+checkpointing+offload-activations+chunked-loss"
assert chosen["70B on 2 x 80 GB"].train_recipe == "qlora+bf16-mixed+checkpointing+offload-activations+chunked-loss+step-in-backward"
assert [o.recipe for o in plans["serve R1 on 8 x 80 GB"]] == ["inference+bf16+nf4-dq+experts+tp8"]  # R1: split + 4-bit experts
assert r1_totals["inference+bf16+nf4-dq+tp8"] > serve.gpu_memory > r1_totals["inference+bf16+nf4-dq+experts+tp8"]
assert r1_count.experts > 0.95 * r1_count.total
assert cli.returncode == 0 and cli_fits[t4_choice.recipe] == t4_choice.total                 # CLI and API agree
assert RECIPES == [chosen[b.label].train_recipe for b in BUDGETS[:3]]                      # the chosen recipes ran
assert worst_ratio <= 0.10 and worst_total <= 0.10                                           # miniature within 10%
assert first.returncode == 0 and "peak" in first.stdout and resumed.returncode == 0
assert checkpoint_step(run_dir) == 8 and [s for s, _ in logged_steps(run_dir)] == list(range(1, 9))  # resumed to step 8
assert "adapter_model.safetensors" in adapter_files and "adapter_config.json" in adapter_files
assert malformed.returncode == 2 and f"{bad}:3: not valid JSON" in malformed_message          # names line 3
assert refused.returncode == 2 and "--resume" in refused_message and untouched               # another run's checkpoint kept
assert own_errors["no dtype (fp32 base), train()"] < -0.15                                  # base dtype pitfall
assert own_errors["dtype=bf16, no train()"] < -0.30                                          # eval mode: no checkpointing
assert abs(own_errors["dtype=bf16, train()"]) <= 0.10 and abs(train_error) <= 0.10           # done right: as planned
assert flops_of["7B, seq 4096, 24 GB"] == flops_of["70B on 2 x 80 GB"] == 6 == 1.5 * flops_of["1.5B on a T4"]  # no faster than full FT
assert losses[-1] < losses[0] and subtraction_accuracy < 0.2                                 # fits != learned
print("all self-checks passed")
