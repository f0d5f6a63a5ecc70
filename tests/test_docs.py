"""The documentation: every results marker of the site renders from the committed results files, every
table command of docs/results/README.md is on the site, and the README stays a short front page."""

import ast
import csv
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
#: Phrases of how the package was built, which no page a user reads may hold.
HISTORY_PHRASES = (
    "issue 12",
    "the issue asked",
    "previous fast recipe",
    "earlier `fast.yaml`",
    "earlier `--json`",
    "throwaway script",
    "first machine",
    "this project had on the gpu",
)


def load_hooks():
    if "docs_hooks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["docs_hooks"] = module
        spec.loader.exec_module(module)
    return sys.modules["docs_hooks"]


def pages() -> list[Path]:
    """The site's pages: docs/**/*.md, without the results files (docs/results/ is data, not pages)."""
    return sorted(p for p in DOCS.rglob("*.md") if DOCS / "results" not in p.parents)


def table_commands() -> list[list[str]]:
    """The results_tables.py command lines listed in docs/results/README.md (continuations joined)."""
    text = (DOCS / "results" / "README.md").read_text().replace("\\\n", " ")
    prefix = "python benchmarks/results_tables.py "
    return [shlex.split(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]


def as_table(paths, pairs, headlines=()) -> tuple:
    return (
        tuple(Path(p).name for p in paths),
        tuple(tuple(p) for p in pairs),
        tuple((Path(f).name, name) for f, name in headlines),
    )


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_marker_of_a_page_renders(page):
    hooks = load_hooks()
    text = page.read_text()
    expanded = hooks.expand(text)  # raises on a missing file, bad arguments or a refused table
    assert not hooks.markers(expanded)
    for marker in hooks.markers(text):
        if "results:" in marker:
            rendered = hooks.render_results(marker.split("results:", 1)[1].removesuffix("-->"))
            assert rendered.startswith("| ")
            # every results table names its machine and date: below it, or in a column of each row
            header = [title.strip() for title in rendered.splitlines()[0].split("|")]
            assert "Machine: " in rendered or "machine; date" in header


def test_a_bad_marker_fails_the_build():
    hooks = load_hooks()
    with pytest.raises(hooks.MarkerError, match="missing"):
        hooks.expand("<!-- results: no_such_file.csv -->")
    with pytest.raises(hooks.MarkerError, match="refused"):
        hooks.expand("<!-- results: epoch_speed.csv --pair a.yaml b.yaml -->")
    with pytest.raises(hooks.MarkerError, match="missing"):
        hooks.expand("<!-- include: results/studies/none.md -->")
    with pytest.raises(hooks.MarkerError, match="colon"):
        hooks.expand("<!-- results zoo_small.csv -->")


def test_every_table_of_the_results_readme_is_rendered_on_the_site():
    hooks = load_hooks()
    on_site = set()
    for page in pages():
        for marker in hooks.markers(page.read_text()):
            if "results:" in marker:
                on_site.add(as_table(*hooks.parse_results(marker.split("results:", 1)[1].removesuffix("-->"))))
    commands = table_commands()
    assert commands
    for argv in commands:
        pairs, headlines, paths = [], [], []
        words = iter(argv)
        for word in words:
            if word == "--pair":
                pairs.append((next(words), next(words)))
            elif word == "--headline":
                headlines.append((next(words), next(words)))
            elif word.startswith("docs/results/"):
                paths.append(word)
        assert as_table(paths, pairs, headlines) in on_site, f"no results marker on the site for {argv}"


def test_a_headline_row_is_the_named_runs_mean_over_their_seeds():
    hooks = load_hooks()
    rendered = hooks.render_results(
        " --headline zoo_airbench.csv airbench_wide.yaml"
        ' --headline zoo_tinyvgg.csv "tinyvgg.yaml --trainer.precision=bf16-mixed"'
        " --headline time_to_accuracy_fast.csv fast"
    )
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in rendered.splitlines()[2:]]
    bf16 = "`tinyvgg.yaml` (`--trainer.precision=bf16-mixed`)"
    assert [r[0] for r in rows] == ["`airbench_wide.yaml`", bf16, "`fast.yaml`"]
    assert [r[1:3] for r in rows] == [["95.03 ± 0.13%", "3"], ["94.37 ± 0.08%", "3"], ["93.63 ± 0.10%", "3"]]
    assert rows[0][3] == "1723 ± 51 s (28.7 min)"
    assert rows[0][5].endswith("2026-12-02")
    assert rows[2][5] == "Intel(R) Xeon(R) Processor, 2 cores; 2026-12-01"
    with pytest.raises(hooks.MarkerError, match=r"has no full-length run 'tinyvgg\.yaml'"):
        hooks.render_results(" --headline zoo_tinyvgg.csv tinyvgg.yaml")  # its rows are bf16: name the override
    with pytest.raises(hooks.MarkerError, match="zoo or time_to_accuracy"):
        hooks.render_results(" --headline epoch_speed.csv TinyVGG")
    with pytest.raises(hooks.MarkerError, match="both files and --headline"):
        hooks.render_results(" zoo_small.csv --headline zoo_airbench.csv airbench_wide.yaml")


def test_compare_example_is_what_the_table_writer_makes_of_its_csv_files():
    from fmnist_lightning.compare import COLUMNS, comparison_markdown

    folder = DOCS / "results" / "compare_seed1"
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
    # ...and the evaluation guide shows that file, included at build time
    assert "<!-- include: results/compare_seed1/comparison.md -->" in (DOCS / "guide" / "evaluation.md").read_text()


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_no_page_speaks_of_how_the_package_was_built():
    hooks = load_hooks()
    texts = {"README.md": (ROOT / "README.md").read_text(), "CHANGELOG.md": (ROOT / "CHANGELOG.md").read_text()}
    texts |= {str(p.relative_to(ROOT)): hooks.expand(p.read_text()) for p in pages()}
    found = [(name, phrase) for name, text in texts.items() for phrase in HISTORY_PHRASES if phrase in text.lower()]
    assert not found


def test_readme_links_reach_files():
    text = (ROOT / "README.md").read_text()
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)]+)\)", text)]
    local = [link for link in links if link and "://" not in link]
    assert local
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_api_reference_documents_the_whole_public_api():
    tree = ast.parse((ROOT / "fmnist_lightning" / "__init__.py").read_text())
    [public] = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__all__"
    ]
    documented = re.findall(r"^::: fmnist_lightning\.(\w+)$", (DOCS / "api.md").read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(public)
