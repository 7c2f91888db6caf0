"""Per-channel scaling (README "Your own data", Scaling): each of --saturation_lower_limit_*,
--saturation_upper_limit_*, --logscale_* and --saturation_clip_* takes one value for every
channel or one value per channel; training data, validation, the Test inverse, the scaling
warnings and the panels all use each channel's own values.

The data have three channels whose ranges differ by 10**4 (0.1..10, 10..1000, 1000..100000),
as stacked EUV passbands do, with log and linear channels mixed.
"""
import json
import os
import shlex
import sys
import warnings

import numpy as np
import pytest
from matplotlib.colors import LogNorm

import pix2pixCC_Options
import pix2pixCC_Test
import pix2pixCC_Train
from conftest import (REPO, TINY, assert_ok, assert_usage_error, checked_lines,
                      constant_generator_checkpoint, drawn_panel, make_test_opt, read_user_file,
                      run_command, run_test, run_train, smooth_field, train_opt, write_pairs,
                      write_user_file)
from pix2pixCC_Pipeline import CustomDataset, PerChannelScaling, Scaling

# Not imported by its own name: pytest would try to collect a class named Test*.
TEST_OPTION = pix2pixCC_Options.TestOption

RANGES = ((0.1, 10.0), (10.0, 1000.0), (1000.0, 100000.0))
INPUT_LOG = (True, False, True)
TARGET_LOG = (False, True, True)


def per_channel_flags(side, logs, ranges=RANGES):
    """The command-line options of `side` with one value per channel."""
    return [f'--{side}_ch', str(len(ranges)),
            f'--saturation_lower_limit_{side}', *(str(lo) for lo, _ in ranges),
            f'--saturation_upper_limit_{side}', *(str(up) for _, up in ranges),
            f'--logscale_{side}', *(str(log) for log in logs)]


PER_CHANNEL = per_channel_flags('input', INPUT_LOG) + per_channel_flags('target', TARGET_LOG)


def channel_data(rng, logs, size=32, ranges=RANGES):
    """A C x H x W float32 array whose channel c is a smooth field within ranges[c]
    (log-uniform in log channels)."""
    channels = []
    for (lo, up), log in zip(ranges, logs, strict=True):
        if log:
            channels.append(10 ** smooth_field(rng, size, 1, np.log10(lo), np.log10(up)))
        else:
            channels.append(smooth_field(rng, size, 1, lo, up))
    return np.concatenate(channels).astype(np.float32)


def physical(value, lower, upper, log):
    """The physical value that a normalised `value` stands for, written out on its own (not
    through Scaling): lower -> -1, upper -> +1, linearly or in log10."""
    if log:
        lower, upper = np.log10(lower), np.log10(upper)
    x = lower + (value + 1) / 2 * (upper - lower)
    return 10 ** x if log else x


# ----------------------------------------------------------------------------------------
# Parsing: one value, one per channel, or a one-line error
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('option_class', [pix2pixCC_Options.TrainOption, TEST_OPTION])
def test_one_value_stays_a_scalar_and_several_a_list(option_class):
    opt = option_class().parse(['--input_ch', '3', '--saturation_lower_limit_input', '1',
                                '--saturation_upper_limit_input', '200', '--logscale_input',
                                'True', '--saturation_clip_target'])
    # As before these options took one value per channel: train_options.json files keep
    # their form.
    assert opt.saturation_lower_limit_input == 1.0 and \
        isinstance(opt.saturation_lower_limit_input, float)
    assert opt.logscale_input is True and opt.saturation_clip_target is True
    opt = option_class().parse(PER_CHANNEL + ['--saturation_clip_input', 'False', 'True',
                                              'False'])
    assert opt.saturation_lower_limit_input == [0.1, 10.0, 1000.0]
    assert opt.saturation_upper_limit_target == [10.0, 1000.0, 100000.0]
    assert opt.logscale_input == [True, False, True]
    assert opt.logscale_target == [False, True, True]
    assert opt.saturation_clip_input == [False, True, False]
    assert opt.saturation_clip_target is False


