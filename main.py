#!/usr/bin/env python
"""Train and evaluate an image classifier on CIFAR-10/100, MNIST, FashionMNIST or KMNIST.

    ./main.py --arch resnet_preact --depth 56 --outdir results/resnet_preact_56/00
    ./main.py --arch wrn --outdir results/wrn/00 --scheduler cosine --use_cutout

Settings resolve in this order, later winning: built-in defaults, the architecture's
defaults (the original tool's configs), ``--config FILE.json``, then explicit flags.
The run directory receives config.json, log.json (one record per epoch, rewritten
atomically), TensorBoard scalars, checkpoint.pth (resumable with ``--resume``) and the
final model_state.pth.
"""
import argparse
import ast
import contextlib
import json
import math
import os
import re
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import augmentations
import dataloader
import models
import optim
import utils
import flags
from flags import Bool, Choice, Int, ListOf, Real, Text, UsageError, json_list, number, str2bool

PRECISION_ALIASES = {'O0': 'fp32', 'O1': 'fp16', 'O2': 'fp16', 'O3': 'fp16'}
_IMAGE_FOLDER = dataloader.DatasetInfo('ImageFolder', 3, 0, 0, (), (), True)


# ----------------------------------------------------------------------------- arguments

def _switch(group, name, help, default=False):
    """A boolean flag usable as a switch (``--use_cutout``) or with a value (``--use_cutout false``)."""
    group.add_argument(name, type=str2bool, nargs='?', const=True, default=default, metavar='BOOL', help=help)


# How each kind of generated model flag parses (models.registry.FlagSpec.kind).
_MODEL_FLAG_TYPES = {'bool': dict(type=str2bool, nargs='?', const=True), 'int': dict(type=int),
                     'float': dict(type=float), 'list': dict(type=json_list), 'str': {}}


def add_model_flags(group):
    """One flag per keyword-only argument of the registered builders (``models.model_flags``): the type
    from the builder's annotation or default, the help from ``models.registry.FLAG_HELP`` or the
    builder's docstring; default None, so that the builder's own default applies unless it is given."""
    for name, flag in models.model_flags().items():
        group.add_argument(f'--{name}', choices=flag.choices, help=flag.help, **_MODEL_FLAG_TYPES[flag.kind])


def get_args_parser():
    parser = _Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     allow_abbrev=False)  # --epoch is not --epochs: a typo must not pass

    group = parser.add_argument_group('Model (see --list_archs for which flags apply to which arch)')
    group.add_argument('--arch', default='resnet_preact', help='architecture name')
    group.add_argument('--config', help='JSON file of flag defaults; explicit flags override it')
    group.add_argument('--list_archs', action='store_true',
                       help='list architectures with their parameters, forward multiply-adds at the --dataset\'s '
                            'input size, flags and training defaults, then exit (with --arch: that one, built with '
                            'the model flags given)')
    group.add_argument('--init', default=None, choices=list(models.common.INIT_SCHEMES),
                       help='re-initialize the built model: kaiming (He normal), xavier (Glorot uniform) or default '
                            '(PyTorch\'s reset_parameters); unset: each family\'s own initialization')
    group.add_argument('--teacher', metavar='MODEL_STATE',
                       help='knowledge distillation from this model_state.pth (or checkpoint.pth), any arch, rebuilt '
                            'from the config.json beside it (arXiv 1503.02531); see --kd_temperature, --kd_alpha')
    group.add_argument('--predict', nargs='+', metavar='IMAGE',
                       help='print the --topk classes of each image (PNG/JPEG) under the model --weights, then exit')
    group.add_argument('--weights', metavar='MODEL_STATE',
                       help='--predict: model_state.pth or checkpoint.pth (arch, flags and dataset from the '
                            'config.json beside it, or from the command line)')
    group.add_argument('--topk', type=int, default=5, help='--predict: classes printed per image')
    add_model_flags(group)

    group = parser.add_argument_group('Optimization')
    group.add_argument('--epochs', type=number, default=160,
                       help='training epochs; may be fractional (e.g. 9.9: the last epoch stops early)')
    group.add_argument('--total_steps', type=int, default=None,
                       help='train for exactly this many steps instead of --epochs')
    group.add_argument('--batch_size', type=int, default=128,
                       help='global batch: under torchrun each of the N ranks takes batch_size / N images of '
                            'every step (the learning rate is not rescaled)')
    group.add_argument('--optimizer', default='sgd', choices=list(optim.OPTIMIZER_CHOICES),
                       help='muon: Muon (torch.optim.Muon, torch 2.9+) for the convolution filters, SGD with '
                            '--base_lr/--momentum for the other parameters')
    group.add_argument('--base_lr', type=float, default=0.1)
    group.add_argument('--weight_decay', type=float, default=1e-4)
    _switch(group, '--no_weight_decay_on_bn', 'no weight decay on BN parameters and biases')
    _switch(group, '--bn_weight_freeze', 'keep BN scales fixed at their initial value (fast recipe)')
    group.add_argument('--bn_bias_lr_factor', type=float, default=1.0,
                       help='BN biases train with lr x this and weight decay / this (fast recipe)')
    group.add_argument('--head_lr_factor', type=float, default=1.0,
                       help='the last linear layer trains with lr x this and weight decay / this (airbench)')
    group.add_argument('--muon_lr', type=float, default=0.24, help='muon: learning rate of the filters')
    group.add_argument('--muon_momentum', type=float, default=0.6, help='muon: momentum of the filters')
    group.add_argument('--muon_ns_steps', type=int, default=3, help='muon: Newton-Schulz iterations')
    _switch(group, '--muon_normalize_weights', 'muon: rescale each filter bank to norm sqrt(out) before '
            'its update (airbench94_muon)', True)
    group.add_argument('--whiten_bias_epochs', type=float, default=None,
                       help='airbench: the patch-whitening bias trains (on its own copy of the schedule) '
                            'for this many epochs only')
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--nesterov', type=str2bool, nargs='?', const=True, default=True)
    group.add_argument('--betas', type=json_list, default=[0.9, 0.999], help='adam/adamw/adabound betas')
    group.add_argument('--adabound_final_lr', type=float, default=0.1)
    group.add_argument('--adabound_gamma', type=float, default=1e-3)
    _switch(group, '--use_sam', 'sharpness-aware minimization around the chosen optimizer (arXiv 2010.01412)')
    group.add_argument('--sam_rho', type=float, default=None,
                       help='SAM neighbourhood radius (default: 0.05, or 0.5 with --sam_adaptive, the authors\' '
                            'CIFAR-10 values)')
    _switch(group, '--sam_adaptive', 'adaptive SAM (ASAM, arXiv 2102.11600)')
    group.add_argument('--asam_eta', type=float, default=0.01,
                       help='ASAM: T_w = |w| + eta on the parameters named *weight* (SamsungLabs/ASAM asam.py)')
    _switch(group, '--sam_freeze_bn_stats', 'SAM: the second forward pass (at w + e) leaves BatchNorm running '
            'statistics alone (davda54/sam bypass_bn); false: both passes update them', True)
    group.add_argument('--lars_eps', type=float, default=1e-9,
                       help='lars: trust ratio ||w|| / (eps + ||g|| + wd ||w||) (the original tool\'s LARS)')
    group.add_argument('--lars_thresh', type=float, default=1e-2,
                       help='lars: trust ratio 1 for tensors with ||w|| below this (fresh biases, BN shifts)')
    group.add_argument('--gradient_clip', type=float, default=0.0, help='max gradient norm; 0 = off')
    group.add_argument('--ema_every', type=int, default=1,
                       help='update the EMA every K steps (with decay**K, the same horizon)')
    group.add_argument('--lookahead_every', type=int, default=0,
                       help='airbench94 lookahead: every K steps average the weights into a slow copy and '
                            'continue from it (0 = off)')
    group.add_argument('--lookahead_decay', type=float, default=0.95,
                       help='lookahead decay per step; ramps up as (step/total)^3')
    group.add_argument('--ema_decay', type=float, default=0.0,
                       help='exponential moving average of weights; 0 = off (e.g. 0.999)')
    group.add_argument('--subdivision', type=int, default=1,
                       help='ghost batch norm: split each batch into N sub-batches, accumulate gradients')
    group.add_argument('--precision', default='fp32', choices=['fp32', 'fp16', 'bf16', *PRECISION_ALIASES],
                       help='torch.amp autocast dtype (fp16 uses a GradScaler). Legacy apex names: '
                            'O0 = fp32, O1/O2/O3 = fp16 mixed precision')
    group.add_argument('--lr_finder', action='store_true',
                       help='run a learning-rate range test instead of training; writes lr_finder.json/png')

    group = parser.add_argument_group('Learning-rate schedule (stepped every iteration)')
    group.add_argument('--scheduler', default='multistep',
                       choices=['none', 'multistep', 'cosine', 'sgdr', 'linear', 'polynomial'])
    group.add_argument('--milestones', type=json_list, default=[80, 120], help='multistep: epochs')
    group.add_argument('--lr_decay', type=float, default=0.1, help='multistep factor')
    group.add_argument('--lr_min', type=float, default=0.0, help='final lr of cosine/sgdr/linear/polynomial')
    group.add_argument('--lr_end_factor', type=float, default=None,
                       help='final lr of the decaying schedules as a fraction of each group\'s lr '
                            '(instead of the absolute --lr_min)')
    group.add_argument('--T0', type=int, default=10, help='sgdr: first period in epochs')
    group.add_argument('--T_mul', type=int, default=1, help='sgdr: period multiplier')
    group.add_argument('--poly_power', type=float, default=1.0, help='polynomial decay power')
    group.add_argument('--warmup_epochs', type=float, default=0)
    group.add_argument('--warmup_method', default='linear', choices=list(optim.WARMUP_METHODS),
                       help='linear: s + (1 - s) t; exponential: s + (1 - s) t^warmup_exponent (the original '
                            'tool\'s); geometric: s^(1 - t); s = --warmup_start_factor, t = warmup progress')
    group.add_argument('--warmup_start_factor', type=float, default=1e-3, help='lr factor at step 0 of warmup')
    group.add_argument('--warmup_exponent', type=float, default=4.0, help='exponential warmup: power of t')
    _switch(group, '--milestones_after_warmup', 'multistep: count --milestones from the end of warmup (the '
            'original tool); false: from the start of training (torch MultiStepLR, Goyal et al.)', True)

    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default='CIFAR10', choices=dataloader.DATASET_CHOICES)
    group.add_argument('--dataset_dir', default=None,
                       help='root holding cifar-10-batches-py/, MNIST/raw/, ... (default ~/.torchvision/datasets/NAME)')
    group.add_argument('--download', action='store_true', default=None,
                       help='fetch a missing built-in dataset with torchvision (checksum verified) into '
                            '--dataset_dir; the default unless --no-download or '
                            f'{dataloader.OFFLINE_ENV}=1')
    group.add_argument('--no-download', dest='download', action='store_false', default=None,
                       help='never fetch: a missing dataset is an error saying where to place its files')
    group.add_argument('--image_size', type=int, help='ImageFolder: resize images to this size')
    group.add_argument('--data_pipeline', default='device', choices=['device', 'workers'],
                       help='device: dataset held on the training device, batched augmentation; '
                            'workers: per-sample DataLoader with worker processes')
    group.add_argument('--num_workers', type=int, default=2)
    group.add_argument('--val_ratio', type=float, default=0.0,
                       help='hold out this part of the training set and evaluate on it instead of the test set')
    group.add_argument('--test_batch_size', type=int, default=None)
    _switch(group, '--use_random_crop', 'pad and randomly crop (default on; off by default with RICAP)', True)
    group.add_argument('--random_crop_padding', type=int, default=4)
    group.add_argument('--padding_mode', default='zeros', choices=['zeros', 'reflect'],
                       help='random crop padding; reflect is airbench\'s random translation')
    _switch(group, '--use_horizontal_flip', 'random horizontal flip (datasets where it applies)', True)
    _switch(group, '--alternating_flip', 'flip each image on every other epoch instead of at random '
            '(airbench, arXiv 2404.00498)')

    group = parser.add_argument_group('Augmentation and regularization')
    _switch(group, '--use_cutout', 'Cutout (arXiv 1708.04552)')
    group.add_argument('--cutout_size', type=int, default=16)
    group.add_argument('--cutout_prob', type=float, default=1.0)
    _switch(group, '--cutout_inside', 'keep the whole square inside the image')
    _switch(group, '--use_random_erasing', 'Random Erasing (arXiv 1708.04896)')
    group.add_argument('--random_erasing_prob', type=float, default=0.5)
    group.add_argument('--random_erasing_area_ratio_range', type=json_list, default=[0.02, 0.4])
    group.add_argument('--random_erasing_min_aspect_ratio', type=float, default=0.3)
    group.add_argument('--random_erasing_max_attempt', type=int, default=20)
    group.add_argument('--random_erasing_fill', default='mean', choices=augmentations.RANDOM_ERASING_FILLS,
                       help='mean: the per-channel mean pixel, 0 after normalization (the paper authors\' code); '
                            'random: a standard-normal value per pixel (the paper\'s random values, as torchvision); '
                            'uniform: one U(0,1) value per rectangle (the original tool, hysts)')
    _switch(group, '--use_mixup', 'Mixup (arXiv 1710.09412)')
    group.add_argument('--mixup_alpha', type=float, default=1.0)
    _switch(group, '--use_ricap', 'RICAP (arXiv 1811.09030)')
    group.add_argument('--ricap_beta', type=float, default=0.3)
    _switch(group, '--use_cutmix', 'CutMix (arXiv 1905.04899)')
    group.add_argument('--cutmix_alpha', type=float, default=1.0)
    _switch(group, '--use_dual_cutout', 'Dual-Cutout (arXiv 1802.07426)')
    group.add_argument('--dual_cutout_alpha', type=float, default=0.1)
    group.add_argument('--dual_cutout_distance', default='logits', choices=['logits', 'softmax'],
                       help='consistency term: MSE of the two views\' logits as in the paper authors\' code '
                            'and hysts, or squared distance of their softmax outputs')
    _switch(group, '--dual_cutout_joint_forward', 'forward both Dual-Cutout views in one pass of 2B images '
            '(shared BatchNorm statistics) instead of one pass per view as the paper authors\' code and hysts')
    _switch(group, '--use_label_smoothing', 'label smoothing (arXiv 1512.00567)')
    group.add_argument('--label_smoothing_epsilon', type=float, default=0.1)
    _switch(group, '--use_autoaugment', 'AutoAugment (arXiv 1805.09501), policy --autoaugment_policy')
    group.add_argument('--autoaugment_policy', default='cifar10', choices=list(augmentations.AUTOAUGMENT_POLICIES),
                       help='AutoAugment\'s policy learned on CIFAR-10, SVHN or ImageNet')
    _switch(group, '--use_randaugment', 'RandAugment (arXiv 1909.13719)')
    group.add_argument('--randaugment_ops', type=int, default=2, help='RandAugment: operations per image (N)')
    group.add_argument('--randaugment_magnitude', type=int, default=9,
                       help='RandAugment: magnitude of every operation (M, of 30)')
    _switch(group, '--use_trivialaugment', 'TrivialAugment (arXiv 2103.10158, torchvision\'s TrivialAugmentWide)')
    _switch(group, '--use_augmix', 'AugMix (arXiv 1912.02781) without its Jensen-Shannon loss')
    group.add_argument('--augmix_severity', type=int, default=3, help='AugMix: severity of the operations (1-10)')
    group.add_argument('--policy_group_size', type=int, default=8,
                       help='device pipeline: images that share one random draw of AutoAugment, RandAugment, '
                            'TrivialAugment or AugMix (torchvision draws once per call on a batch; 1: per image, '
                            'as the workers pipeline)')
    group.add_argument('--kd_temperature', type=float, default=4.0, help='--teacher: softmax temperature T')
    group.add_argument('--kd_alpha', type=float, default=0.9,
                       help='--teacher: loss = kd_alpha T^2 KL(teacher || student) + (1 - kd_alpha) x the loss of '
                            'the other regularizers')

    group = parser.add_argument_group('Run')
    group.add_argument('--outdir', help='run directory (required for training)')
    group.add_argument('--seed', type=int, default=17)
    group.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda if available)')
    group.add_argument('--gpu', type=int, default=None, help='shorthand for --device cuda:N')
    _switch(group, '--test_first', 'evaluate once before training (logged as epoch 0)')
    _switch(group, '--tensorboard', 'write TensorBoard scalars', True)
    group.add_argument('--no-tensorboard', dest='tensorboard', action='store_false')
    _switch(group, '--resume', 'continue the run in --outdir from its checkpoint.pth')
    group.add_argument('--dry_run', action='store_true',
                       help='build data and model, print the settings and parameter count, write nothing')
    group.add_argument('--evaluate', metavar='MODEL_STATE',
                       help='evaluate a saved model_state.pth on the test set (arch and flags from the '
                            'config.json beside it, or from the command line) and exit')
    group.add_argument('--tta', default='none', choices=['none', 'flip', 'flip_translate'],
                       help='test-time augmentation: flip averages each image and its mirror; flip_translate '
                            'also averages the mirrored pairs shifted one pixel up-left and down-right (airbench)')
    group.add_argument('--eval_every', type=int, default=1, help='evaluate every N epochs (and after the last)')
    group.add_argument('--save_every', type=int, default=1,
                       help='write checkpoint.pth every N epochs (and after the last)')
    group.add_argument('--save_every_steps', type=int, default=0,
                       help='also write checkpoint.pth every N training steps inside an epoch (0 = off); '
                            '--resume continues at that step with the same data order')
    group.add_argument('--skip_nonfinite', type=int, default=0,
                       help='skip the update of up to N training steps whose loss is NaN or infinite (counted '
                            'per epoch as nonfinite_steps in log.json); the run stops when more happen (0: at the '
                            'first)')
    _switch(group, '--channels_last', 'channels_last memory format for model and inputs')
    _switch(group, '--compile', 'torch.compile the forward pass and loss (the backward is compiled with them)')
    group.add_argument('--compile_mode', default=None, choices=['default', 'reduce-overhead', 'max-autotune'],
                       help='torch.compile mode (needs --compile)')
    _switch(group, '--sync_bn', 'under torchrun: BatchNorm statistics over the batch of all ranks (SyncBatchNorm, '
            'GPUs only); without it each rank normalizes its own images and every rank takes rank 0\'s running '
            'statistics at the end of each epoch')
    _switch(group, '--find_unused_parameters', 'under torchrun: DistributedDataParallel looks for parameters a step '
            'did not use (architectures that skip layers at random, such as resnet_stochastic_depth, need it; '
            'it costs a little time per step)')
    group.add_argument('--dist_backend', default='auto', choices=['auto', 'nccl', 'gloo'],
                       help='under torchrun: the process group backend (auto: nccl on GPUs, gloo on CPUs)')
    group.add_argument('--dist_timeout', type=float, default=600,
                       help='under torchrun: seconds a rank waits for the others in a collective operation '
                            'before the job fails (a rank that stopped answering)')
    return parser


