"""Tests for optim.py: optimizer updates against hand computations, schedule curves against their
closed forms, EMA, scheduler resume and the learning-rate range test."""
import bisect
import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import optim


class VectorModel(nn.Module):
    """A single weight vector, so losses with known gradients can be written by hand."""

    def __init__(self, values):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(values, dtype=torch.float64))


def record_lrs(optimizer, scheduler, num_steps):
    """lr used at each iteration 0..num_steps-1, stepping the scheduler once per iteration."""
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # optimizer.step() is not called: no parameters are trained here
        for _ in range(num_steps):
            lrs.append(optimizer.param_groups[0]['lr'])
            scheduler.step()
    return lrs


def schedule_lrs(num_steps, base_lr=0.1, **schedule):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    return record_lrs(optimizer, optim.build_scheduler(optimizer, **schedule), num_steps)


# ---------------------------------------------------------------- LARS

def test_lars_first_and_second_step_match_closed_form():
    weight = torch.tensor([[3.0, -4.0], [1.0, 2.0]], dtype=torch.float64)
    grads = [torch.tensor([[0.5, 0.1], [-0.2, 0.3]], dtype=torch.float64),
             torch.tensor([[-1.0, 0.4], [0.2, 0.0]], dtype=torch.float64)]
    lr, momentum, weight_decay, eps = 0.2, 0.9, 0.01, 1e-3  # an eps large enough to matter
    param = nn.Parameter(weight.clone())
    optimizer = optim.LARS([param], lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps)

    expected, buffer = weight.clone(), None
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        trust_ratio = expected.norm() / (eps + grad.norm() + weight_decay * expected.norm())
        update = lr * trust_ratio * (grad + weight_decay * expected)
        buffer = update if buffer is None else momentum * buffer + update
        expected = expected - buffer
        torch.testing.assert_close(param.detach(), expected)
        assert torch.equal(param.grad, grad)  # hysts adds weight decay to p.grad in place; not here


def test_lars_nesterov_step():
    weight = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    grads = [torch.tensor([0.3, 0.0, -0.4], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.2], dtype=torch.float64)]
    param = nn.Parameter(weight.clone())
    optimizer = optim.LARS([param], lr=0.5, momentum=0.8, weight_decay=0.0, nesterov=True)
    expected, buffer = weight.clone(), None
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        update = 0.5 * expected.norm() / (1e-9 + grad.norm()) * grad
        buffer = update if buffer is None else 0.8 * buffer + update
        expected = expected - (update + 0.8 * buffer)
    torch.testing.assert_close(param.detach(), expected)


def test_lars_trust_ratio_is_one_below_thresh():
    """hysts: local_lr = 1 where ||w|| < thresh (1e-2), whatever the gradient."""
    grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for start in (torch.zeros(3, dtype=torch.float64), torch.tensor([3e-3, 0.0, -4e-3], dtype=torch.float64)):
        param = nn.Parameter(start.clone())  # a fresh bias, a BN shift near 0: ||w|| = 0 and 5e-3
        param.grad = grad.clone()
        optim.LARS([param], lr=0.1, momentum=0.0, weight_decay=0.1).step()
        torch.testing.assert_close(param.detach(), start - 0.1 * (grad + 0.1 * start))
    # above thresh the ratio applies: ||w|| = 0.05, ||g|| = sqrt(5.25)
    start = torch.tensor([0.03, 0.0, -0.04], dtype=torch.float64)
    param = nn.Parameter(start.clone())
    param.grad = grad.clone()
    optim.LARS([param], lr=0.1, momentum=0.0, weight_decay=0.1).step()
    ratio = 0.05 / (1e-9 + math.sqrt(5.25) + 0.1 * 0.05)
    torch.testing.assert_close(param.detach(), start - 0.1 * ratio * (grad + 0.1 * start))
    # --lars_thresh 0.1 puts it below
    param = nn.Parameter(start.clone())
    param.grad = grad.clone()
    optim.LARS([param], lr=0.1, momentum=0.0, weight_decay=0.1, thresh=0.1).step()
    torch.testing.assert_close(param.detach(), start - 0.1 * (grad + 0.1 * start))


def test_lars_zero_gradient_and_zero_denominator():
    # zero gradient, weight decay: local_lr = ||w|| / (eps + wd ||w||) ~ 1 / wd, so the step is ~ lr * w
    weight = torch.tensor([2.0, -1.0], dtype=torch.float64)
    param = nn.Parameter(weight.clone())
    param.grad = torch.zeros(2, dtype=torch.float64)
    optim.LARS([param], lr=0.1, momentum=0.0, weight_decay=0.5).step()
    ratio = math.sqrt(5) / (1e-9 + 0.5 * math.sqrt(5))
    torch.testing.assert_close(param.detach(), weight - 0.1 * ratio * 0.5 * weight)
    # eps 0, no weight decay, zero gradient: 0 / 0 in the reference (then inf * 0 = NaN); ratio 1 here
    param = nn.Parameter(weight.clone())
    param.grad = torch.zeros(2, dtype=torch.float64)
    optimizer = optim.LARS([param], lr=0.1, momentum=0.9, weight_decay=0.0, eps=0.0)
    optimizer.step()
    assert torch.equal(param.detach(), weight)
    assert torch.equal(optimizer.state[param]['momentum_buffer'], torch.zeros(2, dtype=torch.float64))


class HystsLARSOptimizer(torch.optim.Optimizer):
    """hysts/pytorch_image_classification, pytorch_image_classification/optim/lars.py (993089a), with
    ``add_(alpha * t)`` written as ``add_(t, alpha=alpha)`` (the old signature is gone from torch)."""

    def __init__(self, params, lr, momentum=0, weight_decay=0, eps=1e-9, thresh=1e-2):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, thresh=thresh)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            weight_decay = group['weight_decay']
            momentum = group['momentum']
            lr = group['lr']
            eps = group['eps']
            thresh = group['thresh']
            for p in group['params']:
                if p.grad is None:
                    continue
                d_p = p.grad.data
                weight_norm = torch.norm(p.data)
                grad_norm = torch.norm(d_p)
                local_lr = weight_norm / (eps + grad_norm + weight_decay * weight_norm)
                local_lr = torch.where(weight_norm < thresh, torch.ones_like(local_lr), local_lr)
                if weight_decay != 0:
                    d_p.add_(p.data, alpha=weight_decay)
                param_state = self.state[p]
                if 'momentum_buffer' not in param_state:
                    buf = param_state['momentum_buffer'] = torch.zeros_like(p.data)
                else:
                    buf = param_state['momentum_buffer']
                buf.mul_(momentum).add_(d_p, alpha=lr * local_lr)
                p.data.add_(buf, alpha=-1.0)


def test_lars_matches_hysts_lars_optimizer_over_steps_and_groups():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (7, 5), (5,)]
    starts = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    starts[1].zero_()
    starts[3].mul_(1e-3)  # ||w|| < thresh
    params = [nn.Parameter(start.clone()) for start in starts]
    reference_params = [nn.Parameter(start.clone()) for start in starts]

    def param_groups(params_):
        return [{'params': params_[:2], 'weight_decay': 5e-4}, {'params': params_[2:], 'weight_decay': 0.0}]

    optimizer = optim.LARS(param_groups(params), lr=0.02, momentum=0.9, nesterov=False)
    reference = HystsLARSOptimizer(param_groups(reference_params), lr=0.02, momentum=0.9)
    for step in range(5):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
        for param, reference_param, grad in zip(params, reference_params, grads):
            param.grad, reference_param.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        if step == 2:
            for opt in (optimizer, reference):
                opt.param_groups[0]['lr'] *= 0.5  # as a scheduler: the buffers keep lr-scaled updates
        for param, reference_param in zip(params, reference_params):
            torch.testing.assert_close(param.detach(), reference_param.detach())
            torch.testing.assert_close(optimizer.state[param]['momentum_buffer'],
                                       reference.state[reference_param]['momentum_buffer'])


