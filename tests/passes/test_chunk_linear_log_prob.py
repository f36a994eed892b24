"""fuse_linear_log_prob + chunk_linear_log_prob: a vocabulary head's cross-entropy trains like
`F.cross_entropy` (float64, ignore_index, causal shift, tied and untied heads, trained and frozen),
in chunks with a remainder, and the whole `tokens x vocabulary` logits never exist in the step."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff, train_torch
from pockengine import pipeline
from pockengine.autodiff.linear_log_prob import GRAD_OP_NAME, OP_NAME
from pockengine.ir import op_name, static_shape
from pockengine.passes import chunk_linear_log_prob as chunking
from pockengine.passes.chunk_linear_log_prob import chunk_bounds

VOCAB, HIDDEN, BATCH, SEQ = 2500, 12, 2, 40  # 78 label rows, padded to 80: five chunks of 16
IGNORE = -100


class TinyLM(nn.Module):
    """Embedding, one mixing layer, a bias-free vocabulary head (tied to the embedding, or not)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def causal_lm_loss(logits, labels):
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def squared_loss(logits, labels):
    """A loss whose gradient depends on the label log-probabilities: forward and backward cannot
    share the chunks' logits."""
    return causal_lm_loss(logits, labels) ** 2


def batches(steps=3):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[:, :5] = IGNORE  # prompt positions
        labels[1, 1] = VOCAB - 1  # the last class
        out.append((ids, labels))
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunking, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(chunking, "CHUNK_LOGITS_BYTES", 1)


def derived_step(job):
    imported = pipeline.import_model(job)
    return pipeline.derive_step(imported, job.optimizer, job.plan(imported))[0]["train_step"]


def bindings(func):
    return [b for block in func.body.blocks for b in block.bindings]


def test_chunk_bounds_split_rows_evenly_in_multiples_of_the_register_tile():
    assert chunk_bounds(256, 49152, 4) == [(0, 128), (128, 256)]  # SmolLM, 1 x 256 tokens, padded
    assert chunk_bounds(1024, 8192, 4) == [(0, 512), (512, 1024)]  # 16 MiB of logits each
    assert chunk_bounds(1024, 151936, 4) == [(i, i + 128) for i in range(0, 1024, 128)]  # at least 128 rows
    assert chunk_bounds(30, 151936, 4) == [(0, 30)]
    assert len(chunk_bounds(8 * 4096, 49152, 4)) == chunking.MAX_CHUNKS
    for rows in (1, 7, 64, 65, 1000, 4095):
        bounds = chunk_bounds(rows, 32000, 4)
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("tied, scheme, loss", [
    (True, None, causal_lm_loss),  # the tied embedding trains through both uses
    (False, None, causal_lm_loss),
    (True, "head frozen", causal_lm_loss),  # only the input gradient is formed
    (False, None, squared_loss),  # forward and backward computed apart
])
def test_trains_like_cross_entropy_in_float64(tied, scheme, loss, small_chunks):
    torch.manual_seed(0)
    model = TinyLM(tied).double()
    sparse = pe.SparseUpdate({"mix.*": "full"}) if scheme else None
    data = batches()
    job = pe.TrainingJob(copy.deepcopy(model), (data[0][0],), data[0][1], loss, pe.optim.SGD(lr=0.5, momentum=0.9),
                         sparse_update=sparse)
    step = derived_step(job)
    ops = [op_name(b.value) for b in bindings(step)]
    assert OP_NAME not in ops and GRAD_OP_NAME not in ops  # expanded into chunks
    logits = [static_shape(b.var) for b in bindings(step)
              if op_name(b.value) == "relax.matmul" and static_shape(b.var)[-1] == VOCAB]
    assert all(shape == [16, VOCAB] for shape in logits)  # never all 78 rows at once
    assert len(logits) == (10 if loss is squared_loss else 5)  # recomputed by the backward, or once
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in data]
    if sparse is not None:
        pe.sparse.apply_to_torch(model, program.plan)
    theirs = train_torch(model, pe.optim.SGD(lr=0.5, momentum=0.9), data, loss_fn=loss)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict(), floor=1e-2)
    assert worst < 1e-10, f"{where} is {worst:.3g} off PyTorch"


def test_logits_memory_is_one_chunk(small_chunks, monkeypatch):
    """The planned peak shrinks by at least twice the logits' bytes: of the logits, their
    log-softmax and their gradient, one chunk's stay (measured: 2.6x)."""
    from pockengine.passes import fuse_linear_log_prob

    model = TinyLM(tied=True)
    data = batches(1)

    def planned():
        job = pe.TrainingJob(copy.deepcopy(model), (data[0][0],), data[0][1], causal_lm_loss, pe.optim.SGD())
        return pe.compile(job, target=FAST_HOST).memory_report()

    fused = planned()
    monkeypatch.setattr(fuse_linear_log_prob, "MIN_CLASSES", VOCAB + 1)
    plain = planned()
    logits_bytes = BATCH * (SEQ - 1) * VOCAB * 4
    assert plain.peak_bytes - fused.peak_bytes >= 2 * logits_bytes, (plain.by_category, fused.by_category)


def test_label_smoothing_keeps_the_unfused_loss():
    """log_softmax has a second use (the smoothing's sum over classes): the loss is left as imported
    (its gradient rules are audited on their own)."""
    def smoothed(logits, labels):
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), label_smoothing=0.1)

    model = TinyLM(tied=False).double()
    data = batches(2)
    job = pe.TrainingJob(copy.deepcopy(model), (data[0][0],), data[0][1].clamp(min=0), smoothed, pe.optim.SGD(lr=0.5))
    assert OP_NAME not in [op_name(b.value) for b in bindings(derived_step(job))]


def test_labels_out_of_the_vocabulary_are_refused_before_any_state_changes(small_chunks):
    model = TinyLM(tied=True)
    data = batches(1)
    job = pe.TrainingJob(copy.deepcopy(model), (data[0][0],), data[0][1], causal_lm_loss, pe.optim.SGD())
    program = pe.compile(job, target=FAST_HOST)
    ranges = {(r.input, r.size, r.ignored) for r in program.signature.index_ranges}
    assert ("target", VOCAB, (IGNORE,)) in ranges
    ids, labels = data[0]
    bad = labels.clone()
    bad[1, 7] = VOCAB
    before = {k: v.copy() for k, v in program.state_dict().items()}
    with pytest.raises(pe.errors.InputError, match=rf"input target: {VOCAB} \(at index \(1, 7\)\).*\[0, {VOCAB}\)"):
        program.step(ids, bad)
    assert all(np.array_equal(v, before[k]) for k, v in program.state_dict().items())
