"""Does the Inspector help? pix2pixCC (--lambda_CC 5) against the pix2pixHD objective
(--lambda_CC 0), each trained with the same N seeds and number of steps on the shipped sample.

    python experiments/cc_ablation.py [--seeds 5] [--first_seed 1] [--n_epochs 150]
                                      [--workdir .] [--out experiments] [--no_readme]
    python experiments/cc_ablation.py --quick --workdir /tmp/x --out /tmp/x   (a smoke test)

Every run uses the quick start's network and scaling (--quick: the test suite's tiny
network, one epoch, two seeds; README.md untouched unless --readme names a file). Each trained
generator translates the sample's test split, and the metrics of pix2pixCC_Test.py (CC at
1x1 and 8x8, RMSE, flux) are collected per seed. The script reports, per objective, mean +-
std over seeds; per seed, the difference (lambda_CC 5 minus lambda_CC 0); and per metric a
paired t-test and an exact Wilcoxon signed-rank test over seeds with the mean difference's
95% t-interval. Everything is saved as <out>/cc_ablation_results.json and, unless
--no_readme, written into the README's "Results" section (between the results markers).
Runs go to <workdir>/checkpoints/ablation_<objective>_seed<N>.
About 8 minutes per seed (two runs of 4800 steps) on 2 CPU cores.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The benchmarks' description of the machine (benchmarks/common.py).
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
from common import machine  # noqa: E402

# Absolute, because the drivers run in --workdir, which need not be the repository.
SAMPLE = os.path.join(ROOT, 'datasets', 'Sample')
DATA = ['--data_format_input', 'fits', '--data_format_target', 'fits',
        '--logscale_input', 'True', '--saturation_lower_limit_input', '1',
        '--saturation_upper_limit_input', '200', '--saturation_lower_limit_target', '-3000',
        '--saturation_upper_limit_target', '3000']
NETWORK = ['--n_gf', '32', '--n_df', '32', '--n_downsample', '2', '--n_residual', '4',
           '--n_CC', '3']
# --quick: the test suite's tiny network, one epoch, two seeds: seconds per run.
QUICK_NETWORK = ['--n_gf', '8', '--n_df', '8', '--n_downsample', '2', '--n_residual', '1',
                 '--n_CC', '3']
MARKERS = ('<!-- cc_ablation:start -->', '<!-- cc_ablation:end -->')
MACHINE = ('cpu', 'cpu_count', 'torch_threads', 'torch', 'python')  # what the results record
ALPHA = 0.05

# (lambda_CC, key in the results, name in the tables); differences are first minus second.
OBJECTIVES = ((5.0, 'pix2pixCC', 'pix2pixCC (`--lambda_CC 5`)'),
              (0.0, 'pix2pixHD_objective', 'pix2pixHD objective (`--lambda_CC 0`)'))
# (key, name, format, ideal value): the ideal is what a perfect generator would score, so
# "closer to the ideal" is one rule for every metric (CC -> 1, RMSE -> 0, flux ratio -> 1).
METRICS = (('cc_1x1', 'CC 1×1', '.3f', 1.0),
           ('cc_8x8', 'CC 8×8', '.3f', 1.0),
           ('rmse_1x1', 'RMSE 1×1 (G)', '.1f', 0.0),
           ('unsigned_flux_ratio', 'unsigned flux generated/real', '.3f', 1.0),
           ('net_flux_error', 'net flux error (G·px)', '.0f', 0.0))


# ----------------------------------------------------------------------------------------
# Running the drivers
# ----------------------------------------------------------------------------------------

def run(script, args, workdir):
    """Run a driver in `workdir` and return its standard output; on failure stop with the
    tail of its output."""
    command = [sys.executable, os.path.join(ROOT, script), '--gpu_ids', '-1'] + args
    proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{script} failed (exit {proc.returncode}): {shlex.join(command)}\n"
                 f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def timed(function, *args):
    """(what function(*args) returns, its wall time in seconds)."""
    start = time.perf_counter()
    result = function(*args)
    return result, round(time.perf_counter() - start, 1)


def n_train_pairs():
    return len(os.listdir(os.path.join(SAMPLE, 'Train', 'Input')))


RUN_RECORD = 'ablation_run.json'  # a finished run's row, in its checkpoints folder


def run_name(objective, seed):
    """The --dataset_name of one run: its folder is <workdir>/checkpoints/<name>."""
    return f'ablation_{objective}_seed{seed}'


def reused_run(lambda_CC, objective, seed, n_epochs, workdir):
    """The row of a run an earlier, interrupted ablation finished with these settings, or
    None."""
    path = os.path.join(workdir, 'checkpoints', run_name(objective, seed), RUN_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        row = json.load(f)
    same = (row['lambda_CC'], row['seed'], row['steps']) == \
        (lambda_CC, seed, n_epochs * n_train_pairs())
    return row if same else None


def train_and_evaluate(lambda_CC, objective, seed, n_epochs, network, workdir):
    """One run: train, translate the test split, return its row of metrics and times (also
    written into the run's folder, for --reuse)."""
    name = run_name(objective, seed)
    folder = os.path.join(workdir, 'checkpoints', name)
    # The runs are this script's own: start them afresh (Train refuses to overwrite).
    shutil.rmtree(folder, ignore_errors=True)
    train_output, train_seconds = timed(run, 'pix2pixCC_Train.py', [
        '--dataset_name', name, '--lambda_CC', str(lambda_CC),
        '--input_dir_train', os.path.join(SAMPLE, 'Train', 'Input'),
        '--target_dir_train', os.path.join(SAMPLE, 'Train', 'Target'),
        '--n_epochs', str(n_epochs), '--seed', str(seed), '--save_freq', '1000000',
        '--report_freq', '1000000', '--display_freq', '1000000'] + DATA + network, workdir)
    steps = n_epochs * n_train_pairs()  # batch 1: the final checkpoint's step
    _, test_seconds = timed(run, 'pix2pixCC_Test.py', [
        '--dataset_name', name, '--iteration', str(steps),
        '--input_dir_test', os.path.join(SAMPLE, 'Test', 'Input'),
        '--target_dir_test', os.path.join(SAMPLE, 'Test', 'Target')], workdir)
    summary_path = os.path.join(folder, 'Image', 'Test', str(steps), 'metrics_summary.json')
    with open(summary_path) as f:
        summary = json.load(f)

    def mean(key):
        return summary[key]['mean']

    # Train's start-up summary names the sizes: "network: generator 1,234 parameters, ..."
    match = re.search(r'generator ([\d,]+) parameters', train_output)
    row = {'objective': objective, 'lambda_CC': lambda_CC, 'seed': seed, 'steps': steps,
           'generator_parameters': int(match.group(1).replace(',', '')) if match else None,
           'train_seconds': train_seconds, 'test_seconds': test_seconds,
           'cc_1x1': mean('cc_1x1'), 'cc_8x8': mean('cc_8x8'), 'rmse_1x1': mean('rmse_1x1'),
           'unsigned_flux_ratio': mean('flux_unsigned_fake') / mean('flux_unsigned_real'),
           'net_flux_error': mean('flux_net_fake') - mean('flux_net_real')}
    with open(os.path.join(folder, RUN_RECORD), 'w') as f:
        json.dump(json_safe(row), f, indent=2)
    return row


# ----------------------------------------------------------------------------------------
# Statistics over seeds
# ----------------------------------------------------------------------------------------

def finite_or_none(value):
    """JSON has no NaN: an undefined statistic (e.g. a t-test of identical runs) is None."""
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(value):
    """`value` with every NaN or infinity (a metric of a collapsed run) as None: a strict
    JSON file, written even when one run of many went wrong."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return finite_or_none(value) if isinstance(value, float) else value


def rows_of(runs, objective):
    """The runs of one objective, ordered by seed."""
    return sorted((r for r in runs if r['objective'] == objective), key=lambda r: r['seed'])


def values(runs, objective, key):
    return np.array([r[key] for r in rows_of(runs, objective)], dtype=np.float64)


def mean_std(x):
    return {'mean': float(np.mean(x)), 'std': finite_or_none(np.std(x, ddof=1))}


def summarize(runs):
    """{objective: {metric: {mean, std}} + mean times}: std over seeds, ddof=1."""
    return {objective: {**{key: mean_std(values(runs, objective, key))
                           for key, *_ in METRICS},
                        'train_seconds': float(np.mean(values(runs, objective,
                                                              'train_seconds')))}
            for _, objective, _ in OBJECTIVES}


def differences(runs):
    """Per seed, each metric of the first objective minus that of the second."""
    (_, first, _), (_, second, _) = OBJECTIVES
    pairs = zip(rows_of(runs, first), rows_of(runs, second), strict=True)
    return [{'seed': a['seed'], **{key: a[key] - b[key] for key, *_ in METRICS}}
            for a, b in pairs]


def paired_test(a, b, ideal):
    """Paired comparison of a and b (same seeds): mean difference a - b with its std and 95%
    t-interval, the paired t-test's and the exact Wilcoxon signed-rank test's two-sided p,
    and in how many seeds a is the closer to `ideal`."""
    d = a - b
    n = len(d)
    half_width = stats.t.ppf(1 - ALPHA / 2, n - 1) * np.std(d, ddof=1) / math.sqrt(n)
    # Wilcoxon leaves out zero differences; with none left there is nothing to test.
    wilcoxon_p = stats.wilcoxon(a, b, method='exact').pvalue if np.any(d != 0) else math.nan
    return {'mean_difference': float(np.mean(d)),
            'std_difference': finite_or_none(np.std(d, ddof=1)),
            'ci95': [finite_or_none(np.mean(d) - half_width),
                     finite_or_none(np.mean(d) + half_width)],
            'ttest_rel_p': finite_or_none(stats.ttest_rel(a, b).pvalue),
            'wilcoxon_p': finite_or_none(wilcoxon_p),
            'n_closer_to_ideal': int(np.sum(np.abs(a - ideal) < np.abs(b - ideal))),
            'n': n}


def paired_tests(runs):
    (_, first, _), (_, second, _) = OBJECTIVES
    return {key: paired_test(values(runs, first, key), values(runs, second, key), ideal)
            for key, _, _, ideal in METRICS}


def smallest_wilcoxon_p(n):
    """Smallest two-sided p of the exact signed-rank test with n pairs: every sign alike."""
    return 2 / 2 ** n


# ----------------------------------------------------------------------------------------
# Text: tables, and a paragraph that follows from the numbers
# ----------------------------------------------------------------------------------------

def number(value, fmt):
    return 'n/a' if value is None else format(value, fmt)


def signed(value, fmt):
    return 'n/a' if value is None else format(value, '+' + fmt)


def p_value(p):
    return 'n/a' if p is None else f'{p:.3g}'  # 3 figures: the Wilcoxon floor 0.0625 in full


def listing(names):
    """['a', 'b', 'c'] -> 'a, b and c'."""
    return ' and '.join(filter(None, (', '.join(names[:-1]), names[-1])))


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes} min' if hours else f'{minutes} min {seconds} s'


def parameter_count(count):
    return 'n/a' if count is None else f'{count / 1e6:.2f} M parameters'


def summary_table(summary):
    lines = ['| objective | ' + ' | '.join(name for _, name, *_ in METRICS) +
             ' | training time per run |',
             '|---' * (len(METRICS) + 2) + '|']
    for _, objective, label in OBJECTIVES:
        cells = [f"{number(summary[objective][key]['mean'], fmt)} ± "
                 f"{number(summary[objective][key]['std'], fmt)}" for key, _, fmt, _ in METRICS]
        lines.append(f"| {label} | {' | '.join(cells)} | "
                     f"{duration(summary[objective]['train_seconds'])} |")
    return '\n'.join(lines)


def differences_table(diffs):
    lines = ['| seed | ' + ' | '.join(f'Δ {name}' for _, name, *_ in METRICS) + ' |',
             '|---' * (len(METRICS) + 1) + '|']
    for row in diffs:
        lines.append(f"| {row['seed']} | " +
                     ' | '.join(signed(row[key], fmt) for key, _, fmt, _ in METRICS) + ' |')
    return '\n'.join(lines)


def tests_table(summary, tests):
    spreads = {key: max(summary[objective][key]['std'] or 0.0 for _, objective, _ in OBJECTIVES)
               for key, *_ in METRICS}  # the larger seed-to-seed std of the two objectives
    lines = ['| metric | mean Δ ± std | 95% t-interval of mean Δ | paired t-test p | '
             'Wilcoxon exact p | λ_CC 5 closer to ideal | the paired t-test says |',
             '|---' * 7 + '|']
    for key, name, fmt, ideal in METRICS:
        t = tests[key]
        low, high = t['ci95']
        lines.append(f"| {name} | {signed(t['mean_difference'], fmt)} ± "
                     f"{number(t['std_difference'], fmt)} | [{signed(low, fmt)}, "
                     f"{signed(high, fmt)}] | {p_value(t['ttest_rel_p'])} | "
                     f"{p_value(t['wilcoxon_p'])} | {t['n_closer_to_ideal']} of {t['n']} "
                     f"seeds (ideal {ideal:g}) | {verdict(t, spreads[key], fmt)} |")
    return '\n'.join(lines)


def verdict(test, spread, fmt):
    """One metric's paired t-test in words. A difference that is "significant" but smaller
    than `spread` (seed-to-seed std) is small next to what a change of seed does."""
    p = test['ttest_rel_p']
    if p is None:
        return 'no t-test possible (the differences have no spread, or a value is undefined)'
    if p >= ALPHA:
        return f"not distinguishable from seed noise with {test['n']} seeds"
    size = 'larger' if abs(test['mean_difference']) > spread else 'smaller'
    meaning = '' if size == 'larger' else ': a consistent but small shift'
    return f"different from zero at the 5% level, {size} than the seed-to-seed spread " \
           f"(std up to {number(spread, fmt)}){meaning}"


def conclusion(tests, config):
    """What the tests show together, and what they cannot show."""
    n_seeds = len(config['seeds'])
    significant = [name for key, name, *_ in METRICS
                   if tests[key]['ttest_rel_p'] is not None and tests[key]['ttest_rel_p'] < ALPHA]
    others = ', and on no other metric' if len(significant) < len(METRICS) else ''
    overall = (f"At {n_seeds} seeds the paired t-test separates the objectives on "
               f"{listing(significant)}{others}." if significant else
               f"At {n_seeds} seeds no metric separates the two objectives by the paired "
               f"t-test: on this sample the Inspector's effect is not distinguishable from the "
               f"variation between seeds.")
    floor = smallest_wilcoxon_p(n_seeds)
    wilcoxon = (f"With {n_seeds} seeds the exact Wilcoxon signed-rank test cannot go below "
                f"p = {floor:.4g} (two-sided, every seed's difference of the same sign)"
                + (", so it cannot reach 5% here; it is shown as a check on the t-test, which "
                   "assumes roughly normal differences." if floor >= ALPHA else "."))
    caveat = (f"The {len(METRICS)} metrics are tested without correction for multiple "
              f"comparisons, and this is one small toy sample ({config['n_train_pairs']} "
              f"training and {config['n_test_pairs']} test pairs) with one network size and "
              f"step count: it shows nothing about full-size data or longer training.")
    return ' '.join((overall, wilcoxon, caveat))


def report(results):
    """The Markdown written into the README (and printed) from a results dict."""
    config, summary, tests = results['config'], results['summary'], results['paired_tests']
    m = results['machine']
    seeds = config['seeds']
    return '\n\n'.join((
        f"Mean ± standard deviation over {len(seeds)} seeds (seeds {seeds[0]}..{seeds[-1]}, "
        f"the same for both objectives):",
        summary_table(summary),
        "Per seed, λ_CC 5 minus λ_CC 0 (positive: higher with the Inspector):",
        differences_table(results['differences']),
        "Paired over seeds (Δ: λ_CC 5 minus λ_CC 0):",
        tests_table(summary, tests),
        conclusion(tests, config),
        f"Each run: {config['steps']} steps (batch 1) on the {config['n_train_pairs']} training "
        f"pairs, network `{' '.join(config['network'])}` (generator "
        f"{parameter_count(config['generator_parameters'])}), evaluated on the "
        f"{config['n_test_pairs']} test pairs (means over files). {len(results['runs'])} runs "
        f"in {duration(results['total_seconds'])} in all, on {m['cpu']} ({m['cpu_count']} "
        f"CPUs, {m['torch_threads']} torch threads), torch {m['torch']}. Made by "
        f"`{config['command']}`."))


def replace_between_markers(document, text):
    """`document` with what lies between the results markers replaced by `text`."""
    start = document.index(MARKERS[0]) + len(MARKERS[0])
    end = document.index(MARKERS[1])
    return document[:start] + '\n' + text + '\n' + document[end:]


def write_into_readme(path, text):
    with open(path) as f:
        document = f.read()
    with open(path, 'w') as f:
        f.write(replace_between_markers(document, text))


# ----------------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=None,
                        help='seeds per objective, at least 2 (default 5; 2 with --quick)')
    parser.add_argument('--first_seed', type=int, default=1,
                        help='seeds first_seed .. first_seed + seeds - 1, for both objectives')
    parser.add_argument('--n_epochs', type=int, default=None,
                        help='epochs per run, one step per training pair (default 150, as the '
                             'quick start; 1 with --quick)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: 2 seeds, 1 epoch, the tests\' tiny network; '
                             'README.md untouched unless --readme is given')
    parser.add_argument('--workdir', default=ROOT,
                        help='folder the runs are made in: <workdir>/checkpoints/ablation_* '
                             '(default: the repository)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'experiments'),
                        help='folder for cc_ablation_results.json (default: experiments/)')
    parser.add_argument('--readme', default=None,
                        help='Markdown file whose results markers receive the tables '
                             '(default: the repository README.md, none with --quick)')
    parser.add_argument('--no_readme', action='store_true', help='edit no README')
    parser.add_argument('--reuse', action='store_true',
                        help='read the runs an interrupted ablation finished (their '
                             f'{RUN_RECORD} in the workdir) instead of training them again')
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    if args.n_epochs is None:
        args.n_epochs = 1 if args.quick else 150
    if args.seeds < 2:
        parser.error('--seeds must be at least 2: a spread and a paired test need two')
    if args.no_readme:
        args.readme = None
    elif args.readme is None and not args.quick:
        args.readme = os.path.join(ROOT, 'README.md')
    args.workdir, args.out = os.path.abspath(args.workdir), os.path.abspath(args.out)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    network = QUICK_NETWORK if args.quick else NETWORK
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    # Seed by seed, both objectives in turn: a slow spell of a shared machine then falls on
    # both sides of a pair rather than on one objective.
    runs = []
    for seed in seeds:
        for lambda_CC, objective, _ in OBJECTIVES:
            row = reused_run(lambda_CC, objective, seed, args.n_epochs, args.workdir) \
                if args.reuse else None
            runs.append(row or train_and_evaluate(lambda_CC, objective, seed, args.n_epochs,
                                                  network, args.workdir))
            print(f"seed {seed}, lambda_CC {lambda_CC:g}: " + ', '.join(
                f"{key} {runs[-1][key]:.4g}" for key, *_ in METRICS), flush=True)
    info = machine()  # torch's version and threads are the drivers' too (same environment)
    results = {
        'config': {'seeds': seeds, 'n_epochs': args.n_epochs, 'steps': runs[0]['steps'],
                   'network': network, 'quick': args.quick,
                   'generator_parameters': runs[0]['generator_parameters'],
                   'n_train_pairs': n_train_pairs(),
                   'n_test_pairs': len(os.listdir(os.path.join(SAMPLE, 'Test', 'Input'))),
                   'command': shlex.join(['python', 'experiments/cc_ablation.py'] + argv)},
        'machine': {key: info[key] for key in MACHINE},
        # the runs' own times (with --reuse, some were made by an earlier invocation)
        'total_seconds': round(sum(r['train_seconds'] + r['test_seconds'] for r in runs), 1),
        'wall_seconds': round(time.perf_counter() - start, 1),
        'runs': runs,
        'summary': summarize(runs),
        'differences': differences(runs),
        'paired_tests': paired_tests(runs)}
    text = report(results)
    results['text'] = text
    print(text)
    with open(os.path.join(args.out, 'cc_ablation_results.json'), 'w') as f:
        json.dump(json_safe(results), f, indent=2, allow_nan=False)
    if args.readme:
        write_into_readme(args.readme, text)


if __name__ == '__main__':
    main()
