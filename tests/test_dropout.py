"""Dropout and stochastic depth in the compiled step: Philox4x32-10 in Relax ops (frontend/philox.py)
against its numpy twin (pockengine/random.py) and the published known answers; the masks' statistics,
reproducibility (seed, step, site, export/load); PyTorch parity with PyTorch's dropout replaced by the
reference masks (float64, 1e-9); microcontroller and aarch64 builds."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, fused_step_module, max_scaled_diff, train_torch
from pockengine.errors import JobError, UnsupportedOpError
from pockengine.random import bernoulli, dropout_keep_mask, philox4x32, uniform

PARITY_TOL = 1e-9


# ------------------------------------------------------------------ the generator


@pytest.mark.parametrize("counter, key, expected", [
    # Random123's kat_vectors (philox4x32 10 <counter> <key> <output>)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_numpy_philox_gives_the_published_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32(counter, key)) == expected


def test_uniforms_are_in_the_unit_interval_at_the_dtype_resolution():
    for dtype, bits in (("float32", 24), ("float64", 53)):
        u = uniform(3, 5, 1, (1000,), dtype)
        assert u.dtype == dtype and u.min() >= 0 and u.max() < 1
        assert np.all(u * 2.0 ** bits == np.floor(u * 2.0 ** bits))


# ------------------------------------------------------------------ masks of the compiled step


class MaskProbe(nn.Module):
    """Dropout of all-ones parameters (one site each): with SGD at lr 1 from zero and the loss
    sum(output), each step subtracts the scaled keep mask from the parameter, exactly."""

    def __init__(self, shape, p=0.5, sites=2):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for _ in range(sites)])
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return torch.stack([self.dropout(w + x) for w in self.w])


def sum_loss(out, target):
    return (out * target).sum()


def probe_program(shape, p=0.5, sites=2, dtype=torch.float32, seed=0, target=FAST_HOST):
    model = MaskProbe(shape, p, sites).to(dtype)
    ones = torch.ones(shape, dtype=dtype)
    job = pe.TrainingJob(model, (ones,), torch.ones((sites,) + tuple(shape), dtype=dtype), sum_loss,
                         pe.optim.SGD(lr=1.0), seed=seed)
    return pe.compile(job, target=target), (ones, torch.ones((sites,) + tuple(shape), dtype=dtype))


def masks_of_next_step(program, batch) -> list:
    """The scaled masks the program's next step applies, one per site (read off the updates)."""
    before = program.state_dict()
    program.step(*batch)
    after = program.state_dict()
    return [before[k] - after[k] for k in sorted(before)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_masks_are_the_numpy_reference_masks(dtype):
    shape, p, seed = (6, 50), 0.5, 1234567890123
    program, batch = probe_program(shape, p, dtype=dtype, seed=seed)
    assert program.optimizer_state_dict()["rng.seed"] == seed
    name = str(dtype).replace("torch.", "")
    for step in range(3):
        for site, scaled in enumerate(masks_of_next_step(program, batch)):
            expected = dropout_keep_mask(seed, step, site, shape, p, name) * 2.0
            np.testing.assert_array_equal(scaled, expected, err_msg=f"step {step} site {site}")


def test_keep_rate_and_scale_are_pytorchs_and_masks_differ_by_step_and_site():
    """p = 0.3 on 2 x 65536 elements: kept fraction within 5 sigma of 0.7, kept values 1/0.7."""
    shape, p = (256, 256), 0.3
    program, batch = probe_program(shape, p)
    first, second = masks_of_next_step(program, batch), masks_of_next_step(program, batch)
    n = first[0].size
    for scaled in first + second:
        kept = scaled != 0
        assert abs(kept.sum() - n * (1 - p)) <= 5 * np.sqrt(n * p * (1 - p))
        np.testing.assert_array_equal(scaled[kept], np.float32(1 / (1 - p)))
    same = lambda a, b: np.mean((a != 0) == (b != 0))  # about 0.58 for independent masks
    assert same(first[0], first[1]) < 0.62 and same(first[0], second[0]) < 0.62


def test_masks_come_from_the_seed_in_every_program_and_survive_export_and_load(tmp_path):
    shape = (4, 40)
    program, batch = probe_program(shape, seed=42)
    again, _ = probe_program(shape, seed=42)
    other, _ = probe_program(shape, seed=43)
    first = masks_of_next_step(program, batch)
    for a, b in zip(first, masks_of_next_step(again, batch)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], masks_of_next_step(other, batch)[0])
    loaded = pe.load(program.export(str(tmp_path / "probe")))
    assert loaded.optimizer_state_dict()["rng.seed"] == 42 and loaded.optimizer_state_dict()["step"] == 1
    for a, b in zip(masks_of_next_step(program, batch), masks_of_next_step(loaded, batch)):
        np.testing.assert_array_equal(a, b)


