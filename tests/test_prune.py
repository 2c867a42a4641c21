"""lowmem_course.prune: exact sparsity, masks that survive training, pruned modules equal on kept units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem_course import family, measure, prune, steps


def tiny_model(name: str = "r1-distill-qwen-1.5b") -> nn.Module:
    return family.build(family.tiny(name), seed=0).eval()


def calibration(seq: int = 24, batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = steps.random_batch(family.TINY_VOCAB, batch, seq, seed=seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_unstructured_mask_prunes_exactly_the_lowest_scores():
    scores = torch.randperm(96).float().reshape(8, 12)
    mask = prune.unstructured_mask(scores, 0.25, per="layer")
    assert mask.dtype == torch.bool and mask.shape == (8, 12)
    assert int((~mask).sum()) == 24
    assert set(scores[~mask].tolist()) == set(range(24))  # the 24 smallest, nothing else

    rows = prune.unstructured_mask(scores, 0.5, per="row")
    assert (~rows).sum(dim=1).tolist() == [6] * 8
    for row, keep in zip(scores, rows):
        assert row[~keep].max() < row[keep].min()


def test_semi_structured_mask_keeps_two_largest_of_every_four():
    scores = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    mask = prune.semi_structured_mask(scores)
    blocks, keep = scores.reshape(-1, 4), mask.reshape(-1, 4)
    assert keep.sum(dim=1).tolist() == [2] * 24
    lowest_kept = blocks.where(keep, float("inf")).min(dim=1).values
    highest_dropped = blocks.where(~keep, -float("inf")).max(dim=1).values
    assert (lowest_kept > highest_dropped).all()


@pytest.mark.parametrize("call", [
    lambda: prune.unstructured_mask(torch.ones(2, 4), 1.0),
    lambda: prune.unstructured_mask(torch.ones(2, 4), 0.5, per="column"),
    lambda: prune.semi_structured_mask(torch.ones(2, 6)),
    lambda: prune.wanda_scores(torch.ones(2, 4), torch.ones(3)),
    lambda: prune.prune_unstructured(tiny_model(), "wanda", 0.5, calibration=None),
    lambda: prune.prune_unstructured(tiny_model(), "random", 0.5),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_wanda_scores_are_weight_times_input_norm():
    weight = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    assert prune.wanda_scores(weight, torch.tensor([10.0, 0.5])).tolist() == [[10.0, 1.0], [30.0, 2.0]]


def test_input_norms_are_exact_and_skip_padding():
    model = tiny_model()
    batch = calibration()
    norms = prune.input_norms(model, batch)
    # q_proj's input is the first layer's normalised embeddings: compute it by hand.
    layer = model.model.layers[0]
    normed = layer.input_layernorm(model.model.embed_tokens(batch["input_ids"]))
    x = normed.reshape(-1, layer.self_attn.q_proj.in_features)
    torch.testing.assert_close(norms["model.layers.0.self_attn.q_proj"], x.norm(dim=0))
    assert len(norms) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers

    # Padding tokens appended on the right (causal model) must not change any norm.
    padded = {"input_ids": torch.cat([batch["input_ids"], batch["input_ids"][:, :5]], dim=1)}
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(3, 5, dtype=torch.long)], dim=1)
    for name, norm in prune.input_norms(model, padded).items():
        torch.testing.assert_close(norm, norms[name])


@pytest.mark.parametrize("method,pattern,sparsity,per", [
    ("magnitude", "unstructured", 0.3, "layer"), ("wanda", "unstructured", 0.7, "layer"),
    ("wanda", "unstructured", 0.3, "row"), ("magnitude", "2:4", 0.5, "layer"),
])
def test_prune_unstructured_reaches_exact_sparsity_per_layer(method, pattern, sparsity, per):
    model = tiny_model()
    masks = prune.prune_unstructured(model, method, sparsity, calibration(), pattern=pattern, per=per)
    for name, module in prune.prunable_linears(model).items():
        out_f, in_f = module.weight.shape
        expected = out_f * int(in_f * sparsity) if per == "row" else int(out_f * in_f * sparsity)
        assert int((module.weight == 0).sum()) == expected, name
        assert torch.equal(module.weight_mask.bool(), masks[name])


def test_masks_hold_through_optimizer_steps_and_make_permanent():
    model = tiny_model().train()
    masks = prune.prune_unstructured(model, "magnitude", 0.5)
    name = "model.layers.1.mlp.up_proj"
    module = prune.prunable_linears(model)[name]
    before = module.weight_orig.detach().clone()
    opt = measure.make_optimizer(model, "adamw", lr=1e-2)
    for seed in range(3):
        steps.train_step(model, opt, steps.random_batch(family.TINY_VOCAB, 2, 16, seed=seed))
    assert int((module.weight == 0).sum()) == masks[name].numel() // 2
    assert torch.equal(module.weight == 0, ~masks[name])
    assert not torch.equal(module.weight_orig[masks[name]], before[masks[name]])  # kept weights trained

    prune.make_permanent(model)
    assert isinstance(module.weight, nn.Parameter) and not hasattr(module, "weight_mask")
    assert prune.zero_fraction(prune.prunable_linears(model).values()) == 0.5


def test_masked_dense_weights_cost_more_bytes_not_fewer():
    model = tiny_model()
    dense = prune.parameter_bytes(model)
    linear_bytes = sum(m.weight.numel() * 4 for m in prune.prunable_linears(model).values())
    prune.prune_unstructured(model, "magnitude", 0.5)
    # weight_orig (fp32 parameter) + weight_mask (fp32 buffer); the recomputed weight is an attribute.
    assert prune.parameter_bytes(model) == dense + linear_bytes
    prune.make_permanent(model)
    assert prune.parameter_bytes(model) == dense


def test_storage_bytes_of_dense_csr_csc_and_coo():
    dense = torch.zeros(64, 128)
    dense[:, ::2] = 1.0  # 50% zeros
    assert measure.storage_bytes(dense) == 64 * 128 * 4
    nnz = 64 * 64
    assert measure.storage_bytes(dense.to_sparse_csr().clone()) == nnz * 4 + 65 * 8 + nnz * 8
    assert measure.storage_bytes(dense.to_sparse_csc().clone()) == nnz * 4 + 129 * 8 + nnz * 8
    # to_sparse_csr's column indices are a view of the 2-row COO indices it converted through: all held
    assert measure.storage_bytes(dense.to_sparse_csr()) == nnz * 4 + 65 * 8 + 2 * nnz * 8
    assert measure.storage_bytes(dense.to_sparse()) == nnz * 4 + 2 * nnz * 8


def test_slice_linear_equals_original_on_kept_units():
    torch.manual_seed(0)
    linear = nn.Linear(10, 6)
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4, 9])
    small = prune.slice_linear(linear, out_index=rows, in_index=cols)
    assert small.weight.shape == (3, 4) and small.bias.shape == (3,)
    x = torch.randn(5, 10)
    x_kept_only = torch.zeros_like(x)
    x_kept_only[:, cols] = x[:, cols]
    torch.testing.assert_close(small(x[:, cols]), linear(x_kept_only)[:, rows])


def test_prune_mlp_channels_matches_a_masked_original():
    model = tiny_model()
    batch = calibration()
    mlp = model.model.layers[2].mlp
    width = mlp.down_proj.in_features
    x = torch.randn(4, model.config.hidden_size)
    gate, up, down = (m.weight.detach().clone() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    widths = prune.prune_mlp_channels(model, 0.75, batch)
    assert set(widths.values()) == {round(0.75 * width)}
    assert mlp.gate_proj.weight.shape == (round(0.75 * width), model.config.hidden_size)
    kept = torch.tensor([i for i in range(width) if (gate[i] == mlp.gate_proj.weight).all(dim=1).any()])
    assert kept.numel() == round(0.75 * width)
    h = nn.functional.silu(x @ gate[kept].T) * (x @ up[kept].T)
    torch.testing.assert_close(mlp(x), h @ down[:, kept].T)


def test_prune_heads_keeps_kv_heads_and_equals_original_with_heads_zeroed():
    model = tiny_model()
    batch = calibration()
    attn = model.model.layers[0].self_attn
    groups, d = attn.num_key_value_groups, attn.head_dim
    q_before = attn.q_proj.weight.detach().clone()
    k_before = attn.k_proj.weight.detach().clone()
    heads = prune.prune_heads(model, 2, batch)
    assert set(heads.values()) == {2 * model.config.num_key_value_heads}
    assert attn.q_proj.weight.shape == (2 * d, model.config.hidden_size)
    assert attn.o_proj.weight.shape == (model.config.hidden_size, 2 * d)
    assert torch.equal(attn.k_proj.weight, k_before)
    kept = [h for h in range(groups)
            if any(torch.equal(q_before[h * d:(h + 1) * d], attn.q_proj.weight[j * d:(j + 1) * d]) for j in range(2))]
    assert len(kept) == 2
    assert model(**batch).logits.shape == (3, 24, family.TINY_VOCAB)


def test_drop_layers_renumbers_and_generates():
    model = tiny_model()
    influence = prune.layer_influence(model, calibration())
    assert influence.shape == (4,) and (influence > 0).all()
    keep_modules = [model.model.layers[i] for i in (0, 2, 3)]
    prune.drop_layers(model, [1])
    assert list(model.model.layers) == keep_modules
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3 and len(model.config.layer_types) == 3
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    with pytest.raises(ValueError):
        prune.drop_layers(model, [0, 1, 2])


def test_prune_experts_keeps_most_chosen_and_equals_original_routing_among_them():
    model = tiny_model("r1")
    batch = calibration()
    counts = prune.expert_counts(model, batch)
    top_k = model.config.num_experts_per_tok
    tokens = batch["input_ids"].numel()
    assert set(counts) == {"model.layers.1.mlp", "model.layers.2.mlp"}
    assert all(int(c.sum()) == tokens * top_k for c in counts.values())
    moe = model.model.layers[1].mlp
    gate_up = moe.experts.gate_up_proj.detach().clone()
    expected = counts["model.layers.1.mlp"].topk(4).indices.sort().values
    before = prune.parameter_bytes(model)
    prune.prune_experts(model, 4, counts)
    assert torch.equal(moe.experts.gate_up_proj, gate_up[expected])
    assert moe.gate.weight.shape == (4, model.config.hidden_size) and moe.gate.e_score_correction_bias.shape == (4,)
    per_expert = (gate_up[0].numel() + moe.experts.down_proj[0].numel() + model.config.hidden_size) * 4 + 4
    assert before - prune.parameter_bytes(model) == 2 * 4 * per_expert  # 2 MoE layers x 4 experts
    assert model(**batch).logits.shape == (3, 24, family.TINY_VOCAB)
    with pytest.raises(ValueError):
        prune.prune_experts(model, 1, counts)


def test_wanda_selection_matches_torchao_wanda_sparsifier():
    """torchao's WandaSparsifier compares per layer (or per 4-block for 2:4) like ``per="layer"``.

    Its ``PerChannelNormObserver`` accumulates the *squared* L2 norm and torchao (0.18) multiplies
    ``|W|`` by that, not by the norm as in the paper, so the same masks come from our selection
    fed with ``input_norm ** 2``.
    """
    wanda = pytest.importorskip("torchao.sparsity.wanda", reason="torchao is not installed")
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16) * torch.linspace(0.1, 3.0, 16)
    norm = x.reshape(-1, 16).norm(dim=0)
    for block, select in ((None, lambda s: prune.unstructured_mask(s, 0.5, per="layer")),
                          (4, prune.semi_structured_mask)):
        model = nn.Sequential(nn.Linear(16, 8, bias=False))
        weight = model[0].weight.detach().clone()
        sparsifier = wanda.WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=block)
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
        model(x)
        sparsifier.step()
        sparsifier.squash_mask()
        assert torch.equal(model[0].weight != 0, select(prune.wanda_scores(weight, norm**2)))


def test_recover_with_lora_merges_back_to_the_pruned_shapes():
    model = tiny_model()
    prune.prune_mlp_channels(model, 0.5, calibration())
    shapes = {name: p.shape for name, p in model.named_parameters()}
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = steps.random_batch(family.TINY_VOCAB, 2, 16, seed=3)
    adapted = {f"{name}.weight" for name in family.lora_modules(model)}  # the estimator's targets
    recovered = prune.recover_with_lora(model, [(batch, batch)] * 2, rank=4, lr=1e-2)
    assert {name: p.shape for name, p in recovered.named_parameters()} == shapes
    changed = {name for name, p in recovered.named_parameters() if not torch.equal(p, original[name])}
    assert changed == adapted and len(adapted) == 7 * 4  # q, k, v, o, gate, up, down of each of 4 layers
    assert not any("lora" in name for name, _ in recovered.named_parameters())


def test_pruned_config_counts_what_the_pruned_model_holds():
    cfg = family.tiny("r1-distill-qwen-1.5b")
    model = family.build(family.tiny("r1-distill-qwen-1.5b"), seed=0).eval()  # drop_layers edits its config
    batch = calibration()
    prune.prune_heads(model, 4, batch)  # 4 of 6 heads per KV head
    prune.prune_mlp_channels(model, 0.5, batch)
    prune.drop_layers(model, prune.layer_influence(model, batch).argsort()[:1].tolist())
    expected = family.count_parameters(prune.pruned_config(cfg, heads=4 / 6, mlp=0.5, layers=0.75)).total
    assert sum(p.numel() for p in model.parameters()) == expected

    r1 = family.tiny("r1")
    moe = family.build(r1, seed=0).eval()
    prune.prune_experts(moe, 4, prune.expert_counts(moe, batch))
    pruned = family.count_parameters(prune.pruned_config(r1, experts=0.5)).total
    assert sum(p.numel() for p in moe.parameters()) == pruned
    with pytest.raises(ValueError):
        prune.pruned_config(r1, mlp=0.5)
    with pytest.raises(ValueError):
        prune.pruned_config(cfg, layers=0.0)


def test_prune_unstructured_defaults_to_the_papers_comparison_groups():
    assert prune.DEFAULT_GROUP == {"magnitude": "layer", "wanda": "row"}
    batch = calibration()
    wanda, magnitude = tiny_model(), tiny_model()
    wanda_masks = prune.prune_unstructured(wanda, "wanda", 0.5, batch)
    magnitude_masks = prune.prune_unstructured(magnitude, "magnitude", 0.5)
    for name, module in prune.prunable_linears(wanda).items():
        in_f = module.weight.shape[1]
        assert (~wanda_masks[name]).sum(dim=1).tolist() == [in_f // 2] * module.weight.shape[0], name
    expected = prune.unstructured_mask(prune.magnitude_scores(tiny_model().model.layers[0].mlp.up_proj.weight), 0.5)
    assert torch.equal(magnitude_masks["model.layers.0.mlp.up_proj"], expected)


def test_calibration_positions_ignore_left_padding():
    """A left-padded batch must give the same statistics as the same rows right-padded."""
    model = tiny_model()
    ids = steps.random_batch(family.TINY_VOCAB, 2, 12, seed=4)
    lengths = [12, 7]
    right = {"input_ids": ids.clone(), "attention_mask": torch.zeros_like(ids)}
    left = {"input_ids": torch.zeros_like(ids), "attention_mask": torch.zeros_like(ids)}
    for i, n in enumerate(lengths):
        right["attention_mask"][i, :n] = 1
        left["input_ids"][i, 12 - n:] = ids[i, :n]
        left["attention_mask"][i, 12 - n:] = 1
    for name, norm in prune.input_norms(model, left).items():
        torch.testing.assert_close(norm, prune.input_norms(model, right)[name], msg=name)


def test_input_grams_and_relative_output_error_are_exact():
    model = tiny_model()
    batch = calibration()
    grams = prune.input_grams(model, batch)
    norms = prune.input_norms(model, batch)
    name = "model.layers.1.self_attn.o_proj"
    torch.testing.assert_close(grams[name].diagonal(), norms[name] ** 2)
    captured = []
    module = prune.prunable_linears(model)[name]
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    x, w = captured[0], module.weight.detach()
    mask = prune.unstructured_mask(prune.wanda_scores(w, norms[name]), 0.5, per="row")
    direct = ((x @ (w * mask).T - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert prune.relative_output_error(w, mask, grams[name]) == pytest.approx(direct, rel=1e-4)
    assert prune.relative_output_error(w, torch.ones_like(mask), grams[name]) == 0.0


def test_generated_calibration_keeps_the_generated_ids():
    """The student's own traces, token for token: <think> and <eos> kept, right-padded."""
    from lowmem_course.reasoning import sample
    from lowmem_course.student import load_student

    model, tok = load_student("qwen2")
    problems = sample(6, seed=3, split="train")
    batch = prune.generated_calibration(model, tok, [p.prompt for p in problems])
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].dtype == torch.long
    for ids, mask, problem in zip(batch["input_ids"], batch["attention_mask"], problems):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tok.pad_token_id).all()
        tokens = tok.convert_ids_to_tokens(ids[:n].tolist())
        assert tokens[0] == "<bos>" and tokens[-1] == "<eos>" and "<think>" in tokens and "</think>" in tokens
        assert tok.decode(ids[:n], skip_special_tokens=True) == problem.text  # the student solves its training problems
    with pytest.raises(ValueError):
        prune.generated_calibration(model, tok, [])


def test_prune_unstructured_only_prunes_the_modules_the_filter_names():
    model = tiny_model()
    masks = prune.prune_unstructured(model, "wanda", 0.5, calibration(), only="mlp")
    mlp = {name for name in prune.prunable_linears(model) if ".mlp." in name}
    assert set(masks) == mlp and len(mlp) == 3 * model.config.num_hidden_layers  # gate, up, down
    for name, module in prune.prunable_linears(model).items():
        assert (module.weight == 0).float().mean().item() == (0.5 if name in mlp else 0.0)
    with pytest.raises(ValueError, match=r"no decoder nn\.Linear of Qwen2ForCausalLM has a name containing 'conv'"):
        prune.prune_unstructured(tiny_model(), "magnitude", 0.5, only="conv")
