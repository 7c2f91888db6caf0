"""Generator, multi-scale PatchGAN Discriminator, and the pix2pixCC objective (Loss + Inspector).

Module names and order are those of the published pix2pixCC, so `state_dict`s interchange:
Generator keys are `model.<i>....`, Discriminator keys `Scale_<s>.block_<b>.<i>....`.
"""
import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Mish(nn.Module):
    """x * tanh(softplus(x)); parameter-free, so it keeps its index in `model` without keys.
    It computes the same with and without autograd (never in place)."""

    def forward(self, x):
        return F.mish(x)


def get_norm_layer(norm_type):
    if norm_type == 'BatchNorm2d':
        return functools.partial(nn.BatchNorm2d, affine=True)
    if norm_type == 'InstanceNorm2d':
        return functools.partial(nn.InstanceNorm2d, affine=False)
    raise NotImplementedError(f'norm_type {norm_type}')


def get_pad_layer(padding_type):
    layers = {'reflection': nn.ReflectionPad2d, 'replication': nn.ReplicationPad2d,
              'zero': nn.ZeroPad2d}
    return layers[padding_type]


class ResidualBlock(nn.Module):
    def __init__(self, n_channels, pad, norm, act):
        super().__init__()
        self.block = nn.Sequential(
            pad(1), nn.Conv2d(n_channels, n_channels, kernel_size=3), norm(n_channels), act,
            pad(1), nn.Conv2d(n_channels, n_channels, kernel_size=3), norm(n_channels))

    def forward(self, x):
        return x + self.block(x)