def test_the_mask_is_hoisted_out_of_the_differentiated_graph():
    """The Philox computation depends on the seed and the step only: it runs before the forward
    the gradient pass sees, and the backward reads the mask the forward used."""
    from pockengine import pipeline

    model = MaskProbe((3, 5), sites=1)
    job = pe.TrainingJob(model, (torch.ones(3, 5),), torch.ones(1, 3, 5), sum_loss, pe.optim.SGD(lr=1.0))
    imported = pipeline.import_model(job)
    step_mod, signature, _ = pipeline.derive_step(imported, job.optimizer, job.plan(imported))
    bindings = [b for block in step_mod["train_step"].body.blocks for b in block.bindings]
    xor = [i for i, b in enumerate(bindings) if "bitwise_xor" in str(getattr(b.value, "op", ""))]
    first_adjoint = next(i for i, b in enumerate(bindings) if b.var.name.endswith("_adjoint"))
    assert xor and max(xor) < first_adjoint
    assert signature.categories["rng.seed"] == "optimizer"


def test_each_site_is_one_kernel_whose_constants_are_the_axes_ranges():
    """No n-element index array folded into the library: the kernel computes each element's counter."""
    import tvm

    job = pe.TrainingJob(MaskProbe((6, 50)), (torch.ones(6, 50),), torch.ones(2, 6, 50), sum_loss, pe.optim.SGD(lr=1.0))
    mod = fused_step_module(job)
    calls = [b.value for block in mod["train_step"].body.blocks for b in block.bindings
             if isinstance(b.value, tvm.relax.Call) and b.value.args
             and "bitwise_xor" in getattr(b.value.args[0], "name_hint", "")]
    assert len(calls) == 2
    for call in calls:
        constants = [a for a in call.args[1].fields if isinstance(a, tvm.ir.expr.Constant)]
        assert constants and max(a.value.numpy().size for a in constants) <= 50


# ------------------------------------------------------------------ PyTorch parity


