"""Check the figures the documents quote against the results files they come from.

A quoted figure carries a marker right after it, invisible in rendered Markdown::

    perplexity **33.8**<!-- fig sft.json rows[name=2:4 + SFT].perplexity -->
    3.37x<!-- fig recovery.json rows[name=half].perplexity / rows[name=dense].perplexity -->

The marker names a file of ``benchmarks/results/`` and an expression over its keys: dotted paths,
``[index]``, ``[key]`` for a key that is no identifier, and ``[key=value]`` list selectors (a row by its
``name``; several conditions joined by ``&``),
numbers, ``+ - * /`` and parentheses. The number right before the marker (a trailing ``x``, ``%``, ``k``,
``M`` or ``G`` is read as printed; the expression gives the number in that unit) must equal the expression
to its printed rounding: ``33.8`` holds ``33.75`` to ``33.85``.

Every decimal figure of the documents (``0.783``, ``3.37x``, ``45.5%``; not one in a fenced code block, nor
a flag's value or a version in inline code) must carry a marker: a figure without one is an error, as is a
marker whose file, key or value is wrong.

A results file is stale when a module its benchmark measures (the script's ``MEASURES``) changed in a commit
after the one the file records: those are listed as warnings, not errors.

Run: ``.venv/bin/python benchmarks/figures.py`` (``make test`` runs it); exit status 1 on an error. After a
rerun, ``--update heads_curve.json ...`` rewrites the figures marked with those files at their printed digits
and prints each change, for a reader to check the prose around it.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = ("README.md", "benchmarks/README.md", "docs/scaling.md")
MARKER = re.compile(r"<!--\s*fig\s+(?P<file>\S+\.json)\s+(?P<expression>.+?)\s*-->")
FIGURE = re.compile(r"(?<![\w.])[-−]?\d[\d,]*\.\d+(?!\d|\.\d)")
PRINTED = re.compile(r"([-−]?\d[\d,]*(?:\.\d+)?)[x%MkG]?\**\s*$")
CODE = re.compile(r"`[^`]*`")
MARKED = re.compile(r"[x%MkG]?\**\s*<!--\s*fig\s")
FENCE = "```"
PATH = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*|\[[^\]]+\])*")
OPERATORS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


@dataclass
class Finding:
    """One error or warning, where it is and why."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def lookup(data: Any, path: str) -> Any:
    """The value at ``path`` (``a.b[2].c``, ``rows[name=2:4].perplexity``) in ``data``."""
    for part in re.findall(r"[^.\[\]]+|\[[^\]]+\]", path):
        if part.startswith("["):
            selector = part[1:-1]
            if "=" in selector:  # key=value, several joined by &
                wanted = dict(condition.split("=", 1) for condition in selector.split("&"))
                matches = [row for row in data if all(str(row.get(k)) == v for k, v in wanted.items())]
                if len(matches) != 1:
                    shown = " and ".join(f"{k}={v!r}" for k, v in wanted.items())
                    raise KeyError(f"{len(matches)} rows with {shown}")
                data = matches[0]
            elif selector.isdigit():
                data = data[int(selector)]
            else:  # a key that is no identifier: [50% per row]
                data = data[selector]
        else:
            data = data[part]
    return data


def evaluate(expression: str, data: Any) -> float:
    """``expression`` over the key paths of ``data``, with numbers, ``+ - * /`` and parentheses."""
    names: dict[str, float] = {}

    def name(match: re.Match) -> str:
        key = f"_v{len(names)}"
        names[key] = float(lookup(data, match.group(0)))
        return key

    tree = ast.parse(PATH.sub(name, expression), mode="eval")

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        raise ValueError(f"not a figure expression: {ast.unparse(node)}")

    return walk(tree)


def printed_value(text: str) -> tuple[float, float] | None:
    """The number ``text`` ends with and half a unit of its last printed digit."""
    match = PRINTED.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "").replace("−", "-")
    decimals = len(number.split(".")[1]) if "." in number else 0
    return float(number), 0.5 * 10.0**-decimals


def markers(document: Path) -> Iterator[tuple[int, str, re.Match]]:
    """``(line number, text before the marker, marker)`` of every marker in ``document``."""
    for number, line in enumerate(document.read_text().splitlines(), start=1):
        for match in MARKER.finditer(line):
            yield number, line[: match.start()], match


def check_document(document: Path, results: Path = RESULTS) -> list[Finding]:
    """The errors of ``document``: marked figures that differ from their source, and figures with no marker
    outside code."""
    errors: list[Finding] = []
    loaded: dict[str, Any] = {}
    name = document.relative_to(ROOT).as_posix() if document.is_relative_to(ROOT) else document.name
    for number, before, marker in markers(document):
        where = f"{name}:{number}"
        printed = printed_value(before)
        if printed is None:
            errors.append(Finding(where, f"no figure before the marker {marker.group(0)!r}"))
            continue
        file = marker.group("file")
        if file not in loaded:
            path = results / file
            if not path.is_file():
                errors.append(Finding(where, f"{file} is not a results file in {results.name}/"))
                continue
            loaded[file] = json.loads(path.read_text())
        try:
            value = evaluate(marker.group("expression"), loaded[file])
        except (KeyError, IndexError, TypeError, ValueError) as error:
            errors.append(Finding(where, f"{file} {marker.group('expression')}: {error}"))
            continue
        shown, tolerance = printed
        if abs(abs(value) - abs(shown)) > tolerance * (1 + 1e-9):
            errors.append(Finding(where, f"prints {shown:g}, {file} gives {value:.6g}"))
    fenced = False
    for number, line in enumerate(document.read_text().splitlines(), start=1):
        if line.lstrip().startswith(FENCE):
            fenced = not fenced
        if fenced or line.lstrip().startswith(FENCE):
            continue
        plain = CODE.sub(_blank, MARKER.sub(_blank, line))  # no figures in markers, nor flag values in `code`
        for figure in FIGURE.finditer(plain):
            if not MARKED.match(line, figure.end()):
                errors.append(Finding(f"{name}:{number}", f"figure {figure.group(0)} has no source marker"))
    return errors


