"""drop_saved_activations: keep what the backward needs of the forward, not every tensor it read.

The backward that autodiff derives reads forward tensors wherever a gradient rule names them, so a
training-mode BatchNorm keeps its centred input, its normalised input and its output, ReLU6 keeps its
input, and the next conv keeps ReLU6's output: four activation-sized tensors per conv block where
one suffices. Two rewrites, both exact (the backward computes the same values):

  * recompute: a saved tensor produced by cheap elementwise ops (BatchNorm's normalisation, ReLU6's
    output, ...) is recomputed inside the backward from the tensors it was computed from, when those
    are saved anyway or no larger. Fusion folds the recomputation into the backward kernels. A
    conv-BN-ReLU6 block then keeps only the conv's output. A constant tensor (`full`, `zeros_like`,
    ...) is filled again from its type, reading nothing.
  * masks forward: a backward value that depends on forward tensors only and is smaller than them,
    such as ReLU's `x > 0` (1 byte per element instead of 4), is computed in the forward right after
    its inputs exist, so the float activation dies at its last forward use. A bias-only layer after
    a ReLU then keeps the mask, not the activation. When the inputs stay saved for another reason
    (BatchNorm in training mode needs its input anyway) the mask is recomputed in the backward instead.

Decisions are greedy over the saved set, in forward order, by bytes: a tensor is recomputed when the
tensors its recomputation reads are already saved or add no more bytes than it (about 1/64 of slack
for per-channel statistics). The memory plan (`memory_plan.saved_activations`) shows the effect.
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from ..autodiff.step import RECOMPUTED_SUFFIX, backward_start
from ..ir import Substitute, bindings_of, op_name, opaque_kernel, step_pass, tensor_bytes, with_blocks, with_function

# Elementwise (and broadcasting) ops cheap enough to run twice; reshape-like views cost nothing.
RECOMPUTABLE = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.negative", "relax.clip",
    "relax.where", "relax.maximum", "relax.minimum", "relax.astype", "relax.rsqrt", "relax.sqrt",
    "relax.exp", "relax.sigmoid", "relax.tanh", "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh",
    "relax.nn.silu", "relax.square", "relax.power", "relax.abs",
    "relax.greater", "relax.greater_equal", "relax.less", "relax.less_equal", "relax.equal",
    "relax.not_equal", "relax.logical_and", "relax.logical_or", "relax.logical_not",
    "relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.broadcast_to",
}
# Constant tensors: recomputed from their shape alone. A `*_like` op reads its input only for the
# shape, so the recomputation is written without it (torch's safe softmax, for one, saved a zero
# tensor as large as the attention probabilities for a `where` in the backward).
FILLS = {"relax.full": None, "relax.zeros": 0, "relax.ones": 1,
         "relax.full_like": None, "relax.zeros_like": 0, "relax.ones_like": 1}
MAX_RECOMPUTE_OPS = 16  # per saved tensor: bounds the extra work


@step_pass("DropSavedActivations", single_block=True)
def drop_saved_activations(func_name: str = "train_step"):
    def rewrite(mod, func):
        builder = relax.BlockBuilder(with_function(mod, func_name, func))  # a copy: never mutate the input
        keepers = {}

        def keep(var):
            """call_tir of an opaque copy: fusion cannot move the mask's computation into the
            backward kernel that reads it, which would keep the float activation alive again."""
            key = (tuple(int(d) for d in var.ty.shape), str(var.ty.dtype))
            if key not in keepers:
                name = f"keep_for_backward_{len(keepers)}"
                keepers[key] = builder.add_func(_opaque_copy(*key, name), name)
            return relax.call_tir(keepers[key], [var], relax.TensorType(*key))

        new_bindings = _rewrite(bindings_of(func), set(func.params), relax.analysis.free_vars(func.body.body), keep)
        if new_bindings is None:
            return None
        mod = builder.get()  # the function, and the kernels `keep` added
        mod[func_name] = with_blocks(func, [relax.DataflowBlock(new_bindings)])
        return mod

    return rewrite


def _opaque_copy(shape, dtype, name):
    src = te.placeholder(shape, dtype, name="mask")
    dst = te.compute(shape, lambda *i: src(*i), name="kept")
    return opaque_kernel([src, dst], name)


def _inputs(value) -> list:
    return list(dict.fromkeys(relax.analysis.free_vars(value)))


def _fill(value, ty):
    """The constant tensor `value` (an op of FILLS) computes, from its type alone."""
    constant = FILLS[op_name(value)]
    fill = value.args[-1] if constant is None else relax.const(constant, str(ty.dtype))
    return relax.op.full(ty.shape, fill, str(ty.dtype))


def _is_mask(binding) -> bool:
    """Elementwise, and smaller than a float activation (a bool or integer mask)."""
    ty = binding.var.ty
    return (op_name(binding.value) in RECOMPUTABLE and isinstance(ty, relax.TensorType)
            and tvm.DataType(str(ty.dtype)).bits < 16)


class _Plan:
    def __init__(self, bindings, params, outputs):
        self.start = backward_start(bindings)
        self.params = params
        self.producer = {b.var: b for b in bindings[: self.start]}
        self.index = {b.var: i for i, b in enumerate(bindings)}
        # Masks the backward builds from forward values only (transitively): candidates to move.
        self.masks = []
        for b in bindings[self.start:]:
            ins = _inputs(b.value)
            if _is_mask(b) and ins and all(v in self.producer or v in params for v in ins) \
                    and any(v in self.producer for v in ins):
                self.masks.append(b)
                self.producer[b.var] = b
        mask_vars = {b.var for b in self.masks}
        self.backward = [b for b in bindings[self.start:] if b.var not in mask_vars]
        # Forward values the step returns (loss, new running statistics) live to the end anyway.
        self.pinned = {v for v in outputs if v in self.producer}
        for b in self.backward:
            if isinstance(b.value, relax.Tuple):
                self.pinned.update(v for v in _inputs(b.value) if v in self.producer)
        self.saved = {}
        for b in self.backward:
            for v in _inputs(b.value):
                if v in self.producer and v not in self.pinned:
                    self.saved[v] = tensor_bytes(v.ty)

    def recomputable(self, var) -> bool:
        b = self.producer.get(var)
        return b is not None and (op_name(b.value) in RECOMPUTABLE or op_name(b.value) in FILLS)

    def leaves(self, var):
        """Forward tensors that recomputing `var` reads, stopping at saved ones; None if too costly."""
        leaves, seen, count = set(), set(), 0

        def visit(v):
            nonlocal count
            if v in seen or v in self.params or v not in self.producer:
                return True
            seen.add(v)
            if not v.same_as(var) and (v in self.saved or v in self.pinned or not self.recomputable(v)):
                leaves.add(v)
                return True
            count += 1
            value = self.producer[v].value
            return count <= MAX_RECOMPUTE_OPS and (op_name(value) in FILLS or all(visit(u) for u in _inputs(value)))

        return leaves if visit(var) else None

    def decide(self) -> None:
        mask_vars = {b.var for b in self.masks}
        order = sorted(self.saved, key=lambda v: (v in mask_vars, self.index[v]))
        for var in order:
            if not self.recomputable(var):
                continue
            leaves = self.leaves(var)
            if leaves is None:
                continue
            extra = sum(tensor_bytes(v.ty) for v in leaves if v not in self.saved and v not in self.pinned)
            own = tensor_bytes(var.ty)
            # A mask goes back to the backward only for free; anything else when it is not a loss.
            if extra == 0 or (var not in mask_vars and extra <= own + own // 64):
                del self.saved[var]
                for v in leaves:
                    if v not in self.pinned:
                        self.saved.setdefault(v, tensor_bytes(v.ty))


def _rewrite(bindings, params, outputs, opaque_copy):
    plan = _Plan(bindings, params, set(outputs))
    if not plan.saved:
        return None
    plan.decide()
    # Masks kept in the forward, with the masks they are built from.
    keep = set()
    for b in reversed(plan.masks):
        if b.var in plan.saved or b.var in keep:
            keep.add(b.var)
            keep.update(v for v in _inputs(b.value) if v in plan.producer and plan.index[v] >= plan.start)
    forward_masks = [b for b in plan.masks if b.var in keep]
    for b in plan.masks:  # the others stay where autodiff put them, in the backward
        if b.var not in keep:
            del plan.producer[b.var]
    moved = {b.var for b in forward_masks}
    # Forward: the original bindings, each kept mask right after the last forward value it reads.
    followers = {}
    for b in forward_masks:
        anchor = max((v for v in _inputs(b.value) if v in plan.producer), key=lambda v: plan.index[v])
        followers.setdefault(anchor, []).append(b)
    out = []
    kept = {}  # mask read by the backward -> its opaque copy

    def emit_forward(b):
        out.append(b)
        if b.var in moved and b.var in plan.saved:
            kept[b.var] = relax.DataflowVar(b.var.name + "_kept", b.var.ty)
            out.append(relax.VarBinding(kept[b.var], opaque_copy(b.var)))
        for follower in followers.pop(b.var, []):
            emit_forward(follower)

    for b in bindings[: plan.start]:
        emit_forward(b)
    # Backward: every forward value no longer saved is recomputed right before its first use.
    recomputed = {}

    def materialize(var):
        if var in kept:
            return kept[var]
        if var in recomputed:
            return recomputed[var]
        if var in plan.saved or var in plan.pinned or not plan.recomputable(var):
            return var
        b = plan.producer[var]
        new_var = relax.DataflowVar(var.name + RECOMPUTED_SUFFIX, var.ty)
        if op_name(b.value) in FILLS:
            out.append(relax.VarBinding(new_var, _fill(b.value, var.ty)))
        else:
            mapping = {v: materialize(v) for v in _inputs(b.value) if v in plan.producer}
            out.append(relax.VarBinding(new_var, Substitute(mapping).visit_expr(b.value)))
        recomputed[var] = new_var
        return new_var

    for b in bindings[plan.start:]:
        if b.var in moved:
            continue
        mapping = {v: materialize(v) for v in _inputs(b.value) if v in plan.producer}
        mapping = {k: v for k, v in mapping.items() if not k.same_as(v)}
        out.append(relax.VarBinding(b.var, Substitute(mapping).visit_expr(b.value)) if mapping else b)
    return out
