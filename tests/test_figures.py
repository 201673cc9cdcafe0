"""benchmarks/figures.py: quoted figures checked against their results files."""

from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["figures"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    rows = [
        {"name": "dense", "perplexity": 49.3399, "2:4": 102.7491},
        {"name": "half FLOPs", "perplexity": 166.4552},
    ]
    (folder / "recovery.json").write_text(json.dumps({"benchmark": "recovery", "smollm2": {"rows": rows}}))
    return folder


def check(figures, results: Path, tmp_path: Path, text: str) -> list[str]:
    document = tmp_path / "README.md"
    document.write_text(text)
    return [str(error) for error in figures.check_document(document, results)]


HALF, DENSE = "smollm2.rows[name=half FLOPs].perplexity", "smollm2.rows[name=dense].perplexity"
MARK = f"<!-- fig recovery.json {HALF} -->"
RATIO = f"<!-- fig recovery.json {HALF} / {DENSE} -->"


def test_figures_equal_to_their_printed_rounding_pass(figures, results, tmp_path):
    by_key = "<!-- fig recovery.json smollm2.rows[name=dense][2:4] -->"  # a key that is no identifier
    text = f"| half | **166.5**{MARK} | 3.37x{RATIO} | 102.7{by_key} |\n"
    assert check(figures, results, tmp_path, text) == []


def test_a_changed_figure_fails_naming_both_values(figures, results, tmp_path):
    (error,) = check(figures, results, tmp_path, f"ratio 3.38x{RATIO}\n")
    assert "README.md:1" in error and "prints 3.38" in error and "gives 3.37" in error


def test_a_missing_file_or_key_fails(figures, results, tmp_path):
    errors = check(
        figures,
        results,
        tmp_path,
        "a 1.0<!-- fig gone.json x -->\nb 2.0<!-- fig recovery.json smollm2.rows[name=nope].perplexity -->\n",
    )
    assert len(errors) == 2 and "gone.json is not a results file" in errors[0] and "name='nope'" in errors[1]


def test_a_figure_without_a_source_fails_outside_code(figures, results, tmp_path):
    row = f"| a | 0.801 | 1.76–1.92x | `--x 0.5` | 166.5{MARK} |"
    code = "```bash\nrun --sparsity 0.5   # 1.22x\n```"
    text = f"{row}\n{code}\nIt ends at 0.53. Not `torch 2.13.0`, nor 2.13.0.\n"
    errors = check(figures, results, tmp_path, text)
    assert [e.split(": ", 1)[1] for e in errors] == [
        f"figure {figure} has no source marker" for figure in ("0.801", "1.76", "1.92", "0.53")
    ]
    assert [e.split(": ", 1)[0][-11:] for e in errors] == 3 * ["README.md:1"] + ["README.md:5"]


def test_a_results_file_older_than_the_code_it_measures_is_a_warning(figures, tmp_path):
    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "measured.py").write_text("A = 1\n")
    (tmp_path / "benchmarks" / "speed.py").write_text('MEASURES = ("measured.py",)\n')
    git("add", "-A")
    git("commit", "-qm", "first")
    results = tmp_path / "benchmarks" / "results" / "speed.json"
    results.write_text(json.dumps({"benchmark": "speed", "commit": git("rev-parse", "HEAD")}))
    assert figures.stale_results(results.parent, tmp_path) == []
    (tmp_path / "measured.py").write_text("A = 2\n")
    git("commit", "-qam", "second")
    (warning,) = figures.stale_results(results.parent, tmp_path)
    assert "speed.json" in str(warning) and "1 later commit(s) changed what it measures (measured.py)" in str(
        warning
    )
    # A file of another run of the same script, from before results recorded their commit: by its date.
    variant = results.with_name("speed_mmap_threshold.json")
    variant.write_text(json.dumps({"benchmark": "speed_mmap_threshold", "date": "2000-01-01T00:00:00+00:00"}))
    assert [w.where for w in figures.stale_results(results.parent, tmp_path)] == [
        "speed.json",
        "speed_mmap_threshold.json",
    ]
    later = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).isoformat()
    variant.write_text(json.dumps({"benchmark": "speed_mmap_threshold", "date": later}))
    assert [w.where for w in figures.stale_results(results.parent, tmp_path)] == ["speed.json"]
    # A measured module that moved is followed through the move: the change before it still counts.
    (tmp_path / "pkg").mkdir()
    git("mv", "measured.py", "pkg/measured.py")
    (tmp_path / "benchmarks" / "speed.py").write_text('MEASURES = ("pkg/measured.py",)\n')
    git("commit", "-qam", "moved")
    (warning,) = figures.stale_results(results.parent, tmp_path)
    assert "2 later commit(s) changed what it measures (pkg/measured.py)" in str(warning)


def test_update_rewrites_the_figures_of_a_rerun_file_at_their_printed_digits(figures, results, tmp_path):
    other = tmp_path / "results" / "other.json"
    other.write_text(json.dumps({"value": 2.0}))
    document = tmp_path / "README.md"
    document.write_text(f"**166.4**{MARK} and 3.4x{RATIO}, -1.50<!-- fig other.json value -->\n")
    changes = figures.update_document(document, {"recovery.json"}, results)
    assert [str(change) for change in changes] == ["README.md:1: 166.4 -> 166.5 (recovery.json)"]
    # 3.37 printed with one decimal is 3.4 already; other.json was not named, so its figure stays.
    assert document.read_text() == f"**166.5**{MARK} and 3.4x{RATIO}, -1.50<!-- fig other.json value -->\n"
    assert check(figures, results, tmp_path, document.read_text()) == [
        "README.md:1: prints -1.5, other.json gives 2"
    ]


def test_the_documents_of_this_repository_pass(figures):
    assert figures.main([]) == 0
