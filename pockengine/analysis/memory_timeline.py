"""Memory timeline of a training step (analysis): bytes alive after each operator, by category.

Liveness over the Relax-level `train_step`, before fusion: a tensor lives from the binding that
produces it to its last use. Categories:
    parameters, buffers, optimizer_state  the state the step reads (alive throughout)
    saved_activations  forward tensors the backward reads (kept across the forward/backward boundary)
    forward_workspace  forward tensors that die before the backward
    gradients          tensors of the backward (parameter and activation gradients)
    updates            the optimizer's new parameters and state (`update_*` bindings)
Fusion removes some elementwise intermediates, so absolute bytes run above TVM's static plan; the
timeline shows the shape: where the step peaks and what is alive there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ..autodiff.step import BUFFER, FROZEN, OPTIMIZER, PARAM, StepSignature, backward_start
from ..ir import bindings_of, op_name, same_tensor_type, tensor_bytes, viewed
from ..optim import UPDATE_PREFIX
from ..passes.patch_prefix import POINTWISE

STATE = ("parameters", "buffers", "optimizer_state")
TRANSIENT = ("saved_activations", "forward_workspace", "gradients", "updates")


@dataclass
class Timeline:
    ops: list = field(default_factory=list)  # operator name at each point
    bytes: dict = field(default_factory=dict)  # category -> [bytes alive after each operator]
    backward_start: int = 0

    def peak(self) -> tuple[int, int]:
        """(peak total bytes, operator index where it occurs)."""
        total = np.sum([self.bytes[c] for c in self.bytes], axis=0) if self.ops else np.zeros(1)
        i = int(np.argmax(total))
        return int(total[i]), i

    def to_json(self) -> dict:
        return {"ops": self.ops, "bytes": self.bytes, "backward_start": self.backward_start}

    @classmethod
    def from_json(cls, d: dict) -> Timeline:
        return cls(list(d["ops"]), {k: list(v) for k, v in d["bytes"].items()}, int(d["backward_start"]))


def timeline(step_func, signature: StepSignature, fused_elementwise: bool = False) -> Timeline:
    """fused_elementwise: an elementwise op whose operand of its size and type dies there writes over
    it, as the kernels of fused chains (convolution, BatchNorm, ReLU6) leave one tensor where the
    Relax step has several: closer to the planned arena where such chains make the peak."""
    bindings = bindings_of(step_func)
    n = len(bindings)
    start = backward_start(bindings)
    in_place = _dying_operands(bindings) if fused_elementwise else {}
    in_readers, in_updates = {}, set()  # values fusion never stores (see their functions)
    if fused_elementwise:
        readers = _readers(bindings)
        in_readers = _computed_in_readers(bindings, readers)
        updates = _in_place_updates(bindings, set(step_func.params))
        in_updates = updates | _feeding_updates(bindings, updates, readers)
    # A view (reshape, alias, tuple item) shares its source's buffer: uses of it keep the source alive.
    base = {}
    for b in bindings:
        src = in_place.get(b.var)
        if b.var in in_readers:
            src = in_readers[b.var]
        elif fused_elementwise and _fused_into_readers(b.value):
            src = b.value.args[0]
        if isinstance(src, relax.Var):
            base[b.var] = base.get(src, src)
    last_use = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            last_use[base.get(v, v)] = i
    for v in relax.analysis.free_vars(step_func.body.body):  # outputs live to the end
        last_use[base.get(v, v)] = n
    delta = {c: np.zeros(n + 1, dtype=np.int64) for c in TRANSIENT}
    ops = []
    for i, b in enumerate(bindings):
        value = b.value
        op = value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else type(value).__name__
        ops.append(op.replace("relax.", ""))
        if _is_view(value) or isinstance(value, relax.Tuple) or b.var in in_place or (
                fused_elementwise and _fused_into_readers(value)) or b.var in in_readers or b.var in in_updates:
            continue  # no new memory
        end = last_use.get(b.var, i)  # alive from its producer through its last consumer
        if b.var.name.startswith(UPDATE_PREFIX):
            cat = "updates"
        elif i >= start:
            cat = "gradients"
        elif end >= start:
            cat = "saved_activations"
        else:
            cat = "forward_workspace"
        size = tensor_bytes(b.var.ty)
        delta[cat][i] += size
        if end + 1 <= n:
            delta[cat][end + 1] -= size
    state = state_bytes(signature)
    alive = {c: [state[c]] * n for c in STATE}
    alive.update({c: np.cumsum(delta[c])[:n].tolist() for c in TRANSIENT})
    return Timeline(ops, alive, start)


def _dying_operands(bindings) -> dict:
    """{elementwise binding's Var: the operand it can write over} (one of its size and type, computed
    by the step, that no later binding reads)."""
    produced = {b.var for b in bindings}
    last_use = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            last_use[v] = i
    found = {}
    for i, b in enumerate(bindings):
        if not (isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op) and b.value.op.name in POINTWISE):
            continue
        for arg in b.value.args:
            if (isinstance(arg, relax.Var) and arg in produced and last_use.get(arg) == i
                    and same_tensor_type(arg.ty, b.var.ty)):
                found[b.var] = arg
                break
    return found


# Values fusion computes inside the kernels that read them, never as tensors of their own: a
# broadcast (of a per-channel gradient, a bias) and a tensor of zeros (the other branch of a where).
_FUSED_INTO_READERS = frozenset({"relax.broadcast_to", "relax.zeros_like", "relax.ones_like", "relax.full_like"})


def _fused_into_readers(value) -> bool:
    return (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in _FUSED_INTO_READERS
            and isinstance(value.args[0], relax.Var))


def _in_place_updates(bindings, params: set) -> set:
    """The optimizer's new values written over the state they replace (update_in_place does so
    where the update is elementwise, as SGD's and Adam's are)."""
    return {b.var for b in bindings
            if b.var.name.startswith(UPDATE_PREFIX) and isinstance(b.var.ty, relax.TensorType)
            and any(v in params and same_tensor_type(v.ty, b.var.ty) for v in relax.analysis.free_vars(b.value))}


def _readers(bindings) -> dict:
    """{var: the values of the bindings reading it}."""
    readers: dict = {}
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            readers.setdefault(v, []).append(b.value)
    return readers


def _feeding_updates(bindings, updates: set, readers: dict) -> set:
    """The tensors only an in-place update consumes, through a chain of elementwise ops each read
    once (a weight gradient, times the learning rate, subtracted from the weight, gated by the
    step's finiteness check): fusion computes that chain as the epilogue of the gradient's kernel,
    written over the weight, so none of them exists whole."""
    value_of = {b.var: b.value for b in bindings}
    found, stack = set(), list(updates)
    while stack:
        var = stack.pop()
        for v in relax.analysis.free_vars(value_of[var]):
            if v in value_of and v not in found and len(readers.get(v, ())) == 1 and not _is_view(value_of[v]):
                found.add(v)
                if op_name(value_of[v]) in _ELEMENTWISE:
                    stack.append(v)
    return found


# Elementwise ops fusion can compute inside an elementwise reader: the pointwise arithmetic, casts and
# the comparisons of masks.
_ELEMENTWISE = POINTWISE | {"relax.greater", "relax.greater_equal", "relax.less", "relax.less_equal", "relax.equal",
                            "relax.not_equal", "relax.logical_and", "relax.logical_or", "relax.logical_not"}


# Ops that move elements without computing: fused into an elementwise reader, they become its indexing
# (a patch's crop of the image read by the quantization of that patch).
_INJECTIVE = frozenset({"relax.strided_slice", "relax.permute_dims"})


def _computed_in_readers(bindings, readers: dict) -> dict:
    """{var: the one tensor it is computed from} for the values fusion computes inside the kernels
    reading them, never as tensors of their own: an elementwise or injective op of one tensor (and
    constants) that only elementwise ops read (an int8 activation cast to float and compared with the
    ReLU6 bounds inside the kernel making the backward's mask, narrow_quantized puts the casts there;
    a patch's crop of the input, quantized), and a transpose only matmuls read (transposed_matmuls
    makes them read the tensor as stored)."""
    found = {}
    for b in bindings:
        operands = relax.analysis.free_vars(b.value)
        read_by = [op_name(value) for value in readers.get(b.var, ())]
        if len(operands) != 1 or not read_by:
            continue
        op = op_name(b.value)
        if op in _ELEMENTWISE | _INJECTIVE and all(r in _ELEMENTWISE for r in read_by) \
                or op == "relax.permute_dims" and all(r == "relax.matmul" for r in read_by):
            found[b.var] = operands[0]
    return found


def _is_view(value) -> bool:
    if isinstance(value, (relax.Var, relax.TupleGetItem)):
        return True
    return viewed(value) is not None


def plot(timelines: dict, path: str, title: str = "training step memory") -> str:
    """Stacked areas of each timeline ({label: Timeline}), one panel each, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 3.2 * len(timelines)), squeeze=False)
    top = max(t.peak()[0] for t in timelines.values()) / 2**20 * 1.08
    for ax, (label, t) in zip(axes[:, 0], timelines.items()):
        x = np.arange(len(t.ops))
        layers = [np.asarray(t.bytes[c]) / 2**20 for c in STATE + TRANSIENT]
        ax.stackplot(x, *layers, labels=[c.replace("_", " ") for c in STATE + TRANSIENT], alpha=0.85)
        ax.axvline(t.backward_start, color="k", linestyle="--", linewidth=1)
        peak, at = t.peak()
        ax.set_title(f"{label}: peak {peak / 2**20:.1f} MiB at op {at} ({t.ops[at] if t.ops else ''})", fontsize=10)
        ax.set_ylabel("MiB alive")
        ax.set_ylim(0, top)
        ax.set_xlim(0, max(len(t.ops) - 1, 1))
    axes[-1, 0].set_xlabel("operator (Relax train_step, before fusion); dashed: backward starts")
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=4)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def state_bytes(signature: StepSignature) -> dict:
    """Bytes of the state the step reads: {"parameters", "buffers", "optimizer_state"}."""
    report_category = {PARAM: "parameters", FROZEN: "parameters", BUFFER: "buffers", OPTIMIZER: "optimizer_state"}
    totals = {"parameters": 0, "buffers": 0, "optimizer_state": 0}
    for spec in signature.state:
        totals[report_category[signature.categories[spec.name]]] += spec.nbytes
    return totals
