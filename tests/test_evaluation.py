"""Judging a model, as README "Evaluating a model" and "Output files" document it: the
metrics (CC and CCC after binning, RMSE, MAE, flux), the Test script's metric files and
table, the comparison panels, what training writes to judge it by (loss_log.csv, the loss
curve, the training panels, val_metrics.csv, also after a resume), and a shortened quick
start (README "Quick start") that must learn. The disk, active and quiet-Sun
regions (README "Evaluating a model") are checked on a synthetic full disk whose centre is off
the frame's centre. Reference values are computed here independently (numpy block means,
scipy's Pearson, the closed-form Lin CCC with population moments, astropy's WCS for where each
pixel looks), never with the package's own metric code.
"""
import glob
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from machinery import evaluation, translation
import pix2pixCC_Test
from conftest import (NPY_DATA, REPO, SAMPLE, SAMPLE_DATA, TINY, assert_ok,
                      constant_generator_checkpoint,
                      copy_run, copy_sample, drawn_figure, drawn_panel, lin_ccc, logged_steps,
                      loss_rows, make_pairs, make_test_opt, panel_text, read_csv_rows,
                      run_command, run_dir, run_test, run_train)
from machinery.figures import save_loss_curve, save_panel
from pix2pixCC_Options import UserError
from pix2pixCC_Pipeline import Scaling
from machinery.evaluation import Disk, bin_mean, disk_from_header, image_metrics, metrics_table

BINS = [1, 2, 4, 8]
PER_BIN = ('cc', 'ccc', 'rmse', 'mae')
FLUX = ['flux_unsigned_real', 'flux_unsigned_fake', 'flux_net_real', 'flux_net_fake']


def metric_columns(bins, prefix='', mx=False):
    """The columns of one region; `mx`: with the flux in Mx (targets in gauss with a known
    pixel area)."""
    return [f'{prefix}{name}_{k}x{k}' for k in bins for name in PER_BIN] + \
        [prefix + name for name in FLUX] + [f'{prefix}{name}_Mx' for name in FLUX if mx]


# ----------------------------------------------------------------------------------------
# Independent reference implementation
# ----------------------------------------------------------------------------------------

def block_mean(x, k):
    """Mean over non-overlapping k x k blocks of a 2-D array; ragged edges dropped."""
    h, w = x.shape[0] // k, x.shape[1] // k
    return x[:h * k, :w * k].reshape(h, k, w, k).mean(axis=(1, 3))


def expected_metrics(real, fake, bins):
    """real, fake: 2-D float64 arrays (real may hold NaN/Inf, left out)."""
    out = {}
    for k in bins:
        r, f = block_mean(real, k), block_mean(fake, k)
        keep = np.isfinite(r) & np.isfinite(f)
        r, f = r[keep], f[keep]
        out[f'cc_{k}x{k}'] = stats.pearsonr(r, f)[0]
        out[f'ccc_{k}x{k}'] = lin_ccc(r, f)
        out[f'rmse_{k}x{k}'] = np.sqrt(np.mean((r - f) ** 2))
        out[f'mae_{k}x{k}'] = np.mean(np.abs(r - f))
    keep = np.isfinite(real) & np.isfinite(fake)
    out.update(flux_unsigned_real=np.abs(real[keep]).sum(),
               flux_unsigned_fake=np.abs(fake[keep]).sum(),
               flux_net_real=real[keep].sum(), flux_net_fake=fake[keep].sum())
    return out


def assert_metrics_close(got, expected, rtol=1e-6, atol=1e-9):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=atol), key


@pytest.fixture
def pair():
    rng = np.random.default_rng(3)
    real = rng.normal(5.0, 2.0, (1, 50, 50))  # 50 is not a multiple of 4 or 8
    fake = 0.6 * real + rng.normal(1.0, 1.5, real.shape)
    return real, fake


# ----------------------------------------------------------------------------------------
# 1. image_metrics and bin_mean
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape, k', [((8, 8), 2), ((10, 11), 3), ((2, 50, 50), 8), ((7, 7), 1)])
def test_bin_mean_is_the_mean_over_k_by_k_blocks(shape, k):
    x = np.random.default_rng(1).normal(size=shape)
    flat = x.reshape(-1, *shape[-2:])
    expected = np.stack([block_mean(channel, k) for channel in flat]).reshape(
        *shape[:-2], shape[-2] // k, shape[-1] // k)
    np.testing.assert_allclose(bin_mean(x, k), expected, rtol=1e-12, atol=1e-12)


def test_perfect_prediction(pair):
    real, _ = pair
    row = image_metrics(real, real.copy(), BINS)
    for k in BINS:
        assert row[f'cc_{k}x{k}'] == pytest.approx(1, abs=1e-9)
        assert row[f'ccc_{k}x{k}'] == pytest.approx(1, abs=1e-9)
        assert row[f'rmse_{k}x{k}'] == pytest.approx(0, abs=1e-9)
        assert row[f'mae_{k}x{k}'] == pytest.approx(0, abs=1e-9)
    assert row['flux_net_real'] == pytest.approx(row['flux_net_fake'])


def test_sign_flipped_prediction(pair):
    real, _ = pair
    row = image_metrics(real, -real, BINS)
    for k in BINS:
        assert row[f'cc_{k}x{k}'] == pytest.approx(-1, abs=1e-9)
        assert row[f'ccc_{k}x{k}'] < 0
    assert row['flux_net_fake'] == pytest.approx(-row['flux_net_real'])
    assert row['flux_unsigned_fake'] == pytest.approx(row['flux_unsigned_real'])


def test_metrics_equal_scipy_and_closed_form_ccc(pair):
    real, fake = pair
    row = image_metrics(real, fake, BINS)
    assert list(row) == metric_columns(BINS)
    assert all(isinstance(value, float) for value in row.values())
    assert_metrics_close(row, expected_metrics(real[0], fake[0], BINS))
    # The data are not perfectly correlated and the means differ: CCC < CC.
    assert row['ccc_1x1'] < row['cc_1x1'] < 1


def test_several_channels_are_prefixed_and_independent(pair):
    real, fake = pair
    real2 = np.concatenate([real, 3 - real])
    fake2 = np.concatenate([fake, 2 * real + 1])
    row = image_metrics(real2, fake2, [1, 4])
    assert list(row) == metric_columns([1, 4], 'ch0_') + metric_columns([1, 4], 'ch1_')
    for c in range(2):
        single = image_metrics(real2[c:c + 1], fake2[c:c + 1], [1, 4])
        for key, value in single.items():
            assert row[f'ch{c}_{key}'] == pytest.approx(value, rel=1e-12)
    assert row['ch1_cc_1x1'] == pytest.approx(-1)


def test_non_finite_target_pixels_are_left_out(pair):
    real, fake = pair
    real = real.copy()
    real[0, 3, 5], real[0, 20, 21], real[0, 40, 2] = np.nan, np.inf, -np.inf
    row = image_metrics(real, fake, BINS)
    assert all(np.isfinite(value) for value in row.values()), row
    assert_metrics_close(row, expected_metrics(real[0], fake[0], BINS))
    # Left out, not replaced: the same as the metrics of the finite pixels alone.
    keep = np.isfinite(real[0])
    assert row['cc_1x1'] == pytest.approx(stats.pearsonr(real[0][keep], fake[0][keep])[0])


# ----------------------------------------------------------------------------------------
# A training run with validation metrics, evaluated by the Test script
# ----------------------------------------------------------------------------------------

# 6 files, batch 1, 2 epochs: reports at 2, 4, ..., 12; previews at 3, 6, 9, 12; saves at 4,
# 8 and 12.
FREQS = ['--n_epochs', '2', '--report_freq', '2', '--display_freq', '3', '--save_freq', '4',
         '--keep_states', '0']
REPORTS, PREVIEWS, SAVES = [2, 4, 6, 8, 10, 12], [3, 6, 9, 12], [4, 8, 12]
LOG_COLUMNS = ['step', 'epoch', 'D', 'G', 'G_LSGAN', 'G_FM', 'G_CC', 'CC', 'lr', 'samples',
               'seconds_per_step']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval_run')
    train_in, train_tg = make_pairs(root / 'train', 'npy', n=6, size=32)
    test_in, test_tg = make_pairs(root / 'test', 'npy', n=3, size=32, seed=9, prefix='val')
    y = np.load(os.path.join(test_tg, 'val_001.npy'))
    y[2, 3], y[17, 30], y[31, 0] = np.nan, np.inf, np.nan  # left out of the metrics
    np.save(os.path.join(test_tg, 'val_001.npy'), y)
    proc = run_train(TINY + NPY_DATA + FREQS + [
        '--dataset_name', 'ev', '--seed', '1', '--n_workers', '0',
        '--input_dir_train', train_in, '--target_dir_train', train_tg,
        '--val_during_train', '--input_dir_test', test_in, '--target_dir_test', test_tg],
        cwd=root)
    assert_ok(proc)
    out = root / 'checkpoints' / 'ev'
    return dict(root=root, out=out, proc=proc, test_in=test_in, test_tg=test_tg,
                train_in=train_in, train_tg=train_tg)


# What a Test run needs of the run: its generators and options (a new working folder).
MODELS_AND_OPTIONS = ('Model', 'train_options.json')


@pytest.fixture(scope='module')
def evaluated(run, tmp_path_factory):
    """Test with targets on every saved generator, with panels and --save_scale 2."""
    root = tmp_path_factory.mktemp('evaluated')
    out = copy_run(run['root'], root, 'ev', only=MODELS_AND_OPTIONS)
    proc = run_test(['--gpu_ids', '-1', '--dataset_name', 'ev', '--iteration', '-1',
                     '--input_dir_test', run['test_in'], '--target_dir_test', run['test_tg'],
                     '--save_panels', '--save_scale', '2'], cwd=root)
    assert_ok(proc)
    return dict(run, root=root, out=out, proc=proc, test_dir=out / 'Image' / 'Test')


def summary_at(evaluated, iteration):
    """metrics_summary.json the Test script wrote for the generator of `iteration`."""
    with open(evaluated['test_dir'] / str(iteration) / 'metrics_summary.json') as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------
# 2. The Test script's metric files and table
# ----------------------------------------------------------------------------------------

def test_metrics_csv_has_one_row_per_file_and_the_documented_columns(evaluated):
    for step in SAVES:
        columns, rows = read_csv_rows(evaluated['test_dir'] / str(step) / 'metrics.csv')
        assert columns == ['file'] + metric_columns(BINS)
        assert [row['file'] for row in rows] == ['val_000', 'val_001', 'val_002']
        for row in rows:
            assert all(np.isfinite(float(row[key])) for key in columns[1:]), row


def test_summary_holds_mean_std_median_of_each_column(evaluated):
    for step in SAVES:
        folder = evaluated['test_dir'] / str(step)
        _, rows = read_csv_rows(folder / 'metrics.csv')
        with open(folder / 'metrics_summary.json') as f:
            summary = json.load(f)
        assert sorted(summary) == sorted(metric_columns(BINS))
        for key, entry in summary.items():
            values = np.array([float(row[key]) for row in rows])
            assert entry['mean'] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12)
            assert entry['median'] == pytest.approx(np.median(values), rel=1e-9, abs=1e-12)
            assert entry['std'] == pytest.approx(values.std(), rel=1e-6, abs=1e-12) or \
                entry['std'] == pytest.approx(values.std(ddof=1), rel=1e-6, abs=1e-12)


