"""pack_frozen_weights: frozen weights that only multiply forward are held as the panels their
matmuls read; the step trains exactly as before and the state reads back in the model's layout."""

import copy
import os

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn
from tvm import te

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff, train_torch
from pockengine.autodiff.step import Panels
from pockengine.passes.inline_elementwise import _allocations, inline_elementwise
from pockengine.passes.pack_frozen_weights import _matmul_panels
from pockengine.passes.schedule_cpu import column_panel_width, schedule_cpu
from pockengine.passes.transposed_matmuls import _matmul_nt

CORES = 2


def scheduled(x_shape, weight_shape, lanes, registers, width=None):
    """x @ W^T as schedule_cpu schedules it: W[N, K] as stored, or as panels of `width`."""
    x = te.placeholder(x_shape, "float32", "x")
    if width is None:
        weight = te.placeholder(weight_shape, "float32", "w")
        out = _matmul_nt(x, weight)
    else:
        weight = te.placeholder((weight_shape[0] // width, weight_shape[1], width), "float32", "w")
        out = _matmul_panels(x, weight, width)
    mod = tvm.IRModule({"main": te.create_prim_func([x, weight, out])})
    return schedule_cpu(lanes, CORES, registers)(inline_elementwise(lanes, registers)(mod))["main"]


def unrolled_extents(func) -> list:
    extents = []
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, lambda loop: extents.append(int(loop.extent))
                                        if loop.kind == tvm.tirx.ForKind.UNROLLED else None))
    return sorted(extents)


# x's shape, W's [N, K], vector lanes, vector registers: AVX2 (8, 16), AVX-512 (16, 32), NEON (4, 32)
MATMULS = [
    ((128, 896), (4864, 896), 8, 16),       # Qwen2-0.5B's MLP, a sequence of 128: 4 x 2 tiles
    ((256, 576), (1536, 576), 8, 16),       # SmolLM-135M's: 4 x 3 tiles, panels 24 wide
    ((2, 32, 128), (64, 128), 8, 16),       # a batch of 2 sequences
    ((128, 896), (4864, 896), 16, 32),      # AVX-512: 8 x 2
    ((64, 96), (48, 96), 4, 32),            # NEON
    ((8, 64), (64, 64), 8, 16),             # 8 rows: 2 row tiles, read in place (no panels)
    ((64, 64), (20, 64), 8, 16),            # 20 columns: no whole vectors, no tiles
]


@pytest.mark.parametrize("x_shape, weight_shape, lanes, registers", MATMULS)
def test_the_panel_width_is_the_schedules_and_prepared_panels_are_read_in_place(x_shape, weight_shape, lanes,
                                                                                  registers):
    """column_panel_width predicts the panels schedule_cpu copies W into (none where it reads W in
    place); a kernel given panels of that width copies nothing, keeps the same register tiles and
    computes the same products."""
    rows, batch = x_shape[-2], int(np.prod(x_shape[:-2]))
    width = column_panel_width(rows, weight_shape[0], weight_shape[1], batch, lanes, CORES, registers)
    unpacked = scheduled(x_shape, weight_shape, lanes, registers)
    copies = [tuple(int(d) for d in buf.shape) for buf in _allocations(unpacked.body)]
    if width is None:
        assert copies == [], "the schedule packs W although no width was predicted"
        return
    assert copies == [(weight_shape[0] // width, weight_shape[1], width)]
    packed = scheduled(x_shape, weight_shape, lanes, registers, width)
    assert _allocations(packed.body) == []
    assert unrolled_extents(packed) == unrolled_extents(unpacked), "not the same register tile"
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype("float32")
    w = rng.standard_normal(weight_shape).astype("float32")
    results = []
    for func, weight in ((unpacked, w), (packed, Panels(width).pack(w))):
        lib = tvm.compile(func.with_attr("global_symbol", "main"), target=tvm.target.Target(FAST_HOST))
        out = tvm.runtime.tensor(np.zeros(x_shape[:-1] + (weight_shape[0],), "float32"))
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(weight), out)
        results.append(out.numpy())
    np.testing.assert_array_equal(results[1], results[0])  # the same sums in the same order
    np.testing.assert_allclose(results[1], x.astype("float64") @ w.T.astype("float64"), rtol=1e-4, atol=1e-3)


def test_panels_round_trip():
    w = np.arange(48 * 5, dtype="float32").reshape(48, 5)
    panels = Panels(16).pack(w)
    assert panels.shape == (3, 5, 16) and panels.flags.c_contiguous
    assert panels[1, 2, 3] == w[16 + 3, 2]
    np.testing.assert_array_equal(Panels(16).unpack(panels), w)
    assert Panels(16).model_shape(panels.shape) == w.shape


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10)).to(dtype)


