"""linear_log_prob: a language model's head and cross-entropy as one operator, so that the
`tokens x vocabulary` logits, their log-softmax and their gradient never exist whole.

    linear_log_prob(x[N, H], weight[V, H], labels[N]) -> out[N]
        out[i] = log_softmax(x @ weight^T)[i, labels[i]]
    linear_log_prob_grad(x, weight, labels, out_grad[N]) -> (x_grad[N, H], weight_grad[V, H])
        d = out_grad[:, None] * (onehot(labels) - softmax(x @ weight^T))
        x_grad = d @ weight,  weight_grad = d^T @ x

Cross-entropy decomposes (torch's core ATen decomposition) into `gather(log_softmax(logits), labels)`
followed by the ignore_index mask, the sum and the division by the count; only the first part is
this operator, so every reduction, class weighting and ignore_index keep PyTorch's own arithmetic.
At SmolLM's vocabulary the logits of 256 tokens are 50 MB, their log-softmax (saved for the
backward) 50 MB more and their gradient another 50 MB; Qwen2's are three times that.

A 4-bit head (pockengine/awq.py's W4Linear, the LM head tied to a 4-bit embedding) is read packed,
as frontend/w4_ops.py's matmuls read it, and has no weight gradient (it is frozen):

    linear_log_prob(x, packed[V, ceil(H/2)], labels, scales, zeros, [group_size]) -> out[N]
    linear_log_prob_grad(x, packed, labels, out_grad, scales, zeros, [group_size]) -> (x_grad,)

passes/fuse_linear_log_prob.py puts the operator in place of the pattern before autodiff, its
gradient rule (autodiff/gradients.py) emits `linear_log_prob_grad`, and
passes/chunk_linear_log_prob.py expands both into ordinary matmuls and row reductions over chunks
of rows right after autodiff. Legalizing either operator directly (below) computes it unchunked:
the reference the chunked expansion is tested against, and what a module that never went through
the expansion (the gradient-rule audit) compiles to.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx, topi

from ..frontend import w4_ops
from ..ir import operand_shape, register_operator

OP_NAME = "pockengine.linear_log_prob"
GRAD_OP_NAME = "pockengine.linear_log_prob_grad"
FLOAT_DTYPES = ("float32", "float64")


def linear_log_prob(x, weight, labels, w4=()) -> relax.Call:
    """w4: (scales, zeros, group_size) when `weight` is a 4-bit head's packed bytes."""
    return relax.Call(tvm.ir.Op.get(OP_NAME), [x, weight, labels, *_w4_operands(w4)])


def linear_log_prob_grad(forward, out_grad) -> relax.Call:
    """The gradient of the `forward` call's label log-probabilities, given theirs: the same operands
    (passes/chunk_linear_log_prob.py recognises the pair by them) with `out_grad` after the labels."""
    x, weight, labels, *w4_operands = forward.args
    return relax.Call(tvm.ir.Op.get(GRAD_OP_NAME), [x, weight, labels, out_grad, *w4_operands])


def _w4_operands(w4) -> list:
    if not w4:
        return []
    scales, zeros, group_size = w4
    return [scales, zeros, relax.const(np.asarray([int(group_size)], dtype="int64"), "int64")]


def w4_head(call) -> tuple:
    """(scales, zeros, group_size) of a call of either operator on a 4-bit head, else ()."""
    extra = call.args[3:] if call.op.name == OP_NAME else call.args[4:]
    if not extra:
        return ()
    scales, zeros, config = extra
    return scales, zeros, int(config.value.numpy()[0])


