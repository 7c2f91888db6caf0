"""What a network was trained on, and whether the data it is given look alike (README
"Evaluating a model", Data unlike the training data).

Training records a profile of its data with the run (train_options.json), and so in model
files and in ONNX metadata: per channel of each side the instrument, wavelength and unit that
the FITS headers give and quantiles of the normalised values; per side the image size and,
where the WCS gives them, the Sun's disk radius in pixels and the pixel scale. The Test
script and deploy/onnx_translate.py profile the data they are given the same way and warn in
one line per kind of difference, naming the first file: a model applied to data of another
instrument, unit or scale, or to swapped folders, gives numbers without a word otherwise.
Warnings only: a user may mean it (a model tried on another passband).

Needs numpy and astropy only (deploy/onnx_translate.py runs without torch).
"""
import math

import numpy as np
from astropy import units as u

# The quantiles of a channel's normalised values that describe it: the tails and the middle.
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
# Files read for a profile: the first, the last and evenly spread between; and at most this
# many values of a channel per file (a regular subsample: quantiles need no more).
PROFILE_FILES = 5
VALUES_PER_FILE = 2 ** 18
# Above these, a difference is worth a warning. Quantiles are in the normalised range [-1, 1]
# (2 wide): 0.25 is an eighth of it. The quick start's training and test samples differ by
# at most 0.05, swapped folders or unscaled data by 0.5 and more (README, Data unlike the
# training data). A disk radius or pixel scale 10 % off changes the size of every feature
# the network learnt; image sizes are compared only where no header gives a scale.
QUANTILE_DIFFERENCE = 0.25
SCALE_RATIO = 1.1
SIZE_RATIO = 1.5


