"""Prepare solar image pairs for pix2pixCC: from folders of archive FITS files to aligned
training and test pairs (README "Preparing solar data").

    python datasets/prepare_pairs.py --input_dir AIA171/ [--input_dir AIA193/ ...] \\
        --target_dir HMI/ --output_dir datasets/EUV2Mag --size 1024 --disk_radius_px 450

1. Time matching: each target file (time from DATE-OBS, DATE_OBS or T_OBS) takes from every
   --input_dir the file nearest in time, within --max_time_difference minutes; several
   --input_dirs become the channels of one C x H x W input cube, in the order given. A target
   without a partner in some folder is skipped, and so is a file whose QUALITY card is not 0
   (unless --keep_bad_quality).
2. Geometry, each map on its own (its own observer: nothing is reprojected to another
   vantage point): rotated to solar north up, resampled so that the solar disk has a radius of
   --disk_radius_px pixels with its centre at the image centre, cut to --size x --size. One
   interpolation (scipy's map_coordinates, --order) from the map's own WCS; NaN stays NaN and
   spreads by at most one source pixel.
3. Values: --exposure_normalise divides inputs by EXPTIME; --mask_limb F sets the pixels
   beyond F solar radii to NaN.
4. Split by time: pairs from --test_months go to Test/, the rest to Train/; --gap_days D drops
   from Train the pairs within D days of a Test pair.
5. Outputs: <output_dir>/{Train,Test}/{Input,Target}/<YYYYmmdd_HHMMSS>.fits (float32, a header
   whose WCS, date, observer, RSUN_OBS and BUNIT describe the resampled data; row index grows
   to solar north, column index to solar west), <output_dir>/pairs.csv (every pair and every
   skipped file, with the reason) and one summary line.

Needs numpy, scipy and astropy (requirements-prep.txt), not torch. Orientation: FITS rows
count upwards, so "north up" means north at the highest row (matplotlib's origin='lower').
"""
import argparse
import bisect
import contextlib
import csv
import dataclasses
import datetime
import os
import re
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# (pix2pixCC_Options needs only the standard library: its one-line errors, nothing of torch)
from pix2pixCC_Options import OneLineErrorParser, UserError, run_main, str2bool  # noqa: E402

try:
    import numpy as np
    from astropy.io import fits
    from astropy.time import Time
    from astropy.utils.exceptions import AstropyWarning
    from astropy.wcs import WCS
    from scipy.ndimage import distance_transform_edt, map_coordinates
except ImportError as missing:  # one line, as for any other problem the user must fix
    print(f"prepare_pairs.py: error: it needs numpy, scipy and astropy ({missing.name} is "
          f"missing): pip install -r requirements-prep.txt", file=sys.stderr)
    sys.exit(2)

FITS_EXTENSIONS = ('.fits', '.fts', '.fit', '.fits.gz', '.fts.gz', '.fit.gz')
TIME_CARDS = ('DATE-OBS', 'DATE_OBS', 'T_OBS')
# JSOC's time strings (HMI's T_OBS): 2014.03.01_00:01:25_TAI
JSOC_TIME = re.compile(r'(\d{4})\.(\d\d)\.(\d\d)_(\d\d:\d\d:\d\d(?:\.\d*)?)(?:_(\w+))?$')
JSOC_SCALES = {'TAI': 'tai', 'TT': 'tt', 'UTC': 'utc', 'UT': 'utc'}
NAME_FORMAT = '%Y%m%d_%H%M%S'  # output file names: the target's time to the second (UTC)
# Cards of the source file that no longer describe the prepared map: its storage, every WCS
# description (primary and alternates, A-Z), pixel positions in the old grid (AIA's X0_MP,
# Y0_MP, R_SUN; EIT's SOLAR_R; the pointing XCEN/YCEN), and the old values' statistics.
STALE_CARD = re.compile(
    r'SIMPLE|BITPIX|NAXIS\d*|EXTEND|BSCALE|BZERO|BLANK|CHECKSUM|DATASUM|DATE|'
    r'(WCSAXES|WCSNAME|LONPOLE|LATPOLE|(CTYPE|CUNIT|CRPIX|CRVAL|CDELT|CROTA|CRDER|CSYER|CNAME)'
    r'\d+|(PC|CD|PV|PS)\d+_\d+)[A-Z]?|PC\d{6}|CD\d{6}|'
    r'X0_MP|Y0_MP|R_SUN|SOLAR_R|IMSCL_MP|XCEN|YCEN|'
    r'DATA[A-Z0-9_]*|MISSVALS|TOTVALS|SATVALS|NSATPIX|PERCENTD|NSPIKES')
