"""Long runs on shared clusters, as README "Long runs on a cluster" and "Resuming and
reproducibility" document them: a signal stops the run with a checkpoint and the resume
gives the uninterrupted weights, SIGKILL at any moment leaves every saved file whole, one run
per folder (the lock, on any file system), write failures as one line (README "What happens
when…"), atomic writes, training states kept to the newest, branches when resuming from an
older step, the learning-rate decay and TensorBoard; real training processes
(conftest.Training signals one once it has reported a given step) with the TINY network on
six 32x32 npy pairs.
"""
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import machinery.files
import pix2pixCC_Train
import pix2pixCC_Utils
from conftest import (AUGMENT, NPY_DATA, TINY, TORCHRUN, TRAIN_SCRIPT, Training,
                      assert_identical_weights, assert_ok, assert_usage_error, copy_run, load,
                      logged_steps, loss_rows, model_dir, reported_steps, run_command, run_dir,
                      run_test, run_train, saved_steps_in, snapshot, train_opt)
from machinery.files import atomic_path
from pix2pixCC_Networks import Generator
from pix2pixCC_Options import run_main

# Six pairs, batch 1: one epoch at the full lr, then two decaying ones (18 steps); saves at
# 4, 8, 12, 16 and the final 18.
RUN = TINY + NPY_DATA + AUGMENT + ['--seed', '7', '--n_workers', '0', '--save_freq', '4',
                                   '--report_freq', '1', '--display_freq', '1000',
                                   '--n_epochs', '1', '--n_epochs_decay', '2']
FINAL = 18


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, data):
    """The uninterrupted run, every training state kept."""
    root = tmp_path_factory.mktemp('full_run')
    assert_ok(run_train(RUN + data + ['--keep_states', '0'], cwd=root))
    return root


