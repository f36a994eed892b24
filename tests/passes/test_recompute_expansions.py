"""recompute_expansions: the gradient a global average pooling broadcasts over a wide 1x1
convolution's output is computed inside each kernel reading it, a pixel or a channel at a time,
instead of stored whole; the step computes the same values with a smaller arena."""

import copy
import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import make_batches, max_scaled_diff, train_torch
from pockengine.passes import recompute_expansions as module
from pockengine.targets import host
from pockengine.targets.cortex_m import family as cortex_m_family

FLOAT64_TOL = 1e-9


class WideHead(nn.Module):
    """MobileNetV2's last stage in small: a 1x1 convolution to many channels, ReLU6, global average
    pooling and a classifier (the gradient reaching the convolution is 256x8x8, from 256 values)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 256, 1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(self.act(self.expand(self.stem(x))).mean((2, 3)))


def job_for(model, batches, sparse_update=None):
    x, y = batches[0]
    return pe.TrainingJob(model, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.05, momentum=0.9),
                          sparse_update=sparse_update, name="wide_head")


@pytest.fixture
def merges(monkeypatch):
    """The kernels the pass made (reader + producer), in the builds of the test."""
    made = []
    rewrite = module.with_values

    def recording(func, values):
        made.extend(value.args[0].name_hint for value in values.values())
        return rewrite(func, values)

    monkeypatch.setattr(module, "with_values", recording)
    return made


def test_a_host_build_with_the_pass_trains_as_pytorch_in_float64(monkeypatch, merges):
    """The host family does not ask for the pass (its vector schedules matter more than the memory):
    forced on here, the float64 step still trains as PyTorch does, to rounding. The stem is frozen:
    the expanded gradient's readers are the convolution's bias sum and its weight gradient (whose
    update, with momentum, is in the same kernel), both given the producer (the data gradient, which
    schedule_cpu has tiled for registers, would refuse it)."""
    torch.manual_seed(0)
    model = WideHead().double()
    model.stem.requires_grad_(False)
    batches = make_batches((1, 3, 8, 8), 10, 3, dtype=torch.float64)
    scheme = pe.SparseUpdate.full() | {"stem.weight": "frozen", "stem.bias": "frozen"}
    plain = pe.compile(job_for(copy.deepcopy(model), batches, scheme), target="host")
    assert not merges
    monkeypatch.setattr(host.HostFamily, "lowering", dataclasses.replace(host.CPU_LOWERING, recomputes_expansions=True))
    program = pe.compile(job_for(copy.deepcopy(model), batches, scheme), target="host")
    assert len(merges) >= 2 and any("sum" in kernel for kernel in merges), merges
    losses = [program.step(x, y) for x, y in batches]
    ref_losses = train_torch(model, pe.optim.SGD(lr=0.05, momentum=0.9), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=FLOAT64_TOL)
    worst, where = max_scaled_diff(program.state_dict(), {k: v.detach() for k, v in model.state_dict().items()})
    assert worst <= FLOAT64_TOL, f"{where} differs by {worst:.3g}"
    assert program.memory_report().by_category["planned_pool"] <= plain.memory_report().by_category["planned_pool"]


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="arm-none-eabi-gcc / qemu-system-arm not installed")
def test_cortex_m_firmware_recomputes_the_expansion_and_trains_as_the_host(tmp_path, monkeypatch, merges):
    """As in MobileNetV2 quantized (pe.quantize.int8): the forward's activations are int8, the
    expanded gradient float32 (256x8x8: 64 KiB from a 256-float gradient and a 16 KiB mask) and the
    step's peak. The firmware's arena loses most of it and trains as the host build, which keeps it."""
    from pockengine.artifact_files import PROJECT
    from pockengine.targets import cortex_m, resolve

    torch.manual_seed(0)
    batches = make_batches((1, 3, 8, 8), 10, 3)
    model = pe.quantize.int8(WideHead().eval(), [make_batches((4, 3, 8, 8), 10, 1, seed=1)[0][0]])
    job = job_for(model, batches, pe.SparseUpdate.bias_only())
    program = pe.compile(job, target="cortex-m4")
    assert merges, "the Cortex-M family asks for the pass"
    monkeypatch.setattr(cortex_m_family.CortexMFamily, "lowering",
                        dataclasses.replace(cortex_m_family.LOWERING, recomputes_expansions=False))
    stored = pe.compile(job, target="cortex-m4")
    arena, stored_arena = program.meta["firmware"]["arena_bytes"], stored.meta["firmware"]["arena_bytes"]
    assert arena <= stored_arena - 32 * 1024, (arena, stored_arena)
    program.export(str(tmp_path / "fw"))
    project = os.path.join(str(tmp_path / "fw"), PROJECT)
    cortex_m.project.write_batches(project, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
    ran = cortex_m.run(project, resolve("cortex-m4"), len(batches), program.signature)
    reference = pe.compile(job, target="host")
    np.testing.assert_allclose(ran.losses, [reference.step(x, y) for x, y in batches], rtol=1e-5)
    state = reference.state_dict()
    worst, where = max_scaled_diff({k: v for k, v in ran.state.items() if k in state},
                                   {k: state[k] for k in ran.state if k in state})
    assert worst <= 1e-5, f"{where} differs from the host build by {worst:.3g}"


def test_a_reader_that_would_compute_an_element_twice_keeps_the_stored_tensor(merges):
    """A 3x3 convolution's data gradient reads each pixel of its output gradient nine times: no
    placement computes each element once, so the expanded gradient is stored, for the bias's sum
    too (which could have computed it: it would then be computed twice)."""

    class Wide3x3(WideHead):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(16, 256, 3, padding=1)

    torch.manual_seed(0)
    batches = make_batches((1, 3, 8, 8), 10, 1)
    # the biases train: the data gradient goes through the convolution
    pe.compile(job_for(Wide3x3(), batches, pe.SparseUpdate.bias_only()), target="cortex-m4")
    assert not merges