def test_lars_checkpoint_without_eps_and_thresh_loads_with_the_defaults():
    param = nn.Parameter(torch.ones(3))
    optimizer = optim.LARS([param], lr=0.1, eps=1e-7, thresh=0.5)
    state = optimizer.state_dict()
    for group in state['param_groups']:  # as written before LARS had eps and thresh
        del group['eps'], group['thresh']
    optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]['eps'] == 1e-7 and optimizer.param_groups[0]['thresh'] == 0.5
    param.grad = torch.ones(3)
    optimizer.step()


# ---------------------------------------------------------------- AdaBound

def test_adabound_clamps_elementwise_lr_to_bounds():
    grad = torch.tensor([1e-3, 0.5, 100.0, -2.0], dtype=torch.float64)
    start = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    lr, final_lr, gamma, betas, eps = 0.01, 0.1, 0.1, (0.9, 0.999), 1e-8
    param = nn.Parameter(start.clone())
    optimizer = optim.AdaBound([param], lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps)
    expected = start.clone()
    clamped_low = clamped_high = False
    for t in range(1, 4):
        param.grad = grad.clone()
        optimizer.step()
        # constant gradient: both moments have closed forms
        exp_avg = (1 - betas[0] ** t) * grad
        exp_avg_sq = (1 - betas[1] ** t) * grad ** 2
        unclipped = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) / (exp_avg_sq.sqrt() + eps)
        lower, upper = final_lr * (1 - 1 / (gamma * t + 1)), final_lr * (1 + 1 / (gamma * t))
        clamped_low |= bool((unclipped < lower).any())
        clamped_high |= bool((unclipped > upper).any())
        expected = expected - unclipped.clamp(lower, upper) * exp_avg
        torch.testing.assert_close(param.detach(), expected)
    assert clamped_low and clamped_high  # the chosen gradients exercise both bounds


def test_adabound_bounds_follow_the_scheduled_lr():
    grad = torch.tensor([1e-4, 1e4], dtype=torch.float64)
    param = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = optim.AdaBound([param], lr=1.0, final_lr=0.1, gamma=0.5)
    optimizer.param_groups[0]['lr'] = 0.5  # as a scheduler would set it
    param.grad = grad.clone()
    optimizer.step()
    final_lr = 0.1 * 0.5 / 1.0
    lower, upper = final_lr * (1 - 1 / 1.5), final_lr * (1 + 1 / 0.5)
    exp_avg = 0.1 * grad
    torch.testing.assert_close(param.detach(), -torch.stack([upper * exp_avg[0], lower * exp_avg[1]]))


# ---------------------------------------------------------------- SAM / ASAM

QUADRATIC_SCALE = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
QUADRATIC_SHIFT = torch.tensor([0.2, -1.0, 0.4], dtype=torch.float64)


def quadratic_loss(weight):
    """0.5 * sum(a w^2) + b.w, gradient a * w + b."""
    return 0.5 * (QUADRATIC_SCALE * weight ** 2).sum() + (QUADRATIC_SHIFT * weight).sum()


def quadratic_grad(weight):
    return QUADRATIC_SCALE * weight + QUADRATIC_SHIFT


@pytest.mark.parametrize('adaptive', [False, True])
def test_sam_two_step_update_matches_hand_computation(adaptive):
    start = [1.0, -0.5, 2.0]
    rho, lr = 0.3, 0.1
    model = VectorModel(start)
    optimizer = optim.build_optimizer(model, optimizer='sgd', base_lr=lr, momentum=0.0, weight_decay=0.0,
                                      use_sam=True, sam_rho=rho, sam_adaptive=adaptive)
    assert isinstance(optimizer, optim.SAM) and isinstance(optimizer.base_optimizer, torch.optim.SGD)
    quadratic_loss(model.weight).backward()
    optimizer.first_step(zero_grad=True)

    weight = torch.tensor(start, dtype=torch.float64)
    grad = quadratic_grad(weight)
    if adaptive:  # ASAM as SamsungLabs/ASAM: T = |w| + eta, eta 0.01
        scale = weight.abs() + 0.01
        perturbation = rho * scale ** 2 * grad / (scale * grad).norm()
    else:
        perturbation = rho * grad / grad.norm()
    torch.testing.assert_close(model.weight.detach(), weight + perturbation)
    assert model.weight.grad is None

    quadratic_loss(model.weight).backward()
    optimizer.second_step(zero_grad=True)
    torch.testing.assert_close(model.weight.detach(), weight - lr * quadratic_grad(weight + perturbation))


@pytest.mark.parametrize('adaptive', [False, True])
def test_sam_step_with_closure_equals_two_steps(adaptive):
    def run(use_closure):
        model = VectorModel([0.7, -1.2, 0.3])
        optimizer = optim.build_optimizer(model, optimizer='sgd', base_lr=0.05, momentum=0.9, weight_decay=1e-3,
                                          use_sam=True, sam_rho=0.1, sam_adaptive=adaptive)
        for _ in range(3):
            if use_closure:
                def closure():
                    loss = quadratic_loss(model.weight)
                    loss.backward()
                    return loss
                optimizer.step(closure)
            else:
                optimizer.zero_grad()
                quadratic_loss(model.weight).backward()
                optimizer.first_step(zero_grad=True)
                quadratic_loss(model.weight).backward()
                optimizer.second_step(zero_grad=True)
        return model.weight.detach()
    torch.testing.assert_close(run(True), run(False))


def test_sam_delegates_param_groups_and_state_dict():
    model = VectorModel([1.0, 2.0, 3.0])
    optimizer = optim.build_optimizer(model, optimizer='sgd', base_lr=0.1, momentum=0.9, use_sam=True)
    scheduler = optim.build_scheduler(optimizer, scheduler='multistep', epochs=4, milestones=[1])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no "lr_scheduler.step() before optimizer.step()" warning
        for _ in range(2):
            quadratic_loss(model.weight).backward()
            optimizer.first_step()
            quadratic_loss(model.weight).backward()
            optimizer.second_step()
            scheduler.step()
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert optimizer.base_optimizer.param_groups[0]['lr'] == pytest.approx(0.01)
    state = optimizer.state_dict()
    assert state.keys() == optimizer.base_optimizer.state_dict().keys()
    buffer = state['state'][0]['momentum_buffer'].clone()

    fresh = optim.build_optimizer(VectorModel([0.0, 0.0, 0.0]), optimizer='sgd', base_lr=0.1, use_sam=True)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.base_optimizer.state_dict()['state'][0]['momentum_buffer'], buffer)
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    assert fresh.param_groups[0]['lr'] == pytest.approx(0.01)