# ----------------------------------------------------------------------------------------
# 1. Stopped by a signal, or killed
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_saves_the_step_reached_and_the_resume_is_exact(signum, full_run, data,
                                                                 tmp_path):
    """Signalled mid-epoch during the lr decay: a complete checkpoint of the step reached, one
    line, exit 128 + signal; `--latest_iter -1` then gives the uninterrupted run's weights
    (resumed for SIGTERM only: the checkpoint is the same whatever the signal)."""
    run = Training(RUN + data, tmp_path)
    run.wait_for(r'Current_step: 7 ')  # epoch 2 (decaying), not a save step
    run.proc.send_signal(signum)
    code, out = run.finish()
    name = signal.Signals(signum).name
    assert code == 128 + signum, out[-3000:]
    stopped = re.search(rf'stopped by {name} at step (\d+); resume with --latest_iter -1', out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 7 <= step < FINAL
    for kind in ('G', 'D', 'state'):
        assert f'{step}_{kind}.pt' in os.listdir(model_dir(tmp_path))
    assert load(os.path.join(model_dir(tmp_path), f'{step}_state.pt'))['step'] == step
    assert not [n for n in os.listdir(model_dir(tmp_path)) if n.startswith('.tmp-')]
    assert 'Traceback' not in out
    if signum != signal.SIGTERM:
        return

    resumed = run_train(['--gpu_ids', '-1', '--latest_iter', '-1'], cwd=tmp_path)
    assert_ok(resumed)
    assert reported_steps(resumed.stdout)[0] == step + 1
    for name in (f'{FINAL}_G.pt', f'{FINAL}_D.pt'):
        assert_identical_weights(os.path.join(model_dir(tmp_path), name),
                                 os.path.join(model_dir(full_run), name))
    assert logged_steps(tmp_path) == list(range(1, FINAL + 1))


def test_a_sigkill_during_the_decay_resumes_to_the_uninterrupted_weights(full_run, data,
                                                                        tmp_path):
    run = Training(RUN + data, tmp_path)
    run.wait_for(r'Current_step: 13 ')
    run.kill()
    assert run.proc.returncode == -signal.SIGKILL
    newest = pix2pixCC_Utils.newest_complete_step(model_dir(tmp_path))
    assert newest in (12, 16)  # the last save before the kill, during the decay
    resumed = run_train(['--gpu_ids', '-1', '--latest_iter', '-1'], cwd=tmp_path)
    assert_ok(resumed)  # the lock of the killed run does not block
    assert reported_steps(resumed.stdout)[0] == newest + 1
    assert_identical_weights(os.path.join(model_dir(tmp_path), f'{FINAL}_G.pt'),
                             os.path.join(model_dir(full_run), f'{FINAL}_G.pt'))


def test_killed_run_leaves_loadable_checkpoints_and_resumes(data, tmp_path):
    """SIGKILL while a checkpoint is most likely being written: every file under a final
    name loads, the log is consistent, and the newest complete step resumes, continuing the
    log without a step twice."""
    folder = model_dir(tmp_path)
    run = Training(TINY + NPY_DATA + AUGMENT + data + [
        '--seed', '2', '--n_workers', '0', '--n_epochs', '1000', '--save_freq', '2',
        '--report_freq', '1', '--display_freq', '1000'], tmp_path)
    try:
        deadline = time.time() + 120
        # Kill as soon as the third generator file appears: most likely while the D or
        # state file of that step is still being written.
        while time.time() < deadline and run.proc.poll() is None:
            if os.path.isdir(folder) and len(saved_steps_in(folder)) >= 3:
                break
            time.sleep(0.02)
        run.proc.send_signal(signal.SIGKILL)
    finally:
        run.kill()
    code, out = run.finish()
    assert code == -signal.SIGKILL, out[-3000:]

    # Every file under a final name is complete; only hidden temporaries may be partial.
    for name in os.listdir(folder):
        if name.startswith('.tmp-'):
            continue
        assert re.fullmatch(r'\d+_(G|D|state)\.pt', name), name
        load(os.path.join(folder, name))
    with open(os.path.join(run_dir(tmp_path), 'train_options.json')) as f:
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
    assert reported_steps(proc.stdout)[0] == newest + 1
    final = n_epochs * 6
    assert max(saved_steps_in(folder)) == final > newest
    assert load(os.path.join(folder, f'{final}_state.pt'))['step'] == final
    # One log row per step, none twice; the rows up to the checkpoint are kept as they were.
    rows = loss_rows(tmp_path)
    assert [int(row['step']) for row in rows] == list(range(1, final + 1))
    assert [row for row in rows if int(row['step']) <= newest] == \
        [row for row in rows_before if int(row['step']) <= newest]


def sigint_after_step(n):
    """A pix2pixCC_Train.train_step that sends this process SIGINT (Ctrl-C) after its n-th
    step."""
    step, calls = pix2pixCC_Train.train_step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        result = step(*args, **kwargs)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    return step_then_interrupt


def test_a_second_sigint_aborts_at_once_and_leaves_complete_files(data, tmp_path,
                                                                  monkeypatch, capfd):
    """Ctrl-C at step 6, and Ctrl-C again while the stop's checkpoint is being written: exit
    130 at once, one line; the step-4 checkpoint is whole and nothing of step 6 remains."""
    monkeypatch.chdir(tmp_path)
    save = pix2pixCC_Utils.save_state_dict

    def interrupt_the_stop_save(module, path):
        if path.endswith('6_G.pt'):
            os.kill(os.getpid(), signal.SIGINT)
        return save(module, path)

    monkeypatch.setattr(pix2pixCC_Train, 'train_step', sigint_after_step(6))
    monkeypatch.setattr(pix2pixCC_Utils, 'save_state_dict', interrupt_the_stop_save)
    assert run_main(pix2pixCC_Train.main, RUN + data + ['--n_epochs', '100']) == 130
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].endswith('aborted by a second SIGINT after step 6; the newest complete '
                              'checkpoint, ./checkpoints/pix2pixCC/Model/4_G.pt (step 4), is '
                              'intact; resume with --latest_iter -1'), lines
    assert 'SIGINT received' in lines[0] and len(lines) == 2, lines
    folder = model_dir(tmp_path)
    assert sorted(os.listdir(folder)) == ['4_D.pt', '4_G.pt', '4_state.pt']
    for name in os.listdir(folder):
        load(os.path.join(folder, name))


def test_a_signal_before_the_first_step_exits_cleanly(tmp_path, data, monkeypatch, capsys):
    """SIGTERM while the data are being checked: exit 143, one line, nothing saved."""
    monkeypatch.chdir(tmp_path)
    checked = pix2pixCC_Train.check_data

    def check_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return checked(*args, **kwargs)

    monkeypatch.setattr(pix2pixCC_Train, 'check_data', check_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    assert run_main(pix2pixCC_Train.main, RUN + data) == 143
    err = capsys.readouterr().err
    assert 'stopped by SIGTERM before the first training step; nothing was saved' in err
    assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))  # a new run leaves nothing
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers are given back


