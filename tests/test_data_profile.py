"""Data unlike the training data (README "Evaluating a model"): training records a profile of
its data with the run, the model file and the ONNX metadata; the Test script (from the run
folder or a --model file) and deploy/onnx_translate.py warn in one line per kind of
difference, naming the first file, and never on data like the training data."""
import itertools
import json
import os
import shutil
import sys

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import zoom

from conftest import (REPO, SAMPLE, SAMPLE_DATA, TINY, assert_ok, copy_sample, run_command,
                      run_in, run_train)
from machinery.data_profile import (QUANTILE_DIFFERENCE, header_facts, profile_differences,
                                    side_profile)
from pix2pixCC_Utils import model_field_problem

RUN, STEP = 'profiled', 8
RUNS = itertools.count()  # each Test run writes into a folder of its own
TRANSLATOR = os.path.join(REPO, 'deploy', 'onnx_translate.py')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run on 8 sample FITS pairs (step 8), its model file and its ONNX export."""
    root = tmp_path_factory.mktemp('profiled_run')
    train_in, train_tg, _ = copy_sample(root, n_train=8, n_test=0)
    assert_ok(run_train(TINY + SAMPLE_DATA + [
        '--dataset_name', RUN, '--n_epochs', '1', '--save_freq', str(STEP), '--seed', '1',
        '--n_workers', '0', '--input_dir_train', train_in, '--target_dir_train', train_tg],
        cwd=root))
    for kind in ('model', 'onnx'):
        assert run_in(root, ['--dataset_name', RUN, '--iteration', str(STEP), '--export',
                             kind]) == 0
    export = root / 'checkpoints' / RUN / 'Export'
    return dict(root=root, model=export / f'{RUN}_{STEP}.pt', onnx=export / f'{RUN}_{STEP}.onnx')


def warnings_of(output):
    return [line for line in output.splitlines() if 'data unlike the training data' in line]


def run_lines(trained, capsys, *argv):
    """The warning lines of a Test run from the run folder (argv: its data options)."""
    out = trained['root'] / 'out' / str(next(RUNS))
    assert run_in(trained['root'], ['--dataset_name', RUN, '--iteration', str(STEP),
                                    '--output_dir', str(out), *argv]) == 0
    return warnings_of(capsys.readouterr().out)


def model_lines(trained, capsys, *argv):
    """The warning lines of a Test run with the --model file."""
    out = trained['root'] / 'model_out' / str(next(RUNS))
    assert run_in(trained['root'], ['--model', str(trained['model']), '--output_dir', str(out),
                                    *argv]) == 0
    return warnings_of(capsys.readouterr().out)


def translator_lines(trained, inputs, tmp_path):
    """The warning lines of deploy/onnx_translate.py on the folder `inputs`."""
    proc = run_command([sys.executable, TRANSLATOR, '--model', trained['onnx'], '--input_dir',
                        inputs, '--output_dir', tmp_path / 'onnx_out'], trained['root'])
    assert_ok(proc)
    return warnings_of(proc.stdout)


SAMPLE_TEST = [os.path.join(SAMPLE, 'Test', role) for role in ('Input', 'Target')]


def test_the_profile_travels_with_the_run_the_model_file_and_the_onnx_metadata(trained):
    with open(trained['root'] / 'checkpoints' / RUN / 'train_options.json') as f:
        profile = json.load(f)['training_data']
    assert profile['input']['channels'][0]['unit'] == 'DN/s'
    assert profile['target']['channels'][0]['unit'] == 'G'
    assert profile['input']['disk_radius_px'] == pytest.approx(28, rel=0.05)
    assert profile['input']['size'] == [64, 64] and profile['input']['files'] == 5
    from pix2pixCC_Utils import load_model_file
    assert load_model_file(str(trained['model']))['training_data'] == profile
    import onnx
    props = {p.key: p.value for p in onnx.load(str(trained['onnx'])).metadata_props}
    assert json.loads(props['pix2pixCC'])['training_data'] == profile


def test_data_like_the_training_data_give_no_warning(trained, capsys, tmp_path):
    """The README's commands: the sample's test pairs, by the run, the model file and ONNX."""
    data = ['--input_dir_test', SAMPLE_TEST[0], '--target_dir_test', SAMPLE_TEST[1]]
    assert run_lines(trained, capsys, *data) == []
    assert model_lines(trained, capsys, *data) == []
    assert translator_lines(trained, SAMPLE_TEST[0], tmp_path) == []


def test_swapped_folders_are_named_in_one_line(trained, capsys):
    lines = run_lines(trained, capsys, '--input_dir_test', SAMPLE_TEST[1],
                      '--target_dir_test', SAMPLE_TEST[0])
    first_input = os.path.join(SAMPLE_TEST[1], sorted(os.listdir(SAMPLE_TEST[1]))[0])
    assert lines == [f"warning: data unlike the training data (swapped): the inputs "
                     f"({first_input}, ...) are what the training's targets were and the "
                     f"targets what its inputs were; check --input_dir_test and "
                     f"--target_dir_test"]


def test_targets_given_as_inputs_are_named_by_unit_and_values(trained, capsys):
    """Without targets to tell a swap, what differs in the inputs: one line per kind."""
    lines = run_lines(trained, capsys, '--input_dir_test', SAMPLE_TEST[1])
    kinds = [line.split('(', 1)[1].split(')', 1)[0] for line in lines]
    assert kinds == ['instrument or passband', 'unit', 'values'], lines
    first = os.path.join(SAMPLE_TEST[1], sorted(os.listdir(SAMPLE_TEST[1]))[0])
    assert all(first in line for line in lines)
    assert "its input is in G, the training data's in DN/s" in lines[1]
    assert 'swapped input and target folders' in lines[2]


def raw_dn_copies(folder, dest, exposure=2.9):
    """The sample's DN/s inputs as raw level-1 data in DN: times an exposure, no BUNIT."""
    os.makedirs(dest)
    for name in sorted(os.listdir(folder)):
        with fits.open(os.path.join(folder, name)) as hdul:
            header = hdul[0].header.copy()
            del header['BUNIT']
            header['EXPTIME'] = exposure
            fits.PrimaryHDU(hdul[0].data * exposure, header).writeto(os.path.join(dest, name))
    return str(dest)


