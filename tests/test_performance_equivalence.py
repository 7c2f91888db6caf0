"""The performance work changes no result (issue 5), and the benchmark measures the driver's
own step (issue 11).

(a) the driver's training step (pix2pixCC_Train.train_step with make_optimizer: fused Adam,
    D frozen during the generator's pass, gradients released after the step) on networks
    placed by prepare_network (the GEMM path for the widest CPU convolutions) matches a plain
    hand-written step (for-loop Adam, zero_grad before each backward, PyTorch's default
    convolutions) from the same seed and data; the GEMM path gives oneDNN's outputs and
    gradients, keeps the state_dict and runs a user's hooks;
(b) data preparation: the loader's output equals a straightforward float64 reference of the
    SPEC scaling to float32 rounding, and is bit for bit the plain first version of
    Scaling.forward, astropy's data cast to float32, and the un-augmented sample when an
    augmentation of angle 0 / offset 0 is drawn;
(c) a bfloat16-autocast step runs on the CPU and keeps float32 master weights;
(d) --compile (torch.compile through prepare_network) of a tiny generator gives the eager
    output and gradients.

No timings are asserted here: benchmarks/benchmark.py measures them.
"""
import copy
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, assert_same_weights, biases_before_norm, train_opt

from pix2pixCC_Networks import Discriminator, Generator, Loss, weights_init
from pix2pixCC_Train import make_optimizer, train_step
from pix2pixCC_Utils import Precision, prepare_network

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

CPU = torch.device('cpu')
# 512-channel residual convolutions on 8x8 feature maps (128x128 data): wide enough for the
# GEMM path, small enough for a test. (At 4x4, PyTorch itself already picks im2col + GEMM.)
WIDE = dict(n_gf=32, n_downsample=4, n_residual=1)
GEMM_KERNEL = 'aten::_slow_conv2d_forward'  # im2col + matrix product


# ----------------------------------------------------------------------------------------
# (a) training step
# ----------------------------------------------------------------------------------------


def plain_adam(module, opt):
    return torch.optim.Adam(module.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                            foreach=False)


def plain_step(G, D, G_optim, D_optim, opt, input, target):
    """The step written out plainly: zero_grad before each backward, G step then D step."""
    loss_D, loss_G, _, _ = Loss(opt)(D, G, input, target)
    G_optim.zero_grad()
    loss_G.backward()
    G_optim.step()
    D_optim.zero_grad()
    loss_D.backward()
    D_optim.step()
    return loss_D.item(), loss_G.item()


def models_and_data(opt, size=32, seed=0):
    torch.manual_seed(seed)
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    input = torch.rand(opt.batch_size, opt.input_ch, size, size) * 2 - 1
    target = torch.rand(opt.batch_size, opt.target_ch, size, size) * 2 - 1
    return G, D, input, target


def drifting(module):
    """Keys that may drift apart: the noise-gradient biases (see conftest.biases_before_norm)
    and, with them, BatchNorm's running means."""
    return biases_before_norm(module) | {key for key in module.state_dict()
                                         if key.endswith('running_mean')}


def assert_driver_step_equals_plain_step(opt, G, D, input, target, steps=3, tolerance=1e-6):
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    G, D = prepare_network(G, opt, CPU), prepare_network(D, opt, CPU)
    G_optim, D_optim = make_optimizer(G.parameters(), opt), make_optimizer(D.parameters(), opt)
    ref_optims = plain_adam(G_ref, opt), plain_adam(D_ref, opt)
    precision = Precision(opt, CPU)
    for step in range(steps):
        losses_ref = plain_step(G_ref, D_ref, *ref_optims, opt, input, target)
        loss_D, loss_G, _, _ = train_step(Loss(opt), G, D, G_optim, D_optim, precision, input,
                                          target)
        np.testing.assert_allclose([loss_D.item(), loss_G.item()], losses_ref, rtol=1e-5)
        # Adam moves every weight by ~lr (2e-4) per step: the tolerance is far below one step.
        # The noise-gradient biases may move either way from the first step on.
        for module, ref in ((G, G_ref), (D, D_ref)):
            assert_same_weights(module, ref, tolerance, skip=drifting(module))
        # The driver releases the gradients after the step (lower peak memory) ...
        assert all(p.grad is None for p in list(G.parameters()) + list(D.parameters()))
    assert all(p.requires_grad for p in D.parameters())  # ... and D is unfrozen after it
    return G_optim, D_optim


