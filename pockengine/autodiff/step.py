"""The whole training step as ONE Relax function, derived at compile time.

    train_step(batch..., params..., buffers...[, rng.seed], lr, step, optimizer slots...)
        -> (loss, new trainable params..., new mutated buffers..., new step, new slots...)

Forward + loss come from a frontend (`forward_loss`). Everything that does not depend on a trained
parameter is hoisted out (computed first, never differentiated); Relax's `Gradient` pass then
differentiates the rest with respect to the trained parameters only, and the optimizer's update is
emitted after the gradients in the same dataflow block, so later passes see and schedule forward,
backward and update together. Weights trained on their leading channels arrive already split by
passes/prune_backward.py.

A model with dropout or stochastic depth draws its masks from the state's seed and the step counter
(the optimizer's `step`, read before it is incremented): the masks depend on no parameter, so they
are hoisted with the frozen prefix and are data to the backward, which multiplies by the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax

from ..errors import JobError, LossError, UnsupportedOpError
from ..frontend import FUNC_NAME, RNG_SEED, ImportedModel, TensorSpec, w8_ops
from ..ir import Substitute, bindings_of, bound_values, inline_body
from ..optim import LR, STEP, UPDATE_PREFIX, Optimizer, _Emitter
from ..sparse import FROZEN as FROZEN_RULE
from ..sparse import Partial
from . import gradients
from .guards import IndexRange, emit_batch_check, emit_loss_check, gate, index_ranges

STEP_FUNC = "train_step"
RECOMPUTED_SUFFIX = "_recomputed"  # forward values the backward computes again

# A weight trained on its leading channels arrives split (passes/prune_backward.py): the binding
# `<param var>__trained` is differentiated and updated, `<param var>__frozen` is not. train_step takes
# the two parts as parameters of their own (same suffixes; see SplitWeight).
TRAINED, FROZEN_PART = "__trained", "__frozen"

# Ops without a gradient rule that DecomposeOpsForTraining rewrites into differentiable ones first.
DECOMPOSED_FOR_TRAINING = {"relax.nn.layer_norm", "relax.nn.batch_norm"}

# State categories, used by the runtime, the manifest and the memory report.
PARAM, FROZEN, BUFFER, OPTIMIZER = "param", "frozen_param", "buffer", "optimizer"


@dataclass(frozen=True)
class SplitWeight:
    """A weight trained on its first `channels` entries of `axis` is two state tensors: those
    channels (`trained`, e.g. `conv.weight[:, :8]`) and the rest (`frozen`, `conv.weight[:, 8:]`).
    The step reads both and writes only the first; it never copies the whole weight, and a
    microcontroller keeps the frozen part in Flash. state_dict() joins them again."""

    axis: int
    channels: int
    trained: str
    frozen: str

    @classmethod
    def of(cls, name: str, axis: int, channels: int) -> SplitWeight:
        lead = ":, " * axis
        return cls(axis, channels, f"{name}[{lead}:{channels}]", f"{name}[{lead}{channels}:]")

    def split(self, array: np.ndarray) -> dict:
        first, rest = np.split(np.asarray(array), [self.channels], axis=self.axis)
        return {self.trained: np.ascontiguousarray(first), self.frozen: np.ascontiguousarray(rest)}

    def join(self, trained: np.ndarray, frozen: np.ndarray) -> np.ndarray:
        return np.concatenate([trained, frozen], axis=self.axis)


@dataclass(frozen=True)
class Panels:
    """A frozen weight W[N, K] held as `[N / width, K, width]`: the panels its CPU matmul reads
    (passes/pack_frozen_weights.py), made when the state is loaded; state_dict() unmakes them."""

    width: int

    def pack(self, array: np.ndarray) -> np.ndarray:
        rows, depth = array.shape
        return np.ascontiguousarray(np.asarray(array).reshape(rows // self.width, self.width, depth).transpose(0, 2, 1))

    def unpack(self, array: np.ndarray) -> np.ndarray:
        panels, depth, width = array.shape
        return np.ascontiguousarray(np.asarray(array).transpose(0, 2, 1).reshape(panels * width, depth))

    def to_json(self) -> int:
        return self.width

    def model_shape(self, shape) -> tuple:
        panels, depth, width = shape
        return (panels * width, depth)

    def packed_shape(self, shape) -> tuple:
        rows, depth = shape
        return (rows // self.width, depth, self.width)


@dataclass(frozen=True)
class Int8DotLayout:
    """A frozen int8 weight W[N, K] of a W8A8 layer held as `[N' / lanes, K' / 4, lanes, 4]`, the
    layout a CPU's int8 dot product reads (frontend/w8_ops.py, passes/interleave_int8_weights.py): N
    padded to N' (a whole register tile of columns) and K to K' (a multiple of 4) with zeros, made
    when the state is loaded; state_dict() unmakes it."""

    rows: int
    depth: int
    lanes: int  # sums per instruction: 16 (AVX-512 VNNI) or 4 (aarch64 sdot)

    def packed_shape(self, shape=None) -> tuple:
        return w8_ops.interleaved_shape(self.rows, self.depth, self.lanes)

    def model_shape(self, shape=None) -> tuple:
        return (self.rows, self.depth)

    def pack(self, array: np.ndarray) -> np.ndarray:
        blocks, quads, lanes, quad = self.packed_shape()
        padded = np.zeros((blocks * lanes, quads * quad), dtype=np.asarray(array).dtype)
        padded[:self.rows, :self.depth] = array
        return np.ascontiguousarray(padded.reshape(blocks, lanes, quads, quad).transpose(0, 2, 1, 3))

    def unpack(self, array: np.ndarray) -> np.ndarray:
        blocks, quads, lanes, quad = array.shape
        whole = np.asarray(array).transpose(0, 2, 1, 3).reshape(blocks * lanes, quads * quad)
        return np.ascontiguousarray(whole[:self.rows, :self.depth])

    def to_json(self) -> dict:
        return {"layout": "int8_dot", "rows": self.rows, "depth": self.depth, "lanes": self.lanes}


def packed_layout_from_json(value):
    """A StepSignature.packed entry from its JSON: a panel width, or a layout's dict."""
    if isinstance(value, dict):
        return Int8DotLayout(int(value["rows"]), int(value["depth"]), int(value["lanes"]))
    return Panels(int(value))


