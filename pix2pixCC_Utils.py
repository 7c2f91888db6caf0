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


class Distributed:
    """This process's place in a torchrun job (DistributedDataParallel), or a lone process.

    torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. With more than one process, each drives
    one device: GPU `LOCAL_RANK` with NCCL, or the CPU with Gloo when `--gpu_ids -1` or no
    CUDA. Only rank 0 (`is_main`) writes files.
    """

    def __init__(self):
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.enabled = self.world_size > 1
        self.is_main = self.rank == 0

    def setup(self, opt, log=print):
        """Start the process group; returns (device, gpu_ids) like `select_device`."""
        if not self.enabled:
            return select_device(opt, log)
        import torch.distributed as dist
        use_cuda = not cpu_requested(opt) and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        device = torch.device(f'cuda:{self.local_rank}' if use_cuda else 'cpu')
        log(f"distributed: {self.world_size} processes "
            f"({'NCCL on GPUs' if use_cuda else 'Gloo on CPUs'})")
        return device, []

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, function):
        """Run `function` on rank 0 only; every rank gets its result, or raises its UserError
        (so a bad dataset stops all processes instead of leaving them waiting)."""
        result, error = None, None
        if self.is_main:
            try:
                result = function()
            except UserError as caught:
                error = str(caught)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise UserError(error)
        return result

    def mean(self, terms):
        """{name: 0-d tensor} averaged over all processes (the loss of the global batch)."""
        if not self.enabled:
            return terms
        import torch.distributed as dist
        values = torch.stack([value.float() for value in terms.values()])
        dist.all_reduce(values)
        return dict(zip(terms, values / self.world_size))

    def all_finite(self, value):
        """True when `value` (a 0-d tensor) is finite on every rank."""
        finite = torch.isfinite(value.detach()).float()
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def wrap(self, module, device):
        """DistributedDataParallel around `module`; on GPUs BatchNorm becomes SyncBatchNorm
        (PyTorch has no SyncBatchNorm on the CPU, so there each process keeps its own batch
        statistics)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel
        if device.type == 'cuda':
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == 'cuda'
                                       else None)

    def close(self):
        if self.enabled:
            import torch.distributed as dist
            dist.destroy_process_group()


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


# ----------------------------------------------------------------------------------------
# CPU execution of the widest convolutions (performance only: same modules, same state_dict
# keys, same result up to float rounding).
#
# PyTorch's default CPU convolution (oneDNN) re-lays-out the weights at every call. For the
# generator's 1024-channel convolutions at training sizes (16x16 feature maps for 256x256
# data, 9.4 M weights each) that copy costs as much as the arithmetic, forward and backward:
# there, im2col + one matrix product (aten's thnn_conv2d, which the backward also uses) is
# about 1.5x faster. Where the weights are few for the pixels (the discriminator's 4x4
# convolution and the generator's 256->512 one at 32x32, inference at 1024x1024) oneDNN is
# as fast or faster, so it keeps them. The step as a whole is measured in BENCHMARKS.md; per
# convolution, forward and backward, GEMM against oneDNN (2 threads, torch 2.13): 1024->1024
# 3x3 at 16x16 130-155 ms against 197-206 (batch 4: 476-499 against 590-770); 512->1024 5x5
# at 16x16 169-195 against 244-275; 256->512 5x5 at 32x32 165-187 against 156-172; the
# discriminator's 256->512 4x4 at 31x31 108-114 against 97-101.
# ----------------------------------------------------------------------------------------

GEMM_CONV_MAX_PIXELS = 1024        # batch x output height x width: at most this many pixels,
GEMM_CONV_MIN_WEIGHTS = 2 ** 20    # at least this many weights,
GEMM_CONV_WEIGHTS_PER_PIXEL = 4096  # and at least this many weights per pixel take the path


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d that computes im2col + matrix product where that is faster (see above).

    `use_gemm_convolutions` turns a network's Conv2d layers into this class in place: a
    module is still called as a module (its hooks run), and its parameters and state_dict
    keys are those of the nn.Conv2d it was.
    """

    def forward(self, x):
        if self.gemm_pays(x):
            return torch.ops.aten.thnn_conv2d(x, self.weight, list(self.kernel_size), self.bias,
                                              list(self.stride), list(self.padding))
        return super().forward(x)

    def gemm_pays(self, x):
        if not (x.device.type == 'cpu' and x.dtype == self.weight.dtype == torch.float32
                and x.dim() == 4):
            return False
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        pixels = x.shape[0] * ((x.shape[2] + 2 * ph - kh) // sh + 1) * \
            ((x.shape[3] + 2 * pw - kw) // sw + 1)
        weights = self.weight.numel()
        # Under bfloat16 autocast oneDNN's bfloat16 kernels are the fast ones; a compiled
        # graph has its own convolution lowering.
        return (pixels <= GEMM_CONV_MAX_PIXELS and weights >= GEMM_CONV_MIN_WEIGHTS
                and weights >= GEMM_CONV_WEIGHTS_PER_PIXEL * pixels
                and not torch.is_autocast_enabled('cpu')
                and not torch.compiler.is_compiling())


def use_gemm_convolutions(module, enabled=True):
    """Let every plain Conv2d of `module` take the GEMM path where it is faster (or, with
    enabled=False, never). The class changes in place, nothing else."""
    if not hasattr(torch.ops.aten, 'thnn_conv2d'):
        return module
    for layer in module.modules():
        plain = type(layer) is nn.Conv2d and layer.groups == 1 and \
            tuple(layer.dilation) == (1, 1) and layer.padding_mode == 'zeros' and \
            not isinstance(layer.padding, str)
        if enabled and plain:
            layer.__class__ = GemmConv2d
        elif not enabled and type(layer) is GemmConv2d:
            layer.__class__ = nn.Conv2d
    return module


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
    """The module inside DataParallel/DistributedDataParallel and torch.compile wrappers
    (whose state_dict keys would carry `module.` / `_orig_mod.` prefixes)."""
    while hasattr(module, 'module') or hasattr(module, '_orig_mod'):
        module = getattr(module, 'module', None) or module._orig_mod
    return module


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
            options_of = generator_options_of
        else:
            options_of = discriminator_options_of
        trained, own = options_of(state), options_of(bare(module).state_dict())
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
# Metrics: the numbers a paper reports (CC after binning, errors, flux)
# ----------------------------------------------------------------------------------------


def bin_mean(x, k):
    """Mean over non-overlapping k x k blocks of (..., H, W); edges that do not fill a block
    are dropped."""
    if k == 1:
        return x
    h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
    x = x[..., :h, :w]
    return x.reshape(*x.shape[:-2], h // k, k, w // k, k).mean(axis=(-3, -1))


def image_metrics(real, fake, bins):
    """Metrics of one generated map against its target, both C x H x W in physical units.

    For every channel c and binning factor k: Pearson CC, concordance CC (the Inspector's own
    `correlation`), RMSE and MAE; at full resolution the total unsigned flux sum|x| and the net
    flux sum(x) of real and generated data. Pixels where the target is not finite are left
    out. Keys: `cc_8x8`, `rmse_1x1`, `flux_net_real`, ... (prefixed `ch<c>_` for several
    channels).
    """
    from pix2pixCC_Networks import correlation
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    row = {}
    for c in range(real.shape[0]):
        prefix = f'ch{c}_' if real.shape[0] > 1 else ''
        for k in bins:
            r, f = bin_mean(real[c], k), bin_mean(fake[c], k)
            keep = np.isfinite(r) & np.isfinite(f)
            r, f = torch.from_numpy(r[keep])[None], torch.from_numpy(f[keep])[None]
            row[f'{prefix}cc_{k}x{k}'] = float(correlation(r, f, ccc=False, eps=0)[0])
            row[f'{prefix}ccc_{k}x{k}'] = float(correlation(r, f, ccc=True, eps=0)[0])
            row[f'{prefix}rmse_{k}x{k}'] = float(torch.sqrt(((r - f) ** 2).mean()))
            row[f'{prefix}mae_{k}x{k}'] = float((r - f).abs().mean())
        keep = np.isfinite(real[c]) & np.isfinite(fake[c])
        r, f = real[c][keep], fake[c][keep]
        row.update({f'{prefix}flux_unsigned_real': float(np.abs(r).sum()),
                    f'{prefix}flux_unsigned_fake': float(np.abs(f).sum()),
                    f'{prefix}flux_net_real': float(r.sum()),
                    f'{prefix}flux_net_fake': float(f.sum())})
    return row


def summarize(rows):
    """{metric: {'mean', 'std', 'median'}} over the rows' numeric columns (NaN ignored)."""
    summary = {}
    for key in rows[0]:
        values = np.array([row[key] for row in rows], dtype=object)
        if not all(isinstance(v, (int, float)) for v in values):
            continue
        values = values.astype(np.float64)
        summary[key] = {'mean': float(np.nanmean(values)), 'std': float(np.nanstd(values)),
                        'median': float(np.nanmedian(values))}
    return summary


def write_csv(path, rows, append=False):
    """Write `rows` (dicts with the same keys) as CSV; with `append`, after the rows already
    there. The whole file is rewritten under a temporary name and renamed, so a process
    killed mid-write leaves the previous complete file."""
    import csv
    existing = []
    if append and os.path.isfile(path):
        with open(path, newline='') as f:
            existing = list(csv.DictReader(f))
    all_rows = existing + [dict(row) for row in rows]
    columns = list(dict.fromkeys(key for row in all_rows for key in row))
    with atomic_path(path) as temporary:
        with open(temporary, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(all_rows)


def read_csv(path):
    import csv
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def metrics_table(summary, bins, channels=1):
    """A short text table: mean CC, CCC, RMSE, MAE per binning factor (and channel)."""
    lines = [f"{'channel':>7} {'bin':>5} {'CC':>7} {'CCC':>7} {'RMSE':>11} {'MAE':>11}"]
    for c in range(channels):
        prefix = f'ch{c}_' if channels > 1 else ''
        for k in bins:
            cc, ccc, rmse, mae = (summary[f'{prefix}{name}_{k}x{k}']['mean']
                                  for name in ('cc', 'ccc', 'rmse', 'mae'))
            lines.append(f"{c:>7} {f'{k}x{k}':>5} {cc:7.4f} {ccc:7.4f} {rmse:11.4g} {mae:11.4g}")
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------
# Pictures: comparison panels and the loss curve (matplotlib, no display needed)
# ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_panel(path, input, real, generated, target_scaling):
    """input | real | generated | difference, one row per target channel.

    input: C x H x W normalised (grey, [-1, 1]); real, generated: C x H x W in physical units.
    Real and generated share one colour scale: for signed data (limits on both sides of 0)
    diverging around 0 up to the largest |real| value, otherwise the target's saturation
    limits. The difference has its own symmetric diverging scale.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    lo, up = target_scaling.lower, target_scaling.upper
    if lo < 0 < up:
        peak = float(np.nanmax(np.abs(real))) if np.isfinite(real).any() else 0.0
        peak = peak or max(-lo, up)
        data_style = dict(cmap='RdBu_r', vmin=-peak, vmax=peak)
    elif target_scaling.log:
        data_style = dict(cmap='viridis', norm=LogNorm(vmin=lo, vmax=up))
    else:
        data_style = dict(cmap='viridis', vmin=lo, vmax=up)
    difference = generated - real
    spread = float(np.nanmax(np.abs(difference))) if np.isfinite(difference).any() else 1.0
    diff_style = dict(cmap='RdBu_r', vmin=-spread or -1, vmax=spread or 1)
    rows = real.shape[0]
    figure, axes = plt.subplots(rows, 4, figsize=(13, 3.2 * rows), squeeze=False)
    for c in range(rows):
        panels = ((input[min(c, input.shape[0] - 1)], 'input (normalised)',
                   dict(cmap='gray', vmin=-1, vmax=1)),
                  (real[c], 'real', data_style), (generated[c], 'generated', data_style),
                  (difference[c], 'generated - real', diff_style))
        for axis, (image, title, style) in zip(axes[c], panels):
            shown = axis.imshow(image, origin='lower', interpolation='nearest', **style)
            axis.set_title(title + (f' [ch {c}]' if rows > 1 else ''))
            axis.set_xticks([]), axis.set_yticks([])
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80)
    plt.close(figure)


def save_loss_curve(path, rows):
    """Loss terms of loss_log.csv rows against the step."""
    if not rows:
        return
    plt = _pyplot()
    steps = [int(row['step']) for row in rows]
    figure, (losses, cc) = plt.subplots(1, 2, figsize=(12, 4))
    for name in ('D', 'G', 'G_LSGAN', 'G_FM', 'G_CC'):
        losses.plot(steps, [float(row[name]) for row in rows], label=name)
    losses.set_xlabel('step (samples)'), losses.set_ylabel('loss'), losses.set_yscale('log')
    losses.legend()
    cc.plot(steps, [float(row['CC']) for row in rows], color='k')
    cc.set_xlabel('step (samples)'), cc.set_ylabel('CC (training batch, full resolution)')
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80)
    plt.close(figure)


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

    def __init__(self, opt, G, D, training_state, log=print, validate=None, active=True):
        from pix2pixCC_Pipeline import Scaling
        self.active = active  # False on every process but the first of a distributed run
        self.opt, self.G, self.D = opt, G, D
        self.training_state = training_state
        self.log = log
        self.validate = validate
        self.last_saved = opt.latest_iter or None
        self.start_time = time.time()
        self.last_report = (time.time(), opt.latest_iter)
        self.target_scaling = Scaling.from_options(opt, 'target')
        self.target_scaling.save_scale = 1.0  # previews show the target's own units
        self.loss_log = os.path.join(opt.checkpoint_dir, 'loss_log.csv')
        # A run redoes the steps after the one it starts from: drop their old log rows (all
        # of them for a new run), so no step is logged twice.
        for log_path in (self.loss_log, os.path.join(opt.checkpoint_dir, 'val_metrics.csv')):
            rows = read_csv(log_path) if active else []
            if any(int(row['step']) > opt.latest_iter for row in rows):
                write_csv(log_path, [r for r in rows if int(r['step']) <= opt.latest_iter])

    def after_step(self, epoch, previous_step, current_step, n_samples, batch, terms):
        """batch = (input, target, fake), each (B, C, H, W) normalised."""
        opt = self.opt
        if not self.active:
            return
        if crossed(previous_step, current_step, opt.report_freq):
            self.report(epoch, previous_step, current_step, n_samples, terms)
        if crossed(previous_step, current_step, opt.display_freq):
            self.save_previews(current_step, batch)
        if crossed(previous_step, current_step, opt.save_freq):
            self.save(current_step, epoch)

    def report(self, epoch, previous_step, current_step, n_samples, terms):
        """The report line (as published) and a row of loss_log.csv."""
        done = (current_step - 1) % n_samples + 1
        terms = {name: float(value) for name, value in terms.items()}
        self.log(f"Epoch: {epoch}/{self.opt.n_epochs} [{100.0 * done / n_samples:5.1f}%] "
                 f"Current_step: {current_step} D_loss: {terms['D']:.4f} "
                 f"G_loss: {terms['G']:.4f}")
        now, batch = time.time(), current_step - previous_step
        last_time, last_step = self.last_report
        seconds_per_step = (now - last_time) / max(1, (current_step - last_step) / batch)
        self.last_report = (now, current_step)
        write_csv(self.loss_log, [dict(step=current_step, epoch=epoch, **terms,
                                       seconds_per_step=round(seconds_per_step, 5))],
                  append=True)

    def save_previews(self, current_step, batch):
        input, target, fake = (t[0].detach().float().cpu() for t in batch)
        stem = os.path.join(self.opt.image_dir, str(current_step))
        for name, tensor in (('real', target), ('fake', fake)):
            save_image(f'{stem}_{name}.{self.opt.image_mode}',
                       to_preview(tensor, self.opt.display_scale))
        save_panel(f'{stem}_panel.png', input.numpy(),
                   self.target_scaling.inverse(target.numpy()),
                   self.target_scaling.inverse(fake.numpy()), self.target_scaling)

    def save(self, current_step, epoch):
        """G, D, then the training state: a step is complete once its state file exists."""
        model_dir = self.opt.model_dir
        save_state_dict(self.G, checkpoint_path(model_dir, current_step, 'G'))
        save_state_dict(self.D, checkpoint_path(model_dir, current_step, 'D'))
        with atomic_path(state_path(model_dir, current_step)) as temporary:
            torch.save(dict(self.training_state(), step=current_step, epoch=epoch), temporary)
        self.last_saved = current_step
        self.log(f"saved {checkpoint_path(model_dir, current_step, 'G')}, _D.pt and _state.pt")
        save_loss_curve(os.path.join(self.opt.checkpoint_dir, 'loss_curve.png'),
                        read_csv(self.loss_log))
        if self.validate is not None:
            self.validate(current_step)

    def last_good(self):
        if self.last_saved is None:
            return 'none saved yet'
        return f"{checkpoint_path(self.opt.model_dir, self.last_saved, 'G')} " \
               f"(resume with --latest_iter {self.last_saved})"

    def finish(self, current_step, epoch):
        if not self.active:
            return
        if self.last_saved != current_step:
            self.save(current_step, epoch)
        elapsed = datetime.timedelta(seconds=round(time.time() - self.start_time))
        self.log(f"Total time: {elapsed}")
