"""Paired-file data pipeline: reading, scaling (and its inverse), augmentation, writing.

Data flow of one file:  read (one reader per format) -> C x H x W float32 -> `Scaling.forward`
(clean NaN/Inf -> clip -> log10 -> normalise to [-1, 1] at the saturation limits) -> augment
(training only). Generated data go back through `Scaling.inverse` and one writer per format.
"""
import contextlib
import datetime
import functools
import glob
import math
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import tifffile
import torch
from astropy.io import fits
from astropy.wcs import WCS
from PIL import Image
from scipy.ndimage import rotate
from torch.utils.data import DataLoader, Dataset

from pix2pixCC_Options import FITS_FORMATS, FORMAT_FAMILIES, UserError, channel_values
from pix2pixCC_Utils import ignore_stop_signals

# ----------------------------------------------------------------------------------------
# Reading: each reader returns the array as stored; `to_chw` arranges the channels.
# ----------------------------------------------------------------------------------------


def read_image(path):
    """PNG/JPEG via Pillow: H x W (grey, 8- or 16-bit) or H x W x C."""
    with Image.open(path) as image:
        if image.mode == 'P':  # palette indices are not data; use the colours they stand for
            image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
        return np.asarray(image)


def read_tiff(path):
    """TIFF via tifffile, which keeps float32 and multi-channel data that Pillow cannot."""
    return tifffile.imread(path)


def read_npy(path):
    # allow_pickle=False: an object array in a data file could run code when unpickled.
    return np.load(path, allow_pickle=False)


