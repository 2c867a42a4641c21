# %% [markdown]
# # 03 · Quantization and QLoRA
#
# R1-Distill-Qwen-7B has 14 GiB of bf16 weights; fine-tuning all of it with AdamW needs over 100 GiB.
# QLoRA freezes the model in **4 bits** (NF4, about 4.1 bits per weight) and trains small LoRA
# adapters on top: the same 7B model then fine-tunes on one 16 GB consumer GPU. This notebook measures
# every byte of that trade on the course's reasoning student, and what it costs in accuracy.
#
# **What you will learn**
# - int8, FP4, NF4 and NF4 + double quantization: bits per weight measured from bitsandbytes' buffers
# - what 4 bits cost in accuracy, layer by layer and on the student's answers
# - QLoRA: teach the 4-bit student a new skill (subtraction) with LoRA adapters, and its memory
# - the pitfalls: fp32 upcasts, bitsandbytes' CPU repacking, MoE experts left in 16 bits, checkpointing
# - what 4 bits mean for the R1 family, from 1.5B on a free Colab T4 to the 671B model

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
import dataclasses, textwrap, warnings

import matplotlib.pyplot as plt
import torch

from lowmem_course import estimate, family, measure, optimizers, plots, quantize, skills, steps, student
from lowmem_course.units import GiB, KiB, format_bytes

course = lab.course_model("student-qwen2")  # LOWMEM_MODEL=<Hub id> swaps in the real model
source = course.source  # what family.load and quantize.load_quantized read
tok = family.load_tokenizer(source)
N_EVAL = 50  # held-out problems per accuracy (more is slow on a CPU)
FORMATS = ("int8", "fp4", "nf4", "nf4-dq")  # the lesson's four formats (quantize.FORMATS adds fp4-dq)

# %% [markdown]
# ## 1 · Predict
#
# Bits per quantized weight, from the formats' definitions (the estimator's table):
# - **int8** (LLM.int8): 8 bits + one fp32 scale per row
# - **FP4 / NF4**: 4-bit codes, one fp32 `absmax` per block of 64 weights: 4 + 32/64 = 4.5 bits
# - **NF4 + double quantization**: the absmax themselves in 8 bits, one fp32 per 256 blocks:
#   4 + 8/64 + 32/(64·256) ≈ 4.127 bits

# %%
theory_bits = {fmt: 8 * estimate.WEIGHT_BYTES[fmt] for fmt in ("bf16", *FORMATS)}
for fmt, bits in theory_bits.items():
    print(f"{fmt:<7} {bits:6.3f} bits per weight")

# %% [markdown]
# ## 2 · Measure: the student in four formats
#
# Load the same `save_pretrained` directory with each `BitsAndBytesConfig`
# (`quantize.load_quantized` = `from_pretrained(..., quantization_config=quantize.bnb_config(fmt))`).
# `quantize.storage_breakdown` reads every buffer: the packed codes, the quantization constants
# (absmax, nested absmax, offset) and the per-layer lookup tables.

# %%
reference = family.load(source, dtype=torch.bfloat16, device_map={"": str(device)}).eval()
models = {"bf16": reference} | {fmt: quantize.load_quantized(source, fmt, device=device) for fmt in FORMATS}
storage = {fmt: quantize.storage_breakdown(m) for fmt, m in models.items()}
print(f"{'format':<8}{'model':>11}{'codes':>11}{'constants':>12}{'tables':>11}{'bits/w':>8}{'w/o tables':>11}{'theory':>8}")
for fmt, s in storage.items():
    if fmt == "bf16":
        print(f"{fmt:<8}{format_bytes(s.total):>11}")
        continue
    print(f"{fmt:<8}{format_bytes(s.total):>11}{format_bytes(s.codes):>11}{format_bytes(s.constants):>12}"
          f"{format_bytes(s.tables):>11}{s.bits_per_weight:8.3f}{s.bits_per_weight_without_tables:11.3f}{theory_bits[fmt]:8.3f}")

# %% [markdown]
# The per-weight buffers match the theory. The lookup tables (16 NF4 levels and the 256-entry
# 8-bit code of double quantization, fp32, **per layer**) are 1,088 bytes per layer: a lot for the
# student's 26k-weight layers, nothing for a real one. Quantize one real-size MLP matrix of
# R1-Distill-Qwen-1.5B (1536 → 8960) and measure it the same way:

