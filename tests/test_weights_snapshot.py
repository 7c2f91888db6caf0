"""README "Speed" (weights mapped from a private snapshot): the Test script reads a generator's
weights once, into a private copy of the checkpoint or model file that it maps, so that a file
overwritten or truncated in place while a conversion runs (`cp`, `rsync --inplace`) changes
none of its products and cannot end it with SIGBUS; a file that changes while it is being
copied stops the run in one line; the output folder's record names the weights that ran.
"""
import hashlib
import os
import sys

import numpy as np
import pytest
import torch

import machinery.fast_conv
import machinery.memory
from machinery import translation
from conftest import (NPY_DATA, REPO, TINY, make_pairs, record_in, run_command, run_in,
                      train_opt)
from pix2pixCC_Networks import Generator, weights_init

RUN = 'snap'
STEP = 4
FLAGS = TINY + NPY_DATA + ['--dataset_name', RUN]


def make_run(root, seed):
    """checkpoints/snap/Model/4_G.pt under `root`, an untrained generator drawn from `seed`,
    and its model-file export; returns (checkpoint, model file)."""
    model_dir = root / 'checkpoints' / RUN / 'Model'
    os.makedirs(model_dir)
    torch.manual_seed(seed)
    checkpoint = str(model_dir / f'{STEP}_G.pt')
    torch.save(Generator(train_opt()).apply(weights_init).state_dict(), checkpoint)
    assert run_in(root, FLAGS + ['--iteration', str(STEP), '--export', 'model']) == 0
    return checkpoint, str(root / 'checkpoints' / RUN / 'Export' / f'{RUN}_{STEP}.pt')


@pytest.fixture
def run(tmp_path):
    """A run folder with an untrained generator of step 4 and its model file, the files of
    another generator of the same layout (and size) in other/, and three test pairs."""
    checkpoint, model = make_run(tmp_path, seed=0)
    other_checkpoint, other_model = make_run(tmp_path / 'other', seed=1)
    input_dir, target_dir = make_pairs(tmp_path / 'data', 'npy', n=3)
    return dict(root=tmp_path, checkpoint=checkpoint, model=model,
                other={'checkpoint': other_checkpoint, 'model': other_model},
                test=['--input_dir_test', input_dir, '--target_dir_test', target_dir])


def command(run, source, output):
    """The Test command of the generator `source` ('checkpoint' or 'model') into `output`."""
    generator = ['--iteration', str(STEP)] if source == 'checkpoint' else ['--model',
                                                                          run['model']]
    return FLAGS + generator + run['test'] + ['--output_dir', output]


