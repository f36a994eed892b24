"""Memory plan analysis: what the compiled training step holds, in bytes, by category and by layer.

Two views of the same step, because fusion renames the tensors:
  * the lowered function, after plan_arena, gives the real planned pool (the arena the VM allocates
    for intermediates) and the unplanned allocations (the step's outputs not written in place);
  * the Relax-level `train_step`, before fusion, says which forward tensors are still needed by the
    backward ("saved activations") and, through the frontend's origins, which layer produced them.

The persistent state (parameters, buffers, optimizer state) comes from the step signature.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
from tvm import relax

from ..autodiff.step import FROZEN, OPTIMIZER, PARAM, STEP_FUNC, StepSignature, backward_start
from ..ir import bindings_of, tensor_bytes, viewed
from .flops import call_flops, step_flops
from .memory_timeline import state_bytes


@dataclass
class LayerRow:
    layer: str
    trained: str  # "full", "frozen" or "partial"
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    saved_activation_bytes: int = 0
    forward_flops: int = 0
    backward_flops: int = 0


@dataclass
class MemoryReport:
    """Planned memory of one training step.

    `peak_bytes` = sum of `by_category`: the state the step reads, the new state it writes beside it
    (what is not updated in place), the arena planned for everything in between (activations,
    gradients), and the largest workspace one kernel allocates while it runs. The arena is allocated
    whole, so this bounds what the step holds; it is not a sampled measurement.
    """

    peak_bytes: int
    by_category: dict
    layers: list = field(default_factory=list)
    n_storages: int = 0
    saved_activation_bytes: int = 0
    gradient_bytes: int = 0
    flops: dict = field(default_factory=dict)  # {"forward": n, "backward": n} (conv/matmul)
    # label -> Timeline as JSON: this step, and (for sparse schemes) the same model fully updated
    timelines: dict = field(default_factory=dict)
    # the forward's prefix run patch by patch (pipeline.PatchChoice as JSON), when the build did
    patches: dict = field(default_factory=dict)

    def plot(self, path: str) -> str:
        """Draw the memory timelines (this step vs full update) to a PNG."""
        from .memory_timeline import Timeline, plot

        if not self.timelines:
            raise ValueError("this report has no timeline")
        return plot({k: Timeline.from_json(v) for k, v in self.timelines.items()}, path)

    def patches_summary(self) -> str:
        """The patched prefix in a line: where it ends, its grid, what its halos cost and what it saves."""
        p = self.patches
        return (f"patched prefix: up to {p['split']} on a {p['grid']}x{p['grid']} grid, "
                f"+{100 * p['overhead']:.1f}% of its convolution FLOPs; estimated step peak "
                f"{_fmt(p['peak_before'])} -> {_fmt(p['peak_after'])}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.layers]
        return d

    @classmethod
    def from_json(cls, d: dict) -> MemoryReport:
        d = dict(d)
        d["layers"] = [LayerRow(**r) for r in d.get("layers", [])]
        return cls(**d)

    def __str__(self) -> str:
        lines = [f"planned peak: {_fmt(self.peak_bytes)}  ({self.n_storages} planned storages)"]
        for cat, b in self.by_category.items():
            lines.append(f"  {cat:<18}{_fmt(b):>12}")
        lines.append(f"  (within the pool: gradients {_fmt(self.gradient_bytes)}, "
                     f"saved activations {_fmt(self.saved_activation_bytes)})")
        if self.patches:
            lines.append(self.patches_summary())
        if self.flops:
            lines.append(f"FLOPs per step: forward {self.flops['forward'] / 1e6:.1f} M, "
                         f"backward {self.flops['backward'] / 1e6:.1f} M (conv and matmul)")
        header = (f"{'layer':<32}{'trained':>8}{'params':>12}{'grads':>12}{'opt state':>12}{'saved act':>12}"
                  f"{'fwd MFLOP':>11}{'bwd MFLOP':>11}")
        lines += ["", header, "-" * len(header)]
        for r in self.layers:
            lines.append(f"{r.layer[:31]:<32}{r.trained:>8}{_fmt(r.param_bytes):>12}{_fmt(r.grad_bytes):>12}"
                         f"{_fmt(r.optimizer_bytes):>12}{_fmt(r.saved_activation_bytes):>12}"
                         f"{r.forward_flops / 1e6:>11.2f}{r.backward_flops / 1e6:>11.2f}")
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def planned_storage(lowered_func) -> tuple[int, int, int]:
    """(pool bytes, number of storages, unplanned tensor bytes) of a lowered function whose memory
    is planned (plan_arena, or TVM's StaticPlanBlockMemory)."""
    storage_op = tvm.ir.Op.get("relax.memory.alloc_storage")
    tensor_op = tvm.ir.Op.get("relax.builtin.alloc_tensor")
    pool = n = unplanned = 0

    def visit(e):
        nonlocal pool, n, unplanned
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.same_as(storage_op):
                pool += int(e.args[0].values[0])
                n += 1
            elif e.op.same_as(tensor_op):
                count = int(np.prod([int(d) for d in e.args[0].values], dtype=np.int64))
                unplanned += count * tvm.DataType(str(e.args[1].value)).bits // 8

    relax.analysis.post_order_visit(lowered_func.body, visit)
    return pool, n, unplanned


def saved_activations(step_func) -> dict:
    """Forward tensors of `train_step` that the backward reads: {binding Var: bytes}.

    Keyed by Var, not name: the optimizer's bindings may reuse the importer's names. Reshape-like
    views are not counted (they share their input's buffer).
    """
    bindings = bindings_of(step_func)
    start = backward_start(bindings)
    forward = {b.var: b for b in bindings[:start]}
    used_later = set()
    for b in bindings[start:]:
        used_later.update(v for v in relax.analysis.free_vars(b.value) if v in forward)
    saved = {}
    for var in used_later:
        value = forward[var].value
        if viewed(value) is not None:
            continue
        if isinstance(value, (relax.Var, relax.TupleGetItem, tvm.ir.expr.Constant)):
            continue
        saved[var] = tensor_bytes(var.ty)
    return saved


def layer_of(name: str) -> str:
    """'features.3.conv.1.weight' -> 'features.3.conv.1'."""
    return name.rsplit(".", 1)[0] if "." in name else "(model)"


def _module_of(origin: dict, name: str):
    """The module a forward binding came from; passes name what they split `<original>__<part>`."""
    where = origin.get(name) or origin.get(name.split("__")[0])
    return where.module_path if where is not None and where.module_path else None


def layer_flops(step_func, signature: StepSignature, origin: dict) -> dict:
    """{layer: (forward FLOPs, backward FLOPs)} of conv and matmul ops. A forward op belongs to the
    module it came from; a backward op to the layer whose parameter it reads (a data gradient), or
    whose parameter gradient it is (`<parameter>_adjoint`, a weight gradient)."""
    n_batch = len(signature.batch)
    # Parameter Var -> model parameter (a partially trained weight's parts, `<weight>__trained` and
    # `<weight>__frozen`, are parameters of their own and count for the weight).
    torch_name = {p.name: signature.owner(spec.name) for p, spec in zip(step_func.params[n_batch:], signature.state)}
    bindings = bindings_of(step_func)
    start = backward_start(bindings)
    value = {b.var: b.value for b in bindings}

    def parameter_of(var, depth=0):
        """The parameter a value is (or a view, transpose, cast or slice of)."""
        if var.name in torch_name:
            return torch_name[var.name]
        v = value.get(var)
        if isinstance(v, relax.Call) and v.args and isinstance(v.args[0], relax.Var):
            v = v.args[0]
        return parameter_of(v, depth + 1) if depth < 4 and isinstance(v, relax.Var) else None

    totals = defaultdict(lambda: [0, 0])
    for i, b in enumerate(bindings):
        flops = call_flops(b.value)
        if not flops:
            continue
        layer = None
        if i < start:
            layer = _module_of(origin, b.var.name)
        else:
            name = b.var.name.removesuffix("_adjoint")
            param = torch_name.get(name) if b.var.name.endswith("_adjoint") else None
            for arg in b.value.args:
                if param is None and isinstance(arg, relax.Var):
                    param = parameter_of(arg)
            layer = layer_of(param) if param else None
        totals[layer or "(model)"][0 if i < start else 1] += flops
    return {k: tuple(v) for k, v in totals.items()}


def kernel_workspace(lowered_mod, func_name: str) -> int:
    """The largest buffer set a kernel of the step allocates for itself while it runs (stages that
    could not be inlined, such as a convolution's padded input). Kernels run one at a time."""
    from ..passes.inline_elementwise import intermediate_bytes

    called = set()
    relax.analysis.post_order_visit(
        lowered_mod[func_name].body,
        lambda e: isinstance(e, relax.Call) and isinstance(e.op, relax.GlobalVar) and called.add(e.op.name_hint))
    return max((intermediate_bytes(f) for gv, f in lowered_mod.functions.items()
                if gv.name_hint in called and isinstance(f, tvm.tirx.PrimFunc)), default=0)


def memory_report(lowered_mod, step_func, signature: StepSignature, origin: dict, timelines=None,
                  patches: dict | None = None) -> MemoryReport:
    """lowered_mod: the module after the lowering passes; step_func: `train_step` before them;
    patches: the patched prefix's description, when the step has one."""
    pool, n_storages, unplanned = planned_storage(lowered_mod[STEP_FUNC])
    cats = signature.categories
    by_category = {
        **state_bytes(signature),
        "new_state": unplanned,
        "planned_pool": pool,
        "kernel_workspace": kernel_workspace(lowered_mod, STEP_FUNC),
    }
    rows: dict[str, LayerRow] = {}
    trained_flags = defaultdict(set)
    param_specs = {s.name: s for s in signature.state}
    for spec in signature.state:
        cat = cats[spec.name]
        if cat in (PARAM, FROZEN):
            owner = signature.owner(spec.name)  # a partially trained weight's parts count for it
            row = rows.setdefault(layer_of(owner), LayerRow(layer_of(owner), ""))
            row.param_bytes += spec.nbytes
            trained_flags[row.layer].add("partial" if owner in signature.partial else cat == PARAM)
            if cat == PARAM:
                row.grad_bytes += spec.nbytes
        elif cat == OPTIMIZER and spec.name.count(".") >= 2:
            pname = spec.name.split(".", 2)[2]
            if pname in param_specs:
                rows.setdefault(layer_of(pname), LayerRow(layer_of(pname), "")).optimizer_bytes += spec.nbytes
    saved = saved_activations(step_func)
    for var, nbytes in saved.items():
        layer = _module_of(origin, var.name) or "(model)"
        rows.setdefault(layer, LayerRow(layer, "")).saved_activation_bytes += nbytes
    for layer, (forward, backward) in layer_flops(step_func, signature, origin).items():
        row = rows.setdefault(layer, LayerRow(layer, ""))
        row.forward_flops, row.backward_flops = forward, backward
    for row in rows.values():
        flags = trained_flags.get(row.layer, set())
        row.trained = ("-" if not flags else "full" if flags == {True} else "frozen" if flags == {False}
                       else "partial")
    # Rows in forward order: by where each layer first appears in the imported graph.
    first_seen = {}
    for where in origin.values():
        first_seen.setdefault(where.module_path or "(model)", len(first_seen))
    ordered = sorted(rows.values(), key=lambda r: first_seen.get(r.layer, len(first_seen)))
    return MemoryReport(
        peak_bytes=sum(by_category.values()),
        by_category=by_category,
        layers=ordered,
        n_storages=n_storages,
        saved_activation_bytes=sum(saved.values()),
        gradient_bytes=sum(r.grad_bytes for r in rows.values()),
        flops=step_flops(step_func),
        timelines={k: t.to_json() for k, t in (timelines or {}).items()},
        patches=dict(patches or {}),
    )
