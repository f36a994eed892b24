"""TinyTL's lite residual branches (pockengine/lite_residual.py, SparseUpdate.lite_residual): where they
go on the zoo's models, their shapes, training at parity with the same modules in PyTorch (float64),
the per-layer report, and the errors."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff, train_torch
from pockengine import bench
from pockengine.errors import JobError
from pockengine.lite_residual import LiteResidualBranch, add_lite_residuals, default_blocks

bench.import_vision_packages()  # the Makefile installs torchvision, timm and mcunet beside the venv
import timm  # noqa: E402
import torchvision  # noqa: E402


def mobilenet_v2():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=5, dropout=0.0).double()


def test_the_branches_go_beside_each_models_blocks():
    """MobileNetV2: its 17 inverted residual blocks (not the stem and the last 1x1 convolution);
    ResNet: the basic blocks of its four stages; MCUNet: its blocks; timm's EfficientNet: the blocks
    inside its stages."""
    assert default_blocks(mobilenet_v2()) == [f"features.{i}" for i in range(1, 18)]
    resnet = torchvision.models.resnet18()
    assert default_blocks(resnet) == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    from mcunet.tinynas.nn.networks import MobileNetV2

    mcunet = MobileNetV2(n_classes=5, width_mult=0.35, dropout_rate=0.0)
    assert default_blocks(mcunet)[:2] == ["blocks.0", "blocks.1"] and len(default_blocks(mcunet)) == len(mcunet.blocks)
    efficientnet = timm.create_model("efficientnet_b0", pretrained=False)
    blocks = default_blocks(efficientnet)
    assert blocks[0] == "blocks.0.0" and blocks[-1] == f"blocks.6.{len(efficientnet.blocks[6]) - 1}"
    assert len(blocks) == sum(len(stage) for stage in efficientnet.blocks)
    # plain conv-BN-ReLU containers (examples/transfer_digits' SmallCNN) are the blocks, not their layers
    def conv_block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
    plain = nn.Module()
    plain.features = nn.Sequential(conv_block(1, 8), conv_block(8, 8))
    assert default_blocks(plain) == ["features.0", "features.1"]


def test_branch_shapes_follow_tinytl():
    """At 64x64: a block at 32x32 gets a 5x5 kernel at 16x16 with the block's stride; the kernel
    shrinks by 2 until it fits the pooled resolution (4x4 -> 2x2: 1x1); at one pixel the branch pools
    globally. Groups of 2, the middle width the input's rounded to 8; the last BatchNorm starts at zero,
    so the model computes what it did."""
    model = mobilenet_v2()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    before = model.eval()(x)
    names = add_lite_residuals(model, (x,))
    branches = {name: model.get_submodule(name).lite_residual for name in names}
    assert all(isinstance(b, LiteResidualBranch) for b in branches.values())
    first, strided = branches["features.1"], branches["features.2"]  # 32x32 in; features.2 has stride 2
    assert first.conv1.kernel_size == (5, 5) and first.conv1.stride == (1, 1) and first.conv1.groups == 2
    assert strided.conv1.stride == (2, 2) and strided.conv1.out_channels == 8  # 8 input channels
    assert branches["features.14"].conv1.kernel_size == (1, 1)  # 4x4 in: 2x2 pooled
    assert branches["features.17"].pooled_to_one and isinstance(branches["features.17"].pooling, nn.AdaptiveAvgPool2d)
    assert all(float(b.final_bn.weight.detach().abs().max()) == 0 for b in branches.values())
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    training = mobilenet_v2()
    training.features[3].conv[1][1].eval()  # a BatchNorm kept in eval mode, as TinyTL trains them
    add_lite_residuals(training, (x,))
    assert training.training and not training.features[3].conv[1][1].training  # each module's mode kept


def test_lite_residual_trains_like_the_same_modules_in_pytorch():
    """MobileNetV2-0.35's first three stages at 16x16 with a branch beside each block, trained with
    the biases (SGD with momentum, 3 steps); PyTorch trains the same modules (the same seed) on the
    same batches. The branches are of every kind the whole network has at 64x64 (a shrunk kernel,
    a strided one, a 1x1 one, one pooling globally), which took 50 s of CI with its 17. Every weight
    of the model stays as it was; the report has a row per branch layer, with its FLOPs."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=5, dropout=0.0, inverted_residual_setting=[
        [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]).double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g), torch.randint(0, 5, (4,), generator=g))
               for _ in range(3)]
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=pe.SparseUpdate.lite_residual())
    assert job.lite_residual_blocks == [f"features.{i}" for i in range(1, 6)]
    branches = [job.model.get_submodule(f"features.{i}.lite_residual") for i in range(1, 6)]
    assert branches[0].conv1.kernel_size == (3, 3) and branches[1].conv1.stride == (2, 2)
    assert branches[3].conv1.kernel_size == (1, 1) and branches[4].pooled_to_one
    assert not any("lite_residual" in name for name in dict(model.named_modules()))  # the caller's model
    program = pe.compile(job, target=FAST_HOST)
    trained = {name for name, rule in program.plan.items() if rule != "frozen"}
    assert trained == {name for name in program.plan if "lite_residual" in name or name.endswith(".bias")}
    trains_like_pytorch(program, model, batches)
    state = program.state_dict()
    original = model.state_dict()
    assert all(np.array_equal(state[k], original[k].numpy()) for k in original if k.endswith(".weight"))
    rows = {r.layer: r for r in program.memory_report().layers}
    branch = rows["features.2.lite_residual.conv1"]
    assert branch.trained == "full" and branch.forward_flops > 0 and branch.backward_flops > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel_size": 4}, "kernel_size must be an odd integer"),
    ({"groups": 0}, "groups must be an integer >= 1"),
    ({"downsample": 1.5}, "downsample must be an integer"),
    ({"expand": -1}, "expand must be a number > 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(JobError, match=message):
        pe.SparseUpdate.lite_residual(**kwargs)


def test_blocks_that_cannot_take_a_branch_are_named():
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1])

    def job(blocks):
        return pe.TrainingJob(mobilenet_v2(), (x,), y, "cross_entropy", pe.optim.SGD(lr=0.1),
                              sparse_update=pe.SparseUpdate.lite_residual(blocks=blocks))

    with pytest.raises(JobError, match=r"blocks \['nothing\.\*'\] name no module"):
        job(["features.1", "nothing.*"])
    with pytest.raises(JobError, match=r"classifier\.1 maps \(2, 1280\) to \(2, 5\).*4-D feature map"):
        job("classifier.1")
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 2, 1), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.conv(x).flatten(1))

    with pytest.raises(JobError, match="no numbered blocks"):
        pe.TrainingJob(Flat(), (torch.randn(2, 3, 2, 2),), y, "cross_entropy", pe.optim.SGD(lr=0.1),
                       sparse_update=pe.SparseUpdate.lite_residual())


