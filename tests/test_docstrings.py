"""Every ``>>>`` example in the package's docstrings runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import hf_gradprune

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(hf_gradprune.__path__, "hf_gradprune.")
    if ".metrics." not in info.name and info.name != "hf_gradprune.testing.hub"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
