"""Train and Test on SDOMLv2 stores (machinery/sdoml_data.py, README "Training on SDOML"):
a run from a store equals, bit for bit, the run from the same frames written as FITS pairs
in time order (the same checkpoints, validation and metrics); the Test script's products and
metrics from a store equal those from the files, with --skip_existing and in tiles too;
--crop_size reads windows only; a resumed run trains on the pairs it kept; bad stores,
arrays, frame attributes, windows and options are one line and exit status 2, with nothing
written.
"""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from astropy.io import fits

pytest.importorskip('zarr', reason='SDOMLv2 stores need zarr 3 (Python 3.11 or newer): '
                    'pip install -r requirements-sdoml.txt')

from conftest import (SUBPROCESS_ENV, TINY, TRAIN_SCRIPT,  # noqa: E402
                      assert_identical_weights, assert_ok, assert_usage_error, copy_run,
                      load_script,
                      model_dir, record_in, run_dir, run_in, saved_steps_in, snapshot)
from machinery import sdoml  # noqa: E402
from pix2pixCC_Options import run_main  # noqa: E402

maker = load_script('datasets/make_sdoml_sample.py')

AIA = ['171A', '193A', '304A']
# 12 HMI frames, 1 November 2011 to 1 February 2012, 3 a day; one lacks its 304A frame: 11
# pairs, of which the 3 in January (UTC) are the test split and the 8 others train.
SAMPLE = dict(size=32, first_month='2011-11', months=4, days=1, frames=3, missing=1)
N_TRAIN, N_TEST = 8, 3
SCALING = ['--logscale_input', 'True', '--saturation_lower_limit_input', '50', '100', '1',
           '--saturation_upper_limit_input', '6000', '8000', '200',
           '--saturation_lower_limit_target', '-3000', '--saturation_upper_limit_target', '3000']
# Windows, rotation and padding: every draw from each sample's seed, so that the two runs
# read the same windows; a checkpoint every 6 samples (and at the end), validation at each.
RUN = TINY + SCALING + ['--n_D', '1', '--n_epochs', '1', '--n_epochs_decay', '1', '--seed', '3',
                        '--crop_size', '24', '--max_rotation_angle', '10', '--padding_size', '2',
                        '--save_freq', '6', '--report_freq', '4', '--display_freq', '16',
                        '--keep_states', '0', '--val_during_train']
LAST = 2 * N_TRAIN


def store_args(stores):
    return ['--sdoml_input', stores[0], '--sdoml_target', stores[1],
            '--sdoml_input_arrays', *AIA, '--sdoml_test_months', '1']


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
    """(aia.zarr, hmi.zarr) of SAMPLE, as absolute paths (their content in STORES_BEFORE)."""
    paths = tuple(str(path) for path in
                  maker.make_stores(tmp_path_factory.mktemp('sdoml'), **SAMPLE))
    STORES_BEFORE[paths] = [snapshot(path, with_dirs=True) for path in paths]
    return paths


STORES_BEFORE = {}


def write_fits(path, data, cards):
    """`data` as a FITS file with a frame's `cards` (its NAXISn left to the data)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = fits.Header({key: value for key, value in cards.items()
                          if not key.startswith('NAXIS')})
    fits.PrimaryHDU(data, header=header).writeto(path)


@pytest.fixture(scope='module')
def files(stores, tmp_path_factory):
    """The pairs of the stores as FITS files, Train/ and Test/ (January), named by their
    time: inputs 3 x H x W cubes with the 171A frame's header, targets Bz with its own."""
    root = tmp_path_factory.mktemp('files')
    pairs = sdoml.pair_frames(stores[0], AIA, stores[1], 'Bz').pairs
    assert len(pairs) == N_TRAIN + N_TEST
    for split, chosen in sdoml.split_pairs(pairs, [1]).items():
        for pair in chosen:
            data = sdoml.read_pair(stores[0], stores[1], pair)
            name = pair.datetime.strftime('%Y%m%d_%H%M%S') + '.fits'
            write_fits(root / split / 'Input' / name, data.input, data.input_header)
            write_fits(root / split / 'Target' / name, data.target[0], data.target_header)
    return root


