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
import threading
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
                             f"{[name for name, _ in specs]} (shapes {[tuple(shape) for _, shape in specs]}, "
                             "optionally with a leading axis indexing batches)")
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
        per_array = ", ".join(f"{name} {a.shape[0]}" for a, (name, shape) in zip(arrays, specs)
                              if a.shape != tuple(shape))
        raise ValueError(f"{path}: the arrays hold different numbers of batches ({per_array}); "
                         "give every input and the target the same number")
    n = min(counts) if counts else 1
    i = 0
    while True:
        yield [a if a.shape == tuple(shape) else a[i % n] for a, (_, shape) in zip(arrays, specs)]
        i += 1


NON_FINITE, OUT_OF_RANGE = "non-finite", "out of range"


def batch_problem(names: list, arrays: list, index_ranges: list) -> tuple | None:
    """Why a batch must not be trained on, as (NON_FINITE | OUT_OF_RANGE, message), or None: a NaN or
    infinity in a float input (PyTorch's loss would be NaN; TVM's ReLU turns NaN into 0 and would
    train on), or an index input outside the range its indexing op accepts (index_ranges:
    IndexRange.to_json() dicts; TVM reads out of bounds where PyTorch raises)."""
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
            return OUT_OF_RANGE, (f"input {r['input']}: {a[first]} (at index {first}) is out of range for {r['op']}: "
                    f"its values must lie in [0, {r['size']}){ignored}, as PyTorch requires "
                    "(it raises 'out of bounds'). Check how the labels or ids are encoded")
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
    write_atomically(path, lambda f: np.savez(f, **arrays), STATE_TMP_PREFIX, ".npz")


