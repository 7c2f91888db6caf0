"""The README's command sequences run in order as a user would type them (README "Quick
start", "Evaluating a model", "Sharing a model and running it elsewhere", the three-passband
example, "Preparing solar data", "Training on SDOML"), and the one-command set-up scripts
hold the README's commands.

The commands are taken from the README itself, in a folder that holds the repository's
scripts and sample as a clone does. Only what makes them last minutes is shortened, the same
way in every command of a sequence (`SHORTER`): the epochs, the image size of the prepared
data and the network of that section's run (which the README leaves at the defaults for
1024 px maps); the steps named afterwards (`--iteration 2560`, the export's file name)
follow the shortened run. Everything else (options, order, folders) is the README's.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SUBPROCESS_ENV, TINY_NETWORK
from test_prepare_pairs import solar_map

with open(os.path.join(REPO, 'README.md')) as f:
    README = f.read()


def bash_blocks():
    """Every ```bash block of the README, in order."""
    return re.findall(r'```bash\n(.*?)```', README, re.DOTALL)


def block_with(marker):
    """The README's bash block that holds `marker` (exactly one does)."""
    found = [block for block in bash_blocks() if marker in block]
    assert len(found) == 1, (marker, len(found))
    return found[0]


def commands(block):
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r'\\\n\s*', '', block)
    return [line.split('  #')[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith('#')]


# Shortened runs: 2 epochs instead of 80 (so the quick start's last step is 64, not 2560).
SHORTER = [(r'--n_epochs \d+', '--n_epochs 1'), (r'--n_epochs_decay \d+', '--n_epochs_decay 1')]


def shortened(command, more=()):
    for pattern, replacement in [*SHORTER, *more]:
        command = re.sub(pattern, replacement, command)
    return command


def make_clone(folder):
    """`folder` laid out as the repository is (its scripts linked, the shipped sample), in
    which the README's relative paths work and every output stays."""
    os.makedirs(folder / 'datasets')
    for name in os.listdir(REPO):
        if name.endswith('.py') or name in ('machinery', 'deploy'):
            os.symlink(os.path.join(REPO, name), folder / name)
    for name in ('make_sample.py', 'make_sdoml_sample.py', 'prepare_pairs.py', 'Sample'):
        os.symlink(os.path.join(REPO, 'datasets', name), folder / 'datasets' / name)
    return folder


@pytest.fixture
def clone(tmp_path):
    return make_clone(tmp_path / 'clone')


def run(command, cwd):
    """Run one README command line in `cwd` (its `python` is this interpreter); the output."""
    command = re.sub(r'^python ', f'{sys.executable} ', command)
    proc = subprocess.run(['bash', '-c', command], cwd=cwd, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n" \
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    # The README's data are what their models were trained on: no false alarm
    assert 'data unlike the training data' not in proc.stdout + proc.stderr, proc.stdout
    return proc.stdout + proc.stderr


def run_block(block, cwd, more=()):
    return [run(shortened(command, more), cwd) for command in commands(block)]


QUICK_START = 'python pix2pixCC_Train.py --dataset_name EUV2Mag_sample'


def test_the_quick_start_then_evaluating_and_sharing_the_model_run_in_order(clone, tmp_path):
    steps = [(r'(?<!\d)2560(?!\d)', '64')]  # the shortened run's last step
    train, test = run_block(block_with(QUICK_START), clone, steps)
    assert 'iteration 64: 8 file(s) written' in test
    # "Evaluating a model": every saved generator, with panels, into the same run folder
    evaluated = run_block(block_with('--iteration -1 \\\n  --input_dir_test datasets/Sample/'
                                     'Test/Input --target_dir_test datasets/Sample/Test/Target'
                                     ' \\\n  --save_panels'), clone, steps)[0]
    assert 'iteration 64: 8 file(s) written' in evaluated  # (the only saved step)
    assert os.path.exists(clone / 'checkpoints/EUV2Mag_sample/Image/Test/64/sun_0032_panel.png')
    # "One model file": export, then the file copied into a clone without the run
    run_block(block_with('--iteration 2560 --export model'), clone, steps)
    elsewhere = make_clone(tmp_path / 'elsewhere')
    shutil.copy(clone / 'checkpoints/EUV2Mag_sample/Export/EUV2Mag_sample_64.pt', elsewhere)
    inputs = os.path.join(REPO, 'datasets', 'Sample', 'Test', 'Input')
    run_block(block_with('--model EUV2Mag_sample_2560.pt --input_dir_test DIR'), elsewhere,
              [*steps, (r'\bDIR\b', inputs)])
    assert len(os.listdir(elsewhere / 'checkpoints/EUV2Mag_sample/Image/Test/64')) == 9
    # "ONNX": the export (its pip line installs what the test requirements hold), then the
    # translator on the same inputs
    export = [c for c in commands(block_with('--export onnx')) if not c.startswith('pip ')]
    run(shortened(export[0], steps), clone)
    shutil.copy(clone / 'checkpoints/EUV2Mag_sample/Export/EUV2Mag_sample_64.onnx', elsewhere)
    run_block(block_with('deploy/onnx_translate.py --model'), clone,
              [(r'EUV2Mag_sample_2560', str(elsewhere / 'EUV2Mag_sample_64')),
               (r'\bDIR\b', inputs), (r'\bOUT\b', str(tmp_path / 'onnx'))])
    assert len(os.listdir(tmp_path / 'onnx')) == 8


def test_the_three_passband_example_runs_in_order(clone):
    outputs = run_block(block_with('datasets/make_sample.py --out datasets/SDO_like'), clone)
    step = re.search(r'iteration (\d+): \d+ file\(s\) written', outputs[-1]).group(1)
    with open(clone / f'checkpoints/SDO_like/Image/Test/{step}/metrics.csv') as f:
        assert 'active_cc_1x1' in f.readline()  # (--active_threshold 100)


def test_the_sdoml_section_runs_in_order(clone):
    """README "Training on SDOML": the sample stores, the training on them (what its first
    line says is the README's), then the Test script with the run's name alone."""
    pytest.importorskip('zarr', reason='SDOMLv2 stores need zarr 3 (Python 3.11 or newer)')
    block = block_with('datasets/make_sdoml_sample.py datasets/SDOML_sample')
    outputs = run_block(block, clone)
    first_line = re.search(r'`(SDOML: 35 pairs .*?)`', README).group(1)
    assert first_line in outputs[1]
    step = re.search(r'iteration (\d+): 11 file\(s\) written', outputs[-1]).group(1)
    assert os.path.exists(clone / f'checkpoints/SDOML_sample/Image/Test/{step}/'
                                  f'20120101_075926_AI.fits')


def archive(root):
    """Folders AIA171/ and HMI/ of archive-like full-disk maps (sunpy-readable WCS, DN with
    EXPTIME; gauss), October for training and November and December for the test."""
    days = [f'2011-10-{d:02d}' for d in range(1, 9)] + ['2011-11-20', '2011-11-22',
                                                        '2011-12-02', '2011-12-04']
    for day in days:
        solar_map(root / 'HMI' / f'hmi_{day}.fits', time=f'{day}T00:00:00', BUNIT='G')
        solar_map(root / 'AIA171' / f'aia_{day}.fits', time=f'{day}T00:01:00')


def test_the_preparation_sections_commands_run_in_order_after_validated_training(clone):
    """Its training with --val_during_train on the prepared test pairs (the review's case:
    the Test command was then refused), then its Test command."""
    archive(clone)
    prepare, train, test = commands(block_with('datasets/prepare_pairs.py --input_dir AIA171/'))
    small = [(r'--size 1024 --disk_radius_px 450', '--size 32 --disk_radius_px 12'),
             (r'--data_size 1024', '--data_size 32')]
    run(shortened(prepare, small), clone)
    run(shortened(train, small) + ' ' + ' '.join(TINY_NETWORK) + ' --n_D 1 --val_during_train '
        '--input_dir_test datasets/EUV2Mag/Test/Input --target_dir_test '
        'datasets/EUV2Mag/Test/Target', clone)
    tested = run(shortened(test, small), clone)
    step = re.search(r'iteration (\d+): \d+ file\(s\) written', tested).group(1)
    assert os.path.exists(clone / f'checkpoints/EUV2Mag/Image/Test/{step}/metrics.csv')


def test_the_set_up_scripts_hold_the_readmes_commands():
    with open(os.path.join(REPO, 'quick_start.sh')) as f:
        quick_start = commands(f.read())
    for command in commands(block_with(QUICK_START)):
        assert command in quick_start
    with open(os.path.join(REPO, '.ci', 'run')) as f:
        ci = commands(f.read())
    assert ['bash .ci/run'] in [commands(block) for block in bash_blocks()]
    for command in block_with('ruff check . && python -m pytest').strip().split(' && '):
        assert command in ci
    assert 'bash quick_start.sh' in commands(block_with('bash quick_start.sh'))
