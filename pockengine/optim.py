"""Optimizers as Relax graph builders, with torch.optim's arguments, defaults and formulas.

An optimizer knows its per-parameter state slots (`momentum_buffer`, `exp_avg`, ...) and emits, inside
the training step, the update of one parameter from its gradient. Two scalars are shared by all
parameters and travel with the optimizer state: `lr` (float64, an input only, so `program.lr = ...`
schedules it without recompiling) and `step` (int64, the number of steps taken, incremented in-graph).

The formulas follow torch.optim's single-tensor implementations (what PyTorch runs on CPU), operation
for operation where the order changes rounding (lerp, addcmul, addcdiv).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tvm import relax
from tvm.relax import op as R

from .errors import OptimizerError
from .validate import check_learning_rate, is_finite_number

LR, STEP = "lr", "step"
UPDATE_PREFIX = "update_"


def _scalar(value: float, dtype: str):
    return relax.const(value, dtype)


class _Emitter:
    """Emit helper bound to a BlockBuilder and the dtype of the parameter being updated."""

    def __init__(self, bb: relax.BlockBuilder, dtype: str, gate=None):
        self.bb, self.dtype, self.gate = bb, dtype, gate

    def c(self, value: float):
        return _scalar(value, self.dtype)

    def cast(self, scalar_f64):
        """A float64 scalar computed in-graph (from lr and step), rounded once to the parameter dtype,
        as PyTorch rounds its Python-float scalars when it applies them to a tensor."""
        return scalar_f64 if self.dtype == "float64" else R.astype(scalar_f64, self.dtype)

    def emit(self, expr, name: str = ""):
        # The `update_` prefix marks optimizer bindings for passes (reorder_updates) and reports.
        return self.bb.emit(expr, UPDATE_PREFIX + (name or "param"))

    def slot(self, expr, old):
        """Emit a slot's new value, through `gate` (new, old, name) -> var where the step gates its
        new state (`old` unchanged where it refused its batch, autodiff/guards.py). Gated where it is
        computed, so the parameter's update reads the gated value and each stays one elementwise
        kernel that writes in place."""
        return self.emit(expr, "slot") if self.gate is None else self.gate(expr, old, "slot")


@dataclass
class Optimizer:
    """Base class: subclasses define `slots`, `validate` and `update`."""

    lr: float = 1e-3
    # Whether torch.optim keeps a step count in each parameter's state (optimizer_state.py)
    torch_state_has_step = False

    @property
    def kind(self) -> str:
        return type(self).__name__

    def slots(self) -> list[str]:
        return []

    def validate(self) -> None:
        """Every hyper-parameter is a finite number (NaN or an infinity would train every weight to
        NaN), the learning rate >= 0; subclasses check their own ranges."""
        for f in fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, bool) and f.type in (bool, "bool"):
                    continue
                if not is_finite_number(v):
                    raise OptimizerError(f"{self.kind}: {f.name}={value!r} is not a finite number")
        check_learning_rate(self.lr)

    def update(self, em: _Emitter, param, grad, slots: dict, lr_f64, step_f64):
        """Return (new_param, {slot: new value}); `step_f64` is the step count *after* this step."""
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def to_torch(self, params):
        """The equivalent torch.optim optimizer over `params` (for comparisons and benchmarks)."""
        import torch

        args = {k: v for k, v in asdict(self).items() if k != "qas"}
        return getattr(torch.optim, self.kind)(params, **args)


@dataclass
class SGD(Optimizer):
    """torch.optim.SGD: weight decay, momentum with dampening, Nesterov, maximize.

    qas: MCUNetV3's Quantization-Aware Scaling for a model of pe.quantize.int8: before the update,
    the gradient of each int8 conv's weight is multiplied by s_w^-2 (its per-output-channel weight
    scale) and of its bias by (s_x s_w)^-2, the scales folded into the step as constants; float
    parameters (the classifier) are updated as they are. An int8 weight w = W / s_w has gradient
    s_w * dL/dW, so plain SGD moves it s_w^2 times as far as the float weight it stands for would
    move; QAS undoes that, per channel. Without momentum, as MCUNetV3 trains on microcontrollers,
    the update adds no state."""

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    qas: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        super().validate()
        if self.momentum < 0:
            raise OptimizerError(f"Invalid momentum value: {self.momentum} (must be >= 0)")
        if self.weight_decay < 0:
            raise OptimizerError(f"Invalid weight_decay value: {self.weight_decay} (must be >= 0)")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise OptimizerError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def slots(self) -> list[str]:
        return ["momentum_buffer"] if self.momentum != 0 else []

    def to_torch(self, params):
        if self.qas:
            raise OptimizerError("SGD(qas=True): torch.optim has no Quantization-Aware Scaling; to train the same "
                                 "way in PyTorch, call pockengine.quantize.scale_gradients_qas(model) between "
                                 "backward() and the step of torch.optim.SGD")
        return super().to_torch(params)

    def update(self, em, param, grad, slots, lr_f64, step_f64):
        g = em.emit(R.negative(grad)) if self.maximize else grad
        if self.weight_decay != 0:
            g = em.emit(R.add(g, R.multiply(em.c(self.weight_decay), param)))
        new_slots = {}
        if self.momentum != 0:
            buf = slots["momentum_buffer"]
            # torch starts the buffer as a copy of the first gradient; afterwards
            # buf = momentum * buf + (1 - dampening) * g. With zero dampening both are the same formula
            # (the buffer starts at zero), otherwise the first step is selected in-graph.
            later = R.add(R.multiply(buf, em.c(self.momentum)), R.multiply(em.c(1 - self.dampening), g))
            if self.dampening != 0:
                first = R.equal(step_f64, relax.const(1.0, "float64"))
                later = R.where(first, g, later)
            buf = em.slot(later, buf)
            new_slots["momentum_buffer"] = buf
            g = em.emit(R.add(g, R.multiply(em.c(self.momentum), buf))) if self.nesterov else buf
        lr = em.cast(lr_f64)
        return em.emit(R.subtract(param, R.multiply(lr, g))), new_slots


@dataclass
class Adam(Optimizer):
    """torch.optim.Adam (and AdamW through `decoupled_weight_decay`): amsgrad, maximize."""

    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False
    torch_state_has_step = True

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.validate()

    def validate(self) -> None:
        super().validate()
        if not self.eps >= 0:
            raise OptimizerError(f"Invalid epsilon value: {self.eps} (must be >= 0)")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise OptimizerError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")
        if self.weight_decay < 0:
            raise OptimizerError(f"Invalid weight_decay value: {self.weight_decay} (must be >= 0)")

    def slots(self) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if self.amsgrad else [])

    def update(self, em, param, grad, slots, lr_f64, step_f64):
        beta1, beta2 = self.betas
        g = em.emit(R.negative(grad)) if self.maximize else grad
        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                shrink = R.subtract(relax.const(1.0, "float64"),
                                    R.multiply(lr_f64, relax.const(self.weight_decay, "float64")))
                param = em.emit(R.multiply(param, em.cast(shrink)))
            else:
                g = em.emit(R.add(g, R.multiply(em.c(self.weight_decay), param)))
        m, v = slots["exp_avg"], slots["exp_avg_sq"]
        # exp_avg.lerp_(g, 1 - beta1): PyTorch's CPU lerp picks its formula by the weight.
        w = 1 - beta1
        if w < 0.5:
            m = em.slot(R.add(m, R.multiply(em.c(w), R.subtract(g, m))), m)
        else:
            m = em.slot(R.subtract(g, R.multiply(R.subtract(g, m), em.c(1 - w))), m)
        # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        v = em.slot(R.add(R.multiply(v, em.c(beta2)), R.multiply(em.c(1 - beta2), R.multiply(g, g))), v)
        one = relax.const(1.0, "float64")
        bias_correction1 = R.subtract(one, R.power(relax.const(beta1, "float64"), step_f64))
        bias_correction2 = R.subtract(one, R.power(relax.const(beta2, "float64"), step_f64))
        step_size = em.cast(R.divide(lr_f64, bias_correction1))
        bc2_sqrt = em.cast(R.sqrt(bias_correction2))
        new_slots = {"exp_avg": m, "exp_avg_sq": v}
        second = v
        if self.amsgrad:
            second = em.slot(R.maximum(slots["max_exp_avg_sq"], v), slots["max_exp_avg_sq"])
            new_slots["max_exp_avg_sq"] = second
        denom = em.emit(R.add(R.divide(R.sqrt(second), bc2_sqrt), em.c(self.eps)))
        # param.addcdiv_(exp_avg, denom, value=-step_size)
        new_param = em.emit(R.subtract(param, R.multiply(step_size, R.divide(m, denom))))
        return new_param, new_slots

    def to_torch(self, params):
        import torch

        args = {k: v for k, v in asdict(self).items() if k != "decoupled_weight_decay"}
        if self.decoupled_weight_decay:
            return torch.optim.AdamW(params, **args)
        return torch.optim.Adam(params, **args)


@dataclass
class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    weight_decay: float = 1e-2
    decoupled_weight_decay: bool = field(default=True, init=False)


OPTIMIZERS = {cls.__name__: cls for cls in (SGD, Adam, AdamW)}


def from_json(d: dict) -> Optimizer:
    d = dict(d)
    cls = OPTIMIZERS[d.pop("kind")]
    if cls is AdamW:
        d.pop("decoupled_weight_decay", None)
    return cls(**d)
