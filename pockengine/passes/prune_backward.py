"""prune_backward: make the backward compute only what the sparse-update scheme trains.

Frozen parameters need nothing: autodiff differentiates with respect to trained parameters only and
hoists everything that does not depend on them out of the differentiated function. This pass handles
the remaining case, a weight trained on its first k of C channels (MCUNetV3's sub-tensor update):

    y = conv2d(x, W)         ->  y = conv2d(x[:, :k], W[:, :k]) + conv2d(x[:, k:], W[:, k:])
    y = x @ W^T              ->  y = x[..., :k] @ W[:, :k]^T + x[..., k:] @ W[:, k:]^T
    y = depthwise(x, W)      ->  y = concat(depthwise(x[:, :k], W[:k]), depthwise(x[:, k:], W[k:]))
    y = quantized_conv2d(x, W, ...)  ->  y = quantized_conv2d(x, W[:, :k], ..., W[:, k:])   (int8 models)

`W[:, :k]` is bound as `<W>__trained` and differentiated; `W[:, k:]` (`<W>__frozen`) is not. The weight
gradient then reads only the first k channels of the saved input activation and costs k/C of the
full weight gradient's FLOPs; the forward costs the same. autodiff/step.py then makes the two slices
state tensors of their own (SplitWeight): the step never slices, copies or reassembles W.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R

from ..autodiff.step import FROZEN_PART, TRAINED
from ..errors import JobError
from ..frontend import quantized_ops
from ..ir import bindings_of, op_name, step_pass


@step_pass("PruneBackward")
def prune_backward(func_name: str, partial: dict):
    """partial: {parameter Var: (channels, axis)} for weights trained on their first channels."""
    if not partial:
        return None
    return lambda _mod, func: _split_partial_weights(func, partial, func_name)


def _split_partial_weights(func, partial: dict, name: str):
    bb = relax.BlockBuilder()
    bindings = bindings_of(func)
    transposed = {}  # var bound to permute_dims(W) -> W, for linear layers
    with bb.function(name, list(func.params), attrs=dict(func.attrs)):
        with bb.dataflow():
            pieces = {}
            for w, (k, axis) in partial.items():
                total = int(w.ty.shape[axis])
                trained = bb.emit(R.strided_slice(w, [axis], [0], [k]), w.name + TRAINED)
                frozen = bb.emit(R.strided_slice(w, [axis], [k], [total]), w.name + FROZEN_PART)
                pieces[w] = (trained, frozen, k, total)
            for b in bindings:
                value = b.value
                op = op_name(value)
                if op == "relax.permute_dims" and value.args[0] in pieces:
                    transposed[b.var] = value.args[0]
                    continue
                if op == "relax.nn.conv2d" and value.args[1] in pieces:
                    split = _split_conv(bb, value, pieces[value.args[1]], b.var.name)
                    bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(split)))
                    continue
                if op == quantized_ops.CONV2D and value.args[1] in pieces:
                    split = _split_quantized_conv(value, pieces[value.args[1]])
                    bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(split)))
                    continue
                if op == "relax.matmul" and value.args[1] in transposed:
                    w = transposed[value.args[1]]
                    split = _split_matmul(bb, value, pieces[w], b.var.name)
                    bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(split)))
                    continue
                used = [v for v in relax.analysis.free_vars(value) if v in pieces or v in transposed]
                if used:
                    w = used[0] if used[0] in pieces else transposed[used[0]]
                    raise JobError(f"channel-ratio update of {w.name}: it is used by {op or type(value).__name__}, "
                                   "not by a conv2d or linear layer; train it fully or freeze it")
                bb.emit_normalized(b)
            outputs = func.body.body
        bb.emit_func_output(outputs)
    return bb.get()[name]


def _split_conv(bb, call, piece, name):
    trained, frozen, k, total = piece
    x = call.args[0]
    attrs = call.attrs
    groups = int(attrs.groups)
    x_trained = bb.emit(R.strided_slice(x, [1], [0], [k]), name + SPLIT)
    x_frozen = bb.emit(R.strided_slice(x, [1], [k], [total]), name + SPLIT)
    common = dict(strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation, data_layout=attrs.data_layout,
                  kernel_layout=attrs.kernel_layout, out_layout=attrs.out_layout, out_dtype=attrs.out_dtype)
    if groups == 1:
        a = bb.emit(R.nn.conv2d(x_trained, trained, groups=1, **common), name + SPLIT)
        b = bb.emit(R.nn.conv2d(x_frozen, frozen, groups=1, **common), name + SPLIT)
        return R.add(a, b)
    if groups == total:  # depthwise: channel i of the output reads only channel i of the input
        a = bb.emit(R.nn.conv2d(x_trained, trained, groups=k, **common), name + SPLIT)
        b = bb.emit(R.nn.conv2d(x_frozen, frozen, groups=total - k, **common), name + SPLIT)
        return R.concat([a, b], axis=1)
    raise JobError(f"channel-ratio update of a grouped conv (groups={groups}) is not supported; "
                   "train it fully or freeze it")


def _split_quantized_conv(call, piece):
    """An int8 convolution takes the two parts as they are (frontend/quantized_ops.py): its int32
    sum runs over both before the one requantization, so it is not two convolutions added."""
    trained, frozen, k, total = piece
    groups = quantized_ops.conv_attrs(quantized_ops.config_of(call, 5))["groups"]
    if groups not in (1, total):
        raise JobError(f"channel-ratio update of a grouped conv (groups={groups}) is not supported; "
                       "train it fully or freeze it")
    x, _, bias, multiplier, shift, config = call.args
    return quantized_ops.quantized_conv2d(x, trained, bias, multiplier, shift, config, frozen)


def _split_matmul(bb, call, piece, name):
    trained, frozen, k, total = piece
    x = call.args[0]
    last = len(x.ty.shape) - 1
    x_trained = bb.emit(R.strided_slice(x, [last], [0], [k]), name + SPLIT)
    x_frozen = bb.emit(R.strided_slice(x, [last], [k], [total]), name + SPLIT)
    a = bb.emit(R.matmul(x_trained, R.permute_dims(trained, [1, 0]), out_dtype=call.attrs.out_dtype), name + SPLIT)
    b = bb.emit(R.matmul(x_frozen, R.permute_dims(frozen, [1, 0]), out_dtype=call.attrs.out_dtype), name + SPLIT)
    return R.add(a, b)


SPLIT = "__split"  # names the parts of a split op after it, so reports find the layer it came from