@dataclass
class StepSignature:
    """How to call `train_step`: its inputs in order and which state each output replaces."""

    batch: list[TensorSpec]
    state: list[TensorSpec]  # every state tensor the step reads, in argument order after the batch
    categories: dict  # state name -> PARAM | FROZEN | BUFFER | OPTIMIZER
    outputs: list[str]  # state names written by outputs 1.. (output 0 is the loss)
    loss_dtype: str
    # Partially trained parameters (model names) -> the two state tensors they are split into.
    partial: dict = field(default_factory=dict)
    # Frozen weights the step reads in a matmul's layout (state name -> Panels or Int8DotLayout).
    packed: dict = field(default_factory=dict)
    # Integer batch inputs used as indices and the values they may take (guards.IndexRange).
    index_ranges: list = field(default_factory=list)
    # The step checks its batch and new parameters itself (guards.py); artifacts built before it
    # did are checked by the runtime from Python.
    checks_in_step: bool = False

    @property
    def trained_shapes(self) -> dict:
        """Partially trained parameters -> the shape of their trained leading channels."""
        shapes = {s.name: s.shape for s in self.state}
        return {name: shapes[split.trained] for name, split in self.partial.items()}

    @property
    def trained_elements(self) -> int:
        """How many parameter values the step trains (a partially trained weight: its trained channels)."""
        return sum(int(np.prod(s.shape)) for s in self.state if self.categories[s.name] == PARAM)

    def state_aliases(self) -> dict:
        """{position in train_step's returned tuple: index of the parameter holding the old value}:
        which output may be written over which input (update_in_place)."""
        state_index = {spec.name: i for i, spec in enumerate(self.state)}
        return {1 + k: len(self.batch) + state_index[name] for k, name in enumerate(self.outputs)}

    def owner(self, state_name: str) -> str:
        """The model parameter a state tensor holds (part of), or the state name itself."""
        return next((name for name, split in self.partial.items() if state_name in (split.trained, split.frozen)),
                    state_name)

    def split_state(self, arrays: dict) -> dict:
        """{model name: array} -> {state name: array}: partially trained weights split in two."""
        out = {}
        for name, value in arrays.items():
            out.update(self.partial[name].split(value) if name in self.partial else {name: value})
        return {name: self.packed[name].pack(value) if name in self.packed else value for name, value in out.items()}

    def model_layout(self, name: str, array: np.ndarray) -> np.ndarray:
        """A state tensor as the model holds it (a packed weight unpacked)."""
        return self.packed[name].unpack(array) if name in self.packed else array

    def with_packed(self, widths: dict) -> StepSignature:
        """This signature with the state tensors of `widths` ({name: panel width}) held as Panels."""
        return self.with_layouts({name: Panels(width) for name, width in widths.items()})

    def with_layouts(self, layouts: dict) -> StepSignature:
        """This signature with the state tensors of `layouts` ({name: Panels or Int8DotLayout}) held so."""
        state = [TensorSpec(s.name, layouts[s.name].packed_shape(s.shape), s.dtype) if s.name in layouts else s
                 for s in self.state]
        return replace(self, state=state, packed={**self.packed, **layouts})

    def with_state_dtypes(self, dtypes: dict) -> StepSignature:
        """This signature with the state tensors of `dtypes` ({name: dtype}) stored in that dtype
        (passes/narrow_quantized.py: frozen int8 weights)."""
        state = [TensorSpec(s.name, s.shape, dtypes[s.name]) if s.name in dtypes else s for s in self.state]
        return replace(self, state=state)

    def to_json(self) -> dict:
        return {
            "batch": [s.to_json() for s in self.batch],
            "state": [dict(s.to_json(), category=self.categories[s.name]) for s in self.state],
            "outputs": ["loss"] + self.outputs,
            "loss_dtype": self.loss_dtype,
            "partial": {k: vars(v) for k, v in self.partial.items()},
            "packed": {k: v.to_json() for k, v in self.packed.items()},
            "index_ranges": [r.to_json() for r in self.index_ranges],
            "checks_in_step": self.checks_in_step,
        }

    @classmethod
    def from_json(cls, d: dict) -> StepSignature:
        return cls(
            batch=[TensorSpec.from_json(s) for s in d["batch"]],
            state=[TensorSpec.from_json(s) for s in d["state"]],
            categories={s["name"]: s["category"] for s in d["state"]},
            outputs=list(d["outputs"][1:]),
            loss_dtype=d["loss_dtype"],
            partial={k: SplitWeight(**v) for k, v in d.get("partial", {}).items()},
            packed={k: packed_layout_from_json(v) for k, v in d.get("packed", {}).items()},
            index_ranges=[IndexRange.from_json(r) for r in d.get("index_ranges", [])],
            checks_in_step=bool(d.get("checks_in_step", False)),
        )


