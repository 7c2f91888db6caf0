"""The performance work changes no result (issue 5).

(a) the optimised training step (fused Adam, D frozen during the generator's pass, gradients
    released before the step) matches a plain reference step (for-loop Adam, nothing frozen,
    PyTorch's default convolutions) from the same seed and data; the GEMM path for the widest
    CPU convolutions gives oneDNN's outputs and gradients;
(b) data preparation: the loader's output equals a straightforward float64 reference of the
    SPEC scaling to float32 rounding, and is bit for bit the plain first version of
    Scaling.forward, astropy's data cast to float32, and the un-augmented sample when an
    augmentation of angle 0 / offset 0 is drawn;
(c) a bfloat16-autocast step runs on the CPU and keeps float32 master weights;
(d) --compile (torch.compile through prepare_network) of a tiny generator gives the eager
    output and gradients.

No timings are asserted here: benchmarks/benchmark.py measures them.
"""
import contextlib
import copy
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, train_opt

import pix2pixCC_Networks as networks
from pix2pixCC_Networks import Discriminator, Generator, Loss, weights_init
from pix2pixCC_Pipeline import CustomDataset, Scaling, read_array, read_fits, to_chw
from pix2pixCC_Utils import Precision

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import benchmark  # noqa: E402  (the benchmark's step must be the driver's step)


# ----------------------------------------------------------------------------------------
# (a) training step
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_convolutions():
    """Every convolution by PyTorch's own kernel (the GEMM path off)."""
    saved = networks._GEMM_CONV
    networks._GEMM_CONV = False
    try:
        yield
    finally:
        networks._GEMM_CONV = saved


@contextlib.contextmanager
def gemm_everywhere():
    """The GEMM path for every eligible convolution, whatever its size."""
    saved = networks.GEMM_CONV_MAX_PIXELS, networks.GEMM_CONV_MIN_WEIGHTS
    networks.GEMM_CONV_MAX_PIXELS, networks.GEMM_CONV_MIN_WEIGHTS = 10 ** 9, 0
    try:
        yield
    finally:
        networks.GEMM_CONV_MAX_PIXELS, networks.GEMM_CONV_MIN_WEIGHTS = saved


def reference_step(G, D, G_optim, D_optim, opt, input, target):
    """The plain step: Loss without freezing D (its weight gradients from the generator's
    backward are computed, then discarded by the D step's zero_grad), for-loop Adam."""
    with benchmark.unfrozen_discriminator():
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


def assert_same_weights(a, b, atol, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key not in skip:
            np.testing.assert_allclose(sa[key].numpy(), sb[key].numpy(), rtol=0, atol=atol,
                                       err_msg=key)


def noise_gradient_biases(module):
    """Biases of convolutions followed by a normalisation: their gradient is exactly 0 in
    exact arithmetic, so what autograd returns is rounding noise, which Adam's normalisation
    turns into steps of up to lr in a random direction (in every implementation)."""
    names = []
    for prefix, seq in module.named_modules():
        if isinstance(seq, torch.nn.Sequential):
            layers = list(seq.named_children())
            for (name, layer), (_, following) in zip(layers, layers[1:]):
                if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and \
                        isinstance(following, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d)):
                    names.append(f'{prefix}.{name}.bias')
    return names


@pytest.mark.parametrize('norm_type', ['InstanceNorm2d', 'BatchNorm2d'])
def test_optimised_step_equals_reference_step(norm_type):
    opt = train_opt(norm_type=norm_type, n_D=2, batch_size=2)
    G, D, input, target = models_and_data(opt, size=64)
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)

    G_optim, D_optim = benchmark.make_optimizers(G, D, opt, 'fused')
    assert G_optim.defaults['fused'] and D_optim.defaults['fused']
    ref_optims = benchmark.make_optimizers(G_ref, D_ref, opt, 'plain')
    precision = Precision(opt, torch.device('cpu'))
    for step in range(3):
        with default_convolutions():
            losses_ref = reference_step(G_ref, D_ref, *ref_optims, opt, input, target)
        losses = benchmark.train_step(Loss(opt), G, D, G_optim, D_optim, precision, input,
                                      target, frozen_d=True, release_grads_first=True)
        np.testing.assert_allclose([float(v) for v in losses], losses_ref, rtol=1e-5)
        # Adam moves every weight by ~lr (2e-4) per step: 1e-6 is far below one step. After
        # the first step the noise-gradient biases drift apart by design (see above).
        # (and with them BatchNorm's running means, which include those biases).
        for module, ref in ((G, G_ref), (D, D_ref)):
            drifting = noise_gradient_biases(module) + [
                key for key in module.state_dict() if key.endswith('running_mean')]
            assert_same_weights(module, ref, atol=1e-6, skip=drifting if step else ())
    assert noise_gradient_biases(G) and noise_gradient_biases(D)
    assert all(p.requires_grad for p in D.parameters())  # D unfrozen after the Loss


