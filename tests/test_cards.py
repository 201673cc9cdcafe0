"""Model cards and head-importance heatmaps: metadata round-trips, real numbers, nothing of the machine."""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hf_gradprune
from hf_gradprune import load_pruned, prune_heads
from hf_gradprune.core.adapters import find_target_modules
from hf_gradprune.core.masks import apply_masks
from hf_gradprune.io.cards import create_pruning_model_card
from hf_gradprune.io.figures import head_importance_figure, save_head_importance_heatmap
from hf_gradprune.training.arguments import PruningArguments

from .helpers import build_tiny

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL_BEFORE = {"eval_accuracy": 0.8125, "eval_f1": 0.8, "eval_loss": 0.41, "eval_runtime": 1.5}
EVAL_AFTER = {"eval_accuracy": 0.7875, "eval_f1": 0.7712, "eval_loss": 0.47, "eval_runtime": 1.1}
# A slash that starts a path ("/tmp/x", "/home/..."), not one inside a URL, a repo id or "3 / 4".
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.<])/[\w.~-]")


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99
    )
    return BertForSequenceClassification(config).eval()


def pruned_bert() -> tuple[BertForSequenceClassification, int]:
    """A tiny BERT with head 1 of layer 0 removed, and its parameter count before."""
    model = tiny_bert()
    before = model.num_parameters()
    prune_heads(model, {0: [1]})
    return model, before


def full_card(model: BertForSequenceClassification, params_before: int) -> ModelCard:
    return create_pruning_model_card(
        model,
        base_model="google-bert/bert-base-uncased",
        pruning_args=PruningArguments(prune_heads_per_layer=1).to_dict(),
        params_before=params_before,
        eval_before=EVAL_BEFORE,
        eval_after=EVAL_AFTER,
        dataset_name="rotten_tomatoes",
        speedup=1.5,
        heatmap_filename="head_importance.png",
        repo_id="test-user/tiny-pruned",
    )


def importance_with_removed_head() -> torch.Tensor:
    scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    scores[0, 1] = float("nan")
    return scores


def test_save_head_importance_heatmap_writes_png_and_nothing_else(tmp_path: Path) -> None:
    path = save_head_importance_heatmap(importance_with_removed_head(), tmp_path / "head_importance.png")

    assert path == tmp_path / "head_importance.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head_importance.png"]


def test_head_importance_figure_greys_out_removed_heads() -> None:
    scores = importance_with_removed_head()

    figure = head_importance_figure(scores, title="Layer x head")

    assert isinstance(figure.canvas, FigureCanvasAgg)
    axes = figure.axes[0]
    image = axes.get_images()[0]
    assert image.get_array().mask.tolist() == scores.isnan().tolist()
    assert to_hex(image.get_cmap().get_bad()) == to_hex("lightgrey")
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == ("Layer x head", "head", "layer")
    assert "removed" in figure.axes[1].get_ylabel()
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["removed head"]


def test_head_importance_figure_rejects_a_vector() -> None:
    with pytest.raises(ValueError, match=r"\(num_layers, num_heads\) tensor, got shape \(4,\)"):
        head_importance_figure(torch.rand(4))


def test_create_pruning_model_card_metadata_round_trips(tmp_path: Path) -> None:
    card = full_card(*pruned_bert())
    card.save(tmp_path / "README.md")

    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "google-bert/bert-base-uncased"
    assert metadata["datasets"] == ["rotten_tomatoes"]
    assert metadata["pipeline_tag"] == "text-classification"
    assert {"pruning", "hf-gradprune", "text-classification"} <= set(metadata["tags"])
    assert metadata["metrics"] == ["accuracy", "f1"]
    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "tiny-pruned"
    assert {r.metric_type: r.metric_value for r in results} == {"accuracy": 0.7875, "f1": 0.7712}
    assert {(r.task_type, r.dataset_type, r.dataset_name) for r in results} == {
        ("text-classification", "rotten_tomatoes", "rotten_tomatoes")
    }
    assert eval_results_to_model_index(model_name, results) == metadata["model-index"]
    reparsed = ModelCard(str(card))
    assert reparsed.data.to_dict() == card.data.to_dict()
    assert ModelCard.load(tmp_path / "README.md").data.eval_results == card.data.eval_results


def test_create_pruning_model_card_names_the_real_numbers() -> None:
    model, before = pruned_bert()
    after = model.num_parameters()

    text = full_card(model, before).text

    assert "| 0 | 3 / 4 | 1 | 37 / 37 |" in text
    assert "| 1 | 4 / 4 | – | 37 / 37 |" in text
    assert "| **All** | **7 / 8** | 1 | **74 / 74** |" in text
    assert f"| Before pruning | {before:,} |" in text
    assert f"| After pruning | {after:,} |" in text
    assert f"| Reduction | {(before - after) / before:.2%} |" in text
    assert "| accuracy | 0.8125 | – | 0.7875 | -0.0250 |" in text
    assert "| f1 | 0.8000 | – | 0.7712 | -0.0288 |" in text
    assert "| `prune_heads_per_layer` | `1` |" in text
    assert "**1.50×**" in text
    assert "![Head importance per layer and head](head_importance.png)" in text
    assert 'model = load_pruned("test-user/tiny-pruned")' in text
    assert 'AutoTokenizer.from_pretrained("test-user/tiny-pruned")' in text
    assert f"hf_gradprune {hf_gradprune.__version__}" in text


