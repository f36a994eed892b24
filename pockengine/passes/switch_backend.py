"""switch_backend: run each heavy op — matmul, conv2d, and conv2d's data and weight gradients — on
the faster of TVM's kernel and the target's library kernel, chosen by measuring both here.

On the host the library is PyTorch (BLAS matmul, oneDNN convolutions; torch_kernels.py),
called through `relax.call_dps_packed` on the step's own buffers (DLPack, no copies). The host
family's `measure_backends` (targets/host.py) times every distinct op (same op, attributes and
shapes) both ways: TVM's kernel built alone with the build's default schedule, or its tuned
schedule when a tuning log has that kernel, and the library kernel on the same shapes;
`switch_backend` rewrites the calls whose library kernel won.
Measuring ops alone ignores what fusion would add to TVM's kernel (a bias or BatchNorm epilogue
computed in the same loop): a switched op's epilogue runs as a kernel of its own.

Switching happens before fusion, so the rest of the pipeline (fusion, memory plan) sees library
calls as opaque ops with a destination buffer. An artifact that uses library kernels needs PyTorch
where it runs; the manifest lists their names (`register` rebuilds them at load).
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from .. import torch_kernels
from ..ir import static_shape

HEAVY_OPS = ("relax.matmul", "relax.nn.conv2d", "relax.nn.conv2d_transpose")
MODES = ("tvm", "library", "auto")


@dataclasses.dataclass
class Choice:
    kernel: str  # the library kernel's name
    shapes: list  # argument shapes
    calls: int  # how many calls in the step share this op
    backend: str  # "tvm" or "library"
    tvm_ms: float | None = None
    library_ms: float | None = None

    @property
    def key(self) -> tuple:
        return self.kernel, tuple(tuple(s) for s in self.shapes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _key(call) -> tuple | None:
    if not isinstance(call.op, tvm.ir.Op) or call.op.name not in HEAVY_OPS:
        return None
    name = torch_kernels.kernel_name(call)
    return None if name is None else (name, tuple(tuple(static_shape(a)) for a in call.args))


def heavy_ops(func) -> dict[tuple, list]:
    """{(library kernel, argument shapes): [the calls]} for the heavy ops of a Relax function."""
    found: dict[tuple, list] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and (key := _key(expr)) is not None:
            found.setdefault(key, []).append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return found


def switch_backend(choices: list[Choice], func_name: str) -> tvm.transform.Pass:
    """Rewrite the heavy ops whose choice is "library" into calls of the library kernel."""
    to_library = {c.key for c in choices if c.backend == "library"}

    @relax.expr_functor.mutator
    class Switch(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            key = _key(call)
            if key is None or key not in to_library:
                return call
            return relax.call_dps_packed(key[0], relax.Tuple(list(call.args)), call.ty)

    @tvm.transform.module_pass(opt_level=0, name="SwitchBackend")
    def transform(mod, _ctx):
        if not to_library:
            return mod
        mutator = Switch(mod)
        mutator.builder_.update_func(mod.get_global_var(func_name), mutator.visit_expr(mod[func_name]))
        return mutator.builder_.get()

    return transform


def library_kernels(choices: list[Choice]) -> list[str]:
    return sorted({c.kernel for c in choices if c.backend == "library"})
