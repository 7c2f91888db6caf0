"""pix2pixCC side by side with the published code: training step, data preparation, inference.

    python benchmarks/side_by_side.py ../Pix2PixCC --json side_by_side.json
    python benchmarks/side_by_side.py ../Pix2PixCC --what train,data,inference \
        --side_steps 2,8 --side_images 1,4 --side_repeats 3 --wait_quiet 60

DIR is a checkout of JeongHyunJin/Pix2PixCC, kept outside this repository. Its six scripts
are copied into a scratch folder with one change, the device (its hard-coded 'cuda:0' becomes
'cpu' when --gpu_ids is -1; on a GPU nothing changes). Then the published scripts and ours
run as whole processes with the same options on the same FITS files, alternating:

    train      pix2pixCC_Train.py, one epoch over K1 and over K2 pairs (--side_steps):
               seconds per step = (time(K2) - time(K1)) / (K2 - K1)
    inference  pix2pixCC_Test.py over K1 and K2 inputs (--side_images) with one generator
               checkpoint; seconds per image likewise; the outputs of both are compared
    data       each program's own CustomDataset item for a FITS pair (the published one
               imported from the copy), in its own process

Peak RSS is the largest ru_maxrss of a whole run (the process and its DataLoader workers).
Nothing inside either program is changed or instrumented. Each part's rows are printed as it
ends (a run cut short keeps what it measured); `--json` writes every figure and the machine.
The share of the CPUs other processes used during each run is recorded, as in
benchmarks/benchmark.py (which measures this repository's own variants; its old
`--published DIR` runs this script).
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import benchmark
import common

PARTS = ('train', 'data', 'inference')

# ----------------------------------------------------------------------------------------
# The parent: both programs as whole processes, part by part
# ----------------------------------------------------------------------------------------

PUBLISHED_SCRIPTS = [f'pix2pixCC_{role}.py' for role in
                     ('Networks', 'Options', 'Pipeline', 'Test', 'Train', 'Utils')]
FAR = str(10 ** 9)  # a report/display/save frequency no benchmark run reaches


def published_copy(source, folder, gpu_ids):
    """The published scripts copied into `folder`; the one change is the device.

    The published code hard-codes 'cuda:0' (in Train, Test and the Loss). On a GPU that is the
    card it selects through CUDA_VISIBLE_DEVICES=--gpu_ids, so the copy is unchanged; on the
    CPU each 'cuda:0' becomes 'cpu'. A source with a machinery/ folder beside its scripts (a
    copy of this repository, as the tests use) has that folder copied as it is.
    """
    os.makedirs(folder, exist_ok=True)
    replaced = 0
    for name in PUBLISHED_SCRIPTS:
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise SystemExit(f"{source}: no {name} there; give the folder of a "
                             f"checkout of JeongHyunJin/Pix2PixCC")
        with open(path) as f:
            text = f.read()
        if gpu_ids == '-1':
            replaced += text.count("'cuda:0'")
            text = text.replace("'cuda:0'", "'cpu'")
        with open(os.path.join(folder, name), 'w') as f:
            f.write(text)
    if os.path.isdir(os.path.join(source, 'machinery')):
        shutil.copytree(os.path.join(source, 'machinery'), os.path.join(folder, 'machinery'),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns('__pycache__'))
    if gpu_ids == '-1' and replaced == 0:
        raise SystemExit(f"{source}: no 'cuda:0' found to move to the CPU; is it "
                         f"the published code?")
    return folder


# On Linux a process's ru_maxrss keeps the high-water mark of the image it was exec'd from
# (execve keeps the larger of the old and the new one), so a program started by this process,
# which holds torch and built a generator, reported at least this process's RSS (2150 MB
# where the Test script itself peaked at 1362 MB). A small launcher, itself started from
# here, starts the measured program and reports the program's own ru_maxrss.
LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], 'w') as f:
    json.dump({'maxrss': usage.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def whole_process(command, cwd, env):
    """Run one whole process; returns its wall seconds, peak RSS (MiB, ru_maxrss of the
    process and the children it waited for, e.g. DataLoader workers, started through
    LAUNCHER) and the share of the CPUs other processes used meanwhile. Raises RuntimeError
    with its last error line."""
    monitor = common.Interference().start()
    with tempfile.TemporaryFile('w+') as errors, \
            tempfile.NamedTemporaryFile('r', suffix='.json') as usage:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, '-c', LAUNCHER, usage.name, *command], cwd=cwd,
                              env=env, stdout=subprocess.DEVNULL, stderr=errors)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            errors.seek(0)
            lines = errors.read().strip().splitlines()
            raise RuntimeError(f"{' '.join(command[:2])} exited {proc.returncode}: "
                               f"{lines[-1] if lines else 'no output'}")
        maxrss = json.load(usage)['maxrss']
    return {'seconds': seconds, 'peak_rss_mb': common.megabytes(maxrss),
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
                         'ours': common.REPO}
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
        common.write_fits_pairs(source, max(counts), size)
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
        common.wait_for_quiet(self.args.wait_quiet)
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
                           for a, b in zip(by_count[k1], by_count[k2], strict=True)]
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
            result = common.run_child(__file__, self.args.argv, 'data', program,
                                      self.args.threads,
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


# ----------------------------------------------------------------------------------------
# The data part's child: one program's CustomDataset items, timed in its own process
# ----------------------------------------------------------------------------------------


def child_data(args, program):
    """`program`'s CustomDataset items: ours as benchmark.py's `ours` variant times them."""
    if program == 'published':
        return child_published_data(args, args.published_copy)
    return benchmark.child_data(args, 'ours')


def child_published_data(args, folder):
    """The published CustomDataset's items, timed in this process: its modules imported from
    the copy (this process has imported none of ours), its options parsed from the same
    command line, in a scratch folder (its option parsing creates ./checkpoints)."""
    if common.REPO in sys.path:  # the two programs' modules have the same names
        sys.path.remove(common.REPO)
    sys.path.insert(0, folder)
    with tempfile.TemporaryDirectory(prefix='p2pcc-bench-') as scratch:
        input_dir, target_dir = common.write_fits_pairs(os.path.join(scratch, 'data'),
                                                        args.data_pairs, args.data_size)
        os.chdir(scratch)
        sys.argv = ['pix2pixCC_Train.py', *common.network_argv(args),
                    '--data_format_input', 'fits', '--data_format_target', 'fits',
                    '--input_dir_train', input_dir, '--target_dir_train', target_dir,
                    '--data_size', str(args.data_size)]
        with contextlib.redirect_stdout(sys.stderr):  # it prints the file counts
            from pix2pixCC_Options import TrainOption
            from pix2pixCC_Pipeline import CustomDataset
            dataset = CustomDataset(TrainOption().parse())
        return common.time_items(lambda i: dataset[i], len(dataset), args)


# ----------------------------------------------------------------------------------------
# Options and main
# ----------------------------------------------------------------------------------------


def counts(text):
    """'2,7' -> (2, 7), two item counts K1 < K2."""
    try:
        k1, k2 = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: give two counts, K1,K2') from None
    if not 0 < k1 < k2:
        raise argparse.ArgumentTypeError(f'{text!r}: need 0 < K1 < K2')
    return k1, k2


def parse_args(argv=None):
    p = common.argument_parser(__doc__, PARTS)
    p.add_argument('published', metavar='DIR',
                   help='a checkout of the published code, JeongHyunJin/Pix2PixCC')
    p.add_argument('--side_steps', type=counts, default=(2, 7), metavar='K1,K2',
                   help='training runs over K1 and K2 pairs (one step each)')
    p.add_argument('--side_images', type=counts, default=(1, 3), metavar='K1,K2',
                   help='Test runs over K1 and K2 inputs')
    p.add_argument('--side_repeats', type=int, default=2,
                   help='repetitions of each pair of runs (median reported)')
    p.add_argument('--published_copy', default=None, help=argparse.SUPPRESS)
    return common.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return common.child(args, {'data': child_data})
    parts = common.parts_of(args, PARTS)
    return common.record(args, lambda: side_by_side(args, parts))


if __name__ == '__main__':
    sys.exit(main())
