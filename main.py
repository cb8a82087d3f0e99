#!/usr/bin/env python
"""Train and evaluate an image classifier on CIFAR-10/100, MNIST, FashionMNIST or KMNIST.

    ./main.py --arch resnet_preact --depth 56 --outdir results/resnet_preact_56/00
    ./main.py --arch wrn --outdir results/wrn/00 --scheduler cosine --use_cutout

Settings resolve in this order, later winning: built-in defaults, the architecture's
defaults (the original tool's configs), ``--config FILE.json``, then explicit flags.
The run directory receives config.json, log.json (one record per epoch, rewritten
atomically), TensorBoard scalars, checkpoint.pth (resumable with ``--resume``) and the
final model_state.pth.

The recipe, top to bottom: the parser (each flag's argparse type is its domain), main() building
data, model, optimizer, schedule, engine and run folder, the epoch loop, then the other modes
(--evaluate, --predict, --list_archs) and cli(), which turns bad input into one line and exit 2.
The engine is engine.py's, the run folder's format runs.py's.
"""
import argparse
import functools
import math
import os
import signal
import sys

import flags
from flags import Bool, Choice, Int, ListOf, Real, Text, UsageError, number


def import_toolkit():
    """Import torch and the modules behind the command line into this module (seconds). Imported as a
    library (tests, benchmarks) main.py imports them at once; run as a script, after the command line has
    been read with the cached parser (:func:`args_parser`), so that --help, a mistyped flag and a bad value
    answer before."""
    global torch, augmentations, dataloader, engine, models, optim, runs, utils
    import torch
    import augmentations
    import dataloader
    import engine
    import models
    import optim
    import runs
    import utils


PRECISION_ALIASES = {'O0': 'fp32', 'O1': 'fp16', 'O2': 'fp16', 'O3': 'fp16'}
# Flag names of timm's and torchvision's reference scripts, taken as ours (spelled with - or _ alike)
FLAG_ALIASES = {'--lr': '--base_lr', '--learning_rate': '--base_lr', '--wd': '--weight_decay', '--model': '--arch',
                '--output': '--outdir', '--output_dir': '--outdir', '--data_dir': '--dataset_dir',
                '--data_path': '--dataset_dir', '--workers': '--num_workers', '--lr_warmup_epochs': '--warmup_epochs'}
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune')
HERE = os.path.dirname(os.path.abspath(__file__))
_POSITIVE = Real(0, None, '(]')
_FRACTION = Real(0, 1, '[)')
_PROBABILITY = Real(0, 1)


# ----------------------------------------------------------------------------- arguments

