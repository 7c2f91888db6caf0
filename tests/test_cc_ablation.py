"""experiments/cc_ablation.py, which writes README "Results": its command line, the seeds,
the statistics (one --quick run, 2 seeds x 2 objectives, checked against numpy and scipy
recomputed from its own per-seed rows) and the wording of its text (checked on hand-made
numbers whose answer is known).
"""
import json
import os

import numpy as np
import pytest
from scipy import stats

from conftest import REPO, assert_ok, load_script, run_script, snapshot

SCRIPT = os.path.join(REPO, 'experiments', 'cc_ablation.py')
README = os.path.join(REPO, 'README.md')
METRIC_KEYS = ('cc_1x1', 'cc_8x8', 'rmse_1x1', 'unsigned_flux_ratio', 'net_flux_error')
OBJECTIVES = ('pix2pixCC', 'pix2pixHD_objective')


ablation_script = load_script('experiments/cc_ablation.py')


def file_state(path):
    with open(path, 'rb') as f:
        return f.read(), os.stat(path).st_mtime_ns


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """(process, results, README and experiments/ before the run) of one --quick run."""
    root = tmp_path_factory.mktemp('ablation')
    before = file_state(README), snapshot(os.path.join(REPO, 'experiments'))
    proc = run_script(SCRIPT, ['--quick', '--workdir', root / 'runs', '--out', root / 'out'], root)
    assert_ok(proc)
    with open(root / 'out' / 'cc_ablation_results.json') as f:
        results = json.load(f)
    return proc, results, before, root


def column(results, objective, key):
    rows = sorted((r for r in results['runs'] if r['objective'] == objective),
                  key=lambda r: r['seed'])
    return np.array([r[key] for r in rows], dtype=np.float64)


def test_two_seeds_for_each_objective_the_same_seeds(quick):
    _, results, _, root = quick
    runs = results['runs']
    assert len(runs) == 4
    seeds = {objective: sorted(r['seed'] for r in runs if r['objective'] == objective)
             for objective in OBJECTIVES}
    assert seeds == {'pix2pixCC': [1, 2], 'pix2pixHD_objective': [1, 2]}
    assert {r['objective']: r['lambda_CC'] for r in runs} == {'pix2pixCC': 5.0,
                                                               'pix2pixHD_objective': 0.0}
    assert results['config']['seeds'] == [1, 2]
    for r in runs:
        assert r['steps'] == 32  # one epoch of the 32 sample pairs, batch 1
        assert r['train_seconds'] > 0 and r['test_seconds'] > 0
        assert all(np.isfinite(r[key]) for key in METRIC_KEYS)
        # The runs were made in --workdir, each evaluated at its final step.
        assert os.path.isfile(root / 'runs' / 'checkpoints' / f"ablation_{r['objective']}_seed"
                              f"{r['seed']}" / 'Image' / 'Test' / '32' / 'metrics_summary.json')
    # the total of the runs' times, rounded to 0.1 s
    assert results['total_seconds'] == pytest.approx(
        sum(r['train_seconds'] + r['test_seconds'] for r in runs), abs=0.05)
    assert results['machine']['torch_threads'] == 1  # OMP_NUM_THREADS=1 of SUBPROCESS_ENV
    # Two seeds of the same objective are two different runs.
    assert column(results, 'pix2pixCC', 'rmse_1x1')[0] != \
        column(results, 'pix2pixCC', 'rmse_1x1')[1]


def test_per_seed_differences_are_the_rows_differences(quick):
    _, results, _, _ = quick
    assert [d['seed'] for d in results['differences']] == [1, 2]
    for key in METRIC_KEYS:
        expected = column(results, 'pix2pixCC', key) - column(results, 'pix2pixHD_objective',
                                                              key)
        np.testing.assert_allclose([d[key] for d in results['differences']], expected,
                                   rtol=1e-12)


def test_summaries_are_numpys_mean_and_sample_std(quick):
    _, results, _, _ = quick
    for objective in OBJECTIVES:
        for key in METRIC_KEYS:
            x = column(results, objective, key)
            summary = results['summary'][objective][key]
            assert summary['mean'] == pytest.approx(np.mean(x), rel=1e-12)
            assert summary['std'] == pytest.approx(np.std(x, ddof=1), rel=1e-12)


def test_paired_tests_are_scipys(quick):
    _, results, _, _ = quick
    for key in METRIC_KEYS:
        a, b = column(results, 'pix2pixCC', key), column(results, 'pix2pixHD_objective', key)
        test = results['paired_tests'][key]
        assert test['ttest_rel_p'] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
        assert test['wilcoxon_p'] == pytest.approx(
            stats.wilcoxon(a, b, method='exact').pvalue, rel=1e-9)
        d = a - b
        half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
        assert test['ci95'] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-9)
        assert test['mean_difference'] == pytest.approx(d.mean(), rel=1e-12)