def products(folder):
    """{name: array} of the generated files in `folder`."""
    return {name: np.load(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith('_AI.npy')}


def assert_same_products(a, b):
    assert sorted(a) == sorted(b) and len(a) == 3
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def sha256_of(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def other_bytes(run, source):
    """The bytes of the other generator's file of the same kind (and size)."""
    with open(run['other'][source], 'rb') as f:
        return f.read()


def overwrite_in_place(path, data):
    """Write `data` over the file at `path` without replacing it (as `rsync --inplace` does)."""
    assert len(data) == os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.write(data)


def after_first_image(monkeypatch, action):
    """Run `action()` once, right after the first generated file is written."""
    write_output = translation.write_output
    done = []

    def write_then_act(*args, **kwargs):
        header = write_output(*args, **kwargs)
        if not done:
            done.append(True)
            action()
        return header

    monkeypatch.setattr(translation, 'write_output', write_then_act)


@pytest.mark.parametrize('source', ['checkpoint', 'model'])
def test_a_file_overwritten_in_place_mid_run_changes_no_product(run, monkeypatch, source):
    """(a) Other weights of the same size written over the generator's file after the first
    image: every product is still the untouched file's."""
    path = run['checkpoint'] if source == 'checkpoint' else run['model']
    original = sha256_of(path)
    assert run_in(run['root'], command(run, source, 'untouched')) == 0
    other = other_bytes(run, source)
    after_first_image(monkeypatch, lambda: overwrite_in_place(path, other))
    assert run_in(run['root'], command(run, source, 'overwritten')) == 0
    assert sha256_of(path) != original  # (it was overwritten)
    assert_same_products(products(run['root'] / 'overwritten'),
                         products(run['root'] / 'untouched'))
    # (the other weights make other products: had they run, the products would differ)
    assert run_in(run['root'], command(run, source, 'other')) == 0
    assert not np.array_equal(products(run['root'] / 'other')['img_001_AI.npy'],
                              products(run['root'] / 'untouched')['img_001_AI.npy'])
    assert record_in(run['root'] / 'overwritten')['weights'] == original


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='SIGBUS of a mapped file')
@pytest.mark.parametrize('source', ['checkpoint', 'model'])
def test_a_file_truncated_mid_run_neither_crashes_nor_changes_a_product(run, source):
    """(b) The generator's file truncated in place after the first image (as `cp` over it
    begins): no SIGBUS (the run is a process of its own), the untouched file's products."""
    path = run['checkpoint'] if source == 'checkpoint' else run['model']
    assert run_in(run['root'], command(run, source, 'untouched')) == 0
    script = run['root'] / 'truncate_mid_run.py'
    script.write_text(
        'import os, sys\n'
        f'sys.path.insert(0, {REPO!r})\n'
        'from machinery import translation\n'
        'import pix2pixCC_Test\n'
        'from pix2pixCC_Options import run_main\n'
        'write_output, done = translation.write_output, []\n'
        'def write_then_truncate(*args, **kwargs):\n'
        '    header = write_output(*args, **kwargs)\n'
        '    if not done:\n'
        '        done.append(True)\n'
        f'        os.truncate({path!r}, os.path.getsize({path!r}) // 3)\n'
        '    return header\n'
        'translation.write_output = write_then_truncate\n'
        'sys.exit(run_main(pix2pixCC_Test.main, sys.argv[1:]))\n')
    proc = run_command([sys.executable, str(script), '--gpu_ids', '-1', '--n_workers', '0',
                        *command(run, source, 'truncated')], run['root'])
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert os.path.getsize(path) < os.path.getsize(run['other'][source])  # (truncated)
    assert_same_products(products(run['root'] / 'truncated'),
                         products(run['root'] / 'untouched'))


def test_the_record_names_the_weights_that_ran_when_the_file_changes_after_loading(
        run, monkeypatch):
    """(d) The file overwritten right after the generator was loaded, before the folder's
    record and any product are written: the record holds the SHA-256 of the bytes that were
    read, and the products are theirs."""
    original = sha256_of(run['checkpoint'])
    assert run_in(run['root'], command(run, 'checkpoint', 'untouched')) == 0
    other = other_bytes(run, 'checkpoint')
    load_generator = translation.load_generator

    def load_then_overwrite(*args, **kwargs):
        G = load_generator(*args, **kwargs)
        overwrite_in_place(run['checkpoint'], other)
        return G

    import pix2pixCC_Test
    monkeypatch.setattr(pix2pixCC_Test, 'load_generator', load_then_overwrite)
    assert run_in(run['root'], command(run, 'checkpoint', 'changed')) == 0
    assert record_in(run['root'] / 'changed')['weights'] == original != \
        sha256_of(run['checkpoint'])
    assert_same_products(products(run['root'] / 'changed'),
                         products(run['root'] / 'untouched'))


def copy_that_changes_the_source(monkeypatch, times):
    """The snapshot's copy, with the source file written to during the first `times`
    copies (as a file still being saved)."""
    copy = machinery.memory.copy_and_hash
    calls = []

    def copy_while_written(source, destination):
        result = copy(source, destination)
        calls.append(source.name)
        if len(calls) <= times:
            with open(source.name, 'ab') as f:
                f.write(b'\0')
        return result

    monkeypatch.setattr(machinery.memory, 'copy_and_hash', copy_while_written)
    return calls


def test_a_file_that_changes_while_it_is_copied_stops_the_run_in_one_line(run, monkeypatch,
                                                                           capsys):
    """(c) A generator file written to during both copies (the first and the one retry):
    one line naming the file, exit status 2, nothing written."""
    calls = copy_that_changes_the_source(monkeypatch, times=2)
    capsys.readouterr()
    assert run_in(run['root'], command(run, 'checkpoint', 'out')) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert run['checkpoint'] in lines[0] or os.path.relpath(run['checkpoint'], run['root']) \
        in lines[0], lines[0]
    assert 'completely written' in lines[0], lines[0]
    assert len(calls) == 2
    assert not [name for name in os.listdir(run['root'] / 'out') if name.endswith('_AI.npy')] \
        if os.path.isdir(run['root'] / 'out') else True


def test_a_file_that_changed_during_the_first_copy_is_copied_again(run, monkeypatch):
    """A file that changed during the first copy only is copied once more, and the run goes
    on with the second copy's weights (here: the same weights, one byte longer)."""
    assert run_in(run['root'], command(run, 'checkpoint', 'untouched')) == 0
    calls = copy_that_changes_the_source(monkeypatch, times=1)
    assert run_in(run['root'], command(run, 'checkpoint', 'again')) == 0
    assert len(calls) == 2
    assert_same_products(products(run['root'] / 'again'), products(run['root'] / 'untouched'))
    assert record_in(run['root'] / 'again')['weights'] == sha256_of(run['checkpoint'])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='/proc/self/maps: Linux')
