"""4-bit frozen weights (AWQ, Lin et al. 2024): `pe.quantize.awq(model, calibration_batches)`.

    base = pe.quantize.awq(model, [ids1, ids2, ...], w_bit=4, group_size=128)  # a copy; `model` unchanged
    job = pe.TrainingJob(base, (ids,), ids, loss, pe.optim.AdamW(1e-3), sparse_update=pe.SparseUpdate.lora(8))

Each nn.Linear of the copy (but those named in `skip` and those whose weight another module shares,
such as an LM head tied to the embedding) becomes a W4Linear: its weight as unsigned 4-bit integers
q, two to a byte, with one scale s and one zero point z per row and group of `group_size` input
channels (asymmetric: w = (q - z) s, q and z in 0..15, AWQ's and llm-awq's format). Its bias stays a
float Parameter, so a scheme may still train it.

Before rounding, AWQ protects the input channels that carry large activations:
- **scales.** The linears that read the same tensor (q, k and v after a norm, gate and up) share a
  per-input-channel scale S = mean|x|^a, normalised by sqrt(max S * min S); a is taken from AWQ's
  grid 0, 1/20, ..., 19/20 to minimise the squared error of those linears' outputs on the
  calibration tokens when their weights are W S rounded and the inputs x / S. llm-awq measures the
  error at the output of the enclosing block (the attention, the MLP); a model-agnostic compiler
  sees the linears, not the blocks, so it measures them. a = 0 is round-to-nearest: the chosen
  scales are never worse than it on the calibration set.
- **clipping.** Each row and group of the scaled weight is clipped to [-m, m], m the group's largest
  |w| times 1, 0.95, ..., 0.55, whichever minimises the squared error of that group's partial dot
  products over up to 512 calibration tokens (llm-awq's auto_clip); the query and key projections,
  whose errors attention does not weigh by magnitude, are not clipped, as in llm-awq.
- **folding.** 1 / S multiplies the linears' input (W4Linear.input_scale). Where that input is the
  output of a norm (a module with a per-channel weight, such as LayerNorm or RMSNorm) that nothing
  else reads, 1 / S is folded into the norm's weight and bias instead, and checked: the model must
  compute the same outputs on a calibration batch, else the fold is undone. Folding changes how the
  norm's weight is parametrised: pass fold=False when a scheme trains the norms.

`rtn(model)` is the same format by plain round-to-nearest (no calibration): AWQ's baseline.

PyTorch runs and trains the copy (pockengine::w4_matmul dequantizes in float and has x's gradient,
never a weight gradient); PockEngine compiles it with the weights kept packed (frontend/w4_ops.py).
"""

from __future__ import annotations

import copy
import fnmatch
import math

import torch
from torch import nn

from .errors import JobError
from .frontend.torch import eval_mode

AWQ_GRID = 20  # llm-awq's n_grid, for the scale exponent and for the clipping ratio
MAX_SHRINK = 0.5  # clipping tries ratios 1 - i / AWQ_GRID while i < MAX_SHRINK * AWQ_GRID
CLIP_TOKENS = 512  # llm-awq's n_sample_token
NOT_CLIPPED = ("q_proj", "k_proj", "query", "key")  # llm-awq skips q and k (attention scores)


# ---------------------------------------------------------------- the format


def group_count(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def quantize_groups(weight: torch.Tensor, w_bit: int, group_size: int):
    """(q, scales, zeros) of `weight` [N, K], asymmetric per row and group of `group_size` columns (the
    last group may be shorter): s = max(max - min, 1e-5) / (2^b - 1), z = clamp(-round(min / s), 0,
    2^b - 1), q = clamp(round(w / s) + z, 0, 2^b - 1), llm-awq's pseudo_quantize_tensor. q and z are
    uint8, the scales `weight`'s dtype; `round` is torch.round (halves to even)."""
    n, k = weight.shape
    top = 2 ** w_bit - 1
    groups = _grouped(weight, group_size)  # [N, G, group_size], the last group padded with its own values
    high, low = groups.amax(dim=-1), groups.amin(dim=-1)
    scales = (high - low).clamp(min=1e-5) / top
    zeros = (-torch.round(low / scales)).clamp(0, top)
    q = torch.clamp(torch.round(weight / _per_column(scales, group_size, k)) + _per_column(zeros, group_size, k),
                    0, top)
    return q.to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype=None) -> torch.Tensor:
    """(q - z) s per column's group: the float weight [N, K] of `q` [N, K]."""
    dtype = dtype or scales.dtype
    k = q.shape[1]
    return ((q.to(dtype) - _per_column(zeros, group_size, k).to(dtype)) * _per_column(scales, group_size, k).to(dtype))


