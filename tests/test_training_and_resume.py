"""Training and resuming it, as README "Quick start", "Output files" and "Resuming and
reproducibility" document them: the driver's step, when it reports, saves and previews
(README "Differences from the reference code": every N samples), one run of each data format
trained and then tested (its Test outputs checked here, beside the run they come from), the
checkpoints and training states, exact resumes, which checkpoint --latest_iter takes, seeds,
the options that travel from training to the Test script, and a loss that becomes NaN
(README "What happens when…"). Runs inspected by several tests are module-scoped fixtures; a
test that changes a run works on a copy (conftest.copy_run). Signals, the lock and write
failures are in test_long_runs.py, the training log in test_evaluation.py.
"""
import copy
import json
import math
import os
import re
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from astropy.io import fits
from PIL import Image

import pix2pixCC_Networks
import pix2pixCC_Train
import pix2pixCC_Utils
from conftest import (AUGMENT, CPU, NPY_DATA, RECORD, SAMPLE_DATA, TINY, TINY_NETWORK,
                      assert_identical_weights, assert_ok, assert_same_weights,
                      assert_usage_error, biases_before_norm, copy_run, copy_sample,
                      formats_and_limits, generate, load, load_generator, loss_rows,
                      make_pairs, model_dir, models_and_data, record_in, reported_steps,
                      reports, run_test, run_train, saved_steps_in, snapshot, train_opt,
                      write_user_file)
from pix2pixCC_Networks import Discriminator, Generator, Loss
from pix2pixCC_Options import UserError, run_main
from pix2pixCC_Train import crossed, make_optimizer, train_step
from pix2pixCC_Utils import (Precision, load_state_dict, prepare_network, save_state_dict,
                             saved_steps, to_preview)



# ----------------------------------------------------------------------------------------
# 1. The training step
# ----------------------------------------------------------------------------------------

def plain_adam(module, opt):
    return torch.optim.Adam(module.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                            foreach=False)


def plain_step(G, D, G_optim, D_optim, opt, input, target):
    """The step written out plainly: zero_grad before each backward, G step then D step."""
    loss_D, loss_G, _, _ = Loss(opt)(D, G, input, target)
    G_optim.zero_grad()
    loss_G.backward()
    G_optim.step()
    D_optim.zero_grad()
    loss_D.backward()
    D_optim.step()
    return loss_D.item(), loss_G.item()


def drifting(module):
    """Keys that may drift apart: the noise-gradient biases (see conftest.biases_before_norm)
    and, with them, BatchNorm's running means."""
    return biases_before_norm(module) | {key for key in module.state_dict()
                                         if key.endswith('running_mean')}


def assert_driver_step_equals_plain_step(opt, G, D, input, target, steps=3, tolerance=1e-6):
    """The driver's step (train_step with make_optimizer: fused Adam, D frozen during the
    generator's pass, gradients released after the step) on networks placed by
    prepare_network matches a plain hand-written step (for-loop Adam, zero_grad before each
    backward, PyTorch's default convolutions) from the same weights and data."""
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    G, D = prepare_network(G, opt, CPU), prepare_network(D, opt, CPU)
    G_optim, D_optim = make_optimizer(G.parameters(), opt), make_optimizer(D.parameters(), opt)
    ref_optims = plain_adam(G_ref, opt), plain_adam(D_ref, opt)
    precision = Precision(opt, CPU)
    for _ in range(steps):
        losses_ref = plain_step(G_ref, D_ref, *ref_optims, opt, input, target)
        loss_D, loss_G, _, _ = train_step(Loss(opt), G, D, G_optim, D_optim, precision, input,
                                          target)
        np.testing.assert_allclose([loss_D.item(), loss_G.item()], losses_ref, rtol=1e-5)
        # Adam moves every weight by ~lr (2e-4) per step: the tolerance is far below one step.
        # The noise-gradient biases may move either way from the first step on.
        for module, ref in ((G, G_ref), (D, D_ref)):
            assert_same_weights(module, ref, tolerance, skip=drifting(module))
        # The driver releases the gradients after the step (lower peak memory) ...
        assert all(p.grad is None for p in list(G.parameters()) + list(D.parameters()))
    assert all(p.requires_grad for p in D.parameters())  # ... and D is unfrozen after it
    return G_optim, D_optim


@pytest.mark.parametrize('norm_type', ['InstanceNorm2d', 'BatchNorm2d'])
def test_driver_step_equals_a_plain_step(norm_type):
    opt = train_opt(norm_type=norm_type, n_D=2, batch_size=2)
    G, D, input, target = models_and_data(opt, size=64)
    G_optim, D_optim = assert_driver_step_equals_plain_step(opt, G, D, input, target)
    assert G_optim.defaults['fused'] and D_optim.defaults['fused']  # torch >= 2.4 on the CPU