@contextlib.contextmanager
def open_fits(path, memmap=False):
    """The HDU list of `path`, for reading data or headers; warnings stay quiet. memmap:
    the data mapped from the file rather than read (for a window of it).

    Archive files often hold cards astropy warns about (non-standard cards, a BLANK card in a
    float file): they are silenced, or every file read would repeat them. astropy only warns
    about a truncated file (then fails on the reshape, or not at all), so that warning
    becomes a UserError.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            with fits.open(path, memmap=memmap) as hdul:
                yield hdul
        finally:
            if any('truncated' in str(w.message) for w in caught):
                raise truncated(path)


def truncated(path):
    """The UserError for a file shorter than its header says (FITS, npy)."""
    return UserError(f"{path} is truncated (the file is shorter than its header says); "
                     f"copy it again")


def open_npy(path):
    """The array of an npy file as a read-only memory map: nothing but the header is read
    until it is sliced. numpy refuses pickled objects here too, and a file shorter than
    its header says (a truncated copy) is named as such."""
    try:
        return np.load(path, mmap_mode='r', allow_pickle=False)
    except ValueError as error:
        if 'mmap length is greater than file size' in str(error):
            raise truncated(path) from None
        raise


def image_hdu(hdul, path):
    """The first HDU that holds an image (primary or extension, compressed too), found from
    the headers alone, so that reading a header does not read the data."""
    for hdu in hdul:
        naxis = hdu.header.get('NAXIS', 0) if hdu.is_image else 0
        if naxis > 0 and all(hdu.header.get(f'NAXIS{i}', 0) > 0 for i in range(1, naxis + 1)):
            return hdu
    raise UserError(f"{path}: no HDU with image data")


def read_fits(path):
    """Data of the first HDU that holds an image."""
    with open_fits(path) as hdul:
        return np.array(image_hdu(hdul, path).data)


def read_fits_header(path):
    """Header of the HDU that `read_fits` reads the data from."""
    with open_fits(path) as hdul:
        return image_hdu(hdul, path).header.copy()


READERS = {'png': read_image, 'jpg': read_image, 'jpeg': read_image,
           'tif': read_tiff, 'tiff': read_tiff, 'npy': read_npy,
           'fits': read_fits, 'fts': read_fits, 'fit': read_fits}
# Pillow images are stored H x W x C; arrays (npy, FITS, our TIFFs) are naturally C x H x W.
CHANNELS_LAST_FORMATS = ('png', 'jpg', 'jpeg')


def chw_layout(shape, channels, path, channels_last=False):
    """How `to_chw` arranges an array of `shape`: (its 3-D shape, the axis of its channels,
    which moves first).

    H x W becomes 1 x H x W; axes of length 1 beyond three are dropped. A 3-D array is taken
    as C x H x W unless its channel axis is last (`channels_last`, or when only the last
    axis equals `channels`). Shared with `stored_size`, which knows only the shape.
    """
    shape = tuple(shape)
    if len(shape) > 3:  # what np.squeeze does
        shape = tuple(n for n in shape if n != 1)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise UserError(f"{path}: expected a 2-D or 3-D array, got shape {shape}")
    axis = channel_axis(shape, channels, channels_last)
    if axis is None:
        raise UserError(f"{path}: shape {shape} has no axis of {channels} channel(s); "
                        f"set --input_ch/--target_ch to the number of channels in the files")
    return shape, axis


def channel_axis(shape, channels, channels_last=False):
    """The axis of a 3-D `shape` that holds the `channels`: the first, unless the last is
    (`channels_last`, or only the last has that length); None when neither has."""
    first, last = shape[0] == channels, shape[-1] == channels
    if last and (channels_last or not first):
        return 2
    return 0 if first else None


def to_chw(array, channels, path, channels_last=False, window=None):
    """Return `array` as C x H x W with C == `channels` (see `chw_layout`).

    window: (top, left, size), to return only that size x size part of the image; `array`
    may then be anything numpy-like that slicing reads (a memory map, a FITS section), so
    that only the window is read (README "Your own data").
    """
    shape, axis = chw_layout(array.shape, channels, path, channels_last)
    if window is not None:
        index, spatial = window_index(array.shape, axis, window)
        array = array[index]
        shape = tuple(window[2] if i in spatial else n for i, n in enumerate(shape))
    array = np.asarray(array).reshape(shape)
    return np.ascontiguousarray(np.moveaxis(array, axis, 0), dtype=np.float32)


def window_index(stored_shape, axis, window):
    """(the index into an array of `stored_shape` that takes the `window` (top, left, size)
    of its image, the axes of height and width in `chw_layout`'s 3-D shape).

    The axes that `chw_layout` drops (length 1, beyond three) are kept whole, so the part
    read has the layout of the whole array and is arranged by the same rules.
    """
    top, left, size = window
    ndim = len(stored_shape)
    stored_axes = [i for i, n in enumerate(stored_shape) if n != 1 or ndim <= 3]
    if len(stored_axes) == 2:  # H x W: chw_layout's channel axis is new
        stored_axes = [None] + stored_axes
    spatial = [i for i in range(3) if i != axis]
    index = [slice(None)] * ndim
    index[stored_axes[spatial[0]]] = slice(top, top + size)
    index[stored_axes[spatial[1]]] = slice(left, left + size)
    return tuple(index), spatial


def call_reader(reader, path, data_format):
    """reader(path), with any failure but a UserError turned into one naming the file."""
    try:
        return reader(path)
    except UserError:
        raise
    except Exception as error:  # corrupt, truncated or pickled files: name the file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read {path} as {data_format}: {reason}") from None


# Readers of a window: they hand `select` the file's data unread (a memory map, a FITS
# section), so that slicing reads only the window (README "Your own data", Windows).

def read_npy_window(path, select):
    return select(open_npy(path))


# numpy's dtype of each FITS BITPIX (FITS data are big-endian).
FITS_DTYPES = {8: '>u1', 16: '>i2', 32: '>i4', 64: '>i8', -32: '>f4', -64: '>f8'}


def fits_image_layout(path):
    """(data offset in bytes, numpy dtype, shape) of the image `read_fits` reads when it is
    stored raw (uncompressed, no BSCALE/BZERO, no BLANK in integers), else None; parsed once
    per file and version (`_fits_image_layout`), since parsing the header is most of a
    window's read."""
    stat = os.stat(path)
    return _fits_image_layout(path, stat.st_mtime_ns, stat.st_size, stat.st_ino)


@functools.lru_cache(maxsize=4096)
def _fits_image_layout(path, mtime_ns, size, inode):
    with open_fits(path) as hdul:
        hdu = image_hdu(hdul, path)
        bitpix = hdu.header['BITPIX']
        # (BLANK only applies to integers: archive float files that carry it are raw)
        scaled = any(card in hdu.header for card in ('BSCALE', 'BZERO')) or \
            (bitpix > 0 and 'BLANK' in hdu.header)
        if isinstance(hdu, fits.CompImageHDU) or scaled:
            return None
        return hdu.fileinfo()['datLoc'], FITS_DTYPES[bitpix], tuple(hdu.shape)


def read_fits_window(path, select):
    """An uncompressed image mapped from the file at the offset its header gives, so that only
    the window's pages are read (astropy's `section`, which scaled integers need, and even
    astropy's own memory map, which parses the header at every read, are slower: BENCHMARKS.md,
    "Training on windows"); a compressed one is read whole (its tiles would be decompressed
    anyway). The window is copied before the map is dropped."""
    layout = fits_image_layout(path)
    if layout is not None:
        offset, dtype, shape = layout
        return np.array(select(np.memmap(path, dtype=dtype, mode='r', offset=offset,
                                         shape=shape)))
    with open_fits(path) as hdul:  # astropy maps unscaled data only: scaled ones, its section
        hdu = image_hdu(hdul, path)
        return select(hdu.data if isinstance(hdu, fits.CompImageHDU) else hdu.section)


WINDOW_READERS = {'npy': read_npy_window,
                  'fits': read_fits_window, 'fts': read_fits_window, 'fit': read_fits_window}


def read_array(path, data_format, channels, window=None):
    """Read one file of `data_format` as a float32 C x H x W array; `window` (top, left,
    size): only that size x size part of its image, read alone where the format allows
    (WINDOW_READERS), else cut from the whole array."""
    def select(array):
        return to_chw(array, channels, path, data_format in CHANNELS_LAST_FORMATS, window)
    if window is not None and data_format in WINDOW_READERS:
        return call_reader(functools.partial(WINDOW_READERS[data_format], select=select), path,
                           data_format)
    return select(call_reader(READERS[data_format], path, data_format))


# Shapes from the files' headers alone: checking every pair's size before a Test run writes
# anything must not read every file twice.

def npy_shape(path):
    """Shape from the header; a truncated file is refused (`open_npy`)."""
    return open_npy(path).shape


def fits_shape(path):
    """Shape of the HDU that `read_fits` reads, from its header; a file shorter than its
    headers say is refused (`open_fits`), so that the check of a --crop_size run, which
    reads only headers, still finds it before the first step."""
    with open_fits(path) as hdul:
        return tuple(image_hdu(hdul, path).shape)


def tiff_shape(path):
    with tifffile.TiffFile(path) as tif:
        return tuple(tif.series[0].shape)  # the series tifffile.imread reads


def image_shape(path):
    """Shape of the array `read_image` returns (palette images become RGB or RGBA)."""
    with Image.open(path) as image:  # Pillow reads the header until the pixels are asked for
        bands = (4 if 'transparency' in image.info else 3) if image.mode == 'P' \
            else len(image.getbands())
        return (image.height, image.width) + ((bands,) if bands > 1 else ())


SHAPE_READERS = {'png': image_shape, 'jpg': image_shape, 'jpeg': image_shape,
                 'tif': tiff_shape, 'tiff': tiff_shape, 'npy': npy_shape,
                 'fits': fits_shape, 'fts': fits_shape, 'fit': fits_shape}


def stored_size(path, data_format, channels):
    """(height, width) of the array `read_array` would return, from the file's header."""
    shape = call_reader(SHAPE_READERS[data_format], path, data_format)
    shape, axis = chw_layout(shape, channels, path,
                             channels_last=data_format in CHANNELS_LAST_FORMATS)
    return tuple(n for i, n in enumerate(shape) if i != axis)


def size_mismatch(input_path, size, target_path, target_size):
    """The UserError for an input and its target of different heights or widths."""
    return UserError(f"{input_path} is {size[0]}x{size[1]} but its target {target_path} is "
                     f"{target_size[0]}x{target_size[1]}")




def extensions_of(data_format):
    """The extensions listed for `data_format`: its family's, or itself alone."""
    return next((family for family in FORMAT_FAMILIES if data_format in family), (data_format,))


def list_files(directory, data_format, role):
    """All files in `directory` with an extension of `data_format`'s family, sorted by name."""
    if not os.path.isdir(directory):
        raise UserError(f"{role} directory '{directory}' does not exist")
    extensions = tuple('.' + ext for ext in extensions_of(data_format))
    files = sorted(p for p in glob.glob(os.path.join(directory, '*'))
                   if os.path.isfile(p) and p.lower().endswith(extensions))
    if not files:
        present = sorted({os.path.splitext(name)[1] for name in os.listdir(directory)} - {''})
        hint = f" (extensions present: {', '.join(present)})" if present else ' (it is empty)'
        raise UserError(f"no {'/'.join(extensions)} files in {role} directory '{directory}'"
                        f"{hint}; check --data_format_*")
    return files


# ----------------------------------------------------------------------------------------
# Scaling: one chain for input and target, training and test, with its exact inverse.
# ----------------------------------------------------------------------------------------


@dataclass
class Scaling:
    """Map physical values to [-1, 1] at the saturation limits, and back.

    forward: NaN -> 0 (or `lower` with log), +Inf -> `upper`, -Inf -> `lower`; clip;
    log10 (values <= 0 -> `lower` first); y = (x - mid) / half_range.
    inverse: x = y * half_range + mid; 10**x; clip; times `save_scale`.
    One Scaling serves every channel of the data it is given; `PerChannelScaling` gives each
    channel its own.
    """
    lower: float
    upper: float
    clip: bool = False
    log: bool = False
    save_scale: float = 1.0

    @classmethod
    def from_options(cls, opt, side, save_scale=None):
        """The scaling of `side` ('input' or 'target'): one Scaling when every channel has
        the same limits, clip and log (as each option with one value gives), else a
        PerChannelScaling. save_scale: by default --save_scale."""
        channels = getattr(opt, f'{side}_ch')

        def values(name):
            return channel_values(getattr(opt, f'{name}_{side}'), channels)
        save_scale = float(getattr(opt, 'save_scale', 1.0) if save_scale is None else save_scale)
        scalings = [cls(lower=float(lower), upper=float(upper), clip=bool(clip), log=bool(log),
                        save_scale=save_scale)
                    for lower, upper, clip, log in zip(
                        values('saturation_lower_limit'), values('saturation_upper_limit'),
                        values('saturation_clip'), values('logscale'), strict=True)]
        if all(scaling == scalings[0] for scaling in scalings):
            return scalings[0]  # one chain over the whole array, as before per-channel values
        return PerChannelScaling(tuple(scalings))

    def channel(self, c):
        """The scaling of channel `c`: this one, which every channel shares."""
        return self

    def record(self):
        """This scaling as plain numbers, for a runtime without this code (the ONNX export,
        README "Sharing a model and running it elsewhere"): normalised = (f(x) - offset) /
        scale with f = log10 when `log`; NaN becomes `nan` first, +-Inf the limits, and
        with `clip` values are clipped to [lower, upper] (before log10, where values <= 0
        become `lower`). The inverse: f^-1(normalised * scale + offset), clipped again with
        `clip` (without `save_scale`)."""
        lo, up = self._limits()
        return {'lower': self.lower, 'upper': self.upper, 'clip': self.clip, 'log': self.log,
                'offset': float((up + lo) / 2), 'scale': float((up - lo) / 2),
                'nan': self.lower if self.log else 0.0}

    def _limits(self):
        if self.log:
            return np.log10(self.lower), np.log10(self.upper)
        return self.lower, self.upper

    def by_value(self, values):
        """The finite `values` that the scaling maps by their value, the ones its limits are
        for: with log scale, values <= 0 all become the lower limit by design (the zeros off
        the limb of a full-disk image), so they are left out."""
        return values[values > 0] if self.log else values

    def clean(self, x):
        """Replace NaN and +-Inf by values the network can take; returns (x, count).

        `x` is returned as is when all is finite; otherwise a float32 copy in which only the
        non-finite entries were visited (solar images often hold a few NaN pixels).
        """
        finite = np.isfinite(x)
        if finite.all():
            return x, 0
        out = np.array(x, dtype=np.float32, order='C')  # flat indices follow `finite`
        index = np.flatnonzero(~finite)
        values = out.reshape(-1)[index]
        values = np.where(np.isnan(values), self.lower if self.log else 0.0, values)
        values = np.where(np.isposinf(values), self.upper, values)
        out.reshape(-1)[index] = np.where(np.isneginf(values), self.lower, values)
        return out, len(index)

    def forward(self, x):
        """Physical values (any shape, float32) -> normalised float32."""
        x, _ = self.clean(np.asarray(x, dtype=np.float32))
        if self.clip:
            x = np.clip(x, self.lower, self.upper)
        if self.log:
            x = np.log10(np.where(x <= 0, np.float32(self.lower), x))
        lo, up = self._limits()
        # (x - mid) / half_range: the arithmetic (and dtype) of that expression, in one array
        y = np.subtract(x, (up + lo) / 2)
        np.divide(y, (up - lo) / 2, out=y)
        return y.astype(np.float32, copy=False)

    def inverse(self, y):
        """Normalised values -> physical values times `save_scale` (float32)."""
        lo, up = self._limits()
        x = np.asarray(y, dtype=np.float64) * ((up - lo) / 2) + (up + lo) / 2
        if self.log:
            x = 10.0 ** x
        if self.clip:
            x = np.clip(x, self.lower, self.upper)
        return (x * self.save_scale).astype(np.float32)


@dataclass
class PerChannelScaling:
    """A Scaling for each channel of C x H x W data (README "Your own data", Scaling): channel
    c is mapped, and mapped back, by `scalings[c]` alone, with its own limits, clip and log,
    so that passbands whose values differ by orders of magnitude each fill [-1, 1]."""
    scalings: tuple

    def channel(self, c):
        return self.scalings[c]

    def forward(self, x):
        """Physical C x H x W values -> normalised float32, channel by channel."""
        return self._per_channel('forward', x)

    def inverse(self, y):
        """Normalised C x H x W values -> physical values times `save_scale` (float32)."""
        return self._per_channel('inverse', y)

    def _per_channel(self, method, array):
        return np.stack([getattr(scaling, method)(channel)
                         for scaling, channel in zip(self.scalings, array, strict=True)])


# ----------------------------------------------------------------------------------------
# Augmentation: the same random draw for an input and its target.
# ----------------------------------------------------------------------------------------


def random_rotation(arrays, max_angle, generator=None):
    """Rotate every C x H x W array by one random integer angle in [-max_angle, max_angle].

    `generator` (a torch.Generator) makes the draw reproducible; None uses torch's global RNG.
    """
    if max_angle <= 0:
        return arrays
    angle = int(torch.randint(-max_angle, max_angle + 1, (1,), generator=generator))
    if angle == 0:  # the reference always interpolates, which blurs data for nothing
        return arrays
    return [rotate(a, angle, axes=(1, 2), reshape=False, mode='nearest') for a in arrays]


def random_pad_and_crop(arrays, padding, generator=None):
    """Pad every C x H x W array by edge replication and crop back at one random offset."""
    if padding <= 0:
        return arrays
    dy, dx = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,), generator=generator))
    out = []
    for a in arrays:
        h, w = a.shape[1:]
        padded = np.pad(a, ((0, 0), (padding, padding), (padding, padding)), mode='edge')
        out.append(padded[:, dy:dy + h, dx:dx + w])
    return out