def test_raw_dn_given_to_a_dn_per_second_model_is_named_everywhere(trained, capsys, tmp_path):
    inputs = raw_dn_copies(SAMPLE_TEST[0], tmp_path / 'raw')
    for lines in (run_lines(trained, capsys, '--input_dir_test', inputs),
                  model_lines(trained, capsys, '--input_dir_test', inputs),
                  translator_lines(trained, inputs, tmp_path)):
        kinds = [line.split('(', 1)[1].split(')', 1)[0] for line in lines]
        assert kinds == ['unit', 'values'], lines  # (2.9 times the values: log10 2.9 higher)
        assert "is in no unit (no BUNIT), the training data's in DN/s" in lines[0]
        assert os.path.join(inputs, sorted(os.listdir(inputs))[0]) in lines[0]


def larger_maps(folder, dest, factor=4):
    """The sample's inputs resampled to `factor` times as many pixels (the disk as many times
    larger in pixels), with their WCS updated."""
    os.makedirs(dest)
    for name in sorted(os.listdir(folder)):
        with fits.open(os.path.join(folder, name)) as hdul:
            header = hdul[0].header.copy()
            data = zoom(hdul[0].data.astype(np.float32), factor, order=1)
            for axis in (1, 2):
                header[f'CDELT{axis}'] /= factor
                header[f'CRPIX{axis}'] = (header[f'CRPIX{axis}'] - 0.5) * factor + 0.5
            fits.PrimaryHDU(data, header).writeto(os.path.join(dest, name))
    return str(dest)


def test_a_disk_of_another_size_in_pixels_is_named(trained, capsys, tmp_path):
    lines = run_lines(trained, capsys, '--input_dir_test', larger_maps(SAMPLE_TEST[0],
                                                                       tmp_path / 'large'))
    assert len(lines) == 1 and '(pixel scale)' in lines[0], lines
    assert "disk in its input is 112 px in radius (8\"/px), in the training data 28 px " \
           "(32\"/px)" in lines[0]


