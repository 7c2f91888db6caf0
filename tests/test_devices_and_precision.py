"""Where the computation runs and in which precision, as README "CPU and GPU" documents
it: the choice of device and its notices (also the quick start's `device: cpu (no CUDA GPU
found)`), mixed precision on the CPU (bfloat16 autocast with float32 weights, optimiser and
CC), the placement of the networks that README "Speed" explains (channels-last, the GEMM path
of the widest CPU convolutions, a user's hooks on them), torch.compile through both drivers,
and the wrappers that checkpoints never show. benchmarks/gpu_check.py, which checks a CUDA
machine, is in test_benchmarks.py.
"""
import copy
import functools
import math
import os

import numpy as np
import pytest
import torch

import machinery.fast_conv
from machinery import translation
import pix2pixCC_Test
import pix2pixCC_Train
import pix2pixCC_Utils
from conftest import (CPU, NPY_DATA, RECORD, SAMPLE_DATA, TINY, TINY_NETWORK, assert_ok,
                      biases_before_norm, constant_generator_checkpoint, copy_sample, lin_ccc,
                      make_pairs, make_test_opt, models_and_data, profiled, reports, run_test,
                      run_train, train_opt)
from pix2pixCC_Networks import Generator, Loss, weights_init
from pix2pixCC_Options import UserError
from pix2pixCC_Train import make_optimizer, train_step
from pix2pixCC_Utils import Precision, bare, memory_format, prepare_network, select_device


# ----------------------------------------------------------------------------------------
# 1. The device and its notices
# ----------------------------------------------------------------------------------------

def test_select_device_cpu_when_asked():
    messages = []
    device, ids = select_device(train_opt(), log=messages.append)
    assert device.type == 'cpu' and ids == [] and messages == []


