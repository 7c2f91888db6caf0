"""Several processes (torchrun, DistributedDataParallel with Gloo on the CPU) train the same
model as one process with the same global batch, write one set of files named by global
sample counts, and resume; --gpu_ids 0,1 without CUDA falls back to the CPU.
"""
import csv
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import (SUBPROCESS_ENV, TINY, TRAIN_SCRIPT, assert_ok, make_pairs, run_train,
                      train_opt)
from pix2pixCC_Networks import Generator

DATA = ['--data_format_input', 'npy', '--data_format_target', 'npy', '--data_size', '32',
        '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '100',
        '--saturation_lower_limit_target', '0', '--saturation_upper_limit_target', '100',
        '--n_D', '1', '--no_shuffle', '--seed', '3', '--report_freq', '4', '--save_freq', '8',
        '--keep_states', '0',
        '--display_freq', '1000']
N_PAIRS = 16
WEIGHT_TOLERANCE = 1e-5
OUTPUT_TOLERANCE = 1e-4


def torchrun(args, cwd, timeout=300):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               '--nproc_per_node=2', TRAIN_SCRIPT] + [str(a) for a in args]
    return subprocess.run(command, cwd=str(cwd), env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=timeout)


def model_files(root):
    return sorted(os.listdir(os.path.join(str(root), 'checkpoints', 'pix2pixCC', 'Model')))


def checkpoint(root, name):
    return torch.load(os.path.join(str(root), 'checkpoints', 'pix2pixCC', 'Model', name),
                      map_location='cpu', weights_only=True)


def log_steps(root):
    with open(os.path.join(str(root), 'checkpoints', 'pix2pixCC', 'loss_log.csv'),
              newline='') as f:
        return [int(row['step']) for row in csv.DictReader(f)]


def biases_before_instance_norm(G):
    """Names of the convolution biases that an InstanceNorm2d follows directly.

    The norm subtracts each channel's mean, so such a bias cannot change the output and its
    gradient is exactly zero in exact arithmetic; in floating point it is rounding noise,
    which Adam normalises into steps of about ±lr. Two runs that add up their gradients in a
    different order (two processes' all-reduce against one process's batch) therefore move
    these biases differently (~1e-3) while every output stays the same. They are excluded
    from the weight comparison, and the outputs are compared instead.
    """
    names = set()
    for prefix, module in G.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, layer), (_, following) in zip(children, children[1:]):
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.bias is not None \
                    and isinstance(following, nn.InstanceNorm2d):
                names.add(f'{prefix}.{name}.bias' if prefix else f'{name}.bias')
    return names


def assert_same_generator(state_a, state_b):
    opt = train_opt()
    G = Generator(opt)
    excluded = biases_before_instance_norm(G)
    assert excluded and excluded < set(state_a)  # found some, not everything
    assert 'model.1.bias' in excluded and f'model.{len(G.model) - 1}.bias' not in excluded
    assert set(state_a) == set(state_b)
    for key in state_a:
        if key in excluded:
            continue
        difference = float((state_a[key] - state_b[key]).abs().max())
        assert difference <= WEIGHT_TOLERANCE, f"{key}: max |difference| {difference:g}"
    outputs = []
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for state in (state_a, state_b):
        G = Generator(opt)
        G.load_state_dict(state, strict=True)
        with torch.no_grad():
            outputs.append(G.eval()(x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=OUTPUT_TOLERANCE, rtol=0)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('ddp_data')
    input_dir, target_dir = make_pairs(root, 'npy', n=N_PAIRS, size=32)
    return ['--input_dir_train', input_dir, '--target_dir_train', target_dir]


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, data):
    """torchrun, 2 processes of batch 2 (global batch 4), one epoch."""
    root = tmp_path_factory.mktemp('ddp')
    proc = torchrun(TINY + DATA + data + ['--batch_size', '2', '--n_epochs', '1'], cwd=root)
    assert_ok(proc)
    return root, proc


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, data):
    """One process of batch 4, one epoch."""
    root = tmp_path_factory.mktemp('single')
    assert_ok(run_train(TINY + DATA + data + ['--batch_size', '4', '--n_epochs', '1'], cwd=root))
    return root


