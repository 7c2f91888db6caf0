"""Tiled inference (README "Full-resolution images"): `--tile_size N` gives the whole-image
output to 1e-5 of its range for every normalisation, padding, upsampling and channel count
and for sizes that are not multiples of N or of 2**n_downsample, in the Test script and in
--val_during_train; the temporary folder goes after a normal run, an error and a SIGTERM;
tiles are taken by themselves when a whole image would not fit in memory; the errors; the
benchmark of BENCHMARKS.md ("Full-resolution images")."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from machinery.tile_graph import tile_plan
from machinery import tile_memory, tiles, translation
import pix2pixCC_Test
import pix2pixCC_Train
from conftest import (NPY_DATA, REPO, SUBPROCESS_ENV, TEST_SCRIPT, TINY, TINY_NETWORK, field,
                      make_test_opt, train_opt)
from pix2pixCC_Networks import Generator
from pix2pixCC_Options import UserError, run_main

HEIGHT, WIDTH = 45, 70  # neither a multiple of the tile nor of 2**n_downsample (4)
TILE = 16


def assert_same_output(tiled, whole):
    """Equal to 1e-5 of the whole-image output's range."""
    tiled, whole = np.asarray(tiled, np.float64), np.asarray(whole, np.float64)
    assert tiled.shape == whole.shape
    span = whole.max() - whole.min()
    assert span > 0
    assert np.abs(tiled - whole).max() <= 1e-5 * span, np.abs(tiled - whole).max() / span


def random_generator(*argv):
    """A tiny Generator with random weights in eval mode; a BatchNorm one with the running
    statistics of a few training-mode passes (not the initial 0 and 1)."""
    opt = make_test_opt(*argv)
    G = Generator(opt)
    if opt.norm_type == 'BatchNorm2d':
        for layer in G.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.momentum = None  # the plain mean of the passes
        with torch.no_grad():
            for _ in range(2):
                G(torch.randn(2, opt.input_ch, 32, 32) * 2 + 0.5)
    return G.eval(), opt


@pytest.fixture
def tiled_calls(monkeypatch):
    """The tile sizes with which `tiled_generate` runs (so that a test knows tiles ran)."""
    calls, tiled = [], translation.tiled_generate

    def spy(G, input, tile_size, *args, **kwargs):
        calls.append(tile_size)
        return tiled(G, input, tile_size, *args, **kwargs)

    monkeypatch.setattr(translation, 'tiled_generate', spy)
    return calls


@pytest.mark.parametrize('norm, padding, trans_conv, channels', list(itertools.product(
    ('InstanceNorm2d', 'BatchNorm2d'), ('reflection', 'replication', 'zero'), (True, False),
    (1, 3))))
def test_tiles_give_the_whole_image_output(norm, padding, trans_conv, channels, tmp_path,
                                           tiled_calls):
    G, opt = random_generator('--norm_type', norm, '--padding_type', padding, '--trans_conv',
                              str(trans_conv), '--input_ch', str(channels), '--target_ch',
                              str(channels))
    x = torch.randn(1, channels, HEIGHT, WIDTH)
    with torch.inference_mode():
        whole = translation.generate(G, x, opt.n_downsample)
        tiled = translation.generate(G, x, opt.n_downsample, tile_size=TILE,
                                        tmp_dir=str(tmp_path))
    assert tiled_calls == [TILE]
    assert_same_output(tiled, whole)
    assert os.listdir(tmp_path) == []  # the temporary folder is gone


@pytest.mark.parametrize('tile_size', [32, 64])
def test_a_batch_and_larger_tiles(tile_size, tiled_calls):
    """Each sample with its own statistics; tiles that cover the deepest layers at once,
    and (64) keep their maps in memory."""
    G, opt = random_generator()
    x = torch.randn(2, 1, HEIGHT, WIDTH)
    with torch.inference_mode():
        whole = translation.generate(G, x, opt.n_downsample)
        tiled = translation.generate(G, x, opt.n_downsample, tile_size=tile_size)
    assert tiled_calls == [tile_size]
    assert_same_output(tiled[0], whole[0])
    assert_same_output(tiled[1], whole[1])


def test_an_image_no_larger_than_the_tile_runs_whole(tiled_calls):
    G, opt = random_generator()
    with torch.inference_mode():
        translation.generate(G, torch.randn(1, 1, 30, 32), opt.n_downsample, tile_size=32)
    assert tiled_calls == []


# ----------------------------------------------------------------------------------------
# The Test script and --val_during_train
# ----------------------------------------------------------------------------------------

RUN = TINY + NPY_DATA + ['--dataset_name', 'tiles', '--n_workers', '0', '--iteration', '3']