def test_make_optimizer_falls_back_to_plain_adam_where_fused_is_refused(monkeypatch):
    """A torch without fused Adam for the device raises RuntimeError for fused=True: the
    driver then trains with the default implementation, with the options' lr and betas."""
    real_adam = torch.optim.Adam
    refused = []

    def adam(parameters, **kwargs):
        if kwargs.get('fused'):
            refused.append(kwargs)
            raise RuntimeError('`fused=True` requires all the params to be floating point '
                               'Tensors of supported devices')
        return real_adam(parameters, **kwargs)

    monkeypatch.setattr(torch.optim, 'Adam', adam)
    opt = train_opt(lr=1e-3, beta1=0.3, beta2=0.9)
    G, D, input, target = models_and_data(opt)
    G_optim, D_optim = assert_driver_step_equals_plain_step(opt, G, D, input, target, steps=2)
    assert len(refused) == 2
    for optimizer in (G_optim, D_optim):
        assert not optimizer.defaults['fused']
        assert optimizer.defaults['lr'] == 1e-3 and optimizer.defaults['betas'] == (0.3, 0.9)


def test_fused_and_plain_adam_states_interchange():
    """A training state saved with one Adam implementation resumes with the other."""
    opt = train_opt()
    G, D, input, target = models_and_data(opt)
    precision = Precision(opt, CPU)

    def adams(G, D, kind):
        fused = {'fused': True} if kind == 'fused' else {'foreach': False}
        return [torch.optim.Adam(m.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                 **fused) for m in (G, D)]

    for saved_with, loaded_with in (('plain', 'fused'), ('fused', 'plain')):
        optims = adams(G, D, saved_with)
        train_step(Loss(opt), G, D, *optims, precision, input, target)
        state = copy.deepcopy([o.state_dict() for o in optims])  # state_dict() shares tensors
        G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
        resumed = adams(G2, D2, loaded_with)
        for o, s in zip(resumed, copy.deepcopy(state), strict=True):
            o.load_state_dict(s)
        G3, D3 = copy.deepcopy(G), copy.deepcopy(D)
        same = adams(G3, D3, saved_with)
        for o, s in zip(same, copy.deepcopy(state), strict=True):
            o.load_state_dict(s)
        train_step(Loss(opt), G2, D2, *resumed, precision, input, target)
        train_step(Loss(opt), G3, D3, *same, precision, input, target)
        assert_same_weights(G2, G3, 1e-6)
        assert_same_weights(D2, D3, 1e-6)


# ----------------------------------------------------------------------------------------
# 2. Reports, checkpoints and previews: when the step crosses a frequency, and what a
#    preview shows
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('previous, current, frequency, expected', [
    (0, 2, 3, False), (2, 4, 3, True), (4, 6, 3, True), (6, 8, 3, False), (8, 10, 3, True),
    (0, 1, 1, True), (99, 100, 100, True), (100, 101, 100, False), (0, 250, 100, True),
])
def test_crossed(previous, current, frequency, expected):
    assert crossed(previous, current, frequency) is expected