def write_atomically(path: str, write, prefix: str, suffix: str = "") -> str:
    """Write `path` with `write(binary file)` so that a crash at any instant leaves the old file or the
    new one, never half of one: into a temporary file beside it (flushed to disk), renamed over it.
    The temporary name is `<prefix><pid>-...`; what a killed writer left is removed here."""
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale(directory, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    return path


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


# TVM's CPU thread pool on a machine the training shares with other processes. Between kernels,
# TVM's workers spin on sched_yield (up to 300000 times) before they sleep, and every parallel
# kernel waits for its slowest worker: beside a busy process, a worker on the busy core gets the
# core back only after the neighbour's time slice, once per kernel. MobileNetV2-0.35's step (128x128,
# batch 8, 2 cores) took 52 ms quiet and 190-700 ms beside one busy process on 2 workers, 97 ms
# quiet and 96-109 ms beside it on 1 worker. Not spinning (TVM_THREAD_POOL_SPIN_COUNT=0) fixes the
# shared case (108 ms) but costs the quiet one 15% (60 ms): each kernel then wakes a sleeping
# worker. So the spin stays, and ThreadGovernor picks the worker count by measuring the steps.
# TVM also pins its workers and the calling thread to cores unless TVM_BIND_THREADS=0; it reads
# that from the environment only, so configure_thread_pool sets it for the moment it configures the
# pool and puts the environment back.
_AFFINITY_SPECIFIED = -3  # TVM's ThreadGroup::kSpecifyThreadShareAllCore
_POOL = threading.local()  # .threads: the worker count this thread's pool was last configured with


def available_cpus(proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """How many CPUs this process may use: its affinity mask (taskset, a cpuset), cut down to a
    cgroup CPU quota (a container's --cpus) rounded down, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    return max(1, min(cpus, int(quota))) if quota is not None else max(1, cpus)


def cgroup_cpu_quota(proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup or of any cgroup above it, the smallest;
    None without one. cgroup v2 (`cpu.max`: "max 100000" or "150000 100000") and v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 for none)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one hierarchy under cgroup_root
            base, files = cgroup_root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy
            base = next((os.path.join(cgroup_root, d) for d in (controllers, "cpu", "cpu,cpuacct")
                         if os.path.isdir(os.path.join(cgroup_root, d))), None)
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if base is None:
                continue
        else:
            continue
        parts = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it (a container's root is "/")
            quota = _read_quota(os.path.join(base, *parts[:depth]), files)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _read_quota(directory: str, files: tuple) -> float | None:
    try:
        texts = []
        for name in files:
            with open(os.path.join(directory, name)) as f:
                texts.append(f.read().split())
    except OSError:
        return None
    try:
        if len(files) == 1:  # v2: "$MAX $PERIOD"
            limit, period = texts[0][0], texts[0][1]
        else:
            limit, period = texts[0][0], texts[1][0]
        if limit in ("max", "-1") or float(period) <= 0:
            return None
        return float(limit) / float(period)
    except (IndexError, ValueError):
        return None


def chosen_threads(threads: int | None) -> int | None:
    """The worker count the user chose: `threads`, else TVM_NUM_THREADS when set (TVM's own
    setting, taken as the same choice); None: let ThreadGovernor choose."""
    if threads is not None:
        return threads
    value = os.environ.get("TVM_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def configure_thread_pool(threads: int) -> int:
    """Give the calling thread's TVM thread pool `threads` workers, none pinned to a core (unless
    the user set TVM_BIND_THREADS). TVM keeps a pool per calling thread: call this in the thread
    that runs the steps, before each step (it returns at once when nothing changes)."""
    if getattr(_POOL, "threads", None) == threads:
        return threads
    import tvm

    configure = tvm.get_global_func("runtime.config_threadpool")
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    with _tvm_environment(TVM_BIND_THREADS="0"):
        if getattr(_POOL, "threads", None) is None:
            # The cpu list sets how many workers TVM uses (its "max concurrency": at 1 kernels run
            # without the pool) and, only when binding, where. The pool is created at the first
            # call, with this size: as large as this machine allows, so a later count fits.
            size = max(threads, len(allowed))
            configure(_AFFINITY_SPECIFIED, size, [str(allowed[i % len(allowed)]) for i in range(size)])
        configure(_AFFINITY_SPECIFIED, threads, [str(allowed[i % len(allowed)]) for i in range(threads)])
    _POOL.threads = threads
    return threads


class ThreadGovernor:
    """The worker count for each step when the user has not chosen one: all the CPUs available
    while the steps run fastest that way, half of them (at least one) while other processes keep
    cores busy. It measures: each count's recent step time, the current count kept while it is the
    faster one; the other count is tried again after `interval` steps (doubling, up to
    MAX_INTERVAL, each time it loses), or at once when a step takes SLOWDOWN times its count's
    previous one; it wins when MARGIN times as fast. A quiet machine pays one slower step in MAX_INTERVAL; a
    busy one, one slow step as often and, when the other processes stop, up to MAX_INTERVAL steps
    on half the CPUs before the next trial finds out."""

    MIN_INTERVAL, MAX_INTERVAL, SLOWDOWN, MARGIN = 4, 128, 1.5, 0.9

    def __init__(self, cpus: int, adaptive: bool = True):
        """adaptive=False: always `cpus` (the host side of a GPU step, whose time is the GPU's)."""
        self.counts = (cpus, max(1, cpus // 2)) if cpus > 1 and adaptive else (cpus,)
        self.current = self.counts[0]
        self.recent: dict = {}  # worker count -> its latest step time (s)
        self.interval = self.MIN_INTERVAL
        self.since_trial = 0
        self._trial_of = None  # the count being tried this step, else None

    def threads(self) -> int:
        """The worker count for the next step."""
        if len(self.counts) == 1:
            return self.current
        other = self.counts[1] if self.current == self.counts[0] else self.counts[0]
        if other not in self.recent or self.since_trial >= self.interval:
            self._trial_of = other
            return other
        self._trial_of = None
        return self.current

    def run(self, step, *args, fixed: int | None = None, learn: bool = True):
        """step(*args) on the calling thread's pool: `fixed` workers, else the count chosen here,
        which learns from the step's time unless `learn` is False (an instrumented step)."""
        threads = configure_thread_pool(fixed or self.threads())
        start = time.perf_counter()
        outs = step(*args)
        if fixed is None and learn:
            self.record(threads, time.perf_counter() - start)
        return outs

    def record(self, threads: int, seconds: float) -> None:
        """The step just run on `threads` workers took `seconds`."""
        if len(self.counts) == 1:
            return
        if self._trial_of == threads:
            self.since_trial = 0
            if seconds < self.MARGIN * self.recent.get(self.current, float("inf")):
                self.current, self.interval = threads, self.MIN_INTERVAL
            else:
                self.interval = min(2 * self.interval, self.MAX_INTERVAL)
            self.recent[threads] = seconds
            return
        slower = threads in self.recent and seconds > self.SLOWDOWN * self.recent[threads]
        self.recent[threads] = seconds
        self.since_trial = self.interval if slower else self.since_trial + 1


@contextlib.contextmanager
def _tvm_environment(**variables):
    """The environment variables the user has not set, set for the duration only."""
    added = [name for name in variables if name not in os.environ]
    for name in added:
        os.environ[name] = variables[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def run(artifact: str, steps: int, data: str | None = None, save: bool = False, out=sys.stdout,
        threads: int | None = None) -> list:
    """Train `steps` steps; print and return the losses. With `save`, the artifact is locked from
    reading its state to writing it back, so concurrent runs train one after the other."""
    with locked(artifact) if save else contextlib.nullcontext():
        return _train(artifact, steps, data, save, out, threads)


def _train(artifact: str, steps: int, data: str | None, save: bool, out, threads: int | None = None) -> list:
    import tvm
    from tvm.runtime.vm import VirtualMachine  # the runtime-only path (tvm.relax needs the compiler)

    with open(os.path.join(artifact, "manifest.json")) as f:
        manifest = json.load(f)
    signature = manifest["signature"]
    threads = chosen_threads(threads)
    # for a device shared with other processes; a GPU step's time is the GPU's
    governor = ThreadGovernor(available_cpus(), adaptive=manifest.get("family") != "cuda")
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
        outs = governor.run(step_fn, *batch, *(state[s["name"]] for s in signature["state"]), fixed=threads)
        state.update(zip(signature["outputs"][1:], list(outs)[1:]))  # output 0 is the loss
        losses.append(float(outs[0].numpy()))
        print(f"step {step:>5}  loss {losses[-1]:.9g}  {(time.perf_counter() - start) * 1e3:8.2f} ms",
              file=out, flush=True)
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
    parser.add_argument("--threads", type=positive_int,
                        help="worker threads for the kernels (default: the CPUs available to this process)")
    args = parser.parse_args(argv)
    try:
        run(args.artifact, args.steps, args.data, args.save, threads=args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
