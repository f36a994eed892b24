"""The torch and ONNX frontends through whole training steps: BatchNorm state, losses, freezing, and
the errors a user gets for what cannot be imported or differentiated."""

import collections
import copy

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, make_batches, max_scaled_diff, parity, train_torch
from pockengine.errors import FrontendError, JobError, LossError, UnsupportedOpError

F64 = 1e-10


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, momentum=0.2)
        self.bn1d = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.bn1d(x.mean((2, 3))))


def test_batchnorm_running_statistics_and_counter_are_state():
    model = BNNet().double().train()
    batches = make_batches((6, 3, 8, 8), 4, 4, dtype=torch.float64)
    program, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.1, momentum=0.9))
    sd = program.state_dict()
    assert list(sd) == list(model.state_dict())  # torch's key order, buffers included
    assert int(sd["bn.num_batches_tracked"]) == 4
    assert not np.allclose(sd["bn.running_var"], 1.0)
    assert worst <= F64, where


def test_batchnorm_in_eval_mode_uses_and_keeps_running_statistics():
    model = BNNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    batches = make_batches((6, 3, 8, 8), 4, 3, dtype=torch.float64)
    program, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.1))
    assert worst <= F64, where
    np.testing.assert_array_equal(program.state_dict()["bn.running_mean"], before["bn.running_mean"].numpy())
    assert int(program.state_dict()["bn.num_batches_tracked"]) == 0


def test_callable_loss_and_mse():
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(0)
    regression = [(torch.randn(7, 5, generator=g, dtype=torch.float64),
                   torch.randn(7, 3, generator=g, dtype=torch.float64))
                  for _ in range(4)]
    _, (worst, _) = parity(model, regression, pe.optim.Adam(lr=1e-2), loss="mse", loss_fn=nn.functional.mse_loss)
    assert worst <= F64
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)
    batches = make_batches((7, 5), 3, 4, dtype=torch.float64)
    _, (worst, _) = parity(model, batches, pe.optim.SGD(lr=0.1), loss=smoothed, loss_fn=smoothed)
    assert worst <= F64


def test_requires_grad_false_parameters_stay_bit_identical_and_are_not_outputs():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    initial = model[0].weight.detach().clone().numpy()
    batches = make_batches((5, 6), 3, 3)
    program, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.1, momentum=0.9))
    assert worst < 1e-6, where
    np.testing.assert_array_equal(program.state_dict()["0.weight"], initial)
    assert "0.weight" not in program.signature.outputs
    assert program.signature.categories["0.weight"] == "frozen_param"


class Atan(nn.Module):
    def __init__(self, freeze_first=False):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)
        if freeze_first:
            self.first.requires_grad_(False)

    def forward(self, x):
        return self.second(torch.atan(self.first(x)))


