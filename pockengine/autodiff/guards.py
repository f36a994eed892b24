"""What keeps a compiled step from training on garbage silently, inside the step itself.

`index_ranges` finds the integer batch inputs that index a tensor (class labels through
cross-entropy's gather, token ids through an embedding's take, a 4-bit one's too) and the values the indexing accepts:
TVM's gather and take read out of bounds without a word, where PyTorch raises ("Target 100 is out
of bounds"). Float inputs must be finite: TVM's max(x, 0) turns NaN into 0 where PyTorch's ReLU
keeps it, so a NaN would train on with a finite loss.

The step checks both (`emit_batch_check`) before anything else, and a refused batch changes no
state: every new value the step returns is `where(batch_ok, new, old)` (`gate`, elementwise, so it
fuses into the update's own kernel and the update still writes in place). After the updates it
checks that every trained parameter is still finite (`emit_loss_check`). Either failure makes the
returned loss NaN, so the runtime reads one scalar it reads anyway and looks for the cause (and
raises) only when that is not finite: the checks cost a few kernels, not a pass over every tensor
from Python after every step (runtime.Program.step).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from ..frontend import w4_ops
from ..ir import bindings_of, bound_values
from . import linear_log_prob

# Ops whose output holds its first argument's values, rearranged: an index traced through them is
# still the input's values.
_SAME_VALUES = {"relax.expand_dims", "relax.squeeze", "relax.reshape", "relax.astype", "relax.permute_dims",
                "relax.strided_slice", "relax.broadcast_to", "relax.flatten"}


@dataclass(frozen=True)
class IndexRange:
    """Values of batch input `input` must lie in [0, size) or be one of `ignored` (masked out before
    they index, as cross-entropy's ignore_index); `op` says which operation indexes with them."""
    input: str
    size: int
    ignored: tuple
    op: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> IndexRange:
        return cls(d["input"], int(d["size"]), tuple(d["ignored"]), d["op"])


def index_ranges(func, input_names: list[str], origins: dict) -> list[IndexRange]:
    """The IndexRanges of forward_loss `func`'s batch inputs (named `input_names`, in order);
    origins: binding name -> Origin, to name the indexing op."""
    bindings = bound_values(func)
    inputs = dict(zip(func.params, input_names))
    found = []
    for b in bindings_of(func):
        value = b.value
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            continue
        name = value.op.name
        if name in ("relax.gather_elements", "relax.take"):
            data, index, axis = value.args[0], value.args[1], int(value.attrs.axis)
        elif name == "relax.nn.nll_loss":  # the ONNX frontend's cross-entropy
            data, index, axis = value.args[0], value.args[1], 1 if len(value.args[0].ty.shape) > 1 else 0
        elif name == linear_log_prob.OP_NAME:  # labels index the head's weight rows (the classes)
            data, index, axis = value.args[1], value.args[2], 0
        elif name == w4_ops.TAKE:  # token ids index a 4-bit embedding's rows (its packed bytes)
            data, index, axis = value.args[1], value.args[0], 0
        else:
            continue
        ignored = {int(value.attrs.ignore_index)} if name == "relax.nn.nll_loss" else set()
        source = _trace(index, bindings, ignored)
        shape = data.ty.shape
        if source not in inputs or shape is None:
            continue
        extent = shape[axis % len(shape)]
        if not isinstance(extent, tvm.tirx.IntImm):
            continue  # a dynamic size: nothing to check against
        origin = origins.get(b.var.name)
        described = "cross_entropy over the vocabulary head (fused)" if name == linear_log_prob.OP_NAME else name
        found.append(IndexRange(inputs[source], int(extent.value), tuple(sorted(ignored)),
                                str(origin) if origin else described))
    return found


def _trace(expr, bindings: dict, ignored: set):
    """The variable whose values `expr` holds (through reshapes, casts, slices), adding to `ignored`
    the values a `where(x != c, x, ...)` masks out on the way; None if the values are computed."""
    while True:
        value = bindings.get(expr)
        if value is None:
            return expr  # a function parameter
        if isinstance(value, relax.Var):
            expr = value
            continue
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        if value.op.name in _SAME_VALUES:
            expr = value.args[0]
            continue
        if value.op.name == "relax.where":
            masked = _not_equal_constant(value.args[0], value.args[1], bindings)
            if masked is None:
                return None
            ignored.add(masked)
            expr = value.args[1]
            continue
        return None


def _not_equal_constant(cond, data, bindings: dict):
    """c when `cond` is `data != c` for a constant c, else None."""
    cond = bindings.get(cond, cond)
    if not (isinstance(cond, relax.Call) and isinstance(cond.op, tvm.ir.Op) and cond.op.name == "relax.not_equal"):
        return None
    lhs, rhs = cond.args
    if lhs.same_as(data) and isinstance(rhs, tvm.ir.expr.Constant) and rhs.value.numpy().size == 1:
        return int(rhs.value.numpy().item())
    return None


_checks_compiled = True


@contextlib.contextmanager
def compiled_without_checks():
    """Steps derived inside compile without these checks (benchmarks/guard_cost.py measures what
    the checks cost against them); nothing else should."""
    global _checks_compiled
    _checks_compiled = False
    try:
        yield
    finally:
        _checks_compiled = True


def emit_batch_check(bb: relax.BlockBuilder, inputs: dict, ranges: list) -> relax.Var:
    """Emit `batch_ok`, a bool scalar: every float input (`inputs`: {name: var}) is finite and every
    index input holds values its IndexRange accepts."""
    if not _checks_compiled:
        return None
    fine = []  # int8 scalars, 1 where every value of an input is accepted
    for var in inputs.values():
        dtype = str(var.ty.dtype)
        if dtype.startswith(("float", "bfloat")):
            # Comparisons only, no negation: NaN fails both, and TVM's simplifier rewrites not(x < y)
            # as y <= x, which NaN passes.
            inf = relax.const(np.inf, dtype)
            fine.append(R.min(R.astype(R.logical_and(R.less(var, inf), R.greater(var, R.negative(inf))), "int8")))
    for r in ranges:
        var = inputs[r.input]
        dtype = str(var.ty.dtype)
        good = R.logical_and(R.greater_equal(var, relax.const(0, dtype)), R.less(var, relax.const(r.size, dtype)))
        for value in r.ignored:
            good = R.logical_or(good, R.equal(var, relax.const(value, dtype)))
        fine.append(R.min(R.astype(good, "int8")))
    if not fine:
        return bb.emit(relax.const(True, "bool"), "guard_batch_ok")
    every = fine[0]
    for flag in fine[1:]:
        every = R.minimum(every, flag)
    return bb.emit(R.equal(every, relax.const(1, "int8")), "guard_batch_ok")


def gate(bb: relax.BlockBuilder, batch_ok, new, old, name: str):
    """Emit `new` where the batch was accepted, else `old` unchanged (`new` itself without checks).

    An elementwise kernel of its own that FuseOps fuses into the update computing `new`. Written as
    if_then_else, not Relax's where (a Select): in a vectorized loop TVM broadcasts a Select's
    condition to a bool vector, which its CUDA code generator declares with the value's vector type
    (`float2 c = make_ushort2(...)`, rejected by nvcc); an if_then_else's loop-invariant condition
    stays scalar."""
    from ..optim import UPDATE_PREFIX  # bound with the update it gates (reorder_updates, reports)

    new = new if isinstance(new, relax.Var) else bb.emit(new, f"{UPDATE_PREFIX}{name}")
    if batch_ok is None:
        return new
    ty = new.ty
    shape = tuple(int(d) for d in ty.shape)
    kernel = bb.add_func(_gate_kernel(shape, str(ty.dtype)), "guard_gate")
    return bb.emit(relax.call_tir(kernel, [batch_ok, new, old], relax.TensorType(shape, str(ty.dtype))),
                   f"{UPDATE_PREFIX}gated_{name}")


@functools.cache
def _gate_kernel(shape: tuple, dtype: str):
    from tvm import te, tirx

    shape = [tirx.IntImm("int64", d) for d in shape]  # as LegalizeOps' kernels: FuseTIR matches buffers
    ok = te.placeholder((), "bool", "batch_ok")
    new, old = te.placeholder(shape, dtype, "new"), te.placeholder(shape, dtype, "old")
    out = te.compute(shape, lambda *i: tirx.if_then_else(ok[()], new[i], old[i]), "gated")
    # Private, like LegalizeOps' kernels: the module names it after its GlobalVar.
    return te.create_prim_func([ok, new, old, out]).without_attr("global_symbol")


def emit_loss_check(bb: relax.BlockBuilder, loss, batch_ok: relax.Var, trained: list):
    """The loss, or NaN where the batch was refused or a trained parameter (`trained`: the new
    values) is NaN or infinite: a NaN a ReLU kept from the loss still makes it NaN. One kernel
    reads every parameter, after the last update."""
    if batch_ok is None:
        return loss
    shapes = tuple((tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in trained)
    gv = bb.add_func(_loss_check_kernel(shapes, str(loss.ty.dtype)), "guard_loss_check")
    return bb.emit(relax.call_tir(gv, [loss, batch_ok] + list(trained), relax.TensorType((), str(loss.ty.dtype))),
                   "guard_loss")


def _loss_check_kernel(tensors: tuple, dtype: str):
    """tensors: ((shape, dtype), ...) of the trained parameters."""
    from tvm import te, tirx

    from ..ir import AS_WRITTEN_ON_CPUS

    loss = te.placeholder((), dtype, "loss")
    ok = te.placeholder((), "bool", "batch_ok")
    params = [te.placeholder([tirx.IntImm("int64", d) for d in shape], t, f"p{i}")
              for i, (shape, t) in enumerate(tensors)]

    def bad(value):  # 1 for NaN (every comparison false) or an infinity: no fabs, which C targets lack
        inf = tirx.const(float("inf"), value.dtype)
        return tirx.Select(tirx.And(value < inf, value > -inf), 0, 1)

    def element(p, k):  # element k of p in row-major order: each tensor is read as one flat loop
        if not p.shape:
            return p[()]
        index = []
        for extent in reversed(p.shape[1:]):
            index.append(k % extent)
            k = k // extent
        return p[tuple([k] + index[::-1])]

    # One loop per element count and dtype, over every tensor of it (MobileNetV2's 158 trained
    # tensors have 31 sizes): LLVM's time grows with the loops, and a build of 158 took 1.7 s.
    groups = {}
    for p, (shape, t) in zip(params, tensors):
        groups.setdefault((int(np.prod(shape, dtype=np.int64)), t), []).append(p)

    def count_bad(i: int, size: int, group: list):
        k = te.reduce_axis((0, tirx.IntImm("int64", size)), f"k{i}")

        def in_group():
            total = bad(element(group[0], k))
            for p in group[1:]:
                total = total + bad(element(p, k))
            return te.sum(total, axis=[k])

        return te.compute((), in_group, f"bad{i}")

    counts = [count_bad(i, size, group) for i, ((size, _), group) in enumerate(groups.items())]

    def result():
        fine = ok[()]
        for c in counts:
            fine = tirx.And(fine, c[()] == 0)
        return tirx.Select(fine, loss[()], tirx.const(float("nan"), dtype))

    out = te.compute((), result, "checked_loss")
    func = te.create_prim_func([loss, ok] + params + [out]).without_attr("global_symbol")
    return func.with_attr(AS_WRITTEN_ON_CPUS, True)
