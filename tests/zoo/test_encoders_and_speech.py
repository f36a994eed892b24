"""Encoders, encoder-decoders and speech models (tests/zoo/hf_models.py) train like PyTorch
(zoo_parity.py): the full update and one sparse scheme in float64, 20 float32 steps."""

import pytest
from hf_models import CAUSAL_LMS, MODELS, SCHEMES, build
from zoo_parity import cases, check_model

OTHERS = [name for name in MODELS if name not in CAUSAL_LMS]
SPARSE_IN_CI = ["distilbert", "t5", "whisper", "wav2vec2 (group norm)"]  # LoRA; norms; biases and norms
FLOAT32_IN_CI = ["bert", "t5", "whisper"]


@pytest.mark.parametrize("check, name", cases(OTHERS, SPARSE_IN_CI, FLOAT32_IN_CI))
def test_trains_like_pytorch(check, name, monkeypatch):
    check_model(check, name, *build(name, monkeypatch), SCHEMES[name], source="transformers")
