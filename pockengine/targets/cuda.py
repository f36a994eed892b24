"""NVIDIA GPU target: the whole training step as CUDA kernels, built (PTX included) on a machine
without a GPU.

    step_mod --gpu_lowering--> memory-planned Relax module, every kernel bound to GPU threads
             --gpu_kernels_check--> TargetError naming any kernel that would run on the host CPU
             --build_cuda--> (VM executable with the kernels compiled by nvcc, PTX for the arch)
             --export_cuda--> train_step.so (cross-compiled for the target's host) + kernels.ptx

Kernels get their schedule in this order: a MetaSchedule record (tuning logs) if one matches, else
the first of TVM's dlight GPU rules that applies. The CPU schedule passes (inline_elementwise,
schedule_cpu, fast_math) are NOT used: dlight only recognises unscheduled kernels, and a kernel
scheduled for CPU cores has no thread binding.

Why a check at all: TVM 0.27 compiles a PrimFunc with no blockIdx/threadIdx binding for the *host*
CPU of a CUDA target, without a warning (measured: the MLP step built without dlight gives a
"successful" build with 2 CUDA kernels and 44 host loops). A step that quietly runs its gradients on
the Jetson's ARM cores would still train, only far slower, so any such kernel is an error.

Targets: the Jetson Orin preset (sm_87 GPU, Cortex-A78 host) or any TVM cuda target with an
explicit `arch` (there is no GPU here to detect one); a cuda target without a host gets an LLVM
host for this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time

from ..errors import TargetError
from . import cache_dir

JETSON_ORIN = "jetson-orin"  # the default target: the preset (sm_87 GPU, Cortex-A78 host)
PTX_FILE, SOURCE_FILE = "kernels.ptx", "kernels.cu"

# A compute statement runs on the GPU only under one of these bindings (a vthread alone is
# unrolled into serial code, it launches nothing).
GPU_THREAD_TAGS = ("blockIdx.", "threadIdx.")


def _dlight_rules():
    """TVM's default GPU schedules, most specific first (the order of TVM's own CUDA pipeline):
    Fallback binds any kernel's loops to blocks and threads, so it comes last."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


# ---------------------------------------------------------------------- targets and the device


def cuda_target(spec=None):
    """A preset name ("jetson-orin"), TVM target dict, tag or Target of kind cuda -> tvm Target with a
    host. Default: the Jetson Orin."""
    import tvm

    from . import named

    spec = JETSON_ORIN if spec is None else spec
    if (found := named(spec)) is not None:
        spec = found.tvm_target
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


def require_gpu(target=None) -> None:
    """TargetError unless a step built for `target` can run here (a GPU, and the target's host CPU)."""
    reason = why_not_here(dict(cuda_target(target).export()))
    if reason:
        raise TargetError(f"this artifact cannot run here: {reason}")


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


# ---------------------------------------------------------------------- lowering


def fusion_passes(target) -> list:
    """TVM's CUDA pipeline up to fused, still unscheduled kernels (LegalizeOps legalizing each distinct
    call once): the module tuning logs are made for and applied to. (Its legalize list ends with
    dlight; the schedules come after tuning records.) Reductions over one element become assignments
    first: dlight's rules would otherwise inline an epilogue into them wrongly (see
    passes/drop_unit_reductions.py)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    from ..passes.drop_unit_reductions import drop_unit_reductions
    from ..passes.legalize_ops import legalize_and_fuse

    return cuda.library_dispatch_passes(target) + legalize_and_fuse() + [drop_unit_reductions()]


@dataclasses.dataclass
class ScheduleReport:
    """Which schedule each kernel got: "tuned" (a tuning record), "legalization" (already bound to GPU
    threads by its legalization), a dlight rule's name, or None (none applied)."""

    schedules: dict  # kernel -> "tuned" | "legalization" | rule name | None
    rule_errors: dict  # kernel -> ["Rule: message", ...] for rules that raised on it
    tuning: object = None  # tuning.TuningReport

    def counts(self) -> dict:
        out: dict = {}
        for how in self.schedules.values():
            out[how or "unscheduled"] = out.get(how or "unscheduled", 0) + 1
        return out


def default_schedules(mod, target, rules=None):
    """(module, ScheduleReport): every kernel without a schedule (no tuning record) gets the first
    dlight rule that applies. Rules are tried one kernel at a time and a rule that raises counts as
    not applying: dlight.ApplyDefaultSchedule aborts the whole module on the first exception, and
    on a training step some do raise (gpu.Matmul on a MobileNetV2 weight-gradient kernel: "There are
    some consumers of the cache-write stage that are not properly inlined")."""
    import tvm

    from ..ir import is_scheduled

    rules = _dlight_rules() if rules is None else rules
    updates, schedules, errors = {}, {}, {}
    with target:
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            name = gv.name_hint
            if is_scheduled(func):
                schedules[name] = "tuned"
                continue
            found, tags = unbound_compute(func)
            if tags and not found:
                # TOPI legalized it for the GPU already (scatter, sort, ...: kernels with their own launches).
                schedules[name] = "legalization"
                continue
            schedules[name] = None
            for rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception as e:  # noqa: BLE001 - next rule; all messages kept for the report
                    errors.setdefault(name, []).append(f"{type(rule).__name__}: {_one_line(e)}")
                    continue
                if space is None:
                    continue
                sch = space[0] if isinstance(space, list) else space
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                schedules[name] = type(rule).__name__
                break
    if updates:
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in updates.items():
            mod[gv] = func
    return mod, ScheduleReport(schedules, errors)


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__


