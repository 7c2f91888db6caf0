"""Bad input: README "What happens when…", row by row. Every mistake a user can make with
the data, the options or the checkpoints is found before the first training step and ends
with exit status 2 and one line on stderr that names the file or option and what to do,
never a traceback; and it touches nothing already saved: each test runs beside the files of
an earlier run (the `earlier_run` fixture) and checks that no step ran and that every one of
those files is byte-identical afterwards, with nothing added.
"""
import errno
import os
import re
import time

import numpy as np
import pytest
import torch
from astropy.io import fits

import pix2pixCC_Train
from conftest import (NPY_DATA, TINY, assert_ok, assert_usage_error, checked_lines, data_args, load,
                      loss_rows, make_pairs, model_dir, read_csv_rows, run_test, run_train,
                      saved_steps_in, snapshot, train_opt, write_pairs, write_user_file)
from pix2pixCC_Networks import Discriminator, Generator
from pix2pixCC_Options import run_main

NAME = ['--dataset_name', 'earlier']


class EarlierRun:
    """Files of an earlier run under ./checkpoints/earlier that no refused run may touch."""

    def __init__(self, root):
        self.root = root
        self.dir = root / 'checkpoints' / 'earlier'
        (self.dir / 'Model').mkdir(parents=True)
        (self.dir / 'Image' / 'Train').mkdir(parents=True)
        torch.save(Generator(train_opt()).state_dict(), self.dir / 'Model' / '2_G.pt')
        torch.save(Discriminator(train_opt()).state_dict(), self.dir / 'Model' / '2_D.pt')
        (self.dir / 'loss_log.csv').write_text(
            'step,epoch,D,G,G_LSGAN,G_FM,G_CC,CC,seconds_per_step\n1,1,0.5,9,1,3,5,0,0.1\n')
        (self.dir / 'train_options.json').write_text('{"n_gf": 8}')
        (self.dir / 'Image' / 'Train' / '2_fake.png').write_bytes(b'not really a png')
        self.remember()

    def remember(self):
        """Take the state to compare with (again, after a test adds a file of its own)."""
        self.before = snapshot(self.root / 'checkpoints', with_dirs=True)
        time.sleep(0.01)  # so that a rewrite would show in the mtimes

    def assert_untouched(self):
        assert snapshot(self.root / 'checkpoints', with_dirs=True) == self.before, \
            'an earlier run was changed'


@pytest.fixture
def earlier_run(tmp_path):
    return EarlierRun(tmp_path)


def train_in(tmp_path, input_dir, target_dir, *extra):
    """Train under the earlier run's name, reporting every step (a step that ran shows)."""
    return run_train(data_args(input_dir, target_dir, *NAME, '--report_freq', '1', *extra),
                     cwd=tmp_path)


def translate_in(tmp_path, input_dir, *extra):
    return run_test(TINY + NPY_DATA + NAME + ['--input_dir_test', str(input_dir), *extra],
                    cwd=tmp_path)


def assert_refused(proc, earlier_run, *fragments):
    """One line holding every fragment, status 2; no step ran; nothing saved changed."""
    line = assert_usage_error(proc, *fragments)
    assert 'Current_step' not in proc.stdout and 'saved' not in proc.stdout, proc.stdout
    earlier_run.assert_untouched()
    return line


def named_pairs(root, input_names, target_names, size=32):
    rng = np.random.default_rng(0)

    def arrays(names):
        return {name: rng.uniform(0, 100, (size, size)).astype(np.float32) for name in names}

    return write_pairs(root, arrays(input_names), arrays(target_names))


# ----------------------------------------------------------------------------------------
# Folders and files
# ----------------------------------------------------------------------------------------

def test_missing_input_directory(tmp_path, earlier_run):
    _, target_dir = make_pairs(tmp_path, 'npy', n=2)
    proc = train_in(tmp_path, tmp_path / 'nowhere', target_dir)
    assert_refused(proc, earlier_run, 'input directory', 'nowhere', 'does not exist')


