"""What the two drivers share, in the order of a run's life.

1. Errors and files: `WriteError`, `atomic_path` (every file is written under a temporary
   name and renamed), `save_torch`, `save_image`, JSON and CSV files, `options_record`,
   `make_dirs`, `silent` (a log that prints nothing).
2. Devices, precision and memory: `select_device`, `Precision` (mixed precision),
   `prepare_network` (placement, channels-last, torch.compile), `memory_format`,
   `release_mapped_weights_after_use` (inference holds a layer's weights only while it runs),
   `reuse_freed_memory` (CPU inference reuses freed memory instead of faulting in new pages),
   `return_freed_memory`.
3. Distributed: `Distributed`, this process's place in a torchrun job.
4. Checkpoints and the training state: file names (`checkpoint_path`, `state_path`,
   `saved_steps`, `newest_complete_step`), `safe_load` (never runs code), `load_state_dict`
   (with the option that differs on a mismatch), `supersede_newer_checkpoints` (a resumed
   older step starts a new branch), `rng_states`; the model file (`model_file_record`,
   `load_model_file`).
5. Run safety: `RunLock` (one run per folder), `GracefulStop` (stop signals end training
   after the step in progress), `ignore_stop_signals` (loading workers leave them to the
   main process) and the exit hook that ends workers an error left behind.
6. The Manager and TensorBoard: `Manager` (report lines, loss log, previews, checkpoints,
   validation), `tensorboard_writer`.
7. Figures: `save_panel` (input | real | generated | difference), `save_loss_curve`.
8. The optional CPU paths (performance only): `GemmConv2d` (im2col + GEMM for the widest
   convolutions in training; scattered patches for the thinnest and Winograd's F(2x2, 3x3)
   for the residual blocks' in inference),
   `GemmConvTranspose2d`, `scatter_patches`, `use_gemm_convolutions`.

The learning-rate schedule, the seed and when reports and saves fall due are in
pix2pixCC_Train.py; the evaluation metrics are in pix2pixCC_Test.py; the CC as a loss is in
pix2pixCC_Networks.py.
"""
import atexit
import contextlib
import csv
import ctypes
import datetime
import errno
import functools
import glob
import hashlib
import json
import mmap
import multiprocessing
import multiprocessing.util  # noqa: F401 (see kill_leftover_workers)
import os
import random
import re
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from pix2pixCC_Networks import finite_correlation
from pix2pixCC_Options import FITS_FORMATS, UserError

try:
    import fcntl  # the run lock; absent on Windows, which runs unlocked
except ImportError:
    fcntl = None


# ----------------------------------------------------------------------------------------
# 1. Errors and files
# ----------------------------------------------------------------------------------------


def silent(*args):
    """A `log` that prints nothing."""


class WriteError(UserError):
    """A file could not be written (no space, quota, I/O or permission error)."""

    def __init__(self, path, error):
        reason = error.strerror or str(error) if isinstance(error, OSError) else str(error)
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds.

    A process killed mid-write leaves a hidden `.tmp-*` file, never a truncated `path`; a
    failed write removes the temporary and raises WriteError (an OSError such as a full disk
    becomes one line for the user). The temporary name keeps the extension, so writers that
    infer the format still work.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f'.tmp-{os.getpid()}-{name}')
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise WriteError(path, error) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


class _RecordingFile:
    """A file whose write errors are remembered: torch.save swallows the OSError of a full
    disk and raises a RuntimeError about stream positions instead."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()

    def tell(self):
        return self.file.tell()


def save_torch(data, path):
    """torch.save `data` to `path` atomically and durably (flushed to the disk before the
    rename, so a crashed node never leaves a short file under the final name); a write
    failure raises WriteError with the operating system's reason."""
    with atomic_path(path) as temporary:
        with open(temporary, 'wb') as file:
            recording = _RecordingFile(file)
            try:
                torch.save(data, recording)
            except RuntimeError:
                if recording.error is not None:
                    raise recording.error from None
                raise
            file.flush()
            os.fsync(file.fileno())


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


def write_csv(path, rows, append=False):
    """Write `rows` (dicts with the same keys) as CSV; with `append`, after the rows already
    there. The whole file is rewritten under a temporary name and renamed, so a process
    killed mid-write leaves the previous complete file."""
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
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def options_record(opt):
    """The options as a JSON-able dict (what train_options.json and the state file hold):
    scalars, and lists and dicts of scalars (--metric_bins, the targets' FITS cards)."""
    scalar = (str, int, float, bool, type(None))

    def plain(value):
        if isinstance(value, (list, tuple)):
            return all(isinstance(v, scalar) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and isinstance(v, scalar) for k, v in value.items())
        return isinstance(value, scalar)
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in vars(opt).items() if plain(value)}


def make_dirs(*folders):
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create '{folder}': {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"'{folder}' is not writable")


# ----------------------------------------------------------------------------------------
# 2. Devices, precision and memory
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


# glibc gives every allocation above 32 MB a mapping of its own and hands it back to the
# kernel when it is freed. At full resolution nearly every layer's output is that large (64
# channels at 1024x1024: 268 MB), so each layer of an inference faulted in fresh zeroed pages
# for its output: 65,536 page faults for one such map; a quarter of a 1024x1024 image's
# CPU time (README "Speed"). Told to keep freed memory in its heap, glibc gives the next
# layer the pages the last one let go; the process's peak memory is what the pass holds at
# once, as before, but it stays resident until the process ends.
GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)
KEEP_FREED_BYTES = 2 ** 31 - 1  # free memory kept at the heap's top (mallopt takes an int)
KEEP_BETWEEN_LAYERS_BYTES = 2 ** 31  # free memory a tiled image keeps from layer to layer
MALLOC_ENVIRONMENT = ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_',
                      'MALLOC_TOP_PAD_')
freed_memory_kept = False  # whether reuse_freed_memory took effect in this process


