"""README "Sharing a model and running it elsewhere": one model file that runs the Test script
alone (bit-identical products, bfloat16 weights, refusals of bad files), and the conversion of
an archive (--skip_existing, a stop after the file in progress, metrics over every file,
tile-compressed FITS)."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from astropy.io import fits

from machinery import translation
from conftest import (RECORD, REPO, SAMPLE, SAMPLE_DATA, TINY, assert_ok, load, make_pairs,
                      read_user_file, record_in, run_in, run_script, run_train, snapshot)
from pix2pixCC_Pipeline import read_array, read_fits_header
from pix2pixCC_Utils import weights_sha256

RUN = 'shared'
STEP = 8


def copy_sample_split(root, split, n):
    """The first n sample pairs of `split` ('Train' or 'Test'); returns (input, target)."""
    folders = []
    for role in ('Input', 'Target'):
        source, dest = os.path.join(SAMPLE, split, role), os.path.join(str(root), split, role)
        os.makedirs(dest)
        for name in sorted(os.listdir(source))[:n]:
            shutil.copy(os.path.join(source, name), dest)
        folders.append(dest)
    return folders


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run on 8 sample FITS pairs (step 8), its model file, and 4 test pairs."""
    root = tmp_path_factory.mktemp('shared_run')
    train_in, train_tg = copy_sample_split(root, 'Train', 8)
    test_in, test_tg = copy_sample_split(root, 'Test', 4)
    assert_ok(run_train(TINY + SAMPLE_DATA + [
        '--dataset_name', RUN, '--n_epochs', '1', '--save_freq', str(STEP), '--seed', '1',
        '--n_workers', '0', '--input_dir_train', train_in, '--target_dir_train', train_tg],
        cwd=root))
    return dict(root=root, test=['--input_dir_test', test_in, '--target_dir_test', test_tg])


def exported(trained, *extra):
    """Export the run's generator of STEP (--export model + extra) into a copy of the run
    (the module's run stays as it is); returns the model file's path."""
    root = trained['root']
    assert run_in(root, ['--dataset_name', RUN, '--iteration', str(STEP),
                            '--export', 'model', *extra]) == 0
    name = f'{RUN}_{STEP}_bf16.pt' if '16' in extra else f'{RUN}_{STEP}.pt'
    return str(root / 'checkpoints' / RUN / 'Export' / name)


def products(folder):
    """{name: bytes} of the files a Test run wrote in `folder`, but its record (which names
    where the generator came from)."""
    return {name: content for name, (content, _) in snapshot(folder).items() if name != RECORD}


def one_error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------------------
# 1. One model file
# ----------------------------------------------------------------------------------------

def test_a_model_file_runs_alone_with_bit_identical_products(trained, tmp_path):
    model = exported(trained)
    # What it holds, read with weights_only=True
    record = torch.load(model, weights_only=True)
    with open(trained['root'] / 'checkpoints' / RUN / 'train_options.json') as f:
        options = json.load(f)
    assert (record['format_version'], record['step'], record['run']) == (1, STEP, RUN)
    assert record['weights_sha256'] == weights_sha256(record['weights'])
    assert set(record['weights']) == set(load(trained['root'] / 'checkpoints' / RUN / 'Model' /
                                              f'{STEP}_G.pt'))
    assert record['target_header'] == options['target_header'] and \
        record['target_header']['BUNIT'] == 'G'
    for name in ('n_gf', 'n_downsample', 'logscale_input', 'saturation_upper_limit_target'):
        assert record['options'][name] == options[name], name

    # The run folder's products, and the model file's in an empty folder, in the folder the
    # run would use
    reference = tmp_path / 'reference'
    assert run_in(trained['root'], ['--dataset_name', RUN, '--iteration', str(STEP),
                                       '--output_dir', str(reference), *trained['test']]) == 0
    alone = tmp_path / 'elsewhere'
    os.makedirs(alone)
    shutil.copy(model, alone / 'model.pt')
    assert run_in(alone, ['--model', 'model.pt', *trained['test']]) == 0
    assert os.listdir(alone) == ['model.pt', 'checkpoints'] or \
        sorted(os.listdir(alone)) == ['checkpoints', 'model.pt']
    out = alone / 'checkpoints' / RUN / 'Image' / 'Test' / str(STEP)
    written = products(out)
    assert sorted(written) == sorted(products(reference)) and \
        'sun_0032_AI.fits' in written and 'metrics.csv' in written
    assert written == products(reference)  # FITS headers and metrics included
    assert record_in(out)['run'] == str(alone / 'model.pt')


