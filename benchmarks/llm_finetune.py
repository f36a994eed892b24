"""Fine-tuning LLaMA-family models: tokens/s, training memory and compile time, PockEngine vs PyTorch.

    python benchmarks/llm_finetune.py                        # the tiny LLaMA: 4 blocks, hidden 256, 4 x 128 tokens
    python benchmarks/llm_finetune.py --small                # 2 blocks, batch 2 x 32 tokens (what CI runs)
    python benchmarks/llm_finetune.py --model smollm-135m    # SmolLM-135M's shape, 1 x 256 tokens
    python benchmarks/llm_finetune.py --model qwen2-0.5b --torch-compile --backend tvm --backend auto
    python benchmarks/llm_finetune.py --model smollm-135m --neighbour   # quiet and beside a busy process
    python benchmarks/llm_finetune.py --model qwen2-0.5b --base float32 --base awq-w4 --scheme "LoRA r=32 (q, v)"

Models are random-initialised from their transformers configs (nothing is downloaded): the
example's tiny LLaMA; SmolLM-135M (LLaMA: hidden 576, 30 layers, 9/3 heads, MLP 1536, vocabulary
49152, tied head); Qwen2-0.5B (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocabulary 151936, tied
head, q/k/v biases). Dropout as configured, the KV cache off (`use_cache=False`) as in training.
Schemes: full fine-tuning (the tiny model only, by default), the last 2 blocks, biases + norms
(LLaMA has no biases: its RMSNorm scales), LoRA on q_proj and v_proj at r=8 and (the large shapes)
r=32, as ExecuTorch's Qwen2-0.5B LoRA example. For each: our compiled step (untuned TVM kernels,
`schedule_cpu`; `--backend auto` also lets switch_backend take PyTorch's kernels where faster, on the
host only) timed in this process, PyTorch eager (and with --torch-compile, torch.compile) with the
same parameters frozen (LoRA: the same adapters) timed in fresh processes under OMP_WAIT_POLICY unset
and PASSIVE and credited with the faster (see pockengine/bench.py; --small: unset only); tokens/s =
batch x sequence / median step time. Memory: our planned peak (state, new state, arena, kernel
workspace) and PyTorch's live tensors at the step's peak on top of its parameters, gradients and
optimizer state (sparse_memory.py's count); and measured, each side's peak resident memory in a
fresh process (ours: loading the exported artifact and training 3 steps with the TVM runtime;
PyTorch's: building the job and timing its steps; both with their libraries). Compile: seconds of
`pe.compile`, cold.

Bases (--base, repeatable): float32 (default), and awq-w4: every frozen linear but the tied head in
AWQ's 4-bit format (`pe.quantize.awq(..., sparse_update=scheme)`: a scheme's trained linears stay
float; calibrated on 2 batches of the job's token distribution, groups of 128), and awq-w4-all: the
token embedding and the LM head tied to it too (one 4-bit table, `embeddings=True`), and
smoothquant-w8a8: `pe.quantize.smoothquant(..., alpha=0.5, sparse_update=scheme)`, the layers before
the first trained one W8A8, the others W8 (LoRA: all W8, its adapters beside them). PyTorch trains the
same quantized model (the W4 operator dequantizes each call, as a PyTorch QLoRA does). The LoRA
schemes on the float32 base are also timed with Hugging Face PEFT's LoRA (the same rank, scale,
layers and initial adapters; no dropout), in processes of its own: "PEFT tok/s", "PEFT RSS". The
line under the table compares each quantized base's memory and speed with PyTorch's on the float32
base (the goals: LoRA on the W4 base in at most a quarter of PyTorch's float32 LoRA; the W8A8 sparse
step at 1.5x its tokens/s).

The anchor is PockEngine's LLaMA2-7B on a Jetson AGX Orin: 7.9x PyTorch's fine-tuning throughput.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples", "llama_finetune")]

import torch  # noqa: E402
from tiny_llama import causal_lm_loss, tiny_llama  # noqa: E402

import pockengine as pe  # noqa: E402
from pockengine import bench  # noqa: E402

ANCHOR = 7.9  # PockEngine (MLSys 2024), LLaMA2-7B fine-tuning on Jetson AGX Orin, over PyTorch
# batch x seq of each model; "small" is the tiny model at CI size.
SIZES = {"full": {"layers": 4, "batch": 4, "seq": 128}, "small": {"layers": 2, "batch": 2, "seq": 32},
         "smollm-135m": {"batch": 1, "seq": 256}, "qwen2-0.5b": {"batch": 1, "seq": 128}}
MODELS = {
    "tiny": "tiny LLaMA ({layers} blocks, hidden 256, 4 heads / 2 kv, MLP 688, vocab 384, tied head)",
    "smollm-135m": "SmolLM-135M shape (LLaMA, 30 blocks, hidden 576, 9 heads / 3 kv, MLP 1536, vocab 49152, tied)",
    "qwen2-0.5b": "Qwen2-0.5B shape (24 blocks, hidden 896, 14 heads / 2 kv, MLP 4864, vocab 151936, tied)",
}


def schemes() -> dict:
    return {
        "full": None,
        "last-2-blocks": pe.SparseUpdate.last_blocks(2),
        "biases+norms": pe.SparseUpdate.bias_and_norm(),
        "LoRA r=8 (q, v)": pe.SparseUpdate.lora(8, ("q_proj", "v_proj"), alpha=16),
        "LoRA r=32 (q, v)": pe.SparseUpdate.lora(32, ("q_proj", "v_proj"), alpha=64),
    }


def default_schemes(model: str) -> list:
    """The tiny model: every scheme but r=32; the large shapes: the sparse ones (full fine-tuning of
    Qwen2-0.5B with AdamW is 8 GB of state before activations)."""
    if model == "tiny":
        return [s for s in schemes() if s != "LoRA r=32 (q, v)"]
    return [s for s in schemes() if s != "full"]


def build_model(model: str, size: str):
    """The named model, random-initialised, in training mode (dropout as configured), no KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if model == "tiny":
        return tiny_llama(layers=SIZES[size]["layers"])
    torch.manual_seed(0)
    if model == "smollm-135m":  # HuggingFaceTB/SmolLM-135M's config.json
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, use_cache=False)
        return LlamaForCausalLM(config).train()
    if model == "qwen2-0.5b":  # Qwen/Qwen2-0.5B's config.json
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_cache=False)
        return Qwen2ForCausalLM(config).train()
    raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")


