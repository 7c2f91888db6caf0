"""The network is the single source of truth (README "Full-resolution images", "Sharing a
model and running it elsewhere", "CPU and GPU"): whatever a researcher changes in
pix2pixCC_Networks.py, every inference path computes what the edited network's own `forward`
computes (eval mode, autograd on, float32) to 1e-5 of the output's range, or refuses in one
line on stderr (exit status 2, no traceback) saying which path does not take the edit. The
whole-image path always works.

The edits are made as a researcher makes them, by changing a module or a `forward` of
pix2pixCC_Networks (ResidualBlock, Generator, Mish) or by passing network options; every
`Generator(opt)` built while a test runs (the Test script's, training's, the export's) is
the edited one. Each test writes a checkpoint of the edited generator (PyTorch's
initialisation, random biases, BatchNorm statistics of a few random batches) and compares
the products of one path with that generator's forward on the input padded as the Test
script pads it (edge values to a multiple of 2**n_downsample, cropped back). The data are
npy files scaled at the limits -1 and 1, so a product `<name>_AI.npy` is the generator's
output itself (README "Your own data", Scaling).

The paths: the whole image (`--iteration N`), `--tile_size`, the tiles the Test script takes
by itself when a whole image would not fit (README "Full-resolution images", Automatic),
`--val_during_train`, `--export model` then `--model FILE`, `--export onnx` run with ONNX
Runtime, and `--data_type 16` (bfloat16 autocast on the CPU).
"""
import os
from typing import Callable, NamedTuple

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pix2pixCC_Networks as networks
import pix2pixCC_Test
import pix2pixCC_Train
from conftest import field, load, make_test_opt, model_dir, write_user_file
from pix2pixCC_Options import run_main

# A tiny network on the CPU; npy data whose scaling is the identity (limits -1 and 1, no
# log, no clip), so that the products are the generator's output.
NETWORK = ['--gpu_ids', '-1', '--n_gf', '8', '--n_df', '8', '--n_downsample', '2',
           '--n_residual', '2']
IDENTITY_DATA = ['--data_format_input', 'npy', '--data_format_target', 'npy',
                 '--saturation_lower_limit_input', '-1', '--saturation_upper_limit_input', '1',
                 '--saturation_lower_limit_target', '-1', '--saturation_upper_limit_target', '1',
                 '--n_workers', '0']
RUN, STEP = 'edits', 1
HEIGHT, WIDTH = 45, 70  # a multiple of neither the tile nor 2**n_downsample (4)
N_INPUTS = 2
TILE = 16
TRAIN_SIZE, N_TRAIN = 32, 2

TOLERANCE = 1e-5       # of the reference's range: README "Full-resolution images"
ONNX_TOLERANCE = 1e-4  # README "Sharing a model and running it elsewhere", ONNX
# README "CPU and GPU" and BENCHMARKS.md give what bfloat16 changed on the quick-start model
# (single pixels by up to 8 G, 0.3 % of the products' range) but no tolerance: 5e-2 of the
# range here. These edited networks in bfloat16 were 0.7e-2 to 1.8e-2 of the range from
# float32; a tiled path that computed the unedited network instead was 0.11 to 0.37 off.
BFLOAT16_TOLERANCE = 5e-2
# The memory a whole-image pass may use, in bytes (README "Full-resolution images",
# Automatic), and for the automatic tiles here a value below what a whole-image pass of these
# tiny networks over a 48x72 (padded) input needs (0.58 to 0.83 MB by the Test script's
# estimate), above what its tiles need (0.1 to 0.19 MB for tiles of 8 and 16 px).
MEMORY_LIMIT_VARIABLE, MEMORY_LIMIT = 'PIX2PIXCC_MEMORY_LIMIT', '4e5'


# ----------------------------------------------------------------------------------------
# The edits
# ----------------------------------------------------------------------------------------