def dataflow_lower_passes(target, signature) -> list:
    """schedule_reductions (target-independent: it reorders Relax bindings so reductions and weight
    gradients run as soon as their inputs exist, see passes/schedule_reductions.py; without it
    update_in_place finds later readers of some old weights), TVM's CUDA dataflow lowering, then our
    memory passes. Both memory passes are kept on the GPU:
    update_in_place only rewires Relax allocations (the kernel test reads the TIR's access pattern,
    which dlight's thread binding does not change), and plan_arena's single storage is allocated on
    virtual device 0 = the GPU (the VM's first device). Its sub-tensors at non-zero offsets go through
    vm.builtin.ensure_zero_offset, which shifts the data pointer without a copy on any device whose
    DeviceAPI supports pointer arithmetic on the host; TVM's CUDA DeviceAPI does, and the arena's
    64-byte offsets are the runtime's allocation alignment (a copy would only happen otherwise)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    from ..autodiff.step import STEP_FUNC
    from ..passes.plan_arena import plan_arena
    from ..passes.schedule_reductions import schedule_reductions
    from ..passes.update_in_place import update_in_place

    return ([schedule_reductions(STEP_FUNC)] + cuda.dataflow_lower_passes(target)
            + [update_in_place(state_aliases(signature), STEP_FUNC), plan_arena(STEP_FUNC)])


def state_aliases(signature) -> dict:
    # Imported late: build.py imports the targets package.
    from ..build import state_aliases as aliases

    return aliases(signature)


def gpu_lowering_with_report(step_mod, target, signature, tuning_logs=(), schedule_rules=None):
    """(memory-planned module, ScheduleReport). See gpu_lowering."""
    import tvm

    from .. import tuning

    target = cuda_target(target)
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(step_mod)
        fused, tuning_report = tuning.apply_logs(fused, target, list(tuning_logs))
    scheduled, report = default_schedules(fused, target, schedule_rules)
    report.tuning = tuning_report
    with target:
        lowered = tvm.transform.Sequential(dataflow_lower_passes(target, signature))(scheduled)
    return lowered, report


def gpu_lowering(step_mod, target, signature, tuning_logs=(), schedule_rules=None):
    """The derived train_step module -> memory-planned Relax module whose kernels are GPU kernels:
    legalize + fuse (TVM's CUDA pipeline), MetaSchedule records from `tuning_logs` (database
    directories, see tuning.py) for the kernels they match, dlight for the rest (`schedule_rules`:
    dlight rules to try in order, default `_dlight_rules()`), schedule_reductions, dataflow
    lowering, update_in_place and plan_arena. Not yet finalised (build_cuda does that) nor checked
    (gpu_kernels_check)."""
    return gpu_lowering_with_report(step_mod, target, signature, tuning_logs, schedule_rules)[0]


# ---------------------------------------------------------------------- the check


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


def gpu_kernels_check(mod, report: ScheduleReport | None = None) -> list[str]:
    """The names of the module's GPU kernels; TargetError naming every kernel that does compute
    outside blockIdx/threadIdx (TVM would compile it for the host CPU without a word)."""
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


# ---------------------------------------------------------------------- build and export


def finalize_passes() -> list:
    from ..build import finalize_passes as passes

    return passes()


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
    import tvm
    from tvm import relax

    from ..ir import without_kernel_argument_checks

    target = cuda_target(target)
    gpu_kernels_check(lowered)
    ensure_cuda_runtime()
    with target:
        final = tvm.transform.Sequential(finalize_passes())(lowered)
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

    from ..runtime import LIBRARY

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


# ---------------------------------------------------------------------- one call


@dataclasses.dataclass
class CudaBuild:
    executable: object
    ptx: bytes
    lowered: object
    schedules: ScheduleReport
    kernels: list
    seconds: dict  # stage -> seconds


def compile_step(step_mod, signature, target=None, tuning_logs=()) -> CudaBuild:
    """gpu_lowering + gpu_kernels_check + build_cuda, timed."""
    target = cuda_target(target)
    seconds = {}
    start = time.perf_counter()
    lowered, report = gpu_lowering_with_report(step_mod, target, signature, tuning_logs)
    seconds["lower"] = time.perf_counter() - start
    kernels = gpu_kernels_check(lowered, report)
    start = time.perf_counter()
    executable, ptx = build_cuda(lowered, target)
    seconds["build"] = time.perf_counter() - start
    return CudaBuild(executable, ptx, lowered, report, kernels, seconds)
