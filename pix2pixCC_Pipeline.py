"""Paired-file data pipeline: reading, scaling (and its inverse), augmentation, checks.

Data flow of one file:  read (one reader per format) -> C x H x W float32 -> `Scaling.forward`
(clean NaN/Inf -> clip -> log10 -> normalise to [-1, 1] at the saturation limits) -> augment
(training only). Generated data go back through `Scaling.inverse` and one writer per format
(machinery/products.py, with the rules of a generated FITS header).
"""
import contextlib
import datetime
import functools
import glob
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import tifffile
import torch
from astropy.io import fits
from PIL import Image
from scipy.ndimage import rotate
from torch.utils.data import Dataset

from machinery.products import FITS_IDENTITY_CARDS, channel_axis
from pix2pixCC_Options import FITS_FORMATS, FORMAT_FAMILIES, UserError, channel_values

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


def target_identity(headers):
    """{card: value} of the FITS_IDENTITY_CARDS in the first of a target's `headers` (a
    dataset's `headers('target', index)`; None, for formats other than FITS, gives {}):
    what training records (as `target_header`) for the Test's headers."""
    if not headers:
        return {}
    header = headers[0]
    return {key: header[key] for key in FITS_IDENTITY_CARDS
            if key in header and isinstance(header[key], (str, int, float, bool))}


def file_unit(headers):
    """The BUNIT of the first of `headers` (a dataset's `headers(side, index)`), else None
    (None: formats without cards, which carry no unit)."""
    return (headers[0].get('BUNIT') or None) if headers else None


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


def unpaired_files(input_paths, target_paths):
    """Why the input and target files do not pair one to one, naming the files: the names
    found on one side only (when both sides share names), or the times in the names that no
    file of the other side is near (the nearest within a minute pairs), or that the two
    sides' times do not overlap at all."""
    def stem(path):
        return os.path.splitext(os.path.basename(path))[0]

    inputs, targets = {stem(p): p for p in input_paths}, {stem(p): p for p in target_paths}
    if len(set(inputs) & set(targets)) >= min(len(inputs), len(targets)) / 2:
        alone = [os.path.basename(inputs[n]) for n in sorted(set(inputs) - set(targets))] + \
            [os.path.basename(targets[n]) for n in sorted(set(targets) - set(inputs))]
        return f"without a partner of the same name: {', '.join(alone[:5])}" + \
            (f' and {len(alone) - 5} more' if len(alone) > 5 else '')
    times = [[name_time(p) for p in paths] for paths in (input_paths, target_paths)]
    if any(None in side for side in times) or not all(times):
        return None
    (first_in, last_in), (first_tg, last_tg) = ((min(side), max(side)) for side in times)
    if last_in < first_tg or last_tg < first_in:
        return (f'the times in their names do not overlap: inputs {first_in:%Y-%m-%d %H:%M} to '
                f'{last_in:%Y-%m-%d %H:%M}, targets {first_tg:%Y-%m-%d %H:%M} to '
                f'{last_tg:%Y-%m-%d %H:%M}')
    alone = [os.path.basename(path) for side, other, paths in (
        (times[0], times[1], input_paths), (times[1], times[0], target_paths))
        for time, path in zip(side, paths, strict=True)
        if min(abs(time - t) for t in other) > datetime.timedelta(minutes=1)]
    if not alone:
        return None
    return f"without a partner within a minute of the time in their names: " \
        f"{', '.join(alone[:5])}" + (f' and {len(alone) - 5} more' if len(alone) > 5 else '')


# ----------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------


