import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

from hf_gradprune import load_pruned, prune_heads
from hf_gradprune.core.mask_files import save_masks
from hf_gradprune.core.masks import MASKS_FILENAME, apply_masks, get_masks
from hf_gradprune.training.state import load_state, save_state

from .helpers import build_tiny, fresh_reload_logits, logits, removable, tiny_batch


def pruned_checkpoint(model_type: str, folder) -> tuple:
    model = build_tiny(model_type)
    prune_heads(model, removable(model_type)[0])
    model.save_pretrained(folder)
    return model, tiny_batch(model)


def test_load_pruned_fresh_process_gives_identical_logits(model_type, tmp_path):
    model, batch = pruned_checkpoint(model_type, tmp_path / "ckpt")
    reloaded = fresh_reload_logits(tmp_path / "ckpt", batch, tmp_path)
    torch.testing.assert_close(reloaded, logits(model, batch), atol=0, rtol=0)


def test_load_pruned_restores_every_tensor(model_type, tmp_path):
    model, _ = pruned_checkpoint(model_type, tmp_path / "ckpt")
    again = load_pruned(tmp_path / "ckpt")
    expected, got = model.state_dict(), again.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert again.config.to_dict()["hf_gradprune"] == model.config.to_dict()["hf_gradprune"]


def test_load_pruned_keeps_bf16(tmp_path):
    model = build_tiny("llama").to(torch.bfloat16)
    prune_heads(model, {1: [0, 1]})
    model.save_pretrained(tmp_path)
    assert {p.dtype for p in load_pruned(tmp_path).parameters()} == {torch.bfloat16}


def test_load_pruned_unpruned_checkpoint_loads_plainly(tmp_path):
    model = build_tiny("bert")
    model.save_pretrained(tmp_path)
    batch = tiny_batch(model)
    torch.testing.assert_close(logits(load_pruned(tmp_path), batch), logits(model, batch), atol=0, rtol=0)


def test_plain_from_pretrained_refuses_pruned_checkpoint(tmp_path):
    pruned_checkpoint("bert", tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch|mismatched"):
        BertForSequenceClassification.from_pretrained(tmp_path)


def test_load_pruned_record_disagreeing_with_weights_is_an_error(tmp_path):
    pruned_checkpoint("bert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hf_gradprune"]["pruned_heads"]["2"] = [0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match its pruning record.*encoder\.layer\.2\.attention"):
        load_pruned(tmp_path)


def test_load_pruned_missing_key_is_an_error(tmp_path):
    pruned_checkpoint("bert", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["bert.encoder.layer.0.attention.self.query.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing keys \['bert\.encoder\.layer\.0\.attention\.self\.query\.bias'\]"
    ):
        load_pruned(tmp_path)


def test_load_pruned_unexpected_key_is_an_error(tmp_path):
    pruned_checkpoint("bert", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra\.weight'\]"):
        load_pruned(tmp_path)


def test_load_pruned_without_safetensors_is_an_error(tmp_path):
    pruned_checkpoint("bert", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No model\.safetensors"):
        load_pruned(tmp_path)


def test_load_pruned_unknown_keyword_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"unsupported keyword arguments \['ignore_mismatched_sizes'\]"):
        load_pruned(tmp_path, ignore_mismatched_sizes=True)


def test_save_state_round_trips_nested_training_state_without_pickle(tmp_path):
    model = build_tiny("bert").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(**tiny_batch(model)).loss.backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "python": random.getstate(), "numpy": np.random.get_state()}
    save_state(state, tmp_path, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_state(tmp_path, "state")
    assert (
        back["python"] == state["python"]
        and back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    )
    assert all(np.array_equal(a, b) for a, b in zip(back["numpy"], state["numpy"], strict=True))
    for index, moments in state["optimizer"]["state"].items():
        assert all(torch.equal(back["optimizer"]["state"][index][k], v) for k, v in moments.items())
    optimizer.load_state_dict(back["optimizer"])


def test_save_state_refuses_objects_that_need_pickle(tmp_path):
    with pytest.raises(TypeError, match=r"Cannot store object at 'state\.x' without pickle"):
        save_state({"x": object()}, tmp_path, "state")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("heads", [{0: [1]}, {}])
def test_load_pruned_reapplies_saved_masks_so_training_keeps_zeros(heads, tmp_path):
    model = build_tiny("bert")
    prune_heads(model, heads)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    mask = torch.rand(model.get_parameter(query).shape, generator=torch.Generator().manual_seed(0)) > 0.5
    apply_masks(model, {query: mask})
    model.save_pretrained(tmp_path)
    save_masks(get_masks(model), tmp_path / MASKS_FILENAME)
    again = load_pruned(tmp_path).train()
    assert torch.equal(get_masks(again)[query], mask)
    optimizer = torch.optim.AdamW(again.parameters(), lr=0.1)
    for seed in range(3):
        again(**tiny_batch(again, seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.count_nonzero(again.get_parameter(query).detach()[~mask]) == 0
    assert not get_masks(load_pruned(tmp_path, apply_weight_masks=False))


@pytest.mark.parametrize("where", ["missing/run/ckpt", "./ckpt", "/no/such/folder", "model.safetensors"])
def test_load_pruned_local_path_that_is_no_folder_is_a_clear_error(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"`path_or_repo_id` .* is not a folder"):
        load_pruned(where)
