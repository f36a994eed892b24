"""Frontends: a user's model + loss -> one Relax function `forward_loss` and its tables.

`forward_loss(inputs..., target, params..., buffers...[, seed, step]) -> (loss, new values of mutated buffers...)`

A model that samples random numbers in training (dropout, stochastic depth) takes two more int64
scalars, the generator's seed and the step counter (see frontend/philox.py, pockengine/random.py).

Both frontends (torch.export, ONNX) return an `ImportedModel`; nothing downstream knows which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FUNC_NAME = "forward_loss"
# State the random generator reads: its seed (a state tensor of its own) and the optimizer's step counter.
RNG_SEED, RNG_STEP = "rng.seed", "step"


def to_numpy(x) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_torch(state):
    """Numpy arrays as torch tensors, for torch's load_state_dict: a dict (a state dict, or an
    optimizer state dict's nested dicts and lists) with each array replaced by a tensor sharing its
    memory where numpy allows (a read-only array is copied); anything else is kept as it is. torch
    is imported here, when asked: the runtime runs without it."""
    import torch

    if isinstance(state, np.ndarray):
        return torch.from_numpy(state if state.flags.writeable else state.copy())
    if isinstance(state, np.generic):
        return torch.from_numpy(np.array(state))
    if isinstance(state, dict):
        return {key: to_torch(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_torch(value) for value in state)
    return state


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype (a numpy dtype name) of one tensor the step reads or writes."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"])


@dataclass(frozen=True)
class Origin:
    """Where an operation of the imported graph came from in the user's model."""

    op: str  # e.g. "aten.gelu.default" or an ONNX node's op_type
    module: str = ""  # e.g. "encoder.layers.0.linear1 (Linear)"
    location: str = ""  # e.g. "train.py:12"

    @property
    def module_path(self) -> str:
        return self.module.split(" (")[0]

    def __str__(self) -> str:
        parts = [self.op]
        if self.module:
            parts.append(f"in module {self.module}")
        if self.location:
            parts.append(f"at {self.location}")
        return " ".join(parts)


@dataclass
class ImportedModel:
    """What a frontend hands to autodiff.

    `mod["forward_loss"]` takes `inputs` (model inputs, then the target), then `params`, then
    `buffers`, then — when `random_sites` > 0 — the generator's seed and the step counter, and returns
    `(loss, *new values of mutated_buffers)`; `initial` holds the seed's initial value.
    """

    mod: object  # tvm.IRModule
    inputs: list[TensorSpec]
    params: list[TensorSpec]
    buffers: list[TensorSpec]
    mutated_buffers: list[str]
    initial: dict[str, np.ndarray]
    # Binding name in forward_loss -> Origin of the op in the user's model (errors, per-layer reports).
    origin: dict = field(default_factory=dict)
    # Buffers that state_dict() leaves out, as torch does for register_buffer(..., persistent=False).
    non_persistent: set = field(default_factory=set)
    source: str = "torch"
    # Tied parameters: a second name of a parameter in `params` ({"lm_head.weight": "model.embed_tokens.weight"}).
    aliases: dict = field(default_factory=dict)
    # Random operations converted to the step's generator; when > 0, forward_loss ends with (seed, step).
    random_sites: int = 0
    # Parameter name -> the factor QAS (optim.SGD(qas=True)) multiplies its gradient by, broadcast
    # against it: the int8 layers of a pe.quantize.int8 model.
    gradient_scales: dict = field(default_factory=dict)

    @property
    def func(self):
        return self.mod[FUNC_NAME]

    @property
    def random_vars(self) -> tuple:
        """forward_loss's (seed, step) parameters, or () when the model samples no random numbers."""
        return tuple(self.func.params[-2:]) if self.random_sites else ()

    @property
    def param_vars(self) -> dict:
        """Parameter name -> its Var in forward_loss (parameters follow the inputs)."""
        return dict(zip([s.name for s in self.params], self.func.params[len(self.inputs):]))
