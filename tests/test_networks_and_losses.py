"""The networks and the objective, as README's introduction and "Differences from the
reference code" describe them: the Generator's and the Discriminator's layout (state_dict
keys and shapes, module order, padding, normalisation, channel balance), their
initialisation and outputs, the Loss terms and the Inspector's correlation coefficient, and
checkpoints that interchange with the published pix2pixCC in the shape README "Repository
layout" keeps. The CC under mixed precision is in test_devices_and_precision.py.
"""
import gc
import os
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from astropy.io import fits
from scipy.stats import pearsonr

import pix2pixCC_Networks
import pix2pixCC_Test
from conftest import (TINY, assert_ok, copy_sample, lin_ccc, make_pairs, models_and_data,
                      run_test, train_opt)
from machinery.evaluation import image_metrics
from pix2pixCC_Networks import (Discriminator, Generator, Loss, PatchDiscriminator,
                                channel_repeats, correlation, count_parameters, downsample,
                                make_pair, weights_init)
from pix2pixCC_Options import TrainOption

# ----------------------------------------------------------------------------------------
# 1. The Generator and the Discriminator: layout, initialisation, outputs
# ----------------------------------------------------------------------------------------

def shapes(module):
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_default_parameter_counts():
    opt = TrainOption().parse([])
    G = Generator(opt)
    n_G = count_parameters(G)
    del G
    gc.collect()
    D = Discriminator(opt)
    assert n_G == 193_571_841
    assert count_parameters(D) == 2_763_713


def test_count_parameters_counts_trainable_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2 + 2
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 4 + 4 * 2 + 2


# Tiny config: n_gf 8, n_downsample 2, n_residual 1 (see conftest.TINY).
G_KEYS_TRANS_CONV = {
    'model.1.weight': (8, 3, 7, 7), 'model.1.bias': (8,),
    'model.4.weight': (16, 8, 5, 5), 'model.4.bias': (16,),
    'model.7.weight': (32, 16, 5, 5), 'model.7.bias': (32,),
    'model.10.block.1.weight': (32, 32, 3, 3), 'model.10.block.1.bias': (32,),
    'model.10.block.5.weight': (32, 32, 3, 3), 'model.10.block.5.bias': (32,),
    'model.11.weight': (32, 16, 3, 3), 'model.11.bias': (16,),   # ConvTranspose2d: (in, out)
    'model.14.weight': (16, 8, 3, 3), 'model.14.bias': (8,),
    'model.18.weight': (2, 8, 7, 7), 'model.18.bias': (2,),
}
G_KEYS_BILINEAR = {
    **{k: v for k, v in G_KEYS_TRANS_CONV.items() if not k.startswith(('model.11', 'model.14',
                                                                       'model.18'))},
    'model.13.weight': (16, 32, 3, 3), 'model.13.bias': (16,),   # 11 upsample, 12 pad
    'model.18.weight': (8, 16, 3, 3), 'model.18.bias': (8,),     # 16 upsample, 17 pad
    'model.22.weight': (2, 8, 7, 7), 'model.22.bias': (2,),      # 21 pad
}


@pytest.mark.parametrize('trans_conv, expected', [('True', G_KEYS_TRANS_CONV),
                                                  ('False', G_KEYS_BILINEAR)])
def test_generator_state_dict_keys_and_shapes(trans_conv, expected):
    G = Generator(train_opt('--input_ch', '3', '--target_ch', '2', '--trans_conv', trans_conv))
    assert shapes(G) == expected


def test_generator_module_order():
    G = Generator(train_opt('--padding_type', 'reflection'))
    m = G.model
    assert isinstance(m[0], nn.ReflectionPad2d) and m[0].padding == (3, 3, 3, 3)
    assert isinstance(m[1], nn.Conv2d) and m[1].kernel_size == (7, 7) and m[1].padding == (0, 0)
    assert isinstance(m[2], nn.InstanceNorm2d) and not m[2].affine
    assert type(m[3]).__name__ == 'Mish'
    for i in (4, 7):
        assert m[i].kernel_size == (5, 5) and m[i].stride == (2, 2) and m[i].padding == (2, 2)
    block = m[10].block
    assert [type(layer).__name__ for layer in block] == [
        'ReflectionPad2d', 'Conv2d', 'InstanceNorm2d', 'Mish', 'ReflectionPad2d', 'Conv2d',
        'InstanceNorm2d']
    for i in (11, 14):
        layer = m[i]
        assert isinstance(layer, nn.ConvTranspose2d)
        assert (layer.kernel_size, layer.stride, layer.padding, layer.output_padding) == \
            ((3, 3), (2, 2), (1, 1), (1, 1))
    assert isinstance(m[17], nn.ReflectionPad2d) and m[17].padding == (3, 3, 3, 3)
    assert isinstance(m[18], nn.Conv2d) and len(m) == 19  # no output activation