def test_no_files_of_the_extension_lists_what_is_there(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path, 'fits', n=2)
    proc = train_in(tmp_path, input_dir, target_dir)  # says npy, has fits
    assert_refused(proc, earlier_run, 'no .npy files', input_dir, 'extensions present: .fits',
                   '--data_format_')


def test_empty_input_folder(tmp_path, earlier_run):
    _, target_dir = make_pairs(tmp_path / 'd', 'npy', n=2)
    (tmp_path / 'empty').mkdir()
    proc = train_in(tmp_path, tmp_path / 'empty', target_dir)
    assert_refused(proc, earlier_run, 'no .npy files in input directory', 'it is empty')


def test_file_counts_differ(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=3)
    os.remove(os.path.join(target_dir, 'img_002.npy'))
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, f"3 input files in '{input_dir}'",
                   f"2 target files in '{target_dir}'", 'input i pairs with target i',
                   'without a partner of the same name: img_002.npy')


def test_file_counts_differ_and_the_times_in_the_names_do_not_match(tmp_path, earlier_run):
    """The unpaired files are named by the times in their names; a target folder months
    off is said to be so, not a missing file."""
    input_dir, target_dir = tmp_path / 'in', tmp_path / 'tg'
    for folder, times in ((input_dir, ('20110101_0000', '20110101_0012', '20110101_0024')),
                          (target_dir, ('20110601_0000', '20110601_0012'))):
        os.makedirs(folder)
        for when in times:
            np.save(folder / f'sdo_{when}.npy', np.zeros((32, 32), np.float32))
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, 'the times in their names do not overlap',
                   'inputs 2011-01-01 00:00 to 2011-01-01 00:24',
                   'targets 2011-06-01 00:00 to 2011-06-01 00:12')
    os.remove(target_dir / 'sdo_20110601_0012.npy')
    for when in ('20110101_0000', '20110101_0024'):
        np.save(target_dir / f'hmi_{when}.npy', np.zeros((32, 32), np.float32))
    os.remove(target_dir / 'sdo_20110601_0000.npy')
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, 'without a partner within a minute',
                   'sdo_20110101_0012.npy')


def test_input_and_target_sizes_differ(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=2, size=32)
    np.save(os.path.join(target_dir, 'img_001.npy'), np.zeros((64, 64), np.float32))
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, os.path.join(input_dir, 'img_001.npy') + ' is 32x32',
                   os.path.join(target_dir, 'img_001.npy') + ' is 64x64')


@pytest.mark.parametrize('fmt', ['npy', 'fits'])
def test_test_target_of_another_size_is_refused_before_any_output(tmp_path, earlier_run, fmt):
    """Checked for every pair from the files' headers before the first output (the last
    pair differs here); nothing is written, not even the output folder."""
    input_dir, target_dir = make_pairs(tmp_path, fmt, n=3, size=32)
    write_user_file(os.path.join(target_dir, f'img_002.{fmt}'), np.zeros((64, 64), np.float32),
                    fmt)
    proc = translate_in(tmp_path, input_dir, '--iteration', '2', '--target_dir_test',
                        target_dir, '--data_format_input', fmt, '--data_format_target', fmt)
    assert_refused(proc, earlier_run, os.path.join(input_dir, f'img_002.{fmt}') + ' is 32x32',
                   os.path.join(target_dir, f'img_002.{fmt}') + ' is 64x64')


@pytest.mark.parametrize('problem', ['size', 'pairing'])
def test_validation_pairs_are_checked_before_the_first_step(tmp_path, earlier_run, problem):
    """--val_during_train: the test pairs are checked as the Test script checks them, before
    training starts, not at the first save hours later."""
    input_dir, target_dir = make_pairs(tmp_path / 'train', 'npy', n=2, size=32)
    test_in, test_tg = make_pairs(tmp_path / 'test', 'npy', n=2, size=32)
    bad = os.path.join(test_tg, 'img_001.npy')
    if problem == 'size':
        np.save(bad, np.zeros((64, 64), np.float32))
        fragments = [os.path.join(test_in, 'img_001.npy') + ' is 32x32', bad + ' is 64x64']
    else:
        os.rename(bad, os.path.join(test_tg, 'img_009.npy'))
        fragments = ['pair 1', 'img_001.npy', 'img_009.npy']
    proc = train_in(tmp_path, input_dir, target_dir, '--val_during_train', '--input_dir_test',
                    test_in, '--target_dir_test', test_tg)
    assert_refused(proc, earlier_run, *fragments)