# %%
real = family.config("r1-distill-qwen-1.5b")
real_layer = quantize.bnb.nn.Linear4bit(real.hidden_size, real.intermediate_size, bias=False,
                                        compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
real_layer.load_state_dict(torch.nn.Linear(real.hidden_size, real.intermediate_size, bias=False).state_dict())
real_layer = real_layer.to(device)
real_bits = quantize.storage_breakdown(real_layer).bits_per_weight
print(f"one {real.intermediate_size}x{real.hidden_size} layer in NF4 + double quant: {real_bits:.4f} bits per weight")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.bar(list(storage), [s.total / KiB for s in storage.values()], color="#4c72b0")
ax.set_ylabel("weights in memory (KiB)"); ax.set_title("The student, one format per bar")
plt.show()

# %% [markdown]
# ## 3 · Quality: per-layer error and the student's answers
#
# - per-layer error: `||W_q − W|| / ||W||` of the dequantized weight against the bf16 one
# - accuracy: exact-match answers on `N_EVAL` held-out addition problems (greedy `generate`)

# %%
errors = {fmt: quantize.layer_errors(reference, models[fmt]) for fmt in FORMATS}
accuracy = {fmt: student.accuracy(m, tok, n=N_EVAL, seed=0, progress=False) for fmt, m in models.items()}
print(f"{'format':<8}{'mean layer error':>18}{'worst layer':>13}{'accuracy':>10}")
for fmt in models:
    e = errors.get(fmt)
    mean_e = f"{sum(e.values()) / len(e):.2%}" if e else "-"
    worst_e = f"{max(e.values()):.2%}" if e else "-"
    print(f"{fmt:<8}{mean_e:>18}{worst_e:>13}{accuracy[fmt]:>10.1%}")

# %% [markdown]
# NF4 places its 16 levels at the quantiles of a normal distribution, where trained weights
# lie; FP4 spaces them as a tiny float. Same bits, smaller error for NF4.
#
# ## 4 · QLoRA: teach the 4-bit student to subtract
#
# The student only ever saw additions. `reasoning` also writes subtraction traces
# (`482-357=<think>2-7-0=15,…</think>125`), a skill it never learned. QLoRA, as in the paper:
# frozen NF4 + double-quant base, LoRA adapters (rank 8 on every linear map) in fp32, and
# activation checkpointing. The recipe is `skills.SkillConfig`:

# %%
SKILL = skills.SkillConfig()
print(textwrap.fill(repr(SKILL), width=100, subsequent_indent="    "))  # no line wider than the notebook
subtraction_batch = skills.skill_batches(SKILL)  # step -> (input_ids, labels), fresh problems per step
base4 = quantize.load_quantized(source, SKILL.fmt, device=device)
sub_before = student.accuracy(base4, tok, n=N_EVAL, seed=0, task="subtraction", progress=False)
print(f"4-bit student, subtraction accuracy before any training: {sub_before:.1%}")

# %% [markdown]
# **Live run (short).** The first steps of that recipe, run here and now (a quarter of the batch,
# constant learning rate, no warmup): the loss falls, but a dozen steps do not teach subtraction yet.

# %%
# NBVAL_IGNORE_OUTPUT
import time
started = time.perf_counter()
qlora = quantize.add_lora(quantize.load_quantized(source, SKILL.fmt, device=device), rank=SKILL.rank,
                          alpha=SKILL.alpha, checkpointing=SKILL.checkpointing, seed=SKILL.seed)
live_steps, live = 12, skills.skill_batches(dataclasses.replace(SKILL, batch_size=16))  # a quarter of the batch
losses = steps.train_loop(qlora, optimizers.make_optimizer(qlora, "adamw", lr=SKILL.lr), live, live_steps,
                          grad_clip=SKILL.grad_clip)  # constant lr: the optimizer's own
print(f"{live_steps} live QLoRA steps: {time.perf_counter() - started:.0f} s")

# %%
print(f"trainable parameters: {quantize.trainable_parameters(qlora):,} "
      f"({quantize.trainable_parameters(qlora) / sum(p.numel() for p in reference.parameters()):.1%} of the student)")
print(f"live run: loss ≈{losses[0]:.2f} -> ≈{losses[-1]:.2f} nats/token over {len(losses)} steps")

# %% [markdown]
# **The full run (shipped).** The whole recipe (`SKILL.steps` steps) takes minutes on a CPU, too long
# for this notebook. The package ships its result, trained from the same seed by
# `python -m lowmem_course.skills teach --out DIR` (the shipped copy is never overwritten); its
# `recipe.json` records the command that made it and the accuracy measured on 500 held-out problems.
# Load it on the 4-bit student and measure again:

# %%
shipped, _, shipped_recipe = skills.load_adapter(SKILL.task, device=device)
sub_after = student.accuracy(shipped, tok, n=N_EVAL, seed=0, task="subtraction", progress=False)
add_after = student.accuracy(shipped, tok, n=N_EVAL, seed=0, progress=False)
print(f"shipped adapter: {shipped_recipe['command']}")
print(f"  recorded: subtraction {shipped_recipe['accuracy_before']:.1%} -> {shipped_recipe['accuracy']:.1%} "
      f"on {shipped_recipe['eval_n']} held-out problems")
print(f"  measured here: subtraction {sub_before:.1%} -> {sub_after:.1%} on {N_EVAL}; addition now {add_after:.1%}")

# %% [markdown]
# The adapter learned subtraction and **forgot addition**: it saw only subtraction, and nothing
# asked it to keep the old skill (catastrophic forgetting). Mixing old-task problems into each
# batch is the usual cure (exercise 4).

# %%
shipped_losses = [float(line.split(",")[1]) for line in
                  (skills.adapter_dir(SKILL.task) / "loss.csv").read_text().splitlines()[1:]]
plots.lines(list(range(1, len(shipped_losses) + 1)), {"shipped run": shipped_losses,
            "live run (this notebook)": losses + [float("nan")] * (len(shipped_losses) - len(losses))},
            xlabel="step", ylabel="loss (nats per target token)", title="Training the adapters of the 4-bit student")
plt.show()

# %% [markdown]
# ### Memory: full fine-tuning, bf16 LoRA, QLoRA
#
# One steady-state training step of the same student on the same sequence (batch 1), measured with
# `measure.measure_train_step`:
# - **full bf16**: the standard baseline, bf16 weights + bf16 gradients + AdamW's two moments
#   (fused AdamW: no extra temporaries), with and without checkpointing;
# - **LoRA bf16**: the same adapters on the bf16 student; **QLoRA**: on the 4-bit student, with checkpointing.
#
# The tracker sees parameters and buffers; the 4-bit quantization constants live in plain tensors of
# each `quant_state`, so their bytes (measured above) are added.

# %%
mem_batch = subtraction_batch(0)[0][:1].to(device)

def bf16_student():
    return family.load(source, dtype=torch.bfloat16, device_map={"": str(device)})

full, full_ckpt = bf16_student(), bf16_student()
full_ckpt.activation_checkpointing_enable()
lora16 = quantize.add_lora(bf16_student(), rank=SKILL.rank, alpha=SKILL.alpha, checkpointing=SKILL.checkpointing)
runs = {"full bf16": (full, measure.make_optimizer(full, "adamw")),
        "full bf16 + ckpt": (full_ckpt, measure.make_optimizer(full_ckpt, "adamw")),
        "LoRA bf16 + ckpt": (lora16, None),
        "QLoRA + ckpt": (qlora, None)}
step_memory = {}
for label, (model, opt) in runs.items():
    model.train()  # checkpointing only acts in training mode
    opt = opt or optimizers.make_optimizer(model, "adamw", lr=1e-5)
    m = measure.measure_train_step(model, opt, mem_batch, label=label)
    s = quantize.storage_breakdown(model)
    extra = s.constants + s.tables if s.quantized_weights else 0
    step_memory[label] = m.breakdown | {"parameters": m.breakdown["parameters"] + extra}
full_total = sum(step_memory["full bf16"].values())
ratios = {label: sum(b.values()) / full_total for label, b in step_memory.items()}
qlora_ratio = ratios["QLoRA + ckpt"]
parts = [k for k in dict.fromkeys(k for b in step_memory.values() for k in b)
         if any(b.get(k) for b in step_memory.values())]  # the components some step holds
print(f"{'':<13}" + "".join(f"{label:>18}" for label in step_memory))  # a column per step: 85 characters wide
print(f"{'total':<13}" + "".join(f"{format_bytes(sum(b.values())):>18}" for b in step_memory.values()))
print(f"{'of full bf16':<13}" + "".join(f"{r:>18.1%}" for r in ratios.values()))
for k in parts:
    print(f"{k:<13}" + "".join(f"{format_bytes(b[k]) if b.get(k) else '-':>18}" for b in step_memory.values()))

# %%
plots.breakdown_bars(step_memory, title="One training step of the student (batch 1)")
plt.show()

# %% [markdown]
# Read the breakdown: full fine-tuning is weights, gradients and optimizer state of every weight
# (its peak is the optimizer step, so checkpointing does not lower it). QLoRA keeps 4-bit weights and
# trains 11% as many parameters. At batch 1 that is the bulk, as for a 7B model; with a large batch on
# this tiny student the activations (fp32 in the adapters) dominate instead, and checkpointing is what saves.

# %% [markdown]
# ### 8-bit and paged optimizers
#
# - `bitsandbytes.optim.AdamW8bit` keeps Adam's two moments in 1 byte each (blockwise quantized)
#   instead of 4, but only for tensors of at least `min_8bit_size` = 4096 elements.
# - *Paged* optimizers allocate their state in CUDA unified memory: when the GPU runs out, the driver
#   pages it to CPU RAM instead of raising out-of-memory. On a CPU there is nothing to page.

# %%
def optimizer_state_bytes(name: str, **kwargs) -> int:
    """Bytes of optimizer state after one step on a fresh QLoRA model (name as in optimizers.make_optimizer)."""
    model = quantize.add_lora(quantize.load_quantized(source, "nf4-dq", device=device), rank=SKILL.rank)
    opt = optimizers.make_optimizer(model, name, **kwargs)
    steps.train_loop(model, opt, subtraction_batch, 1)
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values() if torch.is_tensor(t))

