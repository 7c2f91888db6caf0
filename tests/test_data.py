"""The data, as README "Your own data" documents them: reading every format and channel
layout, finding the files (one extension family), the scaling to [-1, 1] (NaN -> 0 or the
lower limit with log, +-Inf -> the limits, clip -> log10 -> normalise) and its inverse,
augmentation, the paired Dataset, the warnings about the saturation limits before training
(README "What happens when…"), and the writers of the formats README "Output files" lists;
README "Differences from the reference code" covers the scaling order, the channels, each
side's own format and the rotation. FITS headers of generated maps are in
test_inference_and_products.py, whole runs refused for their data in test_errors.py.
"""
import os
import re
import warnings

import numpy as np
import pytest
import torch
from astropy.io import fits
from PIL import Image

import pix2pixCC_Pipeline
import pix2pixCC_Test
import pix2pixCC_Train
from conftest import (ALL_FORMATS, RECORD, SAMPLE_DATA, TINY, H, W, checked_lines, copy_sample,
                      field, formats_and_limits, make_pairs, make_test_opt, read_user_file,
                      train_opt, write_pairs, write_user_file)
from machinery.products import write_array
from pix2pixCC_Options import UserError
from machinery.data_checks import CHECK_SAMPLE, check_dataset, sample_pairs
from pix2pixCC_Pipeline import (CustomDataset, Scaling, list_files, random_pad_and_crop,
                                random_rotation, random_window, read_array, read_fits,
                                read_fits_header, stored_size, to_chw)

# ----------------------------------------------------------------------------------------
# 1. Reading: every format, 1 and 3 channels
# ----------------------------------------------------------------------------------------

def user_data(fmt, channels):
    """(array as the user writes it, expected C x H x W float32 read back, exact?)."""
    data = field(channels, noise=0.0 if fmt in ('jpg', 'jpeg') else 0.1)
    if fmt in ('png', 'jpg', 'jpeg'):
        pixels = np.rint(data * 2.55).astype(np.uint8)
        stored = pixels[0] if channels == 1 else np.moveaxis(pixels, 0, -1)  # RGB H x W x C
        return stored, pixels.astype(np.float32), fmt == 'png'
    stored = data[0] if channels == 1 else data  # arrays: C x H x W
    return stored, data, True


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('fmt', ALL_FORMATS)
def test_read_every_format(tmp_path, fmt, channels):
    stored, expected, exact = user_data(fmt, channels)
    path = write_user_file(str(tmp_path / f'x.{fmt}'), stored, fmt)
    array = read_array(path, fmt, channels)
    assert array.dtype == np.float32
    assert array.shape == (channels, H, W)
    if exact:
        np.testing.assert_array_equal(array, expected)
    else:  # JPEG is lossy, but close for smooth data
        difference = np.abs(array - expected)
        assert difference.mean() < 2.0 and difference.max() < 20, (difference.mean(),
                                                                   difference.max())
    if channels == 3:  # channels stay distinct and in order
        for c in range(3):
            assert np.corrcoef(array[c].ravel(), expected[c].ravel())[0, 1] > 0.98


def unusual_layouts(tmp_path):
    """(path, format, channels) of files whose layout the readers must work out."""
    rgb = np.moveaxis(np.rint(field(3) * 2.55).astype(np.uint8), 0, -1)
    files = [(write_user_file(str(tmp_path / 'rgb.tif'), rgb, 'tif'), 'tif', 3),
             (write_user_file(str(tmp_path / 'hwc.npy'), np.moveaxis(field(3), 0, -1), 'npy'),
              'npy', 3),
             (write_user_file(str(tmp_path / '1chw.npy'), field(3)[None], 'npy'), 'npy', 3)]
    path = str(tmp_path / 'ext.fits')
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(field(1)[0])]).writeto(path)
    files.append((path, 'fits', 1))
    path = str(tmp_path / 'compressed.fits')
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(field(1)[0])]).writeto(path)
    files.append((path, 'fits', 1))
    path = str(tmp_path / 'palette.png')
    Image.fromarray(rgb).convert('P').save(path)
    files.append((path, 'png', 3))
    return files


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('fmt', ALL_FORMATS)
def test_size_from_the_header_is_the_read_arrays(tmp_path, fmt, channels):
    """What the Test script checks every pair with before writing anything."""
    stored, _, _ = user_data(fmt, channels)
    files = [(write_user_file(str(tmp_path / f'x.{fmt}'), stored, fmt), fmt, channels)]
    if fmt == 'npy' and channels == 3:
        files += unusual_layouts(tmp_path)
    for path, data_format, ch in files:
        assert stored_size(path, data_format, ch) == read_array(path, data_format, ch).shape[1:]
        assert stored_size(path, data_format, ch) == (H, W)
    with pytest.raises(UserError) as error:  # the same message as reading the file
        stored_size(files[0][0], fmt, 2)
    assert 'x.' + fmt in str(error.value) and '--input_ch/--target_ch' in str(error.value)


@pytest.mark.parametrize('fmt', ['png', 'tif'])
def test_sixteen_bit_images_keep_values_above_255(tmp_path, fmt):
    pixels = (field(1, 0, 60000)[0]).astype(np.uint16)
    assert pixels.max() > 255
    path = write_user_file(str(tmp_path / f'x.{fmt}'), pixels, fmt)
    array = read_array(path, fmt, 1)
    np.testing.assert_array_equal(array[0], pixels.astype(np.float32))


def test_rgb_tiff_written_channels_last(tmp_path):
    pixels = np.moveaxis(np.rint(field(3) * 2.55).astype(np.uint8), 0, -1)
    path = write_user_file(str(tmp_path / 'rgb.tif'), pixels, 'tif')
    array = read_array(path, 'tif', 3)
    np.testing.assert_array_equal(array, np.moveaxis(pixels, -1, 0).astype(np.float32))


def test_npy_channels_last_is_accepted(tmp_path):
    data = field(3)
    path = str(tmp_path / 'hwc.npy')
    np.save(path, np.moveaxis(data, 0, -1))  # H x W x C
    np.testing.assert_array_equal(read_array(path, 'npy', 3), data)


def test_float64_and_integer_npy_become_float32(tmp_path):
    for dtype in (np.float64, np.int16):
        path = str(tmp_path / f'{np.dtype(dtype).name}.npy')
        np.save(path, field(1)[0].astype(dtype))
        array = read_array(path, 'npy', 1)
        assert array.dtype == np.float32 and array.shape == (1, H, W)
        np.testing.assert_array_equal(array[0], field(1)[0].astype(dtype).astype(np.float32))