def test_sequential_blocks_keep_their_layers_and_the_upsampling_saves_nothing_of_its_size():
    """Branches beside nn.Sequential(conv, BN, ReLU) blocks (examples/transfer_digits' SmallCNN):
    the Sequential's forward must not run the branch registered under it as one more layer (the
    job failed to export). The branch's bilinear upsampling keeps nothing of the block output's size
    for the backward (F.interpolate's decomposition kept its gathered corners, then scattered them
    back one by one). The step trains as PyTorch does (float64)."""
    def conv_block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

    torch.manual_seed(0)
    model = nn.Sequential()
    model.features = nn.Sequential(conv_block(1, 8, 1), conv_block(8, 16, 2))
    model.pool, model.flat, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)
    model = model.double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 16, 16, dtype=torch.float64, generator=g), torch.randint(0, 3, (4,), generator=g))
               for _ in range(3)]
    scheme = pe.SparseUpdate.lite_residual() | {"classifier": "full"}
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.1, momentum=0.9), sparse_update=scheme)
    assert job.lite_residual_blocks == ["features.0", "features.1"]
    assert [name for name, _ in job.model.features[0].named_children()] == ["0", "1", "2", "lite_residual"]
    assert set(job.model.state_dict()) - set(model.state_dict()) == {
        k for k in job.model.state_dict() if ".lite_residual." in k}  # every model parameter keeps its name
    program = pe.compile(job, target=FAST_HOST)
    # the hook's addition and upsampling are the blocks' own operators: they keep nothing (they kept
    # two tensors of the block output's size at features.0, four of a quarter of it at features.1)
    saved = {r.layer: r.saved_activation_bytes for r in program.memory_report().layers}
    assert saved.get("features.0", 0) == saved.get("features.1", 0) == 0, saved
    trains_like_pytorch(program, model, batches)
    # the trained model evaluates in PyTorch after the export, on another batch size (the upsampling's
    # weights had cached the trace's symbolic sizes: its dead shape guard failed here)
    job.model.load_state_dict(program.state_dict(as_torch=True))
    with torch.no_grad():
        assert job.model.eval()(torch.randn(3, 1, 16, 16, dtype=torch.float64)).shape == (3, 3)


def trains_like_pytorch(program, model, batches):
    """The program's steps (SGD with momentum 0.9, lr 0.1) against PyTorch training `model` with the
    same branches (the same seed) and the same frozen set: losses and state to 1e-10 (float64)."""
    ours = [program.step(x, y) for x, y in batches]
    reference = copy.deepcopy(model)
    add_lite_residuals(reference, (batches[0][0],))
    pe.sparse.apply_to_torch(reference, program.plan)
    np.testing.assert_allclose(ours, train_torch(reference, pe.optim.SGD(lr=0.1, momentum=0.9), batches),
                               rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), reference.state_dict())
    assert worst <= 1e-10, f"{where} differs by {worst:.3g}"


@pytest.mark.parametrize("size_in, size_out", [((8, 8), (16, 16)), ((4, 4), (16, 16)), ((3, 5), (7, 10)),
                                               ((2, 2), (3, 3)), ((7, 7), (7, 7))])
def test_the_branch_upsamples_as_f_interpolate_does(size_in, size_out):
    """The branch's bilinear upsampling (two products with interpolation matrices) computes what
    F.interpolate(mode="bilinear", align_corners=False) does, odd and equal sizes included."""
    from pockengine.lite_residual import upsample_bilinear

    x = torch.randn(2, 3, *size_in, dtype=torch.float64)
    expected = nn.functional.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_bilinear(x, size_out), expected, rtol=0, atol=1e-13)