def get_args_parser():
    import_toolkit()
    parser = flags.Parser(description=__doc__.split('\n\n')[0], formatter_class=flags.HelpFormatter,
                          allow_abbrev=False)  # --epoch is not --epochs: a typo must not pass
    parser.aliases = FLAG_ALIASES

    group = parser.add_argument_group('Model (see --list_archs for which flags apply to which arch)')
    group.add_argument('--arch', default='resnet_preact', help='architecture name (see --list_archs)',
                       type=Choice(models.list_models(), what='the archs that --list_archs prints',
                                   number_flag='depth'))
    group.add_argument('--config', type=Text(path=True, optional=True),
                       help='JSON file of flag defaults; explicit flags override it')
    group.add_argument('--list_archs', action='store_true',
                       help='list architectures with their parameters, forward multiply-adds at the --dataset\'s '
                            'input size, flags and training defaults, then exit (with --arch: that one, built with '
                            'the model flags given)')
    group.add_argument('--init', **flags.choice(models.common.INIT_SCHEMES, optional=True), default=None,
                       help='re-initialize the built model: kaiming (He normal), xavier (Glorot uniform) or default '
                            '(PyTorch\'s reset_parameters); unset: each family\'s own initialization')
    group.add_argument('--teacher', type=Text(path=True, optional=True), metavar='MODEL_STATE',
                       help='knowledge distillation from this model_state.pth (or checkpoint.pth), any arch, rebuilt '
                            'from the config.json beside it (arXiv 1503.02531); see --kd_temperature, --kd_alpha')
    group.add_argument('--predict', type=Text(path=True, examples=['cat.png']), nargs='+', metavar='IMAGE',
                       help='print the --topk classes of each image (PNG/JPEG) under the model --weights, then exit')
    group.add_argument('--weights', type=Text(path=True, optional=True), metavar='MODEL_STATE',
                       help='--predict: model_state.pth or checkpoint.pth (arch, flags and dataset from the '
                            'config.json beside it, or from the command line)')
    group.add_argument('--topk', type=Int(1), default=5, help='--predict: classes printed per image')
    models.add_model_flags(group)  # one per keyword-only argument of the registered builders

    group = parser.add_argument_group('Optimization')
    group.add_argument('--epochs', type=Real(0, None, '(]', parse=number), default=160,
                       help='training epochs; may be fractional (e.g. 9.9: the last epoch stops early)')
    group.add_argument('--total_steps', type=Int(1, optional=True), default=None,
                       help='train for exactly this many steps instead of --epochs')
    group.add_argument('--batch_size', type=Int(1), default=128,
                       help='global batch: under torchrun each of the N ranks takes batch_size / N images of '
                            'every step (the learning rate is not rescaled)')
    group.add_argument('--optimizer', **flags.choice(optim.OPTIMIZER_CHOICES), default='sgd',
                       help='muon: Muon (torch.optim.Muon, torch 2.9+) for the convolution filters, SGD with '
                            '--base_lr/--momentum for the other parameters')
    group.add_argument('--base_lr', type=_POSITIVE, default=0.1,
                       help='learning rate (of the whole batch: not rescaled with --batch_size or the ranks)')
    group.add_argument('--weight_decay', type=Real(0), default=1e-4, help='L2 weight decay (decoupled for adamw)')
    flags.switch(group, '--no_weight_decay_on_bn', 'no weight decay on BN parameters and biases')
    flags.switch(group, '--bn_weight_freeze', 'keep BN scales fixed at their initial value (fast recipe)')
    group.add_argument('--bn_bias_lr_factor', type=_POSITIVE, default=1.0,
                       help='BN biases train with lr x this and weight decay / this (fast recipe)')
    group.add_argument('--head_lr_factor', type=_POSITIVE, default=1.0,
                       help='the last linear layer trains with lr x this and weight decay / this (airbench)')
    group.add_argument('--muon_lr', type=_POSITIVE, default=0.24, help='muon: learning rate of the filters')
    group.add_argument('--muon_momentum', type=_FRACTION, default=0.6, help='muon: momentum of the filters')
    group.add_argument('--muon_ns_steps', type=Int(1), default=3, help='muon: Newton-Schulz iterations')
    group.add_argument('--muon_lr_adjust', **flags.choice(optim.MUON_LR_ADJUSTMENTS), default='none',
                       help='muon: none steps every filter bank by --muon_lr as airbench94_muon; torch keeps '
                            'torch.optim.Muon\'s factor sqrt(max(1, out / (in x kh x kw))) for banks with more '
                            'outputs than inputs (1x1 expansions, projection shortcuts, wide stems)')
    flags.switch(group, '--muon_normalize_weights', 'muon: rescale each filter bank to norm sqrt(out) before '
                 'its update (airbench94_muon)', True)
    group.add_argument('--whiten_bias_epochs', type=Real(0, None, '(]', optional=True), default=None,
                       help='airbench: the patch-whitening bias trains (on its own copy of the schedule) '
                            'for this many epochs only')
    group.add_argument('--momentum', type=_FRACTION, default=0.9, help='SGD/LARS momentum')
    group.add_argument('--nesterov', type=Bool(), nargs='?', const=True, default=True,
                       help="Nesterov momentum (sgd, lars, muon's filters)")
    group.add_argument('--betas', type=ListOf(_FRACTION, 2, example='[0.9,0.999]'), default=[0.9, 0.999],
                       help='adam/adamw/adabound betas')
    group.add_argument('--adabound_final_lr', type=_POSITIVE, default=0.1,
                       help='adabound: the lr its bounds converge to')
    group.add_argument('--adabound_gamma', type=_POSITIVE, default=1e-3, help='adabound: how fast the bounds converge')
    flags.switch(group, '--use_sam', 'sharpness-aware minimization around the chosen optimizer (arXiv 2010.01412)')
    group.add_argument('--sam_rho', type=Real(0, None, '(]', optional=True), default=None,
                       help='SAM neighbourhood radius (default: 0.05, or 0.5 with --sam_adaptive, the authors\' '
                            'CIFAR-10 values)')
    flags.switch(group, '--sam_adaptive', 'adaptive SAM (ASAM, arXiv 2102.11600)')
    group.add_argument('--asam_eta', type=Real(0), default=0.01,
                       help='ASAM: T_w = |w| + eta on the parameters named *weight* (SamsungLabs/ASAM asam.py)')
    flags.switch(group, '--sam_freeze_bn_stats', 'SAM: the second forward pass (at w + e) leaves BatchNorm running '
                 'statistics alone (davda54/sam bypass_bn); false: both passes update them', True)
    group.add_argument('--lars_eps', type=Real(0), default=1e-9,
                       help='lars: trust ratio ||w|| / (eps + ||g|| + wd ||w||) (the original tool\'s LARS)')
    group.add_argument('--lars_thresh', type=Real(0), default=1e-2,
                       help='lars: trust ratio 1 for tensors with ||w|| below this (fresh biases, BN shifts)')
    group.add_argument('--gradient_clip', type=Real(0), default=0.0, help='max gradient norm; 0 = off')
    group.add_argument('--ema_every', type=Int(1), default=1,
                       help='update the EMA every K steps (with decay**K, the same horizon)')
    group.add_argument('--lookahead_every', type=Int(0), default=0,
                       help='airbench94 lookahead: every K steps average the weights into a slow copy and '
                            'continue from it (0 = off)')
    group.add_argument('--lookahead_decay', type=_FRACTION, default=0.95,
                       help='lookahead decay per step; ramps up as (step/total)^3')
    group.add_argument('--ema_decay', type=_FRACTION, default=0.0,
                       help='exponential moving average of weights; 0 = off (e.g. 0.999)')
    group.add_argument('--subdivision', type=Int(1), default=1,
                       help='ghost batch norm: split each batch into N sub-batches, accumulate gradients')
    group.add_argument('--precision', **flags.choice(['fp32', 'fp16', 'bf16', *PRECISION_ALIASES]), default='fp32',
                       help='torch.amp autocast dtype (fp16 uses a GradScaler). Legacy apex names: '
                            'O0 = fp32, O1/O2/O3 = fp16 mixed precision')
    group.add_argument('--lr_finder', action='store_true',
                       help='run a learning-rate range test instead of training; writes lr_finder.json/png')

    group = parser.add_argument_group('Learning-rate schedule (stepped every iteration)')
    group.add_argument('--scheduler', **flags.choice(optim.SCHEDULER_CHOICES), default='multistep',
                       help='learning-rate schedule, stepped every iteration')
    group.add_argument('--milestones', type=ListOf(_POSITIVE, ordered=True, example='[80,120]'), default=[80, 120],
                       help='multistep: epochs')
    group.add_argument('--lr_decay', type=Real(0, 1, '(]'), default=0.1, help='multistep factor')
    group.add_argument('--lr_min', type=Real(0), default=0.0, help='final lr of cosine/sgdr/linear/polynomial')
    group.add_argument('--lr_end_factor', type=Real(0, 1, optional=True), default=None,
                       help='final lr of the decaying schedules as a fraction of each group\'s lr '
                            '(instead of the absolute --lr_min)')
    group.add_argument('--T0', type=Int(1), default=10, help='sgdr: first period in epochs')
    group.add_argument('--T_mul', type=Int(1), default=1, help='sgdr: period multiplier')
    group.add_argument('--poly_power', type=_POSITIVE, default=1.0, help='polynomial decay power')
    group.add_argument('--warmup_epochs', type=Real(0), default=0,
                       help='epochs of warmup before the schedule (may be fractional)')
    group.add_argument('--warmup_method', **flags.choice(optim.WARMUP_METHODS), default='linear',
                       help='linear: s + (1 - s) t; exponential: s + (1 - s) t^warmup_exponent (the original '
                            'tool\'s); geometric: s^(1 - t); s = --warmup_start_factor, t = warmup progress')
    group.add_argument('--warmup_start_factor', type=Real(0, 1), default=1e-3, help='lr factor at step 0 of warmup')
    group.add_argument('--warmup_exponent', type=_POSITIVE, default=4.0, help='exponential warmup: power of t')
    flags.switch(group, '--milestones_after_warmup', 'multistep: count --milestones from the end of warmup (the '
                 'original tool); false: from the start of training (torch MultiStepLR, Goyal et al.)', True)

    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', **flags.choice(dataloader.DATASET_CHOICES), default='CIFAR10',
                       help='ImageFolder: your own class folders in --dataset_dir (train/ and test/)')
    group.add_argument('--dataset_dir', type=Text(path=True, optional=True), default=None,
                       help='root holding cifar-10-batches-py/, MNIST/raw/, ... (default ~/.torchvision/datasets/NAME)')
    group.add_argument('--download', action='store_true', default=None,
                       help='fetch a missing built-in dataset with torchvision (checksum verified) into '
                            '--dataset_dir; the default unless --no-download or '
                            f'{dataloader.OFFLINE_ENV}=1')
    group.add_argument('--no-download', dest='download', action='store_false', default=None,
                       help='never fetch: a missing dataset is an error saying where to place its files')
    group.add_argument('--image_size', type=Int(1, optional=True), help='ImageFolder: resize images to this size')
    group.add_argument('--data_pipeline', **flags.choice(('device', 'workers')), default='device',
                       help='device: dataset held on the training device, batched augmentation; '
                            'workers: per-sample DataLoader with worker processes')
    group.add_argument('--num_workers', type=Int(0), default=2,
                       help='worker processes of the workers pipeline (and of ImageFolder)')
    group.add_argument('--val_ratio', type=_FRACTION, default=0.0,
                       help='hold out this part of the training set and evaluate on it instead of the test set')
    group.add_argument('--test_batch_size', type=Int(1, optional=True), default=None,
                       help='batch of the evaluation (default: max(--batch_size, 256))')
    flags.switch(group, '--use_random_crop', 'pad and randomly crop (default on; off by default with RICAP)', True)
    group.add_argument('--random_crop_padding', type=Int(0), default=4, help='pixels of padding before the random crop')
    group.add_argument('--padding_mode', **flags.choice(('zeros', 'reflect')), default='zeros',
                       help='random crop padding; reflect is airbench\'s random translation')
    flags.switch(group, '--use_horizontal_flip', 'random horizontal flip (datasets where it applies)', True)
    flags.switch(group, '--alternating_flip', 'flip each image on every other epoch instead of at random '
                 '(airbench, arXiv 2404.00498)')

    group = parser.add_argument_group('Augmentation and regularization')
    flags.switch(group, '--use_cutout', 'Cutout (arXiv 1708.04552)')
    group.add_argument('--cutout_size', type=Int(1), default=16, help='side of the Cutout square (pixels)')
    group.add_argument('--cutout_prob', type=_PROBABILITY, default=1.0, help='probability that an image is cut out')
    flags.switch(group, '--cutout_inside', 'keep the whole square inside the image')
    flags.switch(group, '--use_random_erasing', 'Random Erasing (arXiv 1708.04896)')
    group.add_argument('--random_erasing_prob', type=_PROBABILITY, default=0.5,
                       help='probability that an image gets a rectangle erased')
    group.add_argument('--random_erasing_area_ratio_range', default=[0.02, 0.4],
                       type=ListOf(Real(0, 1, '(]'), 2, ordered=True, example='[0.02,0.4]'),
                       help="[low, high] share of the image's area erased")
    group.add_argument('--random_erasing_min_aspect_ratio', type=Real(0, 1, '(]'), default=0.3,
                       help="the erased rectangle's aspect ratio h/w lies in [this, 1/this]")
    group.add_argument('--random_erasing_max_attempt', type=Int(1), default=20,
                       help='tries to fit a rectangle into the image')
    group.add_argument('--random_erasing_fill', **flags.choice(augmentations.RANDOM_ERASING_FILLS), default='mean',
                       help='mean: the per-channel mean pixel, 0 after normalization (the paper authors\' code); '
                            'random: a standard-normal value per pixel (the paper\'s random values, as torchvision); '
                            'uniform: one U(0,1) value per rectangle (the original tool, hysts)')
    flags.switch(group, '--use_mixup', 'Mixup (arXiv 1710.09412)')
    group.add_argument('--mixup_alpha', type=_POSITIVE, default=1.0, help='Mixup: lambda ~ Beta(alpha, alpha)')
    flags.switch(group, '--use_ricap', 'RICAP (arXiv 1811.09030)')
    group.add_argument('--ricap_beta', type=_POSITIVE, default=0.3, help='RICAP: the crossing point ~ Beta(beta, beta)')
    flags.switch(group, '--use_cutmix', 'CutMix (arXiv 1905.04899)')
    group.add_argument('--cutmix_alpha', type=_POSITIVE, default=1.0, help='CutMix: lambda ~ Beta(alpha, alpha)')
    group.add_argument('--cutmix_prob', type=_PROBABILITY, default=1.0,
                       help='probability that a batch is mixed (the paper\'s Algorithm 1: 1; the authors\' CIFAR '
                            'command: 0.5)')
    group.add_argument('--cutmix_box', **flags.choice(augmentations.CUTMIX_BOXES), default='integer',
                       help='integer: the authors\' rand_bbox (an integer centre, each side cut at the border); '
                            'continuous: a continuous centre (this tool before; pastes about 7%% more area)')
    flags.switch(group, '--use_dual_cutout', 'Dual-Cutout (arXiv 1802.07426)')
    group.add_argument('--dual_cutout_alpha', type=Real(0), default=0.1,
                       help='Dual-Cutout: weight of the consistency term')
    group.add_argument('--dual_cutout_distance', **flags.choice(('logits', 'softmax')), default='logits',
                       help='consistency term: MSE of the two views\' logits as in the paper authors\' code '
                            'and hysts, or squared distance of their softmax outputs')
    flags.switch(group, '--dual_cutout_joint_forward', 'forward both Dual-Cutout views in one pass of 2B images '
                 '(shared BatchNorm statistics) instead of one pass per view as the paper authors\' code and hysts')
    flags.switch(group, '--use_label_smoothing', 'label smoothing (arXiv 1512.00567)')
    group.add_argument('--label_smoothing_epsilon', type=_FRACTION, default=0.1,
                       help="label smoothing: the target's mass spread over all classes")
    flags.switch(group, '--use_autoaugment', 'AutoAugment (arXiv 1805.09501), policy --autoaugment_policy')
    group.add_argument('--autoaugment_policy', **flags.choice(augmentations.AUTOAUGMENT_POLICIES), default='cifar10',
                       help='AutoAugment\'s policy learned on CIFAR-10, SVHN or ImageNet')
    flags.switch(group, '--use_randaugment', 'RandAugment (arXiv 1909.13719)')
    group.add_argument('--randaugment_ops', type=Int(1), default=2, help='RandAugment: operations per image (N)')
    group.add_argument('--randaugment_magnitude', type=Int(0, 30), default=9,
                       help='RandAugment: magnitude of every operation (M, of 30)')
    flags.switch(group, '--use_trivialaugment', 'TrivialAugment (arXiv 2103.10158, torchvision\'s TrivialAugmentWide)')
    flags.switch(group, '--use_augmix', 'AugMix (arXiv 1912.02781) without its Jensen-Shannon loss')
    group.add_argument('--augmix_severity', type=Int(1, 10), default=3,
                       help='AugMix: severity of the operations (1-10)')
    group.add_argument('--policy_group_size', type=Int(1), default=8,
                       help='device pipeline: images that share one random draw of AutoAugment, RandAugment, '
                            'TrivialAugment or AugMix (torchvision draws once per call on a batch; 1: per image, '
                            'as the workers pipeline)')
    group.add_argument('--kd_temperature', type=_POSITIVE, default=4.0, help='--teacher: softmax temperature T')
    group.add_argument('--kd_alpha', type=_PROBABILITY, default=0.9,
                       help='--teacher: loss = kd_alpha T^2 KL(teacher || student) + (1 - kd_alpha) x the loss of '
                            'the other regularizers')

    group = parser.add_argument_group('Run')
    group.add_argument('--outdir', type=Text(path=True, optional=True), help='run directory (required for training)')
    group.add_argument('--seed', type=Int(0, 2**63 - 1), default=17,
                       help='random seed (model initialization, data order, augmentation)')
    group.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda if available)',
                       type=Text(pattern=r'(cpu|cuda|mps|xpu)(:[0-9]+)?', what='cpu, cuda or cuda:N', examples=['cpu'],
                                 optional=True))
    group.add_argument('--gpu', type=Int(0, optional=True), default=None, help='shorthand for --device cuda:N')
    group.add_argument('--num_threads', type=Int(1, optional=True), default=None,
                       help='threads of torch\'s CPU operators (default: OMP_NUM_THREADS if set, else on a CPU the '
                            'cores this process may use less the machine\'s load average, at least 1; set 1 where '
                            'other jobs share the cores)')
    flags.switch(group, '--test_first', 'evaluate once before training (logged as epoch 0)')
    flags.switch(group, '--tensorboard', 'write TensorBoard scalars', True)
    group.add_argument('--no-tensorboard', dest='tensorboard', action='store_false',
                       help='write no TensorBoard scalars')
    flags.switch(group, '--resume', 'continue the run in --outdir from its checkpoint.pth')
    group.add_argument('--dry_run', action='store_true',
                       help='build data and model, print the settings and parameter count, write nothing')
    group.add_argument('--evaluate', type=Text(path=True, optional=True), metavar='MODEL_STATE',
                       help='evaluate a saved model_state.pth on the test set (arch and flags from the '
                            'config.json beside it, or from the command line) and exit')
    group.add_argument('--tta', **flags.choice(('none', 'flip', 'flip_translate')), default='none',
                       help='test-time augmentation: flip averages each image and its mirror; flip_translate '
                            'also averages the mirrored pairs shifted one pixel up-left and down-right (airbench)')
    group.add_argument('--eval_every', type=Int(1), default=1, help='evaluate every N epochs (and after the last)')
    group.add_argument('--save_every', type=Int(1), default=1,
                       help='write checkpoint.pth every N epochs (and after the last)')
    group.add_argument('--save_every_steps', type=Int(0), default=0,
                       help='also write checkpoint.pth every N training steps inside an epoch (0 = off); '
                            '--resume continues at that step with the same data order')
    group.add_argument('--skip_nonfinite', type=Int(0), default=0,
                       help='skip the update of up to N training steps whose loss is NaN or infinite (counted '
                            'per epoch as nonfinite_steps in log.json); the run stops when more happen (0: at the '
                            'first)')
    flags.switch(group, '--channels_last', 'channels_last memory format for model and inputs')
    flags.switch(group, '--compile', 'torch.compile the whole training step (see README, Speed) and the evaluation')
    group.add_argument('--compile_mode', **flags.choice(COMPILE_MODES, optional=True), default=None,
                       help='torch.compile mode (needs --compile)')
    flags.switch(group, '--sync_bn', 'under torchrun: BatchNorm statistics over the batch of all ranks (SyncBatchNorm, '
                 'GPUs only); without it each rank normalizes its own images and every rank takes rank 0\'s running '
                 'statistics at the end of each epoch')
    flags.switch(group, '--find_unused_parameters', 'under torchrun: DistributedDataParallel looks for parameters a '
                 'step did not use (architectures that skip layers at random, such as resnet_stochastic_depth, need '
                 'it; it costs a little time per step)')
    group.add_argument('--dist_backend', **flags.choice(('auto', 'nccl', 'gloo')), default='auto',
                       help='under torchrun: the process group backend (auto: nccl on GPUs, gloo on CPUs)')
    group.add_argument('--dist_timeout', type=_POSITIVE, default=600,
                       help='under torchrun: seconds a rank waits for the others in a collective operation '
                            'before the job fails (a rank that stopped answering)')
    return parser


