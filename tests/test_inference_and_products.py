"""The Test script and what it writes, as README "Output files" documents it: the generated
files in every format and in the target's units, the FITS header of a generated map (the
input's geometry, time and observer, the training targets' identity and unit, a WCS for its
own axes, none of the input's exposure, value, processing and file cards), the output
folders and their records, and a generator loaded for inference that gives each layer's
weights back once it has run and computes what it computes in training. The Test outputs of
a trained run of each format are checked beside that run in test_training_and_resume.py,
the metric files in test_evaluation.py, a refused Test in test_errors.py.
"""
import ctypes
import json
import mmap
import os
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

import machinery.fast_conv
import machinery.memory
from machinery import tiles, translation, whole_image
from machinery.tile_graph import LayerTracer, tile_plan
import pix2pixCC_Test
import pix2pixCC_Train
from conftest import (AIA_PLACE_AND_TIME, INPUT_ONLY, NPY_DATA, RECORD, SAMPLE_DATA, TINY, H,
                      W, aia_cube_header, constant_generator_checkpoint, copy_sample, field,
                      make_pairs, make_test_opt, panel_text, read_user_file, record_in,
                      snapshot, train_opt)
from machinery.products import generated_header, write_array
from pix2pixCC_Networks import Generator, weights_init
from pix2pixCC_Options import run_main
from pix2pixCC_Pipeline import CustomDataset, read_fits_header

# ----------------------------------------------------------------------------------------
# 1. Every target format, in the target's units (a generator of known constant output)
# ----------------------------------------------------------------------------------------

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
# 2. The FITS header of a generated map: where its cards come from
# ----------------------------------------------------------------------------------------

def test_generated_fits_keeps_the_inputs_geometry_and_takes_the_targets_identity(in_tmp,
                                                                                 capsys):
    """A run on the sample (EUV in DN/s -> magnetograms in G), then Test with only the run's
    name: the map has the input's pointing and time, the targets' unit and instrument (which
    training recorded), and says where it comes from. The training's start-up lines are a
    few lines, without a warning on this well-scaled data."""
    train_in, train_tg, test_in = copy_sample(in_tmp / 'data', n_train=2, n_test=1)
    flags = TINY + SAMPLE_DATA + ['--dataset_name', 'sun', '--n_workers', '0']
    assert pix2pixCC_Train.main(flags + ['--input_dir_train', train_in, '--target_dir_train',
                                         train_tg, '--n_epochs', '1', '--seed', '1',
                                         '--data_size', '64']) == 0
    stdout = capsys.readouterr().out
    # The sample is well scaled with these limits: no scaling warning. Start-up is a few
    # lines, not every option.
    assert 'warning' not in stdout.lower()
    assert 'data: 2 pairs of 64x64 px' in stdout and 'target unit G' in stdout
    assert re.search(r'^run: .*sun', stdout, re.MULTILINE)
    assert re.search(r'^network: generator [\d,]+ parameters', stdout, re.MULTILINE)
    assert 'device: cpu' in stdout and 'seed: 1' in stdout
    assert 'lambda_LSGAN' not in stdout
    with open('checkpoints/sun/train_options.json') as f:
        recorded = json.load(f)['target_header']
    assert recorded == {'BUNIT': 'G', 'INSTRUME': 'MAG-TOY', 'TELESCOP': 'SYNTHETIC'}

    assert pix2pixCC_Test.main(['--gpu_ids', '-1', '--dataset_name', 'sun', '--n_workers', '0',
                                '--input_dir_test', test_in, '--iteration', '2']) == 0
    name = sorted(os.listdir(test_in))[0]
    input_header = fits.getheader(os.path.join(test_in, name))
    assert input_header['WAVELNTH'] == 304 and input_header['BUNIT'] == 'DN/s'
    header = fits.getheader(f"checkpoints/sun/Image/Test/2/{name.replace('.fits', '_AI.fits')}")
    for key in ('CRPIX1', 'CTYPE1', 'CDELT1', 'CRPIX2', 'CTYPE2', 'DATE-OBS', 'RSUN_OBS'):
        assert header[key] == input_header[key], key
    assert (header['BUNIT'], header['INSTRUME'], header['TELESCOP']) == ('G', 'MAG-TOY',
                                                                         'SYNTHETIC')
    assert 'WAVELNTH' not in header and 'WAVEUNIT' not in header
    assert header['ORIGIN'] == 'pix2pixCC'
    history = ' '.join(str(line) for line in header['HISTORY'])
    assert name in history and 'sun' in history and 'iteration 2' in history


