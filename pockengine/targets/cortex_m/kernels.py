"""The step's TIR kernels as plain C functions for a microcontroller.

TVM's C code generator emits every PrimFunc in TVM-FFI's packed calling convention: arguments
arrive as DLTensor handles that the kernel unpacks and checks at run time, which needs TVM's FFI
headers and costs a few hundred instructions per call. A kernel whose parameters are raw pointers
(`T.handle("float32")` with the buffer declared on it) and whose calling convention is 1 is left
alone by MakePackedAPI and comes out as `void name(float* a, float* b, ...)`: exactly what a
generated driver that knows every shape at compile time wants to call.

What else the microcontroller needs from a kernel written for a multi-core CPU:
- no thread pool: parallel loops become serial (TVM's C backend would call TVMBackendParallelLaunch);
- no vector types: vectorized loops become serial loops (the C compiler vectorizes for MVE itself);
- a buffer's element offset is 0 (the driver passes the address of the first element).
Intermediate buffers a fused kernel keeps for itself are still allocated by the code TVM generates,
on the stack when small and through TVMBackendAllocWorkspace when not; `workspace_bytes` measures the
latter so the driver can reserve it statically (see driver.py).
"""

from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import Var

from ...errors import TargetError
from ...ir import map_kernels

# TVM's calling-convention code for "the function already has a C signature" (MakePackedAPI skips it).
_C_SIGNATURE = 1
_KDL_CPU = 1  # DLPack's device type code of the CPU
# Allocations at most this big stay on the kernel's stack (TVM's default
# `tirx.kernel_max_stack_bytes` is a bit below, it is conservative): everything above goes through
# TVMBackendAllocWorkspace.
_AUTO_ENTRY = "// CodegenC: NOTE: Auto-generated entry function"
# The C of no TVM kernel at all (every kernel of the step is hand-written: int8_conv.py).
EMPTY_SOURCE = "#include <stdint.h>\n"


def c_symbol(name: str) -> str:
    """The C function name of kernel `name` (prefixed: kernel names like `add` or `exp` collide with libc)."""
    return "pe_k_" + re.sub(r"\W", "_", name)


def pointer_abi(func: tirx.PrimFunc, symbol: str) -> tirx.PrimFunc:
    """`func` with one raw pointer per buffer parameter, serial loops, zero element offsets and a C signature."""
    params, decls, renamed = [], [], {}
    for param in func.params:
        ty = param.ty
        if not isinstance(ty, tvm.ir.type.Type) or not hasattr(ty, "elem_offset"):
            raise TargetError(f"kernel {symbol} has a non-buffer parameter {param.name}; "
                              "the Cortex-M driver passes only tensors")
        if ty.strides and len(ty.strides):
            raise TargetError(f"kernel {symbol}: parameter {param.name} is strided; "
                              "the driver passes contiguous tensors")
        pointer = Var(param.name + "_ptr", tvm.ir.PointerType(tvm.ir.PrimType(str(ty.dtype))))
        buffer = tirx.decl_buffer(ty.shape, str(ty.dtype), name=param.name, data=pointer, elem_offset=0)
        renamed[param] = buffer
        params.append(pointer)
        decls.append(tirx.DeclBuffer(buffer, data=pointer))

    def substitute(var):
        return renamed.get(var, var)

    def serial(loop):
        if loop.kind in (tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED):
            return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body,
                            annotations=loop.annotations, step=loop.step)
        return loop

    body = tvm_ffi.structural_map(func.body, [(Var, substitute), (tirx.For, serial)])
    new = tirx.PrimFunc(params, tirx.SeqStmt(decls + [body]), attrs=func.attrs)
    return new.with_attrs({"global_symbol": symbol, "calling_conv": _C_SIGNATURE, "tirx.noalias": True})


def on_the_cpu(mod):
    """`mod` with every C-signature kernel's body marked as running on the CPU, device 0.

    MakePackedAPI, which skips C-signature functions, is what normally tells LowerTVMBuiltin the
    device: without it a kernel with an intermediate buffer too big for the stack cannot be
    lowered ("Unknown device id in current IR"). With it, that buffer comes from
    TVMBackendAllocWorkspace(1, 0, ...), which the driver serves from a static array. The mark
    goes on after TVM's lowering pipeline, which hoists allocations above any statement around
    the body."""
    def mark(func):
        if int(func.attrs.get("calling_conv", 0)) != _C_SIGNATURE:
            return None
        body = func.body
        for key, value in (("device_type", _KDL_CPU), ("device_id", 0)):
            body = tirx.AttrStmt(tvm.ir.StringImm("default"), key, tirx.IntImm("int32", value), body)
        return func.with_body(body)

    return map_kernels(mod, mark, include_scheduled=True)


def generate_c(kernels: dict, target) -> str:
    """{kernel name: PrimFunc} -> one C source with `void pe_k_<name>(T* ...)` for each.

    All kernels go into one module: every file TVM generates defines the same library-context
    symbol, so two generated files would not link together."""
    from tvm.tirx.build import codegen_build

    target = tvm.target.Target(target)
    target = target.with_host(target)  # a microcontroller: the kernels are host code
    mod = tvm.IRModule({c_symbol(name): pointer_abi(func, c_symbol(name)) for name, func in kernels.items()})
    try:
        # tvm.tirx.build's steps, with the kernels' device stated between the pipeline and the
        # finalisation (see on_the_cpu).
        mod = tvm.tirx.transform.BindTarget(target)(mod)
        pipeline, finalize_host_passes, _ = tvm.tirx.get_default_tir_pipeline(target)
        mod = finalize_host_passes()(on_the_cpu(pipeline(mod)))
        source = codegen_build(mod, target).inspect_source()
    except Exception as e:  # noqa: BLE001 - TVM's code generator raises several types; its words go on
        raise TargetError("TVM's C code generator failed on the step's kernels: "
                          f"{str(e).strip().splitlines()[-1][:300]}") from None
    # For a module with one function TVM appends a packed entry point calling it: not wanted here.
    cut = source.find(_AUTO_ENTRY)
    return _non_finite_literals(source if cut < 0 else source[:cut])


def _non_finite_literals(source: str) -> str:
    """TVM's C printer writes a float infinity or NaN constant as `inff` / `nanf` (`inf` / `nan` for
    double), which no C compiler knows (and `nanf` is libm's function): math.h's INFINITY and NAN.
    The step's own checks compare with infinity; a model's -inf attention mask is one too."""
    source = re.sub(r"\binff?\b(?!\s*\()", "INFINITY", source)
    return re.sub(r"\bnanf?\b(?!\s*\()", "NAN", source)


def workspace_bytes(source: str) -> int:
    """Bytes the generated kernels may hold through TVMBackendAllocWorkspace at once, read from
    the calls in the C source: the largest sum over one kernel's calls (a kernel frees what it
    allocated before returning, and kernels run one at a time)."""
    largest = 0
    for body in re.split(r"\n(?=\S[^\n]*\bpe_k_\w+\([^)]*\)\s*\{)", source):
        sizes = re.findall(r"TVMBackendAllocWorkspace\(\s*\d+\s*,\s*[^,]+,\s*\(uint64_t\)\s*(\d+)", body)
        largest = max(largest, sum(_aligned(int(s)) for s in sizes))
    return largest


WORKSPACE_ALIGNMENT = 16


def _aligned(n: int) -> int:
    return -(-n // WORKSPACE_ALIGNMENT) * WORKSPACE_ALIGNMENT
