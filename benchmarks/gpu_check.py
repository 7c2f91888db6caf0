"""One-command check of the GPU path: does every precision and placement train, test and
resume on this machine, with finite outputs close to float32's; then the 1024x1024 benchmark.

    python benchmarks/gpu_check.py                    # on a CUDA machine: everything
    python benchmarks/gpu_check.py --skip_benchmark   # the checks only (a minute or two)
    python benchmarks/gpu_check.py --device cpu       # what exists on a CPU (to test this
                                                      # script itself): float32, bfloat16,
                                                      # compile, resume

Without CUDA (and without `--device cpu`) it says so and exits 0 at once. Every check runs
the real scripts (`pix2pixCC_Train.py`, `pix2pixCC_Test.py`) as a user would, on small
synthetic npy pairs and a small network, in a scratch folder:

    float32          train, test (channels-last and the cuDNN autotuner, as always on CUDA)
    float16          --data_type 16 --amp_dtype float16 (GradScaler), CUDA only
    bfloat16         --data_type 16 --amp_dtype bfloat16, where the device supports it
    compile          --compile
    DataParallel     --gpu_ids 0,1, when two GPUs are visible
    torchrun NCCL    two processes, when two GPUs are visible
    float32 again    float32 trained again from the same seed (run-to-run difference)
    resume           float32 run stopped half-way and resumed with --latest_iter -1

Each must exit 0 and write finite outputs; the float32 model run under mixed precision at
test time must stay close to its float32 outputs (relative RMS difference below 5%), and the
resumed run must end as close to the uninterrupted one as a second uninterrupted run does
(GPU training is not bit-reproducible: within twice the run-to-run difference, or 5%). The
table is printed and every figure written as JSON (--json). The benchmark is
`benchmarks/benchmark.py` at 1024x1024 (float32 against mixed precision: step time, peak GPU
memory, the data pipeline's time per pair).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, TEST = (os.path.join(REPO, f'pix2pixCC_{name}.py') for name in ('Train', 'Test'))
NETWORK = ['--n_gf', '16', '--n_df', '16', '--n_downsample', '2', '--n_residual', '2']
DATA = ['--data_format_input', 'npy', '--data_format_target', 'npy',
        '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '1',
        '--saturation_lower_limit_target', '-1', '--saturation_upper_limit_target', '1']
CLOSE = 0.05  # relative RMS difference allowed between mixed-precision and float32 outputs


def write_pairs(folder, n, size, seed=0):
    """n smooth input maps in [0, 1] and targets that depend on them (sign-changing)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for role in ('Input', 'Target'):
        os.makedirs(os.path.join(folder, role), exist_ok=True)
    for i in range(n):
        a, b, p = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
        x = 0.5 + 0.5 * np.sin(2 * np.pi * a * xx + p) * np.cos(2 * np.pi * b * yy)
        y = np.tanh(3 * (x - 0.5)) * np.cos(2 * np.pi * yy)
        np.save(os.path.join(folder, 'Input', f'p{i:03d}.npy'), x.astype(np.float32))
        np.save(os.path.join(folder, 'Target', f'p{i:03d}.npy'), y.astype(np.float32))


def run(command, cwd, timeout=600):
    started = time.time()
    proc = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time() - started


def outputs(folder):
    """The generated arrays of one Test iteration folder, by file name."""
    return {name: np.load(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith('_AI.npy')}


def relative_rms(a, b):
    a = np.concatenate([v.ravel() for v in a.values()])
    b = np.concatenate([v.ravel() for v in b.values()])
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-12))


