"""The host's library kernels: PyTorch's matmul (BLAS) and convolutions (oneDNN), callable from a
compiled step through `relax.call_dps_packed` without copies (DLPack).

A library kernel is named after the op and its attributes, e.g.
`pockengine.torch.conv2d:stride=2,2:pad=1,1,1,1:dil=1,1:groups=8`, so an artifact lists the names
it calls and `register(names)` rebuilds exactly those functions in the process that runs it.
Destination-passing style: the last argument is the output tensor, written in place.

PyTorch's OpenMP pool and TVM's thread pool share the cores. With OpenMP's default wait policy, its
idle threads spin after each library kernel on the cores TVM's next kernel needs: measured on 2
cores, MobileNetV2-0.35's step (batch 4, --backend library) takes 4000 ms instead of 80, a small
transformer's 460 ms instead of 1.2. OpenMP reads OMP_WAIT_POLICY once, when torch is imported, and
PockEngine does not set it for you: when it is not PASSIVE, each library kernel runs on one
PyTorch thread instead (no OpenMP thread is woken, so none spins): 59 ms and 0.46 ms there.
"""

from __future__ import annotations

import os

PREFIX = "pockengine.torch."


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _fmt(values) -> str:
    return ",".join(str(v) for v in values)


def kernel_name(call) -> str | None:
    """The library kernel computing this Relax call, or None if PyTorch has none for it."""
    op = call.op.name
    if {str(a.ty.dtype) for a in call.args} | {str(call.ty.dtype)} not in ({"float32"}, {"float64"}):
        return None
    if op == "relax.matmul":
        return PREFIX + "matmul"
    attrs = call.attrs
    if op == "relax.nn.conv2d":
        common = (f":stride={_fmt(_ints(attrs.strides))}:pad={_fmt(_ints(attrs.padding))}"
                  f":dil={_fmt(_ints(attrs.dilation))}:groups={int(attrs.groups)}")
        layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
        if layouts == ("NCHW", "OIHW", "NCHW"):
            return PREFIX + "conv2d" + common
        if layouts == ("CNHW", "IOHW", "CNHW"):  # the weight gradient TVM's conv2d gradient emits
            return PREFIX + "conv2d_cnhw" + common
        return None
    if op == "relax.nn.conv2d_transpose":  # the data gradient of conv2d
        pad = _ints(attrs.padding)
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "IOHW", "NCHW"):
            return None
        if pad[0] != pad[2] or pad[1] != pad[3]:  # PyTorch's transposed convolution pads symmetrically
            return None
        return (PREFIX + f"conv2d_transpose:stride={_fmt(_ints(attrs.strides))}:pad={_fmt(pad)}"
                f":outpad={_fmt(_ints(attrs.output_padding))}:dil={_fmt(_ints(attrs.dilation))}"
                f":groups={int(attrs.groups)}")
    return None


def _parse(name: str) -> tuple[str, dict]:
    if not name.startswith(PREFIX):
        raise ValueError(f"{name} is not a PockEngine library kernel")
    kind, *fields = name[len(PREFIX):].split(":")
    attrs = {}
    for field in fields:
        key, value = field.split("=")
        numbers = [int(v) for v in value.split(",")]
        attrs[key] = numbers if len(numbers) > 1 or key != "groups" else numbers[0]
    return kind, attrs


def implementation(name: str):
    """The Python function behind a kernel name: (*inputs, output) as DLPack-capable tensors; on one
    PyTorch thread unless OpenMP's idle threads sleep (see the module's docstring)."""
    import torch
    import torch.nn.functional as F

    kind, a = _parse(name)
    t = torch.from_dlpack

    def conv(x, w, a):
        top, left, bottom, right = a["pad"]
        if top == bottom and left == right:
            return F.conv2d(x, w, stride=a["stride"], padding=(top, left), dilation=a["dil"], groups=a["groups"])
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=a["stride"], dilation=a["dil"],
                        groups=a["groups"])

    if kind == "matmul":
        def run(x, w, out):
            torch.matmul(t(x), t(w), out=t(out))
    elif kind == "conv2d":
        def run(x, w, out):
            t(out).copy_(conv(t(x), t(w), a))
    elif kind == "conv2d_cnhw":
        # data (C, N, H, W) and kernel (I, O, H, W) read as NCHW/OIHW by swapping their first two axes
        def run(x, w, out):
            t(out).copy_(conv(t(x).transpose(0, 1), t(w).transpose(0, 1), a).transpose(0, 1))
    elif kind == "conv2d_transpose":
        def run(x, w, out):
            t(out).copy_(F.conv_transpose2d(t(x), t(w), stride=a["stride"], padding=a["pad"][:2],
                                            output_padding=a["outpad"], groups=a["groups"], dilation=a["dil"]))
    else:
        raise ValueError(f"unknown library kernel {name}")
    return run if openmp_threads_sleep() else _on_one_thread(run)


def openmp_threads_sleep() -> bool:
    """Whether PyTorch's idle OpenMP threads sleep rather than spin: OMP_WAIT_POLICY=PASSIVE, which
    OpenMP reads when torch is imported (set after that, it is read too late)."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def _on_one_thread(run):
    """`run` with PyTorch's intra-op threads at one for the call, then as they were."""
    import torch

    def one_thread(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run(*args)
        finally:
            torch.set_num_threads(threads)

    return one_thread


def register(names) -> None:
    """Make the named kernels callable from compiled code in this process."""
    import tvm

    for name in names:
        if tvm.get_global_func(name, allow_missing=True) is None:
            tvm.register_global_func(name, implementation(name))