def test_bfloat16_weights_halve_the_file_and_change_the_products_a_little(trained, tmp_path):
    full, half = exported(trained), exported(trained, '--export_dtype', '16')
    assert os.path.getsize(half) < 0.6 * os.path.getsize(full)
    weights = torch.load(half, weights_only=True)['weights']
    assert {value.dtype for value in weights.values() if value.is_floating_point()} == \
        {torch.bfloat16}
    outputs = {}
    for name, model in (('full', full), ('half', half)):
        assert run_in(tmp_path, ['--model', model, '--output_dir', name,
                                    *trained['test']]) == 0
        outputs[name] = read_user_file(tmp_path / name / 'sun_0033_AI.fits', 'fits')
    change = np.abs(outputs['half'] - outputs['full']).max()
    # The weights keep 8 significant bits: the products move, by a small part of the
    # target range (6000 G).
    assert 0 < change < 0.02 * 6000


def damaged_copies(model, folder):
    """{what is wrong: path} of model files that must be refused."""
    record = torch.load(model, weights_only=True)
    paths = {}
    with open(model, 'rb') as f:
        content = f.read()
    paths['truncated'] = folder / 'truncated.pt'
    paths['truncated'].write_bytes(content[:len(content) // 2])
    paths['newer format'] = folder / 'version.pt'
    torch.save({**record, 'format_version': 2}, paths['newer format'])
    changed = dict(record['weights'])
    key = next(key for key, value in changed.items() if value.is_floating_point())
    changed[key] = changed[key] + 1e-3
    paths['hash mismatch'] = folder / 'hash.pt'
    torch.save({**record, 'weights': changed}, paths['hash mismatch'])
    paths['a checkpoint'] = folder / 'checkpoint.pt'
    torch.save(record['weights'], paths['a checkpoint'])
    paths['a run name that is a path'] = folder / 'escape.pt'  # (it would name the folders)
    torch.save({**record, 'run': '../../escape'}, paths['a run name that is a path'])
    paths['a step that is no number'] = folder / 'step.pt'
    torch.save({**record, 'step': '1; rm'}, paths['a step that is no number'])
    return paths


@pytest.mark.parametrize('damage, words', [
    ('truncated', 'not a readable model file'), ('newer format', 'format version 2'),
    ('hash mismatch', 'SHA-256'), ('a checkpoint', 'not a pix2pixCC model file'),
    ('a run name that is a path', "run name '../../escape' is not a folder name"),
    ('a step that is no number', 'is not a number of samples')])
def test_a_bad_model_file_is_refused_in_one_line(trained, tmp_path, capsys, damage, words):
    path = damaged_copies(exported(trained), tmp_path)[damage]
    assert run_in(tmp_path, ['--model', str(path), *trained['test']]) == 2
    line = one_error_line(capsys)
    assert words in line and str(path) in line and 'Traceback' not in line
    assert not os.path.exists(tmp_path / 'checkpoints')


def test_export_needs_one_step_and_never_replaces_another_export_unasked(trained, capsys):
    run = ['--dataset_name', RUN]
    assert run_in(trained['root'], run + ['--export', 'model']) == 2
    assert f'saved steps in ./checkpoints/{RUN}/Model: {STEP}' in one_error_line(capsys)
    model = exported(trained)
    before = snapshot(os.path.dirname(model))
    assert run_in(trained['root'], run + ['--iteration', str(STEP), '--export',
                                             'model']) == 0  # the same export: left alone
    assert snapshot(os.path.dirname(model)) == before
    other = run + ['--iteration', str(STEP), '--export', 'model', '--save_scale', '2',
                   '--saturation_upper_limit_target', '2000']
    capsys.readouterr()
    assert run_in(trained['root'], other) == 2
    assert 'already holds another export' in one_error_line(capsys)
    assert snapshot(os.path.dirname(model)) == before
    assert run_in(trained['root'], other + ['--overwrite']) == 0
    assert torch.load(model, weights_only=True)['options'][
        'saturation_upper_limit_target'] == 2000
    exported(trained, '--overwrite')  # as it was, for the other tests


def test_a_model_file_refuses_another_step_or_run_name(trained, tmp_path, capsys):
    model = exported(trained)
    assert run_in(tmp_path, ['--model', model, '--iteration', '3', *trained['test']]) == 2
    assert '--iteration 3 differs from the model file' in one_error_line(capsys)


# ----------------------------------------------------------------------------------------
# 2. Converting an archive
# ----------------------------------------------------------------------------------------

NPY_RUN = TINY + ['--data_format_input', 'npy', '--data_format_target', 'npy',
                  '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '100',
                  '--saturation_lower_limit_target', '0',
                  '--saturation_upper_limit_target', '100', '--dataset_name', 'archive']


@pytest.fixture
def archive(tmp_path):
    """An untrained generator (step 2) of the run 'archive' and 6 npy test pairs."""
    from conftest import train_opt
    from pix2pixCC_Networks import Generator, weights_init
    model = tmp_path / 'checkpoints' / 'archive' / 'Model'
    os.makedirs(model)
    torch.manual_seed(0)
    torch.save(Generator(train_opt()).apply(weights_init).state_dict(), model / '2_G.pt')
    input_dir, target_dir = make_pairs(tmp_path / 'data', 'npy', n=6)
    return NPY_RUN + ['--iteration', '2', '--input_dir_test', input_dir,
                      '--target_dir_test', target_dir]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_conversion_resumes_and_its_metrics_cover_every_file(archive, tmp_path,
                                                                       monkeypatch, capsys,
                                                                       signum):
    assert run_in(tmp_path, archive + ['--output_dir', 'through']) == 0
    write_output = translation.write_output

    def signal_at_the_third(path, *args, **kwargs):
        header = write_output(path, *args, **kwargs)
        if 'img_002' in path:
            os.kill(os.getpid(), signum)  # while the third file is in progress
        return header

    monkeypatch.setattr(translation, 'write_output', signal_at_the_third)
    assert run_in(tmp_path, archive + ['--output_dir', 'stopped']) == 128 + signum
    line = one_error_line(capsys)
    assert f'stopped by {signal.Signals(signum).name} after 3 of 6 file(s)' in line
    assert '--skip_existing' in line
    assert sorted(os.listdir(tmp_path / 'stopped')) == \
        ['img_000_AI.npy', 'img_001_AI.npy', 'img_002_AI.npy', RECORD]  # no metrics yet

    monkeypatch.setattr(translation, 'write_output', write_output)
    kept = snapshot(tmp_path / 'stopped')
    assert run_in(tmp_path, archive + ['--output_dir', 'stopped', '--skip_existing']) == 0
    assert '3 of 6 output(s)' in capsys.readouterr().out
    resumed = snapshot(tmp_path / 'stopped')
    assert all(resumed[name] == kept[name] for name in kept if name != RECORD)  # untouched
    through = snapshot(tmp_path / 'through')
    assert {name: content for name, (content, _) in resumed.items()} == \
        {name: content for name, (content, _) in through.items()}  # metrics.csv included


def test_skip_existing_writes_what_is_missing_or_incomplete(archive, tmp_path):
    assert run_in(tmp_path, archive + ['--output_dir', 'out', '--save_panels']) == 0
    first = snapshot(tmp_path / 'out')
    os.remove(tmp_path / 'out' / 'img_004_AI.npy')
    os.remove(tmp_path / 'out' / 'img_001_panel.png')  # stopped between output and panel
    # a killed writer's temporary is never taken for a product
    (tmp_path / 'out' / '.tmp-1-img_004_AI.npy').write_bytes(b'partial')
    assert run_in(tmp_path, archive + ['--output_dir', 'out', '--save_panels',
                                          '--skip_existing']) == 0
    again = snapshot(tmp_path / 'out')
    rewritten = sorted(name for name in first if again[name][1] != first[name][1])
    assert rewritten == sorted(['img_001_AI.npy', 'img_001_panel.png', 'img_004_AI.npy',
                                'img_004_panel.png', 'metrics.csv', 'metrics_summary.json',
                                RECORD])
    assert again['img_004_AI.npy'][0] == first['img_004_AI.npy'][0]


# ----------------------------------------------------------------------------------------
# 3. Tile-compressed FITS
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('step', [None, 2.5])
def test_compressed_products_read_back_within_the_step(trained, tmp_path, step):
    plain = tmp_path / 'plain'
    assert run_in(trained['root'], ['--dataset_name', RUN, '--iteration', str(STEP),
                                       '--output_dir', str(plain), *trained['test']]) == 0
    packed = tmp_path / 'packed'
    quantize = ['--quantize_step', str(step)] if step else []
    argv = ['--dataset_name', RUN, '--iteration', str(STEP), '--output_dir', str(packed),
            '--compress', *quantize, *trained['test']]
    assert run_in(trained['root'], argv) == 0
    name = 'sun_0034_AI.fits'
    original = read_user_file(plain / name, 'fits')
    with fits.open(packed / name) as hdul:  # as astropy reads it
        assert isinstance(hdul[1], fits.CompImageHDU)
        data = np.array(hdul[1].data)
    np.testing.assert_array_equal(read_array(str(packed / name), 'fits', 1)[0], data)
    error = np.abs(data.astype(np.float64) - original).max()
    if step is None:
        assert error == 0
    else:
        assert 0 < error <= step / 2 * (1 + 1e-6)
        assert os.path.getsize(packed / name) < os.path.getsize(plain / name)
    header, own = read_fits_header(str(packed / name)), read_fits_header(str(plain / name))
    for key in ('BUNIT', 'CTYPE1', 'CRVAL1', 'CDELT2', 'DATE-OBS', 'RSUN_OBS', 'TELESCOP'):
        assert header.get(key) == own.get(key), key
    assert any(f'step of {step} G' in line for line in header['HISTORY']) == bool(step)
    # Resumed: the metrics of the kept compressed files are read from them
    os.remove(packed / 'metrics.csv')
    assert run_in(trained['root'], argv + ['--skip_existing']) == 0
    assert os.path.isfile(packed / 'metrics.csv')
    if step is None:
        assert (packed / 'metrics.csv').read_bytes() == (plain / 'metrics.csv').read_bytes()


@pytest.mark.parametrize('argv, words', [
    (['--quantize_step', '1'], '--quantize_step rounds the values of --compress'),
    (['--compress', '--quantize_step', '0'], '--quantize_step must be a positive number'),
    (['--compress'], '--compress writes tile-compressed FITS, but the outputs are npy'),
    (['--export_dtype', '16'], '--export_dtype applies to --export model')])
def test_conversion_options_that_cannot_work_are_refused(archive, tmp_path, capsys, argv,
                                                         words):
    assert run_in(tmp_path, archive + argv) == 2
    assert words in one_error_line(capsys)
    assert not os.path.exists(tmp_path / 'checkpoints' / 'archive' / 'Image')


def test_the_memory_benchmark_measures_each_archive(tmp_path):
    """benchmarks/conversion_memory.py (BENCHMARKS.md): one JSON line per archive size, with
    the peak memory of a Test run that translated every file."""
    proc = run_script(os.path.join(REPO, 'benchmarks', 'conversion_memory.py'),
                      ['--tiny', '--counts', '2', '--keep', str(tmp_path / 'work')],
                      cwd=tmp_path)
    assert_ok(proc)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line['files'] for line in lines] == [2]
    assert 50 < lines[0]['peak_rss_mb'] < 4000
    assert len(os.listdir(tmp_path / 'work' / 'out_2')) == 2 + 3  # metrics, summary, record


def test_reading_the_world_coordinates_of_many_inputs_never_crashes(tmp_path):
    """A conversion builds every product's WCS from its input's header; astropy 8.0's
    find_all_wcs corrupted the heap and a Test run died after about 40 FITS files. 300
    headers in one process, primary and alternate descriptions found."""
    script = tmp_path / 'many.py'
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from astropy.io import fits\n"
        "from machinery.products import world_descriptions\n"
        f"header = fits.getheader({os.path.join(SAMPLE, 'Test', 'Input', 'sun_0032.fits')!r})\n"
        "for key, value in (('CTYPE1A', 'HPLN-TAN'), ('CTYPE2A', 'HPLT-TAN'), ('CDELT1A', 1.0),"
        " ('CDELT2A', 1.0)):\n"
        "    header[key] = value\n"
        "for _ in range(300):\n"
        "    found = world_descriptions(header)\n"
        "print(len(found), found[1].wcs.alt)\n")
    proc = run_script(str(script), [], cwd=tmp_path)
    assert_ok(proc)
    assert proc.stdout.split() == ['2', 'A']
