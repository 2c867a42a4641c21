# %% [markdown]
# # 06 · Inference memory: the KV cache — solutions
#
# Worked answers to the exercises of notebook 06. Each one runs the package, prints what it
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
import torch
from transformers import Cache, DynamicCache

from lowmem_course import family, kvcache
from lowmem_course.estimate import Setup, estimate
from lowmem_course.reasoning import parse_answer, sample
from lowmem_course.student import load_student, solve
from lowmem_course.units import format_bytes, parse_bytes

N_EVAL = 200  # held-out problems per accuracy: two generate batches
GROUP, RESIDUAL = 16, 4  # as in notebook 06
problems = sample(N_EVAL, seed=0)


def run_with(model, tok, make_cache) -> tuple[list[str], Cache]:
    """Greedy completions of the held-out problems with every generate using ``make_cache()``,
    and the cache of the last batch (to weigh it)."""
    made = []
    with kvcache.using_cache(model, lambda: made.append(make_cache()) or made[-1]):
        out = solve(model, tok, [p.prompt for p in problems], progress=False)
    return out, made[-1]


def score(out: list[str], reference: list[str]) -> tuple[float, int]:
    """Exact-match accuracy, and how many completions are identical to ``reference``'s."""
    return sum(parse_answer(c) == p.answer for c, p in zip(out, problems)) / N_EVAL, sum(a == b for a, b in zip(out, reference))

# %% [markdown]
# ## Exercise 1
# *(easy)* How long a trace fits for R1-Distill-Llama-8B on a 48 GiB GPU with an int4 cache? Use `kvcache.longest_trace`.
#
# As in notebook 06, section 7: bf16 weights, room for a 1,024-token prefill (both from the
# estimator), the cache in int4 with groups of 64 values and bf16 scales.

# %%
name = "r1-distill-llama-8b"
llama = family.config(name)
e = estimate(name, Setup(mode="inference", precision="bf16", seq=1024))
gpu = parse_bytes("48GiB")
per_token = {"bf16": kvcache.kv_bytes_per_token(llama), "int4": kvcache.quantized_kv_bytes_per_token(llama, 4)}
fits = {f: kvcache.longest_trace(gpu, e.bytes["weights"], b, reserved_bytes=e.bytes["activations"]) for f, b in per_token.items()}
free = gpu - e.bytes["weights"] - e.bytes["activations"]
print(f"{name}: weights {format_bytes(e.bytes['weights'])}, prefill room {format_bytes(e.bytes['activations'])}, "
      f"{format_bytes(free)} left for the cache")
for f, b in per_token.items():
    print(f"{f:<5} cache: {b:>7,} bytes/token -> {fits[f]:,} tokens in one sequence")

# %% [markdown]
# - **about 1.0 million tokens with int4**, against 270 thousand in bf16: 128 KiB/token shrinks to 34 KiB
#   (4 bits per value plus one 2-byte scale per 64 values: 3.76x, not 4x)
# - but one sequence cannot be that long: the model's context window is 128k tokens
#   (`max_position_embeddings`). The memory answer is really a batch answer: 7 full-length 128k
#   traces at once in int4, 2 in bf16
# - check by hand: `free // bytes_per_token`, and one more token would not fit