def test_metrics_are_those_of_the_written_outputs_in_the_targets_units(evaluated):
    """Recomputed here from the written file (divided by --save_scale 2) and the raw target,
    which holds NaN/Inf pixels."""
    folder = evaluated['test_dir'] / '12'
    _, rows = read_csv_rows(folder / 'metrics.csv')
    row = {key: float(value) for key, value in rows[1].items() if key != 'file'}
    written = np.load(folder / 'val_001_AI.npy').astype(np.float64)
    real = np.load(os.path.join(evaluated['test_tg'], 'val_001.npy')).astype(np.float64)
    assert np.isnan(real).sum() == 2
    assert_metrics_close(row, expected_metrics(real, written / 2, BINS), rtol=1e-5, atol=1e-6)


def test_the_table_is_printed(evaluated):
    stdout = evaluated['proc'].stdout
    with open(evaluated['test_dir'] / '12' / 'metrics_summary.json') as f:
        summary = json.load(f)
    assert re.search(r'CC\s+CCC\s+RMSE\s+MAE', stdout), stdout
    rows = re.findall(r'^\s*0\s+8x8\s+(\S+)\s+(\S+)', stdout, re.MULTILINE)
    assert len(rows) == len(SAVES)  # one table per iteration
    assert float(rows[-1][0]) == pytest.approx(summary['cc_8x8']['mean'], abs=1e-4)
    assert float(rows[-1][1]) == pytest.approx(summary['ccc_8x8']['mean'], abs=1e-4)
    for k in BINS:
        assert re.search(rf'^\s*0\s+{k}x{k}\s', stdout, re.MULTILINE)


def test_metrics_by_iteration_and_the_best_one(evaluated):
    columns, rows = read_csv_rows(evaluated['test_dir'] / 'metrics_by_iteration.csv')
    assert columns[0] == 'iteration' and set(metric_columns(BINS)) <= set(columns)
    assert [int(row['iteration']) for row in rows] == SAVES
    for row in rows:
        summary = summary_at(evaluated, row['iteration'])
        assert float(row['cc_8x8']) == pytest.approx(summary['cc_8x8']['mean'], rel=1e-9)
    stdout = evaluated['proc'].stdout.splitlines()
    for key in ('cc_8x8', 'cc_1x1'):  # the selection metric, then the full-resolution CC
        best = max(rows, key=lambda row, key=key: float(row[key]))['iteration']
        line = [line for line in stdout if line.startswith(f'best iteration by mean {key}:')]
        assert len(line) == 1, stdout
        assert re.search(rf'\b{best}\b', line[0].split(key, 1)[1].split('(')[0]), line[0]
    # 8x8 bins of these 32x32 targets: 16 points per image, said right after the best line.
    best_line = next(i for i, line in enumerate(stdout) if 'by mean cc_8x8' in line)
    assert stdout[best_line + 1] == ('note: cc_8x8 rests on 16 points per image (8x8 bins of '
                                     '32x32); compare with the full-resolution line')


@pytest.mark.parametrize('key, size, note', [
    ('cc_8x8', (64, 64), 'note: cc_8x8 rests on 64 points per image (8x8 bins of 64x64); '
                         'compare with the full-resolution line'),
    ('ch1_disk_ccc_4x4', (60, 40), 'note: ch1_disk_ccc_4x4 rests on at most 150 points per '
                                   'image (4x4 bins of 60x40); compare with the '
                                   'full-resolution line'),
    ('cc_4x4', (64, 64), None),  # 256 points
    ('rmse_8x8', (256, 256), None)])
def test_a_coarsely_binned_selection_metric_gets_a_note(key, size, note):
    assert evaluation.coarse_binning_note(key, [(512, 512), size]) == note