def test_fits_image_in_an_extension(tmp_path):
    data = field(1)[0]
    path = str(tmp_path / 'ext.fits')
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]).writeto(path)
    np.testing.assert_array_equal(read_array(path, 'fits', 1)[0], data)


def test_fits_scaled_integers_are_read_in_physical_units(tmp_path):
    values = np.arange(H * W, dtype=np.int16).reshape(H, W)
    hdu = fits.PrimaryHDU(values)
    hdu.header['BSCALE'] = 0.5
    hdu.header['BZERO'] = 100.0
    path = str(tmp_path / 'scaled.fits')
    hdu.writeto(path)
    np.testing.assert_allclose(read_array(path, 'fits', 1)[0], values * 0.5 + 100.0)


def test_reading_a_float_fits_file_with_a_blank_card_is_quiet(tmp_path):
    """Archive files (AIA, HMI, SECCHI) keep a BLANK card in float files, which astropy
    warns about at every opening: the data and the header are read without a word (a Test
    run reads the header of every input again)."""
    header = fits.Header()
    header['BLANK'] = -32768
    path = str(tmp_path / 'archive.fits')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # astropy warns when writing it, too
        fits.PrimaryHDU(field(1)[0], header=header).writeto(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        header = read_fits_header(path)
        data = read_array(path, 'fits', 1)
    assert [str(w.message) for w in caught] == []
    assert header['BLANK'] == -32768 and data.shape == (1, H, W)


@pytest.mark.parametrize('fmt', ALL_FORMATS)
def test_channel_count_mismatch_is_a_user_error(tmp_path, fmt):
    stored, _, _ = user_data(fmt, 3)
    path = write_user_file(str(tmp_path / f'x.{fmt}'), stored, fmt)
    with pytest.raises(UserError) as error:
        read_array(path, fmt, 1)
    assert 'x.' + fmt in str(error.value) and '--input_ch/--target_ch' in str(error.value)
    stored, _, _ = user_data(fmt, 1)
    path = write_user_file(str(tmp_path / f'y.{fmt}'), stored, fmt)
    with pytest.raises(UserError) as error:
        read_array(path, fmt, 3)
    assert 'y.' + fmt in str(error.value) and '3 channel' in str(error.value)


@pytest.mark.parametrize('fmt', ['fits', 'npy', 'png', 'tif'])
@pytest.mark.filterwarnings('ignore:File may have been truncated')
def test_corrupt_file_is_a_user_error_naming_the_file(tmp_path, fmt):
    stored, _, _ = user_data(fmt, 1)
    path = write_user_file(str(tmp_path / f'x.{fmt}'), stored, fmt)
    with open(path, 'rb') as f:
        content = f.read()
    with open(path, 'wb') as f:
        f.write(content[:len(content) // 3])
    with pytest.raises(UserError) as error:
        read_array(path, fmt, 1)
    assert 'x.' + fmt in str(error.value)
    assert '\n' not in str(error.value)


def test_to_chw_layouts():
    data = field(3)
    np.testing.assert_array_equal(to_chw(data, 3, 'p'), data)
    np.testing.assert_array_equal(to_chw(np.moveaxis(data, 0, -1), 3, 'p'), data)
    np.testing.assert_array_equal(to_chw(data[0], 1, 'p'), data[:1])
    np.testing.assert_array_equal(to_chw(data[None], 3, 'p'), data)  # 1 x C x H x W
    with pytest.raises(UserError):
        to_chw(data, 2, 'p')
    with pytest.raises(UserError):
        to_chw(np.zeros(5, np.float32), 1, 'p')


@pytest.mark.parametrize('dtype', ['>f4', '>f8', '>i2', '<f4'])
def test_fits_reading_paths_agree_bit_for_bit(tmp_path, dtype):
    """read_fits + to_chw gives, bit for bit, what astropy's array cast to float32 gives."""
    rng = np.random.default_rng(2)
    data = fits_data(rng, np.dtype(dtype))
    path = os.path.join(str(tmp_path), 'a.fits')
    fits.PrimaryHDU(data).writeto(path)
    with fits.open(path, memmap=False) as hdul:
        expected = np.array(hdul[0].data).astype(np.float32)[None]
    got = read_array(path, 'fits', 1)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
    assert got.tobytes() == expected.tobytes()
    assert to_chw(read_fits(path), 1, path).tobytes() == expected.tobytes()


def stored_layouts():
    """(name, array as stored, channels): H x W, C x H x W, H x W x C, 1 x C x H x W, with
    NaN and Inf, of 40 x 48 (height and width differ, so a swapped window would show)."""
    rng = np.random.default_rng(8)
    cube = rng.uniform(-50, 250, (3, 40, 48)).astype(np.float32)
    cube[1, 5, 7], cube[2, 30, 40], cube[0, 12, 20] = np.nan, np.inf, -np.inf
    return [('HxW', cube[0], 1), ('CxHxW', cube, 3),
            ('HxWxC', np.ascontiguousarray(np.moveaxis(cube, 0, -1)), 3),
            ('1xCxHxW', cube[None], 3)]


WINDOWS = [(0, 0, 8), (5, 7, 16), (24, 32, 16), (0, 0, 40)]


def assert_windows_as_crops(path, fmt, channels):
    """Every window read equals, bit for bit, that part of the whole array."""
    whole = read_array(path, fmt, channels)
    for top, left, size in WINDOWS:
        part = read_array(path, fmt, channels, (top, left, size))
        assert part.dtype == np.float32 and part.flags.c_contiguous
        assert part.shape == (channels, size, size)
        expected = np.ascontiguousarray(whole[:, top:top + size, left:left + size])
        assert part.tobytes() == expected.tobytes(), (path, top, left, size)


@pytest.mark.parametrize('fmt', ['npy', 'fits'])
@pytest.mark.parametrize('layout', range(4), ids=['HxW', 'CxHxW', 'HxWxC', '1xCxHxW'])
def test_a_window_is_read_alone_with_the_values_of_the_whole_array(tmp_path, monkeypatch, fmt,
                                                                   layout):
    """README "Your own data", Windows: npy and FITS through a memory map; never through the
    whole-file reader."""
    _, stored, channels = stored_layouts()[layout]
    path = write_user_file(str(tmp_path / f'a.{fmt}'), stored, fmt)
    whole = read_array(path, fmt, channels)

    def refuse(*_):
        raise AssertionError('the whole file was read')
    monkeypatch.setitem(pix2pixCC_Pipeline.READERS, fmt, refuse)
    for top, left, size in WINDOWS:
        part = read_array(path, fmt, channels, (top, left, size))
        expected = np.ascontiguousarray(whole[:, top:top + size, left:left + size])
        assert part.shape == (channels, size, size) and part.dtype == np.float32
        assert part.tobytes() == expected.tobytes(), (top, left, size)


def test_a_fits_file_rewritten_with_another_layout_is_read_anew(tmp_path):
    """The header's layout is parsed once per file (README "Your own data", Windows): a file
    replaced by one with a longer header, another type and shape is read as it is now."""
    path = str(tmp_path / 'a.fits')
    fits.PrimaryHDU(np.arange(48 * 40, dtype='>f4').reshape(40, 48)).writeto(path)
    assert_windows_as_crops(path, 'fits', 1)
    hdu = fits.PrimaryHDU(-np.arange(56 * 64, dtype='>f8').reshape(56, 64))
    hdu.header.extend([(f'NOTE{i}', 'x' * 60) for i in range(60)])  # another data offset
    hdu.writeto(path, overwrite=True)
    assert_windows_as_crops(path, 'fits', 1)
    assert read_array(path, 'fits', 1, (50, 60, 4))[0, 0, 0] == -(50 * 64 + 60)


@pytest.mark.parametrize('dtype, cards', [
    ('>i2', {'BSCALE': 0.5, 'BZERO': 100.0}), ('>i2', {'BLANK': -32768}), ('>f8', {}),
    ('uint8', {}), ('>f4', {'BLANK': -32768})])
def test_fits_window_of_scaled_integers_equals_the_crop(tmp_path, dtype, cards):
    """BSCALE/BZERO and BLANK apply to the section as to the whole image; raw data (BLANK
    in a float image is ignored, as astropy ignores it) are read through a plain map."""
    rng = np.random.default_rng(4)
    data = rng.integers(0, 200, (40, 48)).astype(dtype)
    if 'BLANK' in cards:
        data[3, 4] = -32768
    hdu = fits.PrimaryHDU(data)
    hdu.header.update(cards)
    path = str(tmp_path / 'a.fits')
    hdu.writeto(path)
    assert_windows_as_crops(path, 'fits', 1)
    scaled = 'BSCALE' in cards or ('BLANK' in cards and np.dtype(dtype).kind in 'iu')
    assert (pix2pixCC_Pipeline.fits_image_layout(path) is None) == scaled


def test_compressed_fits_and_other_formats_windows_are_crops_of_the_whole(tmp_path):
    """Formats without a window reader (and compressed FITS) are read whole and cut."""
    _, cube, _ = stored_layouts()[1]
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(cube[0])]).writeto(
        str(tmp_path / 'c.fits'))
    assert_windows_as_crops(str(tmp_path / 'c.fits'), 'fits', 1)
    tifffile_path = write_user_file(str(tmp_path / 'a.tif'), cube, 'tif')
    assert_windows_as_crops(tifffile_path, 'tif', 3)
    pixels = np.rint(np.nan_to_num(cube[0], posinf=0, neginf=0)).clip(0, 255).astype(np.uint8)
    assert_windows_as_crops(write_user_file(str(tmp_path / 'a.png'), pixels, 'png'), 'png', 1)


def test_scaling_of_a_window_is_that_of_the_whole_image(tmp_path):
    """NaN/Inf, clip and log act on the window as on the whole image (training items)."""
    _, stored, _ = stored_layouts()[0]
    dirs = write_pair_dirs(tmp_path, [stored], [stored])
    dataset = dataset_for(*dirs, '--crop_size', '16', logscale_input=True,
                          saturation_lower_limit_input=1, saturation_upper_limit_input=200,
                          saturation_clip_input=True)
    whole = dataset.load_input(0)
    for window in WINDOWS[:3]:
        top, left, size = window
        part = dataset.load_input(0, window)
        assert part.tobytes() == np.ascontiguousarray(
            whole[:, top:top + size, left:left + size]).tobytes()


# ----------------------------------------------------------------------------------------
# 2. Finding the files: sorted names, one extension family
# ----------------------------------------------------------------------------------------

def test_list_files_sorted_by_name_and_filtered_by_extension(tmp_path):
    # fits, fts and fit are one family: each lists all three.
    for name in ['b.fits', 'a.fits', 'c.fits', 'z.fts', 'notes.txt', 'y.npy']:
        (tmp_path / name).write_bytes(b'')
    os.mkdir(tmp_path / 'folder.fits')
    files = list_files(str(tmp_path), 'fits', 'input')
    assert [os.path.basename(p) for p in files] == ['a.fits', 'b.fits', 'c.fits', 'z.fts']
    assert [os.path.basename(p) for p in list_files(str(tmp_path), 'npy', 'input')] == ['y.npy']


def test_list_files_errors(tmp_path):
    with pytest.raises(UserError) as error:
        list_files(str(tmp_path / 'missing'), 'fits', 'input')
    assert "input directory '" in str(error.value) and 'missing' in str(error.value)
    assert 'does not exist' in str(error.value)
    (tmp_path / 'a.npy').write_bytes(b'')
    (tmp_path / 'b.png').write_bytes(b'')
    with pytest.raises(UserError) as error:
        list_files(str(tmp_path), 'fits', 'target')
    message = str(error.value)
    assert 'no .fits/.fts/.fit files in target directory' in message
    assert '.npy' in message and '.png' in message and '--data_format_' in message


def test_a_folder_of_tiff_files_with_format_tif(in_tmp):
    """--data_format_input tif also finds .tiff files (README "Your own data")."""
    rng = np.random.default_rng(1)
    for folder in ('Input', 'Target'):
        os.makedirs(folder)
        for i in range(2):
            write_user_file(f'{folder}/{i}.tiff', rng.uniform(0, 100, (32, 32)).astype(
                np.float32), 'tiff')
    flags = TINY + formats_and_limits('tif') + ['--dataset_name', 'tiffs', '--n_workers', '0']
    assert pix2pixCC_Train.main(flags + ['--input_dir_train', 'Input', '--target_dir_train',
                                         'Target', '--n_epochs', '1']) == 0
    assert pix2pixCC_Test.main(flags + ['--input_dir_test', 'Input', '--iteration', '2']) == 0
    # The output's extension is --data_format_target's.
    assert sorted(os.listdir('checkpoints/tiffs/Image/Test/2')) == ['0_AI.tif', '1_AI.tif',
                                                                    RECORD]


# ----------------------------------------------------------------------------------------
# 3. Scaling and its inverse
# ----------------------------------------------------------------------------------------

def documented_scaling(x, lower, upper, clip=False, log=False):
    """README "Your own data", Scaling, written out plainly in float64: NaN -> 0 (the lower
    limit with log scale), +-Inf -> the limits; clip to the limits; log10 (values <= 0
    become the lower limit); then the lower limit -> -1 and the upper -> +1."""
    x = np.array(x, dtype=np.float64)
    x = np.where(np.isnan(x), lower if log else 0.0, x)
    x = np.where(np.isposinf(x), upper, x)
    x = np.where(np.isneginf(x), lower, x)
    if clip:
        x = np.clip(x, lower, upper)
    if log:
        x = np.log10(np.where(x <= 0, lower, x))
        lower, upper = np.log10(lower), np.log10(upper)
    return (x - (upper + lower) / 2) / ((upper - lower) / 2)


def awkward_arrays(rng, dtype):
    """Arrays of `dtype` as Scaling.forward may get them: C-ordered, Fortran-ordered and a
    strided view; spread over 1, 100 or 10^4 around 0, with NaN and +-Inf when the type has
    them."""
    for layout in ('C', 'F', 'view'):
        x = rng.normal(0, 1, (2, 37, 41)) * rng.choice([1, 100, 1e4])
        if np.dtype(dtype).kind == 'f':
            u = rng.random(x.shape)
            x[u < 0.05], x[(u > 0.05) & (u < 0.08)], x[(u > 0.08) & (u < 0.1)] = \
                np.nan, np.inf, -np.inf
        x = np.nan_to_num(x) if np.dtype(dtype).kind == 'i' else x
        x = x.astype(dtype)
        yield layout, np.asfortranarray(x) if layout == 'F' else x[:, ::2, 1::3] \
            if layout == 'view' else x


@pytest.mark.parametrize('limits,log', [((-1, 1), False), ((-3000, 3000), False),
                                        ((1, 200), True), ((1e-3, 7.3), True)])
@pytest.mark.parametrize('clip', [False, True])
def test_scaling_gives_the_documented_values_for_any_array(limits, log, clip):
    """Any dtype and memory layout, NaN and +-Inf included: float32 out, the input left as
    it was, the documented values (to a few float32 ulps of the rule in float64: NaN -> 0 or
    the lower limit, +-Inf -> +-1, the limits -> -1 and +1), and the non-finite values
    counted."""
    rng = np.random.default_rng(4)
    lower, upper = float(limits[0]), float(limits[1])
    scaling = Scaling(lower=lower, upper=upper, clip=clip, log=log)
    nan_becomes = documented_scaling(lower if log else 0.0, lower, upper, clip, log)
    for dtype in (np.float32, np.float64, np.int16, '>f4'):
        for layout, x in awkward_arrays(rng, dtype):
            before = x.copy()
            with np.errstate(all='ignore'):
                got = scaling.forward(x)
                expected = documented_scaling(x, lower, upper, clip, log)
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=2e-7,
                                       err_msg=f'{dtype} {layout}')
            np.testing.assert_array_equal(x, before)  # the input is not modified
            x32 = np.asarray(x, dtype=np.float32)
            np.testing.assert_allclose(got[np.isnan(x32)], nan_becomes, rtol=0, atol=1e-6)
            np.testing.assert_allclose(got[np.isposinf(x32)], 1, rtol=0, atol=1e-6)
            np.testing.assert_allclose(got[np.isneginf(x32)], -1, rtol=0, atol=1e-6)
            n_bad = int((~np.isfinite(x32)).sum())
            assert scaling.clean(x32)[1] == n_bad
    np.testing.assert_allclose(scaling.forward(np.float32([lower, upper])), [-1, 1], rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize('limits,log', [((-1, 1), False), ((-3000, 3000), False),
                                        ((1, 200), True), ((1e-3, 7.3), True)])
@pytest.mark.parametrize('clip', [False, True])
def test_inverse_of_forward_is_the_value_to_1e_6_relative(limits, log, clip):
    """What the Test script relies on to write outputs in the target's units: inside the
    limits, inverse(forward(x)) is x to 1e-6 relative (float32 arithmetic)."""
    rng = np.random.default_rng(5)
    lower, upper = float(limits[0]), float(limits[1])
    if log:
        x = 10 ** rng.uniform(np.log10(lower), np.log10(upper), (2, 37, 41))
    else:
        x = rng.uniform(lower, upper, (2, 37, 41))
    x = x.astype(np.float32)
    scaling = Scaling(lower=lower, upper=upper, clip=clip, log=log)
    back = scaling.inverse(scaling.forward(x))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, x, rtol=1e-6, atol=0)