def test_channel_count_mismatch(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=2, channels=3, target_channels=1)
    proc = train_in(tmp_path, input_dir, target_dir)  # --input_ch 1
    assert_refused(proc, earlier_run, 'img_000.npy', 'no axis of 1 channel', '--input_ch')


def test_truncated_fits_file(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path, 'fits', n=4)
    bad = os.path.join(input_dir, 'img_003.fits')
    content = open(bad, 'rb').read()
    with open(bad, 'wb') as f:
        f.write(content[:len(content) // 2])
    proc = train_in(tmp_path, input_dir, target_dir, '--data_format_input', 'fits',
                    '--data_format_target', 'fits')
    assert_refused(proc, earlier_run, bad, 'truncated', 'copy it again')


@pytest.mark.parametrize('fmt', ['fits', 'npy'])
def test_truncated_file_with_crop_size(tmp_path, earlier_run, fmt):
    """--crop_size checks sizes from the headers and values from a sample: a truncated file
    outside the sample (pair 3 of 8) is still refused before the first step."""
    input_dir, target_dir = make_pairs(tmp_path, fmt, n=8)
    bad = os.path.join(target_dir, f'img_003.{fmt}')
    content = open(bad, 'rb').read()
    with open(bad, 'wb') as f:
        f.write(content[:len(content) - 100])
    proc = train_in(tmp_path, input_dir, target_dir, '--data_format_input', fmt,
                    '--data_format_target', fmt, '--crop_size', '24')
    assert_refused(proc, earlier_run, bad, 'truncated', 'copy it again')


def test_fits_without_image_data(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path, 'fits', n=2)
    bad = os.path.join(input_dir, 'img_001.fits')
    fits.HDUList([fits.PrimaryHDU()]).writeto(bad, overwrite=True)
    proc = train_in(tmp_path, input_dir, target_dir, '--data_format_input', 'fits',
                    '--data_format_target', 'fits')
    assert_refused(proc, earlier_run, bad, 'no HDU with image data')


def test_unknown_format(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path / 'd', 'npy', n=2)
    proc = train_in(tmp_path, input_dir, target_dir, '--data_format_input', 'fitz')
    assert_refused(proc, earlier_run, '--data_format_input', "invalid choice: 'fitz'")


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------

BAD_LIMITS = [
    (['--logscale_input', 'True', '--saturation_lower_limit_input', '0'],
     ['--logscale_input needs a positive --saturation_lower_limit_input', '0']),
    (['--logscale_target', 'True', '--saturation_lower_limit_target', '-5',
      '--saturation_upper_limit_target', '100'], ['--logscale_target', '-5']),
    (['--saturation_lower_limit_input', '6', '--saturation_upper_limit_input', '5'],
     ['--saturation_lower_limit_input (6) must be below --saturation_upper_limit_input (5)']),
]


@pytest.mark.parametrize('flags, fragments', BAD_LIMITS)
def test_bad_limits_in_training(tmp_path, earlier_run, flags, fragments):
    input_dir, target_dir = make_pairs(tmp_path / 'd', 'npy', n=2)
    assert_refused(train_in(tmp_path, input_dir, target_dir, *flags), earlier_run, *fragments)


def test_size_not_a_multiple_of_the_strides_in_training(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=2, size=30)
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, 'img_000.npy is 30x30', 'multiples of 4',
                   '--n_downsample')


def test_image_too_small_for_the_discriminator(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path / 'd', 'npy', n=2, size=16)
    proc = train_in(tmp_path, input_dir, target_dir, '--n_D', '1', '--data_size', '16')
    assert_refused(proc, earlier_run, '16x16', '--n_D')


@pytest.mark.parametrize('crop, fragments', [
    ('10', ['--crop_size', 'multiple of 4', '--n_downsample']),
    ('64', ['img_000.npy is 32x32', 'smaller than --crop_size 64']),
    ('16', ['--crop_size 16', 'too small for --n_D 1'])])
def test_crop_size_that_cannot_work(tmp_path, earlier_run, crop, fragments):
    input_dir, target_dir = make_pairs(tmp_path / 'd', 'npy', n=2, size=32)
    proc = train_in(tmp_path, input_dir, target_dir, '--crop_size', crop)
    assert_refused(proc, earlier_run, *fragments)


# ----------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------

def test_pairing_by_names(tmp_path, earlier_run):
    input_dir, target_dir = named_pairs(tmp_path, ['a', 'b', 'c'], ['a', 'c', 'd'])
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, 'pair 1', 'b.npy', 'c.npy', 'missing on one side')


