"""The Test script and what it writes: the generated files in every format and in the
target's units, the FITS header of a generated map (the input's geometry, time and
observer, the training targets' identity and unit, a WCS for its own axes, none of the
input's exposure, value, processing and file cards), the output folders and their records,
and a generator loaded for inference that computes what it computes for training.

README "Output files" documents the files, formats, cards and folders; "Evaluating a model"
the metric files (tested in test_evaluation.py). The Test outputs of a trained run of each
data format are checked beside that run in test_training_and_resume.py; a Test refused for
its inputs or folders, in test_errors.py.
"""
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from conftest import AIA_PLACE_AND_TIME, INPUT_ONLY, H, W, aia_cube_header, field
from pix2pixCC_Pipeline import generated_header, read_fits_header, write_array


# ----------------------------------------------------------------------------------------
# The FITS header of a generated map
# ----------------------------------------------------------------------------------------

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


