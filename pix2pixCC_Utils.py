"""What the two drivers share, in the order of a run's life.

1. Devices and precision: `select_device`, `cpu_requested`, `Precision` (mixed precision),
   `cpu_has_bfloat16`, `prepare_network` (placement, channels-last, the CPU convolution
   paths, torch.compile), `memory_format`.
2. Checkpoints and the training state: file names (`checkpoint_path`, `state_path`,
   `saved_steps`, `newest_complete_step`), `safe_load` (never runs code), `load_state_dict`
   (with the option that differs on a mismatch), `supersede_newer_checkpoints` (a resumed
   older step starts a new branch), `rng_states`; the model file (`model_file_record`,
   `load_model_file`).
3. The Manager and TensorBoard: `Manager` (report lines, loss log, previews, checkpoints,
   validation), `tensorboard_writer`.

What the drivers use that is not the method is in machinery/, one concern per module:
- machinery/files.py: errors and files (`WriteError`, `atomic_path`, `save_torch`, JSON, CSV)
- machinery/memory.py: memory (`reuse_freed_memory`, `release_mapped_weights_after_use`,
  `take_snapshot`: the private copy that weights are mapped from)
- machinery/distributed.py: several processes under torchrun (`Distributed`)
- machinery/run_safety.py: run safety (`RunLock`, `GracefulStop`, `ignore_stop_signals`)
- machinery/figures.py: figures (`save_panel`, `save_loss_curve`)
- machinery/fast_conv.py: the optional CPU convolution paths (`use_gemm_convolutions`)

The learning-rate schedule, the seed and when reports and saves fall due are in
pix2pixCC_Train.py; the evaluation metrics are in machinery/evaluation.py; the CC as a loss is in
pix2pixCC_Networks.py.
"""
import contextlib
import datetime
import glob
import hashlib
import os
import random
import re
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from machinery.fast_conv import use_gemm_convolutions
from machinery.figures import save_loss_curve, save_panel
from machinery.files import (make_dirs, options_record, plain_data, read_csv, save_image,
                             save_torch, write_csv)
from machinery.memory import take_snapshot
from pix2pixCC_Options import UserError


# ----------------------------------------------------------------------------------------
# 1. Devices and precision
# ----------------------------------------------------------------------------------------


def cpu_requested(opt):
    """--gpu_ids -1 (any negative index) asks for the CPU."""
    return any(int(i) < 0 for i in opt.gpu_ids.split(','))


def select_device(opt, log=print):
    """The device the options ask for, or the CPU with a notice when CUDA is absent.

    Returns (device, gpu_ids); gpu_ids is empty on the CPU.
    """
    if cpu_requested(opt):
        return torch.device('cpu'), []
    ids = [int(i) for i in opt.gpu_ids.split(',')]
    if not torch.cuda.is_available():
        log(f"notice: --gpu_ids {opt.gpu_ids} asks for a GPU but CUDA is not available; "
            f"running on the CPU (--gpu_ids -1 silences this)")
        return torch.device('cpu'), []
    n_visible = torch.cuda.device_count()
    missing = [i for i in ids if i >= n_visible]
    if missing:
        raise UserError(f"--gpu_ids {opt.gpu_ids}: GPU {missing[0]} does not exist "
                        f"({n_visible} visible: 0..{n_visible - 1})")
    return torch.device(f'cuda:{ids[0]}'), ids


class Precision:
    """float32, or mixed precision for --data_type 16 (weights and optimiser stay float32).

    Mixed precision autocasts to bfloat16 on the CPU and on GPUs that support it (its
    exponent range needs no loss scaling), and otherwise to float16 with a GradScaler against
    gradient underflow. `--amp_dtype float16|bfloat16` overrides the choice.
    """

    def __init__(self, opt, device):
        self.device_type = device.type
        self.enabled = opt.data_type == 16
        choice = getattr(opt, 'amp_dtype', 'auto')
        if choice == 'auto':
            choice = 'bfloat16' if device.type == 'cpu' or torch.cuda.is_bf16_supported() \
                else 'float16'
        self.dtype = getattr(torch, choice)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled and
                                           self.dtype == torch.float16 and device.type == 'cuda')

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def notice(self):
        """A line for the user when the choice will be slow here, else None: bfloat16 on a CPU
        without bfloat16 instructions falls back to kernels tens to hundreds of times slower
        than float32 (measured on an AVX2 CPU: BENCHMARKS.md)."""
        if self.enabled and self.device_type == 'cpu' and self.dtype == torch.bfloat16 \
                and not cpu_has_bfloat16():
            return ("notice: --data_type 16 computes in bfloat16, and this CPU has no bfloat16 "
                    "instructions (AVX512-BF16 or AMX): expect it to run many times slower than "
                    "float32; use --data_type 32")
        return None


