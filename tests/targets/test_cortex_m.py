"""Cortex-M: the training step as a C project (kernels from TVM's C code generator, a driver on one
static arena), built with arm-none-eabi-gcc and run under qemu-system-arm with semihosting.

The firmware's losses and trained state are compared with the host build of the same job (same
kernels, another compiler: 1e-5, scaled by each tensor's magnitude) and with PyTorch eager (the
oracle; float32, a few steps: 1e-4). The instructions per step the QEMU harness counts are checked
against loops of known length first."""

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import pockengine as pe
from conftest import FAST_HOST, MLP, ROOT, bn_eval, make_batches, max_scaled_diff, mobilenetv2, train_torch
from pockengine.artifact_files import PROJECT
from pockengine.errors import MemoryLimitError, ToolchainError
from pockengine.sparse import apply_to_torch
from pockengine.targets import QEMU_BOARD_CPU_HZ, cortex_m, resolve

pytestmark = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
    reason="arm-none-eabi-gcc / qemu-system-arm not installed (apt-get install gcc-arm-none-eabi "
           "libnewlib-arm-none-eabi qemu-system-arm; `make test` installs them when run as root)")

VS_HOST = 1e-5
VS_TORCH = 1e-4
STEPS = 4


def train_on_device(job, target, batches, directory):
    """Compile for `target`, export, train len(batches) steps under QEMU -> (program, run)."""
    program = pe.compile(job, target=target)
    program.export(directory)
    project = os.path.join(directory, PROJECT)
    cortex_m.project.write_batches(project, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
    return program, cortex_m.run(project, resolve(target), len(batches), program.signature)


def check_against_host_and_torch(job, model, batches, run, optimizer):
    host = pe.compile(job, target=FAST_HOST)
    host_losses = [host.step(x, y) for x, y in batches]
    np.testing.assert_allclose(run.losses, host_losses, rtol=VS_HOST)
    host_state = host.state_dict()
    trained = {k: v for k, v in run.state.items() if k in host_state}
    assert trained, "the firmware wrote back no model state"
    worst, where = max_scaled_diff(trained, {k: host_state[k] for k in trained})
    print(f"vs host build: worst scaled difference {worst:.2e} ({where})")
    assert worst <= VS_HOST, f"{where} differs from the host build by {worst:.3g}"

    torch_losses = train_torch(model, optimizer, batches)
    np.testing.assert_allclose(run.losses, torch_losses, rtol=VS_TORCH)
    reference = {k: v for k, v in model.state_dict().items() if k in trained}
    worst, where = max_scaled_diff({k: trained[k] for k in reference}, reference)
    print(f"vs PyTorch eager: worst scaled difference {worst:.2e} ({where})")
    assert worst <= VS_TORCH, f"{where} differs from PyTorch by {worst:.3g}"
    return host


def mlp_project(target, batch_size, directory, steps=2):
    """A small MLP's project for `target` (classifying 8 features into 3 classes), with `steps`
    batches of `batch_size` written -> (program, project directory, batches)."""
    torch.manual_seed(0)
    batches = make_batches((batch_size, 8), 3, steps)
    job = pe.TrainingJob(MLP(d_in=8, hidden=16, classes=3), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1), name="mlp_small")
    program = pe.compile(job, target=target)
    program.export(directory)
    project = os.path.join(directory, PROJECT)
    cortex_m.project.write_batches(project, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
    return program, project, batches


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m7", "cortex-m55"])
def test_the_instruction_counter_counts_loops_of_known_length(tmp_path, target):
    """The proof that the harness's instruction counts are honest: `make calibrate` counts loops of
    2 + 30 n instructions (integer adds, loads, float adds, nops, the loop's own) with the counter the
    harness reads around each step (SysTick under QEMU's -icount shift=0). Every count is within two
    SysTick ticks of the truth (one for the tick the reading falls in, one for the few instructions
    of the reading itself): 80 instructions on mps2, 62.5 on mps3, however long the loop, and the
    longest loop runs past SysTick's 24 bits, so its wraps are counted too."""
    preset = resolve(target)
    _, project, _ = mlp_project(target, 4, str(tmp_path / "mlp"))
    out = cortex_m.make(project, preset, "calibrate")
    loops = [tuple(map(int, m)) for m in re.findall(r"^loop (\d+) expected (\d+) counted (\d+)$", out, flags=re.M)]
    instructions_per_tick = 1e9 / QEMU_BOARD_CPU_HZ[preset.board["qemu_machine"]]
    assert [n for n, _, _ in loops] == [0, 1, 1000, 1_000_000, 25_000_000]
    for iterations, expected, counted in loops:
        assert expected == 2 + 30 * iterations
        assert abs(counted - expected) <= 2 * instructions_per_tick, (iterations, expected, counted)
    assert loops[-1][1] > 2 ** 24 * instructions_per_tick  # SysTick wrapped during the last loop


def test_training_steps_report_deterministic_instruction_counts(tmp_path):
    """Each step's instructions are counted: the same on two runs of the same batches (QEMU's
    -icount is deterministic), and more for a larger batch."""
    counts = {}
    for batch_size in (4, 16):
        program, project, batches = mlp_project("cortex-m4", batch_size, str(tmp_path / f"batch{batch_size}"))
        first, again = (cortex_m.run(project, resolve("cortex-m4"), len(batches), program.signature) for _ in "12")
        assert first.instructions == again.instructions and first.losses == again.losses
        assert len(first.instructions) == len(batches) and all(n > 1000 for n in first.instructions)
        counts[batch_size] = first.instructions
    print(f"instructions per step of the MLP on cortex-m4: {counts}")
    assert min(counts[16]) > 2 * max(counts[4])  # 4x the rows: the matmuls and the loss scale with them


def test_sparse_mobilenetv2_on_cortex_m4(tmp_path):
    """MobileNetV2-0.35, MCUNetV3-style sparse update (biases of the last 12 convs, the first 1/8 of
    the input channels of the last two blocks' projections, the classifier), frozen BatchNorm,
    batch 1 at 32x32: in 256 KiB."""
    torch.manual_seed(0)
    model = bn_eval(mobilenetv2(width_mult=0.35, num_classes=10))
    batches = make_batches((1, 3, 32, 32), 10, STEPS)
    scheme = pe.SparseUpdate.mcunetv3(12, "47-50-52", "0.125-0.125-1")
    optimizer = pe.optim.SGD(lr=0.05)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         sparse_update=scheme, name="mnv2_sparse")
    program, run = train_on_device(job, "cortex-m4", batches, str(tmp_path / "m4"))
    print(f"instructions per step: {run.instructions}")
    assert len(run.instructions) == STEPS and min(run.instructions) > 1_000_000
    firmware = program.meta["firmware"]
    assert firmware["sram"] <= 256 * 1024 and firmware["flash"] <= 2048 * 1024
    plan = program.plan
    check_against_host_and_torch(job, apply_to_torch(model, plan), batches, run, optimizer)

    # Frozen weights are const, in Flash (read-only: .rodata, which the M4's link script puts in
    # its code region); what the step writes is in SRAM (.data with its initial values copied from
    # Flash, or .bss when they are zeros, as BatchNorm's shifts start).
    symbols = {name: kind for name, _, kind in cortex_m._symbols(str(tmp_path / "m4" / "project" / "firmware.elf"))}
    assert symbols["pe_s_features_1_conv_0_0_weight"] in "rRtT"
    assert symbols["pe_s_classifier_1_weight"] in "dD"
    assert symbols["pe_s_features_17_conv_0_1_bias"] in "bB"
    # A channel-ratio weight: its trained channels in SRAM, the frozen rest in Flash.
    assert symbols["pe_s_features_17_conv_2_weight_____42_"] in "dD"  # features.17.conv.2.weight[:, :42]
    assert symbols["pe_s_features_17_conv_2_weight____42__"] in "rRtT"  # features.17.conv.2.weight[:, 42:]
    # The SRAM reported is the sum of its measured parts (the QEMU harness's libc is not the step's).
    parts = {k: v for k, v in firmware["parts"].items() if k != cortex_m.HARNESS}
    assert sum(parts.values()) == firmware["sram"]
    assert parts["arena (activations, gradients)"] == firmware["arena_bytes"]