def test_every_multiple_triggers_whatever_the_batch_size():
    for batch in (1, 2, 3, 4, 7):
        for frequency in (1, 3, 5, 10):
            steps = range(batch, 60 + 1, batch)
            fired = {step for step in steps if crossed(step - batch, step, frequency)}
            # Each multiple of the frequency triggers the first step that reaches it ...
            for multiple in range(frequency, steps[-1] + 1, frequency):
                assert -(-multiple // batch) * batch in fired, (batch, frequency, multiple)
            # ... and nothing else triggers.
            for step in fired:
                assert any(m % frequency == 0 for m in range(step - batch + 1, step + 1))


def test_to_preview():
    t = torch.tensor([[[-1.0, 0.0, 1.0, 3.0]]])
    np.testing.assert_array_equal(to_preview(t), [[0, 127, 255, 255]])
    np.testing.assert_array_equal(to_preview(t, display_scale=0.5), [[0, 63, 127, 255]])
    assert to_preview(torch.zeros(3, 4, 5)).shape == (4, 5, 3)
    assert to_preview(torch.zeros(2, 4, 5)).shape == (4, 10)


FREQS = ['--batch_size', '2', '--n_epochs', '2', '--report_freq', '3', '--save_freq', '5',
         '--display_freq', '4', '--keep_states', '0']
# 6 files, batch 2, 2 epochs: steps 2, 4, ..., 12. Crossing multiples of 3 -> reports at
# 4, 6, 10, 12; of 5 -> saves at 6, 10 (+ the final 12); of 4 -> previews at 4, 8, 12.
EXPECTED_REPORTS = [4, 6, 10, 12]
EXPECTED_SAVES = [6, 10, 12]
EXPECTED_PREVIEWS = [4, 8, 12]


# ----------------------------------------------------------------------------------------
# 3. The sample (FITS, one channel, two discriminator scales), trained and tested
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('fits_run')
    train_in, train_tg, test_in = copy_sample(root / 'data', n_train=6, n_test=3)
    data_flags = TINY + SAMPLE_DATA + ['--dataset_name', 'sun', '--n_D', '2']
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
            expected = np.clip(generate(G, x[None])[0] * 3000, -3000, 3000)
            assert np.all(np.isfinite(out))
            assert out.min() >= -3000 and out.max() <= 3000
            assert np.abs(out - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


def test_test_single_iteration(fits_run, tmp_path):
    out = copy_run(fits_run.root, tmp_path, 'sun')
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
    copy_run(fits_run.root, tmp_path, 'sun')
    proc = run_test(fits_run.flags + ['--input_dir_test', fits_run.test_in, '--iteration', '999'],
                    cwd=tmp_path)
    line = assert_usage_error(proc, '999')
    assert '6, 10, 12' in line  # lists what there is


# ----------------------------------------------------------------------------------------
# 4. npy, three channels (C x H x W), with validation during training
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def npy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('npy_run')
    train_in, train_tg = make_pairs(root / 'train', 'npy', n=6, size=32, channels=3)
    test_in, _ = make_pairs(root / 'test', 'npy', n=3, size=32, channels=3, seed=9,
                            prefix='val')
    flags = TINY + formats_and_limits('npy') + ['--dataset_name', 'rgb', '--input_ch', '3',
                                                '--target_ch', '3']
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
    for step in EXPECTED_SAVES:  # one line each in the log
        assert f'validation at step {step}: 3 file(s) in ' in npy_run.proc.stdout
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
        expected = generate(G, (x - 50) / 50) * 50 + 50
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


# ----------------------------------------------------------------------------------------
# 5. TIFF float32, a batch size that does not divide the data, odd-sized test inputs
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tif_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('tif_run')
    train_in, train_tg = make_pairs(root / 'train', 'tif', n=6, size=32)
    flags = TINY + formats_and_limits('tif') + ['--dataset_name', 'tiff']
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
# 6. PNG, 8 bits
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def png_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('png_run')
    train_in, train_tg = make_pairs(root / 'train', 'png', n=6, size=32)
    test_in, _ = make_pairs(root / 'test', 'png', n=2, size=32, seed=3, prefix='t')
    flags = TINY + formats_and_limits('png', 255) + ['--dataset_name', 'png8',
                                                     '--saturation_clip_target', 'True']
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
            expected = np.clip(np.rint(generate(G, x[None])[0] * 127.5 + 127.5), 0, 255)
            assert np.abs(out.astype(float) - expected).max() <= 1


# ----------------------------------------------------------------------------------------
# 7. BatchNorm (README "maps to simulations"), JPEG previews
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
        expected = generate(G, x[None]) * 50 + 50
        np.testing.assert_allclose(out, expected[0], rtol=1e-5, atol=1e-4)
        # (a copy: a forward pass in training mode updates the running statistics)
        batch_statistics = generate(copy.deepcopy(G).train(), x[None]) * 50 + 50
        assert np.abs(out - batch_statistics[0]).max() > 1e-2


def test_previews_in_another_image_mode(bn_run):
    folder = bn_run.out / 'Image' / 'Train'
    assert saved_steps_in(folder, '_real.jpg') == [4, 8, 12]
    assert saved_steps_in(folder, '_fake.jpg') == [4, 8, 12]
    assert saved_steps_in(folder, '_real.png') == []
    with Image.open(folder / '8_fake.jpg') as image:
        assert image.format == 'JPEG' and image.size == (32, 32)


# ----------------------------------------------------------------------------------------
# 8. Checkpoints and training states
# ----------------------------------------------------------------------------------------

# Batch 1 over 6 files, 2 epochs: saves at 4, 8 (mid-epoch 2) and the final 12.
AUGMENTED_RUN = TINY + NPY_DATA + AUGMENT + ['--seed', '5', '--n_workers', '0',
                                             '--save_freq', '4', '--report_freq', '1',
                                             '--display_freq', '1000', '--keep_states', '0']


@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory, data):
    """Two uninterrupted epochs with augmentation and shuffling, no loading workers."""
    root = tmp_path_factory.mktemp('two_epochs')
    proc = run_train(AUGMENTED_RUN + data + ['--n_epochs', '2'], cwd=root)
    assert_ok(proc)
    assert saved_steps_in(model_dir(root)) == [4, 8, 12]
    return root


def test_state_file_holds_everything_a_resume_needs(two_epochs):
    folder = model_dir(two_epochs)
    for step, epoch in ((4, 1), (8, 2), (12, 2)):
        for kind in ('G', 'D'):
            assert os.path.isfile(os.path.join(folder, f'{step}_{kind}.pt'))
        state = load(os.path.join(folder, f'{step}_state.pt'))  # weights_only=True
        assert {'G_optim', 'D_optim', 'scaler', 'rng', 'options', 'step',
                'epoch'} <= set(state), sorted(state)
        assert state['step'] == step and state['epoch'] == epoch
        assert state['options']['seed'] == 5 and state['options']['n_gf'] == 8
        for name in ('G_optim', 'D_optim'):
            assert state[name]['state'], f"{name} has no Adam moments"
            assert state[name]['param_groups'][0]['lr'] == pytest.approx(2e-4)


def test_state_dict_round_trip_and_prefix(tmp_path):
    torch.manual_seed(0)
    opt = train_opt()
    G = Generator(opt)
    path = str(tmp_path / '5_G.pt')
    save_state_dict(torch.nn.DataParallel(G), path)  # the wrapper's prefix is not saved
    state = torch.load(path, weights_only=True)
    assert set(state) == set(G.state_dict()) and not any(k.startswith('module.') for k in state)
    G2 = Generator(opt)
    load_state_dict(G2, path)
    assert_identical_weights(G2, G)
    # A 'module.'-prefixed checkpoint (saved from a wrapper) loads too.
    torch.save({'module.' + k: v for k, v in G.state_dict().items()}, path)
    load_state_dict(Generator(opt), path)


def test_load_state_dict_mismatch_is_a_user_error(tmp_path):
    path = str(tmp_path / '1_G.pt')
    save_state_dict(Generator(train_opt('--n_gf', '16')), path)
    with pytest.raises(UserError) as error:
        load_state_dict(Generator(train_opt()), path)
    assert '--n_gf' in str(error.value) and '\n' not in str(error.value)
    save_state_dict(Generator(train_opt('--n_residual', '2')), path)
    with pytest.raises(UserError):
        load_state_dict(Generator(train_opt()), path)
    save_state_dict(Discriminator(train_opt('--n_D', '2')), path)
    with pytest.raises(UserError):
        load_state_dict(Discriminator(train_opt()), path)
    (tmp_path / 'junk_G.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError):
        load_state_dict(Generator(train_opt()), str(tmp_path / 'junk_G.pt'))


def test_saved_steps(tmp_path):
    for name in ['10_G.pt', '2_G.pt', '100_G.pt', '10_D.pt', 'x_G.pt', '5_G.pt.tmp', '7_D.pt']:
        (tmp_path / name).write_bytes(b'')
    assert saved_steps(str(tmp_path)) == [2, 10, 100]
    assert saved_steps(str(tmp_path), 'D') == [7, 10]
    assert saved_steps(str(tmp_path / 'missing')) == []


# ----------------------------------------------------------------------------------------
# 9. Resuming exactly
# ----------------------------------------------------------------------------------------

def resume_from_6(run, tmp_path, *extra):
    """Copy the run, delete its checkpoints after step 6 and resume from step 6."""
    out = copy_run(run.root, tmp_path, 'sun')
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


def test_resume_continues_exactly_from_the_checkpoint(fits_run, resumed_fits):
    """Resuming at step 6 continues from there (reports at 10 and 12, in epoch 2) and gives
    the uninterrupted run's weights (same order, augmentation, optimiser state)."""
    out, proc, originals = resumed_fits
    assert saved_steps_in(out / 'Model', '_G.pt') == EXPECTED_SAVES
    assert saved_steps_in(out / 'Model', '_D.pt') == EXPECTED_SAVES
    lines = reports(proc.stdout)
    assert [step for _, step, _, _ in lines] == [10, 12]
    assert all(epoch == 2 for epoch, _, _, _ in lines)
    # Loaded from step 6, not started afresh: the resumed weights stay close to the
    # uninterrupted run's (a new initialisation would be far away) ...
    resumed = torch.load(out / 'Model' / '12_G.pt', weights_only=True)
    fresh = Generator(train_opt(*fits_run.flags)).state_dict()
    for key, value in originals['12_G.pt'].items():
        distance = float((resumed[key] - value).abs().max())
        assert distance < 0.01 < float((fresh[key] - value).abs().max()) or \
            value.numel() < 64, key
    # ... and are the same, bit for bit.
    for name, original in originals.items():
        assert_identical_weights(out / 'Model' / name, original)


def resume_bn_from_6(run, tmp_path, *extra):
    copy_run(run.root, tmp_path, 'bn')
    for kind in ('G', 'D', 'state'):
        os.remove(tmp_path / 'checkpoints' / 'bn' / 'Model' / f'12_{kind}.pt')
    assert_ok(run_train(BN_FLAGS + BN_FREQS + run.data + ['--latest_iter', '6', *extra],
                        cwd=tmp_path))
    return tmp_path / 'checkpoints' / 'bn' / 'Model'


def test_resumed_batchnorm_run_equals_the_uninterrupted_one(bn_run, tmp_path):
    """Weights and BatchNorm's running statistics alike."""
    resumed = resume_bn_from_6(bn_run, tmp_path)
    for kind in ('G', 'D'):
        assert_identical_weights(resumed / f'12_{kind}.pt',
                                 bn_run.out / 'Model' / f'12_{kind}.pt')


def test_adam_betas_given_when_resuming_take_effect(bn_run, tmp_path):
    resumed = resume_bn_from_6(bn_run, tmp_path, '--beta1', '0.9', '--beta2', '0.95')
    state = load(resumed / '12_state.pt')
    for name in ('G_optim', 'D_optim'):
        assert state[name]['param_groups'][0]['betas'] == (0.9, 0.95)
    assert state['options']['beta1'] == 0.9 and state['options']['beta2'] == 0.95
    # ... and the steps after 6 used them: not the uninterrupted run's weights.
    new, old = load(resumed / '12_G.pt'), load(bn_run.out / 'Model' / '12_G.pt')
    assert float((new['model.1.weight'] - old['model.1.weight']).abs().max()) > 1e-5


def test_resume_with_a_new_learning_rate_uses_it(fits_run, tmp_path):
    """An --lr given when resuming is the one used (the options file and the log say so).
    With --lr 0 the weights must stay those of step 6."""
    out, proc, _ = resume_from_6(fits_run, tmp_path, '--lr', '0')
    for step in (10, 12):
        for kind in ('G', 'D'):
            assert_identical_weights(out / 'Model' / f'{step}_{kind}.pt',
                                     out / 'Model' / f'6_{kind}.pt')


def test_resume_at_an_epoch_boundary_is_exact(two_epochs, data, tmp_path):
    """One epoch, then `--latest_iter -1 --n_epochs 2` with nothing else on the command line
    (every option comes from the saved run): the weights of the uninterrupted run."""
    assert_ok(run_train(AUGMENTED_RUN + data + ['--n_epochs', '1'], cwd=tmp_path))
    assert saved_steps_in(model_dir(tmp_path)) == [4, 6]
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', '2'], cwd=tmp_path)
    assert_ok(proc)
    assert reported_steps(proc.stdout)[0] == 7  # continued after step 6
    assert saved_steps_in(model_dir(tmp_path)) == [4, 6, 8, 12]
    for name in ('8_G.pt', '12_G.pt', '12_D.pt'):
        assert_identical_weights(os.path.join(model_dir(tmp_path), name),
                                 os.path.join(model_dir(two_epochs), name))


def test_resume_in_the_middle_of_an_epoch_is_exact(two_epochs, tmp_path):
    """Step 4 is two thirds into epoch 1 (save_freq 4, 6 samples per epoch)."""
    copy_run(two_epochs, tmp_path)
    reference = {name: os.path.join(model_dir(two_epochs), name) for name in ('8_G.pt', '12_G.pt',
                                                                              '12_D.pt')}
    for step in (8, 12):
        for kind in ('G', 'D', 'state'):
            os.remove(os.path.join(model_dir(tmp_path), f'{step}_{kind}.pt'))
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '4', '--n_epochs', '2'], cwd=tmp_path)
    assert_ok(proc)
    assert reported_steps(proc.stdout)[0] == 5
    for name, path in reference.items():
        assert_identical_weights(os.path.join(model_dir(tmp_path), name), path)


