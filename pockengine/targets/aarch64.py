"""aarch64 CPUs (Raspberry Pi 4, the Jetsons' CPU): a cross-compiled step and a runner for the device.

The artifact is the host one (train_step.so, state.npz, manifest.json, example.npz) with the library
linked by aarch64-linux-gnu-g++, plus run_step.py (device_runner.py): the device needs Python,
numpy and the TVM runtime wheel, nothing else. `pockengine run` runs it natively on an aarch64
machine and under qemu-aarch64, with the aarch64 Python of aarch64_sysroot.py, anywhere else.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from ..artifact_files import LIBRARY, RUNNER
from ..errors import TargetError
from .family import RunOptions
from .host import CpuFamily

CROSS_CXX = "aarch64-linux-gnu-g++"


def cross_compiler():
    """export_library's fcompile for aarch64 Linux."""
    from tvm.support import cc

    return cc.cross_compiler(CROSS_CXX)


def runner_source_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "device_runner.py")


def is_native() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def run(artifact: str, steps: int, data: str | None = None, save: bool = False, progress=None,
        threads: int | None = None) -> int:
    """Run the artifact's runner for `steps` steps, streaming its output; its exit status."""
    runner = os.path.join(os.path.abspath(artifact), RUNNER)
    if not os.path.isfile(runner):
        raise TargetError(f"{runner} is missing: the artifact is incomplete; rebuild it with `pockengine build`")
    argv = [runner, os.path.abspath(artifact), "--steps", str(steps)]
    if data:
        argv += ["--data", os.path.abspath(data)]
    if save:
        argv.append("--save")
    if threads:
        argv += ["--threads", str(threads)]
    if is_native():
        command, env = [sys.executable, *argv], None
    else:
        from .aarch64_sysroot import ensure_sysroot

        sysroot = ensure_sysroot(progress=progress) if progress is not None else ensure_sysroot()
        command, env = sysroot.command(argv), sysroot.environment()
        print("running under qemu-aarch64 (user-mode emulation: times are not the device's)", flush=True)
    return subprocess.run(command, env=env).returncode


class Aarch64Family(CpuFamily):
    """The CPU lowering of the host, a library linked by the cross compiler, and the runner."""

    name = "aarch64"
    run_locks_artifact = False  # its runner locks the artifact itself when saving

    def export(self, executable, scratch: str) -> dict:
        library = os.path.join(scratch, LIBRARY)
        executable.export_library(library, fcompile=cross_compiler())
        return {LIBRARY: library, RUNNER: runner_source_path()}

    def run(self, artifact: str, options: RunOptions, load) -> int:
        return run(artifact, options.steps, options.data, options.save, threads=options.threads)


FAMILY = Aarch64Family()
