"""benchmarks/mcu_memory.py at reduced size: every firmware is built and measured, the sparse
schemes' training step fits the Cortex-M4's 256 KiB at some resolution and trains under QEMU like
PyTorch; the plot is written."""

import shutil

import pytest

from conftest import load_example_module

pytestmark = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                                reason="arm-none-eabi-gcc / qemu-system-arm not installed")


def test_mcu_memory_benchmark_small(tmp_path, capsys):
    bench = load_example_module("benchmarks/mcu_memory.py", "mcu_memory")
    result = bench.main(["--small", "--steps", "2", "--plot", str(tmp_path / "mcu.png")])
    rows = {(r[0], r[1]): r for r in result["rows"]}
    assert {scheme for _, scheme in rows} == {"full", "bias + ratios", "MCUNetV3-style", bench.PATCHED, bench.INT8,
                                              bench.INT8_PATCHED}
    assert rows[(32, bench.INT8)][2] < rows[(32, "MCUNetV3-style")][2]  # int8 activations and input
    assert rows[(32, bench.INT8)][3] < rows[(32, "MCUNetV3-style")][3] / 2  # int8 frozen weights in Flash
    for resolution in (32,):
        full, sparse = rows[(resolution, "full")], rows[(resolution, "MCUNetV3-style")]
        assert sparse[2] < full[2] / 4  # SRAM: the sparse step writes a fraction of the state
        assert sparse[3] < 2048 * 1024  # Flash: the frozen weights fit the M4's 2 MiB
        assert all(r[4] > r[2] for r in (full, sparse))  # PyTorch needs more RAM than our firmware SRAM
    resolution, sram, _ = result["largest"]["MCUNetV3-style"]
    assert resolution == 32 and sram <= 256 * 1024
    for name in ("MCUNetV3-style", bench.INT8_PATCHED):  # the float and the int8 firmware train as PyTorch does
        ours, theirs, instructions = result["on_device"][name]
        assert len(ours) == 2 and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, name
        assert len(instructions) == 2 and min(instructions) > 1_000_000, name
    assert (tmp_path / "mcu.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "largest resolution whose training step fits 256 KiB" in out and "ratio" in out
    assert "fits 320 KiB" in out
    assert "instructions per training step" in out and "373 ms per sparse step" in out