BASES = ("float32", "awq-w4", "awq-w4-all", "smoothquant-w8a8")


def make_job(scheme: str, size: str = "full", model: str = "tiny", base: str = "float32"):
    """The benchmark's job; also built in the fresh processes that time PyTorch (bench.JobSource)."""
    net = build_model(model, size)
    s = SIZES[size if model == "tiny" else model]
    vocabulary = net.config.vocab_size if model != "tiny" else 256
    ids = torch.randint(0, vocabulary, (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))
    if base.startswith("awq-w4"):
        g = torch.Generator().manual_seed(1)
        calibration = [torch.randint(0, vocabulary, (s["batch"], s["seq"]), generator=g) for _ in range(2)]
        net = pe.quantize.awq(net, calibration, group_size=128, sparse_update=schemes()[scheme],
                              embeddings=base == "awq-w4-all")
    elif base == "smoothquant-w8a8":
        g = torch.Generator().manual_seed(1)
        calibration = [torch.randint(0, vocabulary, (s["batch"], s["seq"]), generator=g) for _ in range(2)]
        net = pe.quantize.smoothquant(net, calibration, alpha=0.5, sparse_update=schemes()[scheme])
    elif base != "float32":
        raise ValueError(f"unknown base {base!r}; choose from {BASES}")
    name = f"{model.replace('-', '_').replace('.', '_')}_{base.replace('-', '_')}_{scheme}"
    return pe.TrainingJob(net, (ids,), ids.clone(), causal_lm_loss, pe.optim.AdamW(lr=1e-4),
                          sparse_update=schemes()[scheme], name=name)


