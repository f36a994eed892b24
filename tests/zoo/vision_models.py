"""Vision architectures from torchvision, timm and mcunet, random-initialised, shrunk (fewer blocks,
narrower) so that each compiles in seconds on 2 cores while keeping every block type of the family:
residual and bottleneck blocks, depthwise and grouped convolutions, squeeze-excite, channel shuffle,
dense concatenation, ceil-mode pooling, LayerNorm2d and layer scale, patch embeddings, shifted windows,
distillation tokens, reparameterised branches, GroupNorm. MCUNet's own models are whole: the
`mbv2-w0.35` baseline and a network of its search space (tests/targets/test_mcunet_models.py trains
them on every target).

Dropout and stochastic depth are set to 0 here (see hf_models.py). MODELS: name -> (package, factory,
input size); SCHEMES: name -> (label, model -> the sparse scheme checked for it).

The packages live outside the venv's site-packages (the Makefile installs them with `pip --target`;
pockengine.bench.import_vision_packages says why and makes them importable).
"""


import pytest
import torch

import pockengine as pe
from conftest import make_batches
from pockengine import bench

BATCH, CLASSES, STEPS = 4, 10, 3


def _import_vision_packages():
    if not bench.import_vision_packages():
        pytest.skip(f"the vision packages are not installed in {bench.VISION_PACKAGES} (run `make setup`)")


def torchvision_models():
    _import_vision_packages()
    import torchvision.models

    return torchvision.models


def timm_model(name, **config):
    _import_vision_packages()
    import timm

    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **config)


def mcunet_networks():
    _import_vision_packages()
    from mcunet.tinynas.nn import networks

    return networks


def resnet18():
    return torchvision_models().resnet18(num_classes=CLASSES)


def resnet18_group_norm():
    return torchvision_models().resnet18(num_classes=CLASSES, norm_layer=lambda c: torch.nn.GroupNorm(2, c))


def mobilenet_v2():
    # t, c, n, s: the first four stages of torchvision's setting (stride-1 and stride-2 residual blocks)
    return torchvision_models().mobilenet_v2(num_classes=CLASSES, width_mult=0.35, dropout=0.0,
                                             inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2],
                                                                        [6, 32, 2, 2], [6, 64, 1, 2]])


def mobilenet_v3_small():
    models = torchvision_models()
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf

    blocks, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
    # blocks 0-3: ReLU and hardswish, squeeze-excite with hardsigmoid, stride 2 and residual ones
    return models.MobileNetV3(blocks[:4], last_channel, num_classes=CLASSES, dropout=0.0)


def shufflenet_v2():
    return torchvision_models().shufflenet_v2_x0_5(num_classes=CLASSES)


def squeezenet():
    return torchvision_models().squeezenet1_1(num_classes=CLASSES, dropout=0.0)


def densenet():
    return torchvision_models().DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                         drop_rate=0.0, num_classes=CLASSES)


def efficientnet():
    models = torchvision_models()
    from torchvision.models.efficientnet import _efficientnet_conf

    settings, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.34)
    return models.EfficientNet(settings[:4], dropout=0.0, stochastic_depth_prob=0.0, num_classes=CLASSES,
                               last_channel=last_channel)


def regnet_y():
    models = torchvision_models()
    from torchvision.models.regnet import BlockParams

    # regnet_y_400mf's generator (w_m 2.09, group width 8, squeeze-excite 0.25), depth 4 and narrower
    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.09, group_width=8, se_ratio=0.25)
    return models.RegNet(params, num_classes=CLASSES)


def convnext():
    models = torchvision_models()
    from torchvision.models.convnext import CNBlockConfig

    stages = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return models.ConvNeXt(stages, stochastic_depth_prob=0.0, num_classes=CLASSES)


def vit():
    return torchvision_models().VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, dropout=0.0, attention_dropout=0.0,
                                                  num_classes=CLASSES)


def swin():
    # window 4 on an 8x8 map: the second block is shifted (roll and attention mask), then patch merging
    return torchvision_models().SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4],
                                                window_size=[4, 4], stochastic_depth_prob=0.0, dropout=0.0,
                                                attention_dropout=0.0, num_classes=CLASSES)


def timm_efficientnet():
    return timm_model("test_efficientnet", drop_rate=0.0, drop_path_rate=0.0)


def timm_convnext():
    return timm_model("convnext_atto", drop_rate=0.0, drop_path_rate=0.0, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))


def timm_deit():
    return timm_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                      num_heads=2, drop_rate=0.0, drop_path_rate=0.0)


def timm_resnet_group_norm():
    return timm_model("resnet18", drop_rate=0.0, drop_path_rate=0.0, norm_layer="groupnorm", layers=(1, 1, 1, 1))


def timm_ghostnet():
    _import_vision_packages()
    from timm.models.ghostnet import GhostNet

    # ghostnet_050's first three stages (k, t, c, squeeze-excite, s): ghost modules, SE, stride 2
    stages = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[3, 72, 24, 0, 1]], [[5, 72, 40, 0.25, 2]],
              [[5, 120, 40, 0.25, 1]]]
    return GhostNet(stages, num_classes=CLASSES, width=0.5, drop_rate=0.0)


def timm_fastvit():
    return timm_model("fastvit_t8", drop_rate=0.0, drop_path_rate=0.0, layers=(1, 1, 1, 1))


def mcunet_mixed_kernels():
    """MCUNet's search space (kernel 3/5/7 per block, ProxylessNAS blocks): its released configurations
    are downloaded at run time, so the same block types come from the package's builder."""
    return mcunet_networks().MobileNetV2(n_classes=CLASSES, width_mult=0.35, dropout_rate=0.0,
                                         ks=[3, 5, 7, 5, 3, 7], expand_ratio=4, depth_param=1)


