"""Figures: comparison panels (input | real | generated | difference, `save_panel`) and the
loss curve (`save_loss_curve`), drawn with matplotlib, no display needed.
"""
import re

import numpy as np

from machinery.files import atomic_path
from pix2pixCC_Networks import finite_correlation
from pix2pixCC_Options import FITS_FORMATS


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt



# Input channels a panel shows at most (a 20-channel input would make it unreadable); the
# title says which are shown.
PANEL_INPUT_CHANNELS = 6


def image_origin(data_format):
    """Where imshow puts row 0 of a `data_format` file: at the bottom for FITS (y grows
    upwards, as in its WCS), at the top for images (png/jpg/tif) and npy, as the
    `<step>_real.png` previews do (README "Output files", Panels)."""
    return 'lower' if data_format in FITS_FORMATS else 'upper'


def scale_style(scaling, cmap='viridis'):
    """imshow's colour scale from a channel's saturation limits (logarithmic with log)."""
    from matplotlib.colors import LogNorm
    if scaling.log:
        return dict(cmap=cmap, norm=LogNorm(vmin=scaling.lower, vmax=scaling.upper))
    return dict(cmap=cmap, vmin=scaling.lower, vmax=scaling.upper)


def panel_styles(real, generated, target_scaling):
    """The colour scales of each target channel c of a panel: (real and generated's, the
    difference's), as keyword arguments of imshow.

    Each channel is drawn by its own scaling, `target_scaling.channel(c)` (README "Your own
    data", Scaling), so channels whose values differ by orders of magnitude are each seen:
    real and generated share one scale, diverging around 0 up to the largest |real| value of
    the channel for signed data (limits on both sides of 0), otherwise the channel's
    saturation limits (logarithmic with log scale). The difference has its own symmetric
    diverging scale per channel.
    """
    styles = []
    for c, (real_c, generated_c) in enumerate(zip(real, generated, strict=True)):
        scaling = target_scaling.channel(c)
        lo, up = scaling.lower, scaling.upper
        if lo < 0 < up:
            peak = largest_magnitude(real_c) or max(-lo, up)
            data_style = dict(cmap='RdBu_r', vmin=-peak, vmax=peak)
        else:
            data_style = scale_style(scaling)
        spread = largest_magnitude(generated_c - real_c) or 1.0
        styles.append((data_style, dict(cmap='RdBu_r', vmin=-spread, vmax=spread)))
    return styles


def largest_magnitude(image):
    """The largest finite |value| of `image`; 0 when it has no finite value."""
    finite = np.abs(image[np.isfinite(image)])
    return float(finite.max()) if finite.size else 0.0


def input_cell(input, channel, input_scaling, input_unit):
    """(image, colour scale, colour bar label) of one input channel: in the input's units,
    mapped back by its scaling (grey, between the channel's saturation limits), or as the
    network sees it ([-1, 1], "normalised") without a scaling."""
    if input_scaling is None:
        return input[channel], dict(cmap='gray', vmin=-1, vmax=1), 'normalised'
    scaling = input_scaling.channel(channel)
    physical = scaling.inverse(input[channel]) / np.float32(scaling.save_scale)
    return physical, scale_style(scaling, cmap='gray'), input_unit or 'input units'


# How a panel's axes name the coordinates of a WCS's celestial axes (by CTYPE's first 4
# characters); others are named by their CTYPE.
AXIS_NAMES = {'HPLN': 'helioprojective longitude (Solar X)',
              'HPLT': 'helioprojective latitude (Solar Y)'}


def label_world_axes(axis, wcs):
    """Tick labels and axis labels of a WCSAxes `axis` in arcsec, named after `wcs`'s axes."""
    import astropy.units as u
    for coordinate, ctype in zip(axis.coords, wcs.wcs.ctype, strict=True):
        coordinate.set_format_unit(u.arcsec, decimal=True)
        coordinate.set_axislabel(f'{AXIS_NAMES.get(ctype[:4], ctype)} ["]', fontsize=8)
        coordinate.set_ticklabel(size=7)


