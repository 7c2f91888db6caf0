"""Several processes, as README "Several GPUs and nodes" documents them: under torchrun
(DistributedDataParallel with Gloo on the CPU) two processes train the model of one process
with the same global batch, write one set of files named by global sample counts, resume,
and share an uneven last batch, the previews and the validation; --gpu_ids 0,1 without CUDA
falls back to one CPU process. That a signal to one process stops them all is in
test_long_runs.py.
"""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (NPY_DATA, TINY, assert_ok, assert_same_weights, biases_before_norm,
                      checkpoint, copy_run, generate, load_generator, logged_steps, make_pairs,
                      model_dir, run_torchrun, run_train, saved_steps_in, train_opt)
from pix2pixCC_Networks import Generator

RUN = NPY_DATA + ['--n_D', '1', '--no_shuffle', '--seed', '3', '--report_freq', '4',
                   '--save_freq', '8', '--display_freq', '1000', '--keep_states', '0']
N_PAIRS = 16
WEIGHT_TOLERANCE = 1e-5
OUTPUT_TOLERANCE = 1e-4


def model_files(root):
    return sorted(os.listdir(model_dir(root)))


def assert_same_generator(state_a, state_b):
    opt = train_opt()
    G = Generator(opt)
    # Two processes' all-reduce adds up the gradients in another order than one process's
    # batch: the noise-gradient biases drift apart (see conftest.biases_before_norm).
    excluded = biases_before_norm(G)
    assert excluded and excluded < set(state_a)  # found some, not everything
    assert 'model.1.bias' in excluded and f'model.{len(G.model) - 1}.bias' not in excluded
    assert_same_weights(state_a, state_b, WEIGHT_TOLERANCE, skip=excluded)
    outputs = []
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for state in (state_a, state_b):
        G = Generator(opt)
        G.load_state_dict(state, strict=True)
        with torch.no_grad():
            outputs.append(G.eval()(x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=OUTPUT_TOLERANCE, rtol=0)


@pytest.fixture(scope='module')
def sixteen_pairs(tmp_path_factory):
    """Training arguments for 16 npy pairs (four global batches of 4)."""
    root = tmp_path_factory.mktemp('ddp_data')
    input_dir, target_dir = make_pairs(root, 'npy', n=N_PAIRS, size=32)
    return ['--input_dir_train', input_dir, '--target_dir_train', target_dir]


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, sixteen_pairs):
    """torchrun, 2 processes of batch 2 (global batch 4), one epoch."""
    root = tmp_path_factory.mktemp('ddp')
    proc = run_torchrun(TINY + RUN + sixteen_pairs + ['--batch_size', '2', '--n_epochs', '1'],
                        cwd=root)
    assert_ok(proc)
    return root, proc


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, sixteen_pairs):
    """One process of batch 4, one epoch."""
    root = tmp_path_factory.mktemp('single')
    assert_ok(run_train(TINY + RUN + sixteen_pairs + ['--batch_size', '4', '--n_epochs', '1'],
                        cwd=root))
    return root


def test_two_processes_train_the_model_of_one_process(two_processes, one_process):
    root, _ = two_processes
    assert_same_generator(checkpoint(root, '16_G.pt'), checkpoint(one_process, '16_G.pt'))


