"""Translating sunpy maps from Python (README "Sharing a model and running it elsewhere", From
Python, with sunpy maps): a model file (--export model) loaded once, `load_model`, then
`Model.translate(maps)`, one sunpy map or one per input channel into a map of the target (a
list of maps for several target channels), with the numbers and the FITS header rules of the
Test script's products.

Nothing of the Test script is copied: it is the same code on a map's data and header instead
of a file's. The options come from the model file as for --model (`adopt_model_file`), the
generator is built by `load_generator`, whole image or tiles as `tile_sizes` decides, the
input is arranged as the readers arrange a FITS file's data (`to_chw`), scaled both ways by
`Scaling`, and translated by `product_data`, what `translate` runs for each file; the header
is `product_header` of the map's cards, as `write_fits` writes it (`fits_hdu`).

sunpy is needed only here, and imported when a model is loaded (pip install "sunpy[map]").
"""
import contextlib
import io
import warnings

import numpy as np
import torch
from astropy.io import fits

from machinery.data_profile import profile_differences, side_profile
from machinery.files import silent
from machinery.products import STORAGE_CARD, data_unit, fits_hdu
from machinery.sharing import adopt_model_file
from machinery.tile_memory import tile_sizes
from machinery.translation import load_generator, product_data, product_header
from pix2pixCC_Options import TestOption, UserError
from pix2pixCC_Pipeline import Scaling, to_chw
from pix2pixCC_Utils import Precision, select_device

# Stands for the input's file name in the products' HISTORY line when no `name` is given.
MAP_NAME = 'a sunpy map'


def require_sunpy():
    """sunpy.map, or ImportError in one line naming what to install."""
    try:
        import sunpy.map
    except ImportError:
        raise ImportError('machinery.maps translates sunpy maps and needs sunpy: '
                          'pip install "sunpy[map]"') from None
    return sunpy.map


def load_model(path, device=None, **options):
    """The model file `path` (made with --export model) as a `Model`, ready to translate
    sunpy maps: its network, scaling, unit and targets' cards, as the Test script takes them
    with --model FILE.

    device: 'cpu', 'cuda', 'cuda:N' or a torch.device; None, as the Test script: the first
    GPU when CUDA is available, else the CPU. options: the Test script's options by name
    (tile_size=512, data_type=16, save_scale=1000, target_unit='G'), which win over the
    file's as on its command line. A file or option the Test script refuses raises
    UserError with its one line.
    """
    require_sunpy()
    option = TestOption()
    opt = parse(option, ['--model', str(path), *device_argv(device), *option_argv(options)])
    model = adopt_model_file(option, opt)
    device, _ = select_device(opt, silent if device is None else print)
    return Model(opt, model, device)


def parse(option, argv):
    """option.parse(argv), with argparse's refusal (an unknown option, a bad value) raised as
    UserError instead of exiting the Python session."""
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            return option.parse(argv)
    except SystemExit:
        reason = message.getvalue().strip().split(': error: ', 1)[-1] \
            .removesuffix(' (see --help)')
        raise UserError(f"load_model: {reason}") from None


def device_argv(device):
    """--gpu_ids of `device` (None: the Test script's default)."""
    if device is None:
        return []
    device = torch.device(device)
    if device.type == 'cpu':
        return ['--gpu_ids', '-1']
    if device.type != 'cuda':
        raise UserError(f"load_model: device {str(device)!r}: the Test script runs on 'cpu' or "
                        f"'cuda' ('cuda:N')")
    return ['--gpu_ids', str(device.index or 0)]


def option_argv(options):
    """{'tile_size': 512, 'logscale_input': [True, False]} -> ['--tile_size', '512',
    '--logscale_input', 'True', 'False'] (a list: one value per channel)."""
    argv = []
    for name, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f'--{name}', *map(str, values)]
    return argv


def as_read_by_sunpy(sunpy_map, hdu):
    """The map sunpy reads from a FITS file of `hdu`, without writing one: the metadata its
    FITS reader makes of the header (key comments kept, COMMENT and HISTORY as text), which
    Map((data, header)) alone leaves out."""
    try:  # (sunpy's own, private: sunpy 7's; without it the key comments are left out)
        from sunpy.io._fits import format_comments_and_history
    except ImportError:
        return sunpy_map.Map((hdu.data, hdu.header))
    return sunpy_map.Map((hdu.data, format_comments_and_history(hdu.header)))