SCALINGS = [  # lower, upper, log
    (-3000.0, 3000.0, False),
    (-1.0, 1.0, False),
    (0.0, 255.0, False),
    (1.0, 200.0, True),
    (0.5, 1e4, True),
]


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('clip', [False, True])
@pytest.mark.parametrize('lower, upper, log', SCALINGS)
def test_forward_then_inverse_is_identity_inside_the_limits(lower, upper, log, clip, channels):
    rng = np.random.default_rng(1)
    if log:
        x = 10 ** rng.uniform(np.log10(lower), np.log10(upper), (channels, 16, 16))
    else:
        x = rng.uniform(lower, upper, (channels, 16, 16))
    x = x.astype(np.float32)
    x.flat[0], x.flat[1] = lower, upper  # the limits themselves
    scaling = Scaling(lower, upper, clip=clip, log=log)
    y = scaling.forward(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    assert y.flat[0] == pytest.approx(-1, abs=1e-6) and y.flat[1] == pytest.approx(1, abs=1e-6)
    back = scaling.inverse(y)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-6 * max(abs(lower), abs(upper)))


def test_forward_formula_linear_and_log():
    x = np.array([[-3000, -1500, 0, 750, 3000]], np.float32)
    np.testing.assert_allclose(Scaling(-3000, 3000).forward(x), [[-1, -0.5, 0, 0.25, 1]],
                               atol=1e-7)
    x = np.array([[1, 10, 100, 1000]], np.float32)  # log limits 1..1000 -> 0..3
    np.testing.assert_allclose(Scaling(1, 1000, log=True).forward(x), [[-1, -1 / 3, 1 / 3, 1]],
                               atol=1e-6)
    # Values outside the limits extrapolate without clip (log10 first, then normalise).
    np.testing.assert_allclose(Scaling(1, 100, log=True).forward(np.float32([[1e4]])), [[3]],
                               atol=1e-6)
    np.testing.assert_allclose(Scaling(0, 10).forward(np.float32([[20]])), [[3]], atol=1e-6)