# Flags that do nothing without their switch (or one of several, '|'): given alone they are refused,
# since they would be ignored (a typo of the switch, or a forgotten one).
OPTION_SWITCHES = {
    'autoaugment_policy': 'use_autoaugment', 'randaugment_ops': 'use_randaugment',
    'randaugment_magnitude': 'use_randaugment', 'augmix_severity': 'use_augmix',
    'policy_group_size': 'use_autoaugment|use_randaugment|use_trivialaugment|use_augmix',
    'kd_temperature': 'teacher', 'kd_alpha': 'teacher', 'compile_mode': 'compile',
}
# Modes that exclude each other.
EXCLUSIVE = [('evaluate', 'resume'), ('evaluate', 'lr_finder'), ('evaluate', 'dry_run'), ('lr_finder', 'dry_run')]
# Settings that may differ between the machines of a multi-node run; all others must be the same on every rank.
MACHINE_LOCAL_FLAGS = ('explicit', 'config', 'dataset_dir', 'num_workers', 'download', 'num_threads')


def args_parser():
    """(the parser, {arch: its defaults}): get_args_parser() and ``models.arch_defaults``, kept in the user's
    cache under the hash of the code that defines them (building them imports torch and every model
    file: seconds), so that reading a command line imports none of it."""
    def build():
        return {'parser': flags.parser_spec(get_args_parser()),
                'arch_defaults': {arch: models.arch_defaults(arch) for arch in models.list_models()}}

    def load(value):
        parser = flags.parser_from_spec(value['parser'])
        parser.aliases = FLAG_ALIASES
        return parser, dict(value['arch_defaults'])
    return flags.cached('parser', flags.code_files(HERE), build, load)


