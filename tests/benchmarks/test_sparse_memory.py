"""benchmarks/sparse_memory.py runs end to end at reduced size (ratios are reported, not asserted)."""

import json

from conftest import FAST_HOST, load_example_module


def test_sparse_memory_benchmark_small(capsys):
    bench = load_example_module("benchmarks/sparse_memory.py", "sparse_memory")
    # Every scheme of the full run compiles alike; CI runs the two compared below and one with
    # channel-ratio updates and BatchNorm frozen (MobileNetV2 only), to stay within its time.
    rows = bench.main(["--small", "--repeats", "1", "--target", json.dumps(FAST_HOST),
                       "--scheme", "full", "--scheme", "bias-only", "--scheme", "mcunetv3-style, BN frozen"])
    assert len(rows) == 5  # full and bias-only of both models, mcunetv3-style with BN frozen of MobileNetV2
    by_scheme = {(r[0].split()[0], r[1]): r for r in rows}
    for model in ("MobileNetV2-0.35", "Transformer"):
        full, bias = by_scheme[(model, "full")], by_scheme[(model, "bias-only")]
        assert bias[2] < full[2]  # fewer trained values
        assert bias[3] < full[3] and bias[4] < full[4]  # and less memory, ours and PyTorch's
    assert all(r[3] > 0 and r[4] > 0 and r[5] > 0 and r[6] > 0 for r in rows)
    assert "mem ratio" in capsys.readouterr().out