def test_resume_with_crop_size_is_exact(data, tmp_path):
    """--crop_size: the windows are drawn from each sample's seed, so a run stopped at step 4
    (mid-epoch) and resumed gives the weights of the uninterrupted one, bit for bit."""
    cropped = AUGMENTED_RUN + data + ['--n_epochs', '2', '--crop_size', '24']
    whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
    for root, extra in ((whole, []), (resumed, ['--n_epochs', '1'])):
        root.mkdir()
        assert_ok(run_train(cropped + extra, cwd=root))
    for kind in ('G', 'D', 'state'):
        os.remove(os.path.join(model_dir(resumed), f'6_{kind}.pt'))
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '4', '--n_epochs', '2'], cwd=resumed)
    assert_ok(proc)
    assert 'trained on 24x24 windows' in proc.stdout
    for name in ('8_G.pt', '12_G.pt', '12_D.pt'):
        assert_identical_weights(os.path.join(model_dir(resumed), name),
                                 os.path.join(model_dir(whole), name))


def test_loading_workers_do_not_change_the_run(two_epochs, data, tmp_path):
    """--n_workers 2 here, 0 in the reference run: the same augmentation and order."""
    assert_ok(run_train(AUGMENTED_RUN + data + ['--n_epochs', '2', '--n_workers', '2'],
                        cwd=tmp_path))
    for name in ('12_G.pt', '12_D.pt'):
        assert_identical_weights(os.path.join(model_dir(tmp_path), name),
                                 os.path.join(model_dir(two_epochs), name))


