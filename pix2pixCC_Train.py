"""Training driver.

    python pix2pixCC_Train.py --input_dir_train DIR --target_dir_train DIR [options]
    python pix2pixCC_Train.py --sdoml_input STORE --sdoml_target STORE
        --sdoml_input_arrays 171A 193A 304A [--sdoml_target_arrays Bz] [options]

writes ./checkpoints/<dataset_name>/{Model/<step>_G.pt, <step>_D.pt, Image/Train/...}.
"""
import contextlib
import functools
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from machinery.distributed import Distributed
from machinery.evaluation import check_test_pairs, summarize, target_disks
from machinery.files import (WriteError, make_dirs, options_record, read_json, silent, write_csv,
                             write_json)
from machinery.products import data_unit
from machinery.run_safety import GracefulStop, RunLock, ignore_stop_signals, signal_name
from machinery.translation import translate
from pix2pixCC_Networks import Discriminator, Generator, Loss, count_parameters, weights_init
from pix2pixCC_Options import NOT_RESUMED, BaseOption, TrainOption, UserError, run_main
from machinery.data_checks import check_dataset, check_pairing
from machinery.data_profile import dataset_profile
from machinery.sdoml_data import keep_run_pairs, make_dataset, run_pairs
from pix2pixCC_Pipeline import Scaling, file_unit, target_identity
from pix2pixCC_Utils import (Manager, Precision, bare, checkpoint_path, cpu_requested,
                             load_state_dict, memory_format, newest_complete_step,
                             prepare_network, require_checkpoint, require_tensorboard,
                             rng_states, safe_load, saved_steps, set_rng_states, state_path,
                             supersede_newer_checkpoints)