def test_target_unit_labels_npy_targets(in_tmp, capsys):
    """npy targets have no BUNIT: --target_unit gives it to FITS outputs, panels and tables."""
    train_in, train_tg = make_pairs(in_tmp / 'data', 'npy', n=2, size=32)
    flags = TINY + NPY_DATA + ['--n_workers', '0', '--dataset_name', 'units', '--target_unit', 'G']
    assert pix2pixCC_Train.main(flags + ['--input_dir_train', train_in, '--target_dir_train',
                                         train_tg, '--n_epochs', '1', '--display_freq', '2',
                                         '--verbose']) == 0
    stdout = capsys.readouterr().out
    assert 'lambda_LSGAN' in stdout  # --verbose: every option
    with open('checkpoints/units/train_options.json') as f:
        options = json.load(f)
    assert options['target_unit'] == 'G' and options['target_header'] == {}
    title, description = panel_text('checkpoints/units/Image/Train/2_panel.png')
    assert 'step 2' in title and 'CC' in title
    assert 'in G' in description and 'row 0 of the files at the top' in description

    # Written as FITS: BUNIT from --target_unit, no instrument (the targets had none).
    assert pix2pixCC_Test.main(['--gpu_ids', '-1', '--dataset_name', 'units', '--n_workers',
                                '0', '--input_dir_test', train_in, '--iteration', '2',
                                '--data_format_target', 'fits']) == 0
    header = fits.getheader('checkpoints/units/Image/Test/2/img_000_AI.fits')
    assert header['BUNIT'] == 'G' and header['ORIGIN'] == 'pix2pixCC'
    assert 'INSTRUME' not in header

    # Evaluated: panel and table in gauss.
    capsys.readouterr()
    assert pix2pixCC_Test.main(['--gpu_ids', '-1', '--dataset_name', 'units', '--n_workers',
                                '0', '--input_dir_test', train_in, '--target_dir_test',
                                train_tg, '--iteration', '2', '--save_panels',
                                '--overwrite']) == 0
    stdout = capsys.readouterr().out
    assert '[G]' in stdout and '[G px]' in stdout and 'unsigned flux' in stdout
    title, description = panel_text('checkpoints/units/Image/Test/2/img_001_panel.png')
    assert 'img_001.npy' in title and 'iteration 2' in title and re.search(r'CC -?\d', title)
    assert 'in G' in description