class WeightAndBias(nn.Module):
    """A 'weight' and a 'bias' vector: ASAM scales only the parameter whose name contains 'weight'."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))

    def loss(self):
        return quadratic_loss(self.weight) + (self.bias ** 3).sum() + 0.5 * self.bias.sum()


@pytest.mark.parametrize('eta', [0.01, 0.0, 0.5])
def test_asam_scales_weights_only_with_eta(eta):
    """SamsungLabs/ASAM asam.py: T_w = |w| + eta for names containing 'weight', T = 1 for the rest;
    e = rho T (T g) / ||T g|| with the norm over all parameters."""
    model = WeightAndBias()
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = optim.build_optimizer(model, optimizer='sgd', base_lr=0.1, momentum=0.0, weight_decay=0.0,
                                      use_sam=True, sam_adaptive=True, asam_eta=eta)
    assert optimizer.rho == 0.5 and optimizer.eta == eta  # the authors' CIFAR-10 rho for ASAM
    model.loss().backward()
    optimizer.first_step(zero_grad=True)
    grad_weight, grad_bias = quadratic_grad(weight), 3 * bias ** 2 + 0.5
    scale = weight.abs() + eta
    norm = torch.cat([scale * grad_weight, grad_bias]).norm()
    torch.testing.assert_close(model.weight.detach(), weight + 0.5 * scale ** 2 * grad_weight / norm)
    torch.testing.assert_close(model.bias.detach(), bias + 0.5 * grad_bias / norm)


def test_sam_rho_defaults_and_explicit_rho():
    for adaptive, rho in ((False, 0.05), (True, 0.5)):
        assert optim.build_optimizer(VectorModel([1.0]), use_sam=True, sam_adaptive=adaptive).rho == rho
    assert optim.build_optimizer(VectorModel([1.0]), use_sam=True, sam_adaptive=True, sam_rho=2.0).rho == 2.0
    with pytest.raises(ValueError, match='--asam_eta'):
        optim.build_optimizer(VectorModel([1.0]), use_sam=True, asam_eta=-1.0)


def bn_model(momentum):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def bn_buffers(model):
    return {name: value.clone() for name, value in model.state_dict().items()
            if 'running' in name or 'num_batches' in name}


@pytest.mark.parametrize('momentum', [0.1, None])
def test_frozen_bn_statistics_normalize_as_usual_and_write_no_buffer(momentum):
    model = bn_model(momentum)
    images = torch.randn(8, 3, 8, 8)
    model(torch.randn(8, 3, 8, 8))  # one update, so the statistics are not the initial ones
    before = bn_buffers(model)
    reference = copy.deepcopy(model)
    with optim.frozen_bn_statistics(model):
        output = model(images)
        assert model[1].track_running_stats is False
    torch.testing.assert_close(output, reference(images))  # batch statistics, as a normal training pass
    for name, value in bn_buffers(model).items():
        assert torch.equal(value, before[name]), name
    assert model[1].track_running_stats is True and model[1].momentum == momentum
    # the next normal pass is the second one counted: a cumulative average (momentum None) weights it
    # 1/2, which momentum 0 in the frozen pass (davda54's bypass_bn) would have made 1/3
    model(images)
    assert model[1].num_batches_tracked.item() == 2
    with torch.no_grad():
        batch_mean = model[0](images).mean(dim=(0, 2, 3))
    factor = 0.5 if momentum is None else momentum
    torch.testing.assert_close(model[1].running_mean, (1 - factor) * before['1.running_mean'] + factor * batch_mean)


def test_frozen_bn_statistics_disabled_restores_and_survives_errors():
    model = bn_model(0.1)
    before = bn_buffers(model)
    with optim.frozen_bn_statistics(model, enabled=False):
        model(torch.randn(8, 3, 8, 8))
    assert not torch.equal(bn_buffers(model)['1.running_mean'], before['1.running_mean'])
    untracked = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(RuntimeError, match='inside'):
        with optim.frozen_bn_statistics(nn.Sequential(model, untracked)):
            raise RuntimeError('inside')
    assert model[1].track_running_stats is True and untracked.track_running_stats is False


def test_sam_with_frozen_second_pass_updates_bn_statistics_once():
    """SAM's two passes with the second one frozen leave the statistics of one pass (davda54/sam)."""
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
    single = bn_model(0.1)
    model = bn_model(0.1)
    single(images)
    optimizer = optim.build_optimizer(model, optimizer='sgd', base_lr=0.1, use_sam=True)
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.first_step(zero_grad=True)
    with optim.frozen_bn_statistics(model):
        nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.second_step(zero_grad=True)
    for name, value in bn_buffers(single).items():
        assert torch.equal(bn_buffers(model)[name], value), name


# ---------------------------------------------------------------- build_optimizer

def norm_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False),
                         nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))


def test_no_weight_decay_on_bn_groups():
    model = norm_model()
    optimizer = optim.build_optimizer(model, weight_decay=5e-4, no_weight_decay_on_bn=True)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {group['weight_decay']: {names[id(p)] for p in group['params']} for group in optimizer.param_groups}
    assert groups == {5e-4: {'0.weight', '3.weight', '6.weight'},
                      0.0: {'0.bias', '1.weight', '1.bias', '4.weight', '4.bias', '6.bias'}}

    plain = optim.build_optimizer(model, weight_decay=5e-4)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]['weight_decay'] == 5e-4
    assert len(plain.param_groups[0]['params']) == len(list(model.parameters()))


def test_no_weight_decay_parameters_get_no_decay():
    model = norm_model()
    optimizer = optim.build_optimizer(model, base_lr=0.1, momentum=0.0, weight_decay=0.5, no_weight_decay_on_bn=True)
    bn_weight, conv_weight = model[1].weight.detach().clone(), model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model[1].weight.detach(), bn_weight)
    torch.testing.assert_close(model[0].weight.detach(), conv_weight * (1 - 0.1 * 0.5))


@pytest.mark.parametrize('name, cls', [('sgd', torch.optim.SGD), ('adam', torch.optim.Adam),
                                       ('adamw', torch.optim.AdamW), ('lars', optim.LARS),
                                       ('adabound', optim.AdaBound)])
def test_build_optimizer_types_and_hyperparameters(name, cls):
    optimizer = optim.build_optimizer(norm_model(), optimizer=name, base_lr=0.03, momentum=0.8,
                                      betas=(0.8, 0.99), adabound_final_lr=0.05, adabound_gamma=2e-3)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group['lr'] == 0.03
    if name in ('sgd', 'lars'):
        assert group['momentum'] == 0.8 and group['nesterov'] is True
    else:
        assert tuple(group['betas']) == (0.8, 0.99)
    if name == 'adabound':
        assert group['final_lr'] == 0.05 and group['gamma'] == 2e-3


def test_build_optimizer_passes_lars_eps_and_thresh():
    default = optim.build_optimizer(norm_model(), optimizer='lars')
    assert all(group['eps'] == 1e-9 and group['thresh'] == 1e-2 for group in default.param_groups)
    custom = optim.build_optimizer(norm_model(), optimizer='lars', lars_eps=1e-6, lars_thresh=0.0)
    assert all(group['eps'] == 1e-6 and group['thresh'] == 0.0 for group in custom.param_groups)
    with pytest.raises(ValueError, match='--lars_eps'):
        optim.build_optimizer(norm_model(), optimizer='lars', lars_eps=-1.0)


def test_bad_names_raise_value_error_naming_the_flag():
    with pytest.raises(ValueError, match='--optimizer.*rmsprop.*sgd'):
        optim.build_optimizer(norm_model(), optimizer='rmsprop')
    optimizer = optim.build_optimizer(norm_model())
    with pytest.raises(ValueError, match='--scheduler.*step'):
        optim.build_scheduler(optimizer, scheduler='step')
    with pytest.raises(ValueError, match='--warmup_method'):
        optim.build_scheduler(optimizer, scheduler='cosine', warmup_epochs=1, warmup_method='quadratic')
    with pytest.raises(ValueError, match='--scheduler'):
        optim.lr_factor(0, scheduler='onecycle')


# ---------------------------------------------------------------- schedules

def test_multistep_milestones_in_epochs():
    lrs = schedule_lrs(40, scheduler='multistep', epochs=10, steps_per_epoch=4, milestones=[3, 6], lr_decay=0.2)
    for step, expected in [(0, 0.1), (11, 0.1), (12, 0.02), (23, 0.02), (24, 0.004), (39, 0.004)]:
        assert lrs[step] == pytest.approx(expected), step