def _check_operands(call) -> tuple:
    """(rows, hidden, vocabulary, dtype) of a call of either operator; ValueError when misused."""
    x, weight, labels = call.args[:3]
    extra = len(call.args) - (3 if call.op.name == OP_NAME else 4)
    if extra not in (0, 3):
        raise ValueError(f"{call.op.name}: takes a float weight, or a packed 4-bit weight with its scales, zero "
                         f"points and [group size]; got {len(call.args)} arguments")
    (rows, hidden) = operand_shape(x, "x", OP_NAME, 2)
    vocab, width = operand_shape(weight, "weight", OP_NAME, 2)
    (label_rows,) = operand_shape(labels, "labels", OP_NAME, 1)
    dtype = str(x.ty.dtype)
    if dtype not in FLOAT_DTYPES or (not extra and str(weight.ty.dtype) != dtype):
        raise ValueError(f"{OP_NAME}: x and weight must share a float dtype, got {dtype} and {weight.ty.dtype}")
    if not str(labels.ty.dtype).startswith("int"):
        raise ValueError(f"{OP_NAME}: labels must be integers, got {labels.ty.dtype}")
    if extra:
        scales, zeros, group_size = w4_head(call)
        groups = -(-hidden // group_size)
        if (str(weight.ty.dtype) != "uint8" or width != -(-hidden // 2)
                or operand_shape(scales, "scales", OP_NAME) != [vocab, groups]
                or operand_shape(zeros, "zeros", OP_NAME) != [vocab, groups]):
            raise ValueError(f"{OP_NAME}: a 4-bit head over x[N, {hidden}] needs uint8 packed [V, {-(-hidden // 2)}] "
                             f"and scales and zeros [V, {groups}] (groups of {group_size}), got {weight.ty}, "
                             f"{scales.ty} and {zeros.ty}")
    if (not extra and hidden != width) or rows != label_rows:
        raise ValueError(f"{OP_NAME}: shapes x {x.ty.shape}, weight {weight.ty.shape}, labels {labels.ty.shape} "
                         "do not agree (x[N, H], weight[V, H], labels[N])")
    return rows, hidden, vocab, dtype


def _infer_forward(call, _builder):
    rows, _, _, dtype = _check_operands(call)
    return relax.TensorType([rows], dtype)


def _infer_grad(call, _builder):
    rows, hidden, vocab, dtype = _check_operands(call)
    x_grad = relax.TensorType([rows, hidden], dtype)
    if w4_head(call):  # frozen: no weight gradient
        return relax.TupleType([x_grad])
    return relax.TupleType([x_grad, relax.TensorType([vocab, hidden], dtype)])


def _weight_element(x, weight, w4):
    """(j, c) -> the head's W[j, c]: read, or dequantized from its packed 4 bits."""
    if not w4:
        return lambda j, c: weight[j, c]
    scales, zeros, config = w4
    return w4_ops.weight_element(weight, scales, zeros, int(config[0]), x.dtype)


def _logits(x: te.Tensor, weight_at, vocab) -> te.Tensor:
    k = te.reduce_axis((0, x.shape[1]), name="k")
    return te.compute((x.shape[0], vocab), lambda i, j: te.sum(x[i, k] * weight_at(j, k), axis=k), name="logits")


def _forward_te(x, weight, labels, *w4):
    log_probs = topi.nn.log_softmax(_logits(x, _weight_element(x, weight, w4), weight.shape[0]))
    return te.compute((x.shape[0],), lambda i: log_probs[i, labels[i]], name="label_log_prob")


def _grad_te(x, weight, labels, out_grad, *w4):
    weight_at = _weight_element(x, weight, w4)
    probs = topi.nn.softmax(_logits(x, weight_at, weight.shape[0]))
    one, zero = tirx.const(1, x.dtype), tirx.const(0, x.dtype)
    logits_grad = te.compute(
        probs.shape,
        lambda i, j: out_grad[i] * (tirx.Select(labels[i] == j.astype(labels.dtype), one, zero) - probs[i, j]),
        name="logits_grad")
    v = te.reduce_axis((0, weight.shape[0]), name="v")
    x_grad = te.compute(x.shape, lambda i, c: te.sum(logits_grad[i, v] * weight_at(v, c), axis=v), name="x_grad")
    if w4:
        return [x_grad]
    n = te.reduce_axis((0, x.shape[0]), name="n")
    weight_grad = te.compute(weight.shape, lambda j, c: te.sum(logits_grad[n, j] * x[n, c], axis=n),
                             name="weight_grad")
    return [x_grad, weight_grad]


def _legalizer(compute, name):
    """FLegalize of either operator; a 4-bit head's [group size] goes to `compute` as a list."""
    def legalize(builder, call):
        if not w4_head(call):
            return builder.call_te(compute, *call.args, primfunc_name_hint=name)
        *tensors, config = call.args
        group_size = [int(v) for v in config.value.numpy()]
        out = builder.call_te(lambda *args: compute(*args, group_size), *tensors, primfunc_name_hint=name)
        # the gradient is a tuple of one (x's): call_te makes a one-output kernel a tensor
        return relax.Tuple([builder.emit(out)]) if call.op.name == GRAD_OP_NAME else out
    return legalize


for _name, _infer, _compute, _hint in ((OP_NAME, _infer_forward, _forward_te, "linear_log_prob"),
                                       (GRAD_OP_NAME, _infer_grad, _grad_te, "linear_log_prob_grad")):
    register_operator(_name, _infer, _legalizer(_compute, _hint))