def test_write_fits_copies_the_header_but_not_value_cards(tmp_path):
    header = fits.Header()
    for key, value in [('TELESCOP', 'SYNTHETIC'), ('DATE-OBS', '2011-01-01T00:00:00'),
                       ('CTYPE1', 'HPLN-TAN'), ('CRPIX1', 32.5), ('CDELT1', 0.6),
                       ('CTYPE2', 'HPLT-TAN'), ('CRPIX2', 12.5), ('BUNIT', 'DN/s'),
                       ('INSTRUME', 'AIA'), ('WAVELNTH', 304), ('ORIGIN', 'JSOC'),
                       ('DATAMIN', 1.0), ('DATAMAX', 200.0)]:
        header[key] = value
    header.add_history('calibrated by the instrument team')
    source = str(tmp_path / 'in.fits')
    fits.PrimaryHDU(np.ones((64, 64), np.int16), header=header).writeto(source)
    with fits.open(source) as hdul:
        input_header = hdul[0].header.copy()
    data = field(1, -3000, 3000)
    path = str(tmp_path / 'out.fits')
    # The generated map: the input's geometry and time, the targets' identity (a magnetograph
    # that has no WAVELNTH), a unit.
    out_header = generated_header(input_header, {'INSTRUME': 'HMI', 'TELESCOP': 'SDO/HMI'}, 'G',
                                  ['pix2pixCC: generated from in.fits', 'pix2pixCC: iteration=7'])
    write_array(path, data, 'fits', header=out_header)
    with fits.open(path) as hdul:
        assert len(hdul) == 1
        out = hdul[0].header
        np.testing.assert_array_equal(hdul[0].data, data[0])
    assert out['BITPIX'] == -32
    assert (out['NAXIS'], out['NAXIS1'], out['NAXIS2']) == (2, W, H)
    for key in ('DATE-OBS', 'CTYPE1', 'CRPIX1', 'CDELT1', 'CTYPE2', 'CRPIX2'):
        assert out[key] == header[key], key
    assert (out['INSTRUME'], out['TELESCOP'], out['BUNIT']) == ('HMI', 'SDO/HMI', 'G')
    assert out['ORIGIN'] == 'pix2pixCC'
    for key in ('WAVELNTH', 'DATAMIN', 'DATAMAX', 'BSCALE', 'BZERO'):
        assert key not in out, key
    history = [str(h) for h in out['HISTORY']]
    assert 'calibrated by the instrument team' in history
    assert 'pix2pixCC: generated from in.fits' in history and 'pix2pixCC: iteration=7' in history
    assert list(out.keys()).count('SIMPLE') == 1


def input_file_header(tmp_path, cards, shape):
    """The header of a float32 FITS input of `shape` with `cards`, as the Test reads it."""
    path = str(tmp_path / 'input.fits')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # astropy's note on the BLANK card
        fits.PrimaryHDU(np.zeros(shape, np.float32), header=cards).writeto(path, overwrite=True)
    return read_fits_header(path)


def written_header(tmp_path, input_header, input_channels, channels):
    """The header of a generated map written from an input with `input_header`, and its
    shape (channels x 32 x 32, one channel written as 32 x 32)."""
    out_header = generated_header(input_header, {'INSTRUME': 'HMI', 'TELESCOP': 'SDO/HMI'},
                                  'G', ['pix2pixCC: generated from cube.fits'],
                                  input_channels=input_channels, channels=channels)
    path = str(tmp_path / 'out.fits')
    write_array(path, np.zeros((channels, 32, 32), np.float32), 'fits', header=out_header)
    with fits.open(path) as hdul:
        return hdul[0].header, hdul[0].data.shape


def plane_world(wcs, pixels, plane_axes=(0, 1), naxis=None):
    """World coordinates of image-plane `pixels` [(x, y), ...] (0-based) under `wcs`, whose
    image-plane axes are `plane_axes` of its `naxis` pixel axes (others at pixel 0)."""
    naxis = naxis or wcs.wcs.naxis
    coordinates = np.zeros((len(pixels), naxis))
    coordinates[:, list(plane_axes)] = pixels
    world = wcs.wcs_pix2world(coordinates, 0)
    return world[:, list(plane_axes)]


PIXELS = [(0, 0), (10, 20), (31, 5), (15.5, 15.5)]


@pytest.mark.filterwarnings('ignore::astropy.wcs.FITSFixedWarning')  # MJD-OBS noted
@pytest.mark.parametrize('channels_last', [False, True])
def test_map_from_a_multi_channel_fits_cube_has_the_image_planes_wcs(tmp_path, channels_last):
    """README "Output files": a 2-D magnetogram made from a 3 x H x W EUV cube whose header
    describes its wavelength axis (WCSAXES = 3, CTYPE3 = 'WAVE') has a 2-axis WCS that maps
    its pixels where the cube's image plane maps them (the wavelength axis would leave
    astropy, sunpy and reproject unable to use it)."""
    input_header = input_file_header(tmp_path, aia_cube_header(32, channels_last=channels_last),
                                     (32, 32, 3) if channels_last else (3, 32, 32))
    input_wcs = WCS(input_header)
    header, shape = written_header(tmp_path, input_header, 3, 1)
    wcs = WCS(header)
    assert shape == (32, 32) and wcs.wcs.naxis == 2 and wcs.pixel_n_dim == 2
    assert list(wcs.wcs.ctype) == ['HPLN-TAN', 'HPLT-TAN']
    assert 'WAVE' not in repr(header) and 'WCSAXES' not in header or header['WCSAXES'] == 2
    np.testing.assert_allclose(plane_world(wcs, PIXELS),
                               plane_world(input_wcs, PIXELS, (1, 2) if channels_last else
                                           (0, 1)), rtol=0, atol=1e-9)
    for key in ('DATE-OBS', 'T_OBS', 'HGLN_OBS', 'HGLT_OBS', 'DSUN_OBS', 'RSUN_OBS',
                'CRLN_OBS'):
        assert header[key] == input_header[key], key


