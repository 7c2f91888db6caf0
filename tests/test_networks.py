"""Networks (SPEC section 4): parameter counts, state_dict keys and shapes, channel balance,
initialisation, shapes of the outputs."""
import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import train_opt
from pix2pixCC_Networks import (Discriminator, Generator, PatchDiscriminator, channel_repeats,
                                count_parameters, downsample, make_pair, weights_init)
from pix2pixCC_Options import TrainOption


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
    for group in (convs, transposed):  # [fix]: ConvTranspose2d initialised too
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