def cpu_has_bfloat16():
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). True when this torch
    cannot tell (no warning rather than a wrong one)."""
    checks = [getattr(torch.cpu, name, None)
              for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    checks = [check for check in checks if check is not None]
    return not checks or any(check() for check in checks)


def prepare_network(module, opt, device, wrap=None):
    """Move a network to `device` for fast execution: on GPUs, cuDNN's autotuner and the
    channels-last layout (what tensor cores want); on the CPU, the GEMM path for the widest
    convolutions; then `wrap` (e.g. DistributedDataParallel); with --compile, torch.compile
    around the whole."""
    module = module.to(device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # training sizes are fixed: tune once
        module = module.to(memory_format=torch.channels_last)
    else:
        use_gemm_convolutions(module)
    if wrap is not None:
        module = wrap(module)
    if getattr(opt, 'compile', False):
        # torch.compile's meta kernel for the backward of replication padding has wrong
        # strides (torch 2.13, CPU): leave those layers to eager mode.
        for layer in module.modules():
            if isinstance(layer, nn.ReplicationPad2d):
                layer.forward = torch.compiler.disable(layer.forward)
        module = torch.compile(module)
    return module


def memory_format(device):
    """The layout inputs should have on `device` (matching `prepare_network`)."""
    return torch.channels_last if device.type == 'cuda' else torch.contiguous_format


# ----------------------------------------------------------------------------------------
# 2. Checkpoints and the training state: plain state_dicts of the bare modules, loadable
#    by the published code
# ----------------------------------------------------------------------------------------


def bare(module):
    """The module inside DataParallel/DistributedDataParallel and torch.compile wrappers
    (whose state_dict keys would carry `module.` / `_orig_mod.` prefixes)."""
    while hasattr(module, 'module') or hasattr(module, '_orig_mod'):
        module = getattr(module, 'module', None) or module._orig_mod
    return module


def checkpoint_path(model_dir, step, kind):
    """kind is 'G' or 'D'."""
    return os.path.join(model_dir, f'{step}_{kind}.pt')


def state_path(model_dir, step):
    return os.path.join(model_dir, f'{step}_state.pt')


def saved_steps(model_dir, kind='G'):
    """Steps of the checkpoints `<step>_<kind>.pt` in `model_dir`, ascending."""
    steps = []
    for path in glob.glob(os.path.join(model_dir, f'*_{kind}.pt')):
        match = re.fullmatch(rf'(\d+)_{kind}\.pt', os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def require_checkpoint(model_dir, step, kind):
    path = checkpoint_path(model_dir, step, kind)
    if not os.path.isfile(path):
        present = saved_steps(model_dir, kind)
        listing = ', '.join(map(str, present)) if present else 'none'
        raise UserError(f"checkpoint {path} does not exist (saved steps in {model_dir}: "
                        f"{listing})")
    return path


def newest_complete_step(model_dir):
    """Newest step with G, D and training state saved; else newest with G and D; else None."""
    with_networks = [s for s in saved_steps(model_dir, 'G')
                     if os.path.isfile(checkpoint_path(model_dir, s, 'D'))]
    complete = [s for s in with_networks if os.path.isfile(state_path(model_dir, s))]
    return (complete or with_networks or [None])[-1]


CHECKPOINT_FILE = re.compile(r'(\d+)_(?:G|D|state)\.pt')


def supersede_newer_checkpoints(model_dir, step, log=print):
    """Move the checkpoints of steps after `step` to `Model/superseded/<time>/`.

    A run resumed from an older step starts a new branch: without this, a later
    `--latest_iter -1` (a requeued job) or `Test --iteration -1` would pick up the abandoned
    branch's newer files. Nothing is deleted. Returns the steps moved.
    """
    newer = sorted((int(match.group(1)), name) for name in os.listdir(model_dir)
                   if (match := CHECKPOINT_FILE.fullmatch(name)) and int(match.group(1)) > step)
    if not newer:
        return []
    stamp = datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
    folder = os.path.join(model_dir, 'superseded', stamp)
    suffix = 1
    while os.path.exists(folder):
        suffix += 1
        folder = os.path.join(model_dir, 'superseded', f'{stamp}-{suffix}')
    make_dirs(folder)
    for _, name in newer:
        os.replace(os.path.join(model_dir, name), os.path.join(folder, name))
    steps = sorted({s for s, _ in newer})
    listing = ', '.join(map(str, steps)) if len(steps) <= 4 else f'{steps[0]}..{steps[-1]}'
    log(f"notice: resuming from step {step}, older than the newest checkpoint, starts a new "
        f"branch: the {len(steps)} newer checkpoint(s) (step {listing}) were moved to "
        f"{folder}")
    return steps


def save_state_dict(module, path):
    save_torch(bare(module).state_dict(), path)


def safe_load(path, mmap=False):
    """torch.load that can never run code: weights_only=True refuses pickled objects.

    With `mmap`, the tensors are mapped from a private copy of the file rather than read
    into memory of their own (`load_weights`)."""
    if mmap:
        return load_weights(path)[0]
    return torch_load(path, path)


def load_weights(path):
    """(the object saved in `path`, read as `safe_load` reads it; the WeightsSnapshot it was
    read from), with the tensors mapped from that snapshot: a private copy of the file taken
    now (machinery/memory.py, `take_snapshot`), which nothing can change. Mapped from the
    file itself, the tensors would change with it while the run goes on (their pages are
    read again after each use: `release_mapped_weights_after_use`), and a truncated file
    would end the process with SIGBUS. Files in PyTorch's legacy format, which cannot be
    mapped, and copies where this system cannot map them (no /proc/self/fd) are read into
    memory."""
    snapshot = take_snapshot(path)
    with snapshot.file:  # (a mapping keeps the copy; closed, one that is not goes)
        source = snapshot.mappable or snapshot.file
        return torch_load(source, path, mmap=snapshot.mappable is not None), snapshot


def torch_load(source, path, mmap=False):
    """torch.load of `source` (a path, or an open file) with weights_only=True; a UserError
    naming `path` when it is not a file of plain tensors and numbers. A file that cannot be
    mapped (PyTorch's legacy format) is read."""
    try:
        try:
            return torch.load(source, map_location='cpu', weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not mmap or 'mmap' not in str(error):
                raise
            return torch.load(source, map_location='cpu', weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load {path} (only plain tensors and numbers are accepted): "
                        f"{reason}") from None


def generator_options_of(state):
    """The network options a Generator state_dict was built with (for error messages)."""
    weights = sorted((int(key.split('.')[1]), key, value.shape) for key, value in state.items()
                     if key.startswith('model.') and key.endswith('weight') and value.dim() == 4)
    plain = [shape for _, key, shape in weights if '.block.' not in key]
    down = [shape for shape in plain if shape[-1] == 5]
    up = plain[1 + len(down):-1]
    options = {'n_gf': plain[0][0], 'input_ch': plain[0][1], 'target_ch': plain[-1][0],
               'n_downsample': len(down),
               'n_residual': len({key.split('.')[1] for key in state if '.block.' in key}),
               'norm_type': 'BatchNorm2d' if any(k.endswith('running_mean') for k in state)
               else 'InstanceNorm2d'}
    if up:  # ConvTranspose2d weights are (in, out, k, k), Conv2d's (out, in, k, k)
        options['trans_conv'] = bool(up[0][0] > up[0][1])
    return options


def discriminator_options_of(state):
    scales = {k.split('.')[0] for k in state if k.startswith('Scale_')}
    first = state['Scale_0.block_0.0.weight']
    return {'n_D': len(scales), 'n_df': first.shape[0], 'pair_channels': first.shape[1]}


def mismatch_reason(state, module):
    """Name the options that differ between a checkpoint and `module` built from `opt`."""
    try:
        if 'model.1.weight' in state:
            options_of = generator_options_of
        else:
            options_of = discriminator_options_of
        trained, own = options_of(state), options_of(bare(module).state_dict())
    except (KeyError, IndexError):
        return 'it holds different parameter names'
    differ = [f"--{k} {trained[k]} (options say {own[k]})" for k in trained
              if k in own and trained[k] != own[k]]
    return 'it was trained with ' + ', '.join(differ) if differ else 'its parameters differ'


def load_state_dict(module, path, assign=False):
    """Load a plain state_dict into `module`, strictly, with a one-line error on mismatch.

    With `assign`, the module takes the checkpoint's tensors themselves, mapped from a private
    copy of the file (`load_weights`; for a module built on the 'meta' device, which holds no
    memory): the weights are then held once, not once in the module and once more in the
    loaded state_dict. Returns that copy's WeightsSnapshot (None without `assign`).
    """
    if not assign:
        fit_state_dict(module, safe_load(path), path)
        return None
    state, snapshot = load_weights(path)
    fit_state_dict(module, state, path, assign)
    return snapshot


def fit_state_dict(module, state, path, assign=False):
    """Load the state_dict `state` (read from `path`, which errors name) into `module`,
    strictly, as `load_state_dict` does."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a state_dict of tensors")
    state = {key[len('module.'):] if key.startswith('module.') else key: value
             for key, value in state.items()}
    own = bare(module).state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise UserError(f"{path} does not fit the network built from the options: "
                        f"{mismatch_reason(state, module)}")
    bare(module).load_state_dict(state, strict=True, assign=assign)


# A model file (README "Sharing a model and running it elsewhere"): one generator with what
# inference needs, loadable with weights_only=True (tensors, dicts, lists, str, numbers).
MODEL_FORMAT = 'pix2pixCC model'
MODEL_FORMAT_VERSION = 1


def weights_sha256(state):
    """SHA-256 (hex) of a state_dict: each tensor's name, dtype, shape and bytes, in name
    order, so that the same weights give the same hash however the file was written."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f'{key} {tensor.dtype} {tuple(tensor.shape)};'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_file_record(state, step, run, options, target_header, bfloat16=False,
                      training_data=None):
    """What a model file holds: the generator's `state` (floating tensors in bfloat16 with
    `bfloat16`, half the size; float32 otherwise), the training `step`, the `run` name, the
    network and data `options`, the targets' FITS identity cards and the profile of the
    training data (machinery/data_profile.py; None for a run of an older version), with the
    format, its version and the weights' SHA-256."""
    if bfloat16:
        state = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
                 for key, value in state.items()}
    return {'format': MODEL_FORMAT, 'format_version': MODEL_FORMAT_VERSION, 'step': int(step),
            'run': run, 'options': options, 'target_header': target_header,
            'training_data': training_data,
            'weights_dtype': 'bfloat16' if bfloat16 else 'float32', 'weights': state,
            'weights_sha256': weights_sha256(state)}


