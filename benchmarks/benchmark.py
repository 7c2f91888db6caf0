"""pix2pixCC benchmarks: training step, data preparation, inference (time and peak memory).

    python benchmarks/benchmark.py                      # everything, defaults (CPU)
    python benchmarks/benchmark.py --what train --size 256 --steps 7 --warmup 2 --json out.json
    python benchmarks/benchmark.py --what data --data_size 1024 --data_repeats 5
    python benchmarks/benchmark.py --what inference --inference_size 1024 --inference_runs 3

Every measurement (one part, one variant) runs in its own Python process, so the peak resident
memory reported for it (ru_maxrss of that process) is its own. Times are medians over the
timed repetitions, after warm-up. The table is printed; `--json` writes every figure (and
the machine it was measured on).

On a shared machine, other processes distort timings (one test suite on a 2-core machine
halves the speed of a training step). For every timed run the benchmark records the share of
the CPUs that other processes used meanwhile (column `others`); runs above
`--max_interference` (default 10%) are dropped and repeated, and `--wait_quiet SECONDS` waits
for idle CPUs before each measurement. `--gpu_ids 0` measures on the first GPU (peak GPU
memory is then reported in the JSON too).

Variants (`--train_variants`, `--data_variants`, `--inference_variants`):

train     published  re-created published step: Loss without freezing D during the
                     generator's pass, Mish written as x*tanh(softplus(x)), plain Adam
                     (for-loop implementation), zero_grad before each backward, every
                     convolution by PyTorch's default kernel, networks only moved to the device
          driver     the driver's own step: pix2pixCC_Train.train_step with
                     pix2pixCC_Train.make_optimizer (fused Adam where torch has it, gradients
                     released after the step), networks placed by
                     pix2pixCC_Utils.prepare_network (on the CPU: the GEMM path for the
                     widest convolutions)
          modifiers, appended with '+' (e.g. driver+bf16):
            +onednn   without the GEMM convolution path (shows that path's gain)
            +nomkldnn torch.backends.mkldnn.enabled = False: every convolution by
                      PyTorch's own im2col + GEMM kernels
            +cl       channels_last weights and inputs
            +bf16     --data_type 16 (bfloat16 autocast on the CPU and on bf16 GPUs)
            +compile  --compile (torch.compile through prepare_network; slow first step)
          (BENCHMARKS.md's earlier runs name the driver's step `fused+zg`: fused Adam and
          gradients released after the step, which the driver has adopted since.)
data      published  re-created published __getitem__: FITS read as float64, normalisation in
                     float64, scipy.ndimage.rotate by 0 degrees (cubic spline) on both arrays
          ours       CustomDataset.__getitem__ (float32, no interpolation at angle 0)
          loader     DataLoader over CustomDataset as the Train driver builds it
                     (--n_workers workers, persistent), per sample, steady state
inference published  re-created published test: G(input) with autograd recording
          ours       pix2pixCC_Test.generate under torch.inference_mode (as Test does)
          ours_cl    ours with channels_last weights and input
matmul    float32, bfloat16: one 4096 x 4096 matrix product (GFLOP/s of the machine's BLAS)

The published code itself is not part of this repository: the `published` variants are
re-creations of what it does (see BENCHMARKS.md), measured on the same machine.
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PARTS = ('train', 'data', 'inference', 'matmul')
DEFAULT_VARIANTS = {'train': 'published,driver',
                    'data': 'published,ours,loader',
                    'inference': 'published,ours',
                    'matmul': 'float32,bfloat16'}


# ----------------------------------------------------------------------------------------
# Helpers shared with tests/test_performance_equivalence.py
# ----------------------------------------------------------------------------------------


def published_mish(x):
    """Mish as the published code writes it (three kernels and their saved tensors)."""
    import torch
    import torch.nn.functional as F
    return x * torch.tanh(F.softplus(x))


def use_published_mish(module):
    """Replace every Mish of `module` by the published formula (parameter-free: the
    state_dict does not change). Returns the number of places replaced."""
    import torch.nn as nn
    from pix2pixCC_Networks import Mish

    class PublishedMish(nn.Module):
        def forward(self, x):
            return published_mish(x)

    published, count = PublishedMish(), 0
    for parent in list(module.modules()):
        # _modules, not named_children(): one Mish instance sits at several indices
        for name, child in list(parent._modules.items()):
            if isinstance(child, Mish):
                parent._modules[name] = published
                count += 1
    return count


@contextlib.contextmanager
def unfrozen_discriminator():
    """Within the block, Loss does not freeze D during the generator's pass (as published):
    the generator's backward then also computes D's weight gradients, which the D step's
    zero_grad discards."""
    import pix2pixCC_Networks as networks
    saved = networks.frozen
    networks.frozen = contextlib.nullcontext
    try:
        yield
    finally:
        networks.frozen = saved


def published_step(criterion, G, D, G_optim, D_optim, precision, input, target):
    """One training step as the published code does it: the Loss with D not frozen during
    the generator's pass, zero_grad before each backward, then G step and D step."""
    with unfrozen_discriminator():
        with precision.autocast():
            loss_D, loss_G, target, fake = criterion(D, G, input, target)
    G_optim.zero_grad()
    precision.scaler.scale(loss_G).backward()
    precision.scaler.step(G_optim)
    D_optim.zero_grad()
    precision.scaler.scale(loss_D).backward()
    precision.scaler.step(D_optim)
    precision.scaler.update()
    return loss_D, loss_G, target, fake


