"""Full-resolution images: peak memory, temporary disk and time of the Test script on one
large one-channel FITS image, tiled (--tile_size) and whole (README "Full-resolution images").

    python benchmarks/tiled_inference.py                        # 2048 and 4096, tiles of 1024
    python benchmarks/tiled_inference.py --sizes 2048 --tile_size 512 --json out.json

In a work folder (--workdir, default a temporary one, removed at the end) it writes a
generator checkpoint of the chosen network (default: the default network, 774 MB, random
N(0, 0.02) weights) and, for each size, one size x size float32 FITS input (a smooth field
plus noise). Each measurement is one whole Test process (`--n_workers 0`, so that reading
the file is in the process too) on that input:

- peak RSS: the process's ru_maxrss (os.wait4);
- temporary disk: the largest total size of the files in --tmp_dir, sampled every 0.1 s;
- time per image: the process's wall time less that of the same command on a 64 x 64 input
  (start-up, loading the generator and writing the output);
- others: the share of the CPUs other processes used meanwhile (timings above 10% are not
  to be trusted).

The whole-image pass is skipped, with a note, when the Test script's own estimate of its
memory (`whole_image_bytes`) exceeds the machine's MemAvailable; otherwise it runs with
PIX2PIXCC_MEMORY_LIMIT set high, so that the Test script does not switch to tiles itself.
The outputs of both are compared (largest difference over the output's range). The table
is printed; `--json` writes every figure and the machine.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import common  # also puts the repository on sys.path, for the pix2pixCC_* modules
from common import Interference, add_network_options, machine, megabytes

TEST_SCRIPT = os.path.join(common.REPO, 'pix2pixCC_Test.py')
RUN = 'tiled_inference'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--sizes', default='2048,4096', help='comma-separated image sizes')
    p.add_argument('--tile_size', type=int, default=1024)
    p.add_argument('--gpu_ids', default='-1', help="'-1' for the CPU, '0' for the first GPU")
    p.add_argument('--workdir', default=None, help='kept when given (default: a temporary one)')
    p.add_argument('--tmp_dir', default=None,
                   help='--tmp_dir of the tiled runs (default: a folder in the work folder)')
    p.add_argument('--skip_whole', action='store_true', help='tiled runs only')
    p.add_argument('--json', default=None, help='write the figures to this file')
    add_network_options(p)
    return p.parse_args(argv)


def network_argv(args):
    return ['--gpu_ids', args.gpu_ids, '--n_gf', str(args.n_gf), '--n_downsample',
            str(args.n_downsample), '--n_residual', str(args.n_residual)]


def write_checkpoint(workdir, args):
    """A generator of the network of `args` with N(0, 0.02) weights, as step 1 of a run."""
    import torch
    from pix2pixCC_Networks import Generator, weights_init
    from pix2pixCC_Options import TestOption
    torch.manual_seed(0)
    G = Generator(TestOption().parse(network_argv(args))).apply(weights_init)
    model = os.path.join(workdir, 'checkpoints', RUN, 'Model')
    os.makedirs(model, exist_ok=True)
    torch.save(G.state_dict(), os.path.join(model, '1_G.pt'))


def write_input(workdir, size):
    """The folder of one size x size float32 FITS image in [-1, 1] and a little beyond."""
    import numpy as np
    from astropy.io import fits
    folder = os.path.join(workdir, f'in_{size}')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.sin(6 * np.pi * xx) * np.cos(4 * np.pi * yy) + 0.1 * rng.standard_normal(
        (size, size))
    fits.PrimaryHDU(image.astype(np.float32)).writeto(os.path.join(folder, 'sun.fits'),
                                                      overwrite=True)
    return folder


def folder_bytes(folder):
    """Bytes allocated to the files under `folder` (the stores are allocated up front)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # removed meanwhile
                pass
    return total


def run_test(workdir, args, input_dir, output_dir, tmp_dir, extra, env):
    """One Test process: (wall seconds, peak RSS MiB, largest temporary bytes, share of the
    CPUs used by others, its standard output)."""
    command = [sys.executable, TEST_SCRIPT, '--dataset_name', RUN, '--iteration', '1',
               '--input_dir_test', input_dir, '--output_dir', output_dir, '--overwrite',
               '--data_format_input', 'fits', '--data_format_target', 'fits',
               '--n_workers', '0', '--saturation_lower_limit_input', '-1',
               '--saturation_upper_limit_input', '1', '--saturation_lower_limit_target', '-1',
               '--saturation_upper_limit_target', '1', *network_argv(args), *extra]
    peak_disk, done = [0], threading.Event()

    def watch():
        while not done.wait(0.1):
            peak_disk[0] = max(peak_disk[0], folder_bytes(tmp_dir))

    watcher = threading.Thread(target=watch, daemon=True)
    monitor = Interference().start()
    start = time.perf_counter()
    with open(os.path.join(workdir, 'stdout.txt'), 'w+') as out:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        watcher.join()
        out.seek(0)
        text = out.read()
    if process.returncode != 0:
        sys.exit(f'the Test run failed ({process.returncode}):\n{text[-3000:]}')
    return wall, megabytes(usage.ru_maxrss), peak_disk[0], monitor.stop(), text


