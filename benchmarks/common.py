"""What benchmarks/benchmark.py and benchmarks/side_by_side.py share.

The options both take, the description of the machine (experiments/cc_ablation.py records
it too), timings that other processes did not disturb, the FITS pairs the data parts read,
and the child processes each measurement runs in: a script runs itself with `--child
part:variant`, the child prints one JSON line, and the parent collects it.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the benchmarks import the repository's pix2pixCC_* modules
    sys.path.insert(0, REPO)

# The default network of pix2pixCC_Options, as the benchmarks' options spell it.
NETWORK_DEFAULTS = (('n_gf', 64), ('n_df', 64), ('n_downsample', 4), ('n_residual', 9))


# ----------------------------------------------------------------------------------------
# The machine, and how busy other processes keep it
# ----------------------------------------------------------------------------------------


def machine():
    """Python, torch and its threads, the CPU model and count, the GPU, the load average."""
    import torch
    info = {'python': platform.python_version(), 'torch': torch.__version__,
            'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'platform': platform.platform()}
    info['cpu'] = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        info['cpu'] = names[0] if names else info['cpu']
    except OSError:
        pass
    info['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info['load_average'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
    return info


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
        clean = [t for t, share in zip(times, shares, strict=True)
                 if share is None or share <= max_interference]
        if len(clean) >= count:
            return clean, shares
    return times, shares


def megabytes(ru_maxrss):
    """MiB of a ru_maxrss: Linux reports it in KiB, macOS in bytes."""
    return ru_maxrss * (1 if sys.platform == 'darwin' else 1024) / 2**20


def peak_rss_mb():
    return megabytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# ----------------------------------------------------------------------------------------
# What the data parts read
# ----------------------------------------------------------------------------------------


def network_argv(args):
    return ['--gpu_ids', args.gpu_ids, '--n_gf', str(args.n_gf), '--n_df', str(args.n_df),
            '--n_downsample', str(args.n_downsample), '--n_residual', str(args.n_residual),
            '--batch_size', str(args.batch_size)] + args.option


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


# ----------------------------------------------------------------------------------------
# Options, children and the parent's record
# ----------------------------------------------------------------------------------------


def add_network_options(parser):
    for name, default in NETWORK_DEFAULTS:
        parser.add_argument(f'--{name}', type=int, default=default)


def argument_parser(doc, parts):
    """An argument parser with the options of both benchmark scripts (their script adds its
    own); --what chooses among `parts`, all by default."""
    p = argparse.ArgumentParser(description=doc.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--what', default=','.join(parts),
                   help=f'comma-separated parts: {", ".join(parts)}')
    p.add_argument('--gpu_ids', default='-1', help="'-1' for the CPU, '0' for the first GPU")
    p.add_argument('--size', type=int, default=256, help='training image size')
    add_network_options(p)
    p.add_argument('--batch_size', type=int, default=1)
    p.add_argument('--data_size', type=int, default=1024, help='FITS pair size')
    p.add_argument('--data_pairs', type=int, default=4, help='FITS pairs written')
    p.add_argument('--data_repeats', type=int, default=5, help='timed passes over the pairs')
    p.add_argument('--n_workers', type=int, default=1, help='DataLoader workers')
    p.add_argument('--inference_size', type=int, default=1024)
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
    return p


def parse(parser, argv):
    """The options of `argv` (the command line when None), with `argv` itself as args.argv:
    the children get the same command line."""
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def parts_of(args, known):
    """The parts --what names, all of them among `known` (else exit with a message)."""
    parts = [p.strip() for p in args.what.split(',') if p.strip()]
    unknown = set(parts) - set(known)
    if unknown:
        sys.exit(f'unknown part(s): {", ".join(sorted(unknown))}; choose from {", ".join(known)}')
    return parts


def run_child(script, argv, part, variant, threads, extra=()):
    """`script argv --child part:variant extra` in its own process: the JSON line it printed,
    or {'error': [its last line]}."""
    command = [sys.executable, os.path.abspath(script)] + argv + \
        ['--child', f'{part}:{variant}', *extra]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        return {'error': (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def child(args, children):
    """The child's side: run children[part](args, variant), print its figures, peak RSS and
    torch threads as one JSON line."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    part, variant = args.child.split(':')
    result = children[part](args, variant)
    result['peak_rss_mb'] = peak_rss_mb()
    result['torch_threads'] = torch.get_num_threads()
    print(json.dumps(result))
    return 0


def record(args, measure):
    """The parent's side: print the machine, run `measure()` (which prints its table) and
    write --json: {machine, config (the options), results (what `measure` returns)}."""
    info = machine()
    config = {k: v for k, v in vars(args).items() if k not in ('json', 'child', 'argv')}
    print(f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
          f"GPU: {info['gpu'] or 'none'}, load average {info['load_average']}")
    results = measure()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': info, 'config': config, 'results': results}, f, indent=2)
        print(f'written: {args.json}')
    return 0
