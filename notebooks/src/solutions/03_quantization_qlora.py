# %% [markdown]
# # 03 · Quantization and QLoRA — solutions
#
# Worked answers to the exercises of notebook 03. Each one runs the package, prints what it
# measured, explains it in a few bullets, and ends with `assert`s that fail if the answer is wrong.
# QLoRA training on a CPU is slow, so every run here is a few steps of notebook 03's recipe.

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
import dataclasses
import tempfile
import warnings

import torch

from lowmem_course import family, measure, optimizers, quantize, reasoning, skills, steps, student
from lowmem_course.units import format_bytes

source = lab.course_model("student-qwen2").source  # LOWMEM_MODEL=<Hub id> swaps in the real model
tok = family.load_tokenizer(source)  # the students' own tokenizer: AutoTokenizer would drop <think> from the traces
STEPS, BATCH, LR, N_EVAL = 4, 8, 3e-3, 20  # notebook 03: 30 steps of 16 problems, 50 problems per accuracy


def batch_of(task: str, seed: int, size: int = BATCH, split: str = "train"):
    """(input_ids, labels) of ``size`` ``task`` problems, as notebook 03's ``subtraction_batch``."""
    return student.make_batch(reasoning.sample(size, seed=seed, split=split, task=task), tok)


def mean_loss(model, task: str) -> float:
    """Held-out loss on 32 ``task`` problems (``student.heldout_loss``): finer than exact-match accuracy."""
    return student.heldout_loss(model, tok, n=32, task=task)

# %% [markdown]
# ## Exercise 1
# *(easy)* Train with `RANK = 2` and `RANK = 32`. How do trainable parameters, memory and accuracy move?
#
# Scaled down: 4 steps of 8 problems instead of 30 of 16. After so few steps the subtraction accuracy is 0% at every
# rank (as after notebook 03's 30 steps), so we compare the held-out subtraction **loss** instead, and
# check that the addition skill survives.

# %%
qloras, ranks = {}, (2, 32)
rank_rows = {}
for rank in ranks:
    model = quantize.add_lora(quantize.load_quantized(source, "nf4-dq", device=device), rank=rank, alpha=2 * rank)
    opt = optimizers.make_optimizer(model, "adamw", lr=LR)
    losses = steps.train_loop(model, opt, lambda step: batch_of("subtraction", 1000 + step), STEPS)
    step_mem = measure.measure_train_step(model, optimizers.make_optimizer(model, "adamw", lr=0.0),
                                          batch_of("subtraction", 0, size=1)[0].to(device))
    model.eval()
    rank_rows[rank] = dict(trainable=quantize.trainable_parameters(model), peak=step_mem.peak_bytes,
                           states=sum(step_mem.breakdown[k] for k in ("gradients", "optimizer")),
                           loss=mean_loss(model, "subtraction"),
                           addition=student.accuracy(model, tok, n=N_EVAL, seed=0, progress=False))
    qloras[rank] = model
print(f"{'rank':>4}{'trainable':>11}{'step peak':>12}{'gradients + AdamW':>19}{'held-out subtraction loss':>27}"
      f"{'addition accuracy':>19}")
for rank, r in rank_rows.items():
    loss, accuracy = f"≈{r['loss']:.2f}", f"≈{r['addition']:.0%}"
    print(f"{rank:>4}{r['trainable']:>11,}{format_bytes(r['peak']):>12}{format_bytes(r['states']):>19}{loss:>27}{accuracy:>19}")

# %% [markdown]
# The same adapters on the real R1-Distill-Qwen-1.5B (every linear map, `r × (in + out)` each):

# %%
real = family.config("r1-distill-qwen-1.5b")
h, kv, inter = real.hidden_size, real.num_key_value_heads * real.hidden_size // real.num_attention_heads, real.intermediate_size
per_rank = real.num_hidden_layers * sum(i + o for i, o in ((h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)))
real_total = family.count_parameters(real).total
for rank in ranks:
    print(f"rank {rank:>2} on the 1.5B: {rank * per_rank:>11,} trainable = {rank * per_rank / real_total:.2%} of {real_total / 1e9:.2f}B")