class ReferenceDropout:
    """torch.nn.functional.dropout with the compiled step's masks: sites numbered in call order
    within a step (the graph order of the exported forward)."""

    def __init__(self, seed=0):
        self.seed, self.step, self.site = seed, 0, 0

    def __call__(self, input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        dtype = str(input.dtype).replace("torch.", "")
        keep = dropout_keep_mask(self.seed, self.step, self.site, input.shape, p, dtype)
        self.site += 1
        return input * (torch.from_numpy(keep).to(input.dtype) * (1.0 / (1.0 - p)))

    def next_step(self):
        self.step, self.site = self.step + 1, 0


def reference_attention(dropout):
    """scaled_dot_product_attention as PyTorch's math path computes it, its dropout `dropout`
    (transformers' default "sdpa" attention; its kernel's own dropout cannot be replaced)."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa:
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        scores = query @ key.transpose(-2, -1) * scale
        if is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        return dropout(torch.softmax(scores, -1), dropout_p, dropout_p > 0) @ value

    return attention


def train_with_reference_masks(model, optimizer, batches, loss_fn, monkeypatch, seed=0):
    reference = ReferenceDropout(seed)
    monkeypatch.setattr(torch.nn.functional, "dropout", reference)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", reference_attention(reference))
    opt = optimizer.to_torch([p for p in model.parameters() if p.requires_grad])
    losses = []
    for *inputs, target in batches:
        opt.zero_grad()
        loss = loss_fn(model(*inputs), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sites = reference.site
        reference.next_step()
    monkeypatch.undo()
    return losses, sites


def assert_parity(model, batches, loss_fn, optimizer, monkeypatch, sites, seed=0):
    """3 steps compiled and in PyTorch with the same masks: losses and state within 1e-9 (float64)."""
    job = pe.TrainingJob(copy.deepcopy(model), batches[0][:-1], batches[0][-1], loss_fn, optimizer, seed=seed)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(*batch) for batch in batches]
    theirs, drawn = train_with_reference_masks(model, optimizer, batches, loss_fn, monkeypatch, seed)
    assert drawn == sites, f"PyTorch drew {drawn} dropout masks a step, expected {sites}"
    np.testing.assert_allclose(ours, theirs, rtol=PARITY_TOL, atol=PARITY_TOL)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= PARITY_TOL, f"{where} differs from PyTorch by {worst:.3g}"
    return program


class DropoutMLP(nn.Module):
    def __init__(self, p=0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 32), nn.GELU(),
                                 nn.Dropout(p), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)


def float64_batches(shape, classes, steps=3):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(steps)]


def test_mlp_with_dropout_trains_like_pytorch_with_the_same_masks(monkeypatch):
    torch.manual_seed(0)
    model = DropoutMLP().double().train()
    assert_parity(model, float64_batches((8, 16), 5), nn.functional.cross_entropy,
                  pe.optim.SGD(lr=0.1, momentum=0.9), monkeypatch, sites=2, seed=5)


def test_dropout_in_eval_mode_adds_no_state():
    job = pe.TrainingJob(DropoutMLP(p=0.5).eval(), (torch.randn(4, 16),), torch.randint(0, 5, (4,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1))
    assert "rng.seed" not in {s.name for s in pe.compile(job, target=FAST_HOST).signature.state}


def test_dropout_with_p_zero_is_the_identity_and_adds_no_state():
    """Plain PyTorch (no masks replaced) and the compiled step: 3 SGD steps in float64."""
    torch.manual_seed(0)
    model = DropoutMLP(p=0.0).double().train()
    batches = float64_batches((8, 16), 5)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", pe.optim.SGD(lr=0.1))
    program = pe.compile(job, target=FAST_HOST)
    assert "rng.seed" not in {s.name for s in program.signature.state}
    ours = [program.step(x, y) for x, y in batches]
    theirs = train_torch(model, pe.optim.SGD(lr=0.1), batches)
    np.testing.assert_allclose(ours, theirs, rtol=PARITY_TOL)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= PARITY_TOL, f"{where} differs from PyTorch by {worst:.3g}"


transformers = pytest.importorskip("transformers")
from test_transformers import llama_in_input_dtype  # noqa: E402,F401 - RMSNorm and rotary in float64, not float32

VOCAB, SEQ, BATCH = 64, 8, 2


def tiny_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)  # dropout 0.1
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double().train()


def tiny_llama():
    """LLaMA's configs default to attention_dropout=0.0. Its "eager" attention computes the softmax in
    float32 even in a float64 model: the default "sdpa" it is."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                      attention_dropout=0.1, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().train()


def token_batches(classes=None):
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(3)]
    return [(i, torch.randint(0, classes, (BATCH,), generator=g) if classes else i.clone()) for i in ids]


def bert_loss(out, labels):
    return nn.functional.cross_entropy(out.logits, labels)


def llama_loss(out, labels):
    logits = out.logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def test_bert_with_its_default_dropout_trains_like_pytorch_with_the_same_masks(monkeypatch):
    """Embeddings, attention probabilities, hidden states and the classifier: 2 + 2 x 3 sites."""
    program = assert_parity(tiny_bert(), token_batches(classes=3), bert_loss, pe.optim.AdamW(lr=1e-3), monkeypatch,
                            sites=8)
    assert "rng.seed" in program.optimizer_state_dict()


def test_llama_with_attention_dropout_trains_like_pytorch_with_the_same_masks(
        monkeypatch, llama_in_input_dtype):  # noqa: F811 - the pytest fixture imported above
    assert_parity(tiny_llama(), token_batches(), llama_loss, pe.optim.SGD(lr=0.1), monkeypatch, sites=2, seed=9)


# ------------------------------------------------------------------ stochastic depth


