"""The CUDA target and this machine: a cuda target completed with a host, whether a GPU is here, and
TVM's CUDA runtime loaded (with a stand-in driver on a GPU-less build host, so codegen compiles)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

from ...cache import cache_dir
from ...errors import TargetError


def cuda_target(spec):
    """A TVM target dict, tag or Target of kind cuda -> tvm Target with a host (a preset's is its
    `tvm_target`)."""
    import tvm

    explicit_arch = True
    if isinstance(spec, dict):
        explicit_arch = "arch" in spec
    elif isinstance(spec, str):
        explicit_arch = spec != "nvidia/cuda"  # a tag names its GPU; this one does not
    try:
        target = spec if isinstance(spec, tvm.target.Target) else tvm.target.Target(spec)
    except Exception as e:  # noqa: BLE001 - TVM raises several types for a bad target
        raise TargetError(f"not a TVM target: {spec!r} ({str(e).strip().splitlines()[-1][:200]})") from None
    if target.kind.name != "cuda":
        raise TargetError(f"{spec!r} is a {target.kind.name} target, not cuda")
    if not explicit_arch and not gpu_present():
        # TVM falls back to sm_50 with a warning; PTX for the wrong GPU is worse than an error.
        raise TargetError(f"the cuda target {spec!r} has no 'arch' and there is no GPU here to detect it: "
                          "give one, e.g. {\"kind\": \"cuda\", \"arch\": \"sm_87\"} (Jetson Orin)")
    if target.host is None:
        target = tvm.target.Target(target, host={"kind": "llvm"})
    return target


def arch_of(target) -> str:
    return str(target.attrs.get("arch", ""))


def _driver_loadable() -> bool:
    """Whether a real CUDA driver library is here (once the stub below is loaded, the dynamic loader
    would hand it out for "libcuda.so.1", so that is remembered, not asked again)."""
    if _STUB_LOADED:
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def gpu_present() -> bool:
    """Whether this process can run CUDA kernels: a CUDA driver and at least one device."""
    import tvm

    if not _driver_loadable():
        return False
    try:
        ensure_cuda_runtime()
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - any failure to reach the device means no device
        return False




# TVM's CUDA runtime (libtvm_runtime_cuda.so) links against the driver library libcuda.so.1, which only
# a machine with an NVIDIA driver has. `import tvm` tries to load it and, on a GPU-less build host,
# silently gives up. TVM then still generates CUDA C, but in a placeholder module ("CUDA runtime is
# not linked into this build", is_runnable() False) that never calls the compiler: export_library
# embeds the CUDA *source* text with format "cuda", which the device's runtime cannot load
# (cuModuleLoadData takes cubin/fatbin/PTX). With the runtime loaded, codegen calls nvcc and embeds
# the compiled binary. So on a GPU-less host a stub libcuda.so.1 is compiled (every entry point
# returns CUDA_ERROR_NO_DEVICE, nothing ever calls it during a build) just so the runtime can be
# loaded. Only the symbols the runtime imports are needed (ctypes loads with RTLD_NOW, so all of
# them); a new TVM needing one more is handled by reading the dynamic loader's "undefined symbol"
# error, unloading that stub (the loader would otherwise keep matching its soname) and rebuilding.
_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction",
                   "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")
_STUB_ATTEMPTS = 32
_RUNTIME_HANDLES: list = []  # ctypes handles of the stub and the runtime, kept for the process's life
_STUB_LOADED = False


def _stub_source(symbols) -> str:
    lines = ["/* libcuda.so.1 stand-in for a GPU-less build host (pockengine.targets.cuda): every call",
             "   fails with CUDA_ERROR_NO_DEVICE (100). */"]
    lines += [f"int {name}(void) {{ return 100; }}" for name in sorted(set(symbols))]
    lines += ['int cuGetErrorName(int e, const char** s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }',
              'int cuGetErrorString(int e, const char** s) { *s = "no CUDA driver (build-host stub)"; return 0; }']
    return "\n".join(lines) + "\n"


def _build_stub(symbols) -> str:
    source = _stub_source(symbols)
    directory = os.path.join(cache_dir(), "cuda-stub", hashlib.sha256(source.encode()).hexdigest()[:16])
    library = os.path.join(directory, "libcuda.so.1")
    if os.path.isfile(library):
        return library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise TargetError("building for cuda without a GPU needs a C compiler for this machine (cc/gcc; "
                          "Debian package gcc) to make a stand-in libcuda.so.1")
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = os.path.join(tmp, "libcuda_stub.c")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, "libcuda.so.1")
        # The soname is what the dynamic loader matches libtvm_runtime_cuda's DT_NEEDED against.
        done = subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", out, src],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise TargetError(f"could not build the stand-in libcuda.so.1 with {compiler}: {done.stderr.strip()[:400]}")
        os.replace(out, library)  # atomic: concurrent builds never see a half-written library
    return library


def _codegen_compiles() -> bool:
    """Whether TVM's CUDA runtime is loaded (then codegen compiles kernels into a runnable module)."""
    import tvm

    return tvm.get_global_func("device_api.cuda", allow_missing=True) is not None


def ensure_cuda_runtime() -> None:
    """Load TVM's CUDA runtime into this process, with a stub driver if there is no real one."""
    if _codegen_compiles():
        return
    from pathlib import Path

    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    def load_runtime():
        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        return load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
                               mode="RTLD_LOCAL")

    global _STUB_LOADED
    if _driver_loadable():
        try:
            _RUNTIME_HANDLES.append(load_runtime())
        except OSError as e:
            raise TargetError(f"TVM's CUDA runtime cannot be loaded on this machine: {e}") from None
        return
    import _ctypes

    symbols = list(_DRIVER_SYMBOLS)
    for _ in range(_STUB_ATTEMPTS):
        stub = ctypes.CDLL(_build_stub(symbols), mode=os.RTLD_LOCAL)
        _STUB_LOADED = True
        try:
            _RUNTIME_HANDLES.extend([stub, load_runtime()])
            break
        except OSError as e:
            missing = re.search(r"undefined symbol: (\w+)", str(e))
            if not missing or missing.group(1) in symbols:
                raise TargetError(f"TVM's CUDA runtime cannot be loaded on this machine: {e}") from None
            symbols.append(missing.group(1))
            _ctypes.dlclose(stub._handle)
    if not _codegen_compiles():
        raise TargetError("TVM's CUDA runtime (libtvm_runtime_cuda.so) did not register; this TVM build "
                          "cannot compile CUDA kernels")


def host_runs_here(tvm_target: dict) -> bool:
    """Whether the host code of a cuda target (its exported dict) is for this machine's CPU."""
    triple = str(tvm_target.get("host", {}).get("mtriple", "") or "")
    return not triple or triple.split("-")[0] == _machine_arch()


def why_not_here(tvm_target: dict) -> str:
    """Why a CUDA artifact built for `tvm_target` cannot run on this machine, in a sentence."""
    arch = tvm_target.get("arch", "?")
    if not host_runs_here(tvm_target):
        host = tvm_target["host"]["mtriple"].split("-")[0]
        return (f"it runs on an NVIDIA GPU ({arch}) beside an {host} CPU (a Jetson); this machine's CPU is "
                f"{_machine_arch()}. Copy the artifact to the device and run `python3 run_step.py DIR` there")
    if not gpu_present():
        cause = "no CUDA driver (libcuda.so.1)" if not _driver_loadable() else "the CUDA driver sees no device"
        return f"it runs on an NVIDIA GPU ({arch}) and this machine has no CUDA device: {cause}"
    return ""


def _machine_arch() -> str:
    import platform

    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)