class Generator(nn.Module):
    """(B, input_ch, H, W) normalised input -> (B, target_ch, H, W) normalised output.

    H and W must be multiples of 2**n_downsample. The output is unbounded (no activation).
    """

    def __init__(self, opt):
        super().__init__()
        act, norm, pad = Mish(), get_norm_layer(opt.norm_type), get_pad_layer(opt.padding_type)
        n_gf = opt.n_gf
        model = [pad(3), nn.Conv2d(opt.input_ch, n_gf, kernel_size=7), norm(n_gf), act]
        for _ in range(opt.n_downsample):
            model += [nn.Conv2d(n_gf, 2 * n_gf, kernel_size=5, stride=2, padding=2),
                      norm(2 * n_gf), act]
            n_gf *= 2
        model += [ResidualBlock(n_gf, pad, norm, act) for _ in range(opt.n_residual)]
        for _ in range(opt.n_downsample):
            if opt.trans_conv:
                model += [nn.ConvTranspose2d(n_gf, n_gf // 2, kernel_size=3, stride=2, padding=1,
                                             output_padding=1)]
            else:
                model += [nn.UpsamplingBilinear2d(scale_factor=2), pad(1),
                          nn.Conv2d(n_gf, n_gf // 2, kernel_size=3)]
            model += [norm(n_gf // 2), act]
            n_gf //= 2
        model += [pad(3), nn.Conv2d(n_gf, opt.target_ch, kernel_size=7)]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


def channel_repeats(opt):
    """How often the input and the target are repeated in the discriminator's pair.

    r = input_ch / target_ch * ch_balance: the thinner side is repeated so that neither side
    dominates the discriminator's first layer. ch_balance <= 0 gives the plain pair.
    """
    ch_balance = getattr(opt, 'ch_balance', 1)
    if ch_balance <= 0:
        return 1, 1
    ratio = opt.input_ch / opt.target_ch * ch_balance
    if ratio > 1:
        return 1, int(ratio)
    if ratio < 1:
        return int(1 / ratio), 1
    return 1, 1


def make_pair(opt, input, output):
    """Concatenate (B, input_ch, H, W) and (B, target_ch, H, W) along channels, balanced."""
    n_input, n_output = channel_repeats(opt)
    return torch.cat([input] * n_input + [output] * n_output, dim=1)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN; forward returns the outputs of its five blocks (for feature matching)."""

    def __init__(self, opt):
        super().__init__()
        n_input, n_output = channel_repeats(opt)
        in_ch = opt.input_ch * n_input + opt.target_ch * n_output
        n_df = opt.n_df
        act = nn.LeakyReLU(0.2, inplace=True)
        norm = nn.InstanceNorm2d  # always, whatever --norm_type (as published)
        conv = functools.partial(nn.Conv2d, kernel_size=4, padding=1)
        blocks = [
            [conv(in_ch, n_df, stride=2), act],
            [conv(n_df, 2 * n_df, stride=2), norm(2 * n_df), act],
            [conv(2 * n_df, 4 * n_df, stride=2), norm(4 * n_df), act],
            [conv(4 * n_df, 8 * n_df, stride=1), norm(8 * n_df), act],
            [conv(8 * n_df, 1, stride=1)],
        ]
        self.n_blocks = len(blocks)
        for i, block in enumerate(blocks):
            setattr(self, f'block_{i}', nn.Sequential(*block))

    def forward(self, x):
        outputs = []
        for i in range(self.n_blocks):
            x = getattr(self, f'block_{i}')(x)
            outputs.append(x)
        return outputs


def downsample(x):
    """The pooling between discriminator scales and between Inspector scales."""
    return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)


class Discriminator(nn.Module):
    """n_D PatchDiscriminators; scale i sees the pair pooled i times.

    forward: (B, C_pair, H, W) -> list over scales of lists of five feature maps.
    """

    def __init__(self, opt):
        super().__init__()
        self.n_D = opt.n_D
        for i in range(self.n_D):
            setattr(self, f'Scale_{i}', PatchDiscriminator(opt))

    def forward(self, x):
        outputs = []
        for i in range(self.n_D):
            if i > 0:
                x = downsample(x)
            outputs.append(getattr(self, f'Scale_{i}')(x))
        return outputs


def weights_init(module):
    """N(0, 0.02) convolution weights (transposed ones too); BatchNorm weight N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# The Inspector: correlation between target and generated data.
# ----------------------------------------------------------------------------------------


def correlation(target, fake, ccc=True, eps=1e-8):
    """Concordance (Lin) or Pearson correlation per sample and channel.

    target, fake: (B, C, H, W) (or (C, H, W), (H, W)); returns (B, C) (or the leading dims).
    Moments are population moments (1/N); computed in at least float32.
    """
    if target.dim() == 2:
        target, fake = target[None], fake[None]
    dtype = torch.promote_types(target.dtype, torch.float32)
    t = target.to(dtype).flatten(-2)
    f = fake.to(dtype).flatten(-2)
    mean_t, mean_f = t.mean(-1), f.mean(-1)
    dt, df = t - mean_t[..., None], f - mean_f[..., None]
    var_t, var_f = (dt * dt).mean(-1), (df * df).mean(-1)
    covariance = (dt * df).mean(-1)
    pearson = covariance / (torch.sqrt(var_t) * torch.sqrt(var_f) + eps)
    if not ccc:
        return pearson
    numerator = 2 * pearson * torch.sqrt(var_t) * torch.sqrt(var_f)
    return numerator / (var_t + var_f + (mean_t - mean_f) ** 2 + eps)


def finite_correlation(real, fake, ccc=True):
    """`correlation` of two arrays of one shape over the pixels finite in both, in float64;
    NaN where it is undefined (fewer than two pixels, or no variation): the CC of the
    evaluation metrics and of the panels' titles."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    keep = np.isfinite(real) & np.isfinite(fake)
    return float(correlation(torch.from_numpy(real[keep])[None],
                             torch.from_numpy(fake[keep])[None], ccc=ccc, eps=0)[0])


class Loss:
    """The pix2pixCC objective: LSGAN + feature matching (pix2pixHD) + the Inspector's CC.

    `criterion(D, G, input, target)` returns `(loss_D, loss_G, target, fake)`; the separate
    terms of the last call are in `criterion.terms` (detached 0-d tensors, for logging).
    """

    def __init__(self, opt):
        self.opt = opt
        self.n_D = opt.n_D
        self.terms = {}

    def inspector(self, target, fake):
        """1 - mean CC over samples and channels, at n_CC scales, weighted by lambda_CC/n_CC.

        Returns (loss, CC at full resolution). Runs in float32 even under autocast.
        """
        opt = self.opt
        if opt.n_CC == 0:
            zero = fake.new_zeros((), dtype=torch.float32)
            return zero, zero
        with torch.autocast(fake.device.type, enabled=False):
            target, fake = target.float(), fake.float()
            losses = []
            for i in range(opt.n_CC):
                if i > 0:
                    target, fake = downsample(target), downsample(fake)
                cc = correlation(target, fake, ccc=opt.ccc, eps=opt.eps).mean()
                losses.append(1.0 - cc)
                if i == 0:
                    cc_full = cc
            return torch.stack(losses).sum() * (opt.lambda_CC / opt.n_CC), cc_full

    def __call__(self, D, G, input, target):
        opt = self.opt
        fake = G(input)
        real_pair = make_pair(opt, input, target)

        # Discriminator: real pairs -> 1, fake pairs (generator detached) -> 0.
        real_features = D(real_pair)
        fake_features = D(make_pair(opt, input, fake.detach()))
        loss_D = 0
        for real, fake_ in zip(real_features, fake_features, strict=True):
            loss_D = loss_D + 0.5 * (F.mse_loss(real[-1], torch.ones_like(real[-1])) +
                                     F.mse_loss(fake_[-1], torch.zeros_like(fake_[-1])))

        # Generator: D is only a judge here, so no gradients for D's weights are computed.
        with frozen(D):
            fake_features = D(make_pair(opt, input, fake))
        loss_LSGAN, loss_FM = 0, 0
        for real, fake_ in zip(real_features, fake_features, strict=True):
            loss_LSGAN = loss_LSGAN + 0.5 * opt.lambda_LSGAN * \
                F.mse_loss(fake_[-1], torch.ones_like(fake_[-1]))
            for real_j, fake_j in zip(real, fake_, strict=True):
                loss_FM = loss_FM + F.l1_loss(fake_j, real_j.detach())
        loss_FM = loss_FM * (opt.lambda_FM / self.n_D)
        loss_CC, cc = self.inspector(target, fake)
        loss_G = loss_LSGAN + loss_FM + loss_CC

        # Detached tensors, not floats: converting here would stall a GPU at every step.
        self.terms = {name: value.detach() for name, value in (
            ('D', loss_D), ('G', loss_G), ('G_LSGAN', loss_LSGAN), ('G_FM', loss_FM),
            ('G_CC', loss_CC), ('CC', cc))}
        return loss_D, loss_G, target, fake


class frozen:
    """Context manager: `module`'s parameters need no gradient inside the block."""

    def __init__(self, module):
        self.parameters = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.parameters:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.parameters:
            p.requires_grad_(True)