# Cards of one passband, left out of a cube of several (named by its CHANn cards instead)
PASSBAND_CARDS = ('WAVELNTH', 'WAVEUNIT', 'WAVE_STR', 'EXPTIME')


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------


def parser():
    p = OneLineErrorParser(prog='prepare_pairs.py', description=' '.join(__doc__.split('\n')[:2]),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    required = dict(required=True, default=argparse.SUPPRESS, metavar='DIR')  # no default
    add('--input_dir', action='append', **required,
        help='folder of input FITS files; repeat for several channels, in that order')
    add('--target_dir', **required, help='folder of target FITS files')
    add('--output_dir', **required,
        help='new folder for Train/ and Test/ (Input/, Target/) and pairs.csv')
    add('--size', type=int, default=1024, help='output height and width (px)')
    add('--disk_radius_px', type=float, default=450.0, help='solar radius in the output (px)')
    add('--max_time_difference', type=float, default=6.0,
        help='largest |input time - target time| of a pair (minutes)')
    add('--order', type=int, default=1, choices=range(6),
        help='spline order of the interpolation: 0 nearest, 1 bilinear, 3 cubic')
    add('--exposure_normalise', type=str2bool, nargs='?', const=True, default=False,
        metavar='BOOL',
        help='divide inputs by EXPTIME (BUNIT becomes per second)')
    add('--mask_limb', type=float, default=None, metavar='F',
        help='set pixels beyond F solar radii to NaN, in inputs and targets; None: keep')
    add('--test_months', type=int, nargs='*', default=[], metavar='MONTH',
        help='months (1-12) of the target times whose pairs go to Test/')
    add('--gap_days', type=float, default=0.0,
        help='drop from Train every pair within this many days of a Test pair')
    add('--keep_bad_quality', type=str2bool, nargs='?', const=True, default=False,
        metavar='BOOL',
        help='also use files whose QUALITY card is not 0')
    p.option_names = [a.option_strings[0] for a in p._actions if a.option_strings]
    return p


def option_problems(opt):
    """What is wrong with the options' values, one phrase each."""
    problems = []
    if opt.disk_radius_px <= 0:
        problems.append('--disk_radius_px must be positive')
    elif opt.size < 2 * opt.disk_radius_px:
        problems.append(f'--size {opt.size} is smaller than the disk (2 x --disk_radius_px = '
                        f'{2 * opt.disk_radius_px:g} px): give a larger --size or a smaller '
                        f'--disk_radius_px')
    if opt.max_time_difference < 0 or opt.gap_days < 0:
        problems.append('--max_time_difference and --gap_days cannot be negative')
    if opt.mask_limb is not None and opt.mask_limb <= 0:
        problems.append('--mask_limb F needs F > 0 (1: the limb)')
    if any(not 1 <= month <= 12 for month in opt.test_months):
        problems.append('--test_months takes months 1 to 12')
    return problems


def parse(argv):
    opt = parser().parse_args(argv)
    problems = option_problems(opt)
    if problems:
        raise UserError(problems[0])
    return opt


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Observation:
    """One FITS file: its path, time (UTC, naive datetime) and QUALITY card (0 if absent)."""
    path: str
    time: datetime.datetime
    quality: int


@contextlib.contextmanager
def quiet_astropy():
    """Without astropy's notes on the archive cards it reads or fixes (BLANK of float data,
    DATE-OBS formats, ...): they are not the user's to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', AstropyWarning)
        yield


def image_hdu(hdul, path):
    """The first HDU that holds an image (a compressed one included)."""
    for hdu in hdul:
        if hdu.is_image and hdu.header.get('NAXIS', 0) >= 2:
            return hdu
    raise UserError(f'{path}: no image in this FITS file')


def read_header(path):
    try:
        with quiet_astropy(), fits.open(path) as hdul:
            return image_hdu(hdul, path).header.copy()
    except (OSError, ValueError) as error:
        raise UserError(f'{path}: not a readable FITS file ({error})') from None


def read_map(path):
    """(header, 2-D float64 data) of the file's image, NaN where it is blank."""
    try:
        with quiet_astropy(), fits.open(path) as hdul:
            hdu = image_hdu(hdul, path)
            data = np.asarray(hdu.data, dtype=np.float64).squeeze()
            header = hdu.header.copy()
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f'{path}: not a readable FITS image ({error})') from None
    if data.ndim != 2:
        raise UserError(f'{path}: the image has shape {data.shape}; one 2-D map per file')
    return header, data


