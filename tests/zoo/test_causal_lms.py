"""Causal LMs of every major family (tests/zoo/hf_models.py) train like PyTorch (zoo_parity.py):
the full update, and biases and norms for Gemma2 (sliding window, soft-capping)."""

import pytest

import pockengine as pe
from hf_models import CAUSAL_LMS
from zoo_parity import assert_parity, train_both


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_full_update_matches_pytorch(name, monkeypatch):
    assert_parity(name, *train_both(name, monkeypatch))


def test_gemma2_biases_and_norms_match_pytorch(monkeypatch):
    assert_parity("gemma2", *train_both("gemma2", monkeypatch, pe.SparseUpdate.bias_and_norm()),
                  scheme="biases and norms")
