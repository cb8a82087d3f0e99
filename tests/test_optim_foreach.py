"""The foreach LARS, AdaBound and SAM in optim.py against their per-tensor versions, and the device-side
fp16 hand-off (GradScaler's ``_step_supports_amp_scaling``) of LARS, AdaBound and Muon.

The reference classes below are verbatim copies of optim.py's per-tensor implementations as of commit
06ff7ce, before the rewrite, renamed; the rewrite must reproduce their parameters and state. One
intentional change since (LARS made as the original tool's): ReferenceLARS's trust ratio is now hysts' (``eps``, ``thresh``:
``||w|| / (eps + ||g|| + wd ||w||)``, 1 where ``||w|| < thresh``) instead of 1 where either norm is 0,
the three lines marked below; the rest is as at 06ff7ce.
"""
import copy
import math

import pytest
import torch
from torch import nn

import optim


# ---------------------------------------------------------------- per-tensor references (optim.py at 06ff7ce)

class ReferenceLARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (arXiv 1708.03888) in the form of hysts' LARSOptimizer.

    Per parameter tensor: ``local_lr = ||w|| / (eps + ||g|| + weight_decay * ||w||)`` (1 where
    ``||w|| < thresh``), ``d = local_lr * lr * (g + weight_decay * w)``, ``buf = momentum * buf + d`` and
    ``w -= buf`` (or ``w -= d + momentum * buf`` with nesterov). There is no LARS coefficient: the
    trust ratio multiplies the global lr directly. Parameters in a group with weight_decay 0 are
    still scaled by ``||w|| / ||g||``, as in hysts.
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, eps=1e-9, thresh=1e-2):
        if lr < 0:
            raise ValueError(f'LARS: invalid learning rate {lr}')
        if momentum < 0:
            raise ValueError(f'LARS: invalid momentum {momentum}')
        if weight_decay < 0:
            raise ValueError(f'LARS: invalid weight_decay {weight_decay}')
        if nesterov and momentum <= 0:
            raise ValueError('LARS: nesterov momentum requires momentum > 0')
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      eps=eps, thresh=thresh))  # changed: eps, thresh

    @torch.no_grad()
    def step(self, closure=None):
        """One update; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay, momentum = group['weight_decay'], group['momentum']
            for param in group['params']:
                if param.grad is None:
                    continue
                grad = param.grad
                weight_norm = torch.linalg.vector_norm(param)
                grad_norm = torch.linalg.vector_norm(grad)
                # torch.where keeps the ratio on the device: no host sync per tensor
                # changed: hysts' trust ratio (was: 1 where either norm is 0, no eps)
                local_lr = torch.where(weight_norm < group['thresh'], torch.ones_like(weight_norm),
                                       weight_norm / (group['eps'] + grad_norm + weight_decay * weight_norm))
                update = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad.clone()
                update.mul_(local_lr * group['lr'])
                if momentum != 0:
                    state = self.state[param]
                    if 'momentum_buffer' not in state:
                        state['momentum_buffer'] = update.clone()
                    else:
                        state['momentum_buffer'].mul_(momentum).add_(update)
                    buffer = state['momentum_buffer']
                    update = update.add(buffer, alpha=momentum) if group['nesterov'] else buffer
                param.sub_(update)
        return loss


class ReferenceAdaBound(torch.optim.Optimizer):
    """Adam whose per-element step size is clipped to bounds converging to ``final_lr`` (arXiv 1902.09843).

    Bounds after t steps, as in the authors' code (Luolc/AdaBound):
    ``lower = final_lr * (1 - 1 / (gamma * t + 1))`` and ``upper = final_lr * (1 + 1 / (gamma * t))``,
    with ``final_lr`` scaled by ``lr / base_lr`` so that an LR schedule also moves the bounds.
    ``base_lr`` is the group's lr at construction and is kept in the param group (and so in the
    optimizer's state_dict). weight_decay is an L2 term added to the gradient, as in the paper.
    """

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

    @torch.no_grad()
    def step(self, closure=None):
        """One update; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            final_lr = group['final_lr'] * group['lr'] / group['base_lr'] if group['base_lr'] > 0 else 0.0
            for param in group['params']:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError('AdaBound does not support sparse gradients')
                grad = param.grad
                if group['weight_decay'] != 0:
                    grad = grad.add(param, alpha=group['weight_decay'])
                state = self.state[param]
                if not state:
                    state['step'] = 0
                    state['exp_avg'] = torch.zeros_like(param)
                    state['exp_avg_sq'] = torch.zeros_like(param)
                state['step'] += 1
                step = state['step']
                exp_avg, exp_avg_sq = state['exp_avg'], state['exp_avg_sq']
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group['lr'] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
                lower_bound = final_lr * (1 - 1 / (group['gamma'] * step + 1))
                upper_bound = final_lr * (1 + 1 / (group['gamma'] * step)) if group['gamma'] > 0 else math.inf
                elementwise_lr = (step_size / exp_avg_sq.sqrt().add_(group['eps'])).clamp_(lower_bound, upper_bound)
                param.sub_(elementwise_lr.mul_(exp_avg))
        return loss