def test_a_bare_boolean_flag_still_means_true_for_every_channel():
    opt = train_opt('--input_ch', '3', '--logscale_input', '--saturation_lower_limit_input',
                    '1', '--saturation_upper_limit_input', '200')
    assert opt.logscale_input is True
    assert Scaling.from_options(opt, 'input') == Scaling(1.0, 200.0, log=True)


@pytest.mark.parametrize('argv, fragment', [
    (['--input_ch', '3', '--saturation_upper_limit_input', '5000', '10000'],
     '--saturation_upper_limit_input has 2 values, but --input_ch is 3: give one value for '
     'every channel or one for all'),
    (['--input_ch', '3', '--saturation_lower_limit_input', '1', '2', '3', '4'],
     '--saturation_lower_limit_input has 4 values, but --input_ch is 3'),
    (['--target_ch', '3', '--logscale_target', 'True', 'False'],
     '--logscale_target has 2 values, but --target_ch is 3'),
    (['--saturation_clip_target', 'True', 'False'],
     '--saturation_clip_target has 2 values, but --target_ch is 1'),
    (per_channel_flags('input', INPUT_LOG, ((0.1, 10), (10, 1000), (1000, 500))),
     '--saturation_lower_limit_input (1000) must be below --saturation_upper_limit_input '
     '(500) for input channel 2'),
    (per_channel_flags('target', TARGET_LOG, ((0.1, 10), (0, 1000), (1000, 100000))),
     '--logscale_target needs a positive --saturation_lower_limit_target (got 0) for target '
     'channel 1'),
    # One value for all channels: the messages stay as they were, without a channel.
    (['--input_ch', '3', '--saturation_lower_limit_input', '6',
      '--saturation_upper_limit_input', '5'],
     '--saturation_lower_limit_input (6) must be below --saturation_upper_limit_input (5) '
     '(see'),
])
def test_a_bad_count_or_limit_is_one_line_naming_the_option_and_channel(tmp_path, argv,
                                                                         fragment):
    assert_usage_error(run_train(TINY + argv, cwd=tmp_path), fragment)
    assert os.listdir(tmp_path) == []


def write_run_options(root, name, options):
    """checkpoints/<name>/train_options.json holding `options`, as a training run leaves it."""
    folder = os.path.join(str(root), 'checkpoints', name)
    os.makedirs(os.path.join(folder, 'Model'), exist_ok=True)
    with open(os.path.join(folder, 'train_options.json'), 'w') as f:
        json.dump(options, f)
    return folder


# The options that a run made before per-channel values existed wrote into train_options.json
# for three EUV passbands to a magnetogram (one value each, README's earlier example), and
# the network of TINY.
OLD_STYLE_OPTIONS = {
    'input_ch': 3, 'target_ch': 1, 'n_downsample': 2, 'n_residual': 1, 'trans_conv': True,
    'n_gf': 8, 'norm_type': 'InstanceNorm2d', 'padding_type': 'replication',
    'data_format_input': 'npy', 'data_format_target': 'npy',
    'logscale_input': True, 'logscale_target': False,
    'saturation_lower_limit_input': 1.0, 'saturation_upper_limit_input': 200.0,
    'saturation_lower_limit_target': -3000.0, 'saturation_upper_limit_target': 3000.0,
    'saturation_clip_input': False, 'saturation_clip_target': True, 'target_unit': 'G',
    'target_header': {'BUNIT': 'G'}}


def test_the_test_script_counts_values_against_the_runs_channels(in_tmp):
    """The Test script takes --input_ch from train_options.json: per-channel values given on
    its command line are counted against the run's channels, not the default 1."""
    write_run_options(in_tmp, 'old', OLD_STYLE_OPTIONS)
    proc = run_test(['--gpu_ids', '-1', '--dataset_name', 'old', '--input_dir_test', 'none',
                     '--saturation_upper_limit_input', '10', '1000'], cwd=in_tmp)
    assert_usage_error(proc, '--saturation_upper_limit_input has 2 values, but --input_ch is '
                             '3')
    # Three values fit the run's three input channels.
    option = TEST_OPTION()
    opt = option.parse(['--dataset_name', 'old', '--saturation_lower_limit_input', '0.1',
                        '10', '1000', '--saturation_upper_limit_input', '10', '1000', '100000'])
    pix2pixCC_Test.take_training_options(option, opt)
    assert opt.input_ch == 3 and opt.saturation_upper_limit_input == [10.0, 1000.0, 100000.0]
    assert opt.logscale_input is True  # from the run, one value for every channel


