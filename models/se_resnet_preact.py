"""SE-ResNet-preact: "Squeeze-and-Excitation Networks" (Hu et al., arXiv 1709.01507) on the
pre-activation ResNet of arXiv 1603.05027.

Each residual branch ends in a squeeze-and-excitation gate, applied before the addition (the
SE-ResNet module of the paper's Fig. 3). The defaults are those of
hysts/pytorch_image_classification: no first ReLU and a last BN in every block
(arXiv 1610.02915), and only stage 1 pre-activating its shortcut.
"""
from models.registry import ModelConfigError, register_model
from models.resnet_preact import build_resnet_preact


@register_model('se_resnet_preact', epochs=160, batch_size=128, base_lr=0.1, weight_decay=1e-4,
                scheduler='multistep', milestones=[80, 120], lr_decay=0.1)
def se_resnet_preact(*, depth=110, base_channels=16, block_type='basic', widening_factor=1,
                     preact_stage=(True, False, False), remove_first_relu=True, add_last_bn=True,
                     se_reduction=16, num_classes=10, in_channels=3):
    """Pre-activation ResNet-``depth`` with an SE gate of reduction ``se_reduction`` per block."""
    if not se_reduction:
        raise ModelConfigError(f'--se_reduction {se_reduction}: se_resnet_preact needs a positive '
                               'integer (use --arch resnet_preact for no SE gates)')
    return build_resnet_preact('se_resnet_preact', depth, base_channels, block_type,
                               widening_factor, preact_stage, remove_first_relu, add_last_bn,
                               se_reduction, num_classes, in_channels)