def parse_time(text):
    """A FITS time string (ISO, with or without 'Z'; JSOC's 2014.03.01_00:01:25_TAI) as a naive
    UTC datetime."""
    text, scale = str(text).strip().rstrip('Z'), 'utc'
    jsoc = JSOC_TIME.match(text)
    if jsoc:
        text = f'{jsoc[1]}-{jsoc[2]}-{jsoc[3]}T{jsoc[4]}'
        scale = JSOC_SCALES.get((jsoc[5] or 'UTC').upper(), 'utc')
    return Time(text, scale=scale).utc.datetime


def observation(path):
    header = read_header(path)
    card = next((card for card in TIME_CARDS if str(header.get(card, '')).strip()), None)
    if card is None:
        raise UserError(f'{path}: no observation time ({", ".join(TIME_CARDS)}); every file '
                        f'needs one to be paired')
    try:
        time = parse_time(header[card])
    except ValueError:
        raise UserError(f"{path}: {card} = '{header[card]}' is not a time") from None
    return Observation(path, time, int(header.get('QUALITY', 0) or 0))


def fits_files(folder, option):
    if not os.path.isdir(folder):
        raise UserError(f'{option} {folder}: no such folder')
    names = sorted(name for name in os.listdir(folder)
                   if name.lower().endswith(FITS_EXTENSIONS) and not name.startswith('.'))
    if not names:
        raise UserError(f'{option} {folder}: no FITS files ({" ".join(FITS_EXTENSIONS)}) in it')
    return [os.path.join(folder, name) for name in names]


def scan(folder, option):
    """Every FITS file of `folder` as an Observation, sorted by time."""
    return sorted((observation(path) for path in fits_files(folder, option)),
                  key=lambda o: o.time)


# ----------------------------------------------------------------------------------------
# Pairing and the split
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """A target and its nearest input of every folder; `split` is Train, Test or dropped."""
    name: str
    target: Observation
    inputs: list
    split: str = 'Train'
    note: str = ''


@dataclasses.dataclass
class Skipped:
    """A file left out, why (the summary's category) and the details (pairs.csv)."""
    observation: Observation
    role: str
    reason: str
    detail: str


def minutes(a, b):
    return (a - b).total_seconds() / 60.0


def nearest(observations, times, time, max_minutes):
    """The observation nearest in time to `time`, if within `max_minutes`; `observations` are
    sorted by time, and `times` are theirs."""
    i = bisect.bisect_left(times, time)  # the nearest is observations[i - 1] or [i]
    best = min(observations[max(i - 1, 0):i + 1], key=lambda o: abs(o.time - time),
               default=None)
    return best if best is not None and abs(minutes(best.time, time)) <= max_minutes else None


def bad_quality(o, role):
    return Skipped(o, role, 'bad quality', f'QUALITY = {o.quality} (--keep_bad_quality uses it)')


