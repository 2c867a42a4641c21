# %% [markdown]
# # 02 · Activation checkpointing — solutions
#
# Worked answers to the exercises of notebook 02. Each one runs the package, prints what it
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
import itertools

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem_course import checkpointing, family, measure, plots, steps
from lowmem_course.units import GiB, MiB, format_bytes

course = lab.course_model("r1-distill-qwen-1.5b")
cfg = family.tiny("r1-distill-qwen-1.5b", num_hidden_layers=12) if course.is_twin else course.config
cfg.use_cache = False
model = family.build(cfg, device=device).train()
SEQ = 512
batch = steps.random_batch(cfg.vocab_size, 1, SEQ, device=device)


def kept_activations(policy: str) -> int:
    """Bytes of activations at the decoder forward's peak under ``policy`` (as in notebook 02)."""
    checkpointing.enable(model, policy)
    with measure.track(model) as m:
        model.model(input_ids=batch)
    checkpointing.disable(model)
    return m.breakdown["activations"]

# %% [markdown]
# ## Exercise 1
# *(easy)* Add `"every-3"` and `"every-4"` to `POLICIES`. Plot kept bytes against k.

# %%
K = [1, 2, 3, 4]  # every-1 is "full"
kept_none = kept_activations("none")
kept = {k: kept_activations(f"every-{k}") for k in K}
for k in K:
    share = 1 - 1 / k  # the layers that are not checkpointed keep everything
    print(f"every-{k}: kept {format_bytes(kept[k]):>10} = {kept[k] / kept_none:6.1%} of none "
          f"(layers not checkpointed: {share:.0%})")
plots.lines(K, {"every-k": [kept[k] / MiB for k in K], "none": [kept_none / MiB] * len(K)},
            xlabel="k (checkpoint every k-th layer)", ylabel="activations kept (MiB)",
            title=f"{cfg.num_hidden_layers} layers, seq {SEQ}")
plt.show()

# %% [markdown]
# - a checkpointed layer keeps only its input; the others keep everything, so kept bytes grow
#   roughly like `1 - 1/k` of the un-checkpointed total, plus the checkpointed layers' inputs
# - the curve flattens: going from every-1 to every-2 saves the most recompute per byte given up;
#   every-4 keeps most of what "none" keeps (12 layers: 9 kept whole)

# %%
assert kept[1] < kept[2] < kept[3] < kept[4] < kept_none
for k in (2, 3, 4):  # between the share of layers kept whole and that share plus the full policy's floor
    assert (1 - 1 / k) * kept_none * 0.9 < kept[k] < ((1 - 1 / k) * kept_none + kept[1]) * 1.1, k

# %% [markdown]
# ## Exercise 2
# *(medium)* Checkpoint the MLP and offload the rest: combine `enable(model, "mlp")` with
# `offloaded(device)`. What remains on the device? (Needs a GPU to see the difference.)
#
# On this CPU the host *is* the device, so `offloaded` moves nothing; we check that the
# combination trains the same, and count with a saved-tensor hook the bytes that autograd saves
# for backward: those are exactly what `offloaded` would copy to the host on a GPU.

# %%
def grads_of(policy: str, offload: bool) -> dict[str, torch.Tensor]:
    checkpointing.enable(model, policy)
    if offload:
        with checkpointing.offloaded(device):
            loss = checkpointing.causal_lm_loss(model, batch)
    else:
        loss = checkpointing.causal_lm_loss(model, batch)
    loss.backward()
    checkpointing.disable(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


reference = grads_of("none", offload=False)
combined = grads_of("mlp", offload=True)
combo_error = max((combined[n] - reference[n]).abs().max().item() for n in reference)

saved = {}  # storage -> bytes, for the tensors autograd saves outside the checkpointed MLPs


def count(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "meta":
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


checkpointing.enable(model, "mlp")
with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):  # where offloaded() would copy to the host
    with measure.track(model) as mlp_only:
        model.model(input_ids=batch)
checkpointing.disable(model)
param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
offloadable = sum(b for ptr, b in saved.items() if ptr not in param_ptrs)  # activations
saved_weights = sum(b for ptr, b in saved.items() if ptr in param_ptrs)
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"mlp checkpointed + offloaded: max |grad - none| {combo_error:.1e}")
print(f"activations kept with mlp checkpointing: {format_bytes(mlp_only.breakdown['activations'])} "
      f"({mlp_only.breakdown['activations'] / kept_none:.0%} of none)")
print(f"activation bytes autograd saves for backward (moved to host on a GPU): {format_bytes(offloadable)}")
print(f"weights it also saves (copied to the host too, on a GPU): {format_bytes(saved_weights)} of {format_bytes(params)}")
print(f"on a GPU the device keeps: parameters {format_bytes(params)}, their gradients, and one layer's "
      f"recompute at a time")

