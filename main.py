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
import contextlib
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import augmentations
import dataloader
import models
import optim
import utils
from utils import UsageError, json_list, number, str2bool

PRECISION_ALIASES = {'O0': 'fp32', 'O1': 'fp16', 'O2': 'fp16', 'O3': 'fp16'}
_IMAGE_FOLDER = dataloader.DatasetInfo('ImageFolder', 3, 0, 0, (), (), True)


# ----------------------------------------------------------------------------- arguments

def _switch(group, name, help, default=False):
    """A boolean flag usable as a switch (``--use_cutout``) or with a value (``--use_cutout false``)."""
    group.add_argument(name, type=str2bool, nargs='?', const=True, default=default, metavar='BOOL', help=help)


def get_args_parser():
    parser = _Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    group = parser.add_argument_group('Model (see --list_archs for which flags apply to which arch)')
    group.add_argument('--arch', default='resnet_preact', help='architecture name')
    group.add_argument('--config', help='JSON file of flag defaults; explicit flags override it')
    group.add_argument('--list_archs', action='store_true', help='list architectures and their flags, then exit')
    group.add_argument('--depth', type=int, help='number of layers')
    group.add_argument('--base_channels', type=int, help='channels of the first stage')
    group.add_argument('--block_type', choices=['basic', 'bottleneck'])
    group.add_argument('--n_channels', type=json_list, help="vgg: channels per stage, e.g. '[64,128,256,512,512]'")
    group.add_argument('--n_layers', type=json_list, help="vgg: conv layers per stage, e.g. '[2,2,3,3,3]'")
    group.add_argument('--use_bn', type=str2bool, nargs='?', const=True, help='vgg: batch norm after each conv')
    group.add_argument('--remove_first_relu', type=str2bool, nargs='?', const=True, help='resnet_preact')
    group.add_argument('--add_last_bn', type=str2bool, nargs='?', const=True, help='resnet_preact')
    group.add_argument('--preact_stage', type=json_list, help="resnet_preact, e.g. '[true,false,false]'")
    group.add_argument('--widening_factor', type=int, help='wrn, resnet_preact')
    group.add_argument('--drop_rate', type=float, help='dropout (wrn, densenet)')
    group.add_argument('--growth_rate', type=int, help='densenet k')
    group.add_argument('--compression_rate', type=float, help='densenet-BC transition compression')
    group.add_argument('--memory_efficient', type=str2bool, nargs='?', const=True,
                       help='densenet: recompute concatenations in backward (less memory)')
    group.add_argument('--pyramid_alpha', type=int, help='pyramidnet widening')
    group.add_argument('--cardinality', type=int, help='resnext groups')
    group.add_argument('--shake_forward', type=str2bool, nargs='?', const=True, help='shake_shake: random alpha')
    group.add_argument('--shake_backward', type=str2bool, nargs='?', const=True, help='shake_shake: random beta')
    group.add_argument('--shake_image', type=str2bool, nargs='?', const=True,
                       help='shake_shake: per image (true) or per batch')
    group.add_argument('--se_reduction', type=int, help='squeeze-and-excitation reduction ratio')
    group.add_argument('--activation', choices=['relu', 'celu'],
                       help='resnet9: activation (celu: Page\'s final recipe)')
    group.add_argument('--celu_alpha', type=float, help='resnet9 with --activation celu: CELU alpha (0.3)')
    group.add_argument('--ghost_bn_splits', type=int,
                       help='resnet9: ghost batch norm, BN statistics per 1/N of each training batch inside one '
                            'forward pass (unlike --subdivision: no extra passes, no gradient accumulation)')
    group.add_argument('--head_scale', type=float,
                       help='resnet9: logit scale (0.125; Page\'s final recipe 1/16); airbench: default-initialized '
                            'head times this (airbench94: 1/9) instead of a unit-variance head / width')

    group = parser.add_argument_group('Optimization')
    group.add_argument('--epochs', type=number, default=160,
                       help='training epochs; may be fractional (e.g. 9.9: the last epoch stops early)')
    group.add_argument('--total_steps', type=int, default=None,
                       help='train for exactly this many steps instead of --epochs')
    group.add_argument('--batch_size', type=int, default=128)
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
    group.add_argument('--download', action='store_true', help='fetch missing dataset files (torchvision)')
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
    _switch(group, '--use_autoaugment', 'AutoAugment, CIFAR-10 policy (arXiv 1805.09501)')

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
    _switch(group, '--channels_last', 'channels_last memory format for model and inputs')
    _switch(group, '--compile', 'torch.compile the forward pass and loss (the backward is compiled with them)')
    group.add_argument('--compile_mode', default=None, choices=['default', 'reduce-overhead', 'max-autotune'],
                       help='torch.compile mode (needs --compile)')
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# Flags that never change what a run computes, so a resumed run may give them anew.
RUN_ONLY_FLAGS = {'outdir', 'resume', 'device', 'gpu', 'num_workers', 'tensorboard', 'dataset_dir',
                  'download', 'dry_run', 'evaluate', 'list_archs', 'config', 'epochs', 'eval_every',
                  'save_every', 'compile', 'compile_mode'}
