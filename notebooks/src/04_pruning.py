# %% [markdown]
# # 04 · Pruning: what saves memory, and what only saves FLOPs on paper
#
# A pruning paper reports "50% sparsity": half the weights of DeepSeek-R1-Distill-Qwen-7B are zero.
# Your GPU still needs 15 GB for its bf16 weights: a zero stored in a dense matrix costs 2 bytes like
# any other number. Memory only shrinks when the zeros leave the tensor: a sparse format, a 2:4 kernel
# on a GPU, or **structured** pruning that cuts whole heads, channels, layers or experts.
#
# **What you will learn**
# - magnitude vs Wanda pruning (10% to 70% sparsity, and 2:4) on a reasoning student, measured
# - why a zero is not free: dense, CSR/COO and 2:4 storage, byte for byte
# - structured pruning that really shrinks tensors: heads, MLP channels, layers, MoE experts
# - recovering lost accuracy with a short LoRA fine-tune
# - what each kind of pruning could save on the R1 family, and what the papers report

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

import matplotlib.pyplot as plt
import torch

from lowmem_course import family, measure, plots, prune, steps
from lowmem_course.estimate import Setup, count, estimate, shape_of
from lowmem_course.reasoning import make_tokenizer, sample
from lowmem_course.student import accuracy, load_student, make_batch
from lowmem_course.units import format_bytes

with contextlib.redirect_stderr(io.StringIO()):  # bitsandbytes' note about optional CPU kernels
    import peft  # noqa: F401  (used by prune.recover_with_lora)
N_EVAL = 200  # held-out problems per accuracy (one standard error is about 2 points at 90%)
student, tok = load_student("qwen2")
cfg = student.config
dense_acc = accuracy(student, tok, n=N_EVAL, progress=False)
print(f"qwen2 student: {sum(p.numel() for p in student.parameters()):,} parameters, "
      f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV head, "
      f"MLP width {cfg.intermediate_size}; accuracy {dense_acc:.2f}")

# %% [markdown]
# **Calibration data**: Wanda and every structured method rank weights by the activations they see.
# We use the student's *own* reasoning traces: it solves 64 training-split problems, and every
# token of the prompts plus its `<think>` traces and answers is a calibration token (padding
# excluded). `prune.generated_calibration` keeps the generated token ids as they are: no
# decode and re-encode round trip that could lose a special token.

# %%
prompts = [p.prompt for p in sample(64, seed=1, split="train")]
calib = prune.generated_calibration(student, tok, prompts)
print(tok.decode(calib["input_ids"][0][calib["attention_mask"][0].bool()]))
print(f"calibration: {int(calib['attention_mask'].sum())} tokens from {len(prompts)} traces")

# %% [markdown]
# ## 1 · Predict
#
# The estimator counts bytes per parameter; pruning changes the count only if tensors shrink.
# - **50% masks, dense storage**: same shapes, same bytes
# - **50% CSR** (`torch.sparse_csr`, int64 indices): each kept fp32 weight needs 4 + 8 bytes, so
#   0.5 x 12 = 6 bytes per weight instead of 4, **more** than dense
# - **structured** (4 of 6 query heads per KV head, a quarter of the MLP channels): a smaller config

# %%
STRUCTURE = dict(heads=4 / 6, mlp=0.25)
setup = Setup(mode="inference", precision="fp32", batch=1, seq=64, device="cpu")
predicted = {"dense": estimate(cfg, setup).bytes["weights"]}
linear_params = count(shape_of(cfg)).linear  # decoder nn.Linear weights: what masks can zero
predicted["50% masks (dense)"] = predicted["dense"]
predicted["50% CSR"] = predicted["dense"] - 4 * linear_params + int(0.5 * linear_params) * (4 + 8)
predicted["structured"] = estimate(prune.pruned_config(cfg, **STRUCTURE), setup).bytes["weights"]
for name, n in predicted.items():
    print(f"{name:<18} {format_bytes(n):>10}  ({n / predicted['dense']:.2f} x dense)")

