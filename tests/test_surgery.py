import pytest
import torch

from hf_gradprune import PruningRecord, get_adapter, prune_heads
from hf_gradprune.core.adapters import weight_dims
from hf_gradprune.core.masks import apply_masks, get_masks

from .helpers import build_tiny, logits, removable, tiny_batch


def test_prune_heads_twice_composes(model_type):
    first, second = removable(model_type)
    once, twice = build_tiny(model_type), build_tiny(model_type)
    union = {
        layer: sorted(set(first.get(layer, [])) | set(second.get(layer, []))) for layer in {*first, *second}
    }
    prune_heads(once, union)
    prune_heads(twice, first)
    prune_heads(twice, second)
    batch = tiny_batch(once)
    torch.testing.assert_close(logits(twice, batch), logits(once, batch), atol=1e-5, rtol=0)
    assert PruningRecord.from_config(twice.config).pruned_heads == union


def test_prune_heads_updates_shapes_and_head_counts(model_type):
    model = build_tiny(model_type)
    adapter = get_adapter(model)
    first, _ = removable(model_type)
    prune_heads(model, first)
    heads = adapter.structure("heads")
    head_dim, group = adapter.unit_width(heads, model.config), adapter.group_size(heads, model.config)
    for layer in range(3):
        kept = 4 - len(first.get(layer, []))
        output = adapter.module(model, layer, heads.output)
        assert output.weight.shape[weight_dims(output)[1]] == kept * head_dim
        if model_type != "gpt2":
            assert adapter.module(model, layer, heads.rows[1].path).out_features == kept // group * head_dim
        owner = adapter.module(model, layer, heads.owner)
        for attr in heads.count_attrs:
            assert getattr(owner, attr) == kept
        for attr in heads.width_attrs:
            assert getattr(owner, attr) == kept * head_dim


def test_prune_heads_gqa_keeps_head_dim_and_group_ratio():
    model = build_tiny("qwen2")  # q/k/v biases too
    prune_heads(model, {0: [0, 1]})
    attention = model.model.layers[0].self_attn
    assert attention.head_dim == 8 and attention.num_key_value_groups == 2
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.q_proj.bias.shape[0]) == (
        16,
        8,
        16,
    )


def test_prune_heads_keeps_dtype_device_and_requires_grad():
    model = build_tiny("bert").to(torch.bfloat16)
    model.bert.encoder.layer[0].attention.self.value.weight.requires_grad_(False)
    prune_heads(model, {0: [1]})
    attention = model.bert.encoder.layer[0].attention
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not attention.self.value.weight.requires_grad and attention.self.query.weight.requires_grad


def test_prune_heads_generate_still_runs_on_gqa_decoder():
    model = build_tiny("llama")
    prune_heads(model, {0: [0, 1], 2: [2, 3]})
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize(
    ("heads", "match"),
    [
        ({0: [4]}, r"`heads_to_prune\[0\]` attention head must be an int in \[0, 3\].*got 4"),
        ({0: [-1]}, r"`heads_to_prune\[0\]` attention head must be an int in \[0, 3\].*got -1"),
        ({3: [0]}, r"`heads_to_prune` layer must be an int in \[0, 2\], got 3"),
        ({1: [0, 1, 2, 3]}, r"would remove every attention head of layer 1"),
    ],
)
def test_prune_heads_bad_input_is_a_clear_error_and_changes_nothing(heads, match):
    model = build_tiny("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_heads(model, {2: [0], **heads})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert PruningRecord.from_config(model.config).pruned_heads == {}


def test_prune_heads_every_head_over_two_calls_is_an_error():
    model = build_tiny("bert")
    prune_heads(model, {1: [0, 1, 2]})
    with pytest.raises(ValueError, match=r"would remove every attention head of layer 1 \(1 left\)"):
        prune_heads(model, {1: [3]})


def test_prune_heads_gqa_partial_group_is_an_error():
    with pytest.raises(ValueError, match=r"whole key/value groups of 2 query heads.*groups \[0\]"):
        prune_heads(build_tiny("mistral"), {0: [1]})


def test_prune_heads_already_removed_warns_and_is_ignored():
    model = build_tiny("bert")
    prune_heads(model, {0: [1]})
    with pytest.warns(UserWarning, match=r"already removed are ignored: \[\(0, 1\)\]"):
        prune_heads(model, {0: [1, 2]})
    assert PruningRecord.from_config(model.config).pruned_heads == {0: [1, 2]}


def test_prune_heads_remaps_optimizer_state_of_kept_rows():
    model = build_tiny("bert").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for seed in range(2):
        model(**tiny_batch(model, seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    query = model.bert.encoder.layer[0].attention.self.query
    old_state = {k: v.clone() for k, v in optimizer.state[query.weight].items()}
    prune_heads(model, {0: [1]}, optimizer=optimizer)
    kept_rows = [*range(0, 8), *range(16, 32)]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert len(optimizer.state) == len(list(model.parameters()))
    new_state = optimizer.state[query.weight]
    torch.testing.assert_close(new_state["exp_avg"], old_state["exp_avg"][kept_rows], atol=0, rtol=0)
    torch.testing.assert_close(new_state["step"], old_state["step"])
    model(**tiny_batch(model, seed=3)).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_prune_heads_cuts_weight_masks_with_their_weights(model_type):
    model = build_tiny(model_type)
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(0)
    masks = {
        n: torch.rand(p.shape, generator=generator) > 0.5
        for n, p in model.named_parameters()
        if p.dim() == 2 and ".0." in n and "embed" not in n and "wte" not in n and "wpe" not in n
    }
    apply_masks(model, masks)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune_heads(model, removable(model_type)[0])
    params = dict(model.named_parameters())
    cut = get_masks(model)
    assert cut.keys() == masks.keys()
    for name, mask in cut.items():
        assert mask.shape == params[name].shape
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0
    output = adapter.module(model, 0, adapter.structure("heads").output)
    out_name = next(n for n, p in params.items() if p is output.weight)
    removed = removable(model_type)[0][0]
    kept = torch.tensor([h * 8 + i for h in range(4) if h not in removed for i in range(8)])
    in_dim = 0 if model_type == "gpt2" else 1  # Conv1D stores (in, out)
    assert torch.equal(cut[out_name], masks[out_name].index_select(in_dim, kept))
    assert torch.equal(params[out_name].detach(), reference[out_name].index_select(in_dim, kept))