class Edit(NamedTuple):
    """An edit of pix2pixCC_Networks: `apply(monkeypatch)` makes it, `options` are the
    network options it needs. tileable: the tiled paths must compute it exactly (a refusal
    is a failure); otherwise they may refuse in one line, and the automatic choice runs the
    image whole, with a notice."""
    apply: Callable
    options: tuple = ()
    tileable: bool = True


def block_layers(monkeypatch, layers):
    """ResidualBlock.__init__ edited: its `block` is `layers(n_channels, pad, norm, act)`."""
    def __init__(self, n_channels, pad, norm, act):
        nn.Module.__init__(self)
        self.block = nn.Sequential(*layers(n_channels, pad, norm, act))

    monkeypatch.setattr(networks.ResidualBlock, '__init__', __init__)


def after_generator_init(monkeypatch, change):
    """Generator.__init__ edited: the published layers, then `change(self, opt)`."""
    published = networks.Generator.__init__

    def __init__(self, opt):
        published(self, opt)
        change(self, opt)

    monkeypatch.setattr(networks.Generator, '__init__', __init__)


def replace_layers(module, kind, make):
    """Every layer of type `kind` in the Sequentials of `module` replaced by make(layer)."""
    for sequence in list(module.modules()):
        if isinstance(sequence, nn.Sequential):
            for index, layer in enumerate(sequence):
                if isinstance(layer, kind):
                    sequence[index] = make(layer)


def unedited(monkeypatch):
    pass


def dilated_block(monkeypatch):
    block_layers(monkeypatch, lambda n, pad, norm, act: [
        pad(2), nn.Conv2d(n, n, 3, dilation=2), norm(n), act,
        pad(2), nn.Conv2d(n, n, 3, dilation=2), norm(n)])


def scaled_residual(monkeypatch):
    monkeypatch.setattr(networks.ResidualBlock, 'forward',
                        lambda self, x: x + 0.1 * self.block(x))


def global_skip(monkeypatch):
    monkeypatch.setattr(networks.Generator, 'forward', lambda self, x: self.model(x) + x)


def tanh_output(monkeypatch):
    monkeypatch.setattr(networks.Generator, 'forward',
                        lambda self, x: 2 * torch.tanh(self.model(x)))


def mish_after_block(monkeypatch):
    monkeypatch.setattr(networks.ResidualBlock, 'forward',
                        lambda self, x: F.mish(x + self.block(x)))


def pre_activation_block(monkeypatch):
    """x + block(act(x)), `act` the block's own activation (the Generator's Mish), kept by
    ResidualBlock.__init__."""
    published = networks.ResidualBlock.__init__

    def __init__(self, n_channels, pad, norm, act):
        published(self, n_channels, pad, norm, act)
        self.act = act

    monkeypatch.setattr(networks.ResidualBlock, '__init__', __init__)
    monkeypatch.setattr(networks.ResidualBlock, 'forward',
                        lambda self, x: x + self.block(self.act(x)))


def pre_activation_made_in_forward(monkeypatch):
    """x + block(Mish()(x)): the same with a Mish module made in `forward`, as researchers
    also write it (a module that is no submodule of the network)."""
    monkeypatch.setattr(networks.ResidualBlock, 'forward',
                        lambda self, x: x + self.block(networks.Mish()(x)))


def dropout_in_block(monkeypatch):
    block_layers(monkeypatch, lambda n, pad, norm, act: [
        pad(1), nn.Conv2d(n, n, 3), norm(n), act, nn.Dropout(0.5),
        pad(1), nn.Conv2d(n, n, 3), norm(n)])


def leaky_relu(monkeypatch):
    after_generator_init(monkeypatch, lambda G, opt: replace_layers(
        G, networks.Mish, lambda _: nn.LeakyReLU(0.2)))


def nearest_upsampling(monkeypatch):
    after_generator_init(monkeypatch, lambda G, opt: replace_layers(
        G, nn.UpsamplingBilinear2d, lambda _: nn.Upsample(scale_factor=2, mode='nearest')))