def mcunet_mbv2_w035():
    """MCUNet's `mbv2-w0.35` baseline (its model zoo's `mbv2-w0.35-r144_imagenet`, whose configuration
    is downloaded at run time): MobileNetV2 at width 0.35 and its whole depth, as the package builds it."""
    return mcunet_networks().MobileNetV2(n_classes=CLASSES, width_mult=0.35, dropout_rate=0.0)


# A network of MCUNet's search space, kernel size, expansion and depth chosen per block and stage (the
# `mcunet-in*` models are such choices; their configurations are downloaded at run time).
MCUNET_SUBNET = {"ks": [3, 5, 7, 3, 5, 7, 3, 5, 7, 3, 5, 7, 3, 5, 7, 3, 5, 7, 3, 5], "e": [3, 4, 6] * 7,
                 "d": [2, 3, 2, 3, 2, 1]}


def mcunet_space_subnet():
    """A subnet of the mcunet package's once-for-all ProxylessNAS supernet at width 0.35 (kernels 3/5/7,
    expansions 3/4/6, 2-4 blocks a stage): the space TinyNAS searches MCUNet's models in, built as a
    plain ProxylessNASNets, the class the released `mcunet-in*` configurations build."""
    _import_vision_packages()
    from mcunet.tinynas.elastic_nn.networks import OFAProxylessNASNets

    supernet = OFAProxylessNASNets(n_classes=CLASSES, dropout_rate=0.0, width_mult_list=0.35, ks_list=[3, 5, 7],
                                   expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    supernet.set_active_subnet(**MCUNET_SUBNET)
    return supernet.get_active_subnet(preserve_weight=True)


def image_batches(size):
    return make_batches((BATCH, 3, size, size), CLASSES, STEPS)


MODELS = {
    "resnet18": ("torchvision", resnet18, 32),
    "resnet18 (group norm)": ("torchvision", resnet18_group_norm, 32),
    "mobilenet_v2": ("torchvision", mobilenet_v2, 32),
    "mobilenet_v3_small": ("torchvision", mobilenet_v3_small, 32),
    "shufflenet_v2_x0_5": ("torchvision", shufflenet_v2, 64),
    "squeezenet1_1": ("torchvision", squeezenet, 64),
    "densenet": ("torchvision", densenet, 32),
    "efficientnet": ("torchvision", efficientnet, 32),
    "regnet_y": ("torchvision", regnet_y, 32),
    "convnext": ("torchvision", convnext, 32),
    "vit": ("torchvision", vit, 32),
    "swin": ("torchvision", swin, 32),
    "timm efficientnet": ("timm", timm_efficientnet, 32),
    "timm convnext_atto": ("timm", timm_convnext, 32),
    "timm deit (distilled)": ("timm", timm_deit, 32),
    "timm resnet (group norm)": ("timm", timm_resnet_group_norm, 32),
    "timm ghostnet_050": ("timm", timm_ghostnet, 32),
    "timm fastvit_t8": ("timm", timm_fastvit, 32),
    "mcunet mixed kernels": ("mcunet", mcunet_mixed_kernels, 64),
    "mcunet mbv2-w0.35": ("mcunet", mcunet_mbv2_w035, 48),
    "mcunet search-space subnet": ("mcunet", mcunet_space_subnet, 48),
}


def tiny_training_scheme(model):
    """MCUNetV3's kind of scheme: the biases of the later half of the convolutions, the whole weight of
    the last convolution before the classifier and the input channels of the one before it at 1/2."""
    convs = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    return pe.SparseUpdate.mcunetv3(n_bias_update=convs // 2, manual_weight_idx=[convs - 3, convs - 2],
                                    weight_update_ratio=[0.5, 1])


TINY_TRAINING = ("MCUNetV3 (biases, 1 weight, 1 half weight)", tiny_training_scheme)
BIASES = ("biases (TinyTL)", lambda model: pe.SparseUpdate.bias_only())
BIASES_AND_NORMS = ("biases and norms", lambda model: pe.SparseUpdate.bias_and_norm())

# name -> (label, scheme for the model)
SCHEMES = {
    "resnet18": TINY_TRAINING,
    "resnet18 (group norm)": BIASES,
    "mobilenet_v2": TINY_TRAINING,
    "mobilenet_v3_small": TINY_TRAINING,
    "shufflenet_v2_x0_5": ("last 3 layers", lambda model: pe.SparseUpdate.last_k(3)),
    "squeezenet1_1": BIASES,
    "densenet": TINY_TRAINING,
    "efficientnet": TINY_TRAINING,
    "regnet_y": BIASES,
    "convnext": BIASES_AND_NORMS,
    "vit": ("last block", lambda model: pe.SparseUpdate.last_blocks(1)),
    "swin": BIASES_AND_NORMS,
    "timm efficientnet": TINY_TRAINING,
    "timm convnext_atto": ("last 2 layers", lambda model: pe.SparseUpdate.last_k(2)),
    "timm deit (distilled)": ("LoRA r=4 on qkv", lambda model: pe.SparseUpdate.lora(4, ("qkv",), alpha=8)),
    "timm resnet (group norm)": TINY_TRAINING,
    "timm ghostnet_050": BIASES,
    "timm fastvit_t8": BIASES,
    "mcunet mixed kernels": TINY_TRAINING,
    "mcunet mbv2-w0.35": TINY_TRAINING,
    "mcunet search-space subnet": TINY_TRAINING,
}


def build(name):
    """-> (model, loss, batches) of a zoo entry, as hf_models.build."""
    _, factory, size = MODELS[name]
    torch.manual_seed(0)
    return factory(), torch.nn.functional.cross_entropy, [((x,), y) for x, y in image_batches(size)]
