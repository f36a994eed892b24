"""Targets as data: a preset names a TVM target (a JSON dict, never a CLI string) and how to build for it.

`resolve(spec)` accepts a preset name, a TVM target dict, a TVM tag, or a `tvm.target.Target`.
Each preset names its family (how it is built and run: families.py lists them): `host` (this CPU,
runs in-process), `aarch64` (cross-compiled library + runner, QEMU here), `cuda` (GPU kernels, PTX
by nvcc; needs a GPU to run) and `cortex-m` (a C project, ahead of time, static memory; QEMU here).
A target outside them is a TargetError that lists what is available.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass

from ..errors import TargetError, ToolchainError

# The families' names (targets/families.py maps them to their modules).
HOST, AARCH64, CUDA, CORTEX_M = "host", "aarch64", "cuda", "cortex-m"


@dataclass(frozen=True)
class Tool:
    """A program a target needs, and the Debian package that provides it."""
    program: str
    package: str
    purpose: str  # "build" or "run"


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    tvm_target: dict
    family: str = HOST
    tools: tuple = ()  # Tool, ...
    runner: str = "this machine"  # how `pockengine run` runs an artifact of this target
    vector_bytes: int = 16  # SIMD register width the default schedule vectorizes for (SSE/NEON: 16)
    vector_registers: int = 16  # how many of them (SSE/AVX2: 16; AVX-512, aarch64: 32): sizes matmul tiles
    # Microcontrollers: the device's memory and the QEMU board that stands in for it.
    sram_bytes: int | None = None
    flash_bytes: int | None = None
    board: dict | None = None  # qemu_machine, qemu_cpu_hz, cflags, memory_map (see targets/cortex_m)
    clock_hz: int | None = None  # the device's core clock: instructions counted under QEMU as a time
    # Instruction-set extensions the C compiler may use by hand (Cortex-M: "dsp" for the M-profile DSP
    # extension's SIMD32 (SMLAD, SXTB16), "mve" for Helium): the int8 convolution's hand-written
    # kernels are chosen from them (cortex_m/int8_conv.py); a core without them gets TVM's loops.
    features: frozenset = frozenset()

    @property
    def cores(self) -> int:
        return int(self.tvm_target.get("num-cores", 1))

    @property
    def requires(self) -> tuple:
        """(program, package) pairs needed to build for and run on this target."""
        return tuple((t.program, t.package) for t in self.tools)

    def vector_lanes(self, bits: int = 32) -> int:
        return max(1, self.vector_bytes * 8 // bits)

    def target(self):
        import tvm

        return tvm.target.Target(self.tvm_target)

    def missing_tools(self, purpose: str | None = None) -> list:
        return [t for t in self.tools if (purpose is None or t.purpose == purpose) and shutil.which(t.program) is None]

    def check_tools(self, purpose: str) -> None:
        """Raise ToolchainError naming the packages to install when a tool to `purpose` is missing."""
        missing = self.missing_tools(purpose)
        if missing:
            packages = " ".join(sorted({t.package for t in missing}))
            programs = ", ".join(t.program for t in missing)
            raise ToolchainError(f"target {self.name}: {programs} not found, needed to {purpose} for it; "
                                 f"install it with `apt-get install {packages}`")


def _host_target() -> dict:
    """LLVM for this machine's CPU, with all its cores (the CPU name enables its vector ISA)."""
    import tvm

    target = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    get_cpu = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    cpu = str(get_cpu()) if get_cpu is not None else ""
    if cpu and cpu != "generic":
        target["mcpu"] = cpu
    return target


def _aarch64(cpu: str, cores: int) -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": cpu, "mattr": ["+neon"], "num-cores": cores}


AARCH64_TOOLS = (Tool("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", "build"),
                 Tool("qemu-aarch64", "qemu-user", "run"))
AARCH64_RUNNER = "qemu-aarch64 with an aarch64 Python + TVM runtime"
CUDA_TOOLS = (Tool("nvcc", "nvidia-cuda-toolkit", "build"),)
CORTEX_M_TOOLS = (Tool("arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi", "build"),
                  Tool("qemu-system-arm", "qemu-system-arm", "run"))
