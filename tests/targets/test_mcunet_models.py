"""MCUNet's own models (the mcunet package, random-initialised: tests/zoo/vision_models.py) on every
target, whole: the network of MCUNet's search space with MCUNetV3's kind of sparse update on a
Cortex-M4 under QEMU (in its 256 KiB) and built for a Jetson Orin's GPU (this machine has none).
`mbv2-w0.35` trains fully on a Raspberry Pi 4 under qemu-aarch64 in tests/targets/test_aarch64.py.
What runs is compared with the host build and PyTorch eager (float32, a few steps); both models'
float64 parity on the host is the zoo's (tests/zoo/test_timm_and_mcunet.py)."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch

import pockengine as pe
from conftest import FAST_HOST, bn_eval, load_example_module, make_batches, max_scaled_diff, train_torch
from pockengine.sparse import apply_to_torch

VS_HOST = 1e-5
VS_TORCH = 1e-4
STEPS = 3

vision_models = load_example_module("tests/zoo/vision_models.py", "vision_models")


def layers_of(model) -> int:
    """Convolutions and linears: what SparseUpdate.mcunetv3's indices count."""
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())


def mcunetv3_scheme(model):
    """The biases of the last 12 layers, the first 1/8 of the input channels of the last two blocks'
    projections, the classifier: MCUNetV3's kind of scheme for this network's 256 KiB."""
    n = layers_of(model)  # ... last block's projection, feature mix, classifier
    return pe.SparseUpdate.mcunetv3(12, [n - 6, n - 3, n - 1], [0.125, 0.125, 1])


def check_against_host_and_torch(job, reference, batches, losses, state, optimizer):
    """The device's losses and written-back state against the host build's (VS_HOST) and PyTorch
    eager's (VS_TORCH), over the state the device returns (a firmware returns what it trains)."""
    host = pe.compile(job, target=FAST_HOST)
    np.testing.assert_allclose(losses, [host.step(x, y) for x, y in batches], rtol=VS_HOST)
    host_state, expected = host.state_dict(), reference.state_dict()
    shared = [k for k in state if k in host_state and k in expected]
    assert any(k.endswith(".weight") for k in shared), f"the device returned no weight: {sorted(state)[:5]}"
    worst, where = max_scaled_diff({k: state[k] for k in shared}, {k: host_state[k] for k in shared})
    assert worst <= VS_HOST, f"{where} differs from the host build by {worst:.3g}"
    np.testing.assert_allclose(losses, train_torch(reference, optimizer, batches), rtol=VS_TORCH)
    worst, where = max_scaled_diff({k: state[k] for k in shared}, {k: expected[k] for k in shared})
    assert worst <= VS_TORCH, f"{where} differs from PyTorch by {worst:.3g}"


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="arm-none-eabi-gcc / qemu-system-arm not installed")
def test_the_search_space_network_trains_sparsely_on_a_cortex_m4(tmp_path):
    from pockengine.artifact_files import PROJECT
    from pockengine.targets import cortex_m, resolve

    model = bn_eval(vision_models.mcunet_space_subnet())
    assert type(model).__name__ == "ProxylessNASNets" and len(model.blocks) == 14
    batches = make_batches((1, 3, 32, 32), vision_models.CLASSES, STEPS)
    optimizer = pe.optim.SGD(lr=0.05)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         sparse_update=mcunetv3_scheme(model), name="mcunet_subnet_sparse")
    program = pe.compile(job, target="cortex-m4")
    firmware = program.meta["firmware"]
    assert firmware["sram"] <= 256 * 1024 and firmware["flash"] <= 2048 * 1024
    directory = str(tmp_path / "m4")
    program.export(directory)
    project = os.path.join(directory, PROJECT)
    cortex_m.project.write_batches(project, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
    run = cortex_m.run(project, resolve("cortex-m4"), STEPS, program.signature)
    assert len(run.instructions) == STEPS and min(run.instructions) > 1_000_000
    reference = apply_to_torch(model, program.plan)
    check_against_host_and_torch(job, reference, batches, run.losses, run.state, optimizer)


def test_the_search_space_network_builds_for_a_jetson_orin_gpu():
    if shutil.which("nvcc") is None or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("nvcc and aarch64-linux-gnu-g++ build for the Jetson Orin")
    from pockengine.artifact_files import PTX_FILE
    from pockengine.targets.cuda import nvcc

    model = bn_eval(vision_models.mcunet_space_subnet())
    x, y = make_batches((2, 3, 32, 32), vision_models.CLASSES, 1)[0]
    job = pe.TrainingJob(model, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.05), sparse_update=mcunetv3_scheme(model),
                         name="mcunet_subnet_orin")
    program = pe.compile(job, target="jetson-orin")
    with open(program.files[PTX_FILE], "rb") as f:
        ptx = f.read()
    assert nvcc.ptx_header(ptx)["target"] == "sm_87" and b".entry" in ptx
    gpu = program.meta["cuda"]
    assert gpu["kernels"] > 50 and gpu["kernels"] == sum(gpu["schedules"].values())
    assert "unscheduled" not in gpu["schedules"]
    # dlight's Matmul rule raises on a conv weight-gradient kernel (the channel-ratio projections'):
    # the next rule (Fallback) must take it instead of the whole module failing.
    assert gpu["schedules"].get("Fallback", 0) > 0
    assert program.memory_report().n_storages == 1