def backward_start(bindings) -> int:
    """Index of the first backward binding of a train_step's bindings: Relax's Gradient pass names
    every binding it creates `*_adjoint`, drop_saved_activations its recomputations `*_recomputed`;
    everything before is the forward (frozen prefix included)."""
    return next((i for i, b in enumerate(bindings) if b.var.name.endswith(("_adjoint", RECOMPUTED_SUFFIX))),
                len(bindings))


def slot_name(slot: str, param: str) -> str:
    return f"optimizer.{slot}.{param}"


def check_differentiable(imported: ImportedModel, trainable: list[str]) -> None:
    """Raise UnsupportedOpError naming every op (and its torch origin) that lies between a trainable
    parameter and the loss and has no gradient rule. Ops only frozen parts use are fine."""
    gradients.install()
    func = imported.func
    pvars = imported.param_vars
    live = {pvars[name] for name in trainable}  # vars a gradient can flow back into
    bindings = bindings_of(func)
    # Boolean and integer tensors (masks, indices) carry no gradient: the chain stops there. Relax's
    # Gradient pass still wants a rule for the op that makes one from a trained value (argsort).
    reads_trained = set()
    for b in bindings:
        if any(v in live for v in relax.analysis.free_vars(b.value)):
            reads_trained.add(b.var)
            if _carries_gradient(b.var.ty):
                live.add(b.var)
    loss = _loss_expr(func)
    if not any(v in live for v in relax.analysis.free_vars(loss)) and not any(v in live for v in [loss]):
        raise LossError("the loss does not depend on any trained parameter through differentiable operations "
                        "(argmax, comparisons and integer casts have no gradient), so nothing would train; "
                        "PyTorch raises 'element 0 of tensors does not require grad' here. Use a differentiable "
                        "loss (cross_entropy on the logits), or check which parameters sparse_update trains")
    needed = set(relax.analysis.free_vars(loss))  # vars the loss depends on
    missing = []
    for b in reversed(bindings):
        if b.var not in needed:
            continue
        needed.update(relax.analysis.free_vars(b.value))
        value = b.value
        if b.var in reads_trained and isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            name = value.op.name
            if name not in DECOMPOSED_FOR_TRAINING and not gradients.has_gradient(name):
                if name == "relax.call_tir":
                    name = f"relax.call_tir({value.args[0].name_hint})"
                missing.append(f"  {name}  <-  {imported.origin.get(b.var.name, 'unknown origin')}")
    if missing:
        listing = "\n".join(dict.fromkeys(reversed(missing)))
        raise UnsupportedOpError(
            f"no gradient rule for {len(missing)} operation(s) between the trained parameters and the loss:\n"
            f"{listing}\n"
            "Fix: freeze the parameters before these operations (sparse_update / requires_grad=False), "
            "replace the operation in the model, or add a rule to pockengine/autodiff/gradients.py."
        )