@pytest.mark.filterwarnings('ignore::astropy.wcs.FITSFixedWarning')  # MJD-OBS noted
def test_several_target_channels_get_a_channel_index_axis(tmp_path):
    """README "Output files": C target channels are written C x H x W, and the third axis of
    their WCS is the channel index 0, 1, ... (CTYPE3 'CHANNEL'), not the input's wavelength."""
    input_header = input_file_header(tmp_path, aia_cube_header(32), (3, 32, 32))
    header, shape = written_header(tmp_path, input_header, 3, 2)
    wcs = WCS(header)
    assert shape == (2, 32, 32) and wcs.wcs.naxis == 3
    assert (header['CTYPE3'], header['CNAME3']) == ('CHANNEL', 'target channel')
    world = wcs.wcs_pix2world([[10, 20, 0], [10, 20, 1]], 0)
    np.testing.assert_allclose(world[:, 2], [0, 1])
    np.testing.assert_allclose(world[:, :2], plane_world(WCS(input_header), [(10, 20)] * 2),
                               rtol=0, atol=1e-9)


@pytest.mark.filterwarnings('ignore::astropy.wcs.FITSFixedWarning')  # MJD-OBS noted
def test_map_from_a_2d_input_gets_the_channel_axis_only_for_several_channels(tmp_path):
    cards = aia_cube_header(32)
    for key in ('WCSAXES', 'CTYPE3', 'CUNIT3', 'CRPIX3', 'CRVAL3', 'CDELT3'):
        del cards[key]
    input_header = input_file_header(tmp_path, cards, (32, 32))
    input_wcs = WCS(input_header)
    header, _ = written_header(tmp_path, input_header, 1, 1)
    # Already the map's axes: the input's WCS cards as they are.
    for key in ('CTYPE1', 'CRPIX1', 'CRVAL1', 'CDELT1', 'CUNIT1', 'CROTA2', 'CRVAL2'):
        assert header[key] == input_header[key], key
    header, _ = written_header(tmp_path, input_header, 1, 3)
    assert WCS(header).wcs.naxis == 3 and header['CTYPE3'] == 'CHANNEL'
    np.testing.assert_allclose(plane_world(WCS(header), PIXELS), plane_world(input_wcs, PIXELS),
                               rtol=0, atol=1e-9)


def test_image_plane_that_depends_on_the_channel_gives_a_map_without_a_wcs(tmp_path):
    """A cube whose sky position moves with the wavelength (PC1_3) has no image-plane WCS of
    its own: the map gets none rather than a wrong one, and keeps its time and observer."""
    cards = aia_cube_header(32)
    del cards['CROTA2']
    cards['PC1_3'] = 0.5
    header, _ = written_header(tmp_path, input_file_header(tmp_path, cards, (3, 32, 32)), 3, 1)
    assert not [key for key in header if key.startswith(('CTYPE', 'CRPIX', 'PC', 'WCSAXES'))]
    assert header['DATE-OBS'] == cards['DATE-OBS'] and header['HGLT_OBS'] == cards['HGLT_OBS']


