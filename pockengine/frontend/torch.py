"""PyTorch frontend: torch.export of (model + loss) -> Relax `forward_loss`.

We drive TVM's `ExportedProgramImporter` ourselves instead of calling `from_exported_program` because
that function (a) binds buffers as constants, (b) drops buffer-mutation outputs and (c) imports a
training-mode BatchNorm as an op whose new running statistics are zeros. A trainer needs the buffers
as state that flows in and out of the step, so here buffers stay inputs, mutations become outputs,
and BatchNorm is converted to explicit, differentiable arithmetic with PyTorch's running-stat update.
Along the way every Relax binding is traced back to the torch node it came from, for error messages.

Dropout and stochastic depth sample random numbers in training. TVM's importer would make dropout the
identity and `bernoulli`/`rand` constants, silently; here each is converted to uniforms of the step's
own generator (Philox4x32-10 in Relax ops, frontend/philox.py), counted from the state's seed and step
counter, which `forward_loss` then takes as two more parameters. Random ops without a conversion are
refused, naming where the model uses them.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

from ..errors import FrontendError, LossError, UnsupportedOpError
from ..ir import bindings_of
from . import FUNC_NAME, RNG_SEED, RNG_STEP, ImportedModel, Origin, TensorSpec, quantized_ops, w4_ops, w8_ops
from .decompositions import decompose
from .philox import RandomSource

LOSSES = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": nn.functional.mse_loss,
}


def resolve_loss(loss):
    """'cross_entropy' | 'mse' | a callable loss(output, target) -> scalar tensor."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise LossError(f"unknown loss {loss!r}: use one of {sorted(LOSSES)} or a callable loss(output, target)")
        return LOSSES[loss]
    if callable(loss):
        return loss
    raise LossError(f"loss must be a name ({sorted(LOSSES)}) or a callable loss(output, target), "
                    f"got {type(loss).__name__}")


class _ForwardLoss(nn.Module):
    """The graph we export: the user's model followed by the loss. Parameters keep their names under
    the `model.` prefix, which the importer strips again."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *inputs_and_target):
        *inputs, target = inputs_and_target
        return self.loss_fn(self.model(*inputs), target)


class _Forward(nn.Module):
    """The graph an inference artifact exports: the user's model and `output`, which picks the
    tensor to return from what the model returns."""

    def __init__(self, model: nn.Module, output):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, *inputs):
        return self.output(self.model(*inputs))


def import_torch(model: nn.Module, example_inputs: tuple, example_targets, loss, seed: int = 0) -> ImportedModel:
    """Export `loss(model(*example_inputs), example_targets)` and import it as `forward_loss`;
    `seed` is the initial value of the random generator's seed (used when the model samples)."""
    loss_fn = resolve_loss(loss)
    ep = _export(_ForwardLoss(model, loss_fn), tuple(example_inputs) + (example_targets,), "the model with its loss")
    _check_loss_is_scalar(ep)
    imported = _Importer(ep, seed).run()
    imported.gradient_scales = _gradient_scales(model, {s.name for s in imported.params})
    return imported


def import_torch_forward(model: nn.Module, example_inputs: tuple, output) -> ImportedModel:
    """Export `output(model(*example_inputs))` and import it as `forward_loss` without a target:
    (inputs..., params..., buffers...) -> (the output,). The model is exported as it is (an
    inference build puts it in eval mode first)."""
    ep = _export(_Forward(model, output or model_output), tuple(example_inputs), "the model")
    _check_single_output(ep)
    return _Importer(ep, has_target=False).run()