def test_select_device_falls_back_to_cpu_with_one_notice(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    messages = []
    opt = train_opt('--gpu_ids', '0')
    device, ids = select_device(opt, log=messages.append)
    assert device.type == 'cpu' and ids == []
    assert len(messages) == 1 and '\n' not in messages[0] and 'CPU' in messages[0]


def test_select_device_missing_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(UserError):
        select_device(train_opt('--gpu_ids', '0,3'), log=lambda m: None)
    device, ids = select_device(train_opt('--gpu_ids', '0'), log=lambda m: None)
    assert str(device) == 'cuda:0' and ids == [0]


def test_test_falls_back_to_the_cpu_with_one_notice(in_tmp, monkeypatch, capsys):
    """--gpu_ids 0 on a machine without CUDA (made so here, whatever the machine)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    test_in, _ = make_pairs(in_tmp / 'test', 'npy', n=2, size=32, seed=7, prefix='t')
    flags = TINY + NPY_DATA + ['--dataset_name', 'cpu', '--n_workers', '0',
                               '--input_dir_test', test_in]
    constant_generator_checkpoint(make_test_opt(*flags), 0.5, step=6)
    assert pix2pixCC_Test.main(flags + ['--gpu_ids', '0', '--iteration', '6']) == 0
    output = capsys.readouterr()
    notices = [line for line in (output.out + output.err).splitlines() if 'CUDA' in line]
    assert len(notices) == 1, notices
    assert '--gpu_ids 0' in notices[0] and 'CPU' in notices[0] and '--gpu_ids -1' in notices[0]
    assert sorted(os.listdir('checkpoints/cpu/Image/Test/6')) == ['t_000_AI.npy',
                                                                  't_001_AI.npy', RECORD]


def test_the_quick_start_command_lines_print_no_notices(tmp_path):
    """The README's quick start leaves --gpu_ids and --data_size at their defaults: without
    CUDA the run says 'device: cpu (no CUDA GPU found)' in its start-up lines, and neither
    script prints a notice. The notices are for what the user asked for by name."""
    train_in, train_tg, test_in = copy_sample(tmp_path / 'data', n_train=2, n_test=1)
    quick = SAMPLE_DATA + TINY_NETWORK + ['--n_workers', '0']
    train = run_train(quick + ['--input_dir_train', train_in, '--target_dir_train', train_tg,
                               '--n_epochs', '1', '--seed', '1'], cwd=tmp_path)
    assert_ok(train)
    test = run_test(['--iteration', '2', '--input_dir_test', test_in, '--n_workers', '0'],
                    cwd=tmp_path)
    assert_ok(test)
    for proc in (train, test):
        assert 'notice' not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    if not torch.cuda.is_available():
        assert 'device: cpu (no CUDA GPU found)' in train.stdout

    asked = run_train(quick + ['--input_dir_train', train_in, '--target_dir_train', train_tg,
                               '--n_epochs', '1', '--dataset_name', 'asked', '--data_size',
                               '1024', '--gpu_ids', '0'], cwd=tmp_path)
    assert_ok(asked)
    assert 'notice: the data are 64x64; --data_size 1024 is ignored' in asked.stdout
    if not torch.cuda.is_available():
        assert 'notice: --gpu_ids 0 asks for a GPU but CUDA is not available' in asked.stdout


# ----------------------------------------------------------------------------------------
# 2. Mixed precision on the CPU (--data_type 16: bfloat16 autocast)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('data_type, enabled', [('16', True), ('32', False)])
def test_precision_on_the_cpu(data_type, enabled):
    """--data_type 16 is bfloat16 autocast without a GradScaler (that is for CUDA float16);
    32 runs without autocast."""
    precision = Precision(train_opt('--data_type', data_type), CPU)
    assert precision.enabled is enabled
    assert not precision.scaler.is_enabled()  # no GradScaler on the CPU
    if enabled:
        assert precision.dtype == torch.bfloat16
    with precision.autocast():
        assert torch.is_autocast_enabled('cpu') is enabled
        if enabled:
            assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (torch.bfloat16 if enabled else torch.float32)


def test_amp_dtype_can_be_forced():
    precision = Precision(train_opt('--data_type', '16', '--amp_dtype', 'float16'), CPU)
    assert precision.dtype == torch.float16
    assert not precision.scaler.is_enabled()  # GradScaler is for CUDA float16 only


@pytest.mark.parametrize('native', [True, False])
def test_bfloat16_on_a_cpu_without_bfloat16_instructions_gets_a_notice(monkeypatch, native):
    """On a CPU without AVX512-BF16/AMX, oneDNN's bfloat16 convolutions fall back to very
    slow kernels (380x slower than float32 for one 256-channel convolution on an AVX2 CPU):
    the drivers say so instead of silently running for days."""
    monkeypatch.setattr(pix2pixCC_Utils, 'cpu_has_bfloat16', lambda: native)
    mixed = Precision(make_test_opt('--data_type', '16'), CPU)
    full = Precision(make_test_opt('--data_type', '32'), CPU)
    assert full.notice() is None
    if native:
        assert mixed.notice() is None
    else:
        assert 'no bfloat16 instructions' in mixed.notice()
        assert '--data_type 32' in mixed.notice()


def test_a_mixed_precision_step_keeps_float32_weights_and_computes_the_cc_in_float32():
    """The driver's step (train_step) under --data_type 16: the convolutions run in
    bfloat16; the weights, their gradients and Adam's moments stay float32; and the CC is
    computed in float32 from the bfloat16 output (a bfloat16 computation would be ~1e-2
    off)."""
    opt = train_opt('--data_type', '16', '--n_D', '2', '--n_CC', '3', '--target_ch', '2')
    G, D, _, _ = models_and_data(opt)
    input = torch.randn(2, 1, 64, 64)
    target = torch.cat([torch.tanh(input), -0.5 * input], 1)
    target[1] += 0.5  # the two samples have different means
    before = copy.deepcopy(G.state_dict())
    precision = Precision(opt, CPU)
    assert precision.enabled and precision.dtype == torch.bfloat16
    criterion = Loss(opt)
    G_optim, D_optim = make_optimizer(G.parameters(), opt), make_optimizer(D.parameters(), opt)
    seen = []
    hook = G.model[1].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    loss_D, loss_G, _, fake = train_step(criterion, G, D, G_optim, D_optim, precision, input,
                                         target)
    hook.remove()
    assert seen == [torch.bfloat16]  # the convolutions ran in bfloat16
    assert fake.dtype == torch.bfloat16  # autocast really acted
    assert criterion.terms['CC'].dtype == torch.float32
    assert criterion.terms['G_CC'].dtype == torch.float32
    expected = np.mean([lin_ccc(target[b, c], fake[b, c].detach().double())
                        for b in range(2) for c in range(2)])
    assert float(criterion.terms['CC']) == pytest.approx(expected, abs=2e-5)
    assert all(torch.isfinite(v) for v in criterion.terms.values())
    assert torch.isfinite(loss_D) and torch.isfinite(loss_G)
    for module in (G, D):
        for name, p in module.named_parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
            assert p.grad is None or p.grad.dtype == torch.float32, name
    for state in list(G_optim.state.values()) + list(D_optim.state.values()):
        assert state['exp_avg'].dtype == state['exp_avg_sq'].dtype == torch.float32
    assert any(not torch.equal(before[k], v) for k, v in G.state_dict().items())


def test_mixed_precision_training_and_test_on_the_cpu(in_tmp, capsys):
    """Both drivers with --data_type 16: finite losses, float32 checkpoints, float32
    outputs."""
    train_in, train_tg = make_pairs(in_tmp / 'data', 'npy', n=2, size=32)
    flags = ['--dataset_name', 'mp', '--data_type', '16', '--n_workers', '0'] + NPY_DATA
    assert pix2pixCC_Train.main(TINY + flags + ['--input_dir_train', train_in,
                                                '--target_dir_train', train_tg,
                                                '--n_epochs', '2', '--report_freq', '1',
                                                '--save_freq', '2']) == 0
    stdout = capsys.readouterr().out
    lines = reports(stdout)
    assert [step for _, step, _, _ in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(d) and math.isfinite(g) for _, _, d, g in lines)
    for step in (2, 4):
        for kind in ('G', 'D'):
            state = torch.load(f'checkpoints/mp/Model/{step}_{kind}.pt', weights_only=True)
            for key, value in state.items():
                assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    assert pix2pixCC_Test.main(TINY + flags + ['--input_dir_test', train_in,
                                               '--iteration', '4']) == 0
    out = np.load('checkpoints/mp/Image/Test/4/img_000_AI.npy')
    assert out.dtype == np.float32 and out.shape == (32, 32) and np.all(np.isfinite(out))


# ----------------------------------------------------------------------------------------
# 3. Placing the networks: layout, the GEMM path, a user's hooks
# ----------------------------------------------------------------------------------------

# 512-channel residual convolutions on 8x8 feature maps (128x128 data): wide enough for the
# GEMM path, small enough for a test. (At 4x4, PyTorch itself already picks im2col + GEMM.)
WIDE = dict(n_gf=32, n_downsample=4, n_residual=1)
GEMM_KERNEL = 'aten::_slow_conv2d_forward'  # im2col + matrix product


def test_channels_last_gives_the_same_generator_output():
    """What prepare_network does on CUDA (channels-last weights and inputs) must not change
    the numbers; checked here on the CPU, which runs channels-last convolutions too."""
    torch.manual_seed(0)
    G = Generator(train_opt()).apply(weights_init).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        plain = G(x)
        fast = G.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_prepare_network_on_the_cpu_keeps_the_default_layout():
    G = prepare_network(Generator(train_opt()), train_opt(), CPU)
    assert memory_format(CPU) == torch.contiguous_format
    assert G.model[1].weight.is_contiguous()


def forward_backward(G, input):
    output = G(input)
    return output.detach(), torch.autograd.grad(output.square().mean(), list(G.parameters()))


def test_gemm_convolution_path_gives_the_same_outputs_and_gradients():
    opt = train_opt(**WIDE)
    G, _, input, _ = models_and_data(opt, size=128)
    plain = copy.deepcopy(G)
    keys = list(G.state_dict())
    prepared = prepare_network(G, opt, CPU)
    assert list(prepared.state_dict()) == keys
    (out_ref, grads_ref), calls_ref = profiled(lambda: forward_backward(plain, input))
    (out, grads), calls = profiled(lambda: forward_backward(prepared, input))
    # The 512-channel convolutions (two per residual block, the last downsampling) took it.
    assert GEMM_KERNEL not in calls_ref and calls[GEMM_KERNEL] == 3
    np.testing.assert_allclose(out.numpy(), out_ref.numpy(), rtol=1e-5, atol=1e-5)
    # Noise-gradient biases: compare on the scale of all gradients.
    overall = max(float(g.abs().max()) for g in grads_ref)
    noise = biases_before_norm(G)
    for (name, _), g, g_ref in zip(G.named_parameters(), grads, grads_ref, strict=True):
        scale = 1e-2 * overall if name in noise else float(g_ref.abs().max())
        assert float((g - g_ref).abs().max()) <= 1e-4 * scale, name


def run_with_a_users_hooks(network, input):
    """Forward and backward of `network` with a user's hooks on a 512-channel residual
    convolution: a forward pre-hook, a forward hook that flips the output, a backward hook
    and a global module hook. Returns (the hooks that ran, the output, GEMM kernel calls)."""
    conv = network.model[16].block[1]
    assert conv.weight.shape == (512, 512, 3, 3)
    seen = []
    handles = [
        conv.register_forward_pre_hook(lambda module, args: seen.append('pre')),
        conv.register_forward_hook(lambda module, args, output: output.flip(-1)),
        conv.register_full_backward_hook(lambda module, gin, gout: seen.append('backward')),
        torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, output: seen.append('global') if module is conv else None)]
    try:
        (output, _), calls = profiled(lambda: forward_backward(network, input))
    finally:
        for handle in handles:
            handle.remove()
    return seen, output, calls.get(GEMM_KERNEL, 0)


def test_a_prepared_network_runs_the_hooks_a_user_adds():
    """Forward pre-hooks, forward hooks that change the output, backward hooks and global
    module hooks run on the widest convolutions as on any module, and give the result they
    give on the network as built."""
    opt = train_opt(**WIDE)
    G, _, input, _ = models_and_data(opt, size=128)
    plain = copy.deepcopy(G)
    prepare_network(G, opt, CPU)
    results = []
    for network in (plain, G):
        seen, output, gemm = run_with_a_users_hooks(network, input)
        assert seen == ['pre', 'global', 'backward'], seen
        results.append((output, gemm))
    (out_plain, gemm_plain), (out, gemm) = results
    assert gemm_plain == 0 and gemm == 3
    np.testing.assert_allclose(out.numpy(), out_plain.numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the flipping hook changed the result: it really ran
        assert float((G(input) - out).abs().max()) > 1e-3


# The scatter path of inference (README "Speed"): F.fold, i.e. aten's col2im, runs only there.
SCATTER_KERNEL = 'aten::col2im'


def relative_difference(output, reference):
    """Largest absolute difference, in units of the reference's range."""
    return float((output - reference).abs().max() / (reference.max() - reference.min()))


def every_layer_scatters(monkeypatch, band_bytes=2 ** 22):
    """Let every transposed convolution take the scatter path, in bands of `band_bytes` of
    patches (the default: a small image in one band, one col2im per layer)."""
    monkeypatch.setattr(machinery.fast_conv, 'SCATTER_MAX_WEIGHTS_PER_PIXEL', float('inf'))
    monkeypatch.setattr(machinery.fast_conv, 'SCATTER_TRANSPOSED_MAX_THREADS', 1024)
    monkeypatch.setattr(machinery.fast_conv, 'SCATTER_BAND_BYTES', band_bytes)


@pytest.mark.parametrize('layer', [
    torch.nn.Conv2d(8, 1, 7),                                    # the output layer
    torch.nn.Conv2d(5, 3, 3, padding=1),                         # three targets
    torch.nn.Conv2d(6, 2, (3, 5), padding=(2, 1), bias=False),
    torch.nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1),  # upsampling
    torch.nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1),
    torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=0, output_padding=1),
    torch.nn.ConvTranspose2d(3, 2, (3, 5), stride=(2, 3), padding=(1, 2), bias=False)],
    ids=lambda layer: f'{type(layer).__name__}{tuple(layer.weight.shape)}')
