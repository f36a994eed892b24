"""W8A8 / W8 frozen bases (pockengine/smoothquant.py): the smoothing and the int8 formats against
references written here, the compiled int8 matmul bit for bit against the integer reference, which
layers quantize their activations, and training on such a base against PyTorch (float64, 1e-9)."""

import copy
import os

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import pockengine as pe
from conftest import FAST_HOST, assert_adapters_train_like_pytorch, max_scaled_diff, train_torch
from pockengine import pipeline
from pockengine import smoothquant as sq
from pockengine.autodiff.step import Int8DotLayout
from pockengine.errors import JobError
from pockengine.frontend import w8_ops
from pockengine.lora import LoRAW8Linear, merge
from pockengine.targets import resolve
from pockengine.targets.host import CPU_LOWERING

transformers = pytest.importorskip("transformers")
from test_transformers import causal_lm_loss, llama, llama_in_input_dtype, lm_batches  # noqa: E402, F401


def test_smoothing_scales_follow_smoothquant():
    """s_j = max|x_j|^a / max|w_j|^(1-a), the weight maximum over every linear reading x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64, generator=g)
    weights = [torch.randn(4, 6, dtype=torch.float64, generator=g), torch.randn(3, 6, dtype=torch.float64, generator=g)]
    for alpha in (0.5, 0.8):
        expected = [max(abs(float(v)) for v in x[:, j]) ** alpha
                    / max(abs(float(w[n, j])) for w in weights for n in range(w.shape[0])) ** (1 - alpha)
                    for j in range(6)]
        torch.testing.assert_close(sq.smooth_scales(x, weights, alpha), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-14, atol=0)


def test_int8_formats_are_symmetric_and_round_halves_away():
    weight = torch.tensor([[0.5, -1.0, 0.25], [2.54, 0.0, -0.01]], dtype=torch.float64)
    q, scales = sq.quantize_rows(weight)
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32], [127, 0, -1]]  # 63.5 -> 64, -0.5 -> -1
    torch.testing.assert_close(scales, torch.tensor([1 / 127, 2.54 / 127], dtype=torch.float64))
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert sq.quantize_tokens(x).tolist() == [[127, -64, 32], [0, 0, 0]]  # -63.5 -> -64; a zero row stays zero


# A host target without AVX-512 VNNI (this machine runs its code): w8a8_matmul's plain int32 form.
WITHOUT_VNNI = {"kind": "llvm", "mcpu": "haswell", "num-cores": os.cpu_count() or 1}


def compiled(op_builder, *arrays, scheduled=True, target="host"):
    """Build one call of a Relax operator for a host target (legalized and fused, then scheduled,
    as the step's kernels are: pipeline.kernels) and run it on `arrays`."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(arrays)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(op_builder(*params))
        bb.emit_func_output(out)
    preset = resolve(target)
    if scheduled:
        mod = pipeline.kernels(bb.get(), preset, CPU_LOWERING)
    else:
        with preset.target():
            mod = tvm.transform.Sequential(pipeline.fusion_passes(CPU_LOWERING, preset.target()))(bb.get())
    vm = relax.VirtualMachine(tvm.compile(mod, target=preset.target()), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


@pytest.mark.parametrize("shape", [(2, 5, 48), (37, 50), (2, 8, 40)])
@pytest.mark.parametrize("target, scheduled", [("host", False), ("host", True), (WITHOUT_VNNI, True)])
def test_compiled_w8a8_matmul_is_the_integer_reference_bit_for_bit(shape, target, scheduled):
    """float32, sequences and a flat batch whose rows, depth and outputs fill no tile (and 16 rows,
    two whole tiles, which VNNI's row of ones for the weight's row sums makes three), an all-zero
    token and values exactly halfway between levels: the int32 sums and the scaling, as the torch
    operator computes them, with AVX-512 VNNI's form of the sums (this machine's host) and without."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype("float32")
    rows = x.reshape(-1, shape[-1])
    rows[1] = 0.0
    rows[2, :2] = [127.0, 0.5]  # 0.5 / (127 / 127) = 0.5 exactly: rounds to 1
    outputs = 24 if len(shape) == 3 else 40
    weight = rng.integers(-127, 128, (outputs, shape[-1])).astype("int8")
    scales = (rng.random(outputs) * 0.01 + 1e-3).astype("float32")
    ours = compiled(w8_ops.w8a8_matmul, x, weight, scales, scheduled=scheduled, target=target)
    # the integer reference: the sums in int64, then the same float32 scaling
    s_t = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-5)) / np.float32(127)
    q_x = np.clip(np.trunc(x / s_t) + np.where(np.abs(x / s_t - np.trunc(x / s_t)) >= 0.5, np.sign(x / s_t), 0),
                  -127, 127).astype(np.int64)
    assert q_x.reshape(-1, shape[-1])[2, 1] == 1
    acc = q_x @ weight.astype(np.int64).T
    expected = acc.astype(np.float32) * s_t * scales
    assert np.array_equal(ours, expected)
    torch_op = sq.w8a8_matmul_op(torch.tensor(x), torch.tensor(weight), torch.tensor(scales)).numpy()
    assert np.array_equal(torch_op, expected)


@pytest.mark.parametrize("target, form, instruction", [("host", w8_ops.VNNI, "vpdpbusd"),
                                                          ("jetson-orin-cpu", w8_ops.SDOT, "sdot")])
def test_w8a8_sums_are_the_cpus_dot_product_instructions(target, form, instruction):
    """This machine (AVX-512 VNNI) and the Jetson Orin's Cortex-A78 (Armv8.2 dotprod) sum a W8A8
    layer's int8 products with their dot-product instruction, tiled and tensorized
    (passes/schedule_int8_dot.py), not with int32 multiplies."""
    preset = resolve(target)
    if w8_ops.int8_dot(preset.target()) != form:
        pytest.skip(f"{target}'s CPU has no {form.name}")
    x = relax.Var("x", relax.TensorType((64, 96), "float32"))
    weight = relax.Var("w", relax.TensorType((64, 96), "int8"))
    scales = relax.Var("s", relax.TensorType((64,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, weight, scales]):
        with bb.dataflow():
            out = bb.emit_output(w8_ops.w8a8_matmul(x, weight, scales))
        bb.emit_func_output(out)
    mod = pipeline.kernels(bb.get(), preset, CPU_LOWERING)
    dots = [f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and instruction in f.script()]
    assert len(dots) == 1 and dots[0].attrs["tirx.is_scheduled"]
    # vpdpbusd's offset is corrected with the weight's row sums, summed by the same instruction
    assert not any("row_sums" in gv.name_hint for gv in mod.get_global_vars())


def test_compiled_w8_matmul_and_its_data_gradient_match_pytorch_on_the_dequantized_weight():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 40)).astype("float64")
    weight = rng.integers(-127, 128, (16, 40)).astype("int8")
    scales = rng.random(16) * 0.01
    dequantized = weight.astype("float64") * scales[:, None]
    np.testing.assert_allclose(compiled(w8_ops.w8_matmul, x, weight, scales), x @ dequantized.T, rtol=1e-13)
    dy = rng.standard_normal((3, 16))
    np.testing.assert_allclose(compiled(w8_ops.w8_matmul_input_grad, dy, weight, scales), dy @ dequantized,
                               rtol=1e-13)


class Outliers(nn.Module):
    """A norm whose output has large channels, feeding two linears, then a GELU and a head."""

    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b = nn.LayerNorm(64), nn.Linear(64, 48), nn.Linear(64, 48)
        self.head = nn.Linear(48, 5)
        with torch.no_grad():
            self.norm.weight[[2, 30, 51]] = 40.0

    def forward(self, x):
        h = self.norm(x)
        return self.head(nn.functional.gelu(self.a(h)) * self.b(h))


def test_smoothquant_beats_plain_w8a8_where_activations_have_outlier_channels():
    torch.manual_seed(0)
    model = Outliers().double()
    g = torch.Generator().manual_seed(3)
    calibration = [torch.randn(32, 64, dtype=torch.float64, generator=g) for _ in range(4)]
    held_out = torch.randn(256, 64, dtype=torch.float64, generator=g)
    with torch.no_grad():
        expected = model(held_out)
        smoothed = pe.quantize.smoothquant(model, calibration, skip=("head",))
        plain = pe.quantize.w8a8(model, calibration, skip=("head",))
        error = {name: float(((m(held_out) - expected) ** 2).mean()) for name, m in
                 (("smoothquant", smoothed), ("w8a8", plain))}
    print(error)
    assert smoothed.a.input_scale is None and not torch.equal(smoothed.norm.weight, model.norm.weight)  # folded
    assert error["smoothquant"] < 0.5 * error["w8a8"]


def test_layers_before_the_first_trained_one_quantize_their_activations():
    """Without a scheme every frozen linear is W8A8; with one, those the backward passes through (from
    the first trained layer on, in the forward's order) keep float activations; trained ones stay float."""
    torch.manual_seed(0)
    model = llama()
    ids = lm_batches(1)[0][0]
    kinds = {}
    for name, scheme in (("none", None), ("last block", pe.SparseUpdate.last_blocks(1)),
                         ("lora", pe.SparseUpdate.lora(4))):
        base = pe.quantize.smoothquant(model, [ids], sparse_update=scheme)
        kinds[name] = {n: getattr(m, "activations", "trained") for n, m in base.named_modules()
                       if n.startswith("model.layers.") and n.endswith("_proj")}
    assert set(kinds["none"].values()) == {"int8"}
    assert {k for k, v in kinds["last block"].items() if v == "int8"} == {
        k for k in kinds["last block"] if k.startswith("model.layers.0.")}
    assert {k for k, v in kinds["last block"].items() if v == "trained"} == {
        k for k in kinds["last block"] if k.startswith("model.layers.1.")}
    # LoRA's adapters sit beside layer 0's q_proj, the first linear called after the norm: no layer
    # runs before it but the W8A8-free embedding
    assert set(kinds["lora"].values()) == {"float"}


@pytest.mark.usefixtures("llama_in_input_dtype")
@pytest.mark.parametrize("target", ["fast host", "host"])
def test_last_block_on_a_smoothquant_llama_trains_like_pytorch(target, tmp_path):
    """Block 0 W8A8 (its activations rounded per token), block 1 trained in float, the tied head
    frozen float; PyTorch trains the same module (its straight-through W8A8 operator), float64.
    "host" is this machine's CPU (at -O0, as FAST_HOST): with AVX-512 VNNI, block 0's int8 weights
    are held in the dot product's layout (interleave_int8_weights) and its sums are vpdpbusd
    instructions; FAST_HOST names no CPU, so it has neither."""
    model = llama(torch.float64)
    batches = lm_batches(4)
    scheme = pe.SparseUpdate.last_blocks(1)
    base = pe.quantize.smoothquant(model, [ids for ids, _ in batches[:2]], sparse_update=scheme)
    job = pe.TrainingJob(copy.deepcopy(base), (batches[0][0],), batches[0][1], causal_lm_loss,
                         pe.optim.AdamW(lr=1e-3), sparse_update=scheme)
    host_cpu = {**FAST_HOST, "mcpu": dict(resolve("host").target().export())["mcpu"]}
    program = pe.compile(job, target=FAST_HOST if target == "fast host" else host_cpu)
    interleaved = [name for name, layout in program.signature.packed.items() if isinstance(layout, Int8DotLayout)]
    vnni = target == "host" and w8_ops.int8_dot(resolve(host_cpu).target()) == w8_ops.VNNI
    assert len(interleaved) == (7 if vnni else 0)  # block 0's q, k, v, o, gate, up, down
    ours = [program.step(x, y) for x, y in batches]
    reference = copy.deepcopy(base)
    pe.sparse.apply_to_torch(reference, program.plan)
    theirs = train_torch(reference, pe.optim.AdamW(lr=1e-3), batches, loss_fn=causal_lm_loss)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    state = program.state_dict()
    worst, where = max_scaled_diff({k: state[k] for k in reference.state_dict()}, reference.state_dict())
    assert worst <= 1e-9, f"{where} differs by {worst:.3g}"
    assert state["model.layers.0.mlp.up_proj.weight_int8"].dtype == np.int8
    loaded = pe.load(program.export(str(tmp_path / "artifact")))
    assert loaded.signature.packed == program.signature.packed
    assert all(np.array_equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_a_w8_layer_the_backward_passes_through_trains_like_its_dequantized_linear():
    """A frozen W8 layer between two trained parts: the first bias's gradient crosses it
    (w8_matmul_input_grad), exactly the float model's with the dequantized weight."""
    torch.manual_seed(0)
    model = Outliers().double()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 64, dtype=torch.float64, generator=g), torch.randint(0, 5, (8,), generator=g))
               for _ in range(4)]
    scheme = pe.SparseUpdate({"norm.bias": "full", "head": "full"})
    base = pe.quantize.smoothquant(model, [x for x, _ in batches], skip=("head",), sparse_update=scheme)
    assert base.a.activations == "float" and base.b.activations == "float"
    job = pe.TrainingJob(copy.deepcopy(base), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=scheme)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    reference = pe.quantize.dequantized(base)
    assert isinstance(reference.a, nn.Linear)
    plan = program.plan
    for name, param in reference.named_parameters():  # the dequantized weights are new: frozen
        param.requires_grad_(plan.get(name, "frozen") != "frozen")
    np.testing.assert_allclose(ours, train_torch(reference, pe.optim.SGD(lr=0.1, momentum=0.9), batches), rtol=1e-10)


@pytest.mark.parametrize("kwargs, message", [({"alpha": 1.5}, "alpha must be a number in"),
                                             ({"skip": ("*",)}, "no frozen nn.Linear")])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(JobError, match=message):
        pe.quantize.smoothquant(Outliers(), [torch.randn(4, 64)], **kwargs)
    with pytest.raises(JobError, match="at least one calibration batch"):
        pe.quantize.smoothquant(Outliers(), [])


@pytest.mark.usefixtures("llama_in_input_dtype")
@pytest.mark.parametrize("quantized_for", ["the scheme", "no scheme"])
def test_lora_on_a_smoothquant_llama_trains_like_pytorch_on_the_same_base(quantized_for):
    """Adapters beside int8 layers (LoRAW8Linear). Quantized for the LoRA scheme, every layer is W8
    (the backward passes through all of them): PyTorch trains the same adapters on the dequantized
    base. Quantized without one, every layer is W8A8: PyTorch trains them on the same module (its
    straight-through operator). float64, 1e-9; merging into the int8 weights is refused."""
    model = llama(torch.float64)
    batches = lm_batches(4)
    scheme = pe.SparseUpdate.lora(4, ("q_proj", "v_proj", "down_proj"), alpha=8)
    base = pe.quantize.smoothquant(model, [ids for ids, _ in batches[:2]],
                                   sparse_update=scheme if quantized_for == "the scheme" else None)
    job = pe.TrainingJob(copy.deepcopy(base), (batches[0][0],), batches[0][1], causal_lm_loss,
                         pe.optim.AdamW(lr=1e-3), sparse_update=scheme)
    adapted = job.model.model.layers[0].mlp.down_proj
    assert isinstance(adapted, LoRAW8Linear)
    assert adapted.activations == ("float" if quantized_for == "the scheme" else "int8")
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    assert_adapters_train_like_pytorch(program, ours, base, scheme, batches, pe.optim.AdamW(lr=1e-3), causal_lm_loss)
    state = program.state_dict()
    assert state["model.layers.0.self_attn.q_proj.weight_int8"].dtype == np.int8
    with pytest.raises(JobError, match=r"q_proj's base weight is int8 \(quantize.smoothquant\)"):
        merge(state, job.model)


@pytest.mark.parametrize("change", ["awq", "smoothquant with a scheme", "lora"])
def test_quantizing_or_adapting_keeps_each_modules_own_train_or_eval_mode(change):
    """Calibration runs the model in eval mode; the quantized copy comes back with every module in the
    mode it had, a replaced linear in its predecessor's (a dropout a user put in eval mode inside a
    training model stays so); LoRA's wrappers take their base layer's mode."""
    model = llama(attention_dropout=0.1)
    model.model.layers[1].self_attn.eval()
    batches = [ids for ids, _ in lm_batches(2)]
    if change == "awq":
        base = pe.quantize.awq(model, batches, group_size=64)
    elif change == "lora":
        base = copy.deepcopy(model)
        pe.lora.add_lora(base, 4, ("q_proj", "v_proj"))
    else:
        base = pe.quantize.smoothquant(model, batches, sparse_update=pe.SparseUpdate.last_blocks(1))
    modes = {name: module.training for name, module in model.named_modules()}
    assert not modes["model.layers.1.self_attn.q_proj"] and modes["model.layers.0.self_attn.q_proj"]
    assert {name: module.training for name, module in base.named_modules() if name in modes} == modes
