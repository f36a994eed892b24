"""Targeted cases of the rules in pockengine/autodiff/gradients.py (and TVM's max_pool2d, whose
overlapping windows were reported wrong) against torch.autograd, in float64. The attribute grid of
every registered rule, and the test that none is left out, are in test_rule_audit.py.

For y = op(x) and a random cotangent w, the gradient of sum(y * w) w.r.t. x from Relax's Gradient
pass (using our rule) must equal torch's x.grad. Inputs include the kinks where PyTorch defines the
derivative by convention (exact zeros for relu, the bounds 0 and 6 for ReLU6).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import relax
from tvm.relax import op as R

from pockengine.autodiff import gradients

TOL = 1e-12


def relax_gradient(build, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    xv = relax.Var("x", relax.TensorType(x.shape, "float64"))
    bb = relax.BlockBuilder()
    with bb.function("f", [xv]):
        with bb.dataflow():
            y = bb.emit(build(xv))
            loss = bb.emit_output(bb.emit(R.sum(R.multiply(y, relax.const(w, "float64")))))
        bb.emit_func_output(loss)
    gradients.install()
    mod = relax.transform.Gradient("f")(bb.get())
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    _, grads = vm["f_adjoint"](tvm.runtime.tensor(x))
    return grads[0].numpy()


def torch_gradient(fn, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    xt = torch.tensor(x, requires_grad=True)
    (fn(xt) * torch.tensor(w)).sum().backward()
    return xt.grad.numpy()


def with_kinks(shape, values, seed=0):
    """Random normal values, scaled, with some entries set exactly to the given kink values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 4
    flat = x.reshape(-1)
    for i, v in enumerate(values):
        flat[i * 3::len(values) * 3 + 1] = v
    return x


def idx(*shape_and_high):
    *shape, high = shape_and_high
    return np.random.default_rng(1).integers(0, high, shape)


def pooling_input(shape):
    """Values on a coarse grid, so windows hold ties (the first maximum in row-major order takes the
    gradient, as in PyTorch), with negative values next to the -inf padding."""
    return np.random.default_rng(3).integers(-3, 4, shape).astype(np.float64)


# kernel, stride, padding, dilation, ceil_mode, input size: overlapping windows (ResNet's stem is
# 3/2/1), tiling and gapped windows, dilation, ceil_mode windows running past the input, even and odd sizes.
MAX_POOL_GRID = [(3, 2, 1, 1, False, 8), (3, 2, 1, 1, False, 9), (3, 1, 1, 1, False, 6), (3, 2, 0, 1, True, 8),
                 (2, 2, 0, 1, False, 8), (3, 2, 0, 1, False, 9), (2, 3, 0, 1, False, 8), (3, 2, 1, 2, False, 9),
                 ((2, 3), (1, 2), (1, 0), 1, True, 7)]

# label, axes, begin, end, strides (axes as in x[..] of a 4-d tensor; negative axes are not
# allowed by torch's slicing here, the rule normalises them anyway)
STRIDED_SLICES = [("Focus stem: offset 1, stride 2", [2, 3], [1, 0], [8, 7], [2, 2]),
                  ("stride 3 past the end", [1, 3], [0, 1], [100, 100], [3, 3]),
                  ("one element", [2], [5], [6], [4]), ("stride longer than the axis", [1], [1], [5], [9]),
                  ("unit stride, both ends cut", [1, 2, 3], [1, 2, 3], [4, 7, 6], [1, 1, 1])]

GATHER_INDEX = idx(3, 2, 5, 4, 6)  # duplicates along axis 1 on purpose
TOKENS = idx(2, 5, 7)  # repeated tokens on purpose

