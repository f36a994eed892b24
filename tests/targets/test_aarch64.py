"""aarch64 (Raspberry Pi 4, the Jetsons' CPU): an artifact built with `pe.compile(job, "rpi4")`,
trained 3 steps by `pockengine run --data --save` under qemu-aarch64 in the fetched aarch64 Python,
then 3 more from the saved state, gives the host build's 6 steps (same kernels, another ISA: 1e-5)
and PyTorch eager's (1e-4)."""

import copy
import os
import subprocess
import sys

import numpy as np

import pockengine as pe
from conftest import FAST_HOST, bn_eval, load_example_module, make_batches, max_scaled_diff, train_torch

VS_HOST = 1e-5
VS_TORCH = 1e-4
STEPS = 3


def test_mcunets_mbv2_artifact_trains_under_qemu_like_the_host_and_pytorch(sysroot, tmp_path):
    """MCUNet's mbv2-w0.35 (the mcunet package's MobileNetV2 at width 0.35, its whole depth), every
    weight and bias, SGD with momentum, batch 2 at 32x32, for a Cortex-A72. BatchNorm is frozen: in
    training mode, its statistics over the last stages' 2 x 1 x 1 pixels make any two float32 runs
    part within 3 steps (its training-mode kernels are the host's, checked there)."""
    vision_models = load_example_module("tests/zoo/vision_models.py", "vision_models")
    model = bn_eval(vision_models.mcunet_mbv2_w035())
    assert len(model.blocks) == 17  # MobileNetV2's whole depth
    batches = make_batches((2, 3, 32, 32), vision_models.CLASSES, 2 * STEPS)
    optimizer = pe.optim.SGD(lr=0.05, momentum=0.9)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         name="mbv2_w035_rpi4")
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