@pytest.mark.parametrize('targets', [
    # Input 2011-01-02 would pair with 01-03 (a file missing on each side). The other pairs
    # match to the minute, so a day's offset here is a wrong pairing.
    ['hmi_20110101_0000', 'hmi_20110103_0000', 'hmi_20110104_0000'],
    # Input 2011-01-02 would pair with 01-04 although 01-01 is closer.
    ['hmi_20110101_0000', 'hmi_20110104_0000', 'hmi_20110105_0000'],
])
def test_pairing_by_timestamps(tmp_path, earlier_run, targets):
    input_dir, target_dir = named_pairs(
        tmp_path, ['aia_20110101_0000', 'aia_20110102_0000', 'aia_20110104_0000'], targets)
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, 'pair 1', 'aia_20110102_0000', targets[1])


def test_small_time_offsets_pair_fine(tmp_path):
    input_dir, target_dir = named_pairs(
        tmp_path, ['aia_20110101_000006', 'aia_20110101_001206', 'aia_20110101_002406'],
        ['hmi_20110101_000000', 'hmi_20110101_001200', 'hmi_20110101_002400'])
    assert_ok(train_in(tmp_path, input_dir, target_dir))


def test_check_pairing_false_skips_the_check(tmp_path):
    input_dir, target_dir = named_pairs(tmp_path, ['a', 'b', 'c'], ['a', 'c', 'd'])
    assert_ok(train_in(tmp_path, input_dir, target_dir, '--check_pairing', 'False'))
    assert saved_steps_in(model_dir(tmp_path, 'earlier')) == [3]


def test_test_checks_the_pairing_unless_check_pairing_false(tmp_path, earlier_run):
    input_dir, target_dir = named_pairs(tmp_path, ['a', 'b', 'c'], ['a', 'c', 'd'])
    pairs = ['--iteration', '2', '--target_dir_test', target_dir]
    proc = translate_in(tmp_path, input_dir, *pairs)
    assert_refused(proc, earlier_run, 'pair 1', 'b.npy', 'c.npy', '--check_pairing False')
    proc = translate_in(tmp_path, input_dir, *pairs, '--check_pairing', 'False')
    assert_ok(proc)
    assert 'no effect' not in proc.stdout, proc.stdout
    _, rows = read_csv_rows(earlier_run.dir / 'Image' / 'Test' / '2' / 'metrics.csv')
    assert [row['file'] for row in rows] == ['a', 'b', 'c']


