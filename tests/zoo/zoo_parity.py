"""The zoo's parity checks against PyTorch eager, on the same batches, with SGD-momentum:

- float64, 3 steps: every parameter and buffer within 1e-9, each tensor's error scaled by
  max(|w|.max(), 1e-2), the losses within 1e-9;
- float32, 20 steps (the 3 batches in turn): the criterion of tests/test_parity.py — within 1e-3 of
  PyTorch's float32 weights, or within the sum of both rounding errors where PyTorch's own float32
  run is farther than that from the exact (float64) trajectory; and no farther from that trajectory
  than 4x PyTorch's float32 run is (PyTorch's drift: the larger of its runs with and without
  oneDNN's convolutions).

Built at opt-level 0 (FAST_HOST): results must not depend on the level (tests/test_opt_levels.py).
Each check appends its result to $POCKENGINE_ZOO_RESULTS when set (benchmarks/zoo_table.py).

Every model's full update runs in CI. A compile takes 5-40 s on 2 cores, so CI runs the sparse and the
float32 checks on a subset that covers each scheme kind and each family (`cases`); with
POCKENGINE_ZOO=all (what benchmarks/zoo_table.py sets) every model gets all three."""

import copy
import json
import os
import time

import numpy as np
import pytest
import torch

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff, train_torch
from pockengine.lora import add_lora

TOL = 1e-9
SCALE_FLOOR = 1e-2
FLOAT32_STEPS = 20
FLOAT32_TOL = 1e-3
FLOAT32_VS_TORCH_ROUNDING = 4.0


EVERY_CHECK = os.environ.get("POCKENGINE_ZOO") == "all"
CHECKS = ("full", "sparse", "float32")


def cases(names, sparse_in_ci, float32_in_ci) -> list:
    """(check, model) parameters of the three checks of every model, ids `<check>-<model>`; the sparse
    and float32 checks of models outside CI's subsets are skipped unless POCKENGINE_ZOO=all."""
    in_ci = {"full": list(names), "sparse": list(sparse_in_ci), "float32": list(float32_in_ci)}
    unknown = (set(sparse_in_ci) | set(float32_in_ci)) - set(names)
    assert not unknown, f"not zoo models: {unknown}"
    params = []
    for check in CHECKS:
        skip = pytest.mark.skip(reason=f"CI runs the {check} check on {len(in_ci[check])} of these {len(names)} "
                                       "models; POCKENGINE_ZOO=all runs it on every one (benchmarks/zoo_table.py)")
        params += [pytest.param(check, name, id=f"{check}-{name}",
                                marks=() if EVERY_CHECK or name in in_ci[check] else skip) for name in names]
    return params


def check_model(check, name, model, loss, batches, scheme, source):
    """Run one of CHECKS; scheme: (label, model -> SparseUpdate), for the sparse one."""
    if check == "full":
        assert_float64_parity(name, model, loss, batches, source=source)
    elif check == "sparse":
        label, make_scheme = scheme
        assert_float64_parity(name, model, loss, batches, make_scheme(model), label, source=source)
    else:
        assert_float32_drift_is_rounding(name, model, loss, batches, source=source)


def optimizer():
    return pe.optim.SGD(lr=0.01, momentum=0.9)


def _cast(batches, dtype):
    return [(tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs), target)
            for inputs, target in batches]


def _compile(model, loss, batches, sparse_update):
    job = pe.TrainingJob(copy.deepcopy(model), batches[0][0], batches[0][1], loss, optimizer(),
                         sparse_update=sparse_update)
    start = time.perf_counter()
    program = pe.compile(job, target=FAST_HOST)
    compile_s = time.perf_counter() - start
    if sparse_update is not None:  # PyTorch trains the same parameters (and channels)
        if sparse_update.lora_spec is not None:  # the same adapters, from the same seed
            add_lora(model, **sparse_update.lora_spec)
        pe.sparse.apply_to_torch(model, program.plan)
    return program, compile_s


def _record(**result):
    if os.environ.get("POCKENGINE_ZOO_RESULTS"):
        with open(os.environ["POCKENGINE_ZOO_RESULTS"], "a") as results:
            results.write(json.dumps(result) + "\n")


def assert_float64_parity(name, model, loss, batches, sparse_update=None, scheme="full", source=""):
    model = model.double().train()
    batches = _cast(batches, torch.float64)
    program, compile_s = _compile(model, loss, batches, sparse_update)
    ours = [program.step(*inputs, target) for inputs, target in batches]
    theirs = train_torch(model, optimizer(), batches, loss_fn=loss)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict(), floor=SCALE_FLOOR)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{name} ({scheme}): {parameters} parameters, compiled in {compile_s:.1f} s, "
          f"worst scaled error {worst:.2e} ({where})")
    _record(model=name, source=source, check="full" if sparse_update is None else "sparse", scheme=scheme,
            parameters=parameters, compile_s=round(compile_s, 1), worst=worst, tensor=where)
    assert worst <= TOL, f"{where} is {worst:.3g} off PyTorch after {len(ours)} steps"
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)


def assert_float32_drift_is_rounding(name, model, loss, batches, source=""):
    model = model.float().train()
    steps = [batches[i % len(batches)] for i in range(FLOAT32_STEPS)]
    exact = copy.deepcopy(model).double()
    other_kernels = copy.deepcopy(model)
    program, _ = _compile(model, loss, _cast(steps, torch.float32), None)
    ours_losses = [program.step(*inputs, target) for inputs, target in _cast(steps, torch.float32)]
    torch_losses = train_torch(model, optimizer(), _cast(steps, torch.float32), loss_fn=loss)
    train_torch(exact, optimizer(), _cast(steps, torch.float64), loss_fn=loss)
    # PyTorch's float32 rounding, measured with both of its CPU convolution implementations: where a
    # ReLU's input is within rounding of 0, which side it lands on decides whether a gradient passes,
    # so one run can be lucky (torchvision's resnet18 with GroupNorm: 1e-6 from the float64 weights
    # with oneDNN's convolutions, 0.39 without them, and 0.39 for ours).
    with torch.backends.mkldnn.flags(enabled=False):
        train_torch(other_kernels, optimizer(), _cast(steps, torch.float32), loss_fn=loss)
    ours = program.state_dict()
    worst, where = max_scaled_diff(ours, model.state_dict(), floor=SCALE_FLOOR)
    ours_drift, _ = max_scaled_diff(ours, exact.state_dict(), floor=SCALE_FLOOR)
    torch_drift = max(max_scaled_diff({k: v.numpy() for k, v in run.state_dict().items()}, exact.state_dict(),
                                      floor=SCALE_FLOOR)[0] for run in (model, other_kernels))
    bound = max(FLOAT32_TOL, (1 + FLOAT32_VS_TORCH_ROUNDING) * torch_drift)
    print(f"{name} float32, {FLOAT32_STEPS} steps: vs PyTorch {worst:.2e} ({where}); distance from the float64 "
          f"trajectory: ours {ours_drift:.2e}, PyTorch {torch_drift:.2e}")
    _record(model=name, source=source, check="float32", worst=worst, bound=bound, tensor=where,
            ours_drift=ours_drift, torch_drift=torch_drift)
    assert worst <= bound, f"{where} differs by {worst:.3g} after {FLOAT32_STEPS} float32 steps"
    np.testing.assert_allclose(ours_losses, torch_losses, rtol=bound, atol=bound)
    assert ours_drift <= FLOAT32_VS_TORCH_ROUNDING * torch_drift + 1e-7, "our float32 error exceeds rounding"