def match(targets, inputs, input_dirs, opt):
    """(pairs, skipped files): each usable target with its nearest usable input of every
    folder (`inputs`: one sorted list of Observations per folder)."""
    keep = opt.keep_bad_quality
    skipped = [bad_quality(o, f'input {k + 1}') for k, folder in enumerate(inputs)
               for o in folder if o.quality and not keep]
    usable = [[o for o in folder if keep or not o.quality] for folder in inputs]
    times = [[o.time for o in folder] for folder in usable]
    pairs, names = [], {}
    for target in targets:
        if target.quality and not keep:
            skipped.append(bad_quality(target, 'target'))
            continue
        partners = [nearest(folder, folder_times, target.time, opt.max_time_difference)
                    for folder, folder_times in zip(usable, times, strict=True)]
        if None in partners:
            folder = input_dirs[partners.index(None)]
            skipped.append(Skipped(target, 'target', 'no partner', f'no input within '
                                   f'{opt.max_time_difference:g} min in {folder}'))
            continue
        name = target.time.strftime(NAME_FORMAT)
        if name in names:
            skipped.append(Skipped(target, 'target', 'same second', f'the same time to the '
                                   f'second as {names[name]}'))
            continue
        names[name] = target.path
        pairs.append(Pair(name, target, partners))
    used = {o.path for pair in pairs for o in pair.inputs}
    skipped += [Skipped(o, f'input {k + 1}', 'unused', 'not the nearest input of a paired '
                        'target') for k, folder in enumerate(usable) for o in folder
                if o.path not in used]
    return pairs, skipped


def split(pairs, test_months, gap_days):
    """Set each pair's split: Test for a target time in `test_months`, else Train, or dropped
    when within `gap_days` days of a Test pair (so that nearly the same Sun is not in both)."""
    tests = sorted((p.target.time, p.name) for p in pairs if p.target.time.month in test_months)
    test_times = [time for time, _ in tests]
    gap = datetime.timedelta(days=gap_days)
    for pair in pairs:
        time = pair.target.time
        if time.month in test_months:
            pair.split = 'Test'
            continue
        i = bisect.bisect_left(test_times, time)  # the nearest Test pair is [i - 1] or [i]
        near = min(tests[max(i - 1, 0):i + 1], key=lambda t: abs(t[0] - time), default=None)
        if gap_days > 0 and near is not None and abs(near[0] - time) <= gap:
            pair.split, pair.note = 'dropped', f'within {gap_days:g} days of Test pair {near[1]}'


# ----------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------


def angular_radius_arcsec(header):
    """The Sun's angular radius: RSUN_OBS (arcsec), else arcsin(RSUN_REF / DSUN_OBS)."""
    if header.get('RSUN_OBS'):
        return float(header['RSUN_OBS'])
    if header.get('RSUN_REF') and header.get('DSUN_OBS'):
        return float(np.degrees(np.arcsin(header['RSUN_REF'] / header['DSUN_OBS'])) * 3600.0)
    return None


def map_geometry(header, path):
    """(the map's celestial WCS, the Sun's angular radius in arcsec); a UserError naming the
    missing cards when the file has not the cards the geometry needs."""
    types = (str(header.get('CTYPE1', '')), str(header.get('CTYPE2', '')))
    if not (types[0].startswith('HPLN') and types[1].startswith('HPLT')):
        raise UserError(f'{path}: no helioprojective WCS (CTYPE1/CTYPE2 HPLN-/HPLT-, found '
                        f'{types[0] or "none"}/{types[1] or "none"}); the geometry needs one')
    radius = angular_radius_arcsec(header)
    if radius is None:
        raise UserError(f"{path}: no solar radius (RSUN_OBS, or RSUN_REF with DSUN_OBS); "
                        f"the geometry needs one")
    with quiet_astropy():
        try:
            return WCS(header).celestial, radius
        except (ValueError, KeyError, MemoryError) as error:
            raise UserError(f'{path}: unreadable WCS ({error})') from None


def plane_cards(size, arcsec_per_px):
    """The WCS cards of a north-up size x size map with the Sun's centre at the image centre:
    helioprojective (0", 0") at pixel ((size + 1) / 2, (size + 1) / 2), FITS's 1-based
    count, i.e. (size - 1) / 2 from 0; +x west, +y north; `arcsec_per_px` per pixel."""
    header = fits.Header()
    header['WCSAXES'] = 2
    for axis, ctype in ((1, 'HPLN-TAN'), (2, 'HPLT-TAN')):
        header[f'CTYPE{axis}'] = ctype
        header[f'CUNIT{axis}'] = 'arcsec'
        header[f'CRPIX{axis}'] = (size + 1) / 2.0
        header[f'CRVAL{axis}'] = 0.0
        header[f'CDELT{axis}'] = arcsec_per_px
    for i, j in ((1, 1), (1, 2), (2, 1), (2, 2)):
        header[f'PC{i}_{j}'] = float(i == j)  # north up: no rotation
    return header


