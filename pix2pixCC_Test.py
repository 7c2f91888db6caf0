"""Inference driver: translate every test input with one or every saved generator.

    python pix2pixCC_Test.py --iteration 10000 [data and network options as in training]

writes ./checkpoints/<dataset_name>/Image/Test/<iteration>/<name>_AI.<data_format_target>
(or into --output_dir), in the target's physical units, beside a record of what made them
(test_run.json).
"""
import contextlib
import difflib
import errno
import fnmatch
import functools
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from astropy import units as u
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS
from torch.utils.data import DataLoader
from tqdm import tqdm

from pix2pixCC_Networks import Generator, Mish, ResidualBlock, correlation
from pix2pixCC_Options import (DATA_OPTIONS, FITS_FORMATS, NETWORK_OPTIONS, TestOption,
                               UserError, channel_values, run_main)
from pix2pixCC_Pipeline import (LEFT_OUT_INPUT_CARD, ORIGIN_CARD, STORAGE_CARD, WCS_KEY,
                                CustomDataset, Scaling, check_pairing, data_unit,
                                generated_header, read_array, read_fits_header, scaled_unit,
                                stored_size, write_array)
from pix2pixCC_Utils import (GracefulStop, Precision, StopRequested, atomic_path, bare,
                             checkpoint_path, fit_state_dict, float32_weights,
                             ignore_stop_signals, load_model_file, load_state_dict, make_dirs,
                             memory_format, model_file_record, prepare_network, read_json,
                             release_mapped_weights_after_use, require_checkpoint,
                             return_freed_memory, reuse_freed_memory, safe_load, save_panel,
                             save_torch, saved_steps, select_device, silent, weights_sha256,
                             write_csv, write_json)


def generate(G, input, n_downsample, precision=None, tile_size=0, tmp_dir=None, desc=None):
    """G on a (B, C, H, W) input of any H, W: padded (edge values) to a multiple of
    2**n_downsample, which the network's strides need, and cropped back.

    tile_size: when the image is larger, run it in tiles of that many pixels with the same
    result (`tiled_generate`, temporary files in `tmp_dir`); desc: the title of a progress
    bar, shown when the image takes more than a few seconds.
    """
    multiple = 2 ** n_downsample
    height, width = input.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        input = F.pad(input, (0, pad_w, 0, pad_h), mode='replicate')
    if tile_size and max(input.shape[-2:]) > tile_size:
        output = tiled_generate(G, input, tile_size, precision, tmp_dir, desc)
    else:
        with precision.autocast() if precision is not None else contextlib.nullcontext(), \
                layer_progress(G, desc):
            output = G(input)
    return output[..., :height, :width].float()