def parent_pid(pid):
    with open(f'/proc/{pid}/stat') as f:
        return int(f.read().rsplit(')', 1)[1].split()[1])


def rank_pid(torchrun_pid, rank):
    """The pid of the torchrun worker process with RANK=`rank` (a child of torchrun's)."""
    for name in filter(str.isdigit, os.listdir('/proc')):
        try:
            if parent_pid(name) != torchrun_pid:
                continue
            with open(f'/proc/{name}/environ', 'rb') as f:
                if f'RANK={rank}'.encode() in f.read().split(b'\0'):
                    return int(name)
        except OSError:
            continue
    raise AssertionError(f'no rank {rank} among the children of {torchrun_pid}')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc (Linux only)')
def test_under_torchrun_a_signal_to_one_process_stops_every_process_at_one_step(data,
                                                                                tmp_path):
    """SIGTERM to rank 1 only: both processes stop at the same step and rank 0 saves it.
    (That a resumed torchrun run continues exactly is test_distributed's.)"""
    args = RUN + data + ['--n_epochs_decay', '0', '--n_epochs', '100']
    run = Training(args, tmp_path, TORCHRUN)
    run.wait_for(r'Current_step: 8 ')
    os.kill(rank_pid(run.proc.pid, 1), signal.SIGTERM)
    code, out = run.finish()
    assert code != 0, out[-3000:]
    stopped = re.search(r'stopped by SIGTERM at step (\d+)', out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert step % 2 == 0 and step < 600, out[-3000:]
    assert saved_steps_in(model_dir(tmp_path), 'state')[-1] == step
    state = load(os.path.join(model_dir(tmp_path), f'{step}_state.pt'))
    assert state['step'] == step


@pytest.mark.parametrize('wrapped', [False, True], ids=['plain', 'wrapped-by-the-library'])
def test_a_stop_signal_while_the_resumed_checkpoint_loads_is_a_stop(full_run, tmp_path,
                                                                    monkeypatch, capsys,
                                                                    wrapped):
    """SIGUSR1 arrives inside torch.load: exit 138 with the stop line, not 'cannot load' (which
    would tell the user to delete a good file and keep a requeue script from requeueing),
    also when the library turns the interruption into an error of its own."""
    copy_run(full_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(run_dir(tmp_path))
    real_load = torch.load

    def interrupted_load(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            return real_load(*args, **kwargs)
        except Exception as error:
            if wrapped:  # as torch's weights-only unpickler reports what went wrong inside
                raise pickle.UnpicklingError(f'Weights only load failed: {error}') from None
            raise

    monkeypatch.setattr(torch, 'load', interrupted_load)
    assert run_main(pix2pixCC_Train.main, ['--gpu_ids', '-1', '--latest_iter', '-1']) == 138
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith(
        'error: stopped by SIGUSR1 before the first training step; nothing was saved'), err
    assert 'cannot load' not in err
    assert snapshot(run_dir(tmp_path)) == before


@pytest.mark.parametrize('kind', ['G', 'D', 'state'])
def test_a_second_sigint_inside_any_write_of_the_stop_checkpoint_aborts_cleanly(
        kind, data, tmp_path, monkeypatch, capfd):
    """Ctrl-C at step 6, and Ctrl-C again while torch.save is writing the stop's `6_<kind>.pt`
    (torch then reports a broken stream): exit 130 with one line and no traceback; no file of
    step 6 remains, and step 4 is complete."""
    monkeypatch.chdir(tmp_path)
    real_save = torch.save

    def save_interrupted_inside(data, file, *args, **kwargs):
        if getattr(getattr(file, 'file', None), 'name', '').endswith(f'-6_{kind}.pt'):
            write, writes = file.write, []

            def write_then_interrupt(chunk):
                writes.append(len(chunk))
                if len(writes) == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return write(chunk)
            file.write = write_then_interrupt
        return real_save(data, file, *args, **kwargs)

    monkeypatch.setattr(pix2pixCC_Train, 'train_step', sigint_after_step(6))
    monkeypatch.setattr(torch, 'save', save_interrupted_inside)
    assert run_main(pix2pixCC_Train.main, RUN + data + ['--n_epochs', '100']) == 130
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 'Traceback' not in err
    assert 'SIGINT received' in lines[0] and len(lines) == 2, lines
    assert lines[-1].endswith('aborted by a second SIGINT after step 6; the newest complete '
                              'checkpoint, ./checkpoints/pix2pixCC/Model/4_G.pt (step 4), is '
                              'intact; resume with --latest_iter -1'), lines
    folder = model_dir(tmp_path)
    assert sorted(os.listdir(folder)) == ['4_D.pt', '4_G.pt', '4_state.pt']
    for name in os.listdir(folder):
        load(os.path.join(folder, name))


# ----------------------------------------------------------------------------------------
# 2. One run per folder: the lock, on any file system
# ----------------------------------------------------------------------------------------

def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(data, tmp_path):
    first = Training(RUN + data + ['--n_epochs', '100', '--n_epochs_decay', '0'], tmp_path)
    try:
        first.wait_for(r'saved .*/4_G\.pt')
        started = time.time()
        second = run_train(RUN + data, cwd=tmp_path)
        line = assert_usage_error(second, 'another training run is using',
                                  f'process {first.proc.pid} on host', 'started',
                                  '--dataset_name')
        assert time.time() - started < 30, line
        resumed = run_train(RUN + data + ['--latest_iter', '-1'], cwd=tmp_path)
        assert_usage_error(resumed, f'process {first.proc.pid}')
        # The Test script only reads checkpoints: never blocked.
        test_in = data[1]
        assert_ok(run_test(TINY + NPY_DATA + ['--input_dir_test', test_in, '--iteration', '4'],
                           cwd=tmp_path))
        first.wait_for(r'Current_step: 14 ')
        first.proc.send_signal(signal.SIGTERM)
        code, out = first.finish()
        assert code == 143, out[-3000:]
    finally:
        first.kill()
    steps = logged_steps(tmp_path)
    assert steps == list(range(1, steps[-1] + 1))  # the first run's log, each step once


@pytest.mark.parametrize('code', [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_without_flock_trains_with_one_warning(code, data, tmp_path,
                                                             monkeypatch, capsys):
    """NFS without lockd, Lustre without flock: flock fails with something other than 'held
    by another process'. The run trains, saying once that a second run would go unnoticed."""
    import fcntl
    monkeypatch.chdir(tmp_path)

    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, 'flock', no_flock)
    assert run_main(pix2pixCC_Train.main, TINY + NPY_DATA + data + ['--n_workers', '0',
                                                                 '--n_epochs', '1']) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith('warning: cannot lock')]
    assert len(warnings) == 1, out
    assert os.strerror(code) in warnings[0] and 'would not be detected' in warnings[0]
    assert saved_steps_in(model_dir(tmp_path)) == [6]


def test_the_lock_file_is_never_written_through_a_symbolic_link(data, tmp_path):
    """A run folder copied with links (cp -s) has a train.lock that points into another run:
    the run replaces the link with a file of its own, and the file it pointed to is as it
    was."""
    other = tmp_path / 'other_run.lock'
    other.write_text('process 4242 on host elsewhere, started 2026-11-25T14:02:11+00:00\n')
    os.makedirs(run_dir(tmp_path))
    os.symlink(other, os.path.join(run_dir(tmp_path), 'train.lock'))
    assert_ok(run_train(TINY + NPY_DATA + data + ['--n_workers', '0', '--n_epochs', '1'],
                        cwd=tmp_path))
    assert other.read_text() == 'process 4242 on host elsewhere, started ' \
                                '2026-11-25T14:02:11+00:00\n'
    assert not os.path.lexists(os.path.join(run_dir(tmp_path), 'train.lock'))


def test_a_finished_run_leaves_no_lock_file_and_a_refused_one_no_folder(data, tmp_path):
    assert_ok(run_train(TINY + NPY_DATA + data + ['--n_workers', '0', '--n_epochs', '1'],
                        cwd=tmp_path))
    assert 'train.lock' not in os.listdir(run_dir(tmp_path))

    # Refused before its first step (a folder that does not exist, then files of another
    # format): no run folder, no ./checkpoints, nothing for the Test script to list.
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    for mistake in (['--input_dir_train', str(tmp_path / 'nowhere')],
                    ['--data_format_input', 'fits']):
        assert_usage_error(run_train(TINY + NPY_DATA + data + ['--n_workers', '0', *mistake],
                                     cwd=elsewhere))
        assert os.listdir(elsewhere) == []
    os.makedirs(tmp_path / 'checkpoints' / 'refused' / 'Model')  # as an older version left it
    listing = run_test(TINY + NPY_DATA + ['--dataset_name', 'pix2pixCX', '--input_dir_test',
                                      data[1]], cwd=tmp_path)
    assert_usage_error(listing, "did you mean 'pix2pixCC'", 'runs there: pix2pixCC;')


# ----------------------------------------------------------------------------------------
# 3. Write failures and atomic writes
# ----------------------------------------------------------------------------------------

def mount_tmpfs(folder, size):
    os.makedirs(folder, exist_ok=True)
    try:
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs',
                               str(folder)], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def test_a_full_disk_gives_one_line_and_keeps_the_earlier_checkpoint(data, tmp_path,
                                                                     monkeypatch, capsys):
    """A real small filesystem where one can be mounted (root), otherwise ENOSPC injected
    into the third checkpoint's write."""
    checkpoints = tmp_path / 'checkpoints'
    mounted = mount_tmpfs(checkpoints, '1300k')
    try:
        if mounted:
            proc = run_train(RUN + data + ['--n_epochs', '20', '--n_epochs_decay', '0'],
                             cwd=tmp_path)
            code, err = proc.returncode, proc.stderr
        else:
            monkeypatch.chdir(tmp_path)
            real_save = torch.save

            def fill_disk(data_, file, *args, **kwargs):
                if len(pix2pixCC_Utils.saved_steps(model_dir(tmp_path), 'G')) >= 2:
                    file.write(b'\0' * 1000)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_save(data_, file, *args, **kwargs)

            monkeypatch.setattr(torch, 'save', fill_disk)
            code = run_main(pix2pixCC_Train.main,
                            RUN + data + ['--n_epochs', '20', '--n_epochs_decay', '0'])
            err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert 'Traceback' not in err
        match = re.search(r'cannot write (\S+): No space left on device; the newest complete '
                          r'checkpoint, (\S+)_G\.pt \(step (\d+)\), is intact; resume with '
                          r'--latest_iter -1', lines[0])
        assert match, lines[0]
        step = int(match.group(3))
        folder = model_dir(tmp_path)
        names = os.listdir(folder)
        assert not [n for n in names if n.startswith('.tmp-')], names
        for kind in ('G', 'D', 'state'):
            load(os.path.join(folder, f'{step}_{kind}.pt'))
        for name in names:
            load(os.path.join(folder, name))  # nothing truncated under a final name
    finally:
        if mounted:
            subprocess.run(['umount', str(checkpoints)])


@pytest.mark.parametrize('target, code', [
    ('_state.pt', errno.EDQUOT), ('_G.pt', errno.EIO), ('loss_log.csv', errno.ENOSPC),
    ('_real.png', errno.EACCES)])
def test_write_errors_name_the_file_and_the_checkpoint(target, code, data, tmp_path,
                                                       monkeypatch, capsys):
    """Checkpoints, logs and images: the file, the operating system's reason, the newest
    complete checkpoint; exit 2, no temporary left behind."""
    monkeypatch.chdir(tmp_path)
    real_replace = os.replace

    def failing_replace(source, destination):
        if destination.endswith(target) and \
                os.path.isfile(os.path.join(model_dir(tmp_path), '4_state.pt')):
            raise OSError(code, os.strerror(code))
        return real_replace(source, destination)

    monkeypatch.setattr(os, 'replace', failing_replace)
    assert run_main(pix2pixCC_Train.main, RUN + data + ['--display_freq', '1']) == 2
    line = capsys.readouterr().err.strip()
    assert '\n' not in line
    assert "cannot write ./checkpoints/pix2pixCC/" in line and target in line, line
    assert os.strerror(code) in line, line
    assert 'the newest complete checkpoint, ./checkpoints/pix2pixCC/Model/4_G.pt (step 4), ' \
           'is intact; resume with --latest_iter -1' in line, line
    for folder, _, names in os.walk(run_dir(tmp_path)):
        assert not [n for n in names if n.startswith('.tmp-')], (folder, names)


def test_atomic_path_writes_a_whole_file_or_nothing(tmp_path):
    """A file takes its name only once written whole; a block that fails (an error, or
    Ctrl-C mid-write) leaves the old file as it was, or none, and no temporary."""
    target = tmp_path / 'out.npy'
    with atomic_path(str(target)) as temporary:
        assert temporary.endswith('.npy') and temporary != str(target)
        np.save(temporary, np.arange(3))
        assert not target.exists()
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_path(str(tmp_path / 'bad.npy')) as temporary:
            np.save(temporary, np.arange(3))
            raise RuntimeError('killed mid-write')
    assert sorted(os.listdir(tmp_path)) == ['out.npy']  # nothing partial, no temporary left
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old complete file')
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(path)) as temporary:
            with open(temporary, 'wb') as f:
                f.write(b'half of a new')
            raise KeyboardInterrupt  # as if interrupted mid-write
    assert path.read_bytes() == b'old complete file'
    assert sorted(os.listdir(tmp_path)) == ['model.pt', 'out.npy']


def test_an_interrupted_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    G = Generator(train_opt())
    path = str(tmp_path / '4_G.pt')
    pix2pixCC_Utils.save_state_dict(G, path)
    before = open(path, 'rb').read()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(before[:len(before) // 2])
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(machinery.files.torch, 'save', dies_half_way)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    with pytest.raises(machinery.files.WriteError, match='4_G.pt: No space left on device'):
        pix2pixCC_Utils.save_state_dict(G, path)
    monkeypatch.undo()
    assert open(path, 'rb').read() == before
    assert os.listdir(tmp_path) == ['4_G.pt']
    load(path)


# ----------------------------------------------------------------------------------------
# 4. Disk use
# ----------------------------------------------------------------------------------------

def state_files(root):
    return saved_steps_in(model_dir(root), 'state')


def test_only_the_newest_training_state_is_kept_and_older_steps_still_resume(full_run,
                                                                             data, tmp_path):
    assert_ok(run_train(RUN + data, cwd=tmp_path))
    assert state_files(tmp_path) == [FINAL]
    for step in (4, 8, 12, 16, FINAL):  # every network checkpoint stays
        assert {f'{step}_G.pt', f'{step}_D.pt'} <= set(os.listdir(model_dir(tmp_path)))
    assert state_files(full_run) == [4, 8, 12, 16, FINAL]  # --keep_states 0: all

    # A step whose state was deleted resumes from its weights, with a notice; --keep_states 2
    # then keeps the two newest.
    resumed = run_train(['--gpu_ids', '-1', '--latest_iter', '8', '--n_epochs_decay', '3',
                         '--keep_states', '2'], cwd=tmp_path)
    assert_ok(resumed)
    assert 'notice: no ./checkpoints/pix2pixCC/Model/8_state.pt; resuming from the weights ' \
           'alone' in resumed.stdout
    assert reported_steps(resumed.stdout)[0] == 9
    assert state_files(tmp_path) == [20, 24]


# ----------------------------------------------------------------------------------------
# 5. Learning-rate decay
# ----------------------------------------------------------------------------------------

def test_the_lr_of_every_epoch_follows_the_linear_decay(full_run):
    """--n_epochs 1 --n_epochs_decay 2: epoch e uses lr * (1 - (e - 1) / 3)."""
    lr = 2e-4
    expected = {1: lr, 2: lr * (1 - 1 / 3), 3: lr * (1 - 2 / 3)}
    for row in loss_rows(full_run):
        assert float(row['lr']) == pytest.approx(expected[int(row['epoch'])], rel=1e-12)
    for step, epoch in ((4, 1), (8, 2), (16, 3)):
        state = load(os.path.join(model_dir(full_run), f'{step}_state.pt'))
        assert state['epoch'] == epoch
        for name in ('G_optim', 'D_optim'):
            assert state[name]['param_groups'][0]['lr'] == pytest.approx(expected[epoch])


def test_a_new_schedule_given_on_resume_applies_from_the_resumed_epoch(full_run, tmp_path):
    copy_run(full_run, tmp_path)
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '12', '--lr', '0.001',
                      '--n_epochs_decay', '4'], cwd=tmp_path)
    assert_ok(proc)
    rows = loss_rows(tmp_path)
    assert logged_steps(tmp_path) == list(range(1, 6 * 5 + 1))
    for row in rows:
        epoch = int(row['epoch'])
        expected = 2e-4 * (1 - (epoch - 1) / 3) if epoch <= 2 else 1e-3 * (1 - (epoch - 1) / 5)
        assert float(row['lr']) == pytest.approx(expected, rel=1e-12), row
    assert 'Epoch: 5/5' in proc.stdout


# ----------------------------------------------------------------------------------------
# 6. TensorBoard
# ----------------------------------------------------------------------------------------

def read_events(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir(root), 'tensorboard'),
                              size_guidance={'scalars': 0, 'images': 0, 'tensors': 0})
    events.Reload()
    return events