def test_one_set_of_files_named_by_global_sample_counts(two_processes):
    root, proc = two_processes
    assert model_files(root) == ['16_D.pt', '16_G.pt', '16_state.pt',
                                 '8_D.pt', '8_G.pt', '8_state.pt']
    assert logged_steps(root) == [4, 8, 12, 16]
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
    copy_run(two_processes[0], root)
    proc = run_torchrun(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', '2'], cwd=root)
    assert_ok(proc)
    return root, proc


def test_resume_under_torchrun_continues_from_the_saved_step(resumed_two_processes):
    root, proc = resumed_two_processes
    steps = [int(s) for s in re.findall(r'Current_step: (\d+)', proc.stdout)]
    assert steps == [20, 24, 28, 32]
    assert model_files(root) == sorted(f'{step}_{kind}.pt' for step in (8, 16, 24, 32)
                                       for kind in ('G', 'D', 'state'))
    assert logged_steps(root) == [4, 8, 12, 16, 20, 24, 28, 32]
    assert checkpoint(root, '32_state.pt')['epoch'] == 2


def test_resumed_two_processes_match_two_epochs_of_one_process(resumed_two_processes,
                                                              sixteen_pairs, tmp_path):
    root, _ = resumed_two_processes
    assert_ok(run_train(TINY + RUN + sixteen_pairs + ['--batch_size', '4', '--n_epochs', '2'],
                        cwd=tmp_path))
    assert_same_generator(checkpoint(root, '32_G.pt'), checkpoint(tmp_path, '32_G.pt'))


def test_several_gpu_ids_without_cuda_fall_back_to_one_cpu_process(sixteen_pairs, tmp_path):
    # No GPU visible, whatever the machine has.
    proc = run_train(TINY + RUN + sixteen_pairs + ['--gpu_ids', '0,1', '--batch_size', '4',
                                                   '--n_epochs', '1'], tmp_path,
                     CUDA_VISIBLE_DEVICES='')
    assert_ok(proc)
    output = proc.stdout + proc.stderr
    notices = [line for line in output.splitlines() if 'CUDA' in line and 'notice' in line]
    assert len(notices) == 1 and '0,1' in notices[0] and 'CPU' in notices[0], notices
    assert 'device: cpu (no CUDA GPU found)' in output
    assert 'distributed' not in output
    assert model_files(tmp_path) == ['16_D.pt', '16_G.pt', '16_state.pt',
                                     '8_D.pt', '8_G.pt', '8_state.pt']
    state = checkpoint(tmp_path, '16_G.pt')
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not any(key.startswith('module.') for key in state)


# ----------------------------------------------------------------------------------------
# An uneven last batch, previews and validation under torchrun
# ----------------------------------------------------------------------------------------

UNEVEN_PAIRS = 13  # two processes of batch 2: batches of 4, 4, 4 and a last one of 1


@pytest.fixture(scope='module')
def uneven_run(tmp_path_factory):
    """torchrun, 2 processes of batch 2 over 13 files (one epoch), previews every 4 samples,
    validation on 2 test inputs at every save."""
    root = tmp_path_factory.mktemp('ddp_uneven')
    input_dir, target_dir = make_pairs(root / 'train', 'npy', n=UNEVEN_PAIRS, size=32)
    test_in, _ = make_pairs(root / 'test', 'npy', n=2, size=32, seed=5, prefix='val')
    proc = run_torchrun(TINY + RUN + ['--input_dir_train', input_dir, '--target_dir_train',
                                   target_dir, '--batch_size', '2', '--n_epochs', '1',
                                   '--display_freq', '4', '--val_during_train',
                                   '--input_dir_test', test_in], cwd=root)
    assert_ok(proc)
    return root, proc, target_dir, test_in


def test_an_uneven_last_batch_counts_each_sample_once(uneven_run):
    """13 samples: the last global batch holds sample 12 (and, to even out the processes'
    shares, a repeat that is not counted): steps 4, 8, 12, 13 (reports every 4 samples, and
    the last sample's at the end)."""
    root, proc, _, _ = uneven_run
    assert [int(s) for s in re.findall(r'Current_step: (\d+)', proc.stdout)] == [4, 8, 12, 13]
    assert logged_steps(root) == [4, 8, 12, 13]
    assert saved_steps_in(model_dir(root)) == [8, 13]  # the final save at 13
    assert checkpoint(root, '13_state.pt')['step'] == 13
    assert all(torch.isfinite(v).all() for v in checkpoint(root, '13_G.pt').values())


def test_previews_are_rank_0s_first_sample(uneven_run):
    """Without shuffling, process r takes samples r, r + 2, ...: the batch ending at step 4k
    of process 0 starts with sample 4(k - 1), process 1's with 4(k - 1) + 1. Each preview is
    process 0's (only it writes), and there is one per crossing of display_freq."""
    root, _, target_dir, _ = uneven_run
    folder = os.path.join(str(root), 'checkpoints', 'pix2pixCC', 'Image', 'Train')
    assert saved_steps_in(folder, '_real.png') == [4, 8, 12]
    assert saved_steps_in(folder, '_fake.png') == [4, 8, 12]
    assert saved_steps_in(folder, '_panel.png') == [4, 8, 12]
    for step in (4, 8, 12):
        with Image.open(os.path.join(folder, f'{step}_real.png')) as image:
            preview = np.asarray(image).astype(np.float64)
        for rank in (0, 1):
            target = np.load(os.path.join(target_dir, f'img_{step - 4 + rank:03d}.npy'))
            expected = np.clip(((target - 50) / 50 + 1) * 127.5, 0, 255)
            matches = np.abs(preview - expected).max() <= 1.0
            assert matches == (rank == 0), (step, rank)


def test_validation_during_training_under_torchrun(uneven_run):
    """Rank 0 translates the test inputs at every save with the generator of that step (the
    other process waits for it rather than hanging or writing too)."""
    root, _, _, test_in = uneven_run
    test_dir = os.path.join(str(root), 'checkpoints', 'pix2pixCC', 'Image', 'Test')
    assert sorted(os.listdir(test_dir)) == ['13', '8']
    opt = train_opt(*RUN)
    for step in (8, 13):
        assert sorted(os.listdir(os.path.join(test_dir, str(step)))) == [
            'test_run.json', 'val_000_AI.npy', 'val_001_AI.npy']
        G = load_generator(opt, os.path.join(model_dir(root), f'{step}_G.pt'))
        for name in ('val_000', 'val_001'):
            x = (np.load(os.path.join(test_in, f'{name}.npy')) - 50) / 50
            expected = generate(G, x[None])[0] * 50 + 50
            out = np.load(os.path.join(test_dir, str(step), f'{name}_AI.npy'))
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
