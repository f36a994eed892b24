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
import json
import os
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
    with np.load(path, allow_pickle=False) as npz:
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
    n = min(counts) if counts else 1
    i = 0
    while True:
        yield [a if a.shape == tuple(shape) else a[i % n] for a, (_, shape) in zip(arrays, specs)]
        i += 1


def write_npz(path: str, arrays: dict) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".npz", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(artifact: str, steps: int, data: str | None = None, save: bool = False, out=sys.stdout) -> list:
    """Train `steps` steps; print and return the losses."""
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
    for step in range(1, steps + 1):
        batch = [tvm.runtime.tensor(np.array(a, dtype=b["dtype"], order="C"), device)
                 for a, b in zip(next(batches), signature["batch"])]
        start = time.perf_counter()
        outs = step_fn(*batch, *(state[s["name"]] for s in signature["state"]))
        state.update(zip(signature["outputs"][1:], list(outs)[1:]))  # output 0 is the loss
        losses.append(float(outs[0].numpy()))
        print(f"step {step:>5}  loss {losses[-1]:.9g}  {(time.perf_counter() - start) * 1e3:8.2f} ms", file=out, flush=True)
    if save:
        write_npz(os.path.join(artifact, manifest["files"]["state"]), {k: v.numpy() for k, v in state.items()})
        print(f"saved the trained state to {artifact}", file=out)
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run training steps of a PockEngine artifact with the TVM runtime.")
    parser.add_argument("artifact")
    parser.add_argument("--steps", type=int, default=10)
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