def training_setup(variant, opt, device, size):
    """A training variant ready to run: returns (step, G, D), where step() runs one training
    step on fixed random data of size x size and returns (loss_D, loss_G) detached."""
    import torch
    import pix2pixCC_Utils as utils
    from pix2pixCC_Networks import Discriminator, Generator, Loss, weights_init
    from pix2pixCC_Train import make_optimizer, train_step
    base, modifiers = parse_train_variant(variant)
    precision = utils.Precision(opt, device)
    torch.manual_seed(0)
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    if 'nomkldnn' in modifiers:
        torch.backends.mkldnn.enabled = False  # PyTorch's own (im2col + GEMM) kernels
    if base == 'published':
        use_published_mish(G)
        G, D = G.to(device), D.to(device)  # the published code only moves the networks
        optimisers = [torch.optim.Adam(m.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                       foreach=False) for m in (G, D)]
        run = published_step
    else:  # as pix2pixCC_Train.main does it
        G, D = utils.prepare_network(G, opt, device), utils.prepare_network(D, opt, device)
        if 'onednn' in modifiers:
            for module in (G, D):
                utils.use_gemm_convolutions(module, enabled=False)
        optimisers = [make_optimizer(m.parameters(), opt) for m in (G, D)]
        run = train_step
    layout = utils.memory_format(device)
    if 'cl' in modifiers:
        layout = torch.channels_last
        G, D = G.to(memory_format=layout), D.to(memory_format=layout)
    criterion = Loss(opt)
    shape = (opt.batch_size, opt.input_ch, size, size)
    input = (torch.rand(shape) * 2 - 1).to(device).contiguous(memory_format=layout)
    target = (torch.rand(shape[:1] + (opt.target_ch,) + shape[2:]) * 2 - 1).to(device) \
        .contiguous(memory_format=layout)

    def step():
        loss_D, loss_G, _, _ = run(criterion, G, D, *optimisers, precision, input, target)
        return loss_D.detach(), loss_G.detach()

    return step, G, D


