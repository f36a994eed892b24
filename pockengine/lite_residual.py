"""TinyTL's lite residual modules (Cai et al., NeurIPS 2020): a cheap branch beside each frozen block.

    block(x)  ->  block(x) + upsample(branch(x))
    branch = avg-pool(downsample) -> conv k x k (groups, the block's stride, no bias) -> BatchNorm -> ReLU
             -> conv 1 x 1 (no bias) -> BatchNorm (its scale zero-initialised) ; upsampled bilinearly
             to the block's output size (as two products with the interpolation matrices)

The branch works at 1/downsample of the block's input resolution, so its activations cost a fraction
of the block's; its last BatchNorm starts at zero, so training starts from the model's own function
(as LoRA's B = 0 does). TinyTL trains the branches with the biases and keeps every weight of the model
frozen: `SparseUpdate.lite_residual(...)` does the same, and the job trains a copy of its model with
the branches added (`add_lite_residuals`), as `SparseUpdate.lora` does with adapters.

Where the branch's pooled resolution is too small for the kernel, the kernel shrinks by 2 until it
fits (TinyTL's rule); at one pixel the branch pools globally, its kernel is 1 x 1 and its output is
broadcast over the block's instead of upsampled.

The branch is registered under the block as `<block>.lite_residual` and added by a forward hook, so
every parameter of the model keeps its name (its state dict loads into the original model after
dropping the `lite_residual` entries, and torch.export traces the hook).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re

import numpy as np
import torch
from torch import nn

from .errors import JobError
from .frontend.torch import eval_mode

LITE_RESIDUAL = "lite_residual"
CHANNEL_DIVISOR = 8  # the branch's middle width is rounded to a multiple of this (TinyTL's make_divisible)


def _make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """MobileNet's rounding: the nearest multiple of `divisor`, at least `divisor`, and never below
    90% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class LiteResidualBranch(nn.Sequential):
    """The branch of one block (see the module docstring); `pooled_to_one` when it pools globally."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int, groups: int,
                 downsample: int | None, middle: int):
        pooling = nn.AdaptiveAvgPool2d(1) if downsample is None else nn.AvgPool2d(downsample, downsample)
        super().__init__()
        self.add_module("pooling", pooling)
        self.add_module("conv1", nn.Conv2d(in_channels, middle, kernel_size, stride, kernel_size // 2, groups=groups,
                                           bias=False))
        self.add_module("bn1", nn.BatchNorm2d(middle))
        self.add_module("act", nn.ReLU())
        self.add_module("conv2", nn.Conv2d(middle, out_channels, 1, bias=False))
        self.add_module("final_bn", nn.BatchNorm2d(out_channels))
        self.pooled_to_one = downsample is None


def _add_branch(block: nn.Module, args, output):
    """The forward hook: the block's output plus its branch's, upsampled to it."""
    branch = getattr(block, LITE_RESIDUAL)
    residual = branch(args[0])
    if not branch.pooled_to_one:
        residual = upsample_bilinear(residual, tuple(output.shape[2:]))
    return output + residual


def upsample_bilinear(x: torch.Tensor, size: tuple) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) as two products with its
    interpolation matrices (rows, then columns; the same values to rounding). Its backward is two
    products with their transposes, which keep nothing of the output's size: the decomposed
    interpolation gathers four corners of the output's size and its backward scatters each back."""
    # int(): under torch.export the sizes are symbolic, and neither a cache key nor a constant may
    # hold one past the trace (an eager forward after compile tripped over the dead shape guard)
    rows = torch.tensor(_bilinear_weights(int(x.shape[2]), int(size[0])), dtype=x.dtype, device=x.device)
    columns = torch.tensor(_bilinear_weights(int(x.shape[3]), int(size[1])), dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(rows, x), columns.T)


