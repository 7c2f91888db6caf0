"""The tools of benchmarks/, each run for real on a tiny network: benchmark.py (whose
`driver` variant is the driver's own training step), side_by_side.py (given our own scripts
as the "published" folder, since the published code cannot be downloaded here),
precision_accuracy.py, profile_step.py and freed_memory.py, documented in README "Speed"
and BENCHMARKS.md, and gpu_check.py, documented in README "CPU and GPU", which on a CPU runs
the checks a CPU can make.
"""
import argparse
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import (NPY_DATA, REPO, TINY, TINY_NETWORK, assert_identical_weights, assert_ok,
                      models_and_data, run_script, run_train, snapshot, train_opt)
from pix2pixCC_Networks import Loss
from pix2pixCC_Train import make_optimizer, train_step
from pix2pixCC_Utils import Precision

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import benchmark  # noqa: E402
import side_by_side  # noqa: E402

BENCHMARK = os.path.join(REPO, 'benchmarks', 'benchmark.py')
GPU_CHECK = os.path.join(REPO, 'benchmarks', 'gpu_check.py')
SIDE_BY_SIDE = os.path.join(REPO, 'benchmarks', 'side_by_side.py')
PRECISION = os.path.join(REPO, 'benchmarks', 'precision_accuracy.py')
FREED_MEMORY = os.path.join(REPO, 'benchmarks', 'freed_memory.py')


def fake_published(folder, device_line="device = torch.device('cuda:0')\n"):
    """Our six scripts and their machinery/ in `folder`, with a hard-coded CUDA device as the
    published code has."""
    os.makedirs(folder)
    for name in side_by_side.PUBLISHED_SCRIPTS:
        shutil.copy(os.path.join(REPO, name), folder)
    shutil.copytree(os.path.join(REPO, 'machinery'), os.path.join(folder, 'machinery'),
                    ignore=shutil.ignore_patterns('__pycache__'))
    with open(os.path.join(folder, 'pix2pixCC_Utils.py'), 'a') as f:
        f.write(f'\nif False:\n    {device_line}')
    return folder


def test_the_published_copy_changes_only_the_device(tmp_path):
    source = fake_published(str(tmp_path / 'published'))
    cpu = side_by_side.published_copy(source, str(tmp_path / 'cpu'), '-1')
    gpu = side_by_side.published_copy(source, str(tmp_path / 'gpu'), '0')
    for name in side_by_side.PUBLISHED_SCRIPTS:
        with open(os.path.join(source, name)) as f:
            original = f.read()
        with open(os.path.join(cpu, name)) as f:
            assert f.read() == original.replace("'cuda:0'", "'cpu'")
        with open(os.path.join(gpu, name)) as f:
            assert f.read() == original  # on a GPU, cuda:0 is the card --gpu_ids selects


def test_the_published_copy_refuses_a_folder_that_is_not_the_published_code(tmp_path):
    with pytest.raises(SystemExit, match='no pix2pixCC_Networks.py there'):
        side_by_side.published_copy(str(tmp_path), str(tmp_path / 'copy'), '-1')
    source = fake_published(str(tmp_path / 'published'), device_line='pass\n')
    with pytest.raises(SystemExit, match="no 'cuda:0' found"):
        side_by_side.published_copy(source, str(tmp_path / 'copy2'), '-1')


def test_side_by_side_runs_both_programs_and_compares_their_outputs(tmp_path):
    """Both 'programs' are ours here, so their generated files must agree exactly: the
    comparison reads the real outputs of each program's last Test run. The data part times
    each program's CustomDataset in a child process (the 'published' one from the copy)."""
    source = fake_published(str(tmp_path / 'published'))
    out = tmp_path / 'side.json'
    proc = run_script(SIDE_BY_SIDE, [
        source, '--what', 'train,data,inference', *TINY_NETWORK,
        '--size', '32', '--data_size', '32', '--data_pairs', '2', '--data_repeats', '1',
        '--inference_size', '32', '--side_steps', '1,2',
        '--side_images', '1,2', '--side_repeats', '1', '--json', out], tmp_path)
    assert_ok(proc)
    assert 'training step 32x32 (s)' in proc.stdout and 'inference peak RSS (MB)' in proc.stdout
    with open(out) as f:
        results = json.load(f)['results']
    for part in ('train', 'inference'):
        for program in ('published', 'ours'):
            figures = results[part][program]
            assert figures['peak_rss_mb'] > 100  # a whole torch process
            assert len(figures['times']) == 1
            assert set(figures['process_seconds']) == {'1', '2'}
    for program in ('published', 'ours'):  # each program's own dataset, in its own process
        assert results['data'][program]['seconds'] > 0
        assert results['data'][program]['peak_rss_mb'] > 100
    assert results['inference']['outputs']['files'] == 2
    assert results['inference']['outputs']['max_abs_difference'] == 0.0