def batches(dtype=torch.float64, steps=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 48, generator=g, dtype=dtype), torch.randint(0, 10, (32,), generator=g))
            for _ in range(steps)]


# Which weights a scheme leaves frozen and forward-only: with the last layer trained, the three
# before it; with the biases trained, only the first (the others' data gradients read them).
SCHEMES = {
    "last layer": ({"6.*": "full"}, {"0.weight", "2.weight", "4.weight"}),
    "biases": ({"*": "bias"}, {"0.weight"}),
    "full": (None, set()),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_forward_only_frozen_weights_are_packed_and_train_like_pytorch(scheme):
    rules, expected = SCHEMES[scheme]
    sparse_update = None if rules is None else pe.SparseUpdate(rules)
    model, data = mlp(), batches()
    job = pe.TrainingJob(copy.deepcopy(model), (data[0][0],), data[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=sparse_update)
    program = pe.compile(job, target="host")
    assert set(program.signature.packed) == expected
    for name, panels in program.signature.packed.items():
        spec = next(s for s in program.signature.state if s.name == name)
        assert spec.shape == (64 // panels.width, dict(model.named_parameters())[name].shape[1], panels.width)
    ours = [program.step(x, y) for x, y in data]
    if sparse_update is not None:
        pe.sparse.apply_to_torch(model, program.plan)
    theirs = train_torch(model, pe.optim.SGD(lr=0.1, momentum=0.9), data)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict(), floor=1e-2)
    assert worst <= 1e-9, f"{where} differs by {worst:.3g}"
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_packed_weights_load_export_and_read_back_in_the_models_layout(tmp_path):
    model, data = mlp(), batches()
    job = pe.TrainingJob(copy.deepcopy(model), (data[0][0],), data[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1), sparse_update=pe.SparseUpdate({"6.*": "full"}))
    program = pe.compile(job, target="host")
    assert "0.weight" in program.signature.packed
    # other weights loaded into the program are packed as they arrive
    torch.manual_seed(5)
    other = mlp()
    program.load_state_dict(other.state_dict())
    for key, value in program.state_dict().items():
        np.testing.assert_array_equal(value, other.state_dict()[key].numpy(), err_msg=key)
    with pytest.raises(pe.errors.StateError, match=r"0.weight has shape \(48, 64\), the program expects \(64, 48\)"):
        program.load_state_dict({"0.weight": np.zeros((48, 64))}, strict=False)
    loss = program.step(*data[0])
    pe.sparse.apply_to_torch(other, program.plan)
    assert loss == pytest.approx(train_torch(other, pe.optim.SGD(lr=0.1), data[:1])[0], rel=1e-12)
    # an artifact keeps the panels (the device reads them as they are) and says so
    path = program.export(str(tmp_path / "mlp"))
    loaded = pe.load(path)
    assert {k: v.width for k, v in loaded.signature.packed.items()} == {k: v.width for k, v in
                                                                          program.signature.packed.items()}
    with np.load(os.path.join(path, "state.npz")) as npz:
        assert npz["0.weight"].ndim == 3
    for key, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value, program.state_dict()[key], err_msg=key)
    assert loaded.step(*data[1]) == pytest.approx(program.step(*data[1]), rel=1e-12)
