"""int8 training graphs (MCUNetV3): `pe.quantize.int8(model, calibration_batches)`.

    qmodel = pe.quantize.int8(model, [x1, x2, ...])        # a quantized copy; `model` is unchanged
    job = pe.TrainingJob(qmodel, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.05, qas=True),
                         sparse_update=pe.SparseUpdate.mcunetv3(...))

The copy computes what an int8 inference engine computes (TFLite's and CMSIS-NN's arithmetic, see
frontend/quantized_ops.py): each Conv2d, with the BatchNorm after it folded in and a ReLU or ReLU6
after that fused as the clip range, becomes a QuantizedConv2d of int8 weights (one scale per output
channel), int32 bias and a fixed-point requantization to int8 activations (one scale and zero point
per tensor, from the range the calibration batches reach); residual additions become QuantizedAdd,
global average pooling QuantizedMean. A Linear classifier stays float, on the dequantized features,
as in MCUNetV3. Any other operation runs in float between a dequantization and a quantization, so
every traceable model converts; the report (`quantize.describe(qmodel)`) says what became integer.

It is an ordinary torch module: PyTorch runs and trains it (the operators below have exact integer
forwards and MCUNetV3's straight-through backwards), and PockEngine compiles it, storing its
activations and frozen weights as int8 (passes/narrow_quantized.py). Weights and biases are
float Parameters holding integers, so a sparse scheme can train any of them; trained ones are
rounded in the forward (MCUNetV3's real-valued updates), frozen ones stay integers.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
from torch import nn

from .awq import replace_module
from .errors import JobError
from .rounding import round_half_away

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_MAX = 127  # symmetric weights: -127..127, as TFLite and CMSIS-NN keep them
MULTIPLIER_BITS = 31  # m in [2^30, 2^31): the effective scale's 31 significant bits
MAX_SHIFT = 62  # acc * m + 2^(n-1) stays inside int64 for |acc| < 2^31


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(acc * m + 2^(n-1)) >> n in int64 (CMSIS-NN's single rounding)."""
    acc, multiplier, shift = acc.to(torch.int64), multiplier.to(torch.int64), shift.to(torch.int64)
    return torch.bitwise_right_shift(acc * multiplier + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1),
                                     shift)