def hoist_frozen(func, trainable_vars, trained_slices=()):
    """Split `func` into the bindings that do not depend on a trainable parameter (returned as a
    list, to run first) and a function of everything else that takes the hoisted values it uses as
    extra parameters.

    Relax's Gradient pass builds adjoints for every binding on the backward path, including frozen
    prefixes and target-only masks, and needs a rule for each of their ops; after hoisting, it sees
    only what a gradient can actually flow through. `trained_slices` are bindings (the trained part of
    a partially trained weight) that are computed in the prefix but differentiated: they become
    parameters of the function like other hoisted values, and what they feed stays in it.
    Returns (prefix bindings, function, hoisted vars in the order of the function's extra parameters).
    """
    if len(func.body.blocks) != 1:
        raise UnsupportedOpError("the imported forward has control flow; only a single dataflow graph is supported")
    depends = set(trainable_vars) | set(trained_slices)
    prefix, main = [], []
    for b in func.body.blocks[0].bindings:
        if b.var not in trained_slices and any(v in depends for v in relax.analysis.free_vars(b.value)):
            depends.add(b.var)
            main.append(b)
        else:
            prefix.append(b)
    if not any(v in depends for v in relax.analysis.free_vars(_loss_expr(func))):
        raise JobError("the loss does not depend on any trained parameter: nothing to differentiate")
    hoisted = {b.var for b in prefix}
    used = list(dict.fromkeys(v for expr in [b.value for b in main] + [func.body.body]
                              for v in relax.analysis.free_vars(expr) if v in hoisted))
    new_params = {v: relax.Var(v.name, v.ty) for v in used}
    body = relax.BlockBuilder().normalize(relax.SeqExpr([relax.DataflowBlock(main)], func.body.body))
    main_func = relax.Function(list(func.params) + list(new_params.values()), body, attrs=func.attrs)
    return prefix, Substitute(new_params).visit_expr(main_func), used


