"""4-bit frozen weights (pockengine/awq.py): the format, AWQ's two searches against references
written here, the folding of its scales, and fine-tuning on a W4 base against PyTorch running the
same dequantized base (float64, 1e-9)."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from tvm import relax

import pockengine as pe
from conftest import FAST_HOST, assert_adapters_train_like_pytorch, max_scaled_diff, train_torch
from pockengine import awq, pipeline
from pockengine.errors import JobError
from pockengine.lora import merge

transformers = pytest.importorskip("transformers")
from test_transformers import BATCH, SEQ, VOCAB, causal_lm_loss, llama, llama_in_input_dtype, lm_batches  # noqa: E402, F401


def reference_groups(weight, group):
    """llm-awq's pseudo_quantize_tensor, one row and group at a time: (q, s, z) as float lists."""
    rows, cols = weight.shape
    q, scales, zeros = torch.zeros(rows, cols), [], []
    for r in range(rows):
        row_s, row_z = [], []
        for start in range(0, cols, group):
            values = weight[r, start:start + group]
            s = max(float(values.max() - values.min()), 1e-5) / 15
            z = min(max(-round(float(values.min()) / s), 0), 15)
            for j, v in enumerate(values):
                q[r, start + j] = min(max(round(float(v) / s) + z, 0), 15)
            row_s.append(s)
            row_z.append(z)
        scales.append(row_s)
        zeros.append(row_z)
    return q, torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def reference_fake_quantize(weight, group):
    q, s, z = reference_groups(weight, group)
    s, z = s.repeat_interleave(group, 1)[:, :weight.shape[1]], z.repeat_interleave(group, 1)[:, :weight.shape[1]]
    return (q.double() - z) * s


@pytest.mark.parametrize("cols, group", [(48, 16), (40, 16), (33, 8)])
def test_groups_quantize_as_llm_awq_and_pack_two_to_a_byte(cols, group):
    """Exact against the per-element formula, a shorter last group included; the packed bytes
    unpack to the same codes, column 2j in the low nibble."""
    weight = torch.randn(5, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(cols))
    q, scales, zeros = awq.quantize_groups(weight, 4, group)
    ref_q, ref_s, ref_z = reference_groups(weight, group)
    assert torch.equal(q.double(), ref_q.double()) and torch.allclose(scales, ref_s, rtol=1e-15)
    assert torch.equal(zeros.double(), ref_z)
    packed = awq.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(cols / 2))
    assert int(packed[0, 0]) == int(q[0, 0]) + 16 * int(q[0, 1])
    assert torch.equal(awq.unpack_int4(packed, cols), q)
    assert torch.allclose(awq.fake_quantize(weight, 4, group), reference_fake_quantize(weight, group), rtol=1e-15)


def block_with_outlier_channels(seed=0):
    """A norm feeding three projections (q, k, v's shape) whose input has a few large channels: the
    activations AWQ's scales protect."""
    g = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(64, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64))
        norm.weight[[3, 17, 40]] = 25.0  # outlier channels, as LLMs' activations have
    block = nn.ModuleDict({"norm": norm, "q": nn.Linear(64, 48, dtype=torch.float64),
                           "k": nn.Linear(64, 32, dtype=torch.float64), "v": nn.Linear(64, 32, dtype=torch.float64)})
    return block


