"""Sparse-update schemes: which parameters, and which channels of them, a training step updates.

A scheme is data: an ordered list of (pattern, rule) plus a default for parameters no rule names.
Later rules win. A pattern is a glob over parameter names; a pattern naming a module (`classifier`,
`features.3.*`) covers the parameters under it. Rules:

    "full"    train the parameter
    "frozen"  do not train it (its backward is never generated)
    "bias"    train only biases among the parameters the pattern covers
    r (float, 0 < r <= 1)   train the first round(r * C) input channels of a conv/linear weight
              (for a depthwise conv, its first round(r * C) channels) — MCUNetV3's sub-tensor update

    pe.SparseUpdate.bias_only() | {"classifier.*": "full", "features.5.conv.0.0.weight": 0.25}

`resolve(params)` validates the scheme against the model's parameter table and returns, per parameter,
"full", "frozen" or the number of leading channels to train.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, replace

from .errors import JobError

FULL, FROZEN, BIAS = "full", "frozen", "bias"
RULES = (FULL, FROZEN, BIAS)


@dataclass(frozen=True)
class Partial:
    """Train the first `channels` entries of `axis` of a weight (the rest stays frozen)."""

    channels: int
    axis: int
    total: int


@dataclass(frozen=True)
class SparseUpdate:
    rules: tuple = ()
    default: str = FROZEN
    # ("last_k", k), ("mcunetv3", n_bias_update, weight indices, ratios), ("last_blocks", k, part),
    # ("bias_and_norm",), ("lora", r, targets, alpha, seed) or ("lite_residual", blocks, kernel_size,
    # groups, downsample, expand, seed): rules derived from the model
    preset: tuple = ()

    def __post_init__(self):
        rules = tuple(self.rules.items()) if isinstance(self.rules, dict) else tuple(tuple(r) for r in self.rules)
        object.__setattr__(self, "rules", rules)
        if self.default not in (FULL, FROZEN):
            raise JobError(f"SparseUpdate default must be 'full' or 'frozen', got {self.default!r}")
        for pattern, rule in rules:
            _check_rule(pattern, rule)

    def __or__(self, other) -> SparseUpdate:
        """This scheme with `other`'s rules (a dict or a SparseUpdate) applied after its own."""
        extra = other.rules if isinstance(other, SparseUpdate) else tuple(dict(other).items())
        return replace(self, rules=self.rules + tuple(extra))

    # ------------------------------------------------------------------ presets

    @classmethod
    def full(cls) -> SparseUpdate:
        return cls((), FULL)

    @classmethod
    def bias_only(cls) -> SparseUpdate:
        """TinyTL: every bias (for conv+BN models, the BatchNorm shifts), no weights."""
        return cls((("*", BIAS),))

    @classmethod
    def last_k(cls, k: int) -> SparseUpdate:
        """Every parameter of the last k layers (modules that own parameters, in model order)."""
        if not isinstance(k, int) or k < 1:
            raise JobError(f"last_k needs an integer k >= 1, got {k!r}")
        return cls(preset=("last_k", k))

    @classmethod
    def mcunetv3(cls, n_bias_update: int, manual_weight_idx, weight_update_ratio) -> SparseUpdate:
        """tiny-training's flags: biases of the last `n_bias_update` convs; the weights of the convs
        at `manual_weight_idx` (e.g. "21-24-27" or a list), each at its `weight_update_ratio`."""
        idx, ratios = _ints(manual_weight_idx), _floats(weight_update_ratio)
        if len(idx) != len(ratios):
            raise JobError(f"mcunetv3: {len(idx)} weight indices but {len(ratios)} ratios")
        for r in ratios:
            _check_rule(f"ratio {r}", r)
        return cls(preset=("mcunetv3", int(n_bias_update), tuple(idx), tuple(ratios)))

    @classmethod
    def last_blocks(cls, k: int, part: str = "all") -> SparseUpdate:
        """The last k blocks of a transformer (the repeated modules `<container>.<i>`, found in the
        parameter names: `model.layers.<i>`, `bert.encoder.layer.<i>`). part "attention" or "mlp"
        trains only that half of each block: its linear layers (weights and biases) under a module
        whose name says attention (`attn`, `attention`), or the other linear layers; the blocks'
        norms stay frozen there (add `| SparseUpdate.bias_and_norm()` to train them too)."""
        if not isinstance(k, int) or k < 1:
            raise JobError(f"last_blocks needs an integer k >= 1, got {k!r}")
        if part not in BLOCK_PARTS:
            raise JobError(f"last_blocks part must be one of {BLOCK_PARTS}, got {part!r}")
        return cls(preset=("last_blocks", k, part))

    @classmethod
    def bias_and_norm(cls) -> SparseUpdate:
        """Every 1-D parameter: the biases (BitFit) and the normalisation scales (LayerNorm, RMSNorm)."""
        return cls(preset=("bias_and_norm",))

    @classmethod
    def lora(cls, r: int = 8, targets=("q_proj", "v_proj"), alpha: float | None = None, seed: int = 0) -> SparseUpdate:
        """LoRA: rank-r adapters on the nn.Linear modules matching `targets` (a module name, a path
        suffix or a glob), scale alpha / r (alpha defaults to r); only the adapters train. The job
        trains a copy of its model with the adapters added (pockengine.lora.add_lora)."""
        if not isinstance(r, int) or r < 1:
            raise JobError(f"LoRA rank must be an integer >= 1, got {r!r}")
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        return cls(preset=("lora", r, targets, alpha, seed))

    @classmethod
    def lite_residual(cls, blocks=None, kernel_size: int = 5, groups: int = 2, downsample: int = 2,
                      expand: float = 1.0, seed: int = 0) -> SparseUpdate:
        """TinyTL: a lite residual branch beside each block (`blocks`: module names or globs; default:
        the model's repeated blocks, pockengine.lite_residual.default_blocks), trained with every bias;
        every weight of the model stays frozen (`| {"classifier": "full"}` trains a new head too). The
        job trains a copy of its model with the branches added (pockengine.lite_residual)."""
        from .lite_residual import check_arguments

        check_arguments(kernel_size, groups, downsample, expand)
        blocks = None if blocks is None else ((blocks,) if isinstance(blocks, str) else tuple(blocks))
        return cls(preset=("lite_residual", blocks, kernel_size, groups, downsample, expand, seed))

    @property
    def lite_residual_spec(self) -> dict | None:
        """The add_lite_residuals arguments of a lite residual scheme, else None."""
        if not self.preset or self.preset[0] != "lite_residual":
            return None
        blocks, kernel_size, groups, downsample, expand, seed = self.preset[1:]
        return {"blocks": blocks, "kernel_size": kernel_size, "groups": groups, "downsample": downsample,
                "expand": expand, "seed": seed}

    @property
    def lora_spec(self) -> dict | None:
        """The add_lora arguments of a LoRA scheme, else None."""
        if not self.preset or self.preset[0] != "lora":
            return None
        r, targets, alpha, seed = self.preset[1:]
        return {"r": r, "targets": targets, "alpha": alpha, "seed": seed}

    # ------------------------------------------------------------------ saving

    def to_json(self) -> dict:
        return {"rules": [list(r) for r in self.rules], "default": self.default,
                "preset": [list(x) if isinstance(x, tuple) else x for x in self.preset]}

    @classmethod
    def from_json(cls, data: dict) -> SparseUpdate:
        """The scheme to_json wrote (or a saved search result's "scheme")."""
        data = data.get("scheme", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not {"rules", "default"} <= set(data):
            raise JobError(f"not a saved sparse-update scheme (a dict with 'rules' and 'default'): {str(data)[:200]}")
        preset = tuple(tuple(x) if isinstance(x, list) else x for x in data.get("preset", ()))
        if preset and preset[0] not in _PRESET_RULES:
            raise JobError(f"a saved sparse-update scheme names an unknown preset {preset[0]!r}; known: "
                           f"{sorted(_PRESET_RULES)}")
        return cls(tuple(tuple(r) for r in data["rules"]), data["default"], preset)

    def save(self, path: str) -> str:
        """Write the scheme as JSON (atomically); SparseUpdate.load(path) reads it back."""
        import json

        from .artifact_files import write_file_atomically

        return write_file_atomically(path, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, path: str) -> SparseUpdate:
        """A scheme saved by save() or inside a search result's JSON (pockengine plan-sparse)."""
        import json

        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise JobError(f"cannot read a sparse-update scheme from {path}: {e}") from None
        return cls.from_json(data)

    # ------------------------------------------------------------------ resolution

    def expand(self, params) -> list:
        """The scheme's concrete (pattern, rule) list for a model's parameter table."""
        kind = self.preset[0] if self.preset else None
        derived = _PRESET_RULES[kind](params, *self.preset[1:]) if kind else []
        return derived + list(self.rules)

    def resolve(self, params) -> dict:
        """params: [(name, shape, op)] in model order, op in {"conv", "depthwise", "linear", None}.
        -> {name: "full" | "frozen" | Partial}."""
        names = [p[0] for p in params]
        shape_of = {p[0]: tuple(p[1]) for p in params}
        kind_of = {p[0]: p[2] for p in params}
        decided = {n: self.default for n in names}
        for pattern, rule in self.expand(params):
            matched = [n for n in names if _matches(n, pattern)]
            if not matched:
                raise JobError(f"sparse_update rule {pattern!r}: {rule!r} names no parameter of the model. "
                               f"Parameters: {_listing(names)}")
            for n in matched:
                if rule == BIAS:
                    decided[n] = FULL if n.rsplit(".", 1)[-1] == "bias" else FROZEN
                elif isinstance(rule, (int, float)):
                    decided[n] = _partial(n, float(rule), shape_of[n], kind_of[n])
                else:
                    decided[n] = rule
        return decided


def _last_k_rules(params, k):
    layers = list(dict.fromkeys(_layer(p[0]) for p in params))
    if k > len(layers):
        raise JobError(f"last_k({k}): the model has only {len(layers)} layers with parameters")
    return [(layer, FULL) for layer in layers[-k:]]


def _mcunetv3_rules(params, n_bias_update, weight_idx, weight_ratio):
    """Convs are the conv/linear weights in model order (tiny-training counts the classifier too).
    A conv's bias is its own or, for a bias-free conv, the bias of the normalisation right after it."""
    names = [p[0] for p in params]
    convs = [i for i, p in enumerate(params) if p[2] in ("conv", "depthwise", "linear") and p[0].endswith("weight")]
    rules = []
    for i in convs[len(convs) - n_bias_update:] if n_bias_update else []:
        bias = _bias_of(names, i)
        if bias is not None:
            rules.append((bias, FULL))
    for idx, ratio in zip(weight_idx, weight_ratio):
        if not 0 <= idx < len(convs):
            raise JobError(f"mcunetv3: conv index {idx} out of range; "
                           f"the model has {len(convs)} convs (0..{len(convs) - 1})")
        rules.append((names[convs[idx]], FULL if ratio == 1 else ratio))
    return rules


BLOCK_PARTS = ("all", "attention", "mlp")


def transformer_blocks(names) -> list:
    """The block prefixes of the model's repeated container, in order: items `<prefix>.<i>` (an
    nn.ModuleList: `model.layers.0`) or `<prefix>.<stem><i>` (an OrderedDict of named blocks:
    torchvision's `encoder.layers.encoder_layer_0`) numbered 0..n-1, of the containers whose last two
    items hold the same parameters (blocks repeat; an nn.Sequential of a conv and its norm does not),
    the one with the most parameters under it."""
    members = {}  # (prefix, stem) -> {index: set of parameter names relative to the item}
    for name in names:
        parts = name.split(".")
        for j, part in enumerate(parts[:-1]):
            item = re.fullmatch(r"(\w*_)?(\d+)", part)
            if item:
                key = (".".join(parts[:j]), item.group(1) or "")
                members.setdefault(key, {}).setdefault(int(item.group(2)), set()).add(".".join(parts[j + 1:]))
    containers = [(sum(map(len, items.values())), key) for key, items in members.items()
                  if len(items) > 1 and sorted(items) == list(range(len(items)))
                  and items[len(items) - 1] == items[len(items) - 2]]
    if not containers:
        return []
    prefix, stem = max(containers)[1]
    return [f"{prefix}.{stem}{i}" if prefix else f"{stem}{i}" for i in sorted(members[(prefix, stem)])]


def _last_blocks_rules(params, k, part):
    names = [p[0] for p in params]
    blocks = transformer_blocks(names)
    if not blocks:
        raise JobError("last_blocks: no repeated blocks (`<container>.<i>.` in the parameter names) in this model; "
                       f"use last_k or name the parameters. Parameters: {_listing(names)}")
    if k > len(blocks):
        raise JobError(f"last_blocks({k}): the model has {len(blocks)} blocks ({blocks[0]} .. {blocks[-1]})")
    chosen = blocks[-k:]
    if part == "all":
        return [(block, FULL) for block in chosen]
    linear_layers = {_layer(n) for n, _, kind in params if kind == "linear"}
    rules = []
    for name in names:
        layer = _layer(name)
        if layer in linear_layers and any(_matches(name, block) for block in chosen):
            in_attention = any("attn" in c or "attention" in c for c in layer.split("."))
            if in_attention == (part == "attention"):
                rules.append((name, FULL))
    if not rules:
        raise JobError(f"last_blocks({k}, part={part!r}): no {part} linear layer in {', '.join(chosen)}")
    return rules


def _bias_and_norm_rules(params):
    return [(name, FULL) for name, shape, _ in params if len(shape) == 1]


def _lora_rules(params, *_spec):
    adapters = [(name, FULL) for name, _, _ in params if name.endswith((".lora_A", ".lora_B"))]
    if not adapters:
        raise JobError("SparseUpdate.lora: the model has no LoRA adapters; pass the scheme to a TrainingJob, "
                       "which adds them (pockengine.lora.add_lora)")
    return adapters


def _lite_residual_rules(params, *_spec):
    branches = [(name, FULL) for name, _, _ in params if ".lite_residual." in f".{name}"]
    if not branches:
        raise JobError("SparseUpdate.lite_residual: the model has no lite residual branches; pass the scheme to a "
                       "TrainingJob, which adds them (pockengine.lite_residual.add_lite_residuals)")
    return [("*", BIAS)] + branches


_PRESET_RULES = {"last_k": _last_k_rules, "mcunetv3": _mcunetv3_rules, "last_blocks": _last_blocks_rules,
                 "bias_and_norm": _bias_and_norm_rules, "lora": _lora_rules, "lite_residual": _lite_residual_rules}


def _bias_of(names, i):
    layer = _layer(names[i])
    if f"{layer}.bias" in names:
        return f"{layer}.bias"
    # the next layer's bias if that layer has a weight and a bias and no other parameters (a norm)
    j = i + 1
    while j < len(names) and _layer(names[j]) == layer:
        j += 1
    if j + 1 < len(names) and names[j].endswith(".weight") and names[j + 1] == f"{_layer(names[j])}.bias":
        return names[j + 1]
    return None


def ratio_channels(ratio, shape, kind) -> tuple:
    """(channels trained, their axis, the axis' size) of a conv/linear weight of `shape` at `ratio`:
    the first round(ratio * C) input channels (a depthwise conv's: its channels)."""
    axis = 0 if kind == "depthwise" else 1
    return int(round(ratio * shape[axis])), axis, shape[axis]


def _partial(name, ratio, shape, kind):
    if kind not in ("conv", "depthwise", "linear") or not name.endswith("weight"):
        raise JobError(f"sparse_update ratio {ratio} on {name}: channel ratios apply to conv and linear weights only")
    channels, axis, total = ratio_channels(ratio, shape, kind)
    if channels == 0:
        raise JobError(f"sparse_update ratio {ratio} on {name} keeps 0 of its {total} channels; "
                       "use a larger ratio or 'frozen'")
    return FULL if channels == total else Partial(channels, axis, total)


def _check_rule(pattern, rule):
    if not isinstance(pattern, str):
        raise JobError(f"sparse_update pattern must be a string, got {pattern!r}")
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if not 0 < rule <= 1:
            raise JobError(f"sparse_update ratio for {pattern!r} must be in (0, 1], got {rule}")
        return
    if rule not in RULES:
        raise JobError(f"sparse_update rule for {pattern!r} must be one of {RULES} or a ratio in (0, 1], got {rule!r}")


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _listing(names, limit=40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _ints(v):
    return [int(x) for x in (v.split("-") if isinstance(v, str) else v)]


def _floats(v):
    return [float(x) for x in (v.split("-") if isinstance(v, str) else v)]


def plan_to_json(plan: dict) -> dict:
    """{parameter name: "full" | "frozen" | {"channels", "axis", "total"}}: a plan as manifest data."""
    return {name: asdict(rule) if isinstance(rule, Partial) else rule for name, rule in plan.items()}


def plan_from_json(data: dict) -> dict:
    return {name: Partial(**rule) if isinstance(rule, dict) else rule for name, rule in data.items()}


def apply_to_torch(model, plan: dict):
    """Make a PyTorch model train what `plan` trains: frozen parameters get requires_grad=False,
    partially trained weights a gradient mask on their first channels. For like-for-like
    comparisons with the compiled step (tests, benchmarks). Returns the model."""
    import torch

    for name, p in model.named_parameters():
        rule = plan[name]
        if rule == FROZEN:
            p.requires_grad_(False)
        elif isinstance(rule, Partial):
            mask = torch.zeros_like(p)
            index = [slice(None)] * p.ndim
            index[rule.axis] = slice(0, rule.channels)
            mask[tuple(index)] = 1
            p.register_hook(lambda g, m=mask: g * m)
    return model
