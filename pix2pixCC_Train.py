"""Training driver.

    python pix2pixCC_Train.py --input_dir_train DIR --target_dir_train DIR [options]

writes ./checkpoints/<dataset_name>/{Model/<step>_G.pt, <step>_D.pt, Image/Train/...}.
"""
import os
import sys

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from pix2pixCC_Networks import Discriminator, Generator, Loss, count_parameters, weights_init
from pix2pixCC_Options import BaseOption, TrainOption, UserError, run_main
from pix2pixCC_Pipeline import CustomDataset
from pix2pixCC_Test import translate
from pix2pixCC_Utils import (Manager, Precision, checkpoint_path, load_state_dict, make_dirs,
                             require_checkpoint, select_device, set_seed, write_json)


class EpochSampler(Sampler):
    """Sample order of one epoch: a permutation drawn from (seed, epoch), or name order.

    Deriving the order from the epoch number (not from a running RNG) lets a resumed run
    see the same order as an uninterrupted one, and skip the samples already done.
    """

    def __init__(self, n_samples, shuffle, seed):
        self.n_samples, self.shuffle, self.seed = n_samples, shuffle, seed
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def order(self):
        if not self.shuffle:
            return list(range(self.n_samples))
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n_samples, generator=generator).tolist()

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self):
        return self.n_samples - self.start


def check_first_pair(dataset, opt):
    """Read one pair before any network is built, so a wrong format or channel count fails
    in seconds, and check that the network's strides fit the image size."""
    input, target = dataset[0]
    height, width = input.shape[-2:]
    multiple = 2 ** opt.n_downsample
    if height % multiple or width % multiple:
        raise UserError(f"{dataset.input_paths[0]} is {height}x{width}, but with --n_downsample "
                        f"{opt.n_downsample} height and width must be multiples of {multiple}; "
                        f"crop or pad the data, or lower --n_downsample")
    if opt.data_size != height:
        print(f"notice: the data are {height}x{width}; --data_size {opt.data_size} is ignored")


def main(argv=None):
    # Options
    option = TrainOption()
    opt = option.parse(argv)
    if opt.seed is None:
        opt.seed = int(torch.randint(0, 2**31 - 1, (1,)))
    set_seed(opt.seed)
    device, gpu_ids = select_device(opt)
    precision = Precision(opt, device)

    # Data
    dataset = CustomDataset(opt)
    check_first_pair(dataset, opt)
    val_dataset = CustomDataset(opt, split='test') if opt.val_during_train else None
    sampler = EpochSampler(len(dataset), shuffle=not opt.no_shuffle, seed=opt.seed)
    loader = DataLoader(dataset, batch_size=opt.batch_size, sampler=sampler,
                        num_workers=opt.n_workers, pin_memory=device.type == 'cuda',
                        persistent_workers=opt.n_workers > 0)

    # Networks
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    if opt.latest_iter > 0:
        load_state_dict(G, require_checkpoint(opt.model_dir, opt.latest_iter, 'G'))
        load_state_dict(D, require_checkpoint(opt.model_dir, opt.latest_iter, 'D'))
    G, D = G.to(device), D.to(device)
    if len(gpu_ids) > 1:
        G = torch.nn.DataParallel(G, device_ids=gpu_ids)
        D = torch.nn.DataParallel(D, device_ids=gpu_ids)
    criterion = Loss(opt)
    G_optim = torch.optim.Adam(G.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2))
    D_optim = torch.optim.Adam(D.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2))

    # Outputs
    make_dirs(opt.model_dir, opt.image_dir)
    write_json(os.path.join(opt.checkpoint_dir, 'train_options.json'), vars(opt))
    print(BaseOption.describe(opt))
    print(f"Generator: {count_parameters(G):,} parameters; Discriminator: "
          f"{count_parameters(D):,}; device: {device}"
          f"{'; mixed precision ' + str(precision.dtype) if precision.enabled else ''}")

    def validate(step):
        translate(G, val_dataset, os.path.join(opt.checkpoint_dir, 'Image', 'Test', str(step)),
                  opt, device, step, precision)

    progress = tqdm(total=opt.n_epochs * len(dataset), initial=opt.latest_iter, unit='sample',
                    disable=None, dynamic_ncols=True)
    manager = Manager(opt, G, D, log=progress.write,
                      validate=validate if opt.val_during_train else None)

    # Loop: one epoch is one pass over the data; current_step counts samples.
    current_step = opt.latest_iter
    n_samples = len(dataset)
    for epoch in range(current_step // n_samples + 1, opt.n_epochs + 1):
        sampler.set_epoch(epoch, start=current_step - (epoch - 1) * n_samples)
        for input, target in loader:
            input = input.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)

            with precision.autocast():
                loss_D, loss_G, target, fake = criterion(D, G, input, target)

            G_optim.zero_grad(set_to_none=True)
            precision.scaler.scale(loss_G).backward()
            precision.scaler.step(G_optim)
            D_optim.zero_grad(set_to_none=True)
            precision.scaler.scale(loss_D).backward()
            precision.scaler.step(D_optim)
            precision.scaler.update()

            previous_step, current_step = current_step, current_step + input.shape[0]
            progress.update(input.shape[0])
            manager.after_step(epoch, previous_step, current_step, n_samples,
                               (input, target, fake), criterion.terms)
    progress.close()
    manager.finish(current_step)
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