def model_output(out):
    """What an inference build returns by default: the model's tensor, or a transformers output's logits."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise FrontendError(f"the model returns a {type(out).__name__}, not a tensor; pass output= to pick the tensor "
                        "the artifact returns, e.g. output=lambda out: out[0]")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval mode for the block; after it, each module back in its own mode (a BatchNorm kept
    in eval mode inside a training model stays so, which model.train(was_training) would undo)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def _export(module: nn.Module, args: tuple, what: str):
    try:
        with warnings.catch_warnings():  # torch's own deprecation chatter from inside export
            warnings.simplefilter("ignore", FutureWarning)
            ep = torch.export.export(module, args, strict=False)
            _views_as_reshapes(ep)
            _stop_gradients(ep)
            # Core ATen decomposition: fewer distinct ops to differentiate, and PyTorch's own
            # semantics for composite ops (cross_entropy's ignore_index/label_smoothing, attention).
            return decompose(ep)
    except FrontendError:  # ours, from inside the forward (model_output): it says what to do
        raise
    except Exception as e:  # torch raises many kinds; the user needs the message, not the type
        raise FrontendError(
            f"torch.export could not capture {what}: {type(e).__name__}: {str(e)[:2000]}\n"
            f"Fix: the model's forward{' (and the loss)' if 'loss' in what else ''} must be exportable with "
            "torch.export.export (no data-dependent Python control flow; see torch.export's documentation)."
        ) from e


def _gradient_scales(model: nn.Module, params: set) -> dict:
    """{parameter name: per-channel factor} of the modules that say how QAS scales their gradients
    (pockengine.quantize.QuantizedConv2d.qas_gradient_scales)."""
    scales = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "qas_gradient_scales"):
            for name, factor in module.qas_gradient_scales().items():
                full = f"{prefix}.{name}" if prefix else name
                if full in params:
                    scales[full] = factor.detach().cpu().numpy()
    return scales


# Ops that PyTorch refuses for operands of different dtypes; torch.export's fake tensors let them
# through, and TVM then fails in the backward with a C++ type error.
_SAME_DTYPE_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "conv1d", "conv2d", "conv3d"}


def _check_operand_dtypes(node) -> None:
    if node.target.__name__.split(".")[0] not in _SAME_DTYPE_OPS:
        return
    dtypes = [str(a.meta["val"].dtype).replace("torch.", "") for a in node.args
              if hasattr(a, "meta") and hasattr(a.meta.get("val"), "dtype")]
    if len(set(dtypes)) > 1:
        raise FrontendError(f"{node_origin(node)} multiplies tensors of dtypes {', '.join(dtypes)} (PyTorch raises "
                            "'expected both to have the same dtype'). An example input of an integer dtype where "
                            "the model expects floats? Pass x.float() (or cast inside the model)")


def _views_as_reshapes(ep) -> None:
    """aten.view -> aten.reshape, before run_decompositions.

    Export records a `.contiguous()` that was a no-op for the strides seen while tracing as nothing;
    decomposing an op (scaled_dot_product_attention's math decomposition) can then produce a
    differently strided tensor, and a later `view` of it fails ("Cannot view a tensor with shape
    [2, 16, 32] and strides (32, 64, 1)": GPT-2's Conv1D views the attention output). Relax tensors
    have no strides, so view and reshape mean the same here; reshape decomposes to a view or a
    copy as the strides require."""
    changed = False
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        ep.graph_module.recompile()


@torch.library.custom_op("pockengine::stop_gradient", mutates_args=())
def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """The value of x, through which no gradient flows (imported as relax.grad.no_grad)."""
    return x.clone()


@stop_gradient.register_fake
def _stop_gradient_shape(x):
    return torch.empty_like(x)


def _stop_gradients(ep) -> None:
    """`x.detach()` and the results of a `torch.no_grad()` block -> pockengine::stop_gradient, before
    run_decompositions: decomposing turns detach into `aten.alias` and inlines the no_grad block,
    after which nothing would tell the backward to stop there (the layers before a detach would
    train, unlike in PyTorch)."""
    graph, changed = ep.graph, False
    grad_disabled = torch.ops.higher_order.wrap_with_set_grad_enabled
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.detach.default:
            node.target = torch.ops.pockengine.stop_gradient.default
            changed = True
        elif node.target is grad_disabled and node.args[0] is False:
            for result in list(node.users):  # getitem(block, i): each value the block returns
                if not isinstance(result.meta.get("val"), torch.Tensor):
                    continue
                with graph.inserting_after(result):
                    stopped = graph.call_function(torch.ops.pockengine.stop_gradient.default, (result,))
                stopped.meta = dict(result.meta)
                result.replace_all_uses_with(stopped, delete_user_cb=lambda user, stopped=stopped: user is not stopped)
                changed = True
    if changed:
        ep.graph_module.recompile()


def _user_outputs(ep) -> list:
    """The values (fake tensors, or None) of the exported program's user outputs."""
    outputs = [s for s in ep.graph_signature.output_specs
               if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    by_name = {n.name: n for n in out_node.args[0] if isinstance(n, torch.fx.Node)}
    return [by_name[s.arg.name].meta.get("val") if s.arg.name in by_name else None for s in outputs]


def _check_single_output(ep) -> None:
    values = _user_outputs(ep)
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        raise FrontendError(f"the model's output (after output=) must be one tensor, it is {len(values)} value(s); "
                            "pass output=lambda out: out.logits (or the tensor you want) to pick one")


def _check_loss_is_scalar(ep) -> None:
    values = _user_outputs(ep)
    if len(values) != 1:
        raise LossError(f"the loss must return one tensor, it returned {len(values)} values")
    val = values[0]
    if val is None or tuple(val.shape) != ():
        shape = None if val is None else tuple(val.shape)
        raise LossError(
            f"the loss returned a tensor of shape {shape}, not a scalar: reduce it (e.g. .mean()) "
            "or use reduction='mean'/'sum'"
        )
    if not val.dtype.is_floating_point:
        raise LossError(f"the loss returned dtype {val.dtype}; a training loss must be floating point")


def _torch_name(target: str) -> str:
    return target[len("model."):] if target.startswith("model.") else target


def node_origin(node) -> Origin:
    """Where a torch fx node came from: its aten op, module path and user source line."""
    module = ""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, mtype = list(stack.values())[-1]
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        path = _torch_name(path.replace("._modules['", ".").replace("']", ""))
        if path and path != "model":
            module = f"{path} ({str(getattr(mtype, '__name__', mtype)).split('.')[-1]})"
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    user = [(f, ln) for f, ln in frames if f"{os.sep}torch{os.sep}" not in f and "pockengine" not in f]
    location = f"{os.path.basename(user[-1][0])}:{user[-1][1]}" if user else ""
    return Origin(str(node.target), module, location)


class _Importer:
    """One import of one ExportedProgram."""

    def __init__(self, ep, seed: int = 0, has_target: bool = True):
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        self.ep = ep
        self.seed = seed
        self.has_target = has_target  # the last input is the loss's target (a training import)
        self.imp = ExportedProgramImporter()
        self.imp.update_convert_map(CONVERTERS)

    def run(self) -> ImportedModel:
        ep, imp = self.ep, self.imp
        self._check_supported()
        # The generator's state, parameters of forward_loss after the buffers when the model samples.
        random_vars = []
        if any(_samples_randomly(n) for n in ep.graph.nodes if n.op == "call_function"):
            random_vars = [relax.Var(name.replace(".", "_"), relax.TensorType((), "int64"))
                           for name in (RNG_SEED, RNG_STEP)]
            imp.random_source = RandomSource(*random_vars)
        kinds = torch.export.graph_signature.InputKind
        state, user_vars, _ = imp.create_input_vars(ep)  # name -> relax.Var, in input-spec order
        named_buffers = dict(ep.named_buffers())
        inputs, params, buffers, constants, non_persistent = [], [], [], {}, set()
        initial = {}
        param_vars, buffer_vars = [], []
        aliases, first_of = {}, {}  # tied parameters: {alias name: name}, {storage key: (name, var)}
        for spec in ep.graph_signature.input_specs:
            var = user_vars[spec.arg.name] if spec.arg.name in user_vars else state[spec.arg.name]
            tspec = TensorSpec(_torch_name(spec.target or spec.arg.name), _shape(var), _dtype(var))
            if spec.kind == kinds.USER_INPUT:
                inputs.append(tspec)
            elif spec.kind == kinds.PARAMETER:
                # torch.export lifts a tied weight (an LM head sharing the embedding) once per name. It
                # is one tensor: one parameter, whose gradient sums both uses; the other name is an alias.
                key = _storage_key(ep.state_dict[spec.target])
                if key in first_of:
                    aliases[tspec.name], state[spec.arg.name] = first_of[key]
                    continue
                first_of[key] = (tspec.name, var)
                params.append(tspec)
                param_vars.append(var)
                initial[tspec.name] = ep.state_dict[spec.target].detach().cpu().numpy().copy()
            elif spec.kind == kinds.BUFFER:
                buffers.append(tspec)
                buffer_vars.append(var)
                initial[tspec.name] = named_buffers[spec.target].detach().cpu().numpy().copy()
                if not spec.persistent:
                    non_persistent.add(tspec.name)
            else:  # lifted tensor constants are folded into the graph
                constants[spec.arg.name] = ep.constants[spec.target]
        n_inputs = len(inputs)
        model_inputs, targets = (inputs[:-1], inputs[-1:]) if self.has_target else (inputs, [])
        inputs = ([TensorSpec(f"input{i}" if len(model_inputs) > 1 else "x", s.shape, s.dtype)
                   for i, s in enumerate(model_inputs)]
                  + [TensorSpec("target", s.shape, s.dtype) for s in targets])
        user_var_list = list(user_vars.values())

        bb = imp.block_builder = _InputDtypeBlockBuilder()
        all_vars = {**user_vars, **state}
        with bb.function(FUNC_NAME, params=user_var_list + param_vars + buffer_vars + random_vars
                         + [all_vars[n] for n in constants],
                         attrs={"num_input": n_inputs}):
            with bb.dataflow():
                outs = imp._translate_fx_graph(ep.graph_module, list(ep.graph.nodes), all_vars, set(CONVERTERS))
                loss, mutated, mutated_values = None, [], []
                out_kinds = torch.export.graph_signature.OutputKind
                for spec, value in zip(ep.graph_signature.output_specs, outs):
                    if spec.kind == out_kinds.BUFFER_MUTATION:
                        mutated.append(_torch_name(spec.target))
                        mutated_values.append(value)
                    elif spec.kind in (out_kinds.USER_OUTPUT, out_kinds.LOSS_OUTPUT):
                        loss = value
                    else:
                        raise UnsupportedOpError(
                            f"the exported model has a {spec.kind.name} output ({spec.target}); "
                            "in-place mutation of model inputs is not supported: return new tensors instead"
                        )
                # Gradient's target_index needs the tuple itself as the function result, not a var.
                ret = relax.Tuple([bb.emit_output(v) for v in [loss] + mutated_values])
            bb.emit_func_output(ret)
        mod = bb.get()
        if random_vars:
            initial[RNG_SEED] = np.array(self.seed, "int64")
        if constants:
            mod = relax.transform.BindParams(FUNC_NAME, {k: imp._convert_pytorch_tensor_to_tvm(v)
                                                         for k, v in constants.items()})(mod)
        return ImportedModel(
            mod=mod, inputs=inputs, params=params, buffers=buffers, mutated_buffers=mutated,
            initial=initial, origin=self._origins(mod), non_persistent=non_persistent, source="torch",
            aliases=aliases, random_sites=imp.random_source.sites if random_vars else 0,
        )

    def _check_supported(self) -> None:
        missing, random = {}, {}
        for node in self.ep.graph.nodes:
            if node.op != "call_function":
                continue
            name = node.target.__name__
            _check_operand_dtypes(node)
            if name not in self.imp.convert_map:
                missing.setdefault(str(node.target), str(node_origin(node)))
            elif name in _UNCONVERTED_RANDOM_OPS:
                random.setdefault(str(node_origin(node)), None)
        if missing:
            lines = "\n".join(f"  {where}" for where in missing.values())
            raise UnsupportedOpError(
                f"TVM's importer has no conversion for {len(missing)} operator(s) of this model:\n{lines}\n"
                "Fix: replace these operations in the model (or file an issue naming them)."
            )
        if random:
            lines = "\n".join(f"  {where}" for where in random)
            raise UnsupportedOpError(
                f"the model samples random numbers in training in a way the compiled step cannot ({len(random)} "
                f"place(s)):\n{lines}\n"
                "The step draws uniforms (rand, bernoulli, dropout) from its own generator; TVM's importer would "
                "fix these other samples at compile time, silently. Fix: sample with torch.rand / bernoulli / "
                "dropout instead, or put the modules named above in eval mode (module.eval())."
            )

    def _origins(self, mod) -> dict:
        """Name of each forward_loss binding -> Origin of the torch node that produced it.

        The importer records only each node's final var; the helper bindings it emitted before that
        var (a node can lower to several Relax ops) belong to the same node. Names, not Var objects,
        are the keys: they survive the passes that rebuild the function.
        """
        node_of = {}
        for node, value in self.imp.env.items():
            if getattr(node, "op", None) != "call_function":
                continue
            for var in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(var, relax.Var):
                    node_of.setdefault(var, node)
        origin, pending = {}, []
        for binding in bindings_of(mod[FUNC_NAME]):
            pending.append(binding.var.name)
            node = node_of.get(binding.var)
            if node is not None:
                where = node_origin(node)
                for name in pending:
                    origin[name] = where
                pending = []
        return origin


class _InputDtypeBlockBuilder(relax.BlockBuilder):
    """TVM's importer hard-codes out_dtype="float32" on matmul/linear/conv calls, which breaks float64
    models (float32 products meet float64 biases). For a float64 operand we restore out_dtype to the
    operand's dtype at emission, before the mismatch can reach any later op."""

    def emit(self, expr, name_hint=""):
        return super().emit(_keep_input_dtype(expr), name_hint)


def _keep_input_dtype(expr):
    attrs = getattr(expr, "attrs", None)
    if not isinstance(expr, relax.Call) or attrs is None or not expr.args:
        return expr
    info = type(attrs).__tvm_ffi_type_info__
    names = [f.name for f in info.fields]
    if "out_dtype" not in names or str(attrs.out_dtype) != "float32":
        return expr
    arg_ty = getattr(expr.args[0], "ty", None)
    if not isinstance(arg_ty, relax.TensorType) or str(arg_ty.dtype) != "float64":
        return expr
    fields = {n: getattr(attrs, n) for n in names}
    fields["out_dtype"] = "float64"
    return relax.Call(expr.op, expr.args, tvm.ir.make_node(info.type_key, **fields))


# Ops that sample random numbers and have no conversion to the step's generator (see _RANDOM_CONVERTERS).
_UNCONVERTED_RANDOM_OPS = {"randn.default", "randn_like.default", "normal.Tensor_float", "normal.float_Tensor",
                           "normal.Tensor_Tensor", "normal.default", "uniform.default", "randint.default",
                           "randint.low", "randint_like.default", "randperm.default", "multinomial.default",
                           "exponential.default", "geometric.default", "log_normal.default", "cauchy.default",
                           "poisson.default", "bernoulli.Tensor", "bernoulli.float"}


def _samples_randomly(node) -> bool:
    """Whether a node draws from the step's generator: dropout only in training mode with p > 0."""
    name = node.target.__name__
    if name == "native_dropout.default":
        _, p, train = _dropout_args(node)
        return train and p > 0
    return name in _RANDOM_CONVERTERS


def _storage_key(tensor) -> tuple:
    """Tensors with the same key are the same values: same memory, same view of it."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def _shape(var) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in var.ty.shape)
    except TypeError as e:
        raise FrontendError(f"input {var.name} has a symbolic shape; PockEngine compiles static shapes only") from e


def _dtype(var) -> str:
    return str(var.ty.dtype)


# ------------------------------------------------------------------ BatchNorm as arithmetic


def _batch_norm(importer, x, weight, bias, eps, running=None, momentum=None):
    """Normalise with batch statistics (training) or running statistics (eval), as PyTorch does.

    Returns (out, mean, rstd, new_running_mean, new_running_var); the last two are None when
    `running` is None or when the running stats are used for normalisation.
    """
    bb = importer.block_builder
    ndim = len(x.ty.shape)
    channels = int(x.ty.shape[1])
    dtype = _dtype(x)
    axes = [0] + list(range(2, ndim))
    bshape = [1, channels] + [1] * (ndim - 2)
    c = lambda v: relax.const(v, dtype)
    if momentum is None and running is not None:  # eval mode: running stats normalise, nothing updates
        mean = bb.emit(relax.op.reshape(running[0], bshape))
        rstd = bb.emit(relax.op.rsqrt(relax.op.add(relax.op.reshape(running[1], bshape), c(eps))))
        centred = bb.emit(relax.op.subtract(x, mean))
        new_mean = new_var = None
    else:
        mean = bb.emit(relax.op.mean(x, axes, keepdims=True))
        centred = bb.emit(relax.op.subtract(x, mean))
        var = bb.emit(relax.op.mean(relax.op.multiply(centred, centred), axes, keepdims=True))
        rstd = bb.emit(relax.op.rsqrt(relax.op.add(var, c(eps))))
        new_mean = new_var = None
        if running is not None:
            n = int(np.prod([int(x.ty.shape[a]) for a in axes]))
            flat_mean = relax.op.reshape(mean, [channels])
            unbiased = relax.op.multiply(relax.op.reshape(var, [channels]), c(n / max(n - 1, 1)))
            new_mean = bb.emit(relax.op.add(relax.op.multiply(c(momentum), flat_mean),
                                            relax.op.multiply(c(1 - momentum), running[0])))
            new_var = bb.emit(relax.op.add(relax.op.multiply(c(momentum), unbiased),
                                           relax.op.multiply(c(1 - momentum), running[1])))
    out = bb.emit(_channel_affine(relax.op.multiply(centred, rstd), weight, bias, bshape))
    return out, mean, rstd, new_mean, new_var


def _channel_affine(normalised, weight, bias, bshape):
    """normalised * weight + bias, each per channel (reshaped to `bshape`); None skips it."""
    out = normalised
    if weight is not None:
        out = relax.op.multiply(out, relax.op.reshape(weight, bshape))
    if bias is not None:
        out = relax.op.add(out, relax.op.reshape(bias, bshape))
    return out


def _arg(importer, node, i):
    a = node.args[i] if len(node.args) > i else None
    return importer.env[a] if isinstance(a, torch.fx.Node) else a


def _bn_functional(node, importer):
    # _native_batch_norm_legit_functional(input, weight, bias, running_mean, running_var, training, momentum, eps)
    x, w, b, rm, rv = (_arg(importer, node, i) for i in range(5))
    training, momentum, eps = node.args[5], node.args[6], node.args[7]
    out, mean, rstd, new_mean, new_var = _batch_norm(importer, x, w, b, eps, (rm, rv), momentum if training else None)
    return (out, mean, rstd, new_mean if training else rm, new_var if training else rv)


def _bn_no_training(node, importer):
    # _native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)
    x, w, b, rm, rv = (_arg(importer, node, i) for i in range(5))
    out, mean, rstd, _, _ = _batch_norm(importer, x, w, b, node.args[6], (rm, rv), None)
    return (out, mean, rstd)


def _bn_no_stats(node, importer):
    # _native_batch_norm_legit.no_stats(input, weight, bias, training, momentum, eps)
    x, w, b = (_arg(importer, node, i) for i in range(3))
    out, mean, rstd, _, _ = _batch_norm(importer, x, w, b, node.args[5])
    return (out, mean, rstd)


def _group_norm_functional(node, importer):
    """native_group_norm(input, weight, bias, N, C, HxW, group, eps) -> (out, mean, rstd), as arithmetic
    (each group's mean and biased variance over its channels and positions, then the per-channel affine):
    TVM's converter emits relax.nn.group_norm, which has no gradient rule (wav2vec2's feature encoder)."""
    bb = importer.block_builder
    x, w, b = (_arg(importer, node, i) for i in range(3))
    groups, eps = node.args[6], node.args[7]
    shape = [int(d) for d in x.ty.shape]
    n, channels = shape[0], shape[1]
    dtype = _dtype(x)
    grouped = bb.emit(relax.op.reshape(x, [n, groups, -1]))
    mean = bb.emit(relax.op.mean(grouped, [2], keepdims=True))
    centred = bb.emit(relax.op.subtract(grouped, mean))
    var = bb.emit(relax.op.mean(relax.op.multiply(centred, centred), [2], keepdims=True))
    rstd = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(eps, dtype))))
    bshape = [1, channels] + [1] * (len(shape) - 2)
    out = bb.emit(_channel_affine(relax.op.reshape(relax.op.multiply(centred, rstd), shape), w, b, bshape))
    return (out, bb.emit(relax.op.reshape(mean, [n, groups])), bb.emit(relax.op.reshape(rstd, [n, groups])))


def _convolution(node, importer):
    """A 1-D convolution as a 2-D one over (N, C, 1, L): relax.nn.conv1d has no gradient rule, conv2d
    has (Whisper's and wav2vec2's Conv1d front ends). Other convolutions go to TVM's converter."""
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, w, b = (_arg(importer, node, i) for i in range(3))
    stride, padding, dilation, transposed, _, groups = node.args[3:9]
    if len(x.ty.shape) != 3 or transposed:
        return importer._convolution(node)
    bb = importer.block_builder
    y = bb.emit(relax.op.nn.conv2d(relax.op.expand_dims(x, 2), relax.op.expand_dims(w, 2), strides=(1, stride[0]),
                                   padding=(0, padding[0], 0, padding[0]), dilation=(1, dilation[0]), groups=groups,
                                   out_dtype=_dtype(x)))
    y = relax.op.squeeze(y, [2])
    if b is not None:
        y = relax.op.add(y, relax.op.reshape(b, (1, -1, 1)))
    return bb.emit(y)


def _grid_sampler_2d(node, importer):
    """grid_sampler_2d(input, grid, interpolation_mode, padding_mode, align_corners) (F.grid_sample).
    TVM's converter hands PyTorch's grid ([N, H_out, W_out, 2], x then y) to relax.image.grid_sample,
    which takes [N, 2, H_out, W_out]: its output had the wrong shape. The modes map one to one."""
    x, grid = _arg(importer, node, 0), _arg(importer, node, 1)
    interpolation, padding, align_corners = node.args[2:5]
    bb = importer.block_builder
    return bb.emit(relax.op.image.grid_sample(
        x, bb.emit(relax.op.permute_dims(grid, [0, 3, 1, 2])), method=("bilinear", "nearest", "bicubic")[interpolation],
        layout="NCHW", padding_mode=("zeros", "border", "reflection")[padding], align_corners=bool(align_corners)))


# ------------------------------------------------------------------ PyTorch semantics TVM's importer lacks


def _cat(node, importer):
    """torch.cat skips 1-D empty tensors whatever the other inputs' rank (a legacy rule PyTorch keeps):
    transformers' KV cache starts as such a tensor and is concatenated with each layer's keys and
    values. TVM's concat would refuse the mix of ranks. An input with no entries along the axis is
    dropped too: kept, its zero-extent kernel breaks the CPU schedule (`Divide by zero` fusing loops)."""
    tensors = [importer.env[t] for t in node.args[0]]
    axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

    def empty(t):  # nothing to contribute: PyTorch's legacy 1-D (0,) or 0 entries along the axis (Phi-3's
        shape = t.ty.shape  # `q[..., rotary_dim:]` pass-through when the whole head is rotated)
        return (len(shape) == 1 and int(shape[0]) == 0) or (len(shape) == len(tensors[0].ty.shape) and
                                                            int(shape[axis % len(shape)]) == 0)

    kept = [t for t in tensors if not empty(t)] or tensors[:1]
    return importer.block_builder.emit(kept[0] if len(kept) == 1 else relax.op.concat(kept, axis=axis))


def _cumsum(node, importer):
    """torch.cumsum of a bool or integer tensor is int64 (transformers' `(position_diff != 1).cumsum(-1)`
    with use_cache=False); TVM's importer kept bool, whose add LLVM codegen refused."""
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dtype = node.kwargs.get("dtype")
    dtype = importer._convert_data_type(str(dtype), importer.env) if dtype is not None else None
    if dtype is None and not _dtype(x).startswith(("float", "bfloat")):
        dtype = "int64"
    return importer.block_builder.emit(relax.op.cumsum(x, dim, dtype))


def _embedding(node, importer):
    """embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False).

    PyTorch never sends gradient to the `padding_idx` row (RoBERTa, BART, DistilBERT set it): the
    looked-up rows at padding positions are the same values behind `no_grad`, so the gradient of
    this lookup stops there (a tied LM head still trains that row through its own use)."""
    weight, indices = importer.env[node.args[0]], importer.env[node.args[1]]
    padding_idx = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
    if (node.args[3] if len(node.args) > 3 else node.kwargs.get("scale_grad_by_freq", False)):
        raise UnsupportedOpError(f"nn.Embedding(scale_grad_by_freq=True) at {node_origin(node)} is not supported: "
                                 "its gradient depends on the batch's token counts. Fix: construct the "
                                 "embedding with scale_grad_by_freq=False.")
    bb = importer.block_builder
    looked_up = importer._embedding_impl(indices, weight)
    if padding_idx is None or padding_idx < 0:
        return looked_up
    is_padding = bb.emit(relax.op.expand_dims(relax.op.equal(indices, relax.const(padding_idx, _dtype(indices))), -1))
    return bb.emit(relax.op.where(is_padding, relax.op.grad.no_grad(looked_up), looked_up))


# ------------------------------------------------------------------ random numbers (frontend/philox.py)


def _dropout_args(node) -> tuple:
    """native_dropout(input, p, train) -> (input node, p, train); train may be None (= training)."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return node.args[0], float(p), train is None or bool(train)


def _uniform_like(node, importer, shape, dtype):
    """Uniforms of the step's generator (one new random site) for `node`, in float32/float64."""
    if dtype not in ("float32", "float64"):
        raise UnsupportedOpError(f"{node_origin(node)} samples random {dtype} numbers; the compiled step draws "
                                 "float32 or float64 only. Fix: run this part of the model in float32.")
    return importer.random_source.uniform(importer.block_builder, shape, dtype)


def _meta_shape_dtype(node) -> tuple:
    val = node.meta["val"]
    return [int(d) for d in val.shape], str(val.dtype).replace("torch.", "")


def _native_dropout(node, importer):
    """native_dropout(input, p, train) -> (output, mask). In training with p > 0 an element is kept
    when its uniform is >= p (probability 1 - p) and scaled by 1 / (1 - p), as PyTorch does; the
    scaled mask is one tensor, so the backward multiplies by it too (the multiply rule) and the mask
    itself, computed from integer state only, is data. Otherwise the identity."""
    x = importer.env[node.args[0]]
    _, p, train = _dropout_args(node)
    bb = importer.block_builder
    if not (train and p > 0):
        return x, bb.emit(relax.op.ones(x.ty.shape, "bool"))
    dtype = _dtype(x)
    keep = bb.emit(relax.op.greater_equal(_uniform_like(node, importer, x.ty.shape, dtype), relax.const(p, dtype)))
    scale = relax.const(0.0 if p >= 1 else 1.0 / (1.0 - p), dtype)
    mask = bb.emit(relax.op.multiply(relax.op.astype(keep, dtype), scale))
    return bb.emit(relax.op.multiply(x, mask)), keep


def _bernoulli_p(node, importer):
    """bernoulli.p(input, p): 1 with probability p, shaped and typed like input (stochastic depth's
    `x.new_empty((B, 1, 1, 1)).bernoulli_(keep_prob)`); input's values are not read."""
    shape, dtype = _meta_shape_dtype(node)
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    uniform = _uniform_like(node, importer, shape, dtype)
    return importer.block_builder.emit(relax.op.astype(relax.op.less(uniform, relax.const(float(p), dtype)), dtype))


def _bernoulli_tensor(node, importer):
    """bernoulli(probabilities): 1 where the uniform is below each element's probability."""
    shape, dtype = _meta_shape_dtype(node)
    probabilities = importer.env[node.args[0]]
    uniform = _uniform_like(node, importer, shape, dtype)
    return importer.block_builder.emit(relax.op.astype(relax.op.less(uniform, probabilities), dtype))


def _rand(node, importer):
    """rand(size) / rand_like(input): uniforms in [0, 1) (timm's drop_path, torch.bernoulli(tensor)
    decomposed); shape and dtype as torch.export recorded them."""
    shape, dtype = _meta_shape_dtype(node)
    return _uniform_like(node, importer, shape, dtype)


def _clamp(node, importer):
    """clamp(x, min, max) of an integer tensor with a bound left out (PyTorch's decomposition of
    F.interpolate clamps its indices so): TVM's converter puts +-inf there, which an integer cannot
    hold ("Cannot convert infinity to BigInt"). Float tensors take TVM's converter."""
    x = importer.env[node.args[0]]
    dtype = _dtype(x)
    if not dtype.startswith(("int", "uint")):
        return importer._clamp(node)
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    for bound, op in ((low, relax.op.maximum), (high, relax.op.minimum)):
        if bound is not None:
            x = importer.block_builder.emit(op(x, relax.const(int(bound), dtype)))
    return x


def _antialiased_bilinear(node, importer):
    """F.interpolate(mode="bilinear", antialias=True): TVM's importer drops the antialiasing (a
    different result when downsampling) and PyTorch has no decomposition of it to import instead."""
    raise UnsupportedOpError(f"F.interpolate(mode='bilinear', antialias=True) at {node_origin(node)} is not "
                             "supported: its antialiasing filter has no Relax form. Fix: antialias=False (the "
                             "same result when upsampling), or downsample with F.avg_pool2d / F.adaptive_avg_pool2d.")


_RANDOM_CONVERTERS = {
    "bernoulli.p": _bernoulli_p,
    "bernoulli.default": _bernoulli_tensor,
    "rand.default": _rand,
    "rand_like.default": _rand,
}


def _stop_gradient(node, importer):
    return importer.block_builder.emit(relax.op.grad.no_grad(importer.env[node.args[0]]))


def _quantize(node, importer):
    x = importer.env[node.args[0]]
    inv_scale = relax.const(float(node.args[1]), _dtype(x))
    config = quantized_ops.config_constant(node.args[2])
    return importer.block_builder.emit(quantized_ops.quantize(x, inv_scale, config))


def _quantized_conv2d(node, importer):
    x, weight, bias, multiplier, shift = (importer.env[a] for a in node.args[:5])
    return importer.block_builder.emit(quantized_ops.quantized_conv2d(
        x, weight, bias, multiplier, shift, quantized_ops.config_constant(node.args[5])))


def _quantized_add(node, importer):
    x1, x2 = importer.env[node.args[0]], importer.env[node.args[1]]
    return importer.block_builder.emit(quantized_ops.quantized_add(x1, x2, quantized_ops.config_constant(node.args[2])))


def _quantized_mean(node, importer):
    return importer.block_builder.emit(quantized_ops.quantized_mean(importer.env[node.args[0]]))


def _w4_matmul(node, importer):
    x, packed, scales, zeros = (importer.env[a] for a in node.args[:4])
    return importer.block_builder.emit(w4_ops.w4_matmul(x, packed, scales, zeros, int(node.args[4])))


def _w4_embedding(node, importer):
    ids, packed, scales, zeros = (importer.env[a] for a in node.args[:4])
    return importer.block_builder.emit(w4_ops.w4_take(ids, packed, scales, zeros, int(node.args[4]), int(node.args[5])))


def _w8_converter(make):
    def convert(node, importer):
        return importer.block_builder.emit(make(*(importer.env[a] for a in node.args[:3])))
    return convert


_QUANTIZED_CONVERTERS = {  # pockengine/quantize.py's, awq.py's and smoothquant.py's operators
    "w4_matmul.default": _w4_matmul,
    "w4_embedding.default": _w4_embedding,
    "w8a8_matmul.default": _w8_converter(w8_ops.w8a8_matmul),
    "w8_matmul.default": _w8_converter(w8_ops.w8_matmul),
    "quantize.default": _quantize,
    "quantized_conv2d.default": _quantized_conv2d,
    "quantized_add.default": _quantized_add,
    "quantized_mean.default": _quantized_mean,
}


CONVERTERS = {
    "stop_gradient.default": _stop_gradient,
    **_QUANTIZED_CONVERTERS,
    "native_dropout.default": _native_dropout,
    **_RANDOM_CONVERTERS,
    "_native_batch_norm_legit_functional.default": _bn_functional,
    "_native_batch_norm_legit_no_training.default": _bn_no_training,
    "_native_batch_norm_legit.no_stats": _bn_no_stats,
    "convolution.default": _convolution,
    "grid_sampler_2d.default": _grid_sampler_2d,
    "native_group_norm.default": _group_norm_functional,
    "cat.default": _cat,
    "cumsum.default": _cumsum,
    "clamp.default": _clamp,
    "_upsample_bilinear2d_aa.default": _antialiased_bilinear,
    "embedding.default": _embedding,
}
