"""int8 training (pe.quantize.int8, MCUNetV3) on models nobody on this project wrote: each is
quantized as a user would (BatchNorm statistics from a few batches, calibration on them), trained
three steps of MCUNetV3's kind of scheme with QAS in float64, and compared with the fake-quant
reference (tests/quantized_reference.py) trained by PyTorch eager: the same losses, every
parameter within 1e-9 (scaled). ResNet's max pooling and EfficientNet's SiLU and squeeze-excite
run in float between a dequantization and a quantization (the converter's fallback); MCUNet's
blocks (kernel 3/5/7, ProxylessNAS) and MobileNetV2's are integer throughout."""

import copy

import numpy as np
import pytest
import torch
from quantized_reference import reference_of
from vision_models import MODELS

import pockengine as pe
from conftest import FAST_HOST, calibrated, max_scaled_diff
from pockengine import quantize
from pockengine.sparse import apply_to_torch

INT8_MODELS = ["mobilenet_v2", "resnet18", "efficientnet", "mcunet mixed kernels"]


def int8_scheme(qmodel):
    """MCUNetV3's kind: the biases of the later half of the int8 convolutions, the last one's weight
    and the input channels of the one before it at 1/2 (convolutions and the classifier, in order)."""
    layers = [m for m in qmodel.modules() if isinstance(m, (quantize.QuantizedConv2d, torch.nn.Linear))]
    n = len(layers)
    return pe.SparseUpdate.mcunetv3(n_bias_update=n // 2, manual_weight_idx=[n - 3, n - 2],
                                    weight_update_ratio=[0.5, 1])


@pytest.mark.parametrize("name", INT8_MODELS)
def test_int8_qas_training_matches_the_fake_quant_reference(name):
    _, factory, size = MODELS[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
    qmodel = quantize.int8(calibrated(factory(), calibration), calibration).double()
    counts = qmodel.quantization_counts
    assert counts["convolutions"] >= 8, counts
    batches = [(torch.randn(2, 3, size, size, generator=g, dtype=torch.float64),
                torch.randint(0, 10, (2,), generator=g)) for _ in range(3)]
    job = pe.TrainingJob(copy.deepcopy(qmodel), (batches[0][0],), batches[0][1], "cross_entropy",
                         pe.optim.SGD(lr=0.01, momentum=0.9, qas=True), sparse_update=int8_scheme(qmodel))
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]

    ref = apply_to_torch(reference_of(qmodel), program.plan)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    theirs = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(x), y)
        loss.backward()
        quantize.scale_gradients_qas(_with_grads_of(qmodel, ref))
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    worst, where = max_scaled_diff(program.state_dict(), ref.state_dict(), floor=1e-2)
    assert worst < 1e-9, (name, worst, where)


def _with_grads_of(qmodel, ref):
    """`qmodel`'s QAS scales over `ref`'s parameters: a copy of the quantized model whose int8 layers
    hold the reference's parameters (the reference modules have no scales of their own)."""
    view = copy.deepcopy(qmodel)
    for name, module in view.named_modules():
        if isinstance(module, quantize.QuantizedConv2d):
            source = ref.get_submodule(name)
            module.weight, module.bias = source.weight, source.bias
    return view
