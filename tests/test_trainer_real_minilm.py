"""PruningTrainer on the real MiniLM and real reviews: heads cut mid-training, a weight ramp,
gradient accumulation and a resume that lands on the same final masks and weights."""

import pytest
import torch
from transformers import DataCollatorWithPadding, TrainingArguments

from hf_gradprune import PruningArguments, PruningRecord, PruningTrainer
from hf_gradprune.core.masks import get_masks

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


def test_minilm_distillation_brings_the_cut_model_back_towards_the_dense_one(
    tmp_path, reviews, minilm_tokenizer
):
    """Half the heads of the real MiniLM cut, then 6 steps on 8 reviews with the distillation loss only
    (dropout off): the divergence from the frozen dense teacher (its hidden states and outputs) halves."""
    model = load_minilm().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = PruningTrainer(
        model=model,
        args=args,
        train_dataset=reviews.select(range(8)),
        data_collator=DataCollatorWithPadding(minilm_tokenizer),
        pruning_args=PruningArguments(
            prune_heads_per_layer=6, importance_batches=1, distill_alpha=1.0, distill_hidden_states=True
        ),
    )
    trainer.pruning_callback.show_progress = False
    trainer.train()
    teacher = trainer.distiller.teacher
    assert all(torch.equal(value, dense[key]) for key, value in teacher.state_dict().items())
    assert [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer] == [6] * 6
    kl = [h["distill/kl"] + h["distill/hidden"] for h in trainer.state.log_history if "distill/kl" in h]
    assert len(kl) == 6 and kl[-1] < 0.5 * kl[0] and kl[-1] == min(kl)