def test_save_scale_multiplies_the_inverse():
    y = np.linspace(-1, 1, 9, dtype=np.float32)
    np.testing.assert_allclose(Scaling(-3000, 3000, save_scale=2.5).inverse(y),
                               2.5 * 3000 * y, rtol=1e-6)
    np.testing.assert_allclose(Scaling(1, 100, log=True, save_scale=0.1).inverse(y),
                               0.1 * 10 ** (1 + y), rtol=1e-5)


@pytest.mark.parametrize('log', [False, True])
def test_non_finite_values(log):
    lower, upper = (1.0, 200.0) if log else (-50.0, 150.0)
    scaling = Scaling(lower, upper, log=log)
    x = np.array([np.nan, np.inf, -np.inf, 20.0], np.float32)
    y = scaling.forward(x)
    assert np.all(np.isfinite(y))
    nan_becomes = lower if log else 0.0
    expected = scaling.forward(np.array([nan_becomes, upper, lower, 20.0], np.float32))
    np.testing.assert_allclose(y, expected, atol=1e-7)
    assert y[1] == pytest.approx(1) and y[2] == pytest.approx(-1)
    if log:
        assert y[0] == pytest.approx(-1)
    else:
        assert y[0] == pytest.approx((0 - 50.0) / 100.0)


