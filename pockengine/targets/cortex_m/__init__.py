"""Cortex-M: the training step ahead of time, as a C project with static memory.

TVM 0.27 has no microTVM and no AOT executor, so this path is ours: the step is lowered as for a CPU
but with kernels left serial and unvectorized (kernels.py turns them into plain C functions through
TVM's C code generator), and the lowered Relax function, a straight line of kernel calls on one
planned arena, becomes a C driver (driver.py). project.py writes the files, this module builds them
with arm-none-eabi-gcc, measures SRAM and Flash from the ELF, and runs the firmware under
qemu-system-arm with semihosting, counting the instructions each step executes (QEMU's -icount).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import numpy as np
import tvm

from ...autodiff.step import STEP_FUNC, StepSignature
from ...errors import ArtifactError, InputError, MemoryLimitError, NumericsError, TargetError
from . import driver as c_driver
from . import int8_conv, project
from . import kernels as c_kernels

FIRMWARE = "firmware.elf"
MEASURE_FIRMWARE = "firmware-measure.elf"  # `make measure`: linked for reading sizes, not for running
QEMU_TIMEOUT_S = 1800
STACK_RESERVE_KIB = project.STACK_BYTES // 1024


@dataclass
class Project:
    """What generating the C project measured before compiling it."""
    arena_bytes: int
    workspace_bytes: int
    kernel_calls: int
    kernels: int
    handwritten_kernels: int = 0  # of `kernels`: int8 convolutions in hand-written SIMD C (int8_conv.py)


def generate(directory: str, lowered, signature: StepSignature, state: dict, preset, batches=None) -> Project:
    """Write the C project of `lowered` (train_step after lowering_passes) into `directory`."""
    func = lowered[STEP_FUNC]
    kernels = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    drv = c_driver.translate(func, signature, [project.input_symbol(s.name) for s in signature.batch],
                             [project.state_symbol(s.name) for s in signature.state])
    used = {name: kernels[name] for name in dict.fromkeys(drv.kernels_called)}
    convolutions = int8_conv.handwritten(used, preset)
    generated = {name: func for name, func in used.items() if name not in convolutions}
    source = c_kernels.generate_c(generated, preset.target()) if generated else c_kernels.EMPTY_SOURCE
    if convolutions:
        source += int8_conv.c_source(convolutions, int8_conv.simd_of(preset))
    workspace = c_kernels.workspace_bytes(source)
    project.write_project(directory, kernels_c=source, driver=drv, signature=signature, state=state,
                          workspace_bytes=workspace, board=preset.board, batches=batches)
    return Project(drv.arena_bytes, workspace, len(drv.kernels_called), len(used), len(convolutions))


@dataclass
class Footprint:
    """Memory of the firmware, read from the ELF (bytes)."""
    flash: int  # code + constants + frozen weights + initial values of .data
    sram: int  # what the training step needs on the device: the SRAM parts below but the harness's
    parts: dict  # category -> bytes (arena, workspace, mutable state, input batch, stack, harness)
    stack: int  # the step's deepest call chain, from -fstack-usage
    board_overflow: str = ""  # the linker's complaint when the firmware does not fit the QEMU board

    @property
    def fits_board(self) -> bool:
        return not self.board_overflow

    def to_json(self) -> dict:
        return {"flash": self.flash, "sram": self.sram, "stack": self.stack, "parts": self.parts}

    def table(self) -> str:
        rows = [f"  {name:<44}{size / 1024:>9.1f} KiB" for name, size in self.parts.items()]
        return "\n".join(rows + [f"  {'SRAM of the step (no harness)':<44}{self.sram / 1024:>9.1f} KiB",
                                 f"  {'Flash':<44}{self.flash / 1024:>9.1f} KiB"])


HARNESS = "harness (libc, semihosting)"  # the QEMU test main's own memory: not the step's


def build_firmware(directory: str, preset) -> Footprint:
    """`make` the project and measure the ELF. Firmware too big for the QEMU board is linked again
    by `make measure` into memory of any size, so that what it needs can still be reported (the
    result then has fits_board False)."""
    try:
        make(directory, preset)
    except MemoryLimitError as overflow:
        make(directory, preset, "measure")
        measured = footprint(directory, MEASURE_FIRMWARE)
        measured.board_overflow = str(overflow)
        return measured
    return footprint(directory)


def make(directory: str, preset, target: str = "all", extra: tuple = (), timeout: float = 1800) -> str:
    preset.check_tools("build" if target == "all" else "run")
    cmd = ["make", "-C", directory, target, *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TargetError("`make` not found: install it with `apt-get install make`") from None
    if done.returncode != 0:
        log = (done.stdout + done.stderr).strip()
        if "do not fit the board's RAM" in log or "overflowed by" in log:
            raise MemoryLimitError(f"the firmware does not fit the memory of QEMU's {preset.board['qemu_machine']} "
                                   f"board, let alone {preset.name}'s: {_overflow(log)}")
        raise TargetError(f"`make {target}` failed in {directory}:\n{log[-3000:]}")
    return done.stdout


def _overflow(log: str) -> str:
    lines = [line for line in log.splitlines() if "overflowed" in line or "do not fit" in line]
    return "; ".join(line.split("ld: ")[-1] for line in lines) or log[-500:]


def footprint(directory: str, firmware: str = FIRMWARE) -> Footprint:
    """Flash and SRAM from the ELF's sections, split by what the symbols hold; stack from -fstack-usage."""
    elf = os.path.join(directory, firmware)
    sections = _sections(elf)
    flash = sum(size for name, size in sections.items() if name in (".text", ".rodata", ".ARM.exidx", ".data"))
    parts = {"arena (activations, gradients)": 0, "kernel workspace": 0, "mutable state (trained params, optimizer)": 0,
             "step outputs in own memory": 0, "input batch": 0}
    keys = list(parts)
    harness = 0
    for symbol, size, kind in _symbols(elf):
        if kind.lower() not in ("b", "d"):
            continue
        if symbol == "pe_arena":
            parts[keys[0]] += size
        elif symbol == "pe_workspace":
            parts[keys[1]] += size
        elif symbol.startswith("pe_s_"):
            parts[keys[2]] += size
        elif symbol.startswith(("pe_out_", "pe_in_")):
            parts[keys[3]] += size
        elif symbol == "pe_batch":
            parts[keys[4]] += size
        else:
            harness += size
    stack = _stack_bytes(directory)
    parts["stack (measured)"] = stack
    sram = sum(parts.values())
    parts[HARNESS] = harness
    return Footprint(flash, sram, parts, stack)


