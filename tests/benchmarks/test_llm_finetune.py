"""benchmarks/llm_finetune.py at reduced size: every scheme compiles, is timed against PyTorch eager
with the same trainable set, and its memory is measured (ratios are reported, not asserted)."""

import json

import pytest

from conftest import FAST_HOST, load_example_module

pytest.importorskip("transformers")


def test_llm_finetune_benchmark_small(capsys):
    bench = load_example_module("benchmarks/llm_finetune.py", "llm_finetune")
    # LLVM -O0: the same kernels, built faster; the test asserts no speed.
    rows = {r["scheme"]: r for r in bench.main(["--small", "--repeats", "2", "--target", json.dumps(FAST_HOST),
                                                "--scheme", "full", "--scheme", "LoRA r=8 (q, v)"])}
    assert set(rows) == {"full", "LoRA r=8 (q, v)"}
    full, lora = rows["full"], rows["LoRA r=8 (q, v)"]
    assert lora["trained"] < full["trained"] / 50  # adapters only: 2 x 2 x (256 x 8 + 8 x d_out)
    assert lora["ours MiB"] < full["ours MiB"] and lora["eager MiB"] < full["eager MiB"]
    assert all(r[k] > 0 for r in rows.values() for k in ("ours ms", "eager ms", "ours MiB", "eager MiB"))
    out = capsys.readouterr().out
    assert "speed-up" in out and "tok/s" in out and "Anchor: PockEngine 7.9x" in out