_POSITIVE = Real(0, None, '(]')
_FRACTION = Real(0, 1, '[)')
_PROBABILITY = Real(0, 1)
_LIST = (1, None)
# The domain of every flag, model flags included: parse_args checks each setting against it, whether it
# came from the command line, a --config file or an arch's defaults, before anything is read or
# written. The relations between flags are checked in validate_args. tests/test_input_fuzz.py
# generates malformed command lines from these domains (Domain.invalid).
FLAG_DOMAINS = {
    # model
    'arch': Choice(models.list_models()),
    'config': Text(path=True, optional=True),
    'list_archs': Bool(),
    'init': Choice(models.common.INIT_SCHEMES, optional=True),
    'teacher': Text(path=True, optional=True),
    'predict': ListOf(Text(path=True), (1, None), example='["cat.png"]', optional=True),
    'weights': Text(path=True, optional=True),
    'topk': Int(1),
    'depth': Int(1, optional=True),
    'base_channels': Int(1, optional=True),
    'block_type': Choice(('basic', 'bottleneck'), optional=True),
    'n_channels': ListOf(Int(1), _LIST, optional=True),
    'n_layers': ListOf(Int(1), _LIST, optional=True),
    'use_bn': Bool(optional=True),
    'remove_first_relu': Bool(optional=True),
    'add_last_bn': Bool(optional=True),
    'preact_stage': ListOf(Bool(), _LIST, optional=True),
    'widening_factor': Int(1, optional=True),
    'drop_rate': Real(0, 1, '[)', optional=True),
    'growth_rate': Int(1, optional=True),
    'compression_rate': Real(0, 1, '(]', optional=True),
    'memory_efficient': Bool(optional=True),
    'pyramid_alpha': Int(0, optional=True),
    'cardinality': Int(1, optional=True),
    'shake_forward': Bool(optional=True),
    'shake_backward': Bool(optional=True),
    'shake_image': Bool(optional=True),
    'se_reduction': Int(1, optional=True),
    'use_shakedrop': Bool(optional=True),
    'shakedrop_survival': Real(0, 1, optional=True),
    'activation': Choice(('relu', 'celu'), optional=True),
    'celu_alpha': Real(0, None, '()', optional=True),
    'ghost_bn_splits': Int(1, optional=True),
    'head_scale': Real(0, None, '()', optional=True),
    'n_blocks': ListOf(Int(1), _LIST, optional=True),
    'width_multiplier': Real(0, None, '()', optional=True),
    'depth_multiplier': Real(0, None, '()', optional=True),
    'group_width': Int(1, optional=True),
    'drop_path_rate': Real(0, 1, '[)', optional=True),
    'patch_size': Int(1, optional=True),
    'embed_dim': Int(1, optional=True),
    'num_heads': Int(1, optional=True),
    'head_dim': Int(1, optional=True),
    'mlp_ratio': Real(0, None, '()', optional=True),
    'embed_dims': ListOf(Int(1), _LIST, optional=True),
    'window_size': Int(1, optional=True),
    # optimization
    'epochs': _POSITIVE,
    'total_steps': Int(1, optional=True),
    'batch_size': Int(1),
    'optimizer': Choice(optim.OPTIMIZER_CHOICES),
    'base_lr': _POSITIVE,
    'weight_decay': Real(0),
    'no_weight_decay_on_bn': Bool(),
    'bn_weight_freeze': Bool(),
    'bn_bias_lr_factor': _POSITIVE,
    'head_lr_factor': _POSITIVE,
    'muon_lr': _POSITIVE,
    'muon_momentum': _FRACTION,
    'muon_ns_steps': Int(1),
    'muon_normalize_weights': Bool(),
    'whiten_bias_epochs': Real(0, None, '(]', optional=True),
    'momentum': _FRACTION,
    'nesterov': Bool(),
    'betas': ListOf(_FRACTION, 2, example='[0.9,0.999]'),
    'adabound_final_lr': _POSITIVE,
    'adabound_gamma': _POSITIVE,
    'use_sam': Bool(),
    'sam_rho': Real(0, None, '(]', optional=True),
    'sam_adaptive': Bool(),
    'asam_eta': Real(0),
    'sam_freeze_bn_stats': Bool(),
    'lars_eps': Real(0),
    'lars_thresh': Real(0),
    'gradient_clip': Real(0),
    'ema_every': Int(1),
    'lookahead_every': Int(0),
    'lookahead_decay': _FRACTION,
    'ema_decay': _FRACTION,
    'subdivision': Int(1),
    'precision': Choice(['fp32', 'fp16', 'bf16', *PRECISION_ALIASES]),
    'lr_finder': Bool(),
    # learning-rate schedule
    'scheduler': Choice(optim.SCHEDULER_CHOICES),
    'milestones': ListOf(_POSITIVE, ordered=True, example='[80,120]'),
    'lr_decay': Real(0, 1, '(]'),
    'lr_min': Real(0),
    'lr_end_factor': Real(0, 1, optional=True),
    'T0': Int(1),
    'T_mul': Int(1),
    'poly_power': _POSITIVE,
    'warmup_epochs': Real(0),
    'warmup_method': Choice(optim.WARMUP_METHODS),
    'warmup_start_factor': Real(0, 1),
    'warmup_exponent': _POSITIVE,
    'milestones_after_warmup': Bool(),
    # data
    'dataset': Choice(dataloader.DATASET_CHOICES),
    'dataset_dir': Text(path=True, optional=True),
    'download': Bool(optional=True),
    'image_size': Int(1, optional=True),
    'data_pipeline': Choice(('device', 'workers')),
    'num_workers': Int(0),
    'val_ratio': _FRACTION,
    'test_batch_size': Int(1, optional=True),
    'use_random_crop': Bool(),
    'random_crop_padding': Int(0),
    'padding_mode': Choice(('zeros', 'reflect')),
    'use_horizontal_flip': Bool(),
    'alternating_flip': Bool(),
    # augmentation and regularization
    'use_cutout': Bool(),
    'cutout_size': Int(1),
    'cutout_prob': _PROBABILITY,
    'cutout_inside': Bool(),
    'use_random_erasing': Bool(),
    'random_erasing_prob': _PROBABILITY,
    'random_erasing_area_ratio_range': ListOf(Real(0, 1, '(]'), 2, ordered=True, example='[0.02,0.4]'),
    'random_erasing_min_aspect_ratio': Real(0, 1, '(]'),
    'random_erasing_max_attempt': Int(1),
    'random_erasing_fill': Choice(augmentations.RANDOM_ERASING_FILLS),
    'use_mixup': Bool(),
    'mixup_alpha': _POSITIVE,
    'use_ricap': Bool(),
    'ricap_beta': _POSITIVE,
    'use_cutmix': Bool(),
    'cutmix_alpha': _POSITIVE,
    'use_dual_cutout': Bool(),
    'dual_cutout_alpha': Real(0),
    'dual_cutout_distance': Choice(('logits', 'softmax')),
    'dual_cutout_joint_forward': Bool(),
    'use_label_smoothing': Bool(),
    'label_smoothing_epsilon': _FRACTION,
    'use_autoaugment': Bool(),
    'autoaugment_policy': Choice(augmentations.AUTOAUGMENT_POLICIES),
    'use_randaugment': Bool(),
    'randaugment_ops': Int(1),
    'randaugment_magnitude': Int(0, 30),
    'use_trivialaugment': Bool(),
    'use_augmix': Bool(),
    'augmix_severity': Int(1, 10),
    'policy_group_size': Int(1),
    'kd_temperature': _POSITIVE,
    'kd_alpha': _PROBABILITY,
    # run
    'outdir': Text(path=True, optional=True),
    'seed': Int(0, 2**63 - 1),
    'device': Text(pattern=r'(cpu|cuda|mps|xpu)(:[0-9]+)?', what='cpu, cuda or cuda:N', examples=['cpu'],
                   optional=True),
    'gpu': Int(0, optional=True),
    'test_first': Bool(),
    'tensorboard': Bool(),
    'resume': Bool(),
    'dry_run': Bool(),
    'evaluate': Text(path=True, optional=True),
    'tta': Choice(('none', 'flip', 'flip_translate')),
    'eval_every': Int(1),
    'save_every': Int(1),
    'save_every_steps': Int(0),
    'skip_nonfinite': Int(0),
    'channels_last': Bool(),
    'compile': Bool(),
    'compile_mode': Choice(('default', 'reduce-overhead', 'max-autotune'), optional=True),
    'sync_bn': Bool(),
    'find_unused_parameters': Bool(),
    'dist_backend': Choice(('auto', 'nccl', 'gloo')),
    'dist_timeout': _POSITIVE,
}