class Attentionish(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        h = self.block["norm"](x)
        return torch.cat([self.block[n](h) for n in ("q", "k", "v")], -1)


def reference_scale_search(x, linears, group):
    """llm-awq's _search_module_scale on a block of linears reading x: each ratio's scales put into
    the weights in place, the block run, its output error measured, the weights restored."""
    originals = [lin.weight.detach().clone() for lin in linears]
    expected = torch.cat([lin(x) for lin in linears], -1).detach()
    x_max = x.abs().view(-1, x.shape[-1]).mean(0)
    errors = []
    for i in range(20):
        s = x_max.pow(i / 20).clamp(min=1e-4).view(-1)
        s = s / (s.max() * s.min()).sqrt()
        with torch.no_grad():
            for lin in linears:
                lin.weight.mul_(s.view(1, -1))
                lin.weight.copy_(reference_fake_quantize(lin.weight, group) / s.view(1, -1))
            out = torch.cat([lin(x) for lin in linears], -1)
            errors.append(float((expected - out).pow(2).mean()))
            for lin, w in zip(linears, originals):
                lin.weight.copy_(w)
    best = int(np.argmin(errors))
    s = x_max.pow(best / 20).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt(), best / 20, errors


def test_scale_search_matches_a_reference_on_a_block():
    block = block_with_outlier_channels()
    x = block["norm"](torch.randn(96, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).detach()
    linears = [block[n] for n in ("q", "k", "v")]
    # the biases add the same to both sides: the reference sees them, ours does not need them
    scales, ratio, errors = awq.search_scale(x, [lin.weight.detach() for lin in linears], 4, 16)
    ref_scales, ref_ratio, ref_errors = reference_scale_search(x, linears, 16)
    assert ratio == ref_ratio and ratio > 0
    np.testing.assert_allclose(errors, ref_errors, rtol=1e-9)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-12, atol=0)
    assert min(errors) < errors[0]  # better than round-to-nearest (ratio 0)


def reference_clip(x, weight, group, tokens=512):
    """llm-awq's auto_clip_layer, one row and group at a time."""
    x = x[::x.shape[0] // tokens][:tokens] if x.shape[0] > tokens else x
    rows, cols = weight.shape
    bounds = torch.zeros(rows, -(-cols // group), dtype=weight.dtype)
    for r, (gi, start) in itertools.product(range(rows), enumerate(range(0, cols, group))):
        w, xs = weight[r, start:start + group], x[:, start:start + group]
        expected = xs @ w
        best = None
        for i in range(10):
            bound = w.abs().max() * (1 - i / 20)
            q = reference_fake_quantize(w.clamp(-bound, bound)[None], group)[0]
            error = float(((xs @ q - expected) ** 2).mean())
            if best is None or error < best[0]:
                best = (error, bound)
        bounds[r, gi] = best[1]
    return bounds


@pytest.mark.parametrize("cols", [48, 40])
def test_clip_search_matches_a_reference(cols):
    g = torch.Generator().manual_seed(cols)
    weight = torch.randn(6, cols, dtype=torch.float64, generator=g)
    weight[:, 5] *= 8  # a large weight: clipping it pays in most of its group
    x = torch.randn(700, cols, dtype=torch.float64, generator=g)
    bounds = awq.search_clip(x, weight, 4, 16)
    expected = reference_clip(x, weight, 16)
    torch.testing.assert_close(bounds, expected, rtol=1e-12, atol=0)
    group_max = awq._grouped(weight.abs(), 16).amax(-1)
    assert (bounds < group_max).any() and (bounds == group_max).any()  # some groups clipped, some not


def test_awq_beats_round_to_nearest_on_held_out_inputs():
    model = Attentionish(block_with_outlier_channels())
    g = torch.Generator().manual_seed(2)
    calibration = [torch.randn(32, 64, dtype=torch.float64, generator=g) for _ in range(4)]
    held_out = torch.randn(256, 64, dtype=torch.float64, generator=g)
    with torch.no_grad():
        expected = model(held_out)
        error = {name: float(((quantized(held_out) - expected) ** 2).mean()) for name, quantized in
                 {"rtn": pe.quantize.rtn(model, group_size=16),
                  "awq": pe.quantize.awq(model, calibration, group_size=16)}.items()}
    print(error)
    assert error["awq"] < 0.7 * error["rtn"]


class NormThenResidual(nn.Module):
    """One norm feeds only a linear (its scales fold into it); another feeds a linear and the
    residual sum (they must not: the residual would be scaled too)."""

    def __init__(self):
        super().__init__()
        self.norm1, self.fc1 = nn.LayerNorm(32, dtype=torch.float64), nn.Linear(32, 32, dtype=torch.float64)
        self.norm2, self.fc2 = nn.LayerNorm(32, dtype=torch.float64), nn.Linear(32, 32, dtype=torch.float64)
        with torch.no_grad():
            self.norm1.weight[[1, 9]] = 20.0
            self.norm2.weight[[4, 20]] = 20.0

    def forward(self, x):
        h = self.fc1(self.norm1(x))
        n = self.norm2(h)
        return n + self.fc2(n)


def test_scales_fold_into_a_norm_only_when_nothing_else_reads_it():
    model = NormThenResidual()
    g = torch.Generator().manual_seed(3)
    calibration = [torch.randn(64, 32, dtype=torch.float64, generator=g) for _ in range(2)]
    folded, unfolded = (pe.quantize.awq(model, calibration, group_size=16, fold=f) for f in (True, False))
    assert folded.fc1.input_scale is None and unfolded.fc1.input_scale is not None
    assert folded.fc2.input_scale is not None  # norm2 also feeds the residual
    assert not torch.equal(folded.norm1.weight, model.norm1.weight)
    assert torch.equal(folded.norm2.weight, model.norm2.weight)
    x = torch.randn(16, 32, dtype=torch.float64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-12, atol=1e-12)
        # the layer's float weight, scales included, is what it multiplies its own input by
        torch.testing.assert_close(unfolded.fc2(x), x @ unfolded.fc2.weight().T + unfolded.fc2.bias)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.LayerNorm(64), nn.Linear(64, 48), nn.GELU(),
                         nn.Linear(48, 5)).double()


def test_every_trainable_part_of_a_w4_model_trains_like_pytorch_on_the_dequantized_model():
    """The full scheme on a W4 model trains its biases, norm and float head, never a 4-bit weight; the
    data gradient runs back through two W4 layers (w4_matmul_input_grad) to the first bias. The
    first layer's 40 inputs make a shorter last group of 8."""
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 40, dtype=torch.float64, generator=g), torch.randint(0, 5, (8,), generator=g))
               for _ in range(4)]
    base = pe.quantize.awq(mlp(), [x for x, _ in batches], group_size=16, skip=("4",))
    job = pe.TrainingJob(copy.deepcopy(base), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.2, momentum=0.9))
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    reference = pe.quantize.dequantized(base)
    for linear in (reference[0], reference[2]):
        assert not linear.weight.requires_grad
    theirs = train_torch(reference, pe.optim.SGD(lr=0.2, momentum=0.9), batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    state = program.state_dict()
    for name in ("0.packed", "0.scales", "0.zeros", "2.packed"):
        assert np.array_equal(state[name], base.state_dict()[name].numpy())  # frozen, as stored
    assert state["0.packed"].dtype == np.uint8
    trained = {k: v for k, v in reference.state_dict().items() if not k.endswith(".weight") or k.startswith(("1", "4"))}
    worst, where = max_scaled_diff({k: state[k] for k in trained}, trained)
    assert worst <= 1e-9, f"{where} differs by {worst:.3g}"


@pytest.mark.usefixtures("llama_in_input_dtype")
def test_lora_on_a_w4_llama_trains_like_pytorch_on_the_dequantized_base():
    """QLoRA's setting: transformers' LLaMA, every linear but the tied head AWQ-quantized in groups
    of 64, LoRA on q, v and the MLP's down projection; PyTorch trains the same adapters on the
    dequantized base."""
    model = llama(torch.float64)
    batches = lm_batches(4)
    base = pe.quantize.awq(model, [ids for ids, _ in batches[:2]], group_size=64)
    assert isinstance(base.model.layers[0].mlp.down_proj, awq.W4Linear)
    assert not isinstance(base.lm_head, awq.W4Linear)  # tied to the embedding
    scheme = pe.SparseUpdate.lora(4, ("q_proj", "v_proj", "down_proj"), alpha=8)
    job = pe.TrainingJob(copy.deepcopy(base), (batches[0][0],), batches[0][1], causal_lm_loss,
                         pe.optim.AdamW(lr=1e-3), sparse_update=scheme)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    assert_adapters_train_like_pytorch(program, ours, base, scheme, batches, pe.optim.AdamW(lr=1e-3), causal_lm_loss)
    with pytest.raises(JobError, match="4-bit"):
        merge(program.state_dict(), job.model)


@pytest.mark.parametrize("kwargs, message", [
    ({"w_bit": 3}, "w_bit must be 4"),
    ({"group_size": 1}, "group_size must be an integer >= 2"),
    ({"skip": ("*",)}, "no nn.Linear to quantize"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(JobError, match=message):
        pe.quantize.awq(mlp(), [torch.randn(4, 40, dtype=torch.float64)], **kwargs)


def test_awq_needs_calibration_but_round_to_nearest_does_not():
    with pytest.raises(JobError, match="at least one calibration batch"):
        pe.quantize.awq(mlp(), [])
    assert isinstance(pe.quantize.rtn(mlp(), group_size=16)[0], awq.W4Linear)



def test_the_linears_a_scheme_trains_stay_float():
    """Only the frozen base is quantized: last_blocks(1)'s block keeps its float linears (they train),
    a LoRA or bias scheme leaves every linear to quantize."""
    model = llama()
    ids = lm_batches(1)[0][0]
    last = pe.quantize.awq(model, [ids], group_size=64, sparse_update=pe.SparseUpdate.last_blocks(1))
    kinds = {name: type(m).__name__ for name, m in last.named_modules() if isinstance(m, (nn.Linear, awq.W4Linear))}
    assert all(kind == "Linear" for name, kind in kinds.items() if name.startswith("model.layers.1."))
    assert all(kind == "W4Linear" for name, kind in kinds.items() if name.startswith("model.layers.0."))
    for scheme in (pe.SparseUpdate.lora(4), pe.SparseUpdate.bias_and_norm()):
        quantized = pe.quantize.rtn(model, group_size=64, sparse_update=scheme)
        assert all(isinstance(m, awq.W4Linear) for name, m in quantized.named_modules()
                   if name.startswith("model.layers.") and name.endswith("_proj"))


def test_a_scheme_that_would_train_a_4_bit_weight_is_refused():
    """last_blocks on a base quantized without the scheme: its last block's linears are 4-bit; the
    error says to give the scheme to the quantization."""
    base = pe.quantize.rtn(llama(), group_size=64)
    ids, labels = lm_batches(1)[0]
    job = pe.TrainingJob(base, (ids,), labels, causal_lm_loss, pe.optim.AdamW(lr=1e-3),
                         sparse_update=pe.SparseUpdate.last_blocks(1))
    with pytest.raises(JobError, match=r"trains model\.layers\.1\.self_attn\.q_proj, whose weight is 4-bit.*"
                                       r"sparse_update=scheme"):
        job.plan(job.import_model())


def test_a_w4_step_counts_the_flops_of_the_float_one():
    """The FLOP count (reports, per-kernel GFLOP/s) sees a 4-bit matmul and its data gradient as the
    float matmuls they replace."""
    from pockengine import pipeline
    from pockengine.analysis.flops import step_flops

    def flops(model):
        job = pe.TrainingJob(model, (torch.randn(8, 40, dtype=torch.float64),), torch.randint(0, 5, (8,)),
                             "cross_entropy", pe.optim.SGD(lr=0.1))
        imported = pipeline.import_model(job)
        step, _, _ = pipeline.derive_step(imported, job.optimizer, job.plan(imported))
        return step_flops(step["train_step"])

    plain = mlp()
    for linear in (plain[0], plain[2]):
        linear.weight.requires_grad_(False)  # as the 4-bit ones are
    assert flops(pe.quantize.rtn(plain, group_size=16, skip=("4",))) == flops(plain) != {"forward": 0, "backward": 0}


@pytest.mark.usefixtures("llama_in_input_dtype")
@pytest.mark.parametrize("fused_loss", [False, True], ids=["logits", "fused vocabulary loss"])
def test_a_tied_embedding_is_one_4_bit_table_for_the_lookup_and_the_head(fused_loss, monkeypatch):
    """embeddings=True: the LLaMA's embedding and the LM head tied to it read one 4-bit table (one
    state tensor, named under the head); LoRA trains on it as PyTorch does on the dequantized model,
    and a token id outside the table is refused before any state changes. With the fused vocabulary
    loss (a vocabulary of 2048 or more; forced here on 1000) the head is read packed a chunk of rows
    at a time, forward and backward, and no float copy of it or whole logits exist."""
    from pockengine.autodiff.linear_log_prob import GRAD_OP_NAME, OP_NAME
    from pockengine.errors import InputError
    from pockengine.frontend import w4_ops
    from pockengine.ir import op_name, static_shape
    from pockengine.passes import chunk_linear_log_prob, fuse_linear_log_prob

    model = llama(torch.float64)
    batches = lm_batches(3)
    base = pe.quantize.awq(model, [ids for ids, _ in batches[:2]], group_size=64, embeddings=True)
    assert isinstance(base.model.embed_tokens, awq.W4Embedding) and base.model.embed_tokens.tied_head is base.lm_head
    assert {k for k in base.state_dict() if k.startswith(("lm_head", "model.embed_tokens"))} == {
        "lm_head.packed", "lm_head.scales", "lm_head.zeros"}
    scheme = pe.SparseUpdate.lora(4, ("q_proj", "v_proj"), alpha=8)
    job = pe.TrainingJob(copy.deepcopy(base), (batches[0][0],), batches[0][1], causal_lm_loss,
                         pe.optim.AdamW(lr=1e-3), sparse_update=scheme)
    if fused_loss:
        monkeypatch.setattr(fuse_linear_log_prob, "MIN_CLASSES", 0)
        monkeypatch.setattr(chunk_linear_log_prob, "MIN_CHUNK_ROWS", 16)
        monkeypatch.setattr(chunk_linear_log_prob, "CHUNK_LOGITS_BYTES", 1)
        imported = pipeline.import_model(job)
        step = pipeline.derive_step(imported, job.optimizer, job.plan(imported))[0]["train_step"]
        values = [b.value for block in step.body.blocks for b in block.bindings]
        assert not {OP_NAME, GRAD_OP_NAME} & {op_name(v) for v in values}  # expanded into chunks
        head_rows = [static_shape(v.args[0])[0] for v in values if op_name(v) in w4_ops.OPS
                     and static_shape(v.args[1])[0] == VOCAB and len(static_shape(v.args[0])) == 2]
        rows = BATCH * (SEQ - 1)
        assert len(head_rows) >= 4 and sum(head_rows) == 2 * (rows + -rows % 8) and max(head_rows) == 16
        assert not any(VOCAB in static_shape(v)[1:] and static_shape(v)[0] > 16 for v in values
                       if isinstance(v, relax.Call) and isinstance(v.ty, relax.TensorType))
    program = pe.compile(job, target=FAST_HOST)
    assert [s.name for s in program.signature.state if "lm_head" in s.name or "embed" in s.name] == [
        "lm_head.packed", "lm_head.scales", "lm_head.zeros"]
    ours = [program.step(x, y) for x, y in batches]
    assert isinstance(pe.quantize.dequantized(base).model.embed_tokens, nn.Embedding)
    assert_adapters_train_like_pytorch(program, ours, base, scheme, batches, pe.optim.AdamW(lr=1e-3), causal_lm_loss)
    before = program.state_dict()
    bad = batches[0][0].clone()
    bad[0, 3] = 1000  # the vocabulary is 0..999
    with pytest.raises(InputError, match="1000"):
        program.step(bad, batches[0][1])
    after = program.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
