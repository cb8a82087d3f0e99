"""Wide Residual Networks (Zagoruyko and Komodakis, arXiv 1605.07146).

WRN-d-k: pre-activation basic blocks, stage widths 16k/32k/64k after a 16-channel stem,
n = (d - 4) / 6 blocks per stage. The 4 counts the stem conv and the three 1x1 shortcut convs
of the stage-entry blocks (24 + 1 + 3 = 28 for WRN-28-10), as in the authors' and hysts' code.
Dropout, when on, sits between the two convolutions of each block.

Initialization is the authors' (szagoruyko/wide-residual-networks: ``models/utils.lua`` MSRinit and
FCinit, ``pytorch/utils.py``; hysts' ``models/wrn.py`` at 1d76092, whose WRN-28-10 gave 4.03%):
convolutions normal with std sqrt(2 / fan_in), BN scales uniform in [0, 1) (Torch7's BatchNormalization
default and ``bnparams``' ``torch.rand``) and shifts 0, the classifier's weight uniform in
+-1/sqrt(fan_in) (nn.Linear's default, the same as Torch7's) and its bias 0. The other families use
fan_out and unit BN scales (``models.common.initialize_weights``).
"""
import torch.nn as nn

from models.common import blocks_per_stage, check_positive_int
from models.registry import ModelConfigError, register_model
from models.resnet import check_se_reduction
from models.resnet_preact import PreActBasicBlock, PreActResNet


def initialize_wrn_weights(model):
    """The WRN authors' initialization (module docstring); applied after the generic one."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_in', nonlinearity='relu')
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.0, 1.0)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
            nn.init.zeros_(module.bias)


@register_model('wrn', epochs=200, batch_size=128, base_lr=0.1, weight_decay=5e-4,
                scheduler='multistep', milestones=[60, 120, 160], lr_decay=0.2)
def wrn(*, depth=28, widening_factor=10, base_channels=16, drop_rate=0.0, se_reduction=None,
        num_classes=10, in_channels=3):
    """WRN-``depth``-``widening_factor``; se_reduction adds SE gates (off by default)."""
    check_positive_int('--depth', depth, 'wrn')
    n_blocks = blocks_per_stage(depth, layers_per_block=2, extra_layers=4, arch='wrn')
    check_positive_int('--widening_factor', widening_factor, 'wrn')
    check_positive_int('--base_channels', base_channels, 'wrn')
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
        raise ModelConfigError(f'--drop_rate {drop_rate}: wrn needs a probability in [0, 1)')
    check_se_reduction(se_reduction, 'wrn')
    stage_channels = [base_channels * widening_factor * 2 ** index for index in range(3)]
    # the stage-entry blocks that change width pre-activate their shortcut too
    preact_first = [base_channels != stage_channels[0], True, True]
    model = PreActResNet(PreActBasicBlock, n_blocks, base_channels, stage_channels, preact_first,
                         num_classes, in_channels, drop_rate=float(drop_rate),
                         se_reduction=se_reduction)
    initialize_wrn_weights(model)
    return model
