"""The README's results tables are the ones benchmarks/results_tables.py makes from docs/results/."""

import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def table_commands() -> list[list[str]]:
    """The results_tables.py command lines listed in docs/results/README.md (continuations joined)."""
    text = (ROOT / "docs" / "results" / "README.md").read_text().replace("\\\n", " ")
    prefix = "python benchmarks/results_tables.py "
    return [shlex.split(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("argv", table_commands(), ids=lambda argv: Path(argv[0]).name)
def test_readme_tables_are_made_from_the_results_files(argv, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import results_tables

    path, pairs = ROOT / argv[0], [tuple(argv[i + 1 : i + 3]) for i, a in enumerate(argv) if a == "--pair"]
    readme = (ROOT / "README.md").read_text().splitlines()
    rows = [line for line in results_tables.render(path, pairs).splitlines() if line.startswith("| ")]
    assert rows
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README rows not as {argv[0]} makes them: {missing}"
