"""inline_elementwise: compute each fused kernel's elementwise stages inside the stage that uses them.

FuseTIR turns a fused group into one PrimFunc whose stages still write whole intermediate buffers:
BatchNorm's apply (`x - mean`, `* rstd`, `* gamma`, `+ beta`, `clip`) becomes five loop nests over
four activation-sized buffers that the kernel allocates every time it runs. Those buffers are real
memory the step's plan cannot see, and five passes over memory where one suffices. This pass inlines
every stage that can be (TVM's `compute_inline`, then `reverse_compute_inline`, as dlight's default
GPU schedule does), so such a kernel is one loop nest; a reduction absorbs its elementwise prologue
(the variance's `(x - mean)^2` is summed without being stored).

Kernels are otherwise left as they are (tuning is another matter); a kernel that cannot be
analysed is kept unchanged.
"""

from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.s_tir import dlight


def inline_elementwise() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="InlineElementwise")
    def transform(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and intermediate_bytes(func):
                inlined = _inline(func)
                if inlined is not None:
                    updates[gv] = inlined
        if not updates:
            return mod
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return transform


def intermediate_bytes(func) -> int:
    """Bytes of the buffers a kernel allocates for itself (its stages' intermediates)."""
    try:
        sch = s_tir.Schedule(func)
        root = sch.get(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - not a block-structured kernel
        return 0
    total = 0
    for buf in root.alloc_buffers:
        try:
            n = 1
            for d in buf.shape:
                n *= int(d)
        except TypeError:
            continue
        total += n * tvm.DataType(str(buf.dtype)).bits // 8
    return total


def _inline(func):
    try:
        sch = s_tir.Schedule(func)
        blocks = dlight.normalize_prim_func(sch)
        if blocks is None:
            return None
        dlight.try_inline(sch, blocks)
        return sch.mod["main"].with_attrs(func.attrs) if func.attrs is not None else sch.mod["main"]
    except Exception:  # noqa: BLE001 - keep the kernel as FuseTIR wrote it
        return None
