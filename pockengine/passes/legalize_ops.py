"""legalize_ops: TVM's LegalizeOps, with each distinct operator call legalized once.

LegalizeOps builds a TE computation and a TIR PrimFunc for every operator call, then discards the
PrimFuncs that come out identical. A training step repeats the same call many times over (the
backward of every BatchNorm, each optimizer update of a same-shaped parameter): MobileNetV2's
step has 3932 calls and 617 distinct ones, and LegalizeOps was the costliest pass of its build
(3 s of 22). Here the first call of each kind is legalized by TVM's own rule; a later call with
the same operator, attributes, argument types (static shapes and dtypes), constant arguments and
pattern of repeated arguments gets the same PrimFunc applied to its own arguments. The module is
the one LegalizeOps builds (tests/passes/test_legalize_ops.py compares them).

Only results of the plain form `call_tir(f, (args of the call, in any order))` are reused; a rule
that emits other bindings, passes other values or returns anything else runs every time."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax


def legalize_ops() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="LegalizeOpsOnce")
    def transform(mod, _ctx):
        # The cache belongs to one run: its PrimFuncs live in the module being legalized.
        return relax.transform.LegalizeOps(_memoized_rules())(mod)

    return transform


def _memoized_rules() -> dict:
    """{op name: legalization function} for every op with a registered rule, sharing one cache."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    cache: dict = {}

    def memoized(rule):
        def legalize(bb, call):
            key = _call_key(call)
            hit = cache.get(key) if key is not None else None
            if hit is not None and _same_constants(hit[2], call):
                template, positions, _ = hit
                args = relax.Tuple([call.args[i] for i in positions])
                return relax.Call(template.op, [template.args[0], args], template.attrs, template.ty_args)
            result = rule(bb, call)
            if key is not None and hit is None:
                positions = _argument_positions(result, call, call_tir)
                if positions is not None:
                    cache[key] = (result, positions, call)
            return result

        return legalize

    rules = {}
    for name in tvm.ir.Op.list_op_names():
        rule = tvm.ir.Op.get(name).get_attr("FLegalize")
        if rule is not None:
            rules[name] = memoized(rule)
    return rules


def _static_tensor(ty) -> tuple | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = []
    for d in ty.shape:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        dims.append(int(d))
    return str(ty.dtype), tuple(dims)


def _call_key(call) -> tuple | None:
    """What the PrimFunc of `call` can depend on, hashable; None when it is not all static."""
    result = _static_tensor(call.ty)
    if result is None:
        return None
    args, pattern = [], []
    for i, arg in enumerate(call.args):
        if isinstance(arg, relax.Var):
            tensor = _static_tensor(arg.ty)
            if tensor is None:
                return None
            args.append(tensor)
            # x * x and x * y of one shape are different calls: the first passes one argument twice
            pattern.append(next(j for j, other in enumerate(call.args) if other.same_as(arg)))
        else:  # a constant, a shape, a tuple: by value (checked for equality on a hit)
            args.append(("value", tvm_ffi.structural_hash(arg)))
            pattern.append(i)
    attrs = tvm_ffi.structural_hash(call.attrs) if call.attrs is not None else 0
    ty_args = tuple(tvm_ffi.structural_hash(t) for t in call.ty_args)
    return call.op.name, attrs, ty_args, result, tuple(args), tuple(pattern)


def _same_constants(first, call) -> bool:
    """The parts of the key compared by hash are equal (no collision)."""
    if not tvm_ffi.structural_equal(first.attrs, call.attrs):
        return False
    if len(first.ty_args) != len(call.ty_args) or not all(
            tvm_ffi.structural_equal(a, b) for a, b in zip(first.ty_args, call.ty_args)):
        return False
    return all(tvm_ffi.structural_equal(a, b) for a, b in zip(first.args, call.args) if not isinstance(a, relax.Var))


def _argument_positions(result, call, call_tir) -> list | None:
    """For `result` = call_tir(f, (a, b, ...)) whose arguments are all arguments of `call`: the
    position in `call.args` of each. None for any other result."""
    if not (isinstance(result, relax.Call) and result.op.same_as(call_tir) and len(result.args) == 2
            and isinstance(result.args[1], relax.Tuple)):
        return None
    positions = []
    for field in result.args[1].fields:
        i = next((i for i, arg in enumerate(call.args) if isinstance(arg, relax.Var) and field.same_as(arg)), None)
        if i is None:
            return None
        positions.append(i)
    return positions
