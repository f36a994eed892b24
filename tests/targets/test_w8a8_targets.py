"""W8A8 layers (pockengine/smoothquant.py) on aarch64: a CPU with Armv8.2's dot product (the Jetson
Orin's Cortex-A78) sums their int8 products with sdot, the frozen int8 weights held in its layout;
built for it and run under qemu-aarch64, the step trains as the host build does."""


import numpy as np
import torch
from test_awq import mlp

import pockengine as pe
from conftest import trains_on_device_like_the_host
from pockengine.autodiff.step import Int8DotLayout
from pockengine.frontend import w8_ops
from pockengine.targets import resolve


def w8a8_job():
    """A SmoothQuant MLP whose last layer trains: the two before it run W8A8 (float32, as devices train)."""
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(8, 40, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    scheme = pe.SparseUpdate.last_k(1)
    base = pe.quantize.smoothquant(mlp().float(), [x for x, _ in batches[:2]], sparse_update=scheme)
    assert base[0].activations == base[2].activations == "int8"
    job = pe.TrainingJob(base, (batches[0][0],), batches[0][1], "cross_entropy", pe.optim.AdamW(lr=1e-2),
                         sparse_update=scheme, name="w8a8_mlp")
    return job, batches


def test_a_w8a8_step_sums_with_sdot_under_qemu_aarch64_like_the_host(sysroot, tmp_path):
    """Built for the Jetson Orin's CPU (sdot), run by `pockengine run` under qemu-aarch64: the host
    build's losses and weights (the same int8 sums; other float kernels: 1e-5)."""
    assert w8_ops.int8_dot(resolve("jetson-orin-cpu").target()) == w8_ops.SDOT
    assert w8_ops.int8_dot(resolve("rpi4").target()) is None  # the Cortex-A72 has no dot product
    job, batches = w8a8_job()
    program = pe.compile(job, target="jetson-orin-cpu")
    layouts = [layout for layout in program.signature.packed.values() if isinstance(layout, Int8DotLayout)]
    assert len(layouts) == 2 and {layout.lanes for layout in layouts} == {w8_ops.SDOT.lanes}
    device = trains_on_device_like_the_host(program, job, batches, str(tmp_path))
    assert device["0.weight_int8"].dtype == np.int8 and device["0.weight_int8"].shape == (64, 40)