# ----------------------------------------------------------------------------------------
# Scaling: each channel by its own values, and back exactly
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('clip', ['False', 'True'])
def test_forward_then_inverse_per_channel(clip):
    opt = train_opt(*PER_CHANNEL, '--saturation_clip_input', clip)
    scaling = Scaling.from_options(opt, 'input')
    assert isinstance(scaling, PerChannelScaling)
    x = channel_data(np.random.default_rng(0), INPUT_LOG)
    for c, (lo, up) in enumerate(RANGES):  # the limits themselves
        x[c].flat[:2] = lo, up
    y = scaling.forward(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    back = scaling.inverse(y)
    assert back.dtype == np.float32 and back.shape == x.shape
    for c, ((lo, up), log) in enumerate(zip(RANGES, INPUT_LOG, strict=True)):
        # Each channel fills [-1, 1] by its own limits, linearly or in log10.
        np.testing.assert_allclose(y[c].flat[:2], [-1, 1], atol=1e-6)
        assert y[c].min() >= -1 - 1e-6 and y[c].max() <= 1 + 1e-6
        # The same chain as a one-channel Scaling of the channel's values: one implementation.
        own = Scaling(lo, up, clip=clip == 'True', log=log)
        assert np.array_equal(y[c], own.forward(x[c]))
        assert np.array_equal(back[c], own.inverse(y[c]))
        # Back in the channel's own units: to 1e-6 of the value, or of the channel's largest
        # limit where float32 normalised data cannot resolve finer (a linear channel near its
        # lower limit, a log channel whose log10 is near 5).
        np.testing.assert_allclose(back[c], x[c], rtol=1e-6, atol=1e-6 * up)


def test_one_value_for_every_channel_is_one_scaling_bit_for_bit_as_before():
    """Scalar options give the Scaling they always gave, applied to the whole array at once;
    per-channel values that are all equal give the same Scaling."""
    scalar = train_opt('--input_ch', '3', '--logscale_input', 'True',
                       '--saturation_lower_limit_input', '1', '--saturation_upper_limit_input',
                       '200', '--saturation_clip_input', 'True')
    listed = train_opt('--input_ch', '3', '--logscale_input', 'True', 'True', 'True',
                       '--saturation_lower_limit_input', '1', '1', '1',
                       '--saturation_upper_limit_input', '200', '200', '200',
                       '--saturation_clip_input', 'True')
    expected = Scaling(lower=1.0, upper=200.0, clip=True, log=True)
    assert Scaling.from_options(scalar, 'input') == expected
    assert Scaling.from_options(listed, 'input') == expected
    x = channel_data(np.random.default_rng(1), INPUT_LOG)
    y = expected.forward(x)
    channel_by_channel = PerChannelScaling((expected,) * 3)
    assert np.array_equal(channel_by_channel.forward(x), y)
    assert np.array_equal(channel_by_channel.inverse(y), expected.inverse(y))


def test_training_and_validation_items_use_each_channels_scaling(tmp_path):
    rng = np.random.default_rng(2)
    inputs = {f'p{i}': channel_data(rng, INPUT_LOG) for i in range(2)}
    targets = {f'p{i}': channel_data(rng, TARGET_LOG) for i in range(2)}
    input_dir, target_dir = write_pairs(tmp_path, inputs, targets, fmt='npy')
    opt = train_opt(*PER_CHANNEL, '--data_format_input', 'npy', '--data_format_target', 'npy',
                    '--input_dir_train', input_dir, '--target_dir_train', target_dir,
                    '--input_dir_test', input_dir, '--target_dir_test', target_dir)
    x, y = CustomDataset(opt)[0]
    validation, _ = CustomDataset(opt, split='test')[0]
    for c in range(3):
        input_scaling = Scaling(*RANGES[c], log=INPUT_LOG[c])
        target_scaling = Scaling(*RANGES[c], log=TARGET_LOG[c])
        assert np.array_equal(x[c].numpy(), input_scaling.forward(inputs['p0'][c]))
        assert np.array_equal(validation[c].numpy(), x[c].numpy())
        assert np.array_equal(y[c].numpy(), target_scaling.forward(targets['p0'][c]))
    assert x.abs().max() <= 1 + 1e-6 and y.abs().max() <= 1 + 1e-6


# ----------------------------------------------------------------------------------------
# Training and Test end to end: generated files in each channel's own units
# ----------------------------------------------------------------------------------------

# A constant output has no CC: its metrics are NaN, which numpy's means warn about.
@pytest.mark.filterwarnings('ignore::RuntimeWarning')
def test_training_and_test_with_three_channels_each_in_its_own_units(in_tmp, capsys):
    rng = np.random.default_rng(3)
    for split, n in (('Train', 4), ('Test', 2)):
        for role, logs in (('Input', INPUT_LOG), ('Target', TARGET_LOG)):
            os.makedirs(f'{split}/{role}')
            for i in range(n):
                write_user_file(f'{split}/{role}/sun_{i:02d}.fits', channel_data(rng, logs),
                                'fits')
    data = ['--data_format_input', 'fits', '--data_format_target', 'fits', '--n_workers', '0']
    assert pix2pixCC_Train.main(TINY + PER_CHANNEL + data + [
        '--dataset_name', 'pc', '--input_dir_train', 'Train/Input', '--target_dir_train',
        'Train/Target', '--n_epochs', '1', '--report_freq', '4', '--display_freq', '4',
        '--save_freq', '4', '--seed', '1']) == 0
    assert 'warning' not in capsys.readouterr().out  # each channel fits its own limits
    assert os.path.isfile('checkpoints/pc/Image/Train/4_panel.png')
    with open('checkpoints/pc/train_options.json') as f:
        saved = json.load(f)
    assert saved['saturation_upper_limit_input'] == [10.0, 1000.0, 100000.0]
    assert saved['logscale_target'] == [False, True, True]
    assert saved['saturation_clip_target'] is False

    # A generator whose output channel c is values[c], mapped back by channel c's scaling,
    # which the Test script takes from train_options.json.
    values = (0.5, -0.25, 0.75)
    constant_generator_checkpoint(make_test_opt('--dataset_name', 'pc', '--input_ch', '3',
                                     '--target_ch', '3'), values, step=5)
    assert pix2pixCC_Test.main(TINY + [
        '--dataset_name', 'pc', '--iteration', '5', '--input_dir_test', 'Test/Input',
        '--target_dir_test', 'Test/Target', '--save_panels', '--n_workers', '0']) == 0
    folder = 'checkpoints/pc/Image/Test/5'
    for i in range(2):
        generated = read_user_file(f'{folder}/sun_{i:02d}_AI.fits', 'fits')
        assert generated.shape == (3, 32, 32)
        for c, value in enumerate(values):
            expected = physical(value, *RANGES[c], TARGET_LOG[c])
            np.testing.assert_allclose(generated[c], expected, rtol=1e-6)
        assert os.path.isfile(f'{folder}/sun_{i:02d}_panel.png')
    with open(f'{folder}/test_run.json') as f:
        assert json.load(f)['options']['saturation_lower_limit_target'] == [0.1, 10.0, 1000.0]


def test_an_old_style_train_options_json_drives_the_test_script_as_before(in_tmp):
    """A run whose train_options.json holds one value per option (every run made before
    per-channel values) gives the Test outputs it gave: one Scaling for every channel."""
    write_run_options(in_tmp, 'old', OLD_STYLE_OPTIONS)
    os.makedirs('inputs')
    rng = np.random.default_rng(4)
    np.save('inputs/sun.npy', rng.uniform(1, 200, (3, 32, 32)).astype(np.float32))
    constant_generator_checkpoint(make_test_opt('--dataset_name', 'old', '--input_ch', '3'), (0.5,),
                       step=3)
    assert pix2pixCC_Test.main(['--gpu_ids', '-1', '--dataset_name', 'old', '--iteration', '3',
                                '--input_dir_test', 'inputs', '--n_workers', '0']) == 0
    generated = np.load('checkpoints/old/Image/Test/3/sun_AI.npy')
    target = Scaling(lower=-3000.0, upper=3000.0, clip=True)
    assert np.array_equal(generated, target.inverse(np.full((1, 32, 32), 0.5, np.float32))[0])
    assert np.all(generated == np.float32(1500))
    with open('checkpoints/old/Image/Test/3/test_run.json') as f:
        options = json.load(f)['options']
    assert {name: options[name] for name in OLD_STYLE_OPTIONS if name in options} == \
        {name: value for name, value in OLD_STYLE_OPTIONS.items() if name != 'target_header'}
    # The input side too: the one Scaling of before, over all three channels.
    option = TEST_OPTION()
    opt = option.parse(['--dataset_name', 'old', '--input_dir_test', 'inputs'])
    pix2pixCC_Test.take_training_options(option, opt)
    assert Scaling.from_options(opt, 'input') == Scaling(1.0, 200.0, log=True)
    assert Scaling.from_options(opt, 'target') == target


def test_png_outputs_take_their_bit_depth_from_the_largest_channel_limit(in_tmp):
    os.makedirs('inputs')
    np.save('inputs/a.npy', np.zeros((32, 32), np.float32))
    flags = ['--dataset_name', 'rgb', '--data_format_input', 'npy', '--data_format_target',
             'png', '--target_ch', '3', '--saturation_lower_limit_target', '0',
             '--saturation_upper_limit_target', '100', '200', '250',
             '--input_dir_test', 'inputs', '--n_workers', '0']
    constant_generator_checkpoint(make_test_opt(*flags), (0.0, 0.5, 1.0), step=3)
    assert pix2pixCC_Test.main(TINY + flags + ['--iteration', '3']) == 0
    pixels = read_user_file('checkpoints/rgb/Image/Test/3/a_AI.png', 'png')
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert [int(pixels[..., c].mean()) for c in range(3)] == [50, 150, 250]


# ----------------------------------------------------------------------------------------
# Warnings before training: per channel, naming the channel
# ----------------------------------------------------------------------------------------

def npy_pair_warnings(root, inputs, targets, *argv):
    """The lines check_dataset logs for these npy pairs with the options argv."""
    input_dir, target_dir = write_pairs(root, inputs, targets, fmt='npy')
    return checked_lines('--data_format_input', 'npy', '--data_format_target', 'npy',
                         '--input_dir_train', input_dir, '--target_dir_train', target_dir,
                         *argv)


def test_a_channel_outside_its_own_limits_warns_naming_the_channel(tmp_path):
    rng = np.random.default_rng(5)
    inputs = {f'p{i}': channel_data(rng, INPUT_LOG) for i in range(2)}
    targets = {f'p{i}': channel_data(rng, TARGET_LOG) for i in range(2)}
    for array in inputs.values():
        array[2] /= 1000  # channel 2 holds 1..100, below its limits [1000, 100000]
    lines = npy_pair_warnings(tmp_path, inputs, targets, *PER_CHANNEL)
    assert len(lines) == 1, lines
    assert lines[0].startswith('warning: 100% of the input channel 2 values lie outside the '
                               'saturation limits [1000, 100000] (observed range 1'), lines[0]
    assert '--saturation_lower_limit_input and --saturation_upper_limit_input' in lines[0]


def test_one_limit_for_channels_that_differ_by_ten_thousand_warns_per_channel(tmp_path):
    """One value for all three channels: the channels it does not fit warn, one line each."""
    rng = np.random.default_rng(6)
    inputs = {f'p{i}': channel_data(rng, (False,) * 3) for i in range(2)}
    targets = {f'p{i}': channel_data(rng, TARGET_LOG) for i in range(2)}
    lines = npy_pair_warnings(tmp_path, inputs, targets, *per_channel_flags('target', TARGET_LOG),
                          '--input_ch', '3', '--saturation_lower_limit_input', '0.1',
                          '--saturation_upper_limit_input', '10')
    assert [line.split(' values')[0] for line in lines] == [
        'warning: 100% of the input channel 1', 'warning: 100% of the input channel 2'], lines
    assert all('[0.1, 10]' in line for line in lines)


def test_swapped_folders_are_named_once_with_every_channels_limits(tmp_path):
    """Each side's channels fit the other side's channels' limits."""
    rng = np.random.default_rng(7)
    logs = (False,) * 3
    other_ranges = ((-3000, 3000), (-10, 10), (-1, 1))
    inputs = {f'p{i}': channel_data(rng, logs, ranges=other_ranges) for i in range(2)}
    targets = {f'p{i}': channel_data(rng, logs) for i in range(2)}
    lines = npy_pair_warnings(tmp_path, inputs, targets,
                          *per_channel_flags('input', logs),
                          *per_channel_flags('target', logs, ranges=other_ranges))
    assert len(lines) == 1, lines
    assert 'look swapped' in lines[0] and '--input_dir_train' in lines[0]
    assert 'the target limits [-3000, 3000], [-10, 10], [-1, 1]' in lines[0], lines[0]
    assert 'the input limits [0.1, 10], [10, 1000], [1000, 100000]' in lines[0], lines[0]


def test_nan_warning_says_what_nan_becomes_in_log_and_linear_channels(tmp_path):
    rng = np.random.default_rng(8)
    inputs = {f'p{i}': channel_data(rng, INPUT_LOG) for i in range(2)}
    targets = {f'p{i}': channel_data(rng, TARGET_LOG) for i in range(2)}
    inputs['p1'][1, 0, 0] = np.nan
    lines = npy_pair_warnings(tmp_path, inputs, targets, *PER_CHANNEL)
    assert len(lines) == 1, lines
    assert '1 NaN/Inf value(s) in 1 input file(s)' in lines[0]
    assert 'NaN becomes the lower limit in log-scaled channels and 0 in the others' in lines[0]


# ----------------------------------------------------------------------------------------
# Panels: each target channel coloured by its own limits
# ----------------------------------------------------------------------------------------

def test_panel_colours_each_target_channel_by_its_own_limits(tmp_path, monkeypatch):
    ranges = ((-3000.0, 3000.0),) + RANGES[1:]
    logs = (False, True, False)  # signed, log, linear
    opt = train_opt(*per_channel_flags('target', logs, ranges=ranges))
    rng = np.random.default_rng(9)
    real = channel_data(rng, logs, size=16, ranges=ranges)
    generated = real * np.float32(1.01)
    figure = drawn_panel(monkeypatch, tmp_path / 'panel.png', rng.uniform(-1, 1, (3, 16, 16)),
                         real, generated, Scaling.from_options(opt, 'target'), unit='DN/s',
                         data_format='fits')
    images = {axis.get_title().split(' (')[0]: axis.images[0] for axis in figure.axes
              if axis.images}
    for c, ((lo, up), log) in enumerate(zip(ranges, logs, strict=True)):
        for kind in ('real', 'generated'):
            image = images[f'{kind} ch {c}']
            if c == 0:  # signed: diverging around 0 up to the channel's largest |value|
                peak = float(np.abs(real[0]).max())
                assert image.get_clim() == pytest.approx((-peak, peak))
            else:
                assert isinstance(image.norm, LogNorm) == log
                assert image.get_clim() == pytest.approx((lo, up))
        spread = float(np.abs(generated[c] - real[c]).max())
        assert images[f'generated - real ch {c}'].get_clim() == \
            pytest.approx((-spread, spread), rel=1e-6)


# ----------------------------------------------------------------------------------------
# The README's example
# ----------------------------------------------------------------------------------------

def readme_example_commands(title):
    """{script: argv} of the commands in the bash block of the README section `title`."""
    with open(os.path.join(REPO, 'README.md')) as f:
        section = f.read().split(f'\n### {title}\n', 1)[1]
    block = section.split('```bash\n', 1)[1].split('```', 1)[0].replace('\\\n', ' ')
    return {words[1]: words[2:] for words in map(shlex.split, block.splitlines())}


def test_the_readme_euv_example_scales_each_passband_by_its_own_limits():
    commands = readme_example_commands('Example: EUV to magnetogram (FITS)')
    opt = pix2pixCC_Options.TrainOption().parse(commands['pix2pixCC_Train.py'])
    scaling = Scaling.from_options(opt, 'input')
    assert isinstance(scaling, PerChannelScaling) and len(scaling.scalings) == opt.input_ch == 3
    assert all(channel.log for channel in scaling.scalings)  # one --logscale_input for all
    assert len({(channel.lower, channel.upper) for channel in scaling.scalings}) == 3
    assert Scaling.from_options(opt, 'target') == Scaling(-3000.0, 3000.0)
    TEST_OPTION().parse(commands['pix2pixCC_Test.py'])  # the rest comes from the run


def with_values(argv, values):
    """`argv` with the value after each flag in `values` replaced by values[flag]."""
    return [values.get(before, word) for before, word in zip([''] + argv[:-1], argv,
                                                             strict=True)]


SDO_EXAMPLE = 'Example: three SDO-like passbands, from data to a result table'


def test_the_readme_sdo_like_example_runs_and_prints_every_region(in_tmp, capsys):
    """README's worked example, with its own flags but a small network, size and run: the
    SDO-like cubes fit each passband's limits, training takes windows, and Test prints the
    whole-frame, disk, active-region and quiet-Sun tables."""
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning
    from astropy.wcs import WCS
    commands = readme_example_commands(SDO_EXAMPLE)
    make = commands['datasets/make_sample.py']
    assert make[make.index('--passbands') + 1] == '3'
    small = {'--size': '64', '--n_train': '2', '--n_test': '1'}
    make = with_values(make, small)
    assert_ok(run_command([sys.executable, os.path.join(REPO, 'datasets', 'make_sample.py'),
                           *make], cwd=in_tmp))
    cube = fits.open('datasets/SDO_like/Train/Input/sun_0000.fits')[0]
    assert cube.data.shape == (3, 64, 64)
    with warnings.catch_warnings():  # (astropy notes that it sets MJD-OBS from DATE-OBS)
        warnings.simplefilter('ignore', AstropyWarning)
        wcs = WCS(cube.header)
    assert wcs.wcs.ctype[2] == 'CHANNEL' and '171' in cube.header['CNAME3']
    assert cube.header['RSUN_OBS'] / (wcs.wcs.cdelt[0] * 3600) == pytest.approx(28)

    train = commands['pix2pixCC_Train.py']
    opt = pix2pixCC_Options.TrainOption().parse(train)
    scaling = Scaling.from_options(opt, 'input')
    for channel, limits in zip(cube.data, scaling.scalings, strict=True):
        low, high = np.percentile(channel, [1, 99])
        assert limits.lower <= low and high <= limits.upper  # each passband fits its limits
    fast = {'--n_epochs': '1', '--n_epochs_decay': '0', '--crop_size': '32'}
    train = with_values(train, fast)
    assert pix2pixCC_Train.main(train + TINY + ['--save_freq', '2', '--n_workers', '0']) == 0
    test = commands['pix2pixCC_Test.py']
    assert '--active_threshold' in test
    capsys.readouterr()
    assert pix2pixCC_Test.main(test + ['--gpu_ids', '-1', '--n_workers', '0']) == 0
    lines = capsys.readouterr().out.splitlines()
    for title in ('whole frame:', 'disk:', 'active (on disk):', 'quiet (on disk):'):
        assert title in lines, (title, lines)