def random_window(size, crop_size, generator=None):
    """(top, left, crop_size): a crop_size x crop_size window at a random place in an image
    of `size` (height, width), every place equally likely (--crop_size)."""
    top, left = (int(torch.randint(0, n - crop_size + 1, (1,), generator=generator))
                 for n in size)
    return top, left, crop_size


# ----------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------


class CustomDataset(Dataset):
    """Paired files: input i pairs with target i (both sorted by name).

    Training items are `(input, target)`, each a float32 tensor (C, H, W) normalised to
    [-1, 1] at the saturation limits. Test items are `(input, name)` where `name` is the
    input file name without extension.
    """

    def __init__(self, opt, split=None):
        self.opt = opt
        self.split = split or ('train' if opt.is_train else 'test')
        self.input_scaling = Scaling.from_options(opt, 'input')
        self.target_scaling = Scaling.from_options(opt, 'target')
        if self.split == 'train':
            input_dir, target_dir = opt.input_dir_train, opt.target_dir_train
        else:  # test targets are optional: they enable the metrics
            input_dir, target_dir = opt.input_dir_test, getattr(opt, 'target_dir_test', None)
        self.input_paths = list_files(input_dir, opt.data_format_input, 'input')
        self.target_paths = None
        if target_dir:
            self.target_paths = list_files(target_dir, opt.data_format_target, 'target')
            if len(self.input_paths) != len(self.target_paths):
                raise UserError(
                    f"{len(self.input_paths)} input files in '{input_dir}' but "
                    f"{len(self.target_paths)} target files in '{target_dir}'; "
                    f"input i pairs with target i, so the counts must be equal")

    def __len__(self):
        return len(self.input_paths)

    def check_sizes(self):
        """Raise UserError naming the first input whose target differs in height or width,
        reading only the files' headers (so a Test run stops before its first output)."""
        if self.target_paths is None:
            return
        for index in range(len(self)):
            self.pair_size(index)

    def load_input(self, index, window=None):
        array = read_array(self.input_paths[index], self.opt.data_format_input, self.opt.input_ch,
                           window)
        return self.input_scaling.forward(array)

    def read_target(self, index, window=None):
        """Target i in physical units, C x H x W float32, as stored (NaN/Inf kept)."""
        return read_array(self.target_paths[index], self.opt.data_format_target,
                          self.opt.target_ch, window)

    def load_target(self, index, window=None):
        return self.target_scaling.forward(self.read_target(index, window))

    def pair_size(self, index):
        """(height, width) of pair i from its files' headers; UserError when they differ."""
        input_path, target_path = self.input_paths[index], self.target_paths[index]
        size = stored_size(input_path, self.opt.data_format_input, self.opt.input_ch)
        target_size = stored_size(target_path, self.opt.data_format_target, self.opt.target_ch)
        if size != target_size:
            raise size_mismatch(input_path, size, target_path, target_size)
        return size

    def window(self, index, generator):
        """The window of pair i that a training item takes (`random_window`), or None for
        the whole images (--crop_size 0)."""
        crop_size = getattr(self.opt, 'crop_size', 0)
        if not crop_size:
            return None
        return random_window(self.pair_size(index), crop_size, generator)

    def __getitem__(self, item):
        """`item` is an index, or (index, seed) to draw the augmentation from its own seed.

        The training sampler passes seeds derived from (run seed, epoch, position), so the
        augmentation of every sample is the same in a resumed run and with any number of
        data-loading workers.
        """
        index, seed = item if isinstance(item, tuple) else (item, None)
        if self.split != 'train':
            name = os.path.splitext(os.path.basename(self.input_paths[index]))[0]
            return torch.from_numpy(self.load_input(index)), name
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # The window is drawn first and the rotation and padding act on it: their cost
        # then grows with the window, not the image, and only the window need be read.
        window = self.window(index, generator)
        x, y = self.load_input(index, window), self.load_target(index, window)
        if x.shape[1:] != y.shape[1:]:
            raise size_mismatch(self.input_paths[index], x.shape[1:], self.target_paths[index],
                                y.shape[1:])
        x, y = random_rotation([x, y], self.opt.max_rotation_angle, generator)
        x, y = random_pad_and_crop([x, y], self.opt.padding_size, generator)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