class CustomDataset(Dataset):
    """Paired files: input i pairs with target i (both sorted by name).

    Training items are `(input, target)`, each a float32 tensor (C, H, W) normalised to
    [-1, 1] at the saturation limits. Test items are `(input, name)` where `name` is the
    input file name without extension.

    What reads files is in `find_pairs`, the readers (`read_input`, `read_target`), the
    sizes, `headers`, `input_source` and `record`, which machinery/sdoml_data.StoreDataset
    replaces to serve the pairs of SDOML stores; the rest (scaling, windows, augmentation,
    items) and every user of a dataset are the same for both.
    """

    def __init__(self, opt, split=None):
        self.opt = opt
        self.split = split or ('train' if opt.is_train else 'test')
        self.input_scaling = Scaling.from_options(opt, 'input')
        self.target_scaling = Scaling.from_options(opt, 'target')
        self.find_pairs()

    def find_pairs(self):
        """Set `input_paths` and `target_paths` (None without targets), the files of the
        split's folders, and `input_dir` and `target_dir`, the folders."""
        opt = self.opt
        if self.split == 'train':
            input_dir, target_dir = opt.input_dir_train, opt.target_dir_train
        else:  # test targets are optional: they enable the metrics
            input_dir, target_dir = opt.input_dir_test, getattr(opt, 'target_dir_test', None)
        self.input_dir, self.target_dir = input_dir, target_dir or None
        self.input_paths = list_files(input_dir, opt.data_format_input, 'input')
        self.target_paths = None
        if target_dir:
            self.target_paths = list_files(target_dir, opt.data_format_target, 'target')
            if len(self.input_paths) != len(self.target_paths):
                unpaired = unpaired_files(self.input_paths, self.target_paths)
                raise UserError(
                    f"{len(self.input_paths)} input files in '{input_dir}' but "
                    f"{len(self.target_paths)} target files in '{target_dir}'"
                    f"{f' ({unpaired})' if unpaired else ''}; input i pairs with target i, "
                    f"so the counts must be equal")

    def __len__(self):
        return len(self.input_paths)

    def check_sizes(self):
        """Raise UserError naming the first input whose target differs in height or width,
        reading only the files' headers (so a Test run stops before its first output)."""
        if self.target_paths is None:
            return
        for index in range(len(self)):
            self.pair_size(index)

    def read_input(self, index, window=None):
        """Input i in physical units, C x H x W float32, as stored (NaN/Inf kept)."""
        return read_array(self.input_paths[index], self.opt.data_format_input, self.opt.input_ch,
                          window)

    def load_input(self, index, window=None):
        return self.input_scaling.forward(self.read_input(index, window))

    def read_target(self, index, window=None):
        """Target i in physical units, C x H x W float32, as stored (NaN/Inf kept)."""
        return read_array(self.target_paths[index], self.opt.data_format_target,
                          self.opt.target_ch, window)

    def load_target(self, index, window=None):
        return self.target_scaling.forward(self.read_target(index, window))

    def headers(self, side, index):
        """The FITS header of each channel of file `index` of `side` ('input' or 'target'):
        the file's, for every channel it holds; None for formats without cards."""
        if getattr(self.opt, f'data_format_{side}') not in FITS_FORMATS:
            return None
        paths = self.input_paths if side == 'input' else self.target_paths
        return [read_fits_header(paths[index])] * getattr(self.opt, f'{side}_ch')

    def input_size(self, index):
        """(height, width) of input i, from its file's header."""
        return stored_size(self.input_paths[index], self.opt.data_format_input,
                           self.opt.input_ch)

    def target_size(self, index):
        """(height, width) of target i, from its file's header."""
        return stored_size(self.target_paths[index], self.opt.data_format_target,
                           self.opt.target_ch)

    def pair_size(self, index):
        """(height, width) of pair i from its files' headers; UserError when they differ."""
        size, target_size = self.input_size(index), self.target_size(index)
        if size != target_size:
            raise size_mismatch(self.input_paths[index], size, self.target_paths[index],
                                target_size)
        return size

    def kind(self):
        """The data in a few words, for the start-up lines: 'fits -> fits'."""
        return f'{self.opt.data_format_input} -> {self.opt.data_format_target}'

    def input_source(self, index):
        """What input i was made from, as a product's HISTORY names it: its file's name."""
        return os.path.basename(self.input_paths[index])

    def record(self):
        """The inputs and targets as a Test output folder's record (test_run.json) names
        them: the folders and the file names."""
        def names(paths):
            return [os.path.basename(path) for path in paths]
        targets = self.target_paths is not None
        return {'input_dir': os.path.abspath(self.input_dir),
                'input_files': names(self.input_paths),
                'target_dir': os.path.abspath(self.target_dir) if targets else None,
                'target_files': names(self.target_paths) if targets else None}

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
