"""The zoo's parity check: float64, 3 SGD-momentum steps on the same batches, every parameter and
buffer within 1e-9 of PyTorch eager, each tensor's error scaled by max(|w|.max(), 1e-2). Built at
opt-level 0 (FAST_HOST): results must not depend on the level (tests/test_opt_levels.py)."""

import copy
import json
import os
import time

import numpy as np
import torch

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff, train_torch
from hf_models import MODELS, float64_internals

TOL = 1e-9
SCALE_FLOOR = 1e-2


def train_both(name, monkeypatch, sparse_update=None):
    """(program, our losses, PyTorch's losses, the PyTorch model after training, compile seconds)."""
    float64_internals(monkeypatch)
    torch.manual_seed(0)
    model, loss, batches = MODELS[name]()
    model = model.double().train()
    batches = [(tuple(x.double() if x.is_floating_point() else x for x in inputs), target)
               for inputs, target in batches]
    optimizer = pe.optim.SGD(lr=0.01, momentum=0.9)
    job = pe.TrainingJob(copy.deepcopy(model), batches[0][0], batches[0][1], loss, optimizer,
                         sparse_update=sparse_update)
    start = time.perf_counter()
    program = pe.compile(job, target=FAST_HOST)
    compile_s = time.perf_counter() - start
    ours = [program.step(*inputs, target) for inputs, target in batches]
    if sparse_update is not None:
        pe.sparse.apply_to_torch(model, job.plan(job.import_model()))
    theirs = train_torch(model, optimizer, batches, loss_fn=loss)
    return program, ours, theirs, model, compile_s


def assert_parity(name, program, ours, theirs, model, compile_s, scheme="full"):
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict(), floor=SCALE_FLOOR)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{name}: {parameters} parameters, compiled in {compile_s:.1f} s, worst scaled error {worst:.2e} ({where})")
    if os.environ.get("POCKENGINE_ZOO_RESULTS"):  # benchmarks/zoo_table.py collects these for the README
        with open(os.environ["POCKENGINE_ZOO_RESULTS"], "a") as results:
            results.write(json.dumps({"model": name, "scheme": scheme, "parameters": parameters,
                                      "compile_s": round(compile_s, 1), "worst": worst, "tensor": where}) + "\n")
    assert worst <= TOL, f"{where} is {worst:.3g} off PyTorch after {len(ours)} steps"
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