MODEL_FLAGS = ['depth', 'base_channels', 'block_type', 'n_channels', 'n_layers', 'use_bn',
               'remove_first_relu', 'add_last_bn', 'preact_stage', 'widening_factor', 'drop_rate',
               'growth_rate', 'compression_rate', 'memory_efficient', 'pyramid_alpha', 'cardinality',
               'shake_forward', 'shake_backward', 'shake_image', 'se_reduction', 'activation', 'celu_alpha',
               'ghost_bn_splits', 'head_scale']


def parse_args(argv=None):
    """Resolve settings: defaults < arch defaults < --config < explicit flags."""
    parser = get_args_parser()
    defaults = {action.dest: action.default for action in parser._actions if action.dest != 'help'}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = vars(parser.parse_args(argv))

    from_config = {}
    if explicit.get('config'):
        from_config = utils.load_json(explicit['config'], what='--config')
        if not isinstance(from_config, dict):
            raise UsageError(f'--config {explicit["config"]}: expected a JSON object of flag values')
        unknown = sorted(set(from_config) - set(defaults))
        if unknown:
            raise UsageError(f'--config {explicit["config"]}: unknown setting(s) {", ".join(unknown)}')

    arch = explicit.get('arch', from_config.get('arch', defaults['arch']))
    try:
        arch_defaults = models.train_defaults(arch)
    except KeyError:
        raise UsageError(f'--arch {arch!r}: unknown; known: {", ".join(models.list_models())}') from None
    settings = {**defaults, **arch_defaults, **from_config, **explicit}
    given = set(from_config) | set(explicit)
    if settings['use_ricap'] and 'use_random_crop' not in given:
        settings['use_random_crop'] = False  # RICAP's paper setting; SPEC section 4 has both
    args = argparse.Namespace(**settings)
    args.explicit = sorted(given)
    validate_args(args)
    return args


