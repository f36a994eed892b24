"""What the guarded step costs: the same workloads compiled with and without the in-graph check of the
trained parameters, stepped with and without the host's checks of the batch (NaN, label ranges).

    python benchmarks/guard_cost.py           # MobileNetV2-0.35 full update, the transformer, a ReLU MLP
    python benchmarks/guard_cost.py --small   # the transformer and the MLP only (what CI runs)

Each time is the median of --repeats steps after warm-up, the guarded and unguarded programs
alternating in rounds so a change of the machine's load hits both. The goal (issue 16): the guard
costs at most 2% of a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pockengine as pe  # noqa: E402
from conftest import MLP, TransformerClassifier, make_batches, mobilenetv2  # noqa: E402
from pockengine.autodiff import step as step_builder  # noqa: E402
from pockengine.bench import median_ms  # noqa: E402


def workloads(small: bool) -> list:
    """(name, model factory, input shape, classes, optimizer)."""
    cnn = [("MobileNetV2-0.35 full", lambda: mobilenetv2(width_mult=0.35, num_classes=10), (8, 3, 64, 64), 10,
            lambda: pe.optim.SGD(lr=0.01, momentum=0.9))]
    return ([] if small else cnn) + [
        ("transformer full", TransformerClassifier, (4, 8, 16), 5, lambda: pe.optim.AdamW(lr=1e-3)),
        ("ReLU MLP full", MLP, (8, 32), 10, lambda: pe.optim.SGD(lr=0.05, momentum=0.9)),
    ]


def compile_both(make_model, shape, classes, make_opt, target):
    """(guarded program, unguarded program, batch): the unguarded one built with the parameter check
    left out of the graph (what the step was before issue 16)."""
    torch.manual_seed(0)
    model = make_model()
    x, y = make_batches(shape, classes, 1)[0]
    job = lambda: pe.TrainingJob(model, (x,), y, "cross_entropy", make_opt())  # noqa: E731
    guarded = pe.compile(job(), target)
    real_sum_of = step_builder.sum_of
    step_builder.sum_of = lambda bb, tensors, dtype: None  # guard_loss(None) returns the loss unchanged
    try:
        unguarded = pe.compile(job(), target)
    finally:
        step_builder.sum_of = real_sum_of
    return guarded, unguarded, (x, y)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the transformer and the MLP only (for CI)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two programs")
    parser.add_argument("--target", default="host")
    args = parser.parse_args(argv)
    rows = []
    for name, make_model, shape, classes, make_opt in workloads(args.small):
        print(f"[{name}] compiling with and without the guard ...", file=sys.stderr, flush=True)
        guarded, unguarded, batch = compile_both(make_model, shape, classes, make_opt, args.target)
        times = {"unguarded": [], "guarded": []}
        for _ in range(args.rounds):
            times["unguarded"].append(median_ms(lambda: unguarded.step(*batch, check=False), args.repeats))
            times["guarded"].append(median_ms(lambda: guarded.step(*batch), args.repeats))
        rows.append({"workload": name, **{k: statistics.median(v) for k, v in times.items()}})
    print(f"\n{'workload':<26}{'unguarded ms':>14}{'guarded ms':>12}{'cost':>9}")
    for r in rows:
        r["cost %"] = 100 * (r["guarded"] / r["unguarded"] - 1)
        print(f"{r['workload']:<26}{r['unguarded']:>14.3f}{r['guarded']:>12.3f}{r['cost %']:>8.1f}%")
    print("guarded: the parameters' in-graph finiteness check and the host's batch checks (NaN, label ranges); "
          "goal: at most 2% of a step")
    return rows


if __name__ == "__main__":
    main()
