"""Quantized frozen bases on real weights: how much of the model each format keeps.

    python benchmarks/quantized_quality.py                  # both models, printed as a table
    python benchmarks/quantized_quality.py --model llama    # one of them
    python benchmarks/quantized_quality.py --plot build/quantized_quality.png   # and how far from float32

Two models with trained weights, nothing downloaded:
- the pre-trained all-MiniLM-L6-v2 the minilm_sentiment example ships (6 BERT blocks, hidden 384):
  on its held-out sentences, the mean cosine similarity of each format's sentence embeddings to
  float32's, the zero-shot accuracy of the example's head, and the held-out accuracy after the
  example's fine-tuning (biases, norms and head, 4 epochs, compiled) on that base;
- the llama_finetune example's tiny LLaMA (4 blocks, hidden 256), pretrained here as the example's
  stage 1 does (300 compiled steps on generated English): its next-token loss on held-out English.
Formats: float32; 4-bit weights in groups of 128 (the last group of the LLaMA's 688-wide MLP is
shorter) by round-to-nearest (`pe.quantize.rtn`) and by AWQ (`pe.quantize.awq`); int8 weights and
per-token int8 activations (every linear W8A8: no scheme given) plain (`pe.quantize.w8a8`) and
smoothed (`pe.quantize.smoothquant`, alpha 0.5). Calibration: 8 training batches. The head (the
MiniLM's classifier, the LLaMA's tied LM head) stays float. Each format is the frozen base a
fine-tune would start from; the MiniLM's fine-tuning trains biases and norms, which the int8
layers, run before them, see as W8A8.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import sys

import numpy as np
import torch

import pockengine as pe

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")

GROUP = 128
CALIBRATION_BATCHES = 8
def example(name: str):
    """examples/<name>/train.py as a module (both examples call their script train.py), its
    directory importable for its own imports."""
    directory = os.path.join(EXAMPLES, name)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(f"{name}_train", os.path.join(directory, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantized_bases(model, calibration, skip) -> dict:
    """{format: the model with its frozen linears in it}."""
    return {"float32": copy.deepcopy(model),
            "W4 round-to-nearest": pe.quantize.rtn(model, group_size=GROUP, skip=skip),
            "W4 AWQ": pe.quantize.awq(model, calibration, group_size=GROUP, skip=skip),
            "W8A8": pe.quantize.w8a8(model, calibration, skip=skip),
            "W8A8 SmoothQuant": pe.quantize.smoothquant(model, calibration, alpha=0.5, skip=skip)}


def minilm(epochs: int = 4) -> dict:
    """{format: {"cosine": ..., "zero-shot %": ..., "fine-tuned %": ...}}."""
    sentiment = example("minilm_sentiment")
    job, tokenizer, train_rows, held_out = sentiment.build()
    calibration = [sentiment.tokenize(tokenizer, [s for s, _ in train_rows[i * 16:(i + 1) * 16]])
                   for i in range(CALIBRATION_BATCHES)]
    held_ids, held_mask = sentiment.tokenize(tokenizer, [s for s, _ in held_out])
    reference = job.model.eval()
    with torch.no_grad():
        float_embeddings = reference.embed(held_ids, held_mask)
    results = {}
    for name, base in quantized_bases(reference, calibration, skip=("head",)).items():
        with torch.no_grad():
            cosine = float((base.embed(held_ids, held_mask) * float_embeddings).sum(-1).mean())
        zero_shot = sentiment.accuracy(base, tokenizer, held_out)
        print(f"[minilm] {name}: fine-tuning ...", file=sys.stderr, flush=True)
        base.train()
        tuned = pe.TrainingJob(base, job.example_inputs, job.example_targets, "cross_entropy", job.optimizer,
                               sparse_update=sentiment.SCHEMES["bias-norm-head"](), name="minilm_quality")
        program = pe.compile(tuned)
        rng, rows = random.Random(1), list(train_rows)
        for _ in range(epochs):
            rng.shuffle(rows)
            for start in range(0, len(rows) - sentiment.BATCH + 1, sentiment.BATCH):
                part = rows[start:start + sentiment.BATCH]
                program.step(*sentiment.tokenize(tokenizer, [s for s, _ in part]),
                             torch.tensor([label for _, label in part]))
        base.load_state_dict(program.state_dict(as_torch=True))
        results[name] = {"cosine": cosine, "zero-shot %": 100 * zero_shot,
                         "fine-tuned %": 100 * sentiment.accuracy(base, tokenizer, held_out)}
    return results


def llama(pretrain_steps: int = 300) -> dict:
    """{format: {"held-out loss": ...}} of the pretrained tiny LLaMA."""
    finetune = example("llama_finetune")
    from tiny_llama import batches, causal_lm_loss, encode, tiny_llama

    english, held_out_loss, with_weights = finetune.english, finetune.held_out_loss, finetune.with_weights
    batch, seq = finetune.BATCH, finetune.SEQ
    generator = torch.Generator().manual_seed(0)
    base = tiny_llama()
    job = pe.TrainingJob(base, *next(batches(encode(english(50, 1)), batch, seq, generator)), causal_lm_loss,
                         pe.optim.AdamW(lr=2e-3, weight_decay=0.0), name="llama_quality_pretrain")
    program = pe.compile(job)
    data = batches(encode(english(20000, seed=2)), batch, seq, generator)
    print(f"[llama] pretraining {pretrain_steps} steps ...", file=sys.stderr, flush=True)
    for _ in range(pretrain_steps):
        program.step(*next(data))
    pretrained = with_weights(base, program)
    calibration = [next(data)[0] for _ in range(CALIBRATION_BATCHES)]
    held_out = english(400, seed=99)
    return {name: {"held-out loss": held_out_loss(model.eval(), held_out, seq)}
            for name, model in quantized_bases(pretrained, calibration, skip=("lm_head",)).items()}


def table(results: dict) -> str:
    lines = []
    for model, rows in results.items():
        metrics = list(next(iter(rows.values())))
        lines.append(f"{model:<10}{'format':<22}" + "".join(f"{m:>16}" for m in metrics))
        for name, values in rows.items():
            lines.append(f"{'':<10}{name:<22}" + "".join(f"{values[m]:>16.4f}" for m in metrics))
    return "\n".join(lines)


# How each metric gets worse: the plot shows every format's loss against float32 (higher is worse).
WORSE = {"cosine": ("1 - cosine to float32", lambda v, f: f - v),
         "zero-shot %": ("zero-shot accuracy lost (points)", lambda v, f: f - v),
         "fine-tuned %": ("fine-tuned accuracy lost (points)", lambda v, f: f - v),
         "held-out loss": ("held-out loss added", lambda v, f: v - f)}


def plot(results: dict, path: str) -> str:
    """One panel per metric: each quantized format's distance from float32 (0: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(model, metric) for model, rows in results.items() for metric in next(iter(rows.values()))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6))
    for ax, (model, metric) in zip(np.atleast_1d(axes), panels):
        label, worse = WORSE[metric]
        names = [n for n in results[model] if n != "float32"]
        reference = results[model]["float32"][metric]
        ax.bar(range(len(names)), [worse(results[model][n][metric], reference) for n in names],
               color=["tab:red", "tab:blue", "tab:orange", "tab:green"][:len(names)])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=30, ha="right")
        ax.set_title(f"{model}: {label}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "llama"), action="append")
    parser.add_argument("--plot", help="also draw the table as bars into this PNG")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for model in args.model or ("minilm", "llama"):
        results[model] = minilm() if model == "minilm" else llama()
    print(table(results))
    if args.plot:
        print(f"plot: {plot(results, args.plot)}")
    return results


if __name__ == "__main__":
    main()