def fixed_point(scale: float) -> tuple[int, int]:
    """(m, n) with m / 2^n == scale to 31 significant bits, m in [2^30, 2^31)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise JobError(f"quantize: a requantization scale must be a positive number, got {scale}")
    fraction, exponent = math.frexp(scale)  # scale = fraction * 2^exponent, fraction in [0.5, 1)
    multiplier = round(fraction * (1 << MULTIPLIER_BITS))
    shift = MULTIPLIER_BITS - exponent
    if multiplier == 1 << MULTIPLIER_BITS:
        multiplier, shift = multiplier // 2, shift - 1
    if not 1 <= shift <= MAX_SHIFT:
        raise JobError(f"quantize: the requantization scale {scale:.3g} is outside what int64 fixed point "
                       f"holds (2^-31 .. 2^30); a layer whose output range is degenerate (all zero?) — "
                       "calibrate on batches that exercise it")
    return multiplier, shift


# ---------------------------------------------------------------- the operators (torch side)
# Integer-valued float tensors in, integer-valued float tensors out: a gradient flows through them.


@torch.library.custom_op("pockengine::quantize", mutates_args=())
def quantize_op(x: torch.Tensor, inv_scale: float, config: list[int]) -> torch.Tensor:
    zero, qmin, qmax = config
    scaled = x * torch.tensor(inv_scale, dtype=x.dtype)
    return (round_half_away(scaled) + zero).clamp(qmin, qmax)


@torch.library.custom_op("pockengine::quantized_conv2d", mutates_args=())
def quantized_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, multiplier: torch.Tensor,
                        shift: torch.Tensor, config: list[int]) -> torch.Tensor:
    zero_x, zero_y, qmin, qmax = config[:4]
    stride, (top, left, bottom, right), dilation, groups = config[4:6], config[6:10], config[10:12], config[12]
    centred = torch.nn.functional.pad((x.to(torch.float64) - zero_x), (left, right, top, bottom))
    # float64 holds every int32 sum exactly: the integer convolution, computed by PyTorch's kernel
    acc = torch.nn.functional.conv2d(centred, round_half_away(weight.to(torch.float64)), None, stride, 0,
                                     dilation, groups)
    acc = acc.to(torch.int64) + round_half_away(bias.to(torch.float64)).to(torch.int64).view(1, -1, 1, 1)
    y = requantize(acc, multiplier.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)) + zero_y
    return y.clamp(qmin, qmax).to(x.dtype)


@torch.library.custom_op("pockengine::quantized_add", mutates_args=())
def quantized_add_op(x1: torch.Tensor, x2: torch.Tensor, config: list[int]) -> torch.Tensor:
    zero_1, zero_2, zero_y, m1, m2, shift, qmin, qmax = config
    wide = (x1.to(torch.int64) - zero_1) * m1 + (x2.to(torch.int64) - zero_2) * m2
    y = torch.bitwise_right_shift(wide + (1 << (shift - 1)), shift) + zero_y
    return y.clamp(qmin, qmax).to(x1.dtype)


@torch.library.custom_op("pockengine::quantized_mean", mutates_args=())
def quantized_mean_op(x: torch.Tensor) -> torch.Tensor:
    count = x.shape[2] * x.shape[3]
    total = x.to(torch.int64).sum(dim=(2, 3), keepdim=True)
    return torch.div(2 * total + count, 2 * count, rounding_mode="floor").to(x.dtype)


@quantize_op.register_fake
def _(x, inv_scale, config):
    return torch.empty_like(x)


@quantized_conv2d_op.register_fake
def _(x, weight, bias, multiplier, shift, config):
    stride, (top, left, bottom, right), dilation = config[4:6], config[6:10], config[10:12]
    out_h = (x.shape[2] + top + bottom - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + left + right - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return x.new_empty((x.shape[0], weight.shape[0], out_h, out_w))


@quantized_add_op.register_fake
def _(x1, x2, config):
    return torch.empty_like(x1)


@quantized_mean_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1], 1, 1))


def _inside(y, low, high):
    return (y > low) & (y < high)


def _quantize_setup(ctx, inputs, output):
    ctx.inv_scale, ctx.bounds = inputs[1], inputs[2][1:]
    ctx.save_for_backward(output)


def _quantize_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch.where(_inside(y, *ctx.bounds), grad, torch.zeros_like(grad)) * ctx.inv_scale, None, None


def _conv_setup(ctx, inputs, output):
    x, weight, bias, multiplier, shift, config = inputs
    ctx.config = config
    ctx.save_for_backward(x, weight, multiplier, shift, output)


def _conv_backward(ctx, grad):
    x, weight, multiplier, shift, y = ctx.saved_tensors
    config = ctx.config
    scale = multiplier.to(grad.dtype) / torch.pow(2.0, shift.to(grad.dtype))
    grad = torch.where(_inside(y, config[2], config[3]), grad, torch.zeros_like(grad)) * scale.view(1, -1, 1, 1)
    stride, (top, left, _, _), dilation, groups = config[4:6], config[6:10], config[10:12], config[12]
    integer_weight = round_half_away(weight)
    x_grad = torch.nn.grad.conv2d_input(x.shape, integer_weight, grad, stride, (top, left), dilation, groups)
    w_grad = torch.nn.grad.conv2d_weight(x - config[0], weight.shape, grad, stride, (top, left), dilation, groups)
    return x_grad, w_grad, grad.sum(dim=(0, 2, 3)), None, None, None


def _add_setup(ctx, inputs, output):
    ctx.config = inputs[2]
    ctx.save_for_backward(output)


def _add_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    _, _, _, m1, m2, shift, qmin, qmax = ctx.config
    grad = torch.where(_inside(y, qmin, qmax), grad, torch.zeros_like(grad))
    return grad * (m1 / 2.0 ** shift), grad * (m2 / 2.0 ** shift), None


def _mean_setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _mean_backward(ctx, grad):
    return (grad / (ctx.shape[2] * ctx.shape[3])).expand(ctx.shape)


quantize_op.register_autograd(_quantize_backward, setup_context=_quantize_setup)
quantized_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)
quantized_add_op.register_autograd(_add_backward, setup_context=_add_setup)
quantized_mean_op.register_autograd(_mean_backward, setup_context=_mean_setup)


# ---------------------------------------------------------------- modules


class Quantize(nn.Module):
    """float -> int8 values (held in a float tensor): q = clip(round(x / scale) + zero)."""

    def __init__(self, scale: float, zero: int):
        super().__init__()
        self.scale, self.zero = float(scale), int(zero)

    def forward(self, x):
        return quantize_op(x, 1.0 / self.scale, [self.zero, INT8_MIN, INT8_MAX])

    def extra_repr(self):
        return f"scale={self.scale:.4g}, zero={self.zero}"


class Dequantize(nn.Module):
    """int8 values -> float: (q - zero) * scale."""

    def __init__(self, scale: float, zero: int):
        super().__init__()
        self.scale, self.zero = float(scale), int(zero)

    def forward(self, q):
        return (q - self.zero) * self.scale

    def extra_repr(self):
        return f"scale={self.scale:.4g}, zero={self.zero}"


class QuantizedConv2d(nn.Module):
    """A Conv2d (+ folded BatchNorm, + fused ReLU/ReLU6) on int8 activations.

    weight: integers in [-127, 127] (per-output-channel scale `weight_scale`), bias: int32 integers
    (scale input_scale * weight_scale); both float Parameters so that a sparse scheme can train them.
    `input_scale` and `weight_scale` are what QAS scales the gradients by (optim.SGD(qas=True))."""

    def __init__(self, weight, bias, conv: nn.Conv2d, input_qparams, output_qparams, weight_scale, clip):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.input_scale, self.zero_x = input_qparams
        self.output_scale, self.zero_y = output_qparams
        self.weight_scale = weight_scale.detach().to(torch.float64).clone()
        effective = (self.input_scale * self.weight_scale / self.output_scale).tolist()
        multiplier, shift = zip(*(fixed_point(s) for s in effective))
        self.register_buffer("multiplier", torch.tensor(multiplier, dtype=torch.int32))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.int32))
        padding = conv.padding if not isinstance(conv.padding, str) else _same_padding(conv)
        self.config = [int(v) for v in (self.zero_x, self.zero_y, *clip, *conv.stride,
                                        padding[0], padding[1], padding[0], padding[1], *conv.dilation, conv.groups)]

    def forward(self, x):
        return quantized_conv2d_op(x, self.weight, self.bias, self.multiplier, self.shift, self.config)

    def qas_gradient_scales(self) -> dict:
        """MCUNetV3's Quantization-Aware Scaling: the weight's gradient times s_w^-2 and the bias's
        times (s_x s_w)^-2, per output channel (what an int8 step moves matches the float weight's)."""
        return {"weight": (self.weight_scale ** -2).view(-1, 1, 1, 1),
                "bias": (self.input_scale * self.weight_scale) ** -2}

    def extra_repr(self):
        return (f"{self.weight.shape[1] * self.config[12]}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={tuple(self.config[4:6])}, "
                f"groups={self.config[12]}, clip={tuple(self.config[2:4])}")


class QuantizedAdd(nn.Module):
    """x1 + x2 on int8 activations of different scales (+ a fused ReLU)."""

    def __init__(self, first_qparams, second_qparams, output_qparams, clip):
        super().__init__()
        (s1, z1), (s2, z2), (sy, zy) = first_qparams, second_qparams, output_qparams
        # one shift for both: the larger ratio's, so that both multipliers keep 31 bits or fewer
        _, shift = fixed_point(max(s1, s2) / sy)
        self.config = [int(z1), int(z2), int(zy), round(s1 / sy * 2 ** shift), round(s2 / sy * 2 ** shift),
                       shift, *clip]

    def forward(self, x1, x2):
        return quantized_add_op(x1, x2, self.config)


class QuantizedMean(nn.Module):
    """Global average pooling of int8 activations (keeps their scale): N C H W -> N C 1 1."""

    def forward(self, x):
        return quantized_mean_op(x)


def scale_gradients_qas(model: nn.Module) -> None:
    """QAS in PyTorch: scale the gradients of `model`'s int8 layers in place, as optim.SGD(qas=True)
    does inside the compiled step (call between backward() and torch.optim.SGD's step())."""
    for module in model.modules():
        if hasattr(module, "qas_gradient_scales"):
            for name, factor in module.qas_gradient_scales().items():
                param = getattr(module, name)
                if param.grad is not None:
                    param.grad.mul_(factor.to(param.grad.dtype))


def _same_padding(conv: nn.Conv2d) -> tuple:
    if conv.padding == "valid":
        return (0, 0)
    return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))


