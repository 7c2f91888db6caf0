"""Training and test drivers end to end (SPEC sections 6 and 7).

The scripts run as a user runs them (`python /abs/pix2pixCC_Train.py ...` with the working
directory set to a fresh tmp folder, outputs under ./checkpoints/<dataset_name>/), with a
tiny network for two epochs on six small files. Each format's run is made once per module
(module-scoped fixtures) and inspected by several tests.
"""
import copy
import json
import math
import os
import re
import shutil
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS
from PIL import Image

import pix2pixCC_Test
from conftest import (NPY_DATA, SAMPLE_SCALING, TINY, aia_cube_header, assert_ok,
                      assert_same_weights, assert_usage_error, copy_sample, load,
                      load_generator, make_pairs, make_test_opt, read_user_file, reports,
                      run_test, run_train, saved_steps_in, snapshot, train_opt, write_user_file)
from pix2pixCC_Networks import Discriminator, Generator
from pix2pixCC_Options import run_main
from pix2pixCC_Pipeline import CustomDataset


# What a Test output folder records (README "Output files").
RECORD = 'test_run.json'


def run_g(G, x):
    with torch.no_grad():
        return G(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None])[0].numpy()


FREQS = ['--batch_size', '2', '--n_epochs', '2', '--report_freq', '3', '--save_freq', '5',
         '--display_freq', '4', '--keep_states', '0']
# 6 files, batch 2, 2 epochs: steps 2, 4, ..., 12. Crossing multiples of 3 -> reports at
# 4, 6, 10, 12; of 5 -> saves at 6, 10 (+ the final 12); of 4 -> previews at 4, 8, 12.
EXPECTED_REPORTS = [4, 6, 10, 12]
EXPECTED_SAVES = [6, 10, 12]
EXPECTED_PREVIEWS = [4, 8, 12]


# ----------------------------------------------------------------------------------------
# FITS, one channel: the shipped sample (EUV -> magnetogram), two discriminator scales
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('fits_run')
    train_in, train_tg, test_in = copy_sample(root / 'data', n_train=6, n_test=3)
    data_flags = TINY + SAMPLE_SCALING + ['--dataset_name', 'sun', '--data_format_input', 'fits',
                                          '--data_format_target', 'fits', '--n_D', '2']
    proc = run_train(data_flags + FREQS + ['--input_dir_train', train_in,
                                           '--target_dir_train', train_tg, '--no_shuffle',
                                           '--seed', '1', '--data_size', '64'], cwd=root)
    assert_ok(proc)
    test_proc = run_test(data_flags + ['--input_dir_test', test_in], cwd=root)  # iteration -1
    assert_ok(test_proc)
    return SimpleNamespace(root=root, proc=proc, test_proc=test_proc, flags=data_flags,
                           train_in=train_in, train_tg=train_tg, test_in=test_in,
                           out=root / 'checkpoints' / 'sun')


def test_train_writes_checkpoints_when_the_step_crosses_save_freq(fits_run):
    model = fits_run.out / 'Model'
    assert saved_steps_in(model, '_G.pt') == EXPECTED_SAVES
    assert saved_steps_in(model, '_D.pt') == EXPECTED_SAVES
    assert not [n for n in os.listdir(model) if n.startswith('.tmp')]


def test_train_reports_when_the_step_crosses_report_freq(fits_run):
    lines = reports(fits_run.proc.stdout)
    assert [step for _, step, _, _ in lines] == EXPECTED_REPORTS
    assert [epoch for epoch, _, _, _ in lines] == [1, 1, 2, 2]
    assert all(math.isfinite(d) and math.isfinite(g) and d > 0 and g > 0 for _, _, d, g in lines)
    assert re.search(r'Total time', fits_run.proc.stdout)


def test_train_previews_when_the_step_crosses_display_freq(fits_run):
    folder = fits_run.out / 'Image' / 'Train'
    assert saved_steps_in(folder, '_real.png') == EXPECTED_PREVIEWS
    assert saved_steps_in(folder, '_fake.png') == EXPECTED_PREVIEWS
    for name in [f'{s}_{kind}.png' for s in EXPECTED_PREVIEWS for kind in ('real', 'fake')]:
        with Image.open(folder / name) as image:
            assert image.mode == 'L' and image.size == (64, 64)


def test_train_preview_is_the_first_target_of_the_batch(fits_run):
    # No shuffle: the batch ending at step 4 holds files 2 and 3; its first target is file 2.
    target_path = sorted(os.path.join(fits_run.train_tg, n) for n in
                         os.listdir(fits_run.train_tg))[2]
    target = fits.getdata(target_path).astype(np.float32)
    normalised = np.clip(target, -3000, 3000) / 3000
    expected = np.clip((normalised + 1) * 127.5, 0, 255)
    with Image.open(fits_run.out / 'Image' / 'Train' / '4_real.png') as image:
        preview = np.asarray(image).astype(np.float64)
    assert np.abs(preview - expected).max() <= 1.0


def test_checkpoints_are_plain_state_dicts(fits_run):
    opt = train_opt(*fits_run.flags)
    for step in EXPECTED_SAVES:
        for kind, network in (('G', Generator(opt)), ('D', Discriminator(opt))):
            state = torch.load(fits_run.out / 'Model' / f'{step}_{kind}.pt', map_location='cpu',
                               weights_only=True)
            assert isinstance(state, dict)
            assert not any(key.startswith('module.') for key in state)
            network.load_state_dict(state, strict=True)
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # Training changed the weights between saves.
    first = torch.load(fits_run.out / 'Model' / '6_G.pt', weights_only=True)
    last = torch.load(fits_run.out / 'Model' / '12_G.pt', weights_only=True)
    assert not torch.equal(first['model.1.weight'], last['model.1.weight'])