class EpochSampler(DistributedSampler):
    """DistributedSampler that also gives each sample a seed for its augmentation, and can
    start an epoch part-way (to resume).

    The epoch's order and the seeds are drawn from (run seed, epoch), not from a running RNG,
    so a resumed run sees the same order and augmentation as an uninterrupted one, whatever
    the number of data-loading workers. Each of `num_replicas` processes takes every
    `num_replicas`-th item. Yields (index, seed) items for CustomDataset.
    """

    def __init__(self, n_samples, shuffle, seed, num_replicas=1, rank=0):
        super().__init__(range(n_samples), num_replicas=num_replicas, rank=rank,
                         shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """`start`: samples of this epoch already done (by all processes together)."""
        super().set_epoch(epoch)
        self.start = start

    def items(self):
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (n,), generator=generator)
        items = list(zip(order.tolist(), seeds.tolist(), strict=True))[self.start:]
        items += items[:-len(items) % self.num_replicas or 0]  # equal shares, as DistributedSampler
        return items[self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self.items())

    def __len__(self):
        return -(-(len(self.dataset) - self.start) // self.num_replicas)


def make_optimizer(parameters, opt):
    """Adam with the options' lr and betas; the fused kernel where this torch has it.

    The fused kernel updates every weight in one pass (CUDA; the CPU from torch 2.4), with
    no temporaries per parameter (its effect on a CPU step: BENCHMARKS.md).
    """
    parameters, betas = list(parameters), (opt.beta1, opt.beta2)
    try:
        return torch.optim.Adam(parameters, lr=opt.lr, betas=betas, fused=True)
    except RuntimeError:
        return torch.optim.Adam(parameters, lr=opt.lr, betas=betas)


def train_step(criterion, G, D, G_optim, D_optim, precision, input, target, check=None):
    """One step of the algorithm: generate, score D on real and fake, step G (D is frozen
    inside the Loss, so only G gets gradients), then step D (fake was detached).

    input, target: (B, C, H, W) normalised. `check(loss_D, loss_G)` runs before any weight
    changes and may raise. Returns (loss_D, loss_G, target, fake).
    """
    with precision.autocast():
        loss_D, loss_G, target, fake = criterion(D, G, input, target)
    if check is not None:
        check(loss_D, loss_G)
    precision.scaler.scale(loss_G).backward()
    precision.scaler.step(G_optim)
    precision.scaler.scale(loss_D).backward()
    precision.scaler.step(D_optim)
    precision.scaler.update()
    # Free the gradients now rather than before the next backward: they are not held
    # through checkpointing, validation and the next forward pass (lower peak memory).
    G_optim.zero_grad(set_to_none=True)
    D_optim.zero_grad(set_to_none=True)
    return loss_D, loss_G, target, fake


def resume_point(option, opt, log=print):
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
        option.adopt(opt, saved, [k for k in saved if k not in NOT_RESUMED],
                     f'the run at step {step}', log)
    opt.latest_iter = step
    if state is None:
        log(f"notice: no {state_path(opt.model_dir, step)}; resuming from the weights alone "
            f"(the optimisers start afresh)")
    return state


def check_data(dataset, opt, log=print, given=()):
    """Read and check every training pair before any network is built (a bad file fails in
    seconds, not hours); returns the data's (height, width). `given`: the options named on
    the command line (--data_size, informational, is mentioned only when given)."""
    if opt.check_pairing:
        check_pairing(dataset.input_paths, dataset.target_paths)
    height, width = check_dataset(dataset, 2 ** opt.n_downsample, opt.n_workers, log=log,
                                  progress=lambda it: tqdm(it, desc='checking data', unit='pair',
                                                           disable=None, leave=False),
                                  crop_size=opt.crop_size)
    if opt.data_size != height and 'data_size' in given:
        log(f"notice: the data are {height}x{width}; --data_size {opt.data_size} is ignored")
    # Each PatchDiscriminator needs at least 24x24 pixels at its scale, and scale i sees the
    # pair (or its --crop_size window) pooled i times.
    smallest = opt.crop_size or min(height, width)
    for _ in range(opt.n_D - 1):
        smallest = (smallest + 1) // 2
    if smallest < 24:
        trained = f"--crop_size {opt.crop_size}" if opt.crop_size else \
            f"the data are {height}x{width}, which is"
        raise UserError(f"{trained} too small for --n_D {opt.n_D}: the coarsest "
                        f"discriminator scale would see {smallest} px (at least 24 needed); "
                        f"lower --n_D or use larger {'windows' if opt.crop_size else 'images'}")
    return height, width


class Aborted(UserError):
    """A second Ctrl-C while a stop was pending: exit at once, status 130."""
    exit_status = 130


def resume_advice(model_dir):
    """Where a stopped or failed run can be taken up again, for its last line."""
    step = newest_complete_step(model_dir)
    if step is None:
        return 'no checkpoint was saved yet'
    return (f"the newest complete checkpoint, {checkpoint_path(model_dir, step, 'G')} "
            f"(step {step}), is intact; resume with --latest_iter -1")


def start_up_summary(opt, dataset, size, G, D, device, precision):
    """The few lines that matter when a run starts (--verbose adds every option)."""
    unit = data_unit(opt)
    run = f"resuming from step {opt.latest_iter}" if opt.latest_iter else "new run"
    run_line = (f"run: {opt.checkpoint_dir} ({run}; every option in "
                f"{os.path.join(opt.checkpoint_dir, 'train_options.json')})")
    windows = f"; trained on {opt.crop_size}x{opt.crop_size} windows" if opt.crop_size else ''
    data_line = (f"data: {len(dataset)} pairs of {size[0]}x{size[1]} px ({dataset.kind()}, "
                 f"{opt.input_ch} -> {opt.target_ch} channel(s)"
                 f"{f', target unit {unit}' if unit else ''}) from {dataset.input_dir} and "
                 f"{dataset.target_dir}{windows}")
    network_line = (f"network: generator {count_parameters(G):,} parameters, discriminator "
                    f"{count_parameters(D):,}")
    no_cuda = ' (no CUDA GPU found)' if device.type == 'cpu' and not cpu_requested(opt) else ''
    device_line = (f"device: {device}{no_cuda}"
                   f"{'; mixed precision ' + str(precision.dtype)[6:] if precision.enabled else ''}"
                   f"; seed: {opt.seed}")
    lines = (run_line, data_line, network_line, device_line)
    return '\n'.join(lines)


def main(argv=None):
    option = TrainOption()
    opt = option.parse(argv)
    # Under torchrun this is one of several processes; rank 0 holds the run folder's lock
    # and writes files. A stop signal before the first step exits at once; from the first
    # step on it ends the run after the step in progress, with a checkpoint.
    cluster = Distributed()
    log = print if cluster.is_main else silent
    with GracefulStop() as stop, contextlib.ExitStack() as cleanup:
        # Without CUDA the default --gpu_ids 0 runs on the CPU, which the start-up lines say;
        # a notice is for a GPU asked for by name.
        device, gpu_ids = cluster.setup(opt, log if 'gpu_ids' in option.explicit else silent)
        cleanup.callback(cluster.close)
        # A resumed run takes the options it was trained with, unless they are given again
        # (read before the lock: a run with nothing to resume creates no folder).
        state = resume_point(option, opt, log)
        if opt.tensorboard:
            require_tensorboard()
        if cluster.is_main:
            cleanup.callback(remove_if_refused, missing_folders(opt.checkpoint_dir), stop)
        lock = RunLock(opt.checkpoint_dir, log)
        cleanup.callback(lock.release)
        cluster.on_main(lock.acquire)
        try:
            return train(opt, state, cluster, device, gpu_ids, stop, log, option.explicit)
        except WriteError as error:
            raise UserError(f"{error}; {resume_advice(opt.model_dir)} once there is room"
                            ) from None


def missing_folders(folder):
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_if_refused(created, stop):
    """When the run ended before its first training step (refused, or stopped while
    starting), remove the folders it created (`missing_folders` of the run folder at the
    start), so that nothing is left that looks like a run."""
    if stop.deferring or not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:  # ./checkpoints, if this run made it and it is empty
        with contextlib.suppress(OSError):
            os.rmdir(parent)


def train(opt, state, cluster, device, gpu_ids, stop, log, given=()):
    """The algorithm: the data, the networks (restored when resuming), then the loop of
    step, report, save and validate (`loop`). Returns the exit status."""
    if opt.seed is None:
        opt.seed = cluster.broadcast(int(torch.randint(0, 2**31 - 1, (1,))))
    set_seed(opt.seed)
    precision = Precision(opt, device)
    notice = precision.notice()
    if notice:
        log(notice)
    cluster.on_main(lambda: make_dirs(opt.model_dir, opt.image_dir))

    # Data: paired files, or the pairs of SDOML stores (kept with the run: `run_pairs`)
    pairs = run_pairs(opt, log)
    dataset = make_dataset(opt, pairs=pairs)
    if opt.latest_iter >= last_step(opt, len(dataset)):
        log(nothing_left_to_train(opt, len(dataset)))
        return 0
    val_dataset = make_dataset(opt, 'test', pairs) if opt.val_during_train else None
    if val_dataset is not None:  # (found at the first save, a mismatch would end the run)
        cluster.on_main(lambda: check_test_pairs(val_dataset, opt))
    size = prepare_data(dataset, opt, cluster, log, given)
    loader = make_loader(dataset, opt, cluster, device)

    # Networks, optimisers and, when resuming, the training state
    nets = build_networks(opt, cluster, device, gpu_ids, precision)
    if state is not None:
        nets.restore(state, opt)
    if cluster.is_main:
        supersede_newer_checkpoints(opt.model_dir, opt.latest_iter, log)
        write_json(os.path.join(opt.checkpoint_dir, 'train_options.json'), options_record(opt))
        keep_run_pairs(opt, pairs)
    if opt.verbose:
        log(BaseOption.describe(opt))
    log(start_up_summary(opt, dataset, size, nets.G, nets.D, device, precision))

    # The loop
    progress = tqdm(total=last_step(opt, len(dataset)), initial=opt.latest_iter, unit='sample',
                    disable=None if cluster.is_main else True, dynamic_ncols=True)
    # The previews show the target's own units (no --save_scale).
    target_scaling = Scaling.from_options(opt, 'target', save_scale=1.0)
    validation = functools.partial(validate, nets.G, val_dataset, opt, device, precision,
                                   target_disks(val_dataset, opt, log)
                                   if val_dataset is not None else None, log=progress.write)
    manager = Manager(opt, nets.G, nets.D, functools.partial(nets.training_state, opt),
                      target_scaling, data_unit(opt), log=progress.write,
                      input_scaling=Scaling.from_options(opt, 'input', save_scale=1.0),
                      input_unit=file_unit(dataset.headers('input', 0)),
                      validate=validation if val_dataset is not None else None,
                      active=cluster.is_main, resumed=state)
    return loop(opt, loader, len(dataset), nets, manager, progress, cluster, device, stop, log)


def loop(opt, loader, n_samples, nets, manager, progress, cluster, device, stop, log):
    """Epochs of steps from the step the run starts at, each followed by what falls due
    (`after_step`); one epoch is one pass over the data, and a step counts the samples of
    all processes. From here on a stop signal ends the run after the step in progress, every
    process at the same step, with a checkpoint. Returns the exit status."""
    current_step, stop_signal = opt.latest_iter, 0
    epoch = current_step // n_samples
    stop.defer()
    try:
        for epoch in range(current_step // n_samples + 1, opt.n_epochs + opt.n_epochs_decay + 1):
            lr = learning_rate(opt, epoch)
            nets.set_learning_rate(lr)
            loader.sampler.set_epoch(epoch, start=current_step - (epoch - 1) * n_samples)
            for input, target in loader:
                input, target = (batch.to(device, non_blocking=True,
                                          memory_format=memory_format(device))
                                 for batch in (input, target))
                # The last batches of an epoch may hold fewer samples (or, with several
                # processes, repeats that even out the shares): count each sample once.
                next_step = min(current_step + input.shape[0] * cluster.world_size,
                                epoch * n_samples)
                loss_D, loss_G, target, fake = train_step(
                    nets.criterion, nets.G, nets.D, nets.G_optim, nets.D_optim, nets.precision,
                    input, target, functools.partial(check_finite, cluster, next_step, manager))
                previous_step, current_step = current_step, next_step
                progress.update(current_step - previous_step)
                after_step(manager, opt, epoch, (previous_step, current_step), n_samples,
                           (input, target, fake), cluster.mean(nets.criterion.terms), lr)
                stop_signal = cluster.max(stop.signum or 0)
                if stop_signal:
                    break
            if stop_signal:
                break
        progress.close()
        manager.finish(current_step, epoch, n_samples)
    except BaseException:
        # The second Ctrl-C can surface from inside a library as another error (torch.save
        # reports a broken stream as a RuntimeError): the handler's flag says what happened.
        if stop.aborted:
            raise Aborted(f"aborted by a second SIGINT after step {current_step}; "
                          f"{resume_advice(opt.model_dir)}") from None
        raise
    finally:
        manager.close()
    if stop_signal:
        cluster.barrier()  # the others wait until rank 0 has saved, then all exit together
        log(f"stopped by {signal_name(stop_signal)} at step {current_step}; resume with "
            f"--latest_iter -1")
        return 128 + stop_signal
    return 0


# ----------------------------------------------------------------------------------------
# The steps of `train`
# ----------------------------------------------------------------------------------------

def set_seed(seed):
    """Seed every random number generator the run draws from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def last_step(opt, n_samples):
    """The step at which training ends: every epoch, the decaying ones included."""
    return (opt.n_epochs + opt.n_epochs_decay) * n_samples


def nothing_left_to_train(opt, n_samples):
    """The line of a resumed run that has reached its last step."""
    n_epochs = opt.n_epochs + opt.n_epochs_decay
    return (f"nothing left to train: the run is at step {opt.latest_iter}, and its {n_epochs} "
            f"epochs (--n_epochs {opt.n_epochs} + --n_epochs_decay {opt.n_epochs_decay}) of "
            f"{n_samples} samples end at step {last_step(opt, n_samples)}; to train longer, "
            f"resume with a larger --n_epochs or --n_epochs_decay")


def prepare_data(dataset, opt, cluster, log, given=()):
    """Record the first target's FITS identity cards (unit, instrument, ...) in the options,
    and so in train_options.json, for the headers the Test script writes; check every pair
    (`check_data`, on the first process); record a profile of the data (`dataset_profile`);
    refuse a new run where checkpoints are. Returns the data's (height, width)."""
    opt.target_header = target_identity(dataset.headers('target', 0))
    size = cluster.on_main(lambda: check_data(dataset, opt, log, given))
    # What the network is trained on, for the Test script's warnings about other data
    opt.training_data = cluster.on_main(lambda: dataset_profile(dataset))
    steps = saved_steps(opt.model_dir, 'G')
    if opt.latest_iter == 0 and steps:
        raise UserError(f"{opt.model_dir} already holds checkpoints (steps "
                        f"{steps[0]}..{steps[-1]}) that a new run would overwrite; resume with "
                        f"--latest_iter -1, choose another --dataset_name, or move them away")
    return size


def make_loader(dataset, opt, cluster, device):
    """The training DataLoader, its order and augmentation drawn by an `EpochSampler`.

    Workers are not persistent: each epoch's end (or a stop) shuts them down with the
    epoch's iterator. They ignore stop signals, so none may outlive the run, where Python's
    exit would wait for them.
    """
    sampler = EpochSampler(len(dataset), shuffle=not opt.no_shuffle, seed=opt.seed,
                           num_replicas=cluster.world_size, rank=cluster.rank)
    return DataLoader(dataset, batch_size=opt.batch_size, sampler=sampler,
                      num_workers=opt.n_workers, pin_memory=device.type == 'cuda',
                      worker_init_fn=ignore_stop_signals)


@dataclass
class Networks:
    """What a training step changes: the two networks, their optimisers, the objective and
    the precision (with its GradScaler)."""
    G: torch.nn.Module
    D: torch.nn.Module
    G_optim: torch.optim.Optimizer
    D_optim: torch.optim.Optimizer
    criterion: Loss
    precision: Precision

    def set_learning_rate(self, lr):
        for optimizer in (self.G_optim, self.D_optim):
            for group in optimizer.param_groups:
                group['lr'] = lr

    def training_state(self, opt):
        """What, beside the two networks, a run needs to resume exactly."""
        return {'G_optim': self.G_optim.state_dict(), 'D_optim': self.D_optim.state_dict(),
                'scaler': self.precision.scaler.state_dict(), 'rng': rng_states(),
                'options': options_record(opt)}

    def restore(self, state, opt):
        """Take up a saved training state: optimisers, GradScaler, random number generators."""
        for optimizer, name in ((self.G_optim, 'G_optim'), (self.D_optim, 'D_optim')):
            optimizer.load_state_dict(state[name])
            for group in optimizer.param_groups:  # a new --beta1/--beta2 applies (and --lr,
                group['betas'] = (opt.beta1, opt.beta2)  # through the schedule)
        self.precision.scaler.load_state_dict(state['scaler'])
        set_rng_states(state['rng'])


def build_networks(opt, cluster, device, gpu_ids, precision):
    """Generator and Discriminator, initialised (or loaded when resuming), placed on the
    device(s), with their Adam optimisers and the Loss."""
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    if opt.latest_iter > 0:
        load_state_dict(G, checkpoint_path(opt.model_dir, opt.latest_iter, 'G'))
        load_state_dict(D, checkpoint_path(opt.model_dir, opt.latest_iter, 'D'))
    wrap = functools.partial(parallel, cluster=cluster, device=device, gpu_ids=gpu_ids)
    G, D = prepare_network(G, opt, device, wrap), prepare_network(D, opt, device, wrap)
    criterion = Loss(opt)
    return Networks(G, D, make_optimizer(G.parameters(), opt), make_optimizer(D.parameters(), opt),
                    criterion, precision)


def parallel(module, cluster, device, gpu_ids):
    """One process per device under torchrun; else DataParallel for --gpu_ids 0,1,..."""
    module = cluster.wrap(module, device)
    return torch.nn.DataParallel(module, device_ids=gpu_ids) if len(gpu_ids) > 1 else module


def learning_rate(opt, epoch):
    """The lr of `epoch` (counted from 1): --lr for the first --n_epochs epochs, then falling
    linearly over --n_epochs_decay more epochs, lr * (1 - (epoch - n_epochs) / (decay + 1))
    (junyanz's pix2pix rule, so the last epoch still trains with a small positive lr)."""
    if epoch <= opt.n_epochs:
        return opt.lr
    return opt.lr * (1.0 - (epoch - opt.n_epochs) / (opt.n_epochs_decay + 1))


def check_finite(cluster, step, manager, loss_D, loss_G):
    """`train_step`'s check: stop before any weight changes when a loss is not finite."""
    if not cluster.all_finite(loss_D + loss_G):
        raise UserError(f"the loss is not finite at step {step} (D {float(loss_D.detach()):.4g}, "
                        f"G {float(loss_G.detach()):.4g}); training stopped before updating "
                        f"the weights; last good checkpoint: {manager.last_good()}; a lower "
                        f"--lr may help")


def crossed(previous_step, current_step, frequency):
    """True when a multiple of `frequency` lies in (previous_step, current_step].

    The reference tests `current_step % frequency == 0`, which never fires when the batch
    size does not divide the frequency.
    """
    return current_step // frequency > previous_step // frequency


def after_step(manager, opt, epoch, steps, n_samples, batch, terms, lr):
    """What falls due after a step (previous, current) = `steps`, on the first process only:
    the losses are recorded, then a report, the previews and a checkpoint (with validation)
    each when the step crosses a multiple of its frequency."""
    if not manager.active:
        return
    previous_step, current_step = steps
    manager.record(terms, current_step - previous_step, lr)
    if crossed(previous_step, current_step, opt.report_freq):
        manager.report(epoch, current_step, n_samples)
    if crossed(previous_step, current_step, opt.display_freq):
        manager.save_previews(current_step, batch)
    if crossed(previous_step, current_step, opt.save_freq):
        manager.save(current_step, epoch)


def validate(G, val_dataset, opt, device, precision, disks, step, log=print):
    """Translate the test inputs with the generator of `step` (--val_during_train); with
    --target_dir_test, log their mean metrics (with the regions of the targets' `disks`) in
    val_metrics.csv and return them. One line in the log says where the outputs went and,
    with targets, the mean CC of the first target channel."""
    folder = os.path.join(opt.checkpoint_dir, 'Image', 'Test', str(step))
    rows = translate(bare(G), val_dataset, folder, opt, device, step, precision, disks=disks)
    means = {key: value['mean'] for key, value in summarize(rows).items()} if rows else None
    log(validation_line(step, len(val_dataset), folder, means))
    if means is None:
        return None
    write_csv(os.path.join(opt.checkpoint_dir, 'val_metrics.csv'), [{'step': step, **means}],
              append=True)
    return means


def validation_line(step, n_files, folder, means):
    """'validation at step N: K file(s) in FOLDER[; mean cc_1x1 0.81, ...]': the CC of the
    first target channel at every binning, over the whole frame and the disk where known."""
    shown = [f"{key.replace('ch0_', '')} {value:.4f}" for key, value in (means or {}).items()
             if re.fullmatch(r'(ch0_)?(disk_)?cc_\d+x\d+', key)]
    return f"validation at step {step}: {n_files} file(s) in {folder}" + \
        (f"; mean {', '.join(shown)}" if shown else '')


if __name__ == '__main__':
    sys.exit(run_main(main))
