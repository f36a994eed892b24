"""benchmarks/zoo_table.py: the README's supported-models table from the zoo suite's own results."""

from conftest import load_example_module


def test_one_model_is_collected_and_tabulated():
    zoo_table = load_example_module("benchmarks/zoo_table.py", "zoo_table")
    records = zoo_table.collect(["-k", "gpt2 and not sparse"])
    assert sorted((r["model"], r["check"]) for r in records) == [("gpt2", "float32"), ("gpt2", "full")]
    full = next(r for r in records if r["check"] == "full")
    assert full["worst"] <= zoo_table.TOL and full["parameters"] > 0
    rows = zoo_table.table(records).splitlines()
    cells = [cell.strip() for cell in rows[2].split("|")[1:-1]]
    assert cells[:2] == ["gpt2", "transformers"] and cells[3].startswith("✓")
    assert cells[4] == "—"  # no sparse run: a dash
    assert cells[5].startswith("✓") and "/" in cells[5]  # float32: error, and both drifts
