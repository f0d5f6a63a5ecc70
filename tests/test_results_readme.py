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
def test_readme_tables_are_made_from_the_results_files(argv, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    import results_tables

    results_tables.main(argv)  # the command as listed, through the script's own argument parser
    readme = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]  # a table in a list is indented
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README rows not as {argv[0]} makes them: {missing}"


def test_readme_compare_example_is_the_committed_output():
    written = (ROOT / "docs" / "results" / "compare_seed1" / "comparison.md").read_text().splitlines()
    rows = [line for line in written if line.startswith("|")]
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(rows) == 2 + 3 + 2 + 3  # two tables: three runs, then their three pairs
    assert [row for row in rows if row not in readme] == []


def test_compare_example_is_what_the_table_writer_makes_of_its_csv_files():
    import csv

    from fmnist_lightning.compare import COLUMNS, comparison_markdown

    folder = ROOT / "docs" / "results" / "compare_seed1"
    kinds = {"parameters": int, "model": str}
    with (folder / "comparison.csv").open() as f:
        rows = [
            {"run": r["run"], **{k: kinds.get(k, float)(r[title]) for k, title in COLUMNS}} for r in csv.DictReader(f)
        ]
    with (folder / "mcnemar.csv").open() as f:
        tests = [
            {**t, "a_right_b_wrong": int(t["a_right_b_wrong"]), "a_wrong_b_right": int(t["a_wrong_b_right"])}
            | {"p_value": float(t["p_value"])}
            for t in csv.DictReader(f)
        ]
    assert (folder / "comparison.md").read_text() == comparison_markdown(rows, tests)