# ----------------------------------------------------------------------------------------
# Checks of a whole dataset before training: a bad file fails in seconds, not hours.
# ----------------------------------------------------------------------------------------


NO_VALUES = {'counted': 0, 'outside': 0, 'inside_other': 0, 'min': np.inf, 'max': -np.inf}


def value_summary(array, own, other=None):
    """For each channel c of a C x H x W `array`, counts that tell whether its values suit
    its scaling `own.channel(c)` (see `check_dataset`).

    Each is {'counted' (the finite values that the scaling maps by their value, see
    `Scaling.by_value`), 'outside' (those beyond its limits), 'inside_other' (those within
    the limits of `other.channel(c)`, the other side's scaling; 0 without `other`), 'min',
    'max' (of all finite values)}.
    """
    return [channel_summary(channel, own.channel(c),
                            other.channel(c) if other is not None else None)
            for c, channel in enumerate(array)]


def channel_summary(values, own, other):
    """`value_summary` of one channel's `values`, with the Scalings `own` and `other`."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return dict(NO_VALUES)
    counted = own.by_value(finite)
    inside_other = 0 if other is None else \
        int(np.count_nonzero((counted >= other.lower) & (counted <= other.upper)))
    return {'counted': int(counted.size),
            'outside': int(np.count_nonzero((counted < own.lower) | (counted > own.upper))),
            'inside_other': inside_other, 'min': float(finite.min()), 'max': float(finite.max())}


def add_summary(total, summary):
    """Add one file's `channel_summary` to `total` (the same kind of dict)."""
    for key in ('counted', 'outside', 'inside_other'):
        total[key] += summary[key]
    total['min'], total['max'] = min(total['min'], summary['min']), \
        max(total['max'], summary['max'])


class _FileSummaries(Dataset):
    """Item i: for each side of pair `pairs[i]` (default: pair i), its (height, width), its
    NaN/Inf count and its `value_summary`, read with the training readers."""

    def __init__(self, dataset, pairs=None):
        self.dataset = dataset
        self.pairs = range(len(dataset)) if pairs is None else pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        d, index = self.dataset, self.pairs[item]
        # The swapped-folder check compares channel c with the other side's channel c; with
        # other channel counts, swapped folders already fail on the channel count.
        comparable = d.opt.input_ch == d.opt.target_ch
        summary = {}
        for side, paths, fmt, ch, own, other in (
                ('input', d.input_paths, d.opt.data_format_input, d.opt.input_ch,
                 d.input_scaling, d.target_scaling),
                ('target', d.target_paths, d.opt.data_format_target, d.opt.target_ch,
                 d.target_scaling, d.input_scaling)):
            if paths is None:
                continue
            array = read_array(paths[index], fmt, ch)
            summary[side] = (array.shape[1:], int(array.size - np.isfinite(array).sum()),
                             value_summary(array, own, other if comparable else None))
        return summary


# Share of a channel's counted values (`value_summary`) beyond its saturation limits above
# which the limits are probably not those of the data (a few saturated pixels are normal;
# most are not).
OUTSIDE_SHARE_WARNING = 0.2


