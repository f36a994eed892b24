"""fast_math: float32 exp/erf/tanh/sigmoid become polynomials, as accurate as stated, float64 untouched."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from conftest import FAST_HOST
from pockengine.passes.fast_math import APPROXIMATED, fast_math

# Largest error relative to PyTorch's float64 result, measured 3.3e-7 (erf near 4); PyTorch's own
# float32 functions are at 6e-8. Stated bound with margin:
RELATIVE_TOL = 1e-6
OPS = {"exp": (relax.op.exp, torch.exp), "erf": (relax.op.erf, torch.erf), "tanh": (relax.op.tanh, torch.tanh),
       "sigmoid": (relax.op.sigmoid, torch.sigmoid)}


def inputs() -> np.ndarray:
    tiny = np.logspace(-30, 1, 3001)
    return np.concatenate([np.linspace(-100, 100, 20001), np.linspace(-5, 5, 20001), tiny, -tiny,
                           [np.inf, -np.inf, 0.0, -0.0]]).astype("float32")


def unary_module(op, dtype: str, n: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n,), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return relax.transform.LegalizeOps()(bb.get())


def run(mod, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(relax.build(mod, target=tvm.target.Target(FAST_HOST)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def tir_calls(mod) -> set[str]:
    """Names of the math intrinsics the module's kernels still call."""
    text = mod.script()
    return {name for name in APPROXIMATED if f"T.{name}(" in text}


def test_every_op_listed_is_tested():
    assert set(OPS) == set(APPROXIMATED)


@pytest.mark.parametrize("name", list(OPS))
def test_float32_accuracy_against_pytorch(name):
    relax_op, torch_op = OPS[name]
    x = inputs()
    mod = unary_module(relax_op, "float32", len(x))
    fast = fast_math()(mod)
    assert name in tir_calls(mod) and not tir_calls(fast)
    ours = run(fast, x).astype(np.float64)
    exact = torch_op(torch.from_numpy(x.astype(np.float64))).numpy()
    with np.errstate(invalid="ignore"):  # inf - inf: no error where both are inf
        error = np.abs(np.where(ours == exact, 0.0, ours - exact))
    tiny = np.finfo(np.float32).tiny
    largest = np.finfo(np.float32).max
    normal = (np.abs(exact) >= tiny) & (np.abs(exact) <= largest)
    relative = error[normal] / np.abs(exact[normal])
    assert relative.max() <= RELATIVE_TOL, (name, float(relative.max()), float(x[normal][relative.argmax()]))
    subnormal = np.abs(exact) < tiny  # exp below -87.3: float32 has no relative precision left there
    assert error[subnormal].max(initial=0) <= tiny
    overflow = np.abs(exact) > largest  # exp above 88.72: inf
    assert np.all(ours[overflow] == np.inf)


def test_special_values():
    specials = np.array([np.inf, -np.inf, 0.0, np.nan], dtype="float32")
    # erf(nan) is 1 (the approximation clamps its argument); the others keep nan.
    expected = {"exp": [np.inf, 0, 1, np.nan], "erf": [1, -1, 0, 1], "tanh": [1, -1, 0, np.nan],
                "sigmoid": [1, 0, 0.5, np.nan]}
    for name, (relax_op, _) in OPS.items():
        got = run(fast_math()(unary_module(relax_op, "float32", len(specials))), specials)
        np.testing.assert_array_equal(got, np.array(expected[name], dtype="float32"), err_msg=name)


def test_float64_is_left_exact():
    x = inputs().astype("float64")
    for name, (relax_op, _) in OPS.items():
        mod = unary_module(relax_op, "float64", len(x))
        fast = fast_math()(mod)
        assert tir_calls(fast) == {name}
        np.testing.assert_array_equal(run(fast, x), run(mod, x), err_msg=name)


def test_calls_inside_fused_expressions_are_rewritten():
    """exp and erf nested in one kernel's arithmetic, as in GELU's backward. For x << 0 GELU's
    1 + erf(x / sqrt 2) cancels: erf's absolute error (3e-7) times |x| / 2 times e^erf bounds the
    absolute error there (2.5e-6 at |x| = 6)."""
    x = np.linspace(-6, 6, 4097).astype("float32")

    def gelu_grad(v):
        return relax.op.multiply(relax.op.nn.gelu(v), relax.op.exp(relax.op.erf(v)))

    mod = unary_module(gelu_grad, "float32", len(x))
    fast = fast_math()(mod)
    assert not tir_calls(fast)
    t = torch.from_numpy(x.astype(np.float64))
    expected = (torch.nn.functional.gelu(t) * torch.exp(torch.erf(t))).numpy()
    np.testing.assert_allclose(run(fast, x), expected, rtol=2e-6, atol=3e-6)


def test_after_scheduling_inlined_stages_stay_well_formed():
    """Softmax's exp stage is inlined into two consumers (its sum and its normalisation) by
    inline_elementwise; fast_math runs after it, so each copy gets its own let variable and the
    kernel is still valid TIR, scheduled (threads) and right."""
    from pockengine import pipeline, targets
    from pockengine.targets.host import CPU_LOWERING

    x = np.random.default_rng(0).standard_normal((4, 4, 32, 32)).astype("float32") * 4
    bb = relax.BlockBuilder()
    var = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [var]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(var, axis=-1))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    preset = targets.resolve(FAST_HOST)
    scheduled = tvm.transform.Sequential(pipeline.schedule_passes(CPU_LOWERING, preset, preset.target(), {}))(mod)
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert tvm.s_tir.analysis.verify_well_formed(kernel)
    assert "T.parallel" in kernel.script() and not tir_calls(scheduled)
    expected = torch.softmax(torch.from_numpy(x.astype(np.float64)), -1).numpy()
    np.testing.assert_allclose(run(scheduled, x), expected, rtol=2e-6, atol=1e-8)