def _trained_spec(spec: TensorSpec, part) -> TensorSpec:
    """The shape the optimizer sees: the whole parameter, or its trained leading channels."""
    if part is None:
        return spec
    shape = list(spec.shape)
    shape[part.axis] = part.channels
    return TensorSpec(spec.name, tuple(shape), spec.dtype)


def _gradient_scales(imported: ImportedModel, optimizer: Optimizer, trained: list) -> dict:
    """{trained parameter: the constant its gradient is multiplied by before the update}: QAS's
    per-channel factors (optim.SGD(qas=True)), cut to the trained channels of a partial weight."""
    if not getattr(optimizer, "qas", False):
        return {}
    scales = {}
    for spec in trained:
        factor = imported.gradient_scales.get(spec.name)
        if factor is None:
            continue
        index = tuple(slice(0, n) if f != 1 else slice(None) for f, n in zip(factor.shape, spec.shape))
        scales[spec.name] = np.ascontiguousarray(factor[index]).astype(spec.dtype)
    if not scales:
        raise JobError("SGD(qas=True) scales the gradients of a quantized model's int8 layers "
                       "(pe.quantize.int8), and none of the trained parameters is one: train a quantized "
                       "model, or drop qas")
    return scales


def _part_specs(spec: TensorSpec, part, split: SplitWeight) -> tuple:
    """The state tensors of a partially trained parameter: its trained channels, the frozen rest."""
    rest = list(spec.shape)
    rest[part.axis] -= part.channels
    return (TensorSpec(split.trained, _trained_spec(spec, part).shape, spec.dtype),
            TensorSpec(split.frozen, tuple(rest), spec.dtype))


def _carries_gradient(ty) -> bool:
    if isinstance(ty, relax.TupleType):
        return any(_carries_gradient(f) for f in ty.fields)
    return isinstance(ty, relax.TensorType) and str(ty.dtype).startswith(("float", "bfloat"))


def _loss_expr(func):
    body = func.body.body
    bound = bound_values(func)
    while isinstance(body, relax.Var) and body in bound:
        body = bound[body]
    return body.fields[0] if isinstance(body, relax.Tuple) else body


def build_train_step(imported: ImportedModel, optimizer: Optimizer, plan: dict):
    """plan: {parameter name: "full" | "frozen" | sparse.Partial}
    -> (IRModule with `train_step`, StepSignature, initial optimizer state as {name: array}).

    Differentiate forward_loss (_differentiate), lay out the state the optimizer adds and the parts of
    partially trained weights, emit the step (_emit_step), then say how to call it (_signature)."""
    gradients.install()
    trainable = [s.name for s in imported.params if plan.get(s.name, FROZEN_RULE) != FROZEN_RULE]
    if not trainable:
        raise JobError("nothing to train: every parameter is frozen")
    check_differentiable(imported, trainable)
    partial = {name: rule for name, rule in plan.items() if isinstance(rule, Partial)}
    differentiated = _differentiate(imported, trainable, partial)

    trainable_set = set(trainable)
    trained = [_trained_spec(s, partial.get(s.name)) for s in imported.params if s.name in trainable_set]
    slots = {(slot, s.name): TensorSpec(slot_name(slot, s.name), s.shape, s.dtype)
             for slot in optimizer.slots() for s in trained}
    specs = {s.name: s for s in imported.params}
    splits = {n: SplitWeight.of(n, partial[n].axis, partial[n].channels) for n in partial}
    part_specs = {n: _part_specs(specs[n], partial[n], splits[n]) for n in partial}
    ranges = index_ranges(imported.func, [s.name for s in imported.inputs], imported.origin)

    scales = _gradient_scales(imported, optimizer, trained)
    step_mod, checks_in_step = _emit_step(imported, optimizer, differentiated, trained, slots, part_specs, ranges,
                                          scales)
    signature = _signature(imported, trainable_set, trained, slots, splits, part_specs, ranges, checks_in_step)
    init = {LR: np.array(optimizer.lr, "float64"), STEP: np.array(0, "int64")}
    init.update({spec.name: np.zeros(spec.shape, spec.dtype) for spec in slots.values()})
    return step_mod, signature, init


