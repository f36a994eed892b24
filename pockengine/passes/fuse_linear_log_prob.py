"""fuse_linear_log_prob: a language model's head and its cross-entropy become one operator, before
autodiff, so that the logits, their log-softmax and their gradient never exist whole.

Cross-entropy, as torch's decomposition imports it, reads each row's label out of a log-softmax:
    logits = matmul(h[..., H], permute_dims(W[V, H]))        an nn.Linear without bias (LM heads)
             (or w4_matmul(h, packed W, scales, zeros): a 4-bit head, pockengine/awq.py's W4Linear)
    rows   = reshape / strided_slice of logits on axes other than the last (the causal shift `[:, :-1]`)
    y      = gather_elements(log_softmax(rows[N, V], axis=-1), labels[N, 1], axis=1)
becomes
    y = reshape(linear_log_prob(rows of h [N, H], W, reshape(labels, [N])), [N, 1])
(autodiff/linear_log_prob.py; the same reshapes and slices applied to h pick the same rows). What
follows the gather (ignore_index's mask, the sum, the division by the count, class weights) is
left as it was, so the loss keeps PyTorch's arithmetic. passes/chunk_linear_log_prob.py computes
the operator and its gradient in chunks of rows after autodiff.

Only heads over at least MIN_CLASSES classes are rewritten (a vocabulary, not a classifier, whose
logits are small), and only when the logits and their log-softmax have no other use: otherwise
they would be computed anyway.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R

from ..autodiff.linear_log_prob import FLOAT_DTYPES, linear_log_prob
from ..frontend import w4_ops
from ..ir import bindings_of, op_name, static_shape, step_pass

MIN_CLASSES = 2048


@step_pass("FuseLinearLogProb", single_block=True, drop_dead_code=True)  # the logits and their log-softmax
def fuse_linear_log_prob(func_name: str, min_classes: int | None = None):
    """min_classes: MIN_CLASSES when None (read when the pass runs)."""

    def rewrite(_mod, func):
        bindings = bindings_of(func)
        matches = _matches(bindings, func.body.body, MIN_CLASSES if min_classes is None else min_classes)
        return _rewrite(func, func_name, bindings, matches) if matches else None

    return rewrite


def _uses(bindings, output) -> dict:
    counts = {}
    for value in [b.value for b in bindings] + [output]:
        for var in relax.analysis.free_vars(value):
            counts[var] = counts.get(var, 0) + 1
    return counts


def _single_use_value(var, value_of, uses):
    """The value bound to `var` if `var` is a binding used exactly once, else None."""
    return value_of.get(var) if isinstance(var, relax.DataflowVar) and uses.get(var) == 1 else None


def _row_view(value, vocab: int) -> bool:
    """A reshape or slice that leaves the last axis (the `vocab` classes) as it is."""
    name = op_name(value)
    if name == "relax.reshape":
        return static_shape(value.args[0])[-1] == vocab and static_shape(value)[-1] == vocab
    if name == "relax.strided_slice":
        ndim = len(static_shape(value.args[0]))
        return all(int(a) % ndim != ndim - 1 for a in value.args[1].fields)
    return False


def _matches(bindings, output, min_classes: int) -> dict:
    """{gather binding var: (views from the matmul outwards, h, W, w4, labels)}."""
    value_of = {b.var: b.value for b in bindings}
    uses = _uses(bindings, output)
    found = {}
    for b in bindings:
        gather = b.value
        if op_name(gather) != "relax.gather_elements" or int(gather.attrs.axis) not in (1, -1):
            continue
        log_softmax = _single_use_value(gather.args[0], value_of, uses)
        if op_name(log_softmax) != "relax.nn.log_softmax" or int(log_softmax.attrs.axis) not in (1, -1):
            continue
        rows, labels = log_softmax.args[0], gather.args[1]
        if len(static_shape(rows)) != 2 or static_shape(labels) != [static_shape(rows)[0], 1]:
            continue
        vocab = static_shape(rows)[1]
        views, value = [], _single_use_value(rows, value_of, uses)
        while value is not None and _row_view(value, vocab):
            views.append(value)
            value = _single_use_value(value.args[0], value_of, uses)
        head = _head(value, value_of)
        if head is None:
            continue
        h, weight, w4 = head
        if static_shape(weight)[0] != vocab or vocab < min_classes or len(static_shape(h)) < 2:
            continue
        dtype = str(value.ty.dtype)
        if dtype not in FLOAT_DTYPES or str(h.ty.dtype) != dtype or (not w4 and str(weight.ty.dtype) != dtype):
            continue
        found[b.var] = (views[::-1], h, weight, w4, labels)
    return found


def _head(logits, value_of):
    """(h, weight, w4) of a bias-free head's logits: matmul(h, permute_dims(W)), or a 4-bit head's
    w4_matmul(h, packed, scales, zeros) (W = packed, w4 = (scales, zeros, group size)); else None."""
    if op_name(logits) == w4_ops.MATMUL:
        h, packed, scales, zeros, _ = logits.args
        return h, packed, (scales, zeros, w4_ops.group_size_of(logits))
    if op_name(logits) != "relax.matmul":
        return None
    h, transposed = logits.args
    weight_t = value_of.get(transposed)
    if op_name(weight_t) != "relax.permute_dims":
        return None
    weight = weight_t.args[0]
    if len(static_shape(weight)) != 2 or [int(a) for a in weight_t.attrs.axes or [1, 0]] != [1, 0]:
        return None
    return h, weight, ()


def _rewrite(func, name, bindings, matches):
    bb = relax.BlockBuilder()
    with bb.function(name, list(func.params), attrs=dict(func.attrs)):
        with bb.dataflow():
            for b in bindings:
                if b.var not in matches:
                    bb.emit_normalized(b)
                    continue
                views, h, weight, w4, labels = matches[b.var]
                hidden = static_shape(h)[-1]
                for view in views:  # the logits' row selection, applied to the head's input
                    if op_name(view) == "relax.reshape":
                        h = bb.emit(R.reshape(h, static_shape(view)[:-1] + [hidden]))
                    else:
                        h = bb.emit(relax.Call(view.op, [h] + list(view.args[1:]), view.attrs))
                rows = static_shape(labels)[0]
                if len(static_shape(h)) != 2:
                    h = bb.emit(R.reshape(h, [rows, hidden]))
                flat_labels = bb.emit(R.reshape(labels, [rows]))
                log_prob = bb.emit(linear_log_prob(h, weight, flat_labels, w4))
                bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(R.reshape(log_prob, [rows, 1]))))
        bb.emit_func_output(func.body.body)
    return bb.get()[name]