def check_domain(name, value, source=None):
    """Raise UsageError unless ``value`` lies in the domain of flag ``name``; ``source`` names where a
    value that did not come from the command line was read (a --config file, an arch's defaults)."""
    domain = FLAG_DOMAINS.get(name)
    if domain is None:
        raise UsageError(f'--{name} has no declared domain (add it to main.FLAG_DOMAINS)')
    try:
        domain.check(value)
    except ValueError:
        if source is None:
            raise UsageError(f'--{name} {flags.show(value)}: expected {domain.describe()}') from None
        kind = {bool: 'boolean', int: 'number', float: 'number', str: 'string', list: 'list', dict: 'object',
                type(None): 'null'}.get(type(value), type(value).__name__)
        expected = 'true or false' if isinstance(domain, Bool) else domain.describe()  # JSON's own booleans
        raise UsageError(f'{source}: "{name}": {json.dumps(value, default=str)} (a JSON {kind}): expected '
                         f'{expected} (--{name})') from None


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line naming the flag and its domain (FLAG_DOMAINS)."""

    def error(self, message):
        match = re.fullmatch(r"argument (\S+?)(?:/\S+)?: invalid (?:choice: |.*? value: )('.*?'|\".*?\")"
                             r"(?: \(choose from .*\))?", message, flags=re.DOTALL)
        if match:
            flag = match.group(1)
            action = self._option_string_actions.get(flag)
            domain = FLAG_DOMAINS.get(action.dest) if action is not None else None
            if domain is not None:
                try:
                    value = ast.literal_eval(match.group(2))
                except (ValueError, SyntaxError):
                    value = match.group(2)
                raise UsageError(f'{flag} {flags.show(value)}: expected {domain.describe()}')
        match = re.fullmatch(r'argument (\S+?)(?:/\S+)?: expected one argument', message)
        if match:
            action = self._option_string_actions.get(match.group(1))
            domain = FLAG_DOMAINS.get(action.dest) if action is not None else None
            if domain is not None:
                raise UsageError(f'{match.group(1)}: missing its value ({domain.describe()})')
        if message.startswith('unrecognized arguments: '):
            raise UsageError(f'unrecognized arguments: {" ".join(map(flags.show, getattr(self, "_unrecognized", [])))} '
                             f'(see --help for the flags)')
        raise UsageError(message)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        self._unrecognized = extras
        return parsed, extras


# Flags that never change what a run computes, so a resumed run may give them anew.
RUN_ONLY_FLAGS = {'outdir', 'resume', 'device', 'gpu', 'num_workers', 'tensorboard', 'dataset_dir',
                  'download', 'dry_run', 'evaluate', 'list_archs', 'predict', 'weights', 'topk', 'config',
                  'epochs', 'eval_every',
                  'save_every', 'compile', 'compile_mode', 'sync_bn', 'dist_backend', 'dist_timeout',
                  'find_unused_parameters', 'save_every_steps', 'skip_nonfinite'}
# Settings that may differ between the machines of a multi-node run; all others must be the same on every rank.
MACHINE_LOCAL_FLAGS = ('explicit', 'config', 'dataset_dir', 'num_workers', 'download')
# Every builder keyword argument is a flag (add_model_flags); these are their names.
MODEL_FLAGS = list(models.model_flags())


def parse_args(argv=None):
    """Resolve settings: defaults < arch defaults < --config < explicit flags, each checked against its
    domain (FLAG_DOMAINS), then their relations (validate_args). Reads at most the --config file."""
    parser = get_args_parser()
    defaults = {action.dest: action.default for action in parser._actions if action.dest != 'help'}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = vars(parser.parse_args(argv))
    for name, value in explicit.items():
        check_domain(name, value)

    from_config = {}
    if explicit.get('config'):
        source = f'--config {flags.show(explicit["config"])}'
        from_config = utils.load_json(explicit['config'], what='--config')
        if not isinstance(from_config, dict):
            raise UsageError(f'{source}: expected a JSON object of flag values, e.g. {{"epochs": 200}}, '
                             f'not a JSON {type(from_config).__name__}')
        unknown = sorted(set(from_config) - set(defaults) - {'config'})
        if unknown:
            raise UsageError(f'{source}: unknown setting(s) {", ".join(map(flags.show, unknown))}')
        if 'config' in from_config:
            raise UsageError(f'{source}: a --config file cannot name another --config file')
        for name, value in from_config.items():
            check_domain(name, value, source)

    arch = explicit.get('arch', from_config.get('arch', defaults['arch']))
    arch_defaults = models.train_defaults(arch)
    for name, value in arch_defaults.items():
        check_domain(name, value, f'--arch {arch} defaults')
    settings = {**defaults, **arch_defaults, **from_config, **explicit}
    given = set(from_config) | set(explicit)
    if settings['use_ricap'] and 'use_random_crop' not in given:
        settings['use_random_crop'] = False  # RICAP's paper setting; SPEC section 4 has both
    args = argparse.Namespace(**settings)
    args.explicit = sorted(given)
    validate_args(args)
    return args


def _exclusive(args, *names):
    """UsageError if more than one of the switches ``names`` is on."""
    on = [f'--{name}' for name in names if getattr(args, name)]
    if len(on) > 1:
        raise UsageError(f'{" and ".join(on)} cannot be combined: choose one')


def validate_args(args):
    """The relations between flags (each flag's own domain is FLAG_DOMAINS'); fills in derived defaults."""
    args.precision = PRECISION_ALIASES.get(args.precision, args.precision)
    if args.download is None:
        args.download = not dataloader.offline()
    if args.batch_size % args.subdivision:
        raise UsageError(f'--subdivision {args.subdivision} must divide --batch_size {args.batch_size}')
    if args.ghost_bn_splits and (args.batch_size // args.subdivision) % args.ghost_bn_splits:
        raise UsageError(f'--ghost_bn_splits {args.ghost_bn_splits} must divide the batch of '
                         f'{args.batch_size // args.subdivision} images each forward pass sees '
                         f'(--batch_size {args.batch_size}, --subdivision {args.subdivision})')
    fractional = args.total_steps is None and not float(args.epochs).is_integer()
    milestone_offset = args.warmup_epochs if args.milestones_after_warmup else 0
    if args.scheduler == 'multistep' and args.total_steps is None and (fractional or 'milestones' in args.explicit) \
            and any(m + milestone_offset > args.epochs for m in args.milestones):
        # with --total_steps the same check runs once the steps per epoch are known; milestones and warmup
        # from an arch's defaults are checked only when given (a short trial run of that arch is allowed)
        after = f' (counted after {args.warmup_epochs} warmup epochs)' if milestone_offset else ''
        raise UsageError(f'--milestones {flags.show(args.milestones)}: beyond the end of the {args.epochs}-epoch '
                         f'run{after}; expected epochs before the end')
    if args.total_steps is None and 'warmup_epochs' in args.explicit and args.warmup_epochs >= args.epochs:
        raise UsageError(f'--warmup_epochs {args.warmup_epochs}: expected fewer than --epochs {args.epochs} '
                         f'(warmup shorter than the run)')
    if args.lr_end_factor is not None and args.lr_min > 0:
        raise UsageError(f'--lr_end_factor {args.lr_end_factor} cannot be combined with --lr_min {args.lr_min}: '
                         f'choose one final learning rate')
    if args.warmup_method == 'geometric' and args.warmup_epochs > 0 and args.warmup_start_factor == 0:
        raise UsageError('--warmup_method geometric needs --warmup_start_factor in (0, 1], got 0')
    if args.sam_rho is None:
        args.sam_rho = optim.default_sam_rho(args.sam_adaptive)
    if args.use_sam and args.precision == 'fp16':
        raise UsageError('--use_sam with --precision fp16 is not supported (use bf16 or fp32)')
    if args.optimizer == 'muon':
        if not hasattr(torch.optim, 'Muon'):
            raise UsageError(f'--optimizer muon needs torch.optim.Muon (torch 2.9 or later); this is torch '
                             f'{torch.__version__}')
        if args.use_sam:
            raise UsageError('--use_sam does not combine with --optimizer muon')
    if args.compile_mode is not None and not args.compile:
        raise UsageError(f'--compile_mode {args.compile_mode} needs --compile')
    if args.whiten_bias_epochs is not None and not args.whiten_bias_epochs <= args.epochs:
        raise UsageError(f'--whiten_bias_epochs must be in (0, --epochs], got {args.whiten_bias_epochs}')
    if args.tta == 'flip_translate' and not dataloader.DATASETS.get(args.dataset, _IMAGE_FOLDER).horizontal_flip:
        raise UsageError(f'--tta flip_translate: {args.dataset} images are not flipped in training '
                         f'(digits and characters are not mirror-symmetric); use --tta none')
    if args.data_pipeline == 'workers' and (args.padding_mode == 'reflect' or args.alternating_flip):
        raise UsageError('--padding_mode reflect and --alternating_flip need --data_pipeline device')
    if args.image_size is not None and args.dataset != 'ImageFolder':
        size = dataloader.DATASETS[args.dataset].image_size
        raise UsageError(f'--image_size applies to --dataset ImageFolder only ({args.dataset} images are '
                         f'{size}x{size})')
    try:  # mixing methods exclusive, Dual-Cutout and Cutout, ...: the regularizer's own checks
        augmentations.BatchRegularizer.from_args(args, dataloader.DATASETS.get(args.dataset, _IMAGE_FOLDER).num_classes
                                                 or 10)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _exclusive(args, 'evaluate', 'resume')
    _exclusive(args, 'evaluate', 'lr_finder')
    _exclusive(args, 'evaluate', 'dry_run')
    _exclusive(args, 'lr_finder', 'dry_run')
    if args.gpu is not None:
        if args.device is not None and args.device != f'cuda:{args.gpu}':
            raise UsageError(f'--gpu {args.gpu} and --device {args.device} contradict each other: give one')
        args.device = f'cuda:{args.gpu}'
    if args.dataset_dir is None:
        args.dataset_dir = os.path.expanduser(os.path.join('~/.torchvision/datasets', args.dataset))
    validate_zoo_args(args)
    needs_outdir = not (args.list_archs or args.dry_run or args.evaluate or args.predict)
    if needs_outdir and not args.outdir:
        raise UsageError('--outdir is required (the run directory to write into)')


# options -> the switch (or switches, '|') without which they do nothing
POLICY_OPTIONS = {
    'autoaugment_policy': 'use_autoaugment', 'randaugment_ops': 'use_randaugment',
    'randaugment_magnitude': 'use_randaugment', 'augmix_severity': 'use_augmix',
    'policy_group_size': 'use_autoaugment|use_randaugment|use_trivialaugment|use_augmix',
    'kd_temperature': 'teacher', 'kd_alpha': 'teacher',
}


def validate_zoo_args(args):
    """The flags of the augmentation policies, distillation, --init and --predict."""
    try:
        augmentations.resolve_policy_switches(args, set(getattr(args, 'explicit', ())))
        augmentations.AugmentPolicy.from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    # an option of a policy or of distillation that is off would be ignored: a typo of the switch
    given = set(getattr(args, 'explicit', ()))
    for option, switch in POLICY_OPTIONS.items():
        if option in given and not any(getattr(args, flag) for flag in switch.split('|')):
            raise UsageError(f'--{option} {flags.show(getattr(args, option))}: applies only with '
                             f'{" or ".join("--" + flag for flag in switch.split("|"))}')
    for flag in ('teacher', 'weights'):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            raise UsageError(f'--{flag} {getattr(args, flag)}: no such file')
    if args.predict and not args.weights:
        raise UsageError('--predict needs --weights MODEL_STATE (a model_state.pth or checkpoint.pth)')


def resolve_device(name):
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name!r}: not a device (cpu, cuda, cuda:N)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine')
    return device


def check_distributed(args, dist, device):
    """Flags that depend on the launch (the same verdict on every rank), and the same settings on all ranks."""
    if args.sync_bn and not dist.enabled:
        raise UsageError('--sync_bn needs a distributed launch (torchrun --nproc_per_node N main.py ...)')
    if args.sync_bn and device.type != 'cuda':
        raise UsageError(f'--sync_bn: torch\'s SyncBatchNorm runs on GPUs only, not on {device.type}; '
                         f'without --sync_bn each rank normalizes its own images')
    ghost_bn_splits = getattr(args, 'ghost_bn_splits', None)  # a model flag (resnet9)
    if args.sync_bn and ghost_bn_splits and ghost_bn_splits > 1:
        raise UsageError('--sync_bn with --ghost_bn_splits: ghost batch norm normalizes small groups on purpose; '
                         'choose one')
    if dist.enabled and args.lr_finder:
        raise UsageError('--lr_finder runs in one process: start it without torchrun')
    if not args.dist_timeout > 0:
        raise UsageError(f'--dist_timeout must be positive, got {args.dist_timeout}')
    utils.check_same_settings(dist, vars(args), machine_local=MACHINE_LOCAL_FLAGS)


def rank_batch_size(args, dist):
    """This rank's part of the global --batch_size, which must split evenly into ranks x sub-batches."""
    if not dist.enabled:
        return args.batch_size
    parts = dist.world_size * args.subdivision
    if args.batch_size % parts:
        by = f'{dist.world_size} ranks' + (f' x --subdivision {args.subdivision}' if args.subdivision > 1 else '')
        raise UsageError(f'--batch_size {args.batch_size} is the global batch: it must split evenly into {by} '
                         f'(use a multiple of {parts})')
    per_rank = args.batch_size // dist.world_size
    ghost_bn_splits = getattr(args, 'ghost_bn_splits', None)  # a model flag (resnet9)
    if ghost_bn_splits and (per_rank // args.subdivision) % ghost_bn_splits:
        raise UsageError(f'--ghost_bn_splits {ghost_bn_splits} must divide the {per_rank // args.subdivision} '
                         f'images each forward pass of a rank sees (--batch_size {args.batch_size} over '
                         f'{dist.world_size} ranks, --subdivision {args.subdivision})')
    return per_rank


def model_kwargs(args):
    return {name: getattr(args, name) for name in MODEL_FLAGS}


def model_cost(arch, info, **model_kwargs):
    """(parameters, forward multiply-adds of one image) of ``arch`` at ``info``'s input size.

    The model is built on the meta device (shapes only, no memory, no initialization) and run in
    eval mode under ``torch.utils.flop_counter.FlopCounterMode``, which counts the FLOPs of
    convolutions, matrix products and attention, two per multiply-add; normalization, activations
    and pooling are not counted, as in the papers' figures (ResNet-20: 41 M, ResNet-110: 253 M).
    """
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):
        model = models.create_model(arch, num_classes=info.num_classes, in_channels=info.in_channels,
                                    image_size=info.image_size, **model_kwargs)
    model.eval()
    images = torch.empty(1, info.in_channels, info.image_size, info.image_size, device='meta')
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def list_archs(args):
    """--list_archs: every arch (or the --arch given, with the model flags given) with its parameters and
    forward multiply-adds at the --dataset's input size, its model flags and its training defaults."""
    info = dataloader.DATASETS.get(args.dataset)
    if info is None:  # an ImageFolder: its own classes and size where --dataset_dir holds one
        has_folder = os.path.isdir(os.path.join(args.dataset_dir, 'train'))
        info = (dataloader.dataset_info(args.dataset, args.dataset_dir, args.image_size) if has_folder else
                dataloader.DatasetInfo('ImageFolder', 3, args.image_size or 32, 10, (), (), True))
    given = {k: v for k, v in model_kwargs(args).items() if v is not None}
    names = [args.arch] if 'arch' in args.explicit else models.list_models()
    print(f'{info.name}: {info.in_channels}x{info.image_size}x{info.image_size} images, {info.num_classes} classes; '
          f'multiply-adds of one forward pass (torch.utils.flop_counter)')
    for name in names:
        try:
            n_params, macs = model_cost(name, info, **(given if 'arch' in args.explicit else {}))
        except models.ModelConfigError as error:
            raise UsageError(str(error)) from None
        params = {**models.model_params(name), **(given if 'arch' in args.explicit else {})}
        flags = ', '.join(f'--{k} {json.dumps(v)}' for k, v in params.items())
        defaults = ', '.join(f'{k}={json.dumps(v)}' for k, v in models.train_defaults(name).items())
        print(f'{name}: {n_params / 1e6:.2f} M parameters, {macs / 1e6:.1f} M multiply-adds\n'
              f'    model flags: {flags}\n    training defaults: {defaults}')


