"""The shipped examples work as documented."""

import os
import subprocess
import sys

import numpy as np
import torch

import pockengine as pe
from conftest import FAST_HOST, ROOT, load_example_module
from pockengine.job import load_job


def test_digits_demo_reaches_90_percent():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "mlp_digits", "train.py")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracies = [float(line.split()[-1].rstrip("%")) for line in result.stdout.splitlines()
                  if line.startswith("epoch")]
    assert accuracies[-1] > accuracies[0]
    assert "reached the 90% goal" in result.stdout


def test_mobilenetv2_example_job_trains():
    job = load_job(os.path.join(ROOT, "examples", "mobilenetv2", "train.py"))
    assert job.example_inputs[0].shape == (8, 3, 64, 64)
    program = pe.compile(job, target=FAST_HOST)
    x, y = job.example_inputs[0], job.example_targets
    losses = [program.step(x, y) for _ in range(4)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    names = [n for n, _ in job.model.named_parameters()]
    assert set(names) <= set(program.state_dict())
    assert any(isinstance(m, torch.nn.ReLU6) for m in job.model.modules())


def test_transfer_digits_fine_tunes_with_sparse_schemes():
    example = load_example_module("examples/transfer_digits/train.py", "transfer_digits")
    example.pretrain(example.model, epochs=2)
    full_acc, full_trained, full_peak = example.fine_tune(example.model, example.SCHEMES["full"], 0.05, epochs=2,
                                                          target=FAST_HOST)
    ratio_acc, ratio_trained, ratio_peak = example.fine_tune(example.model, example.SCHEMES["channel ratio"], 0.05,
                                                             epochs=2, target=FAST_HOST)
    assert full_acc > 0.5 and ratio_acc > 0.5
    assert ratio_trained < full_trained and ratio_peak < full_peak


def test_transfer_digits_int8_with_qas_trains_close_to_float(tmp_path):
    """The int8 study at its smallest (one task, scheme and seed, one epoch, a fixed lr): every variant
    trains the same parameters through a compiled step, and int8 + QAS classifies the new digits about
    as well as the float model (the study's numbers: README)."""
    example = load_example_module("examples/transfer_digits/int8.py", "transfer_digits_int8")
    plot = tmp_path / "int8.png"
    results = example.main(["--tasks", "digits", "--schemes", "channel ratio", "--seeds", "1", "--lr", "0.1",
                            "--pretrain-epochs", "2", "--epochs-scale", "0.2", "--plot", str(plot)])
    cell = results["digits 5-9"]["channel ratio"]
    float_acc, qas_acc = (cell[v]["accuracies"].mean() for v in ("float32", "int8 + QAS"))
    assert qas_acc > 0.6 and qas_acc > float_acc - 0.1  # chance is 0.2
    assert cell["float32"]["trained"] == cell["int8 SGD"]["trained"] == cell["int8 + QAS"]["trained"]
    assert cell["int8 + QAS"]["planned"] < cell["float32"]["planned"]  # int8 activations
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_llama_finetune_example_learns_the_new_text_and_deploys_it(tmp_path):
    """Stage 1 (full pretraining), stage 2 (the last 2 blocks on an AWQ-W4 base) at reduced size:
    the held-out loss on the fine-tuning text falls; stage 3's exported inference artifact computes
    the fine-tuned model's logits and generates with them. (LoRA's numerics:
    tests/test_transformers.py; at this size, with 20 pretraining steps, q/v adapters on a
    near-random model move the loss too little to test.)"""
    example = load_example_module("examples/llama_finetune/train.py", "llama_finetune")
    result = example.main(["--scheme", "last-2-blocks", "--base", "awq-w4", "--pretrain-steps", "20", "--steps", "80",
                           "--export", str(tmp_path / "inference")])
    assert result["after"] < result["before"] - 0.5
    assert np.isfinite(result["losses"]).all()
    assert type(result["finetuned"].model.layers[0].mlp.up_proj).__name__ == "W4Linear"
    assert os.path.isfile(tmp_path / "inference" / "manifest.json")
    window = torch.full((1, example.GENERATE_WINDOW), example.PAD, dtype=torch.int64)
    prompt = example.encode("three plus four is")[:-1]
    window[0, :len(prompt)] = torch.tensor(prompt)
    with torch.no_grad():
        expected = result["finetuned"](window).logits.numpy()
    assert np.abs(result["deployed"](window) - expected).max() <= 1e-4 * np.abs(expected).max()
    assert result["generated"].startswith("three plus four is") and len(result["generated"]) > 18
    job = load_job(os.path.join(ROOT, "examples", "llama_finetune", "train.py"))  # what `pockengine build` compiles
    assert job.sparse_update is not None and job.example_inputs[0].shape == (4, 128)


def test_minilm_sentiment_example_improves_on_the_zero_shot_head():
    example = load_example_module("examples/minilm_sentiment/train.py", "minilm_sentiment")
    result = example.main(["--epochs", "2"])
    assert result["before"] < 0.8 and result["after"] >= result["before"] + 0.15
