"""The memory report: categories add up, per-layer rows reflect what is trained, and freezing a prefix
shrinks what the backward keeps."""

import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST
from pockengine.analysis.memory_plan import MemoryReport


def net(freeze_first=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    if freeze_first:
        model[0].requires_grad_(False)
        model[2].requires_grad_(False)
    return model


def report(model, optimizer):
    job = pe.TrainingJob(model, (torch.randn(16, 64),), torch.randint(0, 10, (16,)), "cross_entropy", optimizer)
    return pe.compile(job, target=FAST_HOST).memory_report()


def test_categories_add_up_and_rows_follow_the_model():
    r = report(net(), pe.optim.SGD(lr=0.1, momentum=0.9))
    param_bytes = sum(p.numel() * 4 for p in net().parameters())
    assert r.peak_bytes == sum(r.by_category.values())
    assert r.by_category["parameters"] == param_bytes
    assert r.by_category["optimizer_state"] == param_bytes + 16  # momentum buffers + lr + step
    assert r.by_category["new_state"] == 4  # the loss: parameters and momenta are updated in place
    assert r.gradient_bytes == param_bytes
    assert [row.layer for row in r.layers if row.param_bytes] == ["0", "2", "4"]
    assert all(row.grad_bytes == row.param_bytes == row.optimizer_bytes for row in r.layers if row.param_bytes)


def test_frozen_prefix_needs_no_gradients_optimizer_state_or_saved_input():
    full = report(net(), pe.optim.Adam())
    sparse = report(net(freeze_first=True), pe.optim.Adam())
    rows = {row.layer: row for row in sparse.layers}
    assert rows["0"].trained == "frozen" and rows["0"].grad_bytes == 0 and rows["0"].optimizer_bytes == 0
    assert rows["4"].trained == "full" and rows["4"].optimizer_bytes == 2 * rows["4"].param_bytes
    assert sparse.saved_activation_bytes < full.saved_activation_bytes
    assert sparse.by_category["planned_pool"] < full.by_category["planned_pool"]
    assert sparse.peak_bytes < full.peak_bytes


def test_report_prints_a_table_and_round_trips():
    r = report(net(), pe.optim.SGD(lr=0.1))
    text = str(r)
    assert text.startswith("planned peak:") and "saved act" in text and "\n0 " in text
    again = MemoryReport.from_json(r.to_json())
    assert again == r
