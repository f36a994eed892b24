"""The check that every kernel of a CUDA build runs on the GPU: TVM 0.27 compiles a kernel without
a blockIdx/threadIdx binding for the host CPU of a CUDA target, without a word."""

from __future__ import annotations

from ...errors import TargetError

# A compute statement runs on the GPU only under one of these bindings (a vthread alone is
# unrolled into serial code, it launches nothing).
GPU_THREAD_TAGS = ("blockIdx.", "threadIdx.")


def _scan(stmt, bound: bool, found: list, tags: set) -> None:
    """Append to `found` each store/call not under a GPU thread binding; collect the bound tags."""
    import tvm
    from tvm import s_tir, tirx

    if stmt is None:
        return
    if isinstance(stmt, tirx.For):
        tag = str(stmt.thread_binding.thread_tag) if stmt.thread_binding is not None else ""
        gpu = stmt.kind == tirx.ForKind.THREAD_BINDING and tag.startswith(GPU_THREAD_TAGS)
        if gpu:
            tags.add(tag)
        _scan(stmt.body, bound or gpu, found, tags)
    elif isinstance(stmt, tirx.AttrStmt):
        # What T.launch_thread (TOPI's GPU legalizations) writes: attr [IterVar(blockIdx.x)] "thread_extent".
        tag = str(getattr(stmt.node, "thread_tag", "") or "")
        gpu = stmt.attr_key == "thread_extent" and tag.startswith(GPU_THREAD_TAGS)
        if gpu:
            tags.add(tag)
        _scan(stmt.body, bound or gpu, found, tags)
    elif isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            _scan(s, bound, found, tags)
    elif isinstance(stmt, s_tir.SBlockRealize):
        _scan(stmt.block, bound, found, tags)
    elif isinstance(stmt, s_tir.SBlock):
        _scan(stmt.init, bound, found, tags)
        _scan(stmt.body, bound, found, tags)
    elif isinstance(stmt, tirx.IfThenElse):
        _scan(stmt.then_case, bound, found, tags)
        _scan(stmt.else_case, bound, found, tags)
    elif isinstance(stmt, tirx.BufferStore):
        if not bound:
            found.append(f"store to {stmt.buffer.name}")
    elif isinstance(stmt, tirx.Evaluate):
        if not bound and isinstance(stmt.value, tvm.ir.Call):
            found.append(f"call {stmt.value.op}")
    else:
        # Statements that only wrap a body (While, DeclBuffer, AllocBuffer, Bind, AssertStmt, ...).
        for field in ("body", "block", "then_case", "else_case", "seq"):
            child = getattr(stmt, field, None)
            if isinstance(child, tvm.tirx.Stmt):
                _scan(child, bound, found, tags)
            elif child is not None and not isinstance(child, (str, bytes)) and hasattr(child, "__iter__"):
                for s in child:
                    _scan(s, bound, found, tags)


def unbound_compute(func) -> tuple[list, set]:
    """(what `func` computes outside any GPU thread binding, the GPU thread tags it binds)."""
    found, tags = [], set()
    _scan(func.body, False, found, tags)
    return found, tags


def host_kernels(mod) -> dict:
    """{kernel name: what it computes outside any GPU thread binding} for the PrimFuncs that would
    (partly) run on the host CPU."""
    import tvm

    left = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            found, _ = unbound_compute(func)
            if found:
                left[gv.name_hint] = found
    return left


def gpu_kernels_check(mod, report=None) -> list[str]:
    """The names of the module's GPU kernels; TargetError naming every kernel that does compute
    outside blockIdx/threadIdx (TVM would compile it for the host CPU without a word). `report`: the
    schedules.ScheduleReport of the build, whose dlight errors the message quotes."""
    import tvm

    left = host_kernels(mod)
    if left:
        lines = []
        for name, what in sorted(left.items()):
            line = f"  {name}: {', '.join(sorted(set(what))[:3])}"
            if report is not None and report.rule_errors.get(name):
                line += f" (dlight: {'; '.join(report.rule_errors[name])})"
            lines.append(line)
        error = TargetError(f"{len(left)} kernel(s) are not bound to GPU threads and would run on the host CPU:\n"
                            + "\n".join(lines) + "\nGive them a GPU schedule (a tuning record or a dlight rule).")
        error.host_kernels = sorted(left)
        raise error
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