@pytest.fixture
def run(in_tmp):
    """A run folder with a random generator at step 3 and two odd-sized test inputs;
    returns the Test arguments."""
    model = in_tmp / 'checkpoints' / 'tiles' / 'Model'
    os.makedirs(model)
    G, _ = random_generator()
    torch.save(G.state_dict(), model / '3_G.pt')
    os.makedirs('in')
    for i in range(2):
        np.save(f'in/img_{i}.npy', field(1, size=WIDTH, seed=i)[0, :HEIGHT])
    return RUN + ['--input_dir_test', 'in']


def outputs(folder):
    return [np.load(os.path.join(folder, f'img_{i}_AI.npy')) for i in range(2)]


def test_test_script_with_tiles_writes_the_whole_image_outputs(run, tiled_calls):
    os.makedirs('tmp')
    assert pix2pixCC_Test.main(run + ['--output_dir', 'whole']) == 0
    assert tiled_calls == []
    assert pix2pixCC_Test.main(run + ['--output_dir', 'tiled', '--tile_size', str(TILE),
                                      '--tmp_dir', 'tmp']) == 0
    assert tiled_calls == [TILE, TILE]
    for tiled, whole in zip(outputs('tiled'), outputs('whole'), strict=True):
        assert_same_output(tiled, whole)
    assert os.listdir('tmp') == []
    # The same files, so the same run: the folder of one takes the outputs of the other.
    assert pix2pixCC_Test.main(run + ['--output_dir', 'whole', '--tile_size', str(TILE)]) == 0


def test_tiles_are_taken_when_a_whole_image_would_not_fit(run, tiled_calls, monkeypatch,
                                                          capsys):
    assert pix2pixCC_Test.main(run + ['--output_dir', 'whole']) == 0
    opt = make_test_opt('--input_ch', '1')
    need = tile_memory.whole_image_bytes(tile_plan(Generator(opt).eval()), (1, 48, 72))
    monkeypatch.setattr(tile_memory, 'available_memory', lambda device: (need - 1, 'a test'))
    capsys.readouterr()
    assert pix2pixCC_Test.main(run + ['--output_dir', 'tiled']) == 0
    notices = [line for line in capsys.readouterr().out.splitlines() if 'tiles' in line]
    assert len(notices) == 1, notices
    assert notices[0].startswith('notice: a whole-image pass over 2 of the 2 input(s)')
    assert 'in tiles of' in notices[0] and '--tile_size' in notices[0]
    assert 'available (a test)' in notices[0]  # where the figure comes from
    assert len(tiled_calls) == 2 and tiled_calls[0] < 72
    for tiled, whole in zip(outputs('tiled'), outputs('whole'), strict=True):
        assert_same_output(tiled, whole)


def test_the_memory_limit_comes_from_the_environment(monkeypatch):
    cpu = torch.device('cpu')
    monkeypatch.setenv(tile_memory.MEMORY_LIMIT_VARIABLE, '2e9')
    assert tile_memory.available_memory(cpu) == (2_000_000_000, 'PIX2PIXCC_MEMORY_LIMIT')
    monkeypatch.setenv(tile_memory.MEMORY_LIMIT_VARIABLE, '2 GB')
    with pytest.raises(UserError, match='PIX2PIXCC_MEMORY_LIMIT'):
        tile_memory.available_memory(cpu)
    monkeypatch.delenv(tile_memory.MEMORY_LIMIT_VARIABLE)
    memory, source = tile_memory.available_memory(cpu)
    assert memory > 0 and source  # MemAvailable, or this machine's cgroup


@pytest.mark.parametrize('version', ['v2', 'v1'])
def test_a_cgroup_limit_below_the_free_memory_is_the_limit(tmp_path, monkeypatch, capsys,
                                                           version):
    """README "Full-resolution images": under SLURM's --mem or a container's limit, the
    memory a pass may use is what the process's cgroup has left (limit - usage) when that is
    less than the machine's MemAvailable, and the notice says where the figure came from."""
    limit, usage = tmp_path / 'limit', tmp_path / 'usage'
    limit.write_text(f'{3 * 2 ** 30}\n')
    usage.write_text(f'{2 ** 30}\n')
    monkeypatch.setattr(tile_memory, 'CGROUP_LIMITS', ((str(tmp_path / 'absent'), ''),
                                                       (str(limit), str(usage))))
    monkeypatch.delenv(tile_memory.MEMORY_LIMIT_VARIABLE, raising=False)
    monkeypatch.setattr(tile_memory, 'meminfo_available', lambda: (64 * 2 ** 30, 'MemAvailable'))
    assert tile_memory.available_memory(torch.device('cpu')) == (2 * 2 ** 30, str(limit))
    limit.write_text('max\n' if version == 'v2' else f'{2 ** 63 - 4096}\n')  # no limit
    assert tile_memory.available_memory(torch.device('cpu')) == (64 * 2 ** 30, 'MemAvailable')