class Model:
    """The generator of a model file on its device, with the options the Test script runs it
    with (`load_model`). `translate` is the Test script's translation of one input."""

    def __init__(self, opt, record, device):
        self.opt, self.device = opt, device
        self.run, self.step = opt.dataset_name, opt.iteration
        self.input_channels, self.target_channels = opt.input_ch, opt.target_ch
        self.unit = data_unit(opt)
        self.precision = Precision(opt, device)
        notice = self.precision.notice()
        if notice:
            print(notice)
        self.G = load_generator(opt, opt.model, device, record['weights']).eval()
        self.input_scaling = Scaling.from_options(opt, 'input')
        self.target_scaling = Scaling.from_options(opt, 'target')
        self.tile_size = {}  # by image size (H, W): tile_sizes' choice
        self.warned = set()  # the warnings about data unlike the training data, once each

    def __repr__(self):
        return (f"<pix2pixCC model {self.run}, step {self.step}: {self.input_channels} -> "
                f"{self.target_channels} channel(s), {self.unit or 'no unit'}, on "
                f"{self.device}>")

    def translate(self, maps, name=None):
        """The product of `maps`: one sunpy map, or a list of one per input channel (in the
        channels' order; the same size), translated as the Test script translates a FITS
        file holding their data, into one map for one target channel, a list of one per
        channel for several.

        The data are the Test script's for the same values (float32, bit for bit on the same
        machine and device). The header is a product's (README "Output files") made from
        the first map's: its place, time, observer and WCS, the targets' identity cards and
        unit, ORIGIN and HISTORY, whose line `pix2pixCC: generated from <name>` names `name`
        (the Test script's: the input file's name; default 'a sunpy map'). Each map of
        several target channels has the header of a one-channel product (the file's third
        WCS axis, the channel index, is the list's index). Warns, as the Test script does,
        when the data are unlike the model's training data.
        """
        sunpy_map = require_sunpy()
        maps = [maps] if isinstance(maps, sunpy_map.GenericMap) else list(maps)
        name = name or MAP_NAME
        input, headers = self.input_of(maps, name, sunpy_map.GenericMap)
        normalised = self.input_scaling.forward(input)
        self.warn_unlike_training(headers, normalised, name)
        size = tuple(input.shape[1:])
        if size not in self.tile_size:
            self.tile_size[size] = tile_sizes(self.opt, [name], self.device,
                                              image_sizes=[size])[0]
        with torch.inference_mode():
            data = product_data(self.G, torch.from_numpy(normalised), self.target_scaling,
                                self.opt, self.device, self.precision, self.tile_size[size],
                                desc=name)
        header = product_header(self.opt, headers[0], name, self.step, input_channels=1,
                                channels=1)
        products = [as_read_by_sunpy(sunpy_map, fits_hdu(channel, header)) for channel in data]
        return products[0] if len(products) == 1 else products

    def input_of(self, maps, name, map_type):
        """(C x H x W float32 data, one header per channel) of `maps`: the data as the
        readers give a FITS file's (`to_chw`), each map's cards but those of how its data
        were stored (which describe the map's file, not its image)."""
        if not maps or not all(isinstance(one, map_type) for one in maps):
            raise TypeError(f"translate takes a sunpy map or a list of them, one per input "
                            f"channel; got {type(maps[0] if maps else maps).__name__}")
        if len(maps) != self.input_channels:
            raise UserError(f"{name}: the model takes {self.input_channels} input channel(s), "
                            f"one map each; got {len(maps)} map(s)")
        shapes = {one.data.shape for one in maps}
        if len(shapes) > 1:
            raise UserError(f"{name}: the maps differ in size ({', '.join(map(str, shapes))}); "
                            f"the channels of an input are one image each")
        data = np.stack([np.asarray(one.data) for one in maps]) if len(maps) > 1 else \
            np.asarray(maps[0].data)
        input = to_chw(data, self.input_channels, name)
        headers = [fits.Header([card for card in one.fits_header.cards
                                if not STORAGE_CARD.fullmatch(card.keyword)])
                   for one in maps]
        return input, headers

    def warn_unlike_training(self, headers, normalised, name):
        """The Test script's warnings about data unlike the training data
        (machinery/data_profile.py), each kind (unit, passband, ...) the first time this
        model meets it: a loop over an archive is told once, as the Test script tells a
        folder."""
        profile = {'input': side_profile([(headers, normalised)])}
        for line in profile_differences(getattr(self.opt, 'training_data', None), profile,
                                        {'input': name}):
            kind = line.split(')', 1)[0]  # 'warning: data unlike the training data (unit'
            if kind not in self.warned:
                self.warned.add(kind)
                warnings.warn(line.removeprefix('warning: '), stacklevel=3)
