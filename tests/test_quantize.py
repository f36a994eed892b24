"""int8 training graphs (pockengine/quantize.py, frontend/quantized_ops.py, passes/narrow_quantized.py).

The oracle is the fake-quant reference of tests/quantized_reference.py, PyTorch's own operators with
straight-through roundings, run on the same quantized graph: losses equal to 1e-10, trained weights
after three steps within 1e-9 in float64 (scaled by the tensor's magnitude); the int8 kernels
equal an integer reference written in numpy here, element for element."""

import copy

import numpy as np
import pytest
import torch
from quantized_reference import reference_of
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, calibrated, max_scaled_diff
from pockengine import quantize
from pockengine.errors import JobError, StateError
from pockengine.sparse import apply_to_torch

F = nn.functional


# ---------------------------------------------------------------- models


class TinyNet(nn.Module):
    """Every pattern the converter fuses: conv-BN-ReLU6, a stride-2 depthwise conv, a dilated conv, a
    conv without BN with a ReLU, a residual add, global pooling, a dropout and a float classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.dilated = nn.Conv2d(8, 8, 3, 1, 2, dilation=2)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, classes))

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = x + self.pw(x)
        x = self.relu(self.dilated(x))
        return self.head(x.mean([2, 3]))


def quantized(model, shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(shape, generator=g) for _ in range(3)]
    torch.manual_seed(seed)
    return quantize.int8(calibrated(model, batches), batches).to(dtype)


def batches_for(shape, classes, steps=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(steps)]


def train_reference(ref, batches, lr, plan=None):
    if plan is not None:
        apply_to_torch(ref, plan)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=lr)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- tests


def test_converter_fuses_and_folds():
    q = quantized(TinyNet(), (4, 3, 16, 16))
    assert q.quantization_counts == {"convolutions": 4, "additions": 1, "average pools": 1,
                                     "float operations": 2}  # the dropout and the linear layer
    names = set(q.state_dict())
    assert "stem.0.weight" in names and "stem.1.weight" not in names  # BN folded, the conv keeps its name
    for name, module in q.named_modules():
        if isinstance(module, quantize.QuantizedConv2d):
            w = module.weight.detach()
            assert torch.equal(w, w.round()) and w.abs().max() <= 127, name
            assert torch.equal(module.bias.detach(), module.bias.detach().round()), name
    relu6 = q.get_submodule("stem.0")
    assert relu6.config[2] == relu6.zero_y  # ReLU6 fused: nothing below the zero point


def test_quantized_model_approximates_the_float_model():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(3)]
    model = calibrated(TinyNet(), batches)
    q = quantize.int8(model, batches)
    with torch.no_grad():
        ours, theirs = q(batches[0]), model(batches[0])
    assert F.cosine_similarity(ours.flatten(), theirs.flatten(), 0) > 0.99


def test_custom_operators_equal_the_fake_quant_reference():
    """PyTorch running the converted model (pockengine's custom operators, eager) and the reference
    written here: the same integers forward, the same gradients."""
    q = quantized(TinyNet(), (2, 3, 16, 16))
    ref = reference_of(q)
    x, y = batches_for((2, 3, 16, 16), 5)[0]
    F.cross_entropy(q(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for (name, p), r in zip(q.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-12, atol=1e-12, msg=name)


SCHEMES = {
    "full": pe.SparseUpdate.full(),
    "biases": pe.SparseUpdate.bias_only(),
    # sub-tensor updates of a depthwise (1: its first channels) and a 1x1 conv (2: its first input channels)
    "mcunetv3": pe.SparseUpdate.mcunetv3(3, "1-2-3-4", "0.5-0.25-1-1"),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_int8_training_matches_the_fake_quant_reference_in_float64(scheme):
    q = quantized(TinyNet(), (2, 3, 16, 16))
    batches = batches_for((2, 3, 16, 16), 5)
    sparse = SCHEMES[scheme]
    job = pe.TrainingJob(copy.deepcopy(q), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.05), sparse_update=sparse)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    ref = reference_of(q)
    theirs = train_reference(ref, batches, 0.05, program.plan)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), ref.state_dict(), floor=1e-2)
    assert worst < 1e-9, (worst, where)


def test_activations_and_frozen_weights_are_int8():
    """Bias-only: the frozen conv weights are int8 state, the trained biases float; what the backward
    keeps of the activations is 1 byte per element (the clip masks), no float copy of them."""
    q = quantized(TinyNet(), (2, 3, 16, 16), dtype=torch.float32)
    batches = batches_for((2, 3, 16, 16), 5, dtype=torch.float32)
    job = pe.TrainingJob(copy.deepcopy(q), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.05), sparse_update=pe.SparseUpdate.bias_only())
    program = pe.compile(job, target=FAST_HOST)
    dtypes = {s.name: s.dtype for s in program.signature.state}
    for name in ("stem.0.weight", "dw.0.weight", "pw.0.weight", "dilated.weight"):
        assert dtypes[name] == "int8", name
    assert dtypes["stem.0.bias"] == "float32" and dtypes["head.1.weight"] == "float32"
    from pockengine import pipeline
    from pockengine.analysis.memory_plan import saved_activations
    derived = pipeline.derive(job)
    saved = [v for v in saved_activations(derived.step_mod[pipeline.STEP_FUNC]) if len(v.ty.shape) == 4]
    assert saved and all(str(v.ty.dtype) in ("int8", "bool") for v in saved), {v.name: v.ty.dtype for v in saved}

    before = program.state_dict()
    assert before["stem.0.weight"].dtype == np.int8
    program.step(*batches[0])
    after = program.state_dict()
    assert np.array_equal(before["stem.0.weight"], after["stem.0.weight"])
    model = copy.deepcopy(q)
    model.load_state_dict(program.state_dict(as_torch=True))  # torch takes int8 into its float weights
    assert torch.equal(model.get_submodule("stem.0").weight, torch.from_numpy(after["stem.0.weight"]).float())

    broken = dict(after, **{"dw.0.weight": after["dw.0.weight"].astype(np.float32) + 0.5})
    with pytest.raises(StateError, match=r"dw.0.weight is a frozen weight of a quantized model.*integers"):
        program.load_state_dict(broken)
    assert np.array_equal(program.state_dict()["stem.0.bias"], after["stem.0.bias"])  # nothing loaded


def test_converter_errors_are_clear():
    with pytest.raises(JobError, match="at least one calibration batch"):
        quantize.int8(TinyNet(), [])

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(JobError, match="torch.fx cannot trace"):
        quantize.int8(Untraceable(), [torch.randn(1, 3, 8, 8)])
    with pytest.raises(JobError, match="non-finite"):
        quantize.int8(TinyNet(), [torch.full((1, 3, 8, 8), float("nan"))])


CONV_CASES = [  # (in channels, out channels, kernel, stride, padding, dilation, groups, size)
    (3, 8, 3, 2, 1, 1, 1, 15), (8, 8, 3, 1, 1, 1, 8, 8), (8, 8, 5, 2, 2, 1, 8, 9), (16, 24, 1, 1, 0, 1, 1, 6),
    (8, 8, 3, 1, 2, 2, 1, 7), (12, 6, 3, 1, 1, 1, 3, 5), (4, 4, 7, 2, 3, 1, 4, 11),
]
CONV_CASE_IDS = [f"{c[0]}-{c[1]}-k{c[2]}s{c[3]}p{c[4]}d{c[5]}g{c[6]}" for c in CONV_CASES]


def random_convolution(case):
    """x, w, b, m, n and the configuration of a CONV_CASES convolution: random int8 tensors, biases,
    zero points, multipliers and shifts (seeded by the case)."""
    c_in, c_out, k, stride, pad, dil, groups, size = case
    rng = np.random.default_rng(sum(case))
    x = rng.integers(-128, 128, (2, c_in, size, size), dtype=np.int8)
    w = rng.integers(-127, 128, (c_out, c_in // groups, k, k), dtype=np.int8)
    b = rng.integers(-5000, 5000, c_out).astype(np.float32)
    m = rng.integers(1 << 30, 1 << 31, c_out, dtype=np.int64)
    n = rng.integers(36, 44, c_out, dtype=np.int64)
    zero_x, zero_y, qmin, qmax = int(rng.integers(-128, 0)), int(rng.integers(-20, 20)), -100, 120
    config = [zero_x, zero_y, qmin, qmax, stride, stride, pad, pad, pad, pad, dil, dil, groups]
    return x, w, b, m, n, config


def integer_convolution(x, w, b, m, n, config):
    """quantized_conv2d's integer arithmetic in numpy, int64 all the way (square kernels, symmetric
    padding, as CONV_CASES)."""
    zero_x, zero_y, qmin, qmax, stride, _, pad, _, _, _, dil, _, groups = config
    c_out, per_in, k, _ = w.shape
    size = x.shape[2]
    xp = np.pad(x.astype(np.int64) - zero_x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    acc = np.zeros((x.shape[0], c_out, out, out), np.int64)
    per_out = c_out // groups
    for o in range(c_out):
        g = o // per_out
        for ky in range(k):
            for kx in range(k):
                window = xp[:, g * per_in:(g + 1) * per_in, ky * dil:ky * dil + stride * (out - 1) + 1:stride,
                            kx * dil:kx * dil + stride * (out - 1) + 1:stride]
                acc[:, o] += np.einsum("nchw,c->nhw", window, w[o, :, ky, kx].astype(np.int64))
    acc += b.astype(np.int64).reshape(1, -1, 1, 1)
    y = (acc * m.reshape(1, -1, 1, 1) + (1 << (n.reshape(1, -1, 1, 1) - 1))) >> n.reshape(1, -1, 1, 1)
    return np.clip(y + zero_y, qmin, qmax).astype(np.int8)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_CASE_IDS)
def test_int8_convolution_kernel_is_bit_exact(case):
    """The compiled kernel on int8 tensors (as the step runs it after narrow_quantized) against the
    integer arithmetic written in numpy here: random weights, biases, zero points, multipliers and
    shifts, every output element equal."""
    import tvm
    from tvm import relax

    from pockengine.frontend import quantized_ops

    x, w, b, m, n, config = random_convolution(case)
    expected = integer_convolution(x, w, b, m, n, config)

    bb = relax.BlockBuilder()
    args = [relax.Var(name, relax.TensorType(a.shape, str(a.dtype))) for name, a in
            (("x", x), ("w", w), ("b", b), ("m", m), ("n", n))]
    with bb.function("main", args):
        out_var = bb.emit(quantized_ops.quantized_conv2d(*args, quantized_ops.config_constant(config)))
        bb.emit_func_output(out_var)
    mod = relax.transform.LegalizeOps()(bb.get())
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in (x, w, b, m, n)]).numpy()
    np.testing.assert_array_equal(got, expected)
    # PyTorch running the model (the custom operator's eager kernel) computes the same integers
    torch_out = quantize.quantized_conv2d_op(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                             torch.from_numpy(b).double(), torch.from_numpy(m),
                                             torch.from_numpy(n), config)
    np.testing.assert_array_equal(torch_out.numpy().astype(np.int8), expected)


# cortex-m55 trains an int8 step in tests/test_int8_simd.py (its Helium kernels against the host's)
@pytest.mark.parametrize("target, patches", [("cortex-m4", None), ("cortex-m4", ("stem", 2))])
def test_int8_training_on_cortex_m_equals_the_host(tmp_path, target, patches):
    """Three int8 steps of a sub-tensor scheme in the firmware under QEMU and on the host: the same
    integers forward (the losses agree to float32 rounding: an activation off by one would move
    them by ~1e-3), the same trained weights, the frozen int8 weights in Flash; with the frozen
    prefix run patch by patch in the firmware too (MCUNetV2), the unpatched host's."""
    import os

    from pockengine.artifact_files import PROJECT
    from pockengine.targets import cortex_m, resolve

    q = quantized(TinyNet(), (2, 3, 16, 16), dtype=torch.float32)
    batches = batches_for((2, 3, 16, 16), 5, dtype=torch.float32)

    def job():
        return pe.TrainingJob(copy.deepcopy(q), (batches[0][0],), batches[0][1], "cross_entropy",
                              pe.optim.SGD(lr=0.05), sparse_update=SCHEMES["mcunetv3"])

    host = pe.compile(job(), target=FAST_HOST)
    host_losses = [host.step(x, y) for x, y in batches]
    program = pe.compile(job(), target=target, patches=patches)
    assert {s.name: s.dtype for s in program.signature.state}["pw.0.weight[:, 2:]"] == "int8"
    assert (program.meta.get("patches") is not None) == (patches is not None)
    program.export(str(tmp_path / "fw"))
    project = os.path.join(tmp_path, "fw", PROJECT)
    cortex_m.project.write_batches(project, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
    ran = cortex_m.run(project, resolve(target), len(batches), program.signature)
    np.testing.assert_allclose(ran.losses, host_losses, rtol=2e-6)
    host_state = host.state_arrays()
    for name, value in ran.state.items():
        np.testing.assert_allclose(value, host_state[name], rtol=2e-6, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_qas_scales_the_int8_gradients_as_mcunetv3(momentum):
    """SGD(qas=True) against the update written here: before torch.optim.SGD's step, each int8 conv's
    weight gradient times weight_scale^-2 per output channel, its bias's times (input_scale *
    weight_scale)^-2, the float classifier's unchanged (MCUNetV3's SGDScale.pre_step)."""
    q = quantized(TinyNet(), (2, 3, 16, 16))
    batches = batches_for((2, 3, 16, 16), 5)
    job = pe.TrainingJob(copy.deepcopy(q), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=1e-5, momentum=momentum, qas=True), sparse_update=SCHEMES["mcunetv3"])
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]

    ref = apply_to_torch(reference_of(q), program.plan)
    layers = {name: module for name, module in q.named_modules() if isinstance(module, quantize.QuantizedConv2d)}
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1e-5, momentum=momentum)
    theirs = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        for name, layer in layers.items():
            conv = ref.get_submodule(name)
            if conv.weight.grad is not None:
                conv.weight.grad /= layer.weight_scale.view(-1, 1, 1, 1) ** 2
            if conv.bias.grad is not None:
                conv.bias.grad /= (layer.input_scale * layer.weight_scale) ** 2
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), ref.state_dict(), floor=1e-2)
    assert worst < 1e-9, (worst, where)



