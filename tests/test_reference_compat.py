"""Checkpoints interchange with the published pix2pixCC (Jeong et al. 2022).

The published networks are transcribed below in the shape they have there (python lists of
layers, a custom Mish module, `ResidualBlock.block`, `Scale_<i>.block_<j>`), then:
- state_dicts load strictly both ways and give the same outputs;
- a generator saved by the reference code, run by our Test script, gives the same physical
  values as the published Test script's inverse scaling;
- a run of the reference code (no train_options.json) tested with the saturation limits left
  at their defaults, which differ from the published code's, gets a notice.
"""
import os
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from astropy.io import fits

import pix2pixCC_Test
from conftest import TINY, assert_ok, copy_sample, make_pairs, run_test, train_opt
from pix2pixCC_Networks import Discriminator, Generator


# ----------------------------------------------------------------------------------------
# The published networks (pix2pixCC_Networks.py of the reference), transcribed.
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

        for n_up in range(opt.n_downsample):
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


# ----------------------------------------------------------------------------------------
# State dicts interchange
# ----------------------------------------------------------------------------------------

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
        for ours_scale, ref_scale in zip(ours(x), ref(x)):
            for a, b in zip(ours_scale, ref_scale):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# A reference checkpoint through our Test script
# ----------------------------------------------------------------------------------------

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
        # Input: log10, then normalise at log10 of the limits (SPEC section 3 order).
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