def update_document(document: Path, files: set[str], results: Path = RESULTS) -> list[Finding]:
    """Rewrite each figure of ``document`` marked with one of ``files`` to its source's value, at the
    digits it is printed with; the changes, for a reader to check the prose around them."""
    changes: list[Finding] = []
    lines = document.read_text().splitlines(keepends=True)
    name = document.relative_to(ROOT).as_posix() if document.is_relative_to(ROOT) else document.name
    for index, line in enumerate(lines):
        for marker in reversed(list(MARKER.finditer(line))):  # from the right: offsets to the left hold
            file = marker.group("file")
            printed = PRINTED.search(line[: marker.start()])
            if file not in files or printed is None:
                continue
            value = evaluate(marker.group("expression"), json.loads((results / file).read_text()))
            old = printed.group(1)
            digits = old.lstrip("-−")
            decimals = len(digits.split(".")[1]) if "." in digits else 0
            new = f"{abs(value):{',' if ',' in digits else ''}.{decimals}f}"
            new = old[: len(old) - len(digits)] + new  # the sign as printed
            if new != old:
                line = line[: printed.start(1)] + new + line[printed.end(1) :]
                changes.append(Finding(f"{name}:{index + 1}", f"{old} -> {new} ({file})"))
        lines[index] = line
    if changes:
        document.write_text("".join(lines))
    return changes


def _blank(match: re.Match) -> str:
    """Spaces in place of ``match``, so the positions of the rest of the line stay."""
    return " " * len(match.group(0))


def stale_results(results: Path = RESULTS, root: Path = ROOT) -> list[Finding]:
    """Results files older than the last commit that changed a module their benchmark measures."""
    warnings: list[Finding] = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        measures = _measures(_script(root, data.get("command"), data.get("benchmark", path.stem)))
        if not measures:
            continue
        commit, date = data.get("commit"), data.get("date")
        if commit:
            since = [f"{commit}..HEAD"]
        elif date:  # written before results recorded their commit: the commits made after its date
            since = [f"--since={date}"]
        else:
            warnings.append(Finding(path.name, "records neither its commit nor its date"))
            continue
        changed = _changes(root, since, measures)
        if changed:
            count = len(changed)
            warnings.append(
                Finding(
                    path.name, f"{count} later commit(s) changed what it measures ({', '.join(measures)})"
                )
            )
    return warnings


def _script(root: Path, command: str | None, name: str) -> Path:
    """The benchmark script a results file came from: its recorded command's, else the script named like
    it (``scale_mmap_threshold`` is ``scale.py`` run with another allocator setting)."""
    if command:
        return root / command.split()[0]
    parts = name.split("_")
    for end in range(len(parts), 0, -1):
        script = root / "benchmarks" / f"{'_'.join(parts[:end])}.py"
        if script.is_file():
            return script
    return root / "benchmarks" / f"{name}.py"


def _measures(script: Path) -> list[str]:
    """The ``MEASURES`` tuple a benchmark script declares (read, not imported)."""
    if not script.is_file():
        return []
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MEASURES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def _changes(root: Path, since: list[str], paths: list[str]) -> set[str]:
    """The commits in ``since`` that changed ``paths``, each file followed through its renames (a module that
    moved is still the code it was)."""
    changed: set[str] = set()
    for path in paths:
        follow = ["--follow"] if (root / path).is_file() else []
        changed.update(_git(root, "log", "--format=%h", *follow, *since, "--", path).split())
    return changed


def _git(root: Path, *command: str) -> str:
    found = subprocess.run(["git", *command], capture_output=True, text=True, cwd=root)
    return found.stdout.strip() if found.returncode == 0 else ""


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    """Check the documents (exit status 1 on an error); ``--update FILE.json ...`` first rewrites the figures
    marked with those results files (after a rerun), printing each change."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", nargs="+", default=[], metavar="FILE.json", help="results files rerun")
    args = parser.parse_args(argv)
    unknown = [f for f in args.update if not (root / "benchmarks" / "results" / f).is_file()]
    if unknown:
        parser.error(f"--update: {unknown} are not files of benchmarks/results/")
    documents = [root / d for d in DOCUMENTS if (root / d).is_file()]
    for document in documents if args.update else []:
        for change in update_document(document, set(args.update), root / "benchmarks" / "results"):
            print(f"updated: {change}")
    errors = [e for document in documents for e in check_document(document)]
    for warning in stale_results(root / "benchmarks" / "results", root):
        print(f"warning: {warning}")
    for error in errors:
        print(f"error: {error}")
    checked = sum(1 for d in documents for _ in markers(d))
    print(f"figures: {checked} marked, {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
