import dataclasses
import warnings

import pytest
from transformers import HfArgumentParser

from hf_gradprune import PruningArguments


def parse(*flags: str) -> PruningArguments:
    (args,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(list(flags))
    return args


def test_pruning_arguments_parse_flags():
    args = parse(
        "--prune_heads_per_layer",
        "1",
        "--weight_sparsity",
        "0.5",
        "--prune_steps",
        "500,0",
        "--prune_target_modules",
        "query",
        "value",
        "--sparsity_scope",
        "global",
    )
    assert (args.prune_heads_per_layer, args.weight_sparsity, args.sparsity_scope) == (1, 0.5, "global")
    assert args.prune_step_list == [0, 500] and args.prune_target_modules == ["query", "value"]


def test_pruning_arguments_n_m_sets_sparsity():
    assert parse("--sparsity_pattern", "2:4").weight_sparsity == 0.5


def test_pruning_arguments_choices_reach_the_cli():
    with pytest.raises(SystemExit):
        parse("--weight_importance", "random")


def test_pruning_arguments_nothing_to_prune_warns():
    with pytest.warns(UserWarning, match="prune nothing"):
        PruningArguments()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"prune_heads_per_layer": 1, "prune_heads_fraction": 0.1},
            "at most one of `--prune_heads_per_layer`",
        ),
        ({"prune_heads_per_layer": -1}, r"`--prune_heads_per_layer` must be >= 0, got -1"),
        ({"prune_heads_fraction": 1.0}, r"`--prune_heads_fraction` must be in \[0, 1\), got 1.0"),
        ({"weight_sparsity": 1.2}, r"`--weight_sparsity` must be in \[0, 1\), got 1.2"),
        (
            {"weight_sparsity": 0.5, "weight_importance": "l1"},
            r"`--weight_importance` must be one of .*got 'l1'",
        ),
        (
            {"weight_sparsity": 0.5, "sparsity_pattern": "4:2"},
            r"`--sparsity_pattern` must be `unstructured` or N:M",
        ),
        ({"weight_sparsity": 0.7, "sparsity_pattern": "2:4"}, r"implies `--weight_sparsity` 0.5, got 0.7"),
        ({"weight_sparsity": 0.5, "prune_steps": "0,x"}, r"`--prune_steps` must be comma-separated"),
        ({"weight_sparsity": 0.5, "prune_steps": "-5"}, r"`--prune_steps` needs at least one step, all >= 0"),
        ({"weight_sparsity": 0.5, "sparsity_schedule": "cubic"}, r"needs 0 <= `--sparsity_schedule_start`"),
        ({"weight_sparsity": 0.5, "importance_batches": 0}, r"`--importance_batches` must be >= 1, got 0"),
    ],
)
def test_pruning_arguments_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningArguments(**kwargs)


@pytest.mark.parametrize(
    ("flag", "value", "switch"),
    [
        ("layer_importance", "block_influence", "--prune_layers"),
        ("mask_tuning_method", "least_squares", "--mask_tuning"),
        ("measure_speedup", True, "--prune_layers"),
        ("weight_reconstruction", "least_squares", "--weight_sparsity"),
        ("sequential_calibration", True, "--weight_sparsity"),
        ("prune_target_modules", [r"\.mlp\."], "--weight_sparsity"),
        ("gblm_alpha", 10.0, "--weight_importance gblm"),
        ("sparsity_schedule_start", 10, "--sparsity_schedule linear"),
        ("sparsity_schedule_end", 100, "--sparsity_schedule linear"),
        ("sparsity_schedule_frequency", 5, "--sparsity_schedule linear"),
    ],
)
def test_pruning_arguments_warn_when_a_flag_s_feature_is_off(flag, value, switch):
    other = {"weight_sparsity": 0.5} if "weight" not in switch else {"prune_heads_per_layer": 1}
    with pytest.warns(
        UserWarning, match=rf"`--{flag} .*` shapes .*, which is off: it is ignored \(set `{switch}"
    ):
        PruningArguments(**other, **{flag: value})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"weight_sparsity": None, "sparsity_pattern": "3:2"},
            r"`--weight_sparsity` must be a float, got None",
        ),
        ({"prune_heads_per_layer": True}, r"`--prune_heads_per_layer` must be an int or None, got True"),
        ({"distill_alpha": "0.5"}, r"`--distill_alpha` must be a float, got '0.5'"),
        ({"prune_target_modules": ["query", 3]}, r"`--prune_target_modules` must be a list of str"),
        ({"mask_tuning": 1}, r"`--mask_tuning` must be a bool, got 1"),
    ],
)
def test_pruning_arguments_wrong_types_name_the_flag_before_any_comparison(overrides, match):
    with pytest.raises(TypeError, match=match):
        PruningArguments(**overrides)