KiB = 1024
# The CPU clock QEMU gives each board, which also clocks SysTick (its "processor clock" source): the
# harness reads SysTick as an instruction counter (cortex_m/project.py), and `make calibrate` checks it.
QEMU_BOARD_CPU_HZ = {"mps2-an386": 25_000_000, "mps2-an500": 25_000_000, "mps3-an547": 32_000_000}


def _cortex_m(name, cpu, description, sram, flash, clock_hz, machine, cflags, memory_map, features=()):
    """memory_map: (code origin, code bytes, RAM origin, RAM bytes[, constants origin, bytes]) of the
    QEMU board: where it has memory for code (the vector table at 0), data, and, when the code memory
    is small, constants (weights). The firmware is linked for the board's memory, so that it links
    and its sizes can be read even when it is too big for the device; the build then checks it
    against the device's SRAM and Flash."""
    rom = memory_map[4:] or memory_map[:2]
    return TargetPreset(
        name, description, {"kind": "c", "mcpu": cpu, "keys": ["arm_cpu", "cpu"]}, family=CORTEX_M,
        tools=CORTEX_M_TOOLS, runner=f"qemu-system-arm -M {machine} (semihosting)", vector_bytes=4,
        sram_bytes=sram, flash_bytes=flash, clock_hz=clock_hz, features=frozenset(features),
        board={"qemu_machine": machine, "qemu_cpu_hz": QEMU_BOARD_CPU_HZ[machine], "cflags": [f"-mcpu={cpu}", *cflags],
               "memory_map": {"flash_origin": memory_map[0], "flash_bytes": memory_map[1],
                              "sram_origin": memory_map[2], "sram_bytes": memory_map[3],
                              "rom_origin": rom[0], "rom_bytes": rom[1], "separate_rom": len(memory_map) > 4}})


def _preset_factories() -> dict:
    """name -> a function of the name making the preset. Only the host's and `cuda`'s ask TVM (LLVM's
    name for this CPU): naming another target, or failing for want of its tools, needs no TVM (seconds)."""
    orin_cpu, nano_cpu, rpi4 = _aarch64("cortex-a78", 12), _aarch64("cortex-a78", 6), _aarch64("cortex-a72", 4)
    return {
        "host": lambda name: TargetPreset(
            name, "this machine's CPU (LLVM, all cores)", _host_target(),
            vector_bytes=_host_vector_bytes(), vector_registers=_host_vector_registers()),
        "jetson-orin": lambda name: TargetPreset(
            name, "Jetson AGX Orin GPU (sm_87) + Cortex-A78 host code",
            {"kind": "cuda", "arch": "sm_87", "max_num_threads": 1024, "thread_warp_size": 32, "host": orin_cpu},
            family=CUDA, tools=CUDA_TOOLS + AARCH64_TOOLS[:1], runner="an NVIDIA GPU (sm_87) on the Jetson"),
        "jetson-orin-nano": lambda name: TargetPreset(
            name, "Jetson Orin Nano GPU (sm_87) + Cortex-A78AE host code",
            {"kind": "cuda", "arch": "sm_87", "max_num_threads": 1024, "thread_warp_size": 32, "host": nano_cpu},
            family=CUDA, tools=CUDA_TOOLS + AARCH64_TOOLS[:1], runner="an NVIDIA GPU (sm_87) on the Jetson"),
        "jetson-orin-cpu": lambda name: TargetPreset(
            name, "Jetson AGX Orin CPU (12x Cortex-A78, NEON)", orin_cpu,
            family=AARCH64, tools=AARCH64_TOOLS, runner=AARCH64_RUNNER, vector_registers=32),
        "jetson-orin-nano-cpu": lambda name: TargetPreset(
            name, "Jetson Orin Nano CPU (6x Cortex-A78AE, NEON)", nano_cpu,
            family=AARCH64, tools=AARCH64_TOOLS, runner=AARCH64_RUNNER, vector_registers=32),
        "rpi4": lambda name: TargetPreset(
            name, "Raspberry Pi 4 (4x Cortex-A72, NEON, 64-bit OS)", rpi4,
            family=AARCH64, tools=AARCH64_TOOLS, runner=AARCH64_RUNNER, vector_registers=32),
        "cuda": lambda name: TargetPreset(
            name, "any NVIDIA GPU (sm_80 code, PTX JIT-compiles for newer) + this machine's CPU",
            {"kind": "cuda", "arch": "sm_80", "max_num_threads": 1024, "thread_warp_size": 32,
             "host": _host_target()},
            family=CUDA, tools=CUDA_TOOLS, runner="an NVIDIA GPU on this machine"),
        # SRAM, Flash and clock of a typical part of each core; QEMU's boards have at least as much memory
        # at these addresses.
        "cortex-m4": lambda name: _cortex_m(
            name, "cortex-m4", "Cortex-M4F, sized and clocked as an STM32F429 (168 MHz)",
            256 * KiB, 2048 * KiB, 168_000_000, "mps2-an386", ["-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"],
            (0x0, 4096 * KiB, 0x20000000, 4096 * KiB), features={"dsp"}),
        "cortex-m7": lambda name: _cortex_m(
            name, "cortex-m7", "Cortex-M7, sized and clocked as an STM32F746 (216 MHz)",
            320 * KiB, 1024 * KiB, 216_000_000, "mps2-an500", ["-mfloat-abi=hard", "-mfpu=fpv5-d16"],
            (0x0, 4096 * KiB, 0x20000000, 4096 * KiB), features={"dsp"}),
        "cortex-m55": lambda name: _cortex_m(
            name, "cortex-m55", "Cortex-M55 (Helium), sized as an Alif Ensemble E3-class part, 400 MHz (its HP core)",
            # -mcpu=cortex-m55 alone gives GCC (12) its default extensions: MVE with floats (+mve.fp) and
            # double-precision FP, so arm_mve.h's intrinsics compile without an -march.
            512 * KiB, 4096 * KiB, 400_000_000, "mps3-an547", ["-mfloat-abi=hard"],
            # AN547: 512 KiB ITCM at 0 (code), 512 KiB DTCM (data), 8 MiB QSPI (constants)
            (0x0, 512 * KiB, 0x20000000, 512 * KiB, 0x28000000, 8192 * KiB), features={"dsp", "mve"}),
    }


