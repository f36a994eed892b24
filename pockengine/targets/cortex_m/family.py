"""The Cortex-M family: a C project (kernels, driver on one static arena, state, Makefile, linker
script), compiled with arm-none-eabi-gcc so its SRAM and Flash are measured and checked against the
device; `pockengine run` trains it under qemu-system-arm and reports the instructions per step."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ... import pipeline
from ...artifact_files import PROJECT
from ...errors import InputError, NumericsError
from ...frontend import to_numpy
from ...passes.inline_elementwise import inline_elementwise
from .. import named, resolve
from ..family import BuildRequest, Built, Family, RunOptions, batches, removed_on_error, scratch_directory
from ..host import CPU_LOWERING
from . import Footprint, build_firmware, check_limits, generate, project, run


def _schedules(_preset, _target, _notes) -> list:
    """No CPU schedule: one core, no vector types. inline_elementwise still removes the fused kernels'
    intermediate buffers (one lane)."""
    return [inline_elementwise(1)]


# TVM's CPU pipeline, as C: kernels left serial and unvectorized (kernels.py), no fast_math, no packing.
LOWERING = dataclasses.replace(CPU_LOWERING, schedule=_schedules, finish_kernels=list, packs_frozen_weights=False,
                               recomputes_expansions=True)

# What the time `pockengine run` gives for a step's instructions is, and is not.
ONE_INSTRUCTION_PER_CYCLE = (
    "instructions are counted under QEMU's -icount (to within 80); the time is at one instruction per cycle at "
    "the part's clock: a lower bound on a single-issue core such as the Cortex-M4 (its loads take 2 cycles, a float "
    "division 14, and Flash wait states add more), an estimate on the Cortex-M7, which can issue two per cycle")


def step_time(instructions: int, clock_hz: int) -> str:
    """The instructions of a step as milliseconds at one instruction per cycle at `clock_hz`."""
    return f"{instructions / clock_hz * 1e3:.2f} ms at {clock_hz / 1e6:.0f} MHz"


class CortexMFamily(Family):
    name = "cortex-m"
    lowering = LOWERING

    def build(self, request: BuildRequest) -> list:
        preset, derived, job = request.preset, request.derived, request.job
        signature = derived.signature
        with pipeline.stage("lower", request.progress, request.origins):
            lowered = pipeline.lower(derived.step_mod, signature, preset, self.lowering)
        with pipeline.stage("memory plan", request.progress, request.origins):
            report = pipeline.memory_report(lowered.mod, derived)
        scratch = scratch_directory()
        with removed_on_error(scratch):  # a refused build (too big for the device) leaves no project behind
            with pipeline.stage("codegen", request.progress, request.origins):
                directory = os.path.join(scratch, PROJECT)
                os.makedirs(directory)
                batch = [to_numpy(x) for x in job.example_inputs + (job.example_targets,)]
                generated = generate(directory, lowered.mod, signature, derived.initial_state, preset, batches=[batch])
                footprint = build_firmware(directory, preset)
            check_limits(footprint, preset, signature, derived.plan)
        meta = {"firmware": {**footprint.to_json(), **dataclasses.asdict(generated), "sram_limit": preset.sram_bytes,
                             "flash_limit": preset.flash_bytes, "board": preset.board}}
        return [Built({PROJECT: directory}, signature, derived.initial_state, report, meta, scratch)]

    def run(self, artifact: str, options: RunOptions, load) -> int:
        """Write the batches and the state into the project, build the firmware (if needed) and train
        under qemu-system-arm."""
        if options.threads:
            raise InputError("--threads is for host, aarch64 and CUDA artifacts: a Cortex-M runs its step on its "
                             "one core; leave it out")
        program = load(artifact, None)
        preset = named(program.meta["target"]) or resolve(program.meta["tvm_target"])
        directory = os.path.join(artifact, PROJECT)
        stream = batches(program, options.data, artifact)
        chosen = [next(stream) for _ in range(_batch_count(options.data, options.steps))]
        for i, batch in enumerate(chosen):  # the checks Program.step makes on the host
            program.check_batch([np.asarray(a) for a in batch], f"batch {i + 1}")
        project.write_batches(directory, program.signature, chosen)
        project.write_state(directory, program.signature, program.state_arrays())  # resume from state.npz
        print(f"running {options.steps} steps on QEMU's {preset.board['qemu_machine']} ({preset.name})", flush=True)
        result = run(directory, preset, options.steps, program.signature)
        for step, loss in enumerate(result.losses, 1):
            counted = "" if result.instructions is None else (
                f"  instructions {result.instructions[step - 1]:,} "
                f"({step_time(result.instructions[step - 1], preset.clock_hz)}, one per cycle)")
            print(f"step {step:>5}  loss {loss:.6f}{counted}")
            if not np.isfinite(loss):
                raise NumericsError(f"step {step}: the loss is {loss} (a NaN or infinity in the loss or in a trained "
                                    "parameter); nothing was saved. Lower the learning rate or check the loss")
        print(ONE_INSTRUCTION_PER_CYCLE if result.instructions is not None else
              "(this project's harness predates instruction counting: rebuild the artifact to count them)")
        if options.save:
            program.load_state_dict(result.state, strict=False)
            program.save_state(artifact)
            print(f"saved the trained state to {artifact}")
        return 0

    def summary(self, meta: dict, detailed: bool = False) -> str | None:
        """The firmware's memory, measured on the ELF, against the device's limits."""
        fw = meta["firmware"]
        table = Footprint(fw["flash"], fw["sram"], fw["parts"], fw["stack"]).table()
        return (f"firmware for {meta['target']} ({fw['kernels']} kernels, {fw['kernel_calls']} calls per step):\n"
                f"{table}\n  device limits: SRAM {fw['sram_limit'] / 1024:.0f} KiB, "
                f"Flash {fw['flash_limit'] / 1024:.0f} KiB")


def _batch_count(data: str | None, steps: int) -> int:
    """How many distinct batches the firmware's batch file needs (it cycles through them)."""
    if not data:
        return 1
    with np.load(data, allow_pickle=False) as npz:
        leading = {npz[k].shape[0] for k in npz.files if npz[k].ndim}
    return max(1, min(steps, min(leading) if leading else 1))


FAMILY = CortexMFamily()