# ----------------------------------------------------------------------------------------
# 10. Which checkpoint --latest_iter takes; a new run never overwrites an earlier one
# ----------------------------------------------------------------------------------------

def test_latest_iter_minus_one_takes_the_newest_complete_step(two_epochs, tmp_path):
    """Step 12 lost its state file (a run killed between writing D and the state), so the
    newest complete step is 8. With --lr 0 the weights stay those of the step resumed from:
    the new 12_G.pt must equal 8_G.pt (resuming from 12 would train nothing and leave the
    old 12_G.pt)."""
    copy_run(two_epochs, tmp_path)
    folder = model_dir(tmp_path)
    os.remove(os.path.join(folder, '12_state.pt'))
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', '2', '--lr', '0'],
                     cwd=tmp_path)
    assert_ok(proc)
    assert reported_steps(proc.stdout)[0] == 9
    assert os.path.isfile(os.path.join(folder, '12_state.pt'))
    for kind in ('G', 'D'):
        assert_identical_weights(os.path.join(folder, f'12_{kind}.pt'),
                                 os.path.join(folder, f'8_{kind}.pt'))


def test_latest_iter_of_a_missing_step_changes_nothing(two_epochs, data, tmp_path):
    copy_run(two_epochs, tmp_path)
    run_dir = tmp_path / 'checkpoints'
    before = snapshot(run_dir, with_dirs=True)
    time.sleep(0.01)  # so that a rewrite would show in the mtimes
    proc = run_train(AUGMENTED_RUN + data + ['--n_epochs', '2', '--latest_iter', '7'], cwd=tmp_path)
    assert_usage_error(proc, '7_G.pt', '4, 8, 12')
    assert snapshot(run_dir, with_dirs=True) == before


