"""Invalid hyper-parameters, losses and example batches are errors when they are given, naming the fix,
never a silently useless step or a raw TVM error."""

import math

import pytest
import torch
from torch import nn

import pockengine as pe
from pockengine.errors import FrontendError, JobError, LossError, OptimizerError, UnsupportedOpError

FAST = {"kind": "llvm", "opt-level": 0}
X, Y = torch.randn(4, 8), torch.randint(0, 4, (4,))


@pytest.mark.parametrize("make", [
    lambda: pe.optim.SGD(lr=math.inf), lambda: pe.optim.SGD(lr=0.1, momentum=math.nan),
    lambda: pe.optim.SGD(lr=None), lambda: pe.optim.SGD(lr=-1.0), lambda: pe.optim.SGD(lr="0.1"),
    lambda: pe.optim.Adam(lr=math.inf), lambda: pe.optim.Adam(betas=(0.9, math.nan)),
    lambda: pe.optim.AdamW(eps=math.inf), lambda: pe.optim.AdamW(weight_decay=math.nan),
], ids=["sgd-lr-inf", "sgd-momentum-nan", "sgd-lr-none", "sgd-lr-negative", "sgd-lr-str", "adam-lr-inf",
        "adam-beta-nan", "adamw-eps-inf", "adamw-decay-nan"])
def test_invalid_hyper_parameters_are_refused(make):
    with pytest.raises(OptimizerError, match="finite|Invalid"):
        make()


def test_program_lr_takes_only_finite_non_negative_numbers():
    program = pe.compile(pe.TrainingJob(nn.Linear(8, 4), (X,), Y, "cross_entropy", pe.optim.SGD(lr=0.1)), FAST)
    for bad in (math.nan, math.inf, -1.0, None, "0.1"):
        with pytest.raises(OptimizerError, match="Invalid learning rate"):
            program.lr = bad
    assert program.lr == pytest.approx(0.1)
    program.lr = 0.0  # frozen for a step: allowed, as in PyTorch
    assert program.lr == 0.0


@pytest.mark.parametrize("loss, match", [("crossentropy", "unknown loss 'crossentropy'"), (3, "loss must be")])
def test_an_unknown_loss_is_refused_by_the_job(loss, match):
    with pytest.raises(LossError, match=match):
        pe.TrainingJob(nn.Linear(8, 4), (X,), Y, loss, pe.optim.SGD(lr=0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_with_the_conversion(dtype):
    with pytest.raises(JobError, match=r"float32 and float64 .*model.float\(\)"):
        pe.TrainingJob(nn.Linear(8, 4).to(dtype), (X.to(dtype),), Y, "cross_entropy", pe.optim.SGD(lr=0.1))


def test_an_empty_example_batch_is_refused():
    with pytest.raises(JobError, match=r"example_inputs\[0\] is empty"):
        pe.TrainingJob(nn.Linear(8, 4), (X[:0],), Y[:0], "cross_entropy", pe.optim.SGD(lr=0.1))


def test_a_loss_that_trains_nothing_is_refused_like_pytorch():
    accuracy = lambda out, target: (out.argmax(1) == target).float().mean()
    model = nn.Linear(8, 4)
    with pytest.raises(RuntimeError, match="does not require grad"):
        accuracy(model(X), Y).backward()
    with pytest.raises(LossError, match="does not depend on any trained parameter"):
        pe.compile(pe.TrainingJob(model, (X,), Y, accuracy, pe.optim.SGD(lr=0.1)), FAST)


def test_an_integer_input_to_a_float_layer_names_the_layer():
    with pytest.raises(FrontendError, match=r"addmm.* in module 0 \(Linear\) .*int64.*x.float\(\)"):
        pe.compile(pe.TrainingJob(nn.Sequential(nn.Linear(8, 4)), (X.long(),), Y, "cross_entropy",
                                  pe.optim.SGD(lr=0.1)), FAST)


def test_sorting_on_the_gradient_path_names_the_op():
    top = lambda out, target: torch.sort(out, 1).values[:, -1].mean()
    with pytest.raises(UnsupportedOpError, match="relax.argsort"):
        pe.compile(pe.TrainingJob(nn.Linear(8, 4), (X,), Y, top, pe.optim.SGD(lr=0.1)), FAST)