class Checks:
    """Runs the checks in `root`; each adds a row {check, ok, seconds, detail}."""

    def __init__(self, root, gpu_ids, n_pairs, size, epochs):
        self.root, self.gpu_ids = root, gpu_ids
        self.data = os.path.join(root, 'data')
        write_pairs(self.data, n_pairs, size)
        self.n_pairs, self.epochs = n_pairs, epochs
        self.final_step = n_pairs * epochs
        self.rows = []
        self.reference = None  # float32 outputs
        self.rerun_difference = None  # float32 trained again from the same seed

    def train_args(self, name, *extra):
        return ['--dataset_name', name, '--gpu_ids', self.gpu_ids, *NETWORK, *DATA,
                '--input_dir_train', os.path.join(self.data, 'Input'),
                '--target_dir_train', os.path.join(self.data, 'Target'),
                '--n_epochs', str(self.epochs), '--seed', '1', '--n_workers', '1',
                '--save_freq', str(self.final_step // 2), '--report_freq', str(self.n_pairs),
                '--display_freq', str(self.final_step), *extra]

    def test(self, name, *extra, folder=None):
        """Test run `name`'s final generator into `folder` (default: the run's Image/Test/
        <step>/); returns (process, seconds, outputs)."""
        folder = folder or os.path.join(self.root, 'checkpoints', name, 'Image', 'Test',
                                        str(self.final_step))
        proc, seconds = run([sys.executable, TEST, '--dataset_name', name,
                             '--gpu_ids', self.gpu_ids, '--iteration', self.final_step,
                             '--input_dir_test', os.path.join(self.data, 'Input'),
                             '--target_dir_test', os.path.join(self.data, 'Target'),
                             '--output_dir', folder, *extra], self.root)
        return proc, seconds, (outputs(folder) if proc.returncode == 0 else {})

    def add(self, check, ok, seconds, detail):
        """ok: True, False, or None for a check this machine cannot have."""
        self.rows.append(dict(check=check, ok=None if ok is None else bool(ok),
                              seconds=round(seconds, 1), detail=detail))
        status = {True: 'ok  ', False: 'FAIL', None: 'skip'}[None if ok is None else bool(ok)]
        print(f"{status} {check:<16} {seconds:7.1f} s  {detail}", flush=True)

    def failed(self, check, proc, seconds):
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        self.add(check, False, seconds, f"exit {proc.returncode}: "
                 f"{lines[-1] if lines else 'no output'}")

    def train_and_test(self, check, train_extra=(), command=(sys.executable,)):
        """Train and test one configuration; returns its outputs (None when it failed)."""
        name = check.replace(' ', '_')
        proc, seconds = run([*command, TRAIN, *self.train_args(name, *train_extra)],
                            self.root)
        if proc.returncode != 0:
            return self.failed(check, proc, seconds)
        test, test_seconds, generated = self.test(name)
        if test.returncode != 0:
            return self.failed(check, test, seconds + test_seconds)
        finite = all(np.isfinite(v).all() for v in generated.values())
        detail = f"{len(generated)} outputs, {'finite' if finite else 'NOT FINITE'}"
        self.add(check, finite and generated, seconds + test_seconds, detail)
        return generated

    def mixed_inference(self, check, amp_dtype):
        """The float32 model tested under autocast: outputs close to its float32 ones."""
        # A folder of its own: the float32 outputs' folder refuses other precisions' outputs.
        proc, seconds, generated = self.test(
            'float32', '--data_type', '16', '--amp_dtype', amp_dtype,
            folder=os.path.join(self.root, f'float32-test-{amp_dtype}'))
        if proc.returncode != 0:
            return self.failed(check, proc, seconds)
        difference = relative_rms(generated, self.reference)
        finite = all(np.isfinite(v).all() for v in generated.values())
        self.add(check, finite and difference < CLOSE, seconds,
                 f"relative RMS difference from float32 {difference:.4f} (< {CLOSE})")

    def rerun(self):
        """float32 trained again from the same seed: how far two identical runs end apart on
        this device (0 on the CPU; on GPUs cuDNN's algorithm choice and the atomics of some
        backward kernels, e.g. replication padding's, make runs differ, and a GAN amplifies
        that over the steps). The resume check is judged against it."""
        check = 'float32 again'
        again = self.train_and_test(check)
        if again is None:
            return
        self.rerun_difference = relative_rms(again, self.reference)
        self.rows[-1]['detail'] += (f"; relative RMS difference from the first float32 run "
                                    f"{self.rerun_difference:.2e}")
        print(f"     {'':<16}           run-to-run difference {self.rerun_difference:.2e}")

    def resume(self):
        check = 'resume'
        half = self.epochs // 2
        proc, seconds = run([sys.executable, TRAIN,
                             *self.train_args(check, '--n_epochs', str(half))], self.root)
        if proc.returncode == 0:
            proc, more = run([sys.executable, TRAIN, '--dataset_name', check, '--gpu_ids',
                              self.gpu_ids, '--latest_iter', '-1', '--n_epochs',
                              str(self.epochs)], self.root)
            seconds += more
        if proc.returncode != 0:
            return self.failed(check, proc, seconds)
        test, test_seconds, generated = self.test(check)
        if test.returncode != 0:
            return self.failed(check, test, seconds + test_seconds)
        # Bit-identical on the CPU. On GPUs two uninterrupted runs already differ (see
        # rerun): a resumed run must be no further from the uninterrupted one than that.
        difference = relative_rms(generated, self.reference)
        limit = max(CLOSE, 2 * (self.rerun_difference or 0))
        self.add(check, difference < limit, seconds + test_seconds,
                 f"relative RMS difference from the uninterrupted run {difference:.2e} "
                 f"(< {limit:.2e}: the larger of {CLOSE} and twice the run-to-run difference)")


def benchmark(args, root):
    """benchmarks/benchmark.py at --size: float32 against mixed precision."""
    out = os.path.join(root, 'benchmark.json')
    command = [sys.executable, os.path.join(REPO, 'benchmarks', 'benchmark.py'),
               '--gpu_ids', args.gpu, '--what', 'train,data,inference', '--size', args.size,
               '--train_variants', 'driver,driver+bf16', '--inference_variants', 'ours',
               '--data_variants', 'ours,loader', '--inference_size', args.size,
               '--data_size', args.size, '--json', out]
    proc, seconds = run(command, REPO, timeout=900)
    print(proc.stdout[-4000:])
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return {'ok': False, 'seconds': seconds}
    with open(out) as f:
        return {'ok': True, 'seconds': seconds, 'results': json.load(f)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    p.add_argument('--gpu', default='0', help='the GPU to check (CUDA index)')
    p.add_argument('--size', type=int, default=1024, help='benchmark image size')
    p.add_argument('--skip_benchmark', action='store_true')
    p.add_argument('--skip', default='', help='comma-separated checks to leave out')
    p.add_argument('--json', default='gpu_check.json', help='where the results go')
    args = p.parse_args(argv)

    import torch
    cuda = args.device == 'cuda'
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: nothing to check on this machine (a CPU run of the checks: "
              "--device cpu)")
        return 0
    n_gpus = torch.cuda.device_count() if cuda else 0
    device_name = torch.cuda.get_device_name(int(args.gpu)) if cuda else 'CPU'
    print(f"checking on {device_name}; torch {torch.__version__}", flush=True)
    skip = set(filter(None, args.skip.split(',')))
    bf16 = torch.cuda.is_bf16_supported() if cuda else True

    root = tempfile.mkdtemp(prefix='pix2pixCC_gpu_check_')
    started = time.time()
    try:
        checks = Checks(root, args.gpu if cuda else '-1', n_pairs=8, size=64, epochs=4)
        checks.reference = checks.train_and_test('float32')
        if checks.reference is None:
            print('float32 failed: the other checks compare with it; stopping')
        else:
            plan = [('float16', cuda, lambda: checks.train_and_test(
                        'float16', ['--data_type', '16', '--amp_dtype', 'float16'])),
                    ('float16 test', cuda, lambda: checks.mixed_inference('float16 test',
                                                                          'float16')),
                    ('bfloat16', bf16, lambda: checks.train_and_test(
                        'bfloat16', ['--data_type', '16', '--amp_dtype', 'bfloat16'])),
                    ('bfloat16 test', bf16, lambda: checks.mixed_inference('bfloat16 test',
                                                                           'bfloat16')),
                    ('compile', True, lambda: checks.train_and_test('compile', ['--compile'])),
                    ('DataParallel', n_gpus >= 2, lambda: checks.train_and_test(
                        'DataParallel', ['--gpu_ids', '0,1', '--batch_size', '2'])),
                    ('torchrun NCCL', n_gpus >= 2, lambda: checks.train_and_test(
                        'torchrun NCCL', ['--gpu_ids', '0'],
                        command=(sys.executable, '-m', 'torch.distributed.run',
                                 '--standalone', '--nproc_per_node=2'))),
                    ('float32 again', True, checks.rerun),
                    ('resume', True, checks.resume)]
            for name, possible, check in plan:
                if name in skip:
                    continue
                if not possible:
                    checks.add(name, None, 0, 'not possible on this machine')
                    continue
                check()
        results = {'device': device_name, 'torch': torch.__version__, 'checks': checks.rows}
        if cuda and not args.skip_benchmark:
            results['benchmark'] = benchmark(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results['seconds'] = round(time.time() - started, 1)
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=2)
    failed = [row['check'] for row in results['checks'] if row['ok'] is False]
    passed = [row['check'] for row in results['checks'] if row['ok']]
    print(f"{len(passed)} checks passed, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}; "
          f"{results['seconds']} s; results in {args.json}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
