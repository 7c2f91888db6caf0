"""pix2pixCC benchmarks: training step, data preparation, inference (time and peak memory).

    python benchmarks/benchmark.py                      # this repository's variants (CPU)
    python benchmarks/benchmark.py --what train --size 256 --steps 7 --warmup 2 --json out.json
    python benchmarks/benchmark.py --what inference --inference_size 1024 --inference_runs 3
    python benchmarks/benchmark.py --published ../Pix2PixCC --json side_by_side.json

Side by side with the published code (`--published DIR`, a checkout of
JeongHyunJin/Pix2PixCC, kept outside this repository): its six scripts are copied into a
scratch folder with one change, the device (its hard-coded 'cuda:0' becomes 'cpu' when
--gpu_ids is -1; on a GPU nothing changes). Then the published scripts and ours run as whole
processes with the same options on the same FITS files, alternating:

    train      pix2pixCC_Train.py, one epoch over K1 and over K2 pairs (--side_steps):
               seconds per step = (time(K2) - time(K1)) / (K2 - K1)
    inference  pix2pixCC_Test.py over K1 and K2 inputs (--side_images) with one generator
               checkpoint; seconds per image likewise; the outputs of both are compared
    data       each program's own CustomDataset item for a FITS pair (the published one
               imported from the copy), in its own process

Peak RSS is the largest ru_maxrss of a whole run (the process and its DataLoader workers).
Nothing inside either program is changed or instrumented.

Without --published, each part measures this repository's variants, each in its own Python
process (so the peak RSS reported is its own). Times are medians over the timed
repetitions, after warm-up. The table is printed; `--json` writes every figure and the
machine.

On a shared machine, other processes distort timings (one test suite on a 2-core machine
halves the speed of a training step). For every timed run the benchmark records the share of
the CPUs that other processes used meanwhile (column `others`); runs above
`--max_interference` (default 10%) are dropped and repeated, and `--wait_quiet SECONDS` waits
for idle CPUs before each measurement. `--gpu_ids 0` measures on the first GPU (peak GPU
memory is then reported in the JSON too).

Variants (`--train_variants`, `--data_variants`, `--inference_variants`):

train     driver     the driver's own step: pix2pixCC_Train.train_step with
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
data      ours       CustomDataset.__getitem__ (float32, no interpolation at angle 0)
          loader     DataLoader over CustomDataset as the Train driver builds it
                     (--n_workers workers, persistent), per sample, steady state
inference ours       pix2pixCC_Test.generate under torch.inference_mode (as Test does)
          ours+bf16  ours under bfloat16 autocast (--data_type 16)
          ours_cl    ours with channels_last weights and input
matmul    float32, bfloat16: one 4096 x 4096 matrix product (GFLOP/s of the machine's BLAS)
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PARTS = ('train', 'data', 'inference', 'matmul')
DEFAULT_VARIANTS = {'train': 'driver',
                    'data': 'ours,loader',
                    'inference': 'ours',
                    'matmul': 'float32,bfloat16'}


# ----------------------------------------------------------------------------------------
# Helpers shared with tests/test_performance_equivalence.py
# ----------------------------------------------------------------------------------------


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
    # as pix2pixCC_Train.main does it
    G, D = utils.prepare_network(G, opt, device), utils.prepare_network(D, opt, device)
    if 'onednn' in modifiers:
        for module in (G, D):
            utils.use_gemm_convolutions(module, enabled=False)
    optimisers = [make_optimizer(m.parameters(), opt) for m in (G, D)]
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
        loss_D, loss_G, _, _ = train_step(criterion, G, D, *optimisers, precision, input,
                                          target)
        return loss_D.detach(), loss_G.detach()

    return step, G, D


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


def reset_gpu_peak(device):
    """The peak GPU memory so far (warm-up: cuDNN's autotuner tries algorithms with large
    workspaces), then start counting afresh; None off CUDA."""
    if device.type != 'cuda':
        return None
    import torch
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return peak


def gpu_peaks(device, warmup_peak):
    """peak_gpu_mb of the timed repetitions, and that of the warm-up."""
    if device.type != 'cuda':
        return {}
    import torch
    return {'peak_gpu_mb': torch.cuda.max_memory_allocated() / 2**20,
            'peak_gpu_mb_warmup': warmup_peak}


def network_argv(args):
    return ['--gpu_ids', args.gpu_ids, '--n_gf', str(args.n_gf), '--n_df', str(args.n_df),
            '--n_downsample', str(args.n_downsample), '--n_residual', str(args.n_residual),
            '--batch_size', str(args.batch_size)] + args.option


TRAIN_BASES = ('driver',)
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
    gpu_peak = reset_gpu_peak(device)  # the autotuner's trial workspaces are not the step's
    times, shares = timed(step, args.steps, args.max_interference, 3 * args.steps)
    result = {'seconds': statistics.median(times), 'times': times, 'interference': shares,
              'first_step_seconds': first}
    return result | gpu_peaks(device, gpu_peak)


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


def time_items(get, n, args):
    """Seconds per item of get(0..n-1): one untimed pass (page cache), then --data_repeats
    timed passes (single items are too short to attribute interference to)."""
    for i in range(n):
        get(i)
    times, shares = [], []
    for _ in range(args.data_repeats):
        def one_pass():
            for i in range(n):
                get(i)
        pass_times, pass_shares = timed(one_pass, 1, args.max_interference, 5)
        times.append(pass_times[-1] / n)
        shares.append(pass_shares[-1])
    return {'seconds': statistics.median(times), 'times': times, 'interference': shares}


def child_data(args, variant):
    if variant == 'published':  # side by side: the published code's own dataset
        return child_published_data(args, args.published_copy)
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
        if variant != 'loader':
            return time_items(lambda i: dataset[(i, 1000 + i)], n, args)
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
        seconds = (time.perf_counter() - start) / count
        # the workers' memory is not in this process's ru_maxrss
        return {'seconds': seconds, 'times': [seconds]}


def child_inference(args, variant):
    import torch
    import pix2pixCC_Utils as utils
    from pix2pixCC_Networks import Generator, weights_init
    from pix2pixCC_Options import TestOption
    from pix2pixCC_Test import generate
    base, *modifiers = variant.split('+')
    extra = ['--data_type', '16'] if 'bf16' in modifiers else []
    opt = TestOption().parse(network_argv(args) + ['--data_size', str(args.inference_size)]
                             + extra)
    device, _ = utils.select_device(opt, log=lambda *a: None)
    precision = utils.Precision(opt, device)
    torch.manual_seed(0)
    G = utils.prepare_network(Generator(opt).apply(weights_init).eval(), opt, device)
    layout = utils.memory_format(device)
    if base == 'ours_cl':
        layout = torch.channels_last
        G = G.to(memory_format=layout)
    input = (torch.rand(1, opt.input_ch, args.inference_size, args.inference_size) * 2 - 1)

    def run():
        with torch.inference_mode():
            x = input.to(device, memory_format=layout)
            return generate(G, x, opt.n_downsample, precision).cpu().numpy().shape

    run()  # warm-up
    gpu_peak = reset_gpu_peak(device)
    times, shares = timed(run, args.inference_runs, args.max_interference,
                          3 * args.inference_runs)
    result = {'seconds': statistics.median(times), 'times': times, 'interference': shares}
    return result | gpu_peaks(device, gpu_peak)


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


# ----------------------------------------------------------------------------------------
# Side by side with the published scripts (--published DIR)
# ----------------------------------------------------------------------------------------

PUBLISHED_SCRIPTS = [f'pix2pixCC_{role}.py' for role in
                     ('Networks', 'Options', 'Pipeline', 'Test', 'Train', 'Utils')]
FAR = str(10 ** 9)  # a report/display/save frequency no benchmark run reaches


def published_copy(source, folder, gpu_ids):
    """The published scripts copied into `folder`; the one change is the device.

    The published code hard-codes 'cuda:0' (in Train, Test and the Loss). On a GPU that is the
    card it selects through CUDA_VISIBLE_DEVICES=--gpu_ids, so the copy is unchanged; on the
    CPU each 'cuda:0' becomes 'cpu'.
    """
    os.makedirs(folder, exist_ok=True)
    replaced = 0
    for name in PUBLISHED_SCRIPTS:
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise SystemExit(f"--published {source}: no {name} there; give the folder of a "
                             f"checkout of JeongHyunJin/Pix2PixCC")
        with open(path) as f:
            text = f.read()
        if gpu_ids == '-1':
            replaced += text.count("'cuda:0'")
            text = text.replace("'cuda:0'", "'cpu'")
        with open(os.path.join(folder, name), 'w') as f:
            f.write(text)
    if gpu_ids == '-1' and replaced == 0:
        raise SystemExit(f"--published {source}: no 'cuda:0' found to move to the CPU; is it "
                         f"the published code?")
    return folder


def whole_process(command, cwd, env):
    """Run one whole process; returns its wall seconds, peak RSS (MiB, ru_maxrss of the
    process and the children it waited for, e.g. DataLoader workers) and the share of the
    CPUs other processes used meanwhile. Raises RuntimeError with its last error line."""
    monitor = Interference().start()
    with tempfile.TemporaryFile('w+') as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            lines = errors.read().strip().splitlines()
            raise RuntimeError(f"{' '.join(command[:2])} exited {proc.returncode}: "
                               f"{lines[-1] if lines else 'no output'}")
    scale = 1 if sys.platform == 'darwin' else 1024
    return {'seconds': seconds, 'peak_rss_mb': usage.ru_maxrss * scale / 2**20,
            'interference': monitor.stop()}


class SideBySide:
    """The published scripts and ours, run as whole processes with the same options on the
    same files, in fresh working folders under `root`.

    A figure per item (training step, test image) is the difference between a run over K2
    items and one over K1, divided by K2 - K1: start-up, loading and the final save cancel
    out, and nothing inside either program is changed or instrumented. Runs alternate between
    the two programs, repetition by repetition.
    """

    def __init__(self, args, root):
        self.args, self.root = args, root
        self.programs = {'published': published_copy(args.published,
                                                     os.path.join(root, 'published'),
                                                     args.gpu_ids),
                         'ours': REPO}
        self.env = dict(os.environ, PYTHONUNBUFFERED='1')
        if args.threads:
            self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.runs = 0

    def options(self, size):
        """Options both programs read, spelt the same (no published type=bool flags)."""
        a = self.args
        return ['--dataset_name', 'bench', '--gpu_ids', a.gpu_ids,
                '--data_format_input', 'fits', '--data_format_target', 'fits',
                '--saturation_lower_limit_input', '-2', '--saturation_upper_limit_input', '2',
                '--saturation_lower_limit_target', '-2', '--saturation_upper_limit_target', '2',
                '--n_gf', str(a.n_gf), '--n_df', str(a.n_df),
                '--n_downsample', str(a.n_downsample), '--n_residual', str(a.n_residual),
                '--batch_size', '1', '--n_workers', str(a.n_workers), '--data_size', str(size),
                *a.option]

    def pairs(self, size, counts):
        """{count: (input folder, target folder)} holding the first `count` of max(counts)
        FITS pairs of size x size."""
        source = os.path.join(self.root, f'data_{size}_{len(os.listdir(self.root))}')
        write_fits_pairs(source, max(counts), size)
        folders = {}
        for count in counts:
            folder = f'{source}_{count}'
            for role in ('Input', 'Target'):
                os.makedirs(os.path.join(folder, role))
                for name in sorted(os.listdir(os.path.join(source, role)))[:count]:
                    os.link(os.path.join(source, role, name), os.path.join(folder, role, name))
            folders[count] = tuple(os.path.join(folder, role) for role in ('Input', 'Target'))
        return folders

    def run(self, program, script, argv, setup=None, keep=False):
        """One whole process of `program` in a fresh folder (removed after unless `keep`)."""
        self.runs += 1
        cwd = os.path.join(self.root, f'run{self.runs}_{program}')
        os.makedirs(cwd)
        if setup:
            setup(cwd)
        wait_for_quiet(self.args.wait_quiet)
        command = [sys.executable, os.path.join(self.programs[program], script), *argv]
        try:
            return whole_process(command, cwd, self.env) | {'cwd': cwd}
        finally:
            if not keep:
                shutil.rmtree(cwd, ignore_errors=True)

    def per_item(self, script, argv_for, counts, setup=None, keep_last=False):
        """{program: {seconds (per item, median over repetitions), peak_rss_mb (max),
        runs}} from alternating runs over counts[0] and counts[1] items."""
        k1, k2 = counts
        raw = {program: {k1: [], k2: []} for program in self.programs}
        for repetition in range(self.args.side_repeats):
            last = repetition == self.args.side_repeats - 1
            for count in counts:
                for program in self.programs:
                    raw[program][count].append(self.run(
                        program, script, argv_for(count), setup,
                        keep=keep_last and last and count == k2))
        results = {}
        for program, by_count in raw.items():
            differences = [(b['seconds'] - a['seconds']) / (k2 - k1)
                           for a, b in zip(by_count[k1], by_count[k2])]
            runs = by_count[k1] + by_count[k2]
            results[program] = {
                'seconds': statistics.median(differences), 'times': differences,
                'peak_rss_mb': max(r['peak_rss_mb'] for r in runs),
                'interference': [r['interference'] for r in runs],
                'process_seconds': {k1: [r['seconds'] for r in by_count[k1]],
                                    k2: [r['seconds'] for r in by_count[k2]]}}
            if keep_last:  # the kept folder of the last K2 run, for its outputs
                results[program]['cwd'] = by_count[k2][-1]['cwd']
        return results

    def train(self):
        """A training step at --size: Train over K1 and K2 pairs, one epoch."""
        counts = self.args.side_steps
        data = self.pairs(self.args.size, counts)
        return self.per_item('pix2pixCC_Train.py', lambda count: [
            *self.options(self.args.size), '--input_dir_train', data[count][0],
            '--target_dir_train', data[count][1], '--n_epochs', '1',
            '--report_freq', FAR, '--display_freq', FAR, '--save_freq', FAR], counts)

    def inference(self):
        """One test image at --inference_size: Test over K1 and K2 inputs with the same
        generator checkpoint (default initialisation, seed 0); also compares the outputs of
        the last K2 runs."""
        import torch
        from pix2pixCC_Networks import Generator, weights_init
        from pix2pixCC_Options import TestOption
        size, counts = self.args.inference_size, self.args.side_images
        data = self.pairs(size, counts)
        opt = TestOption().parse(self.options(size))
        torch.manual_seed(0)
        checkpoint = os.path.join(self.root, 'checkpoint_G.pt')
        torch.save(Generator(opt).apply(weights_init).state_dict(), checkpoint)

        def setup(cwd):  # the run folder with its one generator, as training leaves it
            model = os.path.join(cwd, 'checkpoints', 'bench', 'Model')
            os.makedirs(model)
            os.link(checkpoint, os.path.join(model, '1_G.pt'))

        results = self.per_item('pix2pixCC_Test.py', lambda count: [
            *self.options(size), '--iteration', '1', '--input_dir_test', data[count][0]],
            counts, setup, keep_last=True)
        results['outputs'] = compare_outputs(
            *(os.path.join(results[program]['cwd'], 'checkpoints', 'bench', 'Image', 'Test',
                           '1') for program in ('published', 'ours')))
        for program in self.programs:
            shutil.rmtree(results[program].pop('cwd'), ignore_errors=True)
        return results

    def data(self):
        """Preparing one 1024x1024 FITS pair for training: each program's CustomDataset
        item, in its own process (the published one imported from its copy)."""
        results = {}
        for program in self.programs:
            result = run_child(self.args.argv, 'data', program, self.args.threads,
                               extra=['--published_copy', self.programs['published']])
            if 'error' in result:
                raise RuntimeError(f"data preparation ({program}): {result['error']}")
            results[program] = result
        return results


def compare_outputs(published_dir, ours_dir):
    """Largest absolute difference between the two programs' generated FITS files (target
    units), and that difference relative to the outputs' range."""
    import numpy as np
    from astropy.io import fits
    names = sorted(name for name in os.listdir(published_dir) if name.endswith('_AI.fits'))
    largest, spread = 0.0, 0.0
    for name in names:
        with fits.open(os.path.join(published_dir, name)) as a, \
                fits.open(os.path.join(ours_dir, name)) as b:
            x, y = np.asarray(a[0].data, np.float64), np.asarray(b[0].data, np.float64)
        largest = max(largest, float(np.abs(x - y).max()))
        spread = max(spread, float(x.max() - x.min()))
    return {'files': len(names), 'max_abs_difference': largest,
            'relative_to_range': largest / spread if spread else None}


