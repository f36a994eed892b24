"""The sparse-update search (pockengine/sparse_search.py): its contribution runs train as the
candidate's own sparse build does (float64), its memory is a real build's plan, its choice is the
hand-checkable optimum, and its result is an ordinary scheme that saves, loads and builds."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff
from pockengine import sparse_search
from pockengine.build import memory_plan
from pockengine.errors import InputError, JobError
from pockengine.sparse_search import Choice, Point, parse_budget

BATCH, CLASSES = 16, 4


class TinyCNN(nn.Module):
    """Three convs (a depthwise one among them) and a classifier: four 'convs' in MCUNetV3's count."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def batches(count, seed):
    """A learnable task: the class is which quadrant of the 8x8 image is bright."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        x = torch.randn(BATCH, 1, 8, 8, generator=g) * 0.5
        for i, c in enumerate(y.tolist()):
            x[i, 0, 4 * (c // 2):4 * (c // 2) + 4, 4 * (c % 2):4 * (c % 2) + 4] += 1.5
        out.append((x, y))
    return out


def make_job(dtype=torch.float32, scheme=None):
    torch.manual_seed(0)
    data = batches(1, 0)
    model = TinyCNN().to(dtype)
    return pe.TrainingJob(model, (data[0][0].to(dtype),), data[0][1], "cross_entropy",
                          pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=scheme)


@pytest.mark.parametrize("text, expected", [("256KB", 256 * 1024), ("256 KiB", 256 * 1024), ("1.5MB", 1536 * 1024),
                                            ("1000", 1000), (4096, 4096), ("2 MiB", 2 << 20)])
def test_budgets_read_as_devices_mean_them(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "0", "-5KB", "12 parsecs", True, 0])
def test_a_budget_that_is_not_a_size_is_refused(text):
    with pytest.raises(InputError, match="budget"):
        parse_budget(text)


def _unit(label, memory, metric, depth=1, weights=()):
    return Point(label, Choice(depth, weights + ((9, 1.0),)), metric=metric, memory=memory)


def test_the_front_finds_a_pair_that_beats_the_best_single_layer():
    """Two weights each buying 0.10 for 10 KiB beat one buying 0.15 for 20 KiB at a 20 KiB budget;
    the bias depths add their own contribution and memory."""
    kib = 1024
    baseline = _unit("base", 100 * kib, 0.5)
    bias = [_unit("bias 3", 105 * kib, 0.52, depth=3)]
    weights = {1: {0.5: _unit("w1", 110 * kib, 0.60, weights=((1, 0.5),))},
               2: {0.5: _unit("w2", 110 * kib, 0.60, weights=((2, 0.5),))},
               3: {1.0: _unit("w3", 120 * kib, 0.65, weights=((3, 1.0),))}}
    front = sparse_search._pareto_front(baseline, bias, weights, head=9)
    best = max((p for p in front if p.estimated_memory <= 120 * kib), key=lambda p: p.estimated_metric)
    assert best.choice == Choice(1, ((1, 0.5), (2, 0.5), (9, 1.0)))
    assert best.estimated_metric == pytest.approx(0.7) and best.estimated_memory == 120 * kib
    # 5 KiB more buys the bias depth on top
    best = max((p for p in front if p.estimated_memory <= 125 * kib), key=lambda p: p.estimated_metric)
    assert best.choice == Choice(3, ((1, 0.5), (2, 0.5), (9, 1.0)))
    # no point of the front is beaten by another in both memory and metric
    for a in front:
        assert not any(b.estimated_memory <= a.estimated_memory and b.estimated_metric > a.estimated_metric
                       for b in front)


def test_contribution_runs_train_as_the_candidates_own_sparse_build():
    """One build trains everything; a run of a scheme puts back what the scheme does not train after
    each step. In float64 that is the scheme's own build, channel ratio included (1e-10)."""
    data = [(x.double(), y) for x, y in batches(3, 1)]
    scheme = pe.SparseUpdate.mcunetv3(3, [1, 2, 3], [0.5, 0.25, 1])
    job = make_job(torch.float64)
    full = pe.compile(sparse_search._with_scheme(job, pe.SparseUpdate.full()), FAST_HOST)
    runner = sparse_search._Runner(full, job.model, data, data, 3, lambda _model, _data: 0.0)
    sparse_job = make_job(torch.float64, scheme)
    runner.run(sparse_job.plan(sparse_job.import_model()))
    own = pe.compile(sparse_job, FAST_HOST)
    for x, y in data:
        own.step(x, y)
    worst, where = max_scaled_diff(full.state_dict(), own.state_dict(), floor=1e-2)
    assert worst < 1e-10, f"{where} is {worst:.3g} off the scheme's own build"
    assert not np.array_equal(full.state_dict()["features.3.weight"], job.model.state_dict()["features.3.weight"])


