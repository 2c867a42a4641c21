# %% [markdown]
# # 06 · Inference memory: the KV cache of long reasoning traces
#
# R1 models think for thousands of tokens before they answer. Every token of every running trace
# keeps a key and a value per layer in the **KV cache**, so at inference the cache, not the weights,
# decides how many requests fit: R1-Distill-Qwen-7B's 14 GiB of bf16 weights fit on an 80 GiB GPU
# with room to spare, but a single 32k-token trace adds 1.75 GiB. The full R1 was built for this:
# its Multi-head Latent Attention caches 70 KB per token instead of 5 MB.
#
# **What you will learn**
# - the bytes per token of every family member: GQA, MLA, and plain multi-head attention
# - how to measure the cache during `generate`, and check it against the estimator
# - what transformers caches for DeepseekV3, and how absorbing the up-projection keeps attention in the latent space
# - int8 / int4 / fp8 caches and an offloaded cache: bytes saved, accuracy kept
# - why serving engines page the cache

# %%
# NBVAL_IGNORE_OUTPUT
# Setup: on Colab this installs the course package; locally and on Binder it is already installed.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("lowmem_course") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "lowmem-course @ git+https://github.com/lowmem-course/lowmem-course"], check=True)
from lowmem_course import lab
device = lab.start()

# %%
import copy
import random

import matplotlib.pyplot as plt
import torch
from transformers import DynamicCache, QuantizedCache

from lowmem_course import family, kvcache, measure, plots
from lowmem_course.estimate import Setup, estimate
from lowmem_course.reasoning import parse_answer, sample
from lowmem_course.student import accuracy, load_student, solve
from lowmem_course.units import KiB, format_bytes, parse_bytes

N_EVAL = 100  # held-out problems per accuracy (one generate batch)
TRACE = 32_768  # tokens: R1's generation budget for a reasoning trace

# %% [markdown]
# ## 1 · Predict: bytes per token
#
# One token, one sequence, all layers:
# - **GQA** (the distills): `2 × layers × kv_heads × head_dim × bytes`: a key and a value per kv head
# - **MLA** (R1): `(kv_lora_rank + qk_rope_head_dim) × layers × bytes`: one compressed latent and
#   one rope key, shared by all 128 heads
# - **plain multi-head** (MHA), for comparison: every head caches its own key and value

# %%
rows = []
for name in family.MEMBERS:
    cfg_full = family.config(name)
    per_token = kvcache.kv_bytes_per_token(cfg_full)
    predicted = estimate(name, Setup(mode="inference", precision="bf16", seq=TRACE)).bytes["kv_cache"]
    rows.append((name, per_token, kvcache.mha_bytes_per_token(cfg_full), predicted))
print(f"{'model':<22}{'bytes/token':>12}{'if MHA':>12}{'MHA/ours':>9}{f'{TRACE // 1024}k-token trace':>18}")
for name, per_token, mha, predicted in rows:
    print(f"{name:<22}{per_token:>12,}{mha:>12,}{mha / per_token:>8.1f}x{format_bytes(predicted):>18}")

# %% [markdown]
# - GQA already saves 4-8x against multi-head; MLA saves 71x: the 671B R1 caches about as much
#   per token as the 7B distill, and half as much as the 8B one
# - the last column is the estimator's `kv_cache` for one 32k-token trace in bf16

# %% [markdown]
# ## 2 · Measure: the cache during `generate`
#
# `kvcache.cache_growth` runs greedy `generate` with a hook after every forward pass and sums the
# bytes of every tensor the cache holds (`kvcache.cache_bytes`). We run it on the tiny twins of a
# distill (GQA) and of R1 (MLA), in fp32, and draw the estimator's prediction next to it.