# ----------------------------------------------------------------------------- training

class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint: main.py prints the message, exits 128 + signal."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


# Non-finite losses are flagged on the device every step and read on the host at most every this many
# steps (and at each checkpoint and epoch end): the run stops within this many steps of a divergence.
NONFINITE_CHECK_EVERY = 100
# Under torchrun the ranks agree on a stop signal every this many steps (one tiny all-reduce).
STOP_CHECK_EVERY = 10
_NEVER = 2**62


class Trainer:
    """One optimization step and one evaluation pass, with AMP, ghost batches, SAM, EMA and torch.compile.

    A step regularizes the whole batch, splits it into --subdivision sub-batches (ghost batch norm,
    accumulated gradients) with ``regularizer.split`` and runs the model through
    ``regularizer.forward`` (one pass, or one per Dual-Cutout view).

    Nothing in a step reads a device value on the host: losses and accuracies are summed on the
    device and read once per epoch, so the host queues steps ahead of the GPU.

    Distributed (``dist`` enabled): the step runs ``network``, the model in DistributedDataParallel,
    whose backward averages the gradients of the ranks (once per step: the sub-batches before the
    last accumulate under ``no_sync``); ``model`` is the same module unwrapped, which the EMA,
    lookahead, evaluation and checkpoints use. The epoch's metrics are summed over the ranks and
    every rank takes rank 0's buffers at the end of each epoch (see :meth:`end_epoch`).
    """

    def __init__(self, model, optimizer, scheduler, regularizer, args, device, total_steps=None, network=None,
                 dist=utils.SINGLE_PROCESS):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.network = model if network is None else network
        self.dist = dist
        self.total_steps = total_steps
        self.regularizer, self.args, self.device = regularizer, args, device
        self.amp_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(args.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')
        self.ema = optim.create_ema(model, args.ema_decay, every=args.ema_every) if args.ema_decay > 0 else None
        self.lookahead = None
        if args.lookahead_every > 0:
            self.lookahead = optim.Lookahead(model, total_steps, args.lookahead_every, args.lookahead_decay)
        # --teacher: knowledge distillation from a saved model, in eval mode and without gradients
        self.teacher = build_teacher(args, device) if getattr(args, 'teacher', None) else None
        self.forward_loss, self.eval_forward = self._forward_loss, model
        self._compile_pending = {'train': False, 'eval': False}
        self.stop = None  # a utils.StopSignals while training
        self.last_nonfinite = None  # the last step's non-finite flag (a device bool)
        self.nonfinite_before = 0  # non-finite steps of the epochs before this one
        self._poisoned_steps = utils.test_nonfinite_steps()
        self._poison = False
        if args.compile:
            try:
                # the loss is traced with the forward pass, so AOTAutograd compiles its backward too
                self.forward_loss = torch.compile(self._forward_loss, mode=args.compile_mode)
                self.eval_forward = torch.compile(model, mode=args.compile_mode)
                self._compile_pending = {'train': True, 'eval': True}
            except Exception as error:  # no compiler toolchain, unsupported platform or python
                _compile_fallback_message(error, 'unavailable', dist)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _prepare(self, images):
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _forward_loss(self, images, targets):
        with self.autocast():
            logits = self.regularizer.forward(self.network, images)
            if self.teacher is not None:
                # the same (mixed, cut, two-view) images, under the same autocast, no graph kept; in
                # eval mode its logits do not depend on the batch, so one pass serves every view
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
        logits = logits.float()
        loss = self.regularizer.loss(logits, targets)
        if self.teacher is not None:
            distillation = augmentations.distillation_loss(logits, teacher_logits.float(), self.args.kd_temperature)
            loss = self.args.kd_alpha * distillation + (1 - self.args.kd_alpha) * loss
        return logits, loss

    def _first_call(self, kind, compiled_call, eager_call):
        """Run a compiled function for the first time; if compiling fails, say why once and go on eager.

        A failure is the compiler's only if the same call succeeds eagerly: an error that eager
        code raises too is a bug of the caller and propagates.
        """
        try:
            return compiled_call()
        except Exception as error:  # dynamo, inductor or a missing compiler toolchain
            result = eager_call()
            _compile_fallback_message(error, f'failed at the first {kind} step', self.dist)
            self.forward_loss, self.eval_forward = self._forward_loss, self.model
            self._compile_pending = {'train': False, 'eval': False}
            return result
        finally:
            self._compile_pending[kind] = False

    def compile_ahead(self, train_loader, test_loader):
        """Compile the training step and the evaluation forward before training, so that no
        epoch's time includes compilation; returns the seconds it took.

        One batch of each loader goes through them; the model's weights and buffers, the gradients
        and the random generators are restored afterwards, so training starts as without it. (A
        rank that holds no test batch has nothing to evaluate and compiles nothing for it.)
        """
        rng_state = utils.get_rng_state()
        model_state = {key: value.clone() for key, value in self.model.state_dict().items()}
        self._synchronize()
        start = time.perf_counter()
        self.network.train()
        images, labels = next(iter(train_loader))
        self._forward_backward(self._sub_batches(images, labels)[:1])
        self.optimizer.zero_grad(set_to_none=True)
        test_batch = next(iter(test_loader), None)
        if test_batch is not None:
            self.evaluate(_FixedBatch(*test_batch, test_loader.batch_size), gather=False)
        self._synchronize()
        elapsed = time.perf_counter() - start
        self.model.load_state_dict(model_state)
        utils.set_rng_state(rng_state)
        return elapsed

    def _forward_backward(self, chunks):
        """Accumulate gradients over ghost sub-batches; returns (loss, accuracy) of the batch."""
        batch_size = sum(len(targets) for _, targets in chunks)
        total_loss, total_correct = 0.0, 0.0
        for index, (images, targets) in enumerate(chunks):
            images = self._prepare(images)
            # DDP averages the gradients once per step, in the backward pass of the last sub-batch
            accumulate = self.network.no_sync() if index < len(chunks) - 1 and self.network is not self.model \
                else contextlib.nullcontext()
            with accumulate:
                if self._compile_pending['train']:
                    logits, loss = self._first_call('train', lambda: self.forward_loss(images, targets),
                                                    lambda: self._forward_loss(images, targets))
                else:
                    logits, loss = self.forward_loss(images, targets)
                if self._poison:  # test hook (TOOLKIT_TEST_NONFINITE_STEPS): a non-finite loss at a chosen step
                    loss = loss * float('nan')
                self.scaler.scale(loss * (len(targets) / batch_size)).backward()
            total_loss += loss.detach() * len(targets)
            total_correct += self.regularizer.accuracy(logits.detach(), targets) * len(targets)
        return total_loss / batch_size, total_correct / batch_size

    def _sub_batches(self, images, labels):
        """Regularize the whole batch (one mixing lambda and permutation, as the original tool's
        train.py), then split it into the --subdivision sub-batches of the step."""
        return self.regularizer.split(*self.regularizer(images, labels), self.args.subdivision)

    def train_step(self, images, labels):
        """One step; returns (loss, accuracy), device scalars, and sets :attr:`last_nonfinite`, a device
        bool, True where the loss was NaN or infinite (with --skip_nonfinite the step then leaves
        weights, buffers and optimizer state as they were)."""
        self._poison = bool(self._poisoned_steps) and self.scheduler.last_epoch + 1 in self._poisoned_steps
        snapshot = self._snapshot() if self.args.skip_nonfinite > 0 else None
        chunks = self._sub_batches(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss, accuracy = self._forward_backward(chunks)
        nonfinite = ~torch.isfinite(loss)
        if self.dist.enabled and snapshot is not None:  # every rank skips the step that any rank found bad
            nonfinite = self.dist.all_reduce_max_(nonfinite.to(torch.int32)).bool()
        utils.kill_point('step')
        if self.args.use_sam:
            self.optimizer.first_step(zero_grad=True)
            with optim.frozen_bn_statistics(self.model, enabled=self.args.sam_freeze_bn_stats):
                self._forward_backward(chunks)
            self._clip()
            self.optimizer.second_step(zero_grad=False)
        else:
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if snapshot is not None:
            self._restore_if(nonfinite, snapshot)
        self.scheduler.step()
        if self.lookahead is not None:
            self.lookahead.step(self.scheduler.last_epoch)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.last_nonfinite = nonfinite
        return loss, accuracy

    def _state_tensors(self):
        """The tensors a step changes: parameters, buffers and the optimizer's state (of SAM's base
        optimizer, Muon's two optimizers and its filter matrices too)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        pending, seen = [self.optimizer], set()
        while pending:
            optimizer = pending.pop()
            if id(optimizer) in seen:
                continue
            seen.add(id(optimizer))
            for state in optimizer.state.values():
                tensors += [value for value in state.values() if torch.is_tensor(value)]
            for value in vars(optimizer).values():
                if isinstance(value, torch.optim.Optimizer):
                    pending.append(value)
                elif isinstance(value, list) and value and all(torch.is_tensor(item) for item in value):
                    tensors += value
        unique = {}
        for tensor in tensors:
            unique.setdefault(id(tensor), tensor)
        return list(unique.values())

    @torch.no_grad()
    def _snapshot(self):
        return {id(tensor): tensor.detach().clone() for tensor in self._state_tensors()}

    @torch.no_grad()
    def _restore_if(self, nonfinite, snapshot):
        """Undo the step on the device where ``nonfinite`` (no host sync, as GradScaler skips a step):
        every tensor goes back to its snapshot; state the step created starts from zero."""
        for tensor in self._state_tensors():
            saved = snapshot.get(id(tensor))
            if saved is None:
                saved = torch.zeros_like(tensor)
            tensor.copy_(torch.where(nonfinite.to(tensor.device), saved, tensor))

    def _clip(self):
        if self.args.gradient_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.gradient_clip)

    def _synchronize(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def train_one_epoch(self, loader, epoch, progress, position=None, save_position=None):
        """Train one epoch; from the step that ``position`` (a mid-epoch checkpoint's) reached, if given.

        ``save_position(position)``, if given, writes a mid-epoch checkpoint: every
        --save_every_steps steps, and when a stop signal came (then :class:`Interrupted` is raised
        after it). A position holds what the rest of the epoch needs to run as the uninterrupted one:
        the step, the epoch's order of images, and each rank's partial meters and non-finite counters.
        """
        self.network.train()
        loss_meter, accuracy_meter = utils.AverageMeter(), utils.AverageMeter()
        nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        first_nonfinite = torch.full((), _NEVER, dtype=torch.int64, device=self.device)
        bad_images = torch.zeros((), dtype=torch.int64, device=self.device)
        step, elapsed_before = 0, 0.0
        if position is not None:
            meters = position['meters'][self.dist.rank]
            step, elapsed_before = position['step'], position['train_time']
            loss_meter.total, accuracy_meter.total = (_to_device(meters['loss_total'], self.device),
                                                      _to_device(meters['accuracy_total'], self.device))
            loss_meter.count = accuracy_meter.count = meters['count']
            nonfinite, first_nonfinite, bad_images = (_to_device(meters[key], self.device) for key in
                                                      ('nonfinite', 'first_nonfinite', 'bad_images'))
        every = self.args.save_every_steps
        timer = utils.DeviceTimer(self.device)
        last_shown = time.perf_counter()

        def current_position():
            self._check_nonfinite(epoch, nonfinite, first_nonfinite)  # never save NaN weights
            mine = {'loss_total': loss_meter.total, 'accuracy_total': accuracy_meter.total, 'count': loss_meter.count,
                    'nonfinite': nonfinite, 'first_nonfinite': first_nonfinite, 'bad_images': bad_images}
            # on the host before they travel to rank 0: another machine's GPU cannot be named in the checkpoint
            mine = {key: value.cpu() if torch.is_tensor(value) else value for key, value in mine.items()}
            return {'epoch': epoch, 'step': step, 'order': loader.order.cpu(),
                    'train_time': elapsed_before + timer.elapsed(),
                    'meters': self.dist.all_gather_object(mine), 'world_size': self.dist.world_size}

        bar = progress(loader, f'epoch {epoch} train')
        for images, labels in bar:
            # the scheduler counts the steps taken: a fractional last epoch stops at the budget
            if self.total_steps is not None and self.scheduler.last_epoch >= self.total_steps:
                break
            loss, accuracy = self.train_step(images, labels)
            bad = self.last_nonfinite
            step += 1
            loss_meter.update(torch.where(bad, 0.0, loss), len(labels))
            accuracy_meter.update(torch.where(bad, 0.0, accuracy), len(labels))
            nonfinite += bad
            first_nonfinite = torch.minimum(first_nonfinite, torch.where(bad, step, _NEVER))
            bad_images += bad * len(labels)
            if step % NONFINITE_CHECK_EVERY == 0:
                self._check_nonfinite(epoch, nonfinite, first_nonfinite)
            signum = self.stop_requested(step)
            if signum or (every and self.scheduler.last_epoch % every == 0 and step < len(loader)):
                if save_position is not None:
                    save_position(current_position())
                if signum:
                    raise Interrupted(signum, f'stopped by {utils.signal_name(signum)} in epoch {epoch} after step '
                                              f'{step}; checkpoint.pth resumes at that step')
            # reading the running loss waits for the GPU: at most once every 10 s
            if not bar.disable and time.perf_counter() - last_shown > 10:
                bar.set_postfix(loss=f'{loss_meter.average:.4f}', acc=f'{accuracy_meter.average:.4f}')
                last_shown = time.perf_counter()
        elapsed = elapsed_before + timer.elapsed()
        epoch_nonfinite = self._check_nonfinite(epoch, nonfinite, first_nonfinite)
        bad_count = int(self.dist.all_reduce_sum_(bad_images.clone()))
        loss, accuracy, count = self.end_epoch(loss_meter, accuracy_meter, bad_count)
        if not math.isfinite(loss):
            raise FloatingPointError(f'training loss became {loss} in epoch {epoch}')
        return {'train_loss': loss, 'train_accuracy': accuracy, 'train_time': elapsed,
                'train_images_per_sec': count / elapsed, 'nonfinite_steps': epoch_nonfinite}

    def stop_requested(self, step=None):
        """The signal number a stop signal asked for (0: none). Single process: a Python attribute the
        handler set. Distributed: the ranks agree every STOP_CHECK_EVERY steps (and at ``step`` None)."""
        if self.stop is None:
            return 0
        if not self.dist.enabled:
            return self.stop.signum or 0
        if step is not None and step % STOP_CHECK_EVERY:
            return 0
        flag = torch.tensor([self.stop.signum or 0], dtype=torch.int64, device=self.device)
        return int(self.dist.all_reduce_max_(flag))

    def _check_nonfinite(self, epoch, nonfinite, first_nonfinite):
        """Read the device's non-finite counters (a host sync: every NONFINITE_CHECK_EVERY steps, at
        checkpoints and at the epoch's end); raise FloatingPointError once more than --skip_nonfinite
        steps of the run had a non-finite loss. Returns this epoch's count."""
        count = int(nonfinite)
        if self.dist.enabled and self.args.skip_nonfinite == 0:  # without skipping each rank flags its own loss
            count = int(self.dist.all_reduce_max_(nonfinite.clone()))
        if self.nonfinite_before + count > self.args.skip_nonfinite:
            first = int(first_nonfinite)
            if self.dist.enabled:
                first = -int(self.dist.all_reduce_max_(-first_nonfinite.clone()))
            limit = (f'{self.nonfinite_before + count} non-finite steps in this run, more than --skip_nonfinite '
                     f'{self.args.skip_nonfinite}' if self.args.skip_nonfinite else '--skip_nonfinite N skips such steps')
            raise FloatingPointError(f'non-finite training loss at epoch {epoch}, step {first} ({limit})')
        return count

    def end_epoch(self, loss_meter, accuracy_meter, skipped_images=0):
        """The epoch's mean loss, accuracy and image count over all ranks; then every rank takes rank
        0's buffers (BatchNorm statistics, which each rank gathered from its own images; the EMA's
        and the lookahead copies' too), so that what is evaluated and saved is defined, and a run
        resumed from the checkpoint continues exactly as the uninterrupted one."""
        if not self.dist.enabled:
            count = max(loss_meter.count - skipped_images, 1)
            return float(loss_meter.total) / count, float(accuracy_meter.total) / count, loss_meter.count
        totals = torch.stack([torch.as_tensor(meter.total, dtype=torch.float64, device=self.device)
                              for meter in (loss_meter, accuracy_meter)]
                             + [torch.tensor(float(loss_meter.count), dtype=torch.float64, device=self.device)])
        loss_total, accuracy_total, count = self.dist.all_reduce_sum_(totals).tolist()
        buffers = list(self.model.buffers())
        if self.ema is not None:
            buffers += list(self.ema.module.buffers())
        if self.lookahead is not None:
            buffers += self.lookahead.slow
        self.dist.broadcast_tensors_(buffers)
        good = max(count - skipped_images, 1)
        return loss_total / good, accuracy_total / good, int(count)

    def evaluate(self, loader, model=None, progress=None, description='test', gather=True):
        """:func:`evaluate` of ``model`` (default: the trained model, compiled with --compile), over
        the test images of all ranks (``gather=False``: this rank's only)."""
        model = self.model if model is None else model
        forward = self.eval_forward if model is self.model else model

        def run(forward_fn, pad):
            return evaluate(model, loader, self.device, self.args.tta, self.autocast, self.args.channels_last,
                            progress, description, forward=forward_fn, pad_batches=pad,
                            dist=self.dist if gather else utils.SINGLE_PROCESS)
        if forward is not model and self._compile_pending['eval']:
            return self._first_call('eval', lambda: run(forward, True), lambda: run(model, False))
        return run(forward, forward is not model)


def _to_device(value, device):
    return value.to(device) if torch.is_tensor(value) else value


class _FixedBatch(list):
    """One evaluation batch with the batch size of the loader it came from."""

    def __init__(self, images, labels, batch_size):
        super().__init__([(images, labels)])
        self.batch_size = batch_size


def _compile_fallback_message(error, what, dist=utils.SINGLE_PROCESS):
    first_line = (str(error).strip().splitlines() or [''])[0][:200]
    dist.print(f'--compile: torch.compile {what} ({type(error).__name__}: {first_line}); running eager',
               file=sys.stderr)


def tta_logits(forward, images, tta):
    """Logits averaged over test-time views: none, flip (image and mirror), or flip_translate
    (airbench, arXiv 2404.00498: the flip pair, averaged with the flip pairs of the image shifted
    one pixel up-left and one pixel down-right, reflect-padded)."""
    logits = forward(images).float()
    if tta == 'none':
        return logits
    logits = (logits + forward(images.flip(3)).float()) / 2
    if tta == 'flip':
        return logits
    height, width = images.shape[2:]
    padded = F.pad(images, (1, 1, 1, 1), mode='reflect')
    translated = [padded[:, :, :height, :width], padded[:, :, 2:, 2:]]
    shifted_logits = sum((forward(view).float() + forward(view.flip(3)).float()) / 2 for view in translated) / 2
    return (logits + shifted_logits) / 2


@torch.no_grad()
def evaluate(model, loader, device, tta='none', autocast=contextlib.nullcontext, channels_last=False,
             progress=None, description='test', forward=None, pad_batches=False, dist=utils.SINGLE_PROCESS):
    """Mean cross-entropy and accuracy of ``model`` (run through ``forward``, e.g. its compiled form),
    with the test-time augmentation ``tta`` (see :func:`tta_logits`).

    ``pad_batches`` pads a short last batch to the loader's batch size, so a compiled forward
    sees one shape only; the padding rows are dropped before scoring.

    Distributed: each rank scores the batches its loader deals it (every test image once, none
    padded or repeated); the per-batch sums of all ranks are put back in single-process batch
    order and added up in float32 as one process adds them, so the result equals a one-process
    evaluation of the same weights with the same test batch size.
    """
    model.eval()
    forward = model if forward is None else forward
    batch_losses, batch_correct, count = [], [], 0
    timer = utils.DeviceTimer(device)
    batches = progress(loader, description) if progress else loader
    for images, labels in batches:
        batch_size = len(labels)
        if pad_batches and batch_size < loader.batch_size:
            images = F.pad(images, (0, 0, 0, 0, 0, 0, 0, loader.batch_size - batch_size))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = tta_logits(forward, images, tta)[:batch_size]
        batch_losses.append(F.cross_entropy(logits, labels, reduction='sum'))
        batch_correct.append((logits.argmax(1) == labels).sum())
        count += batch_size
        utils.kill_point('evaluate')
    # one read of the device per evaluation
    losses = torch.stack(batch_losses).cpu().numpy() if batch_losses else np.zeros(0, np.float32)
    correct = torch.stack(batch_correct).cpu().numpy() if batch_correct else np.zeros(0, np.int64)
    per_rank = dist.all_gather_object((losses, correct, count))
    losses = dataloader.merge_sharded_batches([list(rank_losses) for rank_losses, _, _ in per_rank])
    correct = dataloader.merge_sharded_batches([list(rank_correct) for _, rank_correct, _ in per_rank])
    count = sum(rank_count for _, _, rank_count in per_rank)
    total_loss = np.float32(0.0)
    for batch_loss in losses:  # in batch order, in float32: the sum one process computes
        total_loss = np.float32(total_loss + batch_loss)
    elapsed = timer.elapsed()
    return {'loss': float(total_loss) / count, 'accuracy': int(sum(correct)) / count,
            'time': elapsed, 'images_per_sec': count / elapsed}


class _LinePerUpdate:
    """A stream that turns tqdm's carriage returns into newlines, for logs redirected to a file."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        self.stream.write(text.replace('\r', '\n'))

    def flush(self):
        self.stream.flush()


def make_progress(enabled=True):
    """tqdm bars; when stderr is not a terminal, one plain line every 30 s instead of redraws."""
    from tqdm import tqdm
    is_terminal = sys.stderr.isatty()

    def progress(iterable, description):
        return tqdm(iterable, desc=description, total=len(iterable), leave=False, disable=not enabled,
                    dynamic_ncols=is_terminal, ncols=None if is_terminal else 100, ascii=not is_terminal,
                    mininterval=0.5 if is_terminal else 30.0,
                    file=sys.stderr if is_terminal else _LinePerUpdate(sys.stderr))
    return progress


# ----------------------------------------------------------------------------- run directory

class RunDirectory:
    """The files of one run: refuses to overwrite another run, writes atomically.

    In a distributed run rank 0 alone checks the directory (its verdict reaches every rank) and
    writes; on the other ranks the ``save_*`` methods write nothing, so a run has one set of files.
    """

    def __init__(self, outdir, resume, dist=utils.SINGLE_PROCESS, create=True):
        self.outdir = outdir
        self.checkpoint_path = os.path.join(outdir, 'checkpoint.pth')
        self.writes = dist.is_main
        self.dist = dist
        self.has_checkpoint = dist.run_on_main(lambda: self._check(resume))
        if create:
            self.create()

    def _check(self, resume):
        """The verdict on the directory, touching nothing: bad input must leave the disk as it was."""
        outdir = self.outdir
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise UsageError(f'--outdir {outdir}: exists and is not a directory')
        existing = os.path.abspath(outdir)  # the directory itself, or the nearest ancestor that exists
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UsageError(f'--outdir {outdir}: not writable ({existing} is not a directory)')
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f'--outdir {outdir}: not writable ({existing} is read-only)')
        has_checkpoint = os.path.isfile(self.checkpoint_path)
        if resume:
            utils.remove_temporaries(outdir)  # of a write that a kill interrupted
            if not has_checkpoint:
                # the run stopped before its first checkpoint (inside epoch 1, or before the first
                # --save_every epoch): nothing to restore, so it starts again and rewrites its log
                print(f'--resume: no checkpoint in {outdir} yet; starting from epoch 1', file=sys.stderr)
        elif os.path.isdir(outdir) and os.listdir(outdir):
            raise UsageError(f'--outdir {outdir}: not empty; pass --resume to continue that run '
                             f'or choose another directory')
        return has_checkpoint

    def create(self):
        """Make the directory, once every check of the input has passed."""
        self.dist.run_on_main(self._create)

    def _create(self):
        outdir = self.outdir
        try:
            os.makedirs(outdir, exist_ok=True)
            probe = os.path.join(outdir, '.write-test')
            with open(probe, 'w'):
                pass
            os.remove(probe)
        except OSError as error:
            raise UsageError(f'--outdir {outdir}: not writable ({error.strerror or error})') from None

    def path(self, name):
        return os.path.join(self.outdir, name)

    def save_json(self, obj, name):
        if self.writes:
            utils.save_json(obj, self.path(name))

    def save_checkpoint(self, state):
        """checkpoint.pth, atomically (torch.save to a temporary file, then rename)."""
        if self.writes:
            utils.save_checkpoint(state, self.checkpoint_path)

    def save_weights(self, state_dict, name):
        """model_state.pth, atomically as the checkpoint."""
        if self.writes:
            utils.save_weights(state_dict, self.path(name))


def summarize(log, split):
    final = log[-1]
    best = max((record for record in log if f'{split}_accuracy' in record),
               key=lambda record: record[f'{split}_accuracy'])
    summary = {
        f'final_{split}_accuracy': final[f'{split}_accuracy'],
        f'final_{split}_error': 1 - final[f'{split}_accuracy'],
        f'best_{split}_accuracy': best[f'{split}_accuracy'],
        f'best_{split}_epoch': best['epoch'],
        'epochs': final['epoch'],
    }
    if split == 'test':
        summary['note'] = ('report final_test_accuracy; best_test_accuracy selects on the test set and is '
                           'optimistic (use --val_ratio for model selection)')
    return summary


def build_model(args, info, device):
    try:
        model = models.create_model(args.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                                    image_size=info.image_size, **model_kwargs(args))
    except models.ModelConfigError as error:
        raise UsageError(str(error)) from None
    if args.init is not None:
        models.common.reinitialize(model, args.init)
    model = model.to(device)
    if args.bn_weight_freeze:
        optim.freeze_norm_weights(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_checkpoint_for(path, flag):
    """utils.load_checkpoint, its one-line error naming the flag that pointed at the file."""
    try:
        return utils.load_checkpoint(path)
    except UsageError as error:
        raise UsageError(f'{flag}: {error}') from None


def run_evaluation(args, device, dist=utils.SINGLE_PROCESS):
    """--evaluate: rebuild the model from the config.json beside the weights and test it.

    MODEL_STATE is a model_state.pth or a checkpoint.pth, of a single-process or a distributed run
    (or another tool's state_dict with DistributedDataParallel's ``module.`` prefix). Under torchrun
    the ranks share the test set and rank 0 prints the result of all of them.
    """
    saved = saved_run_settings(args.evaluate)
    adopt_saved_settings(args, saved)
    state = dist.run_on_main(lambda: load_model_state(args.evaluate, '--evaluate'))
    with dist.agree():
        data = dataloader.build_data(args.dataset, args.dataset_dir, max(1, args.batch_size // dist.world_size),
                                     device, args.data_pipeline, args.num_workers, download=args.download,
                                     test_batch_size=args.test_batch_size, shard=(dist.rank, dist.world_size),
                                     seed=args.seed)
        model = build_model(args, data.info, device)
        load_weights(model, state, f'--evaluate: {args.evaluate}', saved, args, data.info)
    result = evaluate(model, data.test_loader, device, tta=args.tta, channels_last=args.channels_last, dist=dist)
    dist.print(f'{args.evaluate}: test accuracy {result["accuracy"]:.4f}, loss {result["loss"]:.4f} '
               f'({data.test_loader.num_samples} images, tta={args.tta})')
    return result


def saved_run_settings(weights_path):
    """The settings in the config.json beside ``weights_path`` ({} if there is none)."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), 'config.json')
    if not os.path.isfile(config_path):
        return {}
    return utils.load_json(config_path, what='config').get('settings', {})


def adopt_saved_settings(args, settings):
    """Take the arch, dataset and model flags of a saved run where the command line does not give them."""
    for name in ['arch', 'dataset', *MODEL_FLAGS]:
        if name not in args.explicit and name in settings:
            setattr(args, name, settings[name])


def load_model_state(path, flag):
    """The state_dict in a model_state.pth or in a checkpoint.pth's ``model``, without DDP's ``module.``;
    a file that is no checkpoint is refused in one line naming ``flag``."""
    state = load_checkpoint_for(path, flag)
    if isinstance(state, dict) and isinstance(state.get('model'), dict) and 'optimizer' in state:
        state = state['model']
    if isinstance(state, dict):
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, 'module.')
    return state


def build_teacher(args, device):
    """--teacher: the saved model, rebuilt from the arch and model flags in the config.json beside its
    weights (as --evaluate rebuilds a model), in eval mode, its parameters frozen.

    It must have been trained on the same --dataset: its logits are compared with the student's class by
    class. The Trainer runs it under the student's autocast (bf16 with --precision bf16) without grad.
    """
    settings = saved_run_settings(args.teacher)
    if 'arch' not in settings:
        raise UsageError(f'--teacher {args.teacher}: no config.json with the teacher\'s arch beside it')
    if settings.get('dataset', args.dataset) != args.dataset:
        raise UsageError(f'--teacher {args.teacher}: trained on {settings["dataset"]}, not --dataset {args.dataset}')
    arch = settings['arch']
    try:
        flags = {name: settings.get(name) for name in models.model_params(arch)}
        info = dataloader.dataset_info(args.dataset, args.dataset_dir, args.image_size)
        teacher = models.create_model(arch, num_classes=info.num_classes, in_channels=info.in_channels,
                                      image_size=info.image_size, **flags)
    except KeyError:
        raise UsageError(f'--teacher {args.teacher}: unknown arch {arch!r} in its config.json') from None
    except models.ModelConfigError as error:
        raise UsageError(f'--teacher {args.teacher}: {error}') from None
    load_weights(teacher, load_model_state(args.teacher, '--teacher'), f'--teacher: {args.teacher}', settings,
                 argparse.Namespace(**settings), info)
    teacher = teacher.to(device).eval().requires_grad_(False)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


# Class names of the built-in datasets, used where the dataset files hold none (CIFAR-10's batches.meta
# and CIFAR-100's meta hold theirs).
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
    caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
    flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
    maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
    snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
    tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
CLASS_NAMES = {
    'CIFAR10': CIFAR10_CLASSES, 'CIFAR100': CIFAR100_CLASSES, 'MNIST': tuple('0123456789'),
    'FashionMNIST': ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                     'Ankle boot'),
    # Kuzushiji-MNIST (arXiv 1812.01718): the hiragana of each class, romanized
    'KMNIST': ('o', 'ki', 'su', 'tsu', 'na', 'ha', 'ma', 'ya', 're', 'wo'),
}
_CIFAR_META = {'CIFAR10': ('cifar-10-batches-py', 'batches.meta', 'label_names'),
               'CIFAR100': ('cifar-100-python', 'meta', 'fine_label_names')}


def class_names(dataset, dataset_dirs):
    """The class names of ``dataset``: from CIFAR's meta file in the first of ``dataset_dirs`` that has
    one, the class folders of an ImageFolder, else the built-in lists."""
    import pickle
    for directory in [d for d in dataset_dirs if d]:
        if dataset in _CIFAR_META:
            folder, file_name, key = _CIFAR_META[dataset]
            path = os.path.join(directory, folder, file_name)
            if os.path.isfile(path):
                try:
                    with open(path, 'rb') as f:
                        names = pickle.load(f, encoding='latin1')[key]
                    if len(names) == dataloader.DATASETS[dataset].num_classes:
                        return tuple(names)
                except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError):
                    pass
        elif dataset == 'ImageFolder' and os.path.isdir(os.path.join(directory, 'train')):
            return tuple(sorted(entry.name for entry in os.scandir(os.path.join(directory, 'train')) if entry.is_dir()))
    return CLASS_NAMES.get(dataset)