def test_tensorboard_holds_losses_lr_panels_validation_and_options(data, tmp_path):
    pytest.importorskip('tensorboard', reason='tensorboard is an optional dependency')
    input_dir, target_dir = data[1], data[3]
    args = RUN + data + ['--tensorboard', '--display_freq', '6', '--val_during_train',
                         '--input_dir_test', input_dir, '--target_dir_test', target_dir]
    run = Training(args, tmp_path)
    run.wait_for(r'Current_step: 10 ')
    run.proc.send_signal(signal.SIGTERM)
    code, out = run.finish()
    assert code == 143, out[-3000:]
    # Each validation says so in the log, with the mean CC (README "Output files").
    assert re.search(r'validation at step 4: \d+ file\(s\) in \S+; mean cc_1x1 -?\d\.\d{4}',
                     out), out[-3000:]
    assert_ok(run_train(['--gpu_ids', '-1', '--latest_iter', '-1'], cwd=tmp_path))

    events = read_events(tmp_path)
    tags = events.Tags()
    for name in ('loss/D', 'loss/G', 'loss/G_LSGAN', 'loss/G_FM', 'loss/G_CC', 'train/CC',
                 'train/lr', 'validation/cc_1x1', 'validation/rmse_8x8'):
        assert name in tags['scalars'], (name, tags['scalars'])
    assert 'panel' in tags['images']
    assert any('options' in tag for tag in tags['tensors']), tags
    # The resumed run continues the curves: every step once, in order.
    steps = [event.step for event in events.Scalars('loss/G')]
    assert steps == list(range(1, FINAL + 1))
    lrs = {event.step: event.value for event in events.Scalars('train/lr')}
    assert lrs[1] == pytest.approx(2e-4) and lrs[FINAL] == pytest.approx(2e-4 / 3, rel=1e-6)
    # SIGTERM, sent on seeing step 10's report, ends the run after the step in progress:
    # step 10, or 11 when the run was already in it; its checkpoint is validated too.
    stopped = int(re.search(r'stopped by SIGTERM at step (\d+)', out).group(1))
    assert stopped in (10, 11), out[-3000:]
    assert [e.step for e in events.Scalars('validation/cc_1x1')] == \
        sorted({4, 8, stopped, 12, 16, FINAL})


