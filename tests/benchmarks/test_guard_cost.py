"""benchmarks/guard_cost.py at reduced size: both builds of each workload run and the cost is printed
(the figure is reported, not asserted: tests never assert timings)."""

import json

from conftest import FAST_HOST, load_example_module


def test_guard_cost_benchmark_small(capsys):
    bench = load_example_module("benchmarks/guard_cost.py", "guard_cost")
    rows = bench.main(["--small", "--repeats", "3", "--rounds", "1", "--target", json.dumps(FAST_HOST)])
    assert [r["workload"] for r in rows] == ["transformer full", "ReLU MLP full"]
    assert all(r["guarded"] > 0 and r["unguarded"] > 0 for r in rows)
    assert "goal: at most 2% of a step" in capsys.readouterr().out