def test_generated_map_drops_the_inputs_exposure_values_processing_and_file_cards(tmp_path):
    """README "Output files": sunpy would otherwise report an HMI-like map made from AIA with
    AIA's 2 s exposure, level 1 and AIA's value percentiles."""
    input_header = input_file_header(tmp_path, aia_cube_header(32), (3, 32, 32))
    header, _ = written_header(tmp_path, input_header, 3, 1)
    for key, _ in INPUT_ONLY + [('WAVELNTH', 0), ('WAVEUNIT', 0), ('BLANK', 0)]:
        assert key not in header, key
    assert (header['INSTRUME'], header['TELESCOP'], header['ORIGIN']) == \
        ('HMI', 'SDO/HMI', 'pix2pixCC')
    for key, value in AIA_PLACE_AND_TIME:
        if not key.startswith('C') or key.startswith('CR') and key.endswith('_OBS'):
            assert header[key] == value, key  # place, time, observer (the WCS: above)


# ----------------------------------------------------------------------------------------
# 3. Test output folders: --output_dir, one run's outputs per folder, --overwrite, the
#    record (the refusals are in test_errors.py)
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
    assert record_in('every') == {**record, 'iteration': -1, 'weights': None}
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
    translation.translate(Generator(opt), CustomDataset(opt, split='test'), str(folder),
                             opt, torch.device('cpu'), 6)
    assert sorted(os.listdir(folder)) == ['img_000_AI.npy', 'img_001_AI.npy', 'notes.txt',
                                          RECORD]
    notices = [line for line in capsys.readouterr().out.splitlines() if str(folder) in line]
    assert len(notices) == 1 and 'removed' in notices[0], notices
    record = record_in(folder)
    assert record['iteration'] == 6 and record['input_files'] == ['img_000.npy', 'img_001.npy']


# ----------------------------------------------------------------------------------------
# 4. A generator loaded for inference: mapped from the checkpoint, each layer's weights
#    given back once it has run, the same outputs
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm_type', ['InstanceNorm2d', 'BatchNorm2d'])
@pytest.mark.parametrize('legacy_format', [False, True])
def test_generator_loaded_for_inference_gives_bit_identical_outputs(tmp_path, norm_type,
                                                                    legacy_format):
    """The Test script's generator (built on 'meta', weights mapped from the checkpoint)
    computes exactly what a generator built and loaded the plain way computes; files in
    PyTorch's legacy format, which cannot be mapped, load too."""
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
    machinery.fast_conv.use_gemm_convolutions(plain)  # the same CPU kernels as Test's generator
    mapped = translation.load_generator(opt, path, torch.device('cpu'))
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        expected = plain.eval()(x)
        # twice: the second pass runs on weights whose pages the first one gave back
        for _ in range(2):
            assert torch.equal(mapped.eval()(x), expected)
    assert not any(p.is_meta for p in mapped.parameters())
    assert not any(b.is_meta for b in mapped.buffers())


def recording_madvise(events):
    """A ctypes.CDLL whose madvise (of the C library, CDLL(None)) calls the real one and
    records ('release', start, size, advice, result) in `events`."""
    real_cdll = ctypes.CDLL

    def cdll(name, *args, **kwargs):
        library = real_cdll(name, *args, **kwargs)
        if name is not None:
            return library
        real = library.madvise
        real.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

        def madvise(start, size, advice):
            result = real(start, size, advice)
            events.append(('release', start, size, advice, result))
            return result
        return SimpleNamespace(madvise=madvise)
    return cdll


def releases_by_layer(G, x, events):
    """Run G on x; {layer: [(start, size, advice, result)]} of the madvise calls made, each
    given to the layer that started running last before it."""
    events.clear()
    handles = [layer.register_forward_pre_hook(lambda module, args: events.append(('run', module)))
               for layer in G.modules()]
    try:
        with torch.inference_mode():
            output = G(x)
    finally:
        for handle in handles:
            handle.remove()
    released, layer = {}, None
    for event in events:
        if event[0] == 'run':
            layer = event[1]
        else:
            released.setdefault(layer, []).append(event[1:])
    return output, released


def own_tensors(layer):
    return [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]