def predict(args):
    """--predict: print the --topk classes of each image under the model --weights, one line per image.

    The arch, its flags and the dataset come from the config.json beside the weights unless given on
    the command line (as for --evaluate); each image is converted to the dataset's channels, resized to
    its input size and normalized with its statistics, as the test images were in training.
    """
    from PIL import Image, UnidentifiedImageError
    settings = saved_run_settings(args.weights)
    adopt_saved_settings(args, settings)
    dataset_dirs = [args.dataset_dir if 'dataset_dir' in args.explicit else None, settings.get('dataset_dir')]
    if args.dataset not in dataloader.DATASETS:
        directory = next((d for d in dataset_dirs if d), None)
        if directory is None:
            raise UsageError('--predict with an ImageFolder model needs --dataset_dir (its class folders and '
                             'normalization statistics)')
        args.dataset_dir = directory
    info = dataloader.dataset_info(args.dataset, args.dataset_dir, args.image_size or settings.get('image_size'))
    device = resolve_device(args.device)
    model = build_model(args, info, device)
    load_weights(model, load_model_state(args.weights, '--weights'), f'--weights: {args.weights}', settings, args,
                 info)
    model.eval()
    names = class_names(args.dataset, dataset_dirs) or tuple(str(i) for i in range(info.num_classes))
    transform = dataloader.build_sample_transform(info, train=False, from_pil=True, image_size=info.image_size)
    topk = min(args.topk, info.num_classes)
    for path in args.predict:
        try:
            with Image.open(path) as image:
                pixels = transform(image.convert('RGB' if info.in_channels == 3 else 'L'))
        except (OSError, UnidentifiedImageError) as error:
            raise UsageError(f'--predict {path}: cannot read the image ({error})') from None
        with torch.no_grad():
            probabilities = model(pixels[None].to(device)).float().softmax(dim=1)[0]
        values, indices = probabilities.topk(topk)
        ranked = ', '.join(f'{names[i]} {p:.3f}' for p, i in zip(values.tolist(), indices.tolist()))
        print(f'{path}: {ranked}')


