"""`ExportedProgram.run_decompositions()`, done once per distinct exported graph in a process.

Decomposing retraces the whole graph with fake tensors and takes 60-70% of an import (1.2-2.3 s for a
small ResNet or MobileNetV2, against 0.4-0.6 s for the export itself). Its result depends on the
graph, its signature and the shapes, dtypes and strides of the values flowing through it, never on
the parameters' values. Compiling one model several times (the same model with another sparse
scheme, optimizer or target, a search over schemes, a test suite) exports the same graph each time,
so the decomposed graph of the first export is kept (the last few, by a fingerprint of everything the
decomposition and the importer read from the exported graph) and reused with the new export's
parameters, buffers and constants.
"""

from __future__ import annotations

import collections
import hashlib
import threading

import torch

KEPT = 8  # distinct graphs remembered; a graph holds no parameters, only fake tensors' metadata

_decomposed: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def _table() -> dict:
    """Core ATen's decompositions, and PyTorch's own for F.interpolate's nearest and bilinear modes:
    TVM's importer maps those to image.resize2d with other arithmetic than PyTorch's (nearest as
    half-pixel rounding, a scale_factor's 1/scale ignored, source coordinates in float32), while
    PyTorch's decomposition is its definition in gathers and multiplies we already differentiate."""
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    return {**torch.export.default_decompositions(), **get_decompositions([
        aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default,
        aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default])}


def decompose(ep):
    """ep.run_decompositions() (core ATen, and PyTorch's decompositions of interpolation: _table),
    from the remembered result when an earlier export in this process had the same graph."""
    key = fingerprint(ep)
    with _lock:  # held while a kept graph is wrapped: ExportedProgram() sets attributes of the graph
        kept = _decomposed.get(key)
        if kept is not None:
            _decomposed.move_to_end(key)
            return kept.with_values_of(ep)
    decomposed = ep.run_decompositions(_table())
    with _lock:
        _decomposed[key] = _Kept(decomposed, ep)
        while len(_decomposed) > KEPT:
            _decomposed.popitem(last=False)
    return decomposed


class _Kept:
    """What run_decompositions produced, without the exported model's values."""

    def __init__(self, decomposed, original):
        self.graph_module = decomposed.graph_module
        self.signature = decomposed.graph_signature
        self.range_constraints = decomposed.range_constraints
        self.module_call_graph = decomposed.module_call_graph
        self.verifiers = decomposed.verifiers
        # Constants the decomposition itself created (a decomposed op's tensor literal) are part of the
        # graph; the export's own constants (non-persistent buffers, tensor attributes) are the model's.
        self.constant_names = list(decomposed.constants)
        self.introduced = {name: value for name, value in decomposed.constants.items()
                           if name not in original.constants}

    def with_values_of(self, ep):
        """The decomposed program over `ep`'s parameters, buffers and constants."""
        constants = {name: ep.constants[name] if name in ep.constants else self.introduced[name]
                     for name in self.constant_names}
        return torch.export.ExportedProgram(
            self.graph_module, self.graph_module.graph, self.signature, ep.state_dict, self.range_constraints,
            self.module_call_graph, ep.example_inputs, constants, verifiers=self.verifiers)


def fingerprint(ep) -> str:
    """A digest of what decomposing and importing `ep` read from it besides values: the code of every
    graph (ops and their literal arguments), the signature (which input is a parameter, a buffer, a
    constant, which output a mutation), each value's shape, dtype, strides and requires_grad, and
    the module path and source line each node came from (the importer's error messages name them)."""
    digest = hashlib.sha256()
    digest.update(str(ep.graph_signature).encode())
    digest.update(str(ep.range_constraints).encode())
    for name, module in ep.graph_module.named_modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        digest.update(f"\0{name}\0{module.code}".encode())
        for node in module.graph.nodes:
            meta = node.meta
            digest.update(f"\0{node.name}|{_value_key(meta.get('val'))}|{meta.get('tensor_meta')}|"
                          f"{meta.get('nn_module_stack')}|{meta.get('stack_trace')}".encode())
    return digest.hexdigest()


def _value_key(value) -> str:
    if isinstance(value, torch.Tensor):
        return (f"T{tuple(value.shape)}{value.dtype}{value.stride()}{value.device.type}"
                f"{int(value.requires_grad)}")
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_value_key(v) for v in value) + ")"
    if value is None or isinstance(value, (bool, int, float, str, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return repr(value)
    return type(value).__name__  # opaque objects (script objects, tokens) are identified by the code
