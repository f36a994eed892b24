"""chunk_linear_log_prob: the head-and-cross-entropy operator and its gradient
(autodiff/linear_log_prob.py) as ordinary matmuls and row reductions over chunks of rows, so that at
most one chunk's logits and one chunk's logit gradient are alive at a time.

For rows [s, e) of x (labels y, the label log-probabilities' gradient g):
    logits = x[s:e] @ W^T                                  [rows, V]  (transposed_matmuls reads W as stored)
    lse    = max(logits) + log(sum(exp(logits - max)))     [rows, 1]  (log_softmax's arithmetic)
    out    = gather(logits, y) - lse                       [rows]
    d      = g[:, None] * ((arange(V) == y[:, None]) - exp(logits - lse))
    x_grad[s:e] = d @ W;  W_grad += d^T @ x[s:e]
(a 4-bit head: w4_ops's w4_matmul and w4_matmul_input_grad read W packed, and it has no gradient)
The chunks' outputs and x gradients are concatenated, the W gradients summed; DCE drops the
gradient nothing trains (a frozen tied embedding's).

When the gradient g does not depend on the forward's output (cross-entropy's does not: it is the
ignore mask over the count), forward and backward are computed together where the backward needs
them, each chunk's logits once, and what reads the forward's output (the loss's sum and division)
moves after it. Otherwise the backward computes each chunk's logits again.

Chunks hold about CHUNK_LOGITS_BYTES of logits, at least MIN_CHUNK_ROWS rows, and there are at most
MAX_CHUNKS of them (each is a few kernels to build). Each chunk's matmul reads, and the CPU schedule
packs, the whole weight for its rows: SmolLM's head (2 cores, AVX2) took 112 ms for 256 rows in two
chunks of 128, as much as unchunked, and 153 ms in four chunks of 64. Rows are padded to a multiple
of 8, the CPU schedule's register tile, and split evenly in multiples of it.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, topi
from tvm.relax import op as R

from ..autodiff.linear_log_prob import GRAD_OP_NAME, OP_NAME, w4_head
from ..frontend import w4_ops
from ..ir import Substitute, bindings_of, op_name, opaque_kernel, static_shape, step_pass, with_function

CHUNK_LOGITS_BYTES = 16 << 20
MIN_CHUNK_ROWS = 128
MAX_CHUNKS = 16
ROW_MULTIPLE = 8


# Several binding blocks (control flow) are left to the operators' legalization (unchunked, still exact).
@step_pass("ChunkLinearLogProb", single_block=True, drop_dead_code=True)
def chunk_linear_log_prob(func_name: str = "train_step"):
    def rewrite(mod, func):
        bindings = bindings_of(func)
        if not any(op_name(b.value) in (OP_NAME, GRAD_OP_NAME) for b in bindings):
            return None
        built = _Expansion(func, func_name, bindings).run()
        mod = with_function(mod, func_name, built[func_name])
        taken = {gv.name_hint for gv in mod.get_global_vars()}
        for gv, kernel in built.functions_items():  # the opaque joins
            if isinstance(kernel, tvm.tirx.PrimFunc):
                assert gv.name_hint not in taken, f"{gv.name_hint} is already a function of the module"
                mod[gv] = kernel
        return mod

    return rewrite


def chunk_bounds(rows: int, vocab: int, itemsize: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the chunks `rows` rows of `vocab` logits are computed in."""
    per_chunk = max(MIN_CHUNK_ROWS, CHUNK_LOGITS_BYTES // (vocab * itemsize), math.ceil(rows / MAX_CHUNKS))
    count = max(1, math.ceil(rows / per_chunk))
    per_chunk = min(rows, math.ceil(math.ceil(rows / count) / ROW_MULTIPLE) * ROW_MULTIPLE)
    return [(start, min(rows, start + per_chunk)) for start in range(0, rows, per_chunk)]


class _Expansion:
    def __init__(self, func, name, bindings):
        self.func, self.name, self.bindings = func, name, bindings
        self.value_of = {b.var: b.value for b in bindings}

    def _depends_on(self, expr, var) -> bool:
        """Whether `expr` reads `var`, directly or through the bindings."""
        seen, todo = set(), list(relax.analysis.free_vars(expr))
        while todo:
            v = todo.pop()
            if v.same_as(var):
                return True
            if v in seen or v not in self.value_of:
                continue
            seen.add(v)
            todo.extend(relax.analysis.free_vars(self.value_of[v]))
        return False

    def _merged_pairs(self) -> dict:
        """{gradient binding var: forward binding var} of the pair computed together: the step's one
        forward (with two heads, say two losses added, each is computed apart from its gradient,
        which keeps the reordering to one loss's tail) and its gradient, when the gradient does not
        read the forward's output."""
        forwards = [b for b in self.bindings if op_name(b.value) == OP_NAME]
        grads = [b for b in self.bindings if op_name(b.value) == GRAD_OP_NAME]
        if len(forwards) != 1 or len(grads) != 1:
            return {}
        forward, grad = forwards[0], grads[0]
        head_args = list(grad.value.args[:3]) + list(grad.value.args[4:])  # all but the output gradient
        same_operands = len(head_args) == len(forward.value.args) and all(
            a.same_as(c) for a, c in zip(forward.value.args, head_args))
        if not same_operands or self._depends_on(grad.value.args[3], forward.var):
            return {}
        return {grad.var: forward.var}

    def run(self):
        pairs = self._merged_pairs()
        merged_forwards = set(pairs.values())
        rename = {}
        # The merged forward's var -> the bindings that read it (transitively), in order: they are
        # emitted after the chunks, which are emitted where the gradient was.
        postponed, postponed_vars = {}, {}
        bb = relax.BlockBuilder()
        with bb.function(self.name, list(self.func.params), attrs=dict(self.func.attrs)):
            with bb.dataflow():
                for b in self.bindings:
                    value = Substitute(rename).visit_expr(b.value) if rename else b.value
                    name = op_name(value)
                    reads = [f for f, vs in postponed_vars.items()
                             if any(v in vs for v in relax.analysis.free_vars(value))]
                    if b.var in merged_forwards:
                        postponed[b.var], postponed_vars[b.var] = [], {b.var}
                    elif reads and b.var not in pairs:
                        postponed[reads[0]].append(b)  # emitted after the chunks that compute what it reads
                        postponed_vars[reads[0]].add(b.var)
                    elif name == OP_NAME:
                        rename[b.var] = self._chunks(bb, *value.args[:3], None, w4_head(value), want_forward=True)[0]
                    elif name == GRAD_OP_NAME:
                        forward, w4 = pairs.get(b.var), w4_head(value)
                        out, x_grad, w_grad = self._chunks(bb, *value.args[:4], w4, want_forward=forward is not None)
                        rename[b.var] = bb.emit(relax.Tuple([x_grad] if w4 else [x_grad, w_grad]))
                        if forward is not None:
                            rename[forward] = out
                            for later in postponed.pop(forward):
                                later_value = Substitute(rename).visit_expr(later.value)
                                bb.emit_normalized(relax.VarBinding(later.var, bb.normalize(later_value)))
                            del postponed_vars[forward]
                    elif rename:
                        bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(value)))
                    else:
                        bb.emit_normalized(b)
                outputs = Substitute(rename).visit_expr(self.func.body.body) if rename else self.func.body.body
            bb.emit_func_output(outputs)
        return bb.get()

    def _chunks(self, bb, x, weight, labels, out_grad, w4, want_forward: bool):
        """Emit the chunked computation: (out or None, x_grad or None, weight_grad or None). w4:
        (scales, zeros, group size) of a 4-bit head, read packed by w4_ops's matmuls (no weight
        gradient), else ()."""
        rows, hidden = static_shape(x)
        vocab = static_shape(weight)[0]
        dtype = str(x.ty.dtype)
        # Rows padded to the register tile: a causal shift leaves 255 or 127 rows, and a matmul over
        # a row count no tile divides is scheduled without tiles (0.8 s for SmolLM's 79-row chunk).
        # Padded rows have label 0 and gradient 0: they add nothing to W's gradient and are cut off.
        pad = -rows % ROW_MULTIPLE
        if pad:
            x, labels = (bb.emit(R.concat([t, R.zeros([pad, *static_shape(t)[1:]], str(t.ty.dtype))], 0))
                         for t in (x, labels))
            if out_grad is not None:
                out_grad = bb.emit(R.concat([out_grad, R.zeros([pad], str(out_grad.ty.dtype))], 0))
        padded = rows + pad
        bounds = chunk_bounds(padded, vocab, tvm.DataType(dtype).bits // 8)
        classes = None if out_grad is None else bb.emit(R.expand_dims(R.arange(0, vocab, 1, str(labels.ty.dtype)), [0]))
        weight_t = None if w4 else bb.emit(R.permute_dims(weight, [1, 0]))
        outs, x_grads, w_grad = [], [], None
        for start, stop in bounds:
            def rows_of(t, start=start, stop=stop):
                return t if (start, stop) == (0, padded) else bb.emit(R.strided_slice(t, [0], [start], [stop]))

            x_rows, label_rows = rows_of(x), bb.emit(R.expand_dims(rows_of(labels), [1]))
            logits = bb.emit(w4_ops.w4_matmul(x_rows, weight, *w4) if w4
                             else R.matmul(x_rows, weight_t, out_dtype=dtype))
            top = bb.emit(R.max(logits, [1], keepdims=True))
            lse = bb.emit(R.add(top, R.log(R.sum(R.exp(R.subtract(logits, top)), [1], keepdims=True))))
            if want_forward:
                picked = bb.emit(R.gather_elements(logits, label_rows, 1))
                outs.append(bb.emit(R.reshape(R.subtract(picked, lse), [stop - start])))
            if out_grad is None:
                continue
            one_hot = R.astype(R.equal(classes, label_rows), dtype)
            grad_rows = bb.emit(R.expand_dims(rows_of(out_grad), [1]))
            logits_grad = bb.emit(R.multiply(grad_rows, R.subtract(one_hot, R.exp(R.subtract(logits, lse)))))
            if w4:
                x_grads.append(bb.emit(w4_ops.w4_matmul_input_grad(logits_grad, weight, *w4, hidden)))
                continue
            x_grads.append(bb.emit(R.matmul(logits_grad, weight, out_dtype=dtype)))
            part = bb.emit(R.matmul(R.permute_dims(logits_grad, [1, 0]), x_rows, out_dtype=dtype))
            w_grad = part if w_grad is None else _opaque(bb, _add, w_grad, part)

        def joined(parts, opaque=False):
            whole = parts[0] if len(parts) == 1 else (_opaque(bb, _concat, *parts) if opaque
                                                      else bb.emit(R.concat(parts, 0)))
            return bb.emit(R.strided_slice(whole, [0], [0], [rows])) if pad else whole

        # The joins of values every chunk contributes to are opaque kernels: TVM's FuseOps would
        # fuse the chunks' last elementwise ops into one kernel with the join, and it emits each
        # kernel after everything it reads, so every chunk's logits would be computed (and alive)
        # before any chunk's gradient.
        return (joined(outs, opaque=True) if want_forward else None, joined(x_grads) if x_grads else None, w_grad)


def _add(a, b):
    return te.compute(a.shape, lambda *i: a(*i) + b(*i), name="accumulate")


def _concat(*parts):
    return topi.concatenate(parts, 0)


def _opaque(bb, compute, *args):
    """call_tir of `compute` on `args` in a kernel FuseOps fuses nothing into or out of."""
    placeholders = [te.placeholder(static_shape(a), str(a.ty.dtype), name=f"in{i}") for i, a in enumerate(args)]
    out = compute(*placeholders)
    name = f"{compute.__name__.strip('_')}_chunks"
    kernel = bb.add_func(opaque_kernel([*placeholders, out], name), name)
    return bb.emit(relax.call_tir(kernel, list(args), relax.TensorType(out.shape, out.dtype)))