def test_full_update_with_batchnorm_and_momentum_on_cortex_m55(tmp_path):
    """Every parameter trained, BatchNorm in training mode (running statistics updated), SGD with
    momentum and weight decay, on MobileNetV2's stem and first two stages at batch 2, 24x24."""
    torch.manual_seed(0)
    model = mobilenetv2(width_mult=0.35, num_classes=10, stages=[(1, 16, 1, 1), (6, 24, 2, 2)],
                        last_channel=128).train()
    batches = make_batches((2, 3, 24, 24), 10, STEPS)
    optimizer = pe.optim.SGD(lr=0.05, momentum=0.9, weight_decay=4e-5)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         name="mnv2_full")
    program, run = train_on_device(job, "cortex-m55", batches, str(tmp_path / "m55"))
    assert program.meta["firmware"]["sram"] <= 512 * 1024
    assert "features.0.1.running_var" in run.state  # BN statistics are state the firmware trains
    check_against_host_and_torch(job, model, batches, run, optimizer)


def test_cli_builds_and_runs_the_mlp_example_on_cortex_m7(tmp_path):
    """`pockengine build --target cortex-m7` then `pockengine run`: the digits MLP with Adam
    (sqrt and division: libm on the device), the losses of the host build's run; `run --save`
    continues where the last one stopped, on the device as on the host."""
    example = tmp_path / "train.py"
    source = open(os.path.join(ROOT, "examples", "mlp_digits", "train.py")).read()
    example.write_text(source.replace("pe.optim.SGD(lr=0.05, momentum=0.9)", "pe.optim.Adam(lr=1e-3)"))
    cli = [os.path.join(os.path.dirname(sys.executable), "pockengine")]
    losses, builds, outputs = {}, {}, {}
    def run(out, *args):
        ran = subprocess.run(cli + ["run", out, *args], capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        outputs[out] = ran.stdout
        return [float(line.split()[3]) for line in ran.stdout.splitlines() if line.startswith("step")]

    for target in ("cortex-m7", "host"):
        out = str(tmp_path / target)
        builds[target] = subprocess.run(cli + ["build", str(example), "--target", target, "-o", out],
                                        capture_output=True, text=True, cwd=ROOT)
        assert builds[target].returncode == 0, builds[target].stderr
        shutil.copytree(out, out + "-straight")
        losses[target] = run(out + "-straight", "--steps", "5")
        # Training resumes from the saved state: 2 steps saved, then 3 more, are the 5 steps above.
        resumed = run(out, "--steps", "2", "--save") + run(out, "--steps", "3", "--save")
        assert resumed == losses[target], target
        with np.load(os.path.join(out, "state.npz")) as state:
            assert int(state["step"]) == 5
    assert "SRAM of the step (no harness)" in builds["cortex-m7"].stdout
    assert "device limits" in builds["cortex-m7"].stdout
    assert len(losses["cortex-m7"]) == 5
    # Each step's instructions, and their time at the STM32F746's 216 MHz at one per cycle (said so).
    counted = re.findall(r"^step +\d+  loss \S+  instructions ([\d,]+) \(([\d.]+) ms at 216 MHz, one per cycle\)$",
                         outputs[str(tmp_path / "cortex-m7-straight")], flags=re.M)
    assert len(counted) == 5
    for instructions, ms in counted:
        assert int(instructions.replace(",", "")) > 1000
        assert float(ms) == pytest.approx(int(instructions.replace(",", "")) / 216e3, abs=0.006)
    assert "one instruction per cycle" in outputs[str(tmp_path / "cortex-m7-straight")]
    np.testing.assert_allclose(losses["cortex-m7"], losses["host"], rtol=VS_HOST)
    project = tmp_path / "cortex-m7" / "project"
    for name in ("kernels.c", "pe_train_step.c", "pe_train_step.h", "Makefile", "link.ld", "firmware.elf"):
        assert (project / name).is_file(), name
    header = (project / "pe_train_step.h").read_text()
    assert "int pe_train_step(const float* x, const int* target, float* loss);" in header
    assert "malloc" not in (project / "pe_train_step.c").read_text() + (project / "kernels.c").read_text()


def test_the_firmware_refuses_bad_batches_before_training_on_them(tmp_path):
    """pe_train_step checks each batch as the host's Program.step does (the CLI checks before it
    writes batches.bin; an application on the device calls pe_train_step directly): a NaN input or
    an out-of-range label returns an error code before any state is written, the QEMU harness stops
    there, and `cortex_m.run` raises naming the step. A good batch still trains."""
    torch.manual_seed(0)
    batches = make_batches((4, 8), 3, 3)
    job = pe.TrainingJob(MLP(d_in=8, hidden=16, classes=3), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1), name="mlp_checks")
    program = pe.compile(job, target="cortex-m4")
    program.export(str(tmp_path / "m4"))
    project = str(tmp_path / "m4" / PROJECT)
    arrays = [[x.numpy(), y.numpy()] for x, y in batches]
    header = open(os.path.join(project, "pe_train_step.h")).read()
    assert "#define PE_ERROR_NON_FINITE_INPUT 1" in header and "#define PE_ERROR_INDEX_OUT_OF_RANGE 2" in header

    def run(bad_batch):
        cortex_m.project.write_batches(project, program.signature, arrays[:2] + [bad_batch])
        return cortex_m.run(project, resolve("cortex-m4"), 3, program.signature)

    nan_input = arrays[2][0].copy()
    nan_input[1, 5] = np.nan
    with pytest.raises(pe.errors.NumericsError, match=r"refused the batch of step 3 .*returned 1.*NaN"):
        run([nan_input, arrays[2][1]])
    for label in (3, -1):
        with pytest.raises(pe.errors.InputError, match=r"refused the batch of step 3 .*returned 2.*out of bounds"):
            run([arrays[2][0], np.array([0, label, 1, 2])])
    assert not os.path.exists(os.path.join(project, "state_out.bin"))  # nothing written back
    # cross_entropy's ignore_index (-100) is not out of range: that row is left out of the loss.
    assert len(run([arrays[2][0], np.array([0, -100, 1, 2])]).losses) == 3