class PaddedEmbedding(nn.Module):
    """Token embeddings with a padding row (RoBERTa, BART, DistilBERT), optionally tied to the output
    head, plus positions from a bool cumsum (transformers' use_cache=False position ids)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=1)
        self.head = nn.Linear(6, 12, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        positions = (tokens != 1).cumsum(-1)  # int64 in PyTorch, whatever the input's dtype
        h = self.embed(tokens) * (1 + positions.unsqueeze(-1).to(self.embed.weight.dtype) / 8)
        return self.head(h).mean(1)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied to the head"])
def test_embedding_padding_row_gets_no_gradient_from_the_lookup(tied):
    torch.manual_seed(0)
    model = PaddedEmbedding(tied).double()
    with torch.no_grad():
        model.embed.weight[1] = 0.5  # a non-zero padding row: its value is still looked up
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 12, (3, 7), generator=g), torch.randint(0, 12, (3,), generator=g)) for _ in range(3)]
    for tokens, _ in batches:
        tokens[:, -2:] = 1
    before = model.embed.weight[1].detach().clone()
    program, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.5, momentum=0.9))
    assert worst <= F64, where
    trained = program.state_dict()["embed.weight"][1]
    if tied:  # the head's use of the row trains it, the lookup's does not
        assert not np.allclose(trained, before.numpy())
    else:
        np.testing.assert_array_equal(trained, before.numpy())


def test_op_without_gradient_rule_names_op_module_and_line():
    job = pe.TrainingJob(Atan(), (torch.randn(3, 4),), torch.tensor([0, 1, 0]), "cross_entropy", pe.optim.SGD(lr=0.1))
    with pytest.raises(UnsupportedOpError) as e:
        pe.compile(job)
    text = str(e.value)
    assert "relax.atan" in text and "aten.atan.default" in text
    assert f"test_frontend.py:{Atan.forward.__code__.co_firstlineno + 1}" in text
    assert "freeze the parameters before" in text


def test_op_without_gradient_rule_is_fine_in_a_frozen_prefix():
    model = Atan(freeze_first=True)
    batches = make_batches((3, 4), 2, 3)
    program, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.1))
    assert worst < 1e-6, where
    # A full update of this model is impossible (atan), so the report has no full-update timeline.
    assert set(program.memory_report().timelines) == {"this step"}


def test_op_the_importer_does_not_know_is_named():
    class Digamma(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.digamma(x.abs() + 1))

    job = pe.TrainingJob(Digamma(), (torch.randn(2, 3),), torch.tensor([0, 1]), "cross_entropy", pe.optim.SGD())
    with pytest.raises(UnsupportedOpError,
                       match=r"(?s)no conversion for 1 operator.*aten.digamma.default at test_frontend.py"):
        pe.compile(job)


class GridSamples(nn.Module):
    """F.grid_sample in every interpolation mode and every padding mode, each with both
    align_corners, on the input (or, with trained_before, on a trained convolution's output),
    sampling partly outside [-1, 1]. Every pair of modes but bicubic with reflection padding: that
    one kernel takes TVM ~15 s to compile (simplifying 16 reflected taps), more than the other 17
    combinations together; all 18 were within 1e-10 of PyTorch when the converter landed."""

    MODES = [(mode, padding, (i + j) % 2 == 1) for i, mode in enumerate(("bilinear", "nearest", "bicubic"))
             for j, padding in enumerate(("zeros", "border", "reflection"))
             if (mode, padding) != ("bicubic", "reflection")]

    def __init__(self, trained_before=False):
        super().__init__()
        self.before = nn.Conv2d(2, 2, 1) if trained_before else None
        g = torch.Generator().manual_seed(1)
        theta = torch.tensor([[[1.1, 0.2, 0.05], [-0.1, 0.9, 0.1]]]).repeat(2, 1, 1)
        self.register_buffer("grid", torch.nn.functional.affine_grid(theta, (2, 2, 5, 6), align_corners=False)
                             * 1.3 + 0.01 * torch.randn(2, 5, 6, 2, generator=g))
        self.head = nn.Linear(len(self.MODES) * 2 * 5 * 6, 3)

    def forward(self, x):
        if self.before is not None:
            x = self.before(x)
        grid = self.grid.to(x.dtype)
        outs = [torch.nn.functional.grid_sample(x, grid, mode=m, padding_mode=p, align_corners=a)
                for m, p, a in self.MODES]
        return self.head(torch.cat(outs, 1).flatten(1))


def test_grid_sample_trains_like_pytorch_in_every_mode():
    """TVM's importer gave F.grid_sample's output the wrong shape (an internal error): the grid is
    [N, H, W, 2] in PyTorch and [N, 2, H, W] in Relax. In every mode the step trains like PyTorch's."""
    model = GridSamples().double()
    batches = [(torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.tensor([0, 2])) for _ in range(3)]
    _, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.1, momentum=0.9))
    assert worst < 1e-10, where


def test_grid_sample_on_the_gradient_path_names_the_op():
    job = pe.TrainingJob(GridSamples(trained_before=True), (torch.randn(2, 2, 7, 8),), torch.tensor([0, 2]),
                         "cross_entropy", pe.optim.SGD(lr=0.1))
    with pytest.raises(UnsupportedOpError, match=r"(?s)relax.image.grid_sample.*grid_sampler_2d"):
        pe.compile(job, target=FAST_HOST)


class Interpolations(nn.Module):
    """F.interpolate in the modes people use, after a trained conv (the gradient flows through each)."""

    MODES = [dict(size=(7, 9), mode="bilinear"), dict(size=(7, 9), mode="bilinear", align_corners=True),
             dict(scale_factor=1.5, mode="bilinear"), dict(size=(3, 4), mode="bilinear"),
             dict(size=(7, 9), mode="nearest"), dict(scale_factor=2, mode="nearest"),
             dict(size=(7, 9), mode="nearest-exact"), dict(size=(7, 9), mode="bicubic")]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(len(self.MODES) * 2, 3)

    def forward(self, x):
        x = self.conv(x)
        outs = [(torch.nn.functional.interpolate(x, **kw) ** 2).mean((2, 3)) for kw in self.MODES]
        return self.head(torch.cat(outs, 1))


def test_interpolation_trains_like_pytorch_in_every_mode():
    """TVM's importer maps F.interpolate to image.resize2d with another arithmetic than PyTorch's:
    'nearest' rounded half-pixel coordinates (PyTorch floors), a scale_factor's 1/scale was ignored
    (1.5 on a 5-pixel axis reads other pixels), the source coordinates were float32. The import now
    takes PyTorch's own decomposition (which needed integer clamps with one bound: TVM's converter
    made them +-inf, an internal error). float64, 1e-10."""
    model = Interpolations().double()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 2, 4, 5, dtype=torch.float64, generator=g), torch.tensor([0, 2])) for _ in range(3)]
    _, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.1, momentum=0.9))
    assert worst < 1e-10, where


