"""What a target family is: the interface every family module implements (families.py lists them).

A family says how a step is lowered for its targets (a pipeline.Lowering: only its own phases), how
the lowered step becomes an artifact (`build`), whether and where an artifact runs in this process
(`runs_here`, `device`), how `pockengine run` trains one (`run`) and what `build`, `inspect` and
`targets` print about it. Builds, the runtime and the CLI ask the family of a preset or a manifest;
none of them names a family.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from ..artifact_files import EXAMPLE
from ..errors import InputError, TargetError
from .device_runner import iterate_batches


@dataclasses.dataclass
class BuildRequest:
    """What a family's build gets: the job, its preset, the derived step and the build's options."""
    job: object
    preset: object  # targets.TargetPreset
    derived: object  # pipeline.Derived
    tuning_logs: tuple = ()
    backend: str = "tvm"
    progress: object = None  # pipeline.print_progress or None

    @property
    def origins(self) -> dict:
        return self.derived.imported.origin


@dataclasses.dataclass
class Built:
    """A family's build: the files of its artifact, the step's signature, state and memory report,
    and the manifest entries the family adds. `library`: a library this process can load and run
    (then the build is a Program), else None (a DeviceProgram that exports `files`)."""
    files: dict  # {name in the artifact: path of a file or directory}
    signature: object
    state: dict
    report: object
    meta: dict
    scratch: str  # the temporary directory holding the files; removed with the program
    library: str | None = None


@dataclasses.dataclass
class RunOptions:
    """`pockengine run`'s options."""
    steps: int
    data: str | None = None
    save: bool = False
    threads: int | None = None


class Family:
    """A target family. Subclasses set `name` and `lowering` and override what differs."""

    name: str = ""
    lowering = None  # pipeline.Lowering
    # `pockengine run` locks the artifact around loading, training and saving (False: the family's
    # own runner locks it when it saves).
    run_locks_artifact = True

    def check_options(self, preset, backend: str) -> None:
        """TargetError for build options the family does not support."""
        if backend != "tvm":
            raise TargetError(f"--backend {backend} runs heavy ops on PyTorch's kernels in the training process, "
                              f"which only a host build has; build for {preset.name} with --backend tvm")

    def build(self, request: BuildRequest) -> list:
        """The lower, memory plan and codegen stages -> [Built] (more than one: alternatives the build
        times and keeps the fastest of)."""
        raise NotImplementedError

    # ------------------------------------------------------------ running

    def runs_here(self, manifest: dict) -> bool:
        """Whether this process can run the artifact's steps."""
        return False

    def why_not_here(self, manifest: dict) -> str:
        target = manifest.get("target", self.name)
        return (f"this program is built for {target} ({self.name}); it cannot run in this process. Export it "
                "(`program.export(DIR)` or `pockengine build`) and run it with `pockengine run DIR`")

    def device(self, manifest: dict):
        """The TVM device an artifact that runs here runs on."""
        import tvm

        return tvm.cpu()

    def run(self, artifact: str, options: RunOptions, load) -> int:
        """`pockengine run`: train the artifact `options.steps` steps; `load(artifact, threads)` loads
        it as the runtime does. The default trains in this process."""
        program = load(artifact, options.threads)
        if not self.runs_here(program.meta):
            raise TargetError(f"{artifact} cannot run here: {self.why_not_here(program.meta)}")
        return train_in_process(program, artifact, options)

    # ------------------------------------------------------------ reports

    def summary(self, meta: dict, detailed: bool = False) -> str | None:
        """What `build` (and, `detailed`, `inspect`) prints about an artifact of this family (None: nothing)."""
        return None

    def run_status(self, preset) -> str | None:
        """`pockengine targets`' run column when it is not about tools (None: the run tools decide)."""
        return None


def batches(program, data_path: str | None, artifact: str):
    """Yield batches forever: from --data (arrays named after the inputs, with an optional leading
    batch-index axis, cycled) or the example batch saved at build time."""
    specs = [(s.name, s.shape) for s in program.signature.batch]
    try:
        yield from iterate_batches(specs, data_path or os.path.join(artifact, EXAMPLE))
    except ValueError as e:
        raise InputError(str(e)) from None


def train_in_process(program, artifact: str, options: RunOptions) -> int:
    """Train a loaded program on the batches, printing each step's loss and time; save if asked."""
    stream = batches(program, options.data, artifact)
    times = []
    for step in range(1, options.steps + 1):
        batch = next(stream)
        start = time.perf_counter()
        loss = program.step(*batch)
        times.append(time.perf_counter() - start)
        print(f"step {step:>5}  loss {loss:.6f}  {times[-1] * 1e3:8.2f} ms", flush=True)
    if times:
        print(f"{len(times)} steps, median {np.median(times) * 1e3:.2f} ms/step")
    if options.save:
        program.save_state(artifact)
        print(f"saved the trained state to {artifact}")
    return 0


def scratch_directory() -> str:
    """A temporary directory for a build's files (the Program that keeps them removes it)."""
    return tempfile.mkdtemp(prefix="pockengine-")


@contextmanager
def removed_on_error(scratch: str):
    """The build's temporary directory goes if the build fails."""
    try:
        yield
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def note(progress, text: str) -> None:
    """A line for the user beside the stages (only when the build shows progress)."""
    if progress:
        print(text, file=sys.stderr, flush=True)
