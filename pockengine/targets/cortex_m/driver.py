"""The C driver of a Cortex-M training step: the lowered train_step, ahead of time, as C statements.

The Relax function after plan_arena is a straight line of kernel calls on tensors that are either
a step input, a piece of state, or a view into the one arena the plan laid out. Everything is
known at compile time, so the driver is that line written out in C: each tensor becomes a pointer
expression (`(float*)(pe_arena + 8192)`), each kernel call a C call, and the step's outputs are
copied into the state arrays when the kernel did not already write them there (update_in_place
makes that the exception). There is no interpreter, no allocator and no malloc: the arena, the
kernels' workspace and the state are static arrays, their sizes fixed by the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from ...autodiff.step import StepSignature
from ...errors import TargetError
from ...ir import bindings_of, tensor_elements
from .kernels import c_symbol

# uint64/uint32: the random generator's constants (frontend/philox.py).
C_TYPES = {"float32": "float", "float64": "double", "int64": "int64_t", "int32": "int32_t", "int8": "int8_t",
           "uint8": "uint8_t", "bool": "bool", "float16": "uint16_t", "uint64": "uint64_t", "uint32": "uint32_t"}


def c_type(dtype: str) -> str:
    try:
        return C_TYPES[str(dtype)]
    except KeyError:
        raise TargetError(f"the Cortex-M driver has no C type for dtype {dtype}") from None


def c_name(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


@dataclass
class Constant:
    """A constant the step's kernels read (a scalar literal or a small tensor): emitted as a const array."""
    symbol: str
    dtype: str
    values: np.ndarray


@dataclass
class Driver:
    body: list = field(default_factory=list)  # C statements of pe_train_step, in order
    constants: list = field(default_factory=list)
    arena_bytes: int = 0
    outputs: list = field(default_factory=list)  # (C buffer of the returned tensor, bytes) per output
    # (symbol, dtype, count): tensors the step returns in memory of their own
    output_buffers: list = field(default_factory=list)
    kernels_called: list = field(default_factory=list)


def translate(func: relax.Function, signature: StepSignature, input_symbols: list, state_symbols: list) -> Driver:
    """The driver for `func` (train_step after plan_arena, before the VM's finalisation passes).

    input_symbols / state_symbols: the C arrays holding each batch input / state tensor, in the
    order of the function's parameters."""
    params = list(func.params)
    expected = len(signature.batch) + len(signature.state)
    if len(params) != expected:
        raise TargetError(f"train_step has {len(params)} parameters, the signature {expected}")
    translation = _Translation()
    for p, symbol, dtype in zip(params, input_symbols + state_symbols,
                                [s.dtype for s in signature.batch] + [s.dtype for s in signature.state]):
        translation.env[p] = f"(({c_type(dtype)}*){symbol})"
    for binding in bindings_of(func):
        kind = _kind(binding.value)
        where = f"binding {binding.var.name}"
        if kind not in TRANSLATIONS:
            raise TargetError(f"the Cortex-M driver cannot translate {kind} ({where}) of train_step; "
                              "only kernel calls, arena views and tuples are expected after lowering")
        TRANSLATIONS[kind](translation, binding.var, binding.value, where)
    driver, env = translation.driver, translation.env
    result = func.body.body
    if not isinstance(result, relax.Var) or not isinstance(env.get(result), list):
        raise TargetError("train_step does not return a tuple of tensors")
    returned = env[result]
    if len(returned) != 1 + len(signature.outputs):
        raise TargetError(f"train_step returns {len(returned)} values; "
                          f"the signature expects {1 + len(signature.outputs)}")
    driver.outputs = returned
    return driver


KERNEL_CALL = "kernel call"


def _kind(value) -> str:
    """What a binding's value is, as TRANSLATIONS knows it: the op a call calls, a call of one of the
    step's kernels, or the kind of expression (Var, Tuple, ...)."""
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
        return KERNEL_CALL
    return type(value).__name__


class _Translation:
    """The driver being written, and the C expression of each Relax Var bound so far (a list of them
    for a tuple)."""

    def __init__(self):
        self.driver = Driver()
        self.env = {}
        self.storages = {}

    def constant(self, expr) -> str:
        value = (expr.value if hasattr(expr, "value") else expr.data).numpy()
        symbol = f"pe_const_{len(self.driver.constants)}"
        self.driver.constants.append(Constant(symbol, str(value.dtype), np.ascontiguousarray(value)))
        return f"(({c_type(value.dtype)}*){symbol})"

    def arg(self, expr, where: str) -> str:
        if isinstance(expr, relax.Var):
            if expr not in self.env:
                raise TargetError(f"{where}: {expr.name} is not bound to memory")
            return self.env[expr]
        if isinstance(expr, (tvm.ir.expr.Constant, tvm.ir.expr.GenericConst)):
            return self.constant(expr)
        raise TargetError(f"{where}: argument {type(expr).__name__} has no C form")

    # One method a kind of binding: (bound Var, its value, where, for errors).

    def alias(self, var, value, where):
        self.env[var] = self.env[value]

    def make_tuple(self, var, value, where):
        self.env[var] = [self.arg(f, where) for f in value.fields]

    def tuple_item(self, var, value, where):
        self.env[var] = self.env[value.tuple_value][value.index]

    def arena(self, var, value, where):
        if self.storages:
            raise TargetError("train_step allocates more than one storage; plan_arena should leave one arena")
        self.driver.arena_bytes = int(value.args[0].values[0])
        self.storages[var] = "pe_arena"

    def arena_tensor(self, var, value, where):
        storage, offset = value.args[0], int(value.args[1].value)
        self.env[var] = f"(({c_type(var.ty.dtype)}*)({self.storages[storage]} + {offset}))"

    def output_tensor(self, var, value, where):
        # A tensor the step returns (the loss): it outlives the step, so it is not in the arena.
        symbol = f"pe_out_{len(self.driver.output_buffers)}"
        self.driver.output_buffers.append((symbol, str(var.ty.dtype), tensor_elements(var.ty)))
        self.env[var] = f"(({c_type(var.ty.dtype)}*){symbol})"

    def same_memory(self, var, value, where):
        self.env[var] = self.env[value.args[0]]

    def view(self, var, value, where):
        self.env[var] = f"(({c_type(var.ty.dtype)}*){self.env[value.args[0]]})"

    def kernel_call(self, var, value, where):
        name = value.op.name_hint
        args = ", ".join(self.arg(a, f"kernel {name}") for a in value.args)
        self.driver.body.append(f"{c_symbol(name)}({args});")
        self.driver.kernels_called.append(name)


# What each kind of binding (see _kind) becomes in C.
TRANSLATIONS = {
    "Var": _Translation.alias,
    "DataflowVar": _Translation.alias,
    "Tuple": _Translation.make_tuple,
    "TupleGetItem": _Translation.tuple_item,
    "relax.memory.alloc_storage": _Translation.arena,
    "relax.memory.alloc_tensor": _Translation.arena_tensor,
    "relax.builtin.alloc_tensor": _Translation.output_tensor,
    "relax.memory.ensure_zero_offset": _Translation.same_memory,  # the arena's offsets are in the pointer already
    "relax.reshape": _Translation.view,
    "relax.memory.view": _Translation.view,
    KERNEL_CALL: _Translation.kernel_call,
}