@functools.lru_cache(maxsize=None)
def command_line_reader():
    """(the parser with its defaults suppressed, so that it returns only the flags given; the defaults),
    made once per process: a caller of main.cli in a loop (the tests, a benchmark) neither hashes the
    sources nor rebuilds the parser again (6 of the 7 ms of a bad command line read in-process)."""
    return flags.given_only(args_parser()[0])


def parse_args(argv=None):
    """Resolve settings: defaults < arch defaults < --config < explicit flags, each checked against its
    flag's domain, then the relations main.py owns (modes, options without their switch); the libraries
    check theirs when main() builds their objects. Reads at most the --config file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if '-h' in argv or '--help' in argv:
        flags.print_help(*args_parser(), argv)
    parser, defaults = command_line_reader()
    explicit = vars(parser.parse_args(argv))
    dataset = explicit.get('dataset', defaults['dataset'])
    if explicit.get('list_archs') and set(explicit) <= {'list_archs', 'dataset'} and dataset != 'ImageFolder':
        print('\n'.join(every_arch_listed(dataset)))  # the whole list, kept in the cache like the parser
        sys.exit(0)
    import_toolkit()
    domains = flags.domains(parser)
    config = explicit.get('config')
    from_config = flags.config_settings(utils.load_json(config, what='--config'), domains, config) if config else {}
    arch = explicit.get('arch', from_config.get('arch', defaults['arch']))
    training_defaults = models.train_defaults(arch)
    for name, value in training_defaults.items():
        flags.check_setting(name, domains[name], value, f'--arch {arch} defaults')
    settings = {**defaults, **training_defaults, **from_config, **explicit}
    given = set(from_config) | set(explicit)
    if settings['use_ricap'] and 'use_random_crop' not in given:
        settings['use_random_crop'] = False  # RICAP's paper setting; the original tool's tables have both
    args = argparse.Namespace(**settings, explicit=sorted(given))
    resolve_defaults(args)
    check_relations(args)
    return args


def resolve_defaults(args):
    """The defaults that depend on other settings or on the machine."""
    args.precision = PRECISION_ALIASES.get(args.precision, args.precision)
    if args.download is None:  # --dry_run writes nothing, a dataset included
        args.download = not (dataloader.offline() or args.dry_run)
    if args.sam_rho is None:
        args.sam_rho = optim.default_sam_rho(args.sam_adaptive)
    if args.gpu is not None:
        if args.device is not None and args.device != f'cuda:{args.gpu}':
            raise UsageError(f'--gpu {args.gpu} and --device {args.device} contradict each other: give one')
        args.device = f'cuda:{args.gpu}'
    if args.dataset_dir is None:
        args.dataset_dir = dataloader.default_dataset_dir(args.dataset)
    # a policy given by the user replaces the one an arch's defaults switch on; two given are refused
    augmentations.resolve_policy_switches(args, set(args.explicit))
    models.resolve_model_flags(args)


def check_relations(args):
    """The relations between flags that belong to no library: modes, options without their switch."""
    for first, second in EXCLUSIVE:
        if getattr(args, first) and getattr(args, second):
            raise UsageError(f'--{first} and --{second} cannot be combined: choose one')
    for option, switch in OPTION_SWITCHES.items():
        if option in args.explicit and not any(getattr(args, flag) for flag in switch.split('|')):
            raise UsageError(f'--{option} {flags.show(getattr(args, option))}: applies only with '
                             f'{" or ".join("--" + flag for flag in switch.split("|"))}')
    if args.dry_run and args.download and 'download' in args.explicit:
        raise UsageError('--download with --dry_run: a dry run writes nothing, a dataset included; run without '
                         '--dry_run to fetch it')
    if args.predict and not args.weights:
        raise UsageError('--predict needs --weights MODEL_STATE (a model_state.pth or checkpoint.pth)')
    if not (args.list_archs or args.dry_run or args.evaluate or args.predict or args.outdir):
        raise UsageError('--outdir is required (the run directory to write into)')


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    if args.list_archs:
        return list_archs(args)
    if args.predict:
        return predict(args)
    # under torchrun: join the process group, one device per rank (a single process otherwise)
    dist, device = utils.init_distributed(utils.resolve_device(args.device), args.dist_backend, args.dist_timeout)
    args.num_threads = utils.set_threads(args.num_threads, device, dist)
    if dist.enabled and args.lr_finder:
        raise UsageError('--lr_finder runs in one process: start it without torchrun')
    utils.check_same_settings(dist, vars(args), machine_local=MACHINE_LOCAL_FLAGS)
    if args.evaluate:
        return evaluate_weights(args, device, dist)

    # checked (and locked against a second run) now, created once all the input is, released on every way out
    run = None if args.dry_run else runs.RunDirectory(args.outdir, args.resume, dist)
    try:
        return build_and_train(args, run, argv, dist, device)
    finally:
        if run is not None:
            run.close()


def build_and_train(args, run, argv, dist, device):
    """main() from the run directory on (``run`` None for --dry_run)."""
    checkpoint, resumed = None, bool(args.resume)
    if run is not None:
        args.resume = args.resume and run.has_checkpoint
        if args.resume:
            checkpoint = dist.run_on_main(run.read_checkpoint)
            args = runs.restore_args(args, checkpoint)
    batch_size = engine.rank_batch_size(args.batch_size, args.subdivision, args.ghost_bn_splits, dist)
    utils.set_seed(args.seed)  # the same on every rank: the model's initialization, the flip phases
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    data = build_data(args, batch_size, device, dist)
    with dist.agree():
        model = engine.build_model(args, data.info, device)
        engine.initialize_from_data(model, data.train_loader)
        regularizer = augmentations.BatchRegularizer(data.info.num_classes, **augmentations.regularizer_kwargs(args))
    n_params = utils.count_parameters(model)
    if args.dry_run:
        return dist.print(runs.dry_run_text(args, n_params, data, batch_size, device, dist))

    # the one place where the model meets DistributedDataParallel (and SyncBatchNorm)
    model, network = utils.distribute(model, dist, device, sync_bn=args.sync_bn,
                                      find_unused_parameters=args.find_unused_parameters)
    if dist.enabled:
        utils.set_seed(args.seed + dist.rank)  # each rank augments (and drops out) with its own stream
    steps_per_epoch = len(data.train_loader)
    total_steps = args.total_steps or math.ceil(args.epochs * steps_per_epoch - 1e-9)
    length_note = None if checkpoint is None else dist.run_on_main(
        lambda: runs.check_new_length(checkpoint, args, total_steps, steps_per_epoch))
    optimizer = optim.build_optimizer(model, **optim.optimizer_kwargs(args))
    scheduler = optim.build_scheduler(optimizer, **optim.scheduler_kwargs(args), epochs=total_steps / steps_per_epoch,
                                      steps_per_epoch=steps_per_epoch)
    teacher = runs.load_teacher(args.teacher, args.dataset, args.channels_last, data.info, device)
    trainer = engine.Trainer(model, optimizer, scheduler, regularizer, device, total_steps=total_steps,
                             network=network, dist=dist, teacher=teacher, **engine.trainer_kwargs(args))
    run.create()
    if args.lr_finder:
        return engine.find_lr(model, optimizer, data.train_loader, regularizer, run.outdir)

    log, first_epoch, position = [], 1, None
    if checkpoint is not None:
        log, first_epoch, position = runs.resume(checkpoint, model, trainer, args)
    if resumed:
        run.save_json(log, 'log.json')  # the checkpoint's log is authoritative: drop epochs after it
    run.write_config(args, n_params, device, data)
    epochs = math.ceil(total_steps / steps_per_epoch)
    dist.print(runs.start_lines(args, device, n_params, data, steps_per_epoch, epochs, first_epoch, position, dist))
    if length_note:
        dist.print(length_note)
    ema_model = trainer.ema.module if trainer.ema is not None else None
    if first_epoch > epochs:
        if run.is_finished(with_ema=ema_model is not None):
            return dist.print(f'{args.outdir}: already trained for {epochs} epochs; nothing to do')
        dist.print(f'{args.outdir}: already trained for {epochs} epochs; writing its final files')
        return run.finish(model, ema_model, log, data.test_split_name)
    compile_time = trainer.compile_ahead(data.train_loader, data.test_loader) if args.compile else None
    if compile_time is not None:
        dist.print(f'--compile: compiled in {compile_time:.1f}s (before the first timed step)', flush=True)
    if args.tensorboard:
        run.open_tensorboard(purge_step=first_epoch if resumed else None)
    with utils.StopSignals() as stop:
        trainer.stop = stop
        try:
            train(run, trainer, data, args, log, first_epoch, epochs, position, compile_time)
        except engine.Interrupted as interrupted:
            raise engine.Interrupted(interrupted.signum,
                                     f'{interrupted}; resume with: {runs.resume_command(argv, dist)}') from None
    run.finish(model, ema_model, log, data.test_split_name)
    dist.print(run.written())


def build_data(args, batch_size, device, dist):
    """The loaders of --dataset on ``device``, this rank's part of each batch (a missing built-in dataset
    is fetched first, by one process per machine under torchrun)."""
    if args.download and dist.enabled:
        with dist.agree():  # one process per machine fetches the files, before the others read them
            if dist.local_rank == 0:
                dataloader.fetch_dataset(args.dataset, args.dataset_dir)
    engine.check_tta(args.tta, dataloader.DATASETS.get(args.dataset))
    with dist.agree():  # bad input that one rank finds (its copy of the dataset) stops them all
        return dataloader.build_data(**dataloader.data_kwargs(args), batch_size=batch_size, device=device,
                                     policy=augmentations.build_policy(**augmentations.policy_kwargs(args)),
                                     shard=(dist.rank, dist.world_size), seed=args.seed if dist.enabled else None)


def train(run, trainer, data, args, log, first_epoch, epochs, position, compile_time):
    """The epoch loop: train, evaluate when due, log and checkpoint; a stop signal ends it with a
    checkpoint (mid-epoch, or of the epoch just finished) and :class:`engine.Interrupted`."""
    split, progress = data.test_split_name, engine.make_progress(enabled=trainer.dist.is_main)
    if args.test_first and first_epoch == 1 and position is None:
        result = trainer.evaluate(data.test_loader, progress=progress, description=split)
        trainer.dist.print(f'epoch 0: {split} loss {result["loss"]:.4f} acc {result["accuracy"]:.4f}')
        log.append({'epoch': 0, f'{split}_loss': result['loss'], f'{split}_accuracy': result['accuracy']})
    for epoch in range(first_epoch, epochs + 1):
        data.train_loader.set_epoch(epoch)
        if position is not None:
            data.train_loader.start_at(position['order'], position['step'],
                                       (position.get('augment_rng') or {}).get(trainer.dist.rank))
        record = trainer.train_one_epoch(data.train_loader, epoch, progress, position, checkpoint=lambda position:
                                         run.save_checkpoint(runs.checkpoint_state(trainer, epoch - 1, args, log,
                                                                                   position)))
        position = None
        if compile_time is not None and epoch == first_epoch:
            record['compile_time'] = compile_time
        last = epoch == epochs
        if last or epoch % args.eval_every == 0:
            metrics = trainer.evaluate_all(data.test_loader, split, progress)
            record.update(metrics, **runs.best_so_far(log, metrics, epoch, split))
        record['epoch_time'] = record['train_time'] + record.get(f'{split}_time', 0.0)
        log.append(record)
        signum = trainer.stop_requested()
        due = last or epoch % args.save_every == 0 or signum
        run.log_epoch(log, runs.checkpoint_state(trainer, epoch, args, log) if due else None)
        trainer.dist.print(runs.epoch_line(record, epochs, split), flush=True)
        if signum and not last:
            raise engine.Interrupted(signum, f'stopped by {utils.signal_name(signum)} after epoch {epoch}; '
                                             f'checkpoint.pth resumes at epoch {epoch + 1}')


# ----------------------------------------------------------------------------- the other modes

def evaluate_weights(args, device, dist=None):
    """--evaluate: rebuild the model from the config.json beside the weights and test it.

    MODEL_STATE is a model_state.pth or a checkpoint.pth, of a single-process or a distributed run
    (or another tool's state_dict with DistributedDataParallel's ``module.`` prefix). Under torchrun
    the ranks share the test set and rank 0 prints the result of all of them.
    """
    dist = utils.SINGLE_PROCESS if dist is None else dist
    saved = runs.saved_settings(args.evaluate)
    runs.adopt_saved_settings(args, saved)
    state = dist.run_on_main(lambda: runs.read_weights(args.evaluate, '--evaluate'))
    data = build_data(args, max(1, args.batch_size // dist.world_size), device, dist)
    with dist.agree():
        model = runs.load_run_model(args.evaluate, '--evaluate', args, data.info, device, state=state, saved=saved)
    result = engine.evaluate(model, data.test_loader, device, tta=args.tta, channels_last=args.channels_last, dist=dist)
    dist.print(f'{args.evaluate}: test accuracy {result["accuracy"]:.4f}, loss {result["loss"]:.4f} '
               f'({data.test_loader.num_samples} images, tta={args.tta})')
    return result


def predict(args):
    """--predict: print the --topk classes of each image under the model --weights, one line per image.

    The arch, its flags and the dataset come from the config.json beside the weights unless given on
    the command line (as for --evaluate); each image is converted to the dataset's channels, resized to
    its input size and normalized with its statistics, as the test images were in training.
    """
    settings = runs.saved_settings(args.weights)
    runs.adopt_saved_settings(args, settings)
    dataset_dirs = [args.dataset_dir if 'dataset_dir' in args.explicit else None, settings.get('dataset_dir')]
    if args.dataset not in dataloader.DATASETS:
        directory = next((d for d in dataset_dirs if d), None)
        if directory is None:
            raise UsageError('--predict with an ImageFolder model needs --dataset_dir (its class folders and '
                             'normalization statistics)')
        args.dataset_dir = directory
    info = dataloader.dataset_info(args.dataset, args.dataset_dir, args.image_size or settings.get('image_size'))
    device = utils.resolve_device(args.device)
    model = runs.load_run_model(args.weights, '--weights', args, info, device, saved=settings)
    names = dataloader.class_names(args.dataset, dataset_dirs) or tuple(str(i) for i in range(info.num_classes))
    transform = dataloader.build_sample_transform(info, train=False, from_pil=True, image_size=info.image_size)
    topk = min(args.topk, info.num_classes)
    for path in args.predict:
        pixels = transform(dataloader.open_image(path, 'RGB' if info.in_channels == 3 else 'L'))
        print(f'{path}: ' + ', '.join(f'{names[i]} {p:.3f}' for p, i in engine.top_classes(model, pixels, topk)))


def every_arch_listed(dataset):
    """--list_archs' lines for every arch on a built-in ``dataset``, kept in the cache as the parser is
    (building them imports torch and builds every model: seconds)."""
    def build():
        import_toolkit()
        return list(models.describe_archs(models.list_models(), dataloader.DATASETS[dataset]))
    return flags.cached(f'archs-{dataset}', flags.code_files(HERE), build)


def list_archs(args):
    """--list_archs: every arch (or the --arch given, with the model flags given) with its parameters and
    forward multiply-adds at the --dataset's input size, its model flags and its training defaults."""
    info = dataloader.dataset_info(args.dataset, args.dataset_dir, args.image_size, folder_optional=True)
    given = {k: v for k, v in models.model_kwargs(args).items() if v is not None} if 'arch' in args.explicit else {}
    for line in models.describe_archs([args.arch] if 'arch' in args.explicit else models.list_models(), info, **given):
        print(line)


