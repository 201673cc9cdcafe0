"""Checkpoints of transformers 4's own ``prune_heads`` (``config.pruned_heads``) load under transformers 5.

The fixtures under ``tests/fixtures/transformers4/`` were made with transformers 4.57 by
``tests/fixtures/make_transformers4_fixtures.py`` (tiny BERT and GPT-2, uneven heads per layer, safetensors),
with the logits transformers 4 computed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from hf_gradprune import PruningRecord, load_pruned, save_pruned

FIXTURES = Path(__file__).with_name("fixtures") / "transformers4"
HEADS = {0: [1], 1: [0, 2], 2: [3]}


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_transformers4_pruned_checkpoint_loads_strictly_with_its_logits(name, tmp_path):
    folder = FIXTURES / name
    assert json.loads((folder / "config.json").read_text())["transformers_version"].startswith("4.57")
    expected = load_file(folder / "expected.safetensors")
    model = load_pruned(folder)
    assert PruningRecord.from_config(model.config).pruned_heads == HEADS
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)

    # Saved again, the record is hf_gradprune's and the model reloads the same.
    again_folder = save_pruned(model, tmp_path / "again")
    config = json.loads((again_folder / "config.json").read_text())
    assert "pruned_heads" not in config and config["hf_gradprune"]["pruned_heads"] == {
        str(k): v for k, v in HEADS.items()
    }
    with torch.no_grad():
        again = load_pruned(again_folder)(input_ids=expected["input_ids"]).logits
    assert torch.equal(again, logits)


def test_transformers4_checkpoint_without_hf_gradprune_fails_to_load_in_transformers5(tmp_path):
    # The control: what users meet today (transformers 5 ignores config.pruned_heads).
    folder = shutil.copytree(FIXTURES / "bert", tmp_path / "bert")
    with pytest.raises(RuntimeError, match=r"ignore_mismatched_sizes"):
        transformers.BertForSequenceClassification.from_pretrained(folder)
