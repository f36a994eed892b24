"""The kernels compiled by nvcc (PTX for the target's arch, machine code assembled from that PTX)
and the artifact's files exported."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile

from ... import pipeline
from ...artifact_files import LIBRARY, PTX_FILE, SOURCE_FILE
from ...errors import TargetError
from .device import _machine_arch, arch_of, cuda_target, ensure_cuda_runtime
from .kernel_check import gpu_kernels_check


def cuda_module(built):
    """The CUDA device module inside a built executable or a loaded library (host library -> cuda)."""
    root = getattr(built, "mod", built)
    stack = [root] + list(root.imports)
    while stack:
        m = stack.pop(0)
        if m.kind == "cuda":
            return m
        stack.extend(m.imports)
    raise TargetError("the build produced no CUDA module: no kernel was compiled for the GPU")


def _require_nvcc() -> None:
    if shutil.which("nvcc") is None:
        raise TargetError("building for cuda needs nvcc (the CUDA toolkit) on PATH")


def ptx_for(source: str, target) -> bytes:
    """PTX of the kernels' CUDA source for the target's arch, with the `.target` line checked."""
    from tvm.support import nvcc

    _require_nvcc()
    arch = arch_of(target)
    with target:  # compile_cuda reads the compute version from the current target as well
        ptx = bytes(nvcc.compile_cuda(source, target_format="ptx", arch=arch, compiler="nvcc"))
    declared = ptx_header(ptx).get("target", "")
    if declared.split(",")[0].strip() != arch:
        raise TargetError(f"nvcc produced PTX for {declared!r}, not {arch}")
    return ptx


def ptx_header(ptx: bytes) -> dict:
    """{"version": "9.0", "target": "sm_87", "address_size": "64"} from a PTX file's directives."""
    header = {}
    for line in ptx.decode(errors="replace").splitlines():
        m = re.match(r"\s*\.(version|target|address_size)\s+(.+?)\s*$", line)
        if m:
            header.setdefault(m.group(1), m.group(2))
    return header


def assemble(ptx: bytes, arch: str) -> bytes:
    """PTX -> fatbin holding the machine code for `arch` and the PTX itself (what a later GPU's
    driver can JIT). Only ptxas runs: a few seconds, where the CUDA front end takes half a minute."""
    with tempfile.TemporaryDirectory(prefix="pockengine-cuda-") as tmp:
        src, out = os.path.join(tmp, PTX_FILE), os.path.join(tmp, "kernels.fatbin")
        with open(src, "wb") as f:
            f.write(ptx)
        done = subprocess.run(["nvcc", "--fatbin", "-O3", f"-arch={arch}", "-o", out, src],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise TargetError(f"ptxas rejected the PTX for {arch}: "
                              f"{done.stdout.strip()[-400:]} {done.stderr.strip()[-400:]}")
        with open(out, "rb") as f:
            return f.read()


COMPILE_CALLBACK = "tvm_callback_cuda_compile"


@contextlib.contextmanager
def _compile_through_ptx(target):
    """While TVM builds, its CUDA compile callback is replaced by one that compiles the source to
    PTX once (kept: it is the PTX we ship), then assembles the embedded binary from that PTX. TVM's
    own callback would run the CUDA front end for its fatbin and ptx_for a second time for the PTX
    (MobileNetV2-0.35 at 32x32: 37 s + 31 s of nvcc); it also defaults to NVRTC, which needs the
    `cuda-bindings` package. The previous callback is restored afterwards."""
    import tvm_ffi

    _require_nvcc()
    previous = tvm_ffi.get_global_func(COMPILE_CALLBACK, allow_missing=True)
    compiled: list = []

    def compile_source(code, *_target):  # TVM passes (code) or (code, target) depending on version
        ptx = ptx_for(str(code), target)
        compiled.append(ptx)
        return bytearray(assemble(ptx, arch_of(target)))

    tvm_ffi.register_global_func(COMPILE_CALLBACK, compile_source, override=True)
    try:
        yield compiled
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(COMPILE_CALLBACK, previous, override=True)


def build_cuda(lowered, target):
    """(VM executable, PTX bytes). The executable's CUDA module holds the kernels as a fatbin for the
    target's arch (machine code + PTX), assembled from exactly the PTX returned. Raises TargetError
    when a kernel would run on the host CPU."""
    from tvm import relax

    from ...ir import without_kernel_argument_checks

    target = cuda_target(target)
    gpu_kernels_check(lowered)
    ensure_cuda_runtime()
    final = pipeline.finalize(lowered, target)
    with _compile_through_ptx(target) as compiled, target, without_kernel_argument_checks():
        executable = relax.build(final, target=target, relax_pipeline=None)
    cuda = cuda_module(executable)
    if not cuda.is_runnable() or not compiled:
        # The placeholder module of a TVM without its CUDA runtime: it would export CUDA source.
        raise TargetError("TVM did not compile the CUDA kernels (its CUDA runtime is not loaded)")
    if len(compiled) > 1:  # TVM 0.27 puts all kernels of a target in one module; a change would show here
        raise TargetError(f"TVM compiled {len(compiled)} CUDA modules where one was expected")
    return executable, compiled[0]


def export_cuda(executable, ptx: bytes, directory: str, target) -> dict:
    """Write the artifact: train_step.so (host code for the target's host CPU, the compiled kernels
    embedded as TVM does), kernels.ptx and kernels.cu beside it for inspection. -> {kind: path}."""
    from tvm.support import cc

    target = cuda_target(target)
    os.makedirs(directory, exist_ok=True)
    paths = {"library": os.path.join(directory, LIBRARY), "ptx": os.path.join(directory, PTX_FILE),
             "source": os.path.join(directory, SOURCE_FILE)}
    triple = str(target.host.attrs.get("mtriple", "") or "")
    arch = triple.split("-")[0]
    if arch and arch != _machine_arch():
        # The host code is linked for the device's CPU: Debian's cross g++ names itself by the GNU
        # triple (aarch64-linux-gnu-g++), which may be spelled differently from LLVM's mtriple.
        candidates = [f"{triple}-g++", f"{arch}-linux-gnu-g++"]
        compiler = next((c for c in candidates if shutil.which(c)), None)
        if compiler is None:
            raise TargetError(f"exporting for a {triple} host needs a cross compiler ({candidates[-1]}, Debian "
                              f"package g++-{arch.replace('_', '-')}-linux-gnu)")
        executable.export_library(paths["library"], fcompile=cc.cross_compiler(compiler))
    else:
        executable.export_library(paths["library"])
    with open(paths["ptx"], "wb") as f:
        f.write(ptx)
    with open(paths["source"], "w") as f:
        f.write(cuda_module(executable).inspect_source(""))
    return paths