MODEL_FIELDS = ('step', 'run', 'options', 'target_header', 'weights', 'weights_sha256')


class MappedWeights(dict):
    """A state_dict whose tensors were read from `snapshot`, the private copy of their file
    (`load_weights`): what `load_generator` gives back after use, and whose SHA-256 the
    output folder's record takes (the weights that ran, whatever became of the file)."""

    def __init__(self, state, snapshot):
        super().__init__(state)
        self.snapshot = snapshot


def load_model_file(path):
    """The record of the model file `path` (`model_file_record`), its weights (MappedWeights)
    mapped from a private copy of the file; UserError in one line for a file that is not one,
    a format version this code does not read, or weights whose SHA-256 does not match (a
    damaged copy)."""
    if not os.path.isfile(path):
        raise UserError(f"model file {path} does not exist; check --model")
    try:
        record, snapshot = load_weights(path)
    except UserError as error:
        raise UserError(f"{path} is not a readable model file (damaged or incomplete; copy or "
                        f"export it again): {str(error).split(': ', 1)[-1]}") from None
    if not isinstance(record, dict) or record.get('format') != MODEL_FORMAT or \
            not all(field in record for field in MODEL_FIELDS):
        raise UserError(f"{path} is not a pix2pixCC model file (make one with --export model)")
    if record.get('format_version') != MODEL_FORMAT_VERSION:
        raise UserError(f"{path} is a model file of format version "
                        f"{record.get('format_version')}, but this code reads version "
                        f"{MODEL_FORMAT_VERSION}; use the pix2pixCC that exported it")
    if weights_sha256(record['weights']) != record['weights_sha256']:
        raise UserError(f"{path}: the weights do not match their SHA-256 (the file is "
                        f"damaged); copy or export it again")
    problem = model_field_problem(record)
    if problem:
        raise UserError(f"{path} is not a model file this code wrote ({problem}); use a model "
                        f"file made with --export model")
    record['weights'] = MappedWeights(record['weights'], snapshot)
    return record