def without_model(monkeypatch):
    """The published layers split into encoder, residual blocks and decoder: no `.model`."""
    def split(G, opt):
        layers = list(G.model)
        del G.model
        blocks = [i for i, layer in enumerate(layers)
                  if isinstance(layer, networks.ResidualBlock)]
        G.encoder = nn.Sequential(*layers[:blocks[0]])
        G.blocks = nn.Sequential(*layers[blocks[0]:blocks[-1] + 1])
        G.decoder = nn.Sequential(*layers[blocks[-1] + 1:])

    after_generator_init(monkeypatch, split)
    monkeypatch.setattr(networks.Generator, 'forward',
                        lambda self, x: self.decoder(self.blocks(self.encoder(x))))


def kernel_5_block(monkeypatch):
    block_layers(monkeypatch, lambda n, pad, norm, act: [
        pad(2), nn.Conv2d(n, n, 5), norm(n), act, pad(2), nn.Conv2d(n, n, 5), norm(n)])


def grouped_block(monkeypatch):
    block_layers(monkeypatch, lambda n, pad, norm, act: [
        pad(1), nn.Conv2d(n, n, 3, groups=2), norm(n), act,
        pad(1), nn.Conv2d(n, n, 3, groups=2), norm(n)])


def without_biases(monkeypatch):
    """Every convolution with bias=False."""
    def drop_biases(G, opt):
        for layer in G.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.bias = None  # (what bias=False registers)

    after_generator_init(monkeypatch, drop_biases)


def reflect_padding_mode(monkeypatch):
    """The residual blocks' convolutions pad themselves (padding_mode='reflect'), without a
    padding layer."""
    block_layers(monkeypatch, lambda n, pad, norm, act: [
        nn.Conv2d(n, n, 3, padding=1, padding_mode='reflect'), norm(n), act,
        nn.Conv2d(n, n, 3, padding=1, padding_mode='reflect'), norm(n)])


def pooled_skip(monkeypatch):
    """A low-pass skip from the input: a 3x3 average pooling, a layer the tiled path does
    not split (README "Full-resolution images", What can be tiled)."""
    monkeypatch.setattr(networks.Generator, 'forward', lambda self, x: self.model(x) + F.avg_pool2d(
        x, 3, stride=1, padding=1))


def data_dependent_branch(monkeypatch):
    """A forward that branches on the values of the image: torch.fx cannot trace it."""
    monkeypatch.setattr(networks.Generator, 'forward', lambda self, x: self.model(
        x if float(x.mean()) > -10 else -x))


# Every edit here but the last two can be tiled exactly: each is built of convolutions (any
# kernel, dilation, groups or padding), pointwise operations, per-channel statistics and sums
# of maps of one resolution, which tiles with the right margins compute as the whole image
# does (a Mish made in `forward` is pointwise too). The last two are refused by the tiled
# path: a pooling layer it does not split, a forward torch.fx cannot trace.
EDITS = [
    pytest.param(Edit(dilated_block, tileable=True), id='dilated_block'),
    pytest.param(Edit(scaled_residual, tileable=True), id='scaled_residual'),
    pytest.param(Edit(global_skip, tileable=True), id='global_skip'),
    pytest.param(Edit(tanh_output, tileable=True), id='tanh_output'),
    pytest.param(Edit(mish_after_block, tileable=True), id='mish_after_block'),
    pytest.param(Edit(pre_activation_block, tileable=True), id='pre_activation_block'),
    pytest.param(Edit(pre_activation_made_in_forward, tileable=True),
                 id='pre_activation_made_in_forward'),
    pytest.param(Edit(dropout_in_block, tileable=True), id='dropout_in_block'),
    pytest.param(Edit(leaky_relu, tileable=True), id='leaky_relu'),
    pytest.param(Edit(nearest_upsampling, ('--trans_conv', 'False'), tileable=True),
                 id='nearest_upsampling'),
    pytest.param(Edit(without_model, tileable=True), id='without_model'),
    pytest.param(Edit(kernel_5_block, tileable=True), id='kernel_5_block'),
    pytest.param(Edit(grouped_block, tileable=True), id='grouped_block'),
    pytest.param(Edit(without_biases, tileable=True), id='without_biases'),
    pytest.param(Edit(reflect_padding_mode, tileable=True), id='reflect_padding_mode'),
    pytest.param(Edit(unedited, ('--norm_type', 'BatchNorm2d'), tileable=True),
                 id='batchnorm_statistics'),
    pytest.param(Edit(unedited, ('--trans_conv', 'False'), tileable=True), id='bilinear'),
    pytest.param(Edit(unedited, ('--n_residual', '0'), tileable=True), id='no_residual_blocks'),
    pytest.param(Edit(unedited, ('--input_ch', '3', '--target_ch', '2'), tileable=True),
                 id='channels_3_to_2'),
    pytest.param(Edit(pooled_skip, tileable=False), id='pooled_skip'),
    pytest.param(Edit(data_dependent_branch, tileable=False), id='data_dependent_branch'),
]


