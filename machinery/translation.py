"""Translating images with a generator, shared by the Test script and by training's
validation (README "Output files"): `load_generator` (a checkpoint or model file placed for
inference), `generate` (one image, whole or in tiles), `translate` (every input of a dataset
into its products and, with targets, its metrics and panels), the products' paths and FITS
headers, and what --skip_existing keeps of an earlier run.
"""
import contextlib
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS
from torch.utils.data import DataLoader
from tqdm import tqdm

from machinery.evaluation import aligned, image_metrics, target_pixel_area
from machinery.figures import save_panel
from machinery.files import atomic_path, make_dirs
from machinery.memory import release_mapped_weights_after_use
from machinery.outputs import run_record, take_folder
from machinery.products import (INPUT_FILE, data_unit, generated_header, product_history,
                                scaled_unit, write_array)
from machinery.run_safety import StopRequested, ignore_stop_signals
from machinery.tile_memory import tile_sizes
from machinery.tiles import PROGRESS_DELAY, tiled_generate
from machinery.whole_image import inference_runner
from pix2pixCC_Networks import Generator
from pix2pixCC_Options import FITS_FORMATS, channel_values
from pix2pixCC_Pipeline import Scaling, read_array
from pix2pixCC_Utils import (bare, fit_state_dict, float32_weights, load_state_dict,
                             memory_format, prepare_network)


def generate(G, input, n_downsample, precision=None, tile_size=0, tmp_dir=None, desc=None):
    """G on a (B, C, H, W) input of any H, W: padded (edge values) to a multiple of
    2**n_downsample, which the network's strides need, and cropped back.

    tile_size: when the image is larger, run it in tiles of that many pixels with the same
    result (`tiled_generate`, temporary files in `tmp_dir`); desc: the title of a progress
    bar, shown when the image takes more than a few seconds. A whole image in float32
    inference runs through `inference_runner` (normalisations and activations in place where
    the graph allows: the same output, fewer full-size maps).
    """
    multiple = 2 ** n_downsample
    height, width = input.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        input = F.pad(input, (0, pad_w, 0, pad_h), mode='replicate')
    if tile_size and max(input.shape[-2:]) > tile_size:
        output = tiled_generate(G, input, tile_size, precision, tmp_dir, desc, multiple)
    else:
        float32 = precision is None or not precision.enabled
        forward = inference_runner(bare(G), input, multiple) if float32 and not \
            torch.is_grad_enabled() and not hasattr(G, '_orig_mod') else G
        with precision.autocast() if precision is not None else contextlib.nullcontext(), \
                layer_progress(G, desc):
            output = forward(input)
    return output[..., :height, :width].float()


