"""Fine-tuning a tiny LLaMA: tokens/s and training memory, PockEngine vs PyTorch eager, same trainable set.

    python benchmarks/llm_finetune.py            # 4 blocks, hidden 256, batch 4 x 128 tokens, AdamW
    python benchmarks/llm_finetune.py --small    # 2 blocks, batch 2 x 32 tokens (what CI runs)

Schemes: full fine-tuning, the last 2 blocks, biases + norms (LLaMA has no biases: its RMSNorm
scales), LoRA r=8 on q_proj and v_proj. For each: our compiled step (untuned TVM kernels,
`schedule_cpu`) timed in this process, PyTorch eager with the same parameters frozen (LoRA: the same
adapters) timed in fresh processes under OMP_WAIT_POLICY unset and PASSIVE and credited with the
faster (see pockengine/bench.py; --small: unset only); tokens/s = batch x sequence / median step time. Memory: our
planned peak (state, new state, arena, kernel workspace) and PyTorch's live tensors at the step's
peak on top of its parameters, gradients and optimizer state (sparse_memory.py's count).

The anchor is PockEngine's LLaMA2-7B on a Jetson AGX Orin: 7.9x PyTorch's fine-tuning throughput.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples", "llama_finetune")]

import torch  # noqa: E402

import pockengine as pe  # noqa: E402
from pockengine import bench  # noqa: E402
from tiny_llama import VOCAB, causal_lm_loss, tiny_llama  # noqa: E402

ANCHOR = 7.9  # PockEngine (MLSys 2024), LLaMA2-7B fine-tuning on Jetson AGX Orin, over PyTorch
SIZES = {"full": {"layers": 4, "batch": 4, "seq": 128}, "small": {"layers": 2, "batch": 2, "seq": 32}}


def schemes() -> dict:
    return {
        "full": None,
        "last-2-blocks": pe.SparseUpdate.last_blocks(2),
        "biases+norms": pe.SparseUpdate.bias_and_norm(),
        "LoRA r=8 (q, v)": pe.SparseUpdate.lora(8, ("q_proj", "v_proj"), alpha=16),
    }


def make_job(scheme: str, size: str = "full"):
    """The benchmark's job; also built in the fresh processes that time PyTorch (bench.JobSource)."""
    s = SIZES[size]
    model = tiny_llama(layers=s["layers"])
    ids = torch.randint(0, 256, (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))
    return pe.TrainingJob(model, (ids,), ids.clone(), causal_lm_loss, pe.optim.AdamW(lr=1e-4),
                          sparse_update=schemes()[scheme], name=f"tiny_llama_{scheme}")


def torch_peak_bytes(job, plan) -> int:
    from sparse_memory import measure_torch

    from pockengine.sparse import apply_to_torch

    model = apply_to_torch(job.model, plan)
    optimizer = job.optimizer.to_torch([p for p in model.parameters() if p.requires_grad])
    return measure_torch(model, optimizer, job.example_inputs[0], job.example_targets, repeats=1, loss_fn=job.loss)[0]


def trained_values(job, plan) -> int:
    from pockengine.sparse import FROZEN

    return sum(p.numel() for n, p in job.model.named_parameters() if plan.get(n, FROZEN) != FROZEN)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 blocks, batch 2 x 32 tokens (for CI)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--target", default="host")
    parser.add_argument("--scheme", action="append", help="only this scheme (repeatable; default: all)")
    args = parser.parse_args(argv)
    size = "small" if args.small else "full"
    chosen = args.scheme or list(schemes())
    unknown = [s for s in chosen if s not in schemes()]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}; choose from {list(schemes())}")
    torch.set_num_threads(os.cpu_count() or 1)
    tokens = SIZES[size]["batch"] * SIZES[size]["seq"]

    rows = []
    for scheme in chosen:
        job = make_job(scheme, size)
        print(f"[{scheme}] compiling ...", file=sys.stderr, flush=True)
        program = pe.compile(job, target=args.target)
        ours_ms = program.time_step(*job.example_inputs, job.example_targets, repeats=args.repeats)
        plan = program.plan
        print(f"[{scheme}] PyTorch eager (fresh processes) ...", file=sys.stderr, flush=True)
        peer = bench.torch_times_in_fresh_processes(bench.JobSource(os.path.abspath(__file__), "make_job",
                                                                    (scheme, size)), ["eager"], args.repeats,
                                                    policies=(None,) if args.small else None, plan=plan)
        rows.append({"scheme": scheme, "trained": trained_values(job, plan), "ours ms": ours_ms,
                     "eager ms": peer["eager"], "eager policy": peer["eager wait policy"],
                     "policies tried": peer["peer wait policies"],
                     "ours MiB": program.memory_report().peak_bytes / 2**20,
                     "eager MiB": torch_peak_bytes(make_job(scheme, size), plan) / 2**20})

    s = SIZES[size]
    print(f"\ntiny LLaMA ({s['layers']} blocks, hidden 256, 4 heads / 2 kv, MLP 688, vocab {VOCAB}, tied head), "
          f"batch {s['batch']} x {s['seq']} tokens, AdamW, float32, {os.cpu_count()} cores")
    header = (f"{'scheme':<18}{'trained':>11}{'ours tok/s':>12}{'eager tok/s':>13}{'speed-up':>10}"
              f"{'ours MiB':>10}{'eager MiB':>11}{'memory':>8}{'vs eager full':>15}")
    print(header)
    print("-" * len(header))
    eager_full = next((r["eager ms"] for r in rows if r["scheme"] == "full"), None)
    for r in rows:
        versus_full = f"{eager_full / r['ours ms']:.2f}x" if eager_full else "-"
        print(f"{r['scheme']:<18}{r['trained']:>11,}{tokens / r['ours ms'] * 1e3:>12,.0f}"
              f"{tokens / r['eager ms'] * 1e3:>13,.0f}{r['eager ms'] / r['ours ms']:>9.2f}x"
              f"{r['ours MiB']:>10.1f}{r['eager MiB']:>11.1f}{r['eager MiB'] / r['ours MiB']:>7.2f}x{versus_full:>15}")
    tried = " / ".join(sorted({r["policies tried"] for r in rows}))  # what the peers were timed under
    print(f"speed-up = our tokens/s over PyTorch eager's with the same trainable set (its faster OpenMP wait policy "
          f"of {tried}: "
          + ", ".join(f"{r['scheme']} {r['eager policy']}" for r in rows) + "); memory = PyTorch's bytes over ours; "
          f"vs eager full = our tokens/s over PyTorch's full fine-tuning. Anchor: PockEngine {ANCHOR}x (LLaMA2-7B, "
          "Jetson AGX Orin); goal here: 2x for the sparse schemes.")
    return rows


if __name__ == "__main__":
    main()