# %%
assert fits["int4"] == free // per_token["int4"]
assert fits["int4"] * per_token["int4"] <= free < (fits["int4"] + 1) * per_token["int4"]
assert 3.7 < fits["int4"] / fits["bf16"] < 3.8
batch_of = {f: fits[f] // llama.max_position_embeddings for f in fits}  # full-length traces at once
print(f"context window {llama.max_position_embeddings:,} tokens: {batch_of['int4']} full traces at once in int4, "
      f"{batch_of['bf16']} in bf16")
assert fits["int4"] > llama.max_position_embeddings and (batch_of["int4"], batch_of["bf16"]) == (7, 2)
assert kvcache.longest_trace(gpu, e.bytes["weights"], per_token["int4"], batch=7,
                             reserved_bytes=e.bytes["activations"]) >= llama.max_position_embeddings

# %% [markdown]
# ## Exercise 2
# *(medium)* Quantize keys per channel (group along the token axis) as KIVI does, and compare int4 accuracy.
#
# KIVI's observation: a few **channels** of the keys carry large values in every token, so a scale
# per token (a group along the head dimension, as `IntQuantizedLayer` does) is set by the outlier
# channel and crushes the others. A scale per channel over a block of tokens isolates them. Values
# have no such channels and stay per token.
#
# One catch: transformers' `QuantizedLayer` re-quantizes the **whole** cache every time its residual
# window fills. Along the head dimension that is harmless (a group is one token's vector: same scale,
# same integers), but a token-axis group would be re-rounded with a new scale every time a token
# joins it. So the layer below follows KIVI: keys are quantized in blocks of `GROUP` tokens once the
# block is complete, and never touched again; the unfinished block stays in full precision.

# %%
class KiviLayer(kvcache.IntQuantizedLayer):
    """int8/int4 cache layer: keys per channel in frozen blocks of ``q_group_size`` tokens, values per token."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.blocks = []  # (quantized keys, quantized values) of every complete block
        keys, values = torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
        full = keys.shape[-2] - keys.shape[-2] % self.q_group_size
        if full:  # keys channels-last, so the groups of the parent's _quantize run along the tokens
            self.blocks.append((self._quantize(keys[..., :full, :].transpose(-1, -2).contiguous(), -1),
                                self._quantize(values[..., :full, :].contiguous(), -1)))
        self.keys, self.values = keys[..., full:, :].clone(), values[..., full:, :].clone()
        old_keys = [self._dequantize(k).transpose(-1, -2) for k, _ in self.blocks]
        old_values = [self._dequantize(v) for _, v in self.blocks]
        return torch.cat(old_keys + [self.keys], dim=-2), torch.cat(old_values + [self.values], dim=-2)


qw_model, qw_tok = load_student("qwen2", dtype=torch.float32)
qw_cfg = qw_model.config
reference, ref_cache = run_with(qw_model, qw_tok, DynamicCache)
per_token_out, per_token_cache = run_with(qw_model, qw_tok, lambda: kvcache.quantized_cache(qw_cfg, 4, GROUP, RESIDUAL))
kivi_out, kivi_cache = run_with(qw_model, qw_tok, lambda: Cache(layers=[KiviLayer(4, GROUP) for _ in range(qw_cfg.num_hidden_layers)]))
results = {"fp32": score(reference, reference), "int4, keys per token": score(per_token_out, reference),
           "int4, keys per channel": score(kivi_out, reference)}
for label, (acc, same) in results.items():
    print(f"{label:<24} accuracy {acc:.3f}, {same}/{N_EVAL} completions identical to fp32")

# %% [markdown]
# How well is each cache holding the keys? Layer 0's keys depend on the tokens only, so on the traces
# that came out identical they can be compared with the fp32 cache directly:

# %%
keys_fp32 = ref_cache.layers[0].keys
outlier = keys_fp32.abs().amax(dim=(0, 1, 2))  # largest |value| of each of the 16 channels
print(f"layer 0 keys {tuple(keys_fp32.shape)}: largest channel {outlier.max() / outlier.median():.1f}x the median channel")
layer_pt, layer_kivi = per_token_cache.layers[0], kivi_cache.layers[0]
held = {"keys per token": torch.cat([layer_pt._dequantize(layer_pt._quantized_keys), layer_pt.keys], dim=-2),
        "keys per channel": torch.cat([layer_kivi._dequantize(k).transpose(-1, -2) for k, _ in layer_kivi.blocks]
                                      + [layer_kivi.keys], dim=-2)}
same = torch.tensor([a == b == c for a, b, c in zip(reference[-100:], per_token_out[-100:], kivi_out[-100:])])
tokens = min(k.shape[-2] for k in [keys_fp32, *held.values()])  # the runs may stop at different lengths
key_error = {label: ((k - keys_fp32)[same, ..., :tokens, :].norm() / keys_fp32[same, ..., :tokens, :].norm()).item()
             for label, k in held.items()}
in_blocks = kivi_cache.get_seq_length() - layer_kivi.keys.shape[-2]  # tokens in complete, quantized blocks
block_bytes = sum(t.untyped_storage().nbytes() for k, v in layer_kivi.blocks for t in (*k, *v))
fully_quantized = block_bytes / (100 * in_blocks) * qw_cfg.num_hidden_layers  # 100 traces in the batch
print(f"relative error of the cached keys, {int(same.sum())} traces: " + ", ".join(f"{k} {v:.3f}" for k, v in key_error.items()))
print(f"bytes/token once quantized: per channel {fully_quantized:.0f} (blocks of {GROUP} tokens), per token "
      f"{kvcache.quantized_kv_bytes_per_token(qw_cfg, 4, GROUP, 4)}, fp32 {kvcache.kv_bytes_per_token(qw_cfg, 4)}")
print(f"as held after {kivi_cache.get_seq_length()} tokens: per channel {kvcache.cache_bytes(kivi_cache) / (100 * kivi_cache.get_seq_length()):.0f}, "
      f"per token {kvcache.cache_bytes(per_token_cache) / (100 * per_token_cache.get_seq_length()):.0f} bytes/token")

# %% [markdown]
# - **per channel holds the keys better**: the student's keys have a channel several times larger than
#   the median one, and the per-channel cache's keys are off by about a third less
# - **accuracy does not move either way** (within a trace or two of 200): with 16-value head vectors
#   and a 4-layer student, per-token int4 already keeps the greedy traces. KIVI reports its gain at
#   2 bits, on real models whose outlier channels are far larger than this one's
# - the **bytes are the same** once quantized (a 16 × 16 block has 16 scales either way); as held, the
#   KIVI cache keeps up to 15 tokens in full precision (its unfinished block), the residual window at most 3

# %%
assert key_error["keys per channel"] < 0.8 * key_error["keys per token"]
assert outlier.max() > 3 * outlier.median()
fp32_acc, per_token_acc, kivi_acc = (acc for acc, _ in results.values())
assert per_token_acc >= fp32_acc - 0.03 and kivi_acc >= fp32_acc - 0.03 and abs(kivi_acc - per_token_acc) <= 0.02
assert fully_quantized == kvcache.quantized_kv_bytes_per_token(qw_cfg, 4, GROUP, 4)  # same bytes as per token
assert fully_quantized < 0.2 * kvcache.kv_bytes_per_token(qw_cfg, 4)

# %% [markdown]
# ## Exercise 3
# *(hard)* Make `LatentAttention` cache the latent in int8 and measure bytes and accuracy on the DeepseekV3 student.
#
# `LatentAttention` stores its latent and rope key through `cache.update(latent, k_rot, layer)`: the
# latent in the `keys` slot, the rope key in the `values` slot. So the attention itself needs no
# change: give it an int8 `IntQuantizedLayer` cache and `update` hands back the dequantized latents,
# on which the absorbed attention runs. Groups of 16 values: the whole 16-value latent, and the whole
# 8-value rope key (a group never spans two vectors).

# %%
ds_model, ds_tok = load_student("deepseek_v3")
kvcache.use_latent_attention(ds_model)
ds_cfg = ds_model.config
latent_out, latent_cache = run_with(ds_model, ds_tok, DynamicCache)
int8_out, int8_cache = run_with(ds_model, ds_tok, lambda: kvcache.quantized_cache(ds_cfg, 8, GROUP, RESIDUAL))
ds_results = {"latent fp32": score(latent_out, latent_out), "latent int8": score(int8_out, latent_out)}
ds_bytes = {label: kvcache.cache_bytes(c) / (100 * c.get_seq_length())
            for label, c in (("latent fp32", latent_cache), ("latent int8", int8_cache))}
int8_formula = kvcache.quantized_kv_bytes_per_token(ds_cfg, 8, GROUP, 4)
for label, (acc, same) in ds_results.items():
    print(f"{label:<12} accuracy {acc:.3f}, {same}/{N_EVAL} identical to fp32; cache {ds_bytes[label]:.0f} bytes/token")
print(f"formulas: fp32 {kvcache.kv_bytes_per_token(ds_cfg, 4)}, int8 fully quantized {int8_formula} bytes/token "
      f"(between flushes, up to {RESIDUAL - 1} newest tokens wait in fp32)")
int8_layer = kvcache.IntQuantizedLayer(8, GROUP)
latents = latent_cache.layers[0].keys  # layer 0's fp32 latents, straight from the stock run
latent_error = ((int8_layer._dequantize(int8_layer._quantize(latents, -1)) - latents).norm() / latents.norm()).item()
print(f"int8 round trip of layer 0's latents: relative error {latent_error:.4f}")
r1 = family.config("r1")
r1_int8 = kvcache.quantized_kv_bytes_per_token(r1, 8)
print(f"at full size, R1: bf16 {kvcache.kv_bytes_per_token(r1):,} -> int8 {r1_int8:,} bytes/token (groups of 64, "
      f"bf16 scales): {kvcache.mha_bytes_per_token(r1) / r1_int8:.0f}x less than a bf16 multi-head cache")

# %% [markdown]
# - the int8 latent cache holds about **a third** of the fp32 one: 1 byte per value plus a 4-byte
#   scale per 16 (latent) or 8 (rope key) values: 96 bytes/token against 288. The last batch ended
#   right after a flush, so the measured bytes equal the formula
# - **accuracy is unchanged** and the greedy traces are the same: int8 with one scale per vector
#   moves the latents by about 0.5%
# - at full size R1's cache goes from 70 KB to 36 KB per token in int8: MLA's 71x and int8's 1.9x
#   multiply. The decode step still builds a dequantized fp32 copy of the latents; a fused kernel
#   that reads int8 directly would avoid even that

# %%
(fp32_ds_acc, _), (int8_ds_acc, int8_same) = ds_results.values()
assert fp32_ds_acc >= 0.8 and int8_ds_acc >= fp32_ds_acc - 0.02 and int8_same >= 0.97 * N_EVAL
assert ds_bytes["latent fp32"] == kvcache.kv_bytes_per_token(ds_cfg, 4)              # fp32 cache: the MLA formula
assert int8_formula <= ds_bytes["latent int8"] < 0.45 * ds_bytes["latent fp32"]       # int8 + a short fp32 residual
assert latent_error < 0.01 and ds_bytes["latent int8"] == int8_formula  # measured after a flush: the formula
assert 1.9 < kvcache.kv_bytes_per_token(r1) / r1_int8 < 2
assert isinstance(int8_cache.layers[0], kvcache.IntQuantizedLayer) and int8_cache.layers[0]._quantized_keys[0].dtype == torch.int8
print("all answers checked")