def validate_args(args):
    args.precision = PRECISION_ALIASES.get(args.precision, args.precision)
    if not args.epochs > 0 or not math.isfinite(args.epochs):
        raise UsageError(f'--epochs must be positive, got {args.epochs}')
    if args.total_steps is not None and (not isinstance(args.total_steps, int) or args.total_steps <= 0):
        raise UsageError(f'--total_steps must be a positive integer, got {args.total_steps}')
    for name in ('batch_size', 'subdivision', 'eval_every', 'save_every', 'muon_ns_steps', 'ema_every'):
        if not isinstance(getattr(args, name), int) or getattr(args, name) <= 0:
            raise UsageError(f'--{name} must be a positive integer, got {getattr(args, name)}')
    for name in ('base_lr', 'muon_lr', 'head_lr_factor'):
        if not getattr(args, name) > 0 or not math.isfinite(getattr(args, name)):
            raise UsageError(f'--{name} must be positive, got {getattr(args, name)}')
    for name in ('weight_decay', 'momentum', 'gradient_clip', 'lr_min', 'warmup_epochs', 'muon_momentum'):
        if getattr(args, name) < 0:
            raise UsageError(f'--{name} must not be negative, got {getattr(args, name)}')
    if not 0 <= args.ema_decay < 1:
        raise UsageError(f'--ema_decay must be in [0, 1), got {args.ema_decay}')
    if not 0 <= args.val_ratio < 1:
        raise UsageError(f'--val_ratio must be in [0, 1), got {args.val_ratio}')
    if args.batch_size % args.subdivision:
        raise UsageError(f'--subdivision {args.subdivision} must divide --batch_size {args.batch_size}')
    if args.ghost_bn_splits and (args.batch_size // args.subdivision) % args.ghost_bn_splits:
        raise UsageError(f'--ghost_bn_splits {args.ghost_bn_splits} must divide the batch of '
                         f'{args.batch_size // args.subdivision} images each forward pass sees '
                         f'(--batch_size {args.batch_size}, --subdivision {args.subdivision})')
    if not all(isinstance(m, (int, float)) for m in args.milestones):
        raise UsageError(f'--milestones must be a list of epochs, got {args.milestones}')
    fractional = args.total_steps is None and not float(args.epochs).is_integer()
    milestone_offset = args.warmup_epochs if args.milestones_after_warmup else 0
    if args.scheduler == 'multistep' and fractional and any(m + milestone_offset >= args.epochs
                                                            for m in args.milestones):
        # with --total_steps the same check runs once the steps per epoch are known
        raise UsageError(f'--milestones {args.milestones}: beyond the end of the {args.epochs}-epoch run')
    if args.lookahead_every < 0 or not 0 <= args.lookahead_decay < 1:
        raise UsageError(f'--lookahead_every must be >= 0 and --lookahead_decay in [0, 1), got '
                         f'{args.lookahead_every} and {args.lookahead_decay}')
    if args.lr_end_factor is not None and (not 0 <= args.lr_end_factor <= 1 or args.lr_min > 0):
        raise UsageError(f'--lr_end_factor must be in [0, 1] and cannot be combined with --lr_min, '
                         f'got {args.lr_end_factor}')
    if args.sam_rho is None:
        args.sam_rho = optim.default_sam_rho(args.sam_adaptive)
    for name in ('sam_rho', 'asam_eta', 'lars_eps', 'lars_thresh'):
        if not getattr(args, name) >= 0:
            raise UsageError(f'--{name} must not be negative, got {getattr(args, name)}')
    if not args.warmup_exponent > 0:
        raise UsageError(f'--warmup_exponent must be positive, got {args.warmup_exponent}')
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
    if args.whiten_bias_epochs is not None and not 0 < args.whiten_bias_epochs <= args.epochs:
        raise UsageError(f'--whiten_bias_epochs must be in (0, --epochs], got {args.whiten_bias_epochs}')
    if args.tta == 'flip_translate' and not dataloader.DATASETS.get(args.dataset, _IMAGE_FOLDER).horizontal_flip:
        raise UsageError(f'--tta flip_translate: {args.dataset} images are not flipped in training '
                         f'(digits and characters are not mirror-symmetric); use --tta none')
    if args.gpu is not None:
        args.device = f'cuda:{args.gpu}'
    if args.dataset_dir is None:
        args.dataset_dir = os.path.expanduser(os.path.join('~/.torchvision/datasets', args.dataset))
    needs_outdir = not (args.list_archs or args.dry_run or args.evaluate)
    if needs_outdir and not args.outdir:
        raise UsageError('--outdir is required (the run directory to write into)')


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


def model_kwargs(args):
    return {name: getattr(args, name) for name in MODEL_FLAGS}


def list_archs():
    for name in models.list_models():
        flags = ', '.join(f'--{k} {json.dumps(v)}' for k, v in models.model_params(name).items())
        defaults = ', '.join(f'{k}={json.dumps(v)}' for k, v in models.train_defaults(name).items())
        print(f'{name}\n    model flags: {flags}\n    training defaults: {defaults}')


# ----------------------------------------------------------------------------- training

class Trainer:
    """One optimization step and one evaluation pass, with AMP, ghost batches, SAM, EMA and torch.compile.

    A step regularizes the whole batch, splits it into --subdivision sub-batches (ghost batch norm,
    accumulated gradients) with ``regularizer.split`` and runs the model through
    ``regularizer.forward`` (one pass, or one per Dual-Cutout view).

    Nothing in a step reads a device value on the host: losses and accuracies are summed on the
    device and read once per epoch, so the host queues steps ahead of the GPU.
    """

    def __init__(self, model, optimizer, scheduler, regularizer, args, device, total_steps=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.total_steps = total_steps
        self.regularizer, self.args, self.device = regularizer, args, device
        self.amp_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(args.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')
        self.ema = optim.create_ema(model, args.ema_decay, every=args.ema_every) if args.ema_decay > 0 else None
        self.lookahead = None
        if args.lookahead_every > 0:
            self.lookahead = optim.Lookahead(model, total_steps, args.lookahead_every, args.lookahead_decay)
        self.forward_loss, self.eval_forward = self._forward_loss, model
        self._compile_pending = {'train': False, 'eval': False}
        if args.compile:
            try:
                # the loss is traced with the forward pass, so AOTAutograd compiles its backward too
                self.forward_loss = torch.compile(self._forward_loss, mode=args.compile_mode)
                self.eval_forward = torch.compile(model, mode=args.compile_mode)
                self._compile_pending = {'train': True, 'eval': True}
            except Exception as error:  # no compiler toolchain, unsupported platform or python
                _compile_fallback_message(error, 'unavailable')

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
            logits = self.regularizer.forward(self.model, images)
        logits = logits.float()
        return logits, self.regularizer.loss(logits, targets)

    def _first_call(self, kind, compiled_call, eager_call):
        """Run a compiled function for the first time; if compiling fails, say why once and go on eager.

        A failure is the compiler's only if the same call succeeds eagerly: an error that eager
        code raises too is a bug of the caller and propagates.
        """
        try:
            return compiled_call()
        except Exception as error:  # dynamo, inductor or a missing compiler toolchain
            result = eager_call()
            _compile_fallback_message(error, f'failed at the first {kind} step')
            self.forward_loss, self.eval_forward = self._forward_loss, self.model
            self._compile_pending = {'train': False, 'eval': False}
            return result
        finally:
            self._compile_pending[kind] = False

    def compile_ahead(self, train_loader, test_loader):
        """Compile the training step and the evaluation forward before training, so that no
        epoch's time includes compilation; returns the seconds it took.

        One batch of each loader goes through them; the model's weights and buffers, the gradients
        and the random generators are restored afterwards, so training starts as without it.
        """
        rng_state = utils.get_rng_state()
        model_state = {key: value.clone() for key, value in self.model.state_dict().items()}
        self._synchronize()
        start = time.perf_counter()
        self.model.train()
        images, labels = next(iter(train_loader))
        self._forward_backward(self._sub_batches(images, labels)[:1])
        self.optimizer.zero_grad(set_to_none=True)
        test_images, test_labels = next(iter(test_loader))
        self.evaluate(_FixedBatch(test_images, test_labels, test_loader.batch_size))
        self._synchronize()
        elapsed = time.perf_counter() - start
        self.model.load_state_dict(model_state)
        utils.set_rng_state(rng_state)
        return elapsed

    def _forward_backward(self, chunks):
        """Accumulate gradients over ghost sub-batches; returns (loss, accuracy) of the batch."""
        batch_size = sum(len(targets) for _, targets in chunks)
        total_loss, total_correct = 0.0, 0.0
        for images, targets in chunks:
            images = self._prepare(images)
            if self._compile_pending['train']:
                logits, loss = self._first_call('train', lambda: self.forward_loss(images, targets),
                                                lambda: self._forward_loss(images, targets))
            else:
                logits, loss = self.forward_loss(images, targets)
            self.scaler.scale(loss * (len(targets) / batch_size)).backward()
            total_loss += loss.detach() * len(targets)
            total_correct += self.regularizer.accuracy(logits.detach(), targets) * len(targets)
        return total_loss / batch_size, total_correct / batch_size

    def _sub_batches(self, images, labels):
        """Regularize the whole batch (one mixing lambda and permutation, as the original tool's
        train.py), then split it into the --subdivision sub-batches of the step."""
        return self.regularizer.split(*self.regularizer(images, labels), self.args.subdivision)

    def train_step(self, images, labels):
        chunks = self._sub_batches(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss, accuracy = self._forward_backward(chunks)
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
        self.scheduler.step()
        if self.lookahead is not None:
            self.lookahead.step(self.scheduler.last_epoch)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss, accuracy

    def _clip(self):
        if self.args.gradient_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.gradient_clip)

    def _synchronize(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def train_one_epoch(self, loader, epoch, progress):
        self.model.train()
        loss_meter, accuracy_meter = utils.AverageMeter(), utils.AverageMeter()
        self._synchronize()
        start = last_shown = time.perf_counter()
        bar = progress(loader, f'epoch {epoch} train')
        for images, labels in bar:
            # the scheduler counts the steps taken: a fractional last epoch stops at the budget
            if self.total_steps is not None and self.scheduler.last_epoch >= self.total_steps:
                break
            loss, accuracy = self.train_step(images, labels)
            loss_meter.update(loss, len(labels))
            accuracy_meter.update(accuracy, len(labels))
            # reading the running loss waits for the GPU: at most once every 10 s
            if not bar.disable and time.perf_counter() - last_shown > 10:
                bar.set_postfix(loss=f'{loss_meter.average:.4f}', acc=f'{accuracy_meter.average:.4f}')
                last_shown = time.perf_counter()
        self._synchronize()
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss_meter.average):
            raise FloatingPointError(f'training loss became {loss_meter.average} in epoch {epoch}')
        return {'train_loss': loss_meter.average, 'train_accuracy': accuracy_meter.average,
                'train_time': elapsed, 'train_images_per_sec': loss_meter.count / elapsed}

    def evaluate(self, loader, model=None, progress=None, description='test'):
        """:func:`evaluate` of ``model`` (default: the trained model, compiled with --compile)."""
        model = self.model if model is None else model
        forward = self.eval_forward if model is self.model else model

        def run(forward_fn, pad):
            return evaluate(model, loader, self.device, self.args.tta, self.autocast, self.args.channels_last,
                            progress, description, forward=forward_fn, pad_batches=pad)
        if forward is not model and self._compile_pending['eval']:
            return self._first_call('eval', lambda: run(forward, True), lambda: run(model, False))
        return run(forward, forward is not model)


class _FixedBatch(list):
    """One evaluation batch with the batch size of the loader it came from."""

    def __init__(self, images, labels, batch_size):
        super().__init__([(images, labels)])
        self.batch_size = batch_size


def _compile_fallback_message(error, what):
    first_line = (str(error).strip().splitlines() or [''])[0][:200]
    print(f'--compile: torch.compile {what} ({type(error).__name__}: {first_line}); running eager',
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
             progress=None, description='test', forward=None, pad_batches=False):
    """Mean cross-entropy and accuracy of ``model`` (run through ``forward``, e.g. its compiled form),
    with the test-time augmentation ``tta`` (see :func:`tta_logits`).

    ``pad_batches`` pads a short last batch to the loader's batch size, so a compiled forward
    sees one shape only; the padding rows are dropped before scoring.
    """
    model.eval()
    forward = model if forward is None else forward
    total_loss, total_correct, count = 0.0, 0, 0
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    batches = progress(loader, description) if progress else loader
    for images, labels in batches:
        batch_size = len(labels)
        if pad_batches and batch_size < loader.batch_size:
            images = F.pad(images, (0, 0, 0, 0, 0, 0, 0, loader.batch_size - batch_size))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = tta_logits(forward, images, tta)[:batch_size]
        total_loss += F.cross_entropy(logits, labels, reduction='sum')
        total_correct += (logits.argmax(1) == labels).sum()
        count += batch_size
    total_loss, total_correct = float(total_loss), int(total_correct)
    elapsed = time.perf_counter() - start
    return {'loss': total_loss / count, 'accuracy': total_correct / count,
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
    """The files of one run: refuses to overwrite another run, writes atomically."""

    def __init__(self, outdir, resume):
        self.outdir = outdir
        self.checkpoint_path = os.path.join(outdir, 'checkpoint.pth')
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise UsageError(f'--outdir {outdir}: exists and is not a directory')
        self.has_checkpoint = os.path.isfile(self.checkpoint_path)
        if resume:
            if not self.has_checkpoint:
                # the run stopped before its first checkpoint (inside epoch 1, or before the first
                # --save_every epoch): nothing to restore, so it starts again and rewrites its log
                print(f'--resume: no checkpoint in {outdir} yet; starting from epoch 1', file=sys.stderr)
        elif os.path.isdir(outdir) and os.listdir(outdir):
            raise UsageError(f'--outdir {outdir}: not empty; pass --resume to continue that run '
                             f'or choose another directory')
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
                                    **model_kwargs(args))
    except models.ModelConfigError as error:
        raise UsageError(str(error)) from None
    model = model.to(device)
    if args.bn_weight_freeze:
        optim.freeze_norm_weights(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_evaluation(args, device):
    """--evaluate: rebuild the model from the config.json beside the weights and test it."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(args.evaluate)), 'config.json')
    if os.path.isfile(config_path):
        saved = utils.load_json(config_path, what='config').get('settings', {})
        for name in ['arch', 'dataset', *MODEL_FLAGS]:
            if name not in args.explicit and name in saved:
                setattr(args, name, saved[name])
    state = utils.load_checkpoint(args.evaluate, map_location=device)
    data = dataloader.build_data(args.dataset, args.dataset_dir, args.batch_size, device, args.data_pipeline,
                                 args.num_workers, download=args.download, test_batch_size=args.test_batch_size)
    model = build_model(args, data.info, device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(f'--evaluate {args.evaluate}: weights do not fit --arch {args.arch} '
                         f'({str(error).splitlines()[0]})') from None
    result = evaluate(model, data.test_loader, device, tta=args.tta, channels_last=args.channels_last)
    print(f'{args.evaluate}: test accuracy {result["accuracy"]:.4f}, loss {result["loss"]:.4f} '
          f'({data.test_loader.num_samples} images, tta={args.tta})')
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.list_archs:
        list_archs()
        return
    device = resolve_device(args.device)
    if args.evaluate:
        run_evaluation(args, device)
        return

    run = None
    if not args.dry_run:
        run = RunDirectory(args.outdir, args.resume)
        args.resume = args.resume and run.has_checkpoint
        if args.resume:
            checkpoint = utils.load_checkpoint(run.checkpoint_path)
            args = restore_args(args, checkpoint)
    utils.set_seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    data = dataloader.build_data(
        args.dataset, args.dataset_dir, args.batch_size, device, args.data_pipeline, args.num_workers,
        args.use_random_crop, args.random_crop_padding, args.use_horizontal_flip, args.use_autoaugment,
        args.val_ratio, args.download, args.image_size, args.test_batch_size, args.padding_mode,
        'alternating' if args.alternating_flip else 'random')
    model = build_model(args, data.info, device)
    initialize_from_data(model, data.train_loader)
    n_params = utils.count_parameters(model)
    try:
        regularizer = augmentations.BatchRegularizer.from_args(args, data.info.num_classes)
    except ValueError as error:
        raise UsageError(str(error)) from None

    if args.dry_run:
        settings = {k: v for k, v in vars(args).items() if k != 'explicit'}
        print(json.dumps(settings, indent=2, default=str))
        print(f'{args.arch}: {n_params:,} parameters; {data.info.name}: '
              f'{data.train_loader.num_samples} train / {data.test_loader.num_samples} {data.test_split_name} images, '
              f'{len(data.train_loader)} steps per epoch on {device}')
        return

    steps_per_epoch = len(data.train_loader)
    total_steps = args.total_steps or math.ceil(args.epochs * steps_per_epoch - 1e-9)
    milestone_offset = args.warmup_epochs if args.milestones_after_warmup else 0
    if args.total_steps and args.scheduler == 'multistep' and any(
            (m + milestone_offset) * steps_per_epoch >= total_steps for m in args.milestones):
        raise UsageError(f'--milestones {args.milestones}: beyond the end of the run ({total_steps} steps of '
                         f'{steps_per_epoch} per epoch)')
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = build_optimizer(model, args)
    scheduler = optim.build_scheduler(
        optimizer, scheduler=args.scheduler, epochs=total_steps / steps_per_epoch, steps_per_epoch=steps_per_epoch,
        milestones=args.milestones, lr_decay=args.lr_decay, lr_min=args.lr_min, T0=args.T0, T_mul=args.T_mul,
        poly_power=args.poly_power, warmup_epochs=args.warmup_epochs, warmup_method=args.warmup_method,
        warmup_start_factor=args.warmup_start_factor, lr_end_factor=args.lr_end_factor,
        warmup_exponent=args.warmup_exponent, milestones_after_warmup=args.milestones_after_warmup)
    if args.lr_finder:
        return run_lr_finder(model, optimizer, data, regularizer, run)

    trainer = Trainer(model, optimizer, scheduler, regularizer, args, device, total_steps)
    log, start_epoch = [], 1
    if args.resume:
        log, start_epoch = restore_state(checkpoint, model, trainer)
    write_config(run, args, n_params, device)
    if start_epoch > n_epochs:
        print(f'{args.outdir}: already trained for {n_epochs} epochs; nothing to do')
        return
    compile_time = trainer.compile_ahead(data.train_loader, data.test_loader) if args.compile else None
    if compile_time is not None:
        print(f'--compile: compiled in {compile_time:.1f}s (before the first timed step)', flush=True)

    progress = make_progress()
    writer = make_tensorboard_writer(run, args.tensorboard)
    split = data.test_split_name
    if args.test_first and start_epoch == 1:
        result = trainer.evaluate(data.test_loader, progress=progress, description=split)
        print(f'epoch 0: {split} loss {result["loss"]:.4f} acc {result["accuracy"]:.4f}')
        log.append({'epoch': 0, f'{split}_loss': result['loss'], f'{split}_accuracy': result['accuracy']})

    for epoch in range(start_epoch, n_epochs + 1):
        data.train_loader.set_epoch(epoch)
        record = {'epoch': epoch, 'lr': optimizer.param_groups[0]['lr']}
        record.update(trainer.train_one_epoch(data.train_loader, epoch, progress))
        if compile_time is not None and epoch == start_epoch:
            record['compile_time'] = compile_time
        record['train_accuracy_kind'] = 'lambda-weighted' if regularizer.mixes_labels else 'plain'
        last = epoch == n_epochs
        if last or epoch % args.eval_every == 0:
            record.update(evaluation_record(trainer, data.test_loader, split, log, record, progress))
        record['epoch_time'] = record['train_time'] + record.get(f'{split}_time', 0.0)
        log.append(record)
        save_epoch(run, log, writer, checkpoint_state(model, trainer, epoch, args, log)
                   if last or epoch % args.save_every == 0 else None)
        print(epoch_line(record, n_epochs, split), flush=True)

    torch.save(model.state_dict(), run.path('model_state.pth'))
    if trainer.ema is not None:
        torch.save(trainer.ema.module.state_dict(), run.path('model_state_ema.pth'))
    utils.save_json(summarize([r for r in log if r['epoch'] > 0], split), run.path('summary.json'))
    if writer is not None:
        writer.close()


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
    utils.save_json(log, run.path('log.json'))
    if checkpoint is not None:
        utils.save_checkpoint(checkpoint, run.checkpoint_path)
    if writer is not None:
        record = log[-1]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != 'epoch':
                writer.add_scalar(key.replace('_', '/', 1), value, record['epoch'])
        writer.flush()


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


def checkpoint_state(model, trainer, epoch, args, log):
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
    if trainer.ema is not None:
        state['ema'] = trainer.ema.state_dict()
    if trainer.lookahead is not None:
        state['lookahead'] = trainer.lookahead.state_dict()
    return state


def restore_args(args, checkpoint):
    """A resumed run keeps its saved settings; only run-control flags (and --epochs) may change."""
    saved = checkpoint.get('args')
    if not isinstance(saved, dict):
        raise UsageError(f'--resume: {args.outdir}/checkpoint.pth holds no settings')
    changed = sorted(name for name in args.explicit
                     if name not in RUN_ONLY_FLAGS and name in saved and saved[name] != getattr(args, name))
    if changed:
        raise UsageError(f'--resume: {", ".join("--" + n for n in changed)} differ from the saved run; '
                         f'a resumed run keeps its settings (start a new --outdir instead)')
    restored = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in RUN_ONLY_FLAGS}})
    restored.resume = True
    return restored


def restore_state(checkpoint, model, trainer):
    try:
        model.load_state_dict(checkpoint['model'])
        trainer.optimizer.load_state_dict(checkpoint['optimizer'])
        trainer.scheduler.load_state_dict(checkpoint['scheduler'])
        trainer.scaler.load_state_dict(checkpoint['scaler'])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(checkpoint['ema'])
        if trainer.lookahead is not None:
            trainer.lookahead.load_state_dict(checkpoint['lookahead'])
        utils.set_rng_state(checkpoint['rng'])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f'--resume: checkpoint does not match this run ({type(error).__name__}: '
                         f'{str(error).splitlines()[0] if str(error) else ""})') from None
    return list(checkpoint['log']), checkpoint['epoch'] + 1


def write_config(run, args, n_params, device):
    utils.save_json({
        'settings': {k: v for k, v in vars(args).items() if k != 'explicit'},
        'explicit_flags': args.explicit,
        'n_params': n_params,
        'model_flags': {k: getattr(args, k) for k in models.model_params(args.arch) if getattr(args, k) is not None},
        'command_line': ' '.join(shlex.quote(a) for a in sys.argv),
        'environment': utils.environment_info(device),
    }, run.path('config.json'))


def make_tensorboard_writer(run, enabled):
    """A TensorBoard writer: tensorboardX (the SPEC's dependency), else PyTorch's own writer.

    torch.utils.tensorboard needs the tensorboard package; with neither installed the run goes
    on without scalars and says so once (log.json holds the same figures).
    """
    if not enabled:
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
    return SummaryWriter(run.path('tensorboard'))


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
    program = os.path.basename(sys.argv[0]) or 'main.py'
    try:
        main(argv)
    except UsageError as error:
        print(f'{program}: error: {error}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted; resume with the same command plus --resume', file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as error:
        print(f'{program}: diverged: {error}; checkpoint.pth keeps the last completed epoch, if any '
              f'(try a lower --base_lr, warmup or --gradient_clip)', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    cli()
