"""Small Relax helpers shared by the pipeline stages."""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import numpy as np
import tvm
from tvm import relax, s_tir, te


def bindings_of(func) -> list:
    """Every binding of a Relax function's body, in order across its binding blocks."""
    return [b for block in func.body.blocks for b in block.bindings]


def bound_values(func) -> dict:
    """{Var: the value bound to it} over every binding of a Relax function's body."""
    return {b.var: b.value for b in bindings_of(func)}


def inline_body(bb: relax.BlockBuilder, func):
    """Re-emit `func`'s bindings into `bb` (inside the caller's dataflow block) and return its result
    as nested Python tuples of Relax expressions, resolving tuple-valued bindings statically.

    The function's parameter Vars are reused as they are: the caller makes them its own parameters.
    """
    bound = {}
    for binding in bindings_of(func):
        bb.emit_normalized(binding)
        bound[binding.var] = binding.value

    def resolve(expr):
        while isinstance(expr, relax.Var) and expr in bound and isinstance(bound[expr], (relax.Tuple, relax.Var)):
            expr = bound[expr]
        if isinstance(expr, relax.Tuple):
            return tuple(resolve(f) for f in expr.fields)
        return expr

    return resolve(func.body.body)


@relax.expr_functor.mutator
class Substitute(relax.PyExprMutator):
    """Replace uses of Vars according to a mapping (definitions are left alone)."""

    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, op):
        return self.mapping.get(op, op)

    def visit_dataflow_var_(self, op):
        return self.mapping.get(op, op)


OPAQUE = 8  # TVM's OpPatternKind kOpaque: FuseOps fuses nothing into or out of such a kernel


def opaque_kernel(tensors: list, name: str):
    """A PrimFunc of TE `tensors` (inputs, then the output) that FuseOps leaves alone."""
    return te.create_prim_func(tensors).with_attr({"global_symbol": name, "op_pattern": OPAQUE})


def with_function(mod, name: str, func):
    """A copy of `mod` with `name` replaced by `func` (passes never mutate their input module)."""
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    mod[name] = func
    return mod


def step_pass(name: str, single_block: bool = False, drop_dead_code: bool = False):
    """Decorator of a pass that rewrites one Relax function of a module (the step, the imported
    forward_loss): the decorated factory takes the function's name as its `func_name` argument and
    returns `rewrite(mod, func)`; the decorator makes it return module pass `name` applying it.

    `rewrite` returns the new function, or None to leave the module as it is, or a whole new
    module (a rewrite that adds kernels too). A factory may return None itself, when its arguments
    leave nothing to rewrite. The input module is never mutated (with_function).
    single_block: the rewrite handles one dataflow block; a function of several (control flow) is left
    as it is.
    drop_dead_code: DeadCodeElimination on the new function, for the values it no longer reads.
    """
    def decorate(factory):
        signature = inspect.signature(factory)
        assert "func_name" in signature.parameters, f"{factory.__name__} takes no func_name"

        @functools.wraps(factory)
        def make_pass(*args, **kwargs) -> tvm.transform.Pass:
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            func_name = arguments.arguments["func_name"]
            rewrite = factory(*args, **kwargs)

            @tvm.transform.module_pass(opt_level=0, name=name)
            def transform(mod, _ctx):
                if rewrite is None:
                    return mod
                func = mod[func_name]
                if single_block and len(func.body.blocks) != 1:
                    return mod
                new = rewrite(mod, func)
                if new is None:
                    return mod
                mod = new if isinstance(new, tvm.IRModule) else with_function(mod, func_name, new)
                return relax.transform.DeadCodeElimination([func_name])(mod) if drop_dead_code else mod

            return transform

        return make_pass

    return decorate


# Ops whose result shares its input's buffer (no copy): the reshape-likes of the step as autodiff
# wrote it, and what lowering turns them into.
VIEW_OPS = frozenset({"relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.flatten", "relax.memory.view"})


def viewed(value):
    """The tensor `value` is a view of, or None when it is not a view."""
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in VIEW_OPS:
        return value.args[0]
    return None