def scaling_warnings(values, dataset):
    """Lines that warn about limits that do not fit the data; [] when the scaling looks right.

    `values`: {'input': totals, 'target': totals}, each a list of one channel's totals of
    `value_summary` over every file. A channel warns when more than OUTSIDE_SHARE_WARNING of
    its counted values (finite, and positive with log scale) lie outside its limits: one line
    per such channel, naming the channel when its side has several.
    The folders look swapped when, besides, each channel's values lie (all but that share)
    within the limits of the *other* side's channel: a magnetogram in the input folder fits
    the target's +-3000 G, and the EUV images in the target folder fit the input's 1..200.
    """
    scalings = {'input': dataset.input_scaling, 'target': dataset.target_scaling}

    def limits(side):
        """The side's limits, once when its channels share them, else one per channel."""
        return ', '.join(dict.fromkeys(
            f"[{scalings[side].channel(c).lower:g}, {scalings[side].channel(c).upper:g}]"
            for c in range(len(values[side]))))

    def observed(side):
        """The side's range of values, over all its channels."""
        return (f"{min(channel['min'] for channel in values[side]):.4g} to "
                f"{max(channel['max'] for channel in values[side]):.4g}")

    warned = [(side, c) for side, channels in values.items() for c, v in enumerate(channels)
              if v['counted'] and v['outside'] > OUTSIDE_SHARE_WARNING * v['counted']]
    if warned and len(values) == 2 and all(
            v['counted'] and v['inside_other'] >= (1 - OUTSIDE_SHARE_WARNING) * v['counted']
            for channels in values.values() for v in channels):
        return [(f"warning: the input and target folders look swapped: the input values "
                 f"({observed('input')}) fit the target limits {limits('target')} and the "
                 f"target values ({observed('target')}) the input limits {limits('input')}; "
                 f"check --input_dir_train and --target_dir_train")]
    return [outside_warning(side, c, len(values[side]), values[side][c],
                            scalings[side].channel(c)) for side, c in warned]


def outside_warning(side, c, channels, values, scaling):
    """The line for channel `c` (of `channels`) of `side` whose `values` (totals of
    `value_summary`) lie mostly outside the limits of its `scaling`."""
    name = f'{side} channel {c}' if channels > 1 else side
    several = ' (one value for every channel, or one per channel)' if channels > 1 else ''
    return (f"warning: {100 * values['outside'] / values['counted']:.0f}% of the {name} values "
            f"lie outside the saturation limits [{scaling.lower:g}, {scaling.upper:g}] "
            f"(observed range {values['min']:.4g} to {values['max']:.4g}); set "
            f"--saturation_lower_limit_{side} and --saturation_upper_limit_{side} to the range "
            f"that matters{several}")


def check_training_size(path, size, multiple, crop_size=0):
    """Raise UserError when the image of `path`, of `size`, cannot be trained on: smaller
    than --crop_size, or (whole images) not multiples of `multiple` (the generator's
    stride; a window has the size of --crop_size, which is a multiple)."""
    if crop_size and min(size) < crop_size:
        raise UserError(f"{path} is {size[0]}x{size[1]}, smaller than --crop_size {crop_size}; "
                        f"lower --crop_size or use larger images")
    if not crop_size and multiple > 1 and (size[0] % multiple or size[1] % multiple):
        raise UserError(f"{path} is {size[0]}x{size[1]}, but the network needs height and "
                        f"width that are multiples of {multiple} (2**--n_downsample); crop or "
                        f"pad the data, or lower --n_downsample")


# With --crop_size, the pairs whose files the check reads whole for its warnings: the first,
# the last and evenly spread between (README "What happens when…").
CHECK_SAMPLE = 5


def sample_pairs(n, k=CHECK_SAMPLE):
    """Up to `k` of the indices 0..n-1: the first, the last and evenly spread between."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def checked_pairs(dataset, crop_size):
    """The pairs `check_dataset` reads whole: every pair, or with --crop_size and formats
    whose windows are read alone (WINDOW_READERS), a sample (`sample_pairs`), as training
    then never reads a whole file and the check should not either (README "Your own data",
    Windows). None: every pair."""
    formats = (dataset.opt.data_format_input, dataset.opt.data_format_target)
    if crop_size and all(fmt in WINDOW_READERS for fmt in formats):
        return sample_pairs(len(dataset))
    return None


def check_sizes_from_headers(dataset, multiple, crop_size, progress=None):
    """Check every pair's height and width from its files' headers (`CustomDataset.pair_size`,
    which also refuses a truncated FITS or npy file) against the training's needs
    (`check_training_size`); returns the first pair's size."""
    pairs = range(len(dataset))
    for index in progress(pairs) if progress is not None else pairs:
        check_training_size(dataset.input_paths[index], dataset.pair_size(index), multiple,
                            crop_size)
    return dataset.pair_size(0)


def check_dataset(dataset, multiple, n_workers=0, log=print, progress=None, crop_size=0):
    """Read every file once and check what training needs; raise UserError on the first problem.

    Checks: readable, channel count, input/target height and width equal, height and width
    multiples of `multiple` (the generator's stride), or at least `crop_size` (--crop_size)
    when training takes windows (`check_training_size`). NaN/Inf values are counted and reported
    in one line per side that has any (`nonfinite_warning`; the scaling replaces them).
    Limits that do not fit the data (a large share of a channel's values outside them, or
    folders that look swapped) are warned about in one line each (`scaling_warnings`).
    With --crop_size and npy or FITS data (`checked_pairs`), the sizes are checked from every
    file's header and the values (NaN/Inf, limits) from a sample of CHECK_SAMPLE pairs.
    Returns the (height, width) of the first pair.
    """
    pairs = checked_pairs(dataset, crop_size)
    first_size = None
    if pairs is not None:
        first_size = check_sizes_from_headers(dataset, multiple, crop_size, progress)
    loader = DataLoader(_FileSummaries(dataset, pairs), batch_size=None, num_workers=n_workers,
                        worker_init_fn=ignore_stop_signals)
    if progress is not None:
        loader = progress(loader)
    paths = {'input': dataset.input_paths, 'target': dataset.target_paths}
    nonfinite = {}  # side: [values, files, first file]
    totals = {}
    for item, summary in enumerate(loader):
        index = item if pairs is None else pairs[item]
        size = summary['input'][0]
        if 'target' in summary and summary['target'][0] != size:
            raise size_mismatch(dataset.input_paths[index], size, dataset.target_paths[index],
                                summary['target'][0])
        check_training_size(dataset.input_paths[index], size, multiple, crop_size)
        for side, (_, bad, values) in summary.items():
            if bad:
                count = nonfinite.setdefault(side, [0, 0, paths[side][index]])
                count[0] += bad
                count[1] += 1
            for total, channel in zip(totals.setdefault(side, [dict(NO_VALUES) for _ in values]),
                                      values, strict=True):
                add_summary(total, channel)
        first_size = first_size or size
    for side, (n_values, n_files, first) in sorted(nonfinite.items()):  # input, then target
        sampled = '' if pairs is None else \
            f" (in {len(pairs)} of the {len(dataset)} pairs: --crop_size checks a sample)"
        log(nonfinite_warning(side, n_values, n_files, first,
                              getattr(dataset, f'{side}_scaling'), len(totals[side])) + sampled)
    for line in scaling_warnings(totals, dataset):
        log(line)
    return first_size


