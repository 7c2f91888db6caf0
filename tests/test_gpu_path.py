"""The accelerator path, as far as a CPU can check it: precision choice, channels-last,
torch.compile through the drivers, and checkpoints that stay plain state_dicts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, TINY, assert_ok, make_pairs, make_test_opt,
                      run_test, run_train, train_opt)
from pix2pixCC_Networks import Generator, weights_init
from pix2pixCC_Utils import Precision, bare, memory_format, prepare_network


def test_mixed_precision_on_the_cpu_is_bfloat16_without_a_scaler():
    precision = Precision(train_opt('--data_type', '16'), torch.device('cpu'))
    assert precision.enabled and precision.dtype == torch.bfloat16
    assert not precision.scaler.is_enabled()
    with precision.autocast():
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        assert torch.is_autocast_enabled('cpu')


@pytest.mark.parametrize('native', [True, False])
def test_bfloat16_on_a_cpu_without_bfloat16_instructions_gets_a_notice(monkeypatch, native):
    """On a CPU without AVX512-BF16/AMX, oneDNN's bfloat16 convolutions fall back to very
    slow kernels (380x slower than float32 for one 256-channel convolution on an AVX2 CPU):
    the drivers say so instead of silently running for days."""
    import pix2pixCC_Utils
    monkeypatch.setattr(pix2pixCC_Utils, 'cpu_has_bfloat16', lambda: native)
    mixed = Precision(make_test_opt('--data_type', '16'), torch.device('cpu'))
    full = Precision(make_test_opt('--data_type', '32'), torch.device('cpu'))
    assert full.notice() is None
    if native:
        assert mixed.notice() is None
    else:
        assert 'no bfloat16 instructions' in mixed.notice()
        assert '--data_type 32' in mixed.notice()


def test_float32_runs_without_autocast():
    precision = Precision(train_opt(), torch.device('cpu'))
    assert not precision.enabled
    with precision.autocast():
        assert not torch.is_autocast_enabled('cpu')


def test_amp_dtype_can_be_forced():
    precision = Precision(train_opt('--data_type', '16', '--amp_dtype', 'float16'),
                          torch.device('cpu'))
    assert precision.dtype == torch.float16
    assert not precision.scaler.is_enabled()  # GradScaler is for CUDA float16 only


def test_channels_last_gives_the_same_generator_output():
    """What prepare_network does on CUDA (channels-last weights and inputs) must not change
    the numbers; checked here on the CPU, which runs channels-last convolutions too."""
    torch.manual_seed(0)
    G = Generator(train_opt()).apply(weights_init).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        plain = G(x)
        fast = G.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_prepare_network_on_the_cpu_keeps_the_default_layout():
    G = prepare_network(Generator(train_opt()), train_opt(), torch.device('cpu'))
    assert memory_format(torch.device('cpu')) == torch.contiguous_format
    assert G.model[1].weight.is_contiguous()


def test_bare_unwraps_compiled_and_parallel_wrappers():
    G = Generator(train_opt())
    wrapped = torch.compile(torch.nn.DataParallel(G))
    assert bare(wrapped) is G
    assert all(not key.startswith(('module.', '_orig_mod.')) for key in bare(wrapped).state_dict())


def test_compiled_training_and_test_write_plain_checkpoints(tmp_path):
    """--compile through both drivers (default replication padding, whose backward is kept
    out of the compiled graph): checkpoints have the published keys, outputs are written."""
    input_dir, target_dir = make_pairs(tmp_path / 'data', 'npy', n=4, size=32)
    proc = run_train(TINY + ['--compile', '--data_format_input', 'npy',
                             '--data_format_target', 'npy', '--input_dir_train', input_dir,
                             '--target_dir_train', target_dir, '--n_epochs', '1',
                             '--seed', '1'], cwd=tmp_path)
    assert_ok(proc)
    model_dir = tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model'
    state = torch.load(model_dir / '4_G.pt', weights_only=True)
    assert set(state) == set(Generator(train_opt()).state_dict())
    proc = run_test(['--gpu_ids', '-1', '--compile', '--iteration', '4',
                     '--input_dir_test', input_dir], cwd=tmp_path)
    assert_ok(proc)
    out_dir = tmp_path / 'checkpoints' / 'pix2pixCC' / 'Image' / 'Test' / '4'
    assert sorted(os.listdir(out_dir)) == [f'img_{i:03d}_AI.npy' for i in range(4)] + \
        ['test_run.json']


GPU_CHECK = os.path.join(REPO, 'benchmarks', 'gpu_check.py')


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, GPU_CHECK, '--json', str(tmp_path / 'g.json')],
                          cwd=str(tmp_path), env=dict(SUBPROCESS_ENV, CUDA_VISIBLE_DEVICES=''),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith('no CUDA device: nothing to check'), proc.stdout


def test_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    """What exists on a CPU: float32, bfloat16 (train, and the float32 model under autocast
    close to its float32 outputs) and an exact resume; the CUDA-only ones say so."""
    out = tmp_path / 'g.json'
    proc = subprocess.run([sys.executable, GPU_CHECK, '--device', 'cpu', '--skip', 'compile',
                           '--json', str(out)], cwd=str(tmp_path), env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=600)
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
