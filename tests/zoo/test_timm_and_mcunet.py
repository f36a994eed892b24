"""timm's and mcunet's classifiers (tests/zoo/vision_models.py) train like PyTorch (zoo_parity.py): the
full update and one sparse scheme in float64, 20 float32 steps."""

import pytest
from vision_models import MODELS, SCHEMES, build
from zoo_parity import cases, check_model

NAMES = [name for name, (source, _, _) in MODELS.items() if source != "torchvision"]
SPARSE_IN_CI = ["timm convnext_atto", "timm deit (distilled)", "mcunet mixed kernels"]  # last layers, LoRA, MCUNetV3
# resnet (group norm)'s float32 check took 37 s of CI (20 steps of a 4.9M-parameter net at opt-level 0);
# GroupNorm stays in CI's float64 checks here and in torchvision's and wav2vec2's.
FLOAT32_IN_CI = ["timm deit (distilled)", "timm convnext_atto"]


@pytest.mark.parametrize("check, name", cases(NAMES, SPARSE_IN_CI, FLOAT32_IN_CI))
def test_trains_like_pytorch(check, name):
    check_model(check, name, *build(name), SCHEMES[name], source=MODELS[name][0])