# %% [markdown]
# - **trainable parameters grow exactly 16×**: each adapter is `r × (in + out)` numbers
# - **memory**: gradients and AdamW state grow 16× too; on this tiny student (hidden
#   size 96) rank 32 adapters rival the 4-bit base, so the whole step grows a lot; on the 1.5B even
#   rank 32 is about 2% of the weights and the step barely moves
# - **quality**: in the same few steps rank 32 drives the subtraction loss down much further, and
#   forgets addition on the way (its large, fast-moving update overwrites the old skill); rank 2
#   learns slowly and keeps addition: more rank is not free even when memory is

# %%
small, large = rank_rows[2], rank_rows[32]
assert large["trainable"] == 16 * small["trainable"]
assert 10 * small["states"] < large["states"] and small["peak"] < large["peak"]
assert rank_rows[2]["trainable"] < 0.2 * sum(p.numel() for p in qloras[2].parameters())
assert 32 * per_rank < 0.025 * real_total                     # rank 32 is about 2% at full size
assert large["loss"] < small["loss"]                          # more rank, faster learning
assert small["addition"] >= 0.9 and large["addition"] < small["addition"]  # and more forgetting

# %% [markdown]
# ## Exercise 2
# *(medium)* Load the student with `skip_modules=["mlp"]` in `quantize.bnb_config`: which layers
# are most sensitive to 4 bits? Compare `layer_errors` and accuracy.
#
# **First, a trap**: in transformers 5 a skip pattern matches a module name from its start or as
# its suffix, so `"mlp"` matches no linear layer (`model.layers.0.mlp.gate_proj`), and a custom list
# replaces the default one that keeps `lm_head` in 16 bits. `r".*\.mlp"` (a regex) does what the
# exercise means. We compare: everything in NF4, attention only (MLPs skipped), MLPs only
# (attention skipped). Accuracy is 100% for all (notebook 03), so we also measure how far each
# model's logits move from bf16 on held-out problems.

# %%
reference = family.load(source, dtype=torch.bfloat16, device_map={"": str(device)}).eval()
probe = batch_of("addition", seed=0, size=32, split="heldout")[0].to(device)
with torch.no_grad():
    ref_logits = reference(input_ids=probe).logits.float()
VARIANTS = {'skip_modules=["mlp"]': ["mlp"], "all in nf4": None,
            "attention in nf4": [r".*\.mlp", "lm_head"], "mlp in nf4": [r".*\.self_attn", "lm_head"]}
sensitivity = {}
for label, skip in VARIANTS.items():
    variant = family.load(source, quantization_config=quantize.bnb_config("nf4", skip_modules=skip),
                          dtype=torch.bfloat16, device_map={"": str(device)}).eval()
    quantize.disable_cpu_repacking(variant)
    errors = quantize.layer_errors(reference, variant)
    with torch.no_grad():
        logits = variant(input_ids=probe).logits.float()
    sensitivity[label] = dict(layers=len(errors), error=sum(errors.values()) / len(errors),
                              mlp_layers=sum(".mlp." in n for n in errors), head="lm_head" in errors,
                              output=((logits - ref_logits).norm() / ref_logits.norm()).item(),
                              accuracy=student.accuracy(variant, tok, n=N_EVAL, seed=0, progress=False))
print(f"{'variant':<21}{'layers in 4 bits':>17}{'MLP':>5}{'lm_head':>9}{'mean weight error':>19}{'logits moved':>14}"
      f"{'accuracy':>10}")
for label, s in sensitivity.items():
    error, moved, accuracy = f"≈{s['error']:.2%}", f"≈{s['output']:.2%}", f"≈{s['accuracy']:.0%}"
    print(f"{label:<21}{s['layers']:>17}{s['mlp_layers']:>5}{s['head']!s:>9}{error:>19}{moved:>14}{accuracy:>10}")

# %% [markdown]
# - `["mlp"]` skipped nothing and quantized `lm_head` as well: always check what was skipped
# - every layer loses the same ~9% of its weight norm to NF4 (`layer_errors` depends on the
#   weights' distribution, not on the layer's role), so weight errors cannot rank layers
# - what ranks them is the effect on the output: the variant with the larger logits error holds the
#   more sensitive layers; accuracy is too coarse on this easy task to tell them apart

