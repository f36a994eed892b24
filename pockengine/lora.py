"""LoRA adapters (Hu et al. 2021), as PEFT adds them: y = x W^T + b + (alpha / r) x A^T B^T.

`add_lora(model, r, targets)` replaces each nn.Linear whose name matches a target with a LoRALinear
that keeps the base weight and bias (same Parameter objects, same state_dict names) and adds two new
parameters, `<name>.lora_A` (r x in, Kaiming-uniform as PEFT initialises it) and `<name>.lora_B`
(out x r, zeros: training starts from the base model's function). `SparseUpdate.lora(...)` does this
to a copy of a job's model and trains only the adapters, so PockEngine's sparse updates and LoRA
compare under the same compiler; `merge(state_dict)` folds trained adapters back into the weights.
A 4-bit W4Linear (pockengine/awq.py) becomes a LoRAW4Linear the same way: QLoRA's setting, the
adapters in float beside a packed base they are never merged into; an int8 W8Linear
(pockengine/smoothquant.py) becomes a LoRAW8Linear, its adapters reading the layer's input before the
SmoothQuant scale and (W8A8) the rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .awq import W4Linear, module_name_matches, replace_module
from .errors import JobError
from .smoothquant import W8Linear

LORA_A, LORA_B = "lora_A", "lora_B"


def _add_adapters(module: nn.Module, r: int, alpha: float, dtype, generator: torch.Generator) -> None:
    module.r, module.scale = r, alpha / r
    # PEFT initialises A with kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(module.in_features)
    a = torch.empty(r, module.in_features, dtype=dtype).uniform_(-bound, bound, generator=generator)
    module.lora_A = nn.Parameter(a)
    module.lora_B = nn.Parameter(torch.zeros(module.out_features, r, dtype=dtype))


def _update(module: nn.Module, x):
    return nn.functional.linear(nn.functional.linear(x, module.lora_A), module.lora_B) * module.scale


class LoRALinear(nn.Module):
    """An nn.Linear plus a rank-r update; the base weight and bias are the original Parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        _add_adapters(self, r, alpha, base.weight.dtype, generator)

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) + _update(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale}"


class _QuantizedBaseLoRA:
    """LoRA beside a quantized base layer (mixed in before its class): the base's buffers and
    attributes under the same names, a rank-r update in float added to the base's output."""

    BASE_ATTRIBUTES: tuple = ()  # copied from the base besides in/out_features
    BASE_BUFFERS: tuple = ()
    SCALES: str = ""  # the buffer whose dtype the adapters take

    def __init__(self, base, r: int, alpha: float, generator: torch.Generator):
        nn.Module.__init__(self)
        for name in ("in_features", "out_features", *self.BASE_ATTRIBUTES):
            setattr(self, name, getattr(base, name))
        for name in self.BASE_BUFFERS:
            self.register_buffer(name, getattr(base, name))
        self.bias = base.bias
        _add_adapters(self, r, alpha, getattr(base, self.SCALES).dtype, generator)

    def forward(self, x):
        return super().forward(x) + _update(self, x)

    def as_float(self) -> LoRALinear:
        """A LoRALinear on the dequantized base, with these adapters (the same Parameters)."""
        adapted = LoRALinear(super().as_float(), self.r, self.r * self.scale, torch.Generator())
        adapted.scale, adapted.lora_A, adapted.lora_B = self.scale, self.lora_A, self.lora_B
        return adapted

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale}"


class LoRAW4Linear(_QuantizedBaseLoRA, W4Linear):
    """A 4-bit W4Linear (pockengine/awq.py: QLoRA's setting) plus a rank-r update in float; the packed
    weight, its scales and zero points are the base's buffers, under the same names."""

    BASE_ATTRIBUTES = ("group_size", "w_bit")
    BASE_BUFFERS = ("packed", "scales", "zeros", "input_scale")
    SCALES = "scales"


class LoRAW8Linear(_QuantizedBaseLoRA, W8Linear):
    """An int8 W8Linear (pockengine/smoothquant.py) plus a rank-r update in float; the int8 weight, its
    scales and the input scale are the base's buffers, under the same names. For a W8 base, as_float
    is a LoRALinear on the dequantized weight."""

    BASE_ATTRIBUTES = ("activations",)
    BASE_BUFFERS = ("weight_int8", "weight_scale", "input_scale")
    SCALES = "weight_scale"


def _adapted_class(module: nn.Module):
    """The LoRA class that adapts `module`, or None (not a linear layer, or adapted already)."""
    if isinstance(module, (LoRAW4Linear, LoRAW8Linear)):
        return None
    for kind, adapted in ((W4Linear, LoRAW4Linear), (W8Linear, LoRAW8Linear), (nn.Linear, LoRALinear)):
        if isinstance(module, kind):
            return adapted
    return None


def add_lora(model, r: int = 8, targets=("q_proj", "v_proj"), alpha: float | None = None, seed: int = 0) -> list:
    """Replace, in place, every nn.Linear of `model` whose name matches one of `targets` by a
    LoRALinear of rank `r` and scale alpha / r (alpha defaults to r: scale 1); a quantized base layer
    (W4Linear, W8Linear) by its LoRAW4Linear / LoRAW8Linear. Its base weight and
    bias stop requiring gradients. Returns the replaced modules' names. The adapters' initial values
    come from `seed`, so the same call on two copies of a model gives the same adapters."""
    if not isinstance(r, int) or r < 1:
        raise JobError(f"LoRA rank must be an integer >= 1, got {r!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    linears = [(name, m) for name, m in model.named_modules() if _adapted_class(m) is not None]
    chosen = [(name, m) for name, m in linears if any(module_name_matches(name, t) for t in targets)]
    if not chosen:
        names = ", ".join(name for name, _ in linears[:30]) + (" ..." if len(linears) > 30 else "")
        raise JobError(f"LoRA targets {list(targets)} match no nn.Linear of the model; its linear layers: {names}")
    generator = torch.Generator().manual_seed(seed)
    for name, base in chosen:
        if r > min(base.in_features, base.out_features):
            raise JobError(f"LoRA rank {r} exceeds {name}'s size ({base.out_features} x {base.in_features})")
        if isinstance(base, nn.Linear):
            base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        replace_module(model, name, _adapted_class(base)(base, r, float(r if alpha is None else alpha), generator))
    return [name for name, _ in chosen]


def merge(state_dict: dict, model) -> dict:
    """The state dict with each adapter folded into its weight (W + scale B A) and the adapter
    entries removed: loadable into the model without adapters. `model` is the one with the adapters
    (a LoRA job's `job.model`), which knows each adapter's scale."""
    merged = {k: v for k, v in state_dict.items() if not k.endswith((f".{LORA_A}", f".{LORA_B}"))}
    for name, module in model.named_modules():
        if isinstance(module, (LoRAW4Linear, LoRAW8Linear)):
            kind = "4-bit (quantize.awq)" if isinstance(module, LoRAW4Linear) else "int8 (quantize.smoothquant)"
            raise JobError(f"lora.merge: {name}'s base weight is {kind}; adding the adapters to it would round "
                           "them away. Keep the adapters beside the base (its state dict as it is)")
        if isinstance(module, LoRALinear):
            a, b = state_dict[f"{name}.{LORA_A}"], state_dict[f"{name}.{LORA_B}"]
            merged[f"{name}.weight"] = state_dict[f"{name}.weight"] + module.scale * (b @ a)
    return merged