opt_bytes = {"AdamW": optimizer_state_bytes("adamw"), "AdamW8bit": optimizer_state_bytes("adamw8bit"),
             "AdamW8bit, min_8bit_size=0": optimizer_state_bytes("adamw8bit", min_8bit_size=0)}
for name, b in opt_bytes.items():
    print(f"{name:<28}{format_bytes(b):>11}")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    optimizer_state_bytes("paged-adamw8bit")
paged_note = sorted({str(w.message) for w in caught if "aged" in str(w.message)})
print(paged_note[0] if paged_note else "paged optimizer: state in CUDA unified memory")

# %% [markdown]
# ## 5 · Pitfalls
#
# **`prepare_model_for_kbit_training` upcasts.** PEFT's helper casts every parameter that is not
# 4-bit (embeddings, `lm_head`, norms, biases) to fp32: 2 more bytes each. With a 150k vocabulary
# that is most of the non-quantized model.

# %%
from peft import prepare_model_for_kbit_training

kbit = quantize.storage_breakdown(quantize.load_quantized(source, "nf4-dq", device=device))
upcast = quantize.storage_breakdown(prepare_model_for_kbit_training(
    quantize.load_quantized(source, "nf4-dq", device=device), use_gradient_checkpointing=False))
real_counts = estimate.count(estimate.shape_of(real))
real_upcast = 2 * (real_counts.total - real_counts.linear)
print(f"student: non-quantized bytes {format_bytes(kbit.other)} -> {format_bytes(upcast.other)} after the upcast")
print(f"R1-Distill-Qwen-1.5B: +{format_bytes(real_upcast)} for {real_counts.total - real_counts.linear:,} non-quantized parameters")