@pytest.mark.parametrize('warmup_method', ['linear', 'exponential', 'geometric'])
def test_cosine_with_warmup(warmup_method):
    base_lr, lr_min, start_factor = 0.4, 0.01, 0.01
    schedule = dict(scheduler='cosine', epochs=10, steps_per_epoch=4, lr_min=lr_min, warmup_epochs=2,
                    warmup_method=warmup_method, warmup_start_factor=start_factor)
    lrs = schedule_lrs(41, base_lr=base_lr, **schedule)
    # warmup: 8 steps; cosine over the remaining 32
    if warmup_method == 'linear':
        warmup_mid = base_lr * (start_factor + (1 - start_factor) * 0.5)
        warmup_step2 = base_lr * (start_factor + (1 - start_factor) * 2 / 8)
    elif warmup_method == 'exponential':  # the original tool's: s + (1 - s) t^4
        warmup_mid = base_lr * (start_factor + (1 - start_factor) * 0.5 ** 4)
        warmup_step2 = base_lr * (start_factor + (1 - start_factor) * (2 / 8) ** 4)
    else:
        warmup_mid = base_lr * math.sqrt(start_factor)
        warmup_step2 = base_lr * start_factor ** (6 / 8)
    cosine = lambda t: lr_min + (base_lr - lr_min) * 0.5 * (1 + math.cos(math.pi * t / 32))  # noqa: E731
    expected = {0: base_lr * start_factor, 2: warmup_step2, 4: warmup_mid, 8: base_lr,
                9: cosine(1), 24: (base_lr + lr_min) / 2, 39: cosine(31), 40: lr_min}
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value), step
        assert base_lr * optim.lr_factor(step, base_lr=base_lr, **schedule) == pytest.approx(value)
    # stepped per iteration: the lr changes within an epoch, during warmup and during the decay
    assert len(set(lrs[0:4])) == 4 and len(set(lrs[12:16])) == 4
    assert all(a < b for a, b in zip(lrs[:8], lrs[1:9])) and all(a > b for a, b in zip(lrs[8:40], lrs[9:41]))


# hysts/pytorch_image_classification at 993089a, pytorch_image_classification/scheduler/: the
# classes the original tool combines into its LambdaLR multiplier (components.py, combined_scheduler.py,
# multistep_scheduler.py), copied with their names; ExponentialScheduler gets base_lr=1 (the original
# passes train.base_lr, which LambdaLR multiplies in a second time).

class ConstantScheduler:
    def __init__(self, steps, lr):
        self.steps = steps
        self.lr = lr

    def __call__(self, step):
        return self.lr


class CosineScheduler:
    def __init__(self, steps, base_lr, lr_min_factor=1e-3):
        self.steps = steps
        self.base_lr = base_lr
        self.lr_min_factor = lr_min_factor

    def __call__(self, step):
        return self.base_lr * (self.lr_min_factor + (1 - self.lr_min_factor) * 0.5 *
                               (1 + np.cos(step / self.steps * np.pi)))


class ExponentialScheduler:
    def __init__(self, steps, base_lr, exponent, lr_start_factor=1e-3):
        self.steps = steps
        self.base_lr = base_lr
        self.exponent = exponent
        self.lr_start_factor = lr_start_factor

    def __call__(self, step):
        return self.base_lr * (self.lr_start_factor + (1 - self.lr_start_factor) * (step / self.steps)**self.exponent)


class LinearScheduler:
    def __init__(self, steps, lr_start, lr_end):
        self.steps = steps
        self.lr_start = lr_start
        self.lr_end = lr_end

    def __call__(self, step):
        return self.lr_start + (self.lr_end - self.lr_start) * step / self.steps


class CombinedScheduler:
    def __init__(self, schedulers=None):
        self.schedulers = []
        for scheduler in schedulers or []:
            if scheduler is None:
                continue
            elif hasattr(scheduler, 'schedulers'):
                self.schedulers += scheduler.schedulers
            else:
                self.schedulers.append(scheduler)

    def __call__(self, step):
        index = bisect.bisect_left(self._offsets, step) - 1
        index = max(0, min(index, len(self.schedulers) - 1))
        return self.schedulers[index](step - self._offsets[index])

    @property
    def _offsets(self):
        return np.cumsum(np.concatenate([[0], [scheduler.steps for scheduler in self.schedulers]]))

    def multiply_steps(self, val):
        for scheduler in self.schedulers:
            scheduler.steps *= val


class MultistepScheduler(CombinedScheduler):
    def __init__(self, steps, base_lr, gamma, milestones):
        lrs = [base_lr * gamma**index for index in range(len(milestones) + 1)]
        step_list = [step1 - step0 for step0, step1 in zip([0] + milestones, milestones + [steps])]
        super().__init__([ConstantScheduler(step, lr) for step, lr in zip(step_list, lrs)])


def original_tool_factors(warmup, main, steps_per_epoch, num_steps):
    """create_scheduler's multiplier (scheduler/__init__.py): warmup then main, epochs times steps."""
    combined = CombinedScheduler([warmup, main])
    combined.multiply_steps(steps_per_epoch)
    return [float(combined(step)) for step in range(num_steps)]


@pytest.mark.parametrize('warmup_method', ['linear', 'exponential'])
def test_warmup_then_cosine_is_the_original_tools_curve(warmup_method):
    epochs, warmup_epochs, steps_per_epoch, start_factor, min_factor = 10, 3, 4, 1e-3, 1e-3
    if warmup_method == 'linear':
        warmup = LinearScheduler(warmup_epochs, start_factor, 1)
    else:
        warmup = ExponentialScheduler(warmup_epochs, 1, 4, start_factor)
    expected = original_tool_factors(warmup, CosineScheduler(epochs - warmup_epochs, 1, min_factor),
                                     steps_per_epoch, epochs * steps_per_epoch)
    ours = [optim.lr_factor(step, scheduler='cosine', epochs=epochs, steps_per_epoch=steps_per_epoch,
                            warmup_epochs=warmup_epochs, warmup_method=warmup_method,
                            warmup_start_factor=start_factor, lr_end_factor=min_factor)
            for step in range(epochs * steps_per_epoch)]
    assert ours == pytest.approx(expected, rel=1e-12)
    assert ours[0] == start_factor and ours[12] == pytest.approx(1.0)


def test_multistep_milestones_count_from_the_end_of_warmup():
    epochs, warmup_epochs, steps_per_epoch, milestones = 10, 2, 4, [3, 6]
    schedule = dict(scheduler='multistep', epochs=epochs, steps_per_epoch=steps_per_epoch, milestones=milestones,
                    lr_decay=0.1, warmup_epochs=warmup_epochs, warmup_start_factor=0.5)
    after = schedule_lrs(40, base_lr=1.0, **schedule)
    # warmup over steps 0-7, then drops at (2 + 3) * 4 = 20 and (2 + 6) * 4 = 32
    assert after[:8] == pytest.approx([0.5 + 0.5 * step / 8 for step in range(8)])
    assert after[8:20] == pytest.approx([1.0] * 12) and after[20:32] == pytest.approx([0.1] * 12)
    assert after[32:] == pytest.approx([0.01] * 8)
    # --milestones_after_warmup false: at 3 * 4 = 12 and 6 * 4 = 24, as torch's MultiStepLR
    before = schedule_lrs(40, base_lr=1.0, milestones_after_warmup=False, **schedule)
    assert before[:8] == after[:8]
    assert before[8:12] == pytest.approx([1.0] * 4) and before[12:24] == pytest.approx([0.1] * 12)
    assert before[24:] == pytest.approx([0.01] * 16)
    # the original tool's MultistepScheduler: the same, but the first step at each milestone still
    # has the previous lr (bisect_left in CombinedScheduler), a one-step lag not reproduced
    expected = original_tool_factors(LinearScheduler(warmup_epochs, 0.5, 1),
                                     MultistepScheduler(epochs - warmup_epochs, 1, 0.1, milestones),
                                     steps_per_epoch, 40)
    lagged = {20, 32}
    assert [a for step, a in enumerate(after) if step not in lagged] == pytest.approx(
        [e for step, e in enumerate(expected) if step not in lagged])
    assert [expected[step] for step in sorted(lagged)] == pytest.approx([after[step - 1] for step in sorted(lagged)])