def test_clip():
    x = np.array([-5000, -3000, 0, 2999, 3000, 8000], np.float32)
    y = Scaling(-3000, 3000, clip=True).forward(x)
    np.testing.assert_allclose(y, [-1, -1, 0, 2999 / 3000, 1, 1], atol=1e-6)
    unclipped = Scaling(-3000, 3000, clip=False).forward(x)
    assert unclipped[0] < -1 and unclipped[-1] > 1
    # The inverse clips too when the flag is set.
    back = Scaling(-3000, 3000, clip=True).inverse(np.float32([-1.5, 0.5, 1.5]))
    np.testing.assert_allclose(back, [-3000, 1500, 3000], rtol=1e-6)
    back = Scaling(1, 100, clip=True, log=True).inverse(np.float32([-3, 3]))
    np.testing.assert_allclose(back, [1, 100], rtol=1e-6)


def test_log_of_non_positive_values_becomes_the_lower_limit():
    scaling = Scaling(1, 200, log=True)
    y = scaling.forward(np.array([0, -5, -1e-3, 1], np.float32))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, -1, atol=1e-7)
    # Between 0 and the lower limit (no clip) values extrapolate below -1, finite.
    y = scaling.forward(np.array([0.1], np.float32))
    assert np.isfinite(y[0]) and y[0] < -1


def test_scaling_from_options():
    opt = train_opt('--logscale_input', 'True', '--saturation_lower_limit_input', '1',
                    '--saturation_upper_limit_input', '200', '--saturation_clip_input', 'True',
                    '--saturation_lower_limit_target', '-3000',
                    '--saturation_upper_limit_target', '3000', '--save_scale', '2')
    s_in, s_tg = Scaling.from_options(opt, 'input'), Scaling.from_options(opt, 'target')
    assert (s_in.lower, s_in.upper, s_in.clip, s_in.log) == (1, 200, True, True)
    assert (s_tg.lower, s_tg.upper, s_tg.clip, s_tg.log) == (-3000, 3000, False, False)
    assert s_tg.save_scale == 2


def write_fits_pair(folder, array_in, array_tg, name='sun_0000'):
    """One FITS pair; returns the paths of the input and the target."""
    input_dir, target_dir = write_pairs(folder, {name: array_in}, {name: array_tg}, 'fits')
    return os.path.join(input_dir, f'{name}.fits'), os.path.join(target_dir, f'{name}.fits')


def reference_scaling(path, lower, upper, clip=False, log=False):
    """The documented scaling of a FITS file's data in float64, rounded to float32 at the
    end."""
    return documented_scaling(fits.getdata(path), lower, upper, clip, log).astype(
        np.float32)[None]


def fits_data(rng, dtype, size=64, low=-50.0, high=250.0):
    x = rng.uniform(low, high, (size, size))
    x[3, 4], x[10, 11], x[20, 21], x[30, 31] = np.nan, np.inf, -np.inf, 0.0
    if np.issubdtype(dtype, np.integer):
        x = np.nan_to_num(x, nan=0, posinf=high, neginf=low)
    return x.astype(dtype)


OPTION_SCALINGS = [
    dict(),  # defaults: -1..1, no clip, no log
    dict(saturation_lower_limit_input=-50, saturation_upper_limit_input=250,
         saturation_lower_limit_target=-50, saturation_upper_limit_target=250,
         saturation_clip_input=True, saturation_clip_target=True),
    dict(logscale_input=True, saturation_lower_limit_input=1, saturation_upper_limit_input=200,
         logscale_target=True, saturation_lower_limit_target=0.5,
         saturation_upper_limit_target=300, saturation_clip_target=True),
]


@pytest.mark.parametrize('scaling', OPTION_SCALINGS, ids=['default', 'clip', 'log'])
@pytest.mark.parametrize('dtype', ['>f4', '>f8', '>i2'])
def test_data_preparation_matches_reference(tmp_path, scaling, dtype):
    rng = np.random.default_rng(1)
    in_path, tg_path = write_fits_pair(str(tmp_path), fits_data(rng, np.dtype(dtype)),
                                       fits_data(rng, np.dtype(dtype)))
    opt = train_opt(data_format_input='fits', data_format_target='fits',
                    input_dir_train=os.path.dirname(in_path),
                    target_dir_train=os.path.dirname(tg_path), **scaling)
    x, y = CustomDataset(opt)[0]
    assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape == (1, 64, 64)
    for tensor, path, side in ((x, in_path, 'input'), (y, tg_path, 'target')):
        s = Scaling.from_options(opt, side)
        expected = reference_scaling(path, s.lower, s.upper, s.clip, s.log)
        # float32 arithmetic against float64 arithmetic rounded once: a few float32 ulps
        np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-6, atol=2e-7)


# ----------------------------------------------------------------------------------------
# 4. Augmentation
# ----------------------------------------------------------------------------------------

def write_pair_dirs(root, inputs, targets, fmt='npy'):
    """Arrays i of `inputs` and `targets` as the files f<i> of a pair of folders."""
    return write_pairs(root, {f'f{i:02d}': a for i, a in enumerate(inputs)},
                       {f'f{i:02d}': a for i, a in enumerate(targets)}, fmt)


def dataset_for(input_dir, target_dir, *argv, **options):
    opt = train_opt('--data_format_input', 'npy', '--data_format_target', 'npy',
                    '--input_dir_train', input_dir, '--target_dir_train', target_dir,
                    *argv, **options)
    return CustomDataset(opt)


def test_augmentation_keeps_identical_input_and_target_identical(tmp_path):
    data = [field(1, seed=s, size=32)[0] for s in range(3)]
    dataset = dataset_for(*write_pair_dirs(tmp_path, data, data),
                          '--max_rotation_angle', '20', '--padding_size', '5')
    changed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        index = seed % 3
        x, y = dataset[index]
        assert x.shape == y.shape == (1, 32, 32)
        assert torch.equal(x, y), f"seed {seed}: input and target augmented differently"
        changed += not np.array_equal(x.numpy(), dataset.load_input(index))
    assert changed >= 8  # the augmentation really acts