@dataclass
class _Differentiated:
    """forward_loss as the step runs it: the bindings hoisted out of differentiation (hoist_frozen),
    then the adjoint of the rest (Relax's Gradient w.r.t. the trained parameters)."""

    prefix: list  # hoisted bindings, reading forward_loss's parameter Vars
    forward_params: list  # forward_loss's parameters
    param_vars: dict  # model parameter name -> its parameter of forward_loss
    slices: dict  # partially trained parameter -> the Vars of its (trained, frozen) slice bindings
    hoisted: list  # prefix Vars the adjoint reads, in the order of its extra parameters
    adjoint: relax.Function  # forward_loss's parameters, then `hoisted` -> ((loss, new buffers...), gradients)

    @property
    def params(self) -> list:
        """The adjoint's Vars for forward_loss's parameters (the step reuses them)."""
        return list(self.adjoint.params)[:len(self.forward_params)]

    @property
    def hoisted_params(self) -> list:
        return list(self.adjoint.params)[len(self.forward_params):]


def _differentiate(imported: ImportedModel, trainable: list, partial: dict) -> _Differentiated:
    """forward_loss differentiated w.r.t. the `trainable` parameters; those in `partial` arrive
    split by prune_backward, and their trained slices are what is differentiated."""
    n_in = len(imported.inputs)
    mod = relax.transform.DecomposeOpsForTraining(FUNC_NAME)(imported.mod)
    fparams = list(mod[FUNC_NAME].params)
    n_orig = len(fparams)
    pvars = dict(zip([s.name for s in imported.params], fparams[n_in:]))
    bound = {b.var.name: b.var for b in bindings_of(mod[FUNC_NAME])}
    missing = [n for n in partial if pvars[n].name + TRAINED not in bound]
    if missing:
        raise ValueError(f"partially trained {missing} arrive unsplit: run passes.prune_backward first")
    slices = {n: (bound[pvars[n].name + TRAINED], bound[pvars[n].name + FROZEN_PART]) for n in partial}
    full = [pvars[n] for n in trainable if n not in partial]
    prefix, main, hoisted = hoist_frozen(mod[FUNC_NAME], full, [t for t, _ in slices.values()])
    # Gradient differentiates w.r.t. parameters of the function: full weights, and the trained slices
    # of partial ones, which hoisting turned into extra parameters.
    slice_params = {n: main.params[n_orig + hoisted.index(t)] for n, (t, _) in slices.items()}
    require = [pvars[n] if n not in partial else slice_params[n] for n in trainable]
    mod = tvm.IRModule({FUNC_NAME: main})
    mod = relax.transform.Gradient(FUNC_NAME, require_grads=require, target_index=0)(mod)
    return _Differentiated(prefix, fparams, pvars, slices, hoisted, mod[FUNC_NAME + "_adjoint"])


