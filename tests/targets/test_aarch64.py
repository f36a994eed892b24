"""aarch64 (Raspberry Pi 4, the Jetsons' CPU): an artifact built with `pe.compile(job, "rpi4")`,
trained 3 steps by `pockengine run --data --save` under qemu-aarch64 in the fetched aarch64 Python,
then 3 more from the saved state, gives the host build's 6 steps (same kernels, another ISA: 1e-5)
and PyTorch eager's (1e-4)."""

import copy
import os
import subprocess
import sys

import numpy as np
import torch

import pockengine as pe
from conftest import FAST_HOST, make_batches, max_scaled_diff, mobilenetv2, train_torch

VS_HOST = 1e-5
VS_TORCH = 1e-4
STEPS = 3


def test_mobilenetv2_artifact_trains_under_qemu_like_the_host_and_pytorch(sysroot, tmp_path):
    """MobileNetV2's stem and first two stages (conv, depthwise conv, BatchNorm in training mode,
    ReLU6, a residual), SGD with momentum, batch 4 at 32x32, for a Cortex-A72."""
    torch.manual_seed(0)
    model = mobilenetv2(width_mult=0.35, num_classes=10, stages=[(1, 16, 1, 1), (6, 24, 2, 2)],
                        last_channel=128).train()
    batches = make_batches((4, 3, 32, 32), 10, 2 * STEPS)
    optimizer = pe.optim.SGD(lr=0.05, momentum=0.9)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         name="mnv2_rpi4")
    out = str(tmp_path / "rpi4")
    pe.compile(job, target="rpi4").export(out)
    assert open(os.path.join(out, "train_step.so"), "rb").read()[18:20] == (183).to_bytes(2, "little"), "not AArch64"
    cli = os.path.join(os.path.dirname(sys.executable), "pockengine")
    losses = []
    for run, part in enumerate((batches[:STEPS], batches[STEPS:])):  # the second run resumes from the saved state
        data = str(tmp_path / f"batches{run}.npz")
        np.savez(data, x=np.stack([x.numpy() for x, _ in part]), target=np.stack([y.numpy() for _, y in part]))
        ran = subprocess.run([cli, "run", out, "--steps", str(STEPS), "--data", data, "--save"],
                             capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert "under qemu-aarch64" in ran.stdout and "saved the trained state" in ran.stdout
        losses += [float(line.split()[3]) for line in ran.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 * STEPS
    device = pe.load(out).state_dict()  # the state run_step.py wrote back, read by the host

    host = pe.compile(job, target=FAST_HOST)
    np.testing.assert_allclose(losses, [host.step(x, y) for x, y in batches], rtol=VS_HOST)
    worst, where = max_scaled_diff(device, host.state_dict())
    print(f"vs host build: worst scaled difference {worst:.2e} ({where})")
    assert worst <= VS_HOST, f"{where} differs from the host build by {worst:.3g}"

    np.testing.assert_allclose(losses, train_torch(model, optimizer, batches), rtol=VS_TORCH)
    worst, where = max_scaled_diff(device, model.state_dict())
    print(f"vs PyTorch eager: worst scaled difference {worst:.2e} ({where})")
    assert worst <= VS_TORCH, f"{where} differs from PyTorch by {worst:.3g}"
