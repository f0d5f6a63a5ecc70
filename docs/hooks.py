"""MkDocs hook: the results pages' tables, made at build time from the committed results files.

A page's source holds markers instead of tables; :func:`expand` replaces each with what it stands for:

- ``<!-- results: zoo_tinyvgg.csv --pair "tinyvgg.yaml --trainer.precision=bf16-mixed" "fashioncnn.yaml" -->``:
  the tables ``benchmarks/results_tables.py`` prints for these files of ``docs/results/`` and these
  pairs (the arguments are the script's own, read with shell quoting), through its ``render``;
- ``<!-- results: --headline zoo_airbench.csv airbench_wide.yaml --headline time_to_accuracy_fast.csv fast -->``:
  one summary row per named run, from any of those files (the script's ``--headline``);
- ``<!-- include: results/studies/study004_grid.md -->``: a markdown file of ``docs/`` as it is,
  its headings moved two levels down (``shift=3`` after the file: three) to sit under the page's own.

A missing file, an unknown marker or a table the script refuses raises, so ``mkdocs build --strict``
fails instead of publishing a page without its table. ``tests/test_docs.py`` calls :func:`expand` on
every page.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
RESULTS = DOCS / "results"

#: Any marker this hook owns; one that does not parse is an error, not a comment left in the page.
ANY_MARKER = re.compile(r"<!--\s*(results|include)\b(.*?)-->", re.DOTALL)
HEADING = re.compile(r"^(#{1,4}) ", re.MULTILINE)
#: Sphinx roles in docstrings (``:class:`X```) that mkdocstrings leaves as text before the code span.
SPHINX_ROLE = re.compile(r":(?:class|func|data|mod|meth|attr|exc|obj):(?=<code>)")


class MarkerError(Exception):
    """A results marker that cannot be rendered: a missing file, bad arguments, a refused table."""


def _results_tables() -> ModuleType:
    """``benchmarks/results_tables.py``, imported from its path (benchmarks/ is not a package)."""
    if "results_tables" in sys.modules:
        return sys.modules["results_tables"]
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "benchmarks" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_tables"] = module
    spec.loader.exec_module(module)
    return module


def parse_results(arguments: str) -> tuple[list[Path], list[tuple[str, str]], list[tuple[Path, str]]]:
    """A results marker's files (``docs/results/``), ``--pair A B`` and ``--headline FILE NAME``, as the script's."""
    words = shlex.split(arguments)
    paths: list[Path] = []
    pairs: list[tuple[str, str]] = []
    headlines: list[tuple[Path, str]] = []
    while words:
        word = words.pop(0)
        if word in ("--pair", "--headline"):
            if len(words) < 2 or words[0].startswith("--") or words[1].startswith("--"):
                raise MarkerError(f"{word} takes two arguments: {arguments.strip()!r}")
            first, second = words.pop(0), words.pop(0)
            if word == "--pair":
                pairs.append((first, second))
            else:
                headlines.append((RESULTS / first, second))
        elif word.startswith("-"):
            raise MarkerError(f"unknown option {word!r} in results marker {arguments.strip()!r}")
        else:
            paths.append(RESULTS / word)
    if not paths and not headlines:
        raise MarkerError(f"results marker without a file: {arguments.strip()!r}")
    if paths and headlines:
        raise MarkerError(f"results marker with both files and --headline rows: {arguments.strip()!r}")
    missing = [str(p.relative_to(ROOT)) for p in [*paths, *(f for f, _ in headlines)] if not p.is_file()]
    if missing:
        raise MarkerError(f"results marker names missing files: {', '.join(missing)}")
    return paths, pairs, headlines


def render_results(arguments: str) -> str:
    """The markdown ``results_tables.py`` prints for a results marker's arguments."""
    paths, pairs, headlines = parse_results(arguments)
    try:
        if headlines:
            if pairs:
                raise ValueError("--pair is for whole zoo files, not --headline rows")
            return _results_tables().headline_table(headlines)
        return _results_tables().render(paths, pairs)
    except ValueError as err:
        raise MarkerError(f"results_tables.py refused {arguments.strip()!r}: {err}") from err


def render_include(arguments: str) -> str:
    """A markdown file of ``docs/``, its headings two levels down (``shift=N``: N levels)."""
    words = shlex.split(arguments)
    shift = 2
    if len(words) == 2 and re.fullmatch(r"shift=[0-5]", words[1]):
        shift = int(words.pop()[len("shift=") :])
    if len(words) != 1:
        raise MarkerError(f"include takes one file and an optional shift=N: {arguments.strip()!r}")
    path = DOCS / words[0]
    if not path.is_file() or DOCS.resolve() not in path.resolve().parents:
        raise MarkerError(f"include names a missing file: docs/{words[0]}")
    text = path.read_text()
    return HEADING.sub(lambda m: "#" * min(len(m.group(1)) + shift, 6) + " ", text).strip()


def expand(markdown: str) -> str:
    """A page's markdown with every results and include marker replaced by what it stands for.

    Raises:
        MarkerError: If a marker names a missing file, has bad arguments, or its table is refused.
    """

    def replace(match: re.Match) -> str:
        kind, arguments = match.group(1), match.group(2)
        if not arguments.startswith(":"):
            raise MarkerError(f"marker without a colon: {match.group(0)!r}")
        arguments = arguments[1:]
        if kind == "include":
            return render_include(arguments)
        # in a block of its own (md_in_html), so that the stylesheet keeps its cells on one line
        return f'<div class="results-table" markdown>\n\n{render_results(arguments)}\n\n</div>'

    return ANY_MARKER.sub(replace, markdown)


def markers(markdown: str) -> list[str]:
    """The markers of a page, as written (for the tests)."""
    return [m.group(0) for m in ANY_MARKER.finditer(markdown)]


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs: every page's markers rendered before the page is converted."""
    try:
        return expand(markdown)
    except MarkerError as err:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page.file.src_uri}: {err}") from err


def on_page_content(html: str, page, config, files) -> str:
    """MkDocs: docstrings' Sphinx roles (``:class:`X```) shown as the plain code span they name."""
    return SPHINX_ROLE.sub("", html)