# %% [markdown]
# - what remains on the device: the weights and gradients, plus, during backward, the tensors of
#   the layer being processed (copied back from the host) and its MLP's recompute; the saved
#   activations of every other layer sit in host memory
# - the checkpointed MLPs save only their inputs, so offloading moves the attention's saved
#   tensors and the MLP inputs, not the MLP's large intermediates (those are recomputed)
# - the price is PCIe traffic: two copies of every saved byte per step, hidden only when the
#   copies overlap compute (pinned memory, which `offloaded` uses on CUDA)
# - `save_on_cpu` copies *every* saved tensor, weights included: a host copy of the weights per
#   step that buys no device memory (the weights stay on the device anyway)

# %%
assert combo_error < 1e-5                                         # same gradients as no checkpointing
assert kept[1] < mlp_only.breakdown["activations"] < kept_none    # selective: between full and none
assert 0.8 < offloadable / mlp_only.breakdown["activations"] < 1.25  # the hook sees what the tracker kept

# %% [markdown]
# ## Exercise 3
# *(hard)* Find the chunk size at which `chunked_cross_entropy` stops saving memory for the
# 1.5B's 151,936-token vocabulary at seq 4,096, using `measure.simulate`-style fake tensors.

# %%
full = family.config("r1-distill-qwen-1.5b")
V, H, T = full.vocab_size, full.hidden_size, 4096
CHUNKS = [256, 512, 768, 1024, 1280, 1536, 2048, 3072, 4096]
chunk_peak = {}
with FakeTensorMode():  # shapes and dtypes only: nothing is allocated
    hidden = torch.randn(T, H, requires_grad=True)
    head = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (T,))
    with measure.track(head, hidden) as plain:
        F.cross_entropy(hidden @ head.T, labels).backward()
    for chunk in CHUNKS:
        hidden.grad = head.grad = None
        with measure.track(head, hidden) as m:
            checkpointing.chunked_cross_entropy(hidden, head, labels, chunk_tokens=chunk).backward()
        chunk_peak[chunk] = m.peak_bytes
head_bytes, chunk_logits = V * H * 4, {c: c * V * 4 for c in CHUNKS}
floor = min(chunk_peak.values())
knee = max(c for c in CHUNKS if chunk_peak[c] == floor)
print(f"plain loss: peak {format_bytes(plain.peak_bytes)} (one copy of the logits: {format_bytes(T * V * 4)})")
for c in CHUNKS:
    print(f"chunk {c:>5}: peak {format_bytes(chunk_peak[c]):>10} = {chunk_peak[c] / plain.peak_bytes:6.1%} of plain")
print(f"floor {format_bytes(floor)} = {floor / head_bytes:.1f} x the LM head ({format_bytes(head_bytes)}); "
      f"chunks of {knee} tokens or fewer all reach it")

# %%
plots.lines(CHUNKS, {"chunked": [chunk_peak[c] / GiB for c in CHUNKS], "plain": [plain.peak_bytes / GiB] * len(CHUNKS)},
            xlabel="chunk (tokens)", ylabel="loss peak (GiB)", title="Loss of R1-Distill-Qwen-1.5B, seq 4,096 (fake tensors)")
plt.show()

# %% [markdown]
# Two answers, one at each end:
# - **below about 1,024 tokens** a smaller chunk saves nothing more: the peak is the LM head's
#   weight and gradients (about 4 head-sized buffers, 3.5 GiB), which chunking cannot shrink
# - **at 4,096 tokens** (one chunk = the whole sequence) it saves nothing at all: the peak equals
#   the plain loss's; in between, each extra chunk token costs about three rows of fp32 logits
# - so 1,024 is the sweet spot here: 45% of the plain peak, with the fewest recompute launches

# %%
assert all(chunk_peak[c] == floor for c in CHUNKS if c <= 1024)                # flat floor up to 1,024
assert all(chunk_peak[a] < chunk_peak[b] for a, b in itertools.pairwise(CHUNKS[3:]))  # then it grows
assert abs(chunk_peak[4096] / plain.peak_bytes - 1) < 0.001                     # one chunk = plain
assert 3.5 < floor / head_bytes < 4.5                                           # the floor is the head
assert floor < 0.5 * plain.peak_bytes
slope = (chunk_peak[3072] - chunk_peak[1536]) / (chunk_logits[3072] - chunk_logits[1536])
assert 2.5 < slope < 3.5                                                        # ~3 logits rows per chunk token
print("all answers checked")
