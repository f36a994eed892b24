"""Targets as data: a preset names a TVM target (a JSON dict, never a CLI string) and how to build for it.

`resolve(spec)` accepts a preset name, a TVM target dict, a TVM tag, or a `tvm.target.Target`.
Only targets this machine can build and run a step for are accepted; anything else is a TargetError
that lists what is available.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from ..errors import TargetError


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    tvm_target: dict
    # Which builder/runner family handles it; the build and runtime code is shared per family.
    family: str = "host"
    requires: tuple = field(default_factory=tuple)  # (program, Debian package) pairs to build/run
    vector_bytes: int = 16  # SIMD register width the default schedule vectorizes for (SSE/NEON: 16)

    @property
    def cores(self) -> int:
        return int(self.tvm_target.get("num-cores", 1))

    def vector_lanes(self, bits: int = 32) -> int:
        return max(1, self.vector_bytes * 8 // bits)

    def target(self):
        import tvm

        return tvm.target.Target(self.tvm_target)


def _host_target() -> dict:
    """LLVM for this machine's CPU, with all its cores (the CPU name enables its vector ISA)."""
    import tvm

    target = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    get_cpu = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    cpu = str(get_cpu()) if get_cpu is not None else ""
    if cpu and cpu != "generic":
        target["mcpu"] = cpu
    return target


def presets() -> dict[str, TargetPreset]:
    return {
        "host": TargetPreset("host", "this machine's CPU (LLVM, all cores)", _host_target(),
                             vector_bytes=_host_vector_bytes()),
    }


def resolve(spec) -> TargetPreset:
    """A preset name, TVM target dict, TVM tag or tvm.target.Target -> TargetPreset."""
    import tvm

    known = presets()
    if isinstance(spec, TargetPreset):
        return spec
    if isinstance(spec, str) and spec in known:
        return known[spec]
    try:
        target = spec if isinstance(spec, tvm.target.Target) else tvm.target.Target(spec)
    except Exception as e:
        raise TargetError(
            f"unknown target {spec!r}: use a preset ({', '.join(known)}), a TVM target dict such as "
            f"{{\"kind\": \"llvm\", \"num-cores\": 2}}, or a TVM tag ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return _from_tvm_target(target, str(spec))


def _from_tvm_target(target, label: str) -> TargetPreset:
    kind = target.kind.name
    triple = str(target.attrs.get("mtriple", "") or "")
    host_triple = _host_triple()
    if kind == "llvm" and (not triple or triple.split("-")[0] == host_triple.split("-")[0]):
        return TargetPreset(label, "TVM target for this machine's CPU", dict(target.export()),
                            vector_bytes=_host_vector_bytes())
    raise TargetError(
        f"target {label!r} ({kind}{' ' + triple if triple else ''}) cannot be built and run from this machine yet; "
        f"available: {', '.join(presets())} or an llvm target for this CPU ({host_triple})"
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


def _host_triple() -> str:
    import tvm

    get = tvm.get_global_func("target.llvm_get_system_triple", allow_missing=True)
    return str(get()) if get is not None else "x86_64-pc-linux-gnu"
