"""The structure model: heads and FFN neurons gated, scored, cut, budgeted, rescaled and reloaded alike."""

from __future__ import annotations

import pytest
import torch

from hf_gradprune import (
    PruningArguments,
    PruningRecord,
    PruningTrainer,
    UnitGates,
    block_flops,
    capture_targets,
    compute_unit_importance,
    get_adapter,
    prune_units,
    rescale_units,
    select_units_under_budget,
)
from hf_gradprune.core.adapters import EmptyPart, weight_dims
from hf_gradprune.structured.flops import unit_macs

from .helpers import build_tiny, fresh_reload_logits, logits, quiet_cpu_args, tiny_batch, tiny_dataset


def layout(model):
    adapter = get_adapter(model)
    heads, ffn = adapter.structure("heads"), adapter.structure("ffn")
    return (
        adapter,
        adapter.num_units(heads, model.config),
        adapter.group_size(heads, model.config),
        adapter.num_units(ffn, model.config),
    )


def uneven_cut(model) -> dict:
    """Every layer a different head count and FFN size (whole key/value groups under GQA)."""
    _, num_heads, group, num_ffn = layout(model)
    return {
        "heads": {0: list(range(group)), 2: list(range(num_heads - group))},
        "ffn": {0: [0, 4, 9], 1: list(range(0, num_ffn, 2)), 2: list(range(num_ffn - 3))},
    }


def gates_for(model, cut: dict) -> dict[str, torch.Tensor]:
    adapter = get_adapter(model)
    gates = {}
    for structure in adapter.structures:
        values = torch.ones(len(adapter.blocks(model)), adapter.num_units(structure, model.config))
        for layer, units in cut.get(structure.name, {}).items():
            values[layer, units] = 0.0
        gates[structure.name] = values
    return gates


@pytest.mark.parametrize("which", ["ffn", "both"])
def test_gated_to_zero_equals_structurally_pruned(model_type, which):
    model = build_tiny(model_type)
    cut = uneven_cut(model)
    if which == "ffn":
        cut = {"ffn": cut["ffn"]}
    batch = tiny_batch(model)
    gates = gates_for(model, cut)
    with UnitGates(model, "heads", gates["heads"]), UnitGates(model, "ffn", gates["ffn"]):
        gated = logits(model, batch)
    prune_units(model, cut)
    torch.testing.assert_close(logits(model, batch), gated, atol=1e-5, rtol=0)


def test_uneven_heads_and_ffn_reload_in_a_fresh_process(model_type, tmp_path):
    model = build_tiny(model_type)
    prune_units(model, uneven_cut(model))
    num_ffn = layout(model)[3]
    sizes = [len(PruningRecord.from_config(model.config).kept("ffn", layer, num_ffn)) for layer in range(3)]
    assert len(set(sizes)) == 3
    model.save_pretrained(tmp_path / "saved")
    batch = tiny_batch(model)
    assert torch.equal(fresh_reload_logits(tmp_path / "saved", batch, tmp_path), logits(model, batch))


def test_empty_layers_run_and_reload_in_a_fresh_process(model_type, tmp_path):
    model = build_tiny(model_type)
    _, num_heads, _, num_ffn = layout(model)
    cut = {"heads": {1: list(range(num_heads))}, "ffn": {1: list(range(num_ffn)), 2: [0, 1]}}
    with pytest.raises(ValueError, match=r"would remove every attention head of layer 1.*allow_empty=True"):
        prune_units(model, cut)
    gated = gates_for(model, cut)
    batch = tiny_batch(model)
    with UnitGates(model, "heads", gated["heads"]), UnitGates(model, "ffn", gated["ffn"]):
        expected = logits(model, batch)
    prune_units(model, cut, allow_empty=True)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(fresh_reload_logits(tmp_path / "saved", batch, tmp_path), logits(model, batch))


def test_empty_attention_keeps_the_models_own_keys():
    model = build_tiny("llama")
    keys = set(model.state_dict())
    prune_units(model, {"heads": {1: [0, 1, 2, 3]}}, allow_empty=True)
    assert isinstance(model.model.layers[1].self_attn, EmptyPart)
    assert set(model.state_dict()) == keys
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_prune_units_unknown_structure_lists_the_families_structures():
    with pytest.raises(ValueError, match=r"no prunable structure 'mlp'; it has 'heads', 'ffn'"):
        prune_units(build_tiny("bert"), {"mlp": {0: [1]}})