class ReferenceSAM(torch.optim.Optimizer):
    """Sharpness-aware minimization (arXiv 2010.01412) around an existing optimizer; ASAM with adaptive=True.

    ``first_step`` moves the weights to ``w + e(w)`` with ``e = rho * g / ||g||`` (ASAM, arXiv
    2102.11600: ``e = rho * T^2 g / ||T g||``, ``T = |w|``), the norm taken over all parameters.
    After a backward pass there, ``second_step`` restores ``w`` and lets the base optimizer step
    with the gradient of the perturbed point. ``param_groups``, ``state_dict`` and
    ``load_state_dict`` are the base optimizer's, so LR schedulers and checkpoints see through SAM.
    """

    def __init__(self, base_optimizer, rho=0.05, adaptive=False):
        if rho < 0:
            raise ValueError(f'SAM: invalid rho {rho}')
        self.base_optimizer = base_optimizer
        self.rho, self.adaptive = rho, adaptive
        super().__init__(base_optimizer.param_groups, {})
        # share the very same group dicts, so a scheduler's lr change reaches the base optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults

    def _parameters_with_grad(self):
        return [param for group in self.param_groups for param in group['params'] if param.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad=True):
        """Move to the adversarial point ``w + e(w)`` using the gradients currently stored."""
        params = self._parameters_with_grad()
        if not params:
            return
        norm_device = params[0].device
        scaled_grads = [param.grad * param.abs() if self.adaptive else param.grad for param in params]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(grad).to(norm_device) for grad in scaled_grads]))
        scale = self.rho / (grad_norm + 1e-12)
        for param, scaled_grad in zip(params, scaled_grads):
            # ASAM: T^2 g / ||T g|| = T * (T g) / ||T g||
            perturbation = scaled_grad * param.abs() if self.adaptive else scaled_grad
            perturbation = perturbation * scale.to(param.device)
            self.state[param]['perturbation'] = perturbation
            param.add_(perturbation)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad=True):
        """Return to ``w`` and step the base optimizer with the gradients of the perturbed point."""
        for group in self.param_groups:
            for param in group['params']:
                perturbation = self.state[param].pop('perturbation', None)
                if perturbation is not None:
                    param.sub_(perturbation)
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



# ---------------------------------------------------------------- helpers

SHAPES = [(4, 3, 3, 3), (4,), (7, 5), (5,), (2, 3, 2, 2), (6,)]
NUM_STEPS = 6


def make_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]
    with torch.no_grad():
        params[1].zero_()  # a fresh bias: ||w|| = 0
    return params


def copy_params(params):
    return [nn.Parameter(param.detach().clone()) for param in params]


def random_grads(params, step):
    """Gradients for ``step``: a different parameter has none at every step, one is all zeros."""
    generator = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(param.shape, generator=generator, dtype=param.dtype) for param in params]
    grads[step % len(grads)] = None
    grads[(step + 2) % len(grads)].zero_()
    return grads


def set_grads(params, grads):
    for param, grad in zip(params, grads):
        param.grad = None if grad is None else grad.clone()


def assert_same_state(reference, optimizer, reference_params, params):
    for reference_param, param in zip(reference_params, params):
        torch.testing.assert_close(param.detach(), reference_param.detach())
        expected, state = reference.state[reference_param], optimizer.state[param]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if key == 'step':  # an int there, a float32 tensor here
                assert torch.is_tensor(state[key]) and state[key].item() == value
            else:
                torch.testing.assert_close(state[key], value)


def run_both(reference, optimizer, reference_params, params, schedule=None):
    for step in range(NUM_STEPS):
        grads = random_grads(params, step)
        set_grads(reference_params, grads)
        set_grads(params, grads)
        reference.step()
        optimizer.step()
        assert_same_state(reference, optimizer, reference_params, params)
        if schedule is not None:
            schedule(reference, step)
            schedule(optimizer, step)


