"""PruningTrainer on the real MiniLM and real reviews: heads cut mid-training, a weight ramp,
gradient accumulation and a resume that lands on the same final masks and weights."""

import pytest
import torch
from transformers import DataCollatorWithPadding, TrainingArguments

from hf_gradprune import PruningArguments, PruningRecord, PruningTrainer
from hf_gradprune.masks import get_masks

from .helpers import load_minilm

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def reviews(rotten_tomatoes, minilm_tokenizer):
    rows = rotten_tomatoes["train"].select(range(96))
    return rows.map(
        lambda r: minilm_tokenizer(r["text"], truncation=True, max_length=32),
        batched=True,
        remove_columns=["text"],
    )


def run(tmp_path, reviews, tokenizer, resume: bool):
    pruning = PruningArguments(
        prune_heads_per_layer=2,
        prune_steps="0,4",
        weight_sparsity=0.5,
        sparsity_schedule="cubic",
        sparsity_schedule_end=6,
        sparsity_schedule_frequency=2,
        weight_importance="fisher",
        importance_batches=2,
    )
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        weight_decay=0.1,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=3,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = PruningTrainer(
        model=load_minilm().train(),
        args=args,
        train_dataset=reviews,
        data_collator=DataCollatorWithPadding(tokenizer),
        pruning_args=pruning,
    )
    trainer.pruning_callback.show_progress = False
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3") if resume else None)
    return trainer


def test_minilm_trainer_prunes_persistently_and_resumes_identically(tmp_path, reviews, minilm_tokenizer):
    full = run(tmp_path, reviews, minilm_tokenizer, resume=False)
    model = full.model
    heads = PruningRecord.from_config(model.config).pruned_heads
    assert [len(heads[layer]) for layer in range(6)] == [2] * 6
    assert [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer] == [10] * 6
    masks, params = get_masks(model), dict(model.named_parameters())
    assert len(masks) == 36
    for name, mask in masks.items():
        assert int((~mask).sum()) == mask.numel() // 2, name
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
        assert torch.count_nonzero(full.optimizer.state[params[name]]["exp_avg"][~mask]) == 0, name
    optimized = {id(p) for group in full.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}

    resumed = run(tmp_path, reviews, minilm_tokenizer, resume=True)
    assert PruningRecord.from_config(resumed.model.config).pruned_heads == heads
    resumed_masks = get_masks(resumed.model)
    assert all(torch.equal(resumed_masks[name], mask) for name, mask in masks.items())
    expected = model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-4)
