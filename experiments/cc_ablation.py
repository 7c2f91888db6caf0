"""Does the Inspector help? pix2pixCC (--lambda_CC 5) against the pix2pixHD objective
(--lambda_CC 0), trained with the same seed and number of steps on the shipped sample.

    python experiments/cc_ablation.py [--n_epochs 150] [--no_readme]

Both runs use the quick start's network and scaling. Each trained generator translates the
sample's test split, and the metrics of pix2pixCC_Test.py (CC at 1x1 and 8x8, RMSE, flux) are
collected into a table, printed, saved as experiments/cc_ablation_results.json and written
into the README's "Results" section (between the results markers). Outputs of the runs go
to ./checkpoints/ablation_CC5 and ./checkpoints/ablation_CC0. About 10 minutes on 2 CPU cores.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join('datasets', 'Sample')
DATA = ['--data_format_input', 'fits', '--data_format_target', 'fits',
        '--logscale_input', 'True', '--saturation_lower_limit_input', '1',
        '--saturation_upper_limit_input', '200', '--saturation_lower_limit_target', '-3000',
        '--saturation_upper_limit_target', '3000']
NETWORK = ['--n_gf', '32', '--n_df', '32', '--n_downsample', '2', '--n_residual', '4',
           '--n_CC', '3']
MARKERS = ('<!-- cc_ablation:start -->', '<!-- cc_ablation:end -->')


def run(script, args):
    """Run a driver from the repository root; stop on failure."""
    command = [sys.executable, script, '--gpu_ids', '-1'] + args
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def train_and_evaluate(name, lambda_CC, n_epochs, seed):
    # The runs are this script's own: start them afresh (Train refuses to overwrite).
    shutil.rmtree(os.path.join(ROOT, 'checkpoints', name), ignore_errors=True)
    start = time.time()
    run('pix2pixCC_Train.py', ['--dataset_name', name, '--lambda_CC', str(lambda_CC),
                               '--input_dir_train', os.path.join(SAMPLE, 'Train', 'Input'),
                               '--target_dir_train', os.path.join(SAMPLE, 'Train', 'Target'),
                               '--n_epochs', str(n_epochs), '--seed', str(seed),
                               '--save_freq', '1000000', '--report_freq', '1000000',
                               '--display_freq', '1000000'] + DATA + NETWORK)
    train_seconds = time.time() - start
    steps = n_epochs * len(os.listdir(os.path.join(ROOT, SAMPLE, 'Train', 'Input')))
    run('pix2pixCC_Test.py', ['--dataset_name', name, '--iteration', str(steps),
                              '--input_dir_test', os.path.join(SAMPLE, 'Test', 'Input'),
                              '--target_dir_test', os.path.join(SAMPLE, 'Test', 'Target')])
    summary_path = os.path.join(ROOT, 'checkpoints', name, 'Image', 'Test', str(steps),
                                'metrics_summary.json')
    with open(summary_path) as f:
        summary = json.load(f)

    def mean(key):
        return summary[key]['mean']

    return {'objective': name, 'lambda_CC': lambda_CC, 'steps': steps,
            'train_seconds': round(train_seconds),
            'cc_1x1': mean('cc_1x1'), 'cc_8x8': mean('cc_8x8'), 'rmse_1x1': mean('rmse_1x1'),
            'unsigned_flux_ratio': mean('flux_unsigned_fake') / mean('flux_unsigned_real'),
            'net_flux_error': mean('flux_net_fake') - mean('flux_net_real')}


def table(results):
    lines = ['| objective | CC 1×1 | CC 8×8 | RMSE 1×1 (G) | unsigned flux generated/real | '
             'net flux error (G·px) | training time |',
             '|---|---|---|---|---|---|---|']
    names = {5.0: 'pix2pixCC (`--lambda_CC 5`)', 0.0: 'pix2pixHD objective (`--lambda_CC 0`)'}
    for r in results:
        lines.append(f"| {names.get(r['lambda_CC'], r['objective'])} | {r['cc_1x1']:.3f} | "
                     f"{r['cc_8x8']:.3f} | {r['rmse_1x1']:.1f} | {r['unsigned_flux_ratio']:.3f} | "
                     f"{r['net_flux_error']:.0f} | {r['train_seconds'] // 60} min "
                     f"{r['train_seconds'] % 60} s |")
    return '\n'.join(lines)


def write_into_readme(text):
    path = os.path.join(ROOT, 'README.md')
    with open(path) as f:
        readme = f.read()
    start, end = readme.index(MARKERS[0]) + len(MARKERS[0]), readme.index(MARKERS[1])
    with open(path, 'w') as f:
        f.write(readme[:start] + '\n' + text + '\n' + readme[end:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n_epochs', type=int, default=150)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--no_readme', action='store_true', help='do not edit README.md')
    args = parser.parse_args()

    results = [train_and_evaluate(f'ablation_CC{lam}', lam, args.n_epochs, args.seed)
               for lam in (5.0, 0.0)]
    import torch
    text = (table(results) + '\n\n' +
            f"{results[0]['steps']} steps (batch 1) on the 32 training pairs, seed {args.seed}, "
            f"generator `--n_gf 32 --n_downsample 2 --n_residual 4` (1.5 M parameters), "
            f"evaluated on the 8 test pairs (means over files); CPU, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}. Made by `python experiments/cc_ablation.py`.")
    print(text)
    with open(os.path.join(ROOT, 'experiments', 'cc_ablation_results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    if not args.no_readme:
        write_into_readme(text)


if __name__ == '__main__':
    main()
