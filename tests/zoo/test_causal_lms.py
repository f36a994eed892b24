"""Causal LMs of every major family (tests/zoo/hf_models.py) train like PyTorch (zoo_parity.py): the
full update and the family's usual sparse scheme in float64, 20 float32 steps."""

import pytest
from hf_models import CAUSAL_LMS, SCHEMES, build
from zoo_parity import assert_float64_parity, cases, check_model

from pockengine.passes import chunk_linear_log_prob, fuse_linear_log_prob

SPARSE_IN_CI = ["llama", "gemma2", "mistral"]  # LoRA, biases and norms, last layers
FLOAT32_IN_CI = ["llama", "gpt2"]


@pytest.mark.parametrize("check, name", cases(CAUSAL_LMS, SPARSE_IN_CI, FLOAT32_IN_CI))
def test_trains_like_pytorch(check, name, monkeypatch):
    check_model(check, name, *build(name, monkeypatch), SCHEMES[name], source="transformers")


@pytest.mark.parametrize("name, sparse", [("llama", True), ("qwen2", False), ("gpt2", False)])
def test_fused_vocabulary_loss_trains_like_pytorch(name, sparse, monkeypatch):
    """The zoo's heads (128 classes) through fuse_linear_log_prob and chunk_linear_log_prob, as a
    real vocabulary's would go: 22 label rows padded to 24, in three chunks of 8; LLaMA's head is
    its own, Qwen2's and GPT-2's are tied to the embedding (trained through both uses)."""
    monkeypatch.delenv("POCKENGINE_ZOO_RESULTS", raising=False)  # not a row of the zoo's table
    monkeypatch.setattr(fuse_linear_log_prob, "MIN_CLASSES", 0)
    monkeypatch.setattr(chunk_linear_log_prob, "MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(chunk_linear_log_prob, "CHUNK_LOGITS_BYTES", 1)
    chunked = []
    bounds = chunk_linear_log_prob.chunk_bounds
    monkeypatch.setattr(chunk_linear_log_prob, "chunk_bounds",
                        lambda *args: chunked.append(bounds(*args)) or chunked[-1])
    model, loss, batches = build(name, monkeypatch)
    label, make_scheme = SCHEMES[name]
    if sparse:
        assert_float64_parity(name, model, loss, batches, make_scheme(model), label + ", fused loss")
    else:
        assert_float64_parity(name, model, loss, batches, scheme="full, fused loss")
    assert chunked and all(c == [(0, 8), (8, 16), (16, 24)] for c in chunked)
