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
from pix2pixCC_Options import UserError
from machinery.data_checks import check_pairing
from machinery.data_profile import angular_radius, pixel_angle


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


class SumNames(NamedTuple):
    """How one kind of data names its four full-resolution sums: their keys (sum|real|,
    sum|generated|, sum(real), sum(generated)) and the table's headings of the two pairs."""
    keys: tuple
    headings: tuple


# The sums of a magnetic field (or flux) map are magnetic fluxes; these keys are those of
# every record made before other units were named, and stay.
FLUX_SUMS = SumNames(FLUX_METRICS, ('unsigned flux', 'net flux'))
# The sums of any other quantity (an EUV image's DN/s, a temperature) are no flux.
VALUE_SUMS = SumNames(('sum_abs_real', 'sum_abs_fake', 'sum_real', 'sum_fake'),
                      ('sum of |value|', 'sum of values'))


def parsed_unit(unit):
    """astropy's reading of a unit string (a BUNIT or --target_unit), or None: no unit, or
    one astropy cannot read."""
    if not unit:
        return None
    try:
        parsed = u.Unit(str(unit).strip(), parse_strict='silent')
    except (ValueError, TypeError):
        return None
    return None if isinstance(parsed, u.UnrecognizedUnit) else parsed


def unit_label(unit):
    """How every label (the panels' colour bars, the tables, the notices) writes `unit`:
    astropy's generic format, so that one unit reads the same whichever file or option it
    came from ('DN/s' of an input's BUNIT and 'DN s-1' of a target's are both 'DN / s');
    a string astropy cannot read, as it is; None for no unit."""
    if not unit:
        return None
    parsed = parsed_unit(unit)
    return str(unit).strip() if parsed is None else parsed.to_string()


def pixel_sum_label(label):
    """The unit of a sum over pixels of values in `label` (a `unit_label`): 'G px', and
    '(DN / s) px' for a quotient, which 'DN / s px' would leave ambiguous."""
    return f'({label}) px' if '/' in label else f'{label} px'


def is_magnetic(unit):
    """Whether `unit` measures a magnetic field (G, kG, T, Mx/cm2) or flux (Mx, Wb)."""
    parsed = parsed_unit(unit)
    return parsed is not None and (parsed.is_equivalent(u.G) or parsed.is_equivalent(u.Mx))


def sum_names(unit):
    """The names of the sums of maps in `unit`: FLUX_SUMS for a magnetic unit and for an
    unknown one (npy or png targets without --target_unit, mostly magnetograms, keep the
    names their records have), VALUE_SUMS for any other (DN/s, K, ...)."""
    return VALUE_SUMS if unit and not is_magnetic(unit) else FLUX_SUMS


class TargetPixel(NamedTuple):
    """What the full-resolution sums need of a target's pixels: their unit (a BUNIT or
    --target_unit; None when unknown), which names the sums (`sum_names`), and, for a map in
    gauss, their area on the Sun in cm^2 (the flux in Mx too), else None."""
    unit: str | None = None
    area_cm2: float | None = None


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


def sum_metrics(r, f, pixel=None):
    """sum|x| and sum(x) of the (finite) full-resolution values r, f, in their unit times
    pixels, named by the `pixel`'s unit (`sum_names`: the unsigned and net flux of a
    magnetogram); with the `pixel`'s area in cm^2 (a map in gauss), the same in Mx (the same
    keys with `_Mx`: G cm^2 = Mx)."""
    pixel = pixel or TargetPixel()
    names = sum_names(pixel.unit).keys
    if r.size < 2:
        sums = dict.fromkeys(names, math.nan)
    else:
        sums = dict(zip(names, (float(np.abs(r).sum()), float(np.abs(f).sum()),
                                float(r.sum()), float(f.sum())), strict=True))
    if pixel.area_cm2 is not None:
        sums.update({f'{key}_Mx': value * pixel.area_cm2 for key, value in list(sums.items())})
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


def target_pixel_area(opt, dataset, index):
    """The TargetPixel of target `index` of `dataset`: the targets' unit and, when that is
    the gauss and the target has a FITS header (the dataset's `headers`), its pixel area in
    cm^2 (`pixel_area_cm2`; None otherwise): flux in Mx only where the unit and the area are
    known."""
    unit = data_unit(opt)
    headers = dataset.headers('target', index) if is_gauss(unit) else None
    if not headers:
        return TargetPixel(unit)
    return TargetPixel(unit, pixel_area_cm2(headers[0]))