def test_the_best_iteration_is_named_for_the_full_resolution_cc_too(tmp_path, capsys):
    rows = [{'iteration': 2, 'disk_cc_1x1': 0.7, 'disk_rmse_8x8': 30.0},
            {'iteration': 4, 'disk_cc_1x1': 0.8, 'disk_rmse_8x8': 40.0}]
    evaluation.write_best_iteration(rows, str(tmp_path), 'disk_rmse_8x8', [(128, 128)])
    lines = capsys.readouterr().out.splitlines()  # 256 points of 128x128: no note
    assert lines[0].startswith('best iteration by mean disk_rmse_8x8: 2 (30.0000); all in ')
    assert lines[1:] == ['best iteration by mean disk_cc_1x1: 4 (0.8000)']
    evaluation.write_best_iteration(rows, str(tmp_path), 'disk_rmse_8x8', [(64, 64)])
    assert capsys.readouterr().out.splitlines()[1:] == [
        'note: disk_rmse_8x8 rests on at most 64 points per image (8x8 bins of 64x64); '
        'compare with the full-resolution line',
        'best iteration by mean disk_cc_1x1: 4 (0.8000)']
    evaluation.write_best_iteration(rows, str(tmp_path), 'disk_cc_1x1', [(64, 64)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith('best iteration by mean disk_cc_1x1: 4 (')


def test_panels_are_pngs_wider_than_high(evaluated):
    for step in SAVES:
        for name in ('val_000', 'val_001', 'val_002'):
            path = evaluated['test_dir'] / str(step) / f'{name}_panel.png'
            with Image.open(path) as image:
                assert image.format == 'PNG'
                image.verify()
            with Image.open(path) as image:
                width, height = image.size
                assert width > height > 0


def test_metrics_table_has_units_and_flux_columns():
    keys = {f'{name}_{k}x{k}': 0.5 for name in ('cc', 'ccc', 'rmse', 'mae') for k in (1, 8)}
    keys.update({'flux_unsigned_real': 1000.0, 'flux_unsigned_fake': 1200.0,
                 'flux_net_real': -10.0, 'flux_net_fake': 25.0})
    table = metrics_table({key: {'mean': value} for key, value in keys.items()}, [1, 8],
                          unit='G')
    assert re.search(r'RMSE\s+MAE\n\s+\[G\]\s+\[G\]', table)
    assert 'unsigned flux' in table and 'net flux' in table and '[G px]' in table
    assert re.search(r'^\s*0\s+1000\s+1200\s+-10\s+25\s*$', table, re.MULTILINE), table
    assert '[target units]' in metrics_table({key: {'mean': value}
                                             for key, value in keys.items()}, [1])


def test_metrics_table_columns_stay_aligned_with_a_long_unit():
    """A --save_scale or long BUNIT unit (10**-3 G km s-1) widens the columns instead of
    pushing the header out of line with its values: each column ends where its label does."""
    keys = {f'{name}_{k}x{k}': 0.5 for name in ('cc', 'ccc', 'rmse', 'mae') for k in (1, 8)}
    keys.update({'flux_unsigned_real': 1000.0, 'flux_unsigned_fake': 1200.0,
                 'flux_net_real': -10.0, 'flux_net_fake': 25.0})
    table = metrics_table({key: {'mean': value} for key, value in keys.items()}, [1, 8],
                          unit='10**-3 G km s-1')
    for block in table.split('\n\n'):
        lines = [line for line in block.splitlines() if line and not line.endswith(':')]
        units = next(i for i, line in enumerate(lines) if '[' in line)
        ends = {match.end() for match in re.finditer(r'\[[^]]*\]', lines[units])}
        assert len(ends) in (2, 4)
        for line in lines[units + 1:]:
            assert {m.end() for m in re.finditer(r'\S+', line)} >= ends, (lines[units], line)


def test_metric_bins_choose_the_columns_and_no_targets_no_metrics(run, tmp_path):
    out = copy_run(run['root'], tmp_path, 'ev', only=MODELS_AND_OPTIONS)
    base = ['--gpu_ids', '-1', '--dataset_name', 'ev', '--iteration', '12', '--input_dir_test',
            run['test_in']]
    proc = run_test(base, cwd=tmp_path)
    assert_ok(proc)
    folder = out / 'Image' / 'Test' / '12'
    assert sorted(os.listdir(folder)) == ['test_run.json'] + \
        [f'val_{i:03d}_AI.npy' for i in range(3)]
    proc = run_test(base + ['--target_dir_test', run['test_tg'], '--metric_bins', '1', '4',
                            '--overwrite'], cwd=tmp_path)
    assert_ok(proc)
    columns, rows = read_csv_rows(folder / 'metrics.csv')
    assert columns == ['file'] + metric_columns([1, 4])
    assert len(rows) == 3
    with open(folder / 'metrics_summary.json') as f:
        assert sorted(json.load(f)) == sorted(metric_columns([1, 4]))
    assert re.search(r'^\s*0\s+4x4\s', proc.stdout, re.MULTILINE)
    assert not re.search(r'^\s*0\s+8x8\s', proc.stdout, re.MULTILINE)
    assert not os.path.exists(out / 'Image' / 'Test' / 'metrics_by_iteration.csv')


# ----------------------------------------------------------------------------------------
# 3. What training writes to judge it by
# ----------------------------------------------------------------------------------------

def test_loss_log_has_one_row_per_report(run):
    columns, rows = read_csv_rows(run['out'] / 'loss_log.csv')
    assert columns == LOG_COLUMNS
    assert [int(row['step']) for row in rows] == REPORTS
    assert [int(row['epoch']) for row in rows] == [1, 1, 1, 2, 2, 2]
    reported = re.findall(r'Current_step:\s*(\d+)\s+D_loss:\s*(\S+)\s+G_loss:\s*(\S+)',
                          run['proc'].stdout)
    assert [int(step) for step, _, _ in reported] == REPORTS
    for row, (_, d, g) in zip(rows, reported, strict=True):
        values = {key: float(row[key]) for key in LOG_COLUMNS}
        assert all(np.isfinite(v) for v in values.values())
        assert values['G'] == pytest.approx(values['G_LSGAN'] + values['G_FM'] + values['G_CC'],
                                            rel=1e-5)
        assert values['D'] == pytest.approx(float(d), abs=1e-4)
        assert values['G'] == pytest.approx(float(g), abs=1e-4)
        assert -1 <= values['CC'] <= 1 and values['seconds_per_step'] >= 0
        # lambda_CC / n_CC * sum over 4 scales of (1 - CC_i): the full-resolution term is
        # 5/4 (1 - CC) and every term lies in [0, 2].
        assert 1.25 * (1 - values['CC']) - 1e-4 <= values['G_CC'] <= 10 + 1e-4


def test_loss_curve_and_training_panels(run):
    with Image.open(run['out'] / 'loss_curve.png') as image:
        assert image.format == 'PNG'
        image.verify()
    folder = run['out'] / 'Image' / 'Train'
    for step in PREVIEWS:
        for kind in ('real', 'fake'):
            assert os.path.isfile(folder / f'{step}_{kind}.png')
        with Image.open(folder / f'{step}_panel.png') as image:
            assert image.format == 'PNG' and image.size[0] > image.size[1]
    panels = sorted(int(name.split('_')[0]) for name in os.listdir(folder)
                    if name.endswith('_panel.png'))
    assert panels == PREVIEWS


def logged_rows(steps):
    return [dict(step=step, D=0.5, G=2.0, G_LSGAN=0.4, G_FM=1.0, G_CC=0.6, CC=0.3)
            for step in steps]


def test_the_loss_curve_shows_the_validation_cc(tmp_path, monkeypatch):
    val_rows = [dict(step=4, cc_1x1=0.2, cc_8x8=0.3, rmse_1x1=50.0, disk_cc_1x1=0.25,
                     disk_cc_8x8=0.35, active_cc_8x8=0.1),
                dict(step=8, cc_1x1=0.4, cc_8x8=0.5, rmse_1x1=40.0, disk_cc_1x1=0.45,
                     disk_cc_8x8=0.55, active_cc_8x8=0.2)]
    figure = drawn_figure(monkeypatch, save_loss_curve, tmp_path / 'curve.png',
                          logged_rows([2, 4, 6, 8]), val_rows)
    assert len(figure.axes) == 3
    validation = figure.axes[2]
    lines = {line.get_label(): line for line in validation.get_lines()}
    assert sorted(lines) == ['cc_1x1', 'cc_8x8', 'disk_cc_1x1', 'disk_cc_8x8']
    assert list(lines['disk_cc_8x8'].get_xdata()) == [4, 8]
    assert list(lines['disk_cc_8x8'].get_ydata()) == [0.35, 0.55]
    assert 'validation' in validation.get_ylabel()
    # Without validation rows, the losses and the training CC only.
    figure = drawn_figure(monkeypatch, save_loss_curve, tmp_path / 'plain.png',
                          logged_rows([2, 4]))
    assert len(figure.axes) == 2


def test_the_trainings_loss_curve_has_the_validation_panel(run, monkeypatch):
    """What the Manager draws: loss_log.csv and val_metrics.csv of the run (a validation
    with targets at every save)."""
    from machinery.files import read_csv
    out = run['out']
    figure = drawn_figure(monkeypatch, save_loss_curve, out.parent / 'again.png',
                          read_csv(out / 'loss_log.csv'), read_csv(out / 'val_metrics.csv'))
    labels = [line.get_label() for line in figure.axes[2].get_lines()]
    assert labels == [f'cc_{k}x{k}' for k in BINS]
    with Image.open(out / 'loss_curve.png') as image:  # three panels: wider than two
        assert image.size[0] > 4 * image.size[1]


def test_validation_metrics_at_every_save(run, evaluated):
    columns, rows = read_csv_rows(run['out'] / 'val_metrics.csv')
    assert columns[0] == 'step' and set(metric_columns(BINS)) <= set(columns)
    assert [int(row['step']) for row in rows] == SAVES
    # The same numbers as the Test script on the same generator (without --save_scale's
    # effect: metrics are in the target's units).
    for row in rows:
        summary = summary_at(evaluated, row['step'])
        for key in ('cc_1x1', 'ccc_8x8', 'rmse_2x2', 'flux_net_fake'):
            assert float(row[key]) == pytest.approx(summary[key]['mean'], rel=1e-4, abs=1e-6), \
                (row['step'], key)


def test_log_rows_are_means_since_the_last_report_and_a_short_run_logs_at_the_end(
        data, tmp_path):
    proc = run_train(TINY + NPY_DATA + data + ['--n_workers', '0', '--report_freq', '4',
                                               '--n_epochs', '1', '--save_freq', '100'],
                     cwd=tmp_path)
    assert_ok(proc)
    rows = loss_rows(tmp_path)
    assert [(int(r['step']), int(r['samples'])) for r in rows] == [(4, 4), (6, 2)]
    assert '(means of 4 samples)' in proc.stdout
    assert os.path.isfile(os.path.join(run_dir(tmp_path), 'loss_curve.png'))

    shorter = tmp_path / 'shorter'
    shorter.mkdir()
    assert_ok(run_train(TINY + NPY_DATA + data + ['--n_workers', '0', '--n_epochs', '1'],
                        cwd=shorter))  # report_freq 100 > 6 samples
    assert logged_steps(shorter) == [6]
    assert os.path.isfile(os.path.join(run_dir(shorter), 'loss_curve.png'))


@pytest.fixture(scope='module')
def resumed(run, tmp_path_factory):
    """The run resumed from step 4 (its steps 8 and 12 done again)."""
    root = tmp_path_factory.mktemp('resumed')
    copy_run(run['root'], root, 'ev')
    for step in (8, 12):
        for kind in ('G', 'D', 'state'):
            os.remove(root / 'checkpoints' / 'ev' / 'Model' / f'{step}_{kind}.pt')
    proc = run_train(['--gpu_ids', '-1', '--dataset_name', 'ev', '--latest_iter', '4',
                      '--n_epochs', '2'], cwd=root)
    assert_ok(proc)
    return root / 'checkpoints' / 'ev'


def test_resumed_loss_log_has_no_repeated_steps(run, resumed):
    _, rows = read_csv_rows(resumed / 'loss_log.csv')
    assert [int(row['step']) for row in rows] == REPORTS
    _, original = read_csv_rows(run['out'] / 'loss_log.csv')
    for new, old in zip(rows, original, strict=True):  # exact resume: the same losses
        for key in ('D', 'G', 'CC'):
            assert float(new[key]) == pytest.approx(float(old[key]), rel=1e-5), (new, old)


def test_resumed_validation_metrics_have_no_repeated_steps(resumed):
    _, rows = read_csv_rows(resumed / 'val_metrics.csv')
    assert [int(row['step']) for row in rows] == SAVES


# ----------------------------------------------------------------------------------------
# 4. Panels: labelled, with colour bars, the way the files are oriented
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('channels', [1, 2])
def test_panel_labels_every_image_and_gives_each_a_colour_bar(tmp_path, monkeypatch, channels):
    """input | real | generated | difference per target channel, each titled, each with its
    own colour bar (what the colours mean in the target's units)."""
    rng = np.random.default_rng(0)
    real = rng.uniform(-3000, 3000, (channels, 16, 16)).astype(np.float32)
    generated = real + rng.normal(0, 100, real.shape).astype(np.float32)
    path = tmp_path / 'panel.png'
    figure = drawn_panel(monkeypatch, path, rng.uniform(-1, 1, (1, 16, 16)), real, generated,
                         Scaling(lower=-3000, upper=3000))
    with Image.open(path) as image:
        assert image.format == 'PNG'
    image_axes = [axis for axis in figure.axes if axis.images]
    assert len(image_axes) == 1 + 3 * channels  # the input, then real, generated, difference
    for axis in image_axes:
        assert axis.get_title().strip(), 'an image without a label'
        assert axis.images[0].colorbar is not None, axis.get_title()
    titles = [axis.get_title() for axis in image_axes]
    assert len(set(titles)) == len(titles)  # each says which picture it is
    bars = {id(axis.images[0].colorbar.ax) for axis in image_axes}
    assert len(bars) == len(image_axes)  # one colour bar per image, not one shared


def red_above_blue(path):
    """True when a panel's strongly red pixels lie, on average, above its strongly blue ones."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert('RGB')).astype(int)
    r, b = rgb[..., 0], rgb[..., 2]
    red_rows = np.nonzero((r > b + 60) & (r > rgb[..., 1] + 60))[0]
    blue_rows = np.nonzero(b > r + 60)[0]
    return bool(red_rows.mean() < blue_rows.mean())


@pytest.mark.parametrize('data_format, first_rows_on_top', [('npy', True), ('png', True),
                                                            ('tif', True), ('fits', False)])
def test_panel_follows_the_files_orientation(tmp_path, data_format, first_rows_on_top):
    # The file's first rows are strongly positive (red), the rest negative (blue).
    real = -np.ones((1, 32, 32), np.float32) * 1000
    real[:, :16] = 1000
    input = np.concatenate([real / 1000, real[:, ::-1] / 1000])  # two input channels
    path = tmp_path / 'panel.png'
    save_panel(str(path), input, real, real.copy(), Scaling(-3000, 3000), unit='G',
               data_format=data_format, title='a.fits, iteration 7')
    assert red_above_blue(path) is first_rows_on_top
    title, description = panel_text(path)
    assert title.startswith('a.fits, iteration 7') and 'CC 1.000' in title
    assert 'in G' in description
    with Image.open(path) as image:  # both input channels, real, generated, difference
        assert image.size[0] > 4 * image.size[1]


def test_panel_says_which_input_channels_it_shows(tmp_path):
    real = np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32)
    save_panel(str(tmp_path / 'p.png'), np.zeros((10, 16, 16), np.float32), real, real,
               Scaling(-3, 3), data_format='npy', title='x')
    title, description = panel_text(tmp_path / 'p.png')
    assert '0-5 of 10' in title and 'normalised' in description


def sample_pair(name='sun_0032.fits'):
    """A sample input (DN/s) normalised as the quick start does, its target (G) and the
    target's header (helioprojective WCS)."""
    from astropy.io import fits
    input = fits.getdata(os.path.join(SAMPLE, 'Test', 'Input', name)).astype(np.float32)
    with fits.open(os.path.join(SAMPLE, 'Test', 'Target', name)) as hdul:
        real, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
    input_scaling = Scaling(lower=1, upper=200, log=True)
    return input_scaling.forward(input)[None], real[None], header, input_scaling


def test_panel_axes_are_helioprojective_with_a_wcs(tmp_path, monkeypatch):
    input, real, header, input_scaling = sample_pair()
    figure = drawn_panel(monkeypatch, tmp_path / 'panel.png', input, real, real * 0.9,
                         Scaling(-3000, 3000), unit='G', data_format='fits',
                         input_scaling=input_scaling, input_unit='DN/s',
                         wcs=translation.panel_wcs(header))
    image_axes = [axis for axis in figure.axes if axis.images]
    assert len(image_axes) == 4
    for axis in image_axes:
        x, y = axis.coords[0].get_axislabel(), axis.coords[1].get_axislabel()
        assert 'helioprojective longitude' in x and '["]' in x, x
        assert 'helioprojective latitude' in y, y
        # FITS row 0 at the bottom: the image's pixel rows run up from the axis' origin.
        assert axis.images[0].origin == 'lower'
        # The world coordinate of the bottom-left pixel centre: -31.5 px * 32"/px.
        lon, lat = (float(angle + 180) % 360 - 180 for angle in
                    axis.wcs.pixel_to_world_values(0, 0))  # (degrees, longitude in 0..360)
        assert lon * 3600 == pytest.approx(-1008.0, rel=1e-3)
        assert lat * 3600 == pytest.approx(-1008.0, rel=1e-3)
    # Without a WCS: no ticks, as before.
    figure = drawn_panel(monkeypatch, tmp_path / 'plain.png', input, real, real,
                         Scaling(-3000, 3000), data_format='fits')
    assert all(not axis.get_xticks().size for axis in figure.axes if axis.images)


def test_the_input_colour_bar_is_in_the_inputs_units(tmp_path, monkeypatch):
    """The normalised input mapped back by its scaling: the sample's 1..200 DN/s on a log
    scale, each channel by its own limits."""
    from pix2pixCC_Pipeline import PerChannelScaling
    input, real, _, input_scaling = sample_pair()
    figure = drawn_panel(monkeypatch, tmp_path / 'panel.png', input, real, real,
                         Scaling(-3000, 3000), unit='G', data_format='fits',
                         input_scaling=input_scaling, input_unit='DN/s')
    drawn = next(axis for axis in figure.axes if axis.images).images[0]
    assert drawn.colorbar.ax.get_ylabel() == 'DN / s'  # (unit_label: astropy's spelling)
    assert (drawn.norm.vmin, drawn.norm.vmax) == (1, 200)
    from astropy.io import fits
    physical = fits.getdata(os.path.join(SAMPLE, 'Test', 'Input', 'sun_0032.fits'))
    assert np.allclose(drawn.get_array(), physical, rtol=1e-5)
    _, description = panel_text(tmp_path / 'panel.png')
    assert description.startswith('input in DN / s;')

    # Two channels of different scalings, one linear; no unit known.
    two = np.stack([input[0], input[0] * 0.5])
    scalings = PerChannelScaling((input_scaling, Scaling(lower=-50, upper=50)))
    figure = drawn_panel(monkeypatch, tmp_path / 'two.png', two, real, real,
                         Scaling(-3000, 3000), input_scaling=scalings)
    first, second = [axis.images[0] for axis in figure.axes if axis.images][:2]
    assert (second.norm.vmin, second.norm.vmax) == (-50, 50)
    assert np.allclose(second.get_array(), two[1] * 50, atol=1e-4)
    assert first.colorbar.ax.get_ylabel() == second.colorbar.ax.get_ylabel() == 'input units'


def test_a_test_runs_panels_have_the_products_wcs_and_the_inputs_unit(constant_run, in_tmp,
                                                                      monkeypatch):
    import matplotlib.figure
    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig',
                        lambda figure, *a, **k: figures.append(figure) or savefig(figure, *a, **k))
    assert pix2pixCC_Test.main(constant_run + ['--iteration', '2', '--save_panels']) == 0
    assert len(figures) == 2
    for figure in figures:
        axes = [axis for axis in figure.axes if axis.images]
        assert axes[0].images[0].colorbar.ax.get_ylabel() == 'DN / s'
        assert 'helioprojective latitude' in axes[1].coords[1].get_axislabel()


# ----------------------------------------------------------------------------------------
# 5. The sample learns (a shortened quick start)
# ----------------------------------------------------------------------------------------

def test_a_short_run_on_the_sample_learns_the_magnetograms(tmp_path):
    """The quick start in miniature (384 steps, a small network, the lr decay): the test CC
    stays above a floor far from what an untrained or broken model gives (about 0). Measured
    at 0.53 (1x1) and 0.59 (8x8) with torch 2.13 on the CPU; the README's full quick start
    reaches 0.75 to 0.85, depending on the CPU and the thread count."""
    network = ['--gpu_ids', '-1', '--n_gf', '16', '--n_df', '16', '--n_downsample', '2',
               '--n_residual', '2', '--n_CC', '3', '--n_workers', '0']
    scaling = ['--logscale_input', 'True', '--saturation_lower_limit_input', '1',
               '--saturation_upper_limit_input', '200', '--saturation_lower_limit_target',
               '-3000', '--saturation_upper_limit_target', '3000']  # as the quick start
    assert_ok(run_train(network + scaling + [
        '--dataset_name', 's', '--data_format_input', 'fits', '--data_format_target', 'fits',
        '--input_dir_train', os.path.join(SAMPLE, 'Train', 'Input'),
        '--target_dir_train', os.path.join(SAMPLE, 'Train', 'Target'),
        '--n_epochs', '6', '--n_epochs_decay', '6', '--seed', '1', '--save_freq', '10000',
        '--report_freq', '1000', '--display_freq', '10000'], cwd=tmp_path))
    assert_ok(run_test(['--gpu_ids', '-1', '--n_workers', '0', '--dataset_name', 's',
                        '--iteration', '384',
                        '--input_dir_test', os.path.join(SAMPLE, 'Test', 'Input'),
                        '--target_dir_test', os.path.join(SAMPLE, 'Test', 'Target')],
                       cwd=tmp_path))
    with open(tmp_path / 'checkpoints' / 's' / 'Image' / 'Test' / '384' /
              'metrics_summary.json') as f:
        summary = json.load(f)
    assert summary['cc_1x1']['mean'] > 0.4, summary['cc_1x1']
    assert summary['cc_8x8']['mean'] > 0.4, summary['cc_8x8']


# ----------------------------------------------------------------------------------------
# 6. Regions: the solar disk, active and quiet Sun (README "Evaluating a model")
# ----------------------------------------------------------------------------------------

REGIONS = ('', 'disk_', 'active_', 'quiet_')
FRAME = (40, 48)  # rows, columns: not square
PIXEL = 30.0  # arcsec
RADIUS_PX = 14.0
RSUN_REF = 696000000.0


def disk_header(cunit='arcsec', radius_cards='RSUN_OBS'):
    """A helioprojective TAN header of FRAME whose reference pixel is off the frame's centre
    and points 60" west and 30" south of the Sun's centre, so that the disk's centre is at
    neither; the Sun's radius is RADIUS_PX pixels, given as RSUN_OBS or RSUN_REF + DSUN_OBS."""
    from astropy.io import fits
    to_unit = {'arcsec': 1.0, 'deg': 1 / 3600}[cunit]
    header = fits.Header()
    header['CTYPE1'], header['CTYPE2'] = 'HPLN-TAN', 'HPLT-TAN'
    header['CUNIT1'] = header['CUNIT2'] = cunit
    header['CDELT1'] = header['CDELT2'] = PIXEL * to_unit
    header['CRPIX1'], header['CRPIX2'] = 21.3, 17.6  # (1-based)
    header['CRVAL1'], header['CRVAL2'] = 60.0 * to_unit, -30.0 * to_unit
    arcsec = RADIUS_PX * PIXEL
    if radius_cards == 'RSUN_OBS':
        header['RSUN_OBS'] = arcsec
    else:
        header['RSUN_REF'] = RSUN_REF
        header['DSUN_OBS'] = RSUN_REF / np.sin(np.deg2rad(arcsec / 3600))
    return header


def sun_maps(header, seed=0):
    """(real, fake), 1 x FRAME: a quiet field with two strong spots of opposite sign on the
    disk of `header`, and a noisy, damped prediction of it."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:FRAME[0], 0:FRAME[1]]
    real = rng.normal(0, 20, FRAME)
    for x, y, field in ((13, 12, 1500), (22, 20, -1200)):
        real += field * np.exp(-((columns - x) ** 2 + (rows - y) ** 2) / 6)
    fake = 0.7 * real + rng.normal(0, 40, FRAME)
    return real[None], fake[None]


def distance_from_sun_centre_px(header, columns, rows):
    """How far from helioprojective (0", 0") the pixel positions look, in pixels: astropy's
    WCS gives their longitude and latitude (in degrees), which divide by the pixel size."""
    from astropy.wcs import WCS
    longitude, latitude = WCS(header).pixel_to_world_values(columns, rows)
    longitude = (longitude + 180) % 360 - 180
    return np.hypot(longitude, latitude) * 3600 / PIXEL


def expected_masks(header, k, real, fraction, threshold):
    """{region: mask} of the k-binned map: the disk by the bins' centres, active by the
    binned |real|."""
    h, w = FRAME[0] // k, FRAME[1] // k
    rows, columns = np.mgrid[0:h, 0:w] * k + (k - 1) / 2
    distance = distance_from_sun_centre_px(header, columns, rows)
    # No bin centre lies on the edge, where the TAN projection's tiny difference from
    # the pixel distance could decide.
    assert np.abs(distance - fraction * RADIUS_PX).min() > 1e-3
    disk = distance <= fraction * RADIUS_PX
    active = disk & (np.abs(block_mean(real, k)) >= threshold)
    return {'disk_': disk, 'active_': active, 'quiet_': disk & ~active}


def expected_region_metrics(header, real, fake, bins, fraction, threshold):
    out = {}
    for k in bins:
        r, f = block_mean(real, k), block_mean(fake, k)
        for region, mask in expected_masks(header, k, real, fraction, threshold).items():
            out[f'{region}cc_{k}x{k}'] = stats.pearsonr(r[mask], f[mask])[0]
            out[f'{region}ccc_{k}x{k}'] = lin_ccc(r[mask], f[mask])
            out[f'{region}rmse_{k}x{k}'] = np.sqrt(np.mean((r[mask] - f[mask]) ** 2))
            out[f'{region}mae_{k}x{k}'] = np.mean(np.abs(r[mask] - f[mask]))
    for region, mask in expected_masks(header, 1, real, fraction, threshold).items():
        out.update({f'{region}flux_unsigned_real': np.abs(real[mask]).sum(),
                    f'{region}flux_unsigned_fake': np.abs(fake[mask]).sum(),
                    f'{region}flux_net_real': real[mask].sum(),
                    f'{region}flux_net_fake': fake[mask].sum()})
    return out


HEADERS = [('arcsec', 'RSUN_OBS'), ('deg', 'RSUN_OBS'), ('arcsec', 'RSUN_REF'),
           ('deg', 'RSUN_REF')]


@pytest.mark.parametrize('cunit, radius_cards', HEADERS)
def test_the_disk_is_where_the_targets_wcs_puts_the_sun(cunit, radius_cards):
    header = disk_header(cunit, radius_cards)
    disk, reason = disk_from_header(header)
    assert reason is None
    assert disk.radius == pytest.approx(RADIUS_PX, rel=1e-9)
    # The centre is off the frame's centre and off the reference pixel.
    assert abs(disk.x - (FRAME[1] - 1) / 2) > 2 and abs(disk.x - (21.3 - 1)) > 1
    assert distance_from_sun_centre_px(header, disk.x, disk.y) == pytest.approx(0, abs=1e-9)
    real, _ = sun_maps(header)
    masks = evaluation.region_masks(real[0], 1, disk, 0.98, 100.0)
    for region, mask in expected_masks(header, 1, real[0], 0.98, 100.0).items():
        np.testing.assert_array_equal(masks[region], mask, err_msg=region)
    assert 0 < masks['disk_'].sum() < masks[''].sum()  # the disk is not the frame


@pytest.mark.parametrize('cunit, radius_cards', HEADERS)
@pytest.mark.parametrize('fraction', [0.98, 0.72])
def test_disk_active_and_quiet_metrics_equal_an_independent_computation(
        cunit, radius_cards, fraction):
    """At k = 2 the region is decided on the binned target: the bin's centre for the disk,
    the binned |real| for the threshold."""
    header = disk_header(cunit, radius_cards)
    real, fake = sun_maps(header)
    disk, _ = disk_from_header(header)
    row = image_metrics(real, fake, [1, 2], disk, fraction, 100.0)
    assert list(row) == [key for region in REGIONS for key in metric_columns([1, 2], region)]
    assert_metrics_close(row, expected_metrics(real[0], fake[0], [1, 2]))  # as before
    assert_metrics_close(row, expected_region_metrics(header, real[0], fake[0], [1, 2],
                                                      fraction, 100.0))
    # The regions differ: the binned map puts other bins above the threshold.
    masks = expected_masks(header, 2, real[0], fraction, 100.0)
    assert 2 <= masks['active_'].sum() < masks['disk_'].sum()
    assert not np.array_equal(masks['active_'], block_mean(
        expected_masks(header, 1, real[0], fraction, 100.0)['active_'].astype(float), 2) > 0)


def test_no_threshold_no_active_and_quiet_and_an_empty_region_is_nan():
    header = disk_header()
    real, fake = sun_maps(header)
    disk, _ = disk_from_header(header)
    assert list(image_metrics(real, fake, [1], disk)) == metric_columns([1]) + \
        metric_columns([1], 'disk_')
    row = image_metrics(real, fake, [1, 8], disk, 0.98, 1e6)  # nothing is that strong
    assert all(np.isnan(row[key]) for key in metric_columns([1, 8], 'active_'))
    for key in metric_columns([1, 8], 'quiet_'):
        assert row[key] == pytest.approx(row[key.replace('quiet_', 'disk_')], rel=1e-12)
    # A disk smaller than a pixel holds fewer than 2: NaN, not an error.
    assert np.isnan(image_metrics(real, fake, [1], Disk(10.0, 10.0, 0.5))['disk_rmse_1x1'])


def test_several_channels_put_the_channel_first(pair):
    real, fake = pair
    row = image_metrics(np.concatenate([real, -real]), np.concatenate([fake, fake]), [1],
                        Disk(25.0, 25.0, 20.0), 0.98, 5.0)
    assert list(row) == [key for c in (0, 1) for region in REGIONS
                         for key in metric_columns([1], f'ch{c}_{region}')]


def test_headers_without_the_cards_have_no_disk():
    header = disk_header()
    del header['RSUN_OBS']
    assert disk_from_header(header) == (None, 'no RSUN_OBS, nor RSUN_REF with DSUN_OBS')
    header = disk_header()
    header['CTYPE1'], header['CTYPE2'] = 'RA---TAN', 'DEC--TAN'
    assert disk_from_header(header)[0] is None


def test_the_table_shows_each_region():
    header = disk_header()
    real, fake = sun_maps(header)
    row = image_metrics(real, fake, [1, 8], disk_from_header(header)[0], 0.98, 100.0)
    table = metrics_table(evaluation.summarize([row]), [1, 8], unit='G')
    titles = [line for line in table.splitlines() if line.endswith(':')]
    assert titles == ['whole frame:', 'disk:', 'active (on disk):', 'quiet (on disk):'] * 2
    assert len(re.findall(r'^\s*0\s+8x8\s', table, re.MULTILINE)) == 4
    disk_rows = table.split('disk:\n', 1)[1]
    assert float(re.search(r'^\s*0\s+1x1\s+(\S+)', disk_rows, re.MULTILINE).group(1)) == \
        pytest.approx(row['disk_cc_1x1'], abs=1e-4)


# A Test run on the shipped sample's FITS files (whose cards give the disk) with constant
# generators: 0 G at step 2, 1500 G at step 4 (normalised 0 and 0.5 of the +-3000 G limits).
SAMPLE_TEST = SAMPLE_DATA + ['--dataset_name', 'disk', '--n_workers', '0']
SAMPLE_TARGETS = os.path.join(SAMPLE, 'Test', 'Target')


@pytest.fixture
def constant_run(in_tmp):
    opt = make_test_opt(*SAMPLE_TEST)
    for step, value in ((2, 0.0), (4, 0.5)):
        constant_generator_checkpoint(opt, value, step=step)
    _, _, test_in = copy_sample(in_tmp, n_train=0, n_test=2)
    targets = in_tmp / 'Test' / 'Target'
    os.makedirs(targets)
    for name in sorted(os.listdir(SAMPLE_TARGETS))[:2]:
        os.symlink(os.path.join(SAMPLE_TARGETS, name), targets / name)
    return TINY + SAMPLE_TEST + ['--input_dir_test', test_in, '--target_dir_test',
                                 str(targets)]


def test_a_test_run_on_the_sample_writes_every_region(constant_run, in_tmp, capsys):
    from astropy.io import fits
    assert pix2pixCC_Test.main(constant_run + ['--active_threshold', '200']) == 0
    stdout = capsys.readouterr().out
    assert 'notice: no solar disk' not in stdout
    columns = [key for region in REGIONS for key in metric_columns(BINS, region)]
    test_dir = in_tmp / 'checkpoints' / 'disk' / 'Image' / 'Test'
    for step in (2, 4):
        header, rows = read_csv_rows(test_dir / str(step) / 'metrics.csv')
        assert header == ['file'] + columns
        with open(test_dir / str(step) / 'metrics_summary.json') as f:
            assert sorted(json.load(f)) == sorted(columns)
    header, by_iteration = read_csv_rows(test_dir / 'metrics_by_iteration.csv')
    assert header == ['iteration'] + columns
    # The numbers: those of the written file against the target on the sample's disk (its
    # centre 31.5, 31.5 and radius 896" / 32" = 28 px, by make_sample.py).
    name = rows[1]['file']
    real = fits.getdata(os.path.join(SAMPLE_TARGETS, f'{name}.fits')).astype(np.float64)
    fake = fits.getdata(test_dir / '4' / f'{name}_AI.fits').astype(np.float64)
    rows_, columns_ = np.mgrid[0:64, 0:64]
    disk = np.hypot(columns_ - 31.5, rows_ - 31.5) <= 0.98 * 28
    assert float(rows[1]['disk_rmse_1x1']) == pytest.approx(
        np.sqrt(np.mean((real[disk] - fake[disk]) ** 2)), rel=1e-5)
    assert float(rows[1]['active_flux_unsigned_real']) == pytest.approx(
        np.abs(real[disk & (np.abs(real) >= 200)]).sum(), rel=1e-5)
    assert 'disk:' in stdout and 'quiet (on disk):' in stdout
    assert 'best iteration by mean cc_8x8' in stdout  # (constant outputs: CC is NaN)


OBSERVER_CARDS = ('DSUN_OBS', 'HGLN_OBS', 'HGLT_OBS', 'RSUN_OBS', 'RSUN_REF')
SAMPLE_FILES = sorted(glob.glob(os.path.join(SAMPLE, '*', '*', '*.fits')))


def assert_consistent_observer(header, where):
    """The observer cards are there, and the Sun's angular radius they give two ways agrees
    (what sunpy checks before its "rsun mismatch" warning)."""
    assert all(key in header for key in OBSERVER_CARDS), where
    radius = np.degrees(np.arcsin(header['RSUN_REF'] / header['DSUN_OBS'])) * 3600
    assert radius == pytest.approx(header['RSUN_OBS'], rel=1e-6), where
    assert header['RSUN_REF'] == 695700000.0, where  # sunpy's solar radius


def test_every_sample_file_has_a_consistent_observer():
    from astropy.io import fits
    assert len(SAMPLE_FILES) == 80
    for path in SAMPLE_FILES:
        assert_consistent_observer(fits.getheader(path), path)


def test_the_shipped_sample_is_what_make_sample_writes(tmp_path):
    proc = run_command([sys.executable, os.path.join(REPO, 'datasets', 'make_sample.py'),
                        '--out', str(tmp_path)], cwd=tmp_path)
    assert_ok(proc)
    for path in SAMPLE_FILES:
        with open(path, 'rb') as shipped, \
                open(tmp_path / os.path.relpath(path, SAMPLE), 'rb') as made:
            assert shipped.read() == made.read(), path


def test_products_of_the_sample_take_the_inputs_observer(constant_run, in_tmp):
    from astropy.io import fits
    assert pix2pixCC_Test.main(constant_run + ['--iteration', '2']) == 0
    folder = in_tmp / 'checkpoints' / 'disk' / 'Image' / 'Test' / '2'
    products = sorted(folder.glob('*_AI.fits'))
    assert len(products) == 2
    for product in products:
        header = fits.getheader(product)
        assert_consistent_observer(header, product)
        source = fits.getheader(in_tmp / 'Test' / 'Input' /
                                product.name.replace('_AI.fits', '.fits'))
        assert all(header[key] == source[key] for key in OBSERVER_CARDS + ('DATE-OBS',))


def test_flux_in_mx_equals_an_independent_computation(constant_run, in_tmp, capsys):
    """The sample's targets in gauss (--target_unit G) with DSUN_OBS and CDELTn: flux in Mx
    beside the flux in G px, = sum(B) * (DSUN_OBS tan 32")^2 in cm^2."""
    from astropy.io import fits
    assert pix2pixCC_Test.main(constant_run + ['--iteration', '4', '--target_unit', 'G']) == 0
    stdout = capsys.readouterr().out
    folder = in_tmp / 'checkpoints' / 'disk' / 'Image' / 'Test' / '4'
    columns, rows = read_csv_rows(folder / 'metrics.csv')
    assert columns == ['file'] + [key for region in ('', 'disk_')
                                  for key in metric_columns(BINS, region, mx=True)]
    header = fits.getheader(os.path.join(SAMPLE_TARGETS, 'sun_0032.fits'))
    side_cm = header['DSUN_OBS'] * 100 * np.tan(np.radians(32 / 3600))
    real = fits.getdata(os.path.join(SAMPLE_TARGETS, 'sun_0032.fits')).astype(np.float64)
    fake = fits.getdata(folder / 'sun_0032_AI.fits').astype(np.float64)
    row = rows[0]
    assert float(row['flux_unsigned_real_Mx']) == pytest.approx(
        np.abs(real).sum() * side_cm ** 2, rel=1e-6)
    assert float(row['flux_net_fake_Mx']) == pytest.approx(fake.sum() * side_cm ** 2, rel=1e-6)
    assert float(row['flux_net_real']) == pytest.approx(real.sum(), rel=1e-6)  # G px, as before
    assert 5e18 < side_cm ** 2 < 7e18  # 1.07 AU, 32": about 2.5e9 cm a side
    assert '[G px]' in stdout and '[Mx]' in stdout
    # Another unit: unit px only.
    assert pix2pixCC_Test.main(constant_run + ['--iteration', '4', '--target_unit', 'kG',
                                               '--output_dir', str(in_tmp / 'kG')]) == 0
    columns, _ = read_csv_rows(in_tmp / 'kG' / 'metrics.csv')
    assert not [key for key in columns if key.endswith('_Mx')]
    assert '[Mx]' not in capsys.readouterr().out


def test_pixel_area_needs_dsun_and_cdelt_and_takes_cunit():
    header = {'DSUN_OBS': 1.5e11, 'CDELT1': 0.6, 'CDELT2': 0.6, 'CUNIT1': 'arcsec',
              'CUNIT2': 'arcsec'}
    side_cm = 1.5e13 * np.tan(np.radians(0.6 / 3600))  # ~4.36e7 cm: an AIA pixel
    assert evaluation.pixel_area_cm2(header) == pytest.approx(side_cm ** 2, rel=1e-9)
    in_degrees = dict(header, CDELT1=0.6 / 3600, CDELT2=0.6 / 3600)
    del in_degrees['CUNIT1'], in_degrees['CUNIT2']  # (degrees by default)
    assert evaluation.pixel_area_cm2(in_degrees) == pytest.approx(side_cm ** 2, rel=1e-9)
    for missing in ('DSUN_OBS', 'CDELT1', 'CDELT2'):
        assert evaluation.pixel_area_cm2({k: v for k, v in header.items()
                                              if k != missing}) is None


def test_select_metric_picks_the_best_iteration_by_a_region_key(constant_run, in_tmp, capsys):
    assert pix2pixCC_Test.main(constant_run + ['--select_metric', 'disk_rmse_1x1']) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if 'best iteration' in line]
    _, rows = read_csv_rows(in_tmp / 'checkpoints' / 'disk' / 'Image' / 'Test' /
                            'metrics_by_iteration.csv')
    assert float(rows[0]['disk_rmse_1x1']) < float(rows[1]['disk_rmse_1x1'])  # 0 G is closer
    assert len(line) == 2 and 'by mean disk_rmse_1x1: 2 (' in line[0]
    assert line[1].startswith('best iteration by mean disk_cc_1x1: ')  # its region's full CC


def test_an_unknown_select_metric_is_one_line_listing_the_keys(constant_run, in_tmp):
    with pytest.raises(UserError) as error:
        pix2pixCC_Test.main(constant_run + ['--select_metric', 'active_cc_8x8'])
    message = str(error.value)
    assert '\n' not in message and message.startswith('--select_metric active_cc_8x8 is not')
    assert 'disk_cc_8x8' in message and 'cc_1x1' in message and 'active_' not in \
        message.split('available:')[1]  # (no --active_threshold: no active region)
    assert not os.path.exists(in_tmp / 'checkpoints' / 'disk' / 'Image')  # nothing written


def test_npy_targets_take_the_disk_in_pixels_or_have_none(in_tmp, capsys):
    opt = make_test_opt(*NPY_DATA, dataset_name='npy', n_workers=0)
    constant_generator_checkpoint(opt, 0.3, step=2)
    input_dir, target_dir = make_pairs(in_tmp, 'npy', n=2, size=32)
    base = TINY + NPY_DATA + ['--dataset_name', 'npy', '--n_workers', '0', '--iteration', '2',
                              '--input_dir_test', input_dir, '--target_dir_test', target_dir]
    folder = in_tmp / 'checkpoints' / 'npy' / 'Image' / 'Test' / '2'
    assert pix2pixCC_Test.main(base) == 0
    notices = [line for line in capsys.readouterr().out.splitlines() if 'notice' in line]
    assert notices == ['notice: no solar disk in 2 of 2 target file(s) (img_000.npy: npy '
                       'files have no FITS cards), so no disk_/active_/quiet_ metrics for '
                       'them; give --disk_center_px X Y --disk_radius_px R to set it in pixels']
    assert read_csv_rows(folder / 'metrics.csv')[0] == ['file'] + metric_columns(BINS)

    assert pix2pixCC_Test.main(base + ['--disk_center_px', '12', '17.5', '--disk_radius_px',
                                       '10', '--active_threshold', '60', '--overwrite']) == 0
    assert 'notice: no solar disk' not in capsys.readouterr().out
    columns, rows = read_csv_rows(folder / 'metrics.csv')
    assert columns == ['file'] + [key for region in REGIONS
                                  for key in metric_columns(BINS, region)]
    real = np.load(os.path.join(target_dir, 'img_000.npy')).astype(np.float64)
    fake = np.load(folder / 'img_000_AI.npy').astype(np.float64)
    rows_, columns_ = np.mgrid[0:32, 0:32]
    quiet = (np.hypot(columns_ - 12, rows_ - 17.5) <= 0.98 * 10) & (np.abs(real) < 60)
    assert float(rows[0]['quiet_mae_1x1']) == pytest.approx(
        np.mean(np.abs(real[quiet] - fake[quiet])), rel=1e-5)


@pytest.mark.parametrize('argv, fragment', [
    (['--disk_radius_px', '5'], '--disk_center_px X Y and --disk_radius_px R go together'),
    (['--disk_center_px', '1', '2', '--disk_radius_px', '0'], '--disk_radius_px positive'),
    (['--disk_fraction', '0'], '--disk_fraction must be a positive number'),
    (['--active_threshold', '-1'], '--active_threshold must be a number >= 0')])
def test_region_options_are_checked(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        make_test_opt(*argv)
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err


def test_validation_during_training_has_the_disk_metrics(tmp_path):
    train_in, train_tg, test_in = copy_sample(tmp_path, n_train=2, n_test=2)
    test_tg = tmp_path / 'Test' / 'Target'
    os.makedirs(test_tg)
    for name in sorted(os.listdir(SAMPLE_TARGETS))[:2]:
        os.symlink(os.path.join(SAMPLE_TARGETS, name), test_tg / name)
    assert_ok(run_train(TINY + SAMPLE_DATA + [
        '--dataset_name', 'val', '--n_workers', '0', '--n_epochs', '1', '--save_freq', '2',
        '--input_dir_train', train_in, '--target_dir_train', train_tg, '--val_during_train',
        '--input_dir_test', test_in, '--target_dir_test', test_tg, '--metric_bins', '1', '8',
        '--active_threshold', '200'], cwd=tmp_path))
    columns, rows = read_csv_rows(os.path.join(run_dir(tmp_path, 'val'), 'val_metrics.csv'))
    assert columns == ['step'] + [key for region in REGIONS  # (the sample is in G)
                                  for key in metric_columns([1, 8], region, mx=True)]
    assert [int(row['step']) for row in rows] == [2]
    assert all(np.isfinite(float(rows[0][key])) for key in ('disk_cc_1x1', 'quiet_rmse_8x8'))


# ----------------------------------------------------------------------------------------
# 6. Targets that are not magnetograms; the panels' size and unit labels
# ----------------------------------------------------------------------------------------

def euv_targets(in_tmp):
    """The constant run's EUV inputs (BUNIT DN/s, the sample's disk, 14 to 190 DN/s on it)
    as their own targets: data that are not magnetograms."""
    folder = in_tmp / 'EUVTarget'
    os.makedirs(folder)
    for path in sorted((in_tmp / 'Test' / 'Input').iterdir()):
        os.symlink(path, folder / path.name)
    return str(folder)


def test_an_empty_quiet_region_is_explained_once_per_run(constant_run, in_tmp, capsys):
    """--active_threshold 10 on EUV targets: every on-disk pixel is active, so the quiet
    rows are NaN; one line (not one per file or per generator) says why and what to do."""
    argv = constant_run + ['--target_dir_test', euv_targets(in_tmp), '--target_unit', 'DN/s',
                           '--active_threshold', '10']
    assert pix2pixCC_Test.main(argv) == 0  # both generators
    notices = [line for line in capsys.readouterr().out.splitlines() if 'quiet' in line and
               line.startswith('notice')]
    assert len(notices) == 1, notices
    for fragment in ('empty in 2 of 2', 'sun_0032.fits', '--active_threshold 10 DN / s',
                     'quiet_', 'not magnetograms'):
        assert fragment in notices[0], (fragment, notices[0])
    _, rows = read_csv_rows(in_tmp / 'checkpoints' / 'disk' / 'Image' / 'Test' / '4' /
                            'metrics.csv')
    assert all(row['quiet_rmse_1x1'] == 'nan' and row['active_rmse_1x1'] != 'nan'
               for row in rows)
    # A threshold in the data's unit splits the disk: no notice.
    assert pix2pixCC_Test.main(argv + ['--active_threshold', '30', '--overwrite']) == 0
    assert 'notice' not in capsys.readouterr().out


def test_sums_of_targets_that_are_not_magnetic_are_not_called_flux(constant_run, in_tmp,
                                                                    capsys):
    """Targets in DN/s: sum|x| and sum(x) are named for what they are, in the columns and
    the table; a magnetic unit (and an unknown one) keeps the flux names."""
    assert pix2pixCC_Test.main(constant_run + [
        '--target_dir_test', euv_targets(in_tmp), '--target_unit', 'DN/s', '--iteration',
        '4']) == 0
    stdout = capsys.readouterr().out
    columns, _ = read_csv_rows(in_tmp / 'checkpoints' / 'disk' / 'Image' / 'Test' / '4' /
                               'metrics.csv')
    sums = ['sum_abs_real', 'sum_abs_fake', 'sum_real', 'sum_fake']
    assert columns == ['file'] + [key for region in ('', 'disk_') for key in
                                  metric_columns(BINS, region)[:-4] + [region + name
                                                                      for name in sums]]
    assert 'flux' not in stdout and 'sum of |value|' in stdout and '[(DN / s) px]' in stdout
    real, fake = np.ones((1, 4, 4)), np.full((1, 4, 4), -2.0)
    for unit in ('G', 'Mx/cm2', 'kG', 'T', None):
        assert metric_columns([1]) == list(image_metrics(
            real, fake, [1], pixel=evaluation.TargetPixel(unit)))
    row = image_metrics(real, fake, [1], pixel=evaluation.TargetPixel('DN/s'))
    assert (row['sum_abs_real'], row['sum_abs_fake'], row['sum_real'], row['sum_fake']) == \
        (16.0, 32.0, 16.0, -32.0)


def drawn_map_scale(figure, path, size):
    """How many pixels of the saved PNG each map pixel spans, in each image panel."""
    with Image.open(path) as image:
        width = image.size[0]
    return [axis.get_position().width * width / size for axis in figure.axes if axis.images]


def test_panels_draw_the_map_near_its_native_resolution(tmp_path, monkeypatch):
    """A 512 px map fills about 512 px of each panel (not ~150 as a fixed figure size
    gives); a 64 px map still gets a figure whose fonts and panels are readable."""
    sizes, scales, fonts = {}, {}, {}
    for size in (64, 512):
        real = np.random.default_rng(0).uniform(-3000, 3000, (1, size, size))
        path = tmp_path / f'{size}.png'
        figure = drawn_panel(monkeypatch, path, real / 3000, real, real * 0.9,
                             Scaling(-3000, 3000), unit='G')
        with Image.open(path) as image:
            sizes[size] = image.size
        scales[size] = drawn_map_scale(figure, path, size)
        dpi = sizes[size][0] / figure.get_figwidth()
        fonts[size] = min(axis.title.get_fontsize() for axis in figure.axes if axis.images) \
            * dpi / 72  # in pixels of the PNG
    assert sizes[512][0] > 1.5 * sizes[64][0] and sizes[512][1] > 1.5 * sizes[64][1], sizes
    assert min(scales[512]) >= 0.8 and max(scales[512]) <= 1.1, scales[512]
    assert min(scales[64]) * 64 >= 160, scales[64]  # a small map is enlarged, not a stamp
    assert fonts[64] >= 11 and fonts[512] > fonts[64], fonts


def test_one_unit_is_labelled_alike_everywhere(tmp_path, monkeypatch):
    """An input and a target in DN/s: both colour bars (and the PNG's description) spell
    the unit the same way, astropy's; a string astropy cannot read is shown as it is."""
    rng = np.random.default_rng(1)
    real = rng.uniform(1, 200, (1, 16, 16))
    input_scaling = Scaling(lower=1, upper=200, log=True)
    figure = drawn_panel(monkeypatch, tmp_path / 'panel.png', input_scaling.forward(real),
                         real, real, Scaling(1, 200, log=True), unit='DN/s',
                         input_scaling=input_scaling, input_unit='DN/s')
    labels = [axis.images[0].colorbar.ax.get_ylabel() for axis in figure.axes if axis.images]
    assert labels == ['DN / s'] * 4
    _, description = panel_text(tmp_path / 'panel.png')
    assert description.startswith('input in DN / s; real, generated and difference in DN / s;')
    assert evaluation.unit_label('DN s-1') == 'DN / s'
    assert evaluation.unit_label('counts/pixel') == 'counts/pixel'
    assert evaluation.unit_label(None) is None


def test_an_empty_active_region_is_named_with_its_channel():
    """A channel whose on-disk values all lie below the threshold has no active region: one
    line names the channel and the first such file, none for the channel that has both."""
    from types import SimpleNamespace
    weak = np.full((16, 16), 5.0)
    split = np.where(np.arange(16)[:, None] < 8, 500.0, -5.0) * np.ones((16, 16))
    targets = {'a.fits': np.stack([split, weak]), 'b.fits': np.stack([split, weak * 2])}
    dataset = SimpleNamespace(target_paths=[f'/data/{name}' for name in targets],
                              read_target=lambda index: list(targets.values())[index])
    opt = SimpleNamespace(active_threshold=100.0, disk_fraction=0.98, target_ch=2,
                          target_unit='G')
    lines = evaluation.empty_region_notices(dataset, opt, [Disk(7.5, 7.5, 8.0)] * 2)
    assert lines == ['notice: the active region of channel 1 (on-disk pixels with |target| >= '
                     '--active_threshold 100 G) is empty in 2 of 2 target file(s) with a disk, '
                     'so their active_ metrics are NaN: no on-disk pixel of a.fits reaches it '
                     '(its on-disk |values| lie between 5 and 5 G)']