@pytest.mark.parametrize('existing', ['nothing', 'an incomplete step'])
def test_latest_iter_minus_one_without_a_checkpoint(data, tmp_path, existing):
    if existing != 'nothing':
        os.makedirs(model_dir(tmp_path))
        torch.save(Generator(train_opt()).state_dict(), os.path.join(model_dir(tmp_path),
                                                                     '3_G.pt'))  # no 3_D.pt
    before = snapshot(tmp_path, with_dirs=True)
    proc = run_train(AUGMENTED_RUN + data + ['--n_epochs', '1', '--latest_iter', '-1'],
                     cwd=tmp_path)
    assert_usage_error(proc, '--latest_iter')
    assert snapshot(tmp_path, with_dirs=True) == before  # no folder made, nothing written


def test_a_fresh_run_never_overwrites_an_earlier_one(two_epochs, data, tmp_path):
    """A new run (no --latest_iter) under the name of a run with checkpoints is refused: it
    would overwrite them at equal step numbers. Nothing of the old run changes."""
    copy_run(two_epochs, tmp_path)
    before = snapshot(tmp_path / 'checkpoints')
    assert_usage_error(run_train(AUGMENTED_RUN + data + ['--n_epochs', '1'], cwd=tmp_path),
                       'already holds checkpoints', '--latest_iter -1')
    assert snapshot(tmp_path / 'checkpoints') == before


def test_a_fresh_run_does_not_mix_its_log_with_an_earlier_one(two_epochs, data, tmp_path):
    """Checkpoints moved away but logs left behind: loss_log.csv must not hold the same step
    twice (the old rows followed by the new run's 1, 2, ... would make the curve run
    backwards)."""
    copy_run(two_epochs, tmp_path)
    shutil.rmtree(model_dir(tmp_path))
    assert_ok(run_train(AUGMENTED_RUN + data + ['--n_epochs', '1'], cwd=tmp_path))
    steps = [int(row['step']) for row in loss_rows(tmp_path)]
    assert len(steps) == len(set(steps)), steps