def image_metrics(real, fake, bins, disk=None, fraction=0.98, threshold=None, pixel=None):
    """Metrics of one generated map against its target, both C x H x W in physical units.

    For every channel c and binning factor k: Pearson CC, concordance CC (the Inspector's own
    `correlation`), RMSE and MAE; at full resolution sum|x| and sum(x) of real and generated
    data, named by the unit of the TargetPixel `pixel` (the unsigned and net flux of a
    magnetogram), and with its area (cm^2) of a map in gauss the same in Mx
    (`sum_metrics`). Pixels where the target is not finite are left
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
                    sum_metrics(r[keep], f[keep], pixel)
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
    channel), then sum|x| and sum(x) of real and generated data per channel (the unsigned and
    net flux of a magnetogram, `sum_names`); with regions (disk, active, quiet), one block of
    rows per region under its title. A line under each header gives the units (`unit`, e.g.
    'G', written by `unit_label`; a sum is over pixels)."""
    names = sum_names(unit)
    label = unit_label(unit) or 'target units'
    first = 'ch0_' if channels > 1 else ''
    regions = [region for region in REGION_TITLES if f'{first}{region}{names.keys[2]}' in summary]

    def title(region):
        return [f'{REGION_TITLES[region]}:'] if len(regions) > 1 else []

    width = max(11, len(label) + 2)  # a long unit (0.001 G km / s) widens its columns
    lines = [f"{'channel':>7} {'bin':>5} {'CC':>7} {'CCC':>7} {'RMSE':>{width}} "
             f"{'MAE':>{width}}",
             f"{'':>29} {f'[{label}]':>{width}} {f'[{label}]':>{width}}"]
    for region in regions:
        lines += title(region)
        for c in range(channels):
            prefix = f'ch{c}_' if channels > 1 else ''
            for k in bins:
                cc, ccc, rmse, mae = (summary[f'{prefix}{region}{name}_{k}x{k}']['mean']
                                      for name in BINNED_METRICS)
                lines.append(f"{c:>7} {f'{k}x{k}':>5} {cc:7.4f} {ccc:7.4f} {rmse:{width}.4g} "
                             f"{mae:{width}.4g}")
    lines += sums_table(summary, regions, channels, names, '', f'[{pixel_sum_label(label)}]',
                        title)
    if f'{first}{names.keys[2]}_Mx' in summary:
        lines += sums_table(summary, regions, channels, names, '_Mx', '[Mx]', title)
    return '\n'.join(lines)