def whole_image_estimate(args, size):
    """The Test script's estimate (bytes) of a whole-image pass at size x size."""
    import torch
    from machinery.tile_graph import tile_plan
    from machinery.tile_memory import whole_image_bytes
    from pix2pixCC_Networks import Generator
    from pix2pixCC_Options import TestOption
    with torch.device('meta'):
        G = Generator(TestOption().parse(network_argv(args))).eval()
    return whole_image_bytes(tile_plan(G), (1, size, size))


def output_difference(workdir, size):
    """Largest |tiled - whole| over the whole output's range."""
    import numpy as np
    from astropy.io import fits
    tiled, whole = (fits.getdata(os.path.join(workdir, f'out_{size}_{mode}', 'sun_AI.fits'))
                    .astype(np.float64) for mode in ('tiled', 'whole'))
    return float(np.abs(tiled - whole).max() / (whole.max() - whole.min()))


def measure(workdir, args, tmp_dir):
    """Every figure, by size and mode."""
    import torch
    from machinery.tile_memory import available_memory
    env = dict(os.environ)
    small = write_input(workdir, 64)
    startup, *_ = run_test(workdir, args, small, os.path.join(workdir, 'out_64'), tmp_dir,
                           [], env)
    results = {'startup_seconds': startup, 'sizes': {}}
    for size in [int(size) for size in args.sizes.split(',')]:
        input_dir, figures = write_input(workdir, size), {}
        estimate = whole_image_estimate(args, size)
        available, _ = available_memory(torch.device('cpu'))
        modes = [('tiled', ['--tile_size', str(args.tile_size), '--tmp_dir', tmp_dir], env)]
        if args.skip_whole:
            figures['whole'] = {'skipped': '--skip_whole'}
        elif args.gpu_ids == '-1' and available is not None and estimate > available:
            figures['whole'] = {'skipped': f'estimate {estimate / 1e9:.1f} GB > MemAvailable '
                                           f'{available / 1e9:.1f} GB'}
        else:
            modes.append(('whole', [], dict(env, PIX2PIXCC_MEMORY_LIMIT='1e15')))
        for mode, extra, mode_env in modes:
            print(f'{size}x{size} {mode} ...', flush=True)
            wall, rss, disk, others, text = run_test(
                workdir, args, input_dir, os.path.join(workdir, f'out_{size}_{mode}'),
                tmp_dir, extra, mode_env)
            figures[mode] = {'wall_seconds': wall, 'seconds_per_image': wall - startup,
                             'peak_rss_mb': rss, 'peak_temporary_disk_gb': disk / 1e9,
                             'others': others, 'notices': [line for line in text.splitlines()
                                                           if line.startswith('notice')]}
        figures['whole_image_estimate_gb'] = estimate / 1e9
        if 'wall_seconds' in figures['whole']:
            figures['tiled_over_whole_time'] = figures['tiled']['seconds_per_image'] / \
                figures['whole']['seconds_per_image']
            figures['largest_difference_over_range'] = output_difference(workdir, size)
        results['sizes'][size] = figures
    return results


def table(results, args):
    lines = [f"tiles of {args.tile_size} px; start-up of a Test process "
             f"{results['startup_seconds']:.1f} s (subtracted)",
             '| image | mode | time per image | peak RSS | temporary disk | others |',
             '|---|---|---:|---:|---:|---:|']
    for size, figures in results['sizes'].items():
        for mode in ('tiled', 'whole'):
            f = figures[mode]
            if 'skipped' in f:
                lines.append(f"| {size}² | {mode} | skipped: {f['skipped']} | | | |")
                continue
            lines.append(f"| {size}² | {mode} | {f['seconds_per_image']:.1f} s | "
                         f"{f['peak_rss_mb']:.0f} MB | {f['peak_temporary_disk_gb']:.2f} GB | "
                         f"{100 * (f['others'] or 0):.0f}% |")
        if 'tiled_over_whole_time' in figures:
            lines.append(f"| {size}² | tiled / whole | {figures['tiled_over_whole_time']:.2f} | "
                         f"outputs differ by at most "
                         f"{figures['largest_difference_over_range']:.1e} of the range | | |")
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix='pix2pixCC-tiled-benchmark-')
    os.makedirs(workdir, exist_ok=True)
    tmp_dir = args.tmp_dir or os.path.join(workdir, 'tmp')
    os.makedirs(tmp_dir, exist_ok=True)
    try:
        write_checkpoint(workdir, args)
        results = measure(workdir, args, tmp_dir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results.update(machine=machine(), tile_size=args.tile_size,
                   network={name: getattr(args, name) for name, _ in common.NETWORK_DEFAULTS
                            if name != 'n_df'})
    print(table(results, args))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