def with_blocks(func, blocks):
    """`func` with its body's binding blocks replaced (same parameters, result and attributes)."""
    body = relax.BlockBuilder().normalize(relax.SeqExpr(blocks, func.body.body))
    return relax.Function(func.params, body, attrs=func.attrs)


def with_values(func, values: dict):
    """`func` with the bindings of the Vars in `values` bound to the values given there instead
    (same blocks, same order; the other bindings as they are)."""
    blocks = [type(block)([relax.VarBinding(b.var, values[b.var]) if b.var in values else b for b in block.bindings])
              for block in func.body.blocks]
    return with_blocks(func, blocks)


def is_scheduled(func) -> bool:
    """Whether a kernel already has its final schedule (from a tuning log, `tirx.is_scheduled`)."""
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled"))


class _UncheckedSchedule(s_tir.Schedule):
    """TVM's Schedule without the Python type check `s_tir.schedule._type_checker` wraps around
    every primitive: our passes call primitives ~75 times per kernel, and the checks (signature
    binding, typing dispatch) were 8% of the test suite's CPU time, a quarter of the lowering stage.
    The primitives still check their arguments in C++."""


for _name, _primitive in vars(s_tir.Schedule).items():
    if hasattr(_primitive, "__wrapped__"):
        setattr(_UncheckedSchedule, _name, _primitive.__wrapped__)


def kernel_schedule(func) -> s_tir.Schedule:
    """A schedule of one kernel for our passes, which try primitives and keep what succeeds: a
    failure is expected, so its error is not rendered (rendering prints the whole kernel, for each
    failed trial of dlight's inliner too)."""
    return _UncheckedSchedule(func, error_render_level="none")


# A kernel that CPUs run as written, serial loops (the step's final check, autodiff/guards.py: one
# loop per trained tensor, a few microseconds; scheduling its hundreds of loops took seconds).
# GPUs still give it threads (targets/cuda.py schedules every kernel).
AS_WRITTEN_ON_CPUS = "pockengine.as_written_on_cpus"


# A block annotation: the operand of a matmul computed from a compact form (a 4-bit weight's
# dequantization, frontend/w4_ops.py). It is never stored whole: schedule_cpu computes it into the
# matmul's panels, one cache block at a time; inline_elementwise leaves it for that.
PANEL_OPERAND = "pockengine.panel_operand"

# A block annotation: an int8 dot product in the form of AVX-512 VNNI's vpdpbusd (frontend/w8_ops.py),
# its value the register tile [rows, vectors]; passes/schedule_int8_dot.py tiles and tensorizes it.
INT8_DOT = "pockengine.int8_dot"


def map_kernels(mod, rewrite, include_scheduled: bool = False, named: bool = False):
    """A copy of `mod` where each TIR kernel not yet scheduled (see is_scheduled) is replaced by
    `rewrite(kernel)` unless that is None (`mod` itself when none is). Tuned kernels, and those
    marked AS_WRITTEN_ON_CPUS, are left as they are, unless `include_scheduled` (a rewrite that
    keeps every loop, such as fast_math's, or one that decides for itself, such as the GPU's
    default schedules). `named`: `rewrite(name, kernel)`, for a rewrite that reports on each
    kernel by its name. Kernels are visited in name order, so such a report is too."""
    def skipped(func) -> bool:
        return is_scheduled(func) or bool(func.attrs is not None and func.attrs.get(AS_WRITTEN_ON_CPUS))

    updates = {gv: new for gv, func in mod.functions_items()
               if isinstance(func, tvm.tirx.PrimFunc) and (include_scheduled or not skipped(func))
               and (new := rewrite(gv.name_hint, func) if named else rewrite(func)) is not None}
    if not updates:
        return mod
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def with_new_params(mod, func_name: str, new_params: dict, rewriter):
    """`mod` with the parameters of function `func_name` in `new_params` ({old Var: new Var})
    replaced and its body rewritten by `rewriter` (a relax.PyExprMutator of `mod` whose rewrites
    read the new ones)."""
    func = mod[func_name]
    body = rewriter.visit_expr(func.body)
    params = [new_params.get(p, p) for p in func.params]
    rewriter.builder_.update_func(mod.get_global_var(func_name),
                                  relax.Function(params, body, func.ret_ty, attrs=func.attrs))
    return rewriter.builder_.get()


