"""reorder_updates: update each parameter as soon as its gradient is complete (PockEngine's reordering).

Autodiff emits the whole backward first and the optimizer after it, so every parameter gradient (and,
for a bias, the activation gradient its reduction reads) stays alive until the end of the step. This
pass schedules the backward again: the bindings that only feed the optimizer's outputs — weight
gradients, bias reductions (`collapse_sum`), the optimizer's arithmetic — run as soon as their
inputs exist, so each gradient buffer dies at its update instead of at the end of the step.

Optimizer bindings that read no gradient (`momentum * 0.9`, `astype(lr)`) are not pulled forward:
they run right before the first binding that needs them, so they do not live longer either.
Any topological order of a dataflow block computes the same values; only lifetimes change.
"""

from __future__ import annotations

from tvm import relax

from ..autodiff.step import backward_start
from ..ir import bindings_of, same_tensor_type, step_pass, with_blocks


@step_pass("ReorderUpdates", single_block=True)
def reorder_updates(func_name: str = "train_step"):
    def rewrite(_mod, func):
        block = relax.DataflowBlock(schedule(bindings_of(func), {p.name for p in func.params}))
        return with_blocks(func, [block])

    return rewrite


def update_side(bindings, start: int, param_names: set) -> set:
    """Indices of backward bindings that serve one parameter's update only: its gradient, what only
    that gradient reads (a bias's reduction, a weight gradient's input), and the optimizer's
    arithmetic after it. An activation gradient feeds the gradients of every earlier parameter and
    is not among them.

    Relax's Gradient names a parameter's gradient `<parameter>_adjoint`.
    """
    consumers = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            consumers.setdefault(v, []).append(i)
    bit = {}
    for i in range(start, len(bindings)):
        name = bindings[i].var.name
        if name.endswith("_adjoint") and name[: -len("_adjoint")] in param_names:
            bit[i] = 1 << len(bit)
    # reach[i]: the parameter gradients binding i contributes to (as a bitset).
    reach = [0] * len(bindings)
    for i in range(len(bindings) - 1, start - 1, -1):
        r = bit.get(i, 0)
        if not r:
            for u in consumers.get(bindings[i].var, []):
                r |= reach[u]
        reach[i] = r
    tuple_outputs = {i for i, b in enumerate(bindings) if isinstance(b.value, relax.Tuple)}
    return {i for i in range(start, len(bindings))
            if i not in tuple_outputs and (reach[i] == 0 or reach[i] & (reach[i] - 1) == 0)}


def schedule(bindings, param_names: set, in_place_order: bool = True) -> list:
    start = backward_start(bindings)
    side = update_side(bindings, start, param_names)
    index = {b.var: i for i, b in enumerate(bindings)}
    inputs = [list(dict.fromkeys(v for v in relax.analysis.free_vars(b.value) if v in index)) for b in bindings]
    # Lazy: update-side bindings that read no backward value (only state and forward values).
    lazy = set()
    for i in range(start, len(bindings)):
        if i in side and all(index[v] < start or index[v] in lazy for v in inputs[i]):
            lazy.add(i)
    eager = side - lazy
    waiting_on = {}
    missing = {}
    # The binding that produces a new weight (or optimizer state) from the old one also waits for
    # every other backward reader of the old one, so the new value can be written in place.
    returned = set()
    for b in bindings:
        if isinstance(b.value, relax.Tuple):
            returned.update(f for f in b.value.fields if isinstance(f, relax.Var))
    state_readers = {}
    for i in range(start, len(bindings)):
        if i not in lazy:
            for v in relax.analysis.free_vars(bindings[i].value):
                if v not in index:
                    state_readers.setdefault(v, set()).add(i)
    for i in eager:
        deps = {index[v] for v in inputs[i] if index[v] >= start and index[v] not in lazy}
        if in_place_order and bindings[i].var in returned:
            for v in relax.analysis.free_vars(bindings[i].value):
                if v not in index and same_tensor_type(v.ty, bindings[i].var.ty):
                    deps |= state_readers.get(v, set()) - {i}
        missing[i] = len(deps)
        for d in deps:
            waiting_on.setdefault(d, []).append(i)

    order = list(bindings[:start])
    done = set(range(start))
    ready = []

    def emit(i):
        if i in done:
            return
        for v in inputs[i]:
            if index[v] in lazy:
                emit(index[v])
        done.add(i)
        order.append(bindings[i])
        unblocked = []
        for j in waiting_on.get(i, []):
            missing[j] -= 1
            if missing[j] == 0:
                unblocked.append(j)
        ready.extend(sorted(unblocked, reverse=True))

    def drain():
        # Last ready first: a gradient's whole update chain runs before anything else, so the
        # gradient dies at once.
        while ready:
            emit(ready.pop())

    for i in range(start, len(bindings)):
        if i in side:
            continue
        emit(i)
        drain()
    if len(order) < len(bindings):
        # Waiting for the old value's readers formed a cycle (an update that reads another state's
        # old value): schedule without that wish; update_in_place then keeps those copies.
        assert in_place_order, "reorder_updates lost bindings"
        return schedule(bindings, param_names, in_place_order=False)
    return order