# Pages faulted in by the last of eight "images" of three "layers" each (an input, then each
# layer's output, the one before freed after it), in a fresh Python, with or without
# reuse_freed_memory first. (With it, the heap grows over the first two to six images, as
# the process's earlier allocations left it, then stays.)
LAYER_SIZES = (2 ** 23, 2 ** 24, 2 ** 22, 2 ** 23)  # floats: 32, 64, 16 and 32 MB
PAGE_FAULTS = """
import resource, sys, torch
import machinery.memory
if sys.argv[1] == 'reuse':
    assert machinery.memory.reuse_freed_memory()
for image in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(2 ** 23).fill_(1.0)
    for size in (2 ** 24, 2 ** 22, 2 ** 23):
        y = torch.empty(size).fill_(1.0)
        del x
        x = y
    del x, y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def python_with_glibc_defaults(code, *args, cwd):
    """The last word `code` prints, run by a fresh Python (which imports this repository)
    with none of the caller's malloc settings."""
    env = {k: v for k, v in os.environ.items()
           if k != 'GLIBC_TUNABLES' and not k.startswith('MALLOC_')}
    env['PYTHONPATH'] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-c', code, *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[-1]


def glibc_mallopt():
    return sys.platform.startswith('linux') and hasattr(ctypes.CDLL(None), 'mallopt') and \
        os.confstr('CS_GNU_LIBC_VERSION') is not None


@pytest.mark.skipif(not glibc_mallopt(), reason="glibc's mallopt")
def test_cpu_inference_reuses_freed_memory_instead_of_faulting_in_new_pages(tmp_path):
    """README "Speed": a full-resolution layer's output (tens of MB) reuses the memory the
    layers before freed. Without the setting, glibc gives the memory of every such
    allocation back to the kernel and each image faults in its pages again; with it, almost
    none."""
    pages = sum(LAYER_SIZES) * 4 // mmap.PAGESIZE
    faults = {mode: int(python_with_glibc_defaults(PAGE_FAULTS, mode, cwd=tmp_path))
              for mode in ('plain', 'reuse')}
    assert faults['plain'] > pages // 2, faults  # the baseline: every page again
    assert faults['reuse'] < pages // 20, faults


GIVE_BACK = """
import sys, torch
import machinery.memory

def resident_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024

assert machinery.memory.reuse_freed_memory()
tile = torch.empty(2 ** 24).fill_(1.0)  # 64 MB
kept = torch.ones(1000)                 # allocated after it: the tile's memory is not the top
del tile
before = resident_mb()
assert not machinery.memory.return_freed_memory(keep=2 ** 27)  # 64 MB free: kept
assert machinery.memory.return_freed_memory(keep=2 ** 25)
print(before - resident_mb())
"""


@pytest.mark.skipif(not glibc_mallopt(), reason="glibc's mallopt")
def test_tiled_images_give_freed_memory_back_after_each_layer(tmp_path, monkeypatch):
    """README "Full-resolution images": the memory a layer's tiles freed, kept by the
    setting above, goes back to the kernel before the next layer (whose tiles have other
    shapes) when more than a limit of it is free, so that a tiled image's memory stays
    bounded: a freed 64 MB tile below live memory stays under a limit of 128 MB and leaves
    the process's resident set under one of 32 MB; and the tiled pass asks after every
    layer."""
    assert float(python_with_glibc_defaults(GIVE_BACK, cwd=tmp_path)) > 48  # MB

    calls = []
    opt = make_test_opt()
    G = Generator(opt).eval()
    with torch.inference_mode():  # (the first tiled image of a network also checks its plan)
        translation.generate(G, torch.rand(1, 1, 40, 48), opt.n_downsample, tile_size=16,
                             tmp_dir=str(tmp_path))
        monkeypatch.setattr(tiles, 'return_freed_memory', lambda: calls.append(1))
        translation.generate(G, torch.rand(1, 1, 40, 48), opt.n_downsample, tile_size=16,
                             tmp_dir=str(tmp_path))
    assert len(calls) == len(tile_plan(G).ops)


@pytest.mark.parametrize('name, value', [('GLIBC_TUNABLES', 'glibc.malloc.trim_threshold=0'),
                                         ('MALLOC_MMAP_MAX_', '65536'),
                                         ('LD_PRELOAD', '/usr/lib/libjemalloc.so.2')])