def main(argv=None):
    args = parse_args(argv)
    if args.list_archs:
        list_archs(args)
        return
    if args.predict:
        predict(args)
        return
    # under torchrun: join the process group, one device per rank (a single process otherwise)
    dist, device = utils.init_distributed(resolve_device(args.device), args.dist_backend, args.dist_timeout)
    check_distributed(args, dist, device)
    if args.evaluate:
        run_evaluation(args, device, dist)
        return

    run = None
    resumed = bool(args.resume)
    if not args.dry_run:
        run = RunDirectory(args.outdir, args.resume, dist, create=False)  # made once all the input is checked
        args.resume = args.resume and run.has_checkpoint
        if args.resume:
            checkpoint = dist.run_on_main(lambda: load_checkpoint_for(run.checkpoint_path, '--resume'))
            args = restore_args(args, checkpoint)
    batch_size = rank_batch_size(args, dist)
    utils.set_seed(args.seed)  # the same on every rank: the model's initialization, the flip phases
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    if args.download and dist.enabled:
        with dist.agree():  # one process per machine fetches the files, before the others read them
            if dist.local_rank == 0:
                dataloader.fetch_dataset(args.dataset, args.dataset_dir)
    with dist.agree():  # bad input that one rank finds (its copy of the dataset) stops them all
        data = dataloader.build_data(
            args.dataset, args.dataset_dir, batch_size, device, args.data_pipeline, args.num_workers,
            args.use_random_crop, args.random_crop_padding, args.use_horizontal_flip,
            augmentations.AugmentPolicy.from_args(args),
            args.val_ratio, args.download, args.image_size, args.test_batch_size, args.padding_mode,
            'alternating' if args.alternating_flip else 'random', shard=(dist.rank, dist.world_size),
            seed=args.seed if dist.enabled else None)
        model = build_model(args, data.info, device)
        initialize_from_data(model, data.train_loader)
        try:
            regularizer = augmentations.BatchRegularizer.from_args(args, data.info.num_classes)
        except ValueError as error:
            raise UsageError(str(error)) from None
    n_params = utils.count_parameters(model)

    if args.dry_run:
        settings = {k: v for k, v in vars(args).items() if k != 'explicit'}
        dist.print(json.dumps(settings, indent=2, default=str))
        dist.print(f'{args.arch}: {n_params:,} parameters; {data.info.name}: '
                   f'{data.train_loader.num_samples} train / {data.test_loader.num_samples} {data.test_split_name} '
                   f'images, {len(data.train_loader)} steps per epoch on {device}'
                   + (f' ({dist.world_size} ranks of {batch_size} images)' if dist.enabled else ''))
        return

    # the one place where the model meets DistributedDataParallel (and SyncBatchNorm)
    model, network = utils.distribute(model, dist, device, sync_bn=args.sync_bn,
                                      find_unused_parameters=args.find_unused_parameters)
    if dist.enabled:
        utils.set_seed(args.seed + dist.rank)  # each rank augments (and drops out) with its own stream

    steps_per_epoch = len(data.train_loader)
    total_steps = args.total_steps or math.ceil(args.epochs * steps_per_epoch - 1e-9)
    milestone_offset = args.warmup_epochs if args.milestones_after_warmup else 0
    if args.total_steps and args.scheduler == 'multistep' and any(
            (m + milestone_offset) * steps_per_epoch > total_steps for m in args.milestones):
        raise UsageError(f'--milestones {flags.show(args.milestones)}: beyond the end of the run ({total_steps} '
                         f'steps of {steps_per_epoch} per epoch)')
    if args.total_steps and 'warmup_epochs' in args.explicit and args.warmup_epochs * steps_per_epoch >= total_steps:
        raise UsageError(f'--warmup_epochs {args.warmup_epochs}: expected fewer epochs than the run '
                         f'({total_steps} steps of {steps_per_epoch} per epoch)')
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = build_optimizer(model, args)
    try:
        scheduler = optim.build_scheduler(
            optimizer, scheduler=args.scheduler, epochs=total_steps / steps_per_epoch, steps_per_epoch=steps_per_epoch,
            milestones=args.milestones, lr_decay=args.lr_decay, lr_min=args.lr_min, T0=args.T0, T_mul=args.T_mul,
            poly_power=args.poly_power, warmup_epochs=args.warmup_epochs, warmup_method=args.warmup_method,
            warmup_start_factor=args.warmup_start_factor, lr_end_factor=args.lr_end_factor,
            warmup_exponent=args.warmup_exponent, milestones_after_warmup=args.milestones_after_warmup)
    except ValueError as error:
        raise UsageError(str(error)) from None
    trainer = Trainer(model, optimizer, scheduler, regularizer, args, device, total_steps, network=network, dist=dist)
    if run is not None:
        run.create()
    if args.lr_finder:
        return run_lr_finder(model, optimizer, data, regularizer, run)

    log, start_epoch, position = [], 1, None
    if args.resume:
        log, start_epoch, position = restore_state(checkpoint, model, trainer)
    if resumed:
        run.save_json(log, 'log.json')  # the checkpoint's log is authoritative: drop epochs after it
    write_config(run, args, n_params, device, dist)
    if start_epoch > n_epochs:
        finals = ['model_state.pth', 'summary.json'] + (['model_state_ema.pth'] if trainer.ema is not None else [])
        if all(os.path.isfile(run.path(name)) for name in finals):
            dist.print(f'{args.outdir}: already trained for {n_epochs} epochs; nothing to do')
            return
        dist.print(f'{args.outdir}: already trained for {n_epochs} epochs; writing its final files')
        save_final(run, model, trainer, log, data.test_split_name, None)
        return
    compile_time = trainer.compile_ahead(data.train_loader, data.test_loader) if args.compile else None
    if compile_time is not None:
        dist.print(f'--compile: compiled in {compile_time:.1f}s (before the first timed step)', flush=True)

    progress = make_progress(enabled=dist.is_main)
    # a resumed run's TensorBoard drops the scalars of the epochs it runs again
    writer = make_tensorboard_writer(run, args.tensorboard, purge_step=start_epoch if resumed else None)
    split = data.test_split_name
    with utils.StopSignals() as stop:
        trainer.stop = stop
        if args.test_first and start_epoch == 1 and position is None:
            result = trainer.evaluate(data.test_loader, progress=progress, description=split)
            dist.print(f'epoch 0: {split} loss {result["loss"]:.4f} acc {result["accuracy"]:.4f}')
            log.append({'epoch': 0, f'{split}_loss': result['loss'], f'{split}_accuracy': result['accuracy']})
        try:
            train_epochs(run, args, model, trainer, data, log, writer, progress, start_epoch, n_epochs, position,
                         compile_time)
        except Interrupted as interrupted:
            raise Interrupted(interrupted.signum, f'{interrupted}; resume with: {resume_command(argv, dist)}') from None

    save_final(run, model, trainer, log, split, writer)