def groups(params, *overrides):
    """Three param groups over ``params``, with the given per-group settings."""
    bounds = [0, 2, 4, len(params)]
    return [{'params': params[start:end], **override}
            for start, end, override in zip(bounds, bounds[1:], overrides)]


# ---------------------------------------------------------------- LARS

@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('weight_decay', [0.0, 1e-2])
def test_lars_matches_per_tensor_version(nesterov, weight_decay):
    reference_params = make_params()
    params = copy_params(reference_params)
    overrides = ({}, {'weight_decay': 0.0, 'lr': 0.03}, {'momentum': 0.0, 'nesterov': False, 'weight_decay': 5e-3})
    reference = ReferenceLARS(groups(reference_params, *overrides), lr=0.1, momentum=0.9,
                              weight_decay=weight_decay, nesterov=nesterov)
    optimizer = optim.LARS(groups(params, *overrides), lr=0.1, momentum=0.9, weight_decay=weight_decay,
                           nesterov=nesterov)
    run_both(reference, optimizer, reference_params, params)
    assert 'momentum_buffer' not in optimizer.state[params[-1]]  # the group without momentum keeps none


# ---------------------------------------------------------------- AdaBound

def halve_lr_of_first_group(optimizer, step):
    if step == 2:
        optimizer.param_groups[0]['lr'] *= 0.5  # as a scheduler would: the bounds move with it


@pytest.mark.parametrize('gamma', [1e-3, 0.0])
@pytest.mark.parametrize('weight_decay', [0.0, 1e-2])
def test_adabound_matches_per_tensor_version(gamma, weight_decay):
    reference_params = make_params()
    params = copy_params(reference_params)
    overrides = ({}, {'lr': 3e-3, 'final_lr': 0.05, 'weight_decay': 0.0}, {'betas': (0.0, 0.99), 'gamma': 0.1})
    settings = dict(lr=1e-2, final_lr=0.1, gamma=gamma, weight_decay=weight_decay)
    reference = ReferenceAdaBound(groups(reference_params, *overrides), **settings)
    optimizer = optim.AdaBound(groups(params, *overrides), **settings)
    run_both(reference, optimizer, reference_params, params, schedule=halve_lr_of_first_group)


def test_adabound_float64_parameters_keep_float64_accuracy():
    reference_params = [nn.Parameter(param.detach().double()) for param in make_params()]
    params = copy_params(reference_params)
    reference = ReferenceAdaBound(reference_params, lr=1e-2, gamma=0.1)
    optimizer = optim.AdaBound(params, lr=1e-2, gamma=0.1)
    run_both(reference, optimizer, reference_params, params)  # assert_close's float64 tolerance: 1e-7


@pytest.mark.parametrize('name', ['lars', 'adabound'])
def test_checkpoint_of_the_per_tensor_version_loads_and_resumes(name):
    """The state_dict layout is unchanged: a per-tensor checkpoint (int steps) resumes the same run."""
    reference_cls, cls = {'lars': (ReferenceLARS, optim.LARS), 'adabound': (ReferenceAdaBound, optim.AdaBound)}[name]
    reference_params = make_params()
    reference = reference_cls(reference_params, lr=0.01, weight_decay=1e-3)
    for step in range(3):
        set_grads(reference_params, random_grads(reference_params, step))
        reference.step()
    params = copy_params(reference_params)
    optimizer = cls(params, lr=0.01, weight_decay=1e-3)
    optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))  # a saved checkpoint shares no tensors
    for step in range(3, NUM_STEPS):
        grads = random_grads(params, step)
        set_grads(reference_params, grads)
        set_grads(params, grads)
        reference.step()
        optimizer.step()
    assert_same_state(reference, optimizer, reference_params, params)
    # and a checkpoint of the foreach version resumes in a fresh foreach optimizer
    resumed_params = copy_params(params)
    resumed = cls(resumed_params, lr=0.01, weight_decay=1e-3)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    grads = random_grads(params, NUM_STEPS)
    set_grads(params, grads)
    set_grads(resumed_params, grads)
    optimizer.step()
    resumed.step()
    for param, resumed_param in zip(params, resumed_params):
        torch.testing.assert_close(resumed_param, param, rtol=0, atol=0)


# ---------------------------------------------------------------- SAM / ASAM