def child_published_data(args, folder):
    """The published CustomDataset's items, timed in this process: its modules imported from
    the copy (this process has imported none of ours), its options parsed from the same
    command line, in a scratch folder (its option parsing creates ./checkpoints)."""
    if REPO in sys.path:  # the two programs' modules have the same names
        sys.path.remove(REPO)
    sys.path.insert(0, folder)
    with tempfile.TemporaryDirectory(prefix='p2pcc-bench-') as scratch:
        input_dir, target_dir = write_fits_pairs(os.path.join(scratch, 'data'),
                                                 args.data_pairs, args.data_size)
        os.chdir(scratch)
        sys.argv = ['pix2pixCC_Train.py', *network_argv(args),
                    '--data_format_input', 'fits', '--data_format_target', 'fits',
                    '--input_dir_train', input_dir, '--target_dir_train', target_dir,
                    '--data_size', str(args.data_size)]
        with contextlib.redirect_stdout(sys.stderr):  # it prints the file counts
            from pix2pixCC_Options import TrainOption
            from pix2pixCC_Pipeline import CustomDataset
            dataset = CustomDataset(TrainOption().parse())
        return time_items(lambda i: dataset[i], len(dataset), args)


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
    p.add_argument('--published', default=None, metavar='DIR',
                   help='side by side with the published scripts in DIR (a checkout of '
                        'JeongHyunJin/Pix2PixCC): parts train, data, inference')
    p.add_argument('--side_steps', type=counts, default=(2, 7), metavar='K1,K2',
                   help='--published: training runs over K1 and K2 pairs (one step each)')
    p.add_argument('--side_images', type=counts, default=(1, 3), metavar='K1,K2',
                   help='--published: Test runs over K1 and K2 inputs')
    p.add_argument('--side_repeats', type=int, default=2,
                   help='--published: repetitions of each pair of runs (median reported)')
    p.add_argument('--json', default=None, help='write the results here')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--published_copy', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def counts(text):
    """'2,7' -> (2, 7), two item counts K1 < K2."""
    try:
        k1, k2 = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: give two counts, K1,K2') from None
    if not 0 < k1 < k2:
        raise argparse.ArgumentTypeError(f'{text!r}: need 0 < K1 < K2')
    return k1, k2


