import random

import pytest
from sklearn.metrics import accuracy_score, f1_score

from hf_gradprune.metrics import load_metric


@pytest.fixture(scope="module")
def labels() -> tuple[list[int], list[int]]:
    rng = random.Random(0)
    return [rng.randint(0, 2) for _ in range(200)], [rng.randint(0, 2) for _ in range(200)]


def test_shipped_accuracy_equals_sklearn(labels):
    predictions, references = labels
    got = load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    assert got == pytest.approx(accuracy_score(references, predictions))


@pytest.mark.parametrize("average", ["binary", "macro"])
def test_shipped_f1_equals_sklearn(labels, average):
    predictions, references = labels
    if average == "binary":
        predictions, references = [min(p, 1) for p in predictions], [min(r, 1) for r in references]
    got = load_metric("f1").compute(predictions=predictions, references=references, average=average)["f1"]
    assert got == pytest.approx(f1_score(references, predictions, average=average))


def test_load_metric_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`name` must be one of accuracy, f1, got 'bleu'"):
        load_metric("bleu")


def test_shipped_f1_unknown_average_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`average` must be one of binary, macro, got 'weighted'"):
        load_metric("f1").compute(predictions=[1], references=[1], average="weighted")