def published_style_item(input_path, target_path, opt, angle=0):
    """Re-creation of the published dataset's __getitem__ for FITS pairs without log scale:
    float64 arrays, normalisation at the saturation limits in float64, NaN -> 0, then
    scipy.ndimage.rotate by `angle` (always called, cubic spline, nearest edge) and a float32
    tensor. (The published code normalises before taking log10; with log scale off, as
    here, that order does not matter.)"""
    import numpy as np
    import torch
    from astropy.io import fits
    from scipy.ndimage import rotate
    out = []
    for path, side in ((input_path, 'input'), (target_path, 'target')):
        with fits.open(path) as hdul:
            x = np.array(hdul[0].data, dtype=np.float64)
        up = float(getattr(opt, f'saturation_upper_limit_{side}'))
        lo = float(getattr(opt, f'saturation_lower_limit_{side}'))
        if getattr(opt, f'saturation_clip_{side}'):
            x = np.clip(x, lo, up)
        x = (x - (up + lo) / 2) / ((up - lo) / 2)
        x[np.isnan(x)] = 0
        x = rotate(x, angle, reshape=False, mode='nearest')
        out.append(torch.tensor(x[None], dtype=torch.float32))
    return out


# ----------------------------------------------------------------------------------------
# Children: one measurement each, printing one JSON line
# ----------------------------------------------------------------------------------------


