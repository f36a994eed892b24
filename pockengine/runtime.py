"""A compiled training program: run steps, read and write state, export and load artifacts.

CompiledStep holds what every compiled step has wherever it runs (the state, state dicts, the
learning rate, export); Program runs the step in this process, DeviceProgram holds one built for
another machine and has no step here.

Only numpy and the TVM runtime are imported here: a loaded artifact trains without PyTorch. Tensors
from torch are accepted duck-typed (anything with `.detach().cpu().numpy()`).

Artifact layout (a directory):
    manifest.json   format, step signature, parameter table, target, optimizer, memory report, versions,
                    sha256 of the library
    train_step.so   the compiled step (TVM Relax VM executable)
    state.npz       parameters, buffers and optimizer state, by name
Every file is written to a temporary name and renamed into place; a directory is assembled beside
the destination and swapped in, so a crash leaves either the old artifact or the new one
(artifact_files.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
import weakref
import zipfile
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from .analysis.memory_plan import MemoryReport
from .artifact_files import (
    FORMAT,
    FORMAT_VERSION,
    LIBRARY,
    MANIFEST,
    STATE,
    check_destination,
    make_temp_directory,
    read_manifest,
    recover,
    replace_directory,
)
from .autodiff.step import BUFFER, FROZEN, OPTIMIZER, PARAM, STEP_FUNC, StepSignature
from .errors import ArtifactError, InputError, NotRunnableHereError, NumericsError, StateError
from .frontend import to_numpy, to_torch
from .optim import LR, STEP
from .optim import from_json as optimizer_from_json
from .optimizer_state import TorchOptimizerLayout, is_torch_layout
from .sparse import plan_from_json
from .targets.device_runner import (
    EXAMPLE,
    NON_FINITE,
    ThreadGovernor,
    available_cpus,
    batch_problem,
    chosen_threads,
    first_non_finite,
    host_view,
    locked,
    remove_path,
)
from .targets.device_runner import write_npz as _write_npz
from .targets.families import family
from .validate import check_learning_rate


class CompiledStep:
    """A compiled training step and the state it trains, wherever the step runs: state dicts, the
    learning rate, the batch checks, the artifact. Program runs the step in this process,
    DeviceProgram holds one built for another machine; each keeps the state tensors in its own
    storage (_stored, _read, _view)."""

    example: dict | None = None  # {input name: array}: the batch it was compiled for, exported as example.npz

    def __init__(self, signature: StepSignature, state: dict, report: MemoryReport, meta: dict):
        self.signature = signature
        self.meta = meta
        self._report = report
        self._specs = {s.name: s for s in signature.state}
        self._state = {}
        for spec in signature.state:
            if spec.name not in state:
                raise StateError(f"no initial value for {spec.name}")
            self._state[spec.name] = self._stored(np.asarray(state[spec.name], dtype=spec.dtype).reshape(spec.shape))

    def _stored(self, array: np.ndarray):
        """A state tensor as this program keeps it, from an array of its dtype and shape (copied)."""
        raise NotImplementedError

    def _read(self, name: str) -> np.ndarray:
        """One state tensor (by state name) as a numpy array of its own."""
        raise NotImplementedError

    def _view(self, name: str) -> np.ndarray:
        """A state tensor read in place where it is in host memory."""
        raise NotImplementedError

    def _write(self, arrays: dict) -> None:
        """Replace state tensors, {state name: array} (cast to their dtype)."""
        for name, value in arrays.items():
            spec = self._specs[name]
            self._state[name] = self._stored(np.asarray(value).astype(spec.dtype, copy=False).reshape(spec.shape))

    @property
    def lr(self) -> float:
        return float(self._read("lr"))

    @lr.setter
    def lr(self, value: float) -> None:
        check_learning_rate(value)
        self._write({"lr": np.array(value, "float64")})

    _diverged = ""  # why the state is not finite, once a checked step found it so

    def _refuse_non_finite(self) -> None:
        """Never write a non-finite state (steps run with check=False may have made one)."""
        cause = self._diverged or self._non_finite_state()
        if cause:
            raise NumericsError(f"not saving: {cause}. Load a finite state first")

    def _non_finite_state(self, names=None) -> str:
        """The first state tensor (of `names`, default all) holding a NaN or an infinity, described;
        '' if none does."""
        names = [s.name for s in self.signature.state] if names is None else names
        found = first_non_finite((name, self._view(name)) for name in names)
        return f"{found[1]} values of {self.signature.owner(found[0])} are NaN or infinite" if found else ""

    @functools.cached_property
    def _batch_checks(self) -> tuple:
        """(input names, index ranges as dicts): read once, not before every step."""
        return [s.name for s in self.signature.batch], [r.to_json() for r in self.signature.index_ranges]

    def check_batch(self, arrays: list, label: str, outcome: str = "") -> None:
        """Raise NumericsError for NaN or infinite inputs, InputError for labels or ids out of range
        (device_runner.batch_problem: what the step's own check refuses, described); `label` names
        the batch in the message, `outcome` follows it."""
        names, ranges = self._batch_checks
        problem = batch_problem(names, arrays, ranges)
        if problem:
            kind, message = problem
            raise (NumericsError if kind == NON_FINITE else InputError)(f"{label}: {message}{outcome}")

    # ------------------------------------------------------------------ state

    @property
    def _aliases(self) -> dict:
        """Tied parameters' second names -> the parameter they name."""
        return self.meta.get("aliases", {})

    def _model_keys(self) -> list[str]:
        skip = set(self.meta.get("non_persistent", []))
        known = set(self._specs) | set(self.signature.partial) | set(self._aliases)
        return [k for k in self.meta["state_dict_keys"] if k in known and k not in skip]

    def _model_shape(self, key: str) -> tuple:
        key = self._aliases.get(key, key)
        split = self.signature.partial.get(key)
        if key in self.signature.packed:
            return self.signature.packed[key].model_shape(self._specs[key].shape)
        if split is None:
            return self._specs[key].shape
        shape = list(self._specs[split.trained].shape)
        shape[split.axis] += self._specs[split.frozen].shape[split.axis]
        return tuple(shape)

    def state_dict(self, as_torch: bool = False) -> dict:
        """The model's state, torch names -> numpy arrays (parameters and persistent buffers); a
        partially trained weight is whole again, a packed one unpacked. as_torch: torch tensors
        instead, for `model.load_state_dict(program.state_dict(as_torch=True))`."""
        out = {}
        for k in self._model_keys():
            name = self._aliases.get(k, k)
            split = self.signature.partial.get(name)
            out[k] = (split.join(self._read(split.trained), self._read(split.frozen)) if split
                      else self.signature.model_layout(name, self._read(name)))
        return to_torch(out) if as_torch else out

    def optimizer_state_dict(self, as_torch: bool = False) -> dict:
        """The optimizer's state: lr, step and the per-parameter slots (`optimizer.exp_avg.fc.weight`,
        ...) -> numpy arrays. as_torch: torch.optim's `state_dict()` layout instead, with torch
        tensors, the parameters numbered as `torch.optim.AdamW(model.parameters())` numbers them,
        for `torch_optimizer.load_state_dict(...)` (see optimizer_state.py)."""
        own = {name: self._read(name) for name in self._optimizer_state_names()}
        return to_torch(self._torch_optimizer_layout().export(own)) if as_torch else own

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        """Replace the optimizer's state from either layout optimizer_state_dict gives: the
        program's own, or torch.optim's (`torch_optimizer.state_dict()`: its hyper-parameters must
        be those the program was compiled with, its learning rate becomes program.lr, its parameters
        are numbered in model.parameters() order or, for an optimizer given only the trained
        parameters, in theirs). StateError names what does not fit, and nothing is loaded then."""
        if is_torch_layout(state_dict):
            arrays = self._torch_optimizer_layout().read(state_dict, int(self._read(STEP)))
        else:
            own = self._optimizer_state_names()
            unexpected = [k for k in state_dict if k not in own]
            if unexpected:
                raise StateError(f"load_optimizer_state_dict: {_listed(unexpected)} are not optimizer state; the "
                                 f"program's is {_listed(own)} (the model's state loads with load_state_dict)")
            arrays = {k: to_numpy(v) for k, v in state_dict.items()}
            for k, a in arrays.items():
                if tuple(a.shape) != self._specs[k].shape:
                    raise StateError(f"load_optimizer_state_dict: {k} has shape {tuple(a.shape)}, the program "
                                     f"expects {self._specs[k].shape}")
        if LR in arrays:
            check_learning_rate(float(arrays[LR]))
        self._write(arrays)

    def _optimizer_state_names(self) -> list[str]:
        return [s.name for s in self.signature.state if self.signature.categories[s.name] == OPTIMIZER]

    def _torch_optimizer_layout(self) -> TorchOptimizerLayout:
        """The program's parameters as torch.optim numbers them, and its optimizer."""
        categories, partial = self.signature.categories, self.signature.partial
        parameters = [k for k in self.meta["state_dict_keys"] if k not in self._aliases
                      and (k in partial or categories.get(k) in (PARAM, FROZEN))]
        trained = [k for k in parameters if k in partial or categories[k] == PARAM]
        return TorchOptimizerLayout(optimizer_from_json(self.meta["optimizer"]), parameters, trained,
                                    {k: self._model_shape(k) for k in trained},
                                    {k: partial[k] for k in trained if k in partial})

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> IncompatibleKeys:
        """Replace model (and/or optimizer) state, as torch.nn.Module.load_state_dict does: with
        `strict` (the default) the keys must be the model's exactly, else StateError; without, the
        keys the program has are loaded and the others ignored. Either way every shape must be the
        model's, and nothing is loaded unless all are. Returns (missing_keys, unexpected_keys). State
        names (a partially trained weight's parts, optimizer slots) are accepted too."""
        missing, unexpected = self._check_state_dict(state_dict, strict)
        ignored = set(unexpected)
        # A tied parameter's alias is the same tensor: its value is taken when its own name is absent.
        arrays = {self._aliases.get(k, k): to_numpy(v) for k, v in state_dict.items()
                  if k not in ignored and not (k in self._aliases and self._aliases[k] in state_dict)}
        arrays = self.signature.split_state(arrays)
        self._check_integer_state(arrays)
        self._write(arrays)
        if self._diverged and not self._non_finite_state():
            self._diverged = ""
        return IncompatibleKeys(missing, unexpected)

    def _check_state_dict(self, state_dict: dict, strict: bool) -> tuple:
        """(missing keys, unexpected keys) of `state_dict`; StateError for either with `strict`, and
        for a shape that is not the model's."""
        model_keys = self._model_keys()
        unexpected = [k for k in state_dict if k not in self._specs and k not in self.signature.partial
                      and k not in self._aliases]
        missing = [k for k in model_keys if not self._given(k, state_dict)]
        if strict and (unexpected or missing):
            raise StateError(
                "load_state_dict: "
                + (f"unexpected keys {_listed(unexpected)}; " if unexpected else "")
                + (f"missing keys {_listed(missing)}; " if missing else "")
                + f"the program's keys are {_listed(sorted(model_keys))} "
                "(pass strict=False to load the keys the program has and ignore the others)"
            )
        ignored = set(unexpected)
        for k, v in state_dict.items():
            shape = tuple(to_numpy(v).shape)
            if k not in ignored and shape != self._model_shape(k):
                raise StateError(f"load_state_dict: {k} has shape {shape}, the program expects {self._model_shape(k)}")
        return missing, unexpected

    def _check_integer_state(self, arrays: dict) -> None:
        """A quantized model's frozen weights are int8 state (passes/narrow_quantized.py): a value
        that is not an integer in [-128, 127] would silently become another one when cast."""
        for name, value in arrays.items():
            if self._specs[name].dtype != "int8":
                continue
            value = np.asarray(value, dtype=np.float64)
            bad = ~np.isfinite(value) | (value != np.round(value)) | (value < -128) | (value > 127)
            if bad.any():
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                raise StateError(
                    f"load_state_dict: {self.signature.owner(name)} is a frozen weight of a quantized model, "
                    f"held as int8 by the step: its values must be integers in [-128, 127], element {index} "
                    f"is {value[index]!r}. Load the weights pe.quantize.int8 made, or train this weight "
                    "(sparse_update) to keep it in float; nothing was loaded")

    def _given(self, key: str, state_dict: dict) -> bool:
        """Whether `state_dict` holds the model's `key`: by its name, or a partially trained weight
        as both its parts (state names, as state_arrays() gives them)."""
        split = self.signature.partial.get(key)
        return key in state_dict or (split is not None and split.trained in state_dict and split.frozen in state_dict)

    def memory_report(self) -> MemoryReport:
        return self._report

    @property
    def plan(self) -> dict:
        """{parameter name: "full" | "frozen" | sparse.Partial}: what the step trains, as the job's
        sparse scheme resolved on the model (TrainingJob.plan), without importing the model again."""
        if "plan" not in self.meta:
            raise ArtifactError("this artifact was built by a PockEngine that did not record its sparse plan; "
                                "rebuild it to read program.plan")
        return plan_from_json(self.meta["plan"])

    # ------------------------------------------------------------------ artifacts

    def manifest(self) -> dict:
        import tvm

        versions = {"pockengine": _package_version(), "tvm": tvm.__version__, "numpy": np.__version__}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.meta,
            "signature": self.signature.to_json(),
            "parameters": [dict(s.to_json(), trained=self.signature.categories[s.name] == PARAM)
                           for s in self.signature.state if self.signature.categories[s.name] in (PARAM, FROZEN)],
            "buffers": [s.to_json() for s in self.signature.state if self.signature.categories[s.name] == BUFFER],
            "memory": self._report.to_json(),
            "versions": versions,
            "files": self._file_table(),
        }

    def export(self, directory: str, force: bool = False) -> str:
        """Write the artifact to `directory` and return its path. An artifact already there is replaced
        atomically (a crash leaves the old one or the new one); anything else there is refused unless
        `force`."""
        self._refuse_non_finite()
        directory = os.path.abspath(directory)
        recover(directory)
        check_destination(directory, force)
        tmp = make_temp_directory(directory)
        try:
            self._write_files(tmp)
            _write_npz(os.path.join(tmp, STATE), self.state_arrays())
            if self.example:
                _write_npz(os.path.join(tmp, EXAMPLE), self.example)
            manifest = self.manifest()
            manifest["sha256"] = {name: _sha256(os.path.join(tmp, name)) for name in self._hashed_files()}
            _write_json(os.path.join(tmp, MANIFEST), manifest)  # last: a directory with a manifest is complete
            if os.path.isdir(directory) and not os.path.islink(directory):
                with locked(directory):  # not while a `run --save` is training it
                    replace_directory(tmp, directory)
            else:
                replace_directory(tmp, directory)
        except BaseException:
            remove_path(tmp)
            raise
        return directory

    def save_state(self, directory: str) -> None:
        """Write the current state into an exported artifact (atomically replaces its state.npz)."""
        self._refuse_non_finite()
        with locked(directory):
            _write_npz(os.path.join(directory, STATE), self.state_arrays())

    def state_arrays(self) -> dict:
        """Every state tensor by its state name (a partially trained weight as its two parts)."""
        return {name: self._read(name) for name in self._state}

    def _write_files(self, directory: str) -> None:
        """Copy the step's files (not the state) into the artifact directory being assembled."""
        raise NotImplementedError

    def _hashed_files(self) -> list:
        """The files whose sha256 the manifest records (checked when the artifact is loaded)."""
        raise NotImplementedError

    def _file_table(self) -> dict:
        """The manifest's "files": {role: file name}."""
        raise NotImplementedError