# %% [markdown]
# ## 2 · Unstructured pruning: magnitude vs Wanda
#
# Both prune every `nn.Linear` of the decoder layers (q, k, v, o, gate, up, down) to the same
# sparsity; embeddings and `lm_head` are left alone. They differ in the score and, in the paper,
# in the comparison group:
# - **magnitude**: zero the smallest `|W|` of each matrix (`per="layer"`, the paper's baseline)
# - **Wanda** (Sun et al. 2023): zero the smallest `|W_ij| * ||X_j||` **of each output row**
#   (`per="row"`), where `||X_j||` is the L2 norm of input feature `j` over all calibration tokens:
#   a small weight on a loud feature survives
# - `prune.prune_unstructured` builds the masks and attaches them with
#   `torch.nn.utils.prune.custom_from_mask`, so they hold through later training too
# - `tests/test_prune.py` checks the Wanda masks against torchao's `WandaSparsifier` where torchao
#   is installed

# %%
SPARSITIES = [0.1, 0.3, 0.5, 0.7]
SETTINGS = {"magnitude (per layer)": ("magnitude", "layer"), "Wanda (per row, paper)": ("wanda", "row"),
            "Wanda (per layer)": ("wanda", "layer")}


def pruned_accuracy(method: str, sparsity: float, per: str | None = None, pattern: str = "unstructured",
                    only: str | None = None) -> float:
    """Accuracy of a copy of the student with its decoder linears (those whose names contain ``only``) pruned."""
    pruned = copy.deepcopy(student)
    prune.prune_unstructured(pruned, method, sparsity, calib, pattern=pattern, per=per, only=only)
    return accuracy(pruned, tok, n=N_EVAL, progress=False)


curves = {label: [pruned_accuracy(method, s, per) for s in SPARSITIES] for label, (method, per) in SETTINGS.items()}
for label, accs in curves.items():
    print(f"{label:<24}" + "  ".join(f"{s:.0%}: {a:.3f}" for s, a in zip(SPARSITIES, accs)))
acc_24 = {method: pruned_accuracy(method, 0.5, pattern="2:4") for method in ("magnitude", "wanda")}
print(f"{'2:4':<24}" + "  ".join(f"{m}: {a:.3f}" for m, a in acc_24.items()))

# %%
ax = plots.lines([s * 100 for s in SPARSITIES], curves, "sparsity of the decoder's linear weights (%)",
                 "exact-match accuracy", title="Unstructured pruning of the qwen2 student")
ax.axhline(dense_acc, color="grey", linestyle="--", label="dense")
ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# At 50%, every method with every comparison group, and the gap to magnitude pruning:

# %%
half = SPARSITIES.index(0.5)
at_50 = {"magnitude/layer": curves["magnitude (per layer)"][half],
         "magnitude/row": pruned_accuracy("magnitude", 0.5, "row"),
         "wanda/layer": curves["Wanda (per layer)"][half], "wanda/row": curves["Wanda (per row, paper)"][half]}
for key, acc in at_50.items():
    print(f"{key:<16} {acc:.3f}  ({(acc - at_50['magnitude/layer']) * 100:+.1f} points vs magnitude/layer)")
wanda_gain = at_50["wanda/row"] - at_50["magnitude/layer"]  # the paper's setup for each method
same_group_gain = at_50["wanda/layer"] - at_50["magnitude/layer"]
print(f"Wanda vs magnitude at 50%: {wanda_gain * 100:+.1f} points as in the paper (per row vs per layer), "
      f"{same_group_gain * 100:+.1f} points with both per layer")

# %% [markdown]
# **Where does Wanda lose?** Wanda minimises each layer's output error on the calibration tokens,
# `||X W^T - X (W*M)^T||`, keeping only the diagonal of `X^T X`. `prune.relative_output_error`
# measures that error with the whole `X^T X` (`prune.input_grams`):

# %%
grams = prune.input_grams(student, calib)
linears = prune.prunable_linears(student)
output_error = {}
for key in at_50:
    method, per = key.split("/")
    errors = []
    for n, m in linears.items():
        scores = prune.wanda_scores(m.weight, grams[n].diagonal().sqrt()) if method == "wanda" else prune.magnitude_scores(m.weight)
        errors.append(prune.relative_output_error(m.weight, prune.unstructured_mask(scores, 0.5, per), grams[n]))
    output_error[key] = errors
for key, errors in output_error.items():
    print(f"{key:<16} mean relative output error {sum(errors) / len(errors):.4f}")