@pytest.mark.parametrize('T_mul, restarts', [(1, [8, 16, 24, 32]), (2, [8, 24])])
def test_sgdr_restarts(T_mul, restarts):
    base_lr, lr_min = 0.1, 0.001
    lrs = schedule_lrs(40, base_lr=base_lr, scheduler='sgdr', epochs=10, steps_per_epoch=4, T0=2, T_mul=T_mul,
                       lr_min=lr_min)
    cosine = lambda t, period: lr_min + (base_lr - lr_min) * 0.5 * (1 + math.cos(math.pi * t / period))  # noqa: E731
    assert lrs[0] == pytest.approx(base_lr)
    assert lrs[4] == pytest.approx((base_lr + lr_min) / 2)
    assert lrs[7] == pytest.approx(cosine(7, 8))
    for restart in restarts:
        assert lrs[restart] == pytest.approx(base_lr), restart
        assert lrs[restart - 1] < lrs[restart]
    if T_mul == 2:  # second cycle lasts 16 steps
        assert lrs[16] == pytest.approx((base_lr + lr_min) / 2)
        assert lrs[23] == pytest.approx(cosine(15, 16))
    peaks = [step for step in range(1, 40) if lrs[step] > lrs[step - 1]]
    assert peaks == restarts


def test_sgdr_after_warmup():
    lrs = schedule_lrs(20, scheduler='sgdr', epochs=5, steps_per_epoch=4, T0=1, T_mul=1, warmup_epochs=1,
                       warmup_start_factor=0.1)
    assert lrs[0] == pytest.approx(0.01)
    for restart in (4, 8, 12, 16):
        assert lrs[restart] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.05)


@pytest.mark.parametrize('scheduler, power', [('linear', 1.0), ('polynomial', 2.0), ('polynomial', 0.5)])
def test_linear_and_polynomial_decay(scheduler, power):
    base_lr, lr_min = 0.2, 0.02
    lrs = schedule_lrs(21, base_lr=base_lr, scheduler=scheduler, epochs=5, steps_per_epoch=4, lr_min=lr_min,
                       poly_power=power, warmup_epochs=1, warmup_start_factor=0.0)
    assert lrs[0] == 0.0
    assert lrs[2] == pytest.approx(base_lr / 2)
    for step in (4, 6, 12, 19, 20):
        progress = (step - 4) / 16
        assert lrs[step] == pytest.approx(lr_min + (base_lr - lr_min) * (1 - progress) ** power), step
    assert lrs[20] == pytest.approx(lr_min)


def test_none_scheduler_is_constant_after_warmup():
    lrs = schedule_lrs(12, scheduler='none', epochs=3, steps_per_epoch=4, warmup_epochs=0.5, warmup_start_factor=0.5)
    assert lrs[:2] == pytest.approx([0.05, 0.075]) and lrs[2:] == pytest.approx([0.1] * 10)


def test_lr_min_is_absolute_for_every_param_group():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{'params': [params[0]], 'lr': 0.1}, {'params': [params[1]], 'lr': 0.4}], lr=0.1)
    scheduler = optim.build_scheduler(optimizer, scheduler='cosine', epochs=2, steps_per_epoch=2, lr_min=0.05)
    record_lrs(optimizer, scheduler, 4)
    assert [group['lr'] for group in optimizer.param_groups] == pytest.approx([0.05, 0.05])


@pytest.mark.parametrize('scheduler', ['multistep', 'cosine', 'sgdr'])
def test_scheduler_state_dict_round_trip_resumes_the_same_curve(scheduler):
    schedule = dict(scheduler=scheduler, epochs=6, steps_per_epoch=5, milestones=[2, 4], T0=2, T_mul=2,
                    lr_min=1e-3, warmup_epochs=1)

    def build():
        model = VectorModel([1.0, 2.0, 3.0])
        optimizer = optim.build_optimizer(model, optimizer='sgd', base_lr=0.1)
        return optimizer, optim.build_scheduler(optimizer, **schedule)

    uninterrupted = record_lrs(*build(), 30)
    optimizer, scheduler_ = build()
    first_part = record_lrs(optimizer, scheduler_, 13)
    saved = {'optimizer': optimizer.state_dict(), 'scheduler': scheduler_.state_dict()}
    resumed_optimizer, resumed_scheduler = build()
    resumed_optimizer.load_state_dict(saved['optimizer'])
    resumed_scheduler.load_state_dict(saved['scheduler'])
    assert first_part + record_lrs(resumed_optimizer, resumed_scheduler, 17) == uninterrupted
    assert len(set(uninterrupted)) > 5


# ---------------------------------------------------------------- EMA

def test_ema_matches_closed_form_after_k_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    decay = 0.8
    ema = optim.create_ema(model, decay)
    history_weight = [model[0].weight.detach().clone()]
    history_mean = [model[1].running_mean.clone()]
    for _ in range(4):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
        model(torch.randn(8, 3))  # training mode: BN running statistics move
        ema.update_parameters(model)
        history_weight.append(model[0].weight.detach().clone())
        history_mean.append(model[1].running_mean.clone())
    k = len(history_weight) - 1

    def closed_form(history):
        return decay ** k * history[0] + sum((1 - decay) * decay ** (k - i) * history[i] for i in range(1, k + 1))

    torch.testing.assert_close(ema.module[0].weight.detach(), closed_form(history_weight))
    torch.testing.assert_close(ema.module[1].running_mean, closed_form(history_mean))
    assert not torch.allclose(ema.module[0].weight, model[0].weight)


# ---------------------------------------------------------------- LR range test

def regression_batches(num_batches, seed=0):
    generator = torch.Generator().manual_seed(seed)
    true_weight = torch.tensor([[1.5, -2.0, 0.5, 1.0]])
    batches = []
    for _ in range(num_batches):
        inputs = torch.randn(32, 4, generator=generator)
        batches.append((inputs, inputs @ true_weight.T + 0.01 * torch.randn(32, 1, generator=generator)))
    return batches


def test_lr_range_test_increases_lr_stops_on_divergence_and_restores_state():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # one real step so the optimizer has momentum state to restore
    nn.functional.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 1)).backward()
    optimizer.step()
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    buffer_before = optimizer.state_dict()['state'][0]['momentum_buffer'].clone()
    model.eval()

    lrs_seen = []

    def loss_fn(outputs, targets):
        lrs_seen.append(optimizer.param_groups[0]['lr'])
        return nn.functional.mse_loss(outputs, targets)

    start_lr, end_lr, num_steps = 1e-4, 1e3, 80
    result = optim.lr_range_test(model, optimizer, regression_batches(num_steps), loss_fn, start_lr=start_lr,
                                 end_lr=end_lr, num_steps=num_steps)
    lrs, losses = result['lrs'], result['losses']
    assert lrs == pytest.approx(lrs_seen[:len(lrs)])
    assert lrs == pytest.approx([start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)) for i in range(len(lrs))])
    assert all(a < b for a, b in zip(lrs, lrs[1:]))
    # SGD on this problem diverges beyond lr ~ 1: the test must stop well before end_lr
    assert result['diverged'] and len(lrs) < num_steps and lrs[-1] < 100
    assert losses[-1] > 4.0 * min(losses)
    assert start_lr < result['suggested_lr'] < lrs[losses.index(min(losses))] + 1e-12
    assert 1e-3 < result['suggested_lr'] < 2.0
    # everything restored: weights, momentum buffer, lr, eval mode
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, model_before[key])
    torch.testing.assert_close(optimizer.state_dict()['state'][0]['momentum_buffer'], buffer_before)
    assert optimizer.param_groups[0]['lr'] == 0.1 and not model.training