def test_augmentation_keeps_a_linear_relation(tmp_path):
    # target = 3 * input - 7 with limits mapped the same way -> equal normalised data.
    inputs = [field(1, seed=s, size=32)[0] for s in range(2)]
    targets = [3 * a - 7 for a in inputs]
    dataset = dataset_for(*write_pair_dirs(tmp_path, inputs, targets),
                          '--max_rotation_angle', '20', '--padding_size', '5',
                          saturation_lower_limit_input=0, saturation_upper_limit_input=100,
                          saturation_lower_limit_target=-7, saturation_upper_limit_target=293)
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = dataset[seed % 2]
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=2e-5)


def test_augmentation_aligns_channels_of_different_counts(tmp_path):
    inputs = [field(3, seed=s, size=32) for s in range(2)]
    targets = [a[1] for a in inputs]  # target = the input's middle channel
    dataset = dataset_for(*write_pair_dirs(tmp_path, inputs, targets), '--input_ch', '3',
                          '--max_rotation_angle', '30', '--padding_size', '4')
    for seed in range(6):
        torch.manual_seed(seed)
        x, y = dataset[seed % 2]
        assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32)
        assert torch.equal(x[1:2], y)


def rotated_candidates(a, max_angle):
    from scipy.ndimage import rotate
    return {angle: rotate(a, angle, reshape=False, mode='nearest')
            for angle in range(-max_angle, max_angle + 1)}


def test_rotation_acts_on_spatial_axes_only():
    # Channel c lies in [100c, 100c + 10]: a rotation that mixed channels would show.
    base = field(3, 0, 10, size=32)
    data = base + np.array([0, 100, 200], np.float32)[:, None, None]
    max_angle = 25
    rotated_any = False
    for seed in range(6):
        torch.manual_seed(seed)
        (out,) = random_rotation([data], max_angle)
        assert out.shape == data.shape
        for c in range(3):
            assert 100 * c - 1 <= out[c].min() and out[c].max() <= 100 * c + 11
        # Each channel is its own 2-D rotation by one common integer angle in range.
        matches = [angle for angle, rotated in rotated_candidates(data[0], max_angle).items()
                   if np.allclose(out[0], rotated, atol=1e-4)]
        assert matches, "channel 0 is not a rotation of itself by an integer angle in range"
        angle = matches[0]
        for c in (1, 2):
            np.testing.assert_allclose(out[c], rotated_candidates(data[c], abs(angle))[angle],
                                       atol=1e-3)
        rotated_any |= angle != 0
    assert rotated_any


def test_rotation_by_zero_is_bit_exact():
    data = [field(2, seed=4, size=32), field(1, seed=5, size=32)]
    assert random_rotation(data, 0)[0] is data[0]
    # With max angle 1, the draws are -1, 0, 1; a 0 draw must leave the data untouched
    # (no spline interpolation), the others must change it.
    outcomes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = random_rotation(data, 1)
        same = [np.array_equal(o, d) for o, d in zip(out, data, strict=True)]
        assert same[0] == same[1]
        outcomes.add(same[0])
    assert outcomes == {True, False}


def test_pad_and_crop_is_a_shifted_window_of_the_edge_padded_data():
    data = field(2, seed=7, size=32)
    target = data[:1] * 2
    padding = 5
    padded = np.pad(data, ((0, 0), (padding, padding), (padding, padding)), mode='edge')
    offsets = set()
    for seed in range(15):
        torch.manual_seed(seed)
        out, out_target = random_pad_and_crop([data, target], padding)
        assert out.shape == data.shape and out_target.shape == target.shape
        found = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                 if np.array_equal(out, padded[:, dy:dy + 32, dx:dx + 32])]
        assert found
        np.testing.assert_array_equal(out_target, out[:1] * 2)  # same window for the target
        offsets.add(found[0])
    assert len(offsets) > 3
    assert random_pad_and_crop([data], 0)[0] is data


def test_crop_takes_the_same_window_of_input_and_target(tmp_path):
    """--crop_size: input == target data give input window == target window, of the size
    asked for, with rotation and padding acting on the window."""
    data = [field(1, seed=s, size=32)[0] for s in range(3)]
    dataset = dataset_for(*write_pair_dirs(tmp_path, data, data), '--crop_size', '16',
                          '--max_rotation_angle', '20', '--padding_size', '3')
    for seed in range(12):
        x, y = dataset[(seed % 3, seed)]
        assert x.shape == y.shape == (1, 16, 16)
        assert torch.equal(x, y), f"seed {seed}: input and target cropped differently"
        assert torch.equal(dataset[(seed % 3, seed)][0], x)  # drawn from the seed alone


def test_crop_windows_vary_and_cover_the_image(tmp_path):
    """Each window is a window of the scaled image, at a place drawn from the sample's seed;
    over many draws every top and left offset occurs."""
    data = field(1, seed=2, size=32)[0]
    dataset = dataset_for(*write_pair_dirs(tmp_path, [data], [data]), '--crop_size', '16')
    whole = dataset.load_input(0)
    places = set()
    for seed in range(40):
        x = dataset[(0, seed)][0].numpy()
        found = [(t, left) for t in range(17) for left in range(17)
                 if np.array_equal(x, whole[:, t:t + 16, left:left + 16])]
        assert len(found) == 1
        places.add(found[0])
    assert len(places) > 20
    generator = torch.Generator().manual_seed(0)
    draws = [random_window((32, 48), 16, generator) for _ in range(3000)]
    assert {top for top, _, _ in draws} == set(range(17))
    assert {left for _, left, _ in draws} == set(range(33))
    assert {size for _, _, size in draws} == {16}


def test_no_augmentation_returns_the_scaled_files_unchanged(tmp_path):
    inputs = [field(1, seed=s, size=32)[0] for s in range(2)]
    targets = [field(1, seed=s + 10, size=32)[0] for s in range(2)]
    dataset = dataset_for(*write_pair_dirs(tmp_path, inputs, targets),
                          saturation_lower_limit_input=0, saturation_upper_limit_input=100,
                          saturation_lower_limit_target=0, saturation_upper_limit_target=50)
    for i in range(2):
        x, y = dataset[i]
        assert x.dtype == torch.float32 and y.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy()[0], (inputs[i] - 50) / 50)
        np.testing.assert_allclose(y.numpy()[0], (targets[i] - 25) / 25, atol=1e-6)


