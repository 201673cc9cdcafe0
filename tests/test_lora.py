"""LoRA fine-tuning of a pruned model: the merge keeps the pruned weights at zero (a plain merge does not)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from hf_gradprune import (
    PruningArguments,
    PruningTrainer,
    load_pruned,
    mask_lora_updates,
    merge_and_unload,
    prune_weights,
    save_pruned,
)
from hf_gradprune.core.masks import get_masks

from .helpers import build_tiny, logits, tiny_batch, tiny_dataset

LORA_TARGETS = ["q_proj", "v_proj", "up_proj"]


def revived(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Pruned entries that are not zero in ``model`` (masks named as in the merged model)."""
    return sum(
        int(torch.count_nonzero(model.get_parameter(name).detach()[~mask])) for name, mask in masks.items()
    )


def two_four(model: torch.nn.Module, targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    return prune_weights(
        model, None, None, method="magnitude", pattern="2:4", target_modules=targets, show_progress=False
    )


def test_pruning_trainer_trains_lora_on_a_2_4_model_and_the_merge_keeps_it_exact(tmp_path):
    model = build_tiny("llama").train()
    masks = two_four(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])  # 37 FFN inputs
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PruningArguments that prune nothing more
        pruning = PruningArguments()
    trainer = PruningTrainer(
        model=lora,
        args=TrainingArguments(
            str(tmp_path / "out"),
            max_steps=4,
            per_device_train_batch_size=8,
            learning_rate=5e-2,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=tiny_dataset(causal=True),
        pruning_args=pruning,
    )
    trainer.train()
    assert revived(lora.base_model.model, masks) == 0  # the base weights are frozen, the masks hold
    plain = copy.deepcopy(lora).merge_and_unload()
    assert revived(plain, masks) > 0  # the control: peft's own merge densifies
    batch = tiny_batch(model)
    trained = logits(lora, batch)
    merged = merge_and_unload(lora)
    # The LoRA updates trained masked (PruningTrainer added the hooks): the merge is the trained model.
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-5, atol=1e-5)
    assert revived(merged, masks) == 0
    assert get_masks(merged).keys() == masks.keys()
    for name in masks:  # at most 2 of every 4 inputs left
        weight = merged.get_parameter(name).detach()
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(dim=-1)
        assert int(groups.max()) <= 2
    folder = save_pruned(merged, tmp_path / "merged")
    again = load_pruned(folder)
    assert revived(again, masks) == 0 and get_masks(again).keys() == masks.keys()


def test_lora_updates_trained_without_the_masks_would_not_be_what_the_merge_gives():
    model = build_tiny("llama")
    masks = two_four(model, ["q_proj", "v_proj"])
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    batch = tiny_batch(model)
    dense_update = logits(lora, batch)
    handles = mask_lora_updates(lora)
    assert len(handles) == 2 * model.config.num_hidden_layers
    masked_update = logits(lora, batch)
    assert not torch.allclose(dense_update, masked_update, atol=1e-4)  # the control
    merged = merge_and_unload(lora)
    torch.testing.assert_close(logits(merged, batch), masked_update, rtol=1e-5, atol=1e-5)
    assert revived(merged, masks) == 0


def test_pruning_trainer_warns_when_lora_dropout_keeps_the_update_dense(tmp_path):
    model = build_tiny("llama").train()
    two_four(model, ["q_proj", "v_proj"])
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    with pytest.warns(UserWarning, match=r"lora_dropout > 0 .* The LoRA update trains dense"):
        PruningTrainer(
            model=lora,
            args=TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[]),
            train_dataset=tiny_dataset(causal=True),
            pruning_args=PruningArguments(weight_sparsity=0.5),
        )


def test_merge_and_unload_of_a_model_without_peft_is_a_type_error():
    with pytest.raises(TypeError, match=r"must be a peft model \(`get_peft_model"):
        merge_and_unload(build_tiny("llama"))


def test_real_smollm2_2_4_lora_merge_keeps_the_pattern_exact(smollm2):
    model, tokenizer = smollm2
    masks = two_four(model)
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids = tokenizer("A film that was better than the book, for once.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = lora(input_ids=ids).logits
    merged = merge_and_unload(lora)
    assert revived(merged, masks) == 0
    assert len(get_masks(merged)) == len(masks) == 7 * model.config.num_hidden_layers
    lora_masked = {k: v for k, v in masks.items() if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert all(int((merged.get_parameter(k) != 0).sum()) == int(m.sum()) for k, m in lora_masked.items())
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