def source_pixels(source_wcs, plane, size):
    """For every pixel of the size x size output (`plane`'s WCS), where it lies in the
    source map: (rows, columns), each size x size, 0-based pixel centres. The same observer
    on both sides, so this is the map's own rotation, scale and shift (and the change of the
    TAN projection's centre, a tiny correction), not a change of vantage point."""
    with quiet_astropy():
        target = WCS(plane)
    x, y = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    lon, lat = target.wcs_pix2world(x, y, 0)
    columns, rows = source_wcs.all_world2pix(lon, lat, 0)
    return rows, columns


def filled(data, valid, order):
    """`data` with its NaN/Inf filled for the interpolation: 0 for order <= 1 (those pixels'
    neighbours become NaN anyway), the nearest valid value for splines, whose prefilter
    would otherwise ring from the jump to 0 into valid pixels."""
    if valid.all():
        return data
    if order <= 1 or not valid.any():
        return np.where(valid, data, 0.0)
    nearest_valid = distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return data[tuple(nearest_valid)]


def resample(data, rows, columns, order):
    """`data` interpolated (spline `order`) at (rows, columns); NaN wherever the interpolation
    would use a NaN/Inf source pixel or a point outside the source (its bilinear coverage by
    valid pixels is below 1), so NaN grows by at most one source pixel."""
    valid = np.isfinite(data)
    values = map_coordinates(filled(data, valid, order), [rows, columns], order=order,
                             mode='constant', cval=0.0, prefilter=order > 1)
    coverage = map_coordinates(valid.astype(np.float64), [rows, columns], order=1,
                               mode='constant', cval=0.0)
    values[coverage < 1.0 - 1e-6] = np.nan
    return values


def mask_limb(image, fraction, radius_px):
    """NaN beyond `fraction` solar radii of the image centre (in place)."""
    size = image.shape[-1]
    y, x = np.ogrid[:size, :size]
    centre = (size - 1) / 2.0
    image[..., np.hypot(x - centre, y - centre) > fraction * radius_px] = np.nan


# ----------------------------------------------------------------------------------------
# Values and headers
# ----------------------------------------------------------------------------------------


def data_unit(header):
    """The data's unit: BUNIT, else PIXLUNIT (AIA), else DN (a detector's data number)."""
    return str(header.get('BUNIT') or header.get('PIXLUNIT') or 'DN').strip()


def exposure(header, path):
    """EXPTIME (s) of a map whose unit is not yet per second."""
    unit = data_unit(header)
    if unit.replace(' ', '').endswith(('/s', 's-1', 's^-1', '/sec')):
        raise UserError(f"{path}: its unit '{unit}' is already per second; leave out "
                        f"--exposure_normalise")
    if not header.get('EXPTIME') or float(header['EXPTIME']) <= 0:
        raise UserError(f'{path}: no positive EXPTIME card for --exposure_normalise')
    return float(header['EXPTIME'])


def prepared_header(source, plane, radius_arcsec, unit, history):
    """The source's cards that still hold (date, observer, instrument, comments and history)
    with the plane's WCS, RSUN_OBS and BUNIT of the prepared map, and a `history` line."""
    header = fits.Header()
    for card in source.cards:
        if card.keyword and not STALE_CARD.fullmatch(card.keyword) and \
                card.keyword not in ('HISTORY', 'COMMENT', ''):
            header[card.keyword] = (card.value, card.comment)
    header.update(plane)
    header['RSUN_OBS'] = (radius_arcsec, '[arcsec] angular radius of the Sun')
    header['BUNIT'] = unit
    for value in source.get('COMMENT', []):
        header.add_comment(value)
    for value in source.get('HISTORY', []):
        header.add_history(value)
    header.add_history(history)
    return header


