"""PruningTrainer on the real SmolLM2-135M (grouped-query attention): key/value groups cut before training,
2:4 Wanda sparsity, a few steps, save, fresh reload and generation."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from hf_gradprune import PruningArguments, PruningRecord, PruningTrainer
from hf_gradprune.core.masks import get_masks
from hf_gradprune.testing import load_rotten_tomatoes

from .helpers import fresh_reload_logits, logits

pytestmark = [pytest.mark.real, pytest.mark.slow]


def causal_reviews(tokenizer, rows: int = 16, length: int = 24) -> Dataset:
    texts = load_rotten_tomatoes()["train"]["text"][:rows]
    encoded = tokenizer(texts, truncation=True, max_length=length, padding="max_length")
    labels = [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return Dataset.from_dict({**encoded, "labels": labels})


def test_smollm2_trainer_cuts_kv_groups_with_2_4_sparsity_and_reloads(smollm2, tmp_path):
    model, tokenizer = smollm2
    model.train()
    pruning = PruningArguments(
        prune_heads_per_layer=1, sparsity_pattern="2:4", weight_importance="wanda", importance_batches=2
    )
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = PruningTrainer(
        model=model, args=args, train_dataset=causal_reviews(tokenizer), pruning_args=pruning
    )
    trainer.pruning_callback.show_progress = False
    trainer.train()

    heads = PruningRecord.from_config(model.config).pruned_heads
    assert len(heads) == 30 and all(len(h) == 3 and h == list(range(h[0], h[0] + 3)) for h in heads.values())
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.head_dim) == (
        384,
        128,
        64,
    )
    params = dict(model.named_parameters())
    masks = get_masks(model)
    assert len(masks) == 30 * 7
    for name, mask in masks.items():
        groups = params[name].detach().reshape(params[name].shape[0], -1, 4)
        assert torch.all((groups != 0).sum(dim=-1) <= 2), name  # 2:4 along the input dimension
        assert torch.all(mask.reshape(mask.shape[0], -1, 4).sum(dim=-1) == 2), name

    trainer.save_model()
    batch = tokenizer(["A quiet, moving film."], return_tensors="pt")
    model.eval()
    torch.testing.assert_close(
        fresh_reload_logits(tmp_path / "out", batch, tmp_path), logits(model, batch), atol=0, rtol=0
    )
    generated = model.generate(
        **batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape[1] == batch["input_ids"].shape[1] + 4


def test_smollm2_sft_with_the_mixin_distils_2_4_weights_from_the_dense_model(smollm2, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from hf_gradprune import PruningMixin

    class PruningSFTTrainer(PruningMixin, SFTTrainer):
        pass

    model, tokenizer = smollm2
    texts = load_rotten_tomatoes()["train"]["text"][:16]
    args = SFTConfig(
        str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, max_length=32, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, learning_rate=1e-5,
    )  # fmt: skip
    pruning = PruningArguments(
        weight_sparsity=0.5, sparsity_pattern="2:4", weight_importance="wanda", importance_batches=1,
        distill_alpha=0.5,
    )  # fmt: skip
    trainer = PruningSFTTrainer(
        model=model.train(),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        pruning_args=pruning,
    )
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "distill/kl" in entry]
    assert len(steps) == 2 and all(
        0 < entry["distill/kl"] < 100 and entry["grad_norm"] > 0 for entry in steps
    )
    masks = get_masks(trainer.model)
    assert len(masks) == 30 * 7
    assert all(bool((m.reshape(-1, 4).sum(-1) == 2).all()) for m in masks.values())