# ----------------------------------------------------------------------------------------
# 11. Seeds
# ----------------------------------------------------------------------------------------

def test_a_drawn_seed_is_recorded_and_reproduces_the_run(data, tmp_path):
    first, second = tmp_path / 'first', tmp_path / 'second'
    first.mkdir(), second.mkdir()
    args = TINY + NPY_DATA + AUGMENT + data + ['--n_epochs', '1', '--n_workers', '0']
    proc = run_train(args, cwd=first)  # no --seed
    assert_ok(proc)
    with open(first / 'checkpoints' / 'pix2pixCC' / 'train_options.json') as f:
        seed = json.load(f)['seed']
    assert isinstance(seed, int) and not isinstance(seed, bool)
    assert re.search(rf'seed\W+{seed}\b', proc.stdout)  # printed too
    assert_ok(run_train(args + ['--seed', str(seed)], cwd=second))
    for name in ('6_G.pt', '6_D.pt'):
        assert_identical_weights(os.path.join(model_dir(first), name),
                                 os.path.join(model_dir(second), name))


# ----------------------------------------------------------------------------------------
# 12. Options travel from training to Test
# ----------------------------------------------------------------------------------------

# Network and units unlike Test's defaults: if Test did not take them from the training run,
# the checkpoint would not load or the outputs would be in other units and format.
UNITS = TINY_NETWORK + [
    '--trans_conv', 'False', '--padding_type', 'reflection',
    '--data_format_input', 'npy', '--data_format_target', 'npy', '--data_size', '32',
    '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '100',
    '--logscale_target', 'True', '--saturation_lower_limit_target', '1',
    '--saturation_upper_limit_target', '100']


@pytest.fixture(scope='module')
def units_run(tmp_path_factory, data):
    root = tmp_path_factory.mktemp('units_run')
    test_in, _ = make_pairs(root / 'test', 'npy', n=2, size=32, seed=4, prefix='t')
    assert_ok(run_train(['--gpu_ids', '-1', '--dataset_name', 'units', '--n_epochs', '1',
                         '--seed', '1', '--n_workers', '0', '--display_freq', '1000'] + UNITS +
                        data, cwd=root))
    assert saved_steps_in(model_dir(root, 'units')) == [6]
    minimal = ['--dataset_name', 'units', '--iteration', '6', '--input_dir_test', test_in,
               '--gpu_ids', '-1']
    return root, test_in, minimal


def outputs_of(root):
    folder = os.path.join(str(root), 'checkpoints', 'units', 'Image', 'Test', '6')
    return {name: open(os.path.join(folder, name), 'rb').read()
            for name in sorted(os.listdir(folder)) if '_AI.' in name}


def test_test_takes_network_and_units_from_the_training_run(units_run, tmp_path):
    root, test_in, minimal = units_run
    copy_run(root, tmp_path, 'units')
    proc = run_test(minimal, cwd=tmp_path)
    assert_ok(proc)
    adopted = outputs_of(tmp_path)
    assert sorted(adopted) == ['t_000_AI.npy', 't_001_AI.npy']
    for name in adopted:
        values = np.load(os.path.join(tmp_path, 'checkpoints', 'units', 'Image', 'Test', '6',
                                      name))
        assert values.shape == (32, 32) and (values > 0).all()  # 10**x: log-scaled target
    shutil.rmtree(tmp_path / 'checkpoints' / 'units' / 'Image' / 'Test')
    proc = run_test(minimal + ['--gpu_ids', '-1'] + UNITS, cwd=tmp_path)
    assert_ok(proc)
    assert outputs_of(tmp_path) == adopted


def test_an_option_given_to_test_wins_and_the_difference_is_printed(units_run, tmp_path):
    root, test_in, minimal = units_run
    copy_run(root, tmp_path, 'units')
    assert_ok(run_test(minimal, cwd=tmp_path))
    folder = tmp_path / 'checkpoints' / 'units' / 'Image' / 'Test' / '6'
    adopted = {name: np.load(folder / name) for name in os.listdir(folder) if '_AI.' in name}
    proc = run_test(minimal + ['--saturation_upper_limit_target', '1000', '--overwrite'],
                    cwd=tmp_path)
    assert_ok(proc)
    lines = [line for line in proc.stdout.splitlines() if 'saturation_upper_limit_target' in line]
    assert len(lines) == 1 and '1000' in lines[0] and '100' in lines[0], proc.stdout
    # Log limits 1..100 span log10 0..2, 1..1000 span 0..3: the same network output y gives
    # 10**(y + 1) and 10**(1.5 y + 1.5), i.e. the new value is the old one to the power 1.5.
    for name, value in adopted.items():
        np.testing.assert_allclose(np.load(folder / name), value.astype(np.float64) ** 1.5,
                                   rtol=1e-4)