def check_limits(footprint: Footprint, preset, signature: StepSignature, plan: dict) -> None:
    """MemoryLimitError when the step needs more SRAM or Flash than the device has, saying how much
    it needs, where it goes, and what would fit."""
    problems = []
    if preset.sram_bytes and footprint.sram > preset.sram_bytes:
        problems.append(f"SRAM: needs {footprint.sram / 1024:.1f} KiB, {preset.name} has "
                        f"{preset.sram_bytes / 1024:.0f} KiB")
    if preset.flash_bytes and footprint.flash > preset.flash_bytes:
        problems.append(f"Flash: needs {footprint.flash / 1024:.1f} KiB, {preset.name} has "
                        f"{preset.flash_bytes / 1024:.0f} KiB")
    if not problems and footprint.fits_board:
        return
    if not problems:  # within the device's limits, but the board's reserve for the stack and libc is not
        error = MemoryLimitError(f"the firmware fits {preset.name}'s limits only without the harness's "
                                 f"{STACK_RESERVE_KIB} KiB stack reserve and libc: {footprint.board_overflow}")
    else:
        parts = ", ".join(f"{name} {size / 1024:.1f}" for name, size in footprint.parts.items()
                          if size and name != HARNESS)
        advice = _advice(footprint, preset, signature, plan)
        error = MemoryLimitError(f"the training step does not fit {preset.name}: {'; '.join(problems)} "
                                 f"(KiB: {parts}). {advice}")
    error.footprint = footprint  # what was measured, for callers that tabulate sizes (benchmarks)
    raise error


