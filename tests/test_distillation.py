"""Mask tuning by distillation: every kept unit's scale fitted at once on the unpruned model's outputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_gradprune import (
    PruningArguments,
    PruningTrainer,
    block_flops,
    capture_teacher,
    distill_unit_scales,
    get_adapter,
    prune_to_flops,
    prune_units,
)
from hf_gradprune.structured.mask_tuning import TOP_K

from .helpers import (
    build_tiny,
    is_causal_lm,
    load_minilm,
    logits,
    quiet_cpu_args,
    removable,
    tiny_batch,
    tiny_dataset,
)


def divergence(model, batch: dict, teacher_logits: torch.Tensor) -> float:
    """KL(teacher || model) per row, over the full output (real tokens only for sequences)."""
    rows, wanted = logits(model, batch).float(), teacher_logits.float()
    if rows.dim() == 3:
        keep = batch["attention_mask"].bool()
        rows, wanted = rows[keep], wanted[keep]
    p, q = wanted.log_softmax(-1), rows.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_distillation_brings_every_family_closer_to_the_original_and_folds_exactly(model_type):
    model = build_tiny(model_type)
    batches = [tiny_batch(model, batch_size=8, length=9, seed=s) for s in range(4)]
    original = [logits(model, b) for b in batches]
    keys = set(model.state_dict())
    teacher = capture_teacher(model, batches, show_progress=False)
    heads, _ = removable(model_type)
    prune_units(model, {"heads": heads, "ffn": {layer: list(range(0, 37, 2)) for layer in range(3)}})
    cut = {k: v.clone() for k, v in model.state_dict().items()}
    report = distill_unit_scales(model, batches, teacher, show_progress=False)

    before, after = (
        report["prune/mask_tuning_divergence_before"],
        report["prune/mask_tuning_divergence_after"],
    )
    assert after < before and report["prune/mask_tuning_epochs"] >= 1
    # The last quarter (batch 3) is held out; the scales are folded into the weights: the model alone, with
    # no gate, gives the reported divergence (the top-k coarsening only lowers a KL).
    assert divergence(model, batches[3], original[3]) >= after * (1 - 1e-4)
    if not is_causal_lm(model):  # two labels: no coarsening, the same number
        assert divergence(model, batches[3], original[3]) == pytest.approx(after, rel=1e-4)
    assert set(model.state_dict()) == keys
    adapter = get_adapter(model)
    names = {id(p): name for name, p in model.named_parameters()}
    outputs = {
        names[id(adapter.module(model, layer, s.output).weight)]
        for layer in range(3)
        for s in adapter.structures
    }
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, cut[k])}
    assert changed and changed <= outputs  # only the output layers' columns of the kept units


def test_teacher_of_a_language_model_keeps_the_top_entries_of_real_tokens_and_the_rest():
    model = build_tiny("llama")
    batch = tiny_batch(model, batch_size=3, length=6)
    batch["attention_mask"][0, 4:] = 0
    teacher = capture_teacher(model, [batch], show_progress=False)
    (rows,), (chosen,) = teacher.log_probs, teacher.indices
    assert rows.shape == (3 * 6 - 2, TOP_K + 1) and chosen.shape == (3 * 6 - 2, TOP_K)
    assert torch.allclose(rows.exp().sum(-1), torch.ones(len(rows)), atol=1e-5)  # the rest bin closes it
    full = logits(model, batch)[batch["attention_mask"].bool()].log_softmax(-1)
    assert torch.equal(chosen[:, 0], full.argmax(-1))


def test_distillation_of_a_regression_head_uses_the_squared_error():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        num_labels=1,
        initializer_range=0.3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    batches = [
        {"input_ids": torch.randint(1, 99, (8, 10), generator=torch.Generator().manual_seed(s))}
        for s in range(3)
    ]
    teacher = capture_teacher(model, batches, show_progress=False)
    assert teacher.indices == [None] * 3 and teacher.log_probs[0].shape == (8, 1)
    target = logits(model, batches[2])
    prune_units(model, {"ffn": {0: list(range(30)), 1: list(range(30))}})
    report = distill_unit_scales(model, batches, teacher, show_progress=False)
    error = float((logits(model, batches[2]) - target).square().mean())
    assert error == pytest.approx(report["prune/mask_tuning_divergence_after"], rel=1e-4)
    assert report["prune/mask_tuning_divergence_after"] < report["prune/mask_tuning_divergence_before"]


def test_distillation_needs_logits_and_the_teacher_of_the_same_batches():
    model = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99
        )
    )
    batch = {"input_ids": torch.tensor([[1, 2, 3]])}
    with pytest.raises(
        ValueError, match=r"needs a model that returns `logits`.*mask_tuning_method='least_squares'"
    ):
        capture_teacher(model, [batch], show_progress=False)
    tiny = build_tiny("bert")
    teacher = capture_teacher(tiny, [tiny_batch(tiny)], show_progress=False)
    with pytest.raises(ValueError, match=r"`teacher` holds outputs of 1 batches, `batches` has 2"):
        distill_unit_scales(tiny, [tiny_batch(tiny)] * 2, teacher, show_progress=False)


def test_a_single_batch_is_fitted_and_judged_on_itself():
    model = build_tiny("bert")
    batch = tiny_batch(model, batch_size=8)
    teacher = capture_teacher(model, [batch], show_progress=False)
    prune_units(model, {"heads": {0: [0, 1]}})
    report = distill_unit_scales(model, [batch], teacher, max_epochs=3, show_progress=False)
    assert report["prune/mask_tuning_divergence_after"] < report["prune/mask_tuning_divergence_before"]


def test_trainer_mask_tuning_by_least_squares_when_asked(tmp_path):
    model = build_tiny("bert").train()
    trainer = PruningTrainer(
        model=model,
        args=quiet_cpu_args(tmp_path / "out"),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(
            target_flops_ratio=0.6,
            flops_seq_len=8,
            prune_rounds=1,
            mask_tuning=True,
            mask_tuning_method="least_squares",
            importance_batches=2,
        ),
    )
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "prune/flops_ratio" in e)
    assert entry["prune/mask_tuning_layers"] > 0 and "prune/mask_tuning_divergence_after" not in entry
    with pytest.raises(ValueError, match=r"`--mask_tuning_method` must be one of"):
        PruningArguments(target_flops_ratio=0.6, mask_tuning=True, mask_tuning_method="lsq")


@pytest.mark.real
def test_distillation_on_the_real_minilm_after_half_the_flops(review_batches):
    model = load_minilm()
    batches = review_batches(4, 8)
    dense = block_flops(model, 64)
    report = prune_to_flops(model, batches, 0.5, seq_len=64, rounds=1, mask_tuning=True, show_progress=False)
    assert 0.49 <= block_flops(model, 64) / dense <= 0.5
    assert report["prune/mask_tuning_divergence_after"] < report["prune/mask_tuning_divergence_before"]
    assert report["prune/mask_tuning_epochs"] >= 1


def test_distillation_after_a_structure_lost_every_unit():
    model = build_tiny("bert")
    batches = [tiny_batch(model, batch_size=8, seed=s) for s in range(2)]
    teacher = capture_teacher(model, batches, show_progress=False)
    prune_units(model, {"ffn": {layer: list(range(37)) for layer in range(3)}}, allow_empty=True)
    report = distill_unit_scales(model, batches, teacher, show_progress=False)
    assert report["prune/mask_tuning_divergence_after"] <= report["prune/mask_tuning_divergence_before"]