def _emit_step(imported: ImportedModel, optimizer: Optimizer, differentiated: _Differentiated, trained: list,
               slots: dict, part_specs: dict, ranges: list, scales: dict):
    """(the module of train_step, whether it checks its batch): the batch check, forward and
    backward, the optimizer's updates, each new value gated by the batch check, the loss check."""
    n_in, n_p = len(imported.inputs), len(imported.params)
    aparams = differentiated.params
    # What each trained parameter's update reads: the adjoint's parameter, or for a partially trained
    # weight its hoisted trained slice.
    by_name = dict(zip([s.name for s in imported.params], aparams[n_in:n_in + n_p]))
    by_name.update({n: differentiated.hoisted_params[differentiated.hoisted.index(t)]
                    for n, (t, _) in differentiated.slices.items()})
    lr_var = relax.Var(LR, relax.TensorType((), "float64"))
    # A model that samples reads the step counter in its forward: that parameter is the step's.
    step_var = aparams[-1] if imported.random_sites else relax.Var(STEP, relax.TensorType((), "int64"))
    slot_vars = {key: relax.Var(spec.name, relax.TensorType(spec.shape, spec.dtype)) for key, spec in slots.items()}
    model_params, slice_param = _model_params(imported, differentiated, part_specs)
    buffer_vars = dict(zip([s.name for s in imported.buffers], aparams[n_in + n_p:]))
    bb = relax.BlockBuilder()
    all_params = model_params + [lr_var, step_var] + list(slot_vars.values())
    with bb.function(STEP_FUNC, all_params, attrs={"num_input": n_in}):
        with bb.dataflow():
            batch_ok = emit_batch_check(bb, dict(zip([s.name for s in imported.inputs], aparams[:n_in])), ranges)
            outputs, grads = _emit_forward_backward(bb, differentiated, slice_param)
            loss, new_buffers = outputs[0], outputs[1:]
            grads = [bb.emit(relax.op.multiply(g, relax.const(scales[s.name], s.dtype)), UPDATE_PREFIX + "qas")
                     if s.name in scales else g for s, g in zip(trained, grads)]
            new_step, new_params, slot_out = _emit_updates(bb, optimizer, batch_ok, trained, grads, by_name,
                                                           lr_var, step_var, slot_vars)
            new_buffers = [gate(bb, batch_ok, b, buffer_vars[name], name)
                           for name, b in zip(imported.mutated_buffers, new_buffers)]
            loss = emit_loss_check(bb, loss, batch_ok, new_params)
            out = bb.emit_output(relax.Tuple([loss] + new_params + list(new_buffers) + [new_step] + slot_out))
        bb.emit_func_output(out)
    step_mod = relax.transform.DeadCodeElimination([STEP_FUNC])(bb.get())  # train_step and the guard's kernel
    return step_mod, batch_ok is not None


def _model_params(imported: ImportedModel, differentiated: _Differentiated, part_specs: dict) -> tuple[list, dict]:
    """(train_step's parameters before the optimizer's, {slice binding Var: the parameter it becomes}).

    They are the adjoint's Vars for forward_loss's parameters (batch, parameters, buffers; a sampling
    model's step counter is the optimizer's), except that a partially trained weight is passed as its
    two parts (SplitWeight) where the whole weight was: prune_backward's slices of the whole weight
    become those parameters."""
    n_in, n_p = len(imported.inputs), len(imported.params)
    aparams = differentiated.params
    part_vars = {n: tuple(relax.Var(differentiated.param_vars[n].name + suffix, relax.TensorType(s.shape, s.dtype))
                          for suffix, s in zip((TRAINED, FROZEN_PART), part_specs[n])) for n in part_specs}
    slice_param = {bound_var: var for n in part_specs for bound_var, var in zip(differentiated.slices[n], part_vars[n])}
    param_name = {v: s.name for v, s in zip(aparams[n_in:n_in + n_p], imported.params)}
    random = bool(imported.random_sites)
    params = [p for v in aparams[:len(aparams) - random]
              for p in (part_vars[param_name[v]] if param_name.get(v) in part_specs else (v,))]
    return params, slice_param


