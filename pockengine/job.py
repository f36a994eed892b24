"""TrainingJob: what to train (model, example batch, loss, optimizer, which parameters) — validated early.

A job is plain data; `pockengine.compile(job, target)` turns it into a program. Errors that a user can
cause are raised here, at construction, before anything slow happens.
"""

from __future__ import annotations

import numbers
import os
import sys

from .errors import JobError, LossError
from .optim import Optimizer
from .sparse import FROZEN, FULL, SparseUpdate

LOSS_NAMES = ("cross_entropy", "mse")  # what both frontends implement


class TrainingJob:
    """A model, an example batch, a loss, an optimizer and which parameters to update.

    model: a `torch.nn.Module` (its train/eval mode is respected: BatchNorm in training mode updates
        its running statistics every step) or an ONNX model (path or `onnx.ModelProto`).
    example_inputs: the model's positional inputs (a tensor or a tuple of tensors); the compiled step
        is specialised to their shapes and dtypes.
    example_targets: the target tensor passed to the loss.
    loss: "cross_entropy", "mse" or a callable `loss(output, target) -> scalar tensor` (torch only).
    optimizer: a `pockengine.optim` optimizer (SGD, Adam, AdamW).
    sparse_update: a `SparseUpdate` scheme (or a dict of its rules) choosing the parameters, and the
        channels of them, to train; None trains every parameter with `requires_grad=True`. With
        `SparseUpdate.lora(...)`, `job.model` is a copy of the model with the adapters added (with
        `SparseUpdate.lite_residual(...)`, with the branches added).
    seed: the initial seed of the step's random generator (dropout and stochastic depth masks in
        training, pockengine/random.py), an int in [0, 2**63): the same seed gives the same masks on
        every target, step after step; it is state, saved and loaded with the optimizer's.
    """

    def __init__(self, model, example_inputs, example_targets, loss, optimizer, sparse_update=None, name=None,
                 seed=0):
        self.model = model
        self.example_inputs = _as_tuple(example_inputs)
        self.example_targets = example_targets
        self.loss = loss
        self.optimizer = optimizer
        self.sparse_update = sparse_update
        self.name = name or _default_name(model)
        self.seed = seed
        self._validate()

    def _validate(self) -> None:
        # bool is an int to Python, but True as a seed is a mistake; the seed is stored as int64.
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 63:
            raise JobError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        self.seed = int(self.seed)
        if not isinstance(self.optimizer, Optimizer):
            hint = ""
            if type(self.optimizer).__module__.startswith("torch.optim"):
                hint = (f" (got torch.optim.{type(self.optimizer).__name__}: "
                        f"use pockengine.optim.{type(self.optimizer).__name__} with the same arguments)")
            raise JobError(f"optimizer must be a pockengine.optim optimizer such as pe.optim.SGD(lr=0.01){hint}")
        if isinstance(self.sparse_update, dict):
            self.sparse_update = SparseUpdate(self.sparse_update)
        if self.sparse_update is not None and not isinstance(self.sparse_update, SparseUpdate):
            raise JobError(f"sparse_update must be a pockengine.SparseUpdate, a dict of rules or None, "
                           f"got {type(self.sparse_update).__name__}")
        if not self.example_inputs:
            raise JobError("example_inputs is empty: pass the model's input tensor(s)")
        if self.example_targets is None:
            raise JobError("example_targets is missing: pass a target tensor for the loss")
        if isinstance(self.loss, str):
            if self.loss not in LOSS_NAMES:
                raise LossError(f"unknown loss {self.loss!r}: use one of {', '.join(LOSS_NAMES)} or a callable "
                                "loss(output, target) -> scalar tensor")
        elif self.is_onnx:
            raise LossError(f"an ONNX model takes a named loss ({', '.join(LOSS_NAMES)}), got {self.loss!r}: the "
                            "loss is built from the ONNX graph's output")
        elif not callable(self.loss):
            raise LossError(f"loss must be one of {', '.join(LOSS_NAMES)} or a callable loss(output, target) -> "
                            f"scalar tensor, got {self.loss!r}")
        if self.is_onnx:
            if self.sparse_update is not None and self.sparse_update.lora_spec is not None:
                raise JobError("SparseUpdate.lora adds adapters to a torch model; an ONNX model cannot take them")
            if self.sparse_update is not None and self.sparse_update.lite_residual_spec is not None:
                raise JobError("SparseUpdate.lite_residual adds branches to a torch model; an ONNX model cannot "
                               "take them")
            return
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is a dependency
            raise JobError("a torch model needs PyTorch installed") from e
        if not isinstance(self.model, torch.nn.Module):
            raise JobError(f"model must be a torch.nn.Module or an ONNX model, got {type(self.model).__name__}")
        lora = self.sparse_update.lora_spec if self.sparse_update is not None else None
        if lora is not None:  # train a copy with adapters; the caller's model stays as it is
            import copy

            from .lora import add_lora

            self.model = copy.deepcopy(self.model)
            self.lora_modules = add_lora(self.model, **lora)
        for i, x in enumerate(self.example_inputs + (self.example_targets,)):
            what = "example_targets" if i == len(self.example_inputs) else f"example_inputs[{i}]"
            if not isinstance(x, torch.Tensor):
                raise JobError(f"{what} must be a torch.Tensor for a torch model, got {type(x).__name__}")
            if x.numel() == 0:
                raise JobError(f"{what} is empty (shape {tuple(x.shape)}): the step is compiled for the example "
                               "batch's shape; pass a batch of the size you will train with")
        branches = self.sparse_update.lite_residual_spec if self.sparse_update is not None else None
        if branches is not None:  # train a copy with the branches; the caller's model stays as it is
            import copy

            from .lite_residual import add_lite_residuals

            self.model = copy.deepcopy(self.model)
            self.lite_residual_blocks = add_lite_residuals(self.model, self.example_inputs, **branches)
        half = (torch.float16, torch.bfloat16)
        low = [(f"example_inputs[{i}]", x.dtype) for i, x in enumerate(self.example_inputs) if x.dtype in half]
        low += [(name, p.dtype) for name, p in self.model.named_parameters() if p.dtype in half][:1]
        if low:
            raise JobError(f"{low[0][0]} is {str(low[0][1]).replace('torch.', '')}: PockEngine trains float32 and "
                           "float64 models (float16/bfloat16 training is not supported yet). Convert with "
                           "model.float() and x.float()")

    @property
    def is_onnx(self) -> bool:
        if isinstance(self.model, (str, os.PathLike)):
            return str(self.model).endswith(".onnx")
        return type(self.model).__name__ == "ModelProto"

    def import_model(self):
        """Run the frontend: -> ImportedModel."""
        if self.is_onnx:
            from .frontend.onnx import import_onnx

            return import_onnx(self.model, self.example_inputs, self.example_targets, self.loss)
        from .frontend.torch import import_torch

        return import_torch(self.model, self.example_inputs, self.example_targets, self.loss, seed=self.seed)

    def plan(self, imported) -> dict:
        """{parameter name: "full" | "frozen" | sparse.Partial} for the imported model.

        Without a sparse_update scheme: parameters with requires_grad train (all floating-point
        parameters, for ONNX); with one, the scheme decides.
        """
        if self.sparse_update is not None:
            from .frontend.parameter_use import parameter_ops

            kinds = parameter_ops(imported.func, imported.param_vars)
            table = [(s.name, s.shape, kinds[s.name]) for s in imported.params]
            # A tied parameter's other name (lm_head.weight) may be named by the scheme too; it comes
            # last in model order (an LM head), and the tensor trains if any of its names does.
            shapes = {s.name: s.shape for s in imported.params}
            table += [(alias, shapes[name], kinds[name]) for alias, name in imported.aliases.items()]
            # A quantized frozen base's weights (pe.quantize.awq / smoothquant) are buffers; the scheme
            # sees them as the linear weights they stand for, so that its rules find the same blocks
            # and layers as in the float model.
            quantized = self._quantized_weights()
            table += [(f"{quantized[s.name][0]}.weight", s.shape, "linear") for s in imported.buffers
                      if s.name in quantized]
            decided = self.sparse_update.resolve(table)
            for alias, name in imported.aliases.items():
                decided[name] = max(decided[name], decided.pop(alias), key=_training_rank)
            for layer, kind in quantized.values():
                if decided.pop(f"{layer}.weight", FROZEN) != FROZEN:
                    raise JobError(f"sparse_update trains {layer}, whose weight is {kind} (a quantized frozen "
                                   "base); give the scheme to the quantization too (pe.quantize.awq(..., "
                                   "sparse_update=scheme)) so that the layers it trains stay float")
            return decided
        if self.is_onnx:
            return {p.name: FULL if p.dtype.startswith("float") else FROZEN for p in imported.params}
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        return {p.name: FROZEN if p.name in frozen else FULL for p in imported.params}

    def _quantized_weights(self) -> dict:
        """{buffer name: (its layer, what it is)} of the model's quantized linear weights
        (pockengine/awq.py's W4Linear.packed, pockengine/smoothquant.py's W8Linear.weight_int8)."""
        if self.is_onnx:
            return {}
        from .awq import W4Linear
        from .smoothquant import W8Linear

        found = {}
        for name, module in self.model.named_modules():
            if isinstance(module, W4Linear):
                found[f"{name}.packed"] = (name, "4-bit")
            elif isinstance(module, W8Linear):
                found[f"{name}.weight_int8"] = (name, "int8")
        return found

    def state_dict_keys(self) -> list[str] | None:
        """The model's state_dict() key order (torch interleaves parameters and buffers by module)."""
        if self.is_onnx:
            return None
        return list(self.model.state_dict().keys())


