import math

import pytest
import torch

from hf_gradprune import select_heads_to_prune


def test_select_heads_per_layer_takes_lowest():
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    assert select_heads_to_prune(scores, per_layer=2) == {0: [1, 3], 1: [0, 1]}


def test_select_heads_fraction_ranks_globally_and_keeps_minimum():
    scores = torch.tensor([[0.01, 0.02, 0.03], [0.5, 0.6, 0.7]])
    # 4 of 6 heads: layer 0 may lose only 2 (min 1 kept), the 4th comes from layer 1.
    assert select_heads_to_prune(scores, fraction=0.7, min_heads_per_layer=1) == {0: [0, 1], 1: [0, 1]}


def test_select_heads_skips_already_removed():
    scores = torch.tensor([[math.nan, 0.1, 0.3, 0.2]])
    assert select_heads_to_prune(scores, per_layer=1) == {0: [1]}


def test_select_heads_gqa_removes_whole_groups_by_summed_importance():
    # 6 query heads, 3 kv groups of 2: group sums 0.9, 0.3, 0.8 -> group 1 (heads 2, 3) goes.
    scores = torch.tensor([[0.8, 0.1, 0.15, 0.15, 0.4, 0.4]])
    assert select_heads_to_prune(scores, per_layer=1, num_key_value_heads=3) == {0: [2, 3]}


def test_select_heads_gqa_fraction_counts_groups():
    scores = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]])
    assert select_heads_to_prune(scores, fraction=0.5, num_key_value_heads=2) == {0: [0, 1], 1: [0, 1]}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of `per_layer` and `fraction`"),
        ({"per_layer": 1, "fraction": 0.1}, "exactly one of `per_layer` and `fraction`"),
        ({"per_layer": 4}, r"`per_layer` must be in \[0, 3\]"),
        ({"per_layer": -1}, r"`per_layer` must be in \[0, 3\]"),
        ({"fraction": 1.0}, r"`fraction` must be in \[0, 1\)"),
        ({"per_layer": 1, "min_heads_per_layer": -1}, "`min_heads_per_layer` must be >= 0"),
        ({"per_layer": 1, "num_key_value_heads": 3}, "`num_key_value_heads` must divide the 4 query heads"),
    ],
)
def test_select_heads_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_heads_to_prune(torch.rand(2, 4), **kwargs)