def sums_table(summary, regions, channels, names, suffix, unit, title):
    """The lines of the table of the sums `names` (SumNames) ending in `suffix` ('' in the
    target's unit times pixels, '_Mx' in Mx), with `unit` under each column."""
    width = max(13, len(unit))
    lines = ['', f"{'channel':>7} " + ' '.join(f'{heading:^{2 * width + 1}}'
                                               for heading in names.headings),
             f"{'':>7} " + ' '.join(f'{name:>{width}}' for name in ('real', 'generated') * 2),
             f"{'':>7} " + ' '.join(f'{unit:>{width}}' for _ in range(4))]
    for region in regions:
        lines += title(region)
        for c in range(channels):
            prefix = f'ch{c}_' if channels > 1 else ''
            values = [summary.get(f'{prefix}{region}{name}{suffix}', {'mean': math.nan})['mean']
                      for name in names.keys]
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
    target's cards (`header_disks`). Targets without a disk get whole-frame metrics only,
    and one line says so (never a guessed disk); with --active_threshold, one line per
    region that is empty in some targets says why (`empty_region_notices`)."""
    if dataset.target_paths is None:
        return None
    if opt.disk_radius_px is not None:
        disks = [Disk(*opt.disk_center_px, opt.disk_radius_px)] * len(dataset.target_paths)
    else:
        disks = header_disks(dataset, opt, log)
    for line in empty_region_notices(dataset, opt, disks):
        log(line)
    return disks


def header_disks(dataset, opt, log):
    """The Disk of each target from its FITS cards (`disk_from_header`; None for other
    formats), with one line on those that have none."""
    headers = (dataset.headers('target', index) for index in range(len(dataset)))
    found = [disk_from_header(header[0]) if header else
             (None, f'{opt.data_format_target} files have no FITS cards') for header in headers]
    missing = [(path, reason) for path, (disk, reason) in zip(dataset.target_paths, found,
                                                              strict=True) if disk is None]
    if missing:
        path, reason = missing[0]
        log(f"notice: no solar disk in {len(missing)} of {len(found)} target file(s) "
            f"({os.path.basename(path)}: {reason}), so no disk_/active_/quiet_ metrics for "
            f"them; give --disk_center_px X Y --disk_radius_px R to set it in pixels")
    return [disk for disk, _ in found]


def empty_region_notices(dataset, opt, disks):
    """With --active_threshold, one line for each region (active, quiet) and channel that
    holds fewer than 2 pixels (so NaN metrics) in some targets whose disk holds more: in how
    many files, and how the first one's on-disk values lie against the threshold. A threshold
    in another unit than the targets' (100, meant as G, on an EUV image in DN/s) empties the
    quiet region of every file, and its rows would otherwise be NaN without a word.

    The regions are the targets' own, whatever the generator, so this is said once per run,
    from the targets read here (at full resolution: the sums and the 1x1 metrics)."""
    if opt.active_threshold is None or not disks:
        return []
    sparse = {}  # (region, channel) -> [(file, its on-disk |values|), ...]
    with_disk = [index for index, disk in enumerate(disks) if disk is not None]
    for index in with_disk:
        real = dataset.read_target(index)
        for key, values in sparse_regions(real, disks[index], opt.disk_fraction,
                                          opt.active_threshold).items():
            sparse.setdefault(key, []).append((dataset.target_paths[index], values))
    return [empty_region_notice(region, channel if opt.target_ch > 1 else None, files,
                                len(with_disk), opt.active_threshold, data_unit(opt))
            for (region, channel), files in sparse.items()]


def sparse_regions(real, disk, fraction, threshold):
    """{(region prefix, channel): the finite on-disk |values| of that channel} of the active
    and quiet regions of the target `real` (C x H x W) that hold fewer than 2 pixels while
    its disk holds more."""
    sparse = {}
    for c, channel in enumerate(np.asarray(real, np.float64)):
        masks = region_masks(channel, 1, disk, fraction, threshold)
        finite = np.isfinite(channel)
        if np.count_nonzero(masks['disk_'] & finite) < 2:
            continue
        for region in ('active_', 'quiet_'):
            if np.count_nonzero(masks[region] & finite) < 2:
                sparse[(region, c)] = np.abs(channel[masks['disk_'] & finite])
    return sparse


def empty_region_notice(region, channel, files, total, threshold, unit):
    """The line of `empty_region_notices` on the `region` ('active_' or 'quiet_') of
    `channel` (None with one channel), sparse in `files` ([(path, on-disk |values|)]) of
    the `total` targets with a disk."""
    label = unit_label(unit)
    limit = f"--active_threshold {threshold:g}{f' {label}' if label else ''}"
    path, values = files[0]
    inside = np.count_nonzero(values >= threshold if region == 'active_' else values < threshold)
    name = os.path.basename(path)
    what = (f"the {region[:-1]} region{f' of channel {channel}' if channel is not None else ''}"
            f" (on-disk pixels with |target| {'>=' if region == 'active_' else '<'} {limit})")
    spread = (f"its on-disk |values| lie between {values.min():.4g} and {values.max():.4g}"
              f"{f' {label}' if label else ''}")
    if region == 'active_':
        why = f"{'no' if not inside else 'only one'} on-disk pixel of {name} reaches it"
        advice = ''
    else:
        why = (f"{'every' if not inside else 'all but one'} on-disk pixel of {name} "
               f"{'is' if not inside else 'are'} at or above it")
        advice = ("; for data that are not magnetograms choose a threshold in their unit, or "
                  "leave --active_threshold off")
    return (f"notice: {what} is empty in {len(files)} of {total} target file(s) with a disk, "
            f"so their {region} metrics are NaN: {why} ({spread}){advice}")


def metric_keys(opt, disks):
    """The metric keys of this run's rows: those `image_metrics` gives for its channels, bins,
    regions and unit (on an empty map, so that the names are made in one place)."""
    empty = np.zeros((opt.target_ch, 0, 0))
    disk = Disk(0.0, 0.0, 1.0) if disks and any(disks) else None
    return list(image_metrics(empty, empty, opt.metric_bins, disk, opt.disk_fraction,
                              opt.active_threshold, TargetPixel(data_unit(opt))))


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
    return [dataset.target_size(index) for index in range(len(dataset))]


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