@pytest.mark.parametrize('padding_type, layer', [('reflection', nn.ReflectionPad2d),
                                                 ('replication', nn.ReplicationPad2d),
                                                 ('zero', nn.ZeroPad2d)])
def test_padding_type(padding_type, layer):
    G = Generator(train_opt('--padding_type', padding_type))
    pads = [m for m in G.modules() if isinstance(m, (nn.ReflectionPad2d, nn.ReplicationPad2d,
                                                     nn.ZeroPad2d))]
    assert len(pads) == 4 and all(type(p) is layer for p in pads)


def test_mish_activation():
    G = Generator(train_opt())
    act = G.model[3]
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(act(x), x * torch.tanh(F.softplus(x)))


def test_generator_residual_block_adds_its_input():
    G = Generator(train_opt())
    residual = G.model[10]
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(residual(x), x + residual.block(x))


def test_batchnorm_generator_has_affine_weights_and_running_stats():
    G = Generator(train_opt('--norm_type', 'BatchNorm2d'))
    s = shapes(G)
    for prefix, width in (('model.2', 8), ('model.5', 16), ('model.8', 32),
                          ('model.10.block.2', 32), ('model.10.block.6', 32), ('model.12', 16),
                          ('model.15', 8)):
        for suffix in ('weight', 'bias', 'running_mean', 'running_var'):
            assert s[f'{prefix}.{suffix}'] == (width,), prefix
        assert s[f'{prefix}.num_batches_tracked'] == ()
    # Same conv keys as the InstanceNorm variant (which has no norm keys at all).
    instance = shapes(Generator(train_opt()))
    assert {k: v for k, v in s.items() if k in instance} == instance
    assert len(s) == len(instance) + 7 * 5


@pytest.mark.parametrize('trans_conv', ['True', 'False'])
@pytest.mark.parametrize('size', [(32, 32), (64, 32), (16, 48)])
def test_generator_output_shape_and_unbounded_range(trans_conv, size):
    torch.manual_seed(0)
    G = Generator(train_opt('--input_ch', '3', '--target_ch', '2', '--trans_conv', trans_conv))
    with torch.no_grad():
        y = G(5 * torch.randn(2, 3, *size))
    assert y.shape == (2, 2, *size)
    assert torch.isfinite(y).all()
    with torch.no_grad():  # no tanh: a scaled last layer gives values beyond [-1, 1]
        G.model[-1].weight.mul_(100)
        assert G(torch.randn(1, 3, *size)).abs().max() > 1


def test_discriminator_state_dict_keys_and_shapes():
    D = Discriminator(train_opt('--n_D', '2', '--input_ch', '1', '--target_ch', '1'))
    expected = {}
    for scale in range(2):
        for block, (c_in, c_out) in enumerate([(2, 8), (8, 16), (16, 32), (32, 64), (64, 1)]):
            expected[f'Scale_{scale}.block_{block}.0.weight'] = (c_out, c_in, 4, 4)
            expected[f'Scale_{scale}.block_{block}.0.bias'] = (c_out,)
    assert shapes(D) == expected


def test_patch_discriminator_layers():
    D = PatchDiscriminator(train_opt('--norm_type', 'BatchNorm2d'))
    strides = [getattr(D, f'block_{i}')[0].stride for i in range(5)]
    assert strides == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    for i in range(5):
        conv = getattr(D, f'block_{i}')[0]
        assert conv.kernel_size == (4, 4) and conv.padding == (1, 1)
    # InstanceNorm without affine whatever --norm_type says; LeakyReLU(0.2).
    norms = [m for m in D.modules() if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d))]
    assert len(norms) == 3 and all(type(m) is nn.InstanceNorm2d and not m.affine for m in norms)
    acts = [m for i in range(5) for m in getattr(D, f'block_{i}')
            if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    assert len(D.block_0) == 2 and len(D.block_4) == 1


def test_discriminator_outputs_and_scales():
    torch.manual_seed(0)
    opt = train_opt('--n_D', '2')
    D = Discriminator(opt)
    x = torch.randn(2, 2, 64, 64)
    out = D(x)
    assert len(out) == 2 and all(len(scale) == 5 for scale in out)
    assert [tuple(f.shape) for f in out[0]] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8),
                                                (2, 64, 7, 7), (2, 1, 6, 6)]
    assert out[1][-1].shape == (2, 1, 2, 2)
    # Scale 0 sees the pair, scale 1 the pair pooled once (avg 3x3, stride 2, no pad count).
    torch.testing.assert_close(out[0][-1], D.Scale_0(x)[-1])
    pooled = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    torch.testing.assert_close(out[1][-1], D.Scale_1(pooled)[-1])
    torch.testing.assert_close(downsample(x), pooled)
    # Edges: count_include_pad=False means a constant image stays constant.
    torch.testing.assert_close(downsample(torch.full((1, 1, 8, 8), 3.0)),
                               torch.full((1, 1, 4, 4), 3.0))