def test_bilinear_upsampling_keeps_nothing_of_the_outputs_size_for_the_backward():
    """F.interpolate's decomposition gathers four corners of the output's size; the gradient of
    each gather (take) read only its input's shape, yet kept the tensor alive into the backward:
    the gathered corners and the upsampled conv output were saved activations. Only the conv's
    input is now (the weight gradient's)."""
    from pockengine.analysis.memory_plan import saved_activations
    from pockengine.build import derive

    class Upsampled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

        def forward(self, x):
            up = torch.nn.functional.interpolate(self.conv(x), size=(16, 16), mode="bilinear", align_corners=False)
            return self.head(up.mean((2, 3)))

    x = torch.randn(2, 4, 8, 8)
    job = pe.TrainingJob(Upsampled(), (x,), torch.tensor([0, 2]), "cross_entropy", pe.optim.SGD(lr=0.1))
    saved = saved_activations(derive(job).step_mod["train_step"])
    assert max(saved.values()) <= x.numel() * 4 and sum(saved.values()) < 2 * x.numel() * 4, sorted(saved.values())


def test_antialiased_interpolation_is_refused_naming_the_fix():
    class Shrink(nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=(2, 2), mode="bilinear", antialias=True).flatten(1)

    job = pe.TrainingJob(nn.Sequential(nn.Conv2d(2, 2, 1), Shrink(), nn.Linear(8, 3)), (torch.randn(2, 2, 5, 5),),
                         torch.tensor([0, 2]), "cross_entropy", pe.optim.SGD(lr=0.1))
    with pytest.raises(UnsupportedOpError, match=r"antialias=True\) at .* Fix: antialias=False"):
        pe.compile(job, target=FAST_HOST)


def test_loss_errors():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(LossError, match=r"shape \(4, 2\), not a scalar"):
        pe.compile(pe.TrainingJob(model, (x,), y, lambda o, t: (o - t) ** 2, pe.optim.SGD()))
    with pytest.raises(LossError, match="unknown loss 'hinge'"):
        pe.compile(pe.TrainingJob(model, (x,), y, "hinge", pe.optim.SGD()))


def test_unexportable_model_is_a_frontend_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow
                return self.fc(x)
            return -self.fc(x)

    job = pe.TrainingJob(DataDependent(), (torch.randn(2, 3),), torch.tensor([0, 1]), "cross_entropy", pe.optim.SGD())
    with pytest.raises(FrontendError, match="torch.export could not capture"):
        pe.compile(job)


def test_job_validation():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(JobError, match="use pockengine.optim.SGD"):
        pe.TrainingJob(model, (x,), y, "cross_entropy", torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(JobError, match="must be a torch.nn.Module or an ONNX model"):
        pe.TrainingJob(lambda x: x, (x,), y, "cross_entropy", pe.optim.SGD())
    with pytest.raises(JobError, match=r"example_inputs\[0\] must be a torch.Tensor"):
        pe.TrainingJob(model, (x.numpy(),), y, "cross_entropy", pe.optim.SGD())


def export_onnx(model, x, path):
    torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], training=torch.onnx.TrainingMode.TRAINING)