def test_no_augmentation_drawn_gives_identical_output(tmp_path):
    """max_rotation_angle / padding_size set: whenever the draw is the identity (angle 0 and
    the crop at the padding's offset, 1 in 27 here) the sample is bit for bit the
    un-augmented one; the other draws change it."""
    rng = np.random.default_rng(3)
    in_path, tg_path = write_fits_pair(str(tmp_path), fits_data(rng, np.dtype('>f4')),
                                       fits_data(rng, np.dtype('>f4')))
    dirs = dict(data_format_input='fits', data_format_target='fits',
                input_dir_train=os.path.dirname(in_path),
                target_dir_train=os.path.dirname(tg_path))
    plain = [t.numpy().tobytes() for t in CustomDataset(train_opt(**dirs))[0]]
    augmented = CustomDataset(train_opt(max_rotation_angle=1, padding_size=1, **dirs))
    torch.manual_seed(0)
    identical = 0
    for _ in range(300):
        x, y = (t.numpy().tobytes() for t in augmented[0])
        assert (x == plain[0]) == (y == plain[1])  # input and target drawn together
        identical += x == plain[0]
    assert 0 < identical < 100


# ----------------------------------------------------------------------------------------
# 5. The paired Dataset
# ----------------------------------------------------------------------------------------

def test_dataset_pairs_by_sorted_name_and_uses_each_side_format(tmp_path):
    # Input npy, target FITS: each side is read with its own format (the reference read both
    # with the input's).
    os.makedirs(tmp_path / 'in')
    os.makedirs(tmp_path / 'tg')
    for i in (2, 0, 1):
        np.save(tmp_path / 'in' / f'p{i}.npy', np.full((32, 32), i, np.float32))
        fits.writeto(tmp_path / 'tg' / f'q{i}.fits', np.full((32, 32), 10 * i, np.float32))
    opt = train_opt('--data_format_input', 'npy', '--data_format_target', 'fits',
                    '--input_dir_train', str(tmp_path / 'in'),
                    '--target_dir_train', str(tmp_path / 'tg'),
                    saturation_lower_limit_input=0, saturation_upper_limit_input=2,
                    saturation_lower_limit_target=0, saturation_upper_limit_target=20)
    dataset = CustomDataset(opt)
    assert len(dataset) == 3
    for i in range(3):
        x, y = dataset[i]
        assert float(x.mean()) == pytest.approx(i - 1) and float(y.mean()) == pytest.approx(i - 1)


def test_dataset_sizes_must_match(tmp_path):
    input_dir, target_dir = write_pair_dirs(tmp_path, [field(1, size=32)[0]],
                                            [field(1, size=64)[0]])
    with pytest.raises(UserError) as error:
        dataset_for(input_dir, target_dir)[0]
    message = str(error.value)
    assert 'f00.npy is 32x32' in message and 'f00.npy is 64x64' in message


def test_test_split_returns_input_and_name(tmp_path):
    os.makedirs(tmp_path / 'test')
    for name in ('b_2', 'a_1'):
        np.save(tmp_path / 'test' / f'{name}.npy', np.ones((3, 32, 32), np.float32))
    opt = make_test_opt('--input_ch', '3', '--data_format_input', 'npy', '--input_dir_test',
                        str(tmp_path / 'test'), saturation_lower_limit_input=0,
                        saturation_upper_limit_input=4)
    dataset = CustomDataset(opt)
    items = [dataset[i] for i in range(len(dataset))]
    assert [name for _, name in items] == ['a_1', 'b_2']
    x = items[0][0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, -0.5))


# ----------------------------------------------------------------------------------------
# 6. Checking the data before training: the saturation limits
# ----------------------------------------------------------------------------------------

def test_scaling_warning_names_the_side_the_range_and_the_options(tmp_path):
    train_in, train_tg = make_pairs(tmp_path, 'npy', n=3, size=32)  # values 0..100
    lines = checked_lines('--data_format_input', 'npy', '--data_format_target', 'npy',
                          '--input_dir_train', train_in, '--target_dir_train', train_tg,
                          '--saturation_lower_limit_target', '0',
                          '--saturation_upper_limit_target', '100')  # input: default -1..1
    assert len(lines) == 1, lines
    line = lines[0]
    assert 'input' in line and '[-1, 1]' in line and '0 to 100' in line
    assert '--saturation_lower_limit_input' in line and '--saturation_upper_limit_input' in line
    assert re.search(r'\b\d+% of the input values', line)
    assert 'swapped' not in line


def test_swapped_folders_are_named(tmp_path):
    """Magnetograms in the input folder and EUV images in the target folder."""
    rng = np.random.default_rng(0)
    for folder, low, high in (('Input', -1000, 1000), ('Target', 1, 200)):
        os.makedirs(tmp_path / folder)
        for i in range(2):
            np.save(tmp_path / folder / f'{i}.npy', rng.uniform(low, high, (32, 32)))
    lines = checked_lines('--data_format_input', 'npy', '--data_format_target', 'npy',
                          '--input_dir_train', str(tmp_path / 'Input'),
                          '--target_dir_train', str(tmp_path / 'Target'),
                          '--logscale_input', '--saturation_lower_limit_input', '1',
                          '--saturation_upper_limit_input', '200',
                          '--saturation_lower_limit_target', '-3000',
                          '--saturation_upper_limit_target', '3000')
    assert len(lines) == 1, lines
    assert 'swapped' in lines[0] and '--input_dir_train' in lines[0]


