"""Device and precision set-up, checkpoints, atomic file writes, and the training Manager."""
import contextlib
import datetime
import glob
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from pix2pixCC_Options import UserError

# ----------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------


def select_device(opt, log=print):
    """The device the options ask for, or the CPU with a notice when CUDA is absent.

    Returns (device, gpu_ids); gpu_ids is empty on the CPU.
    """
    ids = [int(i) for i in opt.gpu_ids.split(',')]
    if any(i < 0 for i in ids):
        return torch.device('cpu'), []
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

    CUDA autocasts to float16 with a GradScaler against underflow; the CPU to bfloat16, whose
    exponent range needs no scaler.
    """

    def __init__(self, opt, device):
        self.device_type = device.type
        self.enabled = opt.data_type == 16
        self.dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=self.enabled and device.type == 'cuda')

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def set_seed(seed):
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds.

    A process killed mid-write leaves a hidden `.tmp-*` file, never a truncated `path`.
    The temporary name keeps the extension, so writers that infer the format still work.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f'.tmp-{os.getpid()}-{name}')
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_image(path, pixels):
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary)


def write_json(path, data):
    with atomic_path(path) as temporary:
        with open(temporary, 'w') as f:
            json.dump(data, f, indent=2, sort_keys=True)


def make_dirs(*folders):
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create '{folder}': {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"'{folder}' is not writable")


# ----------------------------------------------------------------------------------------
# Checkpoints: plain state_dicts of the bare modules, loadable by the published code.
# ----------------------------------------------------------------------------------------


def bare(module):
    """The module inside a DataParallel/DistributedDataParallel wrapper."""
    return module.module if hasattr(module, 'module') else module


def checkpoint_path(model_dir, step, kind):
    """kind is 'G' or 'D'."""
    return os.path.join(model_dir, f'{step}_{kind}.pt')


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


def save_state_dict(module, path):
    with atomic_path(path) as temporary:
        torch.save(bare(module).state_dict(), temporary)


def load_state_dict(module, path):
    """Load a plain state_dict into `module`, strictly, with a one-line error on mismatch."""
    try:
        # weights_only=True: a checkpoint must never be able to run code when loaded.
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load {path}: {reason}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state_dict")
    state = {key[len('module.'):] if key.startswith('module.') else key: value
             for key, value in state.items()}
    own = bare(module).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        detail = (f"shape of {mismatched[0]} is {tuple(state[mismatched[0]].shape)} there, "
                  f"{tuple(own[mismatched[0]].shape)} here" if mismatched else
                  f"{len(missing)} parameter(s) missing (e.g. {missing[0]})" if missing else
                  f"{len(unexpected)} unexpected parameter(s) (e.g. {unexpected[0]})")
        raise UserError(f"{path} does not fit the network built from the options ({detail}); "
                        f"use the network options it was trained with (--n_gf, --n_df, "
                        f"--n_downsample, --n_residual, --input_ch, --target_ch, --norm_type, "
                        f"--trans_conv, --n_D)")
    bare(module).load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------
# Training bookkeeping
# ----------------------------------------------------------------------------------------


def crossed(previous_step, current_step, frequency):
    """True when a multiple of `frequency` lies in (previous_step, current_step].

    The reference tests `current_step % frequency == 0`, which never fires when the batch
    size does not divide the frequency.
    """
    return current_step // frequency > previous_step // frequency


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
    """Everything that hangs off the training loop: report lines, previews, checkpoints.

    `after_step` is called once per iteration; `finish` saves the last state if it is not
    saved yet, so no finished run is lost whatever save_freq is.
    """

    def __init__(self, opt, G, D, log=print, validate=None):
        self.opt, self.G, self.D = opt, G, D
        self.log = log
        self.validate = validate
        self.last_saved = None
        self.start_time = time.time()

    def after_step(self, epoch, previous_step, current_step, n_samples, batch, terms):
        """batch = (input, target, fake), each (B, C, H, W) normalised."""
        opt = self.opt
        if crossed(previous_step, current_step, opt.report_freq):
            self.report(epoch, current_step, n_samples, terms)
        if crossed(previous_step, current_step, opt.display_freq):
            self.save_previews(current_step, batch)
        if crossed(previous_step, current_step, opt.save_freq):
            self.save(current_step)

    def report(self, epoch, current_step, n_samples, terms):
        done = (current_step - 1) % n_samples + 1
        self.log(f"Epoch: {epoch}/{self.opt.n_epochs} [{100.0 * done / n_samples:5.1f}%] "
                 f"Current_step: {current_step} D_loss: {float(terms['D']):.4f} "
                 f"G_loss: {float(terms['G']):.4f}")

    def save_previews(self, current_step, batch):
        _, target, fake = batch
        for name, tensor in (('real', target[0]), ('fake', fake[0])):
            path = os.path.join(self.opt.image_dir, f'{current_step}_{name}.{self.opt.image_mode}')
            save_image(path, to_preview(tensor, self.opt.display_scale))

    def save(self, current_step):
        model_dir = self.opt.model_dir
        save_state_dict(self.G, checkpoint_path(model_dir, current_step, 'G'))
        save_state_dict(self.D, checkpoint_path(model_dir, current_step, 'D'))
        self.last_saved = current_step
        self.log(f"saved {checkpoint_path(model_dir, current_step, 'G')} and _D.pt")
        if self.validate is not None:
            self.validate(current_step)

    def finish(self, current_step):
        if self.last_saved != current_step and current_step > self.opt.latest_iter:
            self.save(current_step)
        elapsed = datetime.timedelta(seconds=round(time.time() - self.start_time))
        self.log(f"Total time: {elapsed}")