#: Flags that turn a feature on.
SWITCHES = {
    "prune_heads_per_layer": 1,
    "prune_heads_fraction": 0.25,
    "prune_layers": 1,
    "prune_ffn_fraction": 0.25,
    "prune_units_per_layer": "ffn=3",
    "prune_units_fraction": "ffn=0.25",
    "target_flops_ratio": 0.5,
    "weight_sparsity": 0.5,
    "sparsity_pattern": "2:4",
    "distill_alpha": 0.5,
}
#: Flags that act whatever is pruned: the FLOPs the logs and card report; the export format of the save.
ALWAYS_USED = {"flops_seq_len": 64, "export_vanilla": True}
#: Every other flag, at a value of its own: each shapes a feature that is off when it alone is set.
SHAPERS = {
    "prune_min_heads_per_layer": 2,
    "head_importance_normalize": "l2",
    "head_importance_accumulate": "sum_of_abs",
    "layer_importance": "block_influence",
    "prune_flops_structures": "heads",
    "prune_ffn_multiple_of": 32,
    "uniform_per_layer": True,
    "allow_empty_layers": True,
    "prune_rounds": 3,
    "measure_speedup": True,
    "mask_tuning": True,
    "mask_tuning_method": "least_squares",
    "weight_importance": "fisher",
    "sequential_calibration": True,
    "scoring_passes": 2,
    "weight_reconstruction": "least_squares",
    "weight_sparsity_allocation": "owl",
    "gblm_alpha": 10.0,
    "sparsity_scope": "per_row",
    "prune_target_modules": ["query"],
    "prune_steps": "5",
    "sparsity_schedule": "linear",
    "sparsity_schedule_start": 2,
    "sparsity_schedule_end": 10,
    "sparsity_schedule_frequency": 3,
    "importance_batches": 3,
    "distill_temperature": 3.0,
    "distill_hidden_states": True,
    "teacher_model_name_or_path": "org/teacher",
}

#: What a flag needs beside it to be valid at all.
COMPANIONS = {"sparsity_schedule": {"sparsity_schedule_end": 10}}


def test_every_flag_is_a_switch_always_used_or_warned_about_when_its_feature_is_off():
    names = {f.name for f in dataclasses.fields(PruningArguments)}
    assert names == set(SWITCHES) | set(ALWAYS_USED) | set(SHAPERS)  # a new flag is classified here
    for name, value in SHAPERS.items():
        assert value != PruningArguments.defaults()[name], name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                PruningArguments(**{name: value, **COMPANIONS.get(name, {})})
            except ValueError as error:  # refused outright, naming the flag and what it needs
                assert f"`--{name}`" in str(error) and "set `--" in str(error), (name, error)
                continue
        assert any(f"`--{name} " in str(w.message) and "is ignored" in str(w.message) for w in caught), name


@pytest.mark.parametrize("name", sorted(SHAPERS))
def test_a_flag_whose_feature_is_on_is_not_called_ignored(name):
    on = {
        "prune_heads_per_layer": 1,
        "prune_ffn_fraction": 0.25,
        "weight_sparsity": 0.5,
        "distill_alpha": 0.5,
    }
    special = {
        "layer_importance": {"prune_layers": 1},
        "prune_flops_structures": {
            "target_flops_ratio": 0.5,
            "prune_heads_per_layer": None,
            "prune_ffn_fraction": None,
        },
        "prune_ffn_multiple_of": {
            "target_flops_ratio": 0.5,
            "prune_heads_per_layer": None,
            "prune_ffn_fraction": None,
        },
        "gblm_alpha": {"weight_importance": "gblm"},
        "sparsity_schedule_start": {"sparsity_schedule": "linear", "sparsity_schedule_end": 10},
        "sparsity_schedule_end": {"sparsity_schedule": "linear"},
        "sparsity_schedule_frequency": {"sparsity_schedule": "linear", "sparsity_schedule_end": 10},
        "mask_tuning_method": {"mask_tuning": True},
        "prune_steps": {"sparsity_schedule": "one_shot"},
        "sparsity_schedule": {"sparsity_schedule_end": 10, "prune_heads_per_layer": None},
    }
    settings = {**on, **special.get(name, {}), name: SHAPERS[name]}
    settings = {k: v for k, v in settings.items() if v is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PruningArguments(**settings)
    assert not any(f"`--{name} " in str(w.message) and "is ignored" in str(w.message) for w in caught)