# ----------------------------------------------------------------------------------------
# Values that are not numbers, and a --data_size that is not the files'
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def noisy_run(tmp_path_factory):
    """NaN and +-Inf in the files, and a --data_size that is not the files' size."""
    root = tmp_path_factory.mktemp('noisy')
    input_dir, target_dir = make_pairs(root, 'npy', n=4, size=32)
    x = np.load(os.path.join(input_dir, 'img_001.npy'))
    x[3, 4] = x[5, 6] = x[7, 8] = np.nan
    np.save(os.path.join(input_dir, 'img_001.npy'), x)
    y = np.load(os.path.join(target_dir, 'img_003.npy'))
    y[1, 1], y[2, 2] = np.inf, -np.inf
    np.save(os.path.join(target_dir, 'img_003.npy'), y)
    proc = run_train(data_args(input_dir, target_dir, '--data_size', '64', '--n_epochs', '2',
                               '--report_freq', '1'), cwd=root)
    assert_ok(proc)
    return root, proc


def test_nan_and_inf_give_one_warning_per_side_and_finite_losses(noisy_run):
    root, proc = noisy_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if re.search(r'nan|inf\b|warn', line, re.IGNORECASE)]
    assert len(lines) == 2, lines
    assert '3 NaN/Inf value(s) in 1 input file(s)' in lines[0], lines[0]
    assert os.path.join('Input', 'img_001.npy') in lines[0], lines[0]
    assert '2 NaN/Inf value(s) in 1 target file(s)' in lines[1], lines[1]
    assert os.path.join('Target', 'img_003.npy') in lines[1], lines[1]
    rows = loss_rows(root)
    assert len(rows) == 8
    for row in rows:
        for key in ('D', 'G', 'G_LSGAN', 'G_FM', 'G_CC', 'CC'):
            assert np.isfinite(float(row[key])), row
    for kind in ('G', 'D'):
        for value in load(os.path.join(model_dir(root), f'8_{kind}.pt')).values():
            assert torch.isfinite(value).all()


def test_nan_in_the_targets_only_names_the_target_side_and_file(tmp_path):
    """README "What happens when…": the warning names the side and the first file that hold
    NaN/Inf, not the input of that pair (which has none)."""
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=3, size=32)
    for name in ('img_001.npy', 'img_002.npy'):
        y = np.load(os.path.join(target_dir, name))
        y[0, :4] = np.nan
        np.save(os.path.join(target_dir, name), y)
    lines = checked_lines(*NPY_DATA, '--input_dir_train', input_dir, '--target_dir_train',
                          target_dir)
    assert len(lines) == 1, lines
    assert lines[0].startswith('warning: 8 NaN/Inf value(s) in 2 target file(s) (first: '
                               f"{os.path.join(target_dir, 'img_001.npy')});"), lines[0]
    assert 'NaN becomes 0' in lines[0] and input_dir not in lines[0]


def test_data_size_differing_from_the_files_gives_one_notice(noisy_run):
    _, proc = noisy_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if '--data_size' in line]
    assert len(lines) == 1 and '64' in lines[0] and '32' in lines[0], lines


# ----------------------------------------------------------------------------------------
# The checkpoints folder
# ----------------------------------------------------------------------------------------

def test_checkpoints_folder_cannot_be_created(tmp_path, earlier_run):
    """Works as root too: a file stands where the folder should be."""
    input_dir, target_dir = make_pairs(tmp_path / 'd', 'npy', n=2)
    (tmp_path / 'checkpoints' / 'other').write_text('a file, not a folder')
    earlier_run.remember()
    proc = run_train(data_args(input_dir, target_dir, '--dataset_name', 'other'), cwd=tmp_path)
    assert_refused(proc, earlier_run, "cannot create './checkpoints/other'")


