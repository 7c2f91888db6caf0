"""Inference driver: translate every test input with one or every saved generator.

    python pix2pixCC_Test.py --iteration 10000 [data and network options as in training]

writes ./checkpoints/<dataset_name>/Image/Test/<iteration>/<name>_AI.<data_format_target>,
in the target's physical units.
"""
import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pix2pixCC_Networks import Generator
from pix2pixCC_Options import DATA_OPTIONS, NETWORK_OPTIONS, TestOption, UserError, run_main
from pix2pixCC_Pipeline import CustomDataset, Scaling, read_fits_header, write_array
from pix2pixCC_Utils import (Precision, atomic_path, checkpoint_path, load_state_dict,
                             make_dirs, read_json, require_checkpoint, saved_steps,
                             select_device)

FITS_FORMATS = ('fits', 'fts', 'fit')


def generate(G, input, n_downsample, precision=None):
    """G on a (B, C, H, W) input of any H, W: padded (edge values) to a multiple of
    2**n_downsample, which the network's strides need, and cropped back."""
    multiple = 2 ** n_downsample
    height, width = input.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        input = F.pad(input, (0, pad_w, 0, pad_h), mode='replicate')
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        output = G(input)
    return output[..., :height, :width].float()


def translate(G, dataset, out_dir, opt, device, iteration, precision=None):
    """Run G on every item of a test `dataset` and write `<name>_AI.<fmt>` into `out_dir`."""
    make_dirs(out_dir)
    scaling = Scaling.from_options(opt, 'target')
    copy_header = opt.data_format_input in FITS_FORMATS and opt.data_format_target in FITS_FORMATS
    loader = DataLoader(dataset, batch_size=None, num_workers=opt.n_workers)
    was_training = G.training
    G.eval()
    with torch.inference_mode():
        for index, (input, name) in enumerate(tqdm(loader, desc=f'iteration {iteration}',
                                                   unit='file', disable=None, leave=False)):
            output = generate(G, input[None].to(device), opt.n_downsample, precision)
            data = scaling.inverse(output[0].cpu().numpy())
            path = os.path.join(out_dir, f'{name}_AI.{opt.data_format_target}')
            extra = {}
            if copy_header:
                extra['header'] = read_fits_header(dataset.input_paths[index])
                extra['history'] = [
                    f'pix2pixCC: generated from {os.path.basename(dataset.input_paths[index])}',
                    f'pix2pixCC: dataset_name={opt.dataset_name} iteration={iteration}']
            elif opt.data_format_target in ('png', 'jpg', 'jpeg'):
                extra['upper_limit'] = opt.saturation_upper_limit_target
            with atomic_path(path) as temporary:
                write_array(temporary, data, opt.data_format_target, **extra)
    G.train(was_training)


def main(argv=None):
    option = TestOption()
    opt = option.parse(argv)
    trained = read_json(opt.checkpoint_dir, 'train_options.json')
    if trained:  # the network shape and the data's units travel with the model
        option.adopt(opt, trained, NETWORK_OPTIONS + DATA_OPTIONS,
                     os.path.join(opt.checkpoint_dir, 'train_options.json'))
    device, _ = select_device(opt)
    precision = Precision(opt, device)
    dataset = CustomDataset(opt)

    if opt.iteration == -1:
        iterations = saved_steps(opt.model_dir, 'G')
        if not iterations:
            raise UserError(f"no generator checkpoints (*_G.pt) in {opt.model_dir}; "
                            f"train first or check --dataset_name")
    else:
        require_checkpoint(opt.model_dir, opt.iteration, 'G')
        iterations = [opt.iteration]

    G = Generator(opt).to(device)
    for iteration in iterations:
        load_state_dict(G, checkpoint_path(opt.model_dir, iteration, 'G'))
        out_dir = os.path.join(opt.image_dir, str(iteration))
        translate(G, dataset, out_dir, opt, device, iteration, precision)
        print(f"iteration {iteration}: {len(dataset)} file(s) written to {out_dir}")
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
