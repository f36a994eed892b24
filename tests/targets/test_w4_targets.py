"""4-bit weights (pockengine/awq.py) on the devices: a LoRA fine-tune on a W4 base built for a
Raspberry Pi 4 and run under qemu-aarch64 against the host build, and built for a Jetson's GPU."""

import shutil

import numpy as np
import pytest
import torch
from test_awq import mlp
from test_cuda import CROSS, assert_all_gpu, assert_ptx_for_sm87, derived, lowered_for, ptx_of

import pockengine as pe
from conftest import trains_on_device_like_the_host
from pockengine.targets.cuda import schedules


def w4_lora_job(dtype=torch.float32):
    """A W4 MLP with LoRA on both of its 4-bit layers (float32: what devices train in)."""
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 40, generator=g).to(dtype), torch.randint(0, 5, (8,), generator=g)) for _ in range(6)]
    base = pe.quantize.awq(mlp().to(dtype), [x for x, _ in batches[:2]], group_size=16, skip=("4",))
    job = pe.TrainingJob(base, (batches[0][0],), batches[0][1], "cross_entropy", pe.optim.AdamW(lr=1e-2),
                         sparse_update=pe.SparseUpdate.lora(4, ("0", "2")), name="w4_lora")
    return job, batches


def test_a_w4_lora_artifact_trains_under_qemu_aarch64_like_the_host(sysroot, tmp_path):
    """Built for a Raspberry Pi 4 (NEON), run by `pockengine run` under qemu-aarch64: the host
    build's losses and adapters (same kernels, another ISA: 1e-5)."""
    job, batches = w4_lora_job()
    device = trains_on_device_like_the_host(pe.compile(job, target="rpi4"), job, batches, str(tmp_path))
    assert device["0.packed"].dtype == np.uint8


def test_a_w4_lora_step_builds_for_jetson_orin():
    """Every kernel, the 4-bit matmuls and their data gradients included, on the GPU (dlight's
    Matmul rule), PTX for sm_87."""
    if shutil.which(CROSS) is None:
        pytest.skip(f"{CROSS} is not installed: no aarch64 host code")
    job, _ = w4_lora_job()
    program = pe.compile(job, "jetson-orin")
    lowered = lowered_for(derived(job))
    assert_all_gpu(program, lowered)
    assert_ptx_for_sm87(ptx_of(program))
    w4_kernels = {name: how for name, how in lowered.notes[schedules.REPORT].schedules.items() if "w4_matmul" in name}
    # two forwards, one data gradient (the first layer's input is the batch: no gradient wanted)
    assert len(w4_kernels) == 3 and set(w4_kernels.values()) == {"Matmul"}, w4_kernels