def test_checkpoints_folder_not_writable(in_tmp, monkeypatch, capsys):
    """Permission denied, as for a user without write access (CI runs as root, for whom
    chmod changes nothing, so the operating system's refusal is injected)."""
    input_dir, target_dir = make_pairs(in_tmp / 'd', 'npy', n=2)
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        if 'checkpoints' in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, 'makedirs', makedirs)
    status = run_main(pix2pixCC_Train.main, data_args(input_dir, target_dir, '--report_freq', '1'))
    out, err = capsys.readouterr()
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "cannot create './checkpoints/pix2pixCC': Permission denied" in lines[0]
    assert 'Current_step' not in out and not os.path.exists('checkpoints')


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def test_typo_in_the_run_name_lists_the_runs(tmp_path):
    """Test with a --dataset_name that has no run folder: the runs there, and the closest."""
    for run in ('my_run', 'EUV2Mag'):
        os.makedirs(tmp_path / 'checkpoints' / run / 'Model')
        (tmp_path / 'checkpoints' / run / 'Model' / '100_G.pt').touch()
    os.makedirs(tmp_path / 'in')
    np.save(tmp_path / 'in' / 'a.npy', np.zeros((32, 32), np.float32))
    proc = run_test(['--gpu_ids', '-1', '--dataset_name', 'my_nyp', '--input_dir_test',
                     str(tmp_path / 'in')], cwd=tmp_path)
    line = assert_usage_error(proc, "'my_nyp'", 'my_run', 'EUV2Mag', '--dataset_name')
    assert 'did you mean' in line and 'tif' not in line


def test_test_without_any_checkpoint(tmp_path, earlier_run):
    """A run folder without generators (e.g. a run stopped before its first save)."""
    input_dir, _ = make_pairs(tmp_path, 'npy', n=1)
    (tmp_path / 'checkpoints' / 'none' / 'Model').mkdir(parents=True)
    earlier_run.remember()
    proc = run_test(TINY + NPY_DATA + ['--dataset_name', 'none', '--input_dir_test', input_dir],
                    cwd=tmp_path)
    assert_refused(proc, earlier_run, 'no generator checkpoints', './checkpoints/none/Model',
                   '--dataset_name')


def test_test_missing_input_directory(tmp_path, earlier_run):
    proc = translate_in(tmp_path, tmp_path / 'absent', '--iteration', '2')
    assert_refused(proc, earlier_run, 'input directory', 'absent', 'does not exist')