def test_onnx_mlp_trains_like_torch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = make_batches((5, 6), 4, 4)
    path = str(tmp_path / "mlp.onnx")
    export_onnx(model, batches[0][0], path)
    job = pe.TrainingJob(path, (batches[0][0],), batches[0][1], "cross_entropy", pe.optim.SGD(lr=0.1, momentum=0.9))
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    theirs = train_torch(model, pe.optim.SGD(lr=0.1, momentum=0.9), batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst < 1e-5, where


def test_onnx_batchnorm_in_training_mode_is_refused_not_silently_wrong(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    path = str(tmp_path / "bn.onnx")
    export_onnx(model, x, path)
    job = pe.TrainingJob(path, (x,), torch.tensor([0, 1]), "cross_entropy", pe.optim.SGD())
    with pytest.raises(UnsupportedOpError, match="ONNX BatchNormalization node .* is in training mode"):
        pe.compile(job)
    with pytest.raises(LossError, match="named loss"):
        pe.compile(pe.TrainingJob(path, (x,), torch.tensor([0, 1]), lambda o, t: o.sum(), pe.optim.SGD()))


def test_an_internal_failure_is_reported_as_a_bug_naming_the_stage_and_the_op(monkeypatch):
    """A TVM check failing inside the pipeline (here: forced in lowering) reaches the user as an
    InternalCompilerError naming the stage and the model's operation, with TVM's error chained."""
    import tvm

    from pockengine import pipeline
    from pockengine.errors import InternalCompilerError

    @tvm.transform.module_pass(opt_level=0)
    def failing(mod, _ctx):
        raise tvm.error.InternalError("Check failed: (t.MatchesCode(kDLFloat)) in kernel fused_cumsum_add")

    monkeypatch.setattr(pipeline, "schedule_passes", lambda lowering, preset, target, notes: [failing])

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.cumsum(-1))

    job = pe.TrainingJob(Positions(), (torch.randn(2, 4),), torch.randint(0, 3, (2,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1))
    with pytest.raises(InternalCompilerError) as caught:
        pe.compile(job, target=FAST_HOST)
    message = str(caught.value)
    assert "lower stage" in message and "aten.cumsum" in message and "report" in message
    assert isinstance(caught.value.__cause__, tvm.error.InternalError)


class _DetachedBranch(nn.Module):
    """A stop-gradient branch beside a trained one (target networks, BYOL, straight-through tricks)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).detach()) + self.b(self.a(x))


class _NoGradFeatures(nn.Module):
    """Features computed under torch.no_grad(): the layers before train in PyTorch never."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.relu(self.a(x))
        return self.b(h)


@pytest.mark.parametrize("make", [_DetachedBranch, _NoGradFeatures], ids=["detach", "no_grad block"])
def test_no_gradient_flows_through_detach_or_a_no_grad_block(make):
    """Decomposition turns detach into an alias and inlines no_grad blocks: both used to train the
    layers before them (2e-2 off PyTorch after 2 steps)."""
    torch.manual_seed(0)
    model = make().double()
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(2)]
    program, (worst, where) = parity(model, batches, pe.optim.SGD(lr=0.1))
    assert worst <= 1e-12, f"{where} is {worst:.3g} off PyTorch"
    if make is _NoGradFeatures:  # no gradient reaches `a` at all: it stays as it was
        np.testing.assert_array_equal(program.state_dict()["a.weight"], before["a.weight"].numpy())


class _LiftedValues(nn.Module):
    """Values torch.export lifts out of the graph in every way it can: parameters, a persistent and a
    non-persistent buffer, a plain tensor attribute (a lifted constant); and a Python float, which
    is a literal of the graph."""

    def __init__(self, factor, offset):
        super().__init__()
        self.fc = nn.Linear(6, 3).double()
        self.register_buffer("shift", torch.full((6,), offset, dtype=torch.float64))
        self.register_buffer("gain", torch.full((6,), 1.0 + offset, dtype=torch.float64), persistent=False)
        self.table = torch.linspace(-1, 1, 6, dtype=torch.float64) * offset
        self.factor = factor

    def forward(self, x):
        return self.fc((x + self.shift) * self.gain + self.table) * self.factor


class _Renamed(_LiftedValues):
    """The same computation under another module path."""

    def __init__(self, factor, offset):
        super().__init__(factor, offset)
        self.head = self.fc
        del self.fc

    def forward(self, x):
        return self.head((x + self.shift) * self.gain + self.table) * self.factor


def test_one_graph_is_decomposed_once_and_each_model_trains_with_its_own_values(monkeypatch):
    from pockengine.frontend import decompositions

    monkeypatch.setattr(decompositions, "_decomposed", collections.OrderedDict())
    decomposed = []
    run = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda ep, *args, **kwargs: decomposed.append(ep) or run(ep, *args, **kwargs))
    batches = make_batches((5, 6), 3, 3, dtype=torch.float64)
    for seed, offset in [(0, 0.5), (1, -2.0)]:  # other weights, buffers and constants: the same graph
        torch.manual_seed(seed)
        _, (worst, where) = parity(_LiftedValues(2.0, offset), batches, pe.optim.SGD(lr=0.1, momentum=0.9))
        assert worst < F64, where
    assert len(decomposed) == 1

    # Another literal, another batch shape: other graphs, decomposed for themselves.
    _, (worst, where) = parity(_LiftedValues(3.0, 0.5), batches, pe.optim.SGD(lr=0.1))
    assert worst < F64 and len(decomposed) == 2
    _, (worst, where) = parity(_LiftedValues(2.0, 0.5), make_batches((4, 6), 3, 2, dtype=torch.float64),
                               pe.optim.SGD(lr=0.1))
    assert worst < F64 and len(decomposed) == 3

    # The same computation in another module: errors and reports name its own modules.
    from pockengine.frontend.torch import import_torch

    x, y = batches[0]
    origins = import_torch(_Renamed(2.0, 0.5), (x,), y, "cross_entropy").origin.values()
    assert len(decomposed) == 4
    assert any("head (Linear)" in str(o) for o in origins) and not any("fc (Linear)" in str(o) for o in origins)