def test_prune_units_bad_neuron_is_a_clear_error_and_changes_nothing():
    model = build_tiny("gpt2")  # n_inner unset: 4 * n_embd = 128 neurons
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"`units_to_prune\['ffn'\]\[0\]` FFN neuron must be an int in \[0, 127\]"
    ):
        prune_units(model, {"heads": {0: [1]}, "ffn": {0: [128]}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ffn_importance_is_the_gradient_of_the_neuron_gate():
    model = build_tiny("bert")
    batches = [tiny_batch(model, seed=s) for s in range(3)]
    scores = compute_unit_importance(model, batches, ("ffn",), accumulate="fisher", show_progress=False)[
        "ffn"
    ]
    expected = torch.zeros(3, 37)
    for batch in batches:
        taken: list[torch.Tensor] = []
        hooks = [
            layer.output.dense.register_forward_pre_hook(lambda _m, args, kept=taken: kept.append(args[0]))
            for layer in model.bert.encoder.layer
        ]
        grads = torch.autograd.grad(model(**batch).loss, taken)  # dL/da for each down projection input a
        for handle in hooks:
            handle.remove()
        for i, (grad, act) in enumerate(zip(grads, taken, strict=True)):
            expected[i] += (grad * act).sum(
                dim=(0, 1)
            ).detach() ** 2  # dL/dgate = sum over tokens of a * dL/da
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-10)


def test_ffn_cut_remaps_optimizer_state_of_kept_neurons():
    model = build_tiny("llama").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**tiny_batch(model)).loss.backward()
    optimizer.step()
    up = model.model.layers[0].mlp.up_proj
    old = optimizer.state[up.weight]["exp_avg"].clone()
    prune_units(model, {"ffn": {0: [0, 5, 36]}}, optimizer=optimizer)
    kept = [n for n in range(37) if n not in (0, 5, 36)]
    assert torch.equal(optimizer.state[up.weight]["exp_avg"], old[kept])
    assert model.model.layers[0].mlp.intermediate_size == 34


def test_block_flops_count_every_unit():
    model = build_tiny("llama")  # hidden 32, 4 heads of 8 in 2 kv groups, 37 neurons
    costs = unit_macs(model, seq_len=10)
    group_macs = 32 * 8 * 2 + 32 * 8 + 32 * 8 + 32 * 8 * 2 + 2 * 10 * 8 * 2  # q, k, v, o, scores+context
    assert costs == {"heads": group_macs, "ffn": 3 * 32}
    assert block_flops(model, 10) == 2 * 10 * 3 * (2 * group_macs + 37 * 3 * 32)


def test_budget_selection_reaches_the_flops_target():
    model = build_tiny("bert")
    batches = [tiny_batch(model, seed=s) for s in range(2)]
    scores = compute_unit_importance(model, batches, ("heads", "ffn"), show_progress=False)
    dense = block_flops(model, 64)
    plan = select_units_under_budget(scores, unit_macs(model, 64), remove_cost=dense / 2 / (2 * 64))
    prune_units(model, plan)
    assert 0.48 <= block_flops(model, 64) / dense <= 0.5


def test_budget_selection_removes_neurons_in_blocks_of_the_lowest_scored():
    scores = {"heads": torch.tensor([[5.0, 6.0]] * 2), "ffn": torch.arange(20.0).reshape(2, 10).flip(1)}
    plan = select_units_under_budget(scores, {"heads": 8.0, "ffn": 1.0}, 7, multiple_of={"ffn": 4})
    # Layer 0 (scores 9..0) loses its remainder (the two lowest), then the next four; the last four stay
    # (a layer keeps one); heads cost 8 and would overshoot; layer 1's remainder closes the gap: 2 + 4 + 2.
    assert plan == {"heads": {}, "ffn": {0: [4, 5, 6, 7, 8, 9], 1: [8, 9]}}
    with pytest.raises(ValueError, match=r"`multiple_of\['ffn'\]` must be >= 1, got 0"):
        select_units_under_budget(scores, {"heads": 8.0, "ffn": 1.0}, 7, multiple_of={"ffn": 0})


def test_budget_selection_that_cannot_be_met_is_a_clear_error():
    scores = {"heads": torch.ones(1, 2), "ffn": torch.ones(1, 3)}
    with pytest.raises(ValueError, match=r"Cannot remove 100 of cost: only 12 can go"):
        select_units_under_budget(scores, {"heads": 10.0, "ffn": 1.0}, remove_cost=100)


def test_mask_tuning_brings_the_pruned_model_closer_to_the_original():
    model = build_tiny("bert")
    batches = [tiny_batch(model, batch_size=8, seed=s) for s in range(4)]
    original = [logits(model, b) for b in batches]
    keys = set(model.state_dict())
    targets = capture_targets(model, batches, show_progress=False)
    prune_units(
        model, {"heads": {0: [0, 1], 1: [2]}, "ffn": {layer: list(range(0, 37, 2)) for layer in range(3)}}
    )
    error = sum(float((logits(model, b) - o).square().sum()) for b, o in zip(batches, original, strict=True))
    report = rescale_units(model, batches, targets, show_progress=False)
    tuned = sum(float((logits(model, b) - o).square().sum()) for b, o in zip(batches, original, strict=True))
    assert report["prune/mask_tuning_layers"] == 6 and report["prune/mask_tuning_skipped"] == 0
    assert tuned < 0.8 * error
    assert set(model.state_dict()) == keys  # scales folded into the weights