@contextlib.contextmanager
def layer_progress(G, desc):
    """A progress bar of the calls of G's layers titled `desc`, shown when the pass takes
    more than PROGRESS_DELAY seconds (none without `desc`, or for a compiled G, which runs no
    per-layer hooks). Its count is of calls: a layer called twice counts twice."""
    if desc is None or hasattr(G, '_orig_mod'):
        yield
        return
    layers = [layer for layer in bare(G).modules() if not list(layer.children())]
    with tqdm(desc=desc, unit='layer', leave=False, disable=None,
              delay=PROGRESS_DELAY) as bar:
        handles = [layer.register_forward_hook(lambda *_: bar.update()) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def product_header(opt, input_header, input_name, iteration, input_channels=None,
                   channels=None):
    """FITS header of the product of the input named `input_name` (in its HISTORY) whose
    header is `input_header` (None: none): the input's geometry and time, the training
    targets' identity cards and unit (divided by --save_scale), and the provenance.
    input_channels, channels: how many the input header's data and the product hold
    (default --input_ch, --target_ch; machinery/maps.py: one 2-D map each)."""
    history = [line.replace(INPUT_FILE, input_name) for line in product_history(opt, iteration)]
    return generated_header(input_header, getattr(opt, 'target_header', None) or {},
                            scaled_unit(data_unit(opt), opt.save_scale), history,
                            input_channels=input_channels or opt.input_ch,
                            channels=channels or opt.target_ch)


def panel_wcs(header):
    """The celestial WCS of a generated FITS file's `header` for its panel's axes (README
    "Output files", Panels), or None without one."""
    if header is None:
        return None
    with warnings.catch_warnings():  # (astropy's notes on cards it fixes, e.g. DATE-OBS)
        warnings.simplefilter('ignore', AstropyWarning)
        wcs = WCS(header)
    return wcs.celestial if wcs.has_celestial else None


def panel_options(opt, input_header, header):
    """What save_panel needs beside the data: the input's scaling and unit (the BUNIT of its
    `input_header`, FITS inputs only) and the WCS of the generated file's `header` (None for
    other formats)."""
    return dict(input_scaling=Scaling.from_options(opt, 'input'),
                input_unit=(input_header or {}).get('BUNIT') or None, wcs=panel_wcs(header))


def load_generator(opt, path, device, state=None):
    """The generator saved in `path`, placed on `device` for inference; `state`: its weights
    as read from the model file `path` (`load_model_file`), cast to float32 if stored in
    bfloat16.

    It is built on the 'meta' device (no memory) and given the checkpoint's tensors mapped
    from a private copy of the file (`load_weights`), so its weights are held once while
    loading (774 MB for the default network), not twice as with a built module plus a loaded
    state_dict, and stay those of the file as it was read. Its `weights_file_sha256` is that
    copy's SHA-256 (None for `state` read otherwise), which the output folder's record takes.
    """
    with torch.device('meta'):
        G = Generator(opt)
    if state is None:
        snapshot = load_state_dict(G, path, assign=True)
    else:
        snapshot = getattr(state, 'snapshot', None)  # (MappedWeights of load_model_file)
        fit_state_dict(G, float32_weights(state), path, assign=True)
    G.weights_file_sha256 = snapshot.sha256 if snapshot is not None else None
    G = prepare_network(G, opt, device)
    if not opt.compile:  # (a compiled graph runs no per-layer Python hooks)
        release_mapped_weights_after_use(G, snapshot)
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
    (`input_tile_sizes`, which is asked when None).
    """
    if sizes is None:
        sizes = input_tile_sizes(opt, dataset, device)
    make_dirs(out_dir)
    # The record names the weights that run: those of the file as load_generator read it.
    take_folder(out_dir, run_record(opt, dataset, iteration, precision, panels,
                                    getattr(bare(G), 'weights_file_sha256', None)))
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
            data = product_data(G, input, scaling, opt, device, precision, sizes[index], name)
            input_header = (dataset.headers('input', index) or [None])[0]  # (FITS, stores)
            header = write_output(output_path(out_dir, name, opt), data, opt, input_header,
                                  dataset.input_source(index), iteration)

            if dataset.target_paths is not None:
                real = dataset.read_target(index)
                generated = data / np.float32(opt.save_scale)  # metrics in the target's units
                rows[index] = file_metrics(dataset, index, real, generated, opt, disks)
                if panels:
                    save_panel(os.path.join(out_dir, f'{name}_panel.png'), input.numpy(), real,
                               generated, scaling, unit=unit, data_format=opt.data_format_target,
                               title=f'{os.path.basename(dataset.input_paths[index])}, '
                                     f'iteration {iteration}',
                               **panel_options(opt, input_header, header))
            stop_if_asked(stop, done, len(dataset), out_dir)
    G.train(was_training)
    return aligned([rows[index] for index in sorted(rows)])


def product_data(G, input, scaling, opt, device, precision=None, tile_size=0, desc=None):
    """The product of one normalised C x H x W `input` (a tensor, as the dataset gives it):
    G's output (`generate`, whole or in tiles of `tile_size`) mapped back by the target's
    `scaling`, C x H x W float32 in physical units times --save_scale. Call it under
    torch.inference_mode() with G in eval mode, as `translate` and machinery/maps.py do."""
    batch = input[None].to(device, memory_format=memory_format(device))
    output = generate(G, batch, opt.n_downsample, precision, tile_size, opt.tmp_dir, desc=desc)
    return scaling.inverse(output[0].cpu().numpy())


def input_tile_sizes(opt, dataset, device):
    """`tile_sizes` of the inputs of `dataset`, their sizes from its `input_size` (the
    files' headers, or the SDOML arrays' shapes)."""
    return tile_sizes(opt, dataset.input_paths, device,
                      image_sizes=[dataset.input_size(index) for index in range(len(dataset))])


def output_path(out_dir, name, opt):
    """The generated file of the input named `name` (without its extension)."""
    return os.path.join(out_dir, f'{name}_AI.{opt.data_format_target}')


def write_output(path, data, opt, input_header, input_name, iteration):
    """Write the generated `data` (C x H x W, physical units times --save_scale) of the input
    named `input_name` (`input_header`: its FITS header, None without) to `path` atomically
    (a complete file has its final name), with its FITS header (`product_header`,
    tile-compressed with --compress) or its PNG bit depth; returns the header (None for
    other formats)."""
    extra = {'header': None}
    if opt.data_format_target in FITS_FORMATS:
        extra['header'] = product_header(opt, input_header, input_name, iteration)
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
        target_pixel_area(opt, dataset, index))}


def input_name(path):
    """An input file's name without its extension, which names its outputs."""
    return os.path.splitext(os.path.basename(path))[0]


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
