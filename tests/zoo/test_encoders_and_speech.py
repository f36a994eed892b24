"""Encoders, encoder-decoders and speech models (tests/zoo/hf_models.py) train like PyTorch
(zoo_parity.py): the full update, and biases and norms for T5, Whisper and wav2vec2."""

import pytest

import pockengine as pe
from hf_models import MODELS, CAUSAL_LMS
from zoo_parity import assert_parity, train_both

OTHERS = [name for name in MODELS if name not in CAUSAL_LMS]


@pytest.mark.parametrize("name", OTHERS)
def test_full_update_matches_pytorch(name, monkeypatch):
    assert_parity(name, *train_both(name, monkeypatch))


@pytest.mark.parametrize("name", ["t5", "whisper", "wav2vec2 (group norm)"])
def test_biases_and_norms_match_pytorch(name, monkeypatch):
    assert_parity(name, *train_both(name, monkeypatch, pe.SparseUpdate.bias_and_norm()),
                  scheme="biases and norms")