def test_a_users_own_malloc_settings_are_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(machinery.memory.ctypes, 'CDLL',
                        lambda name: SimpleNamespace(mallopt=lambda *a: calls.append(a) or 1))
    assert machinery.memory.reuse_freed_memory() is False
    assert calls == []


def test_the_test_script_reuses_freed_memory_on_the_cpu(in_tmp, monkeypatch):
    calls = []
    monkeypatch.setattr(pix2pixCC_Test, 'reuse_freed_memory', lambda: calls.append(1))
    os.makedirs('inputs')
    np.save('inputs/a.npy', np.zeros((32, 32), np.float32))
    flags = ['--dataset_name', 'mem', '--data_format_input', 'npy', '--data_format_target',
             'npy', '--input_dir_test', 'inputs', '--n_workers', '0']
    constant_generator_checkpoint(make_test_opt(*flags), 0.5)
    assert pix2pixCC_Test.main(TINY + flags + ['--iteration', '3']) == 0
    assert calls == [1]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='madvise of mapped files: Linux')
def test_inference_gives_back_each_layers_mapped_weights_once_it_has_run(tmp_path, monkeypatch):
    """The Test script's generator holds a layer's weights only while it runs: once a layer
    has run, the pages of its weights, mapped from the checkpoint, are given back to the
    operating system (madvise MADV_DONTNEED), which keeps them in its page cache for the next
    image. Seen from outside: right after each layer with a whole page of weights has run,
    its pages (whole pages, inside its own tensors) are given back, successfully, at every
    image; and the outputs are bit for bit those of the same generator without the release
    (had the weights not been mapped from the file, the release would have zeroed them)."""
    opt = train_opt('--n_gf', '32', '--n_residual', '3')  # ~9 MB of weights
    path = str(tmp_path / '7_G.pt')
    torch.save(Generator(opt).apply(weights_init).state_dict(), path)
    x = torch.randn(1, 1, 32, 32)
    events = []
    with monkeypatch.context() as patch:
        patch.setattr(ctypes, 'CDLL', recording_madvise(events))
        G = translation.load_generator(opt, path, torch.device('cpu')).eval()
    with monkeypatch.context() as patch:
        patch.setattr(translation, 'release_mapped_weights_after_use', lambda G, path: 0)
        kept = translation.load_generator(opt, path, torch.device('cpu')).eval()

    page = mmap.PAGESIZE
    layers = [layer for layer in G.modules() if own_tensors(layer)]
    large = [layer for layer in layers if layer.weight.numel() * 4 >= 2 * page]
    assert len(large) >= 10  # the convolutions but the first and the last
    outputs = []
    for _ in range(2):  # the second image reads the given-back pages again
        output, released = releases_by_layer(G, x, events)
        outputs.append(output)
        assert set(large) <= set(released) <= set(layers), len(released)
        for layer, calls in released.items():
            spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                     for t in own_tensors(layer)]
            for start, size, advice, result in calls:
                assert (advice, result) == (mmap.MADV_DONTNEED, 0)
                assert start % page == 0 and size % page == 0 and size > 0
                assert any(a <= start and start + size <= b for a, b in spans), layer
    expected, not_released = releases_by_layer(kept, x, events)
    assert not_released == {}
    for output in outputs:
        assert torch.equal(output, expected)


def test_overwrite_leaves_numbered_folders_of_no_generator_of_this_run_alone(untrained,
                                                                            capsys):
    """README "Output files": with --iteration -1 --output_dir DIR, the folders this run
    owns are DIR and DIR/<iteration>/ of its generators; a year's products in DIR/2012/
    are neither a reason to refuse nor emptied by --overwrite."""
    other_dir, _ = make_pairs('b', 'npy', n=1, prefix='other')
    year = FOLDER_FLAGS + ['--input_dir_test', other_dir, '--iteration', '2',
                           '--output_dir', 'products/2012']
    assert pix2pixCC_Test.main(year) == 0
    kept = snapshot('products/2012')
    every = FOLDER_FLAGS + untrained + ['--iteration', '-1', '--output_dir', 'products']
    assert run_main(pix2pixCC_Test.main, every) == 0
    assert run_main(pix2pixCC_Test.main, every + ['--overwrite']) == 0
    assert snapshot('products/2012') == kept
    assert sorted(name for name in os.listdir('products') if name.isdigit()) == \
        ['2', '2012', '4']


