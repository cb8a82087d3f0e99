"""Optimizers, learning-rate schedules, weight averaging and the learning-rate range test.

Papers:
- LARS: "Large Batch Training of Convolutional Networks", You et al., arXiv 1708.03888
- AdaBound: "Adaptive Gradient Methods with Dynamic Bound of Learning Rate", Luo et al., arXiv 1902.09843
- SAM: "Sharpness-Aware Minimization for Efficiently Improving Generalization", Foret et al., arXiv 2010.01412
- ASAM: "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
  Networks", Kwon et al., arXiv 2102.11600
- SGDR: "SGDR: Stochastic Gradient Descent with Warm Restarts", Loshchilov & Hutter, arXiv 1608.03983
- Warmup: "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", Goyal et al., arXiv 1706.02677
- LR range test: "Cyclical Learning Rates for Training Neural Networks", Smith, arXiv 1506.01186
- Muon: Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024 blog post;
  torch.optim.Muon), as airbench94_muon applies it to convolution filters (arXiv 2404.00498 lineage)

Every schedule is a ``LambdaLR`` stepped once per iteration. Its multiplier is the pure function
``lr_factor``: warmup runs over the first ``warmup_epochs`` epochs, then the main schedule runs
over the remaining steps, as in hysts' pytorch_image_classification (``scheduler/__init__.py``:
a CombinedScheduler of the warmup and a main scheduler of ``epochs - warmup_epochs``). Multistep
milestones are therefore epochs counted from the end of warmup by default
(``milestones_after_warmup``): with ``--warmup_epochs 5 --milestones '[80,120]'`` the lr drops at
epochs 85 and 125, as the original tool's MultistepScheduler does (its first step at a milestone
still has the old lr, an off-by-one of bisect_left not reproduced here). This keeps every schedule
the same "main schedule after warmup" and does what users of the original tool expect;
``--milestones_after_warmup false`` counts them from the start of training instead, as torch's
MultiStepLR, timm and Goyal et al. (arXiv 1706.02677) do. Without warmup the two are the same.

Where a reference implementation exists, the defaults are its behaviour; each class
or function documents the reference and any difference: :class:`LARS` (hysts' LARSOptimizer:
``--lars_eps 1e-9 --lars_thresh 1e-2``), :class:`SAM` (ASAM as SamsungLabs/ASAM: ``--asam_eta
0.01``, weights only, rho 0.5), :func:`frozen_bn_statistics` (SAM's second pass leaves the
BatchNorm statistics alone, as davda54/sam), ``_warmup_factor`` (hysts' linear and exponential
warmup curves).
"""
import contextlib
import copy
import functools
import json
import math
import os

import numpy as np
import torch
from torch import nn

from flags import UsageError, format_number

OPTIMIZER_CHOICES = ('sgd', 'adam', 'adamw', 'lars', 'adabound', 'muon')
SCHEDULER_CHOICES = ('none', 'multistep', 'cosine', 'sgdr', 'linear', 'polynomial')
WARMUP_METHODS = ('linear', 'exponential', 'geometric')
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _step_with_amp_handoff(optimizer, grads, update, live_tensors):
    """Run ``update()``, an optimizer's plain step, taking GradScaler's device-side hand-off.

    For an optimizer that sets ``_step_supports_amp_scaling``, ``GradScaler.step`` does not read
    found_inf on the host to decide whether to call ``step()``: it sets ``optimizer.grad_scale``
    (None when ``unscale_`` already ran) and ``optimizer.found_inf`` (device tensors) and always
    calls it. Here ``grads`` are divided by grad_scale in place, as ``unscale_`` would, and when
    found_inf is set, ``live_tensors()`` (every tensor the step writes: parameters and optimizer
    state, the state created beforehand) are copied and put back where found_inf > 0. The select
    is ``torch.where``, one call per tensor: torch has no foreach select, and blending by a 0/1
    weight (lerp, multiplying by a mask) would turn the discarded inf/NaN into NaN.
    """
    grad_scale = getattr(optimizer, 'grad_scale', None)
    found_inf = getattr(optimizer, 'found_inf', None)
    if grad_scale is not None and grads:
        torch._foreach_div_(grads, grad_scale)
    if found_inf is None:
        update()
        return
    tensors = live_tensors()
    saved = torch._foreach_clone(tensors) if tensors else []
    update()
    skipped = found_inf > 0
    for tensor, old in zip(tensors, saved):
        torch.where(skipped, old, tensor, out=tensor)


def _by_device_and_dtype(*tensor_lists):
    """The lists split by device and dtype, as torch's foreach optimizers run their kernels."""
    if not tensor_lists[0]:
        return []
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(list(tensor_lists))
    return [(device, lists) for (device, _), (lists, _) in grouped.items()]