def has_peft_peer(scheme: str, base: str) -> bool:
    """Hugging Face PEFT times the LoRA schemes on the float32 base (its LoRA wraps nn.Linear layers)."""
    return scheme.startswith("LoRA") and base == "float32"


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
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
    parser.add_argument("--small", action="store_true", help="the tiny model at 2 blocks, batch 2 x 32 tokens (CI)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--target", default="host")
    parser.add_argument("--scheme", action="append", help="only this scheme (repeatable; default: see default_schemes)")
    parser.add_argument("--backend", action="append", choices=("tvm", "auto"),
                        help="our kernels (tvm, the default) and/or auto (PyTorch's where faster, host only)")
    parser.add_argument("--base", action="append", choices=BASES,
                        help="the frozen base's format (repeatable; default float32): awq-w4 = pe.quantize.awq")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    parser.add_argument("--neighbour", action="store_true",
                        help="ours and PyTorch eager, quiet and beside a busy process: the two slowdowns")
    args = parser.parse_args(argv)
    if args.small and args.model != "tiny":
        parser.error("--small is the tiny model's CI size; leave out --model")
    size = "small" if args.small else "full"
    chosen = args.scheme or default_schemes(args.model)
    unknown = [s for s in chosen if s not in schemes()]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}; choose from {list(schemes())}")
    backends = args.backend or ["tvm"]
    peers = ["eager"] + (["torch.compile"] if args.torch_compile else [])
    torch.set_num_threads(os.cpu_count() or 1)
    s = SIZES[size if args.model == "tiny" else args.model]
    tokens = s["batch"] * s["seq"]

    bases = args.base or ["float32"]
    if args.neighbour:
        if bases != ["float32"]:
            parser.error("--neighbour measures the float32 base only")
        rows = []
        for scheme in chosen:
            source = bench.JobSource(os.path.abspath(__file__), "make_job", (scheme, size, args.model))
            rows.append((args.model, scheme, bench.neighbour_times(source, args.target, args.repeats,
                                                                   peer_policies=(None,) if args.small else None)))
            print(bench.neighbour_report(rows[-1:]), file=sys.stderr, flush=True)
        print(bench.neighbour_report(rows))
        return rows

    rows = []
    for base, scheme in [(b, s) for b in bases for s in chosen]:
        row = {"scheme": scheme, "base": base}
        for backend in backends:
            job = make_job(scheme, size, args.model, base)
            print(f"[{scheme}] compiling ({backend}) ...", file=sys.stderr, flush=True)
            stages = {}

            def record(_index, _total, name, seconds, stages=stages):
                if seconds is not None and seconds >= 0:
                    stages[name] = seconds

            start = time.perf_counter()
            program = pe.compile(job, target=args.target, backend=backend, progress=record)
            row[f"{backend} compile s"] = time.perf_counter() - start
            row[f"{backend} compile stages"] = stages
            row[f"{backend} ms"] = program.time_step(*job.example_inputs, job.example_targets, repeats=args.repeats)
            row[f"{backend} MiB"] = program.memory_report().peak_bytes / 2**20
            if backend == backends[0]:
                print(f"[{scheme}] measuring the artifact's resident memory (a fresh process) ...", file=sys.stderr,
                      flush=True)
                row["ours RSS MiB"] = bench.runtime_peak_rss(program)
            plan = program.plan
            del program
        print(f"[{scheme}] {', '.join(peers)} (fresh processes) ...", file=sys.stderr, flush=True)
        source = bench.JobSource(os.path.abspath(__file__), "make_job", (scheme, size, args.model, base))
        policies = (None,) if args.small else None
        peer = bench.torch_times_in_fresh_processes(source, peers, args.repeats, policies=policies, plan=plan)
        row.update({"trained": trained_values(job, plan), "eager ms": peer["eager"],
                    "eager policy": peer["eager wait policy"], "policies tried": peer["peer wait policies"],
                    "torch.compile ms": peer.get("torch.compile"), "eager RSS MiB": peer[bench.PEAK_RSS],
                    "eager MiB": torch_peak_bytes(make_job(scheme, size, args.model, base), plan) / 2**20,
                    "peft ms": None, "peft RSS MiB": None})
        if has_peft_peer(scheme, base):  # in processes of its own: its resident memory is its own
            print(f"[{scheme}] PEFT (fresh processes) ...", file=sys.stderr, flush=True)
            peft = bench.torch_times_in_fresh_processes(source, ["peft"], args.repeats, policies=policies, plan=plan)
            row.update({"peft ms": peft["peft"], "peft RSS MiB": peft[bench.PEAK_RSS]})
        # The first backend's figures are "ours" (the default build).
        row.update({"ours ms": row[f"{backends[0]} ms"], "ours MiB": row[f"{backends[0]} MiB"],
                    "compile s": row[f"{backends[0]} compile s"]})
        rows.append(row)

    print(f"\n{MODELS[args.model].format(layers=s.get('layers', ''))}, batch {s['batch']} x {s['seq']} tokens, "
          f"AdamW, float32, {os.cpu_count()} cores")
    print(table(rows, tokens, backends))
    for r in rows:
        on_float = next((f for f in rows if f["base"] == "float32" and f["scheme"] == r["scheme"]), None)
        if r["base"] != "float32" and on_float is not None:
            rates = ", ".join(f"{tokens / r[f'{b} ms'] * 1e3:,.0f} ({b}, {on_float['eager ms'] / r[f'{b} ms']:.2f}x)"
                              for b in backends)
            print(f"{r['scheme']} on the {r['base']} base: our peak {r['ours MiB']:.1f} MiB = 1/"
                  f"{on_float['eager MiB'] / r['ours MiB']:.2f} of PyTorch's on the float32 base "
                  f"({on_float['eager MiB']:.1f} MiB); tokens/s {rates} against its "
                  f"{tokens / on_float['eager ms'] * 1e3:,.0f}; measured resident memory {r['ours RSS MiB']:.0f} MiB "
                  f"= 1/{on_float['eager RSS MiB'] / r['ours RSS MiB']:.2f} of its {on_float['eager RSS MiB']:.0f} MiB")
    for r in rows:
        for backend in backends:
            stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in r[f"{backend} compile stages"].items())
            print(f"compile s by stage, {r['scheme']} ({backend}): {stages}")
    tried = " / ".join(sorted({r["policies tried"] for r in rows}))  # what the peers were timed under
    print(f"speed-up = our tokens/s over PyTorch eager's with the same trainable set (its faster OpenMP wait policy "
          f"of {tried}: "
          + ", ".join(f"{r['scheme']} {r['eager policy']}" for r in rows) + "); memory = PyTorch's bytes over ours "
          "(planned; RSS = measured peak resident memory of a fresh process: ours loading the exported artifact and "
          "training 3 steps, PyTorch's building the job and timing its steps); "
          f"vs eager full = our tokens/s over PyTorch's full fine-tuning. Anchor: PockEngine {ANCHOR}x (LLaMA2-7B, "
          "Jetson AGX Orin); goal here: 2x for the sparse schemes.")
    return rows


