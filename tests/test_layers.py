"""Whole layers: gates on each block's residual branch, their importance, and surgery that deletes blocks
so that plain transformers loads the result."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import HfArgumentParser, Qwen2Config, Qwen2ForCausalLM, Trainer

from hf_gradprune import (
    GradientPruningCallback,
    PruningArguments,
    PruningRecord,
    PruningTrainer,
    export_vanilla,
    flops_ratio,
    load_pruned,
    prune_to_flops,
    prune_units,
    save_pruned,
)
from hf_gradprune.core.adapters import get_adapter
from hf_gradprune.core.masks import apply_masks, get_masks
from hf_gradprune.structured.gates import LayerGates
from hf_gradprune.structured.importance import compute_layer_importance
from hf_gradprune.structured.selection import select_units_under_budget
from hf_gradprune.structured.surgery import prune_layers

from .helpers import (
    DECODER,
    build_tiny,
    fresh_reload_logits,
    is_causal_lm,
    logits,
    quiet_cpu_args,
    tiny_batch,
    tiny_dataset,
)
from .test_export import plain_logits


def _gated_logits(model, batch, off: list[int]) -> torch.Tensor:
    gates = torch.ones(len(get_adapter(model).blocks(model)))
    gates[off] = 0.0
    with LayerGates(model, gates):
        return logits(model, batch)


def test_prune_layers_equals_the_model_with_those_layer_gates_at_zero(model_type):
    model = build_tiny(model_type)
    batch = tiny_batch(model)
    expected = _gated_logits(model, batch, [1])
    assert not torch.allclose(expected, logits(model, batch), atol=1e-3)  # the layer mattered
    record = prune_layers(model, [1])
    assert torch.allclose(logits(model, batch), expected, atol=1e-5)
    assert record.removed_layers == [1] and model.config.num_hidden_layers == 2
    assert len(get_adapter(model).blocks(model)) == 2


def test_prune_layers_loads_with_plain_from_pretrained_in_a_fresh_process(model_type, tmp_path):
    model = build_tiny(model_type)
    prune_layers(model, [0, 2] if model_type != "gpt2" else [2])
    batch = tiny_batch(model)
    expected = logits(model, batch)
    causal = is_causal_lm(model)
    got, report = plain_logits(export_vanilla(model, tmp_path / "vanilla"), model, batch, tmp_path, causal)
    assert torch.allclose(got, expected, atol=1e-5)
    depth = next(
        report["config"][k] for k in ("num_hidden_layers", "n_layers", "n_layer") if k in report["config"]
    )
    assert depth == 1 + (model_type == "gpt2")
    if causal:
        assert report["generated"] == 5  # the cache has one slot per kept layer


def test_prune_layers_renumbers_the_cache_slots_so_generate_matches_a_full_recompute():
    torch.manual_seed(0)
    kinds = ["full_attention", "sliding_attention", "full_attention"]
    config = Qwen2Config(**DECODER, layer_types=kinds, use_sliding_window=True, sliding_window=3)
    model = Qwen2ForCausalLM(config).eval()
    prune_layers(model, [0])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1]
    prompt = tiny_batch(model)["input_ids"][:1]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_prune_layers_moves_the_recorded_units_with_their_layers_and_reloads(tmp_path):
    model = build_tiny("llama")
    prune_units(model, {"heads": {2: [0, 1]}, "ffn": {0: [3, 4], 1: [5]}})
    record = prune_layers(model, [1])
    assert record.pruned == {"heads": {1: [0, 1]}, "ffn": {0: [3, 4]}}
    record = prune_units(model, {"ffn": {1: [7]}})  # layer 1 is now the original layer 2
    assert record.pruned["ffn"] == {0: [3, 4], 1: [7]}
    assert model.model.layers[1].mlp.down_proj.in_features == 36
    again = prune_layers(copy.deepcopy(model), [0])
    assert again.removed_layers == [0, 1] and again.pruned == {"heads": {0: [0, 1]}, "ffn": {0: [7]}}
    batch = tiny_batch(model)
    save_pruned(model, tmp_path / "saved")
    assert torch.equal(fresh_reload_logits(tmp_path / "saved", batch, tmp_path), logits(model, batch))


def test_prune_layers_takes_the_masks_and_the_optimizer_state_of_removed_layers_away(tmp_path):
    model = build_tiny("bert").train()
    blocks = model.bert.encoder.layer
    apply_masks(
        model,
        {f"bert.encoder.layer.{i}.intermediate.dense.weight": torch.rand(37, 32) > 0.5 for i in range(3)},
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batch = tiny_batch(model)
    model(**batch).loss.backward()
    optimizer.step()
    removed = {id(p) for p in blocks[0].parameters()}
    record = prune_layers(model, [0], optimizer=optimizer)
    kept = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not kept & removed and not {id(p) for p in optimizer.state} & removed
    assert kept == {id(p) for p in model.parameters()}
    assert record.weight_masks == 2 and sorted(get_masks(model)) == [
        f"bert.encoder.layer.{i}.intermediate.dense.weight" for i in range(2)
    ]
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.step()
    masked = blocks[0].intermediate.dense
    assert bool((masked.weight[~masked.weight_mask] == 0).all())
    save_pruned(model, tmp_path / "saved")
    model.eval()
    assert torch.equal(load_pruned(tmp_path / "saved")(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        ([3], ValueError, r"`layers` must hold ints in \[0, 2\] \(3 layers\), got 3"),
        ([True], ValueError, "got True"),
        ([1, 1], ValueError, "names a layer twice"),
        ([0, 1, 2], ValueError, "would remove all 3 layers"),
        (1, TypeError, "must be a sequence of layer indices"),
    ],
)
def test_prune_layers_bad_input_changes_nothing(layers, error, match):
    model = build_tiny("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        prune_layers(model, layers)
    assert model.config.num_hidden_layers == 3 and PruningRecord.from_config(model.config).is_empty()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_prune_layers_keeps_gpt2_blocks_that_scale_by_their_position_in_place():
    model = build_tiny("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match=r"remove only the last layers \(\[2\]\)"):
        prune_layers(model, [0])
    assert prune_layers(model, [2]).removed_layers == [2]


def test_layer_importance_fisher_is_the_squared_loss_gradient_of_each_gate():
    model = build_tiny("llama").double()
    batches = [tiny_batch(model, seed=seed) for seed in range(2)]
    scores = compute_layer_importance(model, batches, show_progress=False)
    step = 1e-3  # the loss is computed in float32 (transformers upcasts the logits)
    expected = torch.zeros(3, dtype=torch.float64)
    for layer in range(3):
        for batch in batches:
            losses = []
            for sign in (1, -1):
                gates = torch.ones(3)
                gates[layer] += sign * step
                with LayerGates(model, gates), torch.no_grad():
                    losses.append(model(**batch).loss)
            expected[layer] += ((losses[0] - losses[1]) / (2 * step)) ** 2
    assert torch.allclose(scores.double(), expected, rtol=1e-2)
    assert all(p.grad is None for p in model.parameters())


def test_layer_importance_block_influence_is_one_minus_the_cosine_of_a_block_input_and_output():
    model = build_tiny("bert")
    batch = tiny_batch(model)
    batch["attention_mask"][0, 4:] = 0
    scores = compute_layer_importance(model, [batch], "block_influence", show_progress=False)
    with torch.no_grad():
        hidden = model.bert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    keep = batch["attention_mask"].bool()
    expected = [
        1 - torch.cosine_similarity(hidden[i][keep], hidden[i + 1][keep], dim=-1).mean() for i in range(3)
    ]
    assert torch.allclose(scores, torch.stack(expected), atol=1e-6)


def test_layer_importance_bad_input():
    model = build_tiny("bert")
    with pytest.raises(ValueError, match="`method` must be one of 'fisher', 'block_influence'"):
        compute_layer_importance(model, [tiny_batch(model)], "cosine")
    with pytest.raises(ValueError, match="yielded no batches"):
        compute_layer_importance(model, [], "block_influence")


def _layer_run(tmp_path, resume: bool, pruning: PruningArguments) -> PruningTrainer:
    torch.manual_seed(0)
    args = quiet_cpu_args(
        tmp_path / "out", max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2
    )
    trainer = PruningTrainer(
        model=build_tiny("llama").train(),
        args=args,
        train_dataset=tiny_dataset(rows=48, causal=True),
        pruning_args=pruning,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3") if resume else None)
    return trainer


def test_trainer_prune_layers_flag_removes_layers_mid_training_and_resumes_to_the_same_model(tmp_path):
    (pruning,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(
        [
            "--prune_layers",
            "1",
            "--prune_steps",
            "2",
            "--layer_importance",
            "block_influence",
            "--importance_batches",
            "2",
        ]
    )
    trainer = _layer_run(tmp_path, resume=False, pruning=pruning)
    model = trainer.model
    record = PruningRecord.from_config(model.config)
    assert len(record.removed_layers) == 1 and model.config.num_hidden_layers == 2
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    logged = [h for h in trainer.state.log_history if "prune/layers_removed" in h]
    assert logged and logged[0]["prune/layers_removed"] == 1.0
    resumed = _layer_run(tmp_path, resume=True, pruning=pruning).model
    assert PruningRecord.from_config(resumed.config).removed_layers == record.removed_layers
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-5, rtol=1e-4)


def test_plain_trainer_with_the_callback_removes_the_least_important_layer_at_step_0(tmp_path):
    model = build_tiny("bert").train()
    callback = GradientPruningCallback(PruningArguments(prune_layers=1, importance_batches=2))
    callback.show_progress = False
    trainer = Trainer(
        model=model,
        args=quiet_cpu_args(tmp_path, max_steps=3),
        train_dataset=tiny_dataset(),
        callbacks=[callback],
    )
    trainer.train()
    scores = callback.importance["layers"]
    removed = PruningRecord.from_config(model.config).removed_layers
    assert removed == [int(scores.argmin())] and len(model.bert.encoder.layer) == 2


def test_pruning_arguments_prune_layers_checks():
    with pytest.raises(ValueError, match="`--prune_layers` must be >= 0, got -1"):
        PruningArguments(prune_layers=-1)
    with pytest.raises(ValueError, match="`--layer_importance` must be one of fisher, block_influence"):
        PruningArguments(prune_layers=1, layer_importance="cosine")
    with pytest.warns(
        UserWarning, match="`--layer_importance block_influence` shapes layer pruning, which is off"
    ):
        PruningArguments(weight_sparsity=0.5, layer_importance="block_influence")
    with pytest.raises(ValueError, match="`--mask_tuning` rescales kept heads and neurons"):
        PruningArguments(prune_layers=1, mask_tuning=True)


# --- whole layers inside a FLOPs budget ---


def test_budget_ranks_a_layer_by_its_score_per_cost_and_takes_back_its_units():
    scores = {"ffn": torch.tensor([[1.0, 2.0, 3.0], [0.5, 4.0, 4.0], [5.0, 6.0, 7.0]])}
    # Layer 1 is worth 0.5 over a cost of 3: lower per cost than every neuron but layer 1's first.
    chosen = select_units_under_budget(
        {**scores, "layers": torch.tensor([9.0, 1.5, 9.0])}, {"ffn": 1.0, "layers": [3.0, 3.0, 3.0]}, 4.0
    )
    # Neuron 0 of layer 1 goes first (0.5), then the layer (0.5 per cost, its neuron taken back: 2 more),
    # then layer 0's cheapest neuron closes the gap.
    assert chosen == {"ffn": {0: [0]}, "layers": {1: [1]}}
    without = select_units_under_budget(scores, {"ffn": 1.0}, 4.0)
    assert "layers" not in without and sum(map(len, without["ffn"].values())) == 4


def test_budget_keeps_one_layer_and_refuses_layers_without_costs_or_with_uniform():
    lone = select_units_under_budget(
        {"ffn": torch.tensor([[9.0, 9.0], [9.0, 9.0]]), "layers": torch.tensor([0.0, 0.0])},
        {"ffn": 1.0, "layers": [2.0, 2.0]},
        2.0,
        min_units_per_layer=0,
    )
    assert list(lone["layers"]) == [0] and lone["ffn"] == {}
    with pytest.raises(ValueError, match=r"Whole layers \('layers'\) join a budget with one cost per layer"):
        select_units_under_budget({"layers": torch.tensor([1.0, 2.0])}, {}, 1.0)
    with pytest.raises(ValueError, match=r"Whole layers \('layers'\) join a budget with one cost per layer"):
        select_units_under_budget({"layers": torch.tensor([1.0, 2.0])}, {"layers": 3.0}, 1.0)
    with pytest.raises(ValueError, match=r"Whole layers .* join a budget.*uniform=True"):
        select_units_under_budget({"layers": torch.ones(2)}, {"layers": [1.0, 1.0]}, 1.0, uniform=True)
    with pytest.raises(ValueError, match="One structure of whole layers"):
        select_units_under_budget(
            {"a": torch.ones(2), "b": torch.ones(2)}, {"a": [1.0, 1.0], "b": [1.0, 1.0]}, 1.0
        )


def _idle_block(model, layer: int) -> None:
    """Make block ``layer`` of a pre-norm decoder add nothing to the residual stream: its outputs zeroed."""
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_prune_to_flops_with_layers_removes_a_block_that_adds_nothing_and_reloads(tmp_path):
    model = build_tiny("llama")
    _idle_block(model, 1)
    batches = [tiny_batch(model, seed=seed) for seed in range(3)]
    report = prune_to_flops(model, batches, 0.6, seq_len=16, rounds=2, show_progress=False, layers=True)
    assert report["layers"] == [1] and model.config.num_hidden_layers == 2
    assert flops_ratio(model, 16) <= 0.6
    assert PruningRecord.from_config(model.config).removed_layers == [1]
    save_pruned(model, tmp_path / "joint")
    reloaded = fresh_reload_logits(tmp_path / "joint", batches[0], tmp_path)
    torch.testing.assert_close(reloaded, logits(model, batches[0]), atol=1e-5, rtol=0)
    untouched = build_tiny("llama")
    _idle_block(untouched, 1)
    prune_to_flops(untouched, batches, 0.6, seq_len=16, rounds=2, show_progress=False)
    assert untouched.config.num_hidden_layers == 3  # without layers the budget only narrows


def test_trainer_target_flops_ratio_with_layers_cuts_blocks_and_units_at_step_0(tmp_path):
    (pruning,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(
        [
            "--target_flops_ratio",
            "0.5",
            "--prune_flops_structures",
            "heads,ffn,layers",
            "--importance_batches",
            "2",
        ]
    )
    model = build_tiny("llama").train()
    _idle_block(model, 2)
    trainer = PruningTrainer(
        model=model,
        args=quiet_cpu_args(tmp_path, max_steps=2),
        train_dataset=tiny_dataset(rows=16, causal=True),
        pruning_args=pruning,
    )
    trainer.train()
    assert PruningRecord.from_config(model.config).removed_layers == [2]
    assert flops_ratio(model, pruning.flops_seq_len) <= 0.5
    logged = [h for h in trainer.state.log_history if "prune/layers_removed" in h]
    assert logged and logged[0]["prune/layers_removed"] == 1.0
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}


def test_flops_budget_refuses_a_structure_the_family_lacks_before_cutting(tmp_path):
    model = build_tiny("bert")
    before = copy.deepcopy(model.state_dict())
    callback = GradientPruningCallback(
        PruningArguments(target_flops_ratio=0.5, prune_flops_structures="experts")
    )
    with pytest.raises(ValueError, match=r"has no prunable structure 'experts'; it has 'heads', 'ffn'"):
        callback.prune_structures_now(model, [tiny_batch(model)], 0)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_pruning_arguments_prune_flops_structures_checks():
    assert PruningArguments(target_flops_ratio=0.5, prune_flops_structures="layers").unit_structures == []
    assert PruningArguments(target_flops_ratio=0.5, prune_flops_structures="ffn, layers").prunes_ffn
    for bad in ("", "heads,heads", "heads,2"):
        with pytest.raises(ValueError, match=r"`--prune_flops_structures` must name structures once each"):
            PruningArguments(target_flops_ratio=0.5, prune_flops_structures=bad)
    with pytest.raises(ValueError, match="`--uniform_per_layer` ranks one slice of every layer"):
        PruningArguments(
            target_flops_ratio=0.5, prune_flops_structures="heads,layers", uniform_per_layer=True
        )
    with pytest.raises(ValueError, match="`--mask_tuning_method least_squares` fits each layer"):
        PruningArguments(
            target_flops_ratio=0.5,
            prune_flops_structures="ffn,layers",
            mask_tuning=True,
            mask_tuning_method="least_squares",
        )
    with pytest.warns(
        UserWarning, match="`--prune_flops_structures layers` shapes a FLOPs budget, which is off"
    ):
        PruningArguments(prune_heads_per_layer=1, prune_flops_structures="layers")