def test_create_pruning_model_card_reports_the_real_zero_fraction() -> None:
    model, _ = pruned_bert()
    query = "bert.encoder.layer.1.attention.self.query.weight"
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[:, :8] = False  # 256 of the 1,024 weights of layer 1's query
    apply_masks(model, {query: mask})
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight[:3] = 0.0  # 96 zeros set without a mask

    text = create_pruning_model_card(model).text

    query_weights = 24 * 32 + 32 * 32  # layer 0 lost a head
    assert f"| `attention.self.query` | 2 | {query_weights:,} | {256 / query_weights:.2%} |" in text
    assert "| `attention.self.key` | 2 | 1,792 | 0.00% |" in text
    assert "| `attention.output.dense` | 2 | 1,792 | 0.00% |" in text
    ffn_weights = 2 * 37 * 32
    assert f"| `intermediate.dense` | 2 | {ffn_weights:,} | {96 / ffn_weights:.2%} |" in text
    assert f"| `output.dense` | 2 | {ffn_weights:,} | 0.00% |" in text
    total = sum(m.weight.numel() for m in find_target_modules(model).values())
    assert f"| **All** | 12 | {total:,} | **{(256 + 96) / total:.2%}** |" in text


def test_create_pruning_model_card_lists_key_value_heads_under_grouped_query_attention() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=37,
        vocab_size=99,
    )
    model = LlamaForCausalLM(config)
    prune_heads(model, {1: [2, 3]})

    card = create_pruning_model_card(model)  # the task follows the model's head

    assert (
        "| Layer | Attention heads kept | Removed attention heads | Key/value heads kept | FFN neurons kept |"
        in card.text
    )
    assert "| 0 | 4 / 4 | – | 2 / 2 | 37 / 37 |" in card.text
    assert "| 1 | 2 / 4 | 2, 3 | 1 / 2 | 37 / 37 |" in card.text
    assert card.data.pipeline_tag == "text-generation"
    assert "text-generation" in card.data.tags


def test_create_pruning_model_card_renders_every_family(model_type: str) -> None:
    model = build_tiny(model_type)
    adapter = hf_gradprune.get_adapter(model)
    num_heads = adapter.num_units("heads", model.config)
    group = adapter.group_size(adapter.structure("heads"), model.config)
    prune_heads(model, {0: list(range(group))})

    card = create_pruning_model_card(model, eval_after={"eval_accuracy": 0.5}, dataset_name="rotten_tomatoes")

    assert f"| 0 | {num_heads - group} / {num_heads} | {', '.join(map(str, range(group)))} |" in card.text
    assert f"| **All** | {len(find_target_modules(model))} |" in card.text
    assert ModelCard(str(card)).data.eval_results[0].metric_value == 0.5


def test_create_pruning_model_card_leaks_no_local_path(tmp_path: Path) -> None:
    model, before = pruned_bert()
    base = tmp_path / "checkpoints" / "base-model"
    model.save_pretrained(base)
    reloaded = load_pruned(base)
    arguments = {
        **PruningArguments(prune_heads_per_layer=1).to_dict(),
        "output_dir": str(tmp_path / "runs"),
        "hub_token": "hf_do_not_print_me",
    }

    card = create_pruning_model_card(
        reloaded,
        base_model=str(base),
        pruning_args=arguments,
        params_before=before,
        eval_after=EVAL_AFTER,
        dataset_name=str(tmp_path / "data"),
        heatmap_filename="head_importance.png",
    )

    text = str(card)
    assert str(tmp_path) not in text
    assert os.path.expanduser("~") not in text or os.path.expanduser("~") == "/"
    assert f"/{getpass.getuser()}/" not in text
    assert "hf_do_not_print_me" not in text
    assert ABSOLUTE_PATH.search(text) is None, ABSOLUTE_PATH.search(text)
    assert "a local checkpoint" in card.text
    assert card.data.base_model is None and card.data.datasets is None
    assert "| `output_dir` | `(local path)` |" in card.text
    assert "| `hub_token` | `(hidden)` |" in card.text


def test_create_pruning_model_card_rejects_an_absolute_heatmap_path(tmp_path: Path) -> None:
    model, _ = pruned_bert()
    with pytest.raises(ValueError, match="`heatmap_filename` must be a relative file name"):
        create_pruning_model_card(model, heatmap_filename=str(tmp_path / "head_importance.png"))


def test_card_says_how_training_distilled_and_hides_a_local_teacher_path(tmp_path: Path) -> None:
    model, before = pruned_bert()
    teacher = str(tmp_path / "teacher")
    args = PruningArguments(prune_heads_per_layer=1, distill_alpha=0.3, distill_hidden_states=True)
    text = create_pruning_model_card(model, pruning_args=args.to_dict(), params_before=before).text
    assert "distilled from the model as it was before the first cut" in text
    assert "0.7 x the task loss + 0.3 x the distillation" in text and "at temperature 2.0" in text
    assert "hidden states" in text
    args = PruningArguments(prune_heads_per_layer=1, distill_alpha=0.5, teacher_model_name_or_path=teacher)
    text = create_pruning_model_card(model, pruning_args=args.to_dict(), params_before=before).text
    assert "distilled from a local checkpoint" in text and teacher not in text and "hidden states" not in text
    args = PruningArguments(distill_alpha=0.5, weight_sparsity=0.5, teacher_model_name_or_path="org/teacher")
    text = create_pruning_model_card(model, pruning_args=args.to_dict()).text
    assert "distilled from [`org/teacher`](https://huggingface.co/org/teacher)" in text
    plain = create_pruning_model_card(model, pruning_args={"prune_heads_per_layer": 1}).text
    assert "distilled" not in plain