# ---------------------------------------------------------------- conversion

_RELU = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_SHAPE_OPS = {"flatten", "reshape", "view", "squeeze", "contiguous"}
_ADDS = (operator.add, torch.add)


def int8(model: nn.Module, calibration_batches, *, input: str = "float", report: bool = False) -> nn.Module:
    """A quantized copy of `model` (a torch.fx-traceable nn.Module), its activation ranges
    calibrated on `calibration_batches` (input tensors, or tuples of the model's inputs; a few
    batches of real data). BatchNorm is folded with its running statistics, as an int8 engine
    folds it: the copy trains with BatchNorm frozen. `report`: print what became integer.

    input="float": the copy takes the model's float inputs and quantizes them itself. input="int8":
    it takes them quantized already, as int8 tensors (`quantize_input(qmodel, x)` makes them; a
    camera's pixels usually are, up to an offset): a microcontroller then holds its input batch in
    one byte per value instead of four."""
    batches = [b if isinstance(b, (tuple, list)) else (b,) for b in calibration_batches]
    if not batches:
        raise JobError("quantize.int8: give at least one calibration batch (the activation ranges come from it)")
    if input not in ("float", "int8"):
        raise JobError(f"quantize.int8: input must be 'float' or 'int8', got {input!r}")
    float_model = copy.deepcopy(model).eval()
    try:
        traced = torch.fx.symbolic_trace(float_model)
    except Exception as e:  # noqa: BLE001 - torch.fx raises whatever the model's forward raises while tracing
        raise JobError(f"quantize.int8: torch.fx cannot trace the model ({type(e).__name__}: {e}); "
                       "quantization rewrites the traced graph, so the forward must be traceable") from None
    ranges = _calibrate(traced, batches)
    converted = _Converter(traced, ranges, int8_inputs=input == "int8").run()
    if report:
        print(describe(converted))
    return converted


