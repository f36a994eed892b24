"""Training memory and step time of sparse-update schemes: PockEngine vs PyTorch eager, same frozen set.

    python benchmarks/sparse_memory.py            # MobileNetV2-0.35 @128x128 batch 8, transformer classifier
    python benchmarks/sparse_memory.py --small    # reduced sizes (what CI runs)

Ours: the planned peak of the compiled step (the state it reads and updates in place, new state it
cannot write in place, and the one arena planned for everything in between).
PyTorch: the same step (forward, backward, optimizer) with the same parameters frozen
(requires_grad=False; channel ratios as gradient masks), measured by a TorchDispatchMode that adds up
the bytes of every tensor allocated during the step and still alive (weakref finalizers subtract them
when freed), on top of the persistent state it starts from (parameters, buffers, optimizer state,
gradients left from the previous step). PyTorch's profiler memory events were unreliable on CPU here.
Both are measured in this process, after warm-up steps; times are medians. "BN frozen" rows put
BatchNorm in eval mode on both sides (TinyTL / MCUNetV3 practice).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "examples", "mobilenetv2"),
                os.path.join(HERE, "..", "examples", "transformer")]

from mobilenetv2 import MobileNetV2  # noqa: E402
from model import TransformerClassifier  # noqa: E402

import pockengine as pe  # noqa: E402
from pockengine.sparse import FROZEN, Partial, SparseUpdate, apply_to_torch  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors allocated inside the mode and still referenced."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _release(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None and not getattr(t, "_pe_counted", False):
                nbytes = t.untyped_storage().nbytes()
                t._pe_counted = True
                self.live += nbytes
                weakref.finalize(t, self._release, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def state_bytes(model, optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def torch_step(model, optimizer, x, y, loss_fn=torch.nn.functional.cross_entropy):
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    optimizer.step()


def measure_torch(model, optimizer, x, y, repeats, loss_fn=torch.nn.functional.cross_entropy):
    for _ in range(2):
        torch_step(model, optimizer, x, y, loss_fn)
    before = state_bytes(model, optimizer)
    with LiveBytes() as mode:
        torch_step(model, optimizer, x, y, loss_fn)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch_step(model, optimizer, x, y, loss_fn)
        times.append(time.perf_counter() - start)
    return before + mode.peak, statistics.median(times)


def mobilenet_schemes(model):
    """name -> (scheme, freeze BatchNorm statistics). TinyTL and MCUNetV3 train with BatchNorm
    frozen (eval mode; MCUNetV3 folds it into the conv): both sides then run BN with running stats."""
    convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    last = len(convs) - 1
    mcunet = SparseUpdate.mcunetv3(22, [last - 9, last - 6, last - 3, last], [1, 0.5, 0.25, 1])
    return {
        "full": (SparseUpdate.full(), False),
        "bias-only": (SparseUpdate.bias_only(), False),
        "bias-only, BN frozen": (SparseUpdate.bias_only(), True),
        "last-2-blocks": (SparseUpdate({"features.16": "full", "features.17": "full", "features.18": "full",
                                        "classifier": "full"}), False),
        "mcunetv3-style": (mcunet, False),
        "mcunetv3-style, BN frozen": (mcunet, True),
    }


def transformer_schemes(model):
    n = len(model.layers)
    return {
        "full": (SparseUpdate.full(), False),
        "bias-only": (SparseUpdate.bias_only(), False),
        "last-k (last block + head)": (SparseUpdate({f"layers.{n - 1}": "full", "head": "full"}), False),
        "mcunetv3-style": (SparseUpdate.bias_only() | {f"layers.{n - 1}.linear1.weight": 0.25,
                                                       f"layers.{n - 1}.linear2.weight": 0.25, "head": "full"}, False),
    }


def freeze_batchnorm(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def run(name, make_model, x, y, schemes, target, repeats, rows, only=None):
    for scheme_name, (scheme, bn_frozen) in schemes(make_model()).items():
        if only is not None and scheme_name not in only:
            continue
        torch.manual_seed(0)
        model = make_model().train()
        if bn_frozen:
            freeze_batchnorm(model)
        optimizer = pe.optim.SGD(lr=0.01, momentum=0.9)
        job = pe.TrainingJob(copy.deepcopy(model), (x,), y, "cross_entropy", optimizer, sparse_update=scheme)
        print(f"[{name} / {scheme_name}] compiling ...", file=sys.stderr, flush=True)
        program = pe.compile(job, target=target)
        for _ in range(2):
            program.step(x, y)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            program.step(x, y)
            times.append(time.perf_counter() - start)
        plan = program.plan
        reference = apply_to_torch(model, plan)
        torch_bytes, torch_time = measure_torch(
            reference, optimizer.to_torch([p for p in reference.parameters() if p.requires_grad]), x, y, repeats)
        ours = program.memory_report().peak_bytes
        trained = sum(int(torch.tensor(s).prod()) for s in program.signature.trained_shapes.values())
        trained += sum(p.numel() for n, p in model.named_parameters()
                       if plan[n] != FROZEN and not isinstance(plan[n], Partial))
        rows.append((name, scheme_name, trained, ours, torch_bytes, statistics.median(times), torch_time))
        print(f"  ours {ours / 2**20:.1f} MiB, PyTorch {torch_bytes / 2**20:.1f} MiB", file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="reduced sizes (for CI)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", default="host")
    parser.add_argument("--scheme", action="append", help="run only this scheme (repeatable; default: all)")
    args = parser.parse_args(argv)
    only = None if args.scheme is None else set(args.scheme)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    if args.small:
        # batch 4: at 2 images the deep blocks' BatchNorm statistics (a pixel or four per channel) are
        # degenerate and one SGD step takes weights to ~750 (PyTorch itself reaches NaN on step 4)
        res, batch, seq, d_model, layers = 32, 4, 16, 32, 2
    else:
        res, batch, seq, d_model, layers = 128, 8, 128, 128, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    run(f"MobileNetV2-0.35 {res}x{res} b{batch}", lambda: MobileNetV2(num_classes=10, width_mult=0.35), x, y,
        mobilenet_schemes, args.target, args.repeats, rows, only)
    xt = torch.randn(batch, seq, 16, generator=g)
    run(f"Transformer d{d_model} x{layers} seq{seq} b{batch}",
        lambda: TransformerClassifier(d_in=16, d_model=d_model, heads=4, classes=10, layers=layers, ffn=4 * d_model),
        xt, y, transformer_schemes, args.target, args.repeats, rows, only)

    header = (f"{'model':<34}{'scheme':<28}{'trained':>10}{'ours MiB':>10}{'torch MiB':>10}{'mem ratio':>10}"
              f"{'ours ms':>10}{'torch ms':>10}{'time ratio':>11}")
    print(header)
    print("-" * len(header))
    for name, scheme, trained, ours, theirs, t_ours, t_theirs in rows:
        print(f"{name:<34}{scheme:<28}{trained:>10,}{ours / 2**20:>10.2f}{theirs / 2**20:>10.2f}{ours / theirs:>10.2f}"
              f"{t_ours * 1e3:>10.1f}{t_theirs * 1e3:>10.1f}{t_ours / t_theirs:>11.2f}")
    print("mem ratio = ours / PyTorch (lower is better); time ratio = ours / PyTorch (untuned TVM kernels)")
    return rows


if __name__ == "__main__":
    main()