def test_too_little_temporary_disk_is_refused_before_any_output(run, monkeypatch, capsys):
    usage = tile_memory.shutil.disk_usage

    def full(path):
        return usage(path)._replace(free=1000)

    monkeypatch.setattr(tile_memory.shutil, 'disk_usage', full)
    assert run_main(pix2pixCC_Test.main, run + ['--tile_size', str(TILE)]) == 2
    error = capsys.readouterr().err
    assert 'of temporary disk in' in error and 'give --tmp_dir a folder' in error
    assert not os.path.exists('checkpoints/tiles/Image')


def test_the_temporary_folder_goes_after_an_error(run, monkeypatch, capsys):
    os.makedirs('tmp')
    writes = []

    def failing_write(store, row, col, tile):
        writes.append(row)
        if len(writes) == 5:
            raise OSError(28, 'No space left on device')
        return write(store, row, col, tile)

    write = tiles.DiskStore.write
    monkeypatch.setattr(tiles.DiskStore, 'write', failing_write)
    assert run_main(pix2pixCC_Test.main, run + ['--tile_size', str(TILE), '--tmp_dir',
                                                'tmp']) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith('No space left on device; give --tmp_dir a folder with more room')
    assert len(error.splitlines()) == 1
    assert os.listdir('tmp') == []


def test_the_temporary_folder_goes_after_sigterm(run):
    """A Test run stopped by SIGTERM while it works in tiles: exit 128 + 15, a line saying
    so, and nothing left in --tmp_dir."""
    os.makedirs('tmp')
    np.save('in/img_2.npy', field(1, size=256, seed=2)[0])  # slow enough to be caught
    process = subprocess.Popen(
        [sys.executable, TEST_SCRIPT, *run, '--tile_size', str(TILE), '--tmp_dir', 'tmp'],
        env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.listdir('tmp') and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert os.listdir('tmp'), 'the run never worked in tiles'
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert 'stopped by SIGTERM' in lines[-1] and 'Traceback' not in err, err
    assert os.listdir('tmp') == []


def test_validation_during_training_in_tiles(in_tmp, tiled_calls):
    """--val_during_train --tile_size: the Test script's whole-image outputs of the same
    generator."""
    os.makedirs('in')
    np.save('in/img_0.npy', field(1, size=WIDTH, seed=0)[0, :HEIGHT])
    for side in ('Input', 'Target'):
        os.makedirs(f'train/{side}')
        np.save(f'train/{side}/a.npy', field(1, size=32, seed=1)[0])
    common = TINY + NPY_DATA + ['--dataset_name', 'val', '--n_workers', '0']
    assert pix2pixCC_Train.main(common + [
        '--input_dir_train', 'train/Input', '--target_dir_train', 'train/Target',
        '--n_epochs', '1', '--save_freq', '1', '--val_during_train', '--input_dir_test', 'in',
        '--tile_size', str(TILE)]) == 0
    assert tiled_calls == [TILE]
    assert pix2pixCC_Test.main(common + ['--iteration', '1', '--input_dir_test', 'in',
                                         '--output_dir', 'whole']) == 0
    assert tiled_calls == [TILE]
    assert_same_output(np.load('checkpoints/val/Image/Test/1/img_0_AI.npy'),
                       np.load('whole/img_0_AI.npy'))


@pytest.mark.parametrize('argv, message', [
    (['--tile_size', '10'], '--tile_size must be a multiple of 4 (2**--n_downsample), got 10'),
    (['--tile_size', '-4'], '--tile_size must not be negative, got -4'),
    (['--tmp_dir', 'nowhere'], '--tmp_dir nowhere is not a folder'),
])
def test_bad_tile_options_are_one_line_errors(run, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        pix2pixCC_Test.main(run + argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


def test_bad_tile_size_in_training_is_refused_at_once(capsys):
    with pytest.raises(SystemExit):
        train_opt('--tile_size', '6')
    assert '--tile_size must be a multiple of 4' in capsys.readouterr().err


def test_the_benchmark_measures_a_tiled_test_run(tmp_path, capsys):
    """benchmarks/tiled_inference.py (BENCHMARKS.md), on a tiny network and a small image."""
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    import tiled_inference
    report = tmp_path / 'figures.json'
    assert tiled_inference.main(TINY_NETWORK + ['--sizes', '96', '--tile_size', '32',
                                                '--skip_whole', '--json', str(report)]) == 0
    figures = json.loads(report.read_text())['sizes']['96']
    assert figures['whole'] == {'skipped': '--skip_whole'}
    assert figures['tiled']['peak_rss_mb'] > 50 and figures['tiled']['wall_seconds'] > 0
    assert '| 96² | tiled |' in capsys.readouterr().out