def test_qas_moves_each_channel_by_its_weight_scale():
    """One step from the same state: QAS's move of a weight channel over plain SGD's is s_w^-2."""
    q = quantized(TinyNet(), (2, 3, 16, 16))
    x, y = batches_for((2, 3, 16, 16), 5, steps=1)[0]
    moves = []
    for qas in (False, True):
        job = pe.TrainingJob(copy.deepcopy(q), (x,), y, "cross_entropy", pe.optim.SGD(lr=1e-2, qas=qas),
                             sparse_update=pe.SparseUpdate.bias_only() | {"pw.0.weight": "full"})
        program = pe.compile(job, target=FAST_HOST)
        program.step(x, y)
        moves.append(program.state_dict()["pw.0.weight"] - q.get_submodule("pw.0").weight.detach().numpy())
    plain, scaled = moves
    expected = (q.get_submodule("pw.0").weight_scale.numpy() ** -2).reshape(-1, 1, 1, 1)
    moving = np.abs(plain) > 1e-12
    ratio = scaled[moving] / plain[moving]
    np.testing.assert_allclose(ratio, np.broadcast_to(expected, plain.shape)[moving], rtol=1e-6)


def test_qas_needs_a_quantized_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    job = pe.TrainingJob(model, (torch.randn(2, 3, 2, 2),), torch.tensor([0, 1]), "cross_entropy",
                         pe.optim.SGD(lr=0.1, qas=True))
    with pytest.raises(JobError, match="qas=True.*pe.quantize.int8"):
        pe.compile(job, target=FAST_HOST)
    with pytest.raises(pe.errors.OptimizerError, match="scale_gradients_qas"):
        pe.optim.SGD(lr=0.1, qas=True).to_torch(model.parameters())