def test_bias_exclusion_is_exactly_the_biases_an_instance_norm_follows():
    G = Generator(train_opt())
    excluded = biases_before_instance_norm(G)
    # TINY: stem conv, 2 downsampling convs, 2 convs per residual block, 2 transposed convs.
    assert len(excluded) == 1 + 2 + 2 + 2
    assert all(name.endswith('.bias') for name in excluded)
    # The set follows the module types: a BatchNorm generator has no InstanceNorm to follow.
    assert biases_before_instance_norm(Generator(train_opt('--norm_type', 'BatchNorm2d'))) \
        == set()


def test_two_processes_train_the_model_of_one_process(two_processes, one_process):
    root, _ = two_processes
    assert_same_generator(checkpoint(root, '16_G.pt'), checkpoint(one_process, '16_G.pt'))


def test_one_set_of_files_named_by_global_sample_counts(two_processes):
    root, proc = two_processes
    assert model_files(root) == ['16_D.pt', '16_G.pt', '16_state.pt',
                                 '8_D.pt', '8_G.pt', '8_state.pt']
    assert log_steps(root) == [4, 8, 12, 16]
    # Only the first process reports and saves.
    for step in (4, 8, 12, 16):
        assert len(re.findall(rf'Current_step: {step}\b', proc.stdout)) == 1, proc.stdout
    assert len(re.findall(r'saved .*8_G\.pt', proc.stdout)) == 1
    assert len(re.findall(r'Total time', proc.stdout)) == 1
    for name in ('16_G.pt', '16_D.pt'):
        assert not any(key.startswith('module.') for key in checkpoint(root, name)), name
    state = checkpoint(root, '16_state.pt')
    assert state['step'] == 16 and state['epoch'] == 1
    assert not any(key.startswith('module.') for key in state['options'])


@pytest.fixture(scope='module')
def resumed_two_processes(two_processes, tmp_path_factory):
    root = tmp_path_factory.mktemp('ddp_resumed')
    shutil.copytree(os.path.join(str(two_processes[0]), 'checkpoints'), root / 'checkpoints')
    proc = torchrun(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', '2'], cwd=root)
    assert_ok(proc)
    return root, proc


def test_resume_under_torchrun_continues_from_the_saved_step(resumed_two_processes):
    root, proc = resumed_two_processes
    steps = [int(s) for s in re.findall(r'Current_step: (\d+)', proc.stdout)]
    assert steps == [20, 24, 28, 32]
    assert model_files(root) == sorted(f'{step}_{kind}.pt' for step in (8, 16, 24, 32)
                                       for kind in ('G', 'D', 'state'))
    assert log_steps(root) == [4, 8, 12, 16, 20, 24, 28, 32]
    assert checkpoint(root, '32_state.pt')['epoch'] == 2


def test_resumed_two_processes_match_two_epochs_of_one_process(resumed_two_processes, data,
                                                              tmp_path):
    root, _ = resumed_two_processes
    assert_ok(run_train(TINY + DATA + data + ['--batch_size', '4', '--n_epochs', '2'],
                        cwd=tmp_path))
    assert_same_generator(checkpoint(root, '32_G.pt'), checkpoint(tmp_path, '32_G.pt'))


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_several_gpu_ids_without_cuda_fall_back_to_one_cpu_process(data, tmp_path):
    proc = run_train(TINY + DATA + data + ['--gpu_ids', '0,1', '--batch_size', '4',
                                           '--n_epochs', '1'], cwd=tmp_path)
    assert_ok(proc)
    output = proc.stdout + proc.stderr
    notices = [line for line in output.splitlines() if 'CUDA' in line or 'cuda' in line]
    assert len(notices) == 1 and '0,1' in notices[0] and 'CPU' in notices[0], notices
    assert 'distributed' not in output
    assert model_files(tmp_path) == ['16_D.pt', '16_G.pt', '16_state.pt',
                                     '8_D.pt', '8_G.pt', '8_state.pt']
    state = checkpoint(tmp_path, '16_G.pt')
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not any(key.startswith('module.') for key in state)
