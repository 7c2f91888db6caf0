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
from pix2pixCC_Options import NOT_RESUMED, BaseOption, TrainOption, UserError, run_main
from pix2pixCC_Pipeline import CustomDataset, check_dataset, check_pairing
from pix2pixCC_Test import translate
from pix2pixCC_Utils import (Manager, Precision, checkpoint_path, load_state_dict, make_dirs,
                             newest_complete_step, options_record, read_json, require_checkpoint,
                             rng_states, safe_load, select_device, set_rng_states, set_seed,
                             state_path, write_json)


class EpochSampler(Sampler):
    """Sample order of one epoch, and a seed for each sample's augmentation.

    Both are drawn from (run seed, epoch), not from a running RNG, so a resumed run sees the
    same order and augmentation as an uninterrupted one and can skip the samples already done.
    Yields (index, seed) items for CustomDataset.
    """

    def __init__(self, n_samples, shuffle, seed):
        self.n_samples, self.shuffle, self.seed = n_samples, shuffle, seed
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def items(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = (torch.randperm(self.n_samples, generator=generator) if self.shuffle
                 else torch.arange(self.n_samples))
        seeds = torch.randint(0, 2**62, (self.n_samples,), generator=generator)
        return list(zip(order.tolist(), seeds.tolist()))

    def __iter__(self):
        return iter(self.items()[self.start:])

    def __len__(self):
        return self.n_samples - self.start


def resume_point(option, opt):
    """Resolve --latest_iter (-1: newest complete checkpoint) and take the resumed run's
    options from its training state (or train_options.json); returns the state or None."""
    if opt.latest_iter == 0:
        return None
    step = newest_complete_step(opt.model_dir) if opt.latest_iter == -1 else opt.latest_iter
    if step is None:
        raise UserError(f"--latest_iter -1: no checkpoint to resume from in {opt.model_dir}")
    require_checkpoint(opt.model_dir, step, 'G')
    require_checkpoint(opt.model_dir, step, 'D')
    state = safe_load(state_path(opt.model_dir, step)) \
        if os.path.isfile(state_path(opt.model_dir, step)) else None
    saved = state['options'] if state else read_json(opt.checkpoint_dir, 'train_options.json')
    if saved:
        option.adopt(opt, saved, [k for k in saved if k not in NOT_RESUMED], f'the run at step {step}')
    opt.latest_iter = step
    if state is None:
        print(f"notice: no {state_path(opt.model_dir, step)}; resuming from the weights alone "
              f"(the optimisers start afresh)")
    return state


def main(argv=None):
    # Options (a resumed run takes the options it was trained with, unless given again)
    option = TrainOption()
    opt = option.parse(argv)
    state = resume_point(option, opt)
    if opt.seed is None:
        opt.seed = int(torch.randint(0, 2**31 - 1, (1,)))
    set_seed(opt.seed)
    device, gpu_ids = select_device(opt)
    precision = Precision(opt, device)
    make_dirs(opt.model_dir, opt.image_dir)

    # Data: every file is read and checked once before any network is built.
    dataset = CustomDataset(opt)
    if opt.check_pairing:
        check_pairing(dataset.input_paths, dataset.target_paths)
    height, width = check_dataset(dataset, 2 ** opt.n_downsample, opt.n_workers,
                                  progress=lambda it: tqdm(it, desc='checking data', unit='pair',
                                                           disable=None, leave=False))
    if opt.data_size != height:
        print(f"notice: the data are {height}x{width}; --data_size {opt.data_size} is ignored")
    val_dataset = CustomDataset(opt, split='test') if opt.val_during_train else None
    sampler = EpochSampler(len(dataset), shuffle=not opt.no_shuffle, seed=opt.seed)
    loader = DataLoader(dataset, batch_size=opt.batch_size, sampler=sampler,
                        num_workers=opt.n_workers, pin_memory=device.type == 'cuda',
                        persistent_workers=opt.n_workers > 0)

    # Networks and optimisers
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    if opt.latest_iter > 0:
        load_state_dict(G, checkpoint_path(opt.model_dir, opt.latest_iter, 'G'))
        load_state_dict(D, checkpoint_path(opt.model_dir, opt.latest_iter, 'D'))
    G, D = G.to(device), D.to(device)
    if len(gpu_ids) > 1:
        G = torch.nn.DataParallel(G, device_ids=gpu_ids)
        D = torch.nn.DataParallel(D, device_ids=gpu_ids)
    criterion = Loss(opt)
    G_optim = torch.optim.Adam(G.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2))
    D_optim = torch.optim.Adam(D.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2))
    if state is not None:
        G_optim.load_state_dict(state['G_optim'])
        D_optim.load_state_dict(state['D_optim'])
        precision.scaler.load_state_dict(state['scaler'])
        set_rng_states(state['rng'])

    def training_state():
        return {'G_optim': G_optim.state_dict(), 'D_optim': D_optim.state_dict(),
                'scaler': precision.scaler.state_dict(), 'rng': rng_states(),
                'options': options_record(opt)}

    write_json(os.path.join(opt.checkpoint_dir, 'train_options.json'), options_record(opt))
    print(BaseOption.describe(opt))
    print(f"Generator: {count_parameters(G):,} parameters; Discriminator: "
          f"{count_parameters(D):,}; device: {device}; seed: {opt.seed}"
          f"{'; mixed precision ' + str(precision.dtype) if precision.enabled else ''}")

    def validate(step):
        translate(G, val_dataset, os.path.join(opt.checkpoint_dir, 'Image', 'Test', str(step)),
                  opt, device, step, precision)

    progress = tqdm(total=opt.n_epochs * len(dataset), initial=opt.latest_iter, unit='sample',
                    disable=None, dynamic_ncols=True)
    manager = Manager(opt, G, D, training_state, log=progress.write,
                      validate=validate if opt.val_during_train else None)

    # Loop: generate, score D on real and fake, step G (D frozen inside the Loss), step D.
    # One epoch is one pass over the data; current_step counts samples.
    current_step = opt.latest_iter
    n_samples = len(dataset)
    epoch = current_step // n_samples
    for epoch in range(current_step // n_samples + 1, opt.n_epochs + 1):
        sampler.set_epoch(epoch, start=current_step - (epoch - 1) * n_samples)
        for input, target in loader:
            input = input.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)

            with precision.autocast():
                loss_D, loss_G, target, fake = criterion(D, G, input, target)
            if not torch.isfinite(loss_D.detach() + loss_G.detach()):
                raise UserError(f"the loss is not finite at step {current_step + input.shape[0]} "
                                f"(D {float(loss_D):.4g}, G {float(loss_G):.4g}); training "
                                f"stopped before updating the weights; last good checkpoint: "
                                f"{manager.last_good()}; a lower --lr may help")

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
    manager.finish(current_step, epoch)
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