def save_final(run, model, trainer, log, split, writer):
    """The files of a finished run: model_state.pth (and the EMA's), summary.json."""
    run.save_weights(model.state_dict(), 'model_state.pth')
    if trainer.ema is not None:
        run.save_weights(trainer.ema.module.state_dict(), 'model_state_ema.pth')
    run.save_json(summarize([r for r in log if r['epoch'] > 0], split), 'summary.json')
    if writer is not None:
        writer.close()


def train_epochs(run, args, model, trainer, data, log, writer, progress, start_epoch, n_epochs, position,
                 compile_time):
    """Epochs ``start_epoch`` to ``n_epochs`` (the first from a mid-epoch ``position``, if given); a stop
    signal ends them with a checkpoint (mid-epoch, or of the epoch just finished) and :class:`Interrupted`."""
    split = data.test_split_name
    dist = trainer.dist
    trainer.nonfinite_before = sum(record.get('nonfinite_steps', 0) for record in log)
    for epoch in range(start_epoch, n_epochs + 1):
        data.train_loader.set_epoch(epoch)
        record = {'epoch': epoch, 'lr': trainer.optimizer.param_groups[0]['lr']}
        if position is not None:
            data.train_loader.start_at(position['order'], position['step'])
            record['lr'] = position['lr']

        def save_position(state, record=record, epoch=epoch):
            state['lr'] = record['lr']
            run.save_checkpoint(checkpoint_state(model, trainer, epoch - 1, args, log, position=state))

        record.update(trainer.train_one_epoch(data.train_loader, epoch, progress, position, save_position))
        position = None
        trainer.nonfinite_before += record['nonfinite_steps']
        if compile_time is not None and epoch == start_epoch:
            record['compile_time'] = compile_time
        record['train_accuracy_kind'] = 'lambda-weighted' if trainer.regularizer.mixes_labels else 'plain'
        last = epoch == n_epochs
        if last or epoch % args.eval_every == 0:
            record.update(evaluation_record(trainer, data.test_loader, split, log, record, progress))
        record['epoch_time'] = record['train_time'] + record.get(f'{split}_time', 0.0)
        log.append(record)
        signum = trainer.stop_requested()
        due = last or epoch % args.save_every == 0 or signum
        save_epoch(run, log, writer, checkpoint_state(model, trainer, epoch, args, log) if due else None)
        dist.print(epoch_line(record, n_epochs, split), flush=True)
        if signum and not last:
            raise Interrupted(signum, f'stopped by {utils.signal_name(signum)} after epoch {epoch}; checkpoint.pth '
                                      f'resumes at epoch {epoch + 1}')


def resume_command(argv=None, dist=utils.SINGLE_PROCESS):
    """The command line of this run with --resume (under torchrun, with its launcher)."""
    words = list(sys.argv) if argv is None else ['./main.py', *argv]
    if '--resume' not in words:
        words.append('--resume')
    command = shlex.join(words)
    if dist.enabled:
        command = f'torchrun --nproc_per_node {dist.world_size} {command}'
    return command


def evaluation_record(trainer, loader, split, log, record, progress):
    """Test (or validation) metrics of the model and its EMA, with the best epoch so far."""
    result = trainer.evaluate(loader, progress=progress, description=split)
    metrics = {f'{split}_{key}': value for key, value in result.items()}
    if trainer.ema is not None:
        ema_result = trainer.evaluate(loader, model=trainer.ema.module)
        metrics.update({f'ema_{split}_loss': ema_result['loss'], f'ema_{split}_accuracy': ema_result['accuracy']})
    best = max([r for r in log if f'{split}_accuracy' in r and r['epoch'] > 0] + [{**record, **metrics}],
               key=lambda r: r[f'{split}_accuracy'])
    metrics[f'best_{split}_accuracy'], metrics[f'best_{split}_epoch'] = best[f'{split}_accuracy'], best['epoch']
    return metrics


