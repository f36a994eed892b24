"""benchmarks/quantized_quality.py at reduced size: the LLaMA half runs end to end (5 pretraining
steps instead of 300) and its table and plot carry every format (qualities are reported, not asserted)."""

import math

import pytest

from conftest import load_example_module

pytest.importorskip("transformers")


def test_quantized_quality_llama_runs_and_reports_every_format(tmp_path):
    bench = load_example_module("benchmarks/quantized_quality.py", "quantized_quality")
    results = {"llama": bench.llama(pretrain_steps=5)}
    assert list(results["llama"]) == ["float32", "W4 round-to-nearest", "W4 AWQ", "W8A8", "W8A8 SmoothQuant"]
    assert all(math.isfinite(r["held-out loss"]) for r in results["llama"].values())
    assert len({r["held-out loss"] for r in results["llama"].values()}) > 1  # the formats differ
    table = bench.table(results)
    assert all(name in table for name in results["llama"])
    bench.plot(results, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").stat().st_size > 0