def test_a_model_too_big_for_the_sram_says_what_it_needs_and_what_fits(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the build's project goes
    torch.manual_seed(0)
    # MobileNetV2's stem and first two stages at 128x128: the whole network at 64x64 fails alike, with
    # twice the build time.
    model = mobilenetv2(width_mult=0.35, num_classes=10, stages=[(1, 16, 1, 1), (6, 24, 2, 2)], last_channel=128)
    job = pe.TrainingJob(model, (torch.randn(2, 3, 128, 128),), torch.randint(0, 10, (2,)), "cross_entropy",
                         pe.optim.SGD(lr=0.05, momentum=0.9), name="too_big")
    with pytest.raises(MemoryLimitError) as caught:
        pe.compile(job, target="cortex-m4")
    message = str(caught.value)
    assert "does not fit cortex-m4: SRAM: needs" in message and "has 256 KiB" in message
    assert "bias_only" in message and "without momentum" in message  # the fix: a sparse scheme
    assert caught.value.footprint.sram > 2 * 1024 * 1024  # measured although no board could hold it
    # the refused build's project is removed (PyTorch may have put its own cache here, first use in the process)
    assert not [name for name in os.listdir(scratch) if name.startswith("pockengine")]

    # Sparse, but the activations at 128x128 are too big: the advice is a resolution.
    small = mobilenetv2(width_mult=0.35, num_classes=10, stages=[(1, 16, 1, 1), (6, 24, 2, 2)], last_channel=128)
    sparse = pe.TrainingJob(bn_eval(small), (torch.randn(1, 3, 128, 128),),
                            torch.randint(0, 10, (1,)), "cross_entropy", pe.optim.SGD(lr=0.05),
                            sparse_update=pe.SparseUpdate.bias_only(), name="too_many_pixels")
    with pytest.raises(MemoryLimitError, match=r"an input resolution of about \d+x\d+ instead of 128x128"):
        pe.compile(sparse, target="cortex-m4")


def test_missing_toolchain_names_the_package(monkeypatch, tmp_path):
    job = pe.TrainingJob(MLP(), (torch.randn(4, 32),), torch.randint(0, 10, (4,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1))
    monkeypatch.setenv("PATH", str(tmp_path))  # no arm-none-eabi-gcc, no qemu-system-arm
    with pytest.raises(ToolchainError, match=r"arm-none-eabi-gcc not found.*apt-get install gcc-arm-none-eabi"):
        pe.compile(job, target="cortex-m4")
