"""benchmarks/step_time.py runs end to end at reduced size (times are reported, not asserted).
torch.compile (minutes of cold compile) and ONNX Runtime (its own environment) are left to full runs."""

import json

from conftest import FAST_HOST, load_example_module


def test_step_time_benchmark_small(capsys):
    bench = load_example_module("benchmarks/step_time.py", "step_time")
    # LLVM -O0: the same kernels, built faster; the test asserts no speed.
    rows = bench.main(["--small", "--only", "transformer", "--scheme", "last-2-blocks+biases", "--no-compile",
                       "--no-ort", "--repeats", "2", "--target", json.dumps(FAST_HOST)])
    assert [scheme for _, scheme, _ in rows] == ["last-2-blocks+biases"]
    for _, _, row in rows:
        assert row["untuned"] > 0 and row["eager"] > 0 and row["gflop"] > 0
        # the shipped logs are for the full-size workload: at reduced size nothing matches, nothing breaks
        assert row.get("tuned kernels", 0) == 0
    out = capsys.readouterr().out
    assert "time / eager" in out and "GFLOP/s" in out


def test_step_time_beside_a_busy_process_small(capsys):
    """--neighbour: ours and eager quiet and beside a busy process, both slowdowns printed."""
    bench = load_example_module("benchmarks/step_time.py", "step_time")
    rows = bench.main(["--small", "--neighbour", "--only", "plain-cnn", "--repeats", "2",
                       "--target", json.dumps(FAST_HOST)])
    assert len(rows) == 1
    row = rows[0][2]
    assert all(row[c] > 0 for c in ("ours", "ours beside", "eager", "eager beside"))
    out = capsys.readouterr().out
    assert "slowdown" in out and "ours/eager" in out
