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


def read_json(folder, name):
    """The dict in `folder/name`, or None when there is no such file."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def options_record(opt):
    """The options as a JSON-able dict (what train_options.json and the state file hold)."""
    return {key: value for key, value in vars(opt).items()
            if isinstance(value, (str, int, float, bool, type(None)))}


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


def safe_load(path):
    """torch.load that can never run code: weights_only=True refuses pickled objects."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
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
            trained, own = generator_options_of(state), generator_options_of(bare(module).state_dict())
        else:
            trained, own = discriminator_options_of(state), discriminator_options_of(
                bare(module).state_dict())
    except (KeyError, IndexError):
        return 'it holds different parameter names'
    differ = [f"--{k} {trained[k]} (options say {own[k]})" for k in trained
              if k in own and trained[k] != own[k]]
    return 'it was trained with ' + ', '.join(differ) if differ else 'its parameters differ'


def load_state_dict(module, path):
    """Load a plain state_dict into `module`, strictly, with a one-line error on mismatch."""
    state = safe_load(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a state_dict of tensors")
    state = {key[len('module.'):] if key.startswith('module.') else key: value
             for key, value in state.items()}
    own = bare(module).state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise UserError(f"{path} does not fit the network built from the options: "
                        f"{mismatch_reason(state, module)}")
    bare(module).load_state_dict(state, strict=True)


def state_path(model_dir, step):
    return os.path.join(model_dir, f'{step}_state.pt')


def newest_complete_step(model_dir):
    """Newest step with G, D and training state saved; else newest with G and D; else None."""
    with_networks = [s for s in saved_steps(model_dir, 'G')
                     if os.path.isfile(checkpoint_path(model_dir, s, 'D'))]
    complete = [s for s in with_networks if os.path.isfile(state_path(model_dir, s))]
    return (complete or with_networks or [None])[-1]


def rng_states():
    """The torch, numpy and python RNG states, as plain tensors/lists (weights_only-safe)."""
    import random
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)),
                                                      position, has_gauss, gauss],
            'python': random.getstate()}


def set_rng_states(states):
    import random
    torch.set_rng_state(states['torch'])
    kind, keys, position, has_gauss, gauss = states['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states['python']
    random.setstate((version, tuple(internal), gauss_next))


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
    saved yet, so no finished run is lost whatever save_freq is. `training_state()` returns
    what, beside the two networks, a run needs to resume exactly (optimisers, RNGs, ...).
    """

    def __init__(self, opt, G, D, training_state, log=print, validate=None):
        self.opt, self.G, self.D = opt, G, D
        self.training_state = training_state
        self.log = log
        self.validate = validate
        self.last_saved = opt.latest_iter or None
        self.start_time = time.time()

    def after_step(self, epoch, previous_step, current_step, n_samples, batch, terms):
        """batch = (input, target, fake), each (B, C, H, W) normalised."""
        opt = self.opt
        if crossed(previous_step, current_step, opt.report_freq):
            self.report(epoch, current_step, n_samples, terms)
        if crossed(previous_step, current_step, opt.display_freq):
            self.save_previews(current_step, batch)
        if crossed(previous_step, current_step, opt.save_freq):
            self.save(current_step, epoch)

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

    def save(self, current_step, epoch):
        """G, D, then the training state: a step is complete once its state file exists."""
        model_dir = self.opt.model_dir
        save_state_dict(self.G, checkpoint_path(model_dir, current_step, 'G'))
        save_state_dict(self.D, checkpoint_path(model_dir, current_step, 'D'))
        with atomic_path(state_path(model_dir, current_step)) as temporary:
            torch.save(dict(self.training_state(), step=current_step, epoch=epoch), temporary)
        self.last_saved = current_step
        self.log(f"saved {checkpoint_path(model_dir, current_step, 'G')}, _D.pt and _state.pt")
        if self.validate is not None:
            self.validate(current_step)

    def last_good(self):
        if self.last_saved is None:
            return 'none saved yet'
        return f"{checkpoint_path(self.opt.model_dir, self.last_saved, 'G')} " \
               f"(resume with --latest_iter {self.last_saved})"

    def finish(self, current_step, epoch):
        if self.last_saved != current_step:
            self.save(current_step, epoch)
        elapsed = datetime.timedelta(seconds=round(time.time() - self.start_time))
        self.log(f"Total time: {elapsed}")