def _one_minus_power(base, exponent):
    """``1 - base ** exponent`` as ``-expm1(exponent * log(base))``: for base near 1 the subtraction
    would cancel (1 - 0.999 keeps three of float32's seven digits)."""
    return -torch.expm1(exponent * (math.log(base) if base > 0 else -math.inf))


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (arXiv 1708.03888) as hysts' LARSOptimizer.

    Per parameter tensor, with ``g`` its gradient and ``w`` its weights:
    ``local_lr = ||w|| / (eps + ||g|| + weight_decay * ||w||)``, or 1 where ``||w|| < thresh``;
    ``d = lr * local_lr * (g + weight_decay * w)``, ``buf = momentum * buf + d`` and ``w -= buf``
    (``w -= d + momentum * buf`` with nesterov). There is no LARS coefficient: the trust ratio
    multiplies the global lr directly (tune ``--base_lr``: the original tool used 0.02 at batch 4096).
    Parameters in a group with weight_decay 0 are still scaled by ``||w|| / (eps + ||g||)``.

    Reference: hysts/pytorch_image_classification ``optim.py`` at 1d76092 and
    ``pytorch_image_classification/optim/lars.py`` (eps 1e-9, thresh 1e-2, the original tool's
    ``--lars_eps``/``--lars_thresh``): the same trust ratio, threshold, order of weight decay and
    momentum, and a buffer accumulating ``lr * local_lr * d_p`` as here. Differences: (1) the
    reference adds ``weight_decay * w`` to ``p.grad`` in place, this leaves the gradient as backward
    left it (the update is the same); (2) the reference has no Nesterov, here ``nesterov=True`` adds
    ``momentum * buf`` (main.py's ``--nesterov`` defaults to true for SGD: pass ``--nesterov false``
    to run the reference's LARS); (3) with ``eps=0`` a zero denominator (zero gradient, no weight
    decay, ``||w|| >= thresh``) gives a trust ratio of 1 here, inf and then NaN there.

    The step runs on whole tensor lists (``torch._foreach_*``, per device and dtype, as torch's
    foreach SGD) with the trust ratios kept on the device. With ``_step_supports_amp_scaling``
    GradScaler hands over grad_scale and found_inf instead of reading found_inf on the host.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, eps=1e-9, thresh=1e-2):
        if lr < 0:
            raise ValueError(f'LARS: invalid learning rate {lr}')
        if momentum < 0:
            raise ValueError(f'LARS: invalid momentum {momentum}')
        if weight_decay < 0:
            raise ValueError(f'LARS: invalid weight_decay {weight_decay}')
        if nesterov and momentum <= 0:
            raise ValueError('LARS: nesterov momentum requires momentum > 0')
        if eps < 0 or thresh < 0:
            raise ValueError(f'--lars_eps and --lars_thresh must be >= 0, got {eps} and {thresh}')
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      eps=eps, thresh=thresh))

    def __setstate__(self, state):
        super().__setstate__(state)
        # checkpoints written before eps and thresh existed: the reference's values
        for group in self.param_groups:
            group.setdefault('eps', self.defaults.get('eps', 1e-9))
            group.setdefault('thresh', self.defaults.get('thresh', 1e-2))

    def _group_tensors(self, group):
        """(parameters with a gradient, their momentum buffers or None), creating missing buffers."""
        params = [param for param in group['params'] if param.grad is not None]
        if group['momentum'] == 0:
            return params, [None] * len(params)
        buffers = []
        for param in params:
            state = self.state[param]
            if 'momentum_buffer' not in state:
                # momentum * 0 + d is d: a zero buffer gives the first step's buffer, and a skipped
                # fp16 step has a value to restore
                state['momentum_buffer'] = torch.zeros_like(param, memory_format=torch.preserve_format)
            buffers.append(state['momentum_buffer'])
        return params, buffers

    @torch.no_grad()
    def step(self, closure=None):
        """One update; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lists = [self._group_tensors(group) for group in self.param_groups]

        def update():
            for group, (params, buffers) in zip(self.param_groups, lists):
                grads = [param.grad for param in params]
                for _, device_lists in _by_device_and_dtype(params, grads, buffers):
                    _lars_update(*device_lists, lr=group['lr'], momentum=group['momentum'],
                                 weight_decay=group['weight_decay'], nesterov=group['nesterov'],
                                 eps=group['eps'], thresh=group['thresh'])

        def live_tensors():
            return [tensor for params, buffers in lists for tensor in params + buffers if tensor is not None]

        grads = [param.grad for params, _ in lists for param in params]
        _step_with_amp_handoff(self, grads, update, live_tensors)
        return loss


def _lars_update(params, grads, buffers, *, lr, momentum, weight_decay, nesterov, eps, thresh):
    """LARS over tensors of one device and dtype (the formulas in :class:`LARS`)."""
    weight_norms = torch.stack(torch._foreach_norm(params))
    grad_norms = torch.stack(torch._foreach_norm(grads))
    denominators = eps + grad_norms + weight_decay * weight_norms
    # one where over all tensors' norms: no host read, no per-tensor kernels
    trust_ratios = torch.where((weight_norms < thresh) | (denominators == 0), 1.0, weight_norms / denominators)
    step_sizes = (trust_ratios * lr).unbind()
    if weight_decay != 0:
        updates = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(updates, step_sizes)
    else:
        updates = torch._foreach_mul(grads, step_sizes)
    if momentum != 0:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, updates)
        if nesterov:
            torch._foreach_add_(updates, buffers, alpha=momentum)
        else:
            updates = buffers
    torch._foreach_sub_(params, updates)


class AdaBound(torch.optim.Optimizer):
    """Adam whose per-element step size is clipped to bounds converging to ``final_lr`` (arXiv 1902.09843).

    Bounds after t steps, as in the authors' code (Luolc/AdaBound):
    ``lower = final_lr * (1 - 1 / (gamma * t + 1))`` and ``upper = final_lr * (1 + 1 / (gamma * t))``,
    with ``final_lr`` scaled by ``lr / base_lr`` so that an LR schedule also moves the bounds.
    ``base_lr`` is the group's lr at construction and is kept in the param group (and so in the
    optimizer's state_dict). weight_decay is an L2 term added to the gradient, as in the paper.

    The step runs on whole tensor lists (``torch._foreach_*``, per device and dtype). ``state['step']``
    is a float32 tensor on the parameter's device, as in torch's fused/capturable Adam: GradScaler
    hands over found_inf (``_step_supports_amp_scaling``), and a step it skips must leave the count,
    and with it the bias corrections and bounds, unchanged without the host reading found_inf.
    Checkpoints of the per-tensor version, with an int step, load and are converted at the next step.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8, weight_decay=0.0):
        if lr < 0:
            raise ValueError(f'AdaBound: invalid learning rate {lr}')
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f'AdaBound: invalid betas {tuple(betas)}')
        if final_lr < 0:
            raise ValueError(f'AdaBound: invalid final_lr {final_lr}')
        if not 0 <= gamma < 1:
            raise ValueError(f'AdaBound: invalid gamma {gamma}')
        if eps < 0 or weight_decay < 0:
            raise ValueError(f'AdaBound: invalid eps {eps} or weight_decay {weight_decay}')
        defaults = dict(lr=lr, betas=tuple(betas), final_lr=final_lr, gamma=gamma, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """Add a group, remembering its starting lr as ``base_lr`` for the bound scaling."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault('base_lr', group['lr'])

    def _group_tensors(self, group):
        """Lists of (params, exp_avgs, exp_avg_sqs, steps) of the parameters with a gradient."""
        lists = ([], [], [], [])
        for param in group['params']:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError('AdaBound does not support sparse gradients')
            state = self.state[param]
            if not state:
                state['step'] = torch.zeros((), dtype=torch.float32, device=param.device)
                state['exp_avg'] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state['exp_avg_sq'] = torch.zeros_like(param, memory_format=torch.preserve_format)
            elif not torch.is_tensor(state['step']) or state['step'].device != param.device:
                state['step'] = torch.as_tensor(state['step'], dtype=torch.float32, device=param.device)
            for values, value in zip(lists, (param, state['exp_avg'], state['exp_avg_sq'], state['step'])):
                values.append(value)
        return lists

    @torch.no_grad()
    def step(self, closure=None):
        """One update; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lists = [self._group_tensors(group) for group in self.param_groups]

        def update():
            for group, (params, exp_avgs, exp_avg_sqs, steps) in zip(self.param_groups, lists):
                final_lr = group['final_lr'] * group['lr'] / group['base_lr'] if group['base_lr'] > 0 else 0.0
                grads = [param.grad for param in params]
                for _, device_lists in _by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, steps):
                    _adabound_update(*device_lists, lr=group['lr'], betas=group['betas'], final_lr=final_lr,
                                     gamma=group['gamma'], eps=group['eps'], weight_decay=group['weight_decay'])

        def live_tensors():
            return [tensor for group_lists in lists for values in group_lists for tensor in values]

        grads = [param.grad for params, *_ in lists for param in params]
        _step_with_amp_handoff(self, grads, update, live_tensors)
        return loss