# %%
PROMPT, NEW = 16, 32
course = lab.course_model("r1-distill-qwen-1.5b")  # LOWMEM_MODEL=<Hub id> swaps in the real model
twins = {"GQA: " + course.name: course.config, "MLA: tiny twin of r1": family.tiny("r1")}
growth = {}
for label, cfg in twins.items():
    model = family.build(cfg, device=device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    _, growth[label] = kvcache.cache_growth(model, prompt, max_new_tokens=NEW)
    predicted = [estimate(cfg, Setup(mode="inference", precision="fp32", seq=t)).bytes["kv_cache"] for t, _ in growth[label]]
    measured = [b for _, b in growth[label]]
    growth[label] = dict(tokens=[t for t, _ in growth[label]], measured=measured, predicted=predicted,
                         formula=kvcache.kv_bytes_per_token(cfg, bytes_per_value=4))
    print(f"{label}: {growth[label]['tokens'][-1]} cached tokens hold {format_bytes(measured[-1])} "
          f"= {measured[-1] // growth[label]['tokens'][-1]:,} bytes/token (formula {growth[label]['formula']:,}, "
          f"estimator {predicted[-1] // growth[label]['tokens'][-1]:,})")

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for label, g in growth.items():
    ax.plot(g["tokens"], [b / KiB for b in g["measured"]], marker="o", markersize=3, label=f"{label} (measured)")
    ax.plot(g["tokens"], [b / KiB for b in g["predicted"]], color="black", linestyle="--", linewidth=1)
ax.plot([], [], color="black", linestyle="--", linewidth=1, label="estimator")
ax.set_xlabel("cached tokens (prompt + generated)")
ax.set_ylabel("KV cache (KiB, fp32)")
ax.set_title("The cache grows by the same bytes every token")
ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# ## 3 · MLA: what transformers caches, and what it builds every step
#
# Look inside the cache of the R1 twin: per layer, `keys` is the compressed latent
# (`kv_lora_rank` = 16 here, 512 in R1) and `values` the shared rope key (8 here, 64 in R1).
# transformers 5 caches the latent, not expanded keys and values (version 4 cached the expanded ones).

# %%
r1_cfg = family.tiny("r1")
r1_twin = family.build(r1_cfg, device=device).eval()
with torch.no_grad():
    cache = r1_twin(torch.arange(1, 9, device=device)[None], use_cache=True).cache
layer = cache.layers[0]
print(f"layer 0 keys {tuple(layer.keys.shape)}, values {tuple(layer.values.shape)}")
print(f"cached bytes/token: {kvcache.cache_bytes(cache) // 8} (MLA formula {kvcache.kv_bytes_per_token(r1_cfg, 4)}, "
      f"expanded heads would be {kvcache.mha_bytes_per_token(r1_cfg, 4)})")

# %% [markdown]
# The stock attention then calls `expand_kv` at **every decode step**: `kv_b_proj` turns every
# cached latent back into 4 heads' keys and values (128 heads in R1), attends, and drops them.
# The cache is small, the step's transient memory is not.
#
# `kvcache.LatentAttention` absorbs the up-projection instead (DeepSeek-V2, section 2.1.2):
# `q · (W_uk c) = (W_ukᵀ q) · c`, so the query moves into the latent space once and attention runs on
# the cached latents; `W_uv` is applied to the 16-value output. We measure one decode step at a
# 1,024-token context, stock and absorbed, with the same cache.

# %%
CONTEXT, BATCH = 1024, 2
context = torch.randint(0, r1_cfg.vocab_size, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(1)).to(device)
with torch.no_grad():
    cache = r1_twin(context, use_cache=True, logits_to_keep=1).cache
    decode = {}
    for label, latent in (("stock (expand_kv)", False), ("absorbed (latent)", True)):
        kvcache.use_latent_attention(r1_twin, latent)
        step_cache = copy.deepcopy(cache)  # both steps start from the same cache
        with measure.track(r1_twin, label=label) as step:
            logits = r1_twin(context[:, -1:], cache=step_cache, logits_to_keep=1).logits
        new_cache = kvcache.cache_bytes(step_cache)  # written during the step: the cache grown by one token
        decode[label] = dict(cache=new_cache, temporaries=step.peak_bytes - step.breakdown["parameters"] - new_cache,
                             logits=logits)
expand = kvcache.mha_bytes_per_token(r1_cfg, 4) // r1_cfg.num_hidden_layers * BATCH * CONTEXT
for label, d in decode.items():
    print(f"{label:<20} new cache {format_bytes(d['cache'])}, temporaries at the peak {format_bytes(d['temporaries'])}")
print(f"one layer's expanded keys and values: {format_bytes(expand)}")
same_logits = torch.allclose(*(d["logits"] for d in decode.values()), atol=1e-5)
print(f"same next-token logits: {same_logits}")

# %%
plots.breakdown_bars({label: {"kv_cache": d["cache"], "temporaries": d["temporaries"]} for label, d in decode.items()},
                     title=f"One decode step, {CONTEXT}-token context, batch {BATCH}")
plt.show()

# %% [markdown]
# ## 4 · Quality: the DeepseekV3 student with latent attention
#
# The student is a tiny R1 (MLA + MoE) trained on `<think>` addition traces. Same weights, stock
# attention vs absorbed attention: the greedy traces must be identical.

# %%
ds_model, ds_tok = load_student("deepseek_v3")
ds_model.to(device)
problems = sample(N_EVAL, seed=0)  # the held-out set that student.accuracy draws
stock_out = solve(ds_model, ds_tok, [p.prompt for p in problems], progress=False)
kvcache.use_latent_attention(ds_model)
made = []  # keep the cache of the evaluation batch, to weigh it afterwards
with kvcache.using_cache(ds_model, lambda: made.append(DynamicCache()) or made[-1]):
    latent_out = solve(ds_model, ds_tok, [p.prompt for p in problems], progress=False)
identical = sum(a == b for a, b in zip(stock_out, latent_out))
ds_acc = {label: sum(parse_answer(c) == p.answer for c, p in zip(out, problems)) / N_EVAL
          for label, out in (("stock", stock_out), ("latent", latent_out))}
print(f"{problems[0].prompt}{latent_out[0]}")
print(f"identical traces: {identical}/{N_EVAL}; accuracy stock {ds_acc['stock']:.2f}, latent {ds_acc['latent']:.2f}")
ds_tokens, ds_bytes = made[-1].get_seq_length(), kvcache.cache_bytes(made[-1])
ds_formula = kvcache.kv_bytes_per_token(ds_model.config, bytes_per_value=4) * N_EVAL * ds_tokens
print(f"latent cache after {ds_tokens} tokens x {N_EVAL} traces: {ds_bytes:,} bytes measured, "
      f"MLA formula {ds_formula:,} (fp32)")

# %% [markdown]
# ## 5 · Quantized caches: int8, int4, fp8
#
# - transformers' `QuantizedCache` follows KIVI: the newest `residual_length` tokens stay in full
#   precision, older ones are quantized in groups
# - its integer backends need `optimum-quanto` (2/4 bits only) or `hqq`; only `fp8` is built in
#   (one scale per layer, frozen at the prompt)
# - `kvcache.IntQuantizedLayer` is the same scheme in plain PyTorch: int8, or int4 packed two per
#   byte, one scale (in the cache's dtype) per group of 16 values (one head vector here)
# - the student's traces are ~45 tokens, so the residual window is 4 tokens (128 on real traces)

# %%
# bf16 on a GPU; fp32 on a CPU, where bf16 matmuls of this size run ~2.5x slower
CACHE_DTYPE = torch.bfloat16 if device.type == "cuda" else torch.float32
qw_model, qw_tok = load_student("qwen2", dtype=CACHE_DTYPE)
qw_model.to(device)
qw_cfg = qw_model.config
GROUP, RESIDUAL = 16, 4
caches = {
    str(CACHE_DTYPE).removeprefix("torch."): DynamicCache,
    "fp8 (transformers)": lambda: QuantizedCache("fp8", qw_cfg),
    "int8": lambda: kvcache.quantized_cache(qw_cfg, nbits=8, q_group_size=GROUP, residual_length=RESIDUAL),
    "int4": lambda: kvcache.quantized_cache(qw_cfg, nbits=4, q_group_size=GROUP, residual_length=RESIDUAL),
}
quant = {}
for label, make_cache in caches.items():
    made = []  # keep the cache of the evaluation batch, to weigh it afterwards
    with kvcache.using_cache(qw_model, lambda made=made, make_cache=make_cache: made.append(make_cache()) or made[-1]):
        acc = accuracy(qw_model, qw_tok, n=N_EVAL, progress=False)  # every generate inside gets this cache
    quant[label] = dict(per_token=kvcache.cache_bytes(made[-1]) / (N_EVAL * made[-1].get_seq_length()), accuracy=acc)
full = next(iter(quant.values()))
print(f"{'cache':<20}{'bytes/token':>12}{'ratio':>7}{'accuracy':>10}")
for label, q in quant.items():
    print(f"{label:<20}{q['per_token']:>12,.0f}{q['per_token'] / full['per_token']:>7.2f}{q['accuracy']:>10.2f}")
print(f"fully quantized, formula: int8 {kvcache.quantized_kv_bytes_per_token(qw_cfg, 8, GROUP, CACHE_DTYPE.itemsize):,}, "
      f"int4 {kvcache.quantized_kv_bytes_per_token(qw_cfg, 4, GROUP, CACHE_DTYPE.itemsize):,} bytes/token")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
bars = ax.bar(list(quant), [q["per_token"] for q in quant.values()], color="#937860")
for bar, q in zip(bars, quant.values()):
    ax.annotate(f"acc {q['accuracy']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize="small")
ax.set_ylabel("KV cache (bytes per token)")
ax.set_title("Qwen2 student: cache bytes and exact-match accuracy")
plt.show()

# %% [markdown]
# ## 6 · Offloading the cache to CPU memory
#
# - `DynamicCache(offloading=True)` (or `generate(..., cache_implementation="offloaded")`) keeps each
#   layer's cache in CPU memory and copies it back to the GPU just before the layer runs,
#   prefetching the next layer on a side stream: the GPU holds about two layers' worth
# - the price: the whole cache crosses PCIe once per generated token

# %%
name = "r1-distill-qwen-7b"
per_token = kvcache.kv_bytes_per_token(family.config(name))
layers = family.config(name).num_hidden_layers
full_cache = per_token * TRACE
print(f"{name}, one {TRACE // 1024}k-token trace: cache {format_bytes(full_cache)} on the GPU, "
      f"or {format_bytes(2 * full_cache // layers)} when offloaded (2 of {layers} layers)")
print(f"PCIe traffic per generated token: {format_bytes(full_cache)} = {full_cache / 25e9 * 1e3:.0f} ms at 25 GB/s")

# %%
if device.type == "cuda":  # transformers' offloading needs CUDA streams (see Pitfalls)
    with kvcache.using_cache(qw_model, lambda: DynamicCache(offloading=True)):
        quant["offloaded"] = dict(per_token=full["per_token"], accuracy=accuracy(qw_model, qw_tok, n=N_EVAL, progress=False))
    print(f"offloaded cache: accuracy {quant['offloaded']['accuracy']:.2f} (on the GPU: {full['accuracy']:.2f})")
else:
    print(f"no GPU here ({device}): the offloaded cache runs on CUDA only")

# %% [markdown]
# ## 7 · At full size: the longest trace that fits
#
# Thousands of cached tokens for one sequence on one GPU: bf16 weights, room for a 1,024-token
# prompt's prefill (both from the estimator), the cache in bf16, int8 or int4 (groups of 64, bf16 scales).

# %%
GPUS = {"24 GiB": parse_bytes("24GiB"), "80 GiB": parse_bytes("80GiB")}
FORMATS = {"bf16": lambda c: kvcache.kv_bytes_per_token(c),
           "int8": lambda c: kvcache.quantized_kv_bytes_per_token(c, 8),
           "int4": lambda c: kvcache.quantized_kv_bytes_per_token(c, 4)}
longest = {}
print((f"{'':<33}" + "".join(f"{g + ' GPU, cache in':^27}" for g in GPUS)).rstrip())  # thousands of tokens
print(f"{'model':<22}{'weights':>11}" + "".join(f"{f:>9}" for g in GPUS for f in FORMATS))
for name in family.MEMBERS:
    cfg_full = family.config(name)
    e = estimate(name, Setup(mode="inference", precision="bf16", seq=1024))
    longest[name] = {(g, f): kvcache.longest_trace(size, e.bytes["weights"], per(cfg_full), reserved_bytes=e.bytes["activations"])
                     for g, size in GPUS.items() for f, per in FORMATS.items()}
    print(f"{name:<22}{format_bytes(e.bytes['weights']):>11}" + "".join(f"{n // 1000:>8,}k" for n in longest[name].values()))
qwen7b = family.config("r1-distill-qwen-7b")
print("r1-distill-qwen-7b cache bytes/token: " + ", ".join(f"{f} {per(qwen7b):,}" for f, per in FORMATS.items()))

# %% [markdown]
# - a 0 means the weights alone do not fit (quantize them first: notebook 03)
# - R1 needs a node. On 8 × H200 (141 GB each) with its published 1-byte FP8 weights split 8 ways,
#   every GPU still keeps the whole latent cache: the heads each GPU computes all read the same latent,
#   so splitting heads across GPUs does not split the cache

# %%
e = estimate("r1", Setup(mode="inference", precision="bf16", seq=1024))
fp8_weights_per_gpu = e.parameters // 8  # 1 byte per parameter, split over 8 GPUs
r1_longest = kvcache.longest_trace(parse_bytes("141GB"), fp8_weights_per_gpu, kvcache.kv_bytes_per_token(family.config("r1")),
                                   reserved_bytes=e.bytes["activations"])
print(f"r1 on 8 x H200: {format_bytes(fp8_weights_per_gpu)} of FP8 weights per GPU, "
      f"{r1_longest // 1000:,}k cached tokens per GPU in bf16 = {r1_longest // TRACE} traces of {TRACE // 1024}k")

# %% [markdown]
# ## 8 · Batching and paged caches, on paper
#
# A server runs many traces at once. If each request reserves a contiguous cache for its maximum
# length (32k tokens), most of it stays empty: R1 traces vary from hundreds to tens of thousands of
# tokens. vLLM's PagedAttention allocates fixed blocks (16 tokens) as the trace grows, so at most
# one partly filled block per sequence is wasted. Assumed trace lengths: log-normal, median 4k.

# %%
name = "r1-distill-qwen-7b"
e = estimate(name, Setup(mode="inference", precision="bf16", seq=1024))
free = parse_bytes("80GiB") - e.bytes["weights"] - e.bytes["activations"]
per_token = kvcache.kv_bytes_per_token(family.config(name))
rng = random.Random(0)
lengths = [min(TRACE, int(rng.lognormvariate(8.3, 0.8))) for _ in range(5000)]
contiguous = free // (TRACE * per_token)
paged, used = 0, 0
for n in lengths:
    used += kvcache.paged_tokens([n]) * per_token
    if used > free:
        break
    paged += 1
mean_length = sum(lengths[:paged]) / paged
print(f"{name} on 80 GiB: {format_bytes(free)} free for the cache, {per_token:,} bytes/token")
print(f"reserve {TRACE:,} tokens per request: {contiguous} requests at once, "
      f"{1 - mean_length / TRACE:.0%} of the reserved cache never written")
print(f"paged (16-token blocks): {paged} requests at once (mean trace {mean_length:,.0f} tokens), "
      f"{1 - sum(lengths[:paged]) / kvcache.paged_tokens(lengths[:paged]):.1%} of the blocks empty")

# %% [markdown]
# ## Pitfalls

# %% [markdown]
# **1. The residual window hides the quantization.** `QuantizedCache`'s default `residual_length`
# is 128: on a trace shorter than that only the prompt is quantized, the memory barely moves and
# the accuracy looks perfect.

# %%
window = {}
for residual in (128, RESIDUAL):  # a 10-token prompt, then 35 generated tokens, one at a time
    cache_q = kvcache.quantized_cache(qw_cfg, 8, GROUP, residual_length=residual)
    head = (1, qw_cfg.num_key_value_heads, 1, qw_cfg.head_dim)
    for tokens in [10] + [1] * 35:
        for i in range(qw_cfg.num_hidden_layers):
            states = torch.randn(head[:2] + (tokens,) + head[3:], dtype=CACHE_DTYPE)
            cache_q.update(states, states, i)
    window[residual] = kvcache.cache_bytes(cache_q) / cache_q.get_seq_length()
full_per_token = kvcache.kv_bytes_per_token(qw_cfg, CACHE_DTYPE.itemsize)
print(f"45-token trace, int8 cache: residual_length=128 -> {window[128]:,.0f} bytes/token, "
      f"residual_length={RESIDUAL} -> {window[RESIDUAL]:,.0f} (unquantized: {full_per_token:,})")

# %% [markdown]
# **2. The integer backends of `QuantizedCache` are extra packages.**

# %%
try:
    QuantizedCache("quanto", qw_cfg)
except ImportError as err:
    print("ImportError:", " ".join(str(err).split()))  # the library's message holds a double space

# %% [markdown]
# **3. The fp8 cache freezes its scale on the prompt.** Values that later exceed the prompt's
# range are clipped to its largest value (448 × scale), silently.

# %%
from transformers.cache_utils import Fp8QuantizedLayer

fp8_layer = Fp8QuantizedLayer()
prompt_keys = torch.linspace(-1, 1, 16).view(1, 1, 1, 16)
fp8_layer.update(prompt_keys, prompt_keys)
keys, _ = fp8_layer.update(10 * prompt_keys, 10 * prompt_keys)
print(f"stored a key of max {10 * prompt_keys.max():.1f}, read back max {keys[..., 1, :].max():.2f}")

# %% [markdown]
# **4. transformers' offloaded cache needs CUDA.** On a CPU-only machine it fails at the first step.

# %%
try:
    qw_model.generate(**qw_tok(["12+34="], return_tensors="pt").to(device), max_new_tokens=2,
                      cache=DynamicCache(offloading=True), pad_token_id=qw_tok.pad_token_id)
    print(f"offloading ran on {device}")
except (AssertionError, RuntimeError) as err:
    print(f"{type(err).__name__}: {err}")

# %% [markdown]
# ## Summary
#
# - the cache costs `2 × layers × kv_heads × head_dim × bytes` per token (GQA) or
#   `(kv_lora_rank + rope) × layers × bytes` (MLA: 70,272 B for R1 in bf16), measured exactly
# - transformers 5 caches MLA's latent; absorbing `W_uk` and `W_uv` also keeps each decode step in the latent space
# - int8 and int4 caches (with one scale per group) cut the bytes 3-5x against fp32 on the student,
#   1.9x and 3.8x against bf16 at full size; the student's accuracy did not move
# - offloading trades PCIe time for GPU memory; paging lets a server batch by what traces use, not what they might

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* How long a trace fits for R1-Distill-Llama-8B on a 48 GiB GPU with an int4 cache? Use `kvcache.longest_trace`.
# 2. *(medium)* Quantize keys per channel (group along the token axis) as KIVI does, and compare int4 accuracy.
# 3. *(hard)* Make `LatentAttention` cache the latent in int8 and measure bytes and accuracy on the DeepseekV3 student.

# %% [markdown]
# ## Further reading
#
# - DeepSeek-V2 (arXiv 2405.04434), section 2.1: Multi-head Latent Attention and the absorbed projections
# - KIVI: a tuning-free asymmetric 2-bit quantization for KV cache (arXiv 2402.02750)
# - Efficient Memory Management for LLM Serving with PagedAttention (vLLM, arXiv 2309.06180)
# - transformers docs: [KV cache strategies](https://huggingface.co/docs/transformers/en/kv_cache)

# %% [markdown]
# ## Self-check

# %%
for g in growth.values():  # measured bytes = formula = estimator, at every step
    assert g["measured"] == [t * g["formula"] for t in g["tokens"]] == g["predicted"]
assert kvcache.kv_bytes_per_token(family.config("r1")) == 70_272
assert kvcache.kv_bytes_per_token(family.config("r1")) < 0.6 * kvcache.kv_bytes_per_token(family.config("r1-distill-llama-8b"))
stock_step, absorbed_step = decode.values()
assert stock_step["cache"] == absorbed_step["cache"] == BATCH * (CONTEXT + 1) * kvcache.kv_bytes_per_token(r1_cfg, 4)
assert same_logits and stock_step["temporaries"] > expand > 2 * absorbed_step["temporaries"]
assert ds_acc["stock"] >= 0.9 and full["accuracy"] >= 0.9  # the students still solve their task
assert identical == N_EVAL and ds_acc["latent"] == ds_acc["stock"]
assert abs(ds_bytes - ds_formula) <= 0.01 * ds_formula  # latent cache at the MLA figure
assert quant["int8"]["accuracy"] >= full["accuracy"] - 0.03 and quant["int4"]["accuracy"] >= full["accuracy"] - 0.03
assert quant["int8"]["per_token"] < 0.65 * full["per_token"] and quant["int4"]["per_token"] < 0.45 * full["per_token"]
assert longest["r1-distill-qwen-7b"][("80 GiB", "int4")] > 3 * longest["r1-distill-qwen-7b"][("80 GiB", "bf16")]
assert paged > 3 * contiguous
assert window[128] > 0.8 * full_per_token and window[RESIDUAL] < 0.6 * full_per_token