def test_lr_range_test_runs_with_sam_and_smooths_with_bias_correction():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = optim.build_optimizer(model, optimizer='sgd', momentum=0.0, weight_decay=0.0, use_sam=True)
    raw_losses = []

    def loss_fn(outputs, targets):
        loss = nn.functional.mse_loss(outputs, targets)
        raw_losses.append(loss.item())
        return loss

    result = optim.lr_range_test(model, optimizer, regression_batches(5), loss_fn, start_lr=1e-6, end_lr=1e-5,
                                 num_steps=5, smoothing=0.5)
    first_pass = raw_losses[::2]  # SAM evaluates each batch twice; the loss at w comes first
    assert len(result['lrs']) == 5 and not result['diverged']
    average = 0.0
    for index, loss in enumerate(first_pass):
        average = 0.5 * average + 0.5 * loss
        assert result['losses'][index] == pytest.approx(average / (1 - 0.5 ** (index + 1)))


def test_save_lr_range_test_writes_json_and_png(tmp_path):
    from PIL import Image
    lrs = [1e-5 * 10 ** (i / 10) for i in range(50)]
    losses = [2.0 - 1.5 / (1 + math.exp(-(i - 20) / 3)) + (0.3 * (i - 40) ** 2 if i > 40 else 0) for i in range(50)]
    result = dict(lrs=lrs, losses=losses, suggested_lr=optim._steepest_descent_lr(lrs, losses), diverged=True)
    assert result['suggested_lr'] == pytest.approx(lrs[20])
    optim.save_lr_range_test(result, str(tmp_path))
    with open(tmp_path / 'lr_finder.json') as f:
        saved = json.load(f)
    assert saved['lrs'] == pytest.approx(lrs) and saved['suggested_lr'] == pytest.approx(lrs[20])
    with Image.open(tmp_path / 'lr_finder.png') as image:
        assert image.format == 'PNG'
        colours = {colour for _, colour in image.convert('RGB').getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (0, 0, 0) in colours  # the curve and the axes were drawn

    optim.save_lr_range_test(dict(lrs=[], losses=[], suggested_lr=1e-7), str(tmp_path / 'empty'))
    with Image.open(tmp_path / 'empty' / 'lr_finder.png') as image:
        image.verify()


def test_bn_bias_lr_factor_and_frozen_bn_weights():
    """The fast recipe: BN biases train with lr x factor and wd / factor; BN scales stay fixed."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4, 2))
    optim.freeze_norm_weights(model)
    optimizer = optim.build_optimizer(model, base_lr=0.1, weight_decay=5e-4, bn_bias_lr_factor=64.0)
    groups = {tuple(id(p) for p in g['params']): g for g in optimizer.param_groups}
    bias_group = groups[(id(model[1].bias),)]
    assert bias_group['lr'] == pytest.approx(6.4) and bias_group['weight_decay'] == pytest.approx(5e-4 / 64)
    trained = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert id(model[1].weight) not in trained and model[1].weight.requires_grad is False
    assert {id(model[0].weight), id(model[3].weight), id(model[3].bias)} <= trained
    scheduler = optim.build_scheduler(optimizer, scheduler='linear', epochs=2, steps_per_epoch=2)
    optimizer.step()
    scheduler.step()
    assert bias_group['lr'] == pytest.approx(64 * optimizer.param_groups[0]['lr'])


def ema_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def train_a_little(model):
    """Move the weights at random and the BatchNorm statistics by a forward pass in training mode."""
    with torch.no_grad():
        model[0].weight.add_(torch.randn_like(model[0].weight))
    model(torch.randn(8, 3))


def test_ema_every_k_calls_updates_with_decay_to_the_k():
    model, decay, every = ema_model(), 0.9, 3
    ema = optim.create_ema(model, decay, every=every)
    history = [model[0].weight.detach().clone()]
    for call in range(1, 8):
        train_a_little(model)
        ema.update_parameters(model)
        if call % every == 0:
            history.append(model[0].weight.detach().clone())
    # two updates (calls 3 and 6), each with decay^3: the closed form with decay^K in place of decay
    k, big_decay = len(history) - 1, decay ** every
    expected = big_decay ** k * history[0] + sum((1 - big_decay) * big_decay ** (k - i) * history[i]
                                                 for i in range(1, k + 1))
    assert k == 2 and ema.num_calls == 7
    torch.testing.assert_close(ema.module[0].weight, expected)


def test_ema_copies_integer_buffers_and_is_not_trained():
    model = ema_model()
    ema = optim.create_ema(model, 0.5)
    for _ in range(3):
        train_a_little(model)
        ema.update_parameters(model)
    assert ema.module[1].num_batches_tracked.dtype == torch.long
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 3
    assert not any(param.requires_grad for param in ema.module.parameters())


def test_ema_state_dict_round_trip_resumes_the_same_average():
    model = ema_model()
    ema = optim.create_ema(model, 0.8, every=2)
    for _ in range(3):  # an odd number of calls: the resumed average must know where it is in the cycle
        train_a_little(model)
        ema.update_parameters(model)
    saved = {'module': {k: v.clone() for k, v in ema.state_dict()['module'].items()},
             'num_calls': ema.state_dict()['num_calls']}
    resumed = optim.create_ema(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), 0.8, every=2)
    resumed.load_state_dict(saved)
    for _ in range(3):
        train_a_little(model)
        ema.update_parameters(model)
        resumed.update_parameters(model)
    for (key, value), resumed_value in zip(ema.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(resumed_value, value, rtol=0, atol=0, msg=key)


def test_ema_loads_the_averaged_weights_of_an_averaged_model_checkpoint():
    """Checkpoints written when create_ema returned torch's AveragedModel still resume their average."""
    model = ema_model()
    averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    train_a_little(averaged.module)
    ema = optim.create_ema(model, 0.9)
    ema.load_state_dict(averaged.state_dict())
    for key, value in averaged.module.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[key], value, rtol=0, atol=0)
    assert ema.num_calls == 0


# ---------------------------------------------------------------- Muon

needs_muon = pytest.mark.skipif(not hasattr(torch.optim, 'Muon'), reason='torch.optim.Muon needs torch 2.9 or later')


def filter_bank_optimizer(weight, **muon_options):
    """Muon on one (out, in, kh, kw) filter bank beside SGD on a bias (lr 1, momentum 0 unless told)."""
    options = {'lr': 1.0, 'momentum': 0.0, 'normalize_weights': False, **muon_options}
    return optim.Muon([weight], torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), **options)


@needs_muon
@pytest.mark.parametrize('ns_steps', [3, 5])
def test_muon_update_of_a_filter_bank_is_orthogonalized(ns_steps):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(16, 8, 3, 3))  # out <= in*kh*kw: torch's lr adjustment is 1
    before = weight.detach().clone()
    weight.grad = torch.randn(16, 8, 3, 3)
    filter_bank_optimizer(weight, ns_steps=ns_steps).step()
    singular_values = torch.linalg.svdvals((before - weight.detach()).reshape(16, -1))
    grad_singular_values = torch.linalg.svdvals(weight.grad.reshape(16, -1))
    # quintic Newton-Schulz in bfloat16 maps the singular values (here spread over 2x) to about
    # 0.7-1.15 (torch 2.14), not exactly 1: its coefficients trade convergence for speed
    assert grad_singular_values.max() > 2 * grad_singular_values.min()
    assert singular_values.min() >= 0.5 and singular_values.max() <= 1.6, singular_values


