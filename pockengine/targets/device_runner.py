"""Run training steps of an exported artifact on the device: numpy and the TVM runtime only.

Copied into aarch64 and CUDA artifacts as run_step.py, next to train_step.so, state.npz and manifest.json:

    python3 run_step.py ARTIFACT_DIR --steps 20 [--data batches.npz] [--save]

It needs no PockEngine, no PyTorch and no TVM compiler on the device: the TVM wheel's runtime
(`libtvm_runtime`, loaded with TVM_USE_RUNTIME_LIB=1) runs the Relax VM executable. A Python
runner rather than a generated C++ one because the step is a Relax VM executable either way:
C++ would link the same libtvm_runtime and reimplement the batch and state handling below,
and Python is on every Jetson and Raspberry Pi OS image.
This file must stay standalone (imported by pockengine's CLI too, for the batch iteration).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

EXAMPLE = "example.npz"


def iterate_batches(specs: list, path: str):
    """Yield batches forever from an .npz with one array per input, named after the inputs, each
    of the input's shape or with a leading axis indexing batches (cycled). specs: [(name, shape)].
    Raises ValueError with the fix in its message when the file does not match."""
    if not os.path.isfile(path):
        raise ValueError(f"no data: {path} does not exist (pass --data FILE.npz with arrays "
                         f"{', '.join(name for name, _ in specs)})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not readable as .npz ({type(e).__name__}: {e})") from None
    if not hasattr(npz, "files"):  # an .npy holds one array, without the inputs' names
        raise ValueError(f"{path} holds one array ({'.npy' if isinstance(npz, np.ndarray) else 'not .npz'}); "
                         f"save the batches with np.savez(FILE.npz, {', '.join(f'{name}=...' for name, _ in specs)})")
    with npz:
        missing = [name for name, _ in specs if name not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}; it has {npz.files}. Name the arrays "
                             f"{[name for name, _ in specs]} (shapes {[tuple(shape) for _, shape in specs]}, optionally "
                             "with a leading axis indexing batches)")
        arrays = [npz[name] for name, _ in specs]
    counts = set()
    for a, (name, shape) in zip(arrays, specs):
        shape = tuple(shape)
        if a.shape == shape:
            continue
        if a.shape[1:] == shape:
            counts.add(a.shape[0])
        else:
            raise ValueError(f"{path}: {name} has shape {a.shape}; expected {shape} or (N, *{shape})")
    if len(counts) > 1:
        raise ValueError(f"{path}: the arrays hold different numbers of batches "
                         f"({', '.join(f'{name} {a.shape[0]}' for a, (name, shape) in zip(arrays, specs) if a.shape != tuple(shape))}); "
                         "give every input and the target the same number")
    n = min(counts) if counts else 1
    i = 0
    while True:
        yield [a if a.shape == tuple(shape) else a[i % n] for a, (_, shape) in zip(arrays, specs)]
        i += 1


NON_FINITE, OUT_OF_RANGE = "non-finite", "out of range"


def batch_problem(names: list, arrays: list, index_ranges: list) -> tuple | None:
    """Why a batch must not be trained on, as (NON_FINITE | OUT_OF_RANGE, message), or None: a NaN or infinity in a float input (PyTorch's
    loss would be NaN; TVM's ReLU turns NaN into 0 and would train on), or an index input outside
    the range its indexing op accepts (index_ranges: IndexRange.to_json() dicts; TVM reads out of
    bounds where PyTorch raises)."""
    # Fast paths first (a sum, min and max): a step of a small model takes well under a millisecond,
    # and this runs before every one.
    found = first_non_finite(zip(names, arrays))
    if found:
        name, count = found
        a = arrays[names.index(name)]
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        return NON_FINITE, (f"input {name} holds {count} NaN or infinite values (the first, {a[first]}, "
                            f"at index {first}); PyTorch's loss would be NaN. Clean or filter the data")
    for r in index_ranges:
        a = arrays[names.index(r["input"])]
        if a.size == 0 or (a.min() >= 0 and a.max() < r["size"]):
            continue
        bad = ((a < 0) | (a >= r["size"])) & ~np.isin(a, r["ignored"])
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            ignored = f" or be {', '.join(map(str, r['ignored']))} (ignored)" if r["ignored"] else ""
            return OUT_OF_RANGE, (f"input {r['input']}: {a[first]} (at index {first}) is out of range for {r['op']}: its values "
                    f"must lie in [0, {r['size']}){ignored}, as PyTorch requires (it raises 'out of bounds'). "
                    "Check how the labels or ids are encoded")
    return None


# Arrays up to this many values are summed together, one copy into one array (a sum call costs
# ~2 us however small its array, and a model has many small tensors: MobileNetV2 158 trained, 0.35
# ms of calls); larger ones are summed alone, without a copy.
SUMMED_TOGETHER = 1 << 14


def first_non_finite(named_arrays) -> tuple | None:
    """(name, how many values) of the first array holding a NaN or an infinity, else None. Fast path
    (this runs after every step, over every trained tensor): sums in the arrays' own dtypes and one
    test of their total, finite when every value is; an overflowing total is confirmed value by value."""
    floats = [(name, a) for name, a in named_arrays if a.dtype.kind == "f"]
    total, small = 0.0, {}
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is no news to the user
        for _, a in floats:
            if a.size <= SUMMED_TOGETHER:
                small.setdefault(a.dtype, []).append(a)
            else:
                total += a.sum()
        for arrays in small.values():
            total += np.concatenate(arrays, axis=None).sum()
    if math.isfinite(total):
        return None
    for name, a in floats:
        count = int(a.size - np.count_nonzero(np.isfinite(a)))
        if count:
            return name, count
    return None


def host_view(tensor) -> np.ndarray:
    """A TVM tensor as numpy: in place (DLPack) when it is in host memory, else copied from the GPU."""
    try:
        return np.from_dlpack(tensor)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return tensor.numpy()


STATE_TMP_PREFIX = ".state-"


def write_npz(path: str, arrays: dict) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one. The temporary
    name carries this process's pid; what a killed writer left is removed here."""
    directory = os.path.dirname(path) or "."
    remove_stale(directory, STATE_TMP_PREFIX)
    fd, tmp = tempfile.mkstemp(prefix=f"{STATE_TMP_PREFIX}{os.getpid()}-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


@contextlib.contextmanager
def locked(directory: str, out=sys.stderr):
    """Hold the artifact's writer lock (an advisory flock on the directory itself): one `run --save`,
    export or tune at a time, the others wait. Re-taken if the directory was replaced meanwhile."""
    import fcntl

    key = os.path.realpath(directory)
    if key in _LOCKS_HELD:  # flock would block on our own lock: the outer holder keeps it
        yield
        return
    while True:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process writing {directory} to finish", file=out, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            now = os.stat(directory)
            held = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # replaced by an export while we waited: lock the new one
    _LOCKS_HELD.add(key)
    try:
        yield
    finally:
        _LOCKS_HELD.discard(key)
        os.close(fd)


_LOCKS_HELD = set()  # the artifact directories whose lock this process holds


def umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale(directory: str, prefix: str) -> None:
    """Remove the entries `<prefix><pid>-...` of `directory` whose writer is no longer running."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefix) and not writer_alive(entry[len(prefix):]):
            remove_path(os.path.join(directory, entry))


def writer_alive(tail: str) -> bool:
    """tail: `<pid>-...` of a temporary name; whether that process runs (unknown forms count as alive)."""
    pid = tail.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == 0:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def run(artifact: str, steps: int, data: str | None = None, save: bool = False, out=sys.stdout) -> list:
    """Train `steps` steps; print and return the losses. With `save`, the artifact is locked from
    reading its state to writing it back, so concurrent runs train one after the other."""
    with locked(artifact) if save else contextlib.nullcontext():
        return _train(artifact, steps, data, save, out)


def _train(artifact: str, steps: int, data: str | None, save: bool, out) -> list:
    import tvm
    from tvm.runtime.vm import VirtualMachine  # the runtime-only path (tvm.relax needs the compiler)

    with open(os.path.join(artifact, "manifest.json")) as f:
        manifest = json.load(f)
    signature = manifest["signature"]
    cores = manifest.get("tvm_target", {}).get("num-cores")
    if cores:  # TVM sizes its thread pool from this on first use (see runtime.py)
        os.environ.setdefault("TVM_NUM_THREADS", str(min(int(cores), os.cpu_count() or 1)))
    device = tvm.cpu()
    if manifest.get("family") == "cuda":  # a Jetson (or any GPU machine): the kernels run on the GPU
        device = tvm.cuda(0)
        if not device.exist:
            raise ValueError(f"this artifact runs on an NVIDIA GPU ({manifest['tvm_target'].get('arch', '?')}) and "
                             "no CUDA device is visible here (is the NVIDIA driver loaded?)")
    vm = VirtualMachine(tvm.runtime.load_module(os.path.join(artifact, manifest["files"]["library"])), device)
    step_fn = vm["train_step"]
    with np.load(os.path.join(artifact, manifest["files"]["state"]), allow_pickle=False) as npz:
        state = {s["name"]: tvm.runtime.tensor(np.array(npz[s["name"]], dtype=s["dtype"], order="C"), device)
                 for s in signature["state"]}
    batch_specs = [(b["name"], b["shape"]) for b in signature["batch"]]
    batches = iterate_batches(batch_specs, data or os.path.join(artifact, EXAMPLE))
    losses = []
    names = [b["name"] for b in signature["batch"]]
    trained = [s["name"] for s in signature["state"] if s["category"] == "param"]
    for step in range(1, steps + 1):
        arrays = [np.array(a, dtype=b["dtype"], order="C") for a, b in zip(next(batches), signature["batch"])]
        problem = batch_problem(names, arrays, signature.get("index_ranges", []))
        if problem:  # the same checks as the host's Program.step
            raise ValueError(f"step {step}: {problem[1]}; nothing was saved")
        batch = [tvm.runtime.tensor(a, device) for a in arrays]
        start = time.perf_counter()
        outs = step_fn(*batch, *(state[s["name"]] for s in signature["state"]))
        state.update(zip(signature["outputs"][1:], list(outs)[1:]))  # output 0 is the loss
        losses.append(float(outs[0].numpy()))
        print(f"step {step:>5}  loss {losses[-1]:.9g}  {(time.perf_counter() - start) * 1e3:8.2f} ms", file=out, flush=True)
        found = first_non_finite((name, host_view(state[name])) for name in trained)
        if found or not np.isfinite(losses[-1]):
            what = f"{found[1]} values of {found[0]} are NaN or infinite" if found else f"the loss is {losses[-1]}"
            raise ValueError(f"step {step}: {what}; nothing was saved. Lower the learning rate or check the loss")
    if save:
        arrays = {k: v.numpy() for k, v in state.items()}
        found = first_non_finite(arrays.items())
        if found:
            raise ValueError(f"not saving: {found[0]} holds NaN or infinite values after the last update")
        write_npz(os.path.join(artifact, manifest["files"]["state"]), arrays)
        print(f"saved the trained state to {artifact}", file=out)
    return losses


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run training steps of a PockEngine artifact with the TVM runtime.")
    parser.add_argument("artifact")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--data", help=".npz with one array per input (optionally with a leading axis of batches)")
    parser.add_argument("--save", action="store_true", help="write the trained state back into the artifact")
    args = parser.parse_args(argv)
    try:
        run(args.artifact, args.steps, args.data, args.save)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
