"""Figures: comparison panels (input | real | generated | difference, `save_panel`) and the
loss curve (`save_loss_curve`), drawn with matplotlib, no display needed.
"""
import re

import numpy as np

from machinery.evaluation import unit_label
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

# A panel draws each map at its own size, one PNG pixel per map pixel, so that the fine
# structure a model gets right or wrong can be seen: a map larger than PANEL_MAX_PX is drawn
# PANEL_MAX_PX wide (a 4096 px AIA image would make a figure 20000 px wide), one smaller than
# PANEL_MIN_PX is enlarged to it (a 32 px map would be a stamp beside its labels).
PANEL_MIN_PX, PANEL_MAX_PX = 256, 1024
# Room for each map a little above its size: the layout then never draws it smaller, which
# would drop rows and columns (imshow's 'nearest'); a row drawn twice in 50 does no harm.
MAP_SLACK = 1.02
# PNG pixels per inch: the figure's size in inches is its size in pixels / PANEL_DPI.
PANEL_DPI = 100
# The room around each map, in text heights: the title above, the colour bar's tick labels
# and label to the right (the bar itself, COLOUR_BAR of the map's width, is added apart);
# world axes (WCSAxes) add tick labels and axis names to the left and below.
CELL_MARGINS = {'left': 1.0, 'right': 6.0, 'top': 2.5, 'bottom': 1.0}
WORLD_AXES_MARGINS = {'left': 6.0, 'bottom': 4.5}
FIGURE_TITLE_MARGIN = 2.5
COLOUR_BAR = dict(fraction=0.046, pad=0.04)  # of the map's width


def drawn_map_size(height, width):
    """(height, width) in PNG pixels of a height x width map in a panel: its own size,
    scaled down to PANEL_MAX_PX or up to PANEL_MIN_PX on its longer side."""
    side = max(height, width)
    scale = min(max(1.0, PANEL_MIN_PX / side), PANEL_MAX_PX / side)
    return height * scale, width * scale


def panel_font_px(drawn_side):
    """The text height of a panel in PNG pixels, for maps drawn `drawn_side` px on their
    longer side: 1/36 of it, 12 px at least; readable at full size, and still when a figure
    of 1024 px maps (some 5000 px wide) is shrunk to fit a screen."""
    return max(12.0, drawn_side / 36)


def panel_geometry(shape, rows, columns, world_axes):
    """(figure size in inches, font size in points) of a panel of rows x columns maps of
    `shape` (height, width): each map at `drawn_map_size`, with the room its title, colour
    bar and (`world_axes`) coordinate labels take around it, in text heights."""
    height, width = drawn_map_size(*shape)
    font = panel_font_px(max(height, width))
    margins = {**CELL_MARGINS, **(WORLD_AXES_MARGINS if world_axes else {})}
    cell_width = width * MAP_SLACK * (1 + sum(COLOUR_BAR.values())) + \
        font * (margins['left'] + margins['right'])
    cell_height = height * MAP_SLACK + font * (margins['top'] + margins['bottom'])
    size = (columns * cell_width / PANEL_DPI,
            (rows * cell_height + font * FIGURE_TITLE_MARGIN) / PANEL_DPI)
    return size, font * 72 / PANEL_DPI


def panel_fonts(points):
    """matplotlib's settings of a panel's text sizes around `points`: the image titles and
    colour bar labels at that size, ticks smaller, the figure's title larger."""
    return {'font.size': points, 'axes.titlesize': 'medium', 'axes.labelsize': 'medium',
            'xtick.labelsize': 'small', 'ytick.labelsize': 'small',
            'figure.titlesize': 'large'}


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
    return physical, scale_style(scaling, cmap='gray'), unit_label(input_unit) or 'input units'


# How a panel's axes name the coordinates of a WCS's celestial axes (by CTYPE's first 4
# characters); others are named by their CTYPE.
AXIS_NAMES = {'HPLN': 'helioprojective longitude (Solar X)',
              'HPLT': 'helioprojective latitude (Solar Y)'}


def label_world_axes(axis, wcs):
    """Tick labels and axis labels of a WCSAxes `axis` in arcsec, named after `wcs`'s axes."""
    import astropy.units as u
    for coordinate, ctype in zip(axis.coords, wcs.wcs.ctype, strict=True):
        coordinate.set_format_unit(u.arcsec, decimal=True)
        coordinate.set_axislabel(f'{AXIS_NAMES.get(ctype[:4], ctype)} ["]', fontsize='small')
        coordinate.set_ticklabel(size='small')


