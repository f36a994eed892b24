"""What keeps a compiled step from training on garbage silently: `index_ranges`, the integer batch
inputs that index a tensor (class labels through cross-entropy's gather, token ids through an
embedding's take) and the values the indexing accepts. The runtime checks every batch against them
before running the step: TVM's gather and take read out of bounds without a word, where PyTorch
raises ("Target 100 is out of bounds"). The runtime also refuses non-finite float inputs (TVM's
max(x, 0) turns NaN into 0 where PyTorch's ReLU keeps it, so a NaN would train on with a finite
loss) and checks the trained parameters after every step (runtime.Program.step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import tvm
from tvm import relax

# Ops whose output holds its first argument's values, rearranged: an index traced through them is
# still the input's values.
_SAME_VALUES = {"relax.expand_dims", "relax.squeeze", "relax.reshape", "relax.astype", "relax.permute_dims",
                "relax.strided_slice", "relax.broadcast_to", "relax.flatten"}


@dataclass(frozen=True)
class IndexRange:
    """Values of batch input `input` must lie in [0, size) or be one of `ignored` (masked out before
    they index, as cross-entropy's ignore_index); `op` says which operation indexes with them."""
    input: str
    size: int
    ignored: tuple
    op: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "IndexRange":
        return cls(d["input"], int(d["size"]), tuple(d["ignored"]), d["op"])


def index_ranges(func, input_names: list[str], origins: dict) -> list[IndexRange]:
    """The IndexRanges of forward_loss `func`'s batch inputs (named `input_names`, in order);
    origins: binding name -> Origin, to name the indexing op."""
    bindings = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    inputs = dict(zip(func.params, input_names))
    found = []
    for block in func.body.blocks:
        for b in block.bindings:
            value = b.value
            if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
                continue
            name = value.op.name
            if name in ("relax.gather_elements", "relax.take"):
                data, index, axis = value.args[0], value.args[1], int(value.attrs.axis)
            elif name == "relax.nn.nll_loss":  # the ONNX frontend's cross-entropy
                data, index, axis = value.args[0], value.args[1], 1 if len(value.args[0].ty.shape) > 1 else 0
            else:
                continue
            ignored = {int(value.attrs.ignore_index)} if name == "relax.nn.nll_loss" else set()
            source = _trace(index, bindings, ignored)
            shape = data.ty.shape
            if source not in inputs or shape is None:
                continue
            extent = shape[axis % len(shape)]
            if not isinstance(extent, tvm.tirx.IntImm):
                continue  # a dynamic size: nothing to check against
            origin = origins.get(b.var.name)
            found.append(IndexRange(inputs[source], int(extent.value), tuple(sorted(ignored)),
                                    str(origin) if origin else name))
    return found


def _trace(expr, bindings: dict, ignored: set):
    """The variable whose values `expr` holds (through reshapes, casts, slices), adding to `ignored`
    the values a `where(x != c, x, ...)` masks out on the way; None if the values are computed."""
    while True:
        value = bindings.get(expr)
        if value is None:
            return expr  # a function parameter
        if isinstance(value, relax.Var):
            expr = value
            continue
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        if value.op.name in _SAME_VALUES:
            expr = value.args[0]
            continue
        if value.op.name == "relax.where":
            masked = _not_equal_constant(value.args[0], value.args[1], bindings)
            if masked is None:
                return None
            ignored.add(masked)
            expr = value.args[1]
            continue
        return None


def _not_equal_constant(cond, data, bindings: dict):
    """c when `cond` is `data != c` for a constant c, else None."""
    cond = bindings.get(cond, cond)
    if not (isinstance(cond, relax.Call) and isinstance(cond.op, tvm.ir.Op) and cond.op.name == "relax.not_equal"):
        return None
    lhs, rhs = cond.args
    if lhs.same_as(data) and isinstance(rhs, tvm.ir.expr.Constant) and rhs.value.numpy().size == 1:
        return int(rhs.value.numpy().item())
    return None