# %%
trap, full4 = sensitivity['skip_modules=["mlp"]'], sensitivity["all in nf4"]
attn4, mlp4 = sensitivity["attention in nf4"], sensitivity["mlp in nf4"]
assert trap["mlp_layers"] > 0 and trap["head"] and not full4["head"]     # "mlp" skipped nothing
assert attn4["mlp_layers"] == 0 and mlp4["mlp_layers"] == full4["mlp_layers"] == mlp4["layers"]
assert max(s["error"] for s in sensitivity.values()) - min(s["error"] for s in sensitivity.values()) < 0.01
assert max(attn4["output"], mlp4["output"]) < full4["output"]            # quantizing less moves less
assert all(s["accuracy"] >= 0.9 for s in sensitivity.values())
more_sensitive = "mlp" if mlp4["output"] > attn4["output"] else "attention"
print(f"more sensitive to 4 bits: the {more_sensitive} layers")

# %% [markdown]
# ## Exercise 3
# *(hard)* Merge the adapters into the 4-bit base (`qlora.merge_and_unload()`), measure the
# accuracy, and explain the difference with the bf16 merge.
#
# We take the rank-32 adapters of exercise 1 (they moved the most). Subtraction accuracy is 0%
# after so few steps, so the held-out subtraction loss is the measure, next to addition accuracy.

# %%
from peft import PeftModel

qlora = qloras[32]
adapter_dir = tempfile.mkdtemp()
qlora.save_pretrained(adapter_dir)


def loss_and_accuracy(model) -> tuple[float, float]:
    return mean_loss(model, "subtraction"), student.accuracy(model, tok, n=N_EVAL, seed=0, progress=False)


merge_result = {"QLoRA, not merged": loss_and_accuracy(qlora)}  # before merging: the merge works in place
bf16_merged = PeftModel.from_pretrained(family.load(source, dtype=torch.bfloat16, device_map={"": str(device)}),
                                        adapter_dir).merge_and_unload().eval()
merge_result["merged into bf16 base"] = loss_and_accuracy(bf16_merged)
with warnings.catch_warnings(record=True) as merge_warnings:
    warnings.simplefilter("always")
    nf4_merged = qlora.merge_and_unload().eval()  # dequantize, add B @ A, quantize again
merge_result["merged into 4-bit base"] = loss_and_accuracy(nf4_merged)
for k, (loss, acc) in merge_result.items():
    print(f"{k:<24} held-out subtraction loss ≈{loss:.3f}  addition accuracy ≈{acc:.0%}")
print("\n".join(sorted({str(w.message).splitlines()[0] for w in merge_warnings if "merg" in str(w.message).lower()})))
nf4_bytes, bf16_bytes = quantize.storage_breakdown(nf4_merged).total, quantize.storage_breakdown(bf16_merged).total
print(f"weights: 4-bit merge {format_bytes(nf4_bytes)}, bf16 merge {format_bytes(bf16_bytes)}")

# %% [markdown]
# - the adapters were trained against the **4-bit** weights: unmerged, the model computes
#   `dequant(W4) + B A`. The bf16 merge computes `W + B A` instead: it removes the quantization
#   error the adapters had learned to live with, so its loss moves
# - the 4-bit merge computes `quant(dequant(W4) + B A)`: one more rounding to NF4, an error of the
#   same ~9% size as the first, so its loss moves as well (peft warns about exactly this)
# - which one lands closer depends on the run; the 4-bit merge keeps the memory (about a third of
#   the bf16 merge's bytes), the bf16 merge is the usual way to ship (QLoRA paper, PEFT docs)

# %%
unmerged = merge_result["QLoRA, not merged"][0]
assert merge_result["merged into bf16 base"][0] != unmerged            # the base changed under the adapters
assert merge_result["merged into 4-bit base"][0] != unmerged           # a second rounding
assert all(abs(loss - unmerged) < 0.2 * unmerged for loss, _ in merge_result.values())  # but not by much
assert any("rounding" in str(w.message) for w in merge_warnings)
assert nf4_bytes < 0.5 * bf16_bytes

# %% [markdown]
# ## Exercise 4
# *(hard)* Teach subtraction without forgetting addition: write a `batches(step)` that mixes both
# tasks, train with `steps.train_loop`, and measure both accuracies.
#
# Scaled down: the shipped adapter (`skills.teach`: 400 steps of 64 subtraction problems, ~5 min of
# CPU) is the subtraction-only baseline; here we train 8 steps of 16 problems (same rank, learning
# rate and clipping, no warmup, no checkpointing), once on subtraction only and once half and half.
# After 8 steps subtraction accuracy is still 0%, so its held-out **loss** shows the learning.

