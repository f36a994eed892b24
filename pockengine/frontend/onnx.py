"""ONNX frontend: an ONNX model + a named loss -> Relax `forward_loss`.

TVM's ONNX importer keeps initializers as function inputs (`keep_params_in_input`), so parameters
keep their ONNX initializer names. The loss is appended in Relax (a torch callable cannot be attached
to an ONNX graph). ONNX graphs carry no running-statistic updates: BatchNorm nodes import in inference
form, so a BatchNormalization in training mode is refused; in inference form its running statistics
are buffers. Importer lowerings that cannot be differentiated are named by autodiff.
"""

from __future__ import annotations

import os

from tvm import relax

from ..errors import FrontendError, LossError, UnsupportedOpError
from ..ir import bindings_of, inline_body
from . import FUNC_NAME, ImportedModel, Origin, TensorSpec, to_numpy

LOSSES = ("cross_entropy", "mse")


def import_onnx(model, example_inputs, example_targets, loss) -> ImportedModel:
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    if not isinstance(loss, str) or loss not in LOSSES:
        raise LossError(f"an ONNX model trains with a named loss {LOSSES}, got {loss!r} "
                        "(callable losses need the torch frontend)")
    proto = _load(model, onnx)
    statistics = _batch_norm_statistics(proto)
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    arrays = [to_numpy(x) for x in example_inputs]
    if len(arrays) != len(graph_inputs):
        raise FrontendError(f"the ONNX graph has {len(graph_inputs)} inputs {graph_inputs}, "
                            f"example_inputs has {len(arrays)}")
    try:
        mod = from_onnx(proto, shape_dict={n: a.shape for n, a in zip(graph_inputs, arrays)},
                        dtype_dict={n: str(a.dtype) for n, a in zip(graph_inputs, arrays)},
                        keep_params_in_input=True)
    except Exception as e:
        raise FrontendError(f"TVM's ONNX importer failed: {type(e).__name__}: {str(e)[:1000]}") from e
    main = mod["main"]
    n_in = len(graph_inputs)
    values = [v.numpy() for v in main.attrs["params"]] if "params" in main.attrs else []
    param_vars = list(main.params[n_in:])
    target = to_numpy(example_targets)
    target_var = relax.Var("target", relax.TensorType(target.shape, str(target.dtype)))

    bb = relax.BlockBuilder()
    ordered = [v for v in param_vars if v.name not in statistics] + [v for v in param_vars if v.name in statistics]
    with bb.function(FUNC_NAME, list(main.params[:n_in]) + [target_var] + ordered, attrs={"num_input": n_in + 1}):
        with bb.dataflow():
            output = inline_body(bb, main)
            if isinstance(output, tuple):
                if len(output) != 1:
                    raise FrontendError(f"the ONNX model has {len(output)} outputs; the loss needs exactly one")
                output = output[0]
            value = bb.emit_output(bb.emit(_loss(loss, output, target_var)))
        bb.emit_func_output(relax.Tuple([value]))
    fmod = bb.get()
    names = [v.name for v in param_vars]
    specs = [TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in zip(names, values)]
    params = [s for s in specs if s.name not in statistics]
    buffers = [s for s in specs if s.name in statistics]
    inputs = [TensorSpec(n, a.shape, str(a.dtype)) for n, a in zip(graph_inputs, arrays)]
    inputs.append(TensorSpec("target", target.shape, str(target.dtype)))
    origin = {b.var.name: Origin("onnx node") for b in bindings_of(fmod[FUNC_NAME])}
    return ImportedModel(mod=fmod, inputs=inputs, params=params, buffers=buffers, mutated_buffers=[],
                         initial=dict(zip(names, values)), origin=origin, source="onnx")


def _batch_norm_statistics(proto) -> set:
    """Names of BatchNormalization running statistics (buffers, never trained). A node in training
    mode is an error: TVM's importer normalises with the running statistics, which would silently
    train a different model than the one exported."""
    stats = set()
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        if any(a.name == "training_mode" and a.i for a in node.attribute):
            raise UnsupportedOpError(
                f"ONNX BatchNormalization node {node.name!r} is in training mode; TVM's ONNX importer would "
                "normalise with the running statistics instead of the batch's. Use the torch frontend for "
                "BatchNorm models, or export with training=torch.onnx.TrainingMode.EVAL (statistics frozen)."
            )
        stats.update(node.input[3:5])
    return stats


def _loss(name, output, target):
    if name == "cross_entropy":
        if len(output.ty.shape) != 2:
            raise LossError(f"cross_entropy expects (batch, classes) logits, the model returns shape {output.ty.shape}")
        return relax.op.nn.nll_loss(relax.op.nn.log_softmax(output, axis=1), target, reduction="mean")
    diff = relax.op.subtract(output, target)
    return relax.op.mean(relax.op.multiply(diff, diff))


def _load(model, onnx):
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FrontendError(f"no such ONNX file: {model}")
        try:
            return onnx.load(str(model))
        except Exception as e:
            raise FrontendError(f"cannot read ONNX model {model}: {e}") from e
    return model