class StochasticDepthNet(nn.Module):
    """Residual blocks dropped per sample, as torchvision's stochastic_depth (bernoulli_ on an
    empty tensor) and timm's drop_path (floor(keep + rand)) write it."""

    def __init__(self, p=0.3):
        super().__init__()
        self.p = p
        self.stem, self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x)
        keep = 1 - self.p
        h = h + self.a(h) * h.new_empty((h.shape[0], 1)).bernoulli_(keep).div_(keep)  # torchvision
        r = keep + torch.rand((h.shape[0], 1), dtype=h.dtype, device=h.device)  # timm
        h = h + self.b(h).div(keep) * r.floor_()
        return self.head(h)


def test_stochastic_depth_draws_from_the_step_generator():
    """Sites 0 (bernoulli_) and 1 (rand), per sample; the reference is computed from the numpy twin."""
    torch.manual_seed(0)
    model = StochasticDepthNet().double().train()
    batches = float64_batches((6, 8), 3)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1), seed=11)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]

    opt = pe.optim.SGD(lr=0.1).to_torch(model.parameters())
    theirs = []
    for step, (x, y) in enumerate(batches):
        keep = 1 - model.p
        first = torch.from_numpy(bernoulli(11, step, 0, (6, 1), keep, "float64"))
        second = torch.from_numpy(uniform(11, step, 1, (6, 1), "float64"))
        h = model.stem(x)
        h = h + model.a(h) * first.div(keep)
        h = h + model.b(h).div(keep) * (keep + second).floor()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model.head(h), y)
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=PARITY_TOL)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= PARITY_TOL, f"{where} differs from PyTorch by {worst:.3g}"


class GaussianNoise(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


def test_a_random_op_without_a_conversion_is_refused_naming_the_module():
    model = nn.Sequential(nn.Linear(4, 4), GaussianNoise(), nn.Linear(4, 2))
    job = pe.TrainingJob(model, (torch.randn(3, 4),), torch.randint(0, 2, (3,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1))
    with pytest.raises(UnsupportedOpError) as caught:
        pe.compile(job, target=FAST_HOST)
    message = str(caught.value)
    assert "aten.randn_like.default in module 1 (GaussianNoise)" in message and "eval mode" in message


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.5, "0", True])
def test_the_seed_is_validated(seed):
    with pytest.raises(JobError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        pe.TrainingJob(DropoutMLP(), (torch.randn(2, 16),), torch.randint(0, 5, (2,)), "cross_entropy",
                       pe.optim.SGD(lr=0.1), seed=seed)


# ------------------------------------------------------------------ other targets


def test_dropout_mlp_on_cortex_m4_trains_like_the_host_build(tmp_path):
    """TVM's C kernels (uint64 arithmetic on a 32-bit core) under QEMU: the host build's losses and state."""
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed")
    from pockengine.artifact_files import PROJECT
    from pockengine.targets import cortex_m, resolve

    torch.manual_seed(0)
    model = DropoutMLP(p=0.25).train()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    job = pe.TrainingJob(model, (batches[0][0],), batches[0][1], "cross_entropy", pe.optim.SGD(lr=0.1), seed=3)
    program = pe.compile(job, target="cortex-m4")
    program.export(str(tmp_path / "m4"))
    project = str(tmp_path / "m4" / PROJECT)
    cortex_m.project.write_batches(project, program.signature, [[x.numpy(), y.numpy()] for x, y in batches])
    run = cortex_m.run(project, resolve("cortex-m4"), len(batches), program.signature)
    host = pe.compile(job, target=FAST_HOST)
    np.testing.assert_allclose(run.losses, [host.step(x, y) for x, y in batches], rtol=1e-5)
    trained = {k: v for k, v in run.state.items() if k in host.state_dict()}
    worst, where = max_scaled_diff(trained, {k: host.state_dict()[k] for k in trained})
    assert trained and worst <= 1e-5, f"{where} differs from the host build by {worst:.3g}"


def test_dropout_mlp_builds_for_aarch64(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed")
    job = pe.TrainingJob(DropoutMLP(), (torch.randn(4, 16),), torch.randint(0, 5, (4,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1))
    out = pe.compile(job, target="rpi4").export(str(tmp_path / "rpi4"))
    assert open(os.path.join(out, "train_step.so"), "rb").read()[18:20] == (183).to_bytes(2, "little"), "not AArch64"
    assert "rng.seed" in pe.load(out).optimizer_state_dict()
