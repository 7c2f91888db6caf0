"""Evaluation: the numbers a paper reports (README "Evaluating a model"), used by the Test
script and by training's validation: CC, CCC, RMSE and MAE after binning, flux sums, the
solar disk and its active and quiet regions from the target's header, the summary tables,
and the choice of the best iteration.
"""
import math
import os
import re
import warnings
from typing import NamedTuple

import numpy as np
import torch
from astropy import units as u
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from machinery.files import write_csv, write_json
from machinery.products import data_unit
from pix2pixCC_Networks import correlation
from pix2pixCC_Options import FITS_FORMATS, UserError
from machinery.data_checks import check_pairing
from pix2pixCC_Pipeline import read_fits_header, stored_size


def bin_mean(x, k):
    """Mean over non-overlapping k x k blocks of (..., H, W); edges that do not fill a block
    are dropped."""
    if k == 1:
        return x
    h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
    x = x[..., :h, :w]
    return x.reshape(*x.shape[:-2], h // k, k, w // k, k).mean(axis=(-3, -1))


# The metrics at each binning factor (highest CC and CCC, lowest RMSE and MAE are best), and
# those of the full-resolution maps.
BINNED_METRICS = ('cc', 'ccc', 'rmse', 'mae')


LOWER_IS_BETTER = ('rmse', 'mae')


FLUX_METRICS = ('flux_unsigned_real', 'flux_unsigned_fake', 'flux_net_real', 'flux_net_fake')


def binned_metrics(r, f, k):
    """CC, CCC, RMSE and MAE of the (finite) values r, f at binning k; NaN for fewer than 2
    values (a region that holds no data)."""
    if r.size < 2:
        return {f'{name}_{k}x{k}': math.nan for name in BINNED_METRICS}
    r, f = torch.from_numpy(r)[None], torch.from_numpy(f)[None]
    return {f'cc_{k}x{k}': float(correlation(r, f, ccc=False, eps=0)[0]),
            f'ccc_{k}x{k}': float(correlation(r, f, ccc=True, eps=0)[0]),
            f'rmse_{k}x{k}': float(torch.sqrt(((r - f) ** 2).mean())),
            f'mae_{k}x{k}': float((r - f).abs().mean())}


def flux_metrics(r, f, pixel_area=None):
    """The unsigned and net flux of the (finite) full-resolution values r, f, in their unit
    times pixels and, with the `pixel_area` in cm^2 of a map in gauss, in Mx (the same keys
    with `_Mx`: G cm^2 = Mx)."""
    if r.size < 2:
        sums = dict.fromkeys(FLUX_METRICS, math.nan)
    else:
        sums = {'flux_unsigned_real': float(np.abs(r).sum()),
                'flux_unsigned_fake': float(np.abs(f).sum()),
                'flux_net_real': float(r.sum()), 'flux_net_fake': float(f.sum())}
    if pixel_area is not None:
        sums.update({f'{key}_Mx': value * pixel_area for key, value in list(sums.items())})
    return sums


def is_gauss(unit):
    """Whether `unit` (a BUNIT or --target_unit) is the gauss, whose flux is in Mx."""
    return bool(unit) and u.Unit(unit, parse_strict='silent') == u.G


def pixel_area_cm2(header):
    """The area in cm^2 that one pixel of a FITS map spans on the Sun at the disk centre,
    (DSUN_OBS tan CDELT1) (DSUN_OBS tan CDELT2) with CDELTn in CUNITn (degrees if absent),
    or None without DSUN_OBS, CDELT1 and CDELT2 (README "Evaluating a model")."""
    if not all(header.get(key) for key in ('DSUN_OBS', 'CDELT1', 'CDELT2')):
        return None
    distance = float(header['DSUN_OBS']) * u.m
    sides = [distance * np.tan(pixel_angle(header, axis)) for axis in (1, 2)]
    return float((sides[0] * sides[1]).to_value(u.cm ** 2))


def pixel_angle(header, axis):
    """The angle one pixel spans along FITS axis `axis`: |CDELTn| in CUNITn (degrees, the
    FITS default, when CUNITn is absent)."""
    return abs(float(header[f'CDELT{axis}'])) * \
        u.Unit(str(header.get(f'CUNIT{axis}', 'deg')).strip())


def target_pixel_area(opt, path):
    """The pixel area in cm^2 of the FITS target `path` (`pixel_area_cm2`) when the targets
    are in gauss, else None: flux in Mx only where the unit and the area are known."""
    if opt.data_format_target not in FITS_FORMATS or not is_gauss(data_unit(opt)):
        return None
    return pixel_area_cm2(read_fits_header(path))


def image_metrics(real, fake, bins, disk=None, fraction=0.98, threshold=None, pixel_area=None):
    """Metrics of one generated map against its target, both C x H x W in physical units.

    For every channel c and binning factor k: Pearson CC, concordance CC (the Inspector's own
    `correlation`), RMSE and MAE; at full resolution the total unsigned flux sum|x| and the net
    flux sum(x) of real and generated data, and with the `pixel_area` (cm^2) of a map in
    gauss the same in Mx (`flux_metrics`). Pixels where the target is not finite are left
    out. Keys: `cc_8x8`, `rmse_1x1`, `flux_net_real`, ... for the whole frame and, with a
    `disk`, the same again for each region of `region_masks` with the region first
    (`disk_cc_8x8`, `active_rmse_1x1`, `quiet_flux_net_real`); several channels prefix every
    key with `ch<c>_` (`ch0_cc_8x8`, `ch0_disk_cc_8x8`).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    row = {}
    for c in range(real.shape[0]):
        channel = f'ch{c}_' if real.shape[0] > 1 else ''
        by_region = {}  # region prefix -> its metrics, in the order of the keys
        for k in (*bins, None):  # None: the full-resolution flux
            r, f = bin_mean(real[c], k or 1), bin_mean(fake[c], k or 1)
            finite = np.isfinite(r) & np.isfinite(f)
            for region, mask in region_masks(r, k or 1, disk, fraction, threshold).items():
                keep = finite & mask
                metrics = binned_metrics(r[keep], f[keep], k) if k else \
                    flux_metrics(r[keep], f[keep], pixel_area)
                by_region.setdefault(region, {}).update(metrics)
        for region, metrics in by_region.items():
            row.update({f'{channel}{region}{key}': value for key, value in metrics.items()})
    return row


def summarize(rows):
    """{metric: {'mean', 'std', 'median'}} over the rows' numeric columns (NaN ignored)."""
    summary = {}
    for key in rows[0]:
        values = np.array([row[key] for row in rows], dtype=object)
        if not all(isinstance(v, (int, float)) for v in values):
            continue
        values = values.astype(np.float64)
        with warnings.catch_warnings():  # (a column of NaN only: a region empty everywhere)
            warnings.simplefilter('ignore', RuntimeWarning)
            summary[key] = {'mean': float(np.nanmean(values)), 'std': float(np.nanstd(values)),
                            'median': float(np.nanmedian(values))}
    return summary


# How the printed tables name each region (README "Evaluating a model").
REGION_TITLES = {'': 'whole frame', 'disk_': 'disk', 'active_': 'active (on disk)',
                 'quiet_': 'quiet (on disk)'}


def metrics_table(summary, bins, channels=1, unit=None):
    """Two short text tables of the means: CC, CCC, RMSE, MAE per binning factor (and
    channel), then the unsigned and net flux of real and generated data per channel; with
    regions (disk, active, quiet), one block of rows per region under its title. A line
    under each header gives the units (`unit`, e.g. 'G'; flux is a sum over pixels)."""
    unit = unit or 'target units'
    first = 'ch0_' if channels > 1 else ''
    regions = [region for region in REGION_TITLES if f'{first}{region}flux_net_real' in summary]

    def title(region):
        return [f'{REGION_TITLES[region]}:'] if len(regions) > 1 else []

    width = max(11, len(unit) + 2)  # a long unit (10**-3 G) widens its columns
    lines = [f"{'channel':>7} {'bin':>5} {'CC':>7} {'CCC':>7} {'RMSE':>{width}} "
             f"{'MAE':>{width}}",
             f"{'':>29} {f'[{unit}]':>{width}} {f'[{unit}]':>{width}}"]
    for region in regions:
        lines += title(region)
        for c in range(channels):
            prefix = f'ch{c}_' if channels > 1 else ''
            for k in bins:
                cc, ccc, rmse, mae = (summary[f'{prefix}{region}{name}_{k}x{k}']['mean']
                                      for name in BINNED_METRICS)
                lines.append(f"{c:>7} {f'{k}x{k}':>5} {cc:7.4f} {ccc:7.4f} {rmse:{width}.4g} "
                             f"{mae:{width}.4g}")
    lines += flux_table(summary, regions, channels, '', f'[{unit} px]', title)
    if f'{first}flux_net_real_Mx' in summary:
        lines += flux_table(summary, regions, channels, '_Mx', '[Mx]', title)
    return '\n'.join(lines)


def flux_table(summary, regions, channels, suffix, unit, title):
    """The lines of the unsigned and net flux table of the flux keys ending in `suffix`
    ('' in the target's unit times pixels, '_Mx' in Mx), with `unit` under each column."""
    width = max(13, len(unit))
    lines = ['', f"{'channel':>7} {'unsigned flux':^{2 * width + 1}} "
                 f"{'net flux':^{2 * width + 1}}",
             f"{'':>7} " + ' '.join(f'{name:>{width}}' for name in ('real', 'generated') * 2),
             f"{'':>7} " + ' '.join(f'{unit:>{width}}' for _ in range(4))]
    for region in regions:
        lines += title(region)
        for c in range(channels):
            prefix = f'ch{c}_' if channels > 1 else ''
            values = [summary.get(f'{prefix}{region}{name}{suffix}', {'mean': math.nan})['mean']
                      for name in FLUX_METRICS]
            lines.append(f"{c:>7} " + ' '.join(f'{v:{width}.5g}' for v in values))
    return lines


def selectable_metrics(keys):
    """The keys of `keys` that can pick a best iteration: CC, CCC, RMSE and MAE at a binning
    (of any channel and region)."""
    return [key for key in keys if re.search(rf"(^|_)({'|'.join(BINNED_METRICS)})_\d+x\d+$",
                                             key)]


def selection_key(opt, keys):
    """The metric that picks the best iteration: --select_metric, by default the CC at the
    coarsest binning of the first channel (cc_8x8). UserError for a key that is not among
    `keys` (the columns of this run's metrics), listing those that are."""
    default = f"{'ch0_' if opt.target_ch > 1 else ''}cc_{max(opt.metric_bins)}x" \
              f"{max(opt.metric_bins)}"
    key = opt.select_metric or default
    available = selectable_metrics(keys)
    if key not in available:
        raise UserError(f"--select_metric {key} is not a metric of this run; available: "
                        f"{', '.join(available)}")
    return key


def best_iteration(by_iteration, key):
    """The iteration with the best mean `key` (highest CC and CCC, lowest RMSE and MAE; an
    iteration where it is NaN never wins unless all are)."""
    sign = -1 if re.search(rf"({'|'.join(LOWER_IS_BETTER)})_\d+x\d+$", key) else 1

    def score(row):
        return sign * row[key] if math.isfinite(row[key]) else -math.inf

    best = max(by_iteration, key=score)
    return best['iteration'], key, best[key]


# A CC over fewer points than this per image is a coarse judge: 8x8 bins of a 64x64 image
# leave 64, and a few bins decide the best iteration (README "Evaluating a model").
FEW_POINTS = 256


BINNED_KEY = re.compile(rf"^(?P<prefix>.*?)(?P<name>{'|'.join(BINNED_METRICS)})_(?P<k>\d+)x\d+$")


def full_resolution_key(key):
    """The CC at full resolution (cc_1x1) of the channel and region of the metric `key`."""
    return BINNED_KEY.match(key)['prefix'] + 'cc_1x1'


def coarse_binning_note(key, sizes):
    """A note when the metric `key` rests on fewer than FEW_POINTS bins per image of the
    smallest of `sizes` ((height, width) of the targets), else None; a region key (disk_...)
    has at most the frame's bins."""
    parts = BINNED_KEY.match(key)
    k = int(parts['k'])
    height, width = min(sizes, key=lambda size: size[0] * size[1])
    points = (height // k) * (width // k)
    if points >= FEW_POINTS:
        return None
    bound = 'at most ' if re.search(r'(disk|active|quiet)_$', parts['prefix']) else ''
    return (f"note: {key} rests on {bound}{points} points per image ({k}x{k} bins of "
            f"{height}x{width}); compare with the full-resolution line")


class Disk(NamedTuple):
    """The solar disk in a target's pixels: its centre (x the column, y the row, counted from
    0 with pixel centres at integers) and its radius."""
    x: float
    y: float
    radius: float


def region_masks(binned_real, k, disk, fraction, threshold):
    """{key prefix: boolean mask} of the regions of a real map binned by k: the whole frame
    (''), and with a `disk` the bins whose centre lies within `fraction` of its radius
    ('disk_'); with a `threshold` too, those of them whose binned |real| >= threshold
    ('active_') and the rest ('quiet_'). The region is decided on the binned target, so
    that each bin is in one region at every k."""
    masks = {'': np.ones(binned_real.shape, bool)}
    if disk is None:
        return masks
    # The centre of bin (i, j) in full-resolution pixel coordinates.
    rows = np.arange(binned_real.shape[0]) * k + (k - 1) / 2
    columns = np.arange(binned_real.shape[1]) * k + (k - 1) / 2
    on_disk = np.hypot(columns[None, :] - disk.x, rows[:, None] - disk.y) <= \
        fraction * disk.radius
    masks['disk_'] = on_disk
    if threshold is not None:
        with np.errstate(invalid='ignore'):  # (NaN targets: left out later anyway)
            active = on_disk & (np.abs(binned_real) >= threshold)
        masks.update(active_=active, quiet_=on_disk & ~active)
    return masks


def angular_radius(header):
    """The Sun's angular radius (an astropy Quantity) from RSUN_OBS (arcsec), or from RSUN_REF
    and DSUN_OBS (m) as arcsin(RSUN_REF / DSUN_OBS); None without them."""
    if 'RSUN_OBS' in header:
        return float(header['RSUN_OBS']) * u.arcsec
    if 'RSUN_REF' in header and 'DSUN_OBS' in header:
        return np.arcsin(float(header['RSUN_REF']) / float(header['DSUN_OBS'])) * u.rad
    return None


def disk_from_header(header):
    """(Disk, None) from a FITS target's cards, or (None, what is missing): the centre is the
    pixel of helioprojective (0", 0") by the file's WCS, the radius the angular radius /
    |CDELT1| (in CUNIT1, degrees by default)."""
    types = (str(header.get('CTYPE1', '')), str(header.get('CTYPE2', '')))
    if not (types[0].startswith('HPLN') and types[1].startswith('HPLT')):
        return None, 'no helioprojective WCS (CTYPE1/CTYPE2 HPLN/HPLT)'
    radius = angular_radius(header)
    if radius is None:
        return None, 'no RSUN_OBS, nor RSUN_REF with DSUN_OBS'
    if not header.get('CDELT1'):
        return None, 'no CDELT1'
    with warnings.catch_warnings():  # (astropy's notes on cards it fixes, e.g. DATE-OBS)
        warnings.simplefilter('ignore', AstropyWarning)
        wcs = WCS(header).celestial
        x, y = wcs.all_world2pix(0.0, 0.0, 0)  # 0 is the same angle in every unit
    return Disk(float(x), float(y), float((radius / pixel_angle(header, 1)).decompose())), None


def target_disks(dataset, opt, log=print):
    """The Disk of each target of `dataset` (None where there is none), or None without
    targets: --disk_center_px/--disk_radius_px for every file when given, else each FITS
    target's cards (`disk_from_header`). Targets without a disk get whole-frame metrics only,
    and one line says so (never a guessed disk)."""
    if dataset.target_paths is None:
        return None
    if opt.disk_radius_px is not None:
        return [Disk(*opt.disk_center_px, opt.disk_radius_px)] * len(dataset.target_paths)
    if opt.data_format_target in FITS_FORMATS:
        found = [disk_from_header(read_fits_header(path)) for path in dataset.target_paths]
    else:
        found = [(None, f'{opt.data_format_target} files have no FITS cards')] * \
            len(dataset.target_paths)
    missing = [(path, reason) for path, (disk, reason) in zip(dataset.target_paths, found,
                                                              strict=True) if disk is None]
    if missing:
        path, reason = missing[0]
        log(f"notice: no solar disk in {len(missing)} of {len(found)} target file(s) "
            f"({os.path.basename(path)}: {reason}), so no disk_/active_/quiet_ metrics for "
            f"them; give --disk_center_px X Y --disk_radius_px R to set it in pixels")
    return [disk for disk, _ in found]


def metric_keys(opt, disks):
    """The metric keys of this run's rows: those `image_metrics` gives for its channels, bins
    and regions (on an empty map, so that the names are made in one place)."""
    empty = np.zeros((opt.target_ch, 0, 0))
    disk = Disk(0.0, 0.0, 1.0) if disks and any(disks) else None
    return list(image_metrics(empty, empty, opt.metric_bins, disk, opt.disk_fraction,
                              opt.active_threshold))


def aligned(rows):
    """Every row with the columns of the fullest (NaN where a file has no disk), so that the
    files and the means have the same columns."""
    fullest = max((list(row) for row in rows), key=len, default=[])
    # (then the keys of other rows that it lacks: a target may have a pixel area, for flux
    # in Mx, and no disk)
    columns = list(dict.fromkeys(fullest + [key for row in rows for key in row]))
    return [{key: row.get(key, math.nan) for key in columns} for row in rows]


def check_test_pairs(dataset, opt):
    """With targets: the pairing by names (unless --check_pairing False) and every pair's
    size, from the names and the files' headers, so that a problem stops the run before
    its first output."""
    if dataset.target_paths is None:
        return
    if opt.check_pairing:
        check_pairing(dataset.input_paths, dataset.target_paths)
    dataset.check_sizes()


def target_sizes(dataset, opt):
    """The (height, width) of every target, from the files' headers."""
    return [stored_size(path, opt.data_format_target, opt.target_ch)
            for path in dataset.target_paths]


def write_metrics(rows, folder, iteration, opt):
    """metrics.csv and metrics_summary.json of one generator, and their table on the
    screen; returns the row of metrics_by_iteration.csv (the means)."""
    summary = summarize(rows)
    write_csv(os.path.join(folder, 'metrics.csv'), rows)
    write_json(os.path.join(folder, 'metrics_summary.json'), summary)
    print(metrics_table(summary, opt.metric_bins, opt.target_ch, data_unit(opt)))
    return {'iteration': iteration, **{key: value['mean'] for key, value in summary.items()}}


def write_best_iteration(by_iteration, folder, key, sizes):
    """metrics_by_iteration.csv of a --iteration -1 run, and which generator was best by
    the metric `key` (`selection_key`) and by the full-resolution CC of its channel and
    region, with a note when `key` rests on few points per image (`coarse_binning_note`;
    sizes: the targets' (height, width))."""
    path = os.path.join(folder, 'metrics_by_iteration.csv')
    write_csv(path, by_iteration)
    iteration, key, value = best_iteration(by_iteration, key)
    print(f"best iteration by mean {key}: {iteration} ({value:.4f}); all in {path}")
    note = coarse_binning_note(key, sizes)
    if note:
        print(note)
    full = full_resolution_key(key)
    if full != key and full in by_iteration[0]:
        iteration, _, value = best_iteration(by_iteration, full)
        print(f"best iteration by mean {full}: {iteration} ({value:.4f})")