# %% [markdown]
# Skip it (`quantize.add_lora(..., upcast=False)`, the default) when computing in bf16; keep it, or
# upcast only the norms, on fp16 GPUs such as the T4, where fp16 norms and loss can overflow.
#
# **bitsandbytes repacks 4-bit weights on CPU.** On a CPU with AVX512-BF16, an eval-mode forward
# without gradients rewrites every `Linear4bit` weight into an inference layout. Later training then
# fails on layers with a bias, or silently stops the gradients of the layer inputs, and with them the
# adapters below. On the student's shapes it fails at once (output depends on the CPU):

# %%
# NBVAL_IGNORE_OUTPUT
from peft import LoraConfig, get_peft_model

raw = get_peft_model(family.load(source, quantization_config=quantize.bnb_config("nf4-dq"), dtype=torch.bfloat16,
                                 device_map={"": str(device)}), LoraConfig(r=SKILL.rank, target_modules="all-linear"))
try:
    student.accuracy(raw, tok, n=10, seed=0, progress=False)
    raw.train()
    raw(input_ids=mem_batch, labels=mem_batch).loss.backward()
    flowing = sum(p.grad is not None and bool(p.grad.any()) for n, p in raw.named_parameters() if "lora_B" in n)
    print(f"without the fix: {flowing} of {sum('lora_B' in n for n, _ in raw.named_parameters())} adapters got a gradient")