def test_text_is_made_from_the_results_and_the_repository_is_untouched(quick):
    proc, results, (readme_before, experiments_before), _ = quick
    text = results.pop('text')
    assert text == ablation_script.report(results)
    assert text in proc.stdout
    assert 'cannot go below p = 0.5' in text  # the exact Wilcoxon floor at 2 seeds
    # --quick writes into --out and --workdir only: no README edit, no results file in
    # experiments/.
    assert file_state(README) == readme_before
    assert snapshot(os.path.join(REPO, 'experiments')) == experiments_before


# ----------------------------------------------------------------------------------------
# The wording, on hand-made numbers
# ----------------------------------------------------------------------------------------

def hand_made_results(n_seeds=5):
    """Runs whose answer is known: CC 1x1 clearly higher with the Inspector; CC 8x8 differs
    by noise only; RMSE lower by a consistent 1 G that is small next to a 20 G spread between
    seeds."""
    rng = np.random.default_rng(0)
    seeds = list(range(1, n_seeds + 1))
    base_rmse = rng.uniform(40, 90, n_seeds)
    columns = {
        'pix2pixCC': {'cc_1x1': 0.80 + 0.005 * rng.standard_normal(n_seeds),
                      'cc_8x8': 0.70 + 0.02 * rng.standard_normal(n_seeds),
                      'rmse_1x1': base_rmse - 1 + 0.05 * rng.standard_normal(n_seeds)},
        'pix2pixHD_objective': {'cc_1x1': 0.70 + 0.005 * rng.standard_normal(n_seeds),
                                'cc_8x8': 0.70 + 0.02 * rng.standard_normal(n_seeds),
                                'rmse_1x1': base_rmse}}
    runs = []
    for (lambda_CC, objective, _) in ablation_script.OBJECTIVES:
        for i, seed in enumerate(seeds):
            runs.append({'objective': objective, 'lambda_CC': lambda_CC, 'seed': seed,
                         'steps': 4800, 'generator_parameters': 1_500_000,
                         'train_seconds': 230.0, 'test_seconds': 5.0,
                         'unsigned_flux_ratio': 1.4 + 0.3 * rng.standard_normal(),
                         'net_flux_error': 1000 * rng.standard_normal(),
                         **{key: float(values[i]) for key, values in columns[objective].items()}})
    return {'config': {'seeds': seeds, 'n_epochs': 150, 'steps': 4800, 'quick': False,
                       'network': ablation_script.NETWORK, 'generator_parameters': 1_500_000,
                       'n_train_pairs': 32, 'n_test_pairs': 8,
                       'command': 'python experiments/cc_ablation.py'},
            'machine': {'cpu': 'test CPU', 'cpu_count': 2, 'torch_threads': 2,
                        'torch': '2.13.0+cpu', 'python': '3.11'},
            'total_seconds': 2400.0, 'runs': runs,
            'summary': ablation_script.summarize(runs),
            'differences': ablation_script.differences(runs),
            'paired_tests': ablation_script.paired_tests(runs)}


def line_of(text, name):
    """The row of metric `name` in the table of paired tests."""
    [line] = [line for line in text.splitlines() if line.startswith(f'| {name} |')]
    return line


def test_wording_follows_the_numbers():
    text = ablation_script.report(hand_made_results())
    clear, noise, small = (line_of(text, name) for name in ('CC 1×1', 'CC 8×8', 'RMSE 1×1 (G)'))
    assert 'different from zero at the 5% level' in clear
    assert 'larger than the seed-to-seed spread' in clear
    assert '| 5 of 5 seeds (ideal 1) |' in clear  # λ_CC 5 closer to the ideal in every seed
    assert 'not distinguishable from seed noise with 5 seeds' in noise
    assert 'different from zero' not in noise
    assert 'smaller than the seed-to-seed spread' in small
    assert 'CC 1×1' in text.split('paired t-test separates the objectives on')[1]
    # Five seeds: the exact Wilcoxon test cannot reach 5%, and the text says so.
    assert 'cannot go below p = 0.0625' in text and 'cannot reach 5%' in text
    assert '| pix2pixCC (`--lambda_CC 5`) | 0.80' in text  # the mean ± std table
    assert len([line for line in text.splitlines() if line.startswith('| 3 |')]) == 1


