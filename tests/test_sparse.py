"""Sparse-update schemes: resolution against the parameter table, training parity with PyTorch run
with the same frozen set (requires_grad=False; channel ratios as gradient masks on the first
channels), frozen parameters untouched, and the pruned backward's FLOPs."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import FAST_HOST, MLP, make_batches, max_scaled_diff, train_torch
from pockengine.analysis.flops import step_flops
from pockengine.errors import JobError
from pockengine.sparse import FROZEN, FULL, Partial, SparseUpdate, apply_to_torch


class SmallNet(nn.Module):
    """conv-BN-ReLU6, depthwise conv-BN-ReLU6, pointwise conv-BN, pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


SCHEMES = {
    "full": SparseUpdate.full(),
    "frozen by default, head full": SparseUpdate({"head": "full"}),
    "bias rule": SparseUpdate({"*": "bias"}),
    "bias_only preset": SparseUpdate.bias_only(),
    "conv ratio": SparseUpdate({"pw.0.weight": 0.25, "head.*": "full"}),
    "depthwise ratio": SparseUpdate({"dw.0.weight": 0.5}),
    "linear ratio": SparseUpdate.bias_only() | {"head.weight": 0.5},
    "last_k(3)": SparseUpdate.last_k(3),
    "mcunetv3": SparseUpdate.mcunetv3(3, "0-1-3", "0.5-0.25-1"),
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_scheme_trains_like_pytorch_with_the_same_frozen_set(name):
    torch.manual_seed(0)
    model = SmallNet().double().train()
    batches = make_batches((8, 3, 16, 16), 10, 10, dtype=torch.float64)
    optimizer = pe.optim.SGD(lr=0.05, momentum=0.9)
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], "cross_entropy", optimizer,
                         sparse_update=SCHEMES[name])
    program = pe.compile(job, target=FAST_HOST)
    plan = program.plan
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ours = [program.step(x, y) for x, y in batches]
    theirs = train_torch(apply_to_torch(model, plan), optimizer, batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    assert worst <= 1e-9, f"{where}: {worst:.3g}"
    state = program.state_dict()
    for pname, rule in plan.items():
        if rule == FROZEN:
            np.testing.assert_array_equal(state[pname], initial[pname].numpy(), err_msg=pname)
            assert pname not in program.signature.outputs  # never written
        elif isinstance(rule, Partial):  # the untrained channels are untouched too
            index = [slice(None)] * state[pname].ndim
            index[rule.axis] = slice(rule.channels, None)
            np.testing.assert_array_equal(state[pname][tuple(index)], initial[pname].numpy()[tuple(index)])


def test_the_program_carries_its_plan_through_export_and_load(tmp_path):
    """program.plan is the job's plan (what PyTorch must train to compare), without a second import,
    and an exported artifact keeps it, channel ratios included."""
    scheme = SparseUpdate.mcunetv3(3, "0-1-3", "0.5-0.25-1")
    job = pe.TrainingJob(SmallNet(), (torch.randn(2, 3, 8, 8),), torch.randint(0, 10, (2,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1), sparse_update=scheme)
    program = pe.compile(job, target=FAST_HOST)
    expected = job.plan(job.import_model())
    assert program.plan == expected and any(isinstance(rule, Partial) for rule in expected.values())
    assert pe.load(program.export(str(tmp_path / "artifact"))).plan == expected


PARAMS = [("stem.0.weight", (8, 3, 3, 3), "conv"), ("stem.1.weight", (8,), None), ("stem.1.bias", (8,), None),
          ("dw.0.weight", (8, 1, 3, 3), "depthwise"), ("dw.1.weight", (8,), None), ("dw.1.bias", (8,), None),
          ("pw.0.weight", (16, 8, 1, 1), "conv"), ("pw.1.weight", (16,), None), ("pw.1.bias", (16,), None),
          ("head.weight", (10, 16), "linear"), ("head.bias", (10,), None)]


def test_resolution_of_presets():
    bias = SparseUpdate.bias_only().resolve(PARAMS)
    assert [n for n, r in bias.items() if r == FULL] == ["stem.1.bias", "dw.1.bias", "pw.1.bias", "head.bias"]
    last = SparseUpdate.last_k(2).resolve(PARAMS)
    assert [n for n, r in last.items() if r == FULL] == ["pw.1.weight", "pw.1.bias", "head.weight", "head.bias"]
    mcu = SparseUpdate.mcunetv3(2, [1, 2], [0.5, 0.25]).resolve(PARAMS)
    assert mcu["dw.0.weight"] == Partial(4, 0, 8) and mcu["pw.0.weight"] == Partial(2, 1, 8)
    assert mcu["pw.1.bias"] == FULL and mcu["head.bias"] == FULL and mcu["dw.1.bias"] == FROZEN
    override = (SparseUpdate.bias_only() | {"head.*": "full", "pw.0.weight": 1.0}).resolve(PARAMS)
    assert override["head.weight"] == FULL and override["pw.0.weight"] == FULL


def test_blocks_are_found_in_module_lists_and_in_named_block_containers():
    from pockengine.sparse import transformer_blocks

    llama = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in range(3)
                                             for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
    assert transformer_blocks(llama) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    # torchvision's VisionTransformer: an OrderedDict of blocks named encoder_layer_<i>
    vit = ["conv_proj.weight"] + [f"encoder.layers.encoder_layer_{i}.{p}" for i in range(2)
                                  for p in ("ln_1.weight", "self_attention.in_proj_weight", "mlp.0.weight")]
    assert transformer_blocks(vit) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    # a conv and its norm numbered in an nn.Sequential are not blocks; "layer1" is a name, not an index
    assert transformer_blocks(["features.0.weight", "features.1.weight", "features.1.bias", "layer1.0.weight"]) == []


def test_invalid_schemes_name_the_real_parameters():
    with pytest.raises(JobError, match=r"'blocks\.\*': 'full' names no parameter.*stem\.0\.weight, stem\.1\.weight"):
        SparseUpdate({"blocks.*": "full"}).resolve(PARAMS)
    with pytest.raises(JobError, match=r"ratio for 'pw.0.weight' must be in \(0, 1\], got 1.5"):
        SparseUpdate({"pw.0.weight": 1.5})
    with pytest.raises(JobError, match="must be one of"):
        SparseUpdate({"pw.0.weight": "half"})
    with pytest.raises(JobError, match="channel ratios apply to conv and linear weights only"):
        SparseUpdate({"pw.1.weight": 0.5}).resolve(PARAMS)
    with pytest.raises(JobError, match="conv index 9 out of range; the model has 4 convs"):
        SparseUpdate.mcunetv3(1, [9], [0.5]).resolve(PARAMS)
    with pytest.raises(JobError, match="sparse_update must be"):
        pe.TrainingJob(SmallNet(), (torch.randn(2, 3, 8, 8),), torch.tensor([0, 1]), "cross_entropy",
                       pe.optim.SGD(), sparse_update="bias")


def step_of(scheme):
    torch.manual_seed(0)
    job = pe.TrainingJob(MLP(), (torch.randn(8, 32),), torch.randint(0, 10, (8,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1), sparse_update=scheme)
    from pockengine.pipeline import derive_step

    imported = job.import_model()
    mod, signature, _ = derive_step(imported, job.optimizer, job.plan(imported))
    return step_flops(mod["train_step"]), signature


def test_pruned_backward_costs_the_expected_flops():
    """MLP 32-64-64-10, batch 8: each linear costs 2*8*in*out for forward, weight gradient and input
    gradient. The first layer's input gradient is never needed."""
    mm = lambda i, o: 2 * 8 * i * o
    forward = mm(32, 64) + mm(64, 64) + mm(64, 10)
    full, _ = step_of(SparseUpdate.full())
    assert full == {"forward": forward, "backward": forward + mm(64, 64) + mm(64, 10)}
    bias, _ = step_of(SparseUpdate.bias_only())
    assert bias == {"forward": forward, "backward": mm(64, 64) + mm(64, 10)}  # input gradients only
    ratio, signature = step_of({"net.0.weight": 0.25})  # 8 of 32 input channels of the first layer
    assert ratio == {"forward": forward, "backward": mm(8, 64) + mm(64, 64) + mm(64, 10)}
    assert signature.trained_shapes == {"net.0.weight": (64, 8)}
    # The weight is two state tensors: the step writes its trained channels only, never the whole.
    shapes = {spec.name: spec.shape for spec in signature.state}
    assert shapes["net.0.weight[:, :8]"] == (64, 8) and shapes["net.0.weight[:, 8:]"] == (64, 24)
    assert "net.0.weight" not in shapes
    assert signature.categories["net.0.weight[:, :8]"] == "param"
    assert signature.categories["net.0.weight[:, 8:]"] == "frozen_param"
    assert signature.outputs[0] == "net.0.weight[:, :8]" and "net.0.weight[:, 8:]" not in signature.outputs
    head, _ = step_of({"net.4": "full"})  # last layer only: nothing flows further back
    assert head == {"forward": forward, "backward": mm(64, 10)}


def test_block_presets_and_lora_say_what_is_wrong():
    net = SmallNet()  # no repeated blocks
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    job = pe.TrainingJob(net, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.1), sparse_update=SparseUpdate.last_blocks(1))
    with pytest.raises(JobError, match=r"no repeated blocks .* Parameters: stem.0.weight"):
        job.plan(job.import_model())
    with pytest.raises(JobError, match="part must be one of"):
        SparseUpdate.last_blocks(1, "ffn")
    with pytest.raises(JobError, match=r"last_blocks\(3\): the model has 2 blocks \(net.0 .. net.1\)"):
        layers = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)))
        model = nn.Sequential()
        model.add_module("net", layers)
        j = pe.TrainingJob(model, (torch.randn(2, 8),), torch.randn(2, 8), "mse", pe.optim.SGD(lr=0.1),
                           sparse_update=SparseUpdate.last_blocks(3))
        j.plan(j.import_model())
    with pytest.raises(JobError,
                       match=r"LoRA targets \['q_proj'\] match no nn.Linear of the model; its linear layers: head"):
        pe.TrainingJob(net, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.1),
                       sparse_update=SparseUpdate.lora(2, "q_proj"))
    with pytest.raises(JobError, match="LoRA rank 32 exceeds head's size"):
        pe.TrainingJob(net, (x,), y, "cross_entropy", pe.optim.SGD(lr=0.1), sparse_update=SparseUpdate.lora(32, "head"))


def test_bias_and_norm_trains_the_one_dimensional_parameters():
    job = pe.TrainingJob(SmallNet(), (torch.randn(2, 3, 8, 8),), torch.randint(0, 10, (2,)), "cross_entropy",
                         pe.optim.SGD(lr=0.1), sparse_update=SparseUpdate.bias_and_norm())
    plan = job.plan(job.import_model())
    assert {n for n, r in plan.items() if r == FULL} == {n for n, p in SmallNet().named_parameters() if p.ndim == 1}