def test_a_checkpoint_saved_anew_is_another_generator(untrained, capsys):
    """README "Output files": the record holds the generator file's SHA-256, so a folder made
    with step 4 before a resumed run saved a new 4_G.pt (or a model file exported anew) is
    refused, --skip_existing included, instead of keeping the old generator's products."""
    command = FOLDER_FLAGS + untrained + ['--iteration', '4', '--output_dir', 'out']
    assert pix2pixCC_Test.main(command) == 0
    products = snapshot('out')
    torch.manual_seed(1)
    torch.save(Generator(train_opt()).state_dict(), 'checkpoints/folders/Model/4_G.pt')
    capsys.readouterr()
    assert run_main(pix2pixCC_Test.main, command + ['--skip_existing']) == 2
    err = capsys.readouterr().err
    assert "generator's weights" in err and '--overwrite' in err, err
    assert snapshot('out') == products


def test_panels_and_metrics_are_made_beside_the_same_products(untrained, capsys):
    """README "Output files": the evaluation (targets, metric options, --save_panels) may
    differ from the folder's record; the products stay, panels are added, metrics made anew:
    the quick start's Test and then "Evaluating a model"'s --save_panels run in order."""
    command = FOLDER_FLAGS + untrained + ['--iteration', '2', '--output_dir', 'out']
    assert pix2pixCC_Test.main(command) == 0
    products = {name: value for name, value in snapshot('out').items() if '_AI.' in name}
    assert run_main(pix2pixCC_Test.main, command + ['--save_panels', '--skip_existing']) == 0
    assert sorted(name for name in os.listdir('out') if name.endswith('_panel.png')) == \
        ['img_000_panel.png', 'img_001_panel.png']
    assert run_main(pix2pixCC_Test.main, command + ['--metric_bins', '1', '2']) == 0
    assert {name: value[0] for name, value in snapshot('out').items() if '_AI.' in name} == \
        {name: value[0] for name, value in products.items()}
    assert record_in('out')['options']['metric_bins'] == [1, 2]


def test_the_whole_image_pass_writes_in_place_only_where_nothing_else_reads():
    """README "Speed": the whole-image pass lets the normalisations and activations that
    follow a fresh map write into it (the default generator's), never into the caller's
    image or a value read again (a pre-activation block's input), and runs a convolution fed
    by a padding layer in bands instead of making the padded map, with the forward's output;
    a forward that cannot be traced runs as it is."""
    opt = make_test_opt()
    G = Generator(opt).eval()
    x = torch.rand(1, 1, 40, 48)
    kept = x.clone()
    runner = whole_image.inference_runner(G, x, 2 ** opt.n_downsample)
    assert runner is not G
    module = torch.fx.GraphModule(G, LayerTracer().trace(G))
    written = whole_image.in_place_calls(module)
    assert sum(how == 'norm' for how in written.values()) == sum(
        isinstance(layer, torch.nn.InstanceNorm2d) for layer in G.modules())
    with torch.inference_mode():
        got, expected = runner(x), G(x)
    assert (got - expected).abs().max() <= 1e-5 * (expected.max() - expected.min())
    assert torch.equal(x, kept)

    runner.__self__.band_bytes, runner.__self__.band_values = 0, 3 * 48  # bands of 3 rows
    with torch.inference_mode():  # (the padded maps are never made: each conv in bands)
        assert (runner(x) - expected).abs().max() <= 1e-5 * (expected.max() - expected.min())

    class PreActivation(torch.nn.Module):  # x + conv(mish(x)): x is read again
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y + self.conv(F.mish(y))

    module = torch.fx.GraphModule(PreActivation(), LayerTracer().trace(PreActivation()))
    assert whole_image.in_place_calls(module) == {}

    class Branching(torch.nn.Module):
        def forward(self, x):
            return x if float(x.mean()) > 0 else -x

    branching = Branching()
    assert whole_image.inference_runner(branching, x, 4) is branching