def save_epoch(run, log, writer, checkpoint):
    """The end-of-epoch writes: log.json, the checkpoint (when one is due) and TensorBoard scalars."""
    run.save_json(log, 'log.json')
    if writer is not None:  # before the checkpoint: a resumed run purges the scalars of epochs it repeats
        record = log[-1]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != 'epoch':
                writer.add_scalar(key.replace('_', '/', 1), value, record['epoch'])
        writer.flush()
    utils.kill_point('after_log')
    if checkpoint is not None:
        run.save_checkpoint(checkpoint)


def epoch_line(record, epochs, split):
    line = (f'epoch {record["epoch"]}/{epochs}: lr {record["lr"]:.4g} train loss {record["train_loss"]:.4f} '
            f'acc {record["train_accuracy"]:.4f}')
    if f'{split}_accuracy' in record:
        line += f' | {split} loss {record[f"{split}_loss"]:.4f} acc {record[f"{split}_accuracy"]:.4f}'
    return line + f' | {record["epoch_time"]:.1f}s'


def build_optimizer(model, args):
    try:
        return optim.build_optimizer(
            model, optimizer=args.optimizer, base_lr=args.base_lr, momentum=args.momentum,
            nesterov=args.nesterov, weight_decay=args.weight_decay, no_weight_decay_on_bn=args.no_weight_decay_on_bn,
            betas=tuple(args.betas), adabound_final_lr=args.adabound_final_lr, adabound_gamma=args.adabound_gamma,
            use_sam=args.use_sam, sam_rho=args.sam_rho, sam_adaptive=args.sam_adaptive,
            bn_bias_lr_factor=args.bn_bias_lr_factor, head_lr_factor=args.head_lr_factor,
            schedule_epochs=whitening_bias_schedule(model, args.whiten_bias_epochs),
            muon_lr=args.muon_lr, muon_momentum=args.muon_momentum, muon_ns_steps=args.muon_ns_steps,
            muon_normalize_weights=args.muon_normalize_weights, lars_eps=args.lars_eps,
            lars_thresh=args.lars_thresh, asam_eta=args.asam_eta)
    except ValueError as error:
        raise UsageError(str(error)) from None


def whitening_bias_schedule(model, whiten_bias_epochs):
    """{bias: epochs} for the patch-whitening layers' biases (airbench trains them for the first epochs)."""
    layers = [module for module in model.modules() if hasattr(module, 'initialize_from_images')]
    if whiten_bias_epochs is None:
        return None
    if not layers:
        raise UsageError('--whiten_bias_epochs: this --arch has no patch-whitening layer')
    return {layer.bias: whiten_bias_epochs for layer in layers}


def initialize_from_data(model, loader, max_images=5000):
    """Data-dependent initialization (airbench's patch whitening) from the first training images."""
    layers = [module for module in model.modules() if hasattr(module, 'initialize_from_images')]
    if not layers:
        return
    if hasattr(loader, 'images'):
        images = loader.normalize(loader.images[:max_images])
    else:
        batches, count = [], 0
        for batch, _ in loader:
            batches.append(batch)
            count += len(batch)
            if count >= max_images:
                break
        images = torch.cat(batches)[:max_images]
    for layer in layers:
        layer.initialize_from_images(images)


def checkpoint_state(model, trainer, epoch, args, log, position=None):
    """The full state after ``epoch`` complete epochs, and ``position`` inside the next one if given
    (a mid-epoch checkpoint: the step reached, the epoch's order, the partial meters)."""
    state = {
        'epoch': epoch,
        'model': model.state_dict(),
        'optimizer': trainer.optimizer.state_dict(),
        'scheduler': trainer.scheduler.state_dict(),
        'scaler': trainer.scaler.state_dict(),
        'rng': utils.get_rng_state(),
        'args': {k: v for k, v in vars(args).items()},
        'log': log,
    }
    if trainer.dist.enabled:
        # every rank's random stream (its augmentation), so that a resumed run draws what this one would
        state['rng_ranks'] = trainer.dist.all_gather_object(state['rng'])
        state['world_size'] = trainer.dist.world_size
    if trainer.ema is not None:
        state['ema'] = trainer.ema.state_dict()
    if trainer.lookahead is not None:
        state['lookahead'] = trainer.lookahead.state_dict()
    if position is not None:
        state['position'] = position
    return state


def restore_args(args, checkpoint):
    """A resumed run keeps its saved settings; only run-control flags (and --epochs) may change."""
    saved = checkpoint.get('args')
    if not isinstance(saved, dict):
        raise UsageError(f'--resume: {args.outdir}/checkpoint.pth holds no settings')
    changed = sorted(name for name in args.explicit
                     if name not in RUN_ONLY_FLAGS and name in saved and saved[name] != getattr(args, name))
    if changed:
        differences = ', '.join(f'--{name} {flags.show(getattr(args, name))} (saved run: {flags.show(saved[name])})'
                                for name in changed)
        raise UsageError(f'--resume: settings differ from the saved run: {differences}; a resumed run keeps its '
                         f'settings (start a new --outdir instead)')
    restored = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in RUN_ONLY_FLAGS}})
    restored.resume = True
    return restored


def describe_weights(state_dict, settings=None):
    """'resnet_preact depth 20 for 10 classes, 3 input channels': what a state_dict holds, from its
    settings (a checkpoint's or config.json's) where known, and from the shapes of its first
    convolution (input channels) and last linear layer (classes)."""
    name = 'weights'
    if settings:
        arch = settings.get('arch')
        known = models.model_params(arch) if arch in models.list_models() else {}
        name = ' '.join([str(arch)] + [f'{flag} {flags.show(settings[flag])}' for flag in ('depth', 'widening_factor')
                                       if settings.get(flag) is not None and flag in known])
    tensors = [value for value in state_dict.values() if torch.is_tensor(value)] if isinstance(state_dict, dict) else []
    convolutions = [value for value in tensors if value.dim() == 4]
    linears = [value for value in tensors if value.dim() == 2]
    shape = [f'for {linears[-1].shape[0]} classes'] if linears else []
    shape += [f'{convolutions[0].shape[1]} input channels'] if convolutions else []
    return f'{name} {", ".join(shape)}' if shape else name


def load_weights(model, state_dict, what, saved_settings, args, info):
    """``model.load_state_dict(state_dict)``, or a UsageError naming what the file holds and what this run
    builds (another architecture, class count or channel count) instead of a shape traceback."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as error:
        this_run = describe_weights(model.state_dict(), vars(args))
        raise UsageError(f'{what} is {describe_weights(state_dict, saved_settings)}; this run is {this_run} '
                         f'({info.name if info else args.dataset}); they do not fit '
                         f'({type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:160]})') from None


def restore_state(checkpoint, model, trainer):
    """Load a checkpoint of this run into the model and trainer; returns (log, first epoch to run,
    position inside that epoch or None).

    Each rank continues the random stream of the saved run's rank of the same number (a single
    process's is rank 0's); a rank the saved run did not have starts a stream of its own.
    """
    if not isinstance(checkpoint.get('model'), dict):
        raise UsageError('--resume: checkpoint.pth holds no model')
    load_weights(model, checkpoint['model'], '--resume: checkpoint.pth', checkpoint.get('args'), trainer.args, None)
    position = checkpoint.get('position')
    if position is not None and position.get('world_size', 1) != trainer.dist.world_size:
        raise UsageError(f'--resume: checkpoint.pth stopped inside epoch {position["epoch"]} with '
                         f'{position.get("world_size", 1)} process(es); resume it with as many (this run has '
                         f'{trainer.dist.world_size})')
    try:
        trainer.optimizer.load_state_dict(checkpoint['optimizer'])
        trainer.scheduler.load_state_dict(checkpoint['scheduler'])
        trainer.scaler.load_state_dict(checkpoint['scaler'])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(checkpoint['ema'])
        if trainer.lookahead is not None:
            trainer.lookahead.load_state_dict(checkpoint['lookahead'])
        rng_states = checkpoint.get('rng_ranks') or [checkpoint['rng']]
        if trainer.dist.rank < len(rng_states):
            utils.set_rng_state(rng_states[trainer.dist.rank])
        else:
            utils.set_seed(utils.derived_seed(trainer.args.seed, trainer.dist.rank, checkpoint['epoch']))
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f'--resume: checkpoint does not match this run ({type(error).__name__}: '
                         f'{str(error).splitlines()[0] if str(error) else ""})') from None
    return list(checkpoint['log']), checkpoint['epoch'] + 1, position


def write_config(run, args, n_params, device, dist=utils.SINGLE_PROCESS):
    config = {
        'settings': {k: v for k, v in vars(args).items() if k != 'explicit'},
        'explicit_flags': args.explicit,
        'n_params': n_params,
        'model_flags': {k: getattr(args, k) for k in models.model_params(args.arch) if getattr(args, k) is not None},
        'command_line': ' '.join(shlex.quote(a) for a in sys.argv),
        'environment': utils.environment_info(device),
    }
    if dist.enabled:
        per_rank = args.batch_size // dist.world_size
        config['distributed'] = {
            'world_size': dist.world_size, 'backend': dist.backend, 'launcher': 'torchrun',
            'global_batch_size': args.batch_size, 'per_rank_batch_size': per_rank, 'sync_bn': args.sync_bn,
            # the images each BatchNorm layer normalizes over in a training forward pass
            'bn_batch_size': (args.batch_size if args.sync_bn else per_rank) // args.subdivision,
        }
    run.save_json(config, 'config.json')


def make_tensorboard_writer(run, enabled, purge_step=None):
    """A TensorBoard writer: tensorboardX (the SPEC's dependency), else PyTorch's own writer.

    torch.utils.tensorboard needs the tensorboard package; with neither installed the run goes
    on without scalars and says so once (log.json holds the same figures).
    """
    if not enabled or not run.writes:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print('--tensorboard: neither tensorboardX nor tensorboard is installed; writing no scalars '
                  '(log.json has them)', file=sys.stderr)
            return None
    # purge_step: TensorBoard discards the scalars at and after that epoch that an interrupted run wrote
    # a file name of its own: the writer names its file by the second, and a run resumed within the
    # same second would otherwise truncate the interrupted run's file
    return SummaryWriter(run.path('tensorboard'), purge_step=purge_step, filename_suffix=f'.{time.time_ns()}')


def run_lr_finder(model, optimizer, data, regularizer, run):
    def batches():
        for images, labels in data.train_loader:
            yield regularizer(images, labels)
    result = optim.lr_range_test(model, optimizer, batches(), regularizer.loss,
                                 num_steps=min(100, len(data.train_loader)),
                                 forward=lambda images: regularizer.forward(model, images))
    written = optim.save_lr_range_test(result, run.outdir)
    print(f'lr range test: {len(result["lrs"])} steps, suggested lr {result["suggested_lr"]:.3g}; '
          f'wrote {" and ".join(written)}')


def cli(argv=None):
    """Run main(); bad input exits with 2, divergence with 1, each with one line on stderr.

    Under torchrun these errors reach every rank alike (the checks depend on the command line, or
    their verdict is shared), so rank 0 alone prints the line and every rank exits with the status.
    Any other exception ends its rank with a traceback, and torchrun stops the other ranks; a rank
    that finds itself alone in a collective operation (its peer died, or --dist_timeout passed)
    says so in one line instead of a second traceback.
    """
    program = os.path.basename(sys.argv[0]) or 'main.py'
    rank = utils.env_rank()
    speaks = rank == 0
    try:
        main(argv)
    except UsageError as error:
        _exit(2, f'{program}: error: {error}', speaks)
    except KeyboardInterrupt:
        _exit(130, 'interrupted; resume with the same command plus --resume', speaks, leave_group=False)
    except Interrupted as interrupted:
        _exit(128 + interrupted.signum, f'{program}: {interrupted}', speaks)
    except utils.StorageError as error:
        _exit(1, f'{program}: {error}; the previous {os.path.basename(error.path)} is intact (free space, '
                 f'then continue with --resume)', speaks)
    except FloatingPointError as error:
        _exit(1, f'{program}: diverged: {error}; checkpoint.pth keeps the last checkpoint before it, if any '
                 f'(try a lower --base_lr, warmup or --gradient_clip)', speaks)
    except Exception as error:  # only a distributed run's lost peer is handled here
        if not (utils.launched_by_torchrun() and utils.is_collective_failure(error)):
            raise
        first_line = (str(error).strip().splitlines() or [''])[0][:300]
        _exit(1, f'{program}: rank {rank} stopped: another rank failed or stopped answering ({first_line})', True,
              leave_group=False)
    utils.close_distributed()


def _exit(status, message, speaks, leave_group=True):
    if leave_group:
        utils.close_distributed()
    if speaks:
        print(message, file=sys.stderr)
    sys.exit(status)


if __name__ == '__main__':
    cli()
