"""Vanilla exports: models cut the same in every layer load with plain transformers alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainingArguments

from hf_gradprune import (
    PruningArguments,
    PruningRecord,
    PruningTrainer,
    export_vanilla,
    prune_to_flops,
    prune_units,
)
from hf_gradprune.core.masks import apply_masks

from .helpers import build_tiny, logits, quiet_cpu_args, run_fresh, tiny_batch, tiny_dataset

PLAIN_LOAD = """
import json, sys, torch, transformers
cls = getattr(transformers, sys.argv[2])
model = cls.from_pretrained(sys.argv[1]).eval()
batch = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[4])
extra = {}
if sys.argv[5] == "generate":
    out = model.generate(batch["input_ids"][:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    extra["generated"] = out.shape[1] - batch["input_ids"].shape[1]
print(json.dumps({"hf_gradprune_imported": "hf_gradprune" in sys.modules, "config": model.config.to_dict(),
                  **extra}))
"""


def plain_logits(folder, model, batch, tmp_path, generate: bool = False) -> tuple[torch.Tensor, dict]:
    """Logits of ``type(model).from_pretrained(folder)`` in a fresh process without hf_gradprune."""
    torch.save({k: v for k, v in batch.items() if k != "labels"}, tmp_path / "batch.pt")
    out = run_fresh(
        PLAIN_LOAD,
        str(folder),
        type(model).__name__,
        str(tmp_path / "batch.pt"),
        str(tmp_path / "logits.pt"),
        "generate" if generate else "-",
    )
    report = json.loads(out.splitlines()[-1])
    assert report["hf_gradprune_imported"] is False
    return torch.load(tmp_path / "logits.pt"), report


CUTS = {
    "bert": {"ffn": {layer: list(range(layer, 37, 3))[:9] for layer in range(3)}},
    "gpt2": {"ffn": {layer: list(range(layer * 7, layer * 7 + 40)) for layer in range(3)}},
    "llama": {
        "heads": {0: [0, 1], 1: [2, 3], 2: [0, 1]},
        "ffn": {layer: list(range(layer, 37, 4))[:9] for layer in range(3)},
    },
}


@pytest.mark.parametrize("model_type", sorted(CUTS))
def test_export_vanilla_loads_with_plain_from_pretrained_and_gives_identical_logits(model_type, tmp_path):
    model = build_tiny(model_type)
    prune_units(model, CUTS[model_type])
    name = next(
        n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "wte" not in n
    )
    apply_masks(model, {name: torch.rand_like(model.get_parameter(name)) > 0.3})
    batch = tiny_batch(model)
    expected = logits(model, batch)
    folder = export_vanilla(model, tmp_path / "vanilla")
    assert not (folder / "pruning_masks.safetensors").exists()
    got, report = plain_logits(folder, model, batch, tmp_path)
    assert torch.equal(got, expected)
    assert "hf_gradprune" not in report["config"]
    card = (folder / "README.md").read_text()
    assert f"{type(model).__name__}.from_pretrained" in card and "load_pruned" not in card


def test_export_vanilla_of_uneven_layers_names_them():
    model = build_tiny("llama")
    prune_units(model, {"ffn": {0: [1, 2], 1: [3]}})
    with pytest.raises(
        ValueError, match=r"layers keep layer 0: 35, layer 1: 36, layer 2: 37.*--uniform_per_layer"
    ):
        export_vanilla(model, "never-written")


def test_export_vanilla_of_bert_heads_says_the_family_cannot_express_them(tmp_path):
    model = build_tiny("bert")
    prune_units(model, {"heads": {layer: [0] for layer in range(3)}})
    reason = r"\(its head size is derived from hidden_size / num_attention_heads\)"  # the adapter's word
    with pytest.raises(ValueError, match=rf"'bert' config cannot say fewer heads per layer .*{reason}"):
        export_vanilla(model, tmp_path / "never")
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").iterdir())


def test_prune_to_flops_uniform_removes_as_many_units_from_every_layer():
    model = build_tiny("llama")
    batches = [tiny_batch(model, batch_size=4, seed=s) for s in range(2)]
    report = prune_to_flops(model, batches, 0.6, seq_len=8, rounds=2, uniform=True, show_progress=False)
    record = PruningRecord.from_config(model.config)
    for name in report["units"]:
        counts = {len(record.removed(name, layer)) for layer in range(3)}
        assert len(counts) == 1 and counts != {0}, (name, counts)


def test_trainer_exports_vanilla_under_a_uniform_flops_budget(tmp_path):
    model = build_tiny("llama").train()
    trainer = PruningTrainer(
        model=model,
        args=quiet_cpu_args(tmp_path / "out"),
        train_dataset=tiny_dataset(causal=True),
        pruning_args=PruningArguments(
            target_flops_ratio=0.6,
            flops_seq_len=8,
            uniform_per_layer=True,
            export_vanilla=True,
            weight_sparsity=0.3,
            importance_batches=2,
            prune_rounds=1,
        ),
    )
    trainer.train()
    trainer.save_model()
    batch = tiny_batch(trainer.model)
    got, report = plain_logits(tmp_path / "out", trainer.model, batch, tmp_path)
    assert torch.equal(got, logits(trainer.model.eval(), batch))
    assert report["config"]["intermediate_size"] < 37 or report["config"]["num_attention_heads"] < 4


def test_export_vanilla_argument_errors():
    with pytest.raises(
        ValueError, match=r"`--export_vanilla` needs the same cut in every layer.*--uniform_per_layer"
    ):
        PruningArguments(target_flops_ratio=0.5, export_vanilla=True)
    with pytest.warns(UserWarning, match=r"`--uniform_per_layer` shapes .* it is ignored"):
        PruningArguments(prune_heads_per_layer=1, uniform_per_layer=True)


def test_trainer_refuses_export_vanilla_of_bert_heads_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"'bert' config cannot say fewer heads per layer"):
        PruningTrainer(
            model=build_tiny("bert"),
            args=TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[]),
            train_dataset=tiny_dataset(),
            pruning_args=PruningArguments(prune_heads_per_layer=1, export_vanilla=True),
        )


def test_real_smollm2_exported_without_a_kv_group_and_a_quarter_of_its_ffn_generates(smollm2, tmp_path):
    model, tokenizer = smollm2
    layers = range(model.config.num_hidden_layers)
    # 9 query heads in 3 key/value groups of 3; 1536 FFN neurons.
    prune_units(
        model,
        {
            "heads": {layer: [6, 7, 8] for layer in layers},
            "ffn": {layer: list(range(384)) for layer in layers},
        },
    )
    batch = {"input_ids": tokenizer("The movie was", return_tensors="pt")["input_ids"]}
    expected = logits(model, batch)
    folder = export_vanilla(model, tmp_path / "smollm2")
    tokenizer.save_pretrained(folder)
    got, report = plain_logits(folder, model, batch, tmp_path, generate=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    config = report["config"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (
        6,
        2,
        1152,
    )
    assert config["head_dim"] == 64 and report["generated"] == 5
