"""benchmarks/zoo_table.py: the README's supported-models table from the zoo suite's own results."""

from conftest import load_example_module


def test_one_model_is_collected_and_tabulated():
    zoo_table = load_example_module("benchmarks/zoo_table.py", "zoo_table")
    records = zoo_table.collect(["-k", "gpt2"])
    assert [(r["model"], r["scheme"]) for r in records] == [("gpt2", "full")]
    assert records[0]["worst"] <= zoo_table.TOL and records[0]["parameters"] > 0
    rows = zoo_table.table(records).splitlines()
    assert rows[2].startswith("| gpt2 | ") and "✓" in rows[2] and "—" in rows[2]  # no sparse run: a dash