def test_tensorboard_asked_for_but_not_installed_is_one_line(data, tmp_path):
    code = ("import sys; sys.modules['tensorboard'] = None; "
            "sys.argv[0] = 'pix2pixCC_Train.py'; "
            f"sys.path.insert(0, {os.path.dirname(TRAIN_SCRIPT)!r}); "
            "import pix2pixCC_Train as t; from pix2pixCC_Options import run_main; "
            "sys.exit(run_main(t.main))")
    proc = run_command([sys.executable, '-c', code, *RUN, *data, '--tensorboard'], tmp_path,
                       timeout=120)
    assert_usage_error(proc, '--tensorboard', 'pip install tensorboard')
    assert not os.path.exists(os.path.join(run_dir(tmp_path), 'Model'))


def test_a_new_run_where_an_earlier_one_saved_nothing_starts_fresh_curves(data, tmp_path):
    """An earlier run's events stay only with its checkpoints: a new run in a folder whose
    earlier run ended before its first save draws each step once."""
    pytest.importorskip('tensorboard', reason='tensorboard is an optional dependency')
    short = TINY + NPY_DATA + data + ['--n_workers', '0', '--n_epochs', '1', '--report_freq', '1',
                                  '--tensorboard']
    assert_ok(run_train(short + ['--seed', '1'], cwd=tmp_path))
    for name in os.listdir(model_dir(tmp_path)):  # as if it had died before its first save
        os.remove(os.path.join(model_dir(tmp_path), name))
    assert_ok(run_train(short + ['--seed', '2'], cwd=tmp_path))
    assert [event.step for event in read_events(tmp_path).Scalars('loss/G')] == \
        list(range(1, 7))