@pytest.mark.parametrize('input_ch, target_ch, ch_balance, repeats, d_in', [
    (3, 1, 1, (1, 3), 6),
    (3, 1, 0, (1, 1), 4),
    (3, 1, -1, (1, 1), 4),
    (1, 3, 1, (3, 1), 6),
    (1, 1, 1, (1, 1), 2),
    (2, 2, 1, (1, 1), 4),
    (4, 1, 0.5, (1, 2), 6),
    (1, 2, 1, (2, 1), 4),
    (3, 2, 1, (1, 1), 5),  # r = 1.5 -> int(r) = 1
])
def test_channel_balance(input_ch, target_ch, ch_balance, repeats, d_in):
    opt = train_opt('--input_ch', str(input_ch), '--target_ch', str(target_ch),
                    '--ch_balance', str(ch_balance))
    assert channel_repeats(opt) == repeats
    D = Discriminator(opt)
    assert D.Scale_0.block_0[0].in_channels == d_in
    x = torch.randn(1, input_ch, 32, 32)
    y = torch.randn(1, target_ch, 32, 32)
    pair = make_pair(opt, x, y)
    assert pair.shape[1] == d_in
    torch.testing.assert_close(pair, torch.cat([x] * repeats[0] + [y] * repeats[1], dim=1))
    assert len(D(pair)) == 1


def test_weights_init():
    torch.manual_seed(0)
    opt = train_opt('--n_gf', '32', '--norm_type', 'BatchNorm2d')
    G = Generator(opt).apply(weights_init)
    convs = [m for m in G.modules() if type(m) is nn.Conv2d]
    transposed = [m for m in G.modules() if type(m) is nn.ConvTranspose2d]
    assert len(transposed) == 2
    for group in (convs, transposed):  # ConvTranspose2d too (unlike the reference)
        weights = torch.cat([m.weight.detach().flatten() for m in group])
        assert abs(float(weights.std()) - 0.02) < 0.001, float(weights.std())
        assert abs(float(weights.mean())) < 0.001
    for m in transposed:  # each layer, not just the pooled statistic
        assert abs(float(m.weight.detach().std()) - 0.02) < 0.002
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    gammas = torch.cat([m.weight.detach() for m in norms])
    assert abs(float(gammas.mean()) - 1) < 0.01 and 0.01 < float(gammas.std()) < 0.03
    assert all(float(m.bias.detach().abs().max()) == 0 for m in norms)
    D = Discriminator(train_opt('--n_df', '32')).apply(weights_init)
    weights = torch.cat([m.weight.detach().flatten() for m in D.modules()
                         if isinstance(m, nn.Conv2d)])
    assert abs(float(weights.std()) - 0.02) < 0.001


def test_trans_conv_false_builds_bilinear_upsampling():
    G = Generator(train_opt('--trans_conv', 'False'))
    kinds = [type(m) for m in G.modules()]
    assert nn.UpsamplingBilinear2d in kinds
    assert nn.ConvTranspose2d not in kinds
    assert kinds.count(nn.UpsamplingBilinear2d) == 2  # n_downsample 2
    G = Generator(train_opt('--trans_conv', 'True'))
    kinds = [type(m) for m in G.modules()]
    assert nn.ConvTranspose2d in kinds and nn.UpsamplingBilinear2d not in kinds


def test_mish_computes_the_same_with_and_without_autograd():
    """README "Differences from the reference code": no layer computes something else
    depending on whether autograd is on. Mish leaves its input as it was in inference too, so
    a block that reads its input again after an activation (a pre-activation block,
    `x + block(mish(x))`) gives the same output in training and in inference; the
    generator's output is bit for bit that of the autograd forward."""
    x = torch.randn(2, 4, 8, 8)
    kept = x.clone()
    with torch.inference_mode():
        pix2pixCC_Networks.Mish()(x)
    assert torch.equal(x, kept)
    opt = train_opt(n_residual=2)
    G, _, input, _ = models_and_data(opt)
    G.eval()
    with torch.inference_mode():
        fast = G(input)
    slow = G(input)
    assert torch.equal(fast, slow.detach())
    slow.mean().backward()  # autograd's forward kept what backward needs
    assert all(p.grad is not None for p in G.parameters())


# ----------------------------------------------------------------------------------------
# 2. The correlation coefficient (the Inspector's and the metrics')
# ----------------------------------------------------------------------------------------