@pytest.mark.parametrize('norm_type', ['InstanceNorm2d', 'BatchNorm2d'])
def test_driver_step_equals_a_plain_step(norm_type):
    opt = train_opt(norm_type=norm_type, n_D=2, batch_size=2)
    G, D, input, target = models_and_data(opt, size=64)
    G_optim, D_optim = assert_driver_step_equals_plain_step(opt, G, D, input, target)
    assert G_optim.defaults['fused'] and D_optim.defaults['fused']  # torch >= 2.4 on the CPU


def test_make_optimizer_falls_back_to_plain_adam_where_fused_is_refused(monkeypatch):
    """A torch without fused Adam for the device raises RuntimeError for fused=True: the
    driver then trains with the default implementation, with the options' lr and betas."""
    real_adam = torch.optim.Adam
    refused = []

    def adam(parameters, **kwargs):
        if kwargs.get('fused'):
            refused.append(kwargs)
            raise RuntimeError('`fused=True` requires all the params to be floating point '
                               'Tensors of supported devices')
        return real_adam(parameters, **kwargs)

    monkeypatch.setattr(torch.optim, 'Adam', adam)
    opt = train_opt(lr=1e-3, beta1=0.3, beta2=0.9)
    G, D, input, target = models_and_data(opt)
    G_optim, D_optim = assert_driver_step_equals_plain_step(opt, G, D, input, target, steps=2)
    assert len(refused) == 2
    for optimizer in (G_optim, D_optim):
        assert not optimizer.defaults['fused']
        assert optimizer.defaults['lr'] == 1e-3 and optimizer.defaults['betas'] == (0.3, 0.9)


def test_a_failing_check_stops_the_step_before_any_weight_changes():
    opt = train_opt()
    G, D, input, target = models_and_data(opt)
    before = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    G_optim, D_optim = make_optimizer(G.parameters(), opt), make_optimizer(D.parameters(), opt)
    seen = []

    def check(loss_D, loss_G):
        seen.append((loss_D.item(), loss_G.item()))
        raise ValueError('stop')

    with pytest.raises(ValueError):
        train_step(Loss(opt), G, D, G_optim, D_optim, Precision(opt, CPU), input, target, check)
    assert len(seen) == 1 and all(np.isfinite(seen[0]))
    assert_same_weights(G, before[0], 0)
    assert_same_weights(D, before[1], 0)
    assert not G_optim.state and not D_optim.state


def test_fused_and_plain_adam_states_interchange():
    """A training state saved with one Adam implementation resumes with the other."""
    opt = train_opt()
    G, D, input, target = models_and_data(opt)
    precision = Precision(opt, CPU)

    def adams(G, D, kind):
        fused = {'fused': True} if kind == 'fused' else {'foreach': False}
        return [torch.optim.Adam(m.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                 **fused) for m in (G, D)]

    for saved_with, loaded_with in (('plain', 'fused'), ('fused', 'plain')):
        optims = adams(G, D, saved_with)
        train_step(Loss(opt), G, D, *optims, precision, input, target)
        state = copy.deepcopy([o.state_dict() for o in optims])  # state_dict() shares tensors
        G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
        resumed = adams(G2, D2, loaded_with)
        for o, s in zip(resumed, copy.deepcopy(state)):
            o.load_state_dict(s)
        G3, D3 = copy.deepcopy(G), copy.deepcopy(D)
        same = adams(G3, D3, saved_with)
        for o, s in zip(same, copy.deepcopy(state)):
            o.load_state_dict(s)
        train_step(Loss(opt), G2, D2, *resumed, precision, input, target)
        train_step(Loss(opt), G3, D3, *same, precision, input, target)
        assert_same_weights(G2, G3, 1e-6)
        assert_same_weights(D2, D3, 1e-6)