def prepare_map(path, opt, normalise=False):
    """(float32 size x size data, header) of one map, prepared as the module says."""
    header, data = read_map(path)
    source_wcs, radius = map_geometry(header, path)
    plane = plane_cards(opt.size, radius / opt.disk_radius_px)
    image = resample(data, *source_pixels(source_wcs, plane, opt.size), opt.order)
    unit = data_unit(header)
    if normalise:
        image /= exposure(header, path)
        unit = f'{unit} / s'
    if opt.mask_limb is not None:
        mask_limb(image, opt.mask_limb, opt.disk_radius_px)
    history = (f'prepare_pairs.py: {os.path.basename(path)} rotated north up, disk centred '
               f'with radius {opt.disk_radius_px:g} px (order {opt.order})' +
               (', divided by EXPTIME' if normalise else '') +
               (f', NaN beyond {opt.mask_limb:g} R_sun' if opt.mask_limb is not None else ''))
    return image.astype(np.float32), prepared_header(header, plane, radius, unit, history)


def passband_name(header, folder):
    """A passband's name from its cards ('SDO/AIA 171 angstrom'), else its folder's."""
    parts = [str(header.get(key, '')).strip() for key in ('TELESCOP', 'WAVELNTH', 'WAVEUNIT')]
    return ' '.join(part for part in parts if part) or os.path.basename(os.path.normpath(folder))


def cube_header(headers, folders):
    """The header of a C x H x W input cube: the first channel's, its image plane the FITS
    axes 1 and 2, and a third axis CHANNEL whose world coordinate is the channel index 0, 1,
    ... (a linear axis cannot hold passbands such as 171, 193 and 304 A), each named by a
    CHANn card (n = index + 1) and timed by CHDATEn."""
    header = headers[0].copy()
    for key in PASSBAND_CARDS:
        header.remove(key, ignore_missing=True, remove_all=True)
    header['WCSAXES'] = 3
    for key, value in (('CTYPE3', 'CHANNEL'), ('CNAME3', 'passband'), ('CRPIX3', 1.0),
                       ('CRVAL3', 0.0), ('CDELT3', 1.0)):
        header[key] = value
    for n, (channel, folder) in enumerate(zip(headers, folders, strict=True), start=1):
        header[f'CHAN{n}'] = (passband_name(channel, folder), f'channel index {n - 1}')
        header[f'CHDATE{n}'] = (str(channel.get('DATE-OBS', channel.get('T_OBS', ''))),
                                f'time of channel {n - 1}')
    return header


def write_fits(path, data, header):
    """Write to a temporary name, then rename: an interrupted run leaves no truncated file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + '.part'
    fits.PrimaryHDU(data, header=header).writeto(temporary, overwrite=True)
    os.replace(temporary, path)


def write_pair(pair, opt):
    """Prepare and write one pair's target and input (a cube with several --input_dir)."""
    folder = os.path.join(opt.output_dir, pair.split)
    target, target_header = prepare_map(pair.target.path, opt)
    maps = [prepare_map(o.path, opt, opt.exposure_normalise) for o in pair.inputs]
    if len(maps) == 1:
        image, header = maps[0]
    else:
        image = np.stack([data for data, _ in maps])
        header = cube_header([h for _, h in maps], opt.input_dir)
    write_fits(os.path.join(folder, 'Target', pair.name + '.fits'), target, target_header)
    write_fits(os.path.join(folder, 'Input', pair.name + '.fits'), image, header)


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def check_output_dir(output_dir):
    """Refuse a folder that already holds prepared pairs: they are never overwritten."""
    held = [name for name in ('pairs.csv', 'Train', 'Test')
            if os.path.exists(os.path.join(output_dir, name))]
    if held:
        raise UserError(f'--output_dir {output_dir} already holds prepared pairs ({held[0]}); '
                        f'give a new folder or remove it')


def check_geometry(pairs, opt):
    """Before anything is written: every paired file has the cards its preparation needs."""
    for pair in pairs:
        map_geometry(read_header(pair.target.path), pair.target.path)
        for o in pair.inputs:
            header = read_header(o.path)
            map_geometry(header, o.path)
            if opt.exposure_normalise:
                exposure(header, o.path)