def test_the_old_published_option_runs_side_by_side(monkeypatch):
    """`benchmark.py --published DIR ...`, the command from before side_by_side.py had its own
    file, runs `side_by_side.py DIR ...`."""
    forwarded = []
    monkeypatch.setattr(side_by_side, 'main', lambda argv: forwarded.append(argv) or 0)
    assert benchmark.main(['--published', 'DIR', '--what', 'train', '--gpu_ids', '-1',
                           '--option=--norm_type', '--option=BatchNorm2d']) == 0
    assert benchmark.main(['--size', '32', '--published=DIR']) == 0
    assert forwarded == [['DIR', '--what', 'train', '--gpu_ids', '-1', '--option=--norm_type',
                          '--option=BatchNorm2d'], ['DIR', '--size', '32']]


def test_benchmark_measures_every_part_in_its_own_process(tmp_path):
    """benchmark.py, every part on a tiny network: a row per (part, variant), each with the
    peak RSS of its own process, and the machine and options in the JSON."""
    out = tmp_path / 'bench.json'
    proc = run_script(BENCHMARK, [
        *TINY_NETWORK, '--size', '32', '--steps', '1', '--warmup', '1',
        '--data_size', '32', '--data_pairs', '2', '--data_repeats', '1',
        '--data_variants', 'ours', '--inference_size', '32', '--inference_runs', '1',
        '--matmul_size', '64', '--matmul_variants', 'float32', '--json', out], tmp_path)
    assert_ok(proc)
    with open(out) as f:
        written = json.load(f)
    assert set(written) == {'machine', 'config', 'results'}
    assert written['machine']['torch_threads'] == 1  # OMP_NUM_THREADS=1 of SUBPROCESS_ENV
    assert written['config']['train_variants'] == 'driver' and 'argv' not in written['config']
    rows = written['results']
    assert [(r['part'], r['variant']) for r in rows] == [
        ('train', 'driver'), ('data', 'ours'), ('inference', 'ours'), ('matmul', 'float32')]
    for row in rows:
        assert row['seconds'] > 0 and row['peak_rss_mb'] > 100  # a whole torch process
        assert row['size'] == (64 if row['part'] == 'matmul' else 32)
    assert 'first_step_seconds' in rows[0] and 'gflops' in rows[3]
    assert f'written: {out}' in proc.stdout


def test_benchmark_driver_variant_is_the_driver_step():
    """benchmarks/benchmark.py's `driver` variant trains as the driver does: from the same
    seed, its weights after two steps are those of train_step on the same data."""
    opt, cpu = train_opt(), torch.device('cpu')
    step, G, D = benchmark.training_setup('driver', opt, cpu, 32)
    for _ in range(2):
        step()
    G_ref, D_ref, input, target = models_and_data(opt)  # the benchmark's seed and data
    optims = make_optimizer(G_ref.parameters(), opt), make_optimizer(D_ref.parameters(), opt)
    for _ in range(2):
        train_step(Loss(opt), G_ref, D_ref, *optims, Precision(opt, cpu), input, target)
    assert_identical_weights(G, G_ref)
    assert_identical_weights(D, D_ref)


@pytest.mark.parametrize('text', ['3', '2,2', '0,4', 'a,b'])
def test_item_counts_must_be_two_increasing_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f'{text!r}: '):
        side_by_side.counts(text)
    assert side_by_side.counts('2,7') == (2, 7)


