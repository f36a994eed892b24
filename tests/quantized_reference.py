"""The fake-quant reference of pockengine's int8 operators, from PyTorch's own operators: integer
values in float tensors, each rounding straight through (`v + (round(v) - v).detach()`), the
requantization an int64 computation whose gradient is the scale m / 2^n, the clip a `where` that
passes the gradient strictly inside its range. Written independently of pockengine/quantize.py and
frontend/quantized_ops.py, which the tests check against it (tests/test_quantize.py, the rule
audit)."""

import copy

import torch
from torch import nn

from pockengine import quantize as pe_quantize

F = torch.nn.functional


def ste_round(v):
    """Halves away from zero, straight through (floor(|v| + 1/2) is exact for |v| < 2^40 in float64)."""
    rounded = torch.where(v >= 0, torch.floor(v.detach() + 0.5), -torch.floor(-v.detach() + 0.5))
    return v + (rounded - v).detach()


def clipped(v, low, high):
    """clip(v), the gradient passed only where the result is strictly inside (low, high)."""
    c = v.clamp(low, high)
    return torch.where((c > low) & (c < high), v, c.detach())


def fixed_point_scale(acc, multiplier, shift):
    """(acc * m + 2^(n-1)) >> n, gradient acc * m / 2^n."""
    multiplier, shift = torch.as_tensor(multiplier).to(torch.int64), torch.as_tensor(shift).to(torch.int64)
    integer = acc.detach().to(torch.int64)
    value = torch.div(integer * multiplier + (1 << (shift - 1)), 2 ** shift, rounding_mode="floor")
    scaled = acc * (multiplier.to(acc.dtype) / torch.pow(2.0, shift.to(acc.dtype)))
    return scaled + (value.to(acc.dtype) - scaled).detach()


def quantize_ref(x, inv_scale, config):
    zero, qmin, qmax = config
    return clipped(ste_round(x * inv_scale) + zero, qmin, qmax)


def conv2d(x, weight, bias, multiplier, shift, config):
    zx, zy, qmin, qmax = config[:4]
    stride, (top, left, bottom, right), dilation, groups = config[4:6], config[6:10], config[10:12], config[12]
    acc = F.conv2d(F.pad(x - zx, (left, right, top, bottom)), ste_round(weight), None, stride, 0, dilation,
                   groups) + ste_round(bias).view(1, -1, 1, 1)
    y = fixed_point_scale(acc, multiplier.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)) + zy
    return clipped(y, qmin, qmax)


def add(a, b, config):
    z1, z2, zy, m1, m2, n, qmin, qmax = config
    y = fixed_point_scale((a - z1) * m1 + (b - z2) * m2, 1, n) + zy
    return clipped(y, qmin, qmax)


def mean(x):
    """Global average pooling, halves up (as (2 sum + count) // (2 count))."""
    m = x.mean(dim=(2, 3), keepdim=True)
    return m + (torch.floor(m.detach() + 0.5) - m).detach()


# ---------------------------------------------------------------- a quantized model's reference


class ReferenceQuantize(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.inv, self.config = 1.0 / m.scale, (m.zero, -128, 127)

    def forward(self, x):
        return quantize_ref(x, self.inv, self.config)


class ReferenceConv(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.weight, self.bias = m.weight, m.bias
        self.register_buffer("multiplier", m.multiplier)
        self.register_buffer("shift", m.shift)
        self.config = list(m.config)

    def forward(self, x):
        return conv2d(x, self.weight, self.bias, self.multiplier, self.shift, self.config)


class ReferenceAdd(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.config = list(m.config)

    def forward(self, a, b):
        return add(a, b, self.config)


class ReferenceMean(nn.Module):
    def __init__(self, _m):
        super().__init__()

    def forward(self, x):
        return mean(x)


def reference_of(qmodel):
    """The fake-quant reference of a quantized model: the same parameters and graph, each int8
    module replaced by its reference."""
    ref = copy.deepcopy(qmodel)
    kinds = {pe_quantize.Quantize: ReferenceQuantize, pe_quantize.QuantizedConv2d: ReferenceConv,
             pe_quantize.QuantizedAdd: ReferenceAdd, pe_quantize.QuantizedMean: ReferenceMean}
    for name, module in list(ref.named_modules()):
        if type(module) in kinds:
            pe_quantize.replace_module(ref, name, kinds[type(module)](module))
    return ref