def test_a_real_aia_file_is_told_apart_from_the_sample(trained, capsys, tmp_path):
    """sunpy's AIA 171 level-1 file (128 px, 19\"/px, DN) to the sample's model (304, 64 px,
    32\"/px, DN/s)."""
    import sunpy.data.test
    inputs = tmp_path / 'aia'
    os.makedirs(inputs)
    shutil.copy(os.path.join(os.path.dirname(sunpy.data.test.__file__), 'aia_171_level1.fits'),
                inputs)
    lines = run_lines(trained, capsys, '--input_dir_test', str(inputs))
    kinds = [line.split('(', 1)[1].split(')', 1)[0] for line in lines]
    assert kinds[:3] == ['instrument or passband', 'unit', 'pixel scale'], lines
    assert "SDO/AIA 171 angstrom, the training data's SYNTHETIC 304 angstrom" in lines[0]


def test_a_run_of_an_older_version_is_not_compared(trained, capsys, tmp_path):
    root = tmp_path / 'old'
    shutil.copytree(trained['root'] / 'checkpoints', root / 'checkpoints')
    options = root / 'checkpoints' / RUN / 'train_options.json'
    record = json.loads(options.read_text())
    del record['training_data']
    options.write_text(json.dumps(record))
    assert run_in(root, ['--dataset_name', RUN, '--iteration', str(STEP), '--input_dir_test',
                         SAMPLE_TEST[1], '--output_dir', str(tmp_path / 'out')]) == 0
    assert warnings_of(capsys.readouterr().out) == []


def test_a_model_file_with_a_profile_that_is_not_data_is_refused():
    record = {'run': 'x', 'step': 1, 'options': {}, 'target_header': None,
              'training_data': {'input': object()}}
    assert 'profile of the training data' in model_field_problem(record)
    record['training_data'] = None
    assert model_field_problem(record) is None


def profile_of(arrays, headers=None):
    return side_profile([(headers, array) for array in arrays])


def test_images_without_headers_are_compared_by_size_and_values():
    rng = np.random.default_rng(0)
    small = [rng.uniform(-1, 1, (1, 64, 64)).astype(np.float32) for _ in range(3)]
    trained = {'input': profile_of(small)}
    same = {'input': profile_of([rng.uniform(-1, 1, (1, 64, 64)) for _ in range(2)])}
    assert profile_differences(trained, same, {'input': 'a.npy'}) == []
    large = {'input': profile_of([rng.uniform(-1, 1, (1, 256, 256)) for _ in range(2)])}
    assert profile_differences(trained, large, {'input': 'a.npy'}) == [
        "warning: data unlike the training data (pixel scale): a.npy: its input is 256x256 px, "
        "the training data 64x64 px; the network learnt features at the training data's pixel "
        "scale: resample the data to it (datasets/prepare_pairs.py --size and "
        "--disk_radius_px)"]
    shifted = {'input': profile_of([rng.uniform(-1, 1, (1, 64, 64)) + 2 * QUANTILE_DIFFERENCE
                                    for _ in range(2)])}
    lines = profile_differences(trained, shifted, {'input': 'a.npy'})
    assert len(lines) == 1 and '(values)' in lines[0]


def test_header_facts_of_real_files():
    """sunpy's AIA file: R_SUN there is the full-resolution radius (1622 px of a 128 px
    image), so the radius comes from RSUN_OBS / CDELT1."""
    import sunpy.data.test
    header = fits.getheader(os.path.join(os.path.dirname(sunpy.data.test.__file__),
                                         'aia_171_level1.fits'))
    facts = header_facts(header)
    assert facts['instrument'] == 'SDO/AIA' and facts['wavelength'] == '171 angstrom'
    assert facts['unit'] == 'DN'  # (PIXLUNIT: AIA level 1 has no BUNIT)
    assert facts['pixel_scale_arcsec'] == pytest.approx(19.18, abs=0.01)
    assert facts['disk_radius_px'] == pytest.approx(971.81 / 19.1836, rel=1e-4)