@contextlib.contextmanager
def layer_progress(G, desc):
    """A progress bar over G's layers titled `desc`, shown when the pass takes more than
    PROGRESS_DELAY seconds (none without `desc`, or for a compiled G, which runs no
    per-layer hooks)."""
    if desc is None or hasattr(G, '_orig_mod'):
        yield
        return
    layers = list(bare(G).model)
    with tqdm(total=len(layers), desc=desc, unit='layer', leave=False, disable=None,
              delay=PROGRESS_DELAY) as bar:
        handles = [layer.register_forward_hook(lambda *_: bar.update()) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def output_header(opt, input_path, iteration):
    """FITS header of the file generated from `input_path`: the input's geometry and time
    (FITS inputs), the training targets' identity cards and unit (divided by --save_scale),
    and the provenance."""
    history = [line.replace(INPUT_FILE, os.path.basename(input_path))
               for line in product_history(opt, iteration)]
    input_header = input_fits_header(opt, input_path)
    return generated_header(input_header, getattr(opt, 'target_header', None) or {},
                            scaled_unit(data_unit(opt), opt.save_scale), history,
                            input_channels=opt.input_ch, channels=opt.target_ch)


def product_history(opt, iteration):
    """The HISTORY lines of a generated FITS file, INPUT_FILE standing for its input's file
    name."""
    history = [f'pix2pixCC: generated from {INPUT_FILE}',
               f'pix2pixCC: run {opt.dataset_name}, iteration {iteration}']
    if opt.save_scale != 1:  # why BUNIT carries a factor (scaled_unit)
        history.append(f'pix2pixCC: values multiplied by --save_scale {opt.save_scale:g}')
    return history


def input_fits_header(opt, input_path):
    """The header of a FITS input, else None."""
    return read_fits_header(input_path) if opt.data_format_input in FITS_FORMATS else None


def panel_wcs(header):
    """The celestial WCS of a generated FITS file's `header` for its panel's axes (README
    "Output files", Panels), or None without one."""
    if header is None:
        return None
    with warnings.catch_warnings():  # (astropy's notes on cards it fixes, e.g. DATE-OBS)
        warnings.simplefilter('ignore', AstropyWarning)
        wcs = WCS(header)
    return wcs.celestial if wcs.has_celestial else None


def panel_options(opt, input_path, header):
    """What save_panel needs beside the data: the input's scaling and unit (its BUNIT, FITS
    inputs only) and the WCS of the generated file's `header` (None for other formats)."""
    input_header = input_fits_header(opt, input_path)
    return dict(input_scaling=Scaling.from_options(opt, 'input'),
                input_unit=(input_header or {}).get('BUNIT') or None, wcs=panel_wcs(header))


def load_generator(opt, path, device, state=None):
    """The generator saved in `path`, placed on `device` for inference; `state`: its weights
    as read from the model file `path` (`load_model_file`), cast to float32 if stored in
    bfloat16.

    It is built on the 'meta' device (no memory) and given the checkpoint's tensors mapped
    from the file, so its weights are held once while loading (774 MB for the default
    network), not twice as with a built module plus a loaded state_dict.
    """
    with torch.device('meta'):
        G = Generator(opt)
    if state is None:
        load_state_dict(G, path, assign=True)
    else:
        fit_state_dict(G, float32_weights(state), path, assign=True)
    G = prepare_network(G, opt, device)
    if not opt.compile:  # (a compiled graph runs no per-layer Python hooks)
        release_mapped_weights_after_use(G, path)
    return G


def translate(G, dataset, out_dir, opt, device, iteration, precision=None, panels=False,
              disks=None, stop=None, sizes=None):
    """Run G on every item of a test `dataset` and write `<name>_AI.<fmt>` into `out_dir`.

    When the dataset has targets, returns one metrics row per file, in file order (see
    `file_metrics`; the disk regions of the targets whose `disks`, from `target_disks`, are
    known) and, with `panels`, writes `<name>_panel.png`; otherwise returns []. The folder's
    record (test_run.json) is written first (see `take_folder`). With --skip_existing the
    files whose outputs are complete are left alone (`complete_outputs`) and their metrics
    come from the outputs read back. `stop` (a GracefulStop): a stop signal ends the run
    after the file in progress (`stop_if_asked`). sizes: the tile size of each file
    (`tile_sizes`, which is asked when None).
    """
    if sizes is None:
        sizes = tile_sizes(opt, dataset.input_paths, device)
    make_dirs(out_dir)
    take_folder(out_dir, run_record(opt, dataset, iteration, precision, panels))
    scaling = Scaling.from_options(opt, 'target')
    unit = data_unit(opt)
    kept = complete_outputs(dataset, out_dir, opt, panels)
    rows = kept_rows(dataset, kept, out_dir, opt, disks)
    pending = [index for index in range(len(dataset)) if index not in kept]
    loader = DataLoader(dataset, batch_size=None, sampler=pending, num_workers=opt.n_workers,
                        worker_init_fn=ignore_stop_signals)
    was_training = G.training
    G.eval()
    with torch.inference_mode():
        for done, (index, (input, name)) in enumerate(zip(pending, tqdm(
                loader, desc=f'iteration {iteration}', unit='file', disable=None, leave=False),
                strict=True), start=len(kept) + 1):
            batch = input[None].to(device, memory_format=memory_format(device))
            output = generate(G, batch, opt.n_downsample, precision, sizes[index], opt.tmp_dir,
                              desc=name)
            data = scaling.inverse(output[0].cpu().numpy())
            header = write_output(output_path(out_dir, name, opt), data, opt,
                                  dataset.input_paths[index], iteration)

            if dataset.target_paths is not None:
                real = dataset.read_target(index)
                generated = data / np.float32(opt.save_scale)  # metrics in the target's units
                rows[index] = file_metrics(dataset, index, real, generated, opt, disks)
                if panels:
                    save_panel(os.path.join(out_dir, f'{name}_panel.png'), input.numpy(), real,
                               generated, scaling, unit=unit, data_format=opt.data_format_target,
                               title=f'{os.path.basename(dataset.input_paths[index])}, '
                                     f'iteration {iteration}',
                               **panel_options(opt, dataset.input_paths[index], header))
            stop_if_asked(stop, done, len(dataset), out_dir)
    G.train(was_training)
    return aligned([rows[index] for index in sorted(rows)])


def output_path(out_dir, name, opt):
    """The generated file of the input named `name` (without its extension)."""
    return os.path.join(out_dir, f'{name}_AI.{opt.data_format_target}')


def write_output(path, data, opt, input_path, iteration):
    """Write the generated `data` (C x H x W, physical units times --save_scale) of
    `input_path` to `path` atomically (a complete file has its final name), with its FITS
    header (`output_header`, tile-compressed with --compress) or its PNG bit depth; returns
    the header (None for other formats)."""
    extra = {'header': None}
    if opt.data_format_target in FITS_FORMATS:
        extra['header'] = output_header(opt, input_path, iteration)
        if getattr(opt, 'compress', False):  # (training's validation writes plain files)
            step = opt.quantize_step
            extra.update(compress=True,
                         quantize_step=None if step is None else step * abs(opt.save_scale))
    elif opt.data_format_target in ('png', 'jpg', 'jpeg'):  # (16-bit PNG above 255)
        extra['upper_limit'] = max(channel_values(opt.saturation_upper_limit_target,
                                                  opt.target_ch))
    with atomic_path(path) as temporary:
        write_array(temporary, data, opt.data_format_target, **extra)
    return extra['header']


def file_metrics(dataset, index, real, generated, opt, disks):
    """The metrics row of file `index`: `image_metrics` of its target `real` and the
    `generated` data, both C x H x W in the target's units."""
    return {'file': input_name(dataset.input_paths[index]), **image_metrics(
        real, generated, opt.metric_bins, disks[index] if disks else None,
        opt.disk_fraction, opt.active_threshold,
        target_pixel_area(opt, dataset.target_paths[index]))}


def input_name(path):
    """An input file's name without its extension, which names its outputs."""
    return os.path.splitext(os.path.basename(path))[0]


# ----------------------------------------------------------------------------------------
# Converting an archive: resuming, stopping (README "Sharing a model and running it
# elsewhere").
# ----------------------------------------------------------------------------------------


def complete_outputs(dataset, out_dir, opt, panels=False):
    """With --skip_existing, the indices of the files of `dataset` whose outputs in `out_dir`
    are complete: the generated file under its final name (written atomically, so it is
    whole) and, with targets and `panels`, the panel too; otherwise an empty set."""
    if not getattr(opt, 'skip_existing', False):
        return set()
    present = {entry.name for entry in os.scandir(out_dir) if entry.is_file()}
    with_panel = panels and dataset.target_paths is not None
    kept = {index for index, path in enumerate(dataset.input_paths)
            if os.path.basename(output_path(out_dir, input_name(path), opt)) in present and
            (not with_panel or f'{input_name(path)}_panel.png' in present)}
    if kept:
        print(f"--skip_existing: {len(kept)} of {len(dataset)} output(s) in {out_dir} are "
              f"complete and kept")
    return kept


def kept_rows(dataset, kept, out_dir, opt, disks):
    """{index: metrics row} of the files `kept` from an earlier run (with targets), from
    their outputs read back: the metrics of a resumed conversion cover every file, the same
    as an uninterrupted one's for float outputs (FITS, npy, tif)."""
    if dataset.target_paths is None:
        return {}
    rows = {}
    for index in sorted(kept):
        path = output_path(out_dir, input_name(dataset.input_paths[index]), opt)
        generated = read_array(path, opt.data_format_target, opt.target_ch) / \
            np.float32(opt.save_scale)
        rows[index] = file_metrics(dataset, index, dataset.read_target(index), generated, opt,
                                   disks)
    return rows


def stop_if_asked(stop, done, total, folder):
    """After the file in progress: end the run (exit 128 + the signal) when a stop signal
    came (`stop`, a GracefulStop, or None), saying how far it got."""
    if stop is not None and stop.signum is not None:
        raise StopRequested(stop.signum, f"after {done} of {total} file(s) in {folder}; the "
                                         f"same command with --skip_existing continues")


# ----------------------------------------------------------------------------------------
# Full-resolution images: exact tiled inference (README "Full-resolution images")
# ----------------------------------------------------------------------------------------

# The generator runs layer by layer over tiles of the whole (padded) image. Each layer's raw
# output goes to a file-backed store; what follows it (normalisation and activation) is
# applied when the next layer reads a tile, InstanceNorm with the whole image's per-channel
# mean and variance, accumulated in float64 over the tiles of the pass that wrote the store.
# Each tile is read with the halo its convolution needs, and at the image border with the
# padding the whole image gets, so every output pixel is the whole-image one.

PAD_MODES = {nn.ReflectionPad2d: 'reflect', nn.ReplicationPad2d: 'replicate',
             nn.ZeroPad2d: 'constant'}  # (as F.pad names them)
# Set to a number of bytes, the memory a whole-image pass may use (instead of what the
# machine has free): README "Full-resolution images".
MEMORY_LIMIT_VARIABLE = 'PIX2PIXCC_MEMORY_LIMIT'
# An image slower than this (seconds) gets a progress bar of its layers or tiles.
PROGRESS_DELAY = 5
FLOAT_BYTES = 4  # stores and tiles are float32


class Step(NamedTuple):
    """One convolution of the generator and the layers around it.

    pad: the padding layer before it, or None; upsample: the x2 bilinear upsampling before
    that, or None; conv: Conv2d or ConvTranspose2d; norm, act: the normalisation and the
    activation after it, or None; block_start / block_end: its input is a residual block's
    input / the block's input is added to its (normalised) output.
    """
    conv: nn.Module
    pad: nn.Module = None
    upsample: nn.Module = None
    norm: nn.Module = None
    act: nn.Module = None
    block_start: bool = False
    block_end: bool = False


def generator_steps(G):
    """The Steps of a Generator (or of a wrapper of one), in order."""
    return layer_steps(bare(G).model)


def layer_steps(modules):
    steps, before = [], {}
    for module in modules:
        if isinstance(module, ResidualBlock):
            inner = layer_steps(module.block)
            inner[0] = inner[0]._replace(block_start=True)
            inner[-1] = inner[-1]._replace(block_end=True)
            steps += inner
        elif type(module) in PAD_MODES:
            before['pad'] = module
        elif isinstance(module, nn.Upsample) and module.mode == 'bilinear' and \
                module.align_corners and module.scale_factor in (2, (2, 2), (2.0, 2.0)):
            before['upsample'] = module
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            if tuple(module.dilation) != (1, 1) or module.padding_mode != 'zeros':
                raise TypeError(f'tiled inference needs plain convolutions, not {module}')
            steps.append(Step(module, **before))
            before = {}
        elif isinstance(module, nn.modules.batchnorm._NormBase) and steps and \
                steps[-1].norm is None:
            steps[-1] = steps[-1]._replace(norm=module)
        elif isinstance(module, Mish) and steps and steps[-1].act is None:
            steps[-1] = steps[-1]._replace(act=module)
        else:
            raise TypeError(f'tiled inference does not know the layer {module} here')
    return steps


def pad_widths(step, axis):
    """(before, after) of the step's padding layer along `axis` (0: rows, 1: columns)."""
    if step.pad is None:
        return 0, 0
    left, right, top, bottom = step.pad.padding
    return (top, bottom) if axis == 0 else (left, right)


def conv_output_length(conv, axis, length):
    """The length along `axis` of `conv`'s output for an input of `length`."""
    k, s, p = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis]
    if isinstance(conv, nn.ConvTranspose2d):
        return (length - 1) * s - 2 * p + k + conv.output_padding[axis]
    return (length + 2 * p - k) // s + 1