def test_test_with_a_truncated_checkpoint(tmp_path, earlier_run):
    input_dir, _ = make_pairs(tmp_path, 'npy', n=1)
    content = (earlier_run.dir / 'Model' / '2_G.pt').read_bytes()
    (earlier_run.dir / 'Model' / '3_G.pt').write_bytes(content[:len(content) // 2])
    earlier_run.remember()
    proc = translate_in(tmp_path, input_dir, '--iteration', '3')
    assert_refused(proc, earlier_run, 'cannot load', '3_G.pt')


class CreatesFile:
    """Unpickling this object creates `path` (as a pickled payload that runs code would)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_npy_holding_python_objects_is_refused_unrun(tmp_path, earlier_run):
    input_dir, target_dir = make_pairs(tmp_path / 'd', 'npy', n=3)
    bad = os.path.join(input_dir, 'img_001.npy')
    # The payload is live: loading it with pickles allowed runs it.
    probe = tmp_path / 'probe.npy'
    np.save(probe, np.array([CreatesFile(tmp_path / 'probe_ran')], dtype=object),
            allow_pickle=True)
    np.load(probe, allow_pickle=True)
    assert (tmp_path / 'probe_ran').exists()
    marker = tmp_path / 'marker'
    np.save(bad, np.array([CreatesFile(marker)], dtype=object), allow_pickle=True)
    proc = train_in(tmp_path, input_dir, target_dir)
    assert_refused(proc, earlier_run, 'cannot read', bad)
    assert not marker.exists()


def pickled_checkpoint(path, marker):
    torch.save({'model.1.weight': CreatesFile(marker)}, path)


def test_pickled_checkpoint_payload_is_live(tmp_path):
    """Guard for the two tests below: the payload runs when pickles are allowed."""
    pickled_checkpoint(tmp_path / 'probe.pt', tmp_path / 'probe_ran')
    torch.load(tmp_path / 'probe.pt', weights_only=False)
    assert (tmp_path / 'probe_ran').exists()


def test_pickled_generator_checkpoint_is_refused_by_test(tmp_path, earlier_run):
    input_dir, _ = make_pairs(tmp_path / 'd', 'npy', n=1)
    marker = tmp_path / 'marker'
    pickled_checkpoint(earlier_run.dir / 'Model' / '3_G.pt', marker)
    earlier_run.remember()
    proc = translate_in(tmp_path, input_dir, '--iteration', '3')
    assert_refused(proc, earlier_run, 'cannot load', '3_G.pt', 'only plain tensors')
    assert not marker.exists()


@pytest.mark.parametrize('evil', ['G', 'state'])
def test_pickled_checkpoint_is_refused_when_resuming(tmp_path, earlier_run, evil):
    input_dir, target_dir = make_pairs(tmp_path / 'd', 'npy', n=2)
    marker = tmp_path / 'marker'
    # replaces 2_G.pt or adds 2_state.pt
    pickled_checkpoint(earlier_run.dir / 'Model' / f'2_{evil}.pt', marker)
    earlier_run.remember()
    proc = train_in(tmp_path, input_dir, target_dir, '--latest_iter', '2', '--n_epochs', '2')
    assert_refused(proc, earlier_run, 'cannot load', f'2_{evil}.pt')
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# Test output folders: one run's outputs per folder
# ----------------------------------------------------------------------------------------

@pytest.fixture
def tested(tmp_path, earlier_run):
    """The earlier run's generator 2 tested on two inputs into the default folder."""
    input_dir, _ = make_pairs(tmp_path / 'a', 'npy', n=2)
    assert_ok(translate_in(tmp_path, input_dir, '--iteration', '2'))
    earlier_run.remember()
    return input_dir


@pytest.mark.parametrize('change', ['other inputs', 'one more input', 'scaling'])
def test_test_refuses_a_folder_holding_another_runs_outputs(tmp_path, earlier_run, tested,
                                                            change):
    input_dir, extra = tested, []
    if change == 'other inputs':
        input_dir, _ = make_pairs(tmp_path / 'b', 'npy', n=2, seed=1)
    elif change == 'one more input':
        np.save(os.path.join(input_dir, 'img_002.npy'), np.ones((32, 32), np.float32))
        earlier_run.remember()
    else:
        extra = ['--saturation_upper_limit_target', '1000']
    proc = translate_in(tmp_path, input_dir, '--iteration', '2', *extra)
    line = assert_refused(proc, earlier_run, os.path.join('Image', 'Test', '2'),
                          'holds outputs of another run', '--output_dir', '--overwrite')
    assert ('--saturation_upper_limit_target' in line) == (change == 'scaling'), line


def test_test_refuses_outputs_without_a_record(tmp_path, earlier_run, tested):
    os.remove(earlier_run.dir / 'Image' / 'Test' / '2' / 'test_run.json')
    earlier_run.remember()
    proc = translate_in(tmp_path, tested, '--iteration', '2')
    assert_refused(proc, earlier_run, 'no test_run.json', '--output_dir', '--overwrite')


def test_test_every_generator_refused_before_the_first_is_run(tmp_path, earlier_run):
    """--iteration -1 into a folder whose last generator's outputs are another run's: the
    first generator's folder stays as it was (and empty)."""
    (earlier_run.dir / 'Model' / '4_G.pt').write_bytes((earlier_run.dir / 'Model' /
                                                        '2_G.pt').read_bytes())
    input_dir, _ = make_pairs(tmp_path / 'a', 'npy', n=2)
    other_dir, _ = make_pairs(tmp_path / 'b', 'npy', n=2, seed=1)
    assert_ok(translate_in(tmp_path, other_dir, '--iteration', '4', '--output_dir',
                           'results/4'))
    earlier_run.remember()
    results = snapshot(tmp_path / 'results', with_dirs=True)
    proc = translate_in(tmp_path, input_dir, '--iteration', '-1', '--output_dir', 'results')
    line = assert_refused(proc, earlier_run, os.path.join('results', '4'), '--output_dir',
                          '--overwrite')
    assert 'input folder' in line
    assert snapshot(tmp_path / 'results', with_dirs=True) == results
