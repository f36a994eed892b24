"""benchmarks/kernel_gflops.py: every kernel of a step timed, its FLOPs counted on its TIR, and each
plain matmul timed in PyTorch on the same shape (ratios are reported, not asserted)."""

import json
import os

import pytest
import torch
from tvm import te, topi

from conftest import FAST_HOST, load_example_module
from pockengine.analysis.flops import MatmulShape, kernel_flops
from pockengine.passes.transposed_matmuls import _matmul_nt

pytest.importorskip("transformers")


def test_kernel_flops_counts_multiply_adds_and_reads_matmul_shapes():
    a, weight, b = te.placeholder((3, 5, 7)), te.placeholder((11, 7)), te.placeholder((3, 7, 11))
    assert kernel_flops(te.create_prim_func([a, weight, _matmul_nt(a, weight)])) == (
        2 * 3 * 5 * 7 * 11, MatmulShape(3, 5, 7, 11, transposed_b=True))
    assert kernel_flops(te.create_prim_func([a, b, topi.nn.batch_matmul(a, b, transpose_b=False)])) == (
        2 * 3 * 5 * 7 * 11, MatmulShape(3, 5, 7, 11, transposed_b=False))
    # a convolution counts its multiply-adds but is no matmul; an elementwise kernel counts nothing
    x, w = te.placeholder((1, 4, 8, 8)), te.placeholder((6, 4, 3, 3))
    assert kernel_flops(te.create_prim_func([x, w, topi.nn.conv2d_nchw(x, w, 1, 1, 1)])) == (
        2 * 6 * 8 * 8 * 4 * 3 * 3, None)
    assert kernel_flops(te.create_prim_func([x, topi.exp(x)])) == (0, None)


def test_kernel_gflops_benchmark_small(tmp_path, capsys):
    bench = load_example_module("benchmarks/kernel_gflops.py", "kernel_gflops")
    plot = str(tmp_path / "kernels.png")
    threads = torch.get_num_threads()
    rows = bench.main(["--small", "--repeats", "1", "--top", "12", "--target", json.dumps(FAST_HOST), "--plot", plot])
    assert torch.get_num_threads() == threads
    assert len(rows) == 12 and [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    matmuls = [r for r in rows if r["shape"] is not None]
    assert len(matmuls) >= 4, "the tiny LLaMA's step is mostly matmuls"
    for r in matmuls:
        s = r["shape"]
        assert r["gflop"] * 1e9 == pytest.approx(2 * s.batch * s.m * s.k * s.n)
        assert r["ours"] > 0 and r["torch"] > 0 and r["calls"] >= 1
    assert os.path.getsize(plot) > 0
    out = capsys.readouterr().out
    assert "torch GF/s" in out and "the listed matmuls" in out


def test_a_quantized_base_is_for_the_llms_only():
    bench = load_example_module("benchmarks/kernel_gflops.py", "kernel_gflops")
    with pytest.raises(SystemExit, match="quantizes an LLM's linears"):
        bench.make_job("resnet18-high-b8", None, True, "smoothquant-w8a8")
