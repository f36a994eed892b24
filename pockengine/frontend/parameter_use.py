"""How an imported model uses each of its weights: what a sparse scheme's rules select on (a
convolution's, a depthwise convolution's or a linear layer's weight)."""

from __future__ import annotations

from tvm import relax

from ..ir import bindings_of, op_name
from . import quantized_ops


def parameter_ops(func, param_vars: dict) -> dict:
    """{parameter name: "conv" | "depthwise" | "linear" | None}: how each weight is used."""
    consumers = {}
    for b in bindings_of(func):
        if isinstance(b.value, relax.Call):
            for i, arg in enumerate(b.value.args):
                consumers.setdefault(arg, []).append((b, i))
    kinds = {}
    for name, var in param_vars.items():
        kinds[name] = None
        for b, i in consumers.get(var, []):
            op = op_name(b.value)
            if op == "relax.nn.conv2d" and i == 1:
                groups = int(b.value.attrs.groups)
                kinds[name] = "depthwise" if groups > 1 and groups == int(var.ty.shape[0]) else "conv"
            elif op == quantized_ops.CONV2D and i == 1:
                groups = quantized_ops.conv_attrs(quantized_ops.config_of(b.value, 5))["groups"]
                kinds[name] = "depthwise" if groups > 1 and groups == int(var.ty.shape[0]) else "conv"
            elif op == "relax.permute_dims" and _feeds_matmul(b.var, consumers):
                kinds[name] = "linear"
    return kinds


def _feeds_matmul(var, consumers, depth: int = 3) -> bool:
    """Whether `var` (a transposed weight) reaches a matmul directly or through broadcasts and
    reshapes (torch decomposes a linear on a non-contiguous input into an expanded batched matmul)."""
    for c, _ in consumers.get(var, []):
        op = op_name(c.value)
        if op == "relax.matmul":
            return True
        if depth and op in ("relax.broadcast_to", "relax.reshape") and _feeds_matmul(c.var, consumers, depth - 1):
            return True
    return False
