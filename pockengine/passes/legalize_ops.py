"""legalize_ops: TVM's LegalizeOps, with each distinct operator call legalized once.

LegalizeOps builds a TE computation and a TIR PrimFunc for every operator call, then discards the
PrimFuncs that come out identical. A training step repeats the same call many times over (the
backward of every BatchNorm, each optimizer update of a same-shaped parameter): MobileNetV2's
step has 3932 calls and 617 distinct ones, and LegalizeOps was the costliest pass of its build
(3 s of 22). Here the first call of each kind is legalized by TVM's own rule; a later call with
the same operator, attributes, result and argument types (shapes, dtypes), constant arguments and
pattern of repeated arguments gets the same PrimFunc applied to its own arguments. The module is
the one LegalizeOps builds (tests/passes/test_legalize_ops.py compares them).

Only results of the plain form `call_tir(f, (args of the call, in any order))` are reused; a rule
that emits other bindings, passes other values or returns anything else runs every time."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from .transposed_matmuls import transposed_matmuls


def legalize_ops() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="LegalizeOpsOnce")
    def transform(mod, _ctx):
        # The cache belongs to one run: its PrimFuncs live in the module being legalized.
        return relax.transform.LegalizeOps(_memoized_rules())(mod)

    return transform


def legalize_and_fuse() -> list:
    """TVM's legalize-to-FuseTIR sequence (its CPU and CUDA pipelines share it), with legalize_ops
    in place of LegalizeOps, after transposed_matmuls."""
    return [
        transposed_matmuls(),
        legalize_ops(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def _memoized_rules() -> dict:
    """{op name: legalization function} for every op with a registered rule, sharing one cache."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    cache: dict = {}

    def memoized(rule):
        def legalize(bb, call):
            key = _call_key(call)
            hit = cache.get(key)
            if hit is not None and _same_call(hit[2], call):
                template, positions, _ = hit
                args = relax.Tuple([call.args[i] for i in positions])
                return relax.Call(template.op, [template.args[0], args], template.attrs, template.ty_args)
            result = rule(bb, call)
            if hit is None:
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


def _call_key(call) -> tuple:
    """What the PrimFunc of `call` can depend on, hashed (a hit is then compared in full: _same_call)."""
    args, pattern = [], []
    for i, arg in enumerate(call.args):
        args.append(tvm_ffi.structural_hash(arg.ty if isinstance(arg, relax.Var) else arg))
        # x * x and x * y of one shape are different calls: the first passes one argument twice
        pattern.append(next(j for j, other in enumerate(call.args) if other.same_as(arg))
                       if isinstance(arg, relax.Var) else i)
    attrs = tvm_ffi.structural_hash(call.attrs) if call.attrs is not None else 0
    return (call.op.name, attrs, tuple(tvm_ffi.structural_hash(t) for t in call.ty_args),
            tvm_ffi.structural_hash(call.ty), tuple(args), tuple(pattern))


def _same_call(first, call) -> bool:
    """`call` has the operator, attributes, result and argument types and constant arguments of
    `first` (whose key it shares: this rules out a hash collision)."""
    equal = tvm_ffi.structural_equal
    return (equal(first.attrs, call.attrs) and equal(first.ty, call.ty) and len(first.ty_args) == len(call.ty_args)
            and all(equal(a, b) for a, b in zip(first.ty_args, call.ty_args))
            and all(equal(a.ty, b.ty) if isinstance(a, relax.Var) else equal(a, b)
                    for a, b in zip(first.args, call.args)))


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