def sam_loss(params, step):
    """A smooth non-quadratic loss that leaves one parameter (a different one each step) without a gradient."""
    generator = torch.Generator().manual_seed(step)
    loss = 0
    for index, param in enumerate(params):
        if index != step % len(params):
            weights = torch.randn(param.shape, generator=generator)
            loss = loss + (weights * param).sin().sum() + 0.1 * (param ** 2).sum()
    return loss


@pytest.mark.parametrize('base', ['sgd', 'lars'])
@pytest.mark.parametrize('adaptive', [False, True])
def test_sam_matches_per_tensor_version(adaptive, base):
    reference_params = make_params()
    params = copy_params(reference_params)

    def base_optimizer(params_, lars_cls):
        param_groups = groups(params_, {}, {'weight_decay': 0.0}, {'lr': 0.02})
        if base == 'sgd':
            return torch.optim.SGD(param_groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return lars_cls(param_groups, lr=0.05, momentum=0.9, weight_decay=5e-4)

    reference = ReferenceSAM(base_optimizer(reference_params, ReferenceLARS), rho=0.1, adaptive=adaptive)
    optimizer = optim.SAM(base_optimizer(params, optim.LARS), rho=0.1, adaptive=adaptive)
    for step in range(NUM_STEPS):
        for sam, params_ in ((reference, reference_params), (optimizer, params)):
            sam.zero_grad(set_to_none=True)
            sam_loss(params_, step).backward()
            sam.first_step(zero_grad=True)
        for reference_param, param in zip(reference_params, params):
            torch.testing.assert_close(param.detach(), reference_param.detach())
            assert optimizer.state[param].keys() == reference.state[reference_param].keys()
            if 'perturbation' in reference.state[reference_param]:
                torch.testing.assert_close(optimizer.state[param]['perturbation'],
                                           reference.state[reference_param]['perturbation'])
        for sam, params_ in ((reference, reference_params), (optimizer, params)):
            sam_loss(params_, step).backward()
            sam.second_step(zero_grad=True)
        for reference_param, param in zip(reference_params, params):
            torch.testing.assert_close(param.detach(), reference_param.detach())
            assert 'perturbation' not in optimizer.state[param]
            base_state = optimizer.base_optimizer.state[param]
            for key, value in reference.base_optimizer.state[reference_param].items():
                torch.testing.assert_close(base_state[key], value)


def test_sam_first_step_without_gradients_does_nothing():
    params = make_params()
    before = [param.detach().clone() for param in params]
    optimizer = optim.SAM(torch.optim.SGD(params, lr=0.1), rho=0.1)
    optimizer.first_step()
    optimizer.second_step()
    for param, old in zip(params, before):
        assert torch.equal(param, old)


# ---------------------------------------------------------------- fp16: GradScaler's device-side hand-off

def conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


AMP_OPTIMIZERS = ['lars', 'adabound', 'muon']


def amp_optimizer(model, name):
    if name == 'muon' and not hasattr(torch.optim, 'Muon'):
        pytest.skip('--optimizer muon needs torch.optim.Muon (torch 2.9 or later)')
    return optim.build_optimizer(model, optimizer=name, base_lr=0.05, momentum=0.9, weight_decay=1e-3,
                                 betas=(0.9, 0.99), muon_lr=0.1, muon_momentum=0.6)


def batch(step, poisoned=False):
    generator = torch.Generator().manual_seed(step)
    images = torch.randn(4, 3, 8, 8, generator=generator)
    if poisoned:
        images[0, 0, 0, 0] = math.inf  # every gradient becomes inf/NaN
    return images, torch.randint(0, 4, (4,), generator=generator)


def loss_of(model, step, poisoned=False):
    images, labels = batch(step, poisoned)
    return nn.functional.cross_entropy(model(images), labels)


def flat_state(value, prefix=''):
    """{path: value} of every leaf of a (nested) optimizer state_dict."""
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items() for key, leaf in flat_state(item, f'{prefix}/{name}').items()}
    if isinstance(value, (list, tuple)):
        return {key: leaf for index, item in enumerate(value)
                for key, leaf in flat_state(item, f'{prefix}/{index}').items()}
    return {prefix: value.clone() if torch.is_tensor(value) else value}


def snapshot(model, optimizer):
    # parameters, not buffers: a poisoned forward pass leaves NaN in BatchNorm's running statistics
    return {**{name: value.detach().clone() for name, value in model.named_parameters()},
            **flat_state(optimizer.state_dict(), 'optimizer')}


def assert_snapshots_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(actual[key], value), key  # exactly, NaN-free by construction
        else:
            assert actual[key] == value, key


def amp_step(optimizer, grad_scale, found_inf):
    optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