def _advice(footprint: Footprint, preset, signature: StepSignature, plan: dict) -> str:
    """What would fit: activations (arena, input) scale with the batch and the pixels, state with
    the trained parameters."""
    from ...sparse import FULL

    tips = []
    if preset.flash_bytes and footprint.flash > preset.flash_bytes:
        tips.append("the weights alone exceed the Flash: use a narrower model")
    scaling = footprint.parts["arena (activations, gradients)"] + footprint.parts["input batch"]
    fixed = footprint.sram - scaling
    if preset.sram_bytes and footprint.sram > preset.sram_bytes:
        trained = sum(1 for rule in plan.values() if rule == FULL)
        if fixed >= preset.sram_bytes or trained > len(plan) // 2:
            tips.append("the state the step writes takes "
                        f"{footprint.parts['mutable state (trained params, optimizer)'] / 1024:.1f} "
                        "KiB: train fewer parameters, e.g. sparse_update=SparseUpdate.bias_only() or "
                        "SparseUpdate.mcunetv3(...), and an optimizer without momentum")
        if fixed < preset.sram_bytes and scaling:
            factor = (preset.sram_bytes - fixed) / scaling
            x = signature.batch[0]
            if len(x.shape) == 4 and x.shape[0] > 1:
                tips.append(f"batch {x.shape[0]} -> {max(1, int(x.shape[0] * factor))} (activations scale with it)")
            elif len(x.shape) == 4:
                side = int(x.shape[2] * factor ** 0.5) // 8 * 8
                tips.append(f"an input resolution of about {side}x{side} instead of {x.shape[2]}x{x.shape[3]} "
                            "(activations scale with the pixels; the estimate ignores layers that stop shrinking)"
                            if side >= 8 else "a much smaller input")
            else:
                tips.append(f"activations {1 / factor:.1f}x smaller (batch or sequence length)")
    return "To fit: " + "; ".join(tips) + "." if tips else ""


def _sections(elf: str) -> dict:
    out = subprocess.run(["arm-none-eabi-size", "-A", elf], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].startswith(".") and fields[1].isdigit():
            sizes[fields[0]] = int(fields[1])
    return sizes


def _symbols(elf: str) -> list:
    out = subprocess.run(["arm-none-eabi-nm", "-S", elf], capture_output=True, text=True, check=True).stdout
    result = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 4:
            result.append((fields[3], int(fields[1], 16), fields[2]))
    return result


def _stack_bytes(directory: str) -> int:
    """The step's deepest stack: pe_train_step's frame + the largest kernel frame + the harness's
    main (the step calls kernels one level deep; kernels call only libm)."""
    frames = {}
    for name in os.listdir(directory):
        if name.endswith(".su") and name != "calibrate.su":  # `make calibrate`'s main is not the firmware's
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    m = re.match(r".*:(\w+)\s+(\d+)\s+(\w+)", line.strip())
                    if m:
                        frames[m.group(1)] = int(m.group(2))
    kernel = max((v for k, v in frames.items() if k.startswith("pe_k_")), default=0)
    libm = 256  # expf/logf and friends: small leaf frames, not measured (newlib is precompiled)
    return frames.get("main", 0) + frames.get("pe_train_step", 0) + kernel + libm


@dataclass
class Run:
    losses: list
    state: dict  # mutable state after the run, by name
    # Instructions each step executed (pe_train_step, to one SysTick tick: see project.COUNTER_H); None
    # from a project written before the harness counted them.
    instructions: list | None = None


def run(directory: str, preset, steps: int, signature: StepSignature, timeout: float = QEMU_TIMEOUT_S) -> Run:
    """Train `steps` steps in QEMU on batches.bin; the losses, the trained state and the instructions
    per step."""
    out_path = os.path.join(directory, "state_out.bin")
    if os.path.exists(out_path):
        os.unlink(out_path)
    try:
        stdout, failure = make(directory, preset, "run", (f"STEPS={steps}",), timeout=timeout), None
    except TargetError as e:  # QEMU may pass the firmware's exit status on
        stdout, failure = str(e), e
    refused = re.search(r"^error: step (\d+): code (\d+): (.*)$", stdout, flags=re.M)
    if refused:
        step, code, why = refused.groups()
        error = NumericsError if int(code) == project.ERROR_NON_FINITE_INPUT else InputError
        raise error(f"the firmware refused the batch of step {step} (pe_train_step returned {code}): {why}; "
                    "nothing was trained on it or saved. Clean or filter the data")
    if failure is not None:
        raise failure
    lines = re.findall(r"^step \d+ loss (\S+)(?: instructions (\d+))?$", stdout, flags=re.M)
    if len(lines) != steps or "done" not in stdout or not os.path.exists(out_path):
        raise TargetError(f"the firmware did not finish {steps} steps under QEMU; its output:\n{stdout[-2000:]}")
    counted = all(instructions for _, instructions in lines)
    return Run([float(loss) for loss, _ in lines], read_state(out_path, signature),
               [int(instructions) for _, instructions in lines] if counted else None)


def read_state(path: str, signature: StepSignature) -> dict:
    data = open(path, "rb").read()
    state, offset = {}, 0
    for spec in project.mutable_state(signature):
        n = spec.nbytes
        if offset + n > len(data):
            raise ArtifactError(f"{path} is truncated: {spec.name} missing")
        state[spec.name] = np.frombuffer(data[offset:offset + n], dtype=spec.dtype).reshape(spec.shape).copy()
        offset += n
    return state