@pytest.mark.parametrize('options_file', ['deleted', 'kept'])
def test_a_checkpoint_that_does_not_fit_names_the_option(units_run, tmp_path, options_file):
    root, test_in, minimal = units_run
    copy_run(root, tmp_path, 'units')
    if options_file == 'deleted':
        os.remove(tmp_path / 'checkpoints' / 'units' / 'train_options.json')
    proc = run_test(minimal + UNITS + ['--n_gf', '16'], cwd=tmp_path)
    assert_usage_error(proc, '6_G.pt', '--n_gf')


# ----------------------------------------------------------------------------------------
# 13. A loss that becomes NaN
# ----------------------------------------------------------------------------------------

def test_a_failing_check_stops_the_step_before_any_weight_changes():
    opt = train_opt()
    G, D, input, target = models_and_data(opt)
    before = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    G_optim, D_optim = make_optimizer(G.parameters(), opt), make_optimizer(D.parameters(), opt)
    seen = []

    def check(loss_D, loss_G):
        seen.append((loss_D.item(), loss_G.item()))
        raise ValueError('stop')

    with pytest.raises(ValueError):
        train_step(Loss(opt), G, D, G_optim, D_optim, Precision(opt, CPU), input, target, check)
    assert len(seen) == 1 and all(np.isfinite(seen[0]))
    assert_identical_weights(G, before[0])
    assert_identical_weights(D, before[1])
    assert not G_optim.state and not D_optim.state


def test_non_finite_loss_stops_before_updating_the_weights(in_tmp, monkeypatch, capsys):
    input_dir, target_dir = make_pairs(in_tmp / 'd', 'npy', n=4)
    original = pix2pixCC_Networks.Loss.__call__
    seen = {'calls': 0}

    def poisoned(self, D, G, input, target):
        seen['calls'] += 1
        seen['G'], seen['D'] = G, D
        if seen['calls'] == 3:  # the third step: NaN data, hence a NaN loss
            input = torch.full_like(input, float('nan'))
        return original(self, D, G, input, target)

    monkeypatch.setattr(pix2pixCC_Networks.Loss, '__call__', poisoned)
    status = run_main(pix2pixCC_Train.main,
                      TINY + NPY_DATA + ['--n_epochs', '2', '--n_workers', '0', '--save_freq',
                                         '2', '--seed', '1', '--input_dir_train', input_dir,
                                         '--target_dir_train', target_dir])
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.search(r'step 3\b', lines[0]) and '2_G.pt' in lines[0], lines[0]
    assert '--latest_iter 2' in lines[0]
    folder = model_dir(in_tmp)
    assert saved_steps_in(folder) == [2] and saved_steps_in(folder, 'D') == [2]
    # Nothing saved is NaN, and the networks in memory are those of the last good step:
    # the failing step updated nothing.
    for kind in ('G', 'D'):
        saved = load(os.path.join(folder, f'2_{kind}.pt'))
        assert all(torch.isfinite(v).all() for v in saved.values())
        assert_identical_weights(pix2pixCC_Utils.bare(seen[kind]), saved)


def test_non_finite_loss_in_a_real_run_is_one_line(data, tmp_path):
    """The same stop as a user sees it: an absurd learning rate blows the weights up after
    the first step. Exit status 2 and one line on stderr (no warning lines beside it)."""
    proc = run_train(TINY + NPY_DATA + data + ['--n_epochs', '3', '--n_workers', '0', '--seed',
                                               '1', '--save_freq', '1', '--lr', '1e30',
                                               '--beta1', '0'], cwd=tmp_path)
    line = assert_usage_error(proc, 'not finite', 'last good checkpoint')
    step = int(re.search(r'step (\d+)', line).group(1))
    saved = saved_steps_in(model_dir(tmp_path))
    assert saved and max(saved) < step
    assert f'{max(saved)}_G.pt' in line and f'--latest_iter {max(saved)}' in line
    for name in os.listdir(model_dir(tmp_path)):
        state = load(os.path.join(model_dir(tmp_path), name))
        if name.endswith(('_G.pt', '_D.pt')):
            assert all(torch.isfinite(v).all() for v in state.values()), name