def static_shape(expr) -> list[int]:
    """The static shape of a tensor-typed Relax expression."""
    return [int(d) for d in expr.ty.shape]


def operand_shape(expr, what: str, op: str, ndim: int | None = None) -> list[int]:
    """The static shape of an operator's operand `what`; ValueError naming `op` when it is not a
    tensor of static shape (of `ndim` axes, when given): a custom operator's type check."""
    ty = expr.ty
    if (not isinstance(ty, relax.TensorType) or ty.shape is None or (ndim is not None and len(ty.shape) != ndim)
            or not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape)):
        axes = f"{ndim}-D " if ndim is not None else ""
        raise ValueError(f"{op}: {what} must be a {axes}tensor of static shape, got {ty}")
    return [int(d) for d in ty.shape]


def register_operator(name: str, infer_type, legalize) -> None:
    """Declare one of our Relax operators: its type rule, purity, legalization (to TE/TIR) and the
    name TVMScript prints it by."""
    from tvm.ir import register_op_attr

    register_op_attr(name, "FInferType", infer_type)
    register_op_attr(name, "FPurity", True)
    register_op_attr(name, "FLegalize", legalize)
    register_op_attr(name, "TScriptPrinterName", name)


def te_legalizer(compute, name: str, config_index: int | None = None, marker: str | None = None):
    """FLegalize of one of our operators: `compute(*its tensor arguments)` in TE, named `name`; with
    `config_index`, the argument there is the operator's integer configuration (a constant, checked
    by its type rule), passed as `compute(..., config=[...])` instead. `marker`: a PrimFunc attribute
    holding the configuration, by which a target recognises the kernel while it is unfused (the
    Cortex-M build swaps in hand-written SIMD C for int8 convolutions)."""
    def legalize(builder, call):
        tensors = [arg for i, arg in enumerate(call.args) if i != config_index]
        if config_index is None:
            return builder.call_te(compute, *tensors, primfunc_name_hint=name)
        config = [int(v) for v in call.args[config_index].value.numpy()]
        return builder.call_te(lambda *args: compute(*args, config=config), *tensors, primfunc_name_hint=name,
                               primfunc_attrs={marker: config} if marker else None)

    return legalize


def same_tensor_type(a, b) -> bool:
    """Same dtype and the same static shape."""
    return (isinstance(a, relax.TensorType) and isinstance(b, relax.TensorType) and str(a.dtype) == str(b.dtype)
            and a.shape is not None and b.shape is not None
            and [int(d) for d in a.shape] == [int(d) for d in b.shape])


def op_name(value):
    """The Relax op a binding's value calls (e.g. "relax.add"), or None."""
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


@contextmanager
def without_kernel_argument_checks():
    """The caller's PassContext, plus: kernels are built without TIR's checks of their arguments.

    Each kernel's packed-function wrapper checks the type, rank, shape, strides, dtype and device of
    every argument: on MobileNetV2 that is 80% of the emitted code, 9 of the library's 10 MB and 2.4 of
    the 3.7 s LLVM spends writing it. Only their caller passes them arguments: the step's own VM, with
    tensors it allocated itself or whose shape and dtype were checked on the way in (by the step's
    entry, through VMShapeLower's checks, and by the Program before any step), or a measurement
    (tuning, switch_backend) with tensors it made for them."""
    current = tvm.transform.PassContext.current()
    config = {**current.config, "tirx.disable_assert": True}
    with tvm.transform.PassContext(opt_level=current.opt_level, required_pass=current.required_pass,
                                   disabled_pass=current.disabled_pass, instruments=current.instruments,
                                   config=config):
        yield


def tensor_elements(ty) -> int:
    """Elements of a statically shaped tensor type (TypeError for a symbolic shape)."""
    return int(np.prod([int(d) for d in ty.shape], dtype=np.int64))


def tensor_bytes(ty) -> int:
    """Bytes of a statically shaped tensor type; 0 for any other type (a tuple, a symbolic shape)."""
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return 0
    try:
        n = tensor_elements(ty)
    except TypeError:
        return 0
    return n * tvm.DataType(str(ty.dtype)).bits // 8