def csv_rows(pairs, skipped):
    def when(o):
        return o.time.isoformat(timespec='milliseconds')
    for pair in pairs:
        yield {'split': pair.split, 'name': pair.name, 'target_file': pair.target.path,
               'target_time': when(pair.target),
               'input_files': ';'.join(o.path for o in pair.inputs),
               'input_times': ';'.join(when(o) for o in pair.inputs),
               'minutes': ';'.join(f'{minutes(o.time, pair.target.time):.3f}'
                                   for o in pair.inputs),
               'reason': pair.note}
    for s in sorted(skipped, key=lambda s: (s.role, s.observation.time)):
        file, time = ('target_file', 'target_time') if s.role == 'target' else \
            ('input_files', 'input_times')
        yield {'split': 'skipped', 'name': '', file: s.observation.path,
               time: when(s.observation), 'reason': f'{s.role}: {s.detail}'}


def write_pairs_csv(path, pairs, skipped):
    """Every pair (both times, input minus target in minutes, its split) and every skipped
    file with the reason; several inputs' files, times and minutes are joined by ';'."""
    columns = ['split', 'name', 'target_file', 'target_time', 'input_files', 'input_times',
               'minutes', 'reason']
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.part', 'w', newline='') as f:
        writer = csv.DictWriter(f, columns, restval='')
        writer.writeheader()
        writer.writerows(csv_rows(pairs, skipped))
    os.replace(path + '.part', path)


def summary(pairs, skipped, opt):
    count = {split: sum(p.split == split for p in pairs) for split in ('Train', 'Test', 'dropped')}
    reasons = {}
    for s in skipped:
        if s.reason != 'unused':
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
    unused = len(skipped) - sum(reasons.values())
    gap = f', dropped {count["dropped"]} within --gap_days {opt.gap_days:g}' if opt.gap_days \
        else ''
    skips = ', '.join(f'{n} {reason}' for reason, n in sorted(reasons.items())) or 'none'
    return (f'{len(pairs)} pairs (train {count["Train"]}, test {count["Test"]}{gap}); skipped '
            f'{sum(reasons.values())} ({skips}); {unused} input files unused; see '
            f'{os.path.join(opt.output_dir, "pairs.csv")}')


def main(argv=None):
    opt = parse(argv)
    check_output_dir(opt.output_dir)
    targets = scan(opt.target_dir, '--target_dir')
    inputs = [scan(folder, '--input_dir') for folder in opt.input_dir]
    pairs, skipped = match(targets, inputs, opt.input_dir, opt)
    split(pairs, set(opt.test_months), opt.gap_days)
    kept = [pair for pair in pairs if pair.split != 'dropped']
    if not kept:  # nothing written: a corrected rerun into the same folder is not refused
        raise UserError(no_pair_reason(pairs, skipped, opt))
    check_geometry(pairs, opt)
    for done, pair in enumerate(kept, start=1):
        write_pair(pair, opt)
        if done % 100 == 0:
            print(f'prepared {done} of {len(kept)} pairs', flush=True)
    write_pairs_csv(os.path.join(opt.output_dir, 'pairs.csv'), pairs, skipped)
    print(summary(pairs, skipped, opt))
    return 0


def no_pair_reason(pairs, skipped, opt):
    """The one line of a run that found no pair to write: why, with the commonest reasons
    for skipping files and an example of each."""
    if pairs:
        return (f'every one of the {len(pairs)} pairs lies within --gap_days {opt.gap_days:g} '
                f'of a --test_months month, so none was written; lower --gap_days')
    reasons = {}
    for s in skipped:
        reasons.setdefault(f'{s.role}: {s.reason}', []).append(s)
    common = sorted(reasons.items(), key=lambda item: -len(item[1]))[:3]
    why = '; '.join(f'{len(files)} {reason} (e.g. {os.path.basename(files[0].observation.path)}'
                    f'{": " + files[0].detail if files[0].detail else ""})'
                    for reason, files in common)
    return (f'no target in {opt.target_dir} has a partner in every --input_dir, so nothing was '
            f'written{": " + why if why else ""}')


if __name__ == '__main__':
    sys.exit(run_main(main))