def test_precision_accuracy_compares_the_two_precisions_without_touching_the_run(tmp_path, data):
    """benchmarks/precision_accuracy.py: float32 and --data_type 16 outputs of one trained
    generator on the same inputs; the run's folder is left exactly as it was."""
    assert_ok(run_train(TINY + NPY_DATA + data + ['--n_epochs', '1'], tmp_path))
    before = snapshot(tmp_path / 'checkpoints')
    out = tmp_path / 'precision.json'
    assert_ok(run_script(PRECISION, ['--dataset_name', 'pix2pixCC', '--iteration', '6',
                                     '--input_dir_test', data[1], '--target_dir_test', data[3],
                                     '--json', out], tmp_path))
    with open(out) as f:
        result = json.load(f)
    outputs = result['outputs']
    assert outputs['files'] == 6
    assert 0 < outputs['rmse'] <= outputs['max_abs_difference']  # bfloat16 rounds differently
    for key, change in result['change'].items():
        assert change == result['mixed'][key] - result['float32'][key]
    assert snapshot(tmp_path / 'checkpoints') == before


def test_conv_rates_count_the_arithmetic_as_torch_does(monkeypatch, capsys):
    """profile_step.py --conv_rates: the FLOP it gives each convolution of the Test generator,
    transposed ones included, add up exactly to what torch's FlopCounterMode counts."""
    from torch.utils.flop_counter import FlopCounterMode

    import profile_step
    from pix2pixCC_Networks import Generator
    network = ['--n_gf', '8', '--n_downsample', '2', '--n_residual', '1']
    opt = benchmark.train_options(['--gpu_ids', '-1'] + network, 'driver')
    G = Generator(opt)
    ours = []
    for m in G.modules():
        transposed = isinstance(m, torch.nn.ConvTranspose2d)
        if transposed or isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda module, input, output, transposed=transposed:
                                    ours.append(profile_step.conv_flops(module, input[0],
                                                                        output, transposed)))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        G(torch.zeros(1, opt.input_ch, 32, 32))
    convolutions = sum(n for op, n in counter.get_flop_counts()['Global'].items()
                       if 'convolution' in str(op))
    assert len(ours) == 8 and sum(ours) == convolutions

    monkeypatch.setattr(profile_step, 'matmul_rate', lambda: 100.0)  # no 4096² products
    assert profile_step.main(['--inference', '--conv_rates', '--size', '32', '--warmup', '0',
                              '--steps', '1'] + network) == 0
    rows = {line[:40].strip(): line[40:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows['transposed 3x3 16->8 at 32x32'][0] == '1'
    assert rows['all convolutions'][0] == '8'


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    proc = run_script(GPU_CHECK, ['--json', tmp_path / 'g.json'], tmp_path, timeout=120,
                      CUDA_VISIBLE_DEVICES='')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith('no CUDA device: nothing to check'), proc.stdout


def test_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    """What exists on a CPU: float32, bfloat16 (train, and the float32 model under autocast
    close to its float32 outputs) and an exact resume; the CUDA-only ones say so."""
    out = tmp_path / 'g.json'
    proc = run_script(GPU_CHECK, ['--device', 'cpu', '--skip', 'compile', '--json', out],
                      tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    with open(out) as f:
        rows = {row['check']: row for row in json.load(f)['checks']}
    for check in ('float32', 'bfloat16', 'bfloat16 test', 'float32 again', 'resume'):
        assert rows[check]['ok'] is True, rows[check]
    for check in ('float16', 'float16 test', 'DataParallel', 'torchrun NCCL'):
        assert rows[check]['ok'] is None, rows[check]
    assert 'compile' not in rows
    assert 'relative RMS difference from the first float32 run 0.00e+00' in \
        rows['float32 again']['detail']  # the CPU repeats a run exactly ...
    assert 'relative RMS difference from the uninterrupted run 0.00e+00' in \
        rows['resume']['detail']  # ... and a resumed one


def test_freed_memory_compares_the_two_allocator_settings_in_fresh_processes(tmp_path):
    """benchmarks/freed_memory.py (README "Speed"): both variants, each in its own process,
    with the setting made in the one that asks for it only (on glibc)."""
    out = tmp_path / 'f.json'
    proc = run_script(FREED_MEMORY, ['--size', '64', '--images', '1', '--rounds', '1',
                                     *TINY_NETWORK, '--json', out], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert 'reuse / plain time:' in proc.stdout
    with open(out) as f:
        runs = json.load(f)['results']['runs']
    assert runs['plain'][0]['reused'] is False
    glibc = sys.platform.startswith('linux') and os.confstr('CS_GNU_LIBC_VERSION') is not None
    assert runs['reuse'][0]['reused'] is glibc
    for variant in ('plain', 'reuse'):
        assert runs[variant][0]['seconds'] > 0 and runs[variant][0]['peak_rss_mb'] > 0
