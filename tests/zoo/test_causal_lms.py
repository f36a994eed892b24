"""Causal LMs of every major family (tests/zoo/hf_models.py) train like PyTorch (zoo_parity.py): the
full update and the family's usual sparse scheme in float64, 20 float32 steps."""

import pytest

from hf_models import CAUSAL_LMS, SCHEMES, build
from zoo_parity import cases, check_model

SPARSE_IN_CI = ["llama", "gemma2", "mistral"]  # LoRA, biases and norms, last layers
FLOAT32_IN_CI = ["llama", "gpt2"]


@pytest.mark.parametrize("check, name", cases(CAUSAL_LMS, SPARSE_IN_CI, FLOAT32_IN_CI))
def test_trains_like_pytorch(check, name, monkeypatch):
    check_model(check, name, *build(name, monkeypatch), SCHEMES[name], source="transformers")
