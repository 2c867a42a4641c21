# %% [markdown]
# # 02 · Activation checkpointing
#
# Fine-tuning R1-Distill-Qwen-1.5B on 4,096-token reasoning traces: the model states are 16 bytes
# per parameter, but the activations that backward needs grow with the sequence and soon pass
# them. Checkpointing keeps only each layer's input and recomputes the rest in backward: far less
# memory for about one extra forward pass. The loss has the same problem with a 150k vocabulary,
# and the same cure.
#
# **What you will learn**
# - what full, every-k-th, selective (attention or MLP) checkpointing and CPU offload keep, measured
# - the price: recompute time as the sequence grows
# - a chunked cross-entropy that never holds the full logits, with the same loss and gradients
# - the pitfalls: `use_reentrant`, LoRA without input gradients, transformers 5's rename, dropout

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
import time
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from lowmem_course import checkpointing, family, measure, plots, steps
from lowmem_course.estimate import Setup, estimate
from lowmem_course.units import GiB, MiB, format_bytes

course = lab.course_model("r1-distill-qwen-1.5b")  # LOWMEM_MODEL=<Hub id> swaps in the real model
# the twin gets 12 layers instead of 4: checkpointing pays per layer
cfg = family.tiny("r1-distill-qwen-1.5b", num_hidden_layers=12) if course.is_twin else course.config
cfg.use_cache = False  # training: no KV cache
model = family.build(cfg, device=device).train()
SEQ = 512
batch = steps.random_batch(cfg.vocab_size, 1, SEQ, device=device)
print(f"{course.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
      f"MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}; one sequence of {SEQ} tokens")

# %% [markdown]
# ## 1 · Predict
#
# - no checkpointing: every layer keeps what its backward needs (norm inputs, q/k/v, attention
#   output, the MLP's gate, up and product, ...): tens of values per token and hidden unit
# - full checkpointing: each layer keeps only its input, `seq × hidden` values, and recomputes the
#   rest in backward, one layer at a time
#
# The estimator (fp32 training step, AdamW):

# %%
predicted = {c: estimate(cfg, Setup(mode="full", precision="fp32", batch=1, seq=SEQ, checkpointing=c))
             for c in ("none", "full")}
for c, e in predicted.items():
    print(f"checkpointing={c:<5} activations {format_bytes(e.bytes['activations']):>10}   "
          f"step peak {format_bytes(e.bytes['total']):>10}")

# %% [markdown]
# ## 2 · Measure: five policies
#
# `checkpointing.enable(model, policy)`:
# - `"full"` and `"every-2"` call transformers' `activation_checkpointing_enable` (`every_n_layers`)
# - `"attention"` / `"mlp"` wrap only that module of each layer in `torch.utils.checkpoint`
#
# For each policy we measure the **activations forward keeps** for backward (tracker peak of the
# decoder's forward), the **step peak** (forward, loss, backward) and the gradients.

# %%
def kept_activations(seq: int) -> int:
    """Bytes of activations at the decoder forward's peak, one sequence of ``seq`` tokens."""
    ids = steps.random_batch(cfg.vocab_size, 1, seq, device=device)
    with measure.track(model) as m:
        model.model(input_ids=ids)
    return m.breakdown["activations"]


