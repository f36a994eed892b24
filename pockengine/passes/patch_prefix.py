"""patch_prefix: run the forward's first layers patch by patch, so only one patch's tensors are alive.

At a high resolution the first layers of a CNN hold the largest activations (MobileNetV2-0.35 at
128x128: a 48x64x64 expansion, 768 KiB) while the step's other tensors are small. When those layers
are frozen and the backward reads nothing they compute (a sparse update trains only later layers),
their forward can run on a grid of spatial patches (MCUNetV2's patch-based inference): each patch
reads the input region its output tile depends on (the receptive field, with halos overlapping the
neighbours' and recomputed), runs the prefix's ops on it, and its tile of the prefix's last tensor
(the split) is written into that tensor. The working set is one patch's, not the whole image's.

What is computed is exactly what the unpatched prefix computes: a windowed op (convolution,
pooling) gets, on each patch, the input region its output tile reads and the zero padding of the
image's borders that the region touches; on an edge inside the image it reads the neighbouring
pixels instead of padding. The pass never pads itself: it changes the op's padding attribute, so
an op that pads with something else than zero (a quantized convolution's input zero point) keeps
doing so.

Ops are known through two tables: WINDOWED (op -> the extent of its window, from the call; its
strides, dilation and (top, left, bottom, right) padding are read from the attributes of those
names, data layout NCHW) and POINTWISE (elementwise ops, broadcasting per-channel values such as a
frozen BatchNorm's). Another op is one entry: a convolution with conv2d's attributes is
`WINDOWED[op] = its window`: the int8 convolution of frontend/quantized_ops.py is one such entry (its
geometry is in its configuration rather than its attributes: _geometry, _with_padding).

The patches' tiles are joined by one opaque kernel (`assemble_patches_*`): TVM's FuseOps would
otherwise fuse each patch's last elementwise ops into the join and emit it after every patch,
keeping every patch's working set alive at once.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax, te

from ..autodiff.step import backward_start
from ..frontend import quantized_ops
from ..ir import bindings_of, opaque_kernel, static_shape, step_pass, with_function


def weight_window(call) -> tuple[int, int]:
    """A convolution's window: its weight's spatial extent (height, width)."""
    layout, shape = str(call.attrs.kernel_layout), static_shape(call.args[1])
    return shape[layout.index("H")], shape[layout.index("W")]


def pool_window(call) -> tuple[int, int]:
    size = [int(k) for k in call.attrs.pool_size]
    return size[0], size[-1]


def quantized_weight_window(call) -> tuple[int, int]:
    """An int8 convolution's window (frontend/quantized_ops.py; its weight is OIHW)."""
    return tuple(static_shape(call.args[1])[2:])


# op -> its window's (height, width) for a call; strides, dilation and padding come from its attributes
# (an int8 convolution's from its integer configuration, see _geometry).
WINDOWED = {
    "relax.nn.conv2d": weight_window,
    "relax.nn.max_pool2d": pool_window,
    "relax.nn.avg_pool2d": pool_window,
    quantized_ops.CONV2D: quantized_weight_window,
}

# Ops computing each output element from the same position of their inputs (per-channel values broadcast).
POINTWISE = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.negative", "relax.clip",
    "relax.maximum", "relax.minimum", "relax.where", "relax.astype", "relax.nn.relu", "relax.nn.silu",
    "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.sigmoid", "relax.tanh", "relax.exp", "relax.sqrt",
    "relax.rsqrt", "relax.square", "relax.abs", "relax.power",
    quantized_ops.QUANTIZE, quantized_ops.ADD,  # int8: their configuration is not a tensor of pixels
})