# ----------------------------------------------------------------------------------------
# Data, the edited generator and its reference output
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """folders(channels, kind): a folder of npy files with `channels` channels, written once
    per module: 'test' (N_INPUTS inputs of HEIGHT x WIDTH, values in [-1, 1]), 'train_in'
    and 'train_tg' (N_TRAIN pairs of TRAIN_SIZE x TRAIN_SIZE)."""
    root, made = tmp_path_factory.mktemp('edit_data'), {}

    def folder(channels, kind):
        if (channels, kind) not in made:
            path = root / f'{kind}_{channels}'
            os.makedirs(path)
            count, size = (N_INPUTS, WIDTH) if kind == 'test' else (N_TRAIN, TRAIN_SIZE)
            for i in range(count):
                seed = 10 * i + ('test', 'train_in', 'train_tg').index(kind)
                data = field(channels, -1.0, 1.0, seed=seed, size=size)
                data = data[:, :HEIGHT] if kind == 'test' else data
                write_user_file(path / f'img_{i}.npy', data[0] if channels == 1 else data,
                                'npy')
            made[channels, kind] = str(path)
        return made[channels, kind]

    return folder


def network_argv(edit):
    return NETWORK + IDENTITY_DATA + list(edit.options)


def edited_opt(edit):
    """The options namespace of the edit's network (the Test script's parser)."""
    return make_test_opt(*network_argv(edit))


def edited_generator(opt, seed=0):
    """Generator(opt) as edited, with PyTorch's initialisation, random biases and, with
    BatchNorm, the running statistics of a few random training-mode batches (not 0 and 1)."""
    torch.manual_seed(seed)
    G = networks.Generator(opt)
    with torch.no_grad():
        for layer in G.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.bias is not None:
                layer.bias.normal_(0, 0.1)
            if isinstance(layer, nn.BatchNorm2d):
                layer.momentum = None  # (the plain mean of the batches)
        if any(isinstance(layer, nn.BatchNorm2d) for layer in G.modules()):
            for _ in range(3):
                G.train()(torch.randn(2, opt.input_ch, 32, 32) * 0.7 + 0.2)
    return G.eval()


def save_checkpoint(root, opt):
    """The edited generator as step STEP of the run RUN in `root`; returns it."""
    G = edited_generator(opt)
    os.makedirs(model_dir(root, RUN))
    torch.save(G.state_dict(), os.path.join(model_dir(root, RUN), f'{STEP}_G.pt'))
    return G


def inputs_of(folder):
    """{name: input (C, H, W) float32} of the npy files in `folder`, by name."""
    out = {}
    for file_name in sorted(os.listdir(folder)):
        data = np.load(os.path.join(folder, file_name)).astype(np.float32)
        out[file_name[:-len('.npy')]] = data[None] if data.ndim == 2 else data
    return out


