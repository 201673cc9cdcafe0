"""A structure is a declaration: a family registered through its adapter alone, with a structure no other
family has, is pruned under a FLOPs budget and reloads; and no generic module tests a structure's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import HfArgumentParser, PretrainedConfig, PreTrainedModel, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_gradprune import PruningArguments, PruningRecord, PruningTrainer, load_pruned, register_adapter
from hf_gradprune.core.adapters import ArchitectureAdapter, Rows, Structure, ffn_neurons

SOURCE = Path(__file__).resolve().parents[1] / "src" / "hf_gradprune"


class TwoMlpConfig(PretrainedConfig):
    model_type = "test_two_mlp"

    def __init__(
        self, hidden_size: int = 16, num_hidden_layers: int = 3, a_size: int = 24, b_size: int = 20, **kw
    ):
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.a_size, self.b_size = a_size, b_size
        super().__init__(**kw)


class Mlp(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    """Two MLPs one after the other on the residual stream: ``a`` (declared as FFN neurons) and ``b`` (a
    structure of this family only)."""

    def __init__(self, config: TwoMlpConfig):
        super().__init__()
        self.a, self.b = Mlp(config.hidden_size, config.a_size), Mlp(config.hidden_size, config.b_size)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = x + self.a(x)
        return x + self.b(x)


class TwoMlpModel(PreTrainedModel):
    config_class = TwoMlpConfig
    base_model_prefix = "body"

    def __init__(self, config: TwoMlpConfig):
        super().__init__(config)
        self.embed = nn.Linear(8, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        for block in self.layers:
            hidden = block(hidden)
        return hidden


class TwoMlpForClassification(PreTrainedModel):
    config_class = TwoMlpConfig
    base_model_prefix = "body"

    def __init__(self, config: TwoMlpConfig):
        super().__init__(config)
        self.body, self.head = TwoMlpModel(config), nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.head(self.body(x))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# The whole declaration of the family: where the blocks are and what each one has.
register_adapter(
    ArchitectureAdapter(
        model_types=("test_two_mlp",),
        layers="layers",
        structures=(
            ffn_neurons(rows=("a.up",), output="a.down", residual="", units="a_size"),
            Structure(
                name="second_mlp", rows=(Rows("b.up"),), output="b.down", units="b_size", label="b neurons"
            ),
        ),
    )
)


def two_mlp_run(tmp_path, pruning: PruningArguments, max_steps: int = 2) -> PruningTrainer:
    """A ``PruningTrainer`` on a fresh two-MLP model and random rows, trained for ``max_steps``."""
    torch.manual_seed(0)
    model = TwoMlpForClassification(TwoMlpConfig())
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "x": torch.randn(64, 8, generator=generator).tolist(),
            "labels": torch.randint(0, 2, (64,), generator=generator).tolist(),
        }
    )
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8, use_cpu=True, report_to=[],
        disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruning_args=pruning)
    trainer.train()
    return trainer


def test_a_structure_declared_through_the_adapter_alone_is_pruned_under_a_flops_budget(tmp_path):
    pruning = PruningArguments(
        target_flops_ratio=0.4, prune_flops_structures="ffn,second_mlp,layers", importance_batches=2,
        flops_seq_len=1, prune_rounds=2,
    )  # fmt: skip
    trainer = two_mlp_run(tmp_path, pruning, max_steps=3)
    model = trainer.model
    record = PruningRecord.from_config(model.config)
    # Both structures of a block lost units, and whole layers (a structure of every family) ranked with them.
    assert record.pruned.get("second_mlp") and record.pruned.get("ffn") and record.removed_layers
    assert len(model.body.layers) == model.config.num_hidden_layers == 3 - len(record.removed_layers)
    kept_macs = sum(b.a.up.out_features * 2 * 16 + b.b.up.out_features * 2 * 16 for b in model.body.layers)
    assert kept_macs <= 0.4 * 3 * (24 + 20) * 2 * 16
    trainer.save_model()
    again = load_pruned(tmp_path / "out", model_class=TwoMlpForClassification)
    assert [(b.a.up.out_features, b.b.up.out_features) for b in again.body.layers] == [
        (b.a.up.out_features, b.b.up.out_features) for b in model.body.layers
    ]
    x = torch.randn(4, 8)
    torch.testing.assert_close(again(x).logits, model.eval()(x).logits)


@pytest.mark.parametrize(
    "flags",
    [
        ["--prune_units_fraction", "second_mlp=0.25,ffn=0.5"],
        ["--prune_units_per_layer", "second_mlp=5", "--prune_units_fraction", "ffn=0.5"],
    ],
)
def test_a_declared_structure_is_cut_by_a_count_or_a_fraction_from_the_command_line(tmp_path, flags):
    (pruning,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(
        [*flags, "--importance_batches", "1"]
    )
    model = two_mlp_run(tmp_path, pruning).model
    assert [(b.a.up.out_features, b.b.up.out_features) for b in model.body.layers] == [(12, 15)] * 3


def test_a_fraction_of_a_structure_the_family_lacks_or_of_whole_layers_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"has no prunable structure 'experts'; it has 'ffn', 'second_mlp'"):
        two_mlp_run(tmp_path, PruningArguments(prune_units_fraction="experts=0.5"))
    with pytest.raises(ValueError, match=r"'layers' are whole layers: remove them with `--prune_layers`"):
        two_mlp_run(tmp_path, PruningArguments(prune_units_fraction="layers=0.5"))


#: Where a structure's name may appear in code: the adapters (the declarations), the record (its stored
#: keys), the flags (their aliases), and the functions named for one structure or keeping its figure.
ALLOWED = {
    "core/record.py": None,
    "training/arguments.py": None,
    "training/argument_checks.py": None,
    "training/flag_values.py": None,
    "structured/surgery.py": {"prune_heads"},
    "structured/gates.py": {"UnitGates.__init__", "HeadGates.__init__"},
    "structured/importance.py": {"compute_unit_importance", "compute_head_importance"},
    "structured/selection.py": {"select_heads_to_prune"},
    # the report keys of prune_in_rounds and prune_layers_by_importance
    "structured/rounds.py": {"prune_to_flops", "prune_in_rounds", "prune_layers_by_importance"},
    "training/callback.py": {
        "GradientPruningCallback.head_importance",
        "GradientPruningCallback.resume_from",
        "GradientPruningCallback.prune_structures_now",
    },
    "io/figures.py": {"unit_sizes_figure"},
}


def structure_names_in_code(path: Path) -> list[tuple[int, str, str]]:
    """``(line, enclosing function, name)`` of every structure name in ``path``'s code (not docstrings)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = (
                f"{scope}.{child.name}".lstrip(".")
                if isinstance(child, (ast.FunctionDef, ast.ClassDef))
                else scope
            )
            if isinstance(child, ast.Name) and child.id in {"HEADS", "FFN", "LAYERS"}:
                found.append((child.lineno, scope, child.id))
            named = isinstance(child, ast.Constant) and child.value in {"heads", "ffn", "layers"}
            if named and id(child) not in docstrings:
                found.append((child.lineno, scope, repr(child.value)))
            visit(child, inner)

    visit(tree, "")
    return found


def test_no_generic_module_tests_a_structure_by_name():
    misplaced = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = path.relative_to(SOURCE).as_posix()
        if module.startswith("core/adapters/") or (module in ALLOWED and ALLOWED[module] is None):
            continue
        allowed = ALLOWED.get(module, set())
        misplaced += [f"{module}:{line} {scope} {name}" for line, scope, name in structure_names_in_code(path)
                      if scope not in allowed]  # fmt: skip
    assert misplaced == []