@functools.cache
def _bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in): the weights of bilinear interpolation along one axis, as PyTorch's
    upsample_bilinear2d takes them for an output size (half-pixel centres, scale in/out, the source
    coordinate clamped at 0 and its upper neighbour at the last pixel). Callers copy it."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), lower), 1.0 - (source - lower))
    np.add.at(weights, (np.arange(size_out), upper), source - lower)
    return weights


def default_blocks(model: nn.Module) -> list:
    """The model's blocks, as TinyTL picks them: the items of the shallowest numbered containers
    (`features.<i>`, `blocks.<i>`, `layer1.<i>`), those of their most common class (MobileNetV2's
    InvertedResidual, not its stem and last convolutions); when those items are plain containers of
    blocks (timm's stages), every item inside them (`blocks.<i>.<j>`); plain containers of layers
    (`nn.Sequential(conv, norm, activation)`) are the blocks themselves."""
    items = [(name, m) for name, m in model.named_modules() if re.fullmatch(r"(.+\.)?\d+", name)]
    if not items:
        return []
    depth = min(name.count(".") for name, _ in items)
    shallowest = [(name, m) for name, m in items if name.count(".") == depth]
    if all(type(m) in (nn.Sequential, nn.ModuleList) for _, m in shallowest) and any(
            next(child.children(), None) is not None for _, stage in shallowest for child in stage.children()):
        return [f"{name}.{child}" for name, stage in shallowest for child, _ in stage.named_children()]
    counts: dict = {}
    for _, m in shallowest:
        counts[type(m)] = counts.get(type(m), 0) + 1
    if not counts:
        return []
    common = max(counts, key=counts.get)
    return [name for name, m in shallowest if type(m) is common]