def test_wording_without_any_separable_metric():
    """Every metric of the Inspector's runs = the other runs' + a difference of mean ~0 that
    changes sign from seed to seed."""
    results = hand_made_results()
    runs = results['runs']
    pattern = dict(zip(range(1, 6), (1.0, -1.0, 0.5, -0.6, 0.2), strict=True))
    baseline = {r['seed']: r for r in runs if r['objective'] == 'pix2pixHD_objective'}
    for row in runs:
        if row['objective'] == 'pix2pixCC':
            for key, *_ in ablation_script.METRICS:
                row[key] = baseline[row['seed']][key] + 0.01 * pattern[row['seed']]
    results.update(summary=ablation_script.summarize(runs),
                   differences=ablation_script.differences(runs),
                   paired_tests=ablation_script.paired_tests(runs))
    assert all(t['ttest_rel_p'] > 0.5 for t in results['paired_tests'].values())
    text = ablation_script.report(results)
    assert 'no metric separates the two objectives' in text
    assert 'different from zero' not in text
    assert text.count('not distinguishable from seed noise with 5 seeds') == 5


def test_wilcoxon_floor_is_stated_only_when_it_blocks_5_percent():
    assert ablation_script.smallest_wilcoxon_p(5) == 0.0625
    assert ablation_script.smallest_wilcoxon_p(5) == pytest.approx(
        stats.wilcoxon(np.arange(1.0, 6.0), method='exact').pvalue)
    results = hand_made_results(n_seeds=6)
    assert 'cannot reach 5%' not in ablation_script.report(results)


def test_readme_markers_are_replaced_and_nothing_else(tmp_path):
    start, end = ablation_script.MARKERS
    path = tmp_path / 'README.md'
    path.write_text(f'# Title\n\n## Results\n\n{start}\nold table\n{end}\n\n## Options\n')
    ablation_script.write_into_readme(str(path), 'new table')
    once = path.read_text()
    assert once == f'# Title\n\n## Results\n\n{start}\nnew table\n{end}\n\n## Options\n'
    ablation_script.write_into_readme(str(path), 'new table')
    assert path.read_text() == once


def test_a_collapsed_run_still_gives_strict_json_and_a_text():
    """A NaN metric (e.g. the CC of a constant output) must not lose the other runs at the
    end of a 40-minute ablation: it becomes null in the JSON and n/a or nan in the text."""
    results = hand_made_results()
    results['runs'][0]['cc_8x8'] = float('nan')
    results.update(summary=ablation_script.summarize(results['runs']),
                   differences=ablation_script.differences(results['runs']),
                   paired_tests=ablation_script.paired_tests(results['runs']))
    text = ablation_script.report(results)
    assert 'no t-test possible' in line_of(text, 'CC 8×8')
    strict = json.loads(json.dumps(ablation_script.json_safe(results), allow_nan=False))
    assert strict['runs'][0]['cc_8x8'] is None
    assert strict['paired_tests']['cc_8x8']['ttest_rel_p'] is None
    assert strict['runs'][1]['cc_8x8'] == results['runs'][1]['cc_8x8']


def test_help_trains_nothing(tmp_path):
    assert os.path.isfile(SCRIPT)
    proc = run_script(SCRIPT, ['--help'], tmp_path, timeout=60)
    assert_ok(proc)
    assert 'usage' in proc.stdout.lower() and '--n_epochs' in proc.stdout
    assert os.listdir(tmp_path) == []  # --help trains nothing


def test_which_readme_is_written():
    parse = ablation_script.parse
    assert parse([]).readme == README  # the full ablation fills the repository's Results
    assert (parse([]).seeds, parse([]).n_epochs, parse([]).first_seed) == (5, 150, 1)
    assert parse(['--no_readme']).readme is None
    quick = parse(['--quick'])
    assert (quick.readme, quick.seeds, quick.n_epochs) == (None, 2, 1)
    assert parse(['--quick', '--readme', 'R.md']).readme == 'R.md'
    assert parse(['--quick', '--readme', 'R.md', '--no_readme']).readme is None
    with pytest.raises(SystemExit) as exit_info:
        parse(['--seeds', '1'])
    assert exit_info.value.code == 2


def test_reuse_reads_the_finished_runs_instead_of_training_them_again(quick):
    """--reuse (an interrupted ablation carried on): the runs recorded in the workdir are
    read back, nothing in them is touched, and the results are the same."""
    _, results, _, root = quick
    runs = root / 'runs' / 'checkpoints'
    before = snapshot(str(runs))
    proc = run_script(SCRIPT, ['--quick', '--reuse', '--workdir', root / 'runs', '--out',
                               root / 'again'], root)
    assert_ok(proc)
    with open(root / 'again' / 'cc_ablation_results.json') as f:
        again = json.load(f)
    assert again['runs'] == results['runs']
    assert again['paired_tests'] == results['paired_tests']
    assert snapshot(str(runs)) == before  # read, not trained again