def nonfinite_warning(side, n_values, n_files, first, scaling, channels=1):
    """The line that reports the NaN/Inf values of one side (input or target) and what the
    `scaling` of its `channels` channels makes of them: the side and file are named, as they
    are where to look."""
    logs = {scaling.channel(c).log for c in range(channels)}
    if logs == {True}:
        nan = 'the lower limit'
    elif logs == {False}:
        nan = '0'
    else:
        nan = 'the lower limit in log-scaled channels and 0 in the others'
    return (f"warning: {n_values} NaN/Inf value(s) in {n_files} {side} file(s) (first: "
            f"{first}); NaN becomes {nan}, +Inf the upper and -Inf the lower limit")


# YYYYMMDD, optionally followed by hhmm[ss]; separators - _ : T allowed; a time group must not
# run into further digits (so the 0304 of '..._0000_0304' is not read as seconds).
TIMESTAMP = re.compile(r'(\d{4})[-_]?(\d{2})[-_]?(\d{2})'
                       r'(?:[T_-]?(\d{2})[:_-]?(\d{2})(?:[:_-]?(\d{2})(?!\d))?(?!\d))?')


def name_time(path):
    """The date/time written in a file name (YYYYMMDD[_hhmm[ss]] and similar), or None."""
    match = TIMESTAMP.search(os.path.basename(path))
    if not match:
        return None
    parts = [int(p) if p else 0 for p in match.groups()]
    try:
        return datetime.datetime(*parts)
    except ValueError:
        return None


# Names can mislead (a timestamp in the name that is not the observation's time): the user
# may know the pairing is right.
SKIP_PAIRING = '; --check_pairing False skips this check'


def check_pairing(input_paths, target_paths):
    """Raise UserError when the pairing by sorted name visibly joins the wrong files.

    Input i pairs with target i. When both sides use the same names, pair i must have the same
    name; when every name holds a date/time, target i must be the target closest in time to
    input i. Names that share neither tell nothing and pass.
    """
    inputs, targets = ([os.path.splitext(os.path.basename(p))[0] for p in paths]
                       for paths in (input_paths, target_paths))
    shared = set(inputs) & set(targets)
    if len(shared) >= len(inputs) / 2:
        for i, (a, b) in enumerate(zip(inputs, targets, strict=True)):
            if a != b:
                raise UserError(f"pair {i}: input {input_paths[i]} would be paired with target "
                                f"{target_paths[i]} (files pair by sorted name); a file with the "
                                f"same name is missing on one side{SKIP_PAIRING}")
        return
    input_times = [name_time(p) for p in input_paths]
    target_times = [name_time(p) for p in target_paths]
    if None in input_times or None in target_times:
        return
    for i, time in enumerate(input_times):
        offset = abs(target_times[i] - time)
        rivals = [j for j in range(len(target_times))
                  if j != i and abs(target_times[j] - time) <= offset]
        if offset and rivals:  # another target is as close or closer: the pairing is a guess
            raise UserError(f"pair {i}: input {input_paths[i]} ({time}) would be paired with "
                            f"target {target_paths[i]} ({target_times[i]}), but "
                            f"{target_paths[rivals[0]]} is as close in time; a file is missing "
                            f"on one side (files pair by sorted name){SKIP_PAIRING}")


# ----------------------------------------------------------------------------------------
# Writing generated data in the target's format and physical units.
# ----------------------------------------------------------------------------------------

# Cards that describe how a header's data are stored: those of the written float32 array are
# astropy's own.
FITS_STORAGE_CARDS = ('SIMPLE', 'XTENSION', 'BITPIX', 'NAXIS', 'EXTEND', 'PCOUNT', 'GCOUNT',
                      'BSCALE', 'BZERO', 'BLANK', 'CHECKSUM', 'DATASUM', 'EXTNAME')
# Cards of the input that describe its exposure, calibration, values, processing or file
# rather than its place and time (README "Output files"): on a generated map they would be
# false (sunpy would report an HMI-like map from AIA with AIA's 2 s exposure and level 1).
# Regular expressions, matched against whole keywords. Decided card by card from real AIA,
# HMI (full disk, SHARP, synoptic), MDI, EIT, SECCHI (EUVI, COR1, HI), LASCO, EUI, SWAP, SUVI,
# IRIS, Hinode, GONG, KCor and PUNCH headers. Kept: place, time and observer (DATE-OBS, T_OBS,
# HGLN_OBS, DSUN_OBS, RSUN_OBS, CAR_ROT, ...), the WCS, what was observed (OBJECT, SCI_OBJ)
# and instrument registers that only that instrument's software reads (AIA's AI*, AGT*,
# temperatures): they stay with the rest of the input's record of its observation.
FITS_INPUT_ONLY_CARDS = (
    # exposure
    'EXPTIME', 'XPOSURE', 'EXPSDEV', 'INT_TIME', 'EXPCMD', r'EXP\d', 'EXPMIN', 'EXPMAX',
    'EXPDUR', 'EXPMODE', 'SHUTCLS', 'AECMODE', 'AECTYPE', 'AECDELAY', 'IMG_TYPE',
    # calibration: how the input's values relate to the light on its detector
    'DN_GAIN', 'EFF_AREA', 'EFF_AR_V', 'PIXLUNIT', 'CALVER64', 'CAL_FSN', 'FLAT_REC',
    'BIASMEAN', 'BIASSDEV', 'GAINCMD', 'GAINMODE',
    # statistics of the input's values (HMI has a second set: DATAMIN2 ...)
    r'DATA(MIN|MAX|MEAN|MEDN|MDN|AVG|CENT|RMS|SIG|SKEW|KURT|VALS|ZER|SAT)',
    r'DATA(MIN|MAX|MEA|MED|RMS|SKE|KUR)2', r'DATAP\d\d', 'DATASIGN', 'MISSVALS', 'TOTVALS',
    'SATVALS', 'NSATPIX', 'DSATVAL', 'DSATMIN', 'PERCENTD', 'NSPIKES', 'NMISSING', 'MISSING',
    'OSCNMEAN', 'OSCNRMS', r'IMG_(MIN|MAX|AVG|MEAN|DEV|SDEV)',
    r'IMG(MIN|MAX|MN|RMS|VAR|SKW|KUR|ADV)\d\d', r'TD(MIN|MAX|MEAN|MEDN|RMS|SKEW|KURT|VALS)\d+',
    r'TDP\d\d_\d+',
    # processing level, quality, software
    'LVL_NUM', 'LEVEL', 'DATA_LEV', 'F_LEVEL', 'QUALITY', r'QUALLEV\d', 'QUAL_S', 'BLD_VERS',
    r'BLDVER\d+', r'CODEVER\d*', 'PIPEVRSN', 'VERSION', 'VERS_SW', 'CREATOR', 'DATE_DP',
    # the input file and its archive record
    'DATE', 'FILENAME', 'FILEORIG', 'FILE_RAW', 'FILEVRSN', 'F_NAME', 'F_VER', 'PARENT',
    'SOURCE', 'DATASRC', 'DATA_SRC', 'FSN', 'ASQFSN', 'AIAHFSN', 'AIMGFSN', 'RECNUM', 'DRMS_ID',
    'HEADSUM',
)
# Cards that say what the data are (quantity, unit, instrument, passband). A generated map is
# the targets' kind of data seen with the input's geometry and time, so these come from the
# training targets and never from the input (an EUV input's WAVELNTH on a magnetogram is
# wrong). ORIGIN is set to pix2pixCC.
FITS_IDENTITY_CARDS = ('BUNIT', 'BTYPE', 'TELESCOP', 'INSTRUME', 'DETECTOR', 'OBSRVTRY',
                       'CONTENT', 'WAVELNTH', 'WAVEUNIT', 'WAVE_STR', 'WAVEMIN', 'WAVEMAX',
                       'FILTER')