def test_mask_tuning_scales_only_the_output_layer_columns():
    model = build_tiny("gpt2")
    batches = [tiny_batch(model, batch_size=4, seed=s) for s in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = capture_targets(model, batches, show_progress=False)
    prune_units(model, {"ffn": {1: list(range(64))}})
    cut = {k: v.clone() for k, v in model.state_dict().items()}
    rescale_units(model, batches, targets, show_progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, cut[k])}
    # From the cut on (layer 1's FFN, then layer 2), never before it.
    assert changed == {f"transformer.h.{name}.c_proj.weight" for name in ("1.mlp", "2.attn", "2.mlp")}
    projection = model.transformer.h[1].mlp.c_proj
    ratio = projection.weight / cut["transformer.h.1.mlp.c_proj.weight"]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one scale per neuron (Conv1D: rows)
    assert weight_dims(projection) == (1, 0) and before.keys() == cut.keys()


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_trainer_prunes_to_a_flops_budget_with_mask_tuning_and_reloads(model_type, tmp_path):
    model = build_tiny(model_type).train()
    dense = block_flops(model, 32)
    trainer = PruningTrainer(
        model=model,
        args=quiet_cpu_args(tmp_path / "out", max_steps=3),
        train_dataset=tiny_dataset(causal=model_type == "llama"),
        pruning_args=PruningArguments(
            target_flops_ratio=0.5,
            flops_seq_len=32,
            prune_rounds=1,  # one cut: within one neuron of the target (rounds may overshoot on tiny models)
            mask_tuning=True,
            measure_speedup=True,
            importance_batches=2,
            prune_ffn_multiple_of=8,
        ),
    )
    trainer.train()
    ratio = block_flops(trainer.model, 32) / dense
    assert 0.45 <= ratio <= 0.5
    assert all(
        (37 - len(gone)) % 8 == 0 for gone in PruningRecord.from_config(model.config).pruned["ffn"].values()
    )
    entry = next(e for e in trainer.state.log_history if "prune/flops_ratio" in e)
    assert entry["prune/flops_ratio"] == pytest.approx(ratio)
    assert entry["prune/mask_tuning_divergence_after"] <= entry["prune/mask_tuning_divergence_before"]
    assert entry["prune/speedup"] > 0 and trainer.pruning_callback.speedup == entry["prune/speedup"]
    record = PruningRecord.from_config(trainer.model.config)
    assert record.pruned.get("ffn") and set(record.pruned) <= {"heads", "ffn"}
    trainer.save_model()
    batch = tiny_batch(trainer.model)
    reloaded = fresh_reload_logits(tmp_path / "out", batch, tmp_path)
    assert torch.equal(reloaded, logits(trainer.model.eval(), batch))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "FFN neurons kept" in card and "Block FLOPs" in card and "Measured inference speed-up" in card


def test_prune_in_rounds_scores_every_round_on_the_model_the_rounds_before_left():
    from hf_gradprune import prune_in_rounds

    model = build_tiny("bert")
    batches = [tiny_batch(model, seed=s) for s in range(2)]
    seen = []

    def choose(importance, index):
        seen.append(importance["ffn"].isnan().sum(dim=1).tolist())  # neurons already gone, per layer
        return {"ffn": {layer: [index * 3, index * 3 + 1, index * 3 + 2] for layer in range(3)}}

    report = prune_in_rounds(model, batches, ("ffn",), choose, rounds=3, show_progress=False)
    assert seen == [[0, 0, 0], [3, 3, 3], [6, 6, 6]]
    assert report["units"] == {"ffn": {layer: list(range(9)) for layer in range(3)}}
    assert PruningRecord.from_config(model.config).pruned["ffn"] == report["units"]["ffn"]


def test_prune_to_flops_in_rounds_reaches_the_target_on_the_real_minilm(review_batches):
    from hf_gradprune import prune_to_flops

    from .helpers import load_minilm

    model = load_minilm()
    dense = block_flops(model, 64)
    report = prune_to_flops(model, review_batches(2, 8), 0.5, seq_len=64, rounds=4, show_progress=False)
    assert 0.49 <= block_flops(model, 64) / dense <= 0.5
    assert set(report["units"]) == {"heads", "ffn"}
    # The default keeps kernel-friendly widths: every layer a multiple of 64 of its 1536 neurons.
    assert {(1536 - len(gone)) % 64 for gone in report["units"]["ffn"].values()} == {0}