wanda_lower = sum(w < m for w, m in zip(output_error["wanda/layer"], output_error["magnitude/layer"]))
print(f"per layer: Wanda's error is lower than magnitude's in {wanda_lower} of {len(linears)} linears")

# %% [markdown]
# Wanda wins the layer-wise objective it was built for, and still loses accuracy. Pruning only the
# attention projections or only the MLP at 50% shows where:

# %%
by_block = {(only, key): pruned_accuracy(key.split("/")[0], 0.5, key.split("/")[1], only=only)
            for only in ("self_attn", "mlp") for key in ("magnitude/layer", "wanda/row", "wanda/layer")}
for (only, key), acc in by_block.items():
    print(f"only {only:<10} {key:<16} {acc:.3f}")
attn_gap = by_block[("self_attn", "magnitude/layer")] - by_block[("self_attn", "wanda/row")]
mlp_gap = by_block[("mlp", "magnitude/layer")] - by_block[("mlp", "wanda/row")]

# %% [markdown]
# - the accuracy is lost in the attention projections; pruning only the MLP costs nearly nothing
#   with either method
# - per row costs more than per layer for both methods (every row must lose exactly half its
#   weights, however much each row matters)
# - Wanda's big wins on LLaMA come from a few input features with activations 100x the others
#   (outlier features). Here only `down_proj` sees such features, and pruning the MLP is cheap anyway;
#   the inputs of the attention projections are nearly flat:

# %%
norms = {n: g.diagonal().sqrt() for n, g in grams.items()}
outlier_ratio = {}
for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
    outlier_ratio[kind] = max((v.max() / v.median()).item() for n, v in norms.items() if n.endswith(kind))
    print(f"{kind:<10} largest input-feature norm / median norm: {outlier_ratio[kind]:5.1f}")

# %% [markdown]
# With **2:4** the picture turns: every block of 4 inputs must lose 2 weights, the choice is local,
# and there the input norm helps. Section 2's first table: Wanda 2:4 beats magnitude 2:4, though both
# fall far below the dense student on this small model.

# %% [markdown]
# ## 3 · Why a zero is not free
#
# Measure the student with the 50% Wanda masks attached, then with the masks folded in
# (`prune.make_permanent`), against the dense student. `measure.track` records an inference forward.

# %%
def measured_forward(model: torch.nn.Module, batch: dict, label: str) -> measure.Measurement:
    """Peak bytes of one inference forward over a calibration batch."""
    with measure.track(model, label=label) as m, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return m


masked = copy.deepcopy(student)
prune.prune_unstructured(masked, "wanda", 0.5, calib)
zeros_at_50 = prune.zero_fraction(prune.prunable_linears(masked).values())
runs = {"dense": measured_forward(student, calib, "dense"), "50% masks attached": measured_forward(masked, calib, "masks")}
prune.make_permanent(masked)
runs["50% masks folded in"] = measured_forward(masked, calib, "folded")
for label, m in runs.items():
    print(f"{label:<20} parameters {format_bytes(m.breakdown['parameters']):>10}  buffers "
          f"{format_bytes(m.breakdown['buffers']):>10}  peak {format_bytes(m.peak_bytes):>10}")
plots.breakdown_bars({k: m.breakdown for k, m in runs.items()}, title="Inference forward of the student")
plt.show()

# %% [markdown]
# - masks attached: `weight_orig` (parameter) + `weight_mask` (buffer) + the recomputed `weight`:
#   pruning **added** memory
# - masks folded in: exactly the dense bytes. Half the numbers are zero, none of the bytes are gone
#
# To save bytes the zeros must leave the storage. Take a matrix the size of R1-Distill-Qwen-1.5B's
# `q_proj` (1536 x 1536, bf16), prune it by magnitude, and store it dense, CSR and COO:

# %%
weight = torch.randn(1536, 1536, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
LEVELS = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95]
storage = {"dense": [], "CSR": [], "COO": []}
for sparsity in LEVELS:
    w = weight * prune.unstructured_mask(prune.magnitude_scores(weight), sparsity)
    storage["dense"].append(measure.storage_bytes(w))
    # clone: to_sparse_csr's column indices are a view of the twice-larger COO indices it converts through
    storage["CSR"].append(measure.storage_bytes(w.to_sparse_csr().clone()))
    storage["COO"].append(measure.storage_bytes(w.to_sparse()))