# A run name is a folder's name (checkpoints/<run>/): it becomes one again (Export/, output
# folders), so a shared model file's may not name a path elsewhere.
RUN_NAME = re.compile(r'[^/\\\x00]+')


def model_field_problem(record):
    """What in a model file's record is not as --export model writes it (a shared model is
    data from elsewhere: its run name becomes a folder name, its options and cards are
    taken as given), else None."""
    run, step = record['run'], record['step']
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run) or run.startswith('.'):
        return f'its run name {run!r} is not a folder name'
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f'its step {step!r} is not a number of samples'
    if not isinstance(record['options'], dict) or not all(
            isinstance(value, (str, int, float, bool, list, type(None)))
            for value in record['options'].values()):
        return 'its options are not a table of values'
    header = record['target_header']
    if header is not None and (not isinstance(header, dict) or not all(
            isinstance(key, str) and isinstance(value, (str, int, float, bool, type(None)))
            for key, value in header.items())):
        return "its targets' cards are not FITS cards"
    if not plain_data(record.get('training_data')):
        return "its profile of the training data is not a table of values"
    return None



def float32_weights(state):
    """`state` with its floating tensors in float32, as the network runs (a bfloat16 model
    file's weights are cast back; float32 tensors are kept as they are, mapped from the
    file)."""
    return {key: value.float() if value.is_floating_point() else value
            for key, value in state.items()}