def correlated(shape, seed, offset=0.0, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    f = 0.8 * t + noise * torch.randn(shape, generator=g, dtype=torch.float64) + offset
    return t, f

@pytest.mark.parametrize('ccc', [True, False])
def test_correlation_per_sample_and_channel(ccc):
    t, f = correlated((2, 2, 16, 24), seed=1)
    f[0, 1] += 0.7  # different mean offsets per sample and channel
    f[1, 0] *= 1.9
    cc = correlation(t, f, ccc=ccc, eps=1e-8)
    assert cc.shape == (2, 2) and cc.dtype == torch.float64
    for b in range(2):
        for c in range(2):
            tb, fb = t[b, c].numpy(), f[b, c].numpy()
            expected = lin_ccc(tb, fb) if ccc else pearsonr(tb.ravel(), fb.ravel())[0]
            assert float(cc[b, c]) == pytest.approx(expected, abs=1e-6)
    # The entries really differ, so a pooled or swapped computation would show.
    assert len({round(float(v), 4) for v in cc.flatten()}) == 4


def test_ccc_closed_form_with_sigmas():
    t, f = correlated((1, 1, 20, 20), seed=2, offset=0.3)
    tn, fn = t.numpy().ravel(), f.numpy().ravel()
    rho = pearsonr(tn, fn)[0]
    expected = 2 * rho * tn.std() * fn.std() / (tn.var() + fn.var() + (tn.mean() - fn.mean()) ** 2)
    assert float(correlation(t, f, ccc=True)[0, 0]) == pytest.approx(expected, abs=1e-6)
    assert float(correlation(t, f, ccc=True)[0, 0]) < rho - 0.01  # offset lowers CCC only


def test_correlation_limits_and_shapes():
    t = torch.randn(3, 8, 8, dtype=torch.float64)
    assert correlation(t, t).shape == (3,)
    torch.testing.assert_close(correlation(t, t), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(correlation(t, -t, ccc=False), -torch.ones(3, dtype=torch.float64))
    # Pearson ignores scale and offset; CCC does not.
    assert float(correlation(t[0], 3 * t[0] + 2, ccc=False)) == pytest.approx(1, abs=1e-6)
    assert float(correlation(t[0], 3 * t[0] + 2, ccc=True)) < 0.5
    assert correlation(t[0], t[0]).shape == (1,)
    # Constant data: eps keeps the value finite.
    zero = torch.zeros(1, 1, 8, 8)
    assert torch.isfinite(correlation(zero, zero, eps=1e-8)).all()
    assert torch.isfinite(correlation(zero, zero, ccc=False, eps=1e-8)).all()


def test_correlation_of_half_precision_inputs_is_float32():
    t, f = correlated((1, 1, 16, 16), seed=3)
    cc = correlation(t.to(torch.bfloat16), f.to(torch.bfloat16))
    assert cc.dtype == torch.float32
    expected = lin_ccc(t.to(torch.bfloat16).double().numpy(), f.to(torch.bfloat16).double().numpy())
    assert float(cc[0, 0]) == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------------------
# 3. The objective (Loss), recomputed from D's outputs
# ----------------------------------------------------------------------------------------

def pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)


def hand_losses(opt, D, input, target, fake):
    """Every term of the objective (LSGAN, feature matching, the Inspector's CC at n_CC
    scales; README's introduction) from the discriminator scales called one by one."""
    n_in, n_out = (2, 1)  # input_ch 1, target_ch 2 -> input repeated twice
    real_pair = torch.cat([input] * n_in + [target] * n_out, 1)
    fake_pair = torch.cat([input] * n_in + [fake] * n_out, 1)
    loss_D = LSGAN = FM = 0.0
    with torch.no_grad():
        for s in range(opt.n_D):
            if s > 0:
                real_pair, fake_pair = pool(real_pair), pool(fake_pair)
            scale = getattr(D, f'Scale_{s}')
            real, fake_out = scale(real_pair), scale(fake_pair)
            loss_D += 0.5 * (float(((real[-1] - 1) ** 2).mean()) +
                             float((fake_out[-1] ** 2).mean()))
            LSGAN += 0.5 * opt.lambda_LSGAN * float(((fake_out[-1] - 1) ** 2).mean())
            FM += sum(float((fj - rj).abs().mean()) for fj, rj in zip(fake_out, real, strict=True))
    FM_per_scale = FM  # summed over scales
    FM *= opt.lambda_FM / opt.n_D
    t, f = target.detach().double(), fake.detach().double()
    ccs = []
    for i in range(opt.n_CC):
        if i > 0:
            t, f = pool(t), pool(f)
        values = [lin_ccc(t[b, c].numpy(), f[b, c].numpy())
                  for b in range(t.shape[0]) for c in range(t.shape[1])]
        ccs.append(np.mean(values))
    G_CC = opt.lambda_CC / opt.n_CC * sum(1 - cc for cc in ccs)
    return dict(D=loss_D, G_LSGAN=LSGAN, G_FM=FM, G_CC=G_CC, CC=ccs[0],
                G=LSGAN + FM + G_CC, FM_sum=FM_per_scale)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    opt = train_opt('--n_D', '2', '--n_CC', '3', '--input_ch', '1', '--target_ch', '2',
                    '--lambda_LSGAN', '1.5', '--lambda_FM', '7', '--lambda_CC', '3')
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    input = torch.randn(2, 1, 64, 64)
    target = torch.cat([torch.tanh(input), -0.5 * input], 1)
    target[1] += 0.5  # the two samples have different means
    return opt, G, D, input, target


def test_loss_terms_match_hand_computation(setup):
    opt, G, D, input, target = setup
    criterion = Loss(opt)
    loss_D, loss_G, target_out, fake = criterion(D, G, input, target)
    assert torch.equal(target_out, target)
    assert fake.shape == target.shape
    torch.testing.assert_close(fake.detach(), G(input).detach())
    expected = hand_losses(opt, D, input, target, fake)
    terms = {k: float(v) for k, v in criterion.terms.items()}
    assert set(terms) == {'D', 'G', 'G_LSGAN', 'G_FM', 'G_CC', 'CC'}
    assert all(not v.requires_grad and v.dim() == 0 for v in criterion.terms.values())
    for name in ('D', 'G_LSGAN', 'G_FM', 'G_CC', 'CC', 'G'):
        assert terms[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert float(loss_D.detach()) == pytest.approx(expected['D'], rel=1e-5)
    assert float(loss_G.detach()) == pytest.approx(expected['G'], rel=1e-5)
    # The reference's n_D > 1 feature matching (scale 0 counted twice) would differ.
    with torch.no_grad():
        fm = [sum(float((fj - rj).abs().mean()) for fj, rj in zip(f_s, r_s, strict=True))
              for f_s, r_s in zip(D(torch.cat([input, input, fake], 1)),
                                  D(torch.cat([input, input, target], 1)), strict=True)]
    reference_fm = opt.lambda_FM / 2 * (fm[0] + (fm[0] + fm[1]))
    assert abs(reference_fm - terms['G_FM']) > 1e-3 * terms['G_FM']


def test_cc_is_averaged_per_sample_not_pooled_over_the_batch(setup):
    # Fake data with the right per-image means but unrelated structure: a batch-pooled CC
    # (the reference) is high, the per-sample CC (a difference from it) is near 0.
    opt, _, D, _, _ = setup
    g = torch.Generator().manual_seed(5)
    input = torch.randn(2, 1, 64, 64, generator=g)
    input[1] += 5
    target = input.mean((2, 3), keepdim=True) + torch.randn(2, 2, 64, 64, generator=g)
    G = torch.nn.Conv2d(1, 2, 1)  # any module works as G: here fake = input in both channels
    with torch.no_grad():
        G.weight.fill_(1.0)
        G.bias.zero_()
    criterion = Loss(opt)
    _, _, _, fake = criterion(D, G, input, target)
    per_sample = np.mean([lin_ccc(target[b, c], fake[b, c].detach())
                          for b in range(2) for c in range(2)])
    assert float(criterion.terms['CC']) == pytest.approx(per_sample, abs=1e-5)
    assert abs(per_sample) < 0.1
    pooled = lin_ccc(target.numpy(), fake.detach().numpy())
    assert pooled > 0.5


def test_n_cc_zero_gives_no_cc_loss(setup):
    opt, G, D, input, target = setup
    opt.n_CC = 0
    criterion = Loss(opt)
    _, loss_G, _, _ = criterion(D, G, input, target)
    assert float(criterion.terms['G_CC']) == 0
    assert float(loss_G.detach()) == pytest.approx(float(criterion.terms['G_LSGAN'] +
                                                criterion.terms['G_FM']), rel=1e-6)


def test_generator_step_leaves_no_gradient_on_D_and_D_step_none_on_G(setup):
    opt, G, D, input, target = setup
    loss_D, loss_G, _, _ = Loss(opt)(D, G, input, target)
    assert all(p.requires_grad for p in D.parameters())  # unfrozen after the call
    loss_G.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in D.parameters())
    G_grads = {n: p.grad.clone() for n, p in G.named_parameters()}
    assert all(g is not None for g in G_grads.values())
    assert sum(float(g.abs().sum()) for g in G_grads.values()) > 0
    loss_D.backward()  # after the G backward, as in the training loop
    D_grads = [p.grad for p in D.parameters()]
    assert all(g is not None for g in D_grads)
    assert all(float(g.abs().sum()) > 0 for g in D_grads)
    for n, p in G.named_parameters():  # the fake pair is detached for D's loss
        assert torch.equal(p.grad, G_grads[n]), n


def test_d_loss_pushes_real_up_and_fake_down(setup):
    opt, G, D, input, target = setup
    criterion = Loss(opt)
    D_optim = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    first = None
    for _ in range(15):
        loss_D, _, _, _ = criterion(D, G, input, target)
        first = float(loss_D.detach()) if first is None else first
        D_optim.zero_grad()
        loss_D.backward()
        D_optim.step()
    assert float(criterion.terms['D']) < first


@pytest.mark.parametrize('ccc', ['False', 'True'])
def test_ccc_false_gives_pearson(ccc):
    torch.manual_seed(0)
    opt = train_opt('--ccc', ccc, '--n_CC', '1')
    G, D = Generator(opt), Discriminator(opt)
    input = torch.randn(1, 1, 32, 32)
    target = input * 0.5 + 0.3 * torch.randn(1, 1, 32, 32) + 0.4
    criterion = Loss(opt)
    _, _, _, fake = criterion(D, G, input, target)
    t = target.double().flatten().numpy()
    f = fake.detach().double().flatten().numpy()
    rho = pearsonr(t, f)[0]
    ccc_value = 2 * np.cov(t, f, bias=True)[0, 1] / (t.var() + f.var() + (t.mean() - f.mean()) ** 2)
    expected = rho if ccc == 'False' else ccc_value
    other = ccc_value if ccc == 'False' else rho
    assert abs(rho - ccc_value) > 1e-3  # the two measures differ for these data
    assert float(criterion.terms['CC']) == pytest.approx(expected, abs=2e-5)
    assert float(criterion.terms['CC']) != pytest.approx(other, abs=1e-4)


@pytest.mark.parametrize('ccc', [True, False])
def test_inspector_loss_is_one_minus_the_metric(ccc):
    torch.manual_seed(0)
    target = torch.rand(1, 1, 32, 32) * 2 - 1
    fake = 0.5 * target + 0.3 * torch.randn(1, 1, 32, 32) + 0.2
    opt = train_opt('--n_CC', '1', '--lambda_CC', '1', '--ccc', str(ccc))
    loss, cc = Loss(opt).inspector(target, fake)
    row = image_metrics(target[0].numpy(), fake[0].numpy(), [1])
    metric = row['ccc_1x1' if ccc else 'cc_1x1']
    assert float(loss) == pytest.approx(1 - metric, abs=1e-5)
    assert float(cc) == pytest.approx(metric, abs=1e-5)


# ----------------------------------------------------------------------------------------
# 4. Checkpoints interchange with the published pix2pixCC (Jeong et al. 2022)
#
# The published networks are transcribed below in the shape they have there (python lists
# of layers, a custom Mish module, `ResidualBlock.block`, `Scale_<i>.block_<j>`), then:
# state_dicts load strictly both ways and give the same outputs; a generator saved by the
# reference code, run by our Test script, gives the same physical values as the published
# Test script's inverse scaling; a run of the reference code (no train_options.json) tested
# with the saturation limits left at their defaults, which differ from the published
# code's, gets a notice.
# ----------------------------------------------------------------------------------------

class Mish(nn.Module):
    def __init__(self):
        super(Mish, self).__init__()

    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


def get_norm_layer(type):
    if type == 'BatchNorm2d':
        layer = partial(nn.BatchNorm2d, affine=True)
    elif type == 'InstanceNorm2d':
        layer = partial(nn.InstanceNorm2d, affine=False)
    return layer


def get_pad_layer(type):
    if type == 'reflection':
        layer = nn.ReflectionPad2d
    elif type == 'replication':
        layer = nn.ReplicationPad2d
    elif type == 'zero':
        layer = nn.ZeroPad2d
    return layer


class ResidualBlock(nn.Module):
    def __init__(self, n_channels, pad, norm, act):
        super(ResidualBlock, self).__init__()
        block = [pad(1), nn.Conv2d(n_channels, n_channels, kernel_size=3, padding=0, stride=1),
                 norm(n_channels), act]
        block += [pad(1), nn.Conv2d(n_channels, n_channels, kernel_size=3, padding=0, stride=1),
                  norm(n_channels)]
        self.block = nn.Sequential(*block)

    def forward(self, x):
        return x + self.block(x)


class RefGenerator(nn.Module):
    def __init__(self, opt):
        super(RefGenerator, self).__init__()
        input_ch = opt.input_ch
        output_ch = opt.target_ch
        n_gf = opt.n_gf
        norm = get_norm_layer(opt.norm_type)
        act = Mish()
        pad = get_pad_layer(opt.padding_type)
        trans_conv = opt.trans_conv

        model = []
        model += [pad(3), nn.Conv2d(input_ch, n_gf, kernel_size=7, padding=0), norm(n_gf), act]

        for _ in range(opt.n_downsample):
            model += [nn.Conv2d(n_gf, 2 * n_gf, kernel_size=5, padding=2, stride=2),
                      norm(2 * n_gf), act]
            n_gf *= 2

        for _ in range(opt.n_residual):
            model += [ResidualBlock(n_gf, pad, norm, act)]

        for _ in range(opt.n_downsample):
            if trans_conv == True:  # noqa: E712 (as published)
                model += [nn.ConvTranspose2d(n_gf, n_gf // 2, kernel_size=3, padding=1, stride=2,
                                             output_padding=1),
                          norm(n_gf // 2), act]
            else:
                model += [nn.UpsamplingBilinear2d(scale_factor=2)]
                model += [pad(1), nn.Conv2d(n_gf, n_gf // 2, kernel_size=3, padding=0, stride=1),
                          norm(n_gf // 2), act]
            n_gf //= 2

        model += [pad(3), nn.Conv2d(n_gf, output_ch, kernel_size=7, padding=0)]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


class RefPatchDiscriminator(nn.Module):
    def __init__(self, opt):
        super(RefPatchDiscriminator, self).__init__()
        if opt.ch_balance > 0:
            ch_ratio = float(opt.input_ch) / float(opt.target_ch)
            ch_ratio *= opt.ch_balance
            if ch_ratio > 1:
                input_channel = opt.input_ch + opt.target_ch * int(ch_ratio)
            elif ch_ratio < 1:
                input_channel = opt.input_ch * int(1 / ch_ratio) + opt.target_ch
            else:
                input_channel = opt.input_ch + opt.target_ch
        else:
            input_channel = opt.input_ch + opt.target_ch

        n_df = opt.n_df
        norm = nn.InstanceNorm2d
        act = nn.LeakyReLU(0.2, inplace=True)

        blocks = []
        blocks += [[nn.Conv2d(input_channel, n_df, kernel_size=4, padding=1, stride=2), act]]
        blocks += [[nn.Conv2d(n_df, 2 * n_df, kernel_size=4, padding=1, stride=2),
                    norm(2 * n_df), act]]
        blocks += [[nn.Conv2d(2 * n_df, 4 * n_df, kernel_size=4, padding=1, stride=2),
                    norm(4 * n_df), act]]
        blocks += [[nn.Conv2d(4 * n_df, 8 * n_df, kernel_size=4, padding=1, stride=1),
                    norm(8 * n_df), act]]
        blocks += [[nn.Conv2d(8 * n_df, 1, kernel_size=4, padding=1, stride=1)]]

        self.n_blocks = len(blocks)
        for i in range(self.n_blocks):
            setattr(self, 'block_{}'.format(i), nn.Sequential(*blocks[i]))

    def forward(self, x):
        result = [x]
        for i in range(self.n_blocks):
            block = getattr(self, 'block_{}'.format(i))
            result.append(block(result[-1]))
        return result[1:]


class RefDiscriminator(nn.Module):
    def __init__(self, opt):
        super(RefDiscriminator, self).__init__()
        self.n_D = opt.n_D
        for i in range(opt.n_D):
            setattr(self, 'Scale_{}'.format(str(i)), RefPatchDiscriminator(opt))

    def forward(self, x):
        result = []
        for i in range(self.n_D):
            result.append(getattr(self, 'Scale_{}'.format(i))(x))
            if i != self.n_D - 1:
                x = nn.AvgPool2d(kernel_size=3, padding=1, stride=2, count_include_pad=False)(x)
        return result


NETWORK_VARIANTS = [(trans_conv, norm) for trans_conv in ('True', 'False')
                    for norm in ('InstanceNorm2d', 'BatchNorm2d')]


@pytest.mark.parametrize('trans_conv, norm_type', NETWORK_VARIANTS)
def test_generator_state_dicts_interchange(trans_conv, norm_type):
    opt = train_opt('--input_ch', '2', '--target_ch', '1', '--trans_conv', trans_conv,
                    '--norm_type', norm_type, '--padding_type', 'reflection')
    torch.manual_seed(0)
    ours, ref = Generator(opt), RefGenerator(opt)
    ref_state = ref.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in ref_state.items()}
    ours.load_state_dict(ref_state, strict=True)  # reference -> ours
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    ours = Generator(opt)
    ref = RefGenerator(opt)
    ref.load_state_dict(ours.state_dict(), strict=True)  # ours -> reference
    with torch.no_grad():
        torch.testing.assert_close(ours.train()(x), ref.train()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('input_ch, target_ch, n_D', [(1, 1, 2), (3, 1, 1), (1, 2, 2)])
def test_discriminator_state_dicts_interchange(input_ch, target_ch, n_D):
    opt = train_opt('--input_ch', str(input_ch), '--target_ch', str(target_ch), '--n_D', str(n_D))
    torch.manual_seed(0)
    ours, ref = Discriminator(opt), RefDiscriminator(opt)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, ref.Scale_0.block_0[0].in_channels, 64, 64)
    with torch.no_grad():
        for ours_scale, ref_scale in zip(ours(x), ref(x), strict=True):
            for a, b in zip(ours_scale, ref_scale, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('save_scale', ['1', '0.5'])
def test_reference_checkpoint_gives_reference_physical_values(tmp_path, save_scale):
    """Saved by the published code, translated by ours, compared with the published Test
    script's inverse scaling (linear target: y * (Up - Lo)/2 + (Up + Lo)/2, times save_scale,
    written by fits.writeto)."""
    _, _, test_input = copy_sample(tmp_path / 'data', n_train=0, n_test=3)
    flags = TINY + ['--dataset_name', 'ref', '--data_format_input', 'fits',
                    '--data_format_target', 'fits', '--logscale_input', 'True',
                    '--saturation_lower_limit_input', '1', '--saturation_upper_limit_input', '200',
                    '--saturation_lower_limit_target', '-3000',
                    '--saturation_upper_limit_target', '3000', '--save_scale', save_scale]
    opt = train_opt(*flags[len(TINY):])
    torch.manual_seed(3)
    G = RefGenerator(opt)  # PyTorch's default initialisation: outputs of order 1
    model_dir = tmp_path / 'checkpoints' / 'ref' / 'Model'
    os.makedirs(model_dir)
    torch.save(G.state_dict(), model_dir / '7_G.pt')

    proc = run_test(flags + ['--input_dir_test', test_input, '--iteration', '7'], cwd=tmp_path)
    assert_ok(proc)

    UpIA, LoIA = 3000.0, -3000.0
    out_dir = tmp_path / 'checkpoints' / 'ref' / 'Image' / 'Test' / '7'
    names = sorted(os.listdir(test_input))
    assert sorted(os.listdir(out_dir)) == \
        sorted(n.replace('.fits', '_AI.fits') for n in names) + ['test_run.json']
    ref_dir = tmp_path / 'reference'
    os.makedirs(ref_dir)
    G.eval()
    for name in names:
        # Input: log10, then normalise at log10 of the limits (the order README "Your own
        # data" gives under Scaling).
        data = fits.getdata(os.path.join(test_input, name)).astype(np.float32)
        data = np.log10(np.where(data <= 0, 1.0, data))
        lo, up = np.log10(1.0), np.log10(200.0)
        x = torch.from_numpy(((data - (up + lo) / 2) / ((up - lo) / 2)).astype(np.float32))
        with torch.no_grad():
            fake = G(x[None, None])
        np_fake = fake.cpu().numpy().squeeze()
        np_fake = np_fake * ((UpIA - LoIA) / 2) + (UpIA + LoIA) / 2
        np_fake = np_fake * float(save_scale)
        fits.writeto(ref_dir / name.replace('.fits', '_AI.fits'), np_fake)

        reference = fits.getdata(ref_dir / name.replace('.fits', '_AI.fits'))
        ours = fits.getdata(out_dir / name.replace('.fits', '_AI.fits'))
        assert ours.shape == reference.shape == (64, 64)
        assert ours.dtype.kind == 'f' and ours.dtype.itemsize == 4
        assert np.abs(reference).max() > 100  # physical units, not [-1, 1]
        relative = np.abs(ours - reference).max() / np.abs(reference).max()
        assert relative < 1e-4, relative


def test_a_published_run_tested_with_the_default_limits_gets_a_notice(in_tmp, capsys):
    """The published code's limits default to 0 and 255 (since June 2022), ours to -1 and 1
    (README "Differences from the reference code"): a run without train_options.json
    tested without its limits gets one line saying which to pass; with them, none."""
    input_dir, _ = make_pairs(in_tmp, 'npy', n=1)
    model_dir = in_tmp / 'checkpoints' / 'ref' / 'Model'
    os.makedirs(model_dir)
    torch.save(RefGenerator(train_opt()).state_dict(), model_dir / '7_G.pt')
    base = TINY + ['--dataset_name', 'ref', '--data_format_input', 'npy',
                   '--data_format_target', 'npy', '--n_workers', '0', '--iteration', '7',
                   '--input_dir_test', input_dir]
    input_limits = ['--saturation_lower_limit_input', '0', '--saturation_upper_limit_input',
                    '100']
    target_limits = ['--saturation_lower_limit_target', '0',
                     '--saturation_upper_limit_target', '100']
    for given, left in (([], input_limits[::2] + target_limits[::2]),
                        (input_limits, target_limits[::2]),
                        (input_limits + target_limits, [])):
        shutil.rmtree(in_tmp / 'checkpoints' / 'ref' / 'Image', ignore_errors=True)
        assert pix2pixCC_Test.main(base + given) == 0
        output = capsys.readouterr()
        notices = [line for line in (output.out + output.err).splitlines()
                   if 'saturation' in line]
        if not left:
            assert notices == []
            continue
        assert len(notices) == 1, notices
        for fragment in ['train_options.json', '0 and 255', 'trained with', *left]:
            assert fragment in notices[0], (fragment, notices[0])
        assert not set(given[::2]) & set(notices[0].split()), notices[0]