@needs_muon
def test_muon_channels_last_bank_gets_the_same_update():
    torch.manual_seed(0)
    start, grad = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    updated = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        weight = nn.Parameter(start.clone().to(memory_format=memory_format))
        weight.grad = grad.clone().to(memory_format=memory_format)
        optimizer = filter_bank_optimizer(weight, momentum=0.5)
        optimizer.step()
        weight.grad = grad.flip(0).to(memory_format=memory_format)  # a second step through the momentum
        optimizer.step()
        assert weight.is_contiguous(memory_format=memory_format)
        assert optimizer.channels_last == [memory_format is torch.channels_last]
        updated.append(weight.detach())
    # the (out, kh*kw*in) matrix is a column permutation of the (out, in*kh*kw) one, and Newton-Schulz
    # commutes with it; bfloat16 rounding of a reordered sum may differ in the last bit
    torch.testing.assert_close(updated[1], updated[0], rtol=0, atol=1e-2)
    assert not torch.equal(updated[0], start)


@needs_muon
def test_muon_normalize_weights_rescales_each_bank_before_the_update():
    torch.manual_seed(0)
    banks = [torch.randn(8, 4, 3, 3) * 3, torch.randn(6, 8, 1, 1) * 0.1]
    grads = [torch.randn_like(bank) for bank in banks]
    # lr 0: only the rescaling acts, to norm sqrt(out) along the same direction, with or without a gradient
    weights = [nn.Parameter(bank.clone()) for bank in banks]
    weights[0].grad = grads[0].clone()
    optim.Muon(weights, torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), lr=0.0).step()
    for weight, bank in zip(weights, banks):
        torch.testing.assert_close(weight.detach(), bank * math.sqrt(bank.shape[0]) / bank.norm())
    # lr > 0: the same as stepping from banks rescaled by hand, without normalize_weights
    results = []
    for normalize in (True, False):
        weights = [nn.Parameter(bank.clone() if normalize else bank * math.sqrt(bank.shape[0]) / bank.norm())
                   for bank in banks]
        for weight, grad in zip(weights, grads):
            weight.grad = grad.clone()
        optim.Muon(weights, torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), lr=0.1,
                   normalize_weights=normalize).step()
        results.append([weight.detach() for weight in weights])
    for normalized, by_hand in zip(*results):
        torch.testing.assert_close(normalized, by_hand)


def airbench_zeropower(matrix, steps):
    """airbench94_muon.py's zeropower_via_newtonschulz5 (KellerJordan/cifar10-airbench)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = matrix.bfloat16()
    x /= (x.norm() + 1e-7)
    if matrix.size(0) > matrix.size(1):
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if matrix.size(0) > matrix.size(1):
        x = x.T
    return x


def airbench_muon_steps(start, grads, lr, momentum, ns_steps):
    """The weights after airbench94_muon.py's Muon steps (Nesterov, weights normalized) with ``grads``."""
    weight, buffer = start.clone(), torch.zeros_like(start)
    for grad in grads:
        buffer.mul_(momentum).add_(grad)
        update = grad.add(buffer, alpha=momentum)
        weight.mul_(len(weight) ** 0.5 / weight.norm())
        weight.add_(airbench_zeropower(update.reshape(len(update), -1), ns_steps).view(update.shape), alpha=-lr)
    return weight


# a projection shortcut (out > in*kh*kw, torch's factor sqrt(4) = 2) and a 3x3 bank (factor 1)
TALL_AND_WIDE_BANKS = [(32, 8, 1, 1), (16, 8, 3, 3)]


def muon_steps(starts, grads, **options):
    weights = [nn.Parameter(start.clone()) for start in starts]
    optimizer = optim.Muon(weights, torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), **options)
    for step_grads in grads:
        for weight, grad in zip(weights, step_grads):
            weight.grad = grad.clone()
        optimizer.step()
    return [weight.detach() for weight in weights], optimizer


@needs_muon
def test_muon_steps_every_bank_as_airbench94_muon_by_default():
    torch.manual_seed(0)
    starts = [torch.randn(shape) for shape in TALL_AND_WIDE_BANKS]
    grads = [[torch.randn(shape) for shape in TALL_AND_WIDE_BANKS] for _ in range(3)]
    weights, optimizer = muon_steps(starts, grads, lr=0.24, momentum=0.6, ns_steps=3)
    assert optimizer.lr_adjust == 'none'
    for index, (start, weight) in enumerate(zip(starts, weights)):
        expected = airbench_muon_steps(start, [step_grads[index] for step_grads in grads], 0.24, 0.6, 3)
        # torch's momentum is airbench's times (1 - momentum), which Newton-Schulz normalizes away
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-2)


@needs_muon
def test_muon_lr_adjust_torch_scales_a_tall_bank_by_sqrt_out_over_in():
    torch.manual_seed(1)
    starts = [torch.randn(shape) for shape in TALL_AND_WIDE_BANKS]
    grads = [[torch.randn(shape) for shape in TALL_AND_WIDE_BANKS]]
    updates = {}
    for adjust in optim.MUON_LR_ADJUSTMENTS:
        weights, _ = muon_steps(starts, grads, lr=0.1, momentum=0.0, normalize_weights=False, lr_adjust=adjust)
        updates[adjust] = [weight - start for weight, start in zip(weights, starts)]
    (tall_torch, wide_torch), (tall_none, wide_none) = updates['torch'], updates['none']
    torch.testing.assert_close(tall_torch, 2 * tall_none, rtol=0, atol=1e-6)  # sqrt(32 / (8*1*1)) = 2
    torch.testing.assert_close(wide_torch, wide_none, rtol=0, atol=0)
    with pytest.raises(ValueError, match='--muon_lr_adjust'):
        muon_steps(starts, grads, lr_adjust='original')


@needs_muon
def test_muon_state_of_the_other_lr_adjust_loads_with_its_buffers_turned():
    """A checkpoint of torch's factor (every run before --muon_lr_adjust) resumes under either setting."""
    torch.manual_seed(2)
    starts = [torch.randn(shape) for shape in TALL_AND_WIDE_BANKS]
    grads = [[torch.randn(shape) for shape in TALL_AND_WIDE_BANKS] for _ in range(2)]
    _, saved = muon_steps(starts, grads, momentum=0.6, lr_adjust='torch')
    _, resumed = muon_steps(starts, [], momentum=0.6, lr_adjust='none')
    resumed.load_state_dict(copy.deepcopy(saved.state_dict()))
    tall, wide = zip(saved.matrices, resumed.matrices)
    for saved_matrix, matrix in (tall, wide):
        assert resumed.muon.state[matrix]['momentum_buffer'].shape == matrix.shape
    saved_buffer = saved.muon.state[tall[0]]['momentum_buffer']
    torch.testing.assert_close(resumed.muon.state[tall[1]]['momentum_buffer'], saved_buffer.T, rtol=0, atol=0)
    for weight, grad in zip(resumed.filters, grads[0]):
        weight.grad = grad.clone()
    resumed.step()  # the turned buffer meets the gradient's matrix


@needs_muon
def test_build_optimizer_passes_muon_lr_adjust():
    assert optim.build_optimizer(muon_model(), optimizer='muon').lr_adjust == 'none'
    assert optim.build_optimizer(muon_model(), optimizer='muon', muon_lr_adjust='torch').lr_adjust == 'torch'


def muon_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def muon_train_step(model, optimizer, step):
    generator = torch.Generator().manual_seed(step)
    images, labels = torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 4, (4,), generator=generator)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