def fake_quantize(weight: torch.Tensor, w_bit: int, group_size: int) -> torch.Tensor:
    return dequantize_groups(*quantize_groups(weight, w_bit, group_size), group_size, weight.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, ceil(K / 2)] bytes: column 2j in the low nibble, 2j + 1 in the high."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    low, high = packed & 15, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def _per_column(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size]; a shorter last group padded with its first column (min and max unchanged)."""
    n, k = weight.shape
    short = group_count(k, group_size) * group_size - k
    if short:
        filler = weight[:, k - (k % group_size):k - (k % group_size) + 1].expand(n, short)
        weight = torch.cat([weight, filler], dim=1)
    return weight.reshape(n, -1, group_size)


# ---------------------------------------------------------------- the operator (torch side)


@torch.library.custom_op("pockengine::w4_matmul", mutates_args=())
def w4_matmul_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x @ W^T, W = (q - z) s dequantized from the packed 4-bit weight, in x's dtype."""
    weight = dequantize_groups(unpack_int4(packed, x.shape[-1]), scales, zeros, group_size, x.dtype)
    return x @ weight.T


@w4_matmul_op.register_fake
def _(x, packed, scales, zeros, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _w4_setup(ctx, inputs, output):
    x, packed, scales, zeros, group_size = inputs
    ctx.group_size, ctx.in_features = group_size, x.shape[-1]
    ctx.save_for_backward(packed, scales, zeros)


def _w4_backward(ctx, grad):
    packed, scales, zeros = ctx.saved_tensors
    weight = dequantize_groups(unpack_int4(packed, ctx.in_features), scales, zeros, ctx.group_size, grad.dtype)
    return grad @ weight, None, None, None, None


w4_matmul_op.register_autograd(_w4_backward, setup_context=_w4_setup)


@torch.library.custom_op("pockengine::w4_embedding", mutates_args=())
def w4_embedding_op(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, dim: int) -> torch.Tensor:
    """Rows `ids` of the 4-bit table W [vocabulary, dim], dequantized: W[ids] in the scales' dtype."""
    rows = ids.reshape(-1)
    values = dequantize_groups(unpack_int4(packed[rows], dim), scales[rows], zeros[rows], group_size)
    return values.reshape(*ids.shape, dim)


@w4_embedding_op.register_fake
def _(ids, packed, scales, zeros, group_size, dim):
    return scales.new_empty((*ids.shape, dim))


class W4Linear(nn.Module):
    """y = (x * input_scale) W^T + b, W = (q - z) s held packed (two 4-bit values a byte).

    Buffers: `packed` uint8 [out, ceil(in / 2)], `scales` [out, groups] (float), `zeros` uint8
    [out, groups], `input_scale` [in] (absent once folded into the norm before). `bias` is the
    original float Parameter."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: nn.Parameter | None, input_scale: torch.Tensor | None, w_bit: int = 4):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size, self.w_bit = int(group_size), int(w_bit)
        self.register_buffer("packed", pack_int4(q))
        self.register_buffer("scales", scales.detach().clone())
        self.register_buffer("zeros", zeros.to(torch.uint8))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().clone())
        self.bias = bias

    def forward(self, x):
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        y = w4_matmul_op(x, self.packed, self.scales.to(x.dtype), self.zeros, self.group_size)
        return y if self.bias is None else y + self.bias

    def weight(self, dtype=None) -> torch.Tensor:
        """The float weight this layer multiplies its own input by: (q - z) s, times input_scale."""
        dtype = dtype or self.scales.dtype
        weight = dequantize_groups(unpack_int4(self.packed, self.in_features), self.scales, self.zeros,
                                   self.group_size, dtype)
        return weight if self.input_scale is None else weight * self.input_scale.to(dtype)

    def as_float(self) -> nn.Module:
        """The nn.Linear of this layer's dequantized weight (frozen) and its bias (the same Parameter)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.scales.dtype)
        linear.weight = nn.Parameter(self.weight(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        scaled = ", input scaled" if self.input_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bit={self.w_bit}, "
                f"group_size={self.group_size}, bias={self.bias is not None}{scaled}")


class W4Embedding(nn.Module):
    """An nn.Embedding whose table is 4-bit, in W4Linear's format (rows: tokens, groups along the
    embedding dimension). Tied to an LM head (`head`), it reads the head's buffers: one copy of the
    table, as a tied float model has (its state dict names the table once, under the head). Frozen:
    no gradient reaches the table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx, head: W4Linear | None = None,
                 q: torch.Tensor | None = None, scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                 group_size: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        if head is not None:
            object.__setattr__(self, "tied_head", head)  # not a submodule: its buffers are the head's
            self.group_size = head.group_size
        else:
            self.tied_head = None
            self.group_size = int(group_size)
            self.register_buffer("packed", pack_int4(q))
            self.register_buffer("scales", scales.detach().clone())
            self.register_buffer("zeros", zeros.to(torch.uint8))

    def _table(self):
        return self.tied_head if self.tied_head is not None else self

    def forward(self, ids):
        table = self._table()
        return w4_embedding_op(ids, table.packed, table.scales, table.zeros, self.group_size, self.embedding_dim)

    def as_float(self) -> nn.Module:
        """The nn.Embedding of the dequantized table (frozen)."""
        table = self._table()
        weight = dequantize_groups(unpack_int4(table.packed, self.embedding_dim), table.scales, table.zeros,
                                   self.group_size)
        return nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        tied = ", tied to the LM head" if self.tied_head is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, w_bit=4, group_size={self.group_size}{tied}"


def dequantized(model: nn.Module) -> nn.Module:
    """A copy of `model` with each layer of a weight-only format (a W4Linear, a W8 W8Linear)
    replaced by the nn.Linear of its dequantized weight: the same function in float, the reference a
    fine-tune on such a base is compared against. W8A8 layers, which round their input, stay."""
    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if callable(getattr(module, "as_float", None)) and getattr(module, "activations", "float") == "float":
            replace_module(copied, name, module.as_float())
    return copied


# ---------------------------------------------------------------- the searches


def search_scale(x: torch.Tensor, weights: list, w_bit: int, group_size: int, grid: int = AWQ_GRID):
    """(S, a, errors) for linears of `weights` [N_i, K] reading `x` [T, K]: S = mean|x|^a normalised,
    a in 0, 1/grid, ... minimising the mean squared error of their concatenated outputs with the
    weights W S fake-quantized and divided back by S (llm-awq's _search_module_scale)."""
    x = x.to(weights[0].dtype)
    x_mean = x.abs().mean(dim=0)
    reference = [x @ w.T for w in weights]
    count = sum(r.numel() for r in reference)
    best, errors = None, []
    for i in range(grid):
        ratio = i / grid
        s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(((x @ (fake_quantize(w * s, w_bit, group_size) / s).T - r) ** 2).sum()
                    for w, r in zip(weights, reference)) / count
        errors.append(float(error))
        if best is None or errors[-1] < best[2]:
            best = (s, ratio, errors[-1])
    return best[0], best[1], errors


def search_clip(x: torch.Tensor, weight: torch.Tensor, w_bit: int, group_size: int, grid: int = AWQ_GRID,
                max_shrink: float = MAX_SHRINK, tokens: int = CLIP_TOKENS) -> torch.Tensor:
    """m [N, G]: per row and group, the clipping bound among max|w| (1 - i / grid), i < max_shrink *
    grid, minimising the mean over tokens of (x_g . clip(w_g) fake-quantized - x_g . w_g)^2
    (llm-awq's auto_clip_layer); `x` [T, K] evenly subsampled to at most `tokens` rows."""
    x = x.to(weight.dtype)
    if x.shape[0] > tokens:
        x = x[::x.shape[0] // tokens][:tokens]
    n, k = weight.shape
    padded = group_count(k, group_size) * group_size - k
    x_groups = torch.nn.functional.pad(x, (0, padded)).reshape(x.shape[0], -1, group_size)  # [T, G, g]
    w_groups = _grouped(weight, group_size)  # [N, G, g]
    reference = torch.einsum("tgc,ngc->ntg", x_groups, w_groups)
    top = w_groups.abs().amax(dim=-1)  # [N, G]
    best, best_error = top.clone(), torch.full_like(top, math.inf)
    for i in range(int(max_shrink * grid)):
        bound = top * (1 - i / grid)
        clipped = torch.maximum(torch.minimum(w_groups, bound[..., None]), -bound[..., None])
        quantized = fake_quantize(clipped.reshape(n, -1), w_bit, group_size).reshape(w_groups.shape)
        error = ((torch.einsum("tgc,ngc->ntg", x_groups, quantized) - reference) ** 2).mean(dim=1)
        better = error < best_error
        best_error, best = torch.where(better, error, best_error), torch.where(better, bound, best)
    return best


def clip_weight(weight: torch.Tensor, bounds: torch.Tensor, group_size: int) -> torch.Tensor:
    per_column = _per_column(bounds, group_size, weight.shape[1])
    return torch.maximum(torch.minimum(weight, per_column), -per_column)


# ---------------------------------------------------------------- the conversion


def awq(model: nn.Module, calibration_batches, *, w_bit: int = 4, group_size: int = 128, skip=("lm_head",),
        sparse_update=None, embeddings: bool = False, scale_search: bool = True, clip_search: bool = True,
        fold: bool = True, max_tokens: int = 4096) -> nn.Module:
    """A copy of `model` with its linear layers' weights in AWQ's 4-bit format (see the module
    docstring). `calibration_batches`: model inputs (tensors, tuples of positional inputs or dicts
    of keyword inputs), a few batches of real data; `skip`: names (or globs, or name suffixes) of
    linears to leave float; `sparse_update`: the scheme the copy will be trained with, whose trained
    linears (wholly or in part: the last blocks of `last_blocks`) stay float too, as the frozen base
    alone is quantized; `embeddings`: also the frozen token embeddings (W4Embedding; an LM head tied to
    one shares its 4-bit table, rounded to nearest: its rows are both a lookup and a matmul's);
    `max_tokens`: calibration rows kept per linear (evenly subsampled)."""
    _check_format(w_bit, group_size)
    batches = list(calibration_batches or ())
    if (scale_search or clip_search) and not batches:
        raise JobError("quantize.awq: give at least one calibration batch (the activation scales come from it); "
                       "quantize.rtn needs none")
    quantized = copy.deepcopy(model)
    chosen = {name: linear for name, linear in _chosen_linears(quantized, skip).items()
              if name not in _trained_linears(quantized, sparse_update)}
    if not chosen:
        raise JobError("quantize.awq: the model has no nn.Linear to quantize (all skipped or tied)")
    inputs, groups = _record_inputs(quantized, chosen, batches, max_tokens) if batches else ({}, [[n] for n in chosen])
    for group in groups:
        weights = [chosen[name].weight.detach() for name in group]
        scale = None
        if scale_search:
            scale, _, _ = search_scale(inputs[group[0]], weights, w_bit, group_size)
        for name in group:
            linear = chosen[name]
            weight = linear.weight.detach() * (scale if scale is not None else 1)
            if clip_search and not any(module_name_matches(name, n) for n in NOT_CLIPPED):
                x = inputs[name] if scale is None else inputs[name].to(weight.dtype) / scale
                weight = clip_weight(weight, search_clip(x, weight, w_bit, group_size), group_size)
            q, scales, zeros = quantize_groups(weight, w_bit, group_size)
            input_scale = None if scale is None else 1 / scale
            replace_module(quantized, name, W4Linear(q, scales, zeros, group_size, linear.bias, input_scale, w_bit))
    if fold and scale_search:
        _fold_into_norms(quantized, groups, batches[0])
    if embeddings:
        _quantize_embeddings(quantized, w_bit, group_size, _trained_parameters(quantized, sparse_update))
    return quantized


def _quantize_embeddings(model: nn.Module, w_bit: int, group_size: int, trained: set) -> None:
    """Each frozen nn.Embedding becomes a W4Embedding; a Linear sharing its weight (a tied LM head)
    becomes the W4Linear whose table the embedding reads."""
    linears_by_weight = {id(m.weight): (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, embedding in list(model.named_modules()):
        if not isinstance(embedding, nn.Embedding) or f"{name}.weight" in trained:
            continue
        q, scales, zeros = quantize_groups(embedding.weight.detach(), w_bit, group_size)
        rows, dim = embedding.weight.shape
        tied = linears_by_weight.get(id(embedding.weight))
        if tied is not None:
            head = W4Linear(q, scales, zeros, group_size, tied[1].bias, None, w_bit)
            replace_module(model, tied[0], head)
            replace_module(model, name, W4Embedding(rows, dim, embedding.padding_idx, head=head))
        else:
            replace_module(model, name, W4Embedding(rows, dim, embedding.padding_idx, q=q, scales=scales, zeros=zeros,
                                              group_size=group_size))


def _trained_parameters(model: nn.Module, sparse_update) -> set:
    if sparse_update is None or sparse_update.lora_spec is not None:
        return set()
    from .sparse import FROZEN

    return {name for name, rule in _resolve(model, sparse_update).items() if rule != FROZEN}


def rtn(model: nn.Module, *, w_bit: int = 4, group_size: int = 128, skip=("lm_head",), sparse_update=None) -> nn.Module:
    """`model`'s linears in the same 4-bit format by plain round-to-nearest: AWQ's baseline."""
    return awq(model, None, w_bit=w_bit, group_size=group_size, skip=skip, sparse_update=sparse_update,
               scale_search=False, clip_search=False)


def _trained_linears(model: nn.Module, sparse_update) -> set:
    """Names of the nn.Linear modules whose weight `sparse_update` trains, wholly or in part (a LoRA
    scheme trains adapters it adds, none of the model's own linears)."""
    if sparse_update is None or sparse_update.lora_spec is not None:
        return set()
    from .sparse import FROZEN

    decided = _resolve(model, sparse_update)
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and decided.get(f"{name}.weight", FROZEN) != FROZEN}


def _resolve(model: nn.Module, sparse_update) -> dict:
    """{parameter name: rule} of `sparse_update` on the torch model (as job.plan resolves it on the
    imported one)."""
    kinds = {f"{name}.weight": kind for name, module in model.named_modules()
             for kind in [_kind(module)] if kind is not None}
    return sparse_update.resolve([(name, tuple(p.shape), kinds.get(name)) for name, p in model.named_parameters()])


def _kind(module: nn.Module) -> str | None:
    """How a module uses its weight, as a sparse scheme's rules see it (frontend/parameter_use.py)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "depthwise" if module.groups > 1 and module.groups == module.out_channels else "conv"
    return None


def _check_format(w_bit: int, group_size: int) -> None:
    if w_bit != 4:
        raise JobError(f"quantize.awq: w_bit must be 4 (the packed format holds two values a byte), got {w_bit!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise JobError(f"quantize.awq: group_size must be an integer >= 2 (AWQ uses 128), got {group_size!r}")


def module_name_matches(name: str, pattern: str) -> bool:
    """A pattern names a module by its own name (`q_proj`), a path suffix (`self_attn.q_proj`) or a
    glob: how `skip=` here and LoRA's targets (pockengine/lora.py) choose layers."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _chosen_linears(model: nn.Module, skip) -> dict:
    """{name: nn.Linear} to quantize: not skipped, and a weight no other module holds (a tied head)."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip or ())
    holders: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(name)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(module_name_matches(name, p) for p in skip)
            and len(holders[id(m.weight)]) == 1}


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def _record_inputs(model: nn.Module, chosen: dict, batches: list, max_tokens: int):
    """({linear name: its calibration inputs [T, K]}, groups of names that read the same tensor)."""
    rows: dict = {name: [] for name in chosen}
    first_reader: dict = {}  # id of an input tensor of the first batch -> the first linear that read it
    group_of: dict = {}
    state = {"batch": 0}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            rows[name].append(x[::max(1, x.shape[0] // max_tokens)][:max_tokens])  # bounded per batch
            if state["batch"] == 0:
                leader = first_reader.setdefault(id(args[0]), (name, args[0]))[0]  # keeps the tensor alive
                group_of[name] = leader
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in chosen.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for i, batch in enumerate(batches):
                state["batch"] = i
                _call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    inputs = {}
    for name, parts in rows.items():
        if not parts:
            raise JobError(f"quantize.awq: the calibration batches never reach {name} (a branch the forward "
                           "did not take); skip it or calibrate on inputs that use it")
        x = torch.cat(parts)
        inputs[name] = x[::max(1, x.shape[0] // max_tokens)][:max_tokens]
    groups: dict = {}
    for name in chosen:
        groups.setdefault(group_of[name], []).append(name)
    return inputs, list(groups.values())


def _fold_into_norms(model: nn.Module, groups: list, batch) -> None:
    """For each group whose input is a norm's output, move its input_scale into the norm's weight
    and bias, and keep the fold only if the model's outputs stay the same on `batch`."""
    producers = _norm_outputs(model, batch)
    reference = None  # the model's outputs as it stands: before the first fold, then after each kept one
    for group in groups:
        layers = [model.get_submodule(name) for name in group]
        norm_name = producers.get(group[0])
        if norm_name is None or any(producers.get(name) != norm_name for name in group):
            continue
        norm = model.get_submodule(norm_name)
        if norm.weight.shape != layers[0].input_scale.shape:
            continue
        if reference is None:
            reference = _outputs(model, batch)
        saved = [layer.input_scale for layer in layers], norm.weight.detach().clone(), _bias_of(norm)
        scale = layers[0].input_scale
        with torch.no_grad():
            norm.weight.mul_(scale.to(norm.weight.dtype))
            if saved[2] is not None:
                norm.bias.mul_(scale.to(norm.bias.dtype))
        for layer in layers:
            layer.input_scale = None
        folded = _outputs(model, batch)
        if _same(reference, folded):
            reference = folded
            continue
        with torch.no_grad():  # undone: the model is again the one `reference` was computed on
            norm.weight.copy_(saved[1])
            if saved[2] is not None:
                norm.bias.copy_(saved[2])
        for layer, input_scale in zip(layers, saved[0]):
            layer.input_scale = input_scale


def _bias_of(norm):
    bias = getattr(norm, "bias", None)
    return bias.detach().clone() if isinstance(bias, torch.Tensor) else None


def _norm_outputs(model: nn.Module, batch) -> dict:
    """{quantized linear's name: the norm module whose output it reads} for one forward of `batch`: a
    norm is a module with a one-dimensional weight Parameter whose class name says Norm."""
    made_by: dict = {}  # id(output tensor) -> (norm name, the tensor)
    read_from: dict = {}

    def after_norm(name):
        def record(_module, _args, output):
            if isinstance(output, torch.Tensor):
                made_by[id(output)] = (name, output)
        return record

    def before_linear(name):
        def record(_module, args):
            found = made_by.get(id(args[0]))
            if found is not None and found[1] is args[0]:
                read_from[name] = found[0]
        return record

    handles = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.dim() == 1:
            handles.append(module.register_forward_hook(after_norm(name)))
        elif hasattr(module, "input_scale"):  # a W4Linear, or smoothquant's W8Linear
            handles.append(module.register_forward_pre_hook(before_linear(name)))
    try:
        _outputs(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return read_from


def _outputs(model: nn.Module, batch) -> list:
    with eval_mode(model), torch.no_grad():
        out = _call(model, batch)
    return [t for t in _tensors(out)]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict) or hasattr(out, "values"):
        for value in out.values():
            yield from _tensors(value)
    elif isinstance(out, (tuple, list)):
        for value in out:
            yield from _tensors(value)


def _same(a: list, b: list) -> bool:
    """Equal up to the rounding of a reassociated float product (relative 1e-4 of each tensor's range)."""
    return len(a) == len(b) and all(
        x.shape == y.shape and bool(((x - y).abs().max() <= 1e-4 * max(float(x.abs().max()), 1e-6)).item())
        for x, y in zip(a, b) if x.is_floating_point())


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` of `root`, in the train/eval mode of the module it replaces."""
    parent, _, name = path.rpartition(".")
    module.train(root.get_submodule(path).training)
    setattr(root.get_submodule(parent) if parent else root, name, module)
