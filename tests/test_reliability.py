"""Reliability: exact resume, crash safety, seeds, options that travel with the model, the
README's "What happens when…" table, loss sanity and atomic writes.

Driver runs are subprocesses (`python /abs/pix2pixCC_Train.py ...` in a fresh tmp folder),
with the TINY network on six 32x32 npy pairs. Runs shared by several tests are module-scoped
fixtures; a test that changes a run works on a copy of it.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pix2pixCC_Networks
import pix2pixCC_Train
import pix2pixCC_Utils
from conftest import (NPY_DATA, SUBPROCESS_ENV, TINY, TRAIN_SCRIPT, assert_ok,
                      assert_same_weights, assert_usage_error, load, loss_rows, make_pairs,
                      model_dir, reported_steps, run_test, run_train, saved_steps_in, snapshot,
                      train_opt)
from pix2pixCC_Networks import Generator
from pix2pixCC_Options import run_main

DATA = NPY_DATA  # six 32x32 pairs with values in [0, 100] (make_pairs)
AUGMENT = ['--max_rotation_angle', '10', '--padding_size', '4']
# Batch 1 over 6 files, 2 epochs: saves at 4, 8 (mid-epoch 2) and the final 12.
RUN = TINY + DATA + AUGMENT + ['--seed', '5', '--n_workers', '0', '--save_freq', '4',
                               '--report_freq', '1', '--display_freq', '1000',
                               '--keep_states', '0']


def first_step(stdout):
    return reported_steps(stdout)[0]


def copy_run(source_root, dest_root, name='pix2pixCC'):
    shutil.copytree(os.path.join(str(source_root), 'checkpoints', name),
                    os.path.join(str(dest_root), 'checkpoints', name))


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, data):
    """Two uninterrupted epochs with augmentation and shuffling, no loading workers."""
    root = tmp_path_factory.mktemp('full_run')
    proc = run_train(RUN + data + ['--n_epochs', '2'], cwd=root)
    assert_ok(proc)
    assert saved_steps_in(model_dir(root)) == [4, 8, 12]
    return root


# ----------------------------------------------------------------------------------------
# 1. Exact resume
# ----------------------------------------------------------------------------------------

def test_state_file_holds_everything_a_resume_needs(full_run):
    folder = model_dir(full_run)
    for step, epoch in ((4, 1), (8, 2), (12, 2)):
        for kind in ('G', 'D'):
            assert os.path.isfile(os.path.join(folder, f'{step}_{kind}.pt'))
        state = load(os.path.join(folder, f'{step}_state.pt'))  # weights_only=True
        assert {'G_optim', 'D_optim', 'scaler', 'rng', 'options', 'step',
                'epoch'} <= set(state), sorted(state)
        assert state['step'] == step and state['epoch'] == epoch
        assert state['options']['seed'] == 5 and state['options']['n_gf'] == 8
        for name in ('G_optim', 'D_optim'):
            assert state[name]['state'], f"{name} has no Adam moments"
            assert state[name]['param_groups'][0]['lr'] == pytest.approx(2e-4)


def test_resume_at_an_epoch_boundary_is_exact(full_run, data, tmp_path):
    """One epoch, then `--latest_iter -1 --n_epochs 2` with nothing else on the command line
    (every option comes from the saved run): the weights of the uninterrupted run."""
    assert_ok(run_train(RUN + data + ['--n_epochs', '1'], cwd=tmp_path))
    assert saved_steps_in(model_dir(tmp_path)) == [4, 6]
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', '2'], cwd=tmp_path)
    assert_ok(proc)
    assert first_step(proc.stdout) == 7  # continued after step 6
    assert saved_steps_in(model_dir(tmp_path)) == [4, 6, 8, 12]
    for name in ('8_G.pt', '12_G.pt', '12_D.pt'):
        assert_same_weights(os.path.join(model_dir(tmp_path), name),
                            os.path.join(model_dir(full_run), name))


def test_resume_in_the_middle_of_an_epoch_is_exact(full_run, tmp_path):
    """Step 4 is two thirds into epoch 1 (save_freq 4, 6 samples per epoch)."""
    copy_run(full_run, tmp_path)
    reference = {name: os.path.join(model_dir(full_run), name) for name in ('8_G.pt', '12_G.pt',
                                                                              '12_D.pt')}
    for step in (8, 12):
        for kind in ('G', 'D', 'state'):
            os.remove(os.path.join(model_dir(tmp_path), f'{step}_{kind}.pt'))
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '4', '--n_epochs', '2'], cwd=tmp_path)
    assert_ok(proc)
    assert first_step(proc.stdout) == 5
    for name, path in reference.items():
        assert_same_weights(os.path.join(model_dir(tmp_path), name), path)


def test_loading_workers_do_not_change_the_run(full_run, data, tmp_path):
    """--n_workers 2 here, 0 in the reference run: the same augmentation and order."""
    assert_ok(run_train(RUN + data + ['--n_epochs', '2', '--n_workers', '2'], cwd=tmp_path))
    for name in ('12_G.pt', '12_D.pt'):
        assert_same_weights(os.path.join(model_dir(tmp_path), name),
                            os.path.join(model_dir(full_run), name))


# ----------------------------------------------------------------------------------------
# 2. Which checkpoint --latest_iter takes
# ----------------------------------------------------------------------------------------

def test_latest_iter_minus_one_takes_the_newest_complete_step(full_run, tmp_path):
    """Step 12 lost its state file (a run killed between writing D and the state), so the
    newest complete step is 8. With --lr 0 the weights stay those of the step resumed from:
    the new 12_G.pt must equal 8_G.pt (resuming from 12 would train nothing and leave the
    old 12_G.pt)."""
    copy_run(full_run, tmp_path)
    folder = model_dir(tmp_path)
    os.remove(os.path.join(folder, '12_state.pt'))
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', '2', '--lr', '0'],
                     cwd=tmp_path)
    assert_ok(proc)
    assert first_step(proc.stdout) == 9
    assert os.path.isfile(os.path.join(folder, '12_state.pt'))
    for kind in ('G', 'D'):
        resumed, start = load(os.path.join(folder, f'12_{kind}.pt')), \
            load(os.path.join(folder, f'8_{kind}.pt'))
        for key in start:
            assert torch.equal(resumed[key], start[key]), (kind, key)


def test_latest_iter_of_a_missing_step_changes_nothing(full_run, data, tmp_path):
    copy_run(full_run, tmp_path)
    run_dir = tmp_path / 'checkpoints'
    before = snapshot(run_dir, with_dirs=True)
    time.sleep(0.01)  # so that a rewrite would show in the mtimes
    proc = run_train(RUN + data + ['--n_epochs', '2', '--latest_iter', '7'], cwd=tmp_path)
    assert_usage_error(proc, '7_G.pt', '4, 8, 12')
    assert snapshot(run_dir, with_dirs=True) == before


@pytest.mark.parametrize('existing', ['nothing', 'an incomplete step'])
def test_latest_iter_minus_one_without_a_checkpoint(data, tmp_path, existing):
    if existing != 'nothing':
        os.makedirs(model_dir(tmp_path))
        torch.save(Generator(train_opt()).state_dict(), os.path.join(model_dir(tmp_path),
                                                                     '3_G.pt'))  # no 3_D.pt
    before = snapshot(tmp_path, with_dirs=True)
    proc = run_train(RUN + data + ['--n_epochs', '1', '--latest_iter', '-1'], cwd=tmp_path)
    assert_usage_error(proc, '--latest_iter')
    assert snapshot(tmp_path, with_dirs=True) == before  # no folder made, nothing written


def test_a_fresh_run_never_overwrites_an_earlier_one(full_run, data, tmp_path):
    """A new run (no --latest_iter) under the name of a run with checkpoints is refused: it
    would overwrite them at equal step numbers. Nothing of the old run changes."""
    copy_run(full_run, tmp_path)
    before = snapshot(tmp_path / 'checkpoints')
    assert_usage_error(run_train(RUN + data + ['--n_epochs', '1'], cwd=tmp_path),
                       'already holds checkpoints', '--latest_iter -1')
    assert snapshot(tmp_path / 'checkpoints') == before


def test_a_fresh_run_does_not_mix_its_log_with_an_earlier_one(full_run, data, tmp_path):
    """Checkpoints moved away but logs left behind: loss_log.csv must not hold the same step
    twice (the old rows followed by the new run's 1, 2, ... would make the curve run
    backwards)."""
    copy_run(full_run, tmp_path)
    shutil.rmtree(model_dir(tmp_path))
    assert_ok(run_train(RUN + data + ['--n_epochs', '1'], cwd=tmp_path))
    steps = [int(row['step']) for row in loss_rows(tmp_path)]
    assert len(steps) == len(set(steps)), steps


# ----------------------------------------------------------------------------------------
# 3. Killed at any moment
# ----------------------------------------------------------------------------------------

def test_killed_run_leaves_loadable_checkpoints_and_resumes(data, tmp_path):
    log_path = tmp_path / 'killed.log'
    folder = model_dir(tmp_path)
    args = TINY + DATA + AUGMENT + data + ['--seed', '2', '--n_workers', '0', '--n_epochs',
                                           '1000', '--save_freq', '2', '--report_freq', '1',
                                           '--display_freq', '1000']
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, TRAIN_SCRIPT] + args, cwd=str(tmp_path),
                                env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            # Kill as soon as the third generator file appears: most likely while the D or
            # state file of that step is still being written.
            while time.time() < deadline and proc.poll() is None:
                if os.path.isdir(folder) and len(saved_steps_in(folder)) >= 3:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, open(log_path).read()[-3000:]

    # Every file under a final name is complete; only hidden temporaries may be partial.
    for name in os.listdir(folder):
        if name.startswith('.tmp-'):
            continue
        assert re.fullmatch(r'\d+_(G|D|state)\.pt', name), name
        load(os.path.join(folder, name))
    run_dir = tmp_path / 'checkpoints' / 'pix2pixCC'
    with open(run_dir / 'train_options.json') as f:
        assert json.load(f)['seed'] == 2
    rows_before = loss_rows(tmp_path)
    assert rows_before and all(set(row) == set(rows_before[0]) for row in rows_before)
    assert all(int(row['step']) >= 1 for row in rows_before)

    complete = [s for s in saved_steps_in(folder) if all(
        os.path.isfile(os.path.join(folder, f'{s}_{k}.pt')) for k in ('D', 'state'))]
    assert complete, os.listdir(folder)
    newest = complete[-1]
    n_epochs = newest // 6 + 2
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', str(n_epochs)],
                     cwd=tmp_path)
    assert_ok(proc)
    assert first_step(proc.stdout) == newest + 1
    final = n_epochs * 6
    assert max(saved_steps_in(folder)) == final > newest
    assert load(os.path.join(folder, f'{final}_state.pt'))['step'] == final
    # One log row per step, none twice; the rows up to the checkpoint are kept as they were.
    rows = loss_rows(tmp_path)
    assert [int(row['step']) for row in rows] == list(range(1, final + 1))
    assert [row for row in rows if int(row['step']) <= newest] == \
        [row for row in rows_before if int(row['step']) <= newest]


# ----------------------------------------------------------------------------------------
# 4. Seeds
# ----------------------------------------------------------------------------------------

def test_a_drawn_seed_is_recorded_and_reproduces_the_run(data, tmp_path):
    first, second = tmp_path / 'first', tmp_path / 'second'
    first.mkdir(), second.mkdir()
    args = TINY + DATA + AUGMENT + data + ['--n_epochs', '1', '--n_workers', '0']
    proc = run_train(args, cwd=first)  # no --seed
    assert_ok(proc)
    with open(first / 'checkpoints' / 'pix2pixCC' / 'train_options.json') as f:
        seed = json.load(f)['seed']
    assert isinstance(seed, int) and not isinstance(seed, bool)
    assert re.search(rf'seed\W+{seed}\b', proc.stdout)  # printed too
    assert_ok(run_train(args + ['--seed', str(seed)], cwd=second))
    for name in ('6_G.pt', '6_D.pt'):
        assert_same_weights(os.path.join(model_dir(first), name),
                            os.path.join(model_dir(second), name), tolerance=0)


# ----------------------------------------------------------------------------------------
# 5. Options travel from training to Test
# ----------------------------------------------------------------------------------------

# Network and units unlike Test's defaults: if Test did not take them from the training run,
# the checkpoint would not load or the outputs would be in other units and format.
UNITS = ['--n_gf', '8', '--n_df', '8', '--n_downsample', '2', '--n_residual', '1',
         '--trans_conv', 'False', '--padding_type', 'reflection',
         '--data_format_input', 'npy', '--data_format_target', 'npy', '--data_size', '32',
         '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '100',
         '--logscale_target', 'True', '--saturation_lower_limit_target', '1',
         '--saturation_upper_limit_target', '100']


@pytest.fixture(scope='module')
def units_run(tmp_path_factory, data):
    root = tmp_path_factory.mktemp('units_run')
    test_in, _ = make_pairs(root / 'test', 'npy', n=2, size=32, seed=4, prefix='t')
    assert_ok(run_train(['--gpu_ids', '-1', '--dataset_name', 'units', '--n_epochs', '1',
                         '--seed', '1', '--n_workers', '0', '--display_freq', '1000'] + UNITS +
                        data, cwd=root))
    assert saved_steps_in(model_dir(root, 'units')) == [6]
    minimal = ['--dataset_name', 'units', '--iteration', '6', '--input_dir_test', test_in,
               '--gpu_ids', '-1']
    return root, test_in, minimal


def outputs_of(root):
    folder = os.path.join(str(root), 'checkpoints', 'units', 'Image', 'Test', '6')
    return {name: open(os.path.join(folder, name), 'rb').read()
            for name in sorted(os.listdir(folder)) if '_AI.' in name}


def test_test_takes_network_and_units_from_the_training_run(units_run, tmp_path):
    root, test_in, minimal = units_run
    copy_run(root, tmp_path, 'units')
    proc = run_test(minimal, cwd=tmp_path)
    assert_ok(proc)
    adopted = outputs_of(tmp_path)
    assert sorted(adopted) == ['t_000_AI.npy', 't_001_AI.npy']
    for name in adopted:
        values = np.load(os.path.join(tmp_path, 'checkpoints', 'units', 'Image', 'Test', '6',
                                      name))
        assert values.shape == (32, 32) and (values > 0).all()  # 10**x: log-scaled target
    shutil.rmtree(tmp_path / 'checkpoints' / 'units' / 'Image' / 'Test')
    proc = run_test(minimal + ['--gpu_ids', '-1'] + UNITS, cwd=tmp_path)
    assert_ok(proc)
    assert outputs_of(tmp_path) == adopted


def test_an_option_given_to_test_wins_and_the_difference_is_printed(units_run, tmp_path):
    root, test_in, minimal = units_run
    copy_run(root, tmp_path, 'units')
    assert_ok(run_test(minimal, cwd=tmp_path))
    folder = tmp_path / 'checkpoints' / 'units' / 'Image' / 'Test' / '6'
    adopted = {name: np.load(folder / name) for name in os.listdir(folder) if '_AI.' in name}
    proc = run_test(minimal + ['--saturation_upper_limit_target', '1000', '--overwrite'],
                    cwd=tmp_path)
    assert_ok(proc)
    lines = [line for line in proc.stdout.splitlines() if 'saturation_upper_limit_target' in line]
    assert len(lines) == 1 and '1000' in lines[0] and '100' in lines[0], proc.stdout
    # Log limits 1..100 span log10 0..2, 1..1000 span 0..3: the same network output y gives
    # 10**(y + 1) and 10**(1.5 y + 1.5), i.e. the new value is the old one to the power 1.5.
    for name, value in adopted.items():
        np.testing.assert_allclose(np.load(folder / name), value.astype(np.float64) ** 1.5,
                                   rtol=1e-4)


@pytest.mark.parametrize('options_file', ['deleted', 'kept'])
def test_a_checkpoint_that_does_not_fit_names_the_option(units_run, tmp_path, options_file):
    root, test_in, minimal = units_run
    copy_run(root, tmp_path, 'units')
    if options_file == 'deleted':
        os.remove(tmp_path / 'checkpoints' / 'units' / 'train_options.json')
    proc = run_test(minimal + UNITS + ['--n_gf', '16'], cwd=tmp_path)
    assert_usage_error(proc, '6_G.pt', '--n_gf')


# ----------------------------------------------------------------------------------------
# 6. A loss that becomes NaN
# ----------------------------------------------------------------------------------------

def test_non_finite_loss_stops_before_updating_the_weights(in_tmp, monkeypatch, capsys):
    input_dir, target_dir = make_pairs(in_tmp / 'd', 'npy', n=4)
    original = pix2pixCC_Networks.Loss.__call__
    seen = {'calls': 0}

    def poisoned(self, D, G, input, target):
        seen['calls'] += 1
        seen['G'], seen['D'] = G, D
        if seen['calls'] == 3:  # the third step: NaN data, hence a NaN loss
            input = torch.full_like(input, float('nan'))
        return original(self, D, G, input, target)

    monkeypatch.setattr(pix2pixCC_Networks.Loss, '__call__', poisoned)
    status = run_main(pix2pixCC_Train.main,
                      TINY + DATA + ['--n_epochs', '2', '--n_workers', '0', '--save_freq', '2',
                                     '--seed', '1', '--input_dir_train', input_dir,
                                     '--target_dir_train', target_dir])
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.search(r'step 3\b', lines[0]) and '2_G.pt' in lines[0], lines[0]
    assert '--latest_iter 2' in lines[0]
    folder = model_dir(in_tmp)
    assert saved_steps_in(folder) == [2] and saved_steps_in(folder, 'D') == [2]
    # Nothing saved is NaN, and the networks in memory are those of the last good step:
    # the failing step updated nothing.
    for kind in ('G', 'D'):
        saved = load(os.path.join(folder, f'2_{kind}.pt'))
        assert all(torch.isfinite(v).all() for v in saved.values())
        live = pix2pixCC_Utils.bare(seen[kind]).state_dict()
        for key, value in saved.items():
            assert torch.equal(live[key].cpu(), value), (kind, key)


def test_non_finite_loss_in_a_real_run_is_one_line(data, tmp_path):
    """The same stop as a user sees it: an absurd learning rate blows the weights up after
    the first step. Exit status 2 and one line on stderr (no warning lines beside it)."""
    proc = run_train(TINY + DATA + data + ['--n_epochs', '3', '--n_workers', '0', '--seed', '1',
                                           '--save_freq', '1', '--lr', '1e30', '--beta1', '0'],
                     cwd=tmp_path)
    line = assert_usage_error(proc, 'not finite', 'last good checkpoint')
    step = int(re.search(r'step (\d+)', line).group(1))
    saved = saved_steps_in(model_dir(tmp_path))
    assert saved and max(saved) < step
    assert f'{max(saved)}_G.pt' in line and f'--latest_iter {max(saved)}' in line
    for name in os.listdir(model_dir(tmp_path)):
        state = load(os.path.join(model_dir(tmp_path), name))
        if name.endswith(('_G.pt', '_D.pt')):
            assert all(torch.isfinite(v).all() for v in state.values()), name


# ----------------------------------------------------------------------------------------
# 7. Atomic writes
# ----------------------------------------------------------------------------------------

def test_atomic_path_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old complete file')
    with pytest.raises(KeyboardInterrupt):
        with pix2pixCC_Utils.atomic_path(str(path)) as temporary:
            with open(temporary, 'wb') as f:
                f.write(b'half of a new')
            raise KeyboardInterrupt  # as if interrupted mid-write
    assert path.read_bytes() == b'old complete file'
    assert os.listdir(tmp_path) == ['model.pt']


def test_an_interrupted_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    G = Generator(train_opt())
    path = str(tmp_path / '4_G.pt')
    pix2pixCC_Utils.save_state_dict(G, path)
    before = open(path, 'rb').read()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(before[:len(before) // 2])
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(pix2pixCC_Utils.torch, 'save', dies_half_way)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    with pytest.raises(pix2pixCC_Utils.WriteError, match='4_G.pt: No space left on device'):
        pix2pixCC_Utils.save_state_dict(G, path)
    monkeypatch.undo()
    assert open(path, 'rb').read() == before
    assert os.listdir(tmp_path) == ['4_G.pt']
    load(path)