@pytest.mark.parametrize('name', AMP_OPTIMIZERS)
def test_step_with_found_inf_changes_nothing(name):
    model, plain_model = conv_model(), conv_model()
    optimizer, plain = amp_optimizer(model, name), amp_optimizer(plain_model, name)
    assert optimizer._step_supports_amp_scaling
    expected = None
    for step in range(3):
        # a skipped step first (also the very first one, before any state exists), then a real one
        model.zero_grad(set_to_none=True)
        loss_of(model, step, poisoned=True).backward()
        before = {key: value.detach().clone() for key, value in model.named_parameters()}
        amp_step(optimizer, None, torch.ones(()))
        for key, value in model.named_parameters():
            assert torch.equal(value, before[key]), key
        if expected is not None:
            assert_snapshots_equal(snapshot(model, optimizer), expected)
        for model_, optimizer_ in ((model, optimizer), (plain_model, plain)):
            optimizer_.zero_grad(set_to_none=True)
            loss_of(model_, step).backward()
        amp_step(optimizer, None, torch.zeros(()))
        plain.step()
        expected = snapshot(model, optimizer)
        # the skipped first step left zero state where there was none: the run equals one without it
        assert_snapshots_equal(expected, snapshot(plain_model, plain))


@pytest.mark.parametrize('name', AMP_OPTIMIZERS)
def test_step_with_grad_scale_equals_unscaled_step(name):
    model, plain_model = conv_model(), conv_model()
    optimizer, plain = amp_optimizer(model, name), amp_optimizer(plain_model, name)
    scale = 2.0 ** 12  # GradScaler's scales are powers of 2: unscaling is exact
    for step in range(4):
        for model_, optimizer_ in ((model, optimizer), (plain_model, plain)):
            optimizer_.zero_grad(set_to_none=True)
            loss_of(model_, step).backward()
        for param in model.parameters():
            param.grad.mul_(scale)
        amp_step(optimizer, torch.full((), scale), torch.zeros(()))
        plain.step()
        assert_snapshots_equal(snapshot(model, optimizer), snapshot(plain_model, plain))


@pytest.mark.parametrize('unscale_first', [False, True], ids=['scaler_step', 'unscale_then_step'])
@pytest.mark.parametrize('name', AMP_OPTIMIZERS)
def test_grad_scaler_skips_inf_steps_on_the_device(name, unscale_first, monkeypatch):
    """A CPU GradScaler run equals a plain run that leaves out the poisoned step, without the host read."""
    def host_read(*args, **kwargs):
        raise AssertionError('GradScaler read found_inf on the host')
    monkeypatch.setattr(torch.amp.GradScaler, '_maybe_opt_step', host_read)
    model, plain_model = conv_model(), conv_model()
    optimizer, plain = amp_optimizer(model, name), amp_optimizer(plain_model, name)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    poisoned_steps = {1, 3}
    for step in range(5):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss_of(model, step, poisoned=step in poisoned_steps)).backward()
        if unscale_first:
            scaler.unscale_(optimizer)  # as main.py does, to clip
        scaler.step(optimizer)
        scaler.update()
        if step not in poisoned_steps:
            plain.zero_grad(set_to_none=True)
            loss_of(plain_model, step).backward()
            plain.step()
    assert scaler.get_scale() == 2.0 ** 8
    for key, value in snapshot(plain_model, plain).items():
        actual = snapshot(model, optimizer)[key]
        if torch.is_tensor(value):
            torch.testing.assert_close(actual, value, msg=key)


def test_muon_exposes_filter_gradients_to_grad_scaler():
    if not hasattr(torch.optim, 'Muon'):
        pytest.skip('--optimizer muon needs torch.optim.Muon (torch 2.9 or later)')
    model = conv_model()
    optimizer = amp_optimizer(model, 'muon')
    loss_of(model, 0).backward()
    matrices = optimizer.muon.param_groups[0]['params']
    filters = [model[0].weight, model[3].weight]
    # GradScaler unscales and checks the gradients it finds in param_groups: those of the matrices
    for matrix, filter_ in zip(matrices, filters):
        assert matrix.grad is not None and matrix.grad.data_ptr() == filter_.grad.data_ptr()
        assert matrix.grad.shape == (filter_.shape[0], filter_[0].numel())
    dampened = optim.Muon(filters, torch.optim.SGD(model[8].parameters(), lr=0.1, momentum=0.9, dampening=0.1))
    assert not dampened._step_supports_amp_scaling  # then GradScaler keeps its own (host-read) path