def table(rows: list, tokens: int, backends: list) -> str:
    def rate(ms):
        return f"{tokens / ms * 1e3:,.0f}" if ms else "-"

    columns = [("scheme", 18), ("base", 9), ("trained", 12)] + [(f"{b} tok/s", 11) for b in backends] + [
        ("eager tok/s", 12), ("PEFT tok/s", 11), ("compile tok/s", 14), ("speed-up", 9), ("ours MiB", 10),
        ("eager MiB", 10), ("memory", 8), ("ours RSS", 9), ("eager RSS", 10), ("PEFT RSS", 9), ("compile s", 10),
        ("vs eager full", 14)]
    lines = ["".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(columns))]
    lines.append("-" * len(lines[0]))
    eager_full = next((r["eager ms"] for r in rows if r["scheme"] == "full" and r["base"] == "float32"), None)
    for r in rows:
        cells = [f"{r['scheme']:<18}", f"{r['base']:>9}", f"{r['trained']:>12,}"]
        cells += [f"{rate(r[f'{b} ms']):>11}" for b in backends]
        cells += [f"{rate(r['eager ms']):>12}", f"{rate(r['peft ms']):>11}", f"{rate(r['torch.compile ms']):>14}",
                  f"{r['eager ms'] / r['ours ms']:>8.2f}x", f"{r['ours MiB']:>10.1f}", f"{r['eager MiB']:>10.1f}",
                  f"{r['eager MiB'] / r['ours MiB']:>7.2f}x", f"{r['ours RSS MiB']:>9.0f}",
                  f"{r['eager RSS MiB']:>10.0f}", f"{r['peft RSS MiB']:>9.0f}" if r["peft RSS MiB"] else f"{'-':>9}",
                  f"{r['compile s']:>10.1f}",
                  f"{eager_full / r['ours ms']:>13.2f}x" if eager_full else f"{'-':>14}"]
        lines.append("".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