def _training_rank(rule) -> int:
    """How much of a tensor a rule trains: frozen < some channels < all of it."""
    return 2 if rule == FULL else 0 if rule == FROZEN else 1


def _as_tuple(x) -> tuple:
    if isinstance(x, (tuple, list)):
        return tuple(x)
    return (x,) if x is not None else ()


def _default_name(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.path.splitext(os.path.basename(str(model)))[0]
    return type(model).__name__.lower()


def load_job(path: str) -> TrainingJob:
    """Execute a train.py and return its module-level `job`."""
    return load_script(path)["job"]


def load_script(path: str) -> dict:
    """Execute a train.py and return its module-level names; its `job` checked to be a TrainingJob."""
    import runpy

    if not os.path.isfile(path):
        raise JobError(f"no such file: {path}")
    # As `python train.py` would, let the script import modules that sit beside it.
    script_dir = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, script_dir)
    try:
        scope = runpy.run_path(path, run_name="__pockengine_job__")
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"{path} failed while defining the job: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(script_dir)
    job = scope.get("job")
    if job is None:
        raise JobError(f"{path} defines no `job`: add a module-level `job = pockengine.TrainingJob(...)`")
    if not isinstance(job, TrainingJob):
        raise JobError(f"`job` in {path} is a {type(job).__name__}, not a pockengine.TrainingJob")
    return scope