# rule name -> (relax builder, torch function, input)
CASES = {
    **{f"relax.nn.max_pool2d (kernel {k}, stride {s}, padding {p}, dilation {d}, ceil_mode {c}, {hw}x{hw})": (
        lambda x, k=k, s=s, p=p, d=d, c=c: R.nn.max_pool2d(x, k, s, p, d, ceil_mode=c),
        lambda x, k=k, s=s, p=p, d=d, c=c: F.max_pool2d(x, k, s, p, d, ceil_mode=c),
        pooling_input((2, 3, hw, hw)),
    ) for k, s, p, d, c, hw in MAX_POOL_GRID},
    "relax.nn.relu": (R.nn.relu, F.relu, with_kinks((4, 6), [0.0])),
    "relax.clip (ReLU6)": (lambda x: R.clip(x, 0, 6), F.relu6, with_kinks((4, 6), [0.0, 6.0])),
    "relax.nn.relu6": (R.nn.relu6, F.relu6, with_kinks((4, 6), [0.0, 6.0])),
    "relax.nn.leakyrelu": (lambda x: R.nn.leakyrelu(x, 0.2), lambda x: F.leaky_relu(x, 0.2), with_kinks((4, 6), [])),
    "relax.nn.gelu": (R.nn.gelu, F.gelu, with_kinks((4, 6), []) / 2),
    "relax.nn.gelu_tanh": (R.nn.gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), with_kinks((4, 6), []) / 2),
    "relax.rsqrt": (R.rsqrt, torch.rsqrt, np.abs(with_kinks((4, 6), [])) + 0.5),
    "relax.erf": (R.erf, torch.erf, with_kinks((4, 6), []) / 4),
    "relax.flatten": (lambda x: R.multiply(R.flatten(x), R.flatten(x)), lambda x: torch.flatten(x) ** 2,
                      with_kinks((2, 3, 4), [])),
    "relax.squeeze": (lambda x: R.multiply(R.squeeze(x, [1]), R.squeeze(x, [1])), lambda x: x.squeeze(1) ** 2,
                      with_kinks((3, 1, 4), [])),
    "relax.strided_slice": (
        lambda x: R.strided_slice(x, [1, 2, 3], [1, -5, 0], [3, 100, 5], [1, 2, 2]),
        lambda x: x[:, 1:3, -5::2, 0:5:2],
        with_kinks((2, 4, 7, 6), []),
    ),
    **{f"relax.strided_slice ({label})": (
        lambda x, a=axes, b=begin, e=end, st=strides: R.strided_slice(x, a, b, e, st),
        lambda x, a=axes, b=begin, e=end, st=strides: x[tuple(
            slice(b[a.index(d)], e[a.index(d)], st[a.index(d)]) if d in a else slice(None) for d in range(4))],
        with_kinks((2, 5, 8, 7), []),
    ) for label, axes, begin, end, strides in STRIDED_SLICES},
    "relax.grad.no_grad (a gradient barrier)": (
        lambda x: R.add(R.multiply(x, x), R.grad.no_grad(R.multiply(x, x))), lambda x: x * x + (x * x).detach(),
        with_kinks((3, 4), []),
    ),
    "relax.take (0-d index)": (lambda x: R.take(x, relax.const(1, "int64"), axis=1), lambda x: x[:, 1],
                               with_kinks((3, 4, 5), [])),
    "relax.take (2-d index, embedding)": (
        lambda x: R.take(x, relax.const(TOKENS), axis=0), lambda x: x[torch.tensor(TOKENS)], with_kinks((7, 3), []),
    ),
    "relax.gather_elements": (
        lambda x: R.gather_elements(x, relax.const(GATHER_INDEX), axis=1),
        lambda x: torch.gather(x, 1, torch.tensor(GATHER_INDEX)),
        with_kinks((3, 6, 5, 4), []),
    ),
    "relax.nn.pad": (
        lambda x: R.multiply(R.nn.pad(x, [0, 0, 1, 2, 3, 0]), R.nn.pad(x, [0, 0, 1, 2, 3, 0])),
        lambda x: F.pad(x, (3, 0, 1, 2)) ** 2,
        with_kinks((2, 3, 4), []),
    ),
    "relax.nn.adaptive_avg_pool2d (global)": (
        lambda x: R.nn.adaptive_avg_pool2d(x, (1, 1)), lambda x: F.adaptive_avg_pool2d(x, 1),
        with_kinks((2, 3, 5, 7), []),
    ),
    "relax.nn.adaptive_avg_pool2d (overlapping windows)": (
        lambda x: R.nn.adaptive_avg_pool2d(x, (2, 3)), lambda x: F.adaptive_avg_pool2d(x, (2, 3)),
        with_kinks((2, 3, 5, 7), []),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_torch_autograd(name):
    build, torch_fn, x = CASES[name]
    w = np.random.default_rng(2).standard_normal(torch_fn(torch.tensor(x)).shape)
    ours = relax_gradient(build, x, w)
    theirs = torch_gradient(torch_fn, x, w)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)


def test_every_rule_documents_its_math():
    for op, fn in gradients.RULES.items():
        assert fn.__doc__ and "->" in fn.__doc__, f"{op}: the docstring must give forward -> backward"