def file_args(files):
    return ['--input_ch', '3', '--data_format_input', 'fits', '--data_format_target', 'fits',
            '--input_dir_train', files / 'Train' / 'Input',
            '--target_dir_train', files / 'Train' / 'Target',
            '--input_dir_test', files / 'Test' / 'Input',
            '--target_dir_test', files / 'Test' / 'Target']


@pytest.fixture(scope='module')
def runs(stores, files, tmp_path_factory):
    """The same run trained from the stores and from the files, side by side."""
    roots = {kind: tmp_path_factory.mktemp(kind) for kind in ('store', 'files')}
    args = {'store': RUN + store_args(stores), 'files': RUN + file_args(files)}
    procs = {kind: subprocess.Popen([sys.executable, TRAIN_SCRIPT, *map(str, args[kind])],
                                    cwd=roots[kind], env=SUBPROCESS_ENV, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for kind in roots}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert_ok(types.SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err))
        roots[kind + '_stdout'] = out
    return roots


def test_a_run_from_stores_equals_the_run_from_the_same_frames_as_files(runs, stores):
    out = runs['store_stdout']
    assert f'SDOML: {N_TRAIN + N_TEST} pairs from 2011-10-31T23:59:26.000' in out
    assert '1 target frames unpaired (1 no 304A frame within 6 min' in out
    assert f'train {N_TRAIN}, test {N_TEST}' in out
    assert f'data: {N_TRAIN} pairs of 32x32 px (SDOML 171A 193A 304A -> Bz' in out
    steps = saved_steps_in(model_dir(runs['store']))
    assert steps == saved_steps_in(model_dir(runs['files'])) == [6, 12, LAST]
    for step in steps:
        for kind in ('G', 'D'):
            assert_identical_weights(os.path.join(model_dir(runs['store']), f'{step}_{kind}.pt'),
                                     os.path.join(model_dir(runs['files']), f'{step}_{kind}.pt'))
    # the validation of the test split: the same metrics, products named by time
    logs = [open(os.path.join(run_dir(runs[kind]), 'val_metrics.csv')).read()
            for kind in ('store', 'files')]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 1 + len(steps)
    folder = os.path.join(run_dir(runs['store']), 'Image', 'Test', str(LAST))
    assert sorted(name for name in os.listdir(folder) if name.endswith('_AI.fits')) == \
        ['20120101_075926_AI.fits', '20120101_155926_AI.fits', '20120131_235926_AI.fits']
    # the run keeps its pairs, every split, with the stores and arrays they came from
    with open(os.path.join(run_dir(runs['store']), 'sdoml_pairs.json')) as f:
        kept = json.load(f)
    assert (kept['input_store'], kept['target_store']) == stores
    assert [pair['split'] for pair in kept['pairs']].count('Train') == N_TRAIN
    assert [frame['array'] for frame in kept['pairs'][0]['inputs']] == AIA


