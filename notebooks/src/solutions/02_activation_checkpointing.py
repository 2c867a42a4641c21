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
import contextlib
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
# `offloaded(device)`. What remains on the device, and what goes to the host?
#
# `measure.track` reports the device peak and, apart, the peak of the host memory the offloaded
# tensors took (`host_peak_bytes`), on this CPU as on a GPU.

# %%
def measured_step(policy: str, offload: bool) -> tuple[measure.Measurement, dict[str, torch.Tensor]]:
    checkpointing.enable(model, policy)
    with measure.track(model, label=f"{policy}{' + offload' if offload else ''}") as m:
        with checkpointing.offloaded(device) if offload else contextlib.nullcontext():
            loss = checkpointing.causal_lm_loss(model, batch)
        loss.backward()
    checkpointing.disable(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return m, grads


runs = {(policy, offload): measured_step(policy, offload)
        for policy, offload in (("none", False), ("mlp", False), ("mlp", True))}
reference = runs["none", False][1]
combo_error = max((runs["mlp", True][1][n] - reference[n]).abs().max().item() for n in reference)
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"{'':<16}{'device peak':>12}{'host peak':>11}")
for m, _ in runs.values():
    print(f"{m.label:<16}{format_bytes(m.peak_bytes):>12}{format_bytes(m.host_peak_bytes):>11}")
print(f"mlp checkpointed + offloaded: max |grad - none| {combo_error:.1e}; parameters {format_bytes(params)}")

# %% [markdown]
# - what remains on the device: the weights and gradients, plus, during backward, the tensors of
#   the layer being processed (copied back from the host) and its MLP's recompute, and the loss's
#   logits while the loss's backward runs; the saved activations of every other layer sit in host
#   memory
# - the checkpointed MLPs save only their inputs, so offloading moves the attention's saved
#   tensors and the MLP inputs, not the MLP's large intermediates (those are recomputed)
# - the price is PCIe traffic: two copies of every saved byte per step, hidden only when the
#   copies overlap compute (pinned memory, which `offloaded` uses on CUDA)
# - parameters are not offloaded: the weights stay on the device anyway (`save_on_cpu` copies
#   them too, a host copy per step that buys no device memory)

# %%
mlp_here, mlp_offloaded = runs["mlp", False][0], runs["mlp", True][0]
assert combo_error < 1e-5                                         # same gradients as no checkpointing
assert mlp_offloaded.peak_bytes < mlp_here.peak_bytes < runs["none", False][0].peak_bytes
assert mlp_offloaded.host_peak_bytes > 0 == mlp_here.host_peak_bytes
assert mlp_offloaded.host_peak_bytes < mlp_here.breakdown["activations"] + mlp_here.breakdown["temporaries"]

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
