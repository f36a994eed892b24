"""narrow_quantized: an int8 training graph stores its activations and frozen weights as int8.

Autodiff differentiates a quantized model (pockengine/quantize.py) with its integer values held in
float tensors: a gradient flows through them, and Relax's Gradient pass, like PyTorch, gives float
tensors adjoints. Once the step is derived, nothing differentiates any more and the integers can
take 1 byte instead of 4 (frontend/quantized_ops.py computes the same integers from either dtype):

    q = quantize(x, ...)                 ->  q = astype(quantize(x, ...), int8)
    y = quantized_conv2d(q, W, ...)      ->  y = quantized_conv2d(q, W8, ...)     (int8 in, int8 out)
    m = greater(y, -128)  (a backward)   ->  m = greater(astype(y, float32), -128)

Every other reader of a narrowed value gets its own cast right before it, which fusion folds into
the reader's kernel: the saved activations of the backward (a trained conv's input, the clip masks'
outputs) are the int8 tensors, and no float copy of them is ever held. A frozen weight every
quantized reader of which takes it as its weight becomes an int8 state tensor (1 byte per value in
Flash on a microcontroller); the signature says so (StepSignature.with_state_dtypes), and the
runtime refuses to load a value into it that is not an integer in int8's range.
"""

from __future__ import annotations

import numpy as np
import tvm_ffi
from tvm import relax

from ..autodiff.step import FROZEN, StepSignature
from ..frontend import quantized_ops
from ..ir import Substitute, bindings_of, op_name, step_pass

STORAGE = quantized_ops.STORAGE_DTYPE
# Positions of the weights among a quantized operator's arguments (6 and 3: a split weight's frozen part).
_WEIGHT_SLOT = {quantized_ops.CONV2D: (1, 6), quantized_ops.CONV2D_INPUT_GRAD: (1, 3)}


def narrowable_weights(func, signature: StepSignature, initial: dict) -> set:
    """State names of the frozen weights of `func` that only quantized convolutions read as their
    weight (the backward's float readers aside) and whose `initial` values are int8 integers."""
    n_batch = len(signature.batch)
    name_of = {param: spec.name for param, spec in zip(func.params[n_batch:], signature.state)}
    weight_uses, other_quantized_uses = set(), set()
    alias = {}  # a binding of a parameter to a new name (autodiff's `W1 = W`) -> the parameter
    for binding in bindings_of(func):
        if isinstance(binding.value, relax.Var) and (binding.value in name_of or binding.value in alias):
            alias[binding.var] = alias.get(binding.value, binding.value)
        if not quantized_ops.is_quantized_op(binding.value):
            continue
        slots = _WEIGHT_SLOT.get(op_name(binding.value), ())
        for i, arg in enumerate(binding.value.args):
            arg = alias.get(arg, arg)
            if arg in name_of:
                (weight_uses if i in slots else other_quantized_uses).add(arg)
    chosen = set()
    for param in weight_uses - other_quantized_uses:
        name = name_of[param]
        owner = signature.owner(name)
        if signature.categories.get(name) != FROZEN or owner not in initial:
            continue
        value = signature.split_state({owner: initial[owner]}).get(name)
        if value is not None and _int8_integers(np.asarray(value)):
            chosen.add(name)
    return chosen


def _int8_integers(array: np.ndarray) -> bool:
    return bool(array.size) and bool(np.all(np.isfinite(array))) and bool(np.all(array == np.round(array))) \
        and array.min() >= quantized_ops.INT8_MIN and array.max() <= quantized_ops.INT8_MAX


@step_pass("NarrowQuantized", single_block=True, drop_dead_code=True)
def narrow_quantized(signature: StepSignature, weights: set, func_name: str = "train_step"):
    """weights: the state names (narrowable_weights) whose parameters become int8."""
    def rewrite(_mod, func):
        if not any(quantized_ops.is_quantized_op(b.value) for b in bindings_of(func)):
            return None
        return _narrow(func, signature, weights, func_name)

    return rewrite


def _narrow(func, signature: StepSignature, weights: set, func_name: str):
    n_batch = len(signature.batch)
    narrow_params = {param for param, spec in zip(func.params[n_batch:], signature.state) if spec.name in weights}
    params = [relax.Var(p.name, relax.TensorType(p.ty.shape, STORAGE)) if p in narrow_params else p
              for p in func.params]
    narrowed = {old: new for old, new in zip(func.params, params) if old in narrow_params}  # old var -> int8 var
    float_dtype = {old: str(old.ty.dtype) for old in narrow_params}
    renamed = {}  # old var -> its new var, same dtype
    bb = relax.BlockBuilder()
    with bb.function(func_name, params, attrs=dict(func.attrs)):
        with bb.dataflow():
            for binding in bindings_of(func):
                value, var = binding.value, binding.var
                if isinstance(value, relax.Var) and value in narrowed:
                    narrowed[var], float_dtype[var] = narrowed[value], float_dtype[value]  # an alias
                    continue
                source = _widened_int8(value)
                if source is not None:  # an int8 input made float for the operators: they take it as it is
                    narrowed[var], float_dtype[var] = renamed.get(source, source), str(var.ty.dtype)
                    continue
                if quantized_ops.is_quantized_op(value):
                    args = [narrowed.get(a, renamed.get(a, a)) if isinstance(a, relax.Var) else a for a in value.args]
                    value = bb.normalize(relax.Call(value.op, args, value.attrs))
                    if op_name(value) == quantized_ops.QUANTIZE:
                        value = relax.op.astype(bb.emit(value, var.name + "_values"), STORAGE)
                    new = _bind(bb, var, value)
                    if str(new.ty.dtype) == STORAGE:
                        narrowed[var], float_dtype[var] = new, str(var.ty.dtype)
                    else:
                        renamed[var] = new
                    continue
                casts = {v: bb.emit(relax.op.astype(narrowed[v], float_dtype[v]), v.name + "_float")
                         for v in relax.analysis.free_vars(value) if v in narrowed}
                renamed[var] = _bind(bb, var, Substitute({**renamed, **casts}).visit_expr(value))
            outputs = func.body.body
            late = {v: bb.emit_output(relax.op.astype(narrowed[v], float_dtype[v]))
                    for v in relax.analysis.free_vars(outputs) if v in narrowed}
            outputs = Substitute({**renamed, **late}).visit_expr(outputs)
        bb.emit_func_output(outputs)
    return bb.get()[func_name]


def _widened_int8(value):
    """The int8 Var that `value` casts to a float (a model taking int8 inputs), else None."""
    if op_name(value) != "relax.astype" or not isinstance(value.args[0], relax.Var):
        return None
    source = value.args[0]
    return source if str(source.ty.dtype) == STORAGE and "float" in str(value.ty.dtype) else None


def _bind(bb: relax.BlockBuilder, var, value):
    """Bind `value` to `var`, or to a Var of the same name and kind when its type changed: names are
    what reports and patch_prefix find a layer's tensors by (the builder's own names would be fresh)."""
    value = bb.normalize(value)
    if not tvm_ffi.structural_equal(value.ty, var.ty):
        var = (relax.DataflowVar if isinstance(var, relax.DataflowVar) else relax.Var)(var.name, value.ty)
    bb.emit_normalized(relax.VarBinding(var, value))
    return var
