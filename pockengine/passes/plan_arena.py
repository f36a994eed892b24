"""plan_arena: lay every intermediate tensor of the step out in ONE arena, by liveness.

Replaces TVM's StaticPlanBlockMemory for the training step. TVM reuses a storage only for a tensor
of the same dtype that fits it whole, so a training step, where float activations, bool masks and
int64 indices of many sizes come and go, ends up with hundreds of storages whose sum is far above
what is alive at any moment (MobileNetV2 bias-only at 128x128: 47 MiB planned for 28 MiB alive).

Here each tensor the step allocates (`R.builtin.alloc_tensor`, after CallTIRRewrite) gets a byte
offset in a single `uint8` storage: it lives from its allocation to its last use (uses through
reshape views and aliases included), and tensors whose lifetimes overlap never overlap in memory.
Offsets are assigned greedily, each tensor at the lowest offset that fits, in two orders (largest
first, the "greedy by size" planner of TFLite Micro, and longest-lived first), keeping the smaller.
The arena is what the Cortex-M driver will allocate statically. Tensors the step returns keep their
own allocation: the caller owns them.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..ir import bindings_of, same_tensor_type, step_pass, viewed, with_blocks
from .update_in_place import elementwise_in_place

ALIGNMENT = 64  # bytes: cache line, and what TVM's own allocator aligns to


@step_pass("PlanArena")
def plan_arena(func_name: str = "train_step"):
    return _plan


def _alloc_op():
    return tvm.ir.Op.get("relax.builtin.alloc_tensor")


def lifetimes(bindings, outputs) -> tuple[dict, dict, set, dict, dict]:
    """({alloc var: (first, last binding index)}, {alloc var: bytes}, allocs that escape,
    {alloc var: index of the first binding that uses it (the kernel that writes it)},
    {var: the alloc var whose memory it is (itself, an alias or a view)}).

    A tensor escapes when the function returns it (possibly through a tuple or a view)."""
    alloc_op = _alloc_op()
    base, size, first, last, first_use = {}, {}, {}, {}, {}
    fields = {}  # tuple var -> its field vars
    for i, b in enumerate(bindings):
        v = b.value
        if isinstance(v, relax.Call) and v.op.same_as(alloc_op):
            count = int(np.prod([int(d) for d in v.args[0].values], dtype=np.int64))
            size[b.var] = count * tvm.DataType(str(v.args[1].value)).bits // 8
            base[b.var] = b.var
            first[b.var] = last[b.var] = i
            continue
        for u in relax.analysis.free_vars(v):
            for a in _allocs_of(u, base, fields):
                last[a] = i
                first_use.setdefault(a, i)
        if isinstance(v, relax.Tuple):  # a kernel's outputs grouped (FuseOps' multi-output functions)
            fields[b.var] = [f if isinstance(f, relax.Var) else None for f in v.fields]
            continue
        src = v if isinstance(v, relax.Var) else viewed(v)
        if isinstance(v, relax.TupleGetItem) and v.tuple_value in fields:
            src = fields[v.tuple_value][v.index]
        if isinstance(src, relax.Var) and src in fields:
            fields[b.var] = fields[src]
        elif isinstance(src, relax.Var) and src in base:
            base[b.var] = base[src]
    # What the function returns, followed through tuples and aliases.
    value_of = {b.var: b.value for b in bindings}
    escapes, stack = set(), list(relax.analysis.free_vars(outputs))
    seen = set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        escapes.update(_allocs_of(u, base, fields))
        if u in value_of and isinstance(value_of[u], (relax.Tuple, relax.Var, relax.TupleGetItem)) \
                or u in value_of and viewed(value_of[u]) is not None:
            stack.extend(relax.analysis.free_vars(value_of[u]))
    intervals = {a: (first[a], last[a]) for a in size}
    return intervals, size, escapes, first_use, base


def shared_in_place(mod, bindings, intervals: dict, first_use: dict, base: dict) -> dict:
    """{output tensor: input tensor whose memory it takes over}: an elementwise kernel (BatchNorm's
    apply, an activation, a gradient's mask) may write its output over an input that dies at that
    kernel, as TFLite's planner does for elementwise ops. Checked on the kernel's TIR."""
    shared = {}
    for k, b in enumerate(bindings):
        value = b.value
        if not (isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar)):
            continue
        callee = mod[value.op]
        if not isinstance(callee, tvm.tirx.PrimFunc):
            continue
        # Each argument as the allocation it is, when it is that allocation whole (not a view).
        args = [base.get(a) if isinstance(a, relax.Var) and a in base and same_tensor_type(a.ty, base[a].ty) else None
                for a in value.args]
        written = [i for i, a in enumerate(args) if a in intervals and first_use.get(a) == k]
        taken = set()
        for w in written:
            for r, a in enumerate(args):
                if (r not in written and a in intervals and a not in taken and intervals[a][1] == k
                        and same_tensor_type(a.ty, args[w].ty) and elementwise_in_place(callee, r, w)):
                    shared[args[w]] = a
                    taken.add(a)
                    break
    return shared


def _allocs_of(var, base: dict, fields: dict) -> list:
    """The allocations a value's memory is: its own (through aliases and views), or its fields'."""
    if var in base:
        return [base[var]]
    return [a for f in fields.get(var, []) if f is not None for a in _allocs_of(f, base, fields)]


# The orders tensors are placed in, each first-fit: largest first (TFLite Micro's "greedy by size"),
# and longest-lived first (long-lived tensors at the bottom leave the short ones one region to share:
# MobileNetV2-0.35 int8 at 128x128, 84.8 -> 79.2 KiB, where 78.9 are alive at once). The arena is the
# smaller of the two plans.
PLACEMENT_ORDERS = (
    lambda intervals, size: sorted(size, key=lambda t: (-size[t], intervals[t][0])),
    lambda intervals, size: sorted(size, key=lambda t: (intervals[t][0] - intervals[t][1], -size[t], intervals[t][0])),
)


def assign_offsets(intervals: dict, size: dict) -> tuple[dict, int]:
    """{tensor: byte offset}, arena bytes: the smaller of the first-fit plans of PLACEMENT_ORDERS."""
    return min((first_fit(order(intervals, size), intervals, size) for order in PLACEMENT_ORDERS),
               key=lambda plan: plan[1])


def first_fit(order: list, intervals: dict, size: dict) -> tuple[dict, int]:
    """Each tensor in `order` at the lowest aligned offset free for its whole lifetime."""
    placed = []  # (start, end, offset, offset + size)
    offsets = {}
    for t in order:
        start, end = intervals[t]
        busy = sorted((lo, hi) for s, e, lo, hi in placed if s <= end and start <= e)
        offset = 0
        for lo, hi in busy:
            if offset + size[t] <= lo:
                break
            offset = max(offset, -(-hi // ALIGNMENT) * ALIGNMENT)
        offsets[t] = offset
        placed.append((start, end, offset, offset + size[t]))
    total = max((hi for *_, hi in placed), default=0)
    return offsets, total


def _plan(mod, func):
    bindings = bindings_of(func)
    intervals, size, escapes, first_use, base = lifetimes(bindings, func.body.body)
    planned = {t: s for t, s in size.items() if t not in escapes}
    if not planned:
        return None
    intervals = {t: intervals[t] for t in planned}
    # An output written over a dying input is one tensor with the two lifetimes joined.
    owner = {}
    for out, src in shared_in_place(mod, bindings, intervals, first_use, base).items():
        root = owner.get(src, src)
        owner[out] = root
        intervals[root] = (min(intervals[root][0], intervals[out][0]), max(intervals[root][1], intervals[out][1]))
    roots = {t: s for t, s in planned.items() if t not in owner}
    offsets, total = assign_offsets({t: intervals[t] for t in roots}, roots)
    offsets.update({t: offsets[root] for t, root in owner.items()})
    arena = relax.Var("arena", relax.ObjectType())
    arena_binding = relax.VarBinding(arena, relax.op.memory.alloc_storage(
        relax.ShapeExpr([total]), 0, "global", "uint8"))
    new_blocks = []
    for k, block in enumerate(func.body.blocks):
        new = [arena_binding] if k == 0 else []
        for b in block.bindings:
            if b.var in offsets:
                shape, dtype = b.value.args[0], b.value.args[1]
                view = relax.op.memory.alloc_tensor(arena, offsets[b.var], shape, dtype)
                if offsets[b.var]:
                    # Kernels are compiled for byte_offset == 0: on the CPU this moves the data
                    # pointer instead (no copy).
                    at_offset = relax.Var(b.var.name + "_at_offset", b.var.ty)
                    new.append(relax.VarBinding(at_offset, view))
                    view = relax.op.memory.ensure_zero_offset(at_offset)
                new.append(relax.VarBinding(b.var, view))
            else:
                new.append(b)
        new_blocks.append(type(block)(new))
    return with_blocks(func, new_blocks)