def quantize_input(qmodel: nn.Module, x: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Input `index` of a model made with input="int8", quantized as its calibration set: int8."""
    scale, zero = qmodel.input_qparams[index]
    return quantize_op(x.to(torch.float64), 1.0 / scale, [zero, INT8_MIN, INT8_MAX]).to(torch.int8)


def describe(qmodel: nn.Module) -> str:
    """What a quantized model computes in int8 and what stays float."""
    counts = getattr(qmodel, "quantization_counts", None)
    if counts is None:
        return "not a model made by pockengine.quantize.int8"
    parts = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    return f"int8: {parts}"


class _RangeRecorder(torch.fx.Interpreter):
    def __init__(self, module, ranges):
        super().__init__(module)
        self.ranges = ranges

    def run_node(self, node):
        value = super().run_node(node)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            low, high = float(value.min()), float(value.max())
            if not (math.isfinite(low) and math.isfinite(high)):
                raise JobError(f"quantize.int8: {node.name} ({node.target}) produced a non-finite value on a "
                               "calibration batch; calibrate on finite data")
            old = self.ranges.get(node.name)
            self.ranges[node.name] = (low, high) if old is None else (min(old[0], low), max(old[1], high))
        return value


def _calibrate(traced, batches) -> dict:
    ranges = {}
    recorder = _RangeRecorder(traced, ranges)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
    return ranges


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of an asymmetric int8 tensor covering [low, high] (and 0, which must be exact)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (INT8_MAX - INT8_MIN) if high > low else 1.0
    zero = int(max(INT8_MIN, min(INT8_MAX, round(INT8_MIN - low / scale))))
    return scale, zero


def _clip_of(node_or_module, scale: float, zero: int) -> tuple[int, int]:
    """The int8 range a fused activation leaves: ReLU from the zero point up, ReLU6 up to q(6)."""
    if node_or_module is None:
        return INT8_MIN, INT8_MAX
    if isinstance(node_or_module, nn.Hardtanh):
        low, high = node_or_module.min_val, node_or_module.max_val
    elif isinstance(node_or_module, nn.ReLU6):
        low, high = 0.0, 6.0
    else:
        low, high = 0.0, math.inf
    qmin = max(INT8_MIN, zero + math.ceil(low / scale - 0.5))
    qmax = INT8_MAX if math.isinf(high) else min(INT8_MAX, zero + round(high / scale))
    return qmin, qmax


class _Converter:
    """Rewrites a traced float graph into the quantized one, node by node."""

    def __init__(self, traced, ranges, int8_inputs: bool = False):
        self.traced, self.ranges, self.int8_inputs = traced, ranges, int8_inputs
        self.input_qparams = []  # (scale, zero) of each input taken as int8
        self.modules = dict(traced.named_modules())
        self.graph = torch.fx.Graph()
        self.env = {}  # old node -> (new node, (scale, zero) when it holds int8 values, else None)
        self.root = traced
        self.absorbed = set()
        self.counts = {"convolutions": 0, "additions": 0, "average pools": 0, "float operations": 0}
        self._names = 0

    def run(self) -> nn.Module:
        for node in self.traced.graph.nodes:
            if node in self.absorbed:
                continue
            handler = self._handler(node)
            handler(node)
        gm = torch.fx.GraphModule(self.root, self.graph, class_name="QuantizedModel")
        gm.quantization_counts = self.counts
        gm.input_qparams = self.input_qparams
        return gm

    # -- helpers

    def _module(self, node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _sole_user(self, node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def _fused_activation(self, node):
        """The ReLU / ReLU6 right after `node` (its only user), as a module, or None."""
        user = self._sole_user(node)
        if user is None:
            return None, None
        module = self._module(user)
        if isinstance(module, _RELU) and not (isinstance(module, nn.Hardtanh) and module.min_val > 0):
            return user, module
        if user.op == "call_function" and user.target in (torch.relu, torch.nn.functional.relu):
            return user, nn.ReLU()
        if user.op == "call_function" and user.target is torch.nn.functional.relu6:
            return user, nn.ReLU6()
        return None, None

    def _add_module(self, prefix: str, module: nn.Module) -> str:
        self._names += 1
        name = f"{prefix}_{self._names}"
        self.root.add_module(name, module)
        return name

    def _qparams(self, node):
        if node.name not in self.ranges:
            raise JobError(f"quantize.int8: no calibration range for {node.name}; did every batch run through it?")
        return activation_qparams(*self.ranges[node.name])

    def _as_int8(self, node):
        """The new node of `node`'s value as int8 (quantized now if it was float) and its qparams."""
        new, qparams = self.env[node]
        if qparams is not None:
            return new, qparams
        qparams = self._qparams(node)
        name = self._add_module("quantize", Quantize(*qparams))
        return self.graph.call_module(name, (new,)), qparams

    def _as_float(self, value):
        if isinstance(value, torch.fx.Node):
            new, qparams = self.env[value]
            if qparams is None:
                return new
            cache = ("float", value)
            if cache not in self.env:
                name = self._add_module("dequantize", Dequantize(*qparams))
                self.env[cache] = (self.graph.call_module(name, (new,)), None)
            return self.env[cache][0]
        if isinstance(value, (tuple, list)):
            return type(value)(self._as_float(v) for v in value)
        if isinstance(value, dict):
            return {k: self._as_float(v) for k, v in value.items()}
        return value

    # -- handlers

    def _handler(self, node):
        module = self._module(node)
        if node.op == "placeholder":
            return self._placeholder
        if node.op == "output":
            return self._output
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            return self._conv
        if self._is_int8(node.args[0] if node.args else None):
            if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs \
                    and all(self._is_int8(a) for a in node.args):
                return self._add
            if self._is_global_mean(node, module):
                return self._mean
            if (node.op == "call_method" and node.target in _SHAPE_OPS) or \
                    (node.op == "call_function" and node.target in (torch.flatten, torch.reshape, torch.squeeze)):
                return self._shape_op
        return self._float_op

    def _is_int8(self, value) -> bool:
        return isinstance(value, torch.fx.Node) and value in self.env and self.env[value][1] is not None

    def _is_global_mean(self, node, module) -> bool:
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return module.output_size in (1, (1, 1))
        if node.op == "call_function" and node.target is torch.nn.functional.adaptive_avg_pool2d:
            return node.args[1:2] in ((1,), ((1, 1),)) or node.kwargs.get("output_size") in (1, (1, 1))
        if (node.op == "call_method" and node.target == "mean") or \
                (node.op == "call_function" and node.target is torch.mean):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]
        return False

    def _placeholder(self, node):
        new = self.graph.node_copy(node)
        if not self.int8_inputs:
            self.env[node] = (new, None)
            return
        # int8 values in; the float tensor the operators read (the model's dtype: the first
        # parameter's, whatever .to() the copy gets later) is made inside, and only there.
        qparams = self._qparams(node)
        self.input_qparams.append(qparams)
        like = self.graph.get_attr(next(name for name, _ in self.traced.named_parameters()))
        self.env[node] = (self.graph.call_method("type_as", (new, like)), qparams)

    def _output(self, node):
        self.graph.output(self._as_float(node.args[0]))

    def _conv(self, node):
        conv = self._module(node)
        x, in_qparams = self._as_int8(node.args[0])
        weight = conv.weight.detach().to(torch.float64)
        bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(weight.shape[0],
                                                                                             dtype=torch.float64)
        last = node
        bn_node = self._sole_user(node)
        bn = self._module(bn_node) if bn_node is not None else None
        if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None:
            gain = (bn.weight.detach().to(torch.float64) if bn.affine else 1.0) / torch.sqrt(
                bn.running_var.to(torch.float64) + bn.eps)
            shift = bn.bias.detach().to(torch.float64) if bn.affine else 0.0
            weight = weight * gain.view(-1, 1, 1, 1)
            bias = (bias - bn.running_mean.to(torch.float64)) * gain + shift
            self.absorbed.add(bn_node)
            last = bn_node
        act_node, activation = self._fused_activation(last)
        if act_node is not None:
            self.absorbed.add(act_node)
            last = act_node
        out_qparams = self._qparams(last)
        weight_scale = weight.abs().amax(dim=(1, 2, 3)) / WEIGHT_MAX
        weight_scale = torch.where(weight_scale > 0, weight_scale, torch.ones_like(weight_scale))
        int_weight = round_half_away(weight / weight_scale.view(-1, 1, 1, 1)).clamp(-WEIGHT_MAX, WEIGHT_MAX)
        int_bias = round_half_away(bias / (in_qparams[0] * weight_scale)).clamp(-2 ** 31, 2 ** 31 - 1)
        dtype = conv.weight.dtype
        clip = _clip_of(activation, *out_qparams)
        module = QuantizedConv2d(int_weight.to(dtype), int_bias.to(dtype), conv, in_qparams, out_qparams,
                                 weight_scale, clip)
        self.root.get_submodule(node.target)  # the conv's own path: the state_dict keeps its names
        replace_module(self.root, node.target, module)
        self.env[last] = (self.graph.call_module(node.target, (x,)), out_qparams)
        self.counts["convolutions"] += 1

    def _add(self, node):
        (a, qa), (b, qb) = self._as_int8(node.args[0]), self._as_int8(node.args[1])
        act_node, activation = self._fused_activation(node)
        last = act_node or node
        if act_node is not None:
            self.absorbed.add(act_node)
        out_qparams = self._qparams(last)
        name = self._add_module("add", QuantizedAdd(qa, qb, out_qparams, _clip_of(activation, *out_qparams)))
        self.env[last] = (self.graph.call_module(name, (a, b)), out_qparams)
        self.counts["additions"] += 1

    def _mean(self, node):
        x, qparams = self.env[node.args[0]]
        name = self._add_module("mean", QuantizedMean())
        pooled = self.graph.call_module(name, (x,))
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if (node.op == "call_method" and node.target == "mean") or node.target is torch.mean:
            if not keepdim:
                pooled = self.graph.call_function(torch.flatten, (pooled, 1))
        self.env[node] = (pooled, qparams)
        self.counts["average pools"] += 1

    def _shape_op(self, node):
        self.env[node] = (self.graph.node_copy(node, lambda n: self.env[n][0]), self.env[node.args[0]][1])

    def _float_op(self, node):
        self.env[node] = (self.graph.node_copy(node, self._as_float), None)
        if node.op in ("call_module", "call_function", "call_method"):
            self.counts["float operations"] += 1


# 4-bit weights (AWQ) and W8A8 (SmoothQuant) are made in awq.py and smoothquant.py; pe.quantize is
# where a user looks for them.
from .awq import W4Linear, awq, dequantized, rtn  # noqa: E402, F401
from .smoothquant import W8Linear, smoothquant, w8a8  # noqa: E402, F401