class Program(CompiledStep):
    """One compiled training step that runs in this process, and the state it trains."""

    def __init__(self, library: str, signature: StepSignature, state: dict, report: MemoryReport, meta: dict,
                 owns_library: bool = False, threads: int | None = None):
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.library = library
        try:
            executable = tvm.runtime.load_module(library)
        except Exception as e:
            raise ArtifactError(f"cannot load {library}: {str(e).splitlines()[0][:300]}; rebuild the artifact") from e
        if owns_library:  # a compile's private copy: removed with the Program (the loaded code stays mapped)
            weakref.finalize(self, shutil.rmtree, os.path.dirname(library), True)
        self._device = family(meta).device(meta)
        # TVM would size its thread pool from half the CPUs on x86 (it assumes hyperthreads) and pin
        # it to cores: each step configures the pool of the thread running it instead, for a
        # machine shared with other processes (device_runner.configure_thread_pool, ThreadGovernor).
        on_cpu = self._device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        self._governor = ThreadGovernor(available_cpus(), adaptive=on_cpu)  # a GPU step's time is the GPU's
        self.threads = chosen_threads(threads)
        library_kernels = meta.get("backend", {}).get("library_kernels")
        if library_kernels:  # ops switched to PyTorch's kernels (passes/switch_backend.py)
            from . import torch_kernels

            torch_kernels.register(library_kernels)
        self._executable = executable
        self._vm = relax.VirtualMachine(executable, self._device)
        self._fn = self._vm[STEP_FUNC]
        self._trained = [name for name in signature.outputs if signature.categories[name] == PARAM]
        super().__init__(signature, state, report, meta)
        self.steps_taken = 0

    def _stored(self, array: np.ndarray):
        """A tensor on the step's device."""
        return self._tvm.runtime.tensor(np.array(array, order="C", copy=True), self._device)

    def _read(self, name: str) -> np.ndarray:
        return self._state[name].numpy()

    def _view(self, name: str) -> np.ndarray:
        return host_view(self._state[name])

    # ------------------------------------------------------------------ training

    def step(self, *batch, check: bool = True) -> float:
        """Run one training step on (inputs..., target) and return the loss.

        The step checks its batch and its result itself (autodiff/guards.py): a batch holding NaN or
        infinite values, or labels (indices) out of the range the model accepts, changes no state,
        and neither does it count as a step; a trained parameter the update made non-finite (which a
        ReLU can hide from the loss) makes the loss NaN. With `check` (the default) either raises:
        NumericsError for non-finite values, InputError for labels out of range, naming the input or
        the parameter. Updates are written in place, so after a non-finite update the program
        refuses to step until a finite state is loaded; a non-finite state is never saved or
        exported. check=False returns the NaN loss instead of raising, and steps on."""
        if self._diverged:
            raise NumericsError(f"{self._diverged}; this program's state is not finite: load a finite state "
                                "(load_state_dict) or the artifact again (pockengine.load)")
        arrays = self._batch_arrays(batch)
        if not self.signature.checks_in_step:
            return self._step_checked_here(arrays, check)
        outs = self._run(self._batch_tensors(arrays), self._state)
        loss = float(outs[0].numpy())
        if math.isfinite(loss):
            self.steps_taken += 1
            return loss
        # Only now is it worth a look from Python: which of the step's checks failed.
        label = f"step {self.steps_taken + 1}"
        try:
            self.check_batch(arrays, label, ". The step did not train on it: the state is unchanged")
        except (NumericsError, InputError):
            if check:
                raise
            return loss
        self.steps_taken += 1
        if not check:
            return loss
        what = self._non_finite_state(self._trained) or f"the loss is {loss}"
        self._diverged = f"{label}: {what}"
        raise NumericsError(f"{self._diverged}. Nothing was saved; lower the learning rate or check the "
                            "loss for log(0) or division by zero")

    def _step_checked_here(self, arrays: list, check: bool) -> float:
        """A step that does not check itself (an artifact built before steps did, or compiled
        without checks): the same checks from Python, the batch before it runs."""
        label = f"step {self.steps_taken + 1}"
        if check:
            self.check_batch(arrays, label)
        loss = float(self._run(self._batch_tensors(arrays), self._state)[0].numpy())
        self.steps_taken += 1
        if check:
            what = self._non_finite_state(self._trained) or ("" if math.isfinite(loss) else f"the loss is {loss}")
            if what:
                self._diverged = f"{label}: {what}"
                raise NumericsError(f"{self._diverged}. Nothing was saved; lower the learning rate or check the "
                                    "loss for log(0) or division by zero")
        return loss

    def time_step(self, *batch, repeats: int = 10) -> float:
        """Median milliseconds of a step on `batch` after warm-up, run on a copy of the state: the
        program itself trains nothing."""
        from .timing import median_ms

        args, state = self._on_a_copy(batch)
        return median_ms(lambda: self._run(args, state), repeats)

    def kernel_times(self, *batch, repeats: int = 3) -> dict:
        """{kernel name: (milliseconds per step, calls per step, the first call's argument shapes)} of
        `repeats` steps on `batch` after one warm-up, each kernel call timed from the step's virtual
        machine; run on a copy of the state like time_step, by a virtual machine of its own (so for a
        moment the state and the step's working memory twice). VM builtins (allocation, views) are
        listed too, under their `vm.builtin.*` names."""
        from tvm import relax

        args, state = self._on_a_copy(batch)
        vm = relax.VirtualMachine(self._executable, self._device)  # its own instrument, not the step's
        totals, started = {}, {}

        def instrument(_func, name, before_run, _ret, *call_args):
            now = time.perf_counter()
            if before_run:
                started[name] = now
            else:
                entry = totals.setdefault(name, [0.0, 0, [tuple(a.shape) for a in call_args if hasattr(a, "shape")]])
                entry[0] += now - started.pop(name, now)
                entry[1] += 1
            return relax.VMInstrumentReturnKind.NO_OP

        step = vm[STEP_FUNC]
        self._run(args, state, step)
        vm.set_instrument(instrument)
        for _ in range(repeats):
            self._run(args, state, step)
        return {name: (seconds * 1e3 / repeats, calls // repeats, shapes)
                for name, (seconds, calls, shapes) in totals.items()}

    def _on_a_copy(self, batch) -> tuple:
        """(the batch's tensors, a copy of the state): what time_step and kernel_times run on."""
        args = self._batch_tensors(self._batch_arrays(batch))
        return args, {name: self._stored(value.numpy()) for name, value in self._state.items()}

    @property
    def threads(self) -> int | None:
        """The worker threads the step's kernels run on, when set (`pe.load(..., threads=N)`, or
        TVM_NUM_THREADS); None: chosen step by step (ThreadGovernor) among the CPUs available to this
        process (its affinity mask and cgroup CPU quota, read at load): all of them on a quiet
        machine, half beside busy processes."""
        return self._threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise InputError(f"threads must be a whole number >= 1 (or None: chosen among the {available_cpus()} "
                             f"CPUs available to this process), got {value!r}")
        self._threads = None if value is None else int(value)

    def _run(self, args, state: dict, step=None):
        """One step (by `step`, default the program's) on `state` ({name: tensor}), which takes the
        new values; the step's outputs."""
        # another step (kernel_times') is instrumented: its time says nothing about the thread count
        outs = self._governor.run(step or self._fn, *args, *(state[s.name] for s in self.signature.state),
                                  fixed=self._threads, learn=step is None)
        state.update(zip(self.signature.outputs, list(outs)[1:]))
        if not self._inputs_checked and self._batch_buffers is not None:
            self._check_inputs_are_not_returned(outs)
        return outs

    _CALLED_AS = "step()"  # what the batch's errors name

    def _batch_arrays(self, batch) -> list:
        """The batch as numpy arrays, checked against the compiled shapes and dtypes."""
        specs = self.signature.batch
        if len(batch) != len(specs):
            names = ", ".join(s.name for s in specs)
            raise InputError(f"{self._CALLED_AS} takes {len(specs)} arrays ({names}), got {len(batch)}")
        arrays = []
        for i, (x, spec) in enumerate(zip(batch, specs)):
            a = to_numpy(x)
            if tuple(a.shape) != spec.shape or str(a.dtype) != spec.dtype:
                raise InputError(
                    f"input {i} ({spec.name}): expected shape {spec.shape} dtype {spec.dtype}, got shape "
                    f"{tuple(a.shape)} dtype {a.dtype}. The program is compiled for the example batch's "
                    "shapes and dtypes: convert the array, or compile again with an example of this shape."
                )
            arrays.append(a)  # a strided array is copied once, into the step's tensor, not first made contiguous
        return arrays

    def _batch_tensors(self, arrays: list) -> list:
        if self._batch_buffers is None:
            return [self._tvm.runtime.tensor(a, self._device) for a in arrays]
        for (_, view), a in zip(self._batch_buffers, arrays):
            np.copyto(view, a)
        return [tensor for tensor, _ in self._batch_buffers]

    @functools.cached_property
    def _batch_buffers(self) -> list | None:
        """[(tensor, numpy view of it)] per input, which each batch is copied into: a new TVM tensor per
        input and step costs ~25 us (a small MLP's step is ~300 us), a copy into a kept one ~1 us.
        None on a GPU, and once a step has returned one of them (_check_inputs_are_not_returned)."""
        if self._device.dlpack_device_type() != self._tvm.cpu().dlpack_device_type():
            return None
        tensors = [self._tvm.runtime.empty(s.shape, s.dtype, self._device) for s in self.signature.batch]
        return [(tensor, host_view(tensor)) for tensor in tensors]

    _inputs_checked = False

    def _check_inputs_are_not_returned(self, outs) -> None:
        """After the first step on the kept input tensors: a tensor the step returned may share their
        memory (a buffer the forward sets to its input, returned as the input or a view of it), and the
        next batch would then overwrite that state. If one does, batches get new tensors from now on;
        what was returned keeps its memory. A compiled step aliases the same way at every call."""
        spans = [(view.ctypes.data, view.ctypes.data + view.nbytes) for _, view in self._batch_buffers]
        for out in list(outs)[1:]:
            view = host_view(out)
            start, end = view.ctypes.data, view.ctypes.data + view.nbytes
            if any(start < span_end and span_start < end for span_start, span_end in spans):
                self._batch_buffers = None
                break
        self._inputs_checked = True

    def _write_files(self, directory: str) -> None:
        shutil.copyfile(self.library, os.path.join(directory, LIBRARY))

    def _hashed_files(self) -> list:
        return [LIBRARY]

    def _file_table(self) -> dict:
        return {"library": LIBRARY, "state": STATE}


class InferenceProgram(Program):
    """A compiled forward (pockengine.compile_inference) that runs in this process: call it on the
    model's inputs for its output. Its weights are state as a training program's are: read them
    with state_dict, replace them with load_state_dict (a fine-tuning program's state_dict), write
    the artifact with export and load it again with pockengine.load."""

    KIND = "inference"  # the manifest's "kind"
    _CALLED_AS = "the program"

    def __call__(self, *inputs, check: bool = True) -> np.ndarray:
        """The model's output on `inputs` (arrays of the compiled shapes and dtypes), a new array.
        With `check` (the default) inputs holding NaN or infinite values, or ids out of the range
        an embedding or a gather accepts, are refused (NumericsError, InputError) before they run."""
        arrays = self._batch_arrays(inputs)
        if check:
            self.check_batch(arrays, "the input")
        return self._run(self._batch_tensors(arrays), self._state)[0].numpy()

    def step(self, *batch, check: bool = True) -> float:
        raise InputError("this is an inference program (pockengine.compile_inference): it trains nothing. Call it "
                         "on the model's inputs, program(x), for the output; train with a program of "
                         "pockengine.compile and load its state_dict() into this one")


class DeviceProgram(CompiledStep):
    """A training step built for another machine (aarch64, a GPU, a microcontroller) and its state:
    it exports an artifact for that machine, and its state can be read and changed here, but it
    has no step(), time_step() or kernel_times(): asking for one raises NotRunnableHereError (a
    TargetError and an AttributeError), which says how to run it. `pockengine run` runs the
    exported artifact under QEMU (aarch64, Cortex-M) or on a GPU when there is one."""

    def __init__(self, files: dict, signature: StepSignature, state: dict, report: MemoryReport, meta: dict,
                 scratch: str | None = None):
        """files: {name in the artifact: path of a file or directory to copy there}; scratch: a
        temporary directory holding them, removed with the program."""
        self.files = files
        super().__init__(signature, state, report, meta)
        if scratch:
            weakref.finalize(self, shutil.rmtree, scratch, True)

    def __getattr__(self, name: str):
        # Only for attributes the instance and its class do not have: a Program's ways of running
        # the step get an answer saying where this one runs.
        if name in RUN_HERE_ONLY:
            raise NotRunnableHereError(
                f"program.{name}: this program is built for {self.meta['target']} ({self.meta['family']}); "
                "it cannot run in this process. Export it (`program.export(DIR)` or `pockengine build`) "
                "and run it with `pockengine run DIR`, which uses QEMU for aarch64 and Cortex-M artifacts "
                "and a GPU for CUDA ones")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}", name=name, obj=self)

    def _stored(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def _read(self, name: str) -> np.ndarray:
        return self._state[name].copy()

    def _view(self, name: str) -> np.ndarray:
        return self._state[name]

    def _write_files(self, directory: str) -> None:
        for name, path in self.files.items():
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(directory, name), symlinks=False)
            else:
                shutil.copyfile(path, os.path.join(directory, name))

    def _hashed_files(self) -> list:
        return [name for name, path in self.files.items() if os.path.isfile(path)]

    def _file_table(self) -> dict:
        table = {name: name for name in self.files}
        if LIBRARY in self.files:
            table = {"library": LIBRARY, **{k: v for k, v in table.items() if k != LIBRARY}}
        return {**table, "state": STATE}