def run_child(argv, part, variant, threads, extra=()):
    command = [sys.executable, os.path.abspath(__file__)] + argv + \
        ['--child', f'{part}:{variant}', *extra]
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
    config = {k: v for k, v in vars(args).items() if k not in ('json', 'child', 'argv')}
    print(f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
          f"GPU: {info['gpu'] or 'none'}, load average {info['load_average']}")
    if args.published:
        results = side_by_side(args, [p for p in parts if p != 'matmul'])
    else:
        results = variants(args, argv, parts)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': info, 'config': config, 'results': results}, f, indent=2)
        print(f'written: {args.json}')
    return 0


def side_by_side(args, parts):
    """The published scripts and ours, part by part; prints each part's rows as it ends (a
    run cut short keeps what it measured), returns the figures."""
    size = {'train': args.size, 'data': args.data_size, 'inference': args.inference_size}
    labels = {'train': f'training step {size["train"]}x{size["train"]} (s)',
              'data': f'data preparation, {size["data"]}x{size["data"]} FITS pair (s)',
              'inference': f'inference {size["inference"]}x{size["inference"]}, per image (s)'}
    header = f"{'figure':<44}{'published':>11}{'ours':>11}{'ratio':>8}"
    print(header)
    print('-' * len(header), flush=True)

    def row(label, published, ours, digits):
        print(f'{label:<44}{published:>11.{digits}f}{ours:>11.{digits}f}'
              f'{ours / published:>8.3f}', flush=True)

    root = tempfile.mkdtemp(prefix='p2pcc-side-')
    results = {}
    try:
        bench = SideBySide(args, root)
        for part in parts:
            figures = results[part] = getattr(bench, part)()
            row(labels[part], figures['published']['seconds'], figures['ours']['seconds'], 4)
            if part != 'data':  # data items are timed in-process: no RSS of their own
                row(f'{part} peak RSS (MB)', figures['published']['peak_rss_mb'],
                    figures['ours']['peak_rss_mb'], 0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if 'inference' in results:
        out = results['inference']['outputs']
        print(f"outputs of the {out['files']} test images: largest |published - ours| "
              f"{out['max_abs_difference']:.3g} (target units), "
              f"{out['relative_to_range'] or 0:.2g} of the outputs' range")
    shares = [x for part in parts for program in ('published', 'ours')
              for x in results[part][program]['interference'] if x is not None]
    print(f"per step/image: (time of K2 items - time of K1) / (K2 - K1) of whole processes, "
          f"median of {args.side_repeats}; others: CPU share of other processes, median "
          f"{statistics.median(shares) if shares else 0:.0%}, largest "
          f"{max(shares) if shares else 0:.0%}")
    return results


def variants(args, argv, parts):
    """This repository's variants, each in its own process; prints the table."""
    results = []
    header = f"{'part':<10}{'variant':<14}{'size':>5}{'seconds':>10}{'vs first':>9}" \
             f"{'peak RSS MB':>12}{'n':>4}{'others':>8}"
    print(header)
    print('-' * len(header))
    for part in parts:
        size = {'train': args.size, 'data': args.data_size,
                'inference': args.inference_size, 'matmul': args.matmul_size}[part]
        names = [v.strip() for v in getattr(args, f'{part}_variants').split(',') if v.strip()]
        first = None
        for variant in names:
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
    return results


if __name__ == '__main__':
    sys.exit(main())