def save_panel(path, input, real, generated, target_scaling, unit=None, data_format='npy',
               title='', input_scaling=None, input_unit=None, wcs=None):
    """input channel(s) | real | generated | difference, one row per target channel.

    input: C x H x W normalised, drawn in grey in the input's units (`input_unit`, e.g.
    'DN/s') after `input_scaling` maps it back, else as it is ("normalised"); real, generated:
    C x H x W in physical units (`unit`, e.g. 'G'; None when unknown), each channel coloured
    by its own scaling in `target_scaling` (`panel_styles`). Images are drawn in the
    orientation of `data_format` files (see `image_origin`); with `wcs` (the 2-D celestial WCS
    of a FITS file's image plane), on helioprojective axes in arcsec. The figure's title is
    `title` and the CC of each target channel.
    """
    plt = _pyplot()
    styles = panel_styles(real, generated, target_scaling)
    difference = generated - real
    unit_label = unit or 'target units'

    # Input channels fill the first columns, down the rows then across (3 EUV channels and
    # one magnetogram: three input columns in one row).
    rows = real.shape[0]
    shown = min(input.shape[0], PANEL_INPUT_CHANNELS)
    input_columns = -(-shown // rows)
    ccs = [finite_correlation(real[c], generated[c], ccc=False) for c in range(rows)]
    figure, axes = plt.subplots(rows, input_columns + 3,
                                figsize=(3.3 * (input_columns + 3) + (wcs is not None),
                                         3.2 * rows + 0.5 + 0.5 * (wcs is not None)),
                                squeeze=False,
                                subplot_kw=dict(projection=wcs) if wcs is not None else None)
    for c in range(rows):
        cells = []
        for j in range(input_columns):
            channel = j * rows + c
            name = f'input ch {channel}' if input.shape[0] > 1 else 'input'
            cells.append((name, *input_cell(input, channel, input_scaling, input_unit))
                         if channel < shown else None)
        suffix = f' ch {c}' if rows > 1 else ''
        data_style, diff_style = styles[c]
        cells += [('real' + suffix, real[c], data_style, unit_label),
                  (f'generated{suffix} (CC {ccs[c]:.3f})', generated[c], data_style,
                   unit_label),
                  ('generated - real' + suffix, difference[c], diff_style, unit_label)]
        for axis, cell in zip(axes[c], cells, strict=True):
            if cell is None:
                axis.axis('off')
                continue
            name, image, style, label = cell
            drawn = axis.imshow(image, origin=image_origin(data_format),
                                interpolation='nearest', **style)
            axis.set_title(name, fontsize=10)
            if wcs is not None:
                label_world_axes(axis, wcs)
            else:
                axis.set_xticks([]), axis.set_yticks([])
            figure.colorbar(drawn, ax=axis, fraction=0.046, pad=0.04).set_label(label)
    heading = f"{title}: " if title else ''
    heading += 'CC ' + ', '.join(f'{cc:.3f}' for cc in ccs)
    if shown < input.shape[0]:
        heading += f' (input channels 0-{shown - 1} of {input.shape[0]} shown)'
    figure.suptitle(heading)
    figure.tight_layout()
    # The title and units also go into the PNG's text chunks, for scripts that sort panels.
    row_0 = 'bottom' if data_format in FITS_FORMATS else 'top'
    input_units = 'normalised [-1, 1]' if input_scaling is None else \
        f"in {input_unit or 'input units'}"
    description = (f"input {input_units}; real, generated and difference in {unit_label}; "
                   f"row 0 of the files at the {row_0}")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80, format='png',
                       metadata={'Title': heading, 'Description': description})
    plt.close(figure)


# The validation CCs a loss curve shows: the first channel's, whole frame and disk, at every
# binning (README "Output files", loss_curve.png).
VALIDATION_CC = re.compile(r'^(ch0_)?(disk_)?cc_\d+x\d+$')


def save_loss_curve(path, rows, val_rows=()):
    """Loss terms of loss_log.csv rows against the step, the training CC beside them and,
    with val_metrics.csv rows (`val_rows`, from --val_during_train with targets), a third
    panel of the validation CCs (`VALIDATION_CC`) against the step."""
    if not rows:
        return
    plt = _pyplot()
    steps = [int(row['step']) for row in rows]
    keys = [key for key in (val_rows[0] if val_rows else ()) if VALIDATION_CC.match(key)]
    figure, axes = plt.subplots(1, 3 if keys else 2, figsize=(18 if keys else 12, 4))
    losses, cc = axes[:2]
    for name in ('D', 'G', 'G_LSGAN', 'G_FM', 'G_CC'):
        losses.plot(steps, [float(row[name]) for row in rows], label=name)
    losses.set_xlabel('step (samples)'), losses.set_ylabel('loss'), losses.set_yscale('log')
    losses.legend()
    cc.plot(steps, [float(row['CC']) for row in rows], color='k')
    cc.set_xlabel('step (samples)'), cc.set_ylabel('CC (training batch, full resolution)')
    if keys:
        draw_validation_cc(axes[2], val_rows, keys)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80)
    plt.close(figure)


def draw_validation_cc(axis, val_rows, keys):
    """The mean validation `keys` of val_metrics.csv rows against the step (disk dashed)."""
    steps = [int(row['step']) for row in val_rows]
    for key in keys:
        axis.plot(steps, [float(row[key]) for row in val_rows], marker='o', label=key,
                  linestyle='--' if 'disk_' in key else '-')
    axis.set_xlabel('step (samples)'), axis.set_ylabel('CC (validation, mean over files)')
    axis.legend(fontsize=8)
