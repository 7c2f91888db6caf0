"""The figures of BENCHMARKS.md "Sharing a model": the size of a model file in float32 and in
bfloat16 (--export_dtype 16) and how much the products move, then the size and the largest
error of tile-compressed FITS products (--compress, --quantize_step).

    python benchmarks/sharing_figures.py --dataset_name EUV2Mag_sample --iteration 2560 \\
        --input_dir_test datasets/Sample/Test/Input --target_dir_test datasets/Sample/Test/Target

run from the folder that holds checkpoints/<dataset_name>; it exports the generator of that
step (into checkpoints/<dataset_name>/Export/), runs the Test script into
checkpoints/<dataset_name>/Image/Sharing/<variant>/ and prints one JSON line per figure.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = os.path.join(REPO, 'pix2pixCC_Test.py')
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def test_script(*argv):
    """Run the Test script (on the CPU) with `argv`; stop with its error when it fails."""
    proc = subprocess.run([sys.executable, TEST, '--gpu_ids', '-1', *argv], text=True,
                          capture_output=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    return proc.stdout


def products(folder):
    """{file name: data} of the *_AI.fits files in `folder` (float64, as read by the
    pipeline, compressed or not)."""
    from pix2pixCC_Pipeline import read_array
    return {os.path.basename(path): read_array(path, 'fits', 1).astype(np.float64)
            for path in sorted(glob.glob(os.path.join(folder, '*_AI.fits')))}


def largest_difference(a, b):
    return max(float(np.nanmax(np.abs(a[name] - b[name]))) for name in a)


def sizes(folder):
    """(bytes of the *_AI.fits files in `folder`, bytes of their data parts alone: FITS
    files grow in blocks of 2880 bytes, which for small images hide what compression
    gives)."""
    from astropy.io import fits
    paths = sorted(glob.glob(os.path.join(folder, '*_AI.fits')))
    data = 0
    for path in paths:
        with fits.open(path) as hdul:
            data += hdul[-1].fileinfo()['datSpan']
    return sum(os.path.getsize(path) for path in paths), data


def cc(folder):
    with open(os.path.join(folder, 'metrics_summary.json')) as f:
        return json.load(f)['cc_1x1']['mean']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    for name in ('--dataset_name', '--input_dir_test', '--target_dir_test'):
        parser.add_argument(name, required=True)
    parser.add_argument('--iteration', type=int, required=True)
    parser.add_argument('--quantize_steps', type=float, nargs='+', default=[10, 1, 0.1],
                        help='steps of --quantize_step, in the target unit')
    args = parser.parse_args(argv)
    data = ['--input_dir_test', args.input_dir_test, '--target_dir_test', args.target_dir_test]
    export = os.path.join('checkpoints', args.dataset_name, 'Export',
                          f'{args.dataset_name}_{args.iteration}')
    out = os.path.join('checkpoints', args.dataset_name, 'Image', 'Sharing')
    run = ['--dataset_name', args.dataset_name, '--iteration', str(args.iteration)]

    # The model file, float32 and bfloat16
    for dtype in ('32', '16'):
        test_script(*run, '--export', 'model', '--export_dtype', dtype, '--overwrite')
    outputs = {}
    for name, model in (('float32', f'{export}.pt'), ('bfloat16', f'{export}_bf16.pt')):
        test_script('--model', model, *data, '--output_dir', os.path.join(out, name),
                    '--overwrite')
        outputs[name] = products(os.path.join(out, name))
    values = np.concatenate([array.ravel() for array in outputs['float32'].values()])
    print(json.dumps({
        'figure': 'model file', 'float32_bytes': os.path.getsize(f'{export}.pt'),
        'bfloat16_bytes': os.path.getsize(f'{export}_bf16.pt'),
        'largest_change': largest_difference(outputs['bfloat16'], outputs['float32']),
        'output_range': [float(values.min()), float(values.max())],
        'cc_1x1_float32': cc(os.path.join(out, 'float32')),
        'cc_1x1_bfloat16': cc(os.path.join(out, 'bfloat16'))}))

    # Compressed products
    plain = os.path.join(out, 'float32')
    for step in [None, *args.quantize_steps]:
        name = 'lossless' if step is None else f'step_{step:g}'
        quantize = [] if step is None else ['--quantize_step', str(step)]
        folder = os.path.join(out, name)
        test_script(*run, *data, '--output_dir', folder, '--compress', *quantize,
                    '--overwrite')
        (total, stored), (plain_total, plain_stored) = sizes(folder), sizes(plain)
        print(json.dumps({
            'figure': 'compressed products', 'quantize_step': step,
            'files': len(outputs['float32']), 'bytes': total, 'data_bytes': stored,
            'plain_bytes': plain_total, 'plain_data_bytes': plain_stored,
            'largest_error': largest_difference(products(folder), outputs['float32'])}))


if __name__ == '__main__':
    main()