except (RuntimeError, AssertionError) as err:
    print(f"without the fix: {type(err).__name__}: {err}")

# %% [markdown]
# `quantize.load_quantized` and `quantize.add_lora` set `support_avx512bf16_for_cpu = False` on every
# `Linear4bit`. The live QLoRA model above went train → eval; one eval-mode forward without
# gradients (what `generate` does), then one more training step, shows every adapter still receives a gradient:

# %%
with torch.no_grad():
    qlora.eval()(input_ids=mem_batch)
qlora.train()
qlora(input_ids=mem_batch, labels=mem_batch).loss.backward()
lora_grads = [bool(p.grad is not None and p.grad.any()) for n, p in qlora.named_parameters() if "lora_" in n]
qlora.zero_grad(set_to_none=True)
qlora.eval()
print(f"with the fix: {sum(lora_grads)} of {len(lora_grads)} LoRA matrices got a gradient")

# %% [markdown]
# **MoE experts stay in 16 bits.** transformers 5 stores a MoE layer's routed experts as two fused
# 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`), not as `nn.Linear`; bitsandbytes
# only replaces `nn.Linear`. On the DeepseekV3 student, look where the bytes are:

# %%
moe_source = student.student_dir("deepseek_v3")
moe_tok = family.load_tokenizer(moe_source)
moe = quantize.load_quantized(moe_source, "nf4-dq", device=device)
moe_before = quantize.storage_breakdown(moe)
expert_weights = sum(p.numel() for m in quantize.fused_expert_modules(moe) for p in m.parameters())
moe_acc_before = student.accuracy(moe, moe_tok, n=N_EVAL, seed=0, progress=False)
quantize.quantize_experts(moe)  # 4-bit blockwise NF4 for the fused experts, dequantized per forward
moe_after = quantize.storage_breakdown(moe)
moe_acc_after = student.accuracy(moe, moe_tok, n=N_EVAL, seed=0, progress=False)
print(f"'4-bit' DeepseekV3 student: {format_bytes(moe_before.total)}, of which {moe_before.other / moe_before.total:.0%} "
      f"still 16-bit ({expert_weights:,} expert weights); accuracy {moe_acc_before:.1%}")
print(f"experts quantized too:      {format_bytes(moe_after.total)}, {moe_after.bits_per_weight_without_tables:.2f} bits "
      f"per quantized weight; accuracy {moe_acc_after:.1%}")

# %% [markdown]
# **LoRA + gradient checkpointing needs input gradients.** Reentrant checkpointing recomputes a
# layer only if one of its *inputs* requires a gradient. The embeddings are frozen, so the hidden
# states do not, and the adapters inside get no gradient, without any error.
# `enable_input_require_grads()` fixes it (transformers 5's `activation_checkpointing_enable` calls
# it for you, and defaults to non-reentrant checkpointing).

# %%
ckpt = quantize.add_lora(quantize.load_quantized(source, "nf4-dq", device=device), rank=SKILL.rank)
ckpt.activation_checkpointing_enable({"use_reentrant": True})

