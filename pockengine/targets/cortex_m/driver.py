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
    output_buffers: list = field(default_factory=list)  # (symbol, dtype, count): tensors the step returns in memory of their own
    kernels_called: list = field(default_factory=list)


def _static_count(ty) -> int:
    return int(np.prod([int(d) for d in ty.shape], dtype=np.int64))


def translate(func: relax.Function, signature: StepSignature, input_symbols: list, state_symbols: list) -> Driver:
    """The driver for `func` (train_step after plan_arena, before the VM's finalisation passes).

    input_symbols / state_symbols: the C arrays holding each batch input / state tensor, in the
    order of the function's parameters."""
    driver = Driver()
    params = list(func.params)
    expected = len(signature.batch) + len(signature.state)
    if len(params) != expected:
        raise TargetError(f"train_step has {len(params)} parameters, the signature {expected}")
    env = {}
    for p, symbol, dtype in zip(params, input_symbols + state_symbols,
                                [s.dtype for s in signature.batch] + [s.dtype for s in signature.state]):
        env[p] = f"(({c_type(dtype)}*){symbol})"
    storages = {}
    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    alloc_tensor = tvm.ir.Op.get("relax.memory.alloc_tensor")
    builtin_alloc = tvm.ir.Op.get("relax.builtin.alloc_tensor")
    zero_offset = tvm.ir.Op.get("relax.memory.ensure_zero_offset")
    views = {tvm.ir.Op.get(name) for name in ("relax.reshape", "relax.memory.view")}

    def constant(expr):
        value = (expr.value if hasattr(expr, "value") else expr.data).numpy()
        symbol = f"pe_const_{len(driver.constants)}"
        driver.constants.append(Constant(symbol, str(value.dtype), np.ascontiguousarray(value)))
        return f"(({c_type(value.dtype)}*){symbol})"

    def arg(expr, where):
        if isinstance(expr, relax.Var):
            if expr not in env:
                raise TargetError(f"{where}: {expr.name} is not bound to memory")
            return env[expr]
        if isinstance(expr, (tvm.ir.expr.Constant, tvm.ir.expr.GenericConst)):
            return constant(expr)
        raise TargetError(f"{where}: argument {type(expr).__name__} has no C form")

    for block in func.body.blocks:
        for binding in block.bindings:
            var, value = binding.var, binding.value
            where = f"binding {var.name}"
            if isinstance(value, relax.Var):
                env[var] = env[value]
            elif isinstance(value, relax.Tuple):
                env[var] = [arg(f, where) for f in value.fields]
            elif isinstance(value, relax.TupleGetItem):
                env[var] = env[value.tuple_value][value.index]
            elif isinstance(value, relax.Call) and value.op.same_as(alloc_storage):
                if storages:
                    raise TargetError("train_step allocates more than one storage; plan_arena should leave one arena")
                driver.arena_bytes = int(value.args[0].values[0])
                storages[var] = "pe_arena"
            elif isinstance(value, relax.Call) and value.op.same_as(alloc_tensor):
                storage, offset = value.args[0], int(value.args[1].value)
                env[var] = f"(({c_type(var.ty.dtype)}*)({storages[storage]} + {offset}))"
            elif isinstance(value, relax.Call) and value.op.same_as(builtin_alloc):
                # A tensor the step returns (the loss): it outlives the step, so it is not in the arena.
                symbol = f"pe_out_{len(driver.output_buffers)}"
                driver.output_buffers.append((symbol, str(var.ty.dtype), _static_count(var.ty)))
                env[var] = f"(({c_type(var.ty.dtype)}*){symbol})"
            elif isinstance(value, relax.Call) and value.op.same_as(zero_offset):
                env[var] = env[value.args[0]]
            elif isinstance(value, relax.Call) and any(value.op.same_as(v) for v in views):
                env[var] = f"(({c_type(var.ty.dtype)}*){env[value.args[0]]})"
            elif isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
                name = value.op.name_hint
                args = ", ".join(arg(a, f"kernel {name}") for a in value.args)
                driver.body.append(f"{c_symbol(name)}({args});")
                driver.kernels_called.append(name)
            else:
                op = value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else type(value).__name__
                raise TargetError(f"the Cortex-M driver cannot translate {op} ({where}) of train_step; "
                                  "only kernel calls, arena views and tuples are expected after lowering")
    result = func.body.body
    if not isinstance(result, relax.Var) or not isinstance(env.get(result), list):
        raise TargetError("train_step does not return a tuple of tensors")
    returned = env[result]
    if len(returned) != 1 + len(signature.outputs):
        raise TargetError(f"train_step returns {len(returned)} values; the signature expects {1 + len(signature.outputs)}")
    driver.outputs = returned
    return driver