@pytest.mark.parametrize('band_bytes', [1, 4096, 2 ** 22])
def test_scatter_path_gives_pytorchs_convolution(monkeypatch, layer, band_bytes):
    """Thin and transposed convolutions in inference, on odd sizes and a batch of two, in
    bands of one row, of a few rows and whole: PyTorch's result within 1e-5 of its range."""
    every_layer_scatters(monkeypatch, band_bytes)
    torch.manual_seed(0)
    prepared = machinery.fast_conv.use_gemm_convolutions(copy.deepcopy(layer))
    for shape in [(2, layer.in_channels, 13, 17), (1, layer.in_channels, 9, 8)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            reference = layer(x)
            output, calls = profiled(functools.partial(prepared, x))
        assert calls.get(SCATTER_KERNEL, 0) >= 1 and output.shape == reference.shape
        assert output.is_contiguous()
        assert relative_difference(output, reference) <= 1e-5


@pytest.mark.parametrize('norm_type,trans_conv,channels', [
    ('InstanceNorm2d', True, 1), ('InstanceNorm2d', False, 3), ('BatchNorm2d', True, 3),
    ('BatchNorm2d', False, 1)])
def test_generator_inference_on_the_scatter_path_matches_pytorch(monkeypatch, norm_type,
                                                                 trans_conv, channels):
    """The Test script's generator, placed as Test places it, on an odd-sized image: the same
    output as the network as built, to 1e-5 of its range; the output layer and every
    transposed convolution took the path."""
    every_layer_scatters(monkeypatch)
    opt = make_test_opt(norm_type=norm_type, trans_conv=trans_conv, input_ch=channels,
                        target_ch=channels)
    torch.manual_seed(0)
    G = Generator(opt)  # PyTorch's initialisation: outputs of a range well above rounding
    plain = copy.deepcopy(G).eval()
    prepared = prepare_network(G, opt, CPU).eval()
    x = torch.rand(1, channels, 37, 45) * 2 - 1
    with torch.inference_mode():
        reference = translation.generate(plain, x, opt.n_downsample)
        translation.generate(prepared, x, opt.n_downsample)  # (a network's first image checks
        # its in-place pass once, README "Speed": the next image is the one counted)
        output, calls = profiled(lambda: translation.generate(prepared, x, opt.n_downsample))
    assert calls.get(SCATTER_KERNEL, 0) == 1 + (opt.n_downsample if trans_conv else 0)
    assert relative_difference(output, reference) <= 1e-5


@pytest.mark.parametrize('threads', [1, 3])
def test_at_1024_the_output_layer_and_the_largest_upsampling_scatter(threads):
    """The default network at 1024x1024 (built without memory, on the 'meta' device): the
    scatter path is taken where it was measured faster than oneDNN (README "Speed"): by the
    output layer, and on up to two threads by the last transposed convolution (128 -> 64);
    not by the three transposed convolutions before it, nor by the first layer."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_which_layers_scatter_at_1024(threads)
    finally:
        torch.set_num_threads(threads_before)


def check_which_layers_scatter_at_1024(threads):
    opt = make_test_opt(n_gf=64, n_downsample=4, n_residual=1)
    with torch.device('meta'):
        G = prepare_network(Generator(opt), opt, torch.device('meta'))
    ups = [layer for layer in G.model if isinstance(layer, torch.nn.ConvTranspose2d)]
    first, output_layer = G.model[1], G.model[-1]

    def pays(layer, side):
        return layer.scatter_pays(torch.empty(1, layer.in_channels, side, side, device='meta'))

    with torch.inference_mode():
        assert [pays(up, side) for up, side in zip(ups, (64, 128, 256, 512), strict=True)] \
            == [False, False, False, threads <= 2]
        assert pays(output_layer, 1030) and not pays(first, 1030)


# The Winograd path of inference (README "Speed"): oneDNN's matrix product, 16 per image and
# layer, runs only there.
WINOGRAD_KERNEL = 'mkldnn::_linear_pointwise'
needs_onednn_matmul = pytest.mark.skipif(machinery.fast_conv.onednn_matmul() is None,
                                         reason="this torch lacks oneDNN's matrix product")


def every_3x3_layer_takes_winograd(monkeypatch):
    monkeypatch.setattr(machinery.fast_conv, 'WINOGRAD_MIN_WEIGHTS', 1)
    monkeypatch.setattr(machinery.fast_conv, 'WINOGRAD_MIN_PIXELS', 1)


@needs_onednn_matmul
@pytest.mark.parametrize('layer', [
    torch.nn.Conv2d(16, 12, 3),                          # after a reflection or replication pad
    torch.nn.Conv2d(8, 8, 3, padding=1),                 # --padding_type zero
    torch.nn.Conv2d(6, 5, 3, padding=(0, 1), bias=False)],
    ids=lambda layer: f'{tuple(layer.weight.shape)}-{layer.padding}')
@pytest.mark.parametrize('band_bytes', [1, 2 ** 24])
def test_winograd_path_gives_pytorchs_convolution(monkeypatch, layer, band_bytes):
    """3x3 convolutions in inference, on odd and even sizes and a batch of two, in bands of
    one row of 2x2 blocks and whole: PyTorch's result within 1e-5 of its range,
    contiguous, with 16 matrix products per image and band."""
    every_3x3_layer_takes_winograd(monkeypatch)
    monkeypatch.setattr(machinery.fast_conv, 'WINOGRAD_BAND_BYTES', band_bytes)
    torch.manual_seed(0)
    prepared = machinery.fast_conv.use_gemm_convolutions(copy.deepcopy(layer))
    for shape in [(2, layer.in_channels, 13, 17), (1, layer.in_channels, 10, 8),
                  (1, layer.in_channels, 3, 4)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            reference = layer(x)
            output, calls = profiled(functools.partial(prepared, x))
        bands = 1 if band_bytes > 1 else -(-reference.shape[2] // 2)  # rows of blocks
        assert calls.get(WINOGRAD_KERNEL, 0) == 16 * shape[0] * bands
        assert output.shape == reference.shape and output.is_contiguous()
        assert relative_difference(output, reference) <= 1e-5


@needs_onednn_matmul
@pytest.mark.parametrize('norm_type,padding_type', [
    ('InstanceNorm2d', 'reflection'), ('BatchNorm2d', 'zero'), ('InstanceNorm2d', 'replication')])
def test_generator_inference_on_the_winograd_path_matches_pytorch(monkeypatch, norm_type,
                                                                  padding_type, tmp_path):
    """The Test script's generator on an odd-sized image, whole and in tiles: the output of
    the network as built, to 1e-5 of its range; both convolutions of every residual block
    (and no other layer) took the path."""
    every_3x3_layer_takes_winograd(monkeypatch)
    opt = make_test_opt(norm_type=norm_type, padding_type=padding_type, n_residual=2)
    torch.manual_seed(0)
    G = Generator(opt)
    plain = copy.deepcopy(G).eval()
    prepared = prepare_network(G, opt, CPU).eval()
    x = torch.rand(1, 1, 37, 45) * 2 - 1
    with torch.inference_mode():
        reference = translation.generate(plain, x, opt.n_downsample)
        translation.generate(prepared, x, opt.n_downsample)  # (a network's first image checks
        # its in-place pass once, README "Speed": the next image is the one counted)
        output, calls = profiled(lambda: translation.generate(prepared, x, opt.n_downsample))
        tiled = translation.generate(prepared, x, opt.n_downsample, tile_size=16,
                                        tmp_dir=str(tmp_path))
    assert calls.get(WINOGRAD_KERNEL, 0) == 16 * 2 * opt.n_residual
    assert relative_difference(output, reference) <= 1e-5
    assert relative_difference(tiled, reference) <= 1e-5


@pytest.mark.parametrize('every_layer_takes_it, kernel, calls_without_autograd', [
    (every_layer_scatters, SCATTER_KERNEL, lambda opt: 1 + opt.n_downsample),
    pytest.param(every_3x3_layer_takes_winograd, WINOGRAD_KERNEL,
                 lambda opt: 16 * 2 * opt.n_residual, marks=needs_onednn_matmul)],
    ids=['scatter', 'winograd'])
def test_the_inference_paths_are_for_inference_only(monkeypatch, every_layer_takes_it, kernel,
                                                    calls_without_autograd):
    """With autograd (training, and any forward a user differentiates) the layers keep
    PyTorch's kernels and their backward; without it they take the scatter path (the
    transposed convolutions) and the Winograd path (the residual blocks')."""
    every_layer_takes_it(monkeypatch)
    opt = train_opt()
    G, _, input, _ = models_and_data(opt)
    prepare_network(G, opt, CPU)
    _, calls = profiled(lambda: forward_backward(G, input))
    assert kernel not in calls
    with torch.no_grad():
        _, calls = profiled(lambda: G(input))
    assert calls.get(kernel, 0) == calls_without_autograd(opt)


@needs_onednn_matmul
def test_at_1024_the_residual_blocks_take_winograd_and_no_other_layer():
    """The default network at 1024x1024 (on the 'meta' device): the 3x3 convolutions of the
    residual blocks (1024 channels at 64x64) take the Winograd path, where it was measured
    faster than oneDNN (README "Speed"); so would the 512-channel ones of --n_gf 32, not
    those at 16x16 (a 256x256 image) nor any other layer."""
    opt = make_test_opt(n_gf=64, n_downsample=4, n_residual=1)
    with torch.device('meta'):
        G = prepare_network(Generator(opt), opt, torch.device('meta'))

    def pays(layer, side):
        return layer.winograd_pays(torch.empty(1, layer.in_channels, side, side, device='meta'))

    convs = [m for m in G.modules() if type(m) is machinery.fast_conv.GemmConv2d]
    block = [m for m in convs if m.in_channels == m.out_channels == 1024]
    with torch.inference_mode():
        assert len(block) == 2 and all(pays(m, 66) for m in block)
        assert not any(pays(m, 18) for m in block)
        assert not any(pays(m, side) for m in convs if m not in block for side in (66, 1030))
        assert pays(machinery.fast_conv.use_gemm_convolutions(
            torch.nn.Conv2d(512, 512, 3).to('meta')), 66)


def test_bare_unwraps_compiled_and_parallel_wrappers():
    G = Generator(train_opt())
    wrapped = torch.compile(torch.nn.DataParallel(G))
    assert bare(wrapped) is G
    assert all(not key.startswith(('module.', '_orig_mod.')) for key in bare(wrapped).state_dict())


# ----------------------------------------------------------------------------------------
# 4. torch.compile (--compile)
# ----------------------------------------------------------------------------------------

def test_compiled_generator_matches_eager():
    """--compile as the drivers apply it (prepare_network): same output and same gradients
    as eager mode."""
    opt = train_opt(n_gf=4, n_downsample=1, n_residual=1, compile=True)
    G, _, input, _ = models_and_data(opt, size=16)
    eager = copy.deepcopy(G)
    expected = eager(input)
    expected.square().mean().backward()
    compiled = prepare_network(G, opt, CPU)
    out = compiled(input)
    out.square().mean().backward()
    assert compiled is not G  # it was compiled, not just moved
    np.testing.assert_allclose(out.detach().numpy(), expected.detach().numpy(), rtol=1e-4,
                               atol=1e-5)
    overall = max(float(p.grad.abs().max()) for p in eager.parameters())
    for (name, p), p_ref in zip(G.named_parameters(), eager.parameters(), strict=True):
        assert float((p.grad - p_ref.grad).abs().max()) <= 1e-4 * overall, name


def test_compiled_training_and_test_write_plain_checkpoints(tmp_path):
    """--compile through both drivers (default replication padding, whose backward is kept
    out of the compiled graph): checkpoints have the published keys, outputs are written."""
    input_dir, target_dir = make_pairs(tmp_path / 'data', 'npy', n=4, size=32)
    proc = run_train(TINY + ['--compile', '--data_format_input', 'npy',
                             '--data_format_target', 'npy', '--input_dir_train', input_dir,
                             '--target_dir_train', target_dir, '--n_epochs', '1',
                             '--seed', '1'], cwd=tmp_path)
    assert_ok(proc)
    model_dir = tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model'
    state = torch.load(model_dir / '4_G.pt', weights_only=True)
    assert set(state) == set(Generator(train_opt()).state_dict())
    proc = run_test(['--gpu_ids', '-1', '--compile', '--iteration', '4',
                     '--input_dir_test', input_dir], cwd=tmp_path)
    assert_ok(proc)
    out_dir = tmp_path / 'checkpoints' / 'pix2pixCC' / 'Image' / 'Test' / '4'
    assert sorted(os.listdir(out_dir)) == [f'img_{i:03d}_AI.npy' for i in range(4)] + \
        [RECORD]