def save_panel(path, input, real, generated, target_scaling, unit=None, data_format='npy',
               title='', input_scaling=None, input_unit=None, wcs=None):
    """input channel(s) | real | generated | difference, one row per target channel.

    input: C x H x W normalised, drawn in grey in the input's units (`input_unit`, e.g.
    'DN/s') after `input_scaling` maps it back, else as it is ("normalised"); real, generated:
    C x H x W in physical units (`unit`, e.g. 'G'; None when unknown), each channel coloured
    by its own scaling in `target_scaling` (`panel_styles`); both units are labelled by
    `unit_label`. Images are drawn in the orientation of `data_format` files (see
    `image_origin`), each at about its own size in pixels (`panel_geometry`); with `wcs` (the
    2-D celestial WCS of a FITS file's image plane), on helioprojective axes in arcsec. The
    figure's title is `title` and the CC of each target channel.
    """
    plt = _pyplot()
    styles = panel_styles(real, generated, target_scaling)
    difference = generated - real
    unit_text = unit_label(unit) or 'target units'

    # Input channels fill the first columns, down the rows then across (3 EUV channels and
    # one magnetogram: three input columns in one row).
    rows = real.shape[0]
    shown = min(input.shape[0], PANEL_INPUT_CHANNELS)
    input_columns = -(-shown // rows)
    ccs = [finite_correlation(real[c], generated[c], ccc=False) for c in range(rows)]
    size, font = panel_geometry(real.shape[-2:], rows, input_columns + 3, wcs is not None)
    # A map drawn at its size or larger shows its pixels as they are; one shrunk to
    # PANEL_MAX_PX is smoothed first (matplotlib's antialiasing), not decimated.
    smoothing = 'antialiased' if max(real.shape[-2:]) > PANEL_MAX_PX else 'nearest'
    with plt.rc_context(panel_fonts(font)):  # (ticks are made when drawn: saved inside)
        figure, axes = plt.subplots(rows, input_columns + 3, figsize=size, dpi=PANEL_DPI,
                                    squeeze=False, subplot_kw=dict(projection=wcs)
                                    if wcs is not None else None)
        for c in range(rows):
            cells = []
            for j in range(input_columns):
                channel = j * rows + c
                name = f'input ch {channel}' if input.shape[0] > 1 else 'input'
                cells.append((name, *input_cell(input, channel, input_scaling, input_unit))
                             if channel < shown else None)
            suffix = f' ch {c}' if rows > 1 else ''
            data_style, diff_style = styles[c]
            cells += [('real' + suffix, real[c], data_style, unit_text),
                      (f'generated{suffix} (CC {ccs[c]:.3f})', generated[c], data_style,
                       unit_text),
                      ('generated - real' + suffix, difference[c], diff_style, unit_text)]
            for axis, cell in zip(axes[c], cells, strict=True):
                draw_cell(figure, axis, cell, data_format, wcs, smoothing)
        heading = f"{title}: " if title else ''
        heading += 'CC ' + ', '.join(f'{cc:.3f}' for cc in ccs)
        if shown < input.shape[0]:
            heading += f' (input channels 0-{shown - 1} of {input.shape[0]} shown)'
        figure.suptitle(heading)
        figure.tight_layout()
        # The title and units also go into the PNG's text chunks, for scripts that sort
        # panels.
        row_0 = 'bottom' if data_format in FITS_FORMATS else 'top'
        input_units = 'normalised [-1, 1]' if input_scaling is None else \
            f"in {unit_label(input_unit) or 'input units'}"
        description = (f"input {input_units}; real, generated and difference in {unit_text}; "
                       f"row 0 of the files at the {row_0}")
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=PANEL_DPI, format='png',
                           metadata={'Title': heading, 'Description': description})
    plt.close(figure)


def draw_cell(figure, axis, cell, data_format, wcs, interpolation='nearest'):
    """One map of a panel into `axis`: `cell` (name, image, colour scale, colour bar label),
    or None for an empty place (the axis is hidden)."""
    if cell is None:
        axis.axis('off')
        return
    name, image, style, label = cell
    drawn = axis.imshow(image, origin=image_origin(data_format), interpolation=interpolation,
                        **style)
    axis.set_title(name)
    if wcs is not None:
        label_world_axes(axis, wcs)
    else:
        axis.set_xticks([]), axis.set_yticks([])
    figure.colorbar(drawn, ax=axis, **COLOUR_BAR).set_label(label)


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