def products(folder):
    """{name: (data, header cards but the 'generated from' line)} of a Test output folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith('_AI.fits'):
            with fits.open(os.path.join(folder, name)) as hdul:
                cards = [(card.keyword, str(card.value)) for card in hdul[0].header.cards
                         if 'generated from' not in str(card.value)]
                out[name] = (hdul[0].data.copy(), cards)
    return out


def test_the_test_script_on_stores_gives_the_products_and_metrics_of_the_files(runs, stores,
                                                                              files, capsys):
    """In the store run's folder, the Test script takes the stores, arrays and test months
    from the run (--dataset_name and --iteration alone), and with test folders the files:
    the same products (data bit for bit, headers but the input's name in HISTORY) and
    metrics; again with --skip_existing, and in tiles."""
    root, common = runs['store'], ['--dataset_name', 'pix2pixCC', '--iteration', str(LAST)]
    assert run_in(root, common + ['--output_dir', 'from_store', '--save_panels']) == 0
    out = capsys.readouterr().out
    assert '--sdoml_input' in out and f'{N_TEST} file(s) written to from_store' in out
    assert run_in(root, common + ['--output_dir', 'from_files', '--input_dir_test',
                                  str(files / 'Test' / 'Input'), '--target_dir_test',
                                  str(files / 'Test' / 'Target')]) == 0
    store, from_files = products(root / 'from_store'), products(root / 'from_files')
    assert list(store) == list(from_files) and len(store) == N_TEST
    for name, (data, cards) in store.items():
        assert np.array_equal(data, from_files[name][0])
        assert cards == from_files[name][1]
        header = fits.getheader(root / 'from_store' / name)
        assert header['INSTRUME'] == 'HMI_SIDE1' and header['T_OBS'].endswith('Z')  # AIA's
        assert any('generated from aia.zarr 171A 2012/' in line for line in header['HISTORY'])
    for name in ('metrics.csv', 'metrics_summary.json'):
        assert (root / 'from_store' / name).read_bytes() == \
            (root / 'from_files' / name).read_bytes()
    assert len(list((root / 'from_store').glob('*_panel.png'))) == N_TEST
    record = record_in(root / 'from_store')
    assert (record['input_dir'], record['target_dir']) == stores
    assert len(record['sdoml_pairs']) == N_TEST
    metrics = (root / 'from_store' / 'metrics.csv').read_bytes()
    capsys.readouterr()
    assert run_in(root, common + ['--output_dir', 'from_store', '--skip_existing',
                                  '--save_panels']) == 0
    assert f'{N_TEST} of {N_TEST} output(s)' in capsys.readouterr().out
    assert (root / 'from_store' / 'metrics.csv').read_bytes() == metrics
    assert run_in(root, common + ['--output_dir', 'tiled', '--tile_size', '16']) == 0
    for name, (data, _) in products(root / 'tiled').items():
        np.testing.assert_allclose(data, store[name][0], atol=1e-4 * np.abs(data).max())


def test_crop_size_reads_only_the_windows_of_the_frames(stores, monkeypatch, in_tmp):
    from machinery import sdoml_data
    from pix2pixCC_Options import TrainOption
    opt = TrainOption().parse([*map(str, RUN + store_args(stores))])
    dataset = sdoml_data.make_dataset(opt)
    reads = []
    read_frame = sdoml.Store.read_frame

    def recorded(store, name, year, index, window=None):
        reads.append((name, window))
        return read_frame(store, name, year, index, window)

    monkeypatch.setattr(sdoml.Store, 'read_frame', recorded)
    x, y = dataset[(0, 12345)]
    assert x.shape == (3, 24, 24) and y.shape == (1, 24, 24)
    assert [name for name, _ in reads] == AIA + ['Bz']
    windows = {window for _, window in reads}
    assert len(windows) == 1 and next(iter(windows))[2] == 24  # one window, both sides


def test_a_resumed_run_trains_on_the_pairs_it_kept(runs, tmp_path, capsys):
    """Step 6 of the store run, resumed with --latest_iter 6 alone: the pairs come from
    sdoml_pairs.json (not paired again) and the end is the uninterrupted run's; a kept pair
    that no longer names the store's frame is refused."""
    copy_run(runs['store'], tmp_path)
    for step in (12, LAST):
        for kind in ('G', 'D', 'state'):
            os.remove(os.path.join(model_dir(tmp_path), f'{step}_{kind}.pt'))
    proc = train_here(tmp_path, ['--gpu_ids', '-1', '--latest_iter', '6'], capsys)
    assert_ok(proc)
    assert f'SDOML: resuming on the {N_TRAIN + N_TEST} pairs of' in proc.stdout
    for kind in ('G', 'D'):
        assert_identical_weights(os.path.join(model_dir(tmp_path), f'{LAST}_{kind}.pt'),
                                 os.path.join(model_dir(runs['store']), f'{LAST}_{kind}.pt'))
    path = os.path.join(run_dir(tmp_path), 'sdoml_pairs.json')
    with open(path) as f:
        kept = json.load(f)
    kept['pairs'][0]['inputs'][1]['time'] = '2011-10-31T23:59:00.000'
    with open(path, 'w') as f:
        json.dump(kept, f)
    before = snapshot(run_dir(tmp_path))
    assert_usage_error(train_here(tmp_path, ['--gpu_ids', '-1', '--latest_iter', '6'], capsys),
                       'the store changed since the pairs were made')
    assert snapshot(run_dir(tmp_path)) == before


def bad_store(path, attributes):
    """A store of Bz frames (8 x 8) with the `attributes` {key: [one value per frame]}."""
    frames = len(next(iter(attributes.values())))
    maker.write_store(path, {'2011': {'Bz': (np.zeros((frames, 8, 8)), attributes)}})
    return str(path)


def train_here(root, argv, capsys):
    """The training script in-process in `root`: (returncode, stdout, stderr)."""
    import pix2pixCC_Train
    here = os.getcwd()
    os.chdir(root)
    try:
        code = run_main(pix2pixCC_Train.main, [*map(str, argv)])
    except SystemExit as exit:  # (argparse's refusals)
        code = exit.code
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_bad_input_is_one_line_and_nothing_is_written(stores, tmp_path, capsys):
    times = ['2011-11-01T00:00:00Z', '2011-11-01T08:00:00Z']
    inconsistent = bad_store(tmp_path / 'short.zarr', {'T_OBS': times, 'EXPTIME': [1.0]})
    untimed = bad_store(tmp_path / 'untimed.zarr', {'EXPTIME': [1.0, 2.0]})
    (tmp_path / 'folder').mkdir()
    base = TINY + SCALING + ['--n_epochs', '1']
    cases = [
        (['--sdoml_input', tmp_path / 'folder', '--sdoml_target', stores[1],
          '--sdoml_input_arrays', *AIA], 'not a zarr store'),
        (['--sdoml_input', stores[0], '--sdoml_target', stores[1],
          '--sdoml_input_arrays', '171A', '193A', '94A'],
         "no array '94A' in any year group (it holds 2011: 171A 193A 304A"),
        (['--sdoml_input', stores[0], '--sdoml_target', inconsistent,
          '--sdoml_input_arrays', *AIA], 'attribute EXPTIME has 1 values for 2 frames'),
        (['--sdoml_input', stores[0], '--sdoml_target', untimed, '--sdoml_input_arrays', *AIA],
         'no T_OBS or DATE-OBS or DATE_OBS attribute'),
        (store_args(stores) + ['--sdoml_start', '2013-01-01'], 'no pairs in [2013-01-01'),
        (store_args(stores) + ['--sdoml_end', 'soon'], '--sdoml_end soon: not a time'),
        (store_args(stores) + ['--input_ch', '1'], '--sdoml_input_arrays names 3 array(s)'),
        (store_args(stores)[:4], '--sdoml_input needs --sdoml_input_arrays'),
        (store_args(stores) + ['--input_dir_train', tmp_path], 'give folders or stores'),
        (store_args(stores) + ['--sdoml_test_months', '10', '11', '12', '1', '2'],
         'no training pairs in the stores'),
    ]
    before = snapshot(tmp_path, with_dirs=True)
    for extra, fragment in cases:
        proc = train_here(tmp_path, base + extra, capsys)
        assert_usage_error(proc, fragment)
        assert snapshot(tmp_path, with_dirs=True) == before, fragment


def test_the_test_script_refuses_arrays_that_are_not_the_runs(runs, capsys):
    before = snapshot(runs['store'], with_dirs=True)
    assert run_in(runs['store'], ['--iteration', str(LAST), '--output_dir', 'refused',
                                  '--sdoml_input_arrays', '171A', '193A']) == 2
    assert '--sdoml_input_arrays names 2 array(s) (171A 193A), one a channel, but ' \
           '--input_ch is 3' in capsys.readouterr().err
    assert snapshot(runs['store'], with_dirs=True) == before


def test_the_stores_were_only_read(stores):
    """After every run, test and refusal above: not a byte, file or folder of them changed."""
    assert [snapshot(path, with_dirs=True) for path in stores] == STORES_BEFORE[stores]