def timed_step(ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds of one forward + backward, and the gradients it left."""
    start = time.perf_counter()
    checkpointing.causal_lm_loss(model, ids).backward()
    seconds = time.perf_counter() - start
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return seconds, grads


POLICIES = ["none", "mlp", "attention", "every-2", "full"]
kept, seconds, grad_error, step_peak = {}, {}, {}, {}
for policy in POLICIES:
    checkpointing.enable(model, policy)
    kept[policy] = kept_activations(SEQ)
    seconds[policy], grads = timed_step(batch)
    if policy == "none":
        reference = grads
    grad_error[policy] = max((grads[n] - reference[n]).abs().max().item() for n in grads)
    if policy in predicted:
        with measure.track(model) as m:
            checkpointing.causal_lm_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
        step_peak[policy] = m
checkpointing.disable(model)

print(f"{'policy':<10}{'kept':>11}{'of none':>9}{'max |grad - none|':>19}")
for policy in POLICIES:
    print(f"{policy:<10}{format_bytes(kept[policy]):>11}{kept[policy] / kept['none']:>9.1%}"
          f"{grad_error[policy]:>19.1e}")

# %% [markdown]
# The step peak next to the estimator (forward, loss and backward; no optimizer state here, so
# compare everything but the weights' optimizer):

# %%
print(f"{'checkpointing':<14}{'measured peak':>14}{'activations':>14}{'estimator without optimizer':>29}")
for c, m in step_peak.items():
    e = predicted[c].bytes
    print(f"{c:<14}{format_bytes(m.peak_bytes):>14}{format_bytes(m.breakdown['activations']):>14}"
          f"{format_bytes(e['total'] - e['optimizer']):>29}")

# %%
plots.breakdown_bars({f"{c} (measured)": m.breakdown for c, m in step_peak.items()},
                     title=f"Forward + backward, seq {SEQ}")
plt.show()

# %% [markdown]
# - **mlp** saves most of the selective options here: SwiGLU's gate, up and product are the widest
#   tensors of a layer (5.8 × hidden for Qwen-1.5B)
# - **attention** saves little: SDPA never stores the `seq × seq` scores (Korthikanti et al.'s
#   `5as/h` term is gone), so only q, k, v and the output are recomputed
# - **every-2** is halfway; **full** keeps one hidden vector per token and layer
# - gradients match to float tolerance: recomputation changes *when*, not *what*

# %% [markdown]
# ## 3 · The price, as the sequence grows
#
# Full checkpointing against none, at growing lengths: memory kept and time per step.

# %%
# NBVAL_IGNORE_OUTPUT
SEQS = [256, SEQ, 1024]
sweep = {p: {SEQ: (kept[p], seconds[p])} for p in ("none", "full")}  # seq 512: measured above
for policy in sweep:
    checkpointing.enable(model, policy)
    for seq in (256, 1024):
        ids = steps.random_batch(cfg.vocab_size, 1, seq, device=device)
        sweep[policy][seq] = (kept_activations(seq), timed_step(ids)[0])
checkpointing.disable(model)

fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
plots.lines(SEQS, {p: [sweep[p][s][0] / MiB for s in SEQS] for p in sweep}, "sequence length (tokens)",
            "activations kept (MiB)", "Memory", ax=ax_mem)
plots.lines(SEQS, {p: [sweep[p][s][1] for s in SEQS] for p in sweep}, "sequence length (tokens)",
            "forward + backward (s)", "Time (CPU, noisy)", ax=ax_time)
plt.show()
for seq in SEQS:
    print(f"seq {seq:>5}: full keeps {sweep['full'][seq][0] / sweep['none'][seq][0]:.1%} of the activations, "
          f"step time x{sweep['full'][seq][1] / sweep['none'][seq][1]:.2f}")

# %% [markdown]
# - memory: both grow linearly with the sequence, full at a small fraction of none
# - time: full runs every layer's forward twice, about a third more arithmetic than forward +
#   backward (timings on a shared CPU are noisy; on a GPU the ratio is steadier)

# %% [markdown]
# ## 4 · Offloading to host memory
#
# `checkpointing.offloaded(device)` keeps whatever forward saves for backward in host memory
# (saved-tensor hooks, after torchtune's `OffloadActivations`; parameters and tensors under 1 KiB
# stay): each saved tensor is copied to the host in forward and back in backward. On a GPU that
# frees the accelerator. Here the host *is* the device, so the course hands offloaded tensors to a
# host pool (`host.HOST`) that the tracker does not count as device memory: `measure.track` reports
# device bytes and `host_peak_bytes` apart. The lines that matter:
#
# ```python
# def pack(tensor):   return HOST.copy(tensor)            # forward: to the host
# def unpack(copy):   return copy.to(device)              # backward: back, a new device tensor
# with torch.autograd.graph.saved_tensors_hooks(pack, unpack): loss = model(...)
# ```

# %%
with measure.track(model, label="on the device") as kept_here:
    checkpointing.causal_lm_loss(model, batch).backward()
model.zero_grad(set_to_none=True)
with measure.track(model, label="offloaded") as kept_there:
    with checkpointing.offloaded(device):
        loss = checkpointing.causal_lm_loss(model, batch)
    loss.backward()
offload_error = max((p.grad - reference[n]).abs().max().item() for n, p in model.named_parameters())
model.zero_grad(set_to_none=True)
print(f"step peak on the device: {format_bytes(kept_here.peak_bytes)} -> {format_bytes(kept_there.peak_bytes)} "
      f"offloaded; host peak {format_bytes(kept_there.host_peak_bytes)}")
print(f"offloaded step on {device.type}: max |grad - none| {offload_error:.1e}")

# %% [markdown]
# ## 5 · The loss: 150k-token logits
#
# Checkpointing the layers leaves the loss: `tokens × vocab` fp32 logits, their log-softmax and
# their gradient. `checkpointing.chunked_cross_entropy` computes the loss `chunk` tokens at a time
# and recomputes each chunk's logits in backward, so only one chunk exists at a time.
# Measured on a twin with a 32k vocabulary, its own hidden states and LM head:

# %%
VOCAB, TOKENS, CHUNK = 32768, 1024, 128
big_vocab = family.build(family.tiny("r1-distill-qwen-1.5b", vocab_size=VOCAB, use_cache=False), device=device).train()
ids = steps.random_batch(VOCAB, 1, TOKENS, device=device)
hidden = big_vocab.model(input_ids=ids).last_hidden_state[0].detach().requires_grad_()
head = big_vocab.lm_head.weight
labels = checkpointing.shift_labels(ids)[0]

with measure.track(head, hidden, label="plain") as plain_loss:
    plain_value = F.cross_entropy(big_vocab.lm_head(hidden).float(), labels)
    plain_value.backward()
plain_grads = (hidden.grad.clone(), head.grad.clone())
hidden.grad, head.grad = None, None
with measure.track(head, hidden, label="chunked") as chunked_loss:
    chunked_value = checkpointing.chunked_cross_entropy(hidden, head, labels, chunk_tokens=CHUNK)
    chunked_value.backward()
loss_grad_error = max((a - b).abs().max().item() for a, b in zip(plain_grads, (hidden.grad, head.grad)))
logits_bytes = TOKENS * VOCAB * 4
print(f"one copy of the logits: {format_bytes(logits_bytes)}")
print(f"plain   loss ≈{plain_value.item():.4f}, peak {format_bytes(plain_loss.peak_bytes)}")
print(f"chunked loss ≈{chunked_value.item():.4f}, peak {format_bytes(chunked_loss.peak_bytes)} "
      f"({chunked_loss.peak_bytes / plain_loss.peak_bytes:.1%} of plain); max |grad difference| ≈{loss_grad_error:.1e}")

# %% [markdown]
# The same through the whole model: `checkpointing.causal_lm_loss(model, ids, chunk_tokens=...)`
# against transformers' own `model(input_ids, labels=...).loss`.

# %%
big_vocab.zero_grad(set_to_none=True)
short = ids[:, :256]
hf_loss = big_vocab(input_ids=short, labels=short).loss
hf_loss.backward()
hf_grads = {n: p.grad.clone() for n, p in big_vocab.named_parameters()}
big_vocab.zero_grad(set_to_none=True)
our_loss = checkpointing.causal_lm_loss(big_vocab, short, chunk_tokens=64)
our_loss.backward()
model_grad_error = max((p.grad - hf_grads[n]).abs().max().item() for n, p in big_vocab.named_parameters())
print(f"transformers loss ≈{hf_loss.item():.5f}, chunked ≈{our_loss.item():.5f}, max |grad difference| ≈{model_grad_error:.1e}")

# %% [markdown]
# ## 6 · At full size
#
# The estimator for the family, bf16 mixed precision, AdamW, one sequence of 4,096 tokens: the
# step's peak without and with full checkpointing, and one fp32 copy of that sequence's logits.

# %%
FULL_SEQ = 4096
print(f"{'model':<22}{'peak none':>12}{'peak full':>12}{'saved':>11}{'logits':>10}")
family_rows = {}
for name in family.MEMBERS:
    real = family.config(name)
    e = {c: estimate(real, Setup(mode="full", precision="bf16-mixed", batch=1, seq=FULL_SEQ, checkpointing=c)).bytes
         for c in ("none", "full")}
    family_rows[name] = e
    print(f"{name:<22}" + "".join(f"{e[c]['total'] / GiB:>9,.0f}GiB" for c in ("none", "full"))
          + f"{(e['none']['total'] - e['full']['total']) / GiB:>8,.0f}GiB{FULL_SEQ * real.vocab_size * 4 / GiB:>7.1f}GiB")

# %% [markdown]
# - the saving is the activations: about 13 GiB for the 1.5B at 4,096 tokens, tens of GiB above
#   (with checkpointing the 1.5B peaks at the forward's end: autocast's cache still holds every
#   layer's 16-bit weights, 2.4 GiB, beside the logits)
# - what remains is the model states (16 bytes per parameter), which sharding and LoRA/QLoRA attack
# - for R1 (671B) the model states are the whole peak (16 bytes/param, about 10,000 GiB): the
#   estimator's peak does not move with checkpointing

# %% [markdown]
# ## 7 · Pitfalls
#
# **`use_reentrant=True` and LoRA without input gradients.** The old reentrant checkpoint only
# computes gradients when an *input* of the checkpointed block requires grad. With LoRA the
# embeddings are frozen, so nothing entering layer 0 does: the adapters inside get **no gradient,
# silently**. transformers' `activation_checkpointing_enable` calls `enable_input_require_grads()`
# for you; code that checkpoints another way, or removes that hook, does not.

# %%
# NBVAL_IGNORE_OUTPUT
from peft import LoraConfig, get_peft_model  # bitsandbytes may log about optional CPU kernels here

# %%
def lora_grads(use_reentrant: bool, input_grads: bool) -> tuple[int, int]:
    """(LoRA tensors that got a gradient, all LoRA tensors) after one step with every 2nd layer checkpointed."""
    base = family.build(family.tiny("r1-distill-qwen-1.5b", num_hidden_layers=2, use_cache=False), device=device).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft reads a deprecated flag; reentrant checkpoint warns "None of the inputs..."
        lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        base.activation_checkpointing_enable({"use_reentrant": use_reentrant}, every_n_layers=2)
        if not input_grads:
            base.disable_input_require_grads()
        ids = steps.random_batch(base.config.vocab_size, 1, 32, device=device)
        lora(input_ids=ids, labels=ids).loss.backward()
    adapters = [p for n, p in lora.named_parameters() if "lora_" in n]
    return sum(p.grad is not None for p in adapters), len(adapters)


lora_table = {(r, g): lora_grads(r, g) for r, g in ((True, False), (True, True), (False, False))}
for (r, g), (got, total) in lora_table.items():
    print(f"use_reentrant={r!s:<5} input grads={g!s:<5}: {got}/{total} LoRA tensors get a gradient")

# %% [markdown]
# Use `use_reentrant=False` (transformers' default since 4.35, and `torch.utils.checkpoint`'s
# recommendation): it works whatever the inputs require.
#
# **transformers 5 renamed the switch.** `gradient_checkpointing_enable` still works but warns; the
# new name is `activation_checkpointing_enable` (with `every_n_layers` and `offload`).

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.gradient_checkpointing_enable()
model.activation_checkpointing_disable()
rename_warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
print("\n".join(rename_warnings))

# %% [markdown]
# **Dropout under recomputation.** Backward re-runs the forward; with dropout, it must draw the
# *same* masks. `torch.utils.checkpoint` saves and restores the RNG state for that
# (`preserve_rng_state=True`, the default); turning it off to save time gives wrong gradients.

# %%
drop_cfg = family.tiny("r1-distill-qwen-1.5b", attention_dropout=0.5, use_cache=False)
dropout_model = family.build(drop_cfg, device=device).train()
drop_ids = steps.random_batch(drop_cfg.vocab_size, 1, 64, device=device)


def dropout_grads(kwargs: dict | None) -> dict[str, torch.Tensor]:
    """Gradients of one step from the same seed, checkpointed with ``kwargs`` (None: not checkpointed)."""
    dropout_model.activation_checkpointing_disable()
    if kwargs is not None:
        dropout_model.activation_checkpointing_enable(kwargs)
    torch.manual_seed(0)
    dropout_model(input_ids=drop_ids, labels=drop_ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in dropout_model.named_parameters()}
    dropout_model.zero_grad(set_to_none=True)
    return grads


drop_ref = dropout_grads(None)
drop_error = {}
for preserve in (True, False):
    g = dropout_grads({"use_reentrant": False, "preserve_rng_state": preserve})
    drop_error[preserve] = max((g[n] - drop_ref[n]).abs().max().item() for n in g)
    print(f"preserve_rng_state={preserve!s:<5}: max |grad - uncheckpointed| = ≈{drop_error[preserve]:.1e}")

# %% [markdown]
# ## Summary
# - Full checkpointing keeps one hidden vector per token and layer: a small fraction of the
#   activations, the same gradients, about one extra forward of compute.
# - Selective checkpointing of the MLP keeps most of the saving for SwiGLU models; attention under
#   SDPA is cheap to keep. Every-k-th layer trades between the two ends.
# - The logits need their own fix: a chunked cross-entropy holds one chunk at a time.
# - Use `activation_checkpointing_enable` with `use_reentrant=False`; keep `preserve_rng_state`.
#
# ## Exercises
# 1. *(easy)* Add `"every-3"` and `"every-4"` to `POLICIES`. Plot kept bytes against k.
# 2. *(medium)* Checkpoint the MLP and offload the rest: combine `enable(model, "mlp")` with
#    `offloaded(device)`. What remains on the device, and what goes to the host?
# 3. *(hard)* Find the chunk size at which `chunked_cross_entropy` stops saving memory for the
#    1.5B's 151,936-token vocabulary at seq 4,096, using `measure.simulate`-style fake tensors.
#
# ## Further reading
# - Chen et al., *Training Deep Nets with Sublinear Memory Cost* (arXiv 1604.06174)
# - Korthikanti et al., *Reducing Activation Recomputation in Large Transformer Models* (arXiv 2205.05198)
# - PyTorch, `torch.utils.checkpoint` and `torch.autograd.graph.save_on_cpu` documentation
# - Wijmans et al., *Cut Your Losses in Large-Vocabulary Language Models* (arXiv 2411.09009)

# %% [markdown]
# ## Self-check
# Each claim above, asserted on the numbers this notebook measured.

# %%
for seq in SEQS[1:]:  # seq >= 512: full keeps at most 12% of the activations of none
    assert sweep["full"][seq][0] <= 0.12 * sweep["none"][seq][0], seq
assert kept["full"] <= 0.12 * kept["none"]
assert kept["full"] < kept["every-2"] < kept["none"] and kept["mlp"] < kept["attention"] < kept["none"]
assert all(error < 1e-5 for error in grad_error.values())                   # same gradients, every policy
assert offload_error < 1e-5                                                  # offload changes nothing but where
assert kept_there.peak_bytes < kept_here.peak_bytes and kept_there.host_peak_bytes > 0  # ... the bytes live
assert step_peak["full"].peak_bytes < step_peak["none"].peak_bytes
for c, m in step_peak.items():                                               # estimator within 10% of the measure
    e = predicted[c].bytes
    assert abs(m.peak_bytes / (e["total"] - e["optimizer"]) - 1) < 0.10, c
assert abs(chunked_value.item() - plain_value.item()) < 1e-4 and loss_grad_error < 1e-5
assert chunked_loss.peak_bytes <= 0.25 * plain_loss.peak_bytes              # vocab 32k: at most 25% of plain
assert plain_loss.peak_bytes > 2 * logits_bytes > chunked_loss.peak_bytes
assert abs(our_loss.item() - hf_loss.item()) < 1e-4 and model_grad_error < 1e-5
assert lora_table[(True, False)][0] < lora_table[(True, False)][1]          # reentrant, no input grads: lost
assert all(got == total for k, (got, total) in lora_table.items() if k != (True, False))
assert any("activation_checkpointing_enable" in w for w in rename_warnings)
assert drop_error[True] < 1e-5 < drop_error[False]
assert all(family_rows[n]["full"]["total"] < family_rows[n]["none"]["total"] for n in family_rows if n != "r1")
print("all self-checks passed")