def forward(G, x, n_downsample, autograd=True):
    """The edited network's own forward (eval mode, float32, autograd on unless told) on a
    (C, H, W) input padded as the Test script pads it (edge values, bottom and right, to a
    multiple of 2**n_downsample), cropped back: (target_ch, H, W)."""
    multiple = 2 ** n_downsample
    height, width = x.shape[-2:]
    padded = F.pad(torch.from_numpy(x)[None], (0, -width % multiple, 0, -height % multiple),
                   mode='replicate')
    with torch.set_grad_enabled(autograd):
        output = G.eval()(padded)
    return output[0, :, :height, :width].detach().float().numpy()


def references(G, opt, folder):
    """{name: the edited forward of that input}."""
    return {name: forward(G, x, opt.n_downsample) for name, x in inputs_of(folder).items()}


# ----------------------------------------------------------------------------------------
# Running the drivers and judging what they did
# ----------------------------------------------------------------------------------------

def run_driver(main, argv, capsys, what):
    """(exit status, stdout, stderr) of a driver's main run as its command line runs it (a
    UserError becomes one line on stderr and exit status 2). A crash fails the test."""
    capsys.readouterr()
    try:
        status = run_main(main, [str(a) for a in argv])
    except SystemExit as stop:  # (argparse's refusals)
        status = stop.code
    except Exception as error:
        raise AssertionError(f"{what} crashed instead of computing the edited network or "
                             f"refusing in one line: {type(error).__name__}: {error}") from error
    out, err = capsys.readouterr()
    return status, out, err


def completed(result, what, may_refuse=False, refusal_names=()):
    """Whether the run `result` (of run_driver) went through: True for exit status 0, False
    for a refusal where `may_refuse` (one line on stderr naming one of `refusal_names`,
    exit status 2, no traceback); anything else fails the test."""
    status, out, err = result
    assert 'Traceback' not in out + err, f"{what}: a traceback:\n{out[-2000:]}\n{err[-3000:]}"
    if status == 2 and may_refuse:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"{what}: a refusal takes one line on stderr, got:\n{err}"
        assert any(name in lines[0].lower() for name in refusal_names), \
            f"{what}: the refusal does not say which path ({' or '.join(refusal_names)}): " \
            f"{lines[0]}"
        return False
    last = err.strip().splitlines()[-1] if err.strip() else 'nothing on stderr'
    assert status == 0, f"{what}: exit status {status}, a refusal not allowed here: {last}\n" \
                        f"stdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
    return True


def relative_difference(product, reference):
    """The largest |product - reference| over the reference's range (product's shape)."""
    product = np.asarray(product, np.float64)
    reference = np.asarray(reference, np.float64).reshape(product.shape)
    return np.abs(product - reference).max() / np.ptp(reference)


def assert_matches(product, reference, tolerance, what):
    """`product` equals `reference` to `tolerance` of the reference's range."""
    assert np.ptp(reference) > 0, f"{what}: the reference is constant, so it tests nothing"
    difference = relative_difference(product, reference)
    assert difference <= tolerance, \
        f"{what}: differs from the edited network's forward by {difference:.2e} of its " \
        f"range (at most {tolerance:g})"


def assert_products(folder, expected, what, tolerance=TOLERANCE):
    """Every `<name>_AI.npy` in `folder` equals expected[name]."""
    for name, reference in expected.items():
        path = os.path.join(folder, f'{name}_AI.npy')
        assert os.path.isfile(path), f"{what}: no product {path}"
        assert_matches(np.load(path), reference, tolerance, f"{what}, {name}")


@pytest.fixture
def edited_run(request, tmp_path, monkeypatch, folders):
    """The edit of the test's parameter applied, a run folder in tmp_path (the working
    directory) with the edited generator at step STEP, and its reference products; returns
    (edit, opt, G, Test arguments without --output_dir, input folder, references)."""
    edit = request.param
    monkeypatch.chdir(tmp_path)
    edit.apply(monkeypatch)
    opt = edited_opt(edit)
    G = save_checkpoint(tmp_path, opt)
    inputs = folders(opt.input_ch, 'test')
    argv = network_argv(edit) + ['--dataset_name', RUN, '--iteration', STEP,
                                 '--input_dir_test', inputs]
    return edit, opt, G, argv, inputs, references(G, opt, inputs)