@dataclasses.dataclass(frozen=True)
class Window:
    """How an op reads one spatial axis of its input: output index o reads input indices
    o * stride - pad_before + j * dilation, for j < kernel."""
    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_before: int = 0
    pad_after: int = 0

    def input_span(self, start: int, stop: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((lo, hi), (pad_before, pad_after)): the input indices [lo, hi) that output indices
        [start, stop) read, within the input's `size`, and the padding the patch's op needs where
        the window leaves the input (only at the image's borders; never more than the op's own)."""
        first = start * self.stride - self.pad_before
        end = (stop - 1) * self.stride - self.pad_before + (self.kernel - 1) * self.dilation + 1
        lo, hi = max(first, 0), min(end, size)
        return (lo, hi), (lo - first, end - hi)


def _geometry(call) -> tuple[list, list, list]:
    """(strides, dilation, (top, left, bottom, right) padding) of a windowed op's call."""
    if call.op.name == quantized_ops.CONV2D:
        attrs = quantized_ops.conv_attrs(quantized_ops.config_of(call, 5))
        return attrs["strides"], attrs["dilation"], attrs["padding"]
    return ([int(s) for s in call.attrs.strides], [int(d) for d in call.attrs.dilation],
            [int(p) for p in call.attrs.padding])


def windows(call) -> tuple[Window, Window]:
    """The (height, width) windows of a windowed op's call."""
    kernel = WINDOWED[call.op.name](call)
    strides, dilation, (top, left, bottom, right) = _geometry(call)
    return (Window(kernel[0], strides[0], dilation[0], top, bottom),
            Window(kernel[1], strides[-1], dilation[-1], left, right))


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The forward's bindings that compute `split` from the batch (in order), and the batch inputs they read."""
    split: relax.Var
    bindings: list
    inputs: list


class NotPatchable(ValueError):
    """Why a tensor cannot end a patched prefix."""


def _is(call, names) -> bool:
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name in names


def is_spatial_op(value) -> bool:
    """A call of an op of the tables (one patch_prefix knows)."""
    return _is(value, WINDOWED) or _is(value, POINTWISE)


def _is_nchw(var) -> bool:
    return isinstance(var.ty, relax.TensorType) and var.ty.shape is not None and len(var.ty.shape) == 4


def _spatially_broadcast(arg) -> bool:
    """An operand the same at every pixel: a scalar, a per-channel (C, 1, 1) or (1, C, 1, 1) tensor, a
    PrimValue, an int8 operator's integer configuration (an int64 constant)."""
    if not isinstance(arg.ty, relax.TensorType):
        return True
    if isinstance(arg, tvm.ir.expr.Constant) and str(arg.ty.dtype) == "int64" and len(arg.ty.shape) == 1:
        return True
    shape = static_shape(arg)
    return len(shape) == 0 or (len(shape) == 1 and shape[0] == 1) or (len(shape) >= 2 and shape[-2:] == [1, 1])


def prefix_of(func, split: relax.Var, n_inputs: int) -> Prefix:
    """The prefix `split` ends, or NotPatchable saying why (see Prefixes)."""
    return Prefixes(func, n_inputs).ending_at(split)


class Prefixes:
    """The prefixes of a function's forward: every op between the batch inputs (the function's
    first `n_inputs` parameters) and the prefix's last tensor (`split`) is in WINDOWED or POINTWISE
    and works on NCHW tensors, and nothing but the prefix reads its tensors (the backward, other
    branches), so that computing them a patch at a time changes nothing else. What every prefix
    needs of the function is read once: asking for each tensor of a forward is cheap."""

    def __init__(self, func, n_inputs: int):
        self.func = func
        self.bindings = bindings_of(func)
        self.position = {b.var: i for i, b in enumerate(self.bindings)}
        self.forward_end = backward_start(self.bindings)
        self.batch = set(func.params[:n_inputs])
        self.reads = {b.var: relax.analysis.free_vars(b.value) for b in self.bindings}
        self.depends = set(self.batch)
        for b in self.bindings:
            if any(v in self.depends for v in self.reads[b.var]):
                self.depends.add(b.var)
        self.readers = {}
        for b in self.bindings:
            for v in self.reads[b.var]:
                self.readers.setdefault(v, set()).add(b.var)
        self.returned = set(relax.analysis.free_vars(func.body.body))
        self.why_not = {}  # binding Var -> why its op cannot be patched (None: it can)

    def ending_at(self, split) -> Prefix:
        if split not in self.position or self.position[split] >= self.forward_end:
            raise NotPatchable(f"{split.name} is not a value of the forward")
        members, inputs, stack = set(), set(), [split]
        while stack:
            var = stack.pop()
            if var in self.batch:
                inputs.add(var)
                continue
            if var in members:
                continue
            members.add(var)
            if var not in self.why_not:
                try:
                    _check_op(var, self.bindings[self.position[var]].value, self.depends)
                    self.why_not[var] = None
                except NotPatchable as e:
                    self.why_not[var] = e
            if self.why_not[var] is not None:
                raise self.why_not[var]
            stack.extend(v for v in self.reads[var] if v in self.depends)
        for var in inputs:
            if not _is_nchw(var):
                raise NotPatchable(f"the prefix reads input {var.name}, which is not an NCHW image")
        for var in members - {split}:
            outside = self.readers.get(var, set()) - members
            if outside:
                raise NotPatchable(f"{next(iter(outside)).name} (outside the prefix) reads {var.name}")
            if var in self.returned:
                raise NotPatchable(f"the step returns {var.name}, a tensor of the prefix")
        return Prefix(split, [b for b in self.bindings if b.var in members],
                      [v for v in self.func.params if v in inputs])


def _check_op(var, value, depends):
    if not _is_nchw(var):
        raise NotPatchable(f"{var.name} is not an NCHW tensor")
    if _is(value, WINDOWED):
        if any(v in depends for arg in value.args[1:] for v in relax.analysis.free_vars(arg)):
            raise NotPatchable(f"{var.name}: {value.op.name} whose weights depend on the batch")
        if value.op.name == quantized_ops.CONV2D:
            return  # NCHW, no ceil mode
        attrs = value.attrs
        layout = str(getattr(attrs, "data_layout", None) or attrs.layout)
        if layout != "NCHW" or str(attrs.out_layout) != "NCHW" or bool(getattr(attrs, "ceil_mode", False)):
            raise NotPatchable(f"{var.name}: {value.op.name} in layout {layout} (or with ceil_mode)")
        return
    if not _is(value, POINTWISE):
        what = value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else type(value).__name__
        raise NotPatchable(f"{var.name} is computed by {what}, which patch_prefix does not know")
    for arg in value.args:
        spatial = any(v in depends for v in relax.analysis.free_vars(arg))
        if spatial and not (isinstance(arg, relax.Var) and static_shape(arg) == static_shape(var)):
            raise NotPatchable(f"{var.name}: {value.op.name} broadcasts a tensor of the batch")
        if not spatial and not _spatially_broadcast(arg):
            raise NotPatchable(f"{var.name}: {value.op.name} reads a constant that varies across pixels")


Region = tuple  # ((row start, row stop), (column start, column stop))


def tiles(height: int, width: int, grid: int) -> list[list[Region]]:
    """The split tensor's output tiles, grid x grid, row by row (sizes differ by at most one)."""
    rows = [(height * i // grid, height * (i + 1) // grid) for i in range(grid)]
    cols = [(width * j // grid, width * (j + 1) // grid) for j in range(grid)]
    return [[(r, c) for c in cols] for r in rows]


@dataclasses.dataclass
class PatchPlan:
    """What one patch computes: each prefix tensor's region (the union of what its readers need),
    the region each binding reads of each spatial operand, and each windowed op's padding."""
    region: dict  # Var -> Region
    reads: dict  # (binding Var, operand Var) -> Region
    padding: dict  # windowed binding Var -> (top, left, bottom, right)


def plan_patch(prefix: Prefix, tile: Region) -> PatchPlan:
    """Back from the split's `tile` through the prefix: the receptive field of the tile, tensor by tensor."""
    region, reads, padding = {prefix.split: tile}, {}, {}
    spatial = set(prefix.inputs) | {b.var for b in prefix.bindings}

    def need(binding_var, operand, r):
        reads[(binding_var, operand)] = r
        if operand in region:
            old = region[operand]
            r = tuple((min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(old, r))
        region[operand] = r

    for b in reversed(prefix.bindings):
        out = region[b.var]
        if _is(b.value, WINDOWED):
            data = b.value.args[0]
            height, width = static_shape(data)[2:]
            window_h, window_w = windows(b.value)
            rows, (top, bottom) = window_h.input_span(*out[0], height)
            cols, (left, right) = window_w.input_span(*out[1], width)
            padding[b.var] = (top, left, bottom, right)
            need(b.var, data, (rows, cols))
        else:
            for arg in b.value.args:
                if isinstance(arg, relax.Var) and arg in spatial:
                    need(b.var, arg, out)
    return PatchPlan(region, reads, padding)


def _with_padding(call, args, padding):
    """`call` on `args`, with its padding attribute replaced (an int8 convolution's in its configuration:
    it pads with its input's zero point, which the padding it is given keeps)."""
    if call.op.name == quantized_ops.CONV2D:
        config = quantized_ops.config_of(call, 5)
        config[6:10] = [int(p) for p in padding]
        return relax.Call(call.op, [*args[:5], quantized_ops.config_constant(config), *args[6:]], call.attrs,
                          call.ty_args)
    info = type(call.attrs).__tvm_ffi_type_info__
    fields = {f.name: getattr(call.attrs, f.name) for f in info.fields}
    fields["padding"] = [int(p) for p in padding]
    return relax.Call(call.op, args, tvm.ir.make_node(info.type_key, **fields), call.ty_args)


def _emit_patch(bb, prefix: Prefix, plan: PatchPlan, tag: str):
    """Emit one patch's computation; returns the split's tile."""
    have = {var: (var, ((0, static_shape(var)[2]), (0, static_shape(var)[3]))) for var in prefix.inputs}

    def read(binding_var, operand):
        expr, (rows, cols) = have[operand]
        want = plan.reads[(binding_var, operand)]
        if want == (rows, cols):
            return expr
        begin, end = [want[0][0] - rows[0], want[1][0] - cols[0]], [want[0][1] - rows[0], want[1][1] - cols[0]]
        return bb.emit(relax.op.strided_slice(expr, [2, 3], begin, end), f"{operand.name}_{tag}")

    for b in prefix.bindings:
        call = b.value
        if b.var in plan.padding:
            value = _with_padding(call, [read(b.var, call.args[0]), *call.args[1:]], plan.padding[b.var])
        else:
            args = [read(b.var, a) if (b.var, a) in plan.reads else a for a in call.args]
            value = relax.Call(call.op, args, call.attrs, call.ty_args)
        have[b.var] = (bb.emit(value, f"{b.var.name}_{tag}"), plan.region[b.var])
    return have[prefix.split][0]


def assemble_kernel(tile_shapes: list[list[list[int]]], dtype: str, name: str):
    """A kernel writing a grid of NCHW tiles (row by row) into one tensor: tile (i, j) at the
    rows and columns after the tiles above it and left of it."""
    grid_rows, grid_cols = len(tile_shapes), len(tile_shapes[0])
    parts = [[te.placeholder(tile_shapes[i][j], dtype, name=f"tile_{i}_{j}") for j in range(grid_cols)]
             for i in range(grid_rows)]
    row_starts = [sum(tile_shapes[k][0][2] for k in range(i)) for i in range(grid_rows + 1)]
    col_starts = [sum(tile_shapes[0][k][3] for k in range(j)) for j in range(grid_cols + 1)]
    n, c = tile_shapes[0][0][:2]

    def pixel(b, ch, h, w):
        value = None
        for i in reversed(range(grid_rows)):
            row = None
            for j in reversed(range(grid_cols)):
                here = parts[i][j](b, ch, h - row_starts[i], w - col_starts[j])
                row = here if row is None else tvm.tirx.if_then_else(w < col_starts[j + 1], here, row)
            value = row if value is None else tvm.tirx.if_then_else(h < row_starts[i + 1], row, value)
        return value

    out = te.compute((n, c, row_starts[-1], col_starts[-1]), pixel, name="assembled")
    return opaque_kernel([p for row in parts for p in row] + [out], name)


@step_pass("PatchPrefix", single_block=True)
def patch_prefix(split: relax.Var, grid: int, n_inputs: int, func_name: str = "train_step"):
    """Compute the prefix ending at `split` (a forward binding's Var; see prefix_of) on a grid x grid
    patch grid. Raises NotPatchable when `split` cannot end a patched prefix."""
    def rewrite(mod, func):
        prefix = prefix_of(func, split, n_inputs)
        height, width = static_shape(split)[2:]
        if not 1 <= grid <= min(height, width):
            raise NotPatchable(f"a {grid}x{grid} grid on a {height}x{width} tensor")
        members = {b.var for b in prefix.bindings}
        bb = relax.BlockBuilder()
        with bb.function(func_name, list(func.params), attrs=dict(func.attrs)):
            with bb.dataflow():
                for b in bindings_of(func):
                    if b.var.same_as(split):
                        _emit_patches(bb, prefix, split, grid, {gv.name_hint for gv in mod.functions})
                    elif b.var not in members:
                        bb.emit_normalized(b)
            bb.emit_func_output(func.body.body)
        built = bb.get()
        mod = with_function(mod, func_name, built[func_name])
        for gv, kernel in built.functions.items():
            if gv.name_hint != func_name:
                mod[gv] = kernel
        return mod

    return rewrite


def _emit_patches(bb, prefix: Prefix, split, grid: int, taken: set):
    """Emit every patch, row by row, and bind `split` to their tiles joined (by a kernel named
    apart from the module's functions, `taken`)."""
    height, width = static_shape(split)[2:]
    tile_vars = []
    for i, row in enumerate(tiles(height, width, grid)):
        tile_vars.append([_emit_patch(bb, prefix, plan_patch(prefix, tile), f"patch{i}_{j}")
                          for j, tile in enumerate(row)])
    shapes = [[static_shape(t) for t in row] for row in tile_vars]
    dtype = str(split.ty.dtype)
    base = f"assemble_patches_{grid}x{grid}_{'x'.join(map(str, static_shape(split)))}"
    name, copies = base, 0
    while name in taken:  # the pass applied again, to another prefix of the same shape
        copies += 1
        name = f"{base}_{copies}"
    kernel = bb.add_func(assemble_kernel(shapes, dtype, name), name)
    value = relax.call_tir(kernel, [t for row in tile_vars for t in row], relax.TensorType(static_shape(split), dtype))
    bb.emit_normalized(relax.VarBinding(split, bb.normalize(value)))