def _emit_forward_backward(bb: relax.BlockBuilder, differentiated: _Differentiated, slice_param: dict):
    """Emit the hoisted prefix, then the adjoint: ((loss, new buffers...), gradients)."""
    # The prefix was cut from forward_loss: point it at the adjoint's parameter Vars (ours).
    to_ours = Substitute(dict(zip(differentiated.forward_params, differentiated.params)))
    for binding in differentiated.prefix:
        value = slice_param.get(binding.var)
        value = to_ours.visit_expr(binding.value) if value is None else value
        bb.emit_normalized(relax.VarBinding(binding.var, value))
    for param, value in zip(differentiated.hoisted_params, differentiated.hoisted):
        bb.emit_normalized(relax.VarBinding(param, value))
    return inline_body(bb, differentiated.adjoint)


def _emit_updates(bb: relax.BlockBuilder, optimizer: Optimizer, batch_ok, trained: list, grads, by_name: dict,
                  lr_var, step_var, slot_vars: dict):
    """Emit the optimizer's step: (new step counter, new parameters, new slots slot by slot)."""
    new_step = gate(bb, batch_ok, relax.op.add(step_var, relax.const(1, "int64")), step_var, STEP)
    step_f64 = bb.emit(relax.op.astype(new_step, "float64"), UPDATE_PREFIX + "step_f64")
    new_params, new_slots = [], []
    for s, grad in zip(trained, grads):
        em = _Emitter(bb, s.dtype, lambda new, old, name: gate(bb, batch_ok, new, old, name))
        slots = {slot: slot_vars[(slot, s.name)] for slot in optimizer.slots()}
        p, updated = optimizer.update(em, by_name[s.name], grad, slots, lr_var, step_f64)
        new_params.append(p)
        new_slots.append(updated)
    # A refused batch (guards.emit_batch_check) changes nothing: every new value is gated
    # (the optimizer's slots where it computes them, _Emitter.slot).
    new_params = [gate(bb, batch_ok, p, by_name[s.name], s.name) for s, p in zip(trained, new_params)]
    slot_out = [new_slots[i][slot] for slot in optimizer.slots() for i in range(len(trained))]
    return new_step, new_params, slot_out


def _signature(imported: ImportedModel, trainable: set, trained: list, slots: dict, splits: dict, part_specs: dict,
               ranges: list, checks_in_step: bool) -> StepSignature:
    """How to call the step _emit_step wrote: its state in argument order, each tensor's category,
    and what each output replaces."""
    param_state = []  # the parameters as the step reads them: partial ones as their two parts
    for spec in imported.params:
        if spec.name in part_specs:
            param_state += part_specs[spec.name]
        else:
            param_state.append(spec)
    categories = {s.name: (PARAM if s.name in trainable else FROZEN) for s in imported.params if s.name not in splits}
    categories.update({split.trained: PARAM for split in splits.values()})
    categories.update({split.frozen: FROZEN for split in splits.values()})
    categories.update({s.name: BUFFER for s in imported.buffers})
    opt_specs = [TensorSpec(LR, (), "float64"), TensorSpec(STEP, (), "int64")] + list(slots.values())
    # The generator's seed travels with the optimizer state (saved, exported, loaded with it).
    rng_specs = [TensorSpec(RNG_SEED, (), "int64")] if imported.random_sites else []
    categories.update({s.name: OPTIMIZER for s in opt_specs + rng_specs})
    return StepSignature(
        batch=list(imported.inputs),
        state=param_state + list(imported.buffers) + rng_specs + opt_specs,
        categories=categories,
        outputs=[splits[s.name].trained if s.name in splits else s.name for s in trained]
        + list(imported.mutated_buffers) + [STEP] + [spec.name for spec in slots.values()],
        loss_dtype=str(_loss_expr(imported.func).ty.dtype),
        partial=splits,
        index_ranges=ranges,
        checks_in_step=checks_in_step,
    )