@needs_muon
def test_muon_state_dict_round_trip_then_identical_steps():
    model = muon_model()
    optimizer = optim.build_optimizer(model, optimizer='muon', base_lr=0.05, momentum=0.9, muon_lr=0.1)
    for step in range(2):
        muon_train_step(model, optimizer, step)
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved.keys() == {'auxiliary', 'muon'} and saved['muon']['state'] and saved['auxiliary']['state']
    resumed_model = copy.deepcopy(model)
    resumed = optim.build_optimizer(resumed_model, optimizer='muon', base_lr=0.05, momentum=0.9, muon_lr=0.1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[-1] is resumed.muon.param_groups[0]
    for step in range(2, 4):
        muon_train_step(model, optimizer, step)
        muon_train_step(resumed_model, resumed, step)
    for (name, param), resumed_param in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(resumed_param, param), name


@needs_muon
def test_muon_param_groups_are_auxiliary_then_muon_and_one_scheduler_drives_both():
    model = muon_model()
    optimizer = optim.build_optimizer(model, optimizer='muon', base_lr=0.05, muon_lr=0.2, weight_decay=5e-4,
                                      no_weight_decay_on_bn=True)
    filters = {id(model[0].weight), id(model[3].weight)}
    *auxiliary, muon_group = optimizer.param_groups
    assert auxiliary == optimizer.auxiliary.param_groups and muon_group is optimizer.muon.param_groups[0]
    assert not any(id(param) in filters for group in auxiliary for param in group['params'])
    assert [param.data_ptr() for param in muon_group['params']] == [model[0].weight.data_ptr(),
                                                                     model[3].weight.data_ptr()]
    scheduler = optim.build_scheduler(optimizer, scheduler='linear', epochs=4, steps_per_epoch=1)
    for step in range(2):
        muon_train_step(model, optimizer, step)
        scheduler.step()
    assert optimizer.muon.param_groups[0]['lr'] == pytest.approx(0.2 * 0.5)
    assert all(group['lr'] == pytest.approx(0.05 * 0.5) for group in optimizer.auxiliary.param_groups)


# ---------------------------------------------------------------- head lr factor, per-group schedule length

def test_head_lr_factor_and_schedule_epochs_groups():
    model = norm_model()
    head, whitening_bias = model[6], model[0].bias
    optimizer = optim.build_optimizer(model, base_lr=0.1, weight_decay=5e-4, head_lr_factor=4.0,
                                      schedule_epochs={whitening_bias: 3})
    groups = {tuple(id(p) for p in group['params']): group for group in optimizer.param_groups}
    head_group = groups[(id(head.weight), id(head.bias))]
    assert head_group['lr'] == pytest.approx(0.4) and head_group['weight_decay'] == pytest.approx(5e-4 / 4)
    limited = groups[(id(whitening_bias),)]
    assert limited['schedule_epochs'] == 3 and limited['weight_decay'] == 5e-4 and limited['lr'] == 0.1
    main_group = optimizer.param_groups[0]
    assert id(whitening_bias) not in {id(p) for p in main_group['params']} and 'schedule_epochs' not in main_group
    assert sum(len(group['params']) for group in optimizer.param_groups) == len(list(model.parameters()))

    scheduler = optim.build_scheduler(optimizer, scheduler='linear', epochs=10, steps_per_epoch=2)
    lrs = {name: [] for name in ('main', 'head', 'limited')}
    for _ in range(12):
        for name, group in (('main', main_group), ('head', head_group), ('limited', limited)):
            lrs[name].append(group['lr'])
        optimizer.step()
        scheduler.step()
    # the limited group's linear decay reaches 0 at epoch 3 (step 6) and stays there; the others run 10
    assert lrs['limited'] == pytest.approx([0.1 * max(0.0, 1 - step / 6) for step in range(12)])
    assert lrs['main'] == pytest.approx([0.1 * (1 - step / 20) for step in range(12)])
    assert lrs['head'] == pytest.approx([0.4 * (1 - step / 20) for step in range(12)])


def test_lookahead_matches_airbench_rule_by_hand():
    """slow <- lerp(slow, w, 1 - d_t) and w <- slow every K steps, d_t = decay^K (t/T)^3; w <- slow at T."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    total, every, decay = 7, 2, 0.9
    lookahead = optim.Lookahead(model, total_steps=total, every=every, decay=decay)
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    slow = [t.detach().clone() for t in tensors]
    for step in range(1, total + 1):
        with torch.no_grad():
            for t in tensors:
                t.add_(torch.randn_like(t))
        expected = [t.detach().clone() for t in tensors]
        if step % every == 0:
            d = decay ** every * (step / total) ** 3
            slow = [s + (1 - d) * (w - s) for s, w in zip(slow, expected)]
            expected = [s.clone() for s in slow]
        if step == total:
            expected = [s.clone() for s in slow]
        lookahead.step(step)
        for t, e in zip(tensors, expected):
            assert torch.allclose(t, e, atol=1e-6), step
    assert model[1].num_batches_tracked.dtype == torch.long  # integer buffers are left alone


def test_lookahead_state_round_trip():
    model = nn.Linear(3, 2)
    lookahead = optim.Lookahead(model, total_steps=10, every=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.step(5)
    restored = optim.Lookahead(nn.Linear(3, 2), total_steps=10, every=1)
    restored.load_state_dict(lookahead.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.slow, lookahead.slow))


def test_lr_end_factor_is_relative_for_every_group():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{'params': [params[0]], 'lr': 1.0}, {'params': [params[1]], 'lr': 64.0}], lr=1.0)
    scheduler = optim.build_scheduler(optimizer, scheduler='linear', epochs=2, steps_per_epoch=5,
                                      warmup_epochs=1, warmup_start_factor=0.2, lr_end_factor=0.07)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.2, 64 * 0.2])
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.07, 64 * 0.07])
    with pytest.raises(ValueError, match='--lr_end_factor'):
        optim.build_scheduler(optimizer, scheduler='linear', epochs=2, steps_per_epoch=5, lr_min=0.1,
                              lr_end_factor=0.5)


def test_fractional_epochs_scale_the_schedule():
    """9.9 epochs of 48 steps is 475.2: the schedule reaches its end factor at that fractional step."""
    assert optim.lr_factor(475, scheduler='linear', epochs=9.9, steps_per_epoch=48) == pytest.approx(
        1 - 475 / 475.2)


@pytest.mark.parametrize('argv, named', [
    (['--bn_bias_lr_factor', '0'], '--bn_bias_lr_factor 0.0: expected a number > 0'),
    (['--head_lr_factor', '-1'], '--head_lr_factor -1.0: expected a number > 0'),
    (['--ema_every', '0'], '--ema_every 0: expected an integer >= 1'),
    (['--ema_decay', '1'], r'--ema_decay 1.0: expected a number in [0, 1)'),
    (['--sam_rho', '0'], '--sam_rho 0.0: expected a number > 0'),
    (['--warmup_start_factor', '2'], '--warmup_start_factor 2.0: expected a number in [0, 1]'),
    (['--T0', '0'], '--T0 0: expected an integer >= 1'),
    (['--lr_min', '-0.1'], '--lr_min -0.1: expected a number >= 0'),
    (['--milestones', '[120,80]'], '--milestones [120, 80]: expected a JSON list of numbers > 0'),
])
def test_optimizer_and_schedule_settings_outside_their_domains_are_refused(argv, named):
    """A setting's range is its flag's domain, checked where the value enters (main.py's parser);
    build_optimizer, build_scheduler and create_ema check only the relations between settings."""
    import main
    from flags import UsageError
    with pytest.raises(UsageError) as error:
        main.parse_args(['--outdir', 'unused', *argv])
    assert str(error.value).startswith(named)