def full_disk_pairs(root, low, high):
    """Two 32x32 npy pairs: EUV-like inputs, zero off a disk that covers a third of the frame
    and uniform in [low, high] on it; targets in [0, 100]. Returns the training options."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    disk = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 10 ** 2
    for folder in ('Input', 'Target'):
        os.makedirs(root / folder)
    for i in range(2):
        np.save(root / 'Input' / f'{i}.npy', np.where(disk, rng.uniform(low, high, disk.shape), 0))
        np.save(root / 'Target' / f'{i}.npy', rng.uniform(0, 100, disk.shape))
    return ['--data_format_input', 'npy', '--data_format_target', 'npy',
            '--input_dir_train', str(root / 'Input'), '--target_dir_train', str(root / 'Target'),
            '--logscale_input', 'True', '--saturation_lower_limit_input', '1',
            '--saturation_upper_limit_input', '200', '--saturation_lower_limit_target', '0',
            '--saturation_upper_limit_target', '100']


def test_zeros_off_the_limb_on_a_log_scale_give_no_scaling_warning(tmp_path):
    """README "What happens when…": with log scale, values <= 0 become the lower limit by
    design; a full-disk image whose disk lies within the limits is well scaled."""
    assert checked_lines(*full_disk_pairs(tmp_path, 1, 200)) == []


def test_a_disk_beyond_the_limits_on_a_log_scale_still_warns(tmp_path):
    lines = checked_lines(*full_disk_pairs(tmp_path, 300, 3000))
    assert len(lines) == 1, lines
    # Every on-disk value is beyond the upper limit; the zeros off the disk are not counted.
    assert lines[0].startswith('warning: 100% of the input values lie outside the saturation '
                               'limits [1, 200] (observed range 0 to '), lines[0]


def test_no_scaling_warning_on_the_sample(tmp_path):
    train_in, train_tg, _ = copy_sample(tmp_path, n_train=4, n_test=0)
    assert checked_lines(*SAMPLE_DATA, '--input_dir_train', train_in, '--target_dir_train',
                         train_tg) == []


def whole_reads(monkeypatch):
    """The paths the whole-file readers are called with, from now on."""
    paths = []
    for fmt, reader in list(pix2pixCC_Pipeline.READERS.items()):
        def counted(path, reader=reader):
            paths.append(path)
            return reader(path)
        monkeypatch.setitem(pix2pixCC_Pipeline.READERS, fmt, counted)
    return paths


@pytest.mark.parametrize('fmt', ['npy', 'fits'])
def test_the_check_with_crop_size_reads_headers_and_a_sample(tmp_path, monkeypatch, fmt):
    """--crop_size with npy/FITS: sizes from every file's header, values from the sample
    (first, last and evenly between) alone; NaN in a sampled file is still reported."""
    inputs = [field(1, seed=s, size=32)[0] for s in range(12)]
    inputs[11][3, 4] = np.nan  # the last pair is in the sample
    dirs = write_pair_dirs(tmp_path, inputs, inputs, fmt)
    dataset = dataset_for(*dirs, data_format_input=fmt, data_format_target=fmt, crop_size=16)
    paths = whole_reads(monkeypatch)
    lines = []
    assert check_dataset(dataset, 4, log=lines.append, crop_size=16) == (32, 32)
    sample = sample_pairs(12)
    assert sample[0] == 0 and sample[-1] == 11 and len(sample) == CHECK_SAMPLE
    assert sorted(paths) == sorted(dataset.input_paths[i] for i in sample) + \
        sorted(dataset.target_paths[i] for i in sample)
    nan_lines = [line for line in lines if 'NaN/Inf' in line]
    assert len(nan_lines) == 2  # input and target
    assert all('f11' in line and 'in 5 of the 12 pairs' in line for line in nan_lines)


def test_the_check_reads_every_file_without_crop_size_or_a_window_reader(tmp_path, monkeypatch):
    """Whole images, or --crop_size with a format read whole in training (TIFF): every
    file is read, as before."""
    inputs = [field(1, seed=s, size=32)[0] for s in range(6)]
    for fmt, crop in (('npy', 0), ('tif', 16)):
        dirs = write_pair_dirs(tmp_path / fmt, inputs, inputs, fmt)
        dataset = dataset_for(*dirs, data_format_input=fmt, data_format_target=fmt)
        paths = whole_reads(monkeypatch)
        check_dataset(dataset, 4, log=lambda line: None, crop_size=crop)
        assert len(paths) == 12, fmt


def test_a_header_size_mismatch_is_found_outside_the_sample(tmp_path):
    inputs = [field(1, seed=s, size=32)[0] for s in range(12)]
    targets = list(inputs)
    targets[4] = field(1, seed=4, size=40)[0]  # pair 4 is not in the sample
    assert 4 not in sample_pairs(12)
    dataset = dataset_for(*write_pair_dirs(tmp_path, inputs, targets), crop_size=16)
    with pytest.raises(UserError, match='f04.npy is 32x32 but its target .*f04.npy is 40x40'):
        check_dataset(dataset, 4, crop_size=16)


# ----------------------------------------------------------------------------------------
# 7. Writing the generated data
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('fmt', ['fits', 'fts', 'fit', 'npy', 'tif', 'tiff'])
def test_write_float_formats_round_trip_exactly(tmp_path, fmt, channels):
    data = field(channels, -3000, 3000).astype(np.float64) + 1e-9  # float64 in, float32 out
    path = str(tmp_path / f'out.{fmt}')
    write_array(path, data, fmt)
    expected = data.astype(np.float32)
    stored = read_user_file(path, fmt)
    assert stored.dtype.kind == 'f' and stored.dtype.itemsize == 4
    assert stored.shape == ((H, W) if channels == 1 else (3, H, W))
    np.testing.assert_array_equal(stored, expected[0] if channels == 1 else expected)
    np.testing.assert_array_equal(read_array(path, fmt, channels), expected)


def test_write_png_8_bit_rounds_and_clips(tmp_path):
    data = np.array([[[-5.0, 0.4, 3.5, 3.6, 254.6, 300.0]]])
    path = str(tmp_path / 'out.png')
    write_array(path, data, 'png', upper_limit=255)
    with Image.open(path) as image:
        assert image.mode == 'L'
        pixels = np.asarray(image)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, [[0, 0, 4, 4, 255, 255]])


def test_write_png_16_bit_when_upper_limit_exceeds_255(tmp_path):
    data = np.array([[[-3.0, 256.4, 1000.5, 4000.0, 70000.0]]])
    path = str(tmp_path / 'out.png')
    write_array(path, data, 'png', upper_limit=4000)
    with Image.open(path) as image:
        assert image.mode.startswith('I')
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels.astype(np.int64), [[0, 256, 1000, 4000, 65535]])
    np.testing.assert_array_equal(read_array(path, 'png', 1)[0], [[0, 256, 1000, 4000, 65535]])


@pytest.mark.parametrize('fmt', ['png', 'jpg', 'jpeg'])
def test_write_three_channel_image(tmp_path, fmt):
    data = field(3, 0, 255, noise=0.0)
    path = str(tmp_path / f'out.{fmt}')
    write_array(path, data, fmt, upper_limit=255)
    with Image.open(path) as image:
        assert image.mode == 'RGB' and image.size == (W, H)
    back = read_array(path, fmt, 3)
    if fmt == 'png':
        np.testing.assert_array_equal(back, np.rint(data))
    else:  # lossy: close on average, channels in order
        assert np.abs(back - data).mean() < 5
        for c in range(3):
            assert np.corrcoef(back[c].ravel(), data[c].ravel())[0, 1] > 0.95


def test_jpeg_is_8_bit_even_with_a_large_upper_limit(tmp_path):
    path = str(tmp_path / 'out.jpg')
    write_array(path, np.full((1, H, W), 4000.0), 'jpg', upper_limit=4000)
    with Image.open(path) as image:
        assert image.mode == 'L'
        assert np.asarray(image).max() == 255


def test_write_three_channel_sixteen_bit_png_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        write_array(str(tmp_path / 'x.png'), np.ones((3, 8, 8)) * 1000, 'png', upper_limit=4000)
