"""The hand-written SIMD int8 convolutions of the Cortex-M target (targets/cortex_m/int8_conv.py):
SMLAD on cores with the DSP extension (cortex-m4), Helium's VMLADAVA on the cortex-m55.

The kernels run in firmware under QEMU and equal the integer reference of test_quantize.py element
for element, on its convolution cases (groups, depthwise, stride, dilation, padding with the input's
zero point) with biases ending in halves (rounded away from zero as the TIR kernel rounds them); an
int8 step trained with them in the firmware gives the host's losses and state."""

import copy
import dataclasses
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from test_quantize import CONV_CASES, TinyNet, batches_for, integer_convolution, quantized, random_convolution

import pockengine as pe
from conftest import FAST_HOST
from pockengine.targets import cortex_m, resolve
from pockengine.targets.cortex_m import int8_conv, project

# The instruction each core's kernels must be built from, as objdump prints it.
SIMD_INSTRUCTION = {"cortex-m4": "smlad", "cortex-m55": "vmladava.s8"}


def _c_array(ctype: str, name: str, values) -> str:
    if ctype == "float":
        text = ", ".join(float(v).hex() + "f" for v in values.ravel())
    else:
        text = ", ".join(str(int(v)) for v in values.ravel())
    return f"static {ctype} {name}[] = {{{text}}};"