def test_train_records_its_options(fits_run):
    with open(fits_run.out / 'train_options.json') as f:
        options = json.load(f)
    assert options['dataset_name'] == 'sun' and options['n_gf'] == 8 and options['seed'] == 1
    assert options['logscale_input'] is True


def test_test_runs_every_checkpoint_in_ascending_order(fits_run):
    test_dir = fits_run.out / 'Image' / 'Test'
    assert set(os.listdir(test_dir)) == {*map(str, EXPECTED_SAVES), RECORD}
    order = [int(m) for m in re.findall(r'iteration (\d+)', fits_run.test_proc.stdout)]
    assert order == sorted(order) and set(order) == set(EXPECTED_SAVES)
    inputs = sorted(os.listdir(fits_run.test_in))
    for step in EXPECTED_SAVES:
        assert sorted(os.listdir(test_dir / str(step))) == \
            [n.replace('.fits', '_AI.fits') for n in inputs] + [RECORD]


def test_test_fits_output_values_and_header(fits_run):
    opt = train_opt(*fits_run.flags)
    for step in EXPECTED_SAVES:
        G = load_generator(opt, fits_run.out / 'Model' / f'{step}_G.pt')
        for name in sorted(os.listdir(fits_run.test_in)):
            with fits.open(os.path.join(fits_run.test_in, name)) as hdul:
                data, input_header = hdul[0].data.astype(np.float32), hdul[0].header
            out_path = fits_run.out / 'Image' / 'Test' / str(step) / name.replace('.fits',
                                                                                 '_AI.fits')
            with fits.open(out_path) as hdul:
                assert len(hdul) == 1
                out, header = hdul[0].data, hdul[0].header
            assert header['BITPIX'] == -32 and out.shape == (64, 64)
            # Header: pointing and time copied; unit and instrument those of the training
            # targets (gauss, the toy magnetograph), not the EUV input's; provenance added.
            for key in ('DATE-OBS', 'CTYPE1', 'CRPIX1', 'CDELT1', 'CTYPE2'):
                assert header[key] == input_header[key], key
            assert (header['BUNIT'], header['INSTRUME']) == ('G', 'MAG-TOY')
            assert 'WAVELNTH' not in header and header['ORIGIN'] == 'pix2pixCC'
            history = ' '.join(str(h) for h in header.get('HISTORY', []))
            assert 'pix2pixCC' in history and 'sun' in history and str(step) in history
            assert name in history
            # Values: physical units of the target, recomputed here by hand.
            x = np.log10(np.where(data <= 0, 1.0, data))
            x = (x - np.log10(200) / 2) / (np.log10(200) / 2)
            expected = np.clip(run_g(G, x[None])[0] * 3000, -3000, 3000)
            assert np.all(np.isfinite(out))
            assert out.min() >= -3000 and out.max() <= 3000
            assert np.abs(out - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


def copy_run(run, tmp_path):
    """A private copy of a run's checkpoints folder, for tests that add or remove files."""
    shutil.copytree(run.out, tmp_path / 'checkpoints' / 'sun')
    return tmp_path / 'checkpoints' / 'sun'


def test_test_single_iteration(fits_run, tmp_path):
    out = copy_run(fits_run, tmp_path)
    shutil.rmtree(out / 'Image' / 'Test')
    proc = run_test(fits_run.flags + ['--input_dir_test', fits_run.test_in, '--iteration', '10'],
                    cwd=tmp_path)
    assert_ok(proc)
    assert os.listdir(out / 'Image' / 'Test') == ['10']
    names = sorted(os.listdir(out / 'Image' / 'Test' / '10'))
    assert names == sorted(os.listdir(fits_run.out / 'Image' / 'Test' / '10'))
    for name in names[:-1]:  # (the last is the record)
        np.testing.assert_array_equal(
            fits.getdata(out / 'Image' / 'Test' / '10' / name),
            fits.getdata(fits_run.out / 'Image' / 'Test' / '10' / name))


def test_test_missing_iteration_is_a_usage_error(fits_run, tmp_path):
    copy_run(fits_run, tmp_path)
    proc = run_test(fits_run.flags + ['--input_dir_test', fits_run.test_in, '--iteration', '999'],
                    cwd=tmp_path)
    line = assert_usage_error(proc, '999')
    assert '6, 10, 12' in line  # lists what there is


def resume_from_6(run, tmp_path, *extra):
    """Copy the run, delete its checkpoints after step 6 and resume from step 6."""
    out = copy_run(run, tmp_path)
    originals = {}
    for name in os.listdir(out / 'Model'):
        if name.split('_')[0] in ('10', '12'):
            if name.endswith(('_G.pt', '_D.pt')):
                originals[name] = torch.load(out / 'Model' / name, weights_only=True)
            os.remove(out / 'Model' / name)
    before = (out / 'Model' / '6_G.pt').read_bytes()
    proc = run_train(run.flags + FREQS + ['--input_dir_train', run.train_in,
                                          '--target_dir_train', run.train_tg,
                                          '--latest_iter', '6', *extra], cwd=tmp_path)
    assert_ok(proc)
    assert (out / 'Model' / '6_G.pt').read_bytes() == before
    return out, proc, originals


@pytest.fixture(scope='module')
def resumed_fits(fits_run, tmp_path_factory):
    """The FITS run resumed from step 6 (its steps 10 and 12 done again)."""
    return resume_from_6(fits_run, tmp_path_factory.mktemp('resumed_fits'))


def test_resume_continues_from_the_checkpoint(fits_run, resumed_fits):
    out, proc, originals = resumed_fits
    assert saved_steps_in(out / 'Model', '_G.pt') == EXPECTED_SAVES
    assert saved_steps_in(out / 'Model', '_D.pt') == EXPECTED_SAVES
    lines = reports(proc.stdout)
    assert [step for _, step, _, _ in lines] == [10, 12]
    assert all(epoch == 2 for epoch, _, _, _ in lines)
    # Loaded from step 6, not started afresh: the resumed weights stay close to the
    # uninterrupted run's (a new initialisation would be far away).
    resumed = torch.load(out / 'Model' / '12_G.pt', weights_only=True)
    fresh = Generator(train_opt(*fits_run.flags)).state_dict()
    for key, value in originals['12_G.pt'].items():
        distance = float((resumed[key] - value).abs().max())
        assert distance < 0.01 < float((fresh[key] - value).abs().max()) or \
            value.numel() < 64, key


def test_resume_is_exact(resumed_fits):
    """Resuming at step 6 gives the uninterrupted run's weights (same order, augmentation,
    optimiser state)."""
    out, _, originals = resumed_fits
    for name, original in originals.items():
        resumed = torch.load(out / 'Model' / name, weights_only=True)
        for key in original:
            assert torch.equal(resumed[key], original[key]), (name, key)


def test_resume_with_a_new_learning_rate_uses_it(fits_run, tmp_path):
    """An --lr given when resuming is the one used (the options file and the log say so).
    With --lr 0 the weights must stay those of step 6."""
    out, proc, _ = resume_from_6(fits_run, tmp_path, '--lr', '0')
    for step in (10, 12):
        for kind in ('G', 'D'):
            resumed = torch.load(out / 'Model' / f'{step}_{kind}.pt', weights_only=True)
            start = torch.load(out / 'Model' / f'6_{kind}.pt', weights_only=True)
            for key in start:
                assert torch.equal(resumed[key], start[key]), (step, kind, key)


# ----------------------------------------------------------------------------------------
# npy, three channels (C x H x W), with validation during training
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def npy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('npy_run')
    train_in, train_tg = make_pairs(root / 'train', 'npy', n=6, size=32, channels=3)
    test_in, _ = make_pairs(root / 'test', 'npy', n=3, size=32, channels=3, seed=9,
                            prefix='val')
    flags = TINY + ['--dataset_name', 'rgb', '--data_format_input', 'npy',
                    '--data_format_target', 'npy', '--input_ch', '3', '--target_ch', '3',
                    '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '100',
                    '--saturation_lower_limit_target', '0',
                    '--saturation_upper_limit_target', '100']
    proc = run_train(flags + FREQS + ['--input_dir_train', train_in, '--target_dir_train',
                                      train_tg, '--val_during_train', '--input_dir_test', test_in,
                                      '--data_size', '32'], cwd=root)
    assert_ok(proc)
    return SimpleNamespace(root=root, proc=proc, flags=flags, test_in=test_in,
                           out=root / 'checkpoints' / 'rgb')


def assert_schedule(run):
    """Checkpoints, report lines and previews at the steps FREQS gives."""
    assert saved_steps_in(run.out / 'Model', '_G.pt') == EXPECTED_SAVES
    assert [step for _, step, _, _ in reports(run.proc.stdout)] == EXPECTED_REPORTS
    assert saved_steps_in(run.out / 'Image' / 'Train', '_fake.png') == EXPECTED_PREVIEWS


def test_npy_run_checkpoints_reports_previews(npy_run):
    assert_schedule(npy_run)
    for step in EXPECTED_PREVIEWS:
        with Image.open(npy_run.out / 'Image' / 'Train' / f'{step}_fake.png') as image:
            assert image.mode == 'RGB' and image.size == (32, 32)


def test_val_during_train_writes_test_outputs_at_every_save(npy_run):
    test_dir = npy_run.out / 'Image' / 'Test'
    assert sorted(int(n) for n in os.listdir(test_dir)) == EXPECTED_SAVES
    for step in EXPECTED_SAVES:
        assert sorted(os.listdir(test_dir / str(step))) == \
            [RECORD] + [f'val_{i:03d}_AI.npy' for i in range(3)]


def test_npy_test_output_matches_validation_and_units(npy_run):
    folder = npy_run.out / 'Image' / 'Test' / '12'
    validation = {name: np.load(folder / name) for name in os.listdir(folder)
                  if name.endswith('_AI.npy')}
    proc = run_test(npy_run.flags + ['--input_dir_test', npy_run.test_in, '--iteration', '12'],
                    cwd=npy_run.root)
    assert_ok(proc)
    opt = train_opt(*npy_run.flags)
    G = load_generator(opt, npy_run.out / 'Model' / '12_G.pt')
    for name, during_training in validation.items():
        out = np.load(folder / name)
        assert out.dtype == np.float32 and out.shape == (3, 32, 32)
        np.testing.assert_allclose(out, during_training, rtol=1e-5, atol=1e-4)
        x = np.load(os.path.join(npy_run.test_in, name.replace('_AI', '')))
        expected = run_g(G, (x - 50) / 50) * 50 + 50
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_validation_records_its_outputs_and_a_test_with_the_same_options_adds_to_them(npy_run):
    """--val_during_train writes the record a Test run with the same inputs and options
    writes, so that Test is not refused (the same files again); another is."""
    folder = npy_run.out / 'Image' / 'Test' / '10'
    record = record_in(folder)
    assert (record['iteration'], record['input_dir'], record['target_dir']) == \
        (10, os.path.abspath(npy_run.test_in), None)
    assert record['input_files'] == [f'val_{i:03d}.npy' for i in range(3)]
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    test = npy_run.flags + ['--input_dir_test', npy_run.test_in, '--iteration', '10']
    assert_ok(run_test(test, cwd=npy_run.root))
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert_usage_error(run_test(test + ['--save_scale', '2'], cwd=npy_run.root),
                       '--save_scale', '--output_dir', '--overwrite')
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_validation_replaces_the_outputs_of_a_generator_saved_anew(tmp_path, capsys):
    """At a save, the step's generator is new (a resumed run does the step again): what its
    folder held came from another generator, and goes; a user's other files stay."""
    input_dir, _ = make_pairs(tmp_path, 'npy', n=2)
    opt = train_opt(*NPY_DATA, '--n_workers', '0', '--input_dir_test', input_dir)
    folder = tmp_path / 'Image' / 'Test' / '6'
    os.makedirs(folder)
    for name in ('old_AI.npy', 'old_panel.png', 'metrics.csv', 'notes.txt'):
        (folder / name).write_text('earlier')
    (folder / RECORD).write_text('{"iteration": 6}')
    pix2pixCC_Test.translate(Generator(opt), CustomDataset(opt, split='test'), str(folder),
                             opt, torch.device('cpu'), 6)
    assert sorted(os.listdir(folder)) == ['img_000_AI.npy', 'img_001_AI.npy', 'notes.txt',
                                          RECORD]
    notices = [line for line in capsys.readouterr().out.splitlines() if str(folder) in line]
    assert len(notices) == 1 and 'removed' in notices[0], notices
    record = record_in(folder)
    assert record['iteration'] == 6 and record['input_files'] == ['img_000.npy', 'img_001.npy']


# ----------------------------------------------------------------------------------------
# TIFF float32, batch size that does not divide the data, odd-sized test inputs
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tif_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('tif_run')
    train_in, train_tg = make_pairs(root / 'train', 'tif', n=6, size=32)
    flags = TINY + ['--dataset_name', 'tiff', '--data_format_input', 'tif',
                    '--data_format_target', 'tif',
                    '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '100',
                    '--saturation_lower_limit_target', '0',
                    '--saturation_upper_limit_target', '100']
    # Batch 4 over 6 files: steps 4, 6, 10, 12 (the last batch of each epoch has 2 samples).
    proc = run_train(flags + ['--input_dir_train', train_in, '--target_dir_train', train_tg,
                              '--batch_size', '4', '--n_epochs', '2', '--report_freq', '3',
                              '--save_freq', '5', '--display_freq', '100', '--data_size', '32',
                              '--max_rotation_angle', '10', '--padding_size', '3'], cwd=root)
    assert_ok(proc)
    return SimpleNamespace(root=root, proc=proc, flags=flags, out=root / 'checkpoints' / 'tiff')


def test_tif_run_with_uneven_batches(tif_run):
    assert [step for _, step, _, _ in reports(tif_run.proc.stdout)] == [4, 6, 10, 12]
    assert saved_steps_in(tif_run.out / 'Model', '_G.pt') == [6, 10, 12]
    folder = tif_run.out / 'Image' / 'Train'  # display_freq 100 is never crossed
    assert saved_steps_in(folder, '_real.png') == [] and saved_steps_in(folder, '_fake.png') == []


def test_tif_test_pads_sizes_that_are_not_multiples_of_the_strides_and_crops_back(tif_run,
                                                                                   tmp_path):
    """An input whose size the network cannot take is padded with its edge values and the
    output cropped back: the same values as the Test script gives for the input padded by
    hand (a size it takes as it is), cropped."""
    test_in = tmp_path / 'odd'
    os.makedirs(test_in)
    rng = np.random.default_rng(4)
    sizes = [(30, 30), (27, 41)]
    for i, size in enumerate(sizes):
        odd = rng.uniform(0, 100, size).astype(np.float32)
        padded = np.pad(odd, ((0, -size[0] % 4), (0, -size[1] % 4)), mode='edge')
        write_user_file(str(test_in / f'odd_{i}.tif'), odd, 'tif')
        write_user_file(str(test_in / f'padded_{i}.tif'), padded, 'tif')
    proc = run_test(tif_run.flags + ['--input_dir_test', test_in, '--iteration', '12'],
                    cwd=tif_run.root)
    assert_ok(proc)
    folder = tif_run.out / 'Image' / 'Test' / '12'
    for i, size in enumerate(sizes):
        out = tifffile.imread(folder / f'odd_{i}_AI.tif')
        by_hand = tifffile.imread(folder / f'padded_{i}_AI.tif')
        assert out.dtype == np.float32 and out.shape == size
        assert by_hand.shape != size and out.std() > 0
        np.testing.assert_allclose(out, by_hand[:size[0], :size[1]], rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------
# PNG, 8 bits
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def png_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('png_run')
    train_in, train_tg = make_pairs(root / 'train', 'png', n=6, size=32)
    test_in, _ = make_pairs(root / 'test', 'png', n=2, size=32, seed=3, prefix='t')
    flags = TINY + ['--dataset_name', 'png8', '--data_format_input', 'png',
                    '--data_format_target', 'png',
                    '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '255',
                    '--saturation_lower_limit_target', '0',
                    '--saturation_upper_limit_target', '255', '--saturation_clip_target', 'True']
    proc = run_train(flags + FREQS + ['--input_dir_train', train_in, '--target_dir_train',
                                      train_tg, '--data_size', '32'], cwd=root)
    assert_ok(proc)
    test_proc = run_test(flags + ['--input_dir_test', test_in, '--iteration', '-1'], cwd=root)
    assert_ok(test_proc)
    return SimpleNamespace(root=root, proc=proc, flags=flags, test_in=test_in,
                           out=root / 'checkpoints' / 'png8')


def test_png_run_outputs(png_run):
    assert_schedule(png_run)
    opt = train_opt(*png_run.flags)
    for step in EXPECTED_SAVES:
        G = load_generator(opt, png_run.out / 'Model' / f'{step}_G.pt')
        for name in ('t_000', 't_001'):
            with Image.open(png_run.out / 'Image' / 'Test' / str(step) / f'{name}_AI.png') as im:
                assert im.mode == 'L' and im.size == (32, 32)
                out = np.asarray(im)
            assert out.dtype == np.uint8
            with Image.open(os.path.join(png_run.test_in, f'{name}.png')) as im:
                x = np.asarray(im).astype(np.float32) / 127.5 - 1
            expected = np.clip(np.rint(run_g(G, x[None])[0] * 127.5 + 127.5), 0, 255)
            assert np.abs(out.astype(float) - expected).max() <= 1


# ----------------------------------------------------------------------------------------
# Every output format, in-process, with a generator of known constant output
# ----------------------------------------------------------------------------------------

def constant_generator_checkpoint(opt, value, step=3):
    """Save a generator whose output is `value` everywhere (last conv: weight 0, bias value)."""
    G = Generator(opt)
    with torch.no_grad():
        G.model[-1].weight.zero_()
        G.model[-1].bias.fill_(value)
    os.makedirs(opt.model_dir, exist_ok=True)
    torch.save(G.state_dict(), os.path.join(opt.model_dir, f'{step}_G.pt'))


@pytest.mark.parametrize('target_format, limits, log, output, expected, kind', [
    ('fits', (-3000, 3000), False, 0.5, 1500.0, 'f4'),
    ('fts', (-3000, 3000), False, -0.25, -750.0, 'f4'),
    ('fit', (1, 10000), True, 0.5, 1000.0, 'f4'),
    ('npy', (1, 10000), True, -1.0, 1.0, 'f4'),
    ('tif', (0, 100), False, 0.5, 75.0, 'f4'),
    ('tiff', (0, 100), False, 2.0, 150.0, 'f4'),  # unclipped: beyond the limit
    ('png', (0, 255), False, 0.0, 128.0, 'u1'),   # 127.5 rounded
    ('png', (0, 4000), False, 0.5, 3000.0, 'u2'),  # 16-bit PNG above 255
    ('jpg', (0, 255), False, 0.6, 204.0, 'u1'),
    ('jpeg', (0, 255), False, 2.0, 255.0, 'u1'),  # clipped to the type's range
])
def test_every_target_format(in_tmp, target_format, limits, log, output, expected, kind):
    os.makedirs('inputs')
    for i in range(2):
        np.save(f'inputs/in_{i}.npy', np.random.default_rng(i).uniform(0, 1, (32, 32)))
    flags = ['--dataset_name', 'fmt', '--data_format_input', 'npy',
             '--data_format_target', target_format, '--saturation_lower_limit_input', '0',
             '--saturation_upper_limit_input', '1',
             '--saturation_lower_limit_target', str(limits[0]),
             '--saturation_upper_limit_target', str(limits[1]),
             '--logscale_target', str(log), '--input_dir_test', 'inputs', '--n_workers', '0']
    constant_generator_checkpoint(make_test_opt(*flags), output)
    assert pix2pixCC_Test.main(TINY + flags + ['--iteration', '3']) == 0
    for i in range(2):
        path = f'checkpoints/fmt/Image/Test/3/in_{i}_AI.{target_format}'
        data = read_user_file(path, target_format)
        assert data.shape == (32, 32)
        assert data.dtype.kind == kind[0] and data.dtype.itemsize == int(kind[1])
        np.testing.assert_allclose(data.astype(np.float64), expected, rtol=1e-5)


def test_test_uses_save_scale(in_tmp):
    os.makedirs('inputs')
    np.save('inputs/a.npy', np.zeros((32, 32), np.float32))
    flags = ['--dataset_name', 'sc', '--data_format_input', 'npy', '--data_format_target', 'npy',
             '--saturation_lower_limit_target', '-3000', '--saturation_upper_limit_target', '3000',
             '--save_scale', '0.001', '--input_dir_test', 'inputs', '--n_workers', '0']
    constant_generator_checkpoint(make_test_opt(*flags), 0.5)
    assert pix2pixCC_Test.main(TINY + flags + ['--iteration', '3']) == 0
    np.testing.assert_allclose(np.load('checkpoints/sc/Image/Test/3/a_AI.npy'), 1.5, rtol=1e-5)


@pytest.mark.parametrize('save_scale, bunit, unit_format', [
    ('1000', '10**-3 G', 'fits'),  # a power of ten: as the FITS standard writes it
    ('2.5', '0.4 G', 'generic'),   # any other factor: astropy's (and sunpy's) generic format
])
def test_save_scale_scales_bunit_so_the_physical_values_stay(in_tmp, save_scale, bunit,
                                                              unit_format):
    """README "Output files": a product written with --save_scale, read with its own BUNIT,
    is the same physical quantity as the product written without it."""
    os.makedirs('inputs')
    np.save('inputs/a.npy', np.zeros((32, 32), np.float32))
    flags = ['--dataset_name', 'su', '--data_format_input', 'npy', '--data_format_target',
             'fits', '--target_unit', 'G', '--saturation_lower_limit_target', '-3000',
             '--saturation_upper_limit_target', '3000', '--input_dir_test', 'inputs',
             '--n_workers', '0']
    constant_generator_checkpoint(make_test_opt(*flags), 0.5)
    quantities = {}
    for scale in ('1', save_scale):
        assert pix2pixCC_Test.main(TINY + flags + ['--save_scale', scale, '--iteration', '3',
                                                   '--output_dir', f'scale_{scale}']) == 0
        with fits.open(f'scale_{scale}/a_AI.fits') as hdul:
            header = hdul[0].header
            quantities[scale] = hdul[0].data * u.Unit(header['BUNIT'])
    assert header['BUNIT'] == bunit
    assert u.Unit(bunit, format=unit_format) == u.Unit(1 / float(save_scale) * u.G)
    np.testing.assert_allclose(quantities[save_scale].to_value(u.G), 1500.0, rtol=1e-6)
    np.testing.assert_allclose(quantities[save_scale].to_value(u.G),
                               quantities['1'].to_value(u.G), rtol=1e-6)
    assert quantities['1'].unit == u.G


@pytest.mark.filterwarnings('ignore::astropy.wcs.FITSFixedWarning')  # MJD-OBS noted
def test_map_from_aia_cubes_is_usable_by_wcs_readers_and_carries_no_aia_exposure(in_tmp):
    """A Test run on 3-passband AIA cubes (README "Output files"): the magnetogram's WCS is
    the cubes' image plane (2 axes, the same sky at every pixel), the AIA exposure, values,
    processing and file cards are gone, and the BLANK card of the float cubes gives no
    warning at each header read."""
    os.makedirs('inputs')
    cards = aia_cube_header(32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # astropy's note on the BLANK card
        fits.PrimaryHDU(np.full((3, 32, 32), 100, np.float32), header=cards).writeto(
            'inputs/aia_20110215.fits')
        input_wcs = WCS(fits.getheader('inputs/aia_20110215.fits')).celestial
    flags = ['--dataset_name', 'cube', '--data_format_input', 'fits', '--data_format_target',
             'fits', '--input_ch', '3', '--target_unit', 'G', '--input_dir_test', 'inputs',
             '--n_workers', '0']
    constant_generator_checkpoint(make_test_opt(*flags), 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert pix2pixCC_Test.main(TINY + flags + ['--iteration', '3']) == 0
    assert not [str(w.message) for w in caught if 'BLANK' in str(w.message)]
    header = fits.getheader('checkpoints/cube/Image/Test/3/aia_20110215_AI.fits')
    wcs = WCS(header)
    assert wcs.wcs.naxis == 2 and (header['NAXIS1'], header['NAXIS2']) == (32, 32)
    pixels = [[0, 0], [10, 20], [31, 31]]
    np.testing.assert_allclose(wcs.wcs_pix2world(pixels, 0), input_wcs.wcs_pix2world(pixels, 0),
                               rtol=0, atol=1e-9)
    for key in ('EXPTIME', 'DN_GAIN', 'EFF_AREA', 'PIXLUNIT', 'QUALITY', 'LVL_NUM', 'FSN',
                'DATE', 'DATAP01', 'DATAP99', 'DATACENT', 'NSATPIX', 'TOTVALS', 'PERCENTD',
                'DATAMIN2', 'WAVELNTH', 'CTYPE3'):
        assert key not in header, key
    assert (header['DATE-OBS'], header['HGLN_OBS'], header['DSUN_OBS']) == \
        (cards['DATE-OBS'], cards['HGLN_OBS'], cards['DSUN_OBS'])


def test_test_copies_no_header_when_the_input_is_not_fits(in_tmp):
    os.makedirs('inputs')
    np.save('inputs/a.npy', np.zeros((32, 32), np.float32))
    flags = ['--dataset_name', 'nh', '--data_format_input', 'npy', '--data_format_target',
             'fits', '--input_dir_test', 'inputs', '--n_workers', '0']
    constant_generator_checkpoint(make_test_opt(*flags), 0.25)
    assert pix2pixCC_Test.main(TINY + flags + ['--iteration', '3']) == 0
    with fits.open('checkpoints/nh/Image/Test/3/a_AI.fits') as hdul:
        np.testing.assert_allclose(hdul[0].data, 0.25)
        header = hdul[0].header
    # Only what astropy writes for any float32 image and our provenance (ORIGIN, HISTORY): no
    # card taken from anywhere else.
    assert set(header) - {'HISTORY', 'COMMENT'} <= {'SIMPLE', 'BITPIX', 'NAXIS', 'NAXIS1',
                                                    'NAXIS2', 'EXTEND', 'ORIGIN'}, repr(header)
    assert header['ORIGIN'] == 'pix2pixCC'
    assert header['BITPIX'] == -32


# ----------------------------------------------------------------------------------------
# BatchNorm (README "maps to simulations"), JPEG previews, resuming with new Adam betas
# ----------------------------------------------------------------------------------------

BN_FLAGS = TINY + NPY_DATA + ['--dataset_name', 'bn', '--norm_type', 'BatchNorm2d',
                              '--image_mode', 'jpg', '--n_workers', '0']
BN_FREQS = ['--seed', '2', '--batch_size', '2', '--n_epochs', '2', '--save_freq', '6',
            '--report_freq', '6', '--display_freq', '4', '--keep_states', '0']


@pytest.fixture(scope='module')
def bn_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('bn_run')
    train_in, train_tg = make_pairs(root / 'train', 'npy', n=6, size=32)
    test_in, _ = make_pairs(root / 'test', 'npy', n=2, size=32, seed=7, prefix='t')
    data = ['--input_dir_train', train_in, '--target_dir_train', train_tg]
    proc = run_train(BN_FLAGS + BN_FREQS + data, cwd=root)
    assert_ok(proc)
    test_proc = run_test(BN_FLAGS + ['--input_dir_test', test_in, '--iteration', '12'], cwd=root)
    assert_ok(test_proc)
    return SimpleNamespace(root=root, data=data, test_in=test_in,
                           out=root / 'checkpoints' / 'bn')


def test_batchnorm_test_output_uses_the_running_statistics(bn_run):
    """Test gives G's eval-mode output (BatchNorm's running mean and variance of training),
    not a normalisation by the test image's own statistics."""
    opt = train_opt(*BN_FLAGS)
    G = load_generator(opt, bn_run.out / 'Model' / '12_G.pt')
    assert float(G.model[2].running_var.sub(1).abs().max()) > 1e-3  # trained statistics
    for name in ('t_000', 't_001'):
        x = (np.load(os.path.join(bn_run.test_in, f'{name}.npy')) - 50) / 50
        out = np.load(bn_run.out / 'Image' / 'Test' / '12' / f'{name}_AI.npy')
        expected = run_g(G, x[None]) * 50 + 50
        np.testing.assert_allclose(out, expected[0], rtol=1e-5, atol=1e-4)
        # (a copy: a forward pass in training mode updates the running statistics)
        batch_statistics = run_g(copy.deepcopy(G).train(), x[None]) * 50 + 50
        assert np.abs(out - batch_statistics[0]).max() > 1e-2


def test_previews_in_another_image_mode(bn_run):
    folder = bn_run.out / 'Image' / 'Train'
    assert saved_steps_in(folder, '_real.jpg') == [4, 8, 12]
    assert saved_steps_in(folder, '_fake.jpg') == [4, 8, 12]
    assert saved_steps_in(folder, '_real.png') == []
    with Image.open(folder / '8_fake.jpg') as image:
        assert image.format == 'JPEG' and image.size == (32, 32)


def resume_bn_from_6(run, tmp_path, *extra):
    shutil.copytree(run.out, tmp_path / 'checkpoints' / 'bn')
    for kind in ('G', 'D', 'state'):
        os.remove(tmp_path / 'checkpoints' / 'bn' / 'Model' / f'12_{kind}.pt')
    assert_ok(run_train(BN_FLAGS + BN_FREQS + run.data + ['--latest_iter', '6', *extra],
                        cwd=tmp_path))
    return tmp_path / 'checkpoints' / 'bn' / 'Model'


def test_resumed_batchnorm_run_equals_the_uninterrupted_one(bn_run, tmp_path):
    """Weights and BatchNorm's running statistics alike."""
    resumed = resume_bn_from_6(bn_run, tmp_path)
    for kind in ('G', 'D'):
        assert_same_weights(resumed / f'12_{kind}.pt', bn_run.out / 'Model' / f'12_{kind}.pt',
                            tolerance=0)


def test_adam_betas_given_when_resuming_take_effect(bn_run, tmp_path):
    resumed = resume_bn_from_6(bn_run, tmp_path, '--beta1', '0.9', '--beta2', '0.95')
    state = load(resumed / '12_state.pt')
    for name in ('G_optim', 'D_optim'):
        assert state[name]['param_groups'][0]['betas'] == (0.9, 0.95)
    assert state['options']['beta1'] == 0.9 and state['options']['beta2'] == 0.95
    # ... and the steps after 6 used them: not the uninterrupted run's weights.
    new, old = load(resumed / '12_G.pt'), load(bn_run.out / 'Model' / '12_G.pt')
    assert float((new['model.1.weight'] - old['model.1.weight']).abs().max()) > 1e-5


# ----------------------------------------------------------------------------------------
# Test output folders: --output_dir, one run's outputs per folder, --overwrite (README
# "Output files"; the refusals are in test_errors.py)
# ----------------------------------------------------------------------------------------

FOLDER_FLAGS = TINY + NPY_DATA + ['--dataset_name', 'folders', '--n_workers', '0']


@pytest.fixture
def untrained(in_tmp):
    """A run folder with (untrained) generators at steps 2 and 4, and two test pairs."""
    model = in_tmp / 'checkpoints' / 'folders' / 'Model'
    os.makedirs(model)
    state = Generator(train_opt()).state_dict()
    for step in (2, 4):
        torch.save(state, model / f'{step}_G.pt')
    input_dir, target_dir = make_pairs(in_tmp / 'a', 'npy', n=2)
    return ['--input_dir_test', input_dir, '--target_dir_test', target_dir]


def record_in(folder):
    with open(os.path.join(folder, RECORD)) as f:
        return json.load(f)


def test_output_dir_takes_one_generator_straight_and_every_one_in_subfolders(untrained):
    assert pix2pixCC_Test.main(FOLDER_FLAGS + untrained + ['--iteration', '4',
                                                           '--output_dir', 'one']) == 0
    outputs = ['img_000_AI.npy', 'img_001_AI.npy', 'metrics.csv', 'metrics_summary.json',
               RECORD]
    assert sorted(os.listdir('one')) == outputs
    assert pix2pixCC_Test.main(FOLDER_FLAGS + untrained + ['--iteration', '-1',
                                                           '--output_dir', 'every']) == 0
    assert sorted(os.listdir('every')) == ['2', '4', 'metrics_by_iteration.csv', RECORD]
    assert sorted(os.listdir('every/4')) == outputs
    np.testing.assert_array_equal(np.load('every/4/img_001_AI.npy'),
                                  np.load('one/img_001_AI.npy'))
    assert not os.path.exists('checkpoints/folders/Image')
    # The record: generator, inputs, targets and what changes the files.
    record = record_in('one')
    assert record == record_in('every/4')
    assert record_in('every') == {**record, 'iteration': -1}
    assert (record['run'], record['iteration']) == (os.path.abspath('checkpoints/folders'), 4)
    assert (record['input_dir'], record['target_dir']) == tuple(
        os.path.abspath(folder) for folder in untrained[1::2])
    assert record['input_files'] == record['target_files'] == ['img_000.npy', 'img_001.npy']
    assert record['precision'] == 'float32'
    for name, value in (('n_gf', 8), ('n_downsample', 2), ('data_format_target', 'npy'),
                        ('saturation_upper_limit_target', 100), ('logscale_input', False),
                        ('save_scale', 1), ('metric_bins', [1, 2, 4, 8]),
                        ('save_panels', False)):
        assert record['options'][name] == value, name


def test_the_same_command_again_writes_the_same_outputs(untrained):
    command = FOLDER_FLAGS + untrained + ['--save_panels']  # every generator, default folders
    assert pix2pixCC_Test.main(command) == 0
    folder = 'checkpoints/folders/Image/Test'
    first = {name: content for name, (content, _) in snapshot(folder).items()}
    assert sorted(first) == sorted(
        [RECORD, 'metrics_by_iteration.csv'] +
        [os.path.join(step, name) for step in ('2', '4') for name in (
            'img_000_AI.npy', 'img_000_panel.png', 'img_001_AI.npy', 'img_001_panel.png',
            'metrics.csv', 'metrics_summary.json', RECORD)])
    assert pix2pixCC_Test.main(command) == 0
    assert {name: content for name, (content, _) in snapshot(folder).items()} == first


def test_overwrite_removes_only_what_a_test_run_writes(untrained, capsys):
    assert pix2pixCC_Test.main(FOLDER_FLAGS + untrained + ['--iteration', '2', '--output_dir',
                                                           'out', '--save_panels']) == 0
    os.makedirs('out/mine')
    for path in ('out/notes.txt', 'out/mine/img_000_AI.npy', 'out/a.npy'):
        with open(path, 'w') as f:
            f.write('kept')
    other_dir, _ = make_pairs('b', 'npy', n=1, prefix='other')
    other = FOLDER_FLAGS + ['--input_dir_test', other_dir, '--iteration', '4',
                            '--output_dir', 'out']
    assert run_main(pix2pixCC_Test.main, other) == 2  # refused ...
    assert '--overwrite' in capsys.readouterr().err
    assert pix2pixCC_Test.main(other + ['--overwrite']) == 0  # ... unless asked
    assert sorted(os.listdir('out')) == ['a.npy', 'mine', 'notes.txt', 'other_000_AI.npy',
                                         RECORD]
    assert os.listdir('out/mine') == ['img_000_AI.npy']
    assert record_in('out')['input_files'] == ['other_000.npy']


# ----------------------------------------------------------------------------------------
# Inference loads the weights once (mapped from the file), with unchanged outputs
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm_type', ['InstanceNorm2d', 'BatchNorm2d'])
@pytest.mark.parametrize('legacy_format', [False, True])
def test_generator_loaded_for_inference_gives_bit_identical_outputs(tmp_path, norm_type,
                                                                    legacy_format):
    """The Test script's generator (built on 'meta', weights mapped from the checkpoint)
    computes exactly what a generator built and loaded the plain way computes; files in
    PyTorch's legacy format, which cannot be mapped, load too."""
    from pix2pixCC_Networks import Generator, weights_init
    opt = train_opt('--norm_type', norm_type)
    trained = Generator(opt).apply(weights_init)
    if norm_type == 'BatchNorm2d':  # running statistics that differ from the initial ones
        trained.train()
        with torch.no_grad():
            trained(torch.randn(4, 1, 32, 32))
    path = str(tmp_path / '7_G.pt')
    torch.save(trained.state_dict(), path, _use_new_zipfile_serialization=not legacy_format)

    plain = Generator(opt)
    plain.load_state_dict(torch.load(path, weights_only=True))
    mapped = pix2pixCC_Test.load_generator(opt, path, torch.device('cpu'))
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        expected = plain.eval()(x)
        # twice: the second pass runs on weights whose pages the first one gave back
        for _ in range(2):
            assert torch.equal(mapped.eval()(x), expected)
    assert not any(p.is_meta for p in mapped.parameters())
    assert not any(b.is_meta for b in mapped.buffers())


def resident_kib_of(path):
    """KiB of `path`'s mappings resident in this process (Linux's /proc/self/smaps)."""
    real, total, inside = os.path.realpath(path), 0, False
    with open('/proc/self/smaps') as f:
        for line in f:
            fields = line.split()
            if '-' in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) == 6 and fields[5] == real
            elif inside and fields[0] == 'Rss:':
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='Linux page accounting')
def test_inference_holds_a_layers_mapped_weights_only_while_it_runs(tmp_path):
    """The Test script's generator gives the pages of each layer's weights back after the
    layer has run: after a forward, almost none of the checkpoint is resident in the process
    (it stays in the OS's page cache), while a forward without that keeps all of it."""
    from pix2pixCC_Networks import Generator, weights_init
    opt = train_opt('--n_gf', '32', '--n_residual', '3')  # ~9 MB of weights
    path = str(tmp_path / '7_G.pt')
    torch.save(Generator(opt).apply(weights_init).state_dict(), path)
    size = os.path.getsize(path) / 1024
    x = torch.randn(1, 1, 32, 32)

    G = pix2pixCC_Test.load_generator(opt, path, torch.device('cpu'))
    with torch.inference_mode():
        G.eval()(x)
    assert resident_kib_of(path) < 0.05 * size, (resident_kib_of(path), size)

    kept = pix2pixCC_Test.load_generator(opt, path, torch.device('cpu'))
    for layer in kept.modules():
        layer._forward_hooks.clear()
    with torch.inference_mode():
        kept.eval()(x)
    assert resident_kib_of(path) > 0.9 * size
    del G, kept