# What a Program does with its step in this process, which a DeviceProgram cannot.
RUN_HERE_ONLY = ("step", "time_step", "kernel_times", "threads")


class IncompatibleKeys(NamedTuple):
    """What load_state_dict did not match, as torch.nn.Module.load_state_dict reports it: the
    program's keys the state dict lacks, and the state dict's keys the program does not have."""

    missing_keys: list
    unexpected_keys: list

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return f"IncompatibleKeys(missing_keys={self.missing_keys}, unexpected_keys={self.unexpected_keys})"


def _listed(keys: list, shown: int = 10) -> str:
    """The first `shown` keys, and '...' when there are more."""
    return f"{keys[:shown]}{'...' if len(keys) > shown else ''}"


def load(directory: str, threads: int | None = None) -> Program | DeviceProgram:
    """Load an artifact written by `export` (or `pockengine build`) as a Program. An artifact built
    for another machine loads as a DeviceProgram: its state can be read and changed, its steps run there.
    threads: worker threads for the step's kernels (default: chosen step by step among the CPUs
    available to this process; see Program.threads)."""
    manifest = read_manifest(directory)
    for name, expected in manifest.get("sha256", {}).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing: the artifact is incomplete; rebuild it with `pockengine build`")
        if _sha256(path) != expected:
            raise ArtifactError(f"{path} is corrupt or truncated (sha256 differs from the manifest); "
                                "rebuild the artifact")
    signature = StepSignature.from_json(manifest["signature"])
    meta = {k: v for k, v in manifest.items() if k not in _COMPUTED_KEYS}
    report = MemoryReport.from_json(manifest["memory"])
    with _StateFile(os.path.join(directory, manifest["files"]["state"]), signature) as state:
        if runs_here(manifest):
            lib_path = os.path.join(directory, manifest["files"]["library"])
            if not os.path.isfile(lib_path):
                raise ArtifactError(f"{lib_path} is missing: the artifact is incomplete; "
                                    "rebuild it with `pockengine build`")
            _check_library(lib_path, manifest)
            kind = InferenceProgram if manifest.get("kind") == InferenceProgram.KIND else Program
            program = kind(lib_path, signature, state, report, meta, threads=threads)
        else:
            files = {name: os.path.join(directory, name) for key, name in manifest["files"].items() if key != "state"}
            program = DeviceProgram({name: path for name, path in files.items() if os.path.exists(path)}, signature,
                                    state, report, meta)
    example = os.path.join(directory, EXAMPLE)
    if os.path.isfile(example):
        with np.load(example, allow_pickle=False) as npz:
            program.example = {k: npz[k] for k in npz.files}
    return program


