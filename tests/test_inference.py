"""Inference artifacts (pockengine.compile_inference): a fine-tuned model's forward, its quantized
base kept quantized and its LoRA adapters kept as adapters, computes what PyTorch computes in eval
mode (float64, within 1e-9 scaled by max(|logits|.max(), 1e-2)); it exports, loads back and takes a
training program's state; bad inputs and misuse get clear errors. Third-party vision and Hugging
Face models: tests/zoo/test_eval_forward.py."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, ROOT
from pockengine.errors import FrontendError, InputError, NumericsError, TargetError

transformers = pytest.importorskip("transformers")
from test_transformers import causal_lm_loss, llama, llama_in_input_dtype, lm_batches  # noqa: E402, F401

TOLERANCE = 1e-9


def scaled_error(got, expected) -> float:
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-2))


def eval_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(model).eval()(ids).logits.numpy()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)).double()


def test_batchnorm_and_dropout_run_as_in_eval_mode_and_the_model_stays_in_training():
    model = mlp()
    model(torch.randn(8, 16, dtype=torch.float64))  # running statistics off their initial values
    x = torch.randn(4, 16, dtype=torch.float64)
    program = pe.compile_inference(model, (x,), target=FAST_HOST)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x).numpy()
    got = program(x)
    assert got.dtype == np.float64 and scaled_error(got, expected) <= 1e-12
    assert np.array_equal(program(x), got)  # deterministic: dropout is off
    report = program.memory_report()
    assert report.gradient_bytes == report.saved_activation_bytes == report.by_category["optimizer_state"] == 0


@pytest.mark.usefixtures("llama_in_input_dtype")
def test_lora_on_an_awq_base_deploys_with_the_adapters_and_the_trained_weights(tmp_path):
    """The fine-tune -> deploy path: LoRA trained on an AWQ-W4 LLaMA (the embedding and head one
    4-bit table too), then an inference artifact of the same model takes the program's state_dict
    and computes PyTorch's eval logits of the fine-tuned model; exported and loaded, it computes
    the same bits."""
    batches = lm_batches(3)
    base = pe.quantize.awq(llama(torch.float64), [ids for ids, _ in batches[:2]], group_size=64, embeddings=True)
    job = pe.TrainingJob(base, (batches[0][0],), batches[0][1], causal_lm_loss, pe.optim.AdamW(lr=1e-2),
                         sparse_update=pe.SparseUpdate.lora(4, ("q_proj", "v_proj"), alpha=8))
    trainer = pe.compile(job, target=FAST_HOST)
    for ids, labels in batches:
        trainer.step(ids, labels)
    ids = batches[0][0][:1]
    program = pe.compile_inference(job.model, (ids,), target=FAST_HOST)
    assert type(job.model.model.layers[0].self_attn.q_proj).__name__ == "LoRAW4Linear"
    program.load_state_dict(trainer.state_dict())
    finetuned = copy.deepcopy(job.model)
    finetuned.load_state_dict(pe.to_torch(trainer.state_dict()))
    expected = eval_logits(finetuned, ids)
    got = program(ids)
    assert scaled_error(got, expected) <= TOLERANCE
    assert scaled_error(got, eval_logits(job.model, ids)) > 1e-3  # the trained adapters count
    packed = program.state_dict()["model.layers.0.mlp.down_proj.packed"]
    assert packed.dtype == np.uint8  # the base stays 4-bit: two weights a byte
    loaded = pe.load(program.export(str(tmp_path / "deployed")))
    assert type(loaded).__name__ == "InferenceProgram"
    assert np.array_equal(loaded(ids), got)
    assert list(loaded.state_dict()) == list(job.model.state_dict())


@pytest.mark.usefixtures("llama_in_input_dtype")
def test_a_smoothquant_base_deploys_with_its_int8_layers():
    """Block 0 W8A8 (int8 activations, int32 sums), block 1 trained in float: the artifact computes
    PyTorch's eval logits of that model, the per-token rounding included."""
    batches = lm_batches(2)
    scheme = pe.SparseUpdate.last_blocks(1)
    base = pe.quantize.smoothquant(llama(torch.float64), [ids for ids, _ in batches], sparse_update=scheme)
    assert base.model.layers[0].self_attn.q_proj.activations == "int8"
    ids = batches[1][0][:1]
    program = pe.compile_inference(base, (ids,), target=FAST_HOST)
    assert scaled_error(program(ids), eval_logits(base, ids)) <= TOLERANCE


def test_bad_inputs_are_refused_before_they_run():
    model = llama(vocab_size=128)
    ids = torch.randint(0, 128, (1, 8))
    program = pe.compile_inference(model, (ids,), target=FAST_HOST)
    with pytest.raises(InputError, match=r"expected shape \(1, 8\)"):
        program(torch.randint(0, 128, (1, 9)))
    with pytest.raises(InputError, match="embed_tokens"):
        program(torch.full((1, 8), 128))
    with pytest.raises(InputError, match="takes 1 arrays"):
        program(ids, ids)
    with pytest.raises(InputError, match="trains nothing"):
        program.step(ids, ids)
    x = torch.randn(4, 16, dtype=torch.float64)
    classifier = pe.compile_inference(mlp(), (x,), target=FAST_HOST)
    with pytest.raises(NumericsError, match="NaN"):
        classifier(torch.full((4, 16), float("nan"), dtype=torch.float64))


class Pair(nn.Module):
    def forward(self, x):
        return x + 1, x * 2


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x + self.calls


def test_what_an_inference_artifact_cannot_be_is_refused_with_the_fix():
    x = torch.randn(2, 4)
    with pytest.raises(FrontendError, match="pass output="):
        pe.compile_inference(Pair(), (x,), target=FAST_HOST)
    assert np.allclose(pe.compile_inference(Pair(), (x,), target=FAST_HOST, output=lambda out: out[1])(x), x * 2)
    with pytest.raises(InputError, match=r"changes buffers \(calls\)"):
        pe.compile_inference(Counter(), (x,), target=FAST_HOST)
    with pytest.raises(InputError, match="takes a torch.nn.Module"):
        pe.compile_inference("model.onnx", (x,), target=FAST_HOST)
    with pytest.raises(TargetError, match="this machine only"):
        pe.compile_inference(Pair(), (x,), target="rpi4", output=lambda out: out[0])


def test_the_cli_inspects_an_inference_artifact_and_refuses_to_train_it(tmp_path):
    x = torch.randn(4, 16, dtype=torch.float64)
    artifact = pe.compile_inference(mlp(), (x,), target=FAST_HOST).export(str(tmp_path / "classifier"))
    cli = [sys.executable, "-c", "import sys; from pockengine.cli import main; sys.exit(main())"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    shown = subprocess.run(cli + ["inspect", artifact], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "kind       inference" in shown.stdout and "output     (4, 10) float64" in shown.stdout
    run = subprocess.run(cli + ["run", artifact, "--steps", "1"], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "is an inference artifact" in run.stderr and "Traceback" not in run.stderr