def test_an_int8_prefix_runs_patch_by_patch_with_the_same_integers():
    """patch_prefix on an int8 step (its convolutions pad with their input's zero point, per patch
    only at the image's borders): the same losses and weights, bit for bit. ("auto" may decline:
    this net's peak is its backward's, which patches do not lower.)"""
    q = quantized(TinyNet(), (2, 3, 32, 32))
    batches = batches_for((2, 3, 32, 32), 5)
    results = []
    for patches in (None, ("dw.0", 2), "auto"):
        job = pe.TrainingJob(copy.deepcopy(q), (batches[0][0],), batches[0][1], "cross_entropy",
                             pe.optim.SGD(lr=0.05, qas=True), sparse_update=pe.SparseUpdate.mcunetv3(2, "3-4", "1-1"))
        program = pe.compile(job, target=FAST_HOST, patches=patches)
        results.append(([program.step(x, y) for x, y in batches], program.state_dict(), program.meta.get("patches")))
    (plain, plain_state, _), *patched = results
    for losses, state, _ in patched:
        assert losses == plain
        assert all(np.array_equal(state[k], plain_state[k]) for k in plain_state)
    assert patched[0][2]["split"] == "dw.0" and patched[0][2]["grid"] == 2
    auto = patched[1][2]
    assert auto is None or auto["peak_after"] < auto["peak_before"]