class Interference:
    """Share of the machine's CPU time that other processes used between `start()` and
    `stop()` (0 = the machine was ours, 1 = every core was busy with something else).

    Linux only (/proc); elsewhere it reports None. Used to drop timings that another process
    disturbed: on a shared 2-core machine one test suite doubles a training step's time.
    """

    def __init__(self):
        self.available = os.path.exists('/proc/stat') and os.path.exists('/proc/self/stat')
        self.n_cpu = os.cpu_count() or 1

    @staticmethod
    def _busy():
        with open('/proc/stat') as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]) - idle

    @staticmethod
    def _own():
        # utime, stime, cutime, cstime (own threads, and waited-for children)
        with open('/proc/self/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return sum(int(v) for v in fields[11:15])

    def start(self):
        if self.available:
            self.wall, self.busy, self.own = time.perf_counter(), self._busy(), self._own()
        return self

    def stop(self):
        if not self.available:
            return None
        wall = time.perf_counter() - self.wall
        ticks = os.sysconf('SC_CLK_TCK')
        others = (self._busy() - self.busy) - (self._own() - self.own)
        return max(0.0, others / ticks / (wall * self.n_cpu))


def wait_for_quiet(max_seconds, idle=0.92, window=3.0, needed=3):
    """Wait (at most `max_seconds`) until other processes leave the CPUs idle enough."""
    monitor = Interference()
    if not monitor.available or max_seconds <= 0:
        return True
    deadline, quiet = time.time() + max_seconds, 0
    while time.time() < deadline:
        monitor.start()
        time.sleep(window)
        quiet = quiet + 1 if monitor.stop() <= 1 - idle else 0
        if quiet >= needed:
            return True
    return False


def timed(fn, count, max_interference, max_tries):
    """Run `fn` until `count` runs were not disturbed by other processes (or `max_tries`).

    Returns (times of the undisturbed runs, or of all when too few, interference of each)."""
    monitor = Interference()
    times, shares = [], []
    for _ in range(max_tries):
        monitor.start()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        shares.append(monitor.stop())
        clean = [t for t, share in zip(times, shares) if share is None or share <= max_interference]
        if len(clean) >= count:
            return clean, shares
    return times, shares


def peak_rss_mb():
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == 'darwin' else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def network_argv(args):
    return ['--gpu_ids', args.gpu_ids, '--n_gf', str(args.n_gf), '--n_df', str(args.n_df),
            '--n_downsample', str(args.n_downsample), '--n_residual', str(args.n_residual),
            '--batch_size', str(args.batch_size)] + args.option


TRAIN_BASES = ('published', 'driver')
TRAIN_MODIFIERS = ('onednn', 'nomkldnn', 'cl', 'bf16', 'compile')


def parse_train_variant(variant):
    """'driver+cl+bf16' -> ('driver', {'cl', 'bf16'})."""
    base, *modifiers = variant.split('+')
    if base not in TRAIN_BASES or not set(modifiers) <= set(TRAIN_MODIFIERS):
        raise SystemExit(f'unknown training variant {variant!r}: a base of '
                         f'{", ".join(TRAIN_BASES)} with +modifiers of '
                         f'{", ".join(TRAIN_MODIFIERS)}')
    return base, set(modifiers)


def train_options(argv, variant):
    """The TrainOption namespace of a training variant (+bf16, +compile set options)."""
    from pix2pixCC_Options import TrainOption
    _, modifiers = parse_train_variant(variant)
    extra = ['--data_type', '16' if 'bf16' in modifiers else '32']
    if 'compile' in modifiers:
        extra += ['--compile', 'True']
    return TrainOption().parse(argv + extra)


def child_train(args, variant):
    import torch
    import pix2pixCC_Utils as utils
    opt = train_options(network_argv(args) + ['--data_size', str(args.size)], variant)
    device, _ = utils.select_device(opt, log=lambda *a: None)
    run, _, _ = training_setup(variant, opt, device, args.size)

    def step():
        loss_D, loss_G = run()
        float(loss_D + loss_G)  # wait for the device
        if device.type == 'cuda':
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()  # with --compile: compilation happens here
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    times, shares = timed(step, args.steps, args.max_interference, 3 * args.steps)
    result = {'seconds': statistics.median(times), 'times': times, 'interference': shares,
              'first_step_seconds': first}
    if device.type == 'cuda':
        result['peak_gpu_mb'] = torch.cuda.max_memory_allocated() / 2**20
    return result


def write_fits_pairs(folder, n, size, seed=0):
    """n input/target pairs of size x size float32 FITS (a smooth field plus noise, a few
    NaN), under folder/{Input,Target}."""
    import numpy as np
    from astropy.io import fits
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    dirs = []
    for role in ('Input', 'Target'):
        d = os.path.join(folder, role)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            a, b = rng.uniform(1, 4, 2)
            field = np.sin(2 * np.pi * a * xx) * np.cos(2 * np.pi * b * yy) + \
                0.1 * rng.standard_normal((size, size))
            field = field.astype(np.float32)
            field[rng.integers(0, size, 5), rng.integers(0, size, 5)] = np.nan
            fits.PrimaryHDU(field).writeto(os.path.join(d, f'sun_{i:04d}.fits'), overwrite=True)
        dirs.append(d)
    return dirs


def child_data(args, variant):
    import torch
    from pix2pixCC_Options import TrainOption
    from pix2pixCC_Pipeline import CustomDataset
    with tempfile.TemporaryDirectory(prefix='p2pcc-bench-') as folder:
        input_dir, target_dir = write_fits_pairs(folder, args.data_pairs, args.data_size)
        opt = TrainOption().parse(network_argv(args) + [
            '--data_format_input', 'fits', '--data_format_target', 'fits',
            '--input_dir_train', input_dir, '--target_dir_train', target_dir,
            '--data_size', str(args.data_size), '--n_workers', str(args.n_workers)])
        dataset = CustomDataset(opt)
        n = len(dataset)

        def get(i):
            if variant == 'published':
                return published_style_item(dataset.input_paths[i], dataset.target_paths[i],
                                            opt)
            return dataset[(i, 1000 + i)]

        times = []
        if variant == 'loader':
            from torch.utils.data import DataLoader
            items = [(i % n, 1000 + i) for i in range(n * (args.data_repeats + 1))]
            loader = DataLoader(dataset, batch_size=opt.batch_size, sampler=items,
                                num_workers=opt.n_workers, pin_memory=torch.cuda.is_available(),
                                persistent_workers=opt.n_workers > 0)
            iterator = iter(loader)
            for _ in range(n):  # warm-up: workers started, files in the page cache
                next(iterator)
            start = time.perf_counter()
            count = 0
            for batch in iterator:
                count += batch[0].shape[0]
            times = [(time.perf_counter() - start) / count]
            # the workers' memory is not in this process's ru_maxrss
        else:
            for i in range(n):  # warm-up (page cache)
                get(i)
            shares = []
            for _ in range(args.data_repeats):
                def one_pass():
                    for i in range(n):
                        get(i)
                # one pass over the pairs per timing: single items are too short to attribute
                pass_times, pass_shares = timed(one_pass, 1, args.max_interference, 5)
                times.append(pass_times[-1] / n)
                shares.append(pass_shares[-1])
            return {'seconds': statistics.median(times), 'times': times, 'interference': shares}
    return {'seconds': statistics.median(times), 'times': times}


def child_inference(args, variant):
    import torch
    import pix2pixCC_Utils as utils
    from pix2pixCC_Networks import Generator, weights_init
    from pix2pixCC_Options import TestOption
    from pix2pixCC_Test import generate
    opt = TestOption().parse(network_argv(args) + ['--data_size', str(args.inference_size)])
    device, _ = utils.select_device(opt, log=lambda *a: None)
    precision = utils.Precision(opt, device)
    torch.manual_seed(0)
    G = Generator(opt).apply(weights_init).eval()
    layout = utils.memory_format(device)
    if variant == 'published':
        use_published_mish(G)
        G = G.to(device)  # every convolution by PyTorch's default kernel
    else:  # as pix2pixCC_Test.main places it
        G = utils.prepare_network(G, opt, device)
    if variant == 'ours_cl':
        layout = torch.channels_last
        G = G.to(memory_format=layout)
    input = (torch.rand(1, opt.input_ch, args.inference_size, args.inference_size) * 2 - 1)

    def run():
        if variant == 'published':
            output = G(input.to(device)).detach().cpu().numpy()
        else:
            with torch.inference_mode():
                x = input.to(device, memory_format=layout)
                output = generate(G, x, opt.n_downsample, precision).cpu().numpy()
        return output.shape

    run()  # warm-up
    times, shares = timed(run, args.inference_runs, args.max_interference,
                          3 * args.inference_runs)
    result = {'seconds': statistics.median(times), 'times': times, 'interference': shares}
    if device.type == 'cuda':
        result['peak_gpu_mb'] = torch.cuda.max_memory_allocated() / 2**20
    return result


def child_matmul(args, variant):
    """Seconds of one (n x n) @ (n x n) product and the GFLOP/s it reaches: what the
    machine's BLAS can do, to judge the convolutions' share of a step against."""
    import torch
    n = args.matmul_size
    dtype = getattr(torch, variant)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times, shares = timed(lambda: a @ b, 5, args.max_interference, 15)
    seconds = statistics.median(times)
    return {'seconds': seconds, 'times': times, 'interference': shares,
            'gflops': 2 * n ** 3 / seconds / 1e9}


CHILDREN = {'train': child_train, 'data': child_data, 'inference': child_inference,
            'matmul': child_matmul}


# ----------------------------------------------------------------------------------------
# Parent: run every (part, variant) in its own process, print the table, write JSON
# ----------------------------------------------------------------------------------------


def machine():
    import torch
    info = {'python': platform.python_version(), 'torch': torch.__version__,
            'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'platform': platform.platform()}
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        info['cpu'] = names[0] if names else platform.processor()
    except OSError:
        info['cpu'] = platform.processor()
    info['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info['load_average'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--what', default='train,data,inference,matmul',
                   help='comma-separated parts: train, data, inference, matmul')
    p.add_argument('--gpu_ids', default='-1', help="'-1' for the CPU, '0' for the first GPU")
    p.add_argument('--size', type=int, default=256, help='training image size')
    p.add_argument('--n_gf', type=int, default=64)
    p.add_argument('--n_df', type=int, default=64)
    p.add_argument('--n_downsample', type=int, default=4)
    p.add_argument('--n_residual', type=int, default=9)
    p.add_argument('--batch_size', type=int, default=1)
    p.add_argument('--steps', type=int, default=7, help='timed training steps')
    p.add_argument('--warmup', type=int, default=2, help='untimed training steps first')
    p.add_argument('--data_size', type=int, default=1024, help='FITS pair size')
    p.add_argument('--data_pairs', type=int, default=4, help='FITS pairs written')
    p.add_argument('--data_repeats', type=int, default=5, help='timed passes over the pairs')
    p.add_argument('--n_workers', type=int, default=1, help='DataLoader workers (loader)')
    p.add_argument('--inference_size', type=int, default=1024)
    p.add_argument('--inference_runs', type=int, default=3, help='timed runs after one warm-up')
    p.add_argument('--matmul_size', type=int, default=4096)
    p.add_argument('--train_variants', default=DEFAULT_VARIANTS['train'])
    p.add_argument('--data_variants', default=DEFAULT_VARIANTS['data'])
    p.add_argument('--inference_variants', default=DEFAULT_VARIANTS['inference'])
    p.add_argument('--matmul_variants', default=DEFAULT_VARIANTS['matmul'])
    p.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads in the children (default: torch\'s choice)')
    p.add_argument('--option', action='append', default=[],
                   help='extra pix2pixCC option for every part, e.g. --option=--norm_type '
                        '--option=BatchNorm2d')
    p.add_argument('--max_interference', type=float, default=0.1,
                   help='drop a timing when other processes used more than this share of the '
                        'CPUs meanwhile (retried up to 3x the count)')
    p.add_argument('--wait_quiet', type=float, default=0,
                   help='before each measurement, wait up to this many seconds for the other '
                        'processes to leave the CPUs idle')
    p.add_argument('--json', default=None, help='write the results here')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(argv, part, variant, threads):
    command = [sys.executable, os.path.abspath(__file__)] + argv + ['--child', f'{part}:{variant}']
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        return {'error': (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        part, variant = args.child.split(':')
        result = CHILDREN[part](args, variant)
        result['peak_rss_mb'] = peak_rss_mb()
        result['torch_threads'] = torch.get_num_threads()
        print(json.dumps(result))
        return 0

    parts = [p.strip() for p in args.what.split(',') if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f'unknown part(s): {", ".join(sorted(unknown))}; choose from {", ".join(PARTS)}')
    info = machine()
    config = {k: v for k, v in vars(args).items() if k not in ('json', 'child')}
    results = []
    print(f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
          f"GPU: {info['gpu'] or 'none'}, load average {info['load_average']}")
    header = f"{'part':<10}{'variant':<14}{'size':>5}{'seconds':>10}{'vs first':>9}" \
             f"{'peak RSS MB':>12}{'n':>4}{'others':>8}"
    print(header)
    print('-' * len(header))
    for part in parts:
        size = {'train': args.size, 'data': args.data_size,
                'inference': args.inference_size, 'matmul': args.matmul_size}[part]
        variants = [v.strip() for v in getattr(args, f'{part}_variants').split(',') if v.strip()]
        first = None
        for variant in variants:
            quiet = wait_for_quiet(args.wait_quiet)
            result = run_child(argv, part, variant, args.threads)
            result['quiet_before'] = quiet
            result.update(part=part, variant=variant, size=size)
            results.append(result)
            if 'error' in result:
                print(f"{part:<10}{variant:<14}{size:>5}  failed: {result['error']}")
                continue
            first = first or result['seconds']
            shares = sorted(x for x in result.get('interference', []) if x is not None)
            others = f"{statistics.median(shares):.0%}" if shares else '-'
            if shares and statistics.median(shares) > args.max_interference:
                others += '!'  # could not get undisturbed timings: do not trust this row
            print(f"{part:<10}{variant:<14}{size:>5}{result['seconds']:>10.4f}"
                  f"{result['seconds'] / first:>9.3f}{result['peak_rss_mb']:>12.0f}"
                  f"{len(result['times']):>4}{others:>8}"
                  + (f"  {result['gflops']:.0f} GFLOP/s" if 'gflops' in result else ''),
                  flush=True)
    unit = {'train': 's/step', 'data': 's/pair', 'inference': 's/image',
            'matmul': 's/product'}
    print('seconds: median ' + ', '.join(f'{p} {unit[p]}' for p in parts) +
          '; vs first: ratio to the first variant of the part; n: timings kept; others: '
          'median share of the CPUs other processes used meanwhile (!: above '
          '--max_interference even after retries: the row is not reliable)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': info, 'config': config, 'results': results}, f, indent=2)
        print(f'written: {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