PRESET_NAMES = tuple(_preset_factories())


@functools.cache
def preset(name: str) -> TargetPreset:
    """The preset called `name` (not an alias), made once."""
    return _preset_factories()[name](name)


ALIASES = {"jetson": "jetson-orin", "jetson-nano": "jetson-orin-nano", "raspberry-pi-4": "rpi4"}


def named(spec) -> TargetPreset | None:
    """The preset `spec` names (a preset's name or an alias), None when it names none."""
    name = ALIASES.get(spec, spec) if isinstance(spec, str) else None
    return preset(name) if name in PRESET_NAMES else None


def presets() -> dict[str, TargetPreset]:
    return {name: preset(name) for name in PRESET_NAMES}


def resolve(spec) -> TargetPreset:
    """A preset name (or alias), TVM target dict, TVM tag or tvm.target.Target -> TargetPreset."""
    if isinstance(spec, TargetPreset):
        return spec
    if (found := named(spec)) is not None:
        return found
    import tvm

    try:
        target = spec if isinstance(spec, tvm.target.Target) else tvm.target.Target(spec)
    except Exception as e:  # noqa: BLE001 - TVM raises several types for a target it cannot parse
        raise TargetError(
            f"unknown target {spec!r}: use a preset ({', '.join(PRESET_NAMES)}), a TVM target dict such as "
            f"{{\"kind\": \"llvm\", \"num-cores\": 2}}, or a TVM tag "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if target.kind.name == "cuda" and not isinstance(spec, tvm.target.Target):
        from .cuda.device import cuda_target

        target = cuda_target(spec)  # an arch is required (no GPU here to detect one); a host is added
    return _from_tvm_target(target, spec if isinstance(spec, str) else _label(target))


def _check_cpu(mcpu: str, triple: str) -> None:
    """LLVM only warns about a CPU it does not know and builds for a generic one: refuse instead."""
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        known = [c for c in codegen.llvm_get_cpu_archlist(_triple_target(triple)) if c[:3] == mcpu[:3]][:12]
        raise TargetError(f"LLVM does not know the CPU mcpu={mcpu!r} for {triple}"
                          + (f"; similar names: {', '.join(known)}" if known else "")
                          + ". Use one of LLVM's names (llc -mtriple=... -mcpu=help) or a preset (pockengine targets)")


def _triple_target(triple: str):
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": triple})


def _label(target) -> str:
    """A short name for a target given as a dict: kind and CPU or GPU architecture (`llvm-cortex-a72`)."""
    detail = next((str(target.attrs[k]) for k in ("mcpu", "arch", "mtriple") if str(target.attrs.get(k, "") or "")), "")
    return f"{target.kind.name}-{detail}" if detail else target.kind.name


def _from_tvm_target(target, label: str) -> TargetPreset:
    """A TVM target of a kind and CPU we build for, as a preset of the matching family."""
    kind = target.kind.name
    exported = dict(target.export())
    triple = str(target.attrs.get("mtriple", "") or "")
    mcpu = str(target.attrs.get("mcpu", "") or "")
    host_triple = _host_triple()
    if kind == "llvm" and mcpu:
        _check_cpu(mcpu, triple or host_triple)
    if kind == "llvm" and (not triple or triple.split("-")[0] == host_triple.split("-")[0]):
        return TargetPreset(label, "TVM target for this machine's CPU", exported, vector_bytes=_host_vector_bytes(),
                            vector_registers=_host_vector_registers())
    if kind == "llvm" and triple.startswith("aarch64"):
        return TargetPreset(label, f"aarch64 CPU {mcpu or 'generic'}", exported, family=AARCH64, tools=AARCH64_TOOLS,
                            runner=AARCH64_RUNNER, vector_registers=32)
    if kind == "cuda":
        host = target.host
        tools = CUDA_TOOLS + (AARCH64_TOOLS[:1] if host is not None and "aarch64" in str(host.attrs.get("mtriple", ""))
                              else ())
        return TargetPreset(label, f"NVIDIA GPU {target.attrs.get('arch', '')}", exported, family=CUDA, tools=tools,
                            runner="an NVIDIA GPU")
    boards = {p.tvm_target["mcpu"]: p for p in presets().values() if p.family == CORTEX_M}
    if kind == "c" and mcpu in boards:
        board = boards[mcpu]
        return TargetPreset(label, board.description, exported, family=CORTEX_M, tools=board.tools, runner=board.runner,
                            vector_bytes=board.vector_bytes, sram_bytes=board.sram_bytes, flash_bytes=board.flash_bytes,
                            clock_hz=board.clock_hz, board=board.board, features=board.features)
    if "thumb" in triple or mcpu.startswith("cortex-m"):
        raise TargetError(f"target {label!r}: microcontrollers are built through TVM's C code generator; use a preset "
                          f"({', '.join(boards)}) or {{\"kind\": \"c\", \"mcpu\": \"cortex-m4\"}}")
    raise TargetError(
        f"target {label!r} ({kind}{' ' + triple if triple else ''}) is not one PockEngine builds for: use a preset "
        f"({', '.join(presets())}), an llvm target for this CPU ({host_triple}) or for aarch64, a cuda target, "
        "or a c target for a Cortex-M mcpu"
    )


@functools.cache
def _host_vector_bytes() -> int:
    """Widest SIMD registers this CPU has (LLVM's own query answers 512 for any x86 CPU here)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return 16
    if "avx512f" in flags:
        return 64
    if "avx2" in flags or "avx" in flags:
        return 32
    return 16


@functools.cache
def _host_vector_registers() -> int:
    """SIMD registers this CPU has: 32 with AVX-512 and on aarch64, else 16."""
    import platform

    if _host_vector_bytes() == 64 or platform.machine().lower() in ("aarch64", "arm64"):
        return 32
    return 16


def _host_triple() -> str:
    import tvm

    get = tvm.get_global_func("target.llvm_get_system_triple", allow_missing=True)
    return str(get()) if get is not None else "x86_64-pc-linux-gnu"
