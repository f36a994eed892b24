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

passes/fuse_linear_log_prob.py puts the operator in place of the pattern before autodiff, its
gradient rule (autodiff/gradients.py) emits `linear_log_prob_grad`, and
passes/chunk_linear_log_prob.py expands both into ordinary matmuls and row reductions over chunks
of rows right after autodiff. Legalizing either operator directly (below) computes it unchunked:
the reference the chunked expansion is tested against, and what a module that never went through
the expansion (the gradient-rule audit) compiles to.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi

from ..ir import operand_shape, register_operator

OP_NAME = "pockengine.linear_log_prob"
GRAD_OP_NAME = "pockengine.linear_log_prob_grad"
FLOAT_DTYPES = ("float32", "float64")


def linear_log_prob(x, weight, labels) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(OP_NAME), [x, weight, labels])


def linear_log_prob_grad(x, weight, labels, out_grad) -> relax.Call:
    return relax.Call(tvm.ir.Op.get(GRAD_OP_NAME), [x, weight, labels, out_grad])


def _check_operands(call) -> tuple:
    """(rows, hidden, vocabulary, dtype) of a call of either operator; ValueError when misused."""
    x, weight, labels = call.args[:3]
    (rows, hidden), (vocab, w_hidden) = operand_shape(x, "x", OP_NAME, 2), operand_shape(weight, "weight", OP_NAME, 2)
    (label_rows,) = operand_shape(labels, "labels", OP_NAME, 1)
    dtype = str(x.ty.dtype)
    if dtype not in FLOAT_DTYPES or str(weight.ty.dtype) != dtype:
        raise ValueError(f"{OP_NAME}: x and weight must share a float dtype, got {dtype} and {weight.ty.dtype}")
    if not str(labels.ty.dtype).startswith("int"):
        raise ValueError(f"{OP_NAME}: labels must be integers, got {labels.ty.dtype}")
    if hidden != w_hidden or rows != label_rows:
        raise ValueError(f"{OP_NAME}: shapes x {x.ty.shape}, weight {weight.ty.shape}, labels {labels.ty.shape} "
                         "do not agree (x[N, H], weight[V, H], labels[N])")
    return rows, hidden, vocab, dtype


def _infer_forward(call, _builder):
    rows, _, _, dtype = _check_operands(call)
    return relax.TensorType([rows], dtype)


def _infer_grad(call, _builder):
    rows, hidden, vocab, dtype = _check_operands(call)
    return relax.TupleType([relax.TensorType([rows, hidden], dtype), relax.TensorType([vocab, hidden], dtype)])


def _logits(x: te.Tensor, weight: te.Tensor) -> te.Tensor:
    k = te.reduce_axis((0, x.shape[1]), name="k")
    return te.compute((x.shape[0], weight.shape[0]), lambda i, j: te.sum(x[i, k] * weight[j, k], axis=k),
                      name="logits")


def _forward_te(x, weight, labels):
    log_probs = topi.nn.log_softmax(_logits(x, weight))
    return te.compute((x.shape[0],), lambda i: log_probs[i, labels[i]], name="label_log_prob")


def _grad_te(x, weight, labels, out_grad):
    probs = topi.nn.softmax(_logits(x, weight))
    one, zero = tirx.const(1, x.dtype), tirx.const(0, x.dtype)
    logits_grad = te.compute(
        probs.shape,
        lambda i, j: out_grad[i] * (tirx.Select(labels[i] == j.astype(labels.dtype), one, zero) - probs[i, j]),
        name="logits_grad")
    v = te.reduce_axis((0, weight.shape[0]), name="v")
    x_grad = te.compute(x.shape, lambda i, c: te.sum(logits_grad[i, v] * weight[v, c], axis=v), name="x_grad")
    n = te.reduce_axis((0, x.shape[0]), name="n")
    weight_grad = te.compute(weight.shape, lambda j, c: te.sum(logits_grad[n, j] * x[n, c], axis=n),
                             name="weight_grad")
    return [x_grad, weight_grad]


def _legalize_forward(builder, call):
    return builder.call_te(_forward_te, *call.args, primfunc_name_hint="linear_log_prob")


def _legalize_grad(builder, call):
    return builder.call_te(_grad_te, *call.args, primfunc_name_hint="linear_log_prob_grad")


for _name, _infer, _legalize in ((OP_NAME, _infer_forward, _legalize_forward),
                                 (GRAD_OP_NAME, _infer_grad, _legalize_grad)):
    register_operator(_name, _infer, _legalize)