# ----------------------------------------------------------------------------------------
# 7. Resuming: branches, finished runs, copied run folders
# ----------------------------------------------------------------------------------------

def checkpoint_names(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith('.pt'))


def test_resuming_from_an_older_step_starts_a_new_branch(full_run, data, tmp_path):
    """Saved 4..18; resumed from 8 with a new --lr and stopped at step 10 or so; the requeued
    `--latest_iter -1` continues the new branch (not the abandoned 18) and ends with the
    weights of the branch run without the stop. The abandoned files are moved, not deleted,
    and the Test script's `--iteration -1` sees only the live branch."""
    branch = ['--gpu_ids', '-1', '--latest_iter', '8', '--lr', '0.0001']
    whole, stopped = tmp_path / 'whole', tmp_path / 'stopped'
    for root in (whole, stopped):
        copy_run(full_run, root)
    assert_ok(run_train(branch, cwd=whole))

    run = Training(branch, stopped)
    notice = run.wait_for(r'^notice: resuming from step 8, older than the newest checkpoint, '
                          r'starts a new branch: the 3 newer checkpoint\(s\) \(step 12, 16, '
                          r'18\) were moved to (\S+)$')
    run.wait_for(r'Current_step: 10 ')
    run.proc.send_signal(signal.SIGTERM)
    code, out = run.finish()
    assert code == 143, out[-3000:]
    step = int(re.search(r'stopped by SIGTERM at step (\d+)', out).group(1))
    superseded = os.path.normpath(os.path.join(str(stopped), notice.group(1)))
    assert os.path.dirname(superseded) == os.path.join(model_dir(stopped), 'superseded')
    assert checkpoint_names(superseded) == sorted(f'{s}_{kind}.pt' for s in (12, 16, FINAL)
                                                  for kind in ('G', 'D', 'state'))
    for name in checkpoint_names(superseded):  # moved whole, byte for byte
        with open(os.path.join(superseded, name), 'rb') as moved, \
                open(os.path.join(model_dir(full_run), name), 'rb') as original:
            assert moved.read() == original.read()
    assert saved_steps_in(model_dir(stopped)) == [4, 8, step]
    test = run_test(TINY + NPY_DATA + ['--input_dir_test', data[1], '--iteration', '-1',
                                   '--n_workers', '0'], cwd=stopped)
    assert_ok(test)
    assert [int(n) for n in re.findall(r'^iteration (\d+): ', test.stdout, re.MULTILINE)] == \
        [4, 8, step]

    resumed = run_train(['--gpu_ids', '-1', '--latest_iter', '-1'], cwd=stopped)
    assert_ok(resumed)
    assert reported_steps(resumed.stdout)[0] == step + 1
    assert 'new branch' not in resumed.stdout
    for kind in ('G', 'D'):
        assert_identical_weights(os.path.join(model_dir(stopped), f'{FINAL}_{kind}.pt'),
                                 os.path.join(model_dir(whole), f'{FINAL}_{kind}.pt'))