# %%
def mixed_batches(cfg: skills.SkillConfig, addition_share: float):
    """``batches(step)``: ``cfg.batch_size`` fresh training problems, ``addition_share`` of them additions."""
    n_add = round(cfg.batch_size * addition_share)

    def batches(step: int):
        seed = cfg.seed * 1_000_003 + step  # the seeds of skills.skill_batches
        problems = (reasoning.sample(cfg.batch_size - n_add, seed=seed, split="train", task=cfg.task)
                    + reasoning.sample(n_add, seed=seed, split="train", task="addition"))
        return student.make_batch(problems, tok)
    return batches


def teach_mixed(cfg: skills.SkillConfig, addition_share: float, progress: bool = False):
    """``skills.teach`` on mixed batches: fresh adapters on the 4-bit student; (model, losses)."""
    model, _, losses = skills.teach(cfg, device=device, progress=progress, batches=mixed_batches(cfg, addition_share))
    return model, losses


SHORT = dataclasses.replace(skills.SkillConfig(), steps=8, batch_size=16, warmup=0, checkpointing=False)
shipped_sub, _, shipped_recipe = skills.load_adapter("subtraction", device=device)
forgetting = {"4-bit student, no adapter": quantize.load_quantized(source, SHORT.fmt, device=device),
              f"shipped: {shipped_recipe['skill_config']['steps']} steps, subtraction only": shipped_sub,
              f"{SHORT.steps} steps, subtraction only": teach_mixed(SHORT, addition_share=0.0)[0],
              f"{SHORT.steps} steps, half addition": teach_mixed(SHORT, addition_share=0.5)[0]}
skills = {}
for label, model in forgetting.items():  # accuracy of the untrained student: notebook 03 (0% and 100%)
    skills[label] = {task: (mean_loss(model, task), None if "no adapter" in label else
                            student.accuracy(model, tok, n=N_EVAL, seed=0, task=task, progress=False))
                     for task in ("subtraction", "addition")}
print(f"{'':<36}{'subtraction: loss  accuracy':>28}{'addition: loss  accuracy':>27}")
for label, s in skills.items():
    (sub_loss, sub_acc), (add_loss, add_acc) = s["subtraction"], s["addition"]
    sub_acc, add_acc = ("-" if a is None else f"≈{a:.0%}" for a in (sub_acc, add_acc))
    print(f"{label:<36}{f'≈{sub_loss:.2f}':>19}{sub_acc:>10}{f'≈{add_loss:.3f}':>17}{add_acc:>10}")
print(f"shipped adapter's recipe.json: {shipped_recipe['command']}, subtraction {shipped_recipe['accuracy']:.1%} "
      f"on {shipped_recipe['eval_n']} held-out problems")

# %% [markdown]
# - **subtraction only forgets fast**: 8 steps already take addition to 0%; the shipped adapter ends
#   there too, with subtraction learned
# - **half addition keeps it**: the addition loss stays near zero and many additions stay right, while
#   the subtraction loss falls about as fast as with subtraction only, from half the subtraction problems
# - 8 steps are too few for a steady accuracy: after them the mixed run's addition accuracy moves by tens
#   of points between seeds and CPUs (the `≈`), while its held-out loss stays 10× or more below the
#   subtraction-only run's: the loss is the steadier yardstick
# - the full-length mixed run is the shipped recipe with these batches (about 5 min of CPU, not run here):
#   `model, losses = teach_mixed(skills.SkillConfig(), addition_share=0.5, progress=True)`, then
#   `student.accuracy(model, tok, n=500, task=...)` for both tasks

# %%
base, shipped_skills, only, mixed = skills.values()
assert base["addition"][0] < 0.01 and base["subtraction"][0] > 10           # where we started
assert shipped_skills["subtraction"][1] >= 0.9 and shipped_skills["addition"][1] <= 0.1   # learned, forgot
assert only["addition"][1] <= 0.1 and only["addition"][0] > 1.0             # 8 steps suffice to forget
assert mixed["addition"][0] < 0.1 * only["addition"][0]                     # mixing keeps addition (loss)
assert mixed["addition"][1] >= only["addition"][1] + 0.3                     # and many answers stay right
assert mixed["subtraction"][0] < 0.5 * base["subtraction"][0]                # and subtraction is learning
assert mixed["subtraction"][0] < 1.5 * only["subtraction"][0]                # nearly as fast as alone
print("all answers checked")