for i, sparsity in enumerate(LEVELS):
    print(f"{sparsity:>4.0%}  " + "  ".join(f"{k} {storage[k][i] / storage['dense'][i]:.2f}x" for k in storage))
plots.lines([s * 100 for s in LEVELS], {k: [b / 2**20 for b in v] for k, v in storage.items()},
            "sparsity (%)", "storage (MiB)", title="A 1536 x 1536 bf16 matrix")
plt.show()

# %% [markdown]
# - CSR keeps each value (2 bytes) plus an int64 column index (8 bytes): 5x the bytes per kept weight,
#   so it breaks even only above 80% sparsity; COO stores two indices and is worse still
# - **2:4** keeps 2 values of every 4 plus a 2-bit position each: 9/16 of the dense bytes, and
#   NVIDIA's sparse tensor cores multiply it directly. `to_sparse_semi_structured` is CUDA only:

# %%
# NBVAL_IGNORE_OUTPUT
w24 = weight * prune.semi_structured_mask(prune.magnitude_scores(weight))
if device.type == "cuda":
    from torch.sparse import to_sparse_semi_structured

    packed = to_sparse_semi_structured(w24.to(device))
    parts = [getattr(packed, n) for n in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")]
    bytes_24 = sum(t.numel() * t.element_size() for t in parts if t is not None)
    print(f"2:4 on {device}: {format_bytes(bytes_24)} vs dense {format_bytes(measure.storage_bytes(w24))} "
          f"({bytes_24 / measure.storage_bytes(w24):.2f}x)")
else:
    print("skipped on CPU: to_sparse_semi_structured needs a CUDA GPU with sparse tensor cores (sm80+); "
          f"here the 2:4 matrix is a dense {format_bytes(measure.storage_bytes(w24))} with 50% zeros")

# %% [markdown]
# ## 4 · Structured pruning: smaller tensors
#
# Each method ranks units on the calibration traces and rebuilds the modules without the losers
# (real `nn.Linear` layers with fewer rows or columns):
# - **heads** (`prune.prune_heads`): 4 of the 6 query heads per KV head, by the norm of their output
# - **MLP channels** (`prune.prune_mlp_channels`): a quarter of the channels kept, by Wanda's score
#   summed per channel
# - **layers** (`prune.drop_layers`): the layer that turns the residual stream least (ShortGPT's
#   block influence, `prune.layer_influence`)
# - **heads + MLP**: both cuts together, the model we then try to recover

# %%
influence = prune.layer_influence(student, calib)
print("block influence per layer:", [round(x, 3) for x in influence.tolist()])
weakest = influence.argsort()[:1].tolist()
keep_heads = round(STRUCTURE["heads"] * (cfg.num_attention_heads // cfg.num_key_value_heads))
methods = {
    "heads 4/6": lambda m: prune.prune_heads(m, keep_heads, calib),
    "MLP 1/4": lambda m: prune.prune_mlp_channels(m, STRUCTURE["mlp"], calib),
    f"drop layer {weakest[0]}": lambda m: prune.drop_layers(m, weakest),
}
structured = {"dense": (runs["dense"].breakdown["parameters"], dense_acc)}
for label, apply in methods.items():
    pruned = copy.deepcopy(student)
    apply(pruned)
    structured[label] = (measured_forward(pruned, calib, label).breakdown["parameters"], accuracy(pruned, tok, n=N_EVAL, progress=False))
combined = copy.deepcopy(student)
methods["heads 4/6"](combined)
methods["MLP 1/4"](combined)
combined_bytes = measured_forward(combined, calib, "heads + MLP").breakdown["parameters"]
structured["heads + MLP"] = (combined_bytes, accuracy(combined, tok, n=N_EVAL, progress=False))
for label, (n, acc) in structured.items():
    print(f"{label:<14} parameters {format_bytes(n):>10} ({n / structured['dense'][0]:.2f} x)  accuracy {acc:.3f}")
print(f"predicted for heads + MLP: {format_bytes(predicted['structured'])}, measured {format_bytes(combined_bytes)} "
      f"({1 - combined_bytes / structured['dense'][0]:.0%} fewer parameter bytes)")

# %% [markdown]
# **Recovery**: a short LoRA fine-tune of the heads + MLP cut (peft, rank 8 on every linear layer)
# on fresh training problems, then `merge_and_unload` folds the adapters back in, so the recovered
# model has exactly the pruned shapes.

# %%
RECOVERY_STEPS = 20
train_tok = make_tokenizer()  # the course tokenizer: keeps <think> and </think> as single tokens
batches = (make_batch(sample(32, seed=1000 + i, split="train"), train_tok) for i in range(RECOVERY_STEPS))
torch.manual_seed(0)
recovered = prune.recover_with_lora(copy.deepcopy(combined), batches, rank=8, lr=3e-3)
recovered_bytes = measured_forward(recovered, calib, "recovered").breakdown["parameters"]
recovered_acc = accuracy(recovered, tok, n=N_EVAL, progress=False)
print(f"heads + MLP after {RECOVERY_STEPS} LoRA steps: accuracy {structured['heads + MLP'][1]:.3f} -> {recovered_acc:.3f}, "
      f"parameters {format_bytes(recovered_bytes)} ({recovered_bytes / structured['dense'][0]:.2f} x dense)")

# %% [markdown]
# ### Experts: pruning the DeepseekV3 (MLA + MoE) student
#
# R1 keeps 256 routed experts per layer and uses 8 per token: most of its 671B parameters sit in
# experts that a given workload rarely calls. `prune.expert_counts` reads the router's own top-k
# choices on the calibration traces; `prune.prune_experts` keeps the most-chosen experts per layer
# (expert weights, router rows and bias shrink). The pruned router picks its top-k over the kept
# experts without R1's group limit, so "8 kept" shows the cost of ungrouped routing alone.

# %%
moe, moe_tok = load_student("deepseek_v3")
moe_calib = prune.generated_calibration(moe, moe_tok, prompts)
counts = prune.expert_counts(moe, moe_calib)
for layer, c in counts.items():
    print(f"{layer}: tokens per expert {c.tolist()}")
n_experts = moe.config.n_routed_experts
experts_table = {"all (grouped)": (measured_forward(moe, moe_calib, "moe").breakdown["parameters"], accuracy(moe, moe_tok, n=N_EVAL, progress=False))}
for keep in (n_experts, 6, 4, 2):
    pruned = copy.deepcopy(moe)
    prune.prune_experts(pruned, keep, counts)
    experts_table[f"{keep} kept"] = (measured_forward(pruned, moe_calib, f"{keep} experts").breakdown["parameters"],
                                     accuracy(pruned, moe_tok, n=N_EVAL, progress=False))
for label, (n, acc) in experts_table.items():
    print(f"{label:<14} parameters {format_bytes(n):>10} ({n / experts_table['all (grouped)'][0]:.2f} x)  accuracy {acc:.3f}")

# %%
fig, ax1 = plt.subplots(figsize=(6, 4))
labels = list(experts_table)
ax1.bar(labels, [n / 2**20 for n, _ in experts_table.values()], color="#4c72b0")
ax1.set_ylabel("parameters (MiB)")
ax2 = ax1.twinx()
ax2.plot(labels, [a for _, a in experts_table.values()], color="#c44e52", marker="o")
ax2.set_ylabel("exact-match accuracy", color="#c44e52")
ax2.set_ylim(0, 1.05)
ax1.set_title("Routed experts kept per MoE layer (DeepseekV3 student)")
plt.show()

# %% [markdown]
# ## 5 · At full size
#
# What each kind of pruning means for the bf16 weights of the R1 family (the estimator; "decoder
# weights" are everything but the embeddings and `lm_head`, R1's experts included):
# - 50% unstructured, dense storage: nothing saved; as CSR: 2.5x the bytes of what it replaces
# - 2:4 on a GPU: 9/16 of the decoder weights
# - structured as on the student (heads 4/6, MLP 1/4) for the distills; half the routed experts for R1

# %%
bf16 = Setup(mode="inference", precision="bf16", batch=1, seq=1024)
print(f"{'model':<22}{'dense':>11}{'50% CSR':>11}{'2:4':>11}{'structured':>12}")
full_size = {}
for name in family.MEMBERS:
    full = family.config(name)
    n = count(shape_of(full))
    dense = estimate(full, bf16).bytes["weights"]
    decoder = n.total - n.embedding
    shares = dict(experts=0.5) if full.model_type == "deepseek_v3" else STRUCTURE
    full_size[name] = {
        "dense": dense,
        "50% CSR": dense - 2 * decoder + decoder // 2 * (2 + 8),
        "2:4": dense - 2 * decoder + decoder * 2 * 9 // 16,
        "structured": estimate(prune.pruned_config(full, **shares), bf16).bytes["weights"],
    }
    print(f"{name:<22}" + "".join(f"{v / 2**30:>10.1f}G" for v in full_size[name].values()))

# %% [markdown]
# What the Wanda paper reports on LLaMA-2-7B (WikiText perplexity, lower is better; arXiv
# 2306.11695, Table 3; quoted, not measured here). Our student did not reproduce Wanda's advantage
# (section 2).

# %%
REPORTED_PPL = {"dense": 5.12, "50% magnitude": 14.89, "50% Wanda": 6.42, "2:4 magnitude": 54.59, "2:4 Wanda": 11.02}
for setting, ppl in REPORTED_PPL.items():
    print(f"{setting:<15} {ppl:6.2f}")

# %% [markdown]
# ## 6 · Pitfalls
#
# **Folding the masks in, then fine-tuning, regrows the zeros.** After `make_permanent` the weight is
# a plain parameter: one AdamW step writes into every pruned entry. Keep the masks attached while
# training (section 2), fold them in only at the end.

# %%
regrow = copy.deepcopy(student)
prune.prune_unstructured(regrow, "wanda", 0.5, calib)
prune.make_permanent(regrow)
before_step = prune.zero_fraction(prune.prunable_linears(regrow).values())
opt = measure.make_optimizer(regrow, "adamw", lr=1e-4)
steps.train_step(regrow.train(), opt, calib["input_ids"])
after_step = prune.zero_fraction(prune.prunable_linears(regrow).values())
print(f"zeros before one AdamW step {before_step:.1%}, after {after_step:.1%}")

# %% [markdown]
# **Calibrating Wanda on other data.** Wanda's activation norms come from the calibration tokens;
# random tokens give other norms and another mask. Measure, do not assume, what that costs: on this
# student (nearly flat attention inputs) the accuracy barely moves, on a real LLM the calibration
# set is part of the method.

# %%
noise = steps.random_batch(cfg.vocab_size, *calib["input_ids"].shape, seed=0)
wrong = copy.deepcopy(student)
wrong_masks = prune.prune_unstructured(wrong, "wanda", 0.5, {"input_ids": noise})
wrong_acc = accuracy(wrong, tok, n=N_EVAL, progress=False)
own_masks = prune.prune_unstructured(copy.deepcopy(student), "wanda", 0.5, calib)
changed = sum(int((wrong_masks[n] != own_masks[n]).sum()) for n in own_masks) / sum(m.numel() for m in own_masks.values())
print(f"random-token calibration flips {changed:.1%} of the mask entries; 50% Wanda accuracy "
      f"{at_50['wanda/row']:.3f} on its own traces, {wrong_acc:.3f} on random tokens")

# %% [markdown]
# **A sparse matrix on a CPU is not faster either.** At 50% the CSR product does as much bookkeeping
# as it saves arithmetic (timings vary from run to run):

# %%
# NBVAL_IGNORE_OUTPUT
import time

w50 = (weight * prune.unstructured_mask(prune.magnitude_scores(weight), 0.5)).float()
x = torch.randn(1536, 64)
for label, w in (("dense", w50), ("CSR", w50.to_sparse_csr())):
    start = time.perf_counter()
    for _ in range(10):
        w @ x
    print(f"{label:<6} {(time.perf_counter() - start) / 10 * 1e3:.2f} ms per product")

# %% [markdown]
# ## Summary
#
# - a masked zero is still stored: unstructured pruning saves FLOPs on paper, not bytes, and
#   `torch.nn.utils.prune` even adds a mask and a second copy while attached
# - on this small student, Wanda did **not** beat plain magnitude at 50% unstructured (section 2
#   prints the gap, per row as in the paper and per layer): it wins the layer-wise output error it
#   optimises, loses in attention, and its large gains on LLaMA-2 come from outlier features this
#   student lacks; at 2:4 it does beat magnitude
# - CSR/COO pay off only at very high sparsity; 2:4 stores 9/16 of the bytes but needs a CUDA GPU
# - structured pruning (heads, MLP channels, layers, experts) shrinks the tensors for real; cutting
#   2 of 6 heads per KV head and 3/4 of the MLP channels breaks the student, and 20 LoRA steps win
#   most of its accuracy back at the pruned size (section 4)
# - for a MoE, the router's own statistics tell which experts a workload can live without
#
# ## Exercises
#
# 1. *(easy)* Rerun section 2 with 2:4 on the DeepseekV3 student's linear layers. Which method wins?
# 2. *(medium)* Keep 50%, 25% and 10% of the MLP channels and plot accuracy before and after recovery.
#    Where does LoRA stop helping?
# 3. *(hard)* Keep the group-limited routing when pruning experts: drop the same number of experts in
#    every group, and compare the accuracy with `prune.prune_experts`.
#
# ## Further reading
#
# - Sun et al., *A Simple and Effective Pruning Approach for LLMs* (Wanda), arXiv 2306.11695
# - Frantar & Alistarh, *SparseGPT*, arXiv 2301.00774
# - Men et al., *ShortGPT: layers in LLMs are more redundant than you expect*, arXiv 2403.03853
# - Ma et al., *LLM-Pruner: structural pruning of LLMs*, arXiv 2305.11627
# - PyTorch: `torch.nn.utils.prune` tutorial; *Accelerating BERT with semi-structured (2:4) sparsity*
# - torchao `WandaSparsifier` (its observer multiplies `|W|` by the *squared* activation norm)

# %% [markdown]
# ## Self-check

# %%
assert dense_acc >= 0.9, "the shipped student should solve 3-digit additions"
assert zeros_at_50 == 0.5, "50% unstructured pruning zeroes exactly half of every linear weight"
assert wanda_gain < 0 and same_group_gain < 0, "on this student Wanda did not beat magnitude at 50% (summary)"
assert sum(output_error["wanda/layer"]) < sum(output_error["magnitude/layer"]), "Wanda wins its layer-wise objective"
assert attn_gap > mlp_gap, "Wanda loses its accuracy in the attention projections"
assert min(by_block[("mlp", key)] for key in ("magnitude/layer", "wanda/row", "wanda/layer")) >= 0.95, "the MLP alone is cheap"
assert at_50["magnitude/row"] < at_50["magnitude/layer"] and at_50["wanda/row"] < at_50["wanda/layer"], "per row costs more"
assert outlier_ratio["down_proj"] > 10 > max(v for k, v in outlier_ratio.items() if k != "down_proj"), "outliers only in down_proj"
assert acc_24["wanda"] > acc_24["magnitude"], "at 2:4 Wanda beats magnitude"
assert runs["50% masks folded in"].breakdown["parameters"] == runs["dense"].breakdown["parameters"]
masked_bytes = runs["50% masks attached"].breakdown["parameters"] + runs["50% masks attached"].breakdown["buffers"]
assert masked_bytes > runs["dense"].breakdown["parameters"] + runs["dense"].breakdown["buffers"]
assert storage["CSR"][1] > storage["dense"][1] and storage["COO"][1] > storage["dense"][1]
assert storage["CSR"][-1] < storage["dense"][-1]
assert combined_bytes <= 0.75 * structured["dense"][0], "structured pruning cuts at least 25% of the bytes"
assert combined_bytes == predicted["structured"], "the estimator predicts the pruned bytes exactly"
assert structured["heads + MLP"][1] < 0.5, "the combined cut breaks the student"
assert recovered_bytes == combined_bytes and recovered_acc >= structured["heads + MLP"][1] + 0.3, "LoRA recovers at the pruned size"
expert_bytes = [n for n, _ in experts_table.values()][1:]
assert expert_bytes == sorted(expert_bytes, reverse=True) and len(set(expert_bytes)) == len(expert_bytes)
assert after_step < before_step == 0.5
assert all(v["structured"] < v["dense"] < v["50% CSR"] and v["2:4"] < v["dense"] for v in full_size.values())
print("all self-checks passed")