def _shapes(model: nn.Module, names: list, example_inputs: tuple) -> dict:
    """{block name: (input shape, output shape)} from one forward of `model` on the example inputs (in
    eval mode and without gradients: nothing of the model changes)."""
    shapes, handles = {}, []
    for name in names:
        def record(_m, args, output, name=name):
            if name not in shapes:  # a block called twice keeps its first call's shapes
                x = args[0] if args else None
                shapes[name] = (tuple(x.shape) if isinstance(x, torch.Tensor) else None,
                                tuple(output.shape) if isinstance(output, torch.Tensor) else None)
        handles.append(model.get_submodule(name).register_forward_hook(record))
    try:
        with torch.no_grad(), eval_mode(model):
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def check_arguments(kernel_size, groups, downsample, expand) -> None:
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not (whole(kernel_size) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise JobError(f"lite_residual: kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if not (whole(groups) and groups >= 1):
        raise JobError(f"lite_residual: groups must be an integer >= 1, got {groups!r}")
    if not (whole(downsample) and downsample >= 1):
        raise JobError(f"lite_residual: downsample must be an integer >= 1, got {downsample!r}")
    if not (isinstance(expand, (int, float)) and not isinstance(expand, bool) and expand > 0):
        raise JobError(f"lite_residual: expand must be a number > 0, got {expand!r}")


def add_lite_residuals(model: nn.Module, example_inputs, blocks=None, kernel_size: int = 5, groups: int = 2,
                       downsample: int = 2, expand: float = 1.0, seed: int = 0) -> list:
    """Add, in place, a lite residual branch beside each block of `model` (module names or globs in
    `blocks`; default: default_blocks) taking a 4-D feature map to a 4-D feature map. Returns the
    blocks' names. The branches' initial weights come from `seed` (Kaiming-normal convolutions, as
    TinyTL initialises them; the last BatchNorm's scale zero)."""
    check_arguments(kernel_size, groups, downsample, expand)
    modules = dict(model.named_modules())
    if blocks is None:
        names = default_blocks(model)
        if not names:
            raise JobError("lite_residual: the model has no numbered blocks (`features.<i>`, `blocks.<i>`) to put "
                           "branches beside; name them: SparseUpdate.lite_residual(blocks=['layer1.0', ...])")
    else:
        patterns = (blocks,) if isinstance(blocks, str) else tuple(blocks)
        names = [n for n in modules if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in modules if n)]
        if unmatched:
            raise JobError(f"lite_residual: blocks {unmatched} name no module of the model")
    already = [n for n in names if hasattr(modules[n], LITE_RESIDUAL)]
    if already:
        raise JobError(f"lite_residual: {already[0]} has a lite residual branch already")
    shapes = _shapes(model, names, tuple(example_inputs))
    generator = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    for name in names:
        in_shape, out_shape = shapes.get(name, (None, None))
        if in_shape is None:
            raise JobError(f"lite_residual: {name} is not called by the model's forward on the example inputs")
        if len(in_shape) != 4 or out_shape is None or len(out_shape) != 4:
            raise JobError(f"lite_residual: {name} maps {in_shape} to {out_shape}; a branch goes beside a block "
                           "taking a 4-D feature map [N, C, H, W] to another")
        stride = _stride(in_shape[2:], out_shape[2:])
        if stride is None:
            raise JobError(f"lite_residual: {name} maps {in_shape[2]}x{in_shape[3]} to {out_shape[2]}x{out_shape[3]}, "
                           "which no convolution stride does; a branch goes beside a block that keeps or "
                           "reduces the resolution")
        resolution = min(in_shape[2], in_shape[3]) // downsample
        size, pooling = kernel_size, downsample
        if resolution <= 1:
            size, pooling = 1, None
        else:
            while size > resolution:
                size -= 2
        middle = _make_divisible(in_shape[1] * expand)
        branch_groups = groups if in_shape[1] % groups == 0 and middle % groups == 0 else 1
        branch = LiteResidualBranch(in_shape[1], out_shape[1], stride, size, branch_groups, pooling, middle)
        _initialise(branch, generator)
        module = modules[name]
        if isinstance(module, nn.Sequential):  # its forward runs every child: it must pass the branch by
            _skip_the_branch_in_sequence(name, module)
        module.add_module(LITE_RESIDUAL, branch.to(dtype))
        module.register_forward_hook(_add_branch)
    return names


def _sequential_forward(self, x):
    for child_name, child in self._modules.items():
        if child_name != LITE_RESIDUAL:
            x = child(x)
    return x


def _skip_the_branch_in_sequence(name: str, block: nn.Sequential) -> None:
    """Give an nn.Sequential block (conv, norm, activation) a class whose forward runs its children
    but the branch (the hook adds that): the parameters keep their names, a wrapper would rename them."""
    cls = type(block)
    if cls.forward is not nn.Sequential.forward:
        raise JobError(f"lite_residual: {name} is a {cls.__name__}, an nn.Sequential with its own forward, and a "
                       "branch registered under it would change what that forward runs; name the modules around "
                       "or inside it instead (SparseUpdate.lite_residual(blocks=[...]))")
    block.__class__ = _SEQUENCES_WITH_BRANCH.setdefault(cls, type(cls.__name__, (cls,), {
        "forward": _sequential_forward, "__module__": cls.__module__}))


_SEQUENCES_WITH_BRANCH: dict = {}


def _stride(size_in, size_out) -> int | None:
    """The stride s of a block mapping size_in to size_out (ceil(size_in / s) == size_out, as a padded
    strided convolution does), the smallest that fits both axes, or None."""
    return next((s for s in range(1, max(size_in) + 1)
                 if all(-(-i // s) == o for i, o in zip(size_in, size_out))), None)


def _initialise(branch: LiteResidualBranch, generator: torch.Generator) -> None:
    for conv in (branch.conv1, branch.conv2):  # Kaiming normal, fan out (TinyTL's init_models)
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
        with torch.no_grad():
            conv.weight.normal_(0, math.sqrt(2.0 / fan_out), generator=generator)
    nn.init.zeros_(branch.final_bn.weight)


def is_lite_residual_parameter(name: str) -> bool:
    return f".{LITE_RESIDUAL}." in f".{name}"
