"""8-bit frozen bases (SmoothQuant, Xiao et al. 2023): `pe.quantize.smoothquant(model, calibration_batches)`.

    base = pe.quantize.smoothquant(model, [ids1, ids2], alpha=0.5, sparse_update=pe.SparseUpdate.last_blocks(2))
    job = pe.TrainingJob(base, (ids,), ids, loss, pe.optim.AdamW(1e-4), sparse_update=pe.SparseUpdate.last_blocks(2))

Each frozen nn.Linear (not in `skip`, not tied, not trained by `sparse_update`) gets int8 weights, one
scale per output channel (symmetric: w = q s_w, q in -127..127), and becomes a W8Linear of one of two
kinds:
- **W8A8**, where the forward runs before the first trained layer (the order of the calibration
  forward): no activation is saved there for the backward, so the input is quantized too, per token
  and dynamically (s_t = max_k |x_tk| / 127, at least 1e-5 / 127; q = round(x / s_t), halves away
  from zero), the product summed in int32 and scaled back: y = (q_x q_w^T) s_t s_w + b.
- **W8**, where the backward passes through (its data gradient is needed): the weight alone is int8,
  y = x (q_w s_w)^T + b, and dX = dY (q_w s_w) is exactly the forward's gradient.
Without a `sparse_update` every layer is W8A8 (the base is only run forward).

SmoothQuant moves the activations' outlier channels into the weights first: the linears that read the
same tensor share s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (j an input channel, the maxima over
the calibration tokens and over those linears' weights), the weights become W diag(s) and the input
x diag(s)^-1, folded into the norm before where nothing else reads it (checked as AWQ's folding is,
pockengine/awq.py), else kept as W8Linear.input_scale. `w8a8(model)` is the same format without
smoothing: SmoothQuant's baseline.

PyTorch runs and trains the copy (pockengine::w8a8_matmul computes the integer product exactly, in
float64, and has a straight-through gradient for x; pockengine::w8_matmul is the weight-only kind);
PockEngine compiles it with the weights held as int8 (frontend/w8_ops.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .awq import (
    _call,
    _chosen_linears,
    _fold_into_norms,
    _record_inputs,
    _trained_linears,
    _trained_parameters,
    module_name_matches,
    replace_module,
)
from .errors import JobError
from .frontend.torch import eval_mode
from .rounding import round_half_away

INT8_MAX = 127
TOKEN_SCALE_FLOOR = 1e-5  # SmoothQuant's clamp on a token's max |x| (an all-zero row)


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """s_t = max(max_k |x_tk|, 1e-5) / 127, per token (x's last axis is the channels), x's dtype."""
    return x.abs().amax(dim=-1, keepdim=True).clamp(min=TOKEN_SCALE_FLOOR) / INT8_MAX


def quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """round(x / s_t) in -127..127, as x's dtype (integers)."""
    return round_half_away(x / token_scales(x)).clamp(-INT8_MAX, INT8_MAX)


def quantize_rows(weight: torch.Tensor):
    """(q int8 [N, K], s_w [N]): symmetric per output channel, s_w = max|w_n| / 127 (at least 1e-8)."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / INT8_MAX
    return round_half_away(weight / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scales


# ---------------------------------------------------------------- the operators (torch side)


@torch.library.custom_op("pockengine::w8a8_matmul", mutates_args=())
def w8a8_matmul_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(round(x / s_t) q_w^T) s_t s_w: the int32 sums computed exactly (float64 holds them)."""
    s_t = token_scales(x)
    acc = quantize_tokens(x).to(torch.float64) @ weight.to(torch.float64).T
    return acc.to(x.dtype) * s_t * scales.to(x.dtype)


@torch.library.custom_op("pockengine::w8_matmul", mutates_args=())
def w8_matmul_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (q_w s_w)^T."""
    return x @ (weight.to(x.dtype) * scales.to(x.dtype)[:, None]).T


@w8a8_matmul_op.register_fake
def _(x, weight, scales):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@w8_matmul_op.register_fake
def _(x, weight, scales):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    _, weight, scales = inputs
    ctx.save_for_backward(weight, scales)


def _backward(ctx, grad):
    """dX = dY (q_w s_w): exact for W8, straight through the activations' rounding for W8A8."""
    weight, scales = ctx.saved_tensors
    return grad @ (weight.to(grad.dtype) * scales.to(grad.dtype)[:, None]), None, None


w8a8_matmul_op.register_autograd(_backward, setup_context=_setup)
w8_matmul_op.register_autograd(_backward, setup_context=_setup)


class W8Linear(nn.Module):
    """y = (x * input_scale) (q_w s_w)^T + b with int8 q_w; `activations` "int8" (W8A8: x quantized per
    token) or "float" (W8: weight-only). Buffers: `weight_int8` [out, in], `weight_scale` [out],
    `input_scale` [in] (absent once folded). `bias` is the original float Parameter."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None,
                 input_scale: torch.Tensor | None, activations: str):
        super().__init__()
        if activations not in ("int8", "float"):
            raise ValueError(f"W8Linear: activations must be 'int8' or 'float', got {activations!r}")
        self.out_features, self.in_features = q.shape
        self.activations = activations
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", scales.detach().clone())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().clone())
        self.bias = bias

    def forward(self, x):
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        op = w8a8_matmul_op if self.activations == "int8" else w8_matmul_op
        y = op(x, self.weight_int8, self.weight_scale.to(x.dtype))
        return y if self.bias is None else y + self.bias

    def weight(self, dtype=None) -> torch.Tensor:
        """The float weight the layer's input is multiplied by (the activations' rounding aside)."""
        dtype = dtype or self.weight_scale.dtype
        weight = self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]
        return weight if self.input_scale is None else weight * self.input_scale.to(dtype)

    def as_float(self) -> nn.Module:
        """For a W8 layer, the nn.Linear of the same function (dequantized weight, same bias Parameter);
        a W8A8 layer has none (its input is rounded)."""
        if self.activations == "int8":
            raise JobError("W8Linear.as_float: a W8A8 layer rounds its input; it has no float equivalent")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.weight_scale.dtype)
        linear.weight = nn.Parameter(self.weight(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        kind = "W8A8" if self.activations == "int8" else "W8"
        scaled = ", input scaled" if self.input_scale is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, " \
               f"bias={self.bias is not None}{scaled}"


# ---------------------------------------------------------------- the conversion


def smooth_scales(x: torch.Tensor, weights: list, alpha: float) -> torch.Tensor:
    """s_j = max_t |x_tj|^alpha / max over the weights' rows |w_nj|^(1 - alpha), at least 1e-5
    (SmoothQuant's smooth_ln_fcs)."""
    act_max = x.abs().amax(dim=0).to(weights[0].dtype)
    weight_max = torch.cat([w.abs() for w in weights], dim=0).amax(dim=0).clamp(min=1e-5)
    return (act_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)


def smoothquant(model: nn.Module, calibration_batches, *, alpha: float = 0.5, skip=("lm_head",),
                sparse_update=None, smooth: bool = True, fold: bool = True, max_tokens: int = 4096) -> nn.Module:
    """A copy of `model` with its frozen linears in int8 (see the module docstring); `alpha` is
    SmoothQuant's migration strength (0.5 for most models, up to 0.8-0.9 for some), `smooth=False`
    plain W8A8."""
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise JobError(f"quantize.smoothquant: alpha must be a number in [0, 1], got {alpha!r}")
    batches = list(calibration_batches or ())
    if not batches:
        raise JobError("quantize.smoothquant: give at least one calibration batch (the activation ranges, and "
                       "which layers run before the first trained one, come from it)")
    quantized = copy.deepcopy(model)
    trained = _trained_linears(quantized, sparse_update)
    chosen = {name: m for name, m in _chosen_linears(quantized, skip).items() if name not in trained}
    if not chosen:
        raise JobError("quantize.smoothquant: the model has no frozen nn.Linear to quantize")
    inputs, groups = _record_inputs(quantized, chosen, batches, max_tokens)
    before_training = _run_before_training(quantized, chosen, sparse_update, batches[0])
    for group in groups:
        weights = [chosen[name].weight.detach() for name in group]
        scale = smooth_scales(inputs[group[0]], weights, alpha) if smooth else None
        for name in group:
            linear = chosen[name]
            weight = linear.weight.detach() * (scale if scale is not None else 1)
            q, scales = quantize_rows(weight)
            replace_module(quantized, name, W8Linear(q, scales, linear.bias, None if scale is None else 1 / scale,
                                               "int8" if name in before_training else "float"))
    if fold and smooth:
        _fold_into_norms(quantized, groups, batches[0])
    return quantized


def w8a8(model: nn.Module, calibration_batches, *, skip=("lm_head",), sparse_update=None) -> nn.Module:
    """The same int8 format without smoothing: SmoothQuant's baseline."""
    return smoothquant(model, calibration_batches, skip=skip, sparse_update=sparse_update, smooth=False)


def _run_before_training(model: nn.Module, chosen: dict, sparse_update, batch) -> set:
    """Names of the `chosen` linears whose first call comes before the first call of any module
    holding a parameter `sparse_update` trains (all of them without a scheme)."""
    if sparse_update is None:
        return set(chosen)
    trained_modules = _modules_with_trained_parameters(model, sparse_update)
    order: list = []
    handles = [module.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
               for name, module in model.named_modules() if name in chosen or name in trained_modules]
    try:
        with eval_mode(model), torch.no_grad():
            _call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    first_trained = next((i for i, name in enumerate(order) if name in trained_modules), len(order))
    return {name for name in order[:first_trained] if name in chosen}


def _modules_with_trained_parameters(model: nn.Module, sparse_update) -> set:
    if sparse_update.lora_spec is not None:  # the adapters go beside the targets: those train
        targets = sparse_update.lora_spec["targets"]
        return {name for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and any(module_name_matches(name, t) for t in targets)}
    return {name.rpartition(".")[0] for name in _trained_parameters(model, sparse_update)}