def test_the_weights_are_mapped_from_an_unlinked_copy_and_still_given_back(tmp_path):
    """The generator's tensors lie in a mapping of the private copy (a file without a name),
    never of the checkpoint itself, and its layers' pages are still given back after use."""
    opt = train_opt('--n_gf', '32', '--n_residual', '3')
    path = str(tmp_path / '7_G.pt')
    torch.save(Generator(opt).apply(weights_init).state_dict(), path)
    G = translation.load_generator(opt, path, torch.device('cpu'))
    with open('/proc/self/maps') as f:
        maps = [line.split(maxsplit=5) for line in f.read().splitlines()]
    real = os.path.realpath(path)
    assert not [fields for fields in maps if len(fields) == 6 and fields[5] == real]
    weight = G.model[1].weight
    holding = [fields for fields in maps if len(fields) == 6 and
               int(fields[0].split('-')[0], 16) <= weight.data_ptr() <
               int(fields[0].split('-')[1], 16)]
    assert len(holding) == 1 and holding[0][5].endswith(' (deleted)'), holding
    assert any(layer._forward_hooks for layer in G.modules())  # (the release after use)
    assert G.weights_file_sha256 == sha256_of(path)


@pytest.mark.skipif(not machinery.memory.ram_backed('/dev/shm'), reason='no tmpfs at /dev/shm')
def test_the_copy_goes_to_a_disk_not_into_memory(tmp_path, monkeypatch):
    """A checkpoint in a folder held in memory (tmpfs) is copied into the system's temporary
    folder (on a disk here), whose pages the kernel can drop and read again."""
    assert not machinery.memory.ram_backed(str(tmp_path))
    monkeypatch.setattr(machinery.memory.tempfile, 'gettempdir', lambda: str(tmp_path))
    opt = train_opt()
    folder = f'/dev/shm/pix2pixCC-test-{os.getpid()}'
    os.makedirs(folder)
    try:
        path = os.path.join(folder, '7_G.pt')
        torch.save(Generator(opt).state_dict(), path)
        snapshot = machinery.memory.take_snapshot(path)
        with snapshot.file:
            where = os.readlink(snapshot.mappable)
    finally:
        os.remove(path)
        os.rmdir(folder)
    assert where.startswith(str(tmp_path) + '/') and where.endswith(' (deleted)'), where


def test_where_no_disk_folder_takes_the_copy_the_weights_are_read_into_memory(
        tmp_path, monkeypatch):
    """No folder for the copy (every one in memory, read-only or full): the weights are read
    into the process instead, the same, nothing is given back, the hash is the file's."""
    monkeypatch.setattr(machinery.memory, 'ram_backed', lambda folder: True)
    opt = train_opt('--n_gf', '32', '--n_residual', '3')
    trained = Generator(opt).apply(weights_init)
    path = str(tmp_path / '7_G.pt')
    torch.save(trained.state_dict(), path)
    G = translation.load_generator(opt, path, torch.device('cpu')).eval()
    assert not any(layer._forward_hooks for layer in G.modules())
    assert G.weights_file_sha256 == sha256_of(path)
    machinery.fast_conv.use_gemm_convolutions(trained)  # (the CPU kernels of Test's G)
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(G(x), trained.eval()(x))