@pytest.mark.parametrize("scheme", [pe.SparseUpdate.mcunetv3(2, [2, 3], [0.5, 1]), pe.SparseUpdate.bias_only()])
def test_the_planned_memory_is_the_builds(scheme):
    job = make_job(scheme=scheme)
    assert memory_plan(job, FAST_HOST).peak_bytes == pe.compile(job, FAST_HOST).memory_report().peak_bytes


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A search at a budget between the classifier alone and full fine-tuning."""
    job = make_job()
    options = dict(data=batches(4, 2), eval_data=batches(4, 3), target=FAST_HOST, weight_layers=2, ratios=(0.5, 1),
                   progress=False)
    baseline = sparse_search.training_memory(memory_plan(sparse_search._with_scheme(
        job, pe.SparseUpdate.mcunetv3(1, [3], [1])), FAST_HOST))
    full = sparse_search.training_memory(memory_plan(sparse_search._with_scheme(job, pe.SparseUpdate.full()),
                                                     FAST_HOST))
    return job, options, baseline, full, pe.search_sparse_update(job, (baseline + full) // 2, **options)


@pytest.fixture(scope="module")
def analysis(searched):
    job, options, *_ = searched
    return pe.analyze_sparse_update(job, **options)


def test_the_search_picks_the_best_front_point_whose_real_plan_fits(searched):
    job, _, baseline, full, result = searched
    assert baseline < result.budget < full
    assert result.chosen.memory <= result.budget
    assert result.chosen.memory == sparse_search.training_memory(
        pe.compile(sparse_search._with_scheme(job, result.scheme), FAST_HOST).memory_report())
    # nothing on the front with a better estimate fits: the ones ranked above it were planned and refused
    better = [p for p in result.front if p.estimated_memory <= result.budget
              and p.estimated_metric > result.chosen.estimated_metric]
    assert all(p in result.verified and p.memory > result.budget for p in better)
    # the contributions are measured: the table has every unit, the baseline is the classifier alone
    assert sorted(result.weight_points) == [1, 2] and all(sorted(by) == [0.5, 1.0]
                                                          for by in result.weight_points.values())
    assert result.baseline.choice == Choice(1, ((3, 1.0),))
    assert result.convs == ["features.0.weight", "features.3.weight", "features.6.weight", "classifier.weight"]
    assert 0 <= result.chosen.metric <= 1 and {p.label for p in result.presets} >= {"full", "last 2 layers"}


def test_a_budget_that_admits_one_choice_gets_it(searched, analysis):
    _, _, baseline, _, _ = searched
    result = analysis.choose(baseline)
    assert result.choice == Choice(1, ((3, 1.0),)) and result.chosen.memory == baseline


def test_one_analysis_chooses_at_every_budget_as_the_search_does(searched, analysis):
    _, _, baseline, full, result = searched
    again = analysis.choose((baseline + full) // 2)
    assert again.choice == result.choice and again.chosen.memory == result.chosen.memory
    assert again.chosen.metric == result.chosen.metric  # the same build, the same runs: the same numbers
    largest = analysis.choose(full)
    assert largest.chosen.estimated_metric >= again.chosen.estimated_metric and largest.chosen.memory <= full


def test_a_budget_nothing_fits_says_what_the_smallest_needs(searched, analysis):
    job, options, baseline, _, _ = searched
    with pytest.raises(JobError, match=r"no scheme fits .* the classifier alone plans"):
        analysis.choose(baseline // 2)
    with pytest.raises(InputError, match="budget 'lots'"):  # before any analysis starts
        pe.search_sparse_update(job, "lots", **options)


def test_the_result_saves_loads_and_builds(searched, tmp_path):
    job, _, _, _, result = searched
    path = result.save(str(tmp_path / "search.json"))
    assert json.load(open(path))["chosen"]["memory"] == result.chosen.memory
    scheme = pe.SparseUpdate.load(path)
    assert scheme == result.scheme
    rebuilt = pe.compile(sparse_search._with_scheme(copy.deepcopy(job), scheme), FAST_HOST)
    assert rebuilt.plan == pe.compile(sparse_search._with_scheme(job, result.scheme), FAST_HOST).plan
    assert pe.SparseUpdate.load(scheme.save(str(tmp_path / "scheme.json"))) == scheme
    (tmp_path / "bad.json").write_text(json.dumps({"rules": [], "default": "frozen", "preset": ["magic", 1]}))
    with pytest.raises(JobError, match="unknown preset 'magic'"):
        pe.SparseUpdate.load(str(tmp_path / "bad.json"))
    report = result.report()
    assert "chosen:" in report and "weight features.6.weight" in report and "full" in report
    assert result.plot(str(tmp_path / "search.png")) and (tmp_path / "search.png").stat().st_size > 1000


def test_ratios_that_train_no_channel_or_the_same_channels_are_not_candidates():
    assert sparse_search._distinct_ratios([0.125, 0.25, 0.5, 1.0], (8, 1, 3, 3), "conv") == [1.0]
    assert sparse_search._distinct_ratios([0.125, 0.25, 0.5, 1.0], (16, 3, 1, 1), "conv") == [0.25, 0.5, 1.0]
    assert sparse_search._distinct_ratios([0.125, 0.25, 0.5, 1.0], (8, 1, 3, 3), "depthwise") == [0.125, 0.25, 0.5,
                                                                                                  1.0]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"data": []}, InputError, "data has no batch"),
    ({"data": [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]}, InputError, r"data\[0\] has shapes"),
    ({"steps": 0}, InputError, "steps must be an integer >= 1"),
    ({"ratios": (0.5, 2)}, InputError, r"ratios must be in \(0, 1\]"),
    ({"bias_depths": (9,)}, InputError, "exceeds the model's 4 convs"),
])
def test_bad_arguments_are_refused_before_any_build(kwargs, error, message):
    options = dict(data=batches(1, 2), eval_data=batches(1, 3), target=FAST_HOST, progress=False)
    with pytest.raises(error, match=message):
        pe.search_sparse_update(make_job(), "64KB", **{**options, **kwargs})


def test_a_host_target_needs_a_budget():
    with pytest.raises(InputError, match="no SRAM size"):
        pe.search_sparse_update(make_job(), data=batches(1, 2), eval_data=batches(1, 3), target=FAST_HOST)


def test_plan_sparse_searches_the_examples_scheme_from_the_command_line(tmp_path, capsys):
    """`pockengine plan-sparse` on the transfer example (its train_batches and eval_batches) with a
    budget: the JSON's scheme loads and fits, the plot is written, and an existing file that is not a
    result is left alone."""
    from pockengine.cli import main

    out = tmp_path / "scheme.json"
    argv = ["plan-sparse", "examples/transfer_digits/train.py", "--target", json.dumps(FAST_HOST), "--budget", "3MB",
            "--weight-layers", "1", "--steps", "2", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "SparseUpdate.load" in printed
    saved = json.load(open(out))
    assert saved["chosen"]["memory"] <= 3 << 20 and saved["budget"] == 3 << 20
    assert isinstance(pe.SparseUpdate.load(str(out)), pe.SparseUpdate) and (tmp_path / "scheme.png").exists()
    notes = tmp_path / "notes.json"
    notes.write_text("my notes")
    assert main(argv[:-1] + [str(notes)]) == 2
    assert "not an earlier plan-sparse result" in capsys.readouterr().err and notes.read_text() == "my notes"