def sample_indices(n, k=PROFILE_FILES):
    """Up to `k` of the indices 0..n-1: the first, the last and evenly spread between."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


# ----------------------------------------------------------------------------------------
# What a FITS header says
# ----------------------------------------------------------------------------------------


def angular_radius(header):
    """The Sun's angular radius (an astropy Quantity) from RSUN_OBS (arcsec), or from RSUN_REF
    and DSUN_OBS (m) as arcsin(RSUN_REF / DSUN_OBS); None without them."""
    if header.get('RSUN_OBS'):
        return float(header['RSUN_OBS']) * u.arcsec
    if header.get('RSUN_REF') and header.get('DSUN_OBS'):
        return np.arcsin(float(header['RSUN_REF']) / float(header['DSUN_OBS'])) * u.rad
    return None


def pixel_angle(header, axis):
    """The angle one pixel spans along FITS axis `axis`: |CDELTn| in CUNITn (degrees, the
    FITS default, when CUNITn is absent)."""
    return abs(float(header[f'CDELT{axis}'])) * \
        u.Unit(str(header.get(f'CUNIT{axis}') or 'deg').strip())


def header_unit(header):
    """The data's unit as a FITS header gives it (BUNIT, else AIA's PIXLUNIT), or None."""
    unit = header.get('BUNIT') or header.get('PIXLUNIT')
    return str(unit).strip() if unit else None


def header_facts(header):
    """{instrument, wavelength, unit, disk_radius_px, pixel_scale_arcsec} of a FITS header,
    each None where the header does not say (R_SUN is not used: archive files resampled
    without updating it keep the full-resolution radius)."""
    instrument = header.get('TELESCOP') or header.get('INSTRUME')
    wavelength = header.get('WAVELNTH')
    if isinstance(wavelength, (int, float)) and not isinstance(wavelength, bool) and wavelength:
        wavelength = f"{wavelength:g} {str(header.get('WAVEUNIT') or '').strip()}".strip()
    else:
        wavelength = None
    facts = {'instrument': str(instrument).strip() if instrument else None,
             'wavelength': wavelength, 'unit': header_unit(header),
             'disk_radius_px': None, 'pixel_scale_arcsec': None}
    try:
        scale = pixel_angle(header, 1) if header.get('CDELT1') else None
        radius = angular_radius(header)
        if scale is not None:
            facts['pixel_scale_arcsec'] = float(scale.to_value(u.arcsec))
            if radius is not None:
                facts['disk_radius_px'] = float((radius / scale).decompose())
    except (ValueError, TypeError, u.UnitsError):  # a card this code cannot read says nothing
        pass
    return facts


# ----------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------


def subsample(channel, n=VALUES_PER_FILE):
    """At most about `n` of a channel's values, a regular grid of them."""
    step = max(1, math.isqrt(channel.size // n))
    return channel[::step, ::step].reshape(-1)


def side_profile(samples):
    """The profile of one side (input or target) from `samples`: [(headers, normalised
    C x H x W array)], `headers` one FITS header per channel (a file's for each of its
    channels) or None (formats without cards). Facts come from the first sample, the
    quantiles from all of them."""
    headers, first = samples[0]
    channels = first.shape[0]
    facts = [header_facts(header) if header is not None else None
             for header in (headers or [None] * channels)]
    values = [np.concatenate([subsample(array[c]) for _, array in samples])
              for c in range(channels)]
    per_channel = []
    for c in range(channels):
        finite = values[c][np.isfinite(values[c])]
        quantiles = np.quantile(finite, QUANTILES).round(4).tolist() if finite.size else None
        known = facts[c] or {}
        per_channel.append({key: known.get(key) for key in ('instrument', 'wavelength', 'unit')}
                           | {'has_header': facts[c] is not None, 'quantiles': quantiles})
    geometry = facts[0] or {}
    return {'size': list(first.shape[1:]), 'files': len(samples),
            'disk_radius_px': geometry.get('disk_radius_px'),
            'pixel_scale_arcsec': geometry.get('pixel_scale_arcsec'),
            'channels': per_channel}


def dataset_profile(dataset):
    """{'input': side profile, 'target': side profile (when the dataset has targets)} of a
    CustomDataset, from PROFILE_FILES of its pairs, normalised by its own scaling, with the
    headers its `headers(side, index)` gives."""
    indices = sample_indices(len(dataset))
    sides = {'input': dataset.load_input}
    if dataset.target_paths is not None:
        sides['target'] = dataset.load_target
    return {side: side_profile([(dataset.headers(side, i), load(i)) for i in indices])
            for side, load in sides.items()}


def warn_unlike_training(trained, dataset, log=print):
    """Profile `dataset` and log `profile_differences` from the `trained` profile (nothing
    to compare without one: a run or model file of an older version)."""
    if not trained:
        return
    first = {'input': dataset.input_paths[0]}
    if dataset.target_paths is not None:
        first['target'] = dataset.target_paths[0]
    for line in profile_differences(trained, dataset_profile(dataset), first):
        log(line)


# ----------------------------------------------------------------------------------------
# Differences
# ----------------------------------------------------------------------------------------


def same_unit(a, b):
    """Whether two unit strings name the same unit ('DN/s' and 'DN / s' do)."""
    try:
        return u.Unit(a, parse_strict='silent') == u.Unit(b, parse_strict='silent')
    except (ValueError, TypeError):
        return a.replace(' ', '') == b.replace(' ', '')


def channel_name(side, c, channels):
    return f'{side} channel {c}' if channels > 1 else side


def described(channel):
    """'SDO/AIA 171 angstrom' from a channel's instrument and wavelength."""
    return ' '.join(str(v) for v in (channel['instrument'], channel['wavelength']) if v)


def unit_of(channel):
    return channel['unit'] or 'no unit (no BUNIT)'


def identity_differences(trained, given, side):
    """Per channel, the instrument/wavelength and the unit that differ: [(kind, text)]
    (only for files with headers: other formats say nothing of either)."""
    found = []
    channels = len(given['channels'])
    for c, (was, now) in enumerate(zip(trained['channels'], given['channels'], strict=True)):
        if not now['has_header']:
            continue
        name = channel_name(side, c, channels)
        if described(was) and described(now) and described(was) != described(now):
            found.append(('identity', f"its {name} is {described(now)}, the training data's "
                                      f"{described(was)}"))
        if (was['unit'] or now['unit']) and \
                not (was['unit'] and now['unit'] and same_unit(was['unit'], now['unit'])):
            found.append(('unit', f"its {name} is in {unit_of(now)}, the training data's in "
                                  f"{unit_of(was)}"))
    return found


def scale_differences(trained, given, side):
    """The Sun's size in pixels (or the pixel scale, or without either the image size) that
    differs: [(kind, text)]."""
    def off(a, b):
        return max(a, b) / min(a, b) > SCALE_RATIO

    if trained['disk_radius_px'] and given['disk_radius_px']:
        if off(trained['disk_radius_px'], given['disk_radius_px']):
            return [('scale', f"the Sun's disk in its {side} is {given['disk_radius_px']:.0f} "
                              f"px in radius ({given['pixel_scale_arcsec']:.3g}\"/px), in the "
                              f"training data {trained['disk_radius_px']:.0f} px "
                              f"({trained['pixel_scale_arcsec']:.3g}\"/px)")]
        return []
    if trained['pixel_scale_arcsec'] and given['pixel_scale_arcsec']:
        if off(trained['pixel_scale_arcsec'], given['pixel_scale_arcsec']):
            return [('scale', f"its {side} pixels are {given['pixel_scale_arcsec']:.3g}\", the "
                              f"training data's {trained['pixel_scale_arcsec']:.3g}\"")]
        return []
    if any(off(a, b) and max(a, b) / min(a, b) > SIZE_RATIO
           for a, b in zip(given['size'], trained['size'], strict=True)):
        return [('scale', f"its {side} is {given['size'][0]}x{given['size'][1]} px, the "
                          f"training data {trained['size'][0]}x{trained['size'][1]} px")]
    return []


def value_differences(trained, given, side):
    """The channels whose normalised values are distributed unlike the training data's."""
    def listed(quantiles):
        return ' '.join(f'{value:.2f}' for value in quantiles)

    found = []
    channels = len(given['channels'])
    for c, (was, now) in enumerate(zip(trained['channels'], given['channels'], strict=True)):
        if was['quantiles'] is None or now['quantiles'] is None:
            continue
        if max(abs(a - b) for a, b in zip(was['quantiles'], now['quantiles'], strict=True)) > \
                QUANTILE_DIFFERENCE:
            found.append(('values', f"its {channel_name(side, c, channels)} values, scaled, "
                                    f"have the quantiles {listed(now['quantiles'])}, the "
                                    f"training data's {listed(was['quantiles'])}"))
    return found


KINDS = {  # what differs, and what to do about it
    'identity': ('instrument or passband', 'a model applies to the instrument and passband it '
                                           'learnt'),
    'unit': ('unit', 'prepare the data as the training data were (e.g. '
                     'datasets/prepare_pairs.py --exposure_normalise for DN/s)'),
    'scale': ('pixel scale', "the network learnt features at the training data's pixel "
                             "scale: resample the data to it (datasets/prepare_pairs.py --size "
                             "and --disk_radius_px)"),
    'values': ('values', f"quantiles {'/'.join(f'{100 * q:g}' for q in QUANTILES)} % of the "
                         f"values in [-1, 1] after scaling; swapped input and target folders, "
                         f"another unit or other saturation limits?"),
}


def identities(side):
    """What a side's headers say of each of its channels: [(instrument/wavelength, unit)]."""
    return [(described(channel), channel['unit']) for channel in side['channels']]


def looks_swapped(trained, given):
    """Whether the given input is what the training's targets were and the given target
    what its inputs were, by their headers."""
    if not all(side in trained and side in given and
               all(channel['has_header'] for channel in given[side]['channels'])
               for side in ('input', 'target')):
        return False
    return identities(trained['input']) != identities(trained['target']) and \
        identities(given['input']) == identities(trained['target']) and \
        identities(given['target']) == identities(trained['input'])


def profile_differences(trained, given, first_files):
    """One warning line per kind of difference (KINDS) between the `trained` profile (as
    recorded) and the `given` one, naming the first file of each side that differs;
    `first_files`: {side: path}. [] when there is no recorded profile (a run of an older
    version) or nothing differs."""
    if not trained:
        return []
    if looks_swapped(trained, given):
        return [f"warning: data unlike the training data (swapped): the inputs "
                f"({first_files['input']}, ...) are what the training's targets were and the "
                f"targets what its inputs were; check --input_dir_test and --target_dir_test"]
    by_kind = {}
    for side in ('input', 'target'):
        if side not in trained or side not in given or \
                len(trained[side]['channels']) != len(given[side]['channels']):
            continue
        for check in (identity_differences, scale_differences, value_differences):
            for kind, text in check(trained[side], given[side], side):
                by_kind.setdefault(kind, {}).setdefault(side, []).append(text)
    lines = []
    for kind in KINDS:
        if kind in by_kind:
            title, advice = KINDS[kind]
            texts = '; '.join(f"{first_files[side]}: {', '.join(found)}"
                              for side, found in by_kind[kind].items())
            lines.append(f"warning: data unlike the training data ({title}): {texts}; {advice}")
    return lines