def test_resuming_a_finished_run_says_that_nothing_is_left_to_train(full_run, tmp_path):
    copy_run(full_run, tmp_path)
    before = snapshot(run_dir(tmp_path))
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '-1'], cwd=tmp_path)
    assert_ok(proc)
    assert f'nothing left to train: the run is at step {FINAL}' in proc.stdout
    assert 'resume with a larger --n_epochs or --n_epochs_decay' in proc.stdout
    assert snapshot(run_dir(tmp_path)) == before


def test_a_run_folder_copied_under_another_name_is_resumed_where_the_command_says(
        data, tmp_path):
    """The copy is resumed without --dataset_name (so the default name, the copy's): the
    original run, whose name the saved options hold, is not touched."""
    assert_ok(run_train(RUN + data + ['--dataset_name', 'original', '--n_epochs_decay', '0'],
                        cwd=tmp_path))
    original = run_dir(tmp_path, 'original')
    shutil.copytree(original, run_dir(tmp_path))
    before = snapshot(original)
    proc = run_train(['--gpu_ids', '-1', '--latest_iter', '-1', '--n_epochs', '2'],
                     cwd=tmp_path)
    assert_ok(proc)
    assert snapshot(original) == before
    assert saved_steps_in(model_dir(tmp_path))[-1] == 12
    assert 'run: ./checkpoints/pix2pixCC (resuming from step 6' in proc.stdout