def _adabound_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, final_lr, gamma, eps,
                     weight_decay):
    """AdaBound over tensors of one device and dtype (the formulas in :class:`AdaBound`)."""
    beta1, beta2 = betas
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_add_(steps, 1)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # the per-tensor scalars as one vector, in at least float32 (float64 for float64 parameters)
    step = torch.stack(steps).to(torch.promote_types(params[0].dtype, torch.float32))
    step_sizes = lr * _one_minus_power(beta2, step).sqrt() / _one_minus_power(beta1, step)
    gamma_step = gamma * step
    # final_lr * (1 - 1 / (gamma t + 1)) written without the cancellation
    lower_bounds = final_lr * gamma_step / (gamma_step + 1)
    elementwise_lrs = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(elementwise_lrs, eps)
    elementwise_lrs = torch._foreach_div(step_sizes.unbind(), elementwise_lrs)
    # clamp(lower, upper) as maximum then minimum: foreach clamps take no per-tensor tensor bounds
    torch._foreach_maximum_(elementwise_lrs, lower_bounds.unbind())
    if gamma > 0:
        torch._foreach_minimum_(elementwise_lrs, (final_lr * (1 + 1 / gamma_step)).unbind())
    torch._foreach_mul_(elementwise_lrs, exp_avgs)
    torch._foreach_sub_(params, elementwise_lrs)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization (arXiv 2010.01412) around an existing optimizer; ASAM with adaptive=True.

    ``first_step`` moves the weights to ``w + e(w)`` with ``e = rho * g / ||g||``, the norm taken
    over all parameters. After a backward pass there, ``second_step`` restores ``w`` and lets the
    base optimizer step with the gradient of the perturbed point. ``param_groups``, ``state_dict``
    and ``load_state_dict`` are the base optimizer's, so LR schedulers and checkpoints see through
    SAM. Both steps run on whole tensor lists (``torch._foreach_*``); the norm stays on the device.

    ASAM (arXiv 2102.11600), as the authors' code (SamsungLabs/ASAM ``asam.py``, ``ASAM.ascent_step``):
    ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` for the parameters in ``adaptive_params``
    and ``T = 1`` (SAM's direction) for the others. The authors scale the parameters whose name
    contains 'weight' (convolution, linear and norm-layer scales; no biases) with ``asam.py``'s
    default eta 0.01 (their ``example_cifar.py`` defaults to ``--eta 0.0``), and that is what
    :func:`build_optimizer` passes (``--asam_eta``). This class's own defaults, every parameter
    scaled and eta 0, are davda54/sam's ``adaptive=True``. The norm gets ``+ 1e-12`` (davda54)
    where the authors add 1e-16.

    The second forward pass also moves BatchNorm's running statistics; wrap it in
    :func:`frozen_bn_statistics` to keep them at the first pass's values, as davda54/sam's
    example does (``bypass_bn.py``).
    """

    def __init__(self, base_optimizer, rho=0.05, adaptive=False, eta=0.0, adaptive_params=None):
        if rho < 0:
            raise ValueError(f'SAM: invalid rho {rho}')
        if eta < 0:
            raise ValueError(f'--asam_eta must be >= 0, got {eta}')
        self.base_optimizer = base_optimizer
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self._scaled = None if adaptive_params is None else {id(param) for param in adaptive_params}
        super().__init__(base_optimizer.param_groups, {})
        # share the very same group dicts, so a scheduler's lr change reaches the base optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults

    def _parameters_with_grad(self):
        return [param for group in self.param_groups for param in group['params'] if param.grad is not None]

    def _adaptive_directions(self, params, grads):
        """(T g, T^2 g) for every parameter, T = |w| + eta where ASAM scales it and 1 elsewhere."""
        scaled = [index for index, param in enumerate(params) if self._scaled is None or id(param) in self._scaled]
        if not scaled:
            return grads, grads
        magnitudes = torch._foreach_abs([params[index] for index in scaled])
        if self.eta:
            torch._foreach_add_(magnitudes, self.eta)
        once = torch._foreach_mul([grads[index] for index in scaled], magnitudes)
        twice = torch._foreach_mul(once, magnitudes)
        scaled_grads, directions = list(grads), list(grads)
        for index, scaled_grad, direction in zip(scaled, once, twice):
            scaled_grads[index], directions[index] = scaled_grad, direction
        return scaled_grads, directions

    @torch.no_grad()
    def first_step(self, zero_grad=True):
        """Move to the adversarial point ``w + e(w)`` using the gradients currently stored."""
        params = self._parameters_with_grad()
        if not params:
            return
        grads = [param.grad for param in params]
        # ASAM: T^2 g / ||T g|| = T * (T g) / ||T g||
        scaled_grads, directions = self._adaptive_directions(params, grads) if self.adaptive else (grads, grads)
        # the norm over all parameters, on the first one's device, as clip_grad_norm_ takes it
        scale = self.rho / (torch.nn.utils.get_total_norm(scaled_grads) + 1e-12)
        for device, (device_params, device_directions) in _by_device_and_dtype(params, directions):
            perturbations = torch._foreach_mul(device_directions, scale.to(device))
            torch._foreach_add_(device_params, perturbations)
            for param, perturbation in zip(device_params, perturbations):
                self.state[param]['perturbation'] = perturbation
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad=True):
        """Return to ``w`` and step the base optimizer with the gradients of the perturbed point."""
        params, perturbations = [], []
        for group in self.param_groups:
            for param in group['params']:
                perturbation = self.state[param].pop('perturbation', None)
                if perturbation is not None:
                    params.append(param)
                    perturbations.append(perturbation)
        for _, (device_params, device_perturbations) in _by_device_and_dtype(params, perturbations):
            torch._foreach_sub_(device_params, device_perturbations)
        self.base_optimizer.step()
        # LR schedulers watch this flag (set by a wrapped step()) to warn about a wrong call order
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure=None):
        """Full SAM update: ``closure`` zeroes nothing itself, computes the loss and calls backward.

        It is called twice (at ``w`` and at ``w + e``), with gradients zeroed before each call;
        returns the loss at ``w``.
        """
        if closure is None:
            raise RuntimeError('SAM.step needs a closure; or call first_step() and second_step()')
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step(zero_grad=False)
        return loss

    def add_param_group(self, param_group):
        """Add a group to the base optimizer (the group list is shared)."""
        if hasattr(self, 'base_optimizer') and self.param_groups is self.base_optimizer.param_groups:
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def state_dict(self):
        """The base optimizer's state_dict (SAM itself keeps nothing between steps)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        """Load into the base optimizer and share its (newly built) param groups again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


@contextlib.contextmanager
def frozen_bn_statistics(model, enabled=True):
    """Within the block, BatchNorm layers in training mode normalize with the batch's statistics as
    usual but leave their running statistics and ``num_batches_tracked`` as they are.

    For SAM's second forward pass (at ``w + e``): davda54/sam's example (``example/utility/bypass_bn.py``)
    sets every BN layer's momentum to 0 for it and restores it afterwards. Here every ``_BatchNorm``
    with running statistics gets ``track_running_stats = False`` instead, which in training mode
    is the same normalization with no buffer written: it also holds for ``momentum=None``
    (cumulative average), where momentum 0 would still count the pass in ``num_batches_tracked``
    and so weight every later batch too little, and a non-finite batch statistic cannot reach the
    buffers through ``0 * nan``. Layers in eval mode keep using their running statistics. Only
    Python attributes change: no device work, no host-device synchronization. ``enabled=False``
    changes nothing (``--sam_freeze_bn_stats false``: both passes update the statistics).
    """
    layers = [module for module in model.modules()
              if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats] if enabled else []
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def _filter_matrix(tensor, channels_last, transposed=False):
    """The (out, in*kh*kw) matrix of a filter bank, as a view when the layout allows (``transposed``:
    its transpose, the same storage).

    A channels_last bank is read in (out, kh, kw, in) order: a permutation of the columns, which
    an orthogonalized update follows unchanged.
    """
    if channels_last:
        tensor = tensor.permute(0, 2, 3, 1)
    matrix = tensor.reshape(tensor.shape[0], -1)
    return matrix.T if transposed else matrix


def _expose_matrix_grad(matrix, matrix_view, param):
    matrix.grad = matrix_view(param.grad)


# How the Muon step of an (out, in*kh*kw) bank scales with its shape: 'none', airbench94_muon's
# (lr times the orthogonalized update, whatever the shape); 'torch', torch.optim.Muon's default
# ('original'): lr * sqrt(max(1, out / (in*kh*kw))), larger for banks with more outputs than inputs
# per output (1x1 expansions, projection shortcuts, a wide stem).
MUON_LR_ADJUSTMENTS = ('none', 'torch')


class Muon(torch.optim.Optimizer):
    """Muon on convolution filters beside an auxiliary optimizer (SGD) for all other parameters.

    The update of each filter bank is its Nesterov momentum, orthogonalized by ``ns_steps``
    Newton-Schulz iterations, which is what ``torch.optim.Muon`` (torch 2.9+) computes for 2-D
    parameters; each (out, in, kh, kw) bank is handed to it as an (out, in*kh*kw) view that shares
    the weight's storage. As in airbench94_muon, every bank is first rescaled to Frobenius norm
    sqrt(out) (``normalize_weights``): with BatchNorm after the convolution the scale does not change
    the function, and fixing it keeps the step size relative to the weights constant. No weight
    decay on the filters (airbench uses none).

    ``lr_adjust`` (:data:`MUON_LR_ADJUSTMENTS`): ``'none'`` steps every bank by ``lr`` times its
    orthogonalized update, as airbench94_muon does; ``'torch'`` keeps torch.optim.Muon's factor
    sqrt(max(1, rows / columns)). torch has no setting without the factor, so a bank with more rows
    than columns is handed to it as its transpose (a view of the same storage): the orthogonalized
    transpose is the transpose of the orthogonalized matrix, and its factor is 1.

    ``param_groups`` lists the auxiliary groups first, then the Muon group, so one LR scheduler
    drives both; ``state_dict`` holds both optimizers' states. Under GradScaler (fp16) the step takes
    grad_scale and found_inf on the device (see ``_step_supports_amp_scaling``).
    """

    def __init__(self, filters, auxiliary, lr=0.24, momentum=0.6, nesterov=True, ns_steps=3,
                 normalize_weights=True, lr_adjust='none'):
        if not hasattr(torch.optim, 'Muon'):
            raise UsageError(f'--optimizer muon needs torch.optim.Muon (torch 2.9 or later); this is torch '
                             f'{torch.__version__}')
        if lr_adjust not in MUON_LR_ADJUSTMENTS:
            raise UsageError(f'--muon_lr_adjust {lr_adjust!r}: choose {" or ".join(MUON_LR_ADJUSTMENTS)}')
        self.filters = list(filters)
        if not self.filters:
            raise UsageError('--optimizer muon: the model has no trainable convolution filters')
        self.channels_last = [p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                              for p in self.filters]
        self.lr_adjust = lr_adjust
        self.matrix_views = [functools.partial(_filter_matrix, channels_last=channels_last,
                                               transposed=lr_adjust == 'none' and p.shape[0] > p[0].numel())
                             for p, channels_last in zip(self.filters, self.channels_last)]
        self.matrices = [view(p.detach()) for view, p in zip(self.matrix_views, self.filters)]
        if any(m.data_ptr() != p.data_ptr() for m, p in zip(self.matrices, self.filters)):
            raise ValueError('--optimizer muon: a filter bank has a memory layout that has no matrix view')
        self.muon = torch.optim.Muon(self.matrices, lr=lr, weight_decay=0.0, momentum=momentum,
                                     nesterov=nesterov, ns_steps=ns_steps)
        self.auxiliary = auxiliary
        self.normalize_weights = normalize_weights
        self.target_norms = [math.sqrt(p.shape[0]) for p in self.filters]
        super().__init__(self._groups(), {})
        self.param_groups = self._groups()
        self.defaults = auxiliary.defaults
        # GradScaler's unscale_ and inf check walk param_groups, which hold the matrices: give each
        # matrix its filter's gradient (a view) as soon as backward has accumulated it
        self._grad_hooks = [param.register_post_accumulate_grad_hook(functools.partial(_expose_matrix_grad, matrix,
                                                                                       matrix_view))
                            for param, matrix, matrix_view in zip(self.filters, self.matrices, self.matrix_views)]

    def _groups(self):
        return self.auxiliary.param_groups + self.muon.param_groups

    @property
    def _step_supports_amp_scaling(self):
        """GradScaler's device-side hand-off (see :func:`_step_with_amp_handoff`) is exact when every
        momentum buffer can be created at zero before a step that may be skipped: always for torch's
        Muon, and for an SGD auxiliary without dampening, where momentum * 0 + g is its first buffer g."""
        return isinstance(self.auxiliary, torch.optim.SGD) and all(
            group['momentum'] == 0 or group['dampening'] == 0 for group in self.auxiliary.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of both optimizers; ``closure`` (optional) re-evaluates the model."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, matrix, matrix_view in zip(self.filters, self.matrices, self.matrix_views):
            matrix.grad = None if param.grad is None else matrix_view(param.grad)
        grads = [param.grad for group in self.param_groups for param in group['params'] if param.grad is not None]
        _step_with_amp_handoff(self, grads, self._update, self._live_tensors)
        return loss

    def _update(self):
        if self.normalize_weights:
            factors = torch._foreach_reciprocal(torch._foreach_norm(self.filters))
            torch._foreach_mul_(factors, self.target_norms)
            torch._foreach_mul_(self.filters, factors)
        self.auxiliary.step()
        group = self.muon.param_groups[0]
        if torch.is_tensor(group['lr']):
            self._muon_step_on_the_device(group)
        else:
            self.muon.step()

    def _muon_step_on_the_device(self, group):
        """torch.optim.Muon's update (its ``_single_tensor_muon``, Newton-Schulz included) with the lr a
        device tensor, which torch's step reads on the host: a compiled step calls this (see
        :func:`prepare_for_compile`). ``create_state`` made the momentum buffers."""
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
        for matrix in self.matrices:
            if matrix.grad is None:
                continue
            buffer = self.muon.state[matrix]['momentum_buffer']
            buffer.lerp_(matrix.grad, 1 - group['momentum'])
            update = matrix.grad.lerp(buffer, group['momentum']) if group['nesterov'] else buffer
            update = _zeropower_via_newtonschulz(update, group['ns_coefficients'], group['ns_steps'], group['eps'])
            # weight decay is 0 on the filters; the shape factor as torch's (1 for lr_adjust 'none')
            # in the weights' dtype, as torch's add_(update, alpha=-lr) computes it (the update is bf16)
            matrix.sub_(update.to(matrix.dtype) * _adjust_lr(group['lr'], group['adjust_lr_fn'], matrix.shape))

    def create_state(self):
        """The momentum buffers a first step would create (zeros), created now (the device step needs them)."""
        for matrix in self.matrices:
            state = self.muon.state[matrix]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(matrix)

    def _live_tensors(self):
        """Every tensor a step writes, the momentum buffers a first step would create made now (zeros)."""
        # all filters, also those without a gradient: normalize_weights rescales them as well
        tensors = list(self.matrices)
        for optimizer in (self.auxiliary, self.muon):
            for group in optimizer.param_groups:
                for param in group['params']:
                    if param.grad is None:
                        continue
                    if optimizer is self.auxiliary:
                        tensors.append(param)
                    if group['momentum'] != 0:
                        state = optimizer.state[param]
                        if state.get('momentum_buffer') is None:
                            state['momentum_buffer'] = torch.zeros_like(param, memory_format=torch.preserve_format)
                        tensors.append(state['momentum_buffer'])
        return tensors

    def zero_grad(self, set_to_none=True):
        self.auxiliary.zero_grad(set_to_none=set_to_none)
        for param, matrix in zip(self.filters, self.matrices):
            param.grad, matrix.grad = None, None

    def state_dict(self):
        return {'auxiliary': self.auxiliary.state_dict(), 'muon': self.muon.state_dict()}

    def load_state_dict(self, state_dict):
        self.auxiliary.load_state_dict(state_dict['auxiliary'])
        self.muon.load_state_dict(state_dict['muon'])
        self.param_groups = self._groups()
        # a state saved with the other lr_adjust holds the momentum of a tall bank in the other orientation
        for matrix in self.matrices:
            state = self.muon.state[matrix]
            buffer = state.get('momentum_buffer')
            if buffer is not None and buffer.shape != matrix.shape and buffer.T.shape == matrix.shape:
                state['momentum_buffer'] = buffer.T


def _optimizers(optimizer):
    """``optimizer`` and the optimizers inside it (SAM's base, Muon's auxiliary and torch Muon)."""
    found = [optimizer]
    for inner in (getattr(optimizer, name, None) for name in ('base_optimizer', 'auxiliary', 'muon')):
        if isinstance(inner, torch.optim.Optimizer):
            found += _optimizers(inner)
    return found


def prepare_for_compile(optimizer):
    """Make ``optimizer`` steppable inside a compiled region that the learning-rate schedule never
    recompiles (the PyTorch tutorial "Running the compiled optimizer with an LR scheduler"):

    - every group's lr becomes a 0-dim float32 tensor on its parameters' device, which the schedule
      writes in place (a Python float would be a constant of the compiled graph; dynamo guards a float64
      one on the host as it guards a float, reading its value);
    - Adam and AdamW take their capturable path (step counter on the device), which a tensor lr needs
      (on the CPU, where torch has none, their single-tensor path, which inductor fuses anyway);
    - Muon's momentum buffers exist (zeros), which its device step updates.

    The optimizers' other state comes from a first step; the Trainer takes one outside the compiled
    region and zeroes what it created, so that the compiled step only updates state (a compiled region
    that created it would recompile at the next step, which finds it).
    """
    for inner in _optimizers(optimizer):
        for group in inner.param_groups:
            if not torch.is_tensor(group['lr']):
                group['lr'] = torch.tensor(group['lr'], dtype=torch.float32, device=group['params'][0].device)
            if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                on_accelerator = group['params'][0].device.type != 'cpu'
                # torch's Adam takes a tensor lr capturable (accelerators only) or one tensor at a time
                group['capturable'], group['foreach'] = on_accelerator, on_accelerator and group['foreach']
        if hasattr(inner, 'create_state'):
            inner.create_state()


def plain_lrs(state_dict):
    """``state_dict`` (an optimizer's, nested for SAM and Muon) with tensor learning rates as floats, so
    that a checkpoint of a compiled run resumes in an eager one and the other way round."""
    if isinstance(state_dict, dict):
        return {key: [{**group, 'lr': float(group['lr'])} if isinstance(group, dict) and torch.is_tensor(
                    group.get('lr')) else group for group in value] if key == 'param_groups' else plain_lrs(value)
                for key, value in state_dict.items()}
    return state_dict


def parameter_groups(model, weight_decay, no_weight_decay_on_bn=False, base_lr=None, bn_bias_lr_factor=1.0,
                     head_lr_factor=1.0, exclude=(), schedule_epochs=None):
    """Param groups: with ``no_weight_decay_on_bn``, norm-layer parameters and biases get weight decay 0.

    A parameter goes to the no-decay group when it belongs to a BatchNorm/GroupNorm/LayerNorm/
    InstanceNorm layer or has ndim <= 1 (every bias). Frozen parameters and ``exclude`` are left out.
    ``bn_bias_lr_factor`` != 1 puts norm-layer biases in their own group with lr x factor and
    weight decay / factor, the fast-training recipe's higher BN-bias learning rate (Page,
    "How to train your ResNet"; airbench), which leaves their lr * wd product unchanged;
    ``head_lr_factor`` does the same for the last linear layer (airbench's head lr).
    ``schedule_epochs`` maps parameters to a number of epochs: each gets a group of its own, marked
    with that ``schedule_epochs``, whose learning-rate schedule ends there (airbench trains its
    whitening bias for the first 3 epochs only).
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    head = set(map(id, linears[-1].parameters())) if head_lr_factor != 1.0 and linears else set()
    skip = set(map(id, exclude))
    decay, no_decay, norm_bias, head_params, seen = [], [], [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen or id(param) in skip:
                continue
            seen.add(id(param))
            is_norm = isinstance(module, NORM_LAYERS)
            if id(param) in head:
                head_params.append(param)
            elif bn_bias_lr_factor != 1.0 and is_norm and name == 'bias':
                norm_bias.append(param)
            elif no_weight_decay_on_bn and (is_norm or param.ndim <= 1):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    for params, factor in ((norm_bias, bn_bias_lr_factor), (head_params, head_lr_factor)):
        if params:
            groups.append({'params': params, 'weight_decay': 0.0 if no_weight_decay_on_bn and params is norm_bias
                           else weight_decay / factor, 'lr': base_lr * factor})
    limited = {id(param): epochs for param, epochs in (schedule_epochs or {}).items()}
    for group in list(groups):
        moved = [param for param in group['params'] if id(param) in limited]
        # by identity: list.remove would compare tensors with ==
        group['params'] = [param for param in group['params'] if id(param) not in limited]
        groups.extend({**group, 'params': [param], 'schedule_epochs': limited[id(param)]} for param in moved)
    return [group for group in groups if group['params']]


def freeze_norm_weights(model):
    """Fix every norm layer's scale at its initial value (the fast recipe's frozen BN weights)."""
    for module in model.modules():
        if isinstance(module, NORM_LAYERS) and getattr(module, 'weight', None) is not None:
            module.weight.requires_grad_(False)


def _kernel_options(groups):
    """``fused=True`` when every parameter is a floating-point CUDA tensor (one kernel launch for all
    parameters), else ``foreach=True`` (a few launches per step instead of one per tensor)."""
    params = [param for group in groups for param in group['params']]
    if params and all(param.is_cuda and param.is_floating_point() for param in params):
        return {'fused': True}
    return {'foreach': True}


def optimizer_kwargs(args):
    """:func:`build_optimizer`'s arguments from the command line's settings."""
    return dict(optimizer=args.optimizer, base_lr=args.base_lr, momentum=args.momentum, nesterov=args.nesterov,
                weight_decay=args.weight_decay, no_weight_decay_on_bn=args.no_weight_decay_on_bn,
                betas=tuple(args.betas), adabound_final_lr=args.adabound_final_lr,
                adabound_gamma=args.adabound_gamma, use_sam=args.use_sam, sam_rho=args.sam_rho,
                sam_adaptive=args.sam_adaptive, bn_bias_lr_factor=args.bn_bias_lr_factor,
                head_lr_factor=args.head_lr_factor, whiten_bias_epochs=args.whiten_bias_epochs,
                muon_lr=args.muon_lr, muon_momentum=args.muon_momentum, muon_ns_steps=args.muon_ns_steps,
                muon_normalize_weights=args.muon_normalize_weights, muon_lr_adjust=args.muon_lr_adjust,
                lars_eps=args.lars_eps, lars_thresh=args.lars_thresh, asam_eta=args.asam_eta)


def whitening_bias_schedule(model, whiten_bias_epochs):
    """{bias: epochs} for the biases of the data-initialized patch-whitening layers (airbench trains them
    for its first epochs only), or None without ``whiten_bias_epochs``."""
    if whiten_bias_epochs is None:
        return None
    layers = [module for module in model.modules() if hasattr(module, 'initialize_from_images')]
    if not layers:
        raise UsageError('--whiten_bias_epochs: this --arch has no patch-whitening layer')
    return {layer.bias: whiten_bias_epochs for layer in layers}


def build_optimizer(model, optimizer='sgd', base_lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                    no_weight_decay_on_bn=False, betas=(0.9, 0.999), adabound_final_lr=0.1, adabound_gamma=1e-3,
                    use_sam=False, sam_rho=None, sam_adaptive=False, bn_bias_lr_factor=1.0, head_lr_factor=1.0,
                    schedule_epochs=None, whiten_bias_epochs=None, muon_lr=0.24, muon_momentum=0.6,
                    muon_ns_steps=3, muon_normalize_weights=True, lars_eps=1e-9, lars_thresh=1e-2, asam_eta=0.01,
                    muon_lr_adjust='none'):
    """The optimizer named by ``--optimizer`` over ``model``'s parameters, optionally wrapped in SAM.

    Weight decay lives in the param groups (L2 in the gradient for sgd/adam/lars/adabound, decoupled
    for adamw). Nesterov applies to sgd and lars and only when momentum > 0. ``muon`` trains the
    convolution filters with :class:`Muon` and everything else with SGD (``base_lr``, ``momentum``);
    ``muon_lr_adjust`` 'none' (airbench94_muon's step) or 'torch' (torch.optim.Muon's shape factor).
    ``sam_rho=None`` is the authors' radius: 0.05 for SAM (Foret et al.), 0.5 for ASAM (the CIFAR-10
    command of SamsungLabs/ASAM's README and ``asam.py``'s default). ASAM scales the parameters whose
    name in ``model.named_parameters()`` contains 'weight', as the authors' ``asam.py``.
    ``schedule_epochs`` (see :func:`parameter_groups`) or ``whiten_bias_epochs`` (the patch-whitening
    biases, :func:`whitening_bias_schedule`) give parameters a schedule of their own.
    The settings' single values are checked by their flags' domains (main.py's parser).
    """
    if optimizer not in OPTIMIZER_CHOICES:
        raise UsageError(f'--optimizer {optimizer!r} is not supported; choose from {", ".join(OPTIMIZER_CHOICES)}')
    if sam_rho is None:
        sam_rho = default_sam_rho(sam_adaptive)
    if whiten_bias_epochs is not None:
        schedule_epochs = whitening_bias_schedule(model, whiten_bias_epochs)
    filters = []
    if optimizer == 'muon':
        if use_sam:
            raise UsageError('--use_sam does not combine with --optimizer muon')
        filters = [param for param in model.parameters() if param.ndim == 4 and param.requires_grad]
    groups = parameter_groups(model, weight_decay, no_weight_decay_on_bn, base_lr, bn_bias_lr_factor,
                              head_lr_factor, exclude=filters, schedule_epochs=schedule_epochs)
    nesterov = bool(nesterov) and momentum > 0
    kernels = _kernel_options(groups)
    if optimizer in ('sgd', 'muon'):
        base = torch.optim.SGD(groups, lr=base_lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               **kernels)
        if optimizer == 'muon':
            base = Muon(filters, base, lr=muon_lr, momentum=muon_momentum, nesterov=nesterov,
                        ns_steps=muon_ns_steps, normalize_weights=muon_normalize_weights, lr_adjust=muon_lr_adjust)
    elif optimizer == 'adam':
        base = torch.optim.Adam(groups, lr=base_lr, betas=tuple(betas), weight_decay=weight_decay, **kernels)
    elif optimizer == 'adamw':
        base = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(betas), weight_decay=weight_decay, **kernels)
    elif optimizer == 'lars':
        base = LARS(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                    eps=lars_eps, thresh=lars_thresh)
    else:
        base = AdaBound(groups, lr=base_lr, betas=tuple(betas), final_lr=adabound_final_lr, gamma=adabound_gamma,
                        weight_decay=weight_decay)
    if not use_sam:
        return base
    weights = [param for name, param in model.named_parameters() if 'weight' in name]
    return SAM(base, rho=sam_rho, adaptive=sam_adaptive, eta=asam_eta, adaptive_params=weights)


def default_sam_rho(adaptive):
    """The authors' neighbourhood radius on CIFAR-10: SAM 0.05 (arXiv 2010.01412), ASAM 0.5 (SamsungLabs/ASAM)."""
    return 0.5 if adaptive else 0.05


def _warmup_factor(step, warmup_steps, warmup_method, warmup_start_factor, warmup_exponent=4.0):
    """The warmup multiplier at ``step``; 1 from ``warmup_steps`` on.

    linear: ``s + (1 - s) * t`` and exponential: ``s + (1 - s) * t ** warmup_exponent`` (t = step /
    warmup_steps, s the start factor) are the original tool's LinearScheduler and
    ExponentialScheduler (pytorch_image_classification/scheduler/components.py), without the
    latter's extra factor ``train.base_lr`` inside a LambdaLR multiplier, which ran its warmup at
    base_lr^2 times the curve and jumped to base_lr after it. geometric: ``s ** (1 - t)``, the same
    ratio every step.
    """
    if step >= warmup_steps:
        return 1.0
    progress = step / warmup_steps
    if warmup_method == 'linear':
        return warmup_start_factor + (1.0 - warmup_start_factor) * progress
    if warmup_method == 'exponential':
        return warmup_start_factor + (1.0 - warmup_start_factor) * progress ** warmup_exponent
    if warmup_method == 'geometric':
        return warmup_start_factor ** (1.0 - progress)
    raise UsageError(f'--warmup_method {warmup_method!r} is not supported; choose from {", ".join(WARMUP_METHODS)}')


def _sgdr_position(step, first_period, period_multiplier):
    """(steps into the current cycle, cycle length) for warm restarts with growing periods."""
    if period_multiplier == 1:
        return step % first_period, first_period
    period = first_period
    while step >= period:
        step -= period
        period *= period_multiplier
    return step, period


def lr_factor(step, scheduler='multistep', epochs=160, steps_per_epoch=1, milestones=(80, 120), lr_decay=0.1,
              lr_min=0.0, T0=10, T_mul=1, poly_power=1.0, warmup_epochs=0, warmup_method='linear',
              warmup_start_factor=1e-3, base_lr=1.0, lr_end_factor=None, warmup_exponent=4.0,
              milestones_after_warmup=True):
    """Multiplier of ``base_lr`` at iteration ``step`` (0-based); the closed form behind ``build_scheduler``.

    ``lr_min`` is an absolute lr, hence ``base_lr`` to turn it into a factor; ``lr_end_factor``, when
    given, is that final factor itself, the same for every param group (airbench94 ends at 0.07
    of each group's lr). ``epochs`` may be fractional. Warmup covers the first
    ``round(warmup_epochs * steps_per_epoch)`` steps; cosine/sgdr/linear/polynomial run over the
    steps after it; multistep milestones are epochs counted from the end of warmup
    (``milestones_after_warmup``, the original tool) or from the start of training.
    """
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    main_steps = epochs * steps_per_epoch - warmup_steps
    steps_after_warmup = max(step - warmup_steps, 0)
    progress = min(steps_after_warmup / main_steps, 1.0) if main_steps > 0 else 1.0
    if lr_end_factor is not None:
        min_factor = lr_end_factor
    else:
        min_factor = lr_min / base_lr if base_lr > 0 else 0.0
    if scheduler == 'none':
        factor = 1.0
    elif scheduler == 'multistep':
        offset = warmup_steps if milestones_after_warmup else 0
        factor = lr_decay ** sum(step >= offset + milestone * steps_per_epoch for milestone in milestones)
    elif scheduler == 'cosine':
        factor = min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif scheduler == 'sgdr':
        position, period = _sgdr_position(steps_after_warmup, T0 * steps_per_epoch, T_mul)
        factor = min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * position / period))
    elif scheduler == 'linear':
        factor = 1.0 - (1.0 - min_factor) * progress
    elif scheduler == 'polynomial':
        factor = min_factor + (1.0 - min_factor) * (1.0 - progress) ** poly_power
    else:
        raise UsageError(f'--scheduler {scheduler!r} is not supported; choose from {", ".join(SCHEDULER_CHOICES)}')
    return factor * _warmup_factor(step, warmup_steps, warmup_method, warmup_start_factor, warmup_exponent)


def scheduler_kwargs(args):
    """:func:`build_scheduler`'s arguments from the command line's settings, but the run's length. Milestones
    and warmup that come from an arch's defaults may lie beyond a trial run shorter than the arch's
    schedule; given ones (and default milestones in a run of fractional epochs or --total_steps) may not.
    Under --total_steps the whitening bias's own schedule may outlast the run."""
    unchecked = {'milestones', 'warmup_epochs'} - set(args.explicit)
    if args.total_steps is not None or not float(args.epochs).is_integer():
        unchecked.discard('milestones')
    if args.total_steps is not None:  # a step budget: a longer whitening-bias schedule covers the whole run
        unchecked.add('whiten_bias_epochs')
    return dict(scheduler=args.scheduler, milestones=args.milestones, lr_decay=args.lr_decay, lr_min=args.lr_min,
                T0=args.T0, T_mul=args.T_mul, poly_power=args.poly_power, warmup_epochs=args.warmup_epochs,
                warmup_method=args.warmup_method, warmup_start_factor=args.warmup_start_factor,
                lr_end_factor=args.lr_end_factor, warmup_exponent=args.warmup_exponent,
                milestones_after_warmup=args.milestones_after_warmup, unchecked=tuple(sorted(unchecked)))


def build_scheduler(optimizer, scheduler='multistep', epochs=160, steps_per_epoch=1, milestones=(80, 120),
                    lr_decay=0.1, lr_min=0.0, T0=10, T_mul=1, poly_power=1.0, warmup_epochs=0,
                    warmup_method='linear', warmup_start_factor=1e-3, lr_end_factor=None, warmup_exponent=4.0,
                    milestones_after_warmup=True, unchecked=()):
    """A ``LambdaLR`` following ``lr_factor``, to be stepped once per iteration (not per epoch).

    The lambdas are closures, so the scheduler's state_dict holds only counters: a scheduler
    rebuilt from the same arguments and loaded resumes the same curve. The relations of the
    settings are checked here: the milestones and the warmup fall inside the run (but those named in
    ``unchecked``), a param group's own ``schedule_epochs`` (the whitening bias) too, one final
    learning rate (``lr_end_factor`` or ``lr_min``), a geometric warmup starts above 0. Each setting's
    own range is its flag's domain (main.py's parser).
    """
    if scheduler not in SCHEDULER_CHOICES:
        raise UsageError(f'--scheduler {scheduler!r} is not supported; choose from {", ".join(SCHEDULER_CHOICES)}')
    if warmup_method not in WARMUP_METHODS:
        raise UsageError(f'--warmup_method {warmup_method!r} is not supported; choose from {", ".join(WARMUP_METHODS)}')
    total_steps = round(epochs * steps_per_epoch)
    run = f'the run ({total_steps} steps of {steps_per_epoch} per epoch)'
    milestone_offset = warmup_epochs if milestones_after_warmup else 0
    if scheduler == 'multistep' and 'milestones' not in unchecked and any(
            (milestone + milestone_offset) * steps_per_epoch > total_steps for milestone in milestones):
        after = f', counted after {format_number(warmup_epochs)} warmup epochs' if milestone_offset else ''
        raise UsageError(f'--milestones {json.dumps(list(milestones))}: beyond the end of {run}{after}; expected '
                         f'epochs before the end')
    if 'warmup_epochs' not in unchecked and warmup_epochs > 0 and warmup_epochs * steps_per_epoch >= total_steps:
        raise UsageError(f'--warmup_epochs {format_number(warmup_epochs)}: expected fewer epochs than {run} '
                         f'(warmup shorter than the run)')
    for group in optimizer.param_groups:
        if 'whiten_bias_epochs' not in unchecked and group.get('schedule_epochs', 0) > epochs:
            raise UsageError(f'--whiten_bias_epochs must be in (0, --epochs], got {group["schedule_epochs"]}')
    if lr_end_factor is not None and lr_min > 0:
        raise UsageError(f'--lr_end_factor {lr_end_factor} cannot be combined with --lr_min {lr_min}: choose one '
                         f'final learning rate')
    if warmup_epochs > 0 and warmup_method == 'geometric' and warmup_start_factor <= 0:
        raise UsageError('--warmup_method geometric needs --warmup_start_factor in (0, 1], got 0')
    schedule = dict(scheduler=scheduler, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    milestones=tuple(milestones), lr_decay=lr_decay, lr_min=lr_min, T0=T0, T_mul=T_mul,
                    poly_power=poly_power, warmup_epochs=warmup_epochs, warmup_method=warmup_method,
                    warmup_start_factor=warmup_start_factor, lr_end_factor=lr_end_factor,
                    warmup_exponent=warmup_exponent, milestones_after_warmup=milestones_after_warmup)

    def make_lambda(group):
        # lr_min is absolute, so each group's factor depends on that group's own starting lr;
        # a group marked with schedule_epochs runs the same schedule over that many epochs
        group_schedule = {**schedule, 'epochs': group.get('schedule_epochs', epochs)}
        group_base_lr = group.get('initial_lr', group['lr'])

        def factor(step):
            return lr_factor(step, base_lr=group_base_lr, **group_schedule)
        return factor

    lambdas = [make_lambda(group) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


class Lookahead:
    """airbench94's lookahead-style weight averaging (Jordan, arXiv 2404.00498, section 3.5; Zhang et
    al., "Lookahead Optimizer", arXiv 1907.08610).

    Every ``every`` steps the slow copy moves toward the model, ``slow = decay_t * slow + (1 - decay_t)
    * model``, and is written back into the model, so training continues from the average. The
    decay rises as ``decay_t = decay ** every * (t / total_steps) ** 3``: no averaging early, strong
    averaging late. At the last step the model takes the slow weights (``finish``). Floating-point
    parameters and buffers (BatchNorm statistics too) are averaged, with foreach kernels on tensor
    lists gathered once; the step count is a host int.
    """

    def __init__(self, model, total_steps, every=5, decay=0.95):
        if every < 1 or not 0 <= decay < 1:
            raise ValueError(f'--lookahead_every must be >= 1 and --lookahead_decay in [0, 1), got {every}, {decay}')
        self.total_steps, self.every, self.decay = total_steps, every, decay
        self.current = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.current]

    @torch.no_grad()
    def step(self, step):
        """Call after optimizer step number ``step`` (1-based)."""
        if step % self.every == 0:
            decay = self.decay ** self.every * (min(step, self.total_steps) / self.total_steps) ** 3
            torch._foreach_lerp_(self.slow, self.current, 1 - decay)
            torch._foreach_copy_(self.current, self.slow)
        if step >= self.total_steps:
            self.finish()

    @torch.no_grad()
    def finish(self):
        torch._foreach_copy_(self.current, self.slow)

    def state_dict(self):
        return {'slow': list(self.slow)}

    def load_state_dict(self, state_dict):
        with torch.no_grad():
            torch._foreach_copy_(self.slow, list(state_dict['slow']))


class ExponentialMovingAverage:
    """An exponential moving average of a model's weights and buffers, updated with foreach kernels.

    ``module`` is the averaged copy (evaluate or save it like the model). ``update_parameters(model)``
    blends every floating-point parameter and buffer, ``ema = decay * ema + (1 - decay) * w``, with
    one ``torch._foreach_lerp_`` over tensor lists gathered once, and copies integer buffers
    (BatchNorm's num_batches_tracked). Nothing reads a device value: the only counter, which call
    updates, is a host int. The lists hold ``model``'s tensors, so move the model before the first
    update, not after.

    ``every=K`` updates on every K-th call only, with ``decay ** K``: the weight left to the past per
    K steps is the one K updates would leave, so the horizon (about ``1 / (1 - decay)`` steps) stays
    the same while the average samples the weights every K steps (hlb-CIFAR10's ``decay_base **
    every_n_steps``; torchvision's reference script also updates every 32 steps), a difference that
    is negligible while K is small against the horizon.
    """

    def __init__(self, model, decay, every=1):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.every = decay, every
        self.num_calls = 0
        self._source, self._floats, self._others = None, None, None

    def _tensor_lists(self, model):
        """([ema floats], [model floats]) and ([ema others], [model others]), gathered once per model."""
        if model is not self._source:
            averaged = [*self.module.parameters(), *self.module.buffers()]
            current = [*model.parameters(), *model.buffers()]
            if [t.shape for t in averaged] != [t.shape for t in current]:
                raise ValueError('ExponentialMovingAverage: the model does not match the averaged copy')
            blended = [tensor.is_floating_point() or tensor.is_complex() for tensor in averaged]
            self._floats, self._others = (
                tuple([t for t, is_blended in zip(tensors, blended) if is_blended == wanted]
                      for tensors in (averaged, current))
                for wanted in (True, False))
            self._source = model
        return self._floats, self._others

    def track(self, model):
        """Gather the tensor lists of ``model`` (and its average) now; :meth:`blend` reuses them."""
        self._tensor_lists(model)

    def update_parameters(self, model):
        """Count a call; on every ``every``-th, blend ``model`` into the average."""
        if self.due():
            self.blend(model)

    def due(self):
        """Count a call (a host int); True on every ``every``-th."""
        self.num_calls += 1
        return self.num_calls % self.every == 0

    @torch.no_grad()
    def blend(self, model):
        """``ema = decay ** every * ema + (1 - decay ** every) * model`` (a compiled step compiles this: call
        :meth:`track` first, so that the compiled code finds the tensor lists gathered)."""
        (averaged_floats, current_floats), (averaged_others, current_others) = self._tensor_lists(model)
        if averaged_floats:
            torch._foreach_lerp_(averaged_floats, current_floats, 1 - self.decay ** self.every)
        if averaged_others:
            torch._foreach_copy_(averaged_others, current_others)

    def state_dict(self):
        return {'module': self.module.state_dict(), 'num_calls': self.num_calls}

    def load_state_dict(self, state_dict):
        """Load a state_dict of this class, or the averaged weights of a torch AveragedModel's one."""
        if 'n_averaged' in state_dict:  # torch.optim.swa_utils.AveragedModel, which create_ema returned before
            prefix = 'module.'
            state_dict = {'module': {key[len(prefix):]: value for key, value in state_dict.items()
                                     if key.startswith(prefix)}, 'num_calls': 0}
        self.module.load_state_dict(state_dict['module'])
        self.num_calls = int(state_dict['num_calls'])


def create_ema(model, ema_decay, every=1):
    """Exponential moving average of weights and buffers: ``ema = decay * ema + (1 - decay) * w``.

    The average starts as a copy of ``model`` and every ``update_parameters(model)`` call blends,
    hence after k updates ``ema = decay^k w0 + (1 - decay) * sum_i decay^(k-i) w_i``. With
    ``every=K`` only every K-th call updates, with ``decay^K`` in place of ``decay`` (the same
    horizon in steps; see :class:`ExponentialMovingAverage`).
    """
    return ExponentialMovingAverage(model, ema_decay, every)


def _steepest_descent_lr(lrs, losses):
    """lr where the smoothed loss falls fastest against log(lr), between the first tenth and the minimum.

    The first tenth of the points is skipped (as fastai's skip_start) because the bias-corrected
    average of a few noisy losses swings more than the trend; past the minimum the loss diverges.
    """
    skip = len(lrs) // 10
    lowest = int(np.argmin(losses)) if lrs else 0
    if lowest - skip < 1:
        return lrs[lowest] if lrs else None
    log_lrs = np.log(np.asarray(lrs[skip:lowest + 1]))
    slopes = np.gradient(np.asarray(losses[skip:lowest + 1]), log_lrs)
    return float(lrs[skip + int(np.argmin(slopes))])


def lr_range_test(model, optimizer, batches, loss_fn, start_lr=1e-7, end_lr=10.0, num_steps=100, smoothing=0.98,
                  divergence_factor=4.0, forward=None):
    """Learning-rate range test (Smith, arXiv 1506.01186; fastai's LR finder).

    Trains on ``batches`` (an iterable of (inputs, targets)) while raising the lr geometrically from
    ``start_lr`` to ``end_lr`` over ``num_steps`` steps, records the bias-corrected exponential
    moving average of the loss, and stops early when it exceeds ``divergence_factor`` times the best
    one (or is not finite). The model's and optimizer's states are restored afterwards. Returns
    ``dict(lrs, losses, suggested_lr, diverged)``; suggested_lr is the lr of steepest descent of the
    smoothed loss (``start_lr`` when no step ran).
    ``forward(inputs)``, when given, replaces ``model(inputs)`` (e.g. a regularizer's per-view forward).
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f'lr range test: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}')
    if num_steps < 1 or not 0 <= smoothing < 1 or divergence_factor <= 1:
        raise ValueError('lr range test: need num_steps >= 1, 0 <= smoothing < 1 and divergence_factor > 1')
    # state_dict() returns references to live tensors: copy them before training changes them
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    lrs, losses, diverged = [], [], False
    running_loss, best_loss = 0.0, math.inf
    try:
        model.train()
        for index, (inputs, targets) in enumerate(batches):
            if index >= num_steps:
                break
            lr = start_lr * (end_lr / start_lr) ** (index / max(num_steps - 1, 1))
            for group in optimizer.param_groups:
                group['lr'] = lr

            def closure():
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs) if forward is None else forward(inputs), targets)
                loss.backward()
                return loss.detach()

            loss = float(optimizer.step(closure))
            if not math.isfinite(loss):
                diverged = True
                break
            running_loss = smoothing * running_loss + (1 - smoothing) * loss
            smoothed_loss = running_loss / (1 - smoothing ** (index + 1))
            lrs.append(lr)
            losses.append(smoothed_loss)
            best_loss = min(best_loss, smoothed_loss)
            if smoothed_loss > divergence_factor * best_loss:
                diverged = True
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    suggested_lr = _steepest_descent_lr(lrs, losses)
    return dict(lrs=lrs, losses=losses, suggested_lr=start_lr if suggested_lr is None else suggested_lr,
                diverged=diverged)


def _draw_lr_plot(lrs, losses, suggested_lr, path):
    """Plot the smoothed loss against the learning rate (log scale), the suggested lr marked; needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7.2, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title('learning-rate range test, smoothed training loss', fontsize=10)
    axes.set_xlabel('learning rate (log scale)')
    axes.set_ylabel('loss')
    axes.set_xscale('log')
    if lrs:
        axes.plot(lrs, losses, color='#1f77b4', linewidth=2, marker='o' if len(lrs) == 1 else None)
        low = min(losses)
        # the last points after divergence can be huge: cap the axis so the descent stays readable
        high = min(max(losses), max(1.5 * losses[0], low))
        margin = 0.05 * (high - low) or 0.5
        axes.set_ylim(low - margin, high + margin)
        if suggested_lr is not None and min(lrs) <= suggested_lr <= max(lrs):
            axes.axvline(suggested_lr, color='#dc3c3c', linestyle='--', label=f'suggested lr {suggested_lr:.2g}')
            axes.legend()
    else:
        axes.text(0.5, 0.5, 'no steps recorded', transform=axes.transAxes, ha='center', va='center')
    axes.grid(True, which='both', alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def save_lr_range_test(result, outdir):
    """Write ``outdir/lr_finder.json`` (the result) and, with matplotlib, ``outdir/lr_finder.png``.

    Returns the paths written; without matplotlib only the JSON is written, and one line says so.
    """
    import sys

    import utils
    os.makedirs(outdir, exist_ok=True)
    written = [os.path.join(outdir, 'lr_finder.json')]
    utils.save_json({key: result[key] for key in ('lrs', 'losses', 'suggested_lr', 'diverged') if key in result},
                    written[0])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f'lr range test: matplotlib is not installed, so no lr_finder.png; the curve is in {written[0]}',
              file=sys.stderr)
        return written
    written.append(os.path.join(outdir, 'lr_finder.png'))
    _draw_lr_plot(result['lrs'], result['losses'], result.get('suggested_lr'), written[1])
    return written