def test_a_model_can_take_its_inputs_as_int8():
    """input="int8": the copy reads quantized inputs (quantize_input makes them); the step's batch is
    int8 and no float copy of it is made; it trains as the float-input copy does."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    model = calibrated(TinyNet(), calibration)
    float_input, int8_input = (quantize.int8(model, calibration, input=kind).double() for kind in ("float", "int8"))
    batches = batches_for((2, 3, 16, 16), 5)
    quantized_batches = [(quantize.quantize_input(int8_input, x), y) for x, y in batches]
    assert quantized_batches[0][0].dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(float_input(batches[0][0]), int8_input(quantized_batches[0][0]))
    losses = []
    for model_, data in ((float_input, batches), (int8_input, quantized_batches)):
        job = pe.TrainingJob(copy.deepcopy(model_), (data[0][0],), data[0][1], "cross_entropy",
                             pe.optim.SGD(lr=0.05, qas=True), sparse_update=SCHEMES["mcunetv3"])
        program = pe.compile(job, target=FAST_HOST)
        losses.append([program.step(x, y) for x, y in data])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-12)
    assert program.signature.batch[0].dtype == "int8"
    from pockengine import pipeline
    derived = pipeline.derive(job)
    from pockengine.ir import bindings_of
    casts = [b for b in bindings_of(derived.step_mod[pipeline.STEP_FUNC])
             if "astype" in str(getattr(b.value, "op", "")) and b.value.args[0].same_as(
                 derived.step_mod[pipeline.STEP_FUNC].params[0])]
    assert not casts, "the int8 input is cast to a float copy"
    with pytest.raises(JobError, match="input must be 'float' or 'int8'"):
        quantize.int8(model, calibration, input="uint8")


def test_flops_count_the_int8_convolutions():
    """The FLOP analysis (per-layer reports, patch_prefix's halo overhead) counts int8 convolutions
    and their gradients as it counts float ones."""
    from pockengine import pipeline
    from pockengine.analysis.flops import step_flops

    q = quantized(TinyNet(), (2, 3, 16, 16))
    x, y = batches_for((2, 3, 16, 16), 5, steps=1)[0]
    job = pe.TrainingJob(copy.deepcopy(q), (x,), y, "cross_entropy", pe.optim.SGD(lr=0.05))
    flops = step_flops(pipeline.derive(job).step_mod[pipeline.STEP_FUNC])
    # forward: stem 3->8 k3 s2 (8x8 out), depthwise k3 s2 (4x4), 1x1 8->8 (4x4), dilated 8->8 k3 (4x4), head 8->5
    macs = 2 * (64 * 8 * 27 + 16 * 8 * 9 + 16 * 64 + 16 * 8 * 72) + 2 * 8 * 5
    assert flops["forward"] == 2 * macs
    # backward: every weight gradient (as many MACs as its forward) and the data gradients below the stem
    assert flops["backward"] == 2 * (macs + macs - 2 * 64 * 8 * 27)