def module_input_length(step, axis, length):
    """The length of the convolution's input (after upsampling and padding) along `axis`
    for a step input of `length`."""
    before, after = pad_widths(step, axis)
    return length * (2 if step.upsample is not None else 1) + before + after


def step_output_shape(step, shape):
    """(C, H, W) of the step's output for an input of (C, H, W) `shape`."""
    return (step.conv.out_channels,
            *(conv_output_length(step.conv, axis, module_input_length(step, axis, n))
              for axis, n in enumerate(shape[1:])))


def conv_input_range(conv, axis, length, start, stop):
    """(first, end, crop): the convolution's input rows [first, end) (of `length`) from
    which it computes output rows [start, stop) exactly, and the index of row `start` in
    its output for that input.

    Its own zero padding lies where the whole input's does at the borders, and elsewhere
    only touches output rows before `crop` or after the tile, which are dropped.
    """
    k, s, p = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis]
    if isinstance(conv, nn.ConvTranspose2d):
        # Output row o takes input rows (o + p - k + 1) / s ... (o + p) / s.
        first = max(0, min(-(-(start + p - k + 1) // s), start // s))
        end = min(length, (stop - 1 + p) // s + 1)
        while end < length and (end - first - 1) * s - 2 * p + k + \
                conv.output_padding[axis] < stop - first * s:
            end += 1
        return first, end, start - first * s
    # Output row o takes input rows o * s - p ... o * s - p + k - 1.
    first = max(0, (start - -(-p // s)) * s)
    return first, min(length, (stop - 1) * s - p + k), start - first // s


def padded_rows(rows, length, mode):
    """(row of the unpadded map, weight) of each of `rows` (numpy, may lie outside
    [0, length)) after padding of `mode` (F.pad's); the weight is 0 for zero padding."""
    if mode == 'reflect':
        rows = np.abs(rows)
        rows = np.where(rows >= length, 2 * (length - 1) - rows, rows)
    weight = (rows >= 0) & (rows < length) if mode == 'constant' else np.ones(rows.shape, bool)
    return np.clip(rows, 0, length - 1), weight.astype(np.float32)


def upsampled_rows(rows, length):
    """The two rows of a map of `length` and their weights that x2 bilinear upsampling
    with aligned corners (UpsamplingBilinear2d) mixes into each of `rows` of its output,
    computed in float32 as PyTorch does."""
    scale = np.float32((length - 1) / (2 * length - 1)) if length > 1 else np.float32(0)
    source = scale * rows.astype(np.float32)
    low = np.minimum(source.astype(np.int64), length - 1)
    high = np.minimum(low + 1, length - 1)
    weight = (source - low).astype(np.float32)
    return low, high, np.float32(1) - weight, weight


class AxisPlan(NamedTuple):
    """How a tile's rows (or columns) are made from a step's input along one axis: read
    rows [start, stop) of the input, then either pad them by (before, after) rows of the
    step's padding (`pad`; where the tile reaches beyond the image) or, after an
    upsampling, mix rows `low` and `high` of them with weights `w_low` and `w_high`
    (`upsampling`, else None). `crop`: the first row of the convolution's output kept."""
    start: int
    stop: int
    pad: tuple
    upsampling: tuple
    crop: int


def pad_mode(step):
    """The step's padding as F.pad's mode ('constant' also without a padding layer)."""
    return PAD_MODES[type(step.pad)] if step.pad is not None else 'constant'


def axis_plan(step, axis, length, start, stop, device):
    """The AxisPlan of output rows [start, stop) of `step` whose input has `length` rows."""
    first, end, crop = conv_input_range(step.conv, axis,
                                        module_input_length(step, axis, length), start, stop)
    before, _ = pad_widths(step, axis)
    first, end = first - before, end - before  # rows of the map before its padding
    if step.upsample is None:  # the rows read, padded at the image's border
        read = max(first, 0), min(end, length)
        return AxisPlan(*read, (read[0] - first, end - read[1]), None, crop)
    rows, weight = padded_rows(np.arange(first, end), 2 * length, pad_mode(step))
    low, high, w_low, w_high = upsampled_rows(rows, length)
    read = int(low.min()), int(high.max()) + 1
    upsampling = tuple(torch.as_tensor(values, device=device) for values in (
        low - read[0], high - read[0], w_low * weight, w_high * weight))
    return AxisPlan(*read, (0, 0), upsampling, crop)


def upsample_rows(tile, plan, dim):
    """The rows (dim 2) or columns (dim 3) of the upsampled and padded `tile` that `plan`
    makes of it."""
    low, high, w_low, w_high = plan.upsampling
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    return tile.index_select(dim, low) * w_low.view(shape) + \
        tile.index_select(dim, high) * w_high.view(shape)


def step_input(step, tile, row_plan, col_plan):
    """The convolution's input tile from the `tile` read for it."""
    if step.upsample is not None:
        return upsample_rows(upsample_rows(tile, row_plan, 2), col_plan, 3)
    padding = (*col_plan.pad, *row_plan.pad)
    if not any(padding):
        return tile
    # F.pad, as the whole image's padding layer: the rows read reach the image's border
    # wherever a tile is padded, so they are padded as the image is.
    return F.pad(tile, padding, mode=pad_mode(step))


class Pointwise:
    """The normalisation and activation that follow a stored convolution output, applied
    to a tile when the next layer reads it: (x - center) * scale + offset per channel,
    then `act` (or None)."""

    def __init__(self, norm=None, act=None, moments=None, device=None):
        self.act, self.center = act, None
        if norm is None:
            return
        if moments is not None:  # the whole image's statistics (InstanceNorm)
            mean, var = moments.mean, moments.variance
        else:  # running statistics (BatchNorm in eval mode)
            mean, var = norm.running_mean.double(), norm.running_var.double()
        scale = 1 / torch.sqrt(var.to(device) + norm.eps)
        offset = torch.zeros_like(scale)
        if norm.affine:
            scale = scale * norm.weight.double().to(device)
            offset = norm.bias.double().to(device)
        self.center, self.scale, self.offset = (
            value.float().view(1, -1, 1, 1) for value in (mean.to(device), scale, offset))

    def __call__(self, tile):
        """`tile` (1, C, h, w) float32, changed in place; returns the result."""
        if self.center is not None:
            tile.sub_(self.center).mul_(self.scale).add_(self.offset)
        return self.act(tile) if self.act is not None else tile


def uses_image_statistics(norm):
    """Whether `norm` normalises by the statistics of what it is given (InstanceNorm; a
    BatchNorm in training mode or without running statistics) rather than stored ones."""
    return norm is not None and (norm.training or not norm.track_running_stats)


class ChannelMoments:
    """Per-channel mean and biased variance of a map seen tile by tile: each tile's, merged
    in float64 by Chan et al.'s pairwise rule."""

    CHUNK = 2 ** 22  # values converted to float64 at a time (GPU)

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, tile):
        """`tile`: (1, C, h, w) float32."""
        n = tile.shape[2] * tile.shape[3]
        if tile.device.type == 'cpu':
            # BatchNorm's statistics kernel: two passes, accumulated in float64 on the CPU,
            # 4x faster than var_mean (Welford) there.
            mean, var = (value.double() for value in
                         torch.batch_norm_update_stats(tile, None, None, 0.0))
        else:
            step = max(1, self.CHUNK // max(n, 1))
            parts = [torch.var_mean(chunk.double(), dim=(0, 2, 3), correction=0)
                     for chunk in tile.split(step, dim=1)]
            var, mean = (torch.cat(values) for values in zip(*parts, strict=True))
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta * delta * (self.count * n / total)
        self.count = total

    @property
    def variance(self):
        return self.m2 / self.count


class MemoryStore:
    """A (1, C, H, W) tensor read and written tile by tile like a DiskStore (the input
    image, the generator's output, and the maps small enough to stay in memory:
    `TemporaryStores.new`)."""

    def __init__(self, tensor):
        self.tensor, self.shape, self.transform = tensor, tuple(tensor.shape[1:]), None

    def read(self, rows, cols, device):
        tile = self.tensor[..., rows[0]:rows[1], cols[0]:cols[1]].to(device)
        return tile.clone() if self.transform is not None else tile

    def write(self, row, col, tile):
        self.tensor[..., row:row + tile.shape[2], col:col + tile.shape[3]] = tile

    def close(self):
        self.tensor = None


class DiskStore:
    """A (C, H, W) float32 map in a file, channel after channel, read and written with
    explicit reads and writes (never mapped), so that the process holds only the tiles it
    works on. A tile that spans whole rows (as they all do: `tiles`) is one contiguous run
    per channel. `transform`: the Pointwise the next layer applies to what it reads, or
    None."""

    def __init__(self, path, shape):
        self.path, self.shape, self.transform = path, tuple(shape), None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        if hasattr(os, 'posix_fallocate'):  # a full disk fails here, not half-way
            try:
                os.posix_fallocate(self.fd, 0, math.prod(self.shape) * FLOAT_BYTES)
            except OSError:
                self.close()
                raise

    def runs(self, rows, cols, array):
        """(file offset, part of `array` (C, h, w)) of each contiguous run of the tile's
        rows x columns."""
        _, height, width = self.shape
        if cols == (0, width):
            return [((channel * height + rows[0]) * width * FLOAT_BYTES, plane.reshape(-1))
                    for channel, plane in enumerate(array)]
        return [(((channel * height + row) * width + cols[0]) * FLOAT_BYTES, line)
                for channel, plane in enumerate(array)
                for row, line in zip(range(*rows), plane, strict=True)]

    def read(self, rows, cols, device):
        """Rows [r0, r1) x columns [c0, c1) as a (1, C, h, w) float32 tensor on `device`."""
        array = np.empty((self.shape[0], rows[1] - rows[0], cols[1] - cols[0]), np.float32)
        for offset, run in self.runs(rows, cols, array):
            if os.preadv(self.fd, [run], offset) != run.nbytes:
                raise OSError(errno.EIO, f'short read from {self.path}')
        return torch.from_numpy(array)[None].to(device)

    def write(self, row, col, tile):
        """`tile` (1, C, h, w) at rows from `row`, columns from `col`."""
        array = tile[0].cpu().numpy()
        rows, cols = (row, row + array.shape[1]), (col, col + array.shape[2])
        for offset, run in self.runs(rows, cols, array):
            run = np.ascontiguousarray(run)  # (a copy only where the tile was cropped)
            if os.pwrite(self.fd, run, offset) != run.nbytes:
                raise OSError(errno.ENOSPC, f'short write to {self.path}')

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            os.remove(self.path)
            self.fd = None


class TemporaryStores:
    """A temporary folder in `tmp_dir` (default: the system's) holding the DiskStores of
    one image; the folder and everything in it are removed at the end, also on an error or
    a stop signal (which the Test script turns into an exception). Maps of at most
    `in_memory` values (the deepest layers' of a not too large image) stay in memory."""

    PREFIX = 'pix2pixCC-tiles-'

    def __init__(self, tmp_dir=None, in_memory=0, device=None):
        self.tmp_dir, self.folder, self.stores = tmp_dir, None, []
        self.in_memory, self.device = in_memory, device

    def __enter__(self):
        self.folder = tempfile.mkdtemp(prefix=self.PREFIX, dir=self.tmp_dir)
        return self

    def new(self, shape):
        """A store of a (C, H, W) map."""
        if math.prod(shape) <= self.in_memory:
            return MemoryStore(torch.empty((1, *shape), device=self.device))
        path = os.path.join(self.folder, f'{len(self.stores)}.f32')
        try:
            self.stores.append(DiskStore(path, shape))
        except OSError as error:
            raise temporary_disk_error(self.folder, error) from None
        return self.stores[-1]

    def __exit__(self, *exc):
        for store in self.stores:
            with contextlib.suppress(OSError):
                store.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def temporary_disk_error(folder, error):
    return UserError(f"cannot write the temporary tiles in {folder}: "
                     f"{error.strerror or error}; give --tmp_dir a folder with more room")


def tile_side(tile_size, level):
    """The side of the square whose pixels a tile at `level` holds (the map is 2**level
    times smaller than the image): tile_size at full resolution, then halved every second
    level, where the channels have grown fourfold, so that a tile holds at most as many
    values at every level."""
    return max(1, tile_size >> ((level + 1) // 2))


def level_of(full_height, height):
    return max(0, round(math.log2(full_height / height)))


def tile_rows(shape, side):
    """The rows of a tile of a (C, H, W) map: the tiles span whole rows (so that each is one
    run per channel in its store) and hold as many pixels as a `side` x `side` square."""
    return max(1, min(shape[1], side * side // shape[2]))


def tiles(shape, side):
    """[(rows, columns)] of the tiles covering a (C, H, W) map (`tile_rows`)."""
    height = tile_rows(shape, side)
    return [((row, min(row + height, shape[1])), (0, shape[2]))
            for row in range(0, shape[1], height)]


def read_tile(store, rows, cols, device):
    tile = store.read(rows, cols, device)
    return store.transform(tile) if store.transform is not None else tile


def run_step(step, source, target, side, device, precision, moments, bar):
    """Every tile of `step`'s output from `source` into `target`; the output's per-channel
    moments into `moments` (or None)."""
    plans = {}  # (axis, start, stop): the AxisPlan, the same for a row or column of tiles

    def plan(axis, span):
        if (axis, *span) not in plans:
            plans[(axis, *span)] = axis_plan(step, axis, source.shape[axis + 1], *span, device)
        return plans[(axis, *span)]

    for rows, cols in tiles(target.shape, side):
        row_plan, col_plan = plan(0, rows), plan(1, cols)
        tile = step_input(step, read_tile(source, row_plan[:2], col_plan[:2], device),
                          row_plan, col_plan)
        tile = tile.contiguous(memory_format=memory_format(device))
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            out = step.conv(tile)
        del tile
        out = out[..., row_plan.crop:row_plan.crop + rows[1] - rows[0],
                  col_plan.crop:col_plan.crop + cols[1] - cols[0]].float()
        if moments is not None:
            moments.add(out)
        target.write(rows[0], cols[0], out)
        bar.update()


def add_block_input(target, block_input, side, device, bar):
    """A residual block's output, block input + normalised last convolution, into
    `target` (tile by tile, in place)."""
    for rows, cols in tiles(target.shape, side):
        tile = read_tile(target, rows, cols, device)
        target.write(rows[0], cols[0], tile.add_(read_tile(block_input, rows, cols, device)))
        bar.update()
    target.transform = None


def tiled_generate(G, input, tile_size, precision=None, tmp_dir=None, desc=None):
    """G on a (B, C, H, W) input whose H and W are multiples of 2**n_downsample, in tiles
    of tile_size x tile_size pixels (`tiles`): the output of G(input) (to float rounding;
    README "Full-resolution images"), holding only tiles in memory besides the input and
    the output. Returns (B, target_ch, H, W) float32 on the input's device."""
    steps = generator_steps(G)
    return torch.cat([tiled_sample(steps, sample, tile_size, precision, tmp_dir, desc)
                      for sample in input.split(1)])


def tiled_sample(steps, input, tile_size, precision, tmp_dir, desc):
    """`tiled_generate` of one sample (1, C, H, W): each step from the store of its input
    (the input image first) into a new store (the output tensor last); a store is closed
    (its file removed) once no step reads it any more."""
    device, shapes = input.device, [shape for _, _, shape in shapes_along(steps,
                                                                           input.shape[1:])]
    sides = [tile_side(tile_size, level_of(input.shape[2], shape[1])) for shape in shapes]
    total = sum(len(tiles(shape, side)) * (2 if step.block_end else 1)
                for step, shape, side in zip(steps, shapes, sides, strict=True))
    # Maps of at most a quarter of a full-resolution tile's values stay in memory: the
    # residual blocks' of images up to about 2 x tile_size, which are read and written most.
    in_memory = tile_size * tile_size * shapes[0][0] // 4
    with TemporaryStores(tmp_dir, in_memory, device) as stores, \
            tqdm(total=total, desc=desc, unit='tile', leave=False, disable=None,
                 delay=PROGRESS_DELAY) as bar:
        source, block_input = MemoryStore(input.float()), None
        try:
            for index, (step, shape, side) in enumerate(zip(steps, shapes, sides,
                                                            strict=True)):
                block_input = source if step.block_start else block_input
                target = stores.new(shape) if index < len(steps) - 1 else \
                    MemoryStore(input.new_empty((1, *shape), dtype=torch.float32))
                moments = ChannelMoments() if uses_image_statistics(step.norm) else None
                run_step(step, source, target, side, device, precision, moments, bar)
                target.transform = Pointwise(step.norm, step.act, moments, device)
                if step.block_end:
                    add_block_input(target, block_input, side, device, bar)
                    block_input.close()
                if source is not block_input:
                    source.close()
                source = target
                return_freed_memory()  # the next layer's tiles have other shapes
        except OSError as error:  # a full disk, or a store that cannot be read back
            raise temporary_disk_error(stores.folder, error) from None
        return source.tensor


# The choice between a whole image and tiles, before the first image (README
# "Full-resolution images").


def shapes_along(steps, shape):
    """[(input, convolution input, output)] (C, H, W) shapes of each step for a (padded)
    input of `shape`."""
    shapes = []
    for step in steps:
        middle = (shape[0], *(module_input_length(step, axis, n)
                              for axis, n in enumerate(shape[1:])))
        output = step_output_shape(step, shape)
        shapes.append((shape, middle, output))
        shape = output
    return shapes


def whole_image_bytes(steps, shape):
    """An estimate of the memory (bytes) of G on a whole (padded) image of (C, H, W)
    `shape`: twice the largest sum of a layer's input, padded input and output (what a
    convolution's working copies add), a residual block's input kept across the block, and
    the input and output images."""
    peak, block, shapes = 0, 0, shapes_along(steps, shape)
    for step, (source, middle, output) in zip(steps, shapes, strict=True):
        block = math.prod(source) if step.block_start else block
        live = math.prod(source) + math.prod(middle) + math.prod(output)
        peak = max(peak, live + (block if not step.block_start else 0))
        block = 0 if step.block_end else block
    return (2 * peak + math.prod(shape) + math.prod(shapes[-1][2])) * FLOAT_BYTES


def tile_extent(conv, length, out_length, rows):
    """The convolution input rows of an inner output tile of `rows` rows (the second)."""
    start = min(rows, out_length - 1)
    first, end, _ = conv_input_range(conv, 0, length, start, min(start + rows, out_length))
    return end - first


def tiled_bytes(steps, shape, tile_size):
    """An estimate of the memory (bytes) of `tiled_generate` on a (padded) image of
    (C, H, W) `shape`: the input and output images, and the largest tile's working copies
    (the read tile and its padded form twice, the output three times) and statistics."""
    peak, shapes = 0, shapes_along(steps, shape)
    for step, (source, middle, output) in zip(steps, shapes, strict=True):
        rows = tile_rows(output, tile_side(tile_size, level_of(shape[1], output[1])))
        tile_in = source[0] * tile_extent(step.conv, middle[1], output[1], rows) * middle[2]
        tile_out = output[0] * rows * output[2]
        # (float64 statistics on a GPU: a chunk of the output tile, twice the bytes)
        peak = max(peak, 4 * tile_in + 3 * tile_out + 2 * min(ChannelMoments.CHUNK, tile_out))
    return (peak + math.prod(shape) + math.prod(shapes[-1][2])) * FLOAT_BYTES


def disk_bytes(steps, shape):
    """The temporary disk (bytes) of `tiled_generate` on a (padded) image of (C, H, W)
    `shape`: the most that its stores hold at once (the input of a step, its output and a
    residual block's input; the input and the last output are in memory)."""
    peak, block, stored = 0, 0, 0  # stored: the current step input's store, 0 for memory
    steps_shapes = list(zip(steps, shapes_along(steps, shape), strict=True))
    for index, (step, (_, _, output)) in enumerate(steps_shapes):
        block = stored if step.block_start else block
        written = math.prod(output) if index < len(steps) - 1 else 0
        peak = max(peak, stored + written + (block if not step.block_start else 0))
        block = 0 if step.block_end else block
        stored = written
    return peak * FLOAT_BYTES


def available_memory(device):
    """The bytes a pass may use on `device`: $PIX2PIXCC_MEMORY_LIMIT when set, else the
    MemAvailable of /proc/meminfo (CPU) or the device's free memory and what PyTorch's
    allocator holds unused (CUDA); None when unknown (then a whole image is tried)."""
    limit = os.environ.get(MEMORY_LIMIT_VARIABLE)
    if limit:
        try:
            return int(float(limit))
        except ValueError:
            raise UserError(f"{MEMORY_LIMIT_VARIABLE}={limit!r} is not a number of bytes; "
                            f"set it to e.g. 8e9, or unset it") from None
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open('/proc/meminfo') as f:
            fields = dict(line.split(':', 1) for line in f)
        return int(fields['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def automatic_tile_size(steps, shape, multiple, memory):
    """The tile size for a (padded) image of (C, H, W) `shape` when a whole-image pass does
    not fit `memory` bytes: the largest power-of-two multiple of `multiple` below the image
    whose tiles take at most half of it (leaving room for the stores' file cache), else the
    smallest; 0 when the whole image fits or `memory` is None."""
    if memory is None or whole_image_bytes(steps, shape) <= memory:
        return 0
    size = multiple
    while 2 * size < max(shape[1:]) and tiled_bytes(steps, shape, 2 * size) <= memory / 2:
        size *= 2
    return size


def gigabytes(n_bytes):
    """A memory or disk size for a message: GB, or MB below 0.1 GB (not '0.0 GB')."""
    return f'{n_bytes / 1e9:.1f} GB' if n_bytes >= 1e8 else f'{n_bytes / 1e6:.1f} MB'


def padded_shape(channels, size, multiple):
    """(C, H, W) of an input of `size` (H, W) padded to multiples of `multiple`."""
    return (channels, *(n + -n % multiple for n in size))


def tile_sizes(opt, input_paths, device, log=print):
    """The tile size of each of `input_paths` (0: the whole image at once): --tile_size for
    the inputs larger than it; without it, tiles for the inputs whose whole-image pass would
    not fit in memory (`available_memory`, less the generator's weights on a GPU), with one
    notice line. Raises UserError, before any output, when the tiled inputs' temporary
    stores would not fit the free disk of --tmp_dir, or the smallest tiles the memory. Sizes
    come from the files' headers, the layers from the options."""
    with torch.device('meta'):  # (no memory)
        G = Generator(opt)
    steps = generator_steps(G)
    multiple = 2 ** opt.n_downsample
    shapes = [padded_shape(opt.input_ch, stored_size(path, opt.data_format_input,
                                                     opt.input_ch), multiple)
              for path in input_paths]
    if opt.tile_size:
        sizes = [opt.tile_size if max(shape[1:]) > opt.tile_size else 0 for shape in shapes]
    else:
        memory = available_memory(device)
        # (The Test script asks before loading it; in training this counts it twice.)
        if memory is not None and device.type == 'cuda':
            memory -= sum(p.numel() for p in G.parameters()) * FLOAT_BYTES
        chosen = {shape: automatic_tile_size(steps, shape, multiple, memory)
                  for shape in set(shapes)}
        sizes = [chosen[shape] for shape in shapes]
    tiled = [index for index, size in enumerate(sizes) if size]
    if not tiled:
        return sizes
    largest = max(tiled, key=lambda index: math.prod(shapes[index]))
    name, shape = os.path.basename(input_paths[largest]), shapes[largest]
    check_room_for_tiles(steps, shape, sizes[largest], name, opt.tmp_dir,
                         None if opt.tile_size else memory)
    if not opt.tile_size:
        log(f"notice: a whole-image pass over {len(tiled)} of the {len(sizes)} input(s) "
            f"(the largest {name}, {shape[1]}x{shape[2]}) needs about "
            f"{gigabytes(whole_image_bytes(steps, shape))} of memory, more than the "
            f"{gigabytes(memory)} available: translating {'it' if len(tiled) == 1 else 'them'}"
            f" in tiles of {sizes[largest]} px, with the same result (--tile_size N sets it)")
    return sizes


def check_room_for_tiles(steps, shape, tile_size, name, tmp_dir, memory=None):
    """UserError when the temporary stores of a (padded) image of (C, H, W) `shape` would
    not fit the free disk of `tmp_dir`, or (with `memory`) its tiles that memory."""
    tmp_dir = tmp_dir or tempfile.gettempdir()
    need, free = disk_bytes(steps, shape), shutil.disk_usage(tmp_dir).free
    if need > free:
        raise UserError(f"translating {name} ({shape[1]}x{shape[2]}) in tiles needs "
                        f"{gigabytes(need)} of temporary disk in {tmp_dir}, which has "
                        f"{gigabytes(free)} free; give --tmp_dir a folder with more room")
    need = tiled_bytes(steps, shape, tile_size)
    if memory is not None and need > memory:
        raise UserError(f"translating {name} ({shape[1]}x{shape[2]}) needs about "
                        f"{gigabytes(need)} of memory even in tiles of {tile_size} px, more "
                        f"than the {gigabytes(memory)} available; free memory or use a "
                        f"larger machine")


# ----------------------------------------------------------------------------------------
# Output folders: one Test run's outputs per folder (README "Output files").
# ----------------------------------------------------------------------------------------

RECORD = 'test_run.json'
# The files a Test run writes into a folder: what marks a folder as holding a run's outputs,
# and all that --overwrite removes (never other files a user keeps there).
OUTPUT_PATTERNS = ('*_AI.*', '*_panel.png', 'metrics.csv', 'metrics_summary.json',
                   'metrics_by_iteration.csv', RECORD)
# Options that change the written files, besides the generator and the data.
OUTPUT_OPTIONS = NETWORK_OPTIONS + DATA_OPTIONS + ('save_scale',)
# Options that change the metric files (recorded only with targets).
METRIC_OPTIONS = ('metric_bins', 'disk_fraction', 'active_threshold', 'disk_center_px',
                  'disk_radius_px')
# How the refusal names each part of a record that differs.
RECORD_LABELS = {'run': 'run (--dataset_name)', 'iteration': 'iteration (--iteration)',
                 'input_dir': 'input folder (--input_dir_test)', 'input_files': 'input files',
                 'target_dir': 'target folder (--target_dir_test)',
                 'target_files': 'target files',
                 'precision': 'precision (--data_type, --amp_dtype)'}


def run_record(opt, dataset, iteration, precision=None, panels=False):
    """What decides the outputs of one run into one folder, as its test_run.json holds it:
    the generator (run folder, or --model file, and iteration; -1: every saved one), the
    inputs and targets (folders and file names), the precision and every option that changes
    the files (the metric options and panels only count when there are targets, the
    compression when it is used)."""
    def names(paths):
        return [os.path.basename(path) for path in paths]

    targets = dataset.target_paths is not None
    options = {name: getattr(opt, name) for name in OUTPUT_OPTIONS}
    if targets:
        options.update({name: getattr(opt, name) for name in METRIC_OPTIONS},
                       save_panels=bool(panels))
    if getattr(opt, 'compress', False):  # (recorded when used: earlier records stay equal)
        options.update(compress=True, quantize_step=opt.quantize_step)
    model = getattr(opt, 'model', None)
    record = {'run': os.path.abspath(model or opt.checkpoint_dir), 'iteration': iteration,
              'input_dir': os.path.abspath(opt.input_dir_test),
              'input_files': names(dataset.input_paths),
              'target_dir': os.path.abspath(opt.target_dir_test) if targets else None,
              'target_files': names(dataset.target_paths) if targets else None,
              'precision': str(precision.dtype).replace('torch.', '')
              if precision is not None and precision.enabled else 'float32',
              'options': options}
    return json.loads(json.dumps(record))  # as it reads back from the file


def earlier_outputs(folder):
    """The files in `folder` that a Test run writes (OUTPUT_PATTERNS), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(entry.path for entry in os.scandir(folder) if entry.is_file() and
                  any(fnmatch.fnmatch(entry.name, pattern) for pattern in OUTPUT_PATTERNS))


def difference(folder, record):
    """None when `folder` may take the outputs of `record`'s run: it holds no Test outputs,
    or those of the same run (the same command again writes the same files). Otherwise what
    differs, in words for the refusal."""
    if not earlier_outputs(folder):
        return None
    try:
        earlier = read_json(folder, RECORD)
    except UserError:
        return f'its {RECORD} is unreadable'
    if earlier is None:
        return f'no {RECORD} says what made them'
    if earlier == record:
        return None
    changed = [RECORD_LABELS.get(key, key) for key in record
               if key != 'options' and earlier.get(key) != record[key]]
    # (METRIC_OPTIONS and --save_panels are recorded only with targets: a change of targets
    # is named already.)
    options = earlier.get('options') or {}
    changed += [f'--{name}' for name in sorted(set(options) & set(record['options']))
                if options[name] != record['options'][name]]
    return f"made with another {', '.join(changed) or RECORD}"


def remove_outputs(folder):
    for path in earlier_outputs(folder):
        os.remove(path)


def take_folder(folder, record, log=print):
    """Make `folder` hold the outputs of `record`'s run alone, writing the record before any
    output (a run stopped half-way leaves a recorded folder that the same command completes).

    The Test script has already refused a folder of another run, or emptied it for
    --overwrite; so outputs of another run are found here only by training's
    --val_during_train, which replaces them: the generator of their step was just saved
    anew, so they no longer describe any checkpoint.
    """
    reason = difference(folder, record)
    if reason:
        remove_outputs(folder)
        log(f"notice: removed the earlier outputs in {folder} ({reason})")
    write_json(os.path.join(folder, RECORD), record)


def numbered_folders(folder):
    """The iterations of the <iteration>/ subfolders of `folder`."""
    if not os.path.isdir(folder):
        return []
    return [int(entry.name) for entry in os.scandir(folder)
            if entry.is_dir() and entry.name.isdigit()]


def output_plan(opt, iterations):
    """(the folder of each iteration's outputs, the folder of a --iteration -1 run's
    metrics_by_iteration.csv or None). One iteration: straight into --output_dir (default
    Image/Test/<iteration>); -1: into DIR/<iteration>/ (default DIR: Image/Test)."""
    if opt.iteration != -1:
        return {opt.iteration: opt.output_dir or os.path.join(opt.image_dir,
                                                              str(opt.iteration))}, None
    top = opt.output_dir or opt.image_dir
    # Every <iteration>/ of DIR belongs to the run that DIR records, with this run's
    # generators or not: all are checked, and all are emptied by --overwrite.
    every = sorted(set(iterations) | set(numbered_folders(top)))
    return {iteration: os.path.join(top, str(iteration)) for iteration in every}, top


def claim_output_folders(opt, folders, record_of):
    """Before anything is written: refuse (one line naming --output_dir and --overwrite) a
    folder of `folders` ({iteration: folder}, -1 for DIR itself) that holds another run's
    outputs; with --overwrite, remove every earlier output from them instead."""
    for iteration, folder in folders.items():
        if opt.overwrite:
            remove_outputs(folder)
            continue
        reason = difference(folder, record_of(iteration))
        if reason:
            raise UserError(f"{folder} holds outputs of another run ({reason}); choose "
                            f"another --output_dir, or add --overwrite to replace them")


# ----------------------------------------------------------------------------------------
# Evaluation: the numbers a paper reports (CC after binning, errors, flux)
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Regions: the solar disk, active and quiet Sun (README "Evaluating a model")
# ----------------------------------------------------------------------------------------


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


def require_run(opt):
    """Raise UserError when ./checkpoints/<dataset_name> does not exist, naming the runs that
    do (without it, a typo in --dataset_name would surface later as a puzzling data or
    checkpoint error)."""
    if os.path.isdir(opt.checkpoint_dir):
        return
    root = os.path.dirname(opt.checkpoint_dir)
    if not os.path.isdir(root):
        raise UserError(f"no run '{opt.dataset_name}': there is no {root} folder here; run the "
                        f"Test script from the folder you trained in")
    # Folders without a generator (a run refused at start, a copy in progress) are no runs.
    runs = sorted(name for name in os.listdir(root)
                  if saved_steps(os.path.join(root, name, 'Model'), 'G'))
    close = difflib.get_close_matches(opt.dataset_name, runs, n=1)
    raise UserError(f"no run '{opt.dataset_name}' in {root}"
                    f"{f' (did you mean {close[0]!r}?)' if close else ''}; runs there: "
                    f"{', '.join(runs) if runs else 'none'}; check --dataset_name")


SATURATION_LIMITS = ('saturation_lower_limit_input', 'saturation_upper_limit_input',
                     'saturation_lower_limit_target', 'saturation_upper_limit_target')


def default_limits_notice(opt, explicit):
    """A line for a run without train_options.json (a run of the published code) whose
    saturation limits are left at this script's defaults, else None: the published code's
    defaults differ (README "Differences from the reference code"), and wrong limits give
    outputs in the wrong units without any error."""
    left = [f'--{name}' for name in SATURATION_LIMITS if name not in explicit]
    if not left:
        return None
    return (f"notice: {opt.checkpoint_dir} has no train_options.json and {' '.join(left)} "
            f"{'is' if len(left) == 1 else 'are'} at this script's defaults (lower -1, upper "
            f"1; the published code's are 0 and 255 since June 2022): pass the saturation "
            f"limits the model was trained with")


def main(argv=None):
    """Options (the network and the data's units travel with the model, from the run folder
    or a --model file), then an --export, or the translation of every input."""
    option = TestOption()
    opt = option.parse(argv)
    with GracefulStop(early='before any output was written',
                      pending='stopping after the file in progress') as stop:
        model = take_model_options(option, opt) if opt.model else take_run_options(option, opt)
        if opt.export:
            export(opt, model)
            return 0
        return test(opt, option, model, stop)


def test(opt, option, model, stop):
    """Data and checkpoints, the output folders, then every generator asked for (the one of
    the `model` file when there is one); a stop signal ends the run after the file in
    progress."""
    # Without CUDA the default --gpu_ids 0 quietly runs on the CPU; a notice is for a GPU
    # asked for by name.
    device, _ = select_device(opt, print if 'gpu_ids' in option.explicit else silent)
    if device.type == 'cpu':
        reuse_freed_memory()  # each layer's output reuses the pages of the one before
    precision = Precision(opt, device)
    notice = precision.notice()
    if notice:
        print(notice)

    # Data and checkpoints
    dataset = CustomDataset(opt)
    check_test_pairs(dataset, opt)
    disks = target_disks(dataset, opt)
    # Checked before any output: the metric that picks the best of several generators.
    key = selection_key(opt, metric_keys(opt, disks)) if disks is not None else None
    iterations = [opt.iteration] if model else iterations_asked_for(opt)
    sizes = tile_sizes(opt, dataset.input_paths, device)  # whole images or tiles

    # Output folders: refused or emptied (--overwrite) before anything is written.
    record_of = functools.partial(run_record, opt, dataset, precision=precision,
                                  panels=opt.save_panels)
    folders, top = output_plan(opt, iterations)
    claim_output_folders(opt, {**folders, **({-1: top} if top else {})}, record_of)
    if top:
        make_dirs(top)
        take_folder(top, record_of(-1))

    # Translate with every generator asked for; metrics when targets are given.
    stop.defer()
    by_iteration = []
    for iteration in iterations:
        G = load_generator(opt, opt.model or checkpoint_path(opt.model_dir, iteration, 'G'),
                           device, model['weights'] if model else None)
        rows = translate(G, dataset, folders[iteration], opt, device, iteration, precision,
                         panels=opt.save_panels, disks=disks, stop=stop, sizes=sizes)
        print(f"iteration {iteration}: {len(dataset)} file(s) written to {folders[iteration]}")
        if rows:
            by_iteration.append(write_metrics(rows, folders[iteration], iteration, opt))
    if len(by_iteration) > 1:
        write_best_iteration(by_iteration, top, key, target_sizes(dataset, opt))
    return 0


def take_run_options(option, opt):
    """The options of the run folder (`require_run`, `take_training_options`); None: there
    is no model file."""
    require_run(opt)
    take_training_options(option, opt)
    return None


def note_ignored(option):
    if option.ignored():
        print(f"note: training options have no effect here: "
              f"{' '.join('--' + name for name in option.ignored())}")


def take_training_options(option, opt):
    """The network and data options of the training run (train_options.json) unless given
    on the command line, and the targets' FITS identity cards (unit, instrument, ...) for
    generated headers; for a run without that file (a run of the published code), a notice
    when the saturation limits are left at this script's defaults."""
    note_ignored(option)
    trained = read_json(opt.checkpoint_dir, 'train_options.json')
    # Also without the file: the per-channel scaling values are then counted against the
    # channels of the command line.
    option.adopt(opt, trained or {}, NETWORK_OPTIONS + DATA_OPTIONS,
                 os.path.join(opt.checkpoint_dir, 'train_options.json'))
    if trained is None:
        notice = default_limits_notice(opt, option.explicit)
        if notice:
            print(notice)
    opt.target_header = (trained or {}).get('target_header')


# ----------------------------------------------------------------------------------------
# Sharing a model: one model file (README "Sharing a model and running it elsewhere")
# ----------------------------------------------------------------------------------------


def take_model_options(option, opt):
    """--model FILE: its run name and step (--dataset_name and --iteration, which may only
    repeat them), its network and data options (options given on the command line win, as
    over train_options.json) and the targets' identity cards. Returns the file's record
    (`load_model_file`)."""
    note_ignored(option)
    model = load_model_file(opt.model)
    for name, value in (('dataset_name', model['run']), ('iteration', model['step'])):
        if name in option.explicit and getattr(opt, name) != value:
            raise UserError(f"--{name} {getattr(opt, name)} differs from the model file's: "
                            f"{opt.model} holds run {model['run']}, step {model['step']}; "
                            f"leave out --{name} (--output_dir chooses the output folder)")
        setattr(opt, name, value)
    option.adopt(opt, model['options'], NETWORK_OPTIONS + DATA_OPTIONS, opt.model)
    opt.target_header = model['target_header']
    return model


def export_path(opt, step):
    """checkpoints/<dataset_name>/Export/<dataset_name>_<step>.pt (_bf16.pt with
    --export_dtype 16, so that neither replaces the other; .onnx with --export onnx)."""
    suffix = {'onnx': '.onnx'}.get(opt.export, '_bf16.pt' if opt.export_dtype == 16 else '.pt')
    return os.path.join(opt.checkpoint_dir, 'Export', f'{opt.dataset_name}_{step}{suffix}')


def export_source(opt, model):
    """(step, float32 weights, the file they come from) of the generator to export: the
    --model file's, or Model/<--iteration>_G.pt of the run; checked against the network the
    options build."""
    if model is not None:
        step, weights, path = model['step'], float32_weights(model['weights']), opt.model
    else:
        if opt.iteration == -1:
            raise UserError(f"--export writes one generator: give --iteration N (saved steps "
                            f"in {opt.model_dir}: "
                            f"{', '.join(map(str, saved_steps(opt.model_dir))) or 'none'})")
        path = require_checkpoint(opt.model_dir, opt.iteration, 'G')
        step, weights = opt.iteration, safe_load(path, mmap=True)
    with torch.device('meta'):
        fit_state_dict(Generator(opt), weights, path, assign=True)  # (a one-line mismatch)
    return step, weights, path


def export(opt, model):
    """--export model (`export_model_file`) or --export onnx (`export_onnx`) of the generator
    of one step, under checkpoints/<dataset_name>/Export/; returns the file's path."""
    step, weights, source = export_source(opt, model)
    path = export_path(opt, step)
    write = export_onnx if opt.export == 'onnx' else export_model_file
    return write(opt, step, weights, source, path)


def export_model_file(opt, step, weights, source, path):
    """The generator, its options, the targets' identity cards and its step as one model file
    (`model_file_record`) at `path`."""
    options = {name: getattr(opt, name) for name in NETWORK_OPTIONS + DATA_OPTIONS}
    record = model_file_record(weights, step, opt.dataset_name, options, opt.target_header,
                               bfloat16=opt.export_dtype == 16)
    if keep_existing_export(path, functools.partial(holds_model_record, record=record),
                            opt.overwrite):
        print(f"{path} already holds this export; left as it is")
        return path
    make_dirs(os.path.dirname(path))
    save_torch(record, path)
    print(f"exported step {step} of {source} to {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path


def holds_model_record(path, record):
    """Whether the model file `path` holds `record` (same weights, options, cards, step)."""
    try:
        existing = load_model_file(path)
    except UserError:
        return False
    fields = ('weights_sha256', 'options', 'target_header', 'step', 'run')
    return all(existing.get(field) == record[field] for field in fields)


def keep_existing_export(path, holds_this, overwrite):
    """Whether the export `path` already holds this export (`holds_this(path)`): then it is
    left as it is. UserError when it holds another export, unless `overwrite`: a saved file
    is never replaced unasked."""
    if not os.path.exists(path) or overwrite:
        return False
    if holds_this(path):
        return True
    raise UserError(f"{path} already holds another export (other weights or options); add "
                    f"--overwrite to replace it, or move it away")


# The ONNX model (README "Sharing a model and running it elsewhere", ONNX): its tensors'
# names, the opset, the layout of its metadata, and how closely ONNX Runtime must agree with
# PyTorch before the file is written (of the output's range).
ONNX_INPUT, ONNX_OUTPUT = 'input', 'output'
ONNX_OPSET = 17
ONNX_FORMAT = 'pix2pixCC ONNX model'
ONNX_FORMAT_VERSION = 1
ONNX_TOLERANCE = 1e-4
# Stands for the input's file name in the HISTORY lines of `product_history`.
INPUT_FILE = '{input_file}'


def require_onnx():
    """(onnx, onnxruntime), or UserError in one line naming what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as missing:
        raise UserError(f"--export onnx needs the onnx and onnxruntime packages "
                        f"({missing.name} is missing): pip install onnx onnxruntime") from None
    return onnx, onnxruntime


def export_onnx(opt, step, weights, source, path):
    """The generator as an ONNX model at `path`, with dynamic batch, height and width
    (multiples of 2**n_downsample), and the metadata (`onnx_record`) that takes physical
    input to the products of this script; written only after ONNX Runtime agreed with
    PyTorch (`onnx_difference`)."""
    onnx, onnxruntime = require_onnx()
    record = onnx_record(opt, step, weights)
    if keep_existing_export(path, functools.partial(holds_onnx_record, record=record),
                            opt.overwrite):
        print(f"{path} already holds this export; left as it is")
        return path
    with torch.device('meta'):
        G = Generator(opt)
    fit_state_dict(G, weights, source, assign=True)
    model = onnx.load_model_from_string(onnx_graph(G.eval(), opt))
    model.doc_string = (f"pix2pixCC generator of run {opt.dataset_name}, step {step}: "
                        f"normalised input -> normalised output; the 'pix2pixCC' metadata "
                        f"holds the scaling both ways")
    onnx.helper.set_model_props(model, onnx_metadata(record))
    data = model.SerializeToString()
    size, difference = onnx_difference(G, data, opt, onnxruntime)
    make_dirs(os.path.dirname(path))
    with atomic_path(path) as temporary, open(temporary, 'wb') as f:
        f.write(data)
    print(f"exported step {step} of {source} to {path} ({len(data) / 1e6:.1f} MB); ONNX "
          f"Runtime agrees with PyTorch to {difference:.1e} of the output range at "
          f"{size}x{size}")
    return path


def onnx_graph(G, opt):
    """The ONNX bytes of the generator G (eval mode, on the CPU).

    torch.onnx's TorchScript exporter (dynamo=False, opset 17): it writes dynamic height and
    width from one traced example and needs only onnx, where the dynamo exporter also needs
    onnxscript and was much slower (README "Sharing a model and running it elsewhere",
    ONNX); Mish becomes x * tanh(softplus(x)) (the Mish operator needs opset 18), which
    `onnx_difference` checks. Traced with autograd on, so that Mish takes its out-of-place
    branch (in inference it overwrites its input).
    """
    multiple = 2 ** opt.n_downsample
    example = torch.zeros(1, opt.input_ch, multiple * 4, multiple * 4)
    axes = {0: 'batch', 2: 'height', 3: 'width'}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter('ignore')  # (the exporter's deprecation and tracing notes)
        torch.onnx.export(G, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: axes})
    return buffer.getvalue()


def onnx_difference(G, data, opt, onnxruntime, size=None):
    """(size, the largest difference between ONNX Runtime's output (CPU) of the ONNX model
    `data` and G's, over the range of G's output or of [-1, 1] (the targets' saturation
    limits) if larger) for one size x size input drawn uniformly in [-1, 1] (by default the
    multiple of 2**n_downsample at or above 64). UserError above ONNX_TOLERANCE: a model
    that would give other products is never written."""
    multiple = 2 ** opt.n_downsample
    size = size or multiple * -(-64 // multiple)
    generator = torch.Generator().manual_seed(0)
    input = torch.rand(1, opt.input_ch, size, size, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = G(input).numpy()
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    output = session.run([ONNX_OUTPUT], {ONNX_INPUT: input.numpy()})[0]
    # (at least [-1, 1]: the output of a generator not trained yet can be almost constant,
    # and float32 rounding would be a large part of its range)
    difference = float(np.abs(output - expected).max() / max(np.ptp(expected), 2.0))
    if not difference <= ONNX_TOLERANCE:
        raise UserError(f"ONNX Runtime's output differs from PyTorch's by {difference:.1e} of "
                        f"its range at {size}x{size} (at most {ONNX_TOLERANCE:g} is accepted), "
                        f"so no ONNX file was written; report this with your torch, onnx and "
                        f"onnxruntime versions")
    return size, difference


def onnx_record(opt, step, weights):
    """The JSON document of an ONNX export's 'pix2pixCC' metadata (README "Sharing a model
    and running it elsewhere", ONNX): the tensors' names and the size multiple; each
    channel's scaling both ways (`Scaling.record`) and --save_scale; the unit; what a FITS
    product's header takes (the targets' identity cards, BUNIT, ORIGIN, the HISTORY lines,
    the input cards left out, the WCS and storage cards); the network and data options, the
    step, the run and the SHA-256 of the float32 weights."""
    unit = data_unit(opt)
    return {
        'format': ONNX_FORMAT, 'format_version': ONNX_FORMAT_VERSION,
        'run': opt.dataset_name, 'step': int(step),
        'input_name': ONNX_INPUT, 'output_name': ONNX_OUTPUT,
        'size_multiple': 2 ** opt.n_downsample,
        'input_channels': opt.input_ch, 'target_channels': opt.target_ch,
        'scaling': {side: [Scaling.from_options(opt, side).channel(c).record()
                           for c in range(getattr(opt, f'{side}_ch'))]
                    for side in ('input', 'target')},
        'save_scale': float(opt.save_scale), 'unit': unit,
        'fits': {'extension': opt.data_format_target if opt.data_format_target in
                 FITS_FORMATS else 'fits',
                 'bunit': scaled_unit(unit, opt.save_scale),
                 'identity': opt.target_header or {}, 'origin': list(ORIGIN_CARD),
                 'history': product_history(opt, step), 'input_file': INPUT_FILE,
                 'left_out_input_cards': LEFT_OUT_INPUT_CARD.pattern,
                 'wcs_cards': WCS_KEY.pattern, 'storage_cards': STORAGE_CARD.pattern},
        'options': {name: getattr(opt, name)
                    for name in NETWORK_OPTIONS + DATA_OPTIONS + ('save_scale',)},
        'weights_sha256': weights_sha256(weights)}


def onnx_metadata(record):
    """The ONNX model's metadata_props: the whole `record` as JSON under 'pix2pixCC', and
    readable keys for a look without parsing it."""
    return {'pix2pixCC': json.dumps(record), 'run': record['run'],
            'step': str(record['step']), 'unit': record['unit'] or '',
            'size_multiple': str(record['size_multiple'])}


def holds_onnx_record(path, record):
    """Whether the ONNX file `path` carries `record` as its 'pix2pixCC' metadata."""
    onnx, _ = require_onnx()
    try:
        props = {prop.key: prop.value for prop in onnx.load(path).metadata_props}
        return json.loads(props.get('pix2pixCC', 'null')) == json.loads(json.dumps(record))
    except Exception:  # (a damaged or foreign file: it holds another export)
        return False


def iterations_asked_for(opt):
    """The steps of the generators to run: --iteration, or every saved one for -1."""
    if opt.iteration != -1:
        require_checkpoint(opt.model_dir, opt.iteration, 'G')
        return [opt.iteration]
    iterations = saved_steps(opt.model_dir, 'G')
    if not iterations:
        raise UserError(f"no generator checkpoints (*_G.pt) in {opt.model_dir}; train first or "
                        f"check --dataset_name")
    return iterations


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


if __name__ == '__main__':
    sys.exit(run_main(main))
