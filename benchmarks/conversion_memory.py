"""Peak memory of the Test script over an archive of N files, for several N (BENCHMARKS.md
"Converting an archive"): the Test script streams files, so its peak resident memory must
not grow with the number of files.

    OMP_NUM_THREADS=1 python benchmarks/conversion_memory.py --counts 10 1000

For each N, the folder holds N hard links to one 64x64 sample pair (datasets/Sample/Test,
input and target: the metrics are computed too), and the Test script translates them with
an untrained generator of the quick-start network (README "Quick start") in a process of its
own, with --n_workers 0 so that the reading happens in that process; its peak resident set
size (ru_maxrss, from wait4) is printed as one JSON line per N. Timings are not the point
(the files are the same file, read from the page cache).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SAMPLE_PAIR = ('Test/Input/sun_0032.fits', 'Test/Target/sun_0032.fits')
# The quick start's network and scaling (README "Quick start").
NETWORK = ['--n_gf', '32', '--n_downsample', '2', '--n_residual', '4']
SCALING = ['--data_format_input', 'fits', '--data_format_target', 'fits',
           '--logscale_input', 'True', '--saturation_lower_limit_input', '1',
           '--saturation_upper_limit_input', '200', '--saturation_lower_limit_target', '-3000',
           '--saturation_upper_limit_target', '3000']


def make_run(work, network):
    """checkpoints/memory/Model/1_G.pt under `work`: an untrained generator of `network`."""
    import torch

    from pix2pixCC_Networks import Generator, weights_init
    from pix2pixCC_Options import TrainOption
    opt = TrainOption().parse(['--gpu_ids', '-1', *network])
    model = os.path.join(work, 'checkpoints', 'memory', 'Model')
    os.makedirs(model)
    torch.manual_seed(0)
    torch.save(Generator(opt).apply(weights_init).state_dict(), os.path.join(model, '1_G.pt'))


def make_archive(work, n):
    """N hard links to the sample pair under work/archive_N/{Input,Target}."""
    folders = []
    for role, source in zip(('Input', 'Target'), SAMPLE_PAIR, strict=True):
        folder = os.path.join(work, f'archive_{n}', role)
        os.makedirs(folder)
        for i in range(n):
            os.link(os.path.join(REPO, 'datasets', 'Sample', source),
                    os.path.join(folder, f'sun_{i:05d}.fits'))
        folders.append(folder)
    return folders


def peak_rss(command, cwd):
    """The peak resident set size in MB of `command` run in `cwd` (its output goes to
    cwd/log.txt, which a failure shows)."""
    log = os.path.join(cwd, 'log.txt')
    with open(log, 'w') as output:
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        with open(log) as f:
            sys.exit(f"exit status {process.returncode}: {f.read()[-2000:]}")
    return usage.ru_maxrss / 1024  # kB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--counts', type=int, nargs='+', default=[10, 1000],
                        help='numbers of files of the archives')
    parser.add_argument('--tiny', action='store_true',
                        help="the tests' tiny network instead of the quick start's")
    parser.add_argument('--keep', default=None,
                        help='work in this folder and keep it (default: a temporary one)')
    args = parser.parse_args(argv)
    network = ['--n_gf', '8', '--n_downsample', '2', '--n_residual', '1'] if args.tiny \
        else NETWORK
    work = args.keep or tempfile.mkdtemp(prefix='conversion_memory_')
    os.makedirs(work, exist_ok=True)
    try:
        make_run(work, network)
        for n in args.counts:
            input_dir, target_dir = make_archive(work, n)
            command = [sys.executable, os.path.join(REPO, 'pix2pixCC_Test.py'), '--gpu_ids',
                       '-1', '--dataset_name', 'memory', '--iteration', '1', '--n_workers',
                       '0', *network, *SCALING, '--input_dir_test', input_dir,
                       '--target_dir_test', target_dir, '--output_dir', f'out_{n}']
            rss = peak_rss(command, work)
            print(json.dumps({'files': n, 'peak_rss_mb': round(rss, 1),
                              'network': ' '.join(network),
                              'omp_threads': os.environ.get('OMP_NUM_THREADS')}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
