"""Step time of a job, side by side: our compiled step (untuned, tuned, tuned + backend switching)
against PyTorch eager and torch.compile running the same step (same frozen set, same optimizer).

    pockengine bench train.py [--tuning-log DIR] [--torch-compile]

Every time is the median of `repeats` steps after warm-up, all in this one process. GFLOP/s counts
the step's convolutions and matmuls (forward and backward) over the median time.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

VARIANTS = ("untuned", "tuned", "tuned+switch")
COLUMNS = VARIANTS + ("eager", "torch.compile", "ort")
# The practical peak of the 2-core machine the benchmarks were run on (AVX2 FMA, oneDNN sgemm).
PEAK_GFLOPS = 83.0


def median_ms(step, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def torch_training_step(job, plan, compiled: bool = False):
    """PyTorch's step for `job` (forward, loss, backward, optimizer) with `plan`'s frozen set."""
    import torch

    from .frontend.torch import resolve_loss
    from .sparse import apply_to_torch

    torch.manual_seed(0)
    model = apply_to_torch(copy.deepcopy(job.model), plan)
    opt = job.optimizer.to_torch([p for p in model.parameters() if p.requires_grad])
    loss_fn = resolve_loss(job.loss)
    forward = torch.compile(model) if compiled else model
    inputs, target = job.example_inputs, job.example_targets

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(*inputs), target).backward()
        opt.step()

    return step


def step_times(job_factory, target="host", tuning_logs=(), repeats: int = 10, peers=("eager",),
               log=sys.stderr) -> dict:
    """{column: median ms, "gflop": conv+matmul GFLOP per step, ...} for a job (built afresh by
    `job_factory` for every variant: compiling consumes nothing, but each variant starts equal)."""
    import pockengine as pe

    row = {}
    variants = {"untuned": ((), "tvm"), "tuned": (tuning_logs, "tvm"), "tuned+switch": (tuning_logs, "auto")}
    for column, (logs, backend) in variants.items():
        if column != "untuned" and not logs:
            continue
        job = job_factory()
        print(f"[{job.name}] compiling ({column}) ...", file=log, flush=True)
        program = pe.compile(job, target, tuning_logs=logs, backend=backend)
        batch = job.example_inputs + (job.example_targets,)
        row[column] = median_ms(lambda: program.step(*batch), repeats)
        flops = program.memory_report().flops
        row["gflop"] = (flops["forward"] + flops["backward"]) / 1e9
        if column == "tuned":
            row["tuned kernels"] = len(program.meta["tuning"]["tuned"])
        if column == "tuned+switch":
            row["library ops"] = sum(c["calls"] for c in program.meta["backend"]["choices"] if c["backend"] == "library")
    job = job_factory()
    plan = job.plan(job.import_model())
    for column in ("eager", "torch.compile"):
        if column in peers:
            print(f"[{job.name}] {column} ...", file=log, flush=True)
            step = torch_training_step(job, plan, compiled=column == "torch.compile")
            start = time.perf_counter()
            step()  # torch.compile compiles here (minutes, cold)
            if column == "torch.compile":
                row["compile s"] = time.perf_counter() - start
            row[column] = median_ms(step, repeats)
    return row


def report(rows: list[tuple[str, str, dict]]) -> str:
    """Times, ratios to eager and achieved GFLOP/s, one block per (workload, scheme, row)."""
    lines = [f"{'workload':<34}{'scheme':<22}" + "".join(f"{c:>14}" for c in COLUMNS)]
    lines.append("-" * len(lines[0]))
    for title, scheme, row in rows:
        lines.append(f"{title[:33]:<34}{scheme[:21]:<22}" + "".join(
            f"{row[c]:>11.1f} ms" if c in row else f"{'-':>14}" for c in COLUMNS))
        if "eager" in row:
            lines.append(f"{'':<34}{'time / eager':<22}" + "".join(
                f"{row[c] / row['eager']:>13.2f}x" if c in row else f"{'':>14}" for c in COLUMNS))
        ours = min(row[c] for c in VARIANTS if c in row)
        gflops = row["gflop"] / (ours / 1e3)
        faster = ", ".join(f"{c} {row[c] / ours:.2f}x" for c in ("eager", "torch.compile", "ort") if c in row)
        lines.append(f"{'':<56}best of ours {ours:.1f} ms: {gflops:.1f} GFLOP/s = {100 * gflops / PEAK_GFLOPS:.0f}% of "
                     f"{PEAK_GFLOPS:.0f} peak ({row['gflop']:.3f} GFLOP/step); speed-up over {faster}")
    lines.append("median step time after warm-up, one process; time / eager < 1 is faster than PyTorch eager")
    return "\n".join(lines)