def run_test(argv, capsys, what):
    return run_driver(pix2pixCC_Test.main, argv, capsys, f"{what}: the Test script")


# ----------------------------------------------------------------------------------------
# a. The whole image: always computed, never refused
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('edited_run', EDITS, indirect=True)
def test_whole_image(edited_run, capsys):
    _, _, _, argv, _, expected = edited_run
    what = 'whole image'
    completed(run_test(argv + ['--output_dir', 'whole'], capsys, what), what)
    assert_products('whole', expected, what)


@pytest.mark.parametrize('edited_run', [param for param in EDITS
                                        if param.id.startswith('pre_activation')], indirect=True)
def test_pre_activation_block_is_computed_as_with_autograd(edited_run, capsys):
    """x + block(mish(x)): the Test script (in inference mode) gives what the forward gives
    with autograd on. A Mish that wrote into its input without autograd (to save memory in
    inference) would overwrite the block's input here, which the residual sum still
    reads."""
    _, opt, G, argv, inputs, _ = edited_run
    what = 'whole image, pre-activation block'
    completed(run_test(argv + ['--output_dir', 'whole'], capsys, what), what)
    for name, x in inputs_of(inputs).items():
        product = np.load(os.path.join('whole', f'{name}_AI.npy'))
        with_autograd = forward(G, x, opt.n_downsample, autograd=True)
        without = forward(G, x, opt.n_downsample, autograd=False)
        note = ' (it is the forward without autograd: Mish overwrote the block input)' \
            if relative_difference(product, without) <= TOLERANCE < \
            relative_difference(with_autograd, without) else ''
        assert_matches(product, with_autograd, TOLERANCE, f"{what}, {name}{note}")


# ----------------------------------------------------------------------------------------
# b, c. Tiles: --tile_size, and the automatic choice when a whole image would not fit
# ----------------------------------------------------------------------------------------

TILE_NAMES = ('tile',)  # a refusal of a tiled path names tiles


@pytest.mark.parametrize('edited_run', EDITS, indirect=True)
def test_tile_size(edited_run, capsys):
    edit, _, _, argv, _, expected = edited_run
    what = f'--tile_size {TILE}'
    os.makedirs('tmp')
    result = run_test(argv + ['--output_dir', 'tiled', '--tile_size', TILE, '--tmp_dir', 'tmp'],
                      capsys, what)
    if completed(result, what, may_refuse=not edit.tileable, refusal_names=TILE_NAMES):
        assert_products('tiled', expected, what)
    assert os.listdir('tmp') == [], f"{what}: temporary files left: {os.listdir('tmp')}"


@pytest.mark.parametrize('edited_run', EDITS, indirect=True)
def test_automatic_tiles(edited_run, capsys, monkeypatch):
    """PIX2PIXCC_MEMORY_LIMIT below a whole-image pass: tiles, with a notice, for an edit the
    tiles compute; the whole image, with a notice, for one they cannot."""
    edit, _, _, argv, _, expected = edited_run
    what = f'automatic tiles ({MEMORY_LIMIT_VARIABLE}={MEMORY_LIMIT})'
    monkeypatch.setenv(MEMORY_LIMIT_VARIABLE, MEMORY_LIMIT)
    result = run_test(argv + ['--output_dir', 'auto'], capsys, what)
    completed(result, what)
    assert_products('auto', expected, what)
    notices = [line for line in result[1].splitlines() if line.startswith('notice:')]
    if edit.tileable:
        assert any('in tiles of' in line for line in notices), \
            f"{what}: no notice that the inputs were translated in tiles: {notices}"
    else:
        assert notices, f"{what}: the image ran whole without a notice"


# ----------------------------------------------------------------------------------------
# d. Validation during training
# ----------------------------------------------------------------------------------------

