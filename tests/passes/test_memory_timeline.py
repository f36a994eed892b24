"""The per-operator memory timeline: state is constant, saved activations peak where the backward
starts, a sparse scheme keeps less, and the report draws both as a PNG."""

import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST
from pockengine.analysis.memory_timeline import Timeline, state_bytes, timeline
from pockengine.autodiff.step import build_train_step


def job(scheme=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return pe.TrainingJob(model, (torch.randn(32, 64),), torch.randint(0, 10, (32,)), "cross_entropy",
                          pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=scheme)


def step_timeline(scheme=None):
    j = job(scheme)
    imported = j.import_model()
    mod, signature, _ = build_train_step(imported, j.optimizer, j.plan(imported))
    return timeline(mod["train_step"], signature), signature


def test_timeline_categories_and_peak():
    t, signature = step_timeline()
    n = len(t.ops)
    assert all(len(v) == n for v in t.bytes.values())
    params = sum(s.nbytes for s in signature.state if signature.categories[s.name] in ("param", "frozen_param"))
    assert set(t.bytes["parameters"]) == {params}
    saved = t.bytes["saved_activations"]
    assert max(saved) == saved[t.backward_start - 1] > 0  # everything saved is alive when the backward starts
    # Only the float32 loss and the batch check's bool outlive the backward, up to the step's final
    # check (guards.py), which returns the loss (or NaN) as a value of its own.
    assert t.ops[-2] == "call_tir" and saved[-2] == 4 + 1 and saved[-1] == 0
    assert max(t.bytes["forward_workspace"][t.backward_start:], default=0) == 0
    assert max(t.bytes["updates"][: t.backward_start]) == 0 and t.bytes["updates"][-1] > 0
    assert t.peak()[0] >= params + max(saved)
    assert Timeline.from_json(t.to_json()) == t


def test_sparse_scheme_keeps_less_than_full():
    full, _ = step_timeline()
    head, _ = step_timeline(pe.SparseUpdate({"4": "full"}))
    assert max(head.bytes["saved_activations"]) < max(full.bytes["saved_activations"])
    assert head.peak()[0] < full.peak()[0]


def test_report_plots_this_step_against_full_update(tmp_path):
    report = pe.compile(job(pe.SparseUpdate.bias_only()), target=FAST_HOST).memory_report()
    assert set(report.timelines) == {"this step", "full update"}
    path = report.plot(str(tmp_path / "memory.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fused_elementwise_chains_count_one_tensor():
    """conv -> BatchNorm (eval: subtract, multiply, multiply, add) -> ReLU6 in the forward of a frozen
    prefix: unfused, two activations of the chain are alive at once; with `fused_elementwise` the
    chain writes over the conv's output, as its fused kernel does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16).eval(), nn.ReLU6(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 10))
    j = pe.TrainingJob(model, (torch.randn(1, 3, 8, 8),), torch.randint(0, 10, (1,)), "cross_entropy",
                       pe.optim.SGD(lr=0.1), sparse_update={"4.weight": "full"})
    imported = j.import_model()
    mod, signature, _ = build_train_step(imported, j.optimizer, j.plan(imported))
    plain, fused = timeline(mod["train_step"], signature), timeline(mod["train_step"], signature, True)

    def transient(t, i):
        return sum(t.bytes[c][i] for c in ("saved_activations", "forward_workspace", "gradients", "updates"))

    activation = 16 * 8 * 8 * 4
    chain = range(plain.ops.index("nn.conv2d"), plain.ops.index("clip") + 1)
    assert 2 * activation <= max(transient(plain, i) for i in chain) < 2 * activation + 1024
    assert activation <= max(transient(fused, i) for i in chain) < activation + 1024
    assert all(transient(fused, i) <= transient(plain, i) for i in range(len(plain.ops)))  # never more


def test_fused_estimate_leaves_out_what_fusion_never_stores():
    """With `fused_elementwise`, as the kernels will be: the classifier's weight gradient, which only
    its SGD update reads (the update is the gradient kernel's epilogue, written over the weight),
    and that update are no tensors; nor are an int8 activation's float cast and ReLU6 comparisons,
    which only the backward's mask reads. Unfused, the gradient (10x4096 floats) and the update make
    the peak; fused, the estimate follows the arena plan_arena lays out."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 64, 1), nn.ReLU6(), nn.Flatten(),
                        nn.Linear(64 * 8 * 8, 10)).eval()
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    model = pe.quantize.int8(net, calibration)
    j = pe.TrainingJob(model, (calibration[0][:1],), torch.randint(0, 10, (1,)), "cross_entropy",
                       pe.optim.SGD(lr=0.1), sparse_update=pe.SparseUpdate.bias_only() | {"5.weight": "full"})
    imported = j.import_model()
    mod, signature, _ = build_train_step(imported, j.optimizer, j.plan(imported))
    state = sum(state_bytes(signature).values())
    plain = timeline(mod["train_step"], signature).peak()[0] - state
    fused = timeline(mod["train_step"], signature, fused_elementwise=True).peak()[0] - state
    gradient = 10 * 64 * 8 * 8 * 4
    assert plain >= 2 * gradient and fused < gradient
    planned = pe.compile(j, target=FAST_HOST).memory_report().by_category["planned_pool"]
    assert abs(fused - planned) <= 0.1 * planned, (fused, planned)  # measured: 36.0 vs 37.2 KiB
