"""torchvision's classifiers (tests/zoo/vision_models.py) train like PyTorch (zoo_parity.py): the full
update and one sparse scheme in float64, 20 float32 steps."""

import pytest
from vision_models import MODELS, SCHEMES, build
from zoo_parity import cases, check_model

NAMES = [name for name, (source, _, _) in MODELS.items() if source == "torchvision"]
# each kind of scheme (MCUNetV3's sub-channel updates, TinyTL's biases, the last block, biases and norms)
SPARSE_IN_CI = ["resnet18", "mobilenet_v2", "squeezenet1_1", "vit", "convnext"]
FLOAT32_IN_CI = ["densenet", "convnext", "vit"]


@pytest.mark.parametrize("check, name", cases(NAMES, SPARSE_IN_CI, FLOAT32_IN_CI))
def test_trains_like_pytorch(check, name):
    check_model(check, name, *build(name), SCHEMES[name], source="torchvision")