def cli(argv=None):
    """Run main(); bad input exits with 2, divergence with 1, each with one line on stderr.

    Under torchrun these errors reach every rank alike (the checks depend on the command line, or
    their verdict is shared), so rank 0 alone prints the line and every rank exits with the status.
    Any other exception ends its rank with a traceback, and torchrun stops the other ranks; a rank
    that finds itself alone in a collective operation (its peer died, or --dist_timeout passed)
    says so in one line instead of a second traceback.

    Ctrl-C (SIGINT) ends the command with 130 and a line; called from Python with ``argv`` (a test
    suite, a benchmark) it raises KeyboardInterrupt after that line, so that the caller stops too.
    """
    program = os.path.basename(sys.argv[0]) or 'main.py'
    rank = flags.env_rank()
    speaks = rank == 0
    try:
        main(argv)
    except UsageError as error:
        _exit(2, f'{program}: error: {error}', speaks)
    except KeyboardInterrupt:
        _exit(130, 'interrupted; resume with the same command plus --resume', speaks, leave_group=False,
              interrupt=argv is not None)
    except FloatingPointError as error:
        _exit(1, f'{program}: diverged: {error}; checkpoint.pth keeps the last checkpoint before it, if any '
                 f'(try a lower --base_lr, warmup or --gradient_clip)', speaks)
    except Exception as error:  # the toolkit's own stops (it was imported to raise them), a lost distributed peer
        import_toolkit()
        if isinstance(error, engine.Interrupted):
            _exit(128 + error.signum, f'{program}: {error}', speaks,
                  interrupt=argv is not None and error.signum == signal.SIGINT)
        if isinstance(error, utils.StorageError):
            _exit(1, f'{program}: {error}; the previous {os.path.basename(error.path)} is intact (free space, '
                     f'then continue with --resume)', speaks)
        if not (flags.launched_by_torchrun() and utils.is_collective_failure(error)):
            raise
        _exit(1, f'{program}: rank {rank} stopped: another rank failed or stopped answering '
                 f'({flags.first_line(error, 300)})', True, leave_group=False)
    _exit(0, None, speaks)


def _exit(status, message, speaks, leave_group=True, interrupt=False):
    if leave_group and 'utils' in globals():  # a run that imported the toolkit may have joined a process group
        utils.close_distributed()
    if speaks and message:
        print(message, file=sys.stderr)
    if interrupt:
        raise KeyboardInterrupt(message) from None
    if status:
        sys.exit(status)


if __name__ != '__main__':
    import_toolkit()
elif flags.launched_by_torchrun():
    flags.exit_torchrun_rank(cli)  # without the interpreter's shutdown, where gloo's threads could abort a rank
else:
    cli()