def test_benchmark_baseline_network_is_the_same_network():
    """The benchmark's re-created published generator (Mish written out, every convolution
    by PyTorch's kernel) computes what ours computes, with the same state_dict."""
    opt = train_opt(n_residual=2)
    G, _, input, _ = models_and_data(opt)
    published = copy.deepcopy(G)
    assert benchmark.use_published_mish(published) == 1 + 2 * opt.n_downsample + opt.n_residual
    assert not any(type(m).__name__ == 'Mish' for m in published.modules())
    assert list(published.state_dict()) == list(G.state_dict())
    with default_convolutions(), torch.no_grad():
        expected = published(input)
    with torch.no_grad():
        np.testing.assert_allclose(G(input).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_gemm_convolution_path_gives_the_same_outputs_and_gradients():
    opt = train_opt(n_residual=2)
    G, _, input, _ = models_and_data(opt, size=32)
    calls = []
    original = networks.gemm_conv2d

    def counting(conv, x):
        calls.append(conv)
        return original(conv, x)

    with default_convolutions():
        out_ref = G(input)
        grads_ref = torch.autograd.grad(out_ref.square().mean(), list(G.parameters()))
    with gemm_everywhere(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(networks, 'gemm_conv2d', counting)
        out = G(input)
        grads = torch.autograd.grad(out.square().mean(), list(G.parameters()))
    n_conv = sum(type(m) is torch.nn.Conv2d for m in G.modules())
    assert len(calls) == n_conv  # every Conv2d took the GEMM path, no ConvTranspose2d did
    np.testing.assert_allclose(out.detach().numpy(), out_ref.detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    # Noise-gradient biases (see above): compare on the scale of all gradients.
    overall = max(float(g.abs().max()) for g in grads_ref)
    noise = noise_gradient_biases(G)
    for (name, _), g, g_ref in zip(G.named_parameters(), grads, grads_ref):
        scale = 1e-2 * overall if name in noise else float(g_ref.abs().max())
        assert float((g - g_ref).abs().max()) <= 1e-4 * scale, name


def test_gemm_path_is_chosen_only_where_it_is_faster():
    """The default generator's 1024-channel convolutions at training sizes take it; large
    feature maps, bfloat16 autocast, hooks and small layers keep PyTorch's kernel."""
    conv = torch.nn.Conv2d(1024, 1024, 3)  # a residual convolution of the default network
    small = torch.zeros(1, 1024, 18, 18)   # 16x16 output: training at 256x256
    assert networks.use_gemm_conv(conv, small)
    assert not networks.use_gemm_conv(conv, torch.zeros(1, 1024, 66, 66))  # inference 1024
    assert not networks.use_gemm_conv(conv, torch.zeros(8, 1024, 18, 18))  # large batch
    assert not networks.use_gemm_conv(conv, small.to(torch.bfloat16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not networks.use_gemm_conv(conv, small)
    assert not networks.use_gemm_conv(torch.nn.Conv2d(64, 64, 3), torch.zeros(1, 64, 18, 18))
    handle = conv.register_forward_hook(lambda *args: None)
    assert not networks.use_gemm_conv(conv, small)
    handle.remove()
    assert networks.use_gemm_conv(conv, small)


def test_hooks_and_state_dict_unchanged_by_the_gemm_path():
    opt = train_opt()
    G, _, input, _ = models_and_data(opt)
    keys = list(G.state_dict())
    seen = []
    conv = G.model[1]
    conv.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with gemm_everywhere():
        G(input)
    assert seen == [torch.Size([1, opt.n_gf, 32, 32])]
    assert list(G.state_dict()) == keys


def test_fused_and_plain_adam_states_interchange():
    """A training state saved with one Adam implementation resumes with the other."""
    opt = train_opt()
    G, D, input, target = models_and_data(opt)
    precision = Precision(opt, torch.device('cpu'))
    for saved_with, loaded_with in (('plain', 'fused'), ('fused', 'plain')):
        optims = benchmark.make_optimizers(G, D, opt, saved_with)
        benchmark.train_step(Loss(opt), G, D, *optims, precision, input, target)
        state = copy.deepcopy([o.state_dict() for o in optims])  # state_dict() shares tensors
        G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
        resumed = benchmark.make_optimizers(G2, D2, opt, loaded_with)
        for o, s in zip(resumed, copy.deepcopy(state)):
            o.load_state_dict(s)
        G3, D3 = copy.deepcopy(G), copy.deepcopy(D)
        same = benchmark.make_optimizers(G3, D3, opt, saved_with)
        for o, s in zip(same, copy.deepcopy(state)):
            o.load_state_dict(s)
        benchmark.train_step(Loss(opt), G2, D2, *resumed, precision, input, target)
        benchmark.train_step(Loss(opt), G3, D3, *same, precision, input, target)
        assert_same_weights(G2, G3, atol=1e-6)
        assert_same_weights(D2, D3, atol=1e-6)


# ----------------------------------------------------------------------------------------
# (b) data preparation
# ----------------------------------------------------------------------------------------


def write_fits_pair(folder, array_in, array_tg, name='sun_0000.fits'):
    from astropy.io import fits
    paths = []
    for role, array in (('Input', array_in), ('Target', array_tg)):
        os.makedirs(os.path.join(folder, role), exist_ok=True)
        path = os.path.join(folder, role, name)
        fits.PrimaryHDU(array).writeto(path, overwrite=True)
        paths.append(path)
    return paths


def reference_scaling(path, lower, upper, clip=False, log=False):
    """SPEC section 3, written out plainly in float64, rounded to float32 at the end."""
    from astropy.io import fits
    x = np.array(fits.getdata(path), dtype=np.float64)
    x = np.where(np.isnan(x), lower if log else 0.0, x)
    x = np.where(np.isposinf(x), upper, x)
    x = np.where(np.isneginf(x), lower, x)
    if clip:
        x = np.clip(x, lower, upper)
    if log:
        x = np.log10(np.where(x <= 0, lower, x))
        lower, upper = np.log10(lower), np.log10(upper)
    return ((x - (upper + lower) / 2) / ((upper - lower) / 2)).astype(np.float32)[None]


def fits_data(rng, dtype, size=64, low=-50.0, high=250.0):
    x = rng.uniform(low, high, (size, size))
    x[3, 4], x[10, 11], x[20, 21], x[30, 31] = np.nan, np.inf, -np.inf, 0.0
    if np.issubdtype(dtype, np.integer):
        x = np.nan_to_num(x, nan=0, posinf=high, neginf=low)
    return x.astype(dtype)


SCALINGS = [
    dict(),  # defaults: -1..1, no clip, no log
    dict(saturation_lower_limit_input=-50, saturation_upper_limit_input=250,
         saturation_lower_limit_target=-50, saturation_upper_limit_target=250,
         saturation_clip_input=True, saturation_clip_target=True),
    dict(logscale_input=True, saturation_lower_limit_input=1, saturation_upper_limit_input=200,
         logscale_target=True, saturation_lower_limit_target=0.5,
         saturation_upper_limit_target=300, saturation_clip_target=True),
]


@pytest.mark.parametrize('scaling', SCALINGS, ids=['default', 'clip', 'log'])
@pytest.mark.parametrize('dtype', ['>f4', '>f8', '>i2'])
def test_data_preparation_matches_reference(tmp_path, scaling, dtype):
    rng = np.random.default_rng(1)
    in_path, tg_path = write_fits_pair(str(tmp_path), fits_data(rng, np.dtype(dtype)),
                                       fits_data(rng, np.dtype(dtype)))
    opt = train_opt(data_format_input='fits', data_format_target='fits',
                    input_dir_train=os.path.dirname(in_path),
                    target_dir_train=os.path.dirname(tg_path), **scaling)
    x, y = CustomDataset(opt)[(0, 7)]
    assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape == (1, 64, 64)
    for tensor, path, side in ((x, in_path, 'input'), (y, tg_path, 'target')):
        s = Scaling.from_options(opt, side)
        expected = reference_scaling(path, s.lower, s.upper, s.clip, s.log)
        # float32 arithmetic against float64 arithmetic rounded once: a few float32 ulps
        np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-6, atol=2e-7)


@pytest.mark.parametrize('dtype', ['>f4', '>f8', '>i2', '<f4'])
def test_fits_reading_paths_agree_bit_for_bit(tmp_path, dtype):
    """read_fits + to_chw gives, bit for bit, what astropy's array cast to float32 gives."""
    from astropy.io import fits
    rng = np.random.default_rng(2)
    data = fits_data(rng, np.dtype(dtype))
    path = os.path.join(str(tmp_path), 'a.fits')
    fits.PrimaryHDU(data).writeto(path)
    with fits.open(path, memmap=False) as hdul:
        expected = np.array(hdul[0].data).astype(np.float32)[None]
    got = read_array(path, 'fits', 1)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
    assert got.tobytes() == expected.tobytes()
    assert to_chw(read_fits(path), 1, path).tobytes() == expected.tobytes()


def straightforward_forward(scaling, x):
    """Scaling.forward as first written (whole-array np.where chain, then one expression):
    the faster version must give the same bits."""
    x = np.asarray(x, dtype=np.float32)
    if (~np.isfinite(x)).sum():
        x = np.where(np.isnan(x), scaling.lower if scaling.log else 0.0, x)
        x = np.where(np.isposinf(x), scaling.upper, x)
        x = np.where(np.isneginf(x), scaling.lower, x).astype(np.float32)
    if scaling.clip:
        x = np.clip(x, scaling.lower, scaling.upper)
    if scaling.log:
        x = np.log10(np.where(x <= 0, np.float32(scaling.lower), x))
    lo, up = scaling._limits()
    return ((x - (up + lo) / 2) / ((up - lo) / 2)).astype(np.float32)


@pytest.mark.parametrize('limits,log', [((-1, 1), False), ((-3000, 3000), False),
                                        ((1, 200), True), ((1e-3, 7.3), True)])
@pytest.mark.parametrize('clip', [False, True])
def test_scaling_is_bit_for_bit_the_straightforward_one(limits, log, clip):
    rng = np.random.default_rng(4)
    scaling = Scaling(lower=float(limits[0]), upper=float(limits[1]), clip=clip, log=log)
    for dtype in (np.float32, np.float64, np.int16, '>f4'):
        for layout in ('C', 'F', 'view'):
            x = rng.normal(0, 1, (2, 37, 41)) * rng.choice([1, 100, 1e4])
            if np.dtype(dtype).kind == 'f':
                u = rng.random(x.shape)
                x[u < 0.05], x[(u > 0.05) & (u < 0.08)], x[(u > 0.08) & (u < 0.1)] = \
                    np.nan, np.inf, -np.inf
            x = np.nan_to_num(x) if np.dtype(dtype).kind == 'i' else x
            x = x.astype(dtype)
            x = np.asfortranarray(x) if layout == 'F' else x[:, ::2, 1::3] if layout == 'view' \
                else x
            before = x.copy()
            with np.errstate(all='ignore'):
                expected = straightforward_forward(scaling, x)
                got = scaling.forward(x)
            assert got.dtype == np.float32 and got.shape == expected.shape
            assert got.tobytes() == expected.tobytes(), (dtype, layout)
            np.testing.assert_array_equal(x, before)  # the input is not modified
            n_bad = int((~np.isfinite(np.asarray(x, dtype=np.float32))).sum())
            assert scaling.clean(np.asarray(x, dtype=np.float32))[1] == n_bad


def test_no_augmentation_drawn_gives_identical_output(tmp_path):
    """max_rotation_angle / padding_size set, but a draw of angle 0 and offset `padding`
    (the identity) gives exactly the un-augmented arrays."""
    rng = np.random.default_rng(3)
    in_path, tg_path = write_fits_pair(str(tmp_path), fits_data(rng, np.dtype('>f4')),
                                       fits_data(rng, np.dtype('>f4')))
    dirs = dict(data_format_input='fits', data_format_target='fits',
                input_dir_train=os.path.dirname(in_path),
                target_dir_train=os.path.dirname(tg_path))
    plain = CustomDataset(train_opt(**dirs))[(0, 0)]
    augmented = CustomDataset(train_opt(max_rotation_angle=3, padding_size=2, **dirs))
    found = 0
    for seed in range(10000):  # the draws of CustomDataset.__getitem__, replayed
        g = torch.Generator().manual_seed(seed)
        angle = int(torch.randint(-3, 4, (1,), generator=g))
        dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=g))
        if angle == 0 and dy == dx == 2:
            x, y = augmented[(0, seed)]
            assert x.numpy().tobytes() == plain[0].numpy().tobytes()
            assert y.numpy().tobytes() == plain[1].numpy().tobytes()
            found += 1
            if found == 3:
                break
    assert found == 3


# ----------------------------------------------------------------------------------------
# (c) bfloat16 on the CPU, (d) torch.compile
# ----------------------------------------------------------------------------------------


def test_bfloat16_autocast_step_keeps_float32_weights():
    opt = train_opt(data_type=16)
    G, D, input, target = models_and_data(opt)
    before = copy.deepcopy(G.state_dict())
    precision = Precision(opt, torch.device('cpu'))
    assert precision.enabled and precision.dtype == torch.bfloat16
    G_optim, D_optim = benchmark.make_optimizers(G, D, opt, 'fused')
    seen = []
    hook = G.model[1].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    loss_D, loss_G = benchmark.train_step(Loss(opt), G, D, G_optim, D_optim, precision, input,
                                          target)
    hook.remove()
    assert seen == [torch.bfloat16]  # the convolutions ran in bfloat16
    assert torch.isfinite(loss_D) and torch.isfinite(loss_G)
    for module in (G, D):
        for name, p in module.named_parameters():
            assert p.dtype == torch.float32, name
            assert p.grad is None or p.grad.dtype == torch.float32, name
    for state in list(G_optim.state.values()) + list(D_optim.state.values()):
        assert state['exp_avg'].dtype == state['exp_avg_sq'].dtype == torch.float32
    assert any(not torch.equal(before[k], v) for k, v in G.state_dict().items())


def test_compiled_generator_matches_eager():
    """--compile as the drivers apply it (pix2pixCC_Utils.prepare_network; torch.compile
    where that helper is absent): same output and same gradients as eager mode."""
    if not hasattr(torch, 'compile'):
        pytest.skip('torch.compile is not available in this torch')
    import pix2pixCC_Utils as utils
    opt = train_opt(n_gf=4, n_downsample=1, n_residual=1, compile=True)
    G, _, input, _ = models_and_data(opt, size=16)
    eager = copy.deepcopy(G)
    expected = eager(input)
    expected.square().mean().backward()
    prepare = getattr(utils, 'prepare_network', None)
    try:
        compiled = prepare(G, opt, torch.device('cpu')) if prepare else torch.compile(G)
        out = compiled(input)
        out.square().mean().backward()
    except Exception as error:  # no C compiler / unsupported platform: say why
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        pytest.skip(f'torch.compile cannot run here: {message}')
    assert compiled is not G  # it was compiled, not just moved
    np.testing.assert_allclose(out.detach().numpy(), expected.detach().numpy(), rtol=1e-4,
                               atol=1e-5)
    overall = max(float(p.grad.abs().max()) for p in eager.parameters())
    for (name, p), p_ref in zip(G.named_parameters(), eager.parameters()):
        assert float((p.grad - p_ref.grad).abs().max()) <= 1e-4 * overall, name
