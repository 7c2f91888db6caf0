"""Data pipeline (SPEC section 3 and the writers of section 7): reading every format, channel
layouts, scaling and its inverse, augmentation, the paired Dataset, and writing."""
import os
import warnings

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.wcs import WCS
from PIL import Image

from conftest import (AIA_PLACE_AND_TIME, ALL_FORMATS, INPUT_ONLY, aia_cube_header,
                      make_test_opt, read_user_file, smooth_field, train_opt, write_pairs,
                      write_user_file)
from pix2pixCC_Options import UserError
from pix2pixCC_Pipeline import (CustomDataset, Scaling, generated_header, list_files,
                                random_pad_and_crop, random_rotation, read_array,
                                read_fits_header, stored_size, to_chw, write_array)

H, W = 24, 40  # not square, so a transposed read shows


def field(channels, low=0.0, high=100.0, seed=0, size=None, noise=0.1):
    """Smooth random data (C, H, W) in [low, high]; (C, size, size) when size is given."""
    rng = np.random.default_rng(seed)
    if size is not None:
        return smooth_field(rng, size, channels, low, high, noise)
    return smooth_field(rng, max(H, W), channels, low, high, noise)[:, :H, :W]


# ----------------------------------------------------------------------------------------
# Reading: every extension, 1 and 3 channels
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


# ----------------------------------------------------------------------------------------
# list_files
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


# ----------------------------------------------------------------------------------------
# Scaling
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Augmentation
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
        same = [np.array_equal(o, d) for o, d in zip(out, data)]
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


# ----------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------

def test_dataset_pairs_by_sorted_name_and_uses_each_side_format(tmp_path):
    # Input npy, target FITS: each side is read with its own format ([fix]).
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
# Writing
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


def test_write_three_channel_sixteen_bit_png_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        write_array(str(tmp_path / 'x.png'), np.ones((3, 8, 8)) * 1000, 'png', upper_limit=4000)