INPUT_ONLY_CARD = re.compile('|'.join(FITS_INPUT_ONLY_CARDS))
# The input cards a generated header leaves out (`describes_the_input`), and the cards of how
# a file stores its data, which `write_fits` leaves to astropy: as patterns, so that the ONNX
# export can carry them to deploy/onnx_translate.py, which writes the same headers without
# this module (README "Sharing a model and running it elsewhere").
LEFT_OUT_INPUT_CARD = re.compile('|'.join([*map(re.escape, FITS_IDENTITY_CARDS + ('ORIGIN',)),
                                           INPUT_ONLY_CARD.pattern]))
STORAGE_CARD = re.compile('|'.join(['NAXIS.*', *FITS_STORAGE_CARDS]))
# The ORIGIN card (value, comment) of every generated FITS file.
ORIGIN_CARD = ('pix2pixCC', 'generated by pix2pixCC (Jeong et al. 2022)')
# Keywords of a FITS world coordinate description (FITS standard 4.0, section 8), primary or
# alternate (a final letter A-Z).
WCS_CARD = re.compile(r'(WCSAXES|WCSNAME|CTYPE\d+|CUNIT\d+|CRVAL\d+|CDELT\d+|CRPIX\d+|CROTA\d+|'
                      r'CNAME\d+|CRDER\d+|CSYER\d+|(PC|CD|PV|PS)\d+_\d+|LONPOLE|LATPOLE|RADESYS|'
                      r'EQUINOX|RESTFRQ|RESTFREQ|RESTWAV|SPECSYS|SSYSOBS|SSYSSRC|VELOSYS|ZSOURCE|'
                      r'VELANGL)[A-Z]?')


def target_identity(path, data_format):
    """{card: value} of the FITS_IDENTITY_CARDS in the target file `path` ({} for formats
    other than FITS): what training records (as `target_header`) for the Test's headers."""
    if data_format not in FITS_FORMATS:
        return {}
    header = read_fits_header(path)
    return {key: header[key] for key in FITS_IDENTITY_CARDS
            if key in header and isinstance(header[key], (str, int, float, bool))}


def file_unit(path, data_format):
    """The BUNIT of a FITS file, else None (other formats carry no unit)."""
    if data_format not in FITS_FORMATS:
        return None
    return read_fits_header(path).get('BUNIT') or None


def data_unit(opt):
    """The targets' physical unit: --target_unit, else the BUNIT recorded from the targets,
    else None."""
    return getattr(opt, 'target_unit', None) or \
        (getattr(opt, 'target_header', None) or {}).get('BUNIT') or None


def scaled_unit(unit, save_scale):
    """BUNIT of data multiplied by `save_scale`: `unit` divided by it, so that values times
    BUNIT stay the same physical quantity (README "Output files"). Values in G times 1000 are
    in units of 10**-3 G, the FITS standard's way of writing a power of ten, which astropy
    reads in its FITS and generic formats; another factor is written as a number ('0.4 G'),
    which astropy's generic format (and sunpy) reads. None when there is no unit."""
    if not unit or save_scale == 1:
        return unit
    exponent = round(math.log10(abs(save_scale)))
    if save_scale > 0 and math.isclose(save_scale, 10.0 ** exponent, rel_tol=1e-12):
        return f'10**{-exponent} {unit}'
    return f'{1 / save_scale!r} {unit}'


def describes_the_input(keyword):
    """Whether an input card is left out of a generated map's header: the input's identity
    (FITS_IDENTITY_CARDS), ORIGIN, and its exposure, calibration, values, processing and file
    (FITS_INPUT_ONLY_CARDS)."""
    return bool(LEFT_OUT_INPUT_CARD.fullmatch(keyword))


def image_plane_axes(header, channels):
    """FITS axis numbers [x, y] of the image plane of a file with `channels` channels, as
    `read_array` reads it: beyond 3 axes, the axes of length 1 are dropped; of 3, the channel
    axis is the one `channel_axis` finds."""
    naxis = header.get('NAXIS', 0)
    axes = [(i, header.get(f'NAXIS{i}', 1)) for i in range(naxis, 0, -1)]  # numpy's order
    if len(axes) > 3:
        axes = [(i, length) for i, length in axes if length != 1]
    if len(axes) == 3:  # (a file that read_array accepted has a channel axis)
        axes.pop(channel_axis([length for _, length in axes], channels) or 0)
    return sorted(i for i, _ in axes) if len(axes) == 2 else [1, 2]


WCS_KEY = re.compile(WCS_CARD.pattern[:-len('[A-Z]?')] + '(?P<key>[A-Z]?)')


def world_descriptions(header):
    """astropy's WCS of every world coordinate description in `header` (primary and
    alternates, by the key letters of its WCS cards); a description astropy cannot read is
    left out, as no reader could use it.

    Each is read with `WCS(header, key=...)`: astropy 8.0's `find_all_wcs` corrupts the
    heap, and a Test run that called it per file crashed after about 40 files (README
    "Sharing a model and running it elsewhere")."""
    keys = sorted({match['key'] or ' ' for match in map(WCS_KEY.fullmatch, header) if match})
    descriptions = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # astropy's notes on what it fixes in archive headers
        for key in keys:
            try:
                descriptions.append(WCS(header, key=key))
            except (ValueError, KeyError):
                continue
    return descriptions