def adapters_with_gradient(model) -> int:
    """How many LoRA B matrices receive a non-zero gradient from one backward pass (0 if none can)."""
    model.train()
    loss = model(input_ids=mem_batch, labels=mem_batch).loss
    if not loss.requires_grad:  # nothing before the loss needs a gradient: backward() would raise
        print("the loss does not require grad: no adapter can learn")
        return 0
    loss.backward()
    count = sum(bool(p.grad is not None and p.grad.any()) for n, p in model.named_parameters() if "lora_B" in n)
    model.zero_grad(set_to_none=True)
    return count

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch warns that no input requires grad: that is the pitfall
    ckpt.disable_input_require_grads()
    without_inputs = adapters_with_gradient(ckpt)
ckpt.enable_input_require_grads()
with_inputs = adapters_with_gradient(ckpt)
print(f"checkpointing without input gradients: {without_inputs} adapters learn; with them: {with_inputs}")

# %% [markdown]
# ## 6 · At full size
#
# The estimator's weights in bf16 and NF4 + double quantization, and one training step (batch 1,
# 1,024 tokens, activation checkpointing) for full fine-tuning (bf16 mixed precision) and QLoRA
# (rank 16). A free Colab T4 has 16 GB (15 GiB usable).

# %%
T4 = 15 * GiB
print(f"{'model':<22}{'bf16 weights':>13}{'nf4-dq':>10}{'full FT':>10}{'QLoRA':>10}  QLoRA fits a T4")
full_size = {}
for name in family.MEMBERS:
    w16 = estimate.estimate(name, estimate.Setup(mode="inference", precision="bf16")).bytes["weights"]
    w4 = estimate.estimate(name, estimate.Setup(mode="inference", precision="bf16", weights="nf4-dq")).bytes["weights"]
    ft = estimate.estimate(name, estimate.Setup(mode="full", checkpointing="full")).bytes["total"]
    ql = estimate.estimate(name, estimate.Setup(mode="qlora", checkpointing="full")).bytes["total"]
    full_size[name] = (w16, w4, ft, ql)
    print(f"{name:<22}{w16 / GiB:>10.1f}GiB{w4 / GiB:>7.1f}GiB{ft / GiB:>7.0f}GiB{ql / GiB:>7.1f}GiB  {'yes' if ql < T4 else 'no'}")

# %% [markdown]
# For R1 the 4-bit column keeps the routed experts in bf16, as transformers loads them. Quantizing
# them too (what `quantize.quantize_experts` does) moves the 671B model from ~1.2 TiB to:

# %%
r1_experts = sum(p.numel() for m in quantize.fused_expert_modules(family.build(family.config("r1"), device="meta"))
                 for p in m.parameters())
r1_w4_experts = full_size["r1"][1] - int(r1_experts * (2 - estimate.WEIGHT_BYTES["nf4-dq"]))
print(f"R1: {r1_experts / 1e9:.0f}B of {family.count_parameters(family.config('r1')).total / 1e9:.0f}B weights are routed experts; "
      f"4-bit with experts: {r1_w4_experts / GiB:.0f} GiB (= {r1_w4_experts / (80 * GiB):.1f} x 80 GB GPUs)")

# %% [markdown]
# **Merging adapters for inference.** `merge_and_unload()` adds `B·A·α/r` into the weights. Merge into
# the 16-bit base (a 4-bit base would be re-quantized after the merge, with new rounding errors),
# then quantize the merged model again for serving if needed.

# %%
from peft import PeftModel

merged = PeftModel.from_pretrained(bf16_student(), skills.adapter_dir(SKILL.task)).merge_and_unload().eval()
merged_acc = student.accuracy(merged, tok, n=N_EVAL, seed=0, task="subtraction", progress=False)
print(f"shipped adapter merged into the bf16 student: {type(merged).__name__}, "
      f"subtraction accuracy {merged_acc:.1%} (on the 4-bit base: {sub_after:.1%})")