def rng_states():
    """The torch, numpy and python RNG states, as plain tensors/lists (weights_only-safe)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)),
                                                      position, has_gauss, gauss],
            'python': random.getstate()}


def set_rng_states(states):
    torch.set_rng_state(states['torch'])
    kind, keys, position, has_gauss, gauss = states['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states['python']
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------------------
# 3. The Manager (everything that hangs off the training loop) and TensorBoard
# ----------------------------------------------------------------------------------------


def to_preview(tensor, display_scale=1.0):
    """(C, H, W) normalised tensor -> uint8 image: [-1, 1] -> [0, 255], times display_scale.

    One channel gives grey, three RGB; other counts are laid side by side in grey.
    """
    array = tensor.detach().float().cpu().numpy()
    pixels = np.clip((array + 1.0) * 127.5 * display_scale, 0, 255).astype(np.uint8)
    if pixels.shape[0] == 3:
        return np.moveaxis(pixels, 0, -1)
    return np.concatenate(list(pixels), axis=1)


class Manager:
    """Everything that hangs off the training loop: report lines and the loss log, previews,
    checkpoints, TensorBoard.

    The training loop `record`s every step's losses and calls `report`, `save_previews` and
    `save` when they fall due; `finish` logs and saves what is not logged or saved yet, so no
    finished or stopped run is lost whatever report_freq and save_freq are.
    `training_state()` returns what, beside the two networks, a run needs to resume exactly
    (optimisers, RNGs, ...); `resumed` is the state a resumed run started from.
    `target_scaling` maps the normalised previews to the target's units (`unit`), and
    `input_scaling` the panels' inputs to the input's (`input_unit`).
    """

    def __init__(self, opt, G, D, training_state, target_scaling, unit=None, log=print,
                 validate=None, active=True, resumed=None, input_scaling=None,
                 input_unit=None):
        self.active = active  # False on every process but the first of a distributed run
        self.opt, self.G, self.D = opt, G, D
        self.training_state = training_state
        self.log = log
        self.validate = validate
        self.last_saved = opt.latest_iter or None
        self.start_time = time.time()
        self.last_report = (time.time(), opt.latest_iter)
        self.last_lr = opt.lr
        self.iterations = 0  # since the last report, for the time per step
        # Loss terms summed over the samples since the last report (each row of the log is
        # their mean, not one batch's noise); carried in the training state, so a resumed run
        # writes the rows an uninterrupted one would.
        sums = (resumed or {}).get('loss_sums') or {}
        self.loss_sums = {name: float(value) for name, value in sums.items()}
        self.loss_samples = int((resumed or {}).get('loss_samples', 0))
        self.target_scaling, self.unit = target_scaling, unit
        self.input_scaling, self.input_unit = input_scaling, input_unit
        self.loss_log = os.path.join(opt.checkpoint_dir, 'loss_log.csv')
        self.tensorboard = None
        if not active:
            return
        # A run redoes the steps after the one it starts from: drop their old log rows (all
        # of them for a new run), so no step is logged twice.
        for log_path in (self.loss_log, os.path.join(opt.checkpoint_dir, 'val_metrics.csv')):
            rows = read_csv(log_path)
            if any(int(row['step']) > opt.latest_iter for row in rows):
                write_csv(log_path, [r for r in rows if int(r['step']) <= opt.latest_iter])
        if opt.tensorboard:
            self.tensorboard = tensorboard_writer(opt)

    def record(self, terms, samples, lr):
        """Add one step's loss terms ({name: 0-d tensor}, the means over its `samples`
        samples), trained with learning rate `lr`, to the means of the next report."""
        for name, value in terms.items():
            # Kept as tensors until a report: converting now would stall a GPU every step.
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value.detach() * samples
        self.loss_samples += samples
        self.iterations += 1
        self.last_lr = lr

    def report(self, epoch, current_step, n_samples):
        """The report line (as published, plus how many samples its means cover) and a row
        of loss_log.csv."""
        if not self.loss_samples:
            return
        done = (current_step - 1) % n_samples + 1
        n = self.loss_samples
        terms = {name: float(total) / n for name, total in self.loss_sums.items()}
        self.loss_sums, self.loss_samples = {}, 0
        total_epochs = self.opt.n_epochs + self.opt.n_epochs_decay
        self.log(f"Epoch: {epoch}/{total_epochs} [{100.0 * done / n_samples:5.1f}%] "
                 f"Current_step: {current_step} D_loss: {terms['D']:.4f} "
                 f"G_loss: {terms['G']:.4f} (means of {n} sample{'s' if n > 1 else ''})")
        now = time.time()
        seconds_per_step = (now - self.last_report[0]) / max(1, self.iterations)
        self.last_report, self.iterations = (now, current_step), 0
        write_csv(self.loss_log, [dict(step=current_step, epoch=epoch, **terms,
                                       lr=self.last_lr, samples=n,
                                       seconds_per_step=round(seconds_per_step, 5))],
                  append=True)
        if self.tensorboard is not None:
            for name, value in terms.items():
                self.tensorboard.add_scalar(f'loss/{name}' if name != 'CC' else 'train/CC',
                                            value, current_step)
            self.tensorboard.add_scalar('train/lr', self.last_lr, current_step)

    def save_previews(self, current_step, batch):
        """batch = (input, target, fake), each (B, C, H, W) normalised: the first sample's
        target and generated data as images, and its panel."""
        input, target, fake = (t[0].detach().float().cpu() for t in batch)
        stem = os.path.join(self.opt.image_dir, str(current_step))
        for name, tensor in (('real', target), ('fake', fake)):
            save_image(f'{stem}_{name}.{self.opt.image_mode}',
                       to_preview(tensor, self.opt.display_scale))
        save_panel(f'{stem}_panel.png', input.numpy(),
                   self.target_scaling.inverse(target.numpy()),
                   self.target_scaling.inverse(fake.numpy()), self.target_scaling,
                   unit=self.unit, data_format=self.opt.data_format_target,
                   title=f'training step {current_step} (first sample of the batch)',
                   input_scaling=self.input_scaling, input_unit=self.input_unit)
        # (No WCS: the batch's sample is augmented, and which file it came from is not kept.)
        if self.tensorboard is not None:
            with Image.open(f'{stem}_panel.png') as panel:
                self.tensorboard.add_image('panel', np.asarray(panel.convert('RGB')),
                                           current_step, dataformats='HWC')

    def save(self, current_step, epoch):
        """G, D, then the training state: a step is complete once its state file exists.

        Training states older than the --keep_states newest are deleted only after this one
        is complete. A failed write removes what this save wrote (so a full disk gets back
        the space) and names the newest complete checkpoint, which is untouched.
        """
        model_dir = self.opt.model_dir
        paths = [checkpoint_path(model_dir, current_step, 'G'),
                 checkpoint_path(model_dir, current_step, 'D'), state_path(model_dir, current_step)]
        try:
            for module, path in ((self.G, paths[0]), (self.D, paths[1])):
                save_state_dict(module, path)
            state = dict(self.training_state(), step=current_step, epoch=epoch,
                         loss_sums={k: float(v) for k, v in self.loss_sums.items()},
                         loss_samples=self.loss_samples)
            save_torch(state, paths[2])
        except BaseException:
            # A full disk, or a second Ctrl-C in the middle of a write, leaves no partial set
            # of this step's files (and gives the space back); earlier steps are untouched.
            if current_step != self.last_saved:
                for path in paths:
                    with contextlib.suppress(OSError):
                        os.remove(path)
            raise
        self.last_saved = current_step
        self.log(f"saved {checkpoint_path(model_dir, current_step, 'G')}, _D.pt and _state.pt")
        self.prune_states(current_step)
        if self.validate is not None:
            means = self.validate(current_step)
            if means and self.tensorboard is not None:
                for name, value in means.items():
                    self.tensorboard.add_scalar(f'validation/{name}', value, current_step)
        self.draw_loss_curve()  # after the validation, so that the curve has its row

    def draw_loss_curve(self):
        checkpoint_dir = self.opt.checkpoint_dir
        save_loss_curve(os.path.join(checkpoint_dir, 'loss_curve.png'), read_csv(self.loss_log),
                        read_csv(os.path.join(checkpoint_dir, 'val_metrics.csv')))

    def prune_states(self, current_step):
        """Keep the training states of the --keep_states newest complete steps up to
        `current_step` (0: all). Steps after it belong to a run this one replaces and are
        left alone."""
        keep = self.opt.keep_states
        if keep <= 0:
            return
        model_dir = self.opt.model_dir
        steps = [s for s in saved_steps(model_dir, 'G') if s <= current_step and
                 os.path.isfile(checkpoint_path(model_dir, s, 'D')) and
                 os.path.isfile(state_path(model_dir, s))]
        for step in steps[:-keep]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(state_path(model_dir, step))

    def last_good(self):
        if self.last_saved is None:
            return 'none saved yet'
        return f"{checkpoint_path(self.opt.model_dir, self.last_saved, 'G')} " \
               f"(resume with --latest_iter {self.last_saved})"

    def finish(self, current_step, epoch, n_samples):
        """Log the samples since the last report, save the step reached unless saved, and
        draw the loss curve, however short the run."""
        if not self.active:
            return
        self.report(epoch, current_step, n_samples)
        if self.last_saved != current_step:
            self.save(current_step, epoch)
        else:
            self.draw_loss_curve()
        self.close()
        elapsed = datetime.timedelta(seconds=round(time.time() - self.start_time))
        self.log(f"Total time: {elapsed}")

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def tensorboard_writer(opt):
    """A SummaryWriter under checkpoints/<dataset_name>/tensorboard/. A resumed run purges
    the events after its starting step, so no step is drawn twice, and a new run starts with
    no events; the options go in as text at the step the run starts from."""
    from torch.utils.tensorboard import SummaryWriter
    start = opt.latest_iter
    folder = os.path.join(opt.checkpoint_dir, 'tensorboard')
    if not start:  # a new run: the events of an earlier run here that saved nothing go
        for path in glob.glob(os.path.join(folder, 'events.out.tfevents.*')):
            os.remove(path)
    writer = SummaryWriter(folder, purge_step=start + 1 if start else None)
    table = '\n'.join(f'| {key} | {value} |' for key, value in sorted(options_record(opt).items()))
    writer.add_text('options', '| option | value |\n|---|---|\n' + table, start)
    return writer


def require_tensorboard():
    """Fail before training, not at the first report, when --tensorboard cannot work."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or leave out --tensorboard)") from None
