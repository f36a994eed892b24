"""What the guarded step costs: each program compiled with the step's own checks (the default: the
batch for NaN and label ranges before anything trains, every trained parameter for NaN after the
updates, autodiff/guards.py) and without them, stepped alternately.

    python benchmarks/guard_cost.py           # MobileNetV2-0.35 full update, the transformer, a ReLU MLP
    python benchmarks/guard_cost.py --small   # the transformer and the MLP only (what CI runs)

Each time is the median of --repeats steps after warm-up, guarded and unguarded steps alternating
in rounds so a change of the machine's load hits both; the cost is the median of the rounds' costs.
The goal: the guard costs at most 2% of a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pockengine as pe
from conftest import MLP, TransformerClassifier, make_batches, mobilenetv2
from pockengine.autodiff.guards import compiled_without_checks
from pockengine.timing import median_ms


def workloads(small: bool) -> list:
    """(name, model factory, input shape, classes, optimizer)."""
    cnn = [("MobileNetV2-0.35 full", lambda: mobilenetv2(width_mult=0.35, num_classes=10), (8, 3, 64, 64), 10,
            lambda: pe.optim.SGD(lr=0.01, momentum=0.9))]
    return ([] if small else cnn) + [
        ("transformer full", TransformerClassifier, (4, 8, 16), 5, lambda: pe.optim.AdamW(lr=1e-3)),
        ("ReLU MLP full", MLP, (8, 32), 10, lambda: pe.optim.SGD(lr=0.05, momentum=0.9)),
    ]


def compile_job(make_model, shape, classes, make_opt, target):
    """(program, batch)."""
    torch.manual_seed(0)
    x, y = make_batches(shape, classes, 1)[0]
    return pe.compile(pe.TrainingJob(make_model(), (x,), y, "cross_entropy", make_opt()), target), (x, y)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the transformer and the MLP only (for CI)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds of the two programs")
    parser.add_argument("--target", default="host")
    args = parser.parse_args(argv)
    rows = []
    for name, make_model, shape, classes, make_opt in workloads(args.small):
        print(f"[{name}] compiling ...", file=sys.stderr, flush=True)
        guarded, batch = compile_job(make_model, shape, classes, make_opt, args.target)
        with compiled_without_checks():
            unguarded, _ = compile_job(make_model, shape, classes, make_opt, args.target)
        times = {"unguarded": [], "guarded": []}
        for _ in range(args.rounds):
            times["unguarded"].append(median_ms(lambda p=unguarded, b=batch: p.step(*b, check=False), args.repeats))
            times["guarded"].append(median_ms(lambda p=guarded, b=batch: p.step(*b), args.repeats))
        # The cost of each round from its own pair of medians, then the median over rounds: a change
        # of the machine's speed between rounds (a shared VM's drifts by tens of %) cancels within a pair.
        cost = statistics.median(100 * (g / u - 1) for g, u in zip(times["guarded"], times["unguarded"]))
        rows.append({"workload": name, **{k: statistics.median(v) for k, v in times.items()}, "cost %": cost})
    print(f"\n{'workload':<26}{'unguarded ms':>14}{'guarded ms':>12}{'cost':>9}")
    for r in rows:
        print(f"{r['workload']:<26}{r['unguarded']:>14.3f}{r['guarded']:>12.3f}{r['cost %']:>8.1f}%")
    print("guarded: the default step and step() (checks in the step: the batch for NaN and label ranges, "
          "the trained parameters for NaN); unguarded: compiled without them, step(check=False); "
          "goal: at most 2% of a step")
    return rows


if __name__ == "__main__":
    main()