# Every edit: a training run of two steps on two 32x32 pairs takes well under a second.
@pytest.mark.parametrize('edit', EDITS)
def test_validation_during_training(edit, tmp_path, monkeypatch, folders, capsys):
    """The products of the validation at the save of a short training run are the edited
    forward of the generator that save wrote."""
    monkeypatch.chdir(tmp_path)
    edit.apply(monkeypatch)
    opt = edited_opt(edit)
    steps = N_TRAIN  # one epoch of batch 1; one save, with its validation, at its end
    inputs = folders(opt.input_ch, 'test')
    what = '--val_during_train'
    result = run_driver(pix2pixCC_Train.main, network_argv(edit) + [
        '--dataset_name', RUN, '--n_epochs', '1', '--save_freq', steps, '--seed', '1',
        '--input_dir_train', folders(opt.input_ch, 'train_in'),
        '--target_dir_train', folders(opt.target_ch, 'train_tg'),
        '--val_during_train', '--input_dir_test', inputs], capsys,
        f"{what}: the training script")
    completed(result, what)
    G = networks.Generator(opt)
    G.load_state_dict(load(os.path.join(model_dir(tmp_path, RUN), f'{steps}_G.pt')))
    assert_products(os.path.join('checkpoints', RUN, 'Image', 'Test', str(steps)),
                    references(G, opt, inputs), what)


# ----------------------------------------------------------------------------------------
# e, f. A model file, an ONNX model
# ----------------------------------------------------------------------------------------

def export_path(suffix):
    return os.path.join('checkpoints', RUN, 'Export', f'{RUN}_{STEP}{suffix}')


@pytest.mark.parametrize('edited_run', EDITS, indirect=True)
def test_model_file(edited_run, capsys):
    _, _, _, argv, inputs, expected = edited_run
    what = '--export model'
    completed(run_test(argv + ['--export', 'model'], capsys, what), what)
    what = '--model FILE'
    completed(run_test(['--model', export_path('.pt'), '--input_dir_test', inputs,
                        '--output_dir', 'from_model', '--gpu_ids', '-1', '--n_workers', '0'],
                       capsys, what), what)
    assert_products('from_model', expected, what)


@pytest.mark.parametrize('edited_run', EDITS, indirect=True)
def test_onnx(edited_run, capsys):
    """The export checks ONNX Runtime against PyTorch itself; here its file runs on one
    input (padded as the Test script pads it) and must give the edited forward to
    ONNX_TOLERANCE of its range, or the export refuses in one line."""
    _, opt, G, argv, inputs, expected = edited_run
    what = '--export onnx'
    if not completed(run_test(argv + ['--export', 'onnx'], capsys, what), what,
                     may_refuse=True, refusal_names=('onnx',)):
        assert not os.path.exists(export_path('.onnx')), f"{what}: refused, but wrote a file"
        return
    session = onnxruntime.InferenceSession(export_path('.onnx'),
                                           providers=['CPUExecutionProvider'])
    name, x = next(iter(inputs_of(inputs).items()))
    multiple = 2 ** opt.n_downsample
    padded = np.pad(x, ((0, 0), (0, -HEIGHT % multiple), (0, -WIDTH % multiple)), mode='edge')
    output = session.run(None, {session.get_inputs()[0].name: padded[None]})[0]
    assert_matches(output[0, :, :HEIGHT, :WIDTH], expected[name], ONNX_TOLERANCE,
                   f"{what}, ONNX Runtime on {name}")


# ----------------------------------------------------------------------------------------
# g. bfloat16 on the CPU
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('edited_run', EDITS, indirect=True)
def test_bfloat16(edited_run, capsys):
    _, _, _, argv, _, expected = edited_run
    what = '--data_type 16 (bfloat16 on the CPU)'
    completed(run_test(argv + ['--data_type', '16', '--output_dir', 'bf16'], capsys, what),
              what)
    assert_products('bf16', expected, what, tolerance=BFLOAT16_TOLERANCE)