def reuse_freed_memory():
    """Let this process reuse the memory it frees instead of returning it to the kernel
    (glibc on Linux; see above). Left alone where glibc's malloc was configured through the
    environment (GLIBC_TUNABLES, MALLOC_*_) or is not the allocator in use: a user's
    choice wins. Returns whether the setting was made."""
    if not sys.platform.startswith('linux') or 'glibc.malloc' in \
            os.environ.get('GLIBC_TUNABLES', '') or any(os.environ.get(name) is not None
                                                        for name in MALLOC_ENVIRONMENT):
        return False
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
    if mallopt is None or 'malloc' in os.environ.get('LD_PRELOAD', ''):  # jemalloc, tcmalloc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # glibc's mallopt returns 1 on success (musl's stub returns 0: nothing to do there).
    global freed_memory_kept
    freed_memory_kept = (mallopt(GLIBC_M_MMAP_MAX, 0) == 1
                         and mallopt(GLIBC_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1)
    return freed_memory_kept


class MallocInfo(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc 2.33 and later)."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


def return_freed_memory(keep=KEEP_BETWEEN_LAYERS_BYTES):
    """Give the kept free memory back to the kernel (glibc's malloc_trim also releases the
    free pages inside the heap) when more than `keep` bytes of it are free, where
    reuse_freed_memory kept it. Asked after every layer of a tiled image, whose tiles change
    shape from layer to layer and may leave the heap's free memory in pieces later tiles do
    not fit: a bound on what a tiled image keeps. Given back after every layer, the peak of
    a 4096x4096 image fell from 2.5 to 2.2 GB, but each layer faulted its tiles' pages in
    again (2048x2048: 1.44x the whole image's time instead of 1.22x); above 2 GB it is a
    safety valve that those images do not reach. Returns whether it was given back."""
    if not freed_memory_kept:
        return False
    libc = ctypes.CDLL(None)
    mallinfo2 = getattr(libc, 'mallinfo2', None)
    if mallinfo2 is not None:
        mallinfo2.restype = MallocInfo
        if mallinfo2().fordblks <= keep:
            return False
    libc.malloc_trim(0)
    return True


MADV_DONTNEED = 4  # Linux: drop these pages; a file-backed page is read again when touched


def mapped_ranges(path):
    """The address ranges at which `path` is mapped into this process (Linux's
    /proc/self/maps; empty elsewhere)."""
    try:
        with open('/proc/self/maps') as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    real, ranges = os.path.realpath(path), []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            start, end = (int(value, 16) for value in fields[0].split('-'))
            ranges.append((start, end))
    return ranges


def release_mapped_weights_after_use(G, path):
    """After each layer of G has run, give the pages of its weights that are mapped from the
    checkpoint `path` back to the operating system.

    The weights stay in the OS's page cache (shared with any other process reading the file,
    and reclaimable), and the next image maps them again from there. So the process holds a
    layer's weights only while it runs: at 1024x1024 the full-resolution layers at the end,
    where the activations peak, no longer sit on the 680 MB of residual-block weights.
    Weights not mapped from the file (a legacy-format checkpoint, a GPU, bfloat16 copies) are
    left alone. Returns the number of layers hooked.
    """
    ranges = mapped_ranges(path)
    if not ranges or not sys.platform.startswith('linux'):
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    hooked = 0
    for layer in G.modules():
        spans = []
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            start = tensor.data_ptr()
            end = start + tensor.numel() * tensor.element_size()
            if tensor.device.type == 'cpu' and any(a <= start and end <= b for a, b in ranges):
                first, last = -(-start // page) * page, end // page * page  # whole pages only
                if last > first:
                    spans.append((first, last - first))
        if spans:
            layer.register_forward_hook(functools.partial(release, madvise, spans))
            hooked += 1
    return hooked


def release(madvise, spans, module, inputs, output):
    """Forward hook of release_mapped_weights_after_use (returns None: output unchanged)."""
    for start, size in spans:
        madvise(start, size, MADV_DONTNEED)


# ----------------------------------------------------------------------------------------
# 3. Distributed: one process per device under torchrun
# ----------------------------------------------------------------------------------------


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
                if not self.enabled:
                    raise
                error = (str(caught), caught.exit_status)
        result, error = self.broadcast((result, error))
        if error is not None:
            failure = UserError(error[0])
            failure.exit_status = error[1]
            raise failure
        return result

    def max(self, value):
        """The largest of the ranks' integer `value`s (e.g. whether any rank was signalled)."""
        if not self.enabled:
            return value
        box = torch.tensor([value], dtype=torch.int64,
                           device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def mean(self, terms):
        """{name: 0-d tensor} averaged over all processes (the loss of the global batch)."""
        if not self.enabled:
            return terms
        values = torch.stack([value.float() for value in terms.values()])
        dist.all_reduce(values)
        return dict(zip(terms, values / self.world_size, strict=True))

    def all_finite(self, value):
        """True when `value` (a 0-d tensor) is finite on every rank."""
        finite = torch.isfinite(value.detach()).float()
        if self.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def wrap(self, module, device):
        """DistributedDataParallel around `module`; on GPUs BatchNorm becomes SyncBatchNorm
        (PyTorch has no SyncBatchNorm on the CPU, so there each process keeps its own batch
        statistics)."""
        if not self.enabled:
            return module
        if device.type == 'cuda':
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == 'cuda'
                                       else None)

    def close(self):
        if self.enabled:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# 4. Checkpoints and the training state: plain state_dicts of the bare modules, loadable
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

    With `mmap`, the tensors are mapped from the file rather than read into memory of their
    own (files in PyTorch's legacy format, which cannot be mapped, are read)."""
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not mmap or 'mmap' not in str(error):
                raise
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


def load_state_dict(module, path, assign=False):
    """Load a plain state_dict into `module`, strictly, with a one-line error on mismatch.

    With `assign`, the module takes the checkpoint's tensors themselves, mapped from the file
    (for a module built on the 'meta' device, which holds no memory): the weights are then
    held once, not once in the module and once more in the loaded state_dict.
    """
    fit_state_dict(module, safe_load(path, mmap=assign), path, assign)


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


def model_file_record(state, step, run, options, target_header, bfloat16=False):
    """What a model file holds: the generator's `state` (floating tensors in bfloat16 with
    `bfloat16`, half the size; float32 otherwise), the training `step`, the `run` name, the
    network and data `options` and the targets' FITS identity cards, with the format, its
    version and the weights' SHA-256."""
    if bfloat16:
        state = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
                 for key, value in state.items()}
    return {'format': MODEL_FORMAT, 'format_version': MODEL_FORMAT_VERSION, 'step': int(step),
            'run': run, 'options': options, 'target_header': target_header,
            'weights_dtype': 'bfloat16' if bfloat16 else 'float32', 'weights': state,
            'weights_sha256': weights_sha256(state)}


MODEL_FIELDS = ('step', 'run', 'options', 'target_header', 'weights', 'weights_sha256')


def load_model_file(path):
    """The record of the model file `path` (`model_file_record`), its weights mapped from the
    file; UserError in one line for a file that is not one, a format version this code does
    not read, or weights whose SHA-256 does not match (a damaged copy)."""
    if not os.path.isfile(path):
        raise UserError(f"model file {path} does not exist; check --model")
    try:
        record = safe_load(path, mmap=True)
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
    return record


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
# 5. Run safety: one run per folder, stop signals, loading workers
# ----------------------------------------------------------------------------------------


class RunLock:
    """An operating-system lock on a run folder, so two training runs never write into one.

    `flock` is released by the kernel when the holding process ends in any way (SIGKILL
    included), so a killed run leaves no stale lock behind. The file keeps who holds it, for
    the message the second run prints, and is removed when the run ends (the OS lock, not
    the file, says whether a run is going). Systems without fcntl (Windows), and file
    systems without `flock` (NFS without lockd, Lustre mounted without flock), run unlocked,
    the latter with a warning.
    """

    def __init__(self, folder, log=print):
        self.path = os.path.join(folder, 'train.lock')
        self.log = log
        self.fd = None

    def acquire(self):
        if fcntl is None:
            return
        make_dirs(os.path.dirname(self.path))
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # Not "held by another run": this file system cannot lock at all.
                    self.log(f"warning: cannot lock {self.path} ({error.strerror}): this file "
                             f"system has no flock, so a second training run in this folder "
                             f"would not be detected; run one at a time")
                    break
                holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or \
                    'a process that has not written its name yet'
                os.close(fd)
                raise UserError(f"another training run is using {os.path.dirname(self.path)} "
                                f"({holder}); wait for it to end or stop it, or choose another "
                                f"--dataset_name") from None
            if self._is_current(fd):
                break
            os.close(fd)  # a run that ended removed the file between our open and our lock
        started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}, started "
                      f"{started}\n".encode(), 0)
        self.fd = fd

    def _open(self):
        """The lock file's descriptor, never through a symbolic link: a link (say, from a run
        folder copied with `cp -s`) is replaced by a file of this run's own, and the file it
        points to is left as it is."""
        if os.path.islink(self.path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0),
                           0o644)
        except OSError as error:
            raise UserError(f"cannot create {self.path}: {error.strerror}") from None

    def _is_current(self, fd):
        """Whether `fd` is still the file at the lock's path (not one a finished run removed)."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return False

    def release(self):
        if self.fd is None:
            return
        # Removed while still locked, so no later run reads this finished run's name in it.
        if self._is_current(self.fd):
            with contextlib.suppress(OSError):
                os.remove(self.path)
        os.close(self.fd)  # closing the file releases the lock
        self.fd = None


class StopRequested(UserError):
    """A stop signal ended the run: exit 128 + signal. `when` says where it stopped (by
    default, before training began, with nothing to save)."""

    def __init__(self, signum, when='before the first training step; nothing was saved'):
        super().__init__(f"stopped by {signal_name(signum)} {when}")
        self.exit_status = 128 + signum


def signal_name(signum):
    return signal.Signals(signum).name


class GracefulStop:
    """SIGTERM, SIGINT and SIGUSR1 end training after the step in progress, not at once.

    Schedulers (SLURM, PBS) send SIGTERM (or a chosen signal such as SIGUSR1) some time before
    they kill a job, and Ctrl-C sends SIGINT: the driver finishes the step, saves a
    checkpoint and exits with 128 + the signal number. Before `defer()` (data checks,
    loading a checkpoint, building the networks) a signal stops at once with StopRequested.
    A SIGINT while a stop is pending raises KeyboardInterrupt and sets `aborted`: a second
    Ctrl-C aborts at once.

    The Test script uses it per file (README "Sharing a model and running it elsewhere"):
    `early` ends the StopRequested line of a signal before `defer()`, `pending` is what the
    line printed at a deferred signal says will happen.
    """

    def __init__(self, early='before the first training step; nothing was saved',
                 pending='stopping after the step in progress and saving a checkpoint'):
        self.early, self.pending = early, pending
        self.signals = [signal.SIGTERM, signal.SIGINT] + \
            ([signal.SIGUSR1] if hasattr(signal, 'SIGUSR1') else [])
        self.signum = None
        self.deferring = False
        self.aborted = False
        self.previous = {}

    def __enter__(self):
        try:
            for signum in self.signals:
                self.previous[signum] = signal.signal(signum, self.handle)
        except ValueError:  # not the main thread (e.g. called from a worker thread)
            self.previous = {}
        return self

    def __exit__(self, exc_type, exc, traceback):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        # A library that catches the StopRequested raised inside it (torch.load turns it into
        # an unpickling error, a reader into "cannot read") must not make a stop look like a
        # bad file: whatever came out, the run was stopped.
        if exc is not None and not self.deferring and self.signum is not None and \
                not isinstance(exc, StopRequested):
            raise StopRequested(self.signum, self.early) from None

    def defer(self):
        """From now on a signal ends the run after the step in progress. A signal that came
        earlier and was swallowed on its way out stops the run now."""
        if self.signum is not None:
            raise StopRequested(self.signum, self.early)
        self.deferring = True

    def handle(self, signum, frame):
        if not self.deferring:
            self.signum = signum
            raise StopRequested(signum, self.early)
        if self.signum is not None:
            if signum == signal.SIGINT:
                self.aborted = True
                raise KeyboardInterrupt
            return
        self.signum = signum
        # os.write, not print: a handler may run while print holds the stream's buffer.
        os.write(2, f"\n{signal_name(signum)} received: {self.pending} (Ctrl-C again aborts "
                    f"at once)\n".encode())


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of DataLoaders: loading workers leave stop signals to the main process
    (Ctrl-C and SLURM's SIGTERM reach the whole process group; a worker that died of them
    would end the run with a DataLoader error instead of a clean stop)."""
    for name in ('SIGINT', 'SIGTERM', 'SIGUSR1'):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def kill_leftover_workers():
    """At exit, end the loading workers an error left behind with SIGKILL: Python's own exit
    handler ends daemonic children with SIGTERM, which they ignore, and would wait forever."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers and hasattr(signal, 'SIGCHLD'):
        # PyTorch's SIGCHLD handler would report the killed workers as a failure.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join()


# Registered after multiprocessing's exit handler (multiprocessing.util, imported above,
# registers it), so it runs before it: atexit is last in, first out.
atexit.register(kill_leftover_workers)

# ----------------------------------------------------------------------------------------
# 6. The Manager (everything that hangs off the training loop) and TensorBoard
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


# ----------------------------------------------------------------------------------------
# 7. Figures: comparison panels and the loss curve (matplotlib, no display needed)
# ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt



# Input channels a panel shows at most (a 20-channel input would make it unreadable); the
# title says which are shown.
PANEL_INPUT_CHANNELS = 6


def image_origin(data_format):
    """Where imshow puts row 0 of a `data_format` file: at the bottom for FITS (y grows
    upwards, as in its WCS), at the top for images (png/jpg/tif) and npy, as the
    `<step>_real.png` previews do (README "Output files", Panels)."""
    return 'lower' if data_format in FITS_FORMATS else 'upper'


def scale_style(scaling, cmap='viridis'):
    """imshow's colour scale from a channel's saturation limits (logarithmic with log)."""
    from matplotlib.colors import LogNorm
    if scaling.log:
        return dict(cmap=cmap, norm=LogNorm(vmin=scaling.lower, vmax=scaling.upper))
    return dict(cmap=cmap, vmin=scaling.lower, vmax=scaling.upper)


def panel_styles(real, generated, target_scaling):
    """The colour scales of each target channel c of a panel: (real and generated's, the
    difference's), as keyword arguments of imshow.

    Each channel is drawn by its own scaling, `target_scaling.channel(c)` (README "Your own
    data", Scaling), so channels whose values differ by orders of magnitude are each seen:
    real and generated share one scale, diverging around 0 up to the largest |real| value of
    the channel for signed data (limits on both sides of 0), otherwise the channel's
    saturation limits (logarithmic with log scale). The difference has its own symmetric
    diverging scale per channel.
    """
    styles = []
    for c, (real_c, generated_c) in enumerate(zip(real, generated, strict=True)):
        scaling = target_scaling.channel(c)
        lo, up = scaling.lower, scaling.upper
        if lo < 0 < up:
            peak = largest_magnitude(real_c) or max(-lo, up)
            data_style = dict(cmap='RdBu_r', vmin=-peak, vmax=peak)
        else:
            data_style = scale_style(scaling)
        spread = largest_magnitude(generated_c - real_c) or 1.0
        styles.append((data_style, dict(cmap='RdBu_r', vmin=-spread, vmax=spread)))
    return styles


def largest_magnitude(image):
    """The largest finite |value| of `image`; 0 when it has no finite value."""
    finite = np.abs(image[np.isfinite(image)])
    return float(finite.max()) if finite.size else 0.0


def input_cell(input, channel, input_scaling, input_unit):
    """(image, colour scale, colour bar label) of one input channel: in the input's units,
    mapped back by its scaling (grey, between the channel's saturation limits), or as the
    network sees it ([-1, 1], "normalised") without a scaling."""
    if input_scaling is None:
        return input[channel], dict(cmap='gray', vmin=-1, vmax=1), 'normalised'
    scaling = input_scaling.channel(channel)
    physical = scaling.inverse(input[channel]) / np.float32(scaling.save_scale)
    return physical, scale_style(scaling, cmap='gray'), input_unit or 'input units'


# How a panel's axes name the coordinates of a WCS's celestial axes (by CTYPE's first 4
# characters); others are named by their CTYPE.
AXIS_NAMES = {'HPLN': 'helioprojective longitude (Solar X)',
              'HPLT': 'helioprojective latitude (Solar Y)'}


def label_world_axes(axis, wcs):
    """Tick labels and axis labels of a WCSAxes `axis` in arcsec, named after `wcs`'s axes."""
    import astropy.units as u
    for coordinate, ctype in zip(axis.coords, wcs.wcs.ctype, strict=True):
        coordinate.set_format_unit(u.arcsec, decimal=True)
        coordinate.set_axislabel(f'{AXIS_NAMES.get(ctype[:4], ctype)} ["]', fontsize=8)
        coordinate.set_ticklabel(size=7)


def save_panel(path, input, real, generated, target_scaling, unit=None, data_format='npy',
               title='', input_scaling=None, input_unit=None, wcs=None):
    """input channel(s) | real | generated | difference, one row per target channel.

    input: C x H x W normalised, drawn in grey in the input's units (`input_unit`, e.g.
    'DN/s') after `input_scaling` maps it back, else as it is ("normalised"); real, generated:
    C x H x W in physical units (`unit`, e.g. 'G'; None when unknown), each channel coloured
    by its own scaling in `target_scaling` (`panel_styles`). Images are drawn in the
    orientation of `data_format` files (see `image_origin`); with `wcs` (the 2-D celestial WCS
    of a FITS file's image plane), on helioprojective axes in arcsec. The figure's title is
    `title` and the CC of each target channel.
    """
    plt = _pyplot()
    styles = panel_styles(real, generated, target_scaling)
    difference = generated - real
    unit_label = unit or 'target units'

    # Input channels fill the first columns, down the rows then across (3 EUV channels and
    # one magnetogram: three input columns in one row).
    rows = real.shape[0]
    shown = min(input.shape[0], PANEL_INPUT_CHANNELS)
    input_columns = -(-shown // rows)
    ccs = [finite_correlation(real[c], generated[c], ccc=False) for c in range(rows)]
    figure, axes = plt.subplots(rows, input_columns + 3,
                                figsize=(3.3 * (input_columns + 3) + (wcs is not None),
                                         3.2 * rows + 0.5 + 0.5 * (wcs is not None)),
                                squeeze=False,
                                subplot_kw=dict(projection=wcs) if wcs is not None else None)
    for c in range(rows):
        cells = []
        for j in range(input_columns):
            channel = j * rows + c
            name = f'input ch {channel}' if input.shape[0] > 1 else 'input'
            cells.append((name, *input_cell(input, channel, input_scaling, input_unit))
                         if channel < shown else None)
        suffix = f' ch {c}' if rows > 1 else ''
        data_style, diff_style = styles[c]
        cells += [('real' + suffix, real[c], data_style, unit_label),
                  (f'generated{suffix} (CC {ccs[c]:.3f})', generated[c], data_style,
                   unit_label),
                  ('generated - real' + suffix, difference[c], diff_style, unit_label)]
        for axis, cell in zip(axes[c], cells, strict=True):
            if cell is None:
                axis.axis('off')
                continue
            name, image, style, label = cell
            drawn = axis.imshow(image, origin=image_origin(data_format),
                                interpolation='nearest', **style)
            axis.set_title(name, fontsize=10)
            if wcs is not None:
                label_world_axes(axis, wcs)
            else:
                axis.set_xticks([]), axis.set_yticks([])
            figure.colorbar(drawn, ax=axis, fraction=0.046, pad=0.04).set_label(label)
    heading = f"{title}: " if title else ''
    heading += 'CC ' + ', '.join(f'{cc:.3f}' for cc in ccs)
    if shown < input.shape[0]:
        heading += f' (input channels 0-{shown - 1} of {input.shape[0]} shown)'
    figure.suptitle(heading)
    figure.tight_layout()
    # The title and units also go into the PNG's text chunks, for scripts that sort panels.
    row_0 = 'bottom' if data_format in FITS_FORMATS else 'top'
    input_units = 'normalised [-1, 1]' if input_scaling is None else \
        f"in {input_unit or 'input units'}"
    description = (f"input {input_units}; real, generated and difference in {unit_label}; "
                   f"row 0 of the files at the {row_0}")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80, format='png',
                       metadata={'Title': heading, 'Description': description})
    plt.close(figure)


# The validation CCs a loss curve shows: the first channel's, whole frame and disk, at every
# binning (README "Output files", loss_curve.png).
VALIDATION_CC = re.compile(r'^(ch0_)?(disk_)?cc_\d+x\d+$')


def save_loss_curve(path, rows, val_rows=()):
    """Loss terms of loss_log.csv rows against the step, the training CC beside them and,
    with val_metrics.csv rows (`val_rows`, from --val_during_train with targets), a third
    panel of the validation CCs (`VALIDATION_CC`) against the step."""
    if not rows:
        return
    plt = _pyplot()
    steps = [int(row['step']) for row in rows]
    keys = [key for key in (val_rows[0] if val_rows else ()) if VALIDATION_CC.match(key)]
    figure, axes = plt.subplots(1, 3 if keys else 2, figsize=(18 if keys else 12, 4))
    losses, cc = axes[:2]
    for name in ('D', 'G', 'G_LSGAN', 'G_FM', 'G_CC'):
        losses.plot(steps, [float(row[name]) for row in rows], label=name)
    losses.set_xlabel('step (samples)'), losses.set_ylabel('loss'), losses.set_yscale('log')
    losses.legend()
    cc.plot(steps, [float(row['CC']) for row in rows], color='k')
    cc.set_xlabel('step (samples)'), cc.set_ylabel('CC (training batch, full resolution)')
    if keys:
        draw_validation_cc(axes[2], val_rows, keys)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80)
    plt.close(figure)


def draw_validation_cc(axis, val_rows, keys):
    """The mean validation `keys` of val_metrics.csv rows against the step (disk dashed)."""
    steps = [int(row['step']) for row in val_rows]
    for key in keys:
        axis.plot(steps, [float(row[key]) for row in val_rows], marker='o', label=key,
                  linestyle='--' if 'disk_' in key else '-')
    axis.set_xlabel('step (samples)'), axis.set_ylabel('CC (validation, mean over files)')
    axis.legend(fontsize=8)


# ----------------------------------------------------------------------------------------
# 8. The optional CPU paths for the widest, the thinnest and the residual blocks'
#    convolutions (performance only)
# ----------------------------------------------------------------------------------------


# On the CPU, im2col + one matrix product (aten's thnn_conv2d, which the backward also uses)
# computes the generator's widest convolutions faster than PyTorch's default (oneDNN), which
# re-lays-out the weights at every call: for the 1024-channel convolutions at training sizes
# (16x16 feature maps for 256x256 data, 9.4 M weights each) that copy costs as much as the
# arithmetic. Where the weights are few for the pixels (the discriminator's 4x4 convolution,
# the generator's 256->512 one at 32x32, inference at 1024x1024) oneDNN is as fast or faster
# and keeps them. Same modules, same state_dict keys, same result up to float rounding; the
# measurements are in BENCHMARKS.md ("The GEMM convolution path").

GEMM_CONV_MAX_PIXELS = 1024        # batch x output height x width: at most this many pixels,
GEMM_CONV_MIN_WEIGHTS = 2 ** 20    # at least this many weights,

GEMM_CONV_WEIGHTS_PER_PIXEL = 4096  # and at least this many weights per pixel take the path

# At the other end, in inference at full resolution, two kinds of layer run far below the
# CPU's matrix-product rate in oneDNN: a convolution with few output channels (the output
# layer, 7x7, 64 -> 1 channel at 1024x1024: 0.47 s of CPU time), since oneDNN computes output
# channels in blocks of 8 or 16 whatever their number; and the largest transposed
# convolution (128 -> 64 channels, 512x512 -> 1024x1024: 0.87 s), whose result oneDNN
# leaves in another layout and PyTorch copies into a fresh 268 MB tensor. Both run here as
# "every input pixel scatters a kernel-sized patch": one matrix product gives each input
# pixel's patch for every output channel, (Cout*kh*kw, Cin) @ (Cin, pixels), and col2im
# (F.fold) adds the patches at their places (0.12 s and 0.60 s). A convolution's patch is
# its kernel flipped. It is done in bands of input rows, so the patches never exceed
# SCATTER_BAND_BYTES. Only without autograd: training keeps oneDNN and its backward.
# Measurements (one thread) in BENCHMARKS.md ("The scatter path"). Much of the transposed
# convolution's time was the fresh tensor's page faults: in a process that reuses freed
# memory (section 2, as the Test script does) the scatter path takes 1.15x oneDNN's time
# with one thread, 1.22x with two (0.06 s of a 1024x1024 image), but it still saves the
# copy: 268 MB at the peak of a 1024x1024 image, 1 GB at 2048x2048, so it is kept.

SCATTER_MAX_OUT_CHANNELS = 3       # convolutions 64 -> 1, 3, 8 channels: 0.26x, 0.70x, 3.5x
SCATTER_MAX_WEIGHTS_PER_PIXEL = 1  # transposed, weights per input pixel: 0.28 (0.69x), 4.5
                                   # (0.94x), 72 (1.3x): only the largest takes it,
SCATTER_TRANSPOSED_MAX_THREADS = 2  # and on at most 2 threads: col2im runs on one (0.70x
                                    # with 1 and 2 threads on an idle machine)
SCATTER_BAND_BYTES = 2 ** 22       # the patches of one band (1 to 16 MiB: within 5%)


def fast_path_allowed(layer, x):
    """Whether `x` may take one of this section's paths: float32 on the CPU, a (B, C, H, W)
    input, outside autocast (oneDNN's bfloat16 kernels are the fast ones there) and outside
    torch.compile (a compiled graph has its own convolution lowering)."""
    return (x.device.type == 'cpu' and x.dtype == layer.weight.dtype == torch.float32
            and x.dim() == 4 and not torch.is_autocast_enabled('cpu')
            and not torch.compiler.is_compiling())


def scatter_possible(layer, x):
    """What both scatter paths need: inference (no autograd), a contiguous input, padding
    below the kernel and a stride no larger (so that every output row lies in a band)."""
    return (not torch.is_grad_enabled() and x.is_contiguous()
            and all(p < k and s <= k for p, k, s in
                    zip(layer.padding, layer.kernel_size, layer.stride, strict=True)))


def scatter_patches(x, patches, bias, kernel_size, stride, padding, out_size):
    """A transposed convolution of x (B, Cin, H, W), given as the patches each input pixel
    scatters: (B, Cout, Ho, Wo) = out_size. x must be contiguous.

    patches: (Cout*kh*kw, Cin); row (o, di, dj) holds the weights with which input pixel
    (i, j) adds to output (o, i*sh + di - ph, j*sw + dj - pw); outputs outside Ho x Wo are
    dropped (ConvTranspose2d's arithmetic, padding < kernel, output_padding < stride <=
    kernel). bias: (Cout,) or None. Memory beyond the output: one band's patches.
    """
    batch, channels, height, width = x.shape
    (kh, _), sh, ph = kernel_size, stride[0], padding[0]
    out = x.new_empty(batch, patches.shape[0] // (kh * kernel_size[1]), *out_size)
    fresh = (bias if bias is not None else out.new_zeros(out.shape[1])).view(-1, 1, 1)
    rows = max(1, SCATTER_BAND_BYTES // (patches.shape[0] * width * x.element_size()))
    for b in range(batch):
        pixels = x[b].view(channels, height * width)
        done = 0  # output rows [0, done) hold the bias and the bands so far
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            band = F.fold((patches @ pixels[:, top * width:bottom * width])[None],
                          ((bottom - top - 1) * sh + kh, out_size[1]), kernel_size,
                          padding=(0, padding[1]), stride=stride)[0]
            done = add_band(out[b], band, top * sh - ph, done, fresh)
        out[b, :, done:] = fresh  # rows below every patch (output_padding > padding)
    return out


def add_band(out, band, first, done, fresh):
    """Add a band (Cout, rows, Wo) whose first row is output row `first` (<= done) into out
    (Cout, Ho, Wo): rows below `done` already hold earlier bands and are added to, the
    others are written once, with `fresh` (the bias) added. Returns the new `done`."""
    end = min(out.shape[1], first + band.shape[1])
    if max(first, 0) < done:
        out[:, max(first, 0):done] += band[:, max(first, 0) - first:done - first]
    if end > done:
        torch.add(band[:, done - first:end - first], fresh, out=out[:, done:end])
    return max(done, end)


# The 3x3 convolutions of the residual blocks (1024 channels at 64x64 for a 1024x1024 image)
# are 70% of an inference's arithmetic, and oneDNN already runs them near this CPU's peak. In
# inference they run instead as Winograd's F(2x2, 3x3) (Lavin and Gray 2016, "Fast
# Algorithms for Convolutional Neural Networks"): each 2x2 block of outputs from its 4x4
# input patch with 16 multiplications per channel pair instead of 36, as 16 matrix products
# (Cout, Cin) @ (Cin, blocks), one per position of the transformed patch. The transforms
# only add and subtract, so the result differs from the direct one at the rounding level
# (5e-7 of the output's range measured, within 1e-5 tested). The products go to oneDNN's
# matrix kernel (torch.ops.mkldnn._linear_pointwise, what torch.compile uses on the CPU),
# which runs at its convolutions' rate; torch.mm (MKL on AMD CPUs) is half as fast, so where
# this torch lacks that kernel the path is not taken. Measurements in BENCHMARKS.md ("Winograd").

WINOGRAD_MIN_WEIGHTS = 512 * 512  # Cin x Cout: 0.67x at 1024 channels, 0.76-0.88x at 512,
                                  # 1.04x at 256, 1.5x at 128 (64x64 to 256x256 maps)
WINOGRAD_MIN_PIXELS = 32 * 32      # output pixels: 0.77x at 32x32, 1.2x at 16x16
WINOGRAD_BAND_BYTES = 2 ** 24      # the input of one band of output rows
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


@functools.cache
def onednn_matmul():
    """oneDNN's matrix product, a @ b.t() for (m, k) and (n, k) float32 matrices, or None
    where this torch lacks it or it does not compute that (checked once, on small
    integers)."""
    matmul = getattr(torch.ops.mkldnn, '_linear_pointwise', None)
    if matmul is None or not torch.backends.mkldnn.is_available():
        return None
    a, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
    b = b.t().contiguous().t()  # a transposed view, as winograd_band passes it
    try:
        works = torch.equal(matmul(a, b, None, 'none', [], ''), a @ b.t())
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return matmul if works else None


def winograd_weights(weight):
    """(Cout, Cin, 3, 3) -> (16, Cout, Cin): G g G^T of every kernel g, by its 4x4
    positions."""
    g = torch.tensor(WINOGRAD_G, dtype=weight.dtype)
    return (torch.kron(g, g) @ weight.reshape(-1, 9).t()).view(16, *weight.shape[:2])


def column_transforms(x, tiles_w):
    """d B for the 4-column strip d at every even column of x (C, H, 2 tiles_w + 2), whose
    rows are contiguous: (4, C, H, tiles_w). The columns are split into even and odd first,
    so that every operation reads and writes contiguous rows."""
    halves = x.unflatten(2, (tiles_w + 1, 2)).permute(3, 0, 1, 2).contiguous()
    even0, odd0 = halves[0][..., :tiles_w], halves[1][..., :tiles_w]
    even1, odd1 = halves[0][..., 1:], halves[1][..., 1:]
    columns = x.new_empty(4, *x.shape[:2], tiles_w)
    torch.sub(even0, even1, out=columns[0])  # B^T = [[1, 0, -1, 0], [0, 1, 1, 0],
    torch.add(odd0, even1, out=columns[1])   #        [0, -1, 1, 0], [0, 1, 0, -1]]
    torch.sub(even1, odd0, out=columns[2])
    torch.sub(odd0, odd1, out=columns[3])
    return columns


def row_transform(columns, i, tiles_h):
    """Row i of B^T (d B) for every 4x4 patch at even rows: (C, tiles_h, tiles_w)."""
    r = [columns[:, k:k + 2 * tiles_h - 1:2] for k in range(4)]
    return (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])[i]


def winograd_conv(x, weight, bias, matmul):
    """A 3x3 convolution, stride 1, no padding, of x (C, 2 th + 2, 2 tw + 2) contiguous:
    (Cout, 2 th, 2 tw), in bands of output rows whose input takes at most
    WINOGRAD_BAND_BYTES (so that what the transforms hold stays small beside the output)."""
    tiles_h, tiles_w = (x.shape[1] - 2) // 2, (x.shape[2] - 2) // 2
    U = winograd_weights(weight)
    out = x.new_empty(weight.shape[0], 2 * tiles_h, 2 * tiles_w)
    row_bytes = 2 * x.shape[0] * x.shape[2] * x.element_size()  # one row of 2x2 blocks
    bands = -(-tiles_h * row_bytes // WINOGRAD_BAND_BYTES)
    rows = -(-tiles_h // bands)  # of blocks, as even as the bands can be
    for top in range(0, tiles_h, rows):
        bottom = min(tiles_h, top + rows)
        winograd_band(x[:, 2 * top:2 * bottom + 2], U, matmul, out[:, 2 * top:2 * bottom])
    if bias is not None:
        out += bias.view(-1, 1, 1)
    return out


def winograd_band(x, U, matmul, out):
    """winograd_conv of one band x (C, 2 th + 2, 2 tw + 2) into out (Cout, 2 th, 2 tw): Y =
    A^T [(G g G^T) (B^T d B)] A for every 2x2 output block. The products of a position are
    added into the two rows of A^T M as they come, so that only those (twice the band's
    output) are held besides the transformed columns."""
    tiles_h, tiles_w = out.shape[1] // 2, out.shape[2] // 2
    columns = column_transforms(x, tiles_w)
    upper, lower = [None] * 4, [None] * 4  # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
    for i in range(4):
        for j in range(4):
            V = row_transform(columns[j], i, tiles_h).view(x.shape[0], -1)
            M = matmul(U[4 * i + j], V.t(), None, 'none', [], '')
            if i == 0:
                upper[j] = M
            elif i == 1:
                upper[j] += M
                lower[j] = M
            elif i == 2:
                upper[j] += M
                lower[j] -= M
            else:
                lower[j] -= M
    blocks = out.unflatten(1, (tiles_h, 2)).unflatten(3, (tiles_w, 2))
    for a, rows in enumerate((upper, lower)):
        s = [m.view(-1, tiles_h, tiles_w) for m in rows]
        torch.add(s[0], s[1], out=blocks[:, :, a, :, 0])
        blocks[:, :, a, :, 0] += s[2]
        torch.sub(s[1], s[2], out=blocks[:, :, a, :, 1])
        blocks[:, :, a, :, 1] -= s[3]


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d that computes im2col + matrix product, or scattered patches, where that is
    faster (see above).

    `use_gemm_convolutions` turns a network's Conv2d layers into this class in place: a
    module is still called as a module (its hooks run), and its parameters and state_dict
    keys are those of the nn.Conv2d it was.
    """

    def forward(self, x):
        if not fast_path_allowed(self, x):
            return super().forward(x)
        if self.gemm_pays(x):
            return torch.ops.aten.thnn_conv2d(x, self.weight, list(self.kernel_size), self.bias,
                                              list(self.stride), list(self.padding))
        if self.scatter_pays(x):
            return self.scatter_forward(x)
        if self.winograd_pays(x):
            return self.winograd_forward(x)
        return super().forward(x)

    def gemm_pays(self, x):
        """The widest convolutions at training sizes, in training (with autograd): in
        inference oneDNN or the Winograd path is faster (at 32x32, 1024 channels: GEMM
        2x oneDNN's time; BENCHMARKS.md, "Winograd")."""
        if not torch.is_grad_enabled():
            return False
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        pixels = x.shape[0] * ((x.shape[2] + 2 * ph - kh) // sh + 1) * \
            ((x.shape[3] + 2 * pw - kw) // sw + 1)
        weights = self.weight.numel()
        return (pixels <= GEMM_CONV_MAX_PIXELS and weights >= GEMM_CONV_MIN_WEIGHTS
                and weights >= GEMM_CONV_WEIGHTS_PER_PIXEL * pixels)

    def scatter_pays(self, x):
        """Few output channels, stride 1, in inference."""
        return (self.out_channels <= SCATTER_MAX_OUT_CHANNELS and tuple(self.stride) == (1, 1)
                and scatter_possible(self, x))

    def winograd_pays(self, x):
        """3x3, stride 1, many channels and pixels, in inference, with oneDNN's matrix
        product at hand."""
        (ph, pw) = self.padding
        pixels = (x.shape[2] + 2 * ph - 2) * (x.shape[3] + 2 * pw - 2)
        return (tuple(self.kernel_size) == (3, 3) and tuple(self.stride) == (1, 1)
                and not torch.is_grad_enabled() and pixels >= WINOGRAD_MIN_PIXELS
                and self.in_channels * self.out_channels >= WINOGRAD_MIN_WEIGHTS
                and onednn_matmul() is not None)

    def winograd_forward(self, x):
        """Zero padding, and one more row or column where the output's is odd (cropped
        after), then winograd_conv for every image of the batch."""
        (ph, pw) = self.padding
        out_h, out_w = x.shape[2] + 2 * ph - 2, x.shape[3] + 2 * pw - 2
        if ph or pw or out_h % 2 or out_w % 2:
            x = F.pad(x, (pw, pw + out_w % 2, ph, ph + out_h % 2))
        x, matmul = x.contiguous(), onednn_matmul()
        out = winograd_conv(x[0], self.weight, self.bias, matmul)[None] if len(x) == 1 else \
            torch.stack([winograd_conv(image, self.weight, self.bias, matmul) for image in x])
        return out if out.shape[2:] == (out_h, out_w) else \
            out[:, :, :out_h, :out_w].contiguous()

    def scatter_forward(self, x):
        """A stride-1 convolution is the transposed one of its flipped kernel, with padding
        kernel - 1 - padding."""
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        patches = self.weight.flip(2, 3).permute(0, 2, 3, 1).reshape(-1, self.in_channels)
        out_size = (x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1)
        return scatter_patches(x, patches, self.bias, self.kernel_size, (1, 1),
                               (kh - 1 - ph, kw - 1 - pw), out_size)


class GemmConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d that computes scattered patches where that is faster (see above):
    the same module otherwise (parameters, state_dict keys, hooks)."""

    def forward(self, x, output_size=None):
        if output_size is None and fast_path_allowed(self, x) and self.scatter_pays(x):
            return self.scatter_forward(x)
        return super().forward(x, output_size)

    def scatter_pays(self, x):
        """Few weights for the input's pixels, in inference, on few threads."""
        return (self.weight.numel() <= SCATTER_MAX_WEIGHTS_PER_PIXEL * x[0, 0].numel()
                and torch.get_num_threads() <= SCATTER_TRANSPOSED_MAX_THREADS
                and scatter_possible(self, x))

    def scatter_forward(self, x):
        """The weights (Cin, Cout, kh, kw) are the patches already, transposed (no copy)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_size = ((x.shape[2] - 1) * sh - 2 * ph + kh + self.output_padding[0],
                    (x.shape[3] - 1) * sw - 2 * pw + kw + self.output_padding[1])
        return scatter_patches(x, self.weight.view(self.in_channels, -1).t(), self.bias,
                               self.kernel_size, self.stride, self.padding, out_size)


FAST_CLASSES = {nn.Conv2d: GemmConv2d, nn.ConvTranspose2d: GemmConvTranspose2d}


def use_gemm_convolutions(module, enabled=True):
    """Let every plain Conv2d and ConvTranspose2d of `module` take this section's paths
    where they are faster (or, with enabled=False, never). The class changes in place,
    nothing else."""
    if not hasattr(torch.ops.aten, 'thnn_conv2d'):
        return module
    for layer in module.modules():
        if enabled and type(layer) in FAST_CLASSES and plain_layer(layer):
            layer.__class__ = FAST_CLASSES[type(layer)]
        elif not enabled and type(layer) in FAST_CLASSES.values():
            layer.__class__ = layer.__class__.__bases__[0]
    return module


def plain_layer(layer):
    """One group, no dilation, zero padding given as numbers: what the paths compute."""
    return (layer.groups == 1 and tuple(layer.dilation) == (1, 1)
            and layer.padding_mode == 'zeros' and not isinstance(layer.padding, str))