# Manifest entries derived from the program when it is written (everything else is the program's meta).
_COMPUTED_KEYS = frozenset({"format", "format_version", "signature", "parameters", "buffers", "memory", "versions",
                            "sha256", "files"})


def runs_here(manifest: dict) -> bool:
    """Whether this process can run the artifact's steps (its family decides: host builds, and CUDA
    builds whose host code is for this machine's CPU on a machine with a GPU)."""
    return family(manifest).runs_here(manifest)


class _StateFile(Mapping):
    """An artifact's state.npz, read one tensor at a time and checked against the signature as it is
    read: a program copies each tensor into its own storage before the next is read, so loading
    never holds the file's arrays and the program's copies of them all at once (twice the state)."""

    def __init__(self, path: str, signature: StepSignature):
        self.path = path
        self._specs = {spec.name: spec for spec in signature.state}
        try:
            self._npz = np.load(path, allow_pickle=False)
            self._names = names = set(self._npz.files)
        except FileNotFoundError:
            raise ArtifactError(f"{path} is missing: the artifact is incomplete; rebuild it") from None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise self._corrupt(e) from None
        missing = [name for name in self._specs if name not in names]
        if missing:
            self.close()
            raise ArtifactError(f"{path} lacks {missing[0]}; the state does not belong to this artifact")

    def _corrupt(self, error) -> ArtifactError:
        return ArtifactError(f"{self.path} is corrupt or truncated ({type(error).__name__}: {error}); rebuild the "
                             "artifact or restore the state file")

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            array = self._npz[name]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise self._corrupt(e) from None
        spec = self._specs.get(name)
        if spec is not None and tuple(array.shape) != spec.shape:
            raise ArtifactError(f"{self.path}: {name} has shape {array.shape}, expected {spec.shape}")
        return array

    def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's would)
        return name in self._names

    def __iter__(self):
        return iter(self._npz.files)

    def __len__(self) -> int:
        return len(self._npz.files)

    def close(self) -> None:
        self._npz.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_library(path: str, manifest: dict) -> None:
    """Refuse a truncated shared library before dlopen maps it (reading past its end is SIGBUS, not
    an error): its ELF header's section table must lie inside the file. The sha256 in the manifest,
    when there is one, has been checked already."""
    import struct

    with open(path, "rb") as f:
        header = f.read(64)
        size = os.fstat(f.fileno()).st_size
    if len(header) < 64 or header[:4] != b"\x7fELF":
        raise ArtifactError(f"{path} is not a shared library (no ELF header); rebuild the artifact")
    if header[4] == 2:  # 64-bit: e_shoff at 40, e_shentsize and e_shnum at 58
        endian = "<" if header[5] == 1 else ">"
        shoff, = struct.unpack_from(endian + "Q", header, 40)
        shentsize, shnum = struct.unpack_from(endian + "HH", header, 58)
        if shoff + shentsize * shnum > size:
            raise ArtifactError(f"{path} is truncated ({size} bytes; its section table ends at byte "
                                f"{shoff + shentsize * shnum}); rebuild the artifact")


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable(data), f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "items"):  # TVM maps
        return {str(k): _jsonable(v) for k, v in x.items()}
    if hasattr(x, "__iter__"):  # TVM arrays (target keys, ...)
        return [_jsonable(v) for v in x]
    return str(x)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("pockengine")
    except Exception:  # noqa: BLE001 - no package metadata (a source checkout): the version is unknown
        return "0+unknown"