def product_wcs(wcs, plane, channels):
    """`wcs` restricted to the FITS axes `plane` (the image plane) and, for several target
    channels, given a third axis whose world coordinate is the channel index: 0, 1, ... as
    in the metrics' ch0_, ch1_ (README "Output files")."""
    sub = wcs.sub(plane + [0] * (channels > 1))  # 0: a new linear axis
    if channels > 1:
        sub.wcs.ctype[2], sub.wcs.cname[2] = 'CHANNEL', 'target channel'
        sub.wcs.crpix[2], sub.wcs.crval[2], sub.wcs.cdelt[2] = 1.0, 0.0, 1.0
    return sub


def with_product_wcs(header, plane, channels):
    """`header` (the input's cards) with a WCS for the axes of the generated data: the
    input's image plane (its FITS axes `plane`) and, when `channels` > 1, a channel axis
    (`product_wcs`).

    The input's WCS cards stay as they are when they already describe exactly those axes (a
    2-D input, one target channel). Otherwise each of its descriptions is rewritten by
    astropy: the wavelength axis of a C x H x W EUV cube would stay on a 2-D magnetogram, where
    astropy and sunpy cannot use it. A description whose image plane is not separable from
    its other axes has no WCS of its own and is left out. Cards astropy adds beside the WCS
    (MJD-OBS, observer) are added only where the input has none.
    """
    if not any(WCS_CARD.fullmatch(key) for key in header):
        return header
    descriptions = world_descriptions(header)
    if channels == 1 and plane == [1, 2] and all(wcs.wcs.naxis == 2 for wcs in descriptions):
        return header
    out = fits.Header([card for card in header.cards if not WCS_CARD.fullmatch(card.keyword)])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # astropy's notes on the cards it writes
        for wcs in descriptions:
            try:
                cards = product_wcs(wcs, plane, channels).to_header(relax=True, key=wcs.wcs.alt)
            except ValueError:
                continue
            out.extend(card for card in cards.cards if card.keyword not in out)
    return out


def generated_header(input_header, identity, unit, history, input_channels=1, channels=1):
    """Header of a generated FITS file.

    input_header: the input's header (place, time, observer, WCS) or None; the cards that
    `describes_the_input` are dropped, and its WCS is made that of the generated data's axes
    (`with_product_wcs`; input_channels: the input's channel count, channels: the generated
    data's). identity: the targets' identity cards ({} when they have none). unit: BUNIT
    (None: the targets' own, if any). history: HISTORY lines.
    """
    header = fits.Header()
    if input_header is not None:
        header.extend(card for card in input_header.cards
                      if not describes_the_input(card.keyword))
        header = with_product_wcs(header, image_plane_axes(input_header, input_channels),
                                  channels)
    for key, value in identity.items():
        header[key] = value
    if unit:
        header['BUNIT'] = unit
    header['ORIGIN'] = ORIGIN_CARD
    for line in history:
        header.add_history(line)
    return header


def write_fits(path, data, header=None, history=(), compress=False, quantize_step=None, **_):
    """float32 FITS; `header` (e.g. from `generated_header`) is copied except the cards of
    how its data were stored (STORAGE_CARD). With `compress`, tile-compressed
    (`compressed_hdus`)."""
    hdu = fits.PrimaryHDU(data.astype(np.float32))
    if header is not None:
        hdu.header.extend(card for card in header.cards
                          if not STORAGE_CARD.fullmatch(card.keyword))
    for line in history:
        hdu.header.add_history(line)
    hdus = compressed_hdus(hdu, quantize_step) if compress else fits.HDUList([hdu])
    hdus.writeto(path, overwrite=True)


def compressed_hdus(hdu, quantize_step=None):
    """The image of `hdu` as a tile-compressed FITS extension behind an empty primary HDU
    (the FITS tiled-image convention, which astropy, sunpy and cfitsio read as an image).

    Without `quantize_step`: lossless (GZIP_2, the float32 bytes shuffled and gzipped).
    With it: the values are rounded to multiples of `quantize_step` (in the file's unit,
    BUNIT) with subtractive dithering, so every value is within quantize_step / 2 of the
    original, and the integers RICE_1-compressed; the dither seed comes from the data, so the
    same data give the same file. A HISTORY line states the step. NaN stay NaN either way.
    """
    header = hdu.header.copy()
    if quantize_step is None:
        settings = dict(compression_type='GZIP_2', quantize_level=0)
    else:
        unit = header.get('BUNIT')
        header.add_history(f"pix2pixCC: values rounded to a step of {quantize_step:g}"
                           f"{f' {unit}' if unit else ''} (dithered; error <= step/2)")
        settings = dict(compression_type='RICE_1', quantize_level=-quantize_step,
                        quantize_method=2, dither_seed=-1)  # SUBTRACTIVE_DITHER_2, checksum
    return fits.HDUList([fits.PrimaryHDU(),
                         fits.CompImageHDU(hdu.data, header=header, **settings)])


def write_npy(path, data, **_):
    np.save(path, data.astype(np.float32))


def write_tiff(path, data, **_):
    tifffile.imwrite(path, data.astype(np.float32), photometric='minisblack')


def write_image(path, data, upper_limit=255, **_):
    """Integer PNG/JPEG: rounded and clipped; 16-bit PNG when the data range exceeds 8 bits."""
    sixteen_bit = upper_limit > 255 and path.lower().endswith('.png')
    dtype, top = (np.uint16, 65535) if sixteen_bit else (np.uint8, 255)
    pixels = np.clip(np.rint(data), 0, top).astype(dtype)
    if pixels.ndim == 3:
        if sixteen_bit and pixels.shape[0] > 1:
            raise UserError(f"{path}: Pillow cannot write multi-channel 16-bit PNG; "
                            f"use --data_format_target tif or npy")
        pixels = np.moveaxis(pixels, 0, -1)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        elif pixels.shape[-1] not in (3, 4):
            raise UserError(f"{path}: {pixels.shape[-1]} channels cannot be saved as an image; "
                            f"use --data_format_target tif or npy")
    Image.fromarray(pixels).save(path)


WRITERS = {'png': write_image, 'jpg': write_image, 'jpeg': write_image,
           'tif': write_tiff, 'tiff': write_tiff, 'npy': write_npy,
           'fits': write_fits, 'fts': write_fits, 'fit': write_fits}


def write_array(path, data, data_format, **kwargs):
    """Write C x H x W physical data; one channel is written as H x W.

    kwargs: `header`/`history`/`compress`/`quantize_step` (FITS), `upper_limit` (PNG bit
    depth).
    """
    data = data[0] if data.ndim == 3 and data.shape[0] == 1 else data
    WRITERS[data_format](path, data, **kwargs)
