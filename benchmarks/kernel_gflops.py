"""Per-kernel GFLOP/s of a compiled training step, each matmul against PyTorch's (MKL) on the same shape.

    python benchmarks/kernel_gflops.py --model smollm-135m --scheme last-2-blocks
    python benchmarks/kernel_gflops.py --model qwen2-0.5b --scheme biases+norms
    python benchmarks/kernel_gflops.py --model qwen2-0.5b --scheme last-2-blocks --base smoothquant-w8a8
    python benchmarks/kernel_gflops.py --model resnet18-high-b8
    python benchmarks/kernel_gflops.py --small            # the tiny LLM (CI)

The step is compiled untuned for the target (host by default), run `--repeats` times with every
kernel call timed from the virtual machine (Program.kernel_times), and each kernel's FLOPs counted on
its TIR (2 x multiply-accumulates: passes/flops.kernel_flops; an int8 kernel's are counted the same,
and its PyTorch column is the float32 matmul eager runs for that layer). A plain matmul kernel (a[M, K] times
b[K, N] or the transpose of b[N, K], with a batch) is then timed in PyTorch on the same shape,
`torch.matmul` on as many threads as the target has cores: what eager runs for that layer. Kernels
with an epilogue count its matmul only; convolutions and other reductions have no PyTorch column.
The table lists the kernels taking the most time; the PNG (--plot) draws ours against PyTorch's.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: its OpenMP threads share cores with TVM's
import torch
import tvm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE]

import llm_finetune  # noqa: E402
import step_time  # noqa: E402

import pockengine as pe  # noqa: E402
from pockengine import bench, pipeline, targets, timing  # noqa: E402
from pockengine.analysis.flops import kernel_flops  # noqa: E402
from pockengine.targets.families import family  # noqa: E402

LLM_MODELS = ("smollm-135m", "qwen2-0.5b", "tiny")


def make_job(model: str, scheme: str | None, small: bool, base: str = "float32") -> pe.TrainingJob:
    if model in LLM_MODELS:
        return llm_finetune.make_job(scheme or llm_finetune.default_schemes(model)[0],
                                     "small" if small else "full", model, base)
    if base != "float32":
        raise SystemExit(f"--base {base} quantizes an LLM's linears; {model} is not one of {LLM_MODELS}")
    return step_time.job_for(model, scheme or "full", small)


def kernel_table(job, target: str, repeats: int, top: int, reference_repeats: int = 10) -> list[dict]:
    """One row per kernel, most time first: name, calls, ms (per step), share, gflop (per call),
    ours and torch GFLOP/s (None where not measured)."""
    preset = targets.resolve(target)
    program = pe.compile(job, target=target)
    flops = {gvar.name_hint: kernel_flops(func)
             for gvar, func in pipeline.fused_step(job, preset, family(preset).lowering).functions_items()
             if isinstance(func, tvm.tirx.PrimFunc)}
    times = program.kernel_times(*job.example_inputs, job.example_targets, repeats=repeats)
    step_ms = sum(ms for ms, _, _ in times.values())
    rows = []
    for name, (ms, calls, _shapes) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        count, shape = flops.get(name, (0, None))
        row = dict(kernel=name, calls=calls, ms=ms, share=ms / step_ms, gflop=count / 1e9,
                   ours=count * calls / ms / 1e6 if count and ms else None, torch=None, shape=shape)
        if shape is not None:
            row["torch"] = count / torch_matmul_ms(shape, preset.cores, reference_repeats) / 1e6
        rows.append(row)
    return rows


def torch_matmul_ms(shape, threads: int, repeats: int) -> float:
    """Median ms of torch.matmul on `shape` (a MatmulShape) on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        lead = (shape.batch,) if shape.batch > 1 else ()
        a = torch.randn(*lead, shape.m, shape.k, generator=g)
        b = torch.randn(*lead, shape.n, shape.k, generator=g).transpose(-1, -2) if shape.transposed_b else \
            torch.randn(*lead, shape.k, shape.n, generator=g)
        return timing.median_ms(lambda: torch.matmul(a, b), repeats)
    finally:
        torch.set_num_threads(previous)


def describe(shape) -> str:
    if shape is None:
        return ""
    lead = f"{shape.batch} x " if shape.batch > 1 else ""
    b = f"({shape.n}x{shape.k})^T" if shape.transposed_b else f"{shape.k}x{shape.n}"
    return f"{lead}{shape.m}x{shape.k} @ {b}"


def report(rows: list[dict], title: str) -> str:
    lines = [title, f"{'kernel':<44} {'calls':>5} {'ms/step':>8} {'share':>6} {'GFLOP':>7} {'ours GF/s':>9} "
                    f"{'torch GF/s':>10} {'ratio':>6}  matmul shape", "-" * 130]
    for r in rows:
        ours = f"{r['ours']:.0f}" if r["ours"] else "-"
        theirs = f"{r['torch']:.0f}" if r["torch"] else "-"
        ratio = f"{r['ours'] / r['torch']:.2f}" if r["ours"] and r["torch"] else "-"
        gflop = f"{r['gflop']:.3f}" if r["gflop"] else "-"
        lines.append(f"{r['kernel'][:44]:<44} {r['calls']:>5} {r['ms']:>8.2f} {100 * r['share']:>5.1f}% {gflop:>7} "
                     f"{ours:>9} {theirs:>10} {ratio:>6}  {describe(r['shape'])}")
    matmuls = [r for r in rows if r["ours"] and r["torch"]]
    if matmuls:
        ours_ms = sum(r["ms"] for r in matmuls)
        theirs_ms = sum(r["ms"] * r["ours"] / r["torch"] for r in matmuls)
        lines.append(f"the listed matmuls: {ours_ms:.0f} ms per step here, {theirs_ms:.0f} ms at PyTorch's speed "
                     f"on the same shapes ({theirs_ms / ours_ms:.2f}x our time)")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ours"]]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["ours"] for r in rows], height=0.4, label="ours (untuned)")
    ax.barh([y - 0.2 for y in ys], [r["torch"] or 0 for r in rows], height=0.4, label="PyTorch (MKL), same shape")
    ax.set_yticks(list(ys), [f"{r['kernel'][:32]} ({r['ms']:.1f} ms)" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return bench.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm-135m",
                        choices=LLM_MODELS + tuple(w["name"] for w in step_time.workloads(True)))
    parser.add_argument("--scheme", help="default: the model's first benchmark scheme (LLMs), full (CNNs)")
    parser.add_argument("--small", action="store_true", help="the tiny LLM at its CI size")
    parser.add_argument("--base", default="float32", choices=llm_finetune.BASES,
                        help="the LLM's frozen base (llm_finetune.py's bases)")
    parser.add_argument("--target", default="host")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="kernels listed (most time first)")
    parser.add_argument("--plot", default=os.path.join("build", "kernel_gflops.png"), help="PNG to draw")
    args = parser.parse_args(argv)
    model = "tiny" if args.small else args.model
    job = make_job(model, args.scheme, args.small, args.base)
    rows = kernel_table(job, args.target, args.repeats, args.top)
    title = f"{job.name}: kernels of one training step, {args.target}, untuned"
    print(report(rows, title))
    print(f"plot: {plot(rows, title, args.plot)}")
    return rows


if __name__ == "__main__":
    main()
