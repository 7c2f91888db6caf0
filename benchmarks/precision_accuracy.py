"""What mixed precision (--data_type 16: bfloat16 autocast on the CPU) costs in accuracy at
test time, on a trained model and real test inputs.

    python benchmarks/precision_accuracy.py --dataset_name EUV2Mag_sample --iteration 2560 \
        --input_dir_test datasets/Sample/Test/Input --target_dir_test datasets/Sample/Test/Target

Run from the folder you trained in. pix2pixCC_Test.py runs twice on the same generator and
inputs, float32 then --data_type 16, each in a scratch folder that links to the run's
checkpoint and options (nothing in ./checkpoints is written or moved). Printed, and written
with --json: between the two outputs, the RMSE and the largest absolute difference in the
target's units (with the float32 outputs' RMS for scale); against the targets, each
precision's mean CC at 1x1 and 8x8 and RMSE, and the change. Extra Test options (e.g.
--amp_dtype float16 on a GPU) go after `--`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TEST = os.path.join(REPO, 'pix2pixCC_Test.py')
SUMMARY_KEYS = ('cc_1x1', 'cc_8x8', 'rmse_1x1')


def test_run(args, precision, extra):
    """Test in a scratch folder whose run links to ./checkpoints/<name>; returns
    ({file: output array}, metrics summary)."""
    from pix2pixCC_Pipeline import READERS
    scratch = tempfile.mkdtemp(prefix=f'p2pcc-{precision}-')
    run = os.path.join(os.path.abspath('checkpoints'), args.dataset_name)
    linked = os.path.join(scratch, 'checkpoints', args.dataset_name)
    os.makedirs(os.path.join(linked, 'Model'))
    os.symlink(os.path.join(run, 'Model', f'{args.iteration}_G.pt'),
               os.path.join(linked, 'Model', f'{args.iteration}_G.pt'))
    if os.path.isfile(os.path.join(run, 'train_options.json')):
        os.symlink(os.path.join(run, 'train_options.json'),
                   os.path.join(linked, 'train_options.json'))
    command = [sys.executable, TEST, '--dataset_name', args.dataset_name,
               '--iteration', str(args.iteration),
               '--input_dir_test', os.path.abspath(args.input_dir_test),
               '--target_dir_test', os.path.abspath(args.target_dir_test),
               '--data_type', '16' if precision == 'mixed' else '32', *extra]
    proc = subprocess.run(command, cwd=scratch, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"Test ({precision}) failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    folder = os.path.join(linked, 'Image', 'Test', str(args.iteration))
    with open(os.path.join(folder, 'metrics_summary.json')) as f:
        summary = {key: value['mean'] for key, value in json.load(f).items()}
    outputs = {}
    for name in sorted(os.listdir(folder)):
        if '_AI.' in name:
            data_format = name.rsplit('.', 1)[1]
            outputs[name] = np.asarray(READERS[data_format](os.path.join(folder, name)),
                                       np.float32)
    return outputs, summary


def compare(full, mixed):
    """RMSE and largest |difference| between two {file: array} sets, and full's RMS."""
    a = np.concatenate([full[name].ravel() for name in full]).astype(np.float64)
    b = np.concatenate([mixed[name].ravel() for name in full]).astype(np.float64)
    return {'files': len(full), 'rmse': float(np.sqrt(np.mean((a - b) ** 2))),
            'max_abs_difference': float(np.abs(a - b).max()),
            'float32_rms': float(np.sqrt(np.mean(a ** 2)))}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dataset_name', required=True)
    p.add_argument('--iteration', type=int, required=True)
    p.add_argument('--input_dir_test', required=True)
    p.add_argument('--target_dir_test', required=True)
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)

    full, full_summary = test_run(args, 'float32', extra)
    mixed, mixed_summary = test_run(args, 'mixed', extra)
    result = {'outputs': compare(full, mixed),
              'float32': full_summary, 'mixed': mixed_summary,
              'change': {key: mixed_summary[key] - full_summary[key] for key in SUMMARY_KEYS},
              'extra_options': extra}
    out = result['outputs']
    print(f"{out['files']} outputs: RMSE between float32 and --data_type 16 {out['rmse']:.4g}, "
          f"largest |difference| {out['max_abs_difference']:.4g} (target units; float32 "
          f"outputs' RMS {out['float32_rms']:.4g})")
    for key in SUMMARY_KEYS:
        print(f"{key:<10} float32 {full_summary[key]:.4f}  --data_type 16 "
              f"{mixed_summary[key]:.4f}  change {result['change'][key]:+.4f}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