def _firmware(directory, preset, convolutions, arrays) -> str:
    """A firmware calling each convolution's kernel on its arrays and printing the outputs in hex;
    returns the ELF's path."""
    simd = int8_conv.simd_of(preset)
    lines = ['#include <stdio.h>', '#include "pe_tvm.h"',
             project.WORKSPACE_C.format(bytes=max(c.scratch_bytes(simd) for c in convolutions.values())),
             int8_conv.c_source(convolutions, simd)]
    calls = []
    for name, (x, w, b, m, n, y_size) in arrays.items():
        lines += [_c_array("int8_t", f"{name}_x", x), _c_array("int8_t", f"{name}_w", w),
                  _c_array("float", f"{name}_b", b), _c_array("int32_t", f"{name}_m", m),
                  _c_array("int32_t", f"{name}_n", n), f"static int8_t {name}_y[{y_size}];"]
        calls.append(f'  pe_k_{name}({name}_x, {name}_w, {name}_b, {name}_m, {name}_n, {name}_y);\n'
                     f'  printf("{name}");\n'
                     f'  for (int i = 0; i < {y_size}; ++i) printf(" %02x", (unsigned)(uint8_t){name}_y[i]);\n'
                     f'  printf("\\n");')
    lines.append("int main(void) {\n" + "\n".join(calls) + '\n  printf("done\\n");\n  return 0;\n}')
    files = {"test.c": "\n".join(lines) + "\n", "pe_tvm.h": project.PE_TVM_H, "startup.c": project.STARTUP_C,
             "link.ld": project._linker_script(preset.board["memory_map"])}
    for name, text in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    elf = os.path.join(directory, "test.elf")
    built = subprocess.run(["arm-none-eabi-gcc", *preset.board["cflags"], "-mthumb", "-O2", "-Wall", "-Werror",
                            "--specs=rdimon.specs", "-nostartfiles", "-T", "link.ld", "test.c", "startup.c", "-lm",
                            "-o", elf], cwd=directory, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return elf


@pytest.mark.parametrize("target", list(SIMD_INSTRUCTION))
def test_simd_convolutions_equal_the_integer_reference_under_qemu(tmp_path, target):
    preset = resolve(target)
    rng = np.random.default_rng(7)
    convolutions, arrays, expected = {}, {}, {}
    for i, case in enumerate(CONV_CASES):
        x, w, b, m, n, config = random_convolution(case)
        # halves and near-halves: the kernel rounds the float bias half away from zero, as the TIR kernel
        b = (b + rng.choice(np.float32([0, 0.5, -0.5, 0.49999997, -0.7]), b.shape)).astype(np.float32)
        whole = np.trunc(b)
        rounded = whole + (b - whole >= 0.5) - (b - whole <= -0.5)
        y = integer_convolution(x, w, rounded, m, n, config)
        name = f"case{i}"
        convolutions[name] = int8_conv.Convolution(*x.shape, *y.shape[1:], *w.shape[2:], tuple(config))
        arrays[name] = (x, w, b, m.astype(np.int32), n.astype(np.int32), y.size)
        expected[name] = y
    elf = _firmware(str(tmp_path), preset, convolutions, arrays)
    # the compiler's assembly (objdump decodes no MVE here)
    assembly = subprocess.run(["arm-none-eabi-gcc", *preset.board["cflags"], "-mthumb", "-O2", "-S", "test.c",
                               "-o", "-"], capture_output=True, text=True, cwd=str(tmp_path)).stdout
    assert re.search(rf"\s{re.escape(SIMD_INSTRUCTION[target])}\s", assembly)
    board = preset.board
    ran = subprocess.run(["qemu-system-arm", "-M", board["qemu_machine"], "-nographic", "-monitor", "none",
                          "-serial", "none", "-semihosting-config", "enable=on,target=native", "-kernel", elf],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert ran.stdout.rstrip().endswith("done"), ran.stdout[-2000:] + ran.stderr[-2000:]
    printed = dict(line.split(" ", 1) for line in ran.stdout.splitlines() if line.startswith("case"))
    for name, y in expected.items():
        got = np.array([int(v, 16) for v in printed[name].split()], dtype=np.uint8).view(np.int8)
        np.testing.assert_array_equal(got.reshape(y.shape), y, err_msg=f"{name}: {CONV_CASES[int(name[4:])]}")


def test_only_cores_with_simd_get_the_handwritten_kernels():
    assert int8_conv.simd_of(resolve("cortex-m4")) == "dsp" and int8_conv.simd_of(resolve("cortex-m7")) == "dsp"
    assert int8_conv.simd_of(resolve("cortex-m55")) == "mve"
    assert int8_conv.simd_of(resolve({"kind": "c", "mcpu": "cortex-m55"})) == "mve"  # a dict names the preset's core
    assert int8_conv.simd_of(dataclasses.replace(resolve("cortex-m4"), features=frozenset())) is None
    assert int8_conv.simd_of(resolve(FAST_HOST)) is None
    with pytest.raises(pe.errors.TargetError, match="no hand-written int8 convolution for 'neon'"):
        int8_conv.c_source({}, "neon")


def _train_in_firmware(directory, program, preset, batches):
    from pockengine.artifact_files import PROJECT

    program.export(str(directory))
    path = os.path.join(directory, PROJECT)
    cortex_m.project.write_batches(path, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
    return cortex_m.run(path, preset, len(batches), program.signature)


@pytest.mark.parametrize("target", list(SIMD_INSTRUCTION))
def test_int8_training_with_simd_kernels_equals_the_host_and_the_generic_c(tmp_path, target):
    """Bias-only: every convolution's weight is frozen int8, so all four are hand-written. Three steps
    in the firmware give the host's losses and biases, and the generic C's (the core without its
    `features`) bit for bit, in fewer instructions."""
    q = quantized(TinyNet(), (2, 3, 16, 16), dtype=torch.float32)
    batches = batches_for((2, 3, 16, 16), 5, dtype=torch.float32)

    def job():
        return pe.TrainingJob(copy.deepcopy(q), (batches[0][0],), batches[0][1], "cross_entropy",
                              pe.optim.SGD(lr=0.05), sparse_update=pe.SparseUpdate.bias_only())

    host = pe.compile(job(), target=FAST_HOST)
    host_losses = [host.step(x, y) for x, y in batches]
    runs = {}
    without_simd = dataclasses.replace(resolve(target), features=frozenset())
    for simd, preset in (("simd", resolve(target)), ("generic", without_simd)):
        program = pe.compile(job(), target=preset)
        assert program.meta["firmware"]["handwritten_kernels"] == (4 if simd == "simd" else 0)
        runs[simd] = _train_in_firmware(tmp_path / simd, program, preset, batches)
    np.testing.assert_allclose(runs["simd"].losses, host_losses, rtol=2e-6)
    assert runs["simd"].losses == runs["generic"].losses
    host_state = host.state_arrays()
    for name, value in runs["simd"].state.items():
        np.testing.assert_array_equal(value, runs["generic"].state[name], err_msg=name)
        np.testing.assert_allclose(value, host_state[name], rtol=2e-6, atol=2e-6, err_msg=name)
    simd_steps, generic_steps = runs["simd"].instructions, runs["generic"].instructions
    assert all(s < g for s, g in zip(simd_steps, generic_steps)), (simd_steps, generic_steps)
    print(f"{target}: instructions per step, generic C {generic_steps[-1]}, SIMD kernels {simd_steps[-1]}")