# %% [markdown]
# ## Summary
# - NF4 + double quantization stores a weight in ~4.13 bits (measured), 3.9× less than bf16,
#   and the student's answers barely move; int8 is nearly lossless at 8 bits.
# - QLoRA trains adapters on a frozen 4-bit base: the shipped run taught the 4-bit student to
#   subtract, with a training step under 40% of the memory of full bf16 fine-tuning (batch 1,
#   with checkpointing). The live run here only shows the first steps (the loss falls).
# - Check what was actually quantized (MoE experts!), skip needless fp32 upcasts, and keep
#   input gradients on with checkpointing.
#
# ## Exercises
# 1. *(easy)* Measure the QLoRA step with `rank=2` and `rank=32` (`quantize.add_lora`). How do trainable
#    parameters and memory move? Which rank still stays under 40% of full fine-tuning?
# 2. *(medium)* Load the student with `skip_modules=["mlp"]` in `quantize.bnb_config`: which layers
#    are most sensitive to 4 bits? Compare `layer_errors` and accuracy.
# 3. *(hard)* Merge the adapters into the 4-bit base (`qlora.merge_and_unload()`), measure the
#    accuracy, and explain the difference with the bf16 merge.
# 4. *(hard)* Teach subtraction without forgetting addition: write a `batches(step)` that mixes both
#    tasks, train with `steps.train_loop`, and measure both accuracies.
#
# ## Further reading
# - Dettmers et al., *QLoRA: Efficient Finetuning of Quantized LLMs* (arXiv 2305.14314)
# - Dettmers et al., *LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale* (arXiv 2208.07339)
# - Dettmers et al., *8-bit Optimizers via Block-wise Quantization* (arXiv 2110.02861)
# - Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models* (arXiv 2106.09685)
# - Hugging Face docs: *bitsandbytes* quantization in transformers; PEFT's *LoRA* and `prepare_model_for_kbit_training`

# %% [markdown]
# ## Self-check
# Each claim above, asserted on the numbers this notebook measured.

# %%
assert storage["nf4-dq"].bits_per_weight_without_tables <= 4.2 and real_bits <= 4.2       # NF4 + DQ: <= 4.2 bits
assert abs(real_bits - theory_bits["nf4-dq"]) < 0.01                                       # matches the theory
assert storage["nf4"].bits_per_weight_without_tables == storage["fp4"].bits_per_weight_without_tables == 4.5
assert 8 < storage["int8"].bits_per_weight < 8.5                                           # 8 bits + row scales
assert storage["nf4-dq"].total < storage["int8"].total < storage["bf16"].total
assert sum(errors["nf4"].values()) < sum(errors["fp4"].values())                           # NF4 beats FP4
assert accuracy["bf16"] - accuracy["int8"] <= 0.01                                         # int8: within 1 point
assert accuracy["bf16"] - min(accuracy["nf4"], accuracy["nf4-dq"]) <= 0.03                 # 4-bit: within 3 points
assert sub_before < 0.1                                                                    # a skill it does not have
assert sum(losses[-3:]) < 0.8 * sum(losses[:3])                                            # live run: the adapters learn
assert sub_after >= 0.8 and shipped_recipe["accuracy"] >= 0.8                              # shipped QLoRA run: >= 80% subtraction
assert shipped_recipe["skill_config"] == dataclasses.asdict(SKILL)                         # ... trained with this recipe
assert qlora_ratio < 0.40                                                                  # QLoRA step < 40% of full bf16 FT
assert ratios["full bf16 + ckpt"] > 0.95                                                   # checkpointing alone does not do it
assert ratios["QLoRA + ckpt"] < ratios["LoRA bf16 + ckpt"] < 1                             # 4 bits save on top of LoRA
assert add_after < accuracy["nf4-dq"] - 0.5                                                 # ... and forgot addition
assert abs(merged_acc - sub_after) <= 0.1                                                  # merging into bf16 keeps the skill
assert opt_bytes["AdamW8bit, min_8bit_size=0"] < opt_bytes["AdamW8bit"] <= opt_bytes["AdamW"]
assert upcast.other > 1.9 * kbit.other                                                     # the fp32 upcast
assert all(lora_grads)                                                                     # eval -> train -> eval: every adapter learns
assert moe_before.other > 0.5 * moe_before.total                                           # experts left in 16 bits
assert moe_after.total < 0.5 * moe_before.total and moe_acc_before - moe_acc_after <= 0.1
assert without_inputs == 0 and with_inputs == len(lora_grads) // 2                         # checkpointing pitfall
assert full_size["r1-distill-qwen-1.5b"][3] < T4 and not any("lora" in n for n, _ in merged.named_parameters())
print("all self-checks passed")
