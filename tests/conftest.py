"""Shared helpers of the pix2pixCC test suite, each defined here once (README "Tests"):
options and data of the tests, writing data files as a user would, running the drivers
(in-process with `main(argv)`, as scripts with `run_script`, `run_train`, `run_test`,
`run_torchrun`, or as a `Training` whose output is read while it trains), reading what a
run wrote, comparing numbers, and fixtures. Everything runs on the CPU with tiny networks
(TINY) and 32-64 px data written by the tests themselves into pytest's tmp_path.
"""
import csv
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TRAIN_SCRIPT = os.path.join(REPO, 'pix2pixCC_Train.py')
TEST_SCRIPT = os.path.join(REPO, 'pix2pixCC_Test.py')
SAMPLE = os.path.join(REPO, 'datasets', 'Sample')

# Small CPU models: one intra-op thread is much faster than several for tensors this small
# (thread start-up dominates), and keeps the suite's run time predictable on 2-core CI.
torch.set_num_threads(1)
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
                      PYTHONDONTWRITEBYTECODE='1')

CPU = torch.device('cpu')

# A network small enough to train for a few steps in seconds, and with it the CPU.
TINY_NETWORK = ['--n_gf', '8', '--n_df', '8', '--n_downsample', '2', '--n_residual', '1']
TINY = ['--gpu_ids', '-1'] + TINY_NETWORK

# Scaling of the shipped sample: EUV input 1..200 DN/s on a log scale, magnetogram target
# +-3000 G (clipped).
SAMPLE_SCALING = ['--logscale_input', 'True', '--saturation_lower_limit_input', '1',
                  '--saturation_upper_limit_input', '200',
                  '--saturation_lower_limit_target', '-3000',
                  '--saturation_upper_limit_target', '3000',
                  '--saturation_clip_target', 'True']
SAMPLE_DATA = SAMPLE_SCALING + ['--data_format_input', 'fits', '--data_format_target', 'fits']


def formats_and_limits(fmt, upper=100):
    """Both sides in format `fmt`, both scaled from the limits [0, upper]: the data make_pairs
    writes (values in [0, 100]; 0 to 255 for 8-bit images)."""
    return ['--data_format_input', fmt, '--data_format_target', fmt,
            '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', str(upper),
            '--saturation_lower_limit_target', '0', '--saturation_upper_limit_target', str(upper)]


# npy pairs as make_pairs writes them (32x32, values in [0, 100]), scaled at those limits.
NPY_DATA = formats_and_limits('npy') + ['--data_size', '32']

# Random rotations and shifts: the augmentation a resume must draw again exactly.
AUGMENT = ['--max_rotation_angle', '10', '--padding_size', '4']

ALL_FORMATS = ('tif', 'tiff', 'png', 'jpg', 'jpeg', 'npy', 'fits', 'fts', 'fit')


def argv_from(**options):
    """{'n_gf': 8, 'ccc': False} -> ['--n_gf', '8', '--ccc', 'False']."""
    argv = []
    for key, value in options.items():
        argv += [f'--{key}', str(value)]
    return argv


def train_opt(*argv, **options):
    """Options namespace of TrainOption for TINY + argv + options."""
    from pix2pixCC_Options import TrainOption
    return TrainOption().parse(TINY + list(argv) + argv_from(**options))


def make_test_opt(*argv, **options):
    """Options namespace of TestOption for TINY + argv + options."""
    from pix2pixCC_Options import TestOption
    return TestOption().parse(TINY + list(argv) + argv_from(**options))


def data_args(input_dir, target_dir, *extra):
    """Training arguments: TINY, NPY_DATA, one epoch on these folders, then `extra`."""
    return TINY + NPY_DATA + ['--n_epochs', '1', '--n_workers', '0', '--input_dir_train',
                              str(input_dir), '--target_dir_train', str(target_dir), *extra]


# ----------------------------------------------------------------------------------------
# Writing data files the way a user would (not through the package's own writers).
# ----------------------------------------------------------------------------------------


def write_user_file(path, array, fmt, header=None):
    """Write `array` as a user would for `fmt`.

    Images (png/jpg/jpeg) take H x W or H x W x C integer arrays; npy and FITS take the array
    as is; tif/tiff take any array (tifffile).
    """
    if fmt in ('png', 'jpg', 'jpeg'):
        from PIL import Image
        kwargs = {'quality': 95, 'subsampling': 0} if fmt in ('jpg', 'jpeg') else {}
        Image.fromarray(array).save(path, **kwargs)
    elif fmt in ('tif', 'tiff'):
        import tifffile
        photometric = 'rgb' if array.ndim == 3 and array.shape[-1] == 3 and \
            array.dtype == np.uint8 else 'minisblack'
        tifffile.imwrite(path, array, photometric=photometric)
    elif fmt == 'npy':
        np.save(path, array)
    elif fmt in ('fits', 'fts', 'fit'):
        from astropy.io import fits
        fits.PrimaryHDU(array, header=header).writeto(path, overwrite=True)
    else:
        raise ValueError(fmt)
    return path


def read_user_file(path, fmt):
    """Read a file as a user would (not through the package's readers). FITS data must be
    float32 (BITPIX -32) and images must hold the format their extension names."""
    if fmt in ('fits', 'fts', 'fit'):
        from astropy.io import fits
        with fits.open(path) as hdul:
            assert hdul[0].header['BITPIX'] == -32
            return np.array(hdul[0].data)
    if fmt == 'npy':
        return np.load(path)
    if fmt in ('tif', 'tiff'):
        import tifffile
        return tifffile.imread(path)
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == {'png': 'PNG', 'jpg': 'JPEG', 'jpeg': 'JPEG'}[fmt]
        return np.asarray(image)


def smooth_field(rng, size, channels=1, low=0.0, high=1.0, noise=0.1):
    """A smooth random field (C, H, W) in [low, high]: structured, not white noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(channels):
        a, b, c, d = rng.uniform(0.5, 3.0, 4)
        p, q = rng.uniform(0, 2 * np.pi, 2)
        field = np.sin(2 * np.pi * a * xx + p) * np.cos(2 * np.pi * b * yy + q) + \
            0.5 * np.sin(2 * np.pi * (c * xx + d * yy))
        field += noise * rng.standard_normal((size, size))
        field = (field - field.min()) / (field.max() - field.min())
        out.append(low + (high - low) * field)
    return np.stack(out).astype(np.float32)


H, W = 24, 40  # field()'s default size: not square, so a transposed read shows


def field(channels, low=0.0, high=100.0, seed=0, size=None, noise=0.1):
    """Smooth random data (C, H, W) in [low, high]; (C, size, size) when size is given."""
    rng = np.random.default_rng(seed)
    if size is not None:
        return smooth_field(rng, size, channels, low, high, noise)
    return smooth_field(rng, max(H, W), channels, low, high, noise)[:, :H, :W]


def make_pairs(root, fmt, n=6, size=32, channels=1, target_fmt=None, target_channels=None,
               seed=0, prefix='img'):
    """Write n input/target pairs under root/{Input,Target} in format `fmt`.

    Inputs and targets are smooth fields: float32 in [0, 100] for the float formats
    (npy, fits, tif) and uint8 for png/jpg. Multi-channel arrays are C x H x W except for
    png/jpg (H x W x C, RGB). Returns (input_dir, target_dir).
    """
    target_fmt = target_fmt or fmt
    target_channels = target_channels or channels
    rng = np.random.default_rng(seed)
    input_dir = os.path.join(str(root), 'Input')
    target_dir = os.path.join(str(root), 'Target')
    os.makedirs(input_dir, exist_ok=True)
    os.makedirs(target_dir, exist_ok=True)
    for i in range(n):
        for folder, f, ch in ((input_dir, fmt, channels), (target_dir, target_fmt,
                                                            target_channels)):
            data = smooth_field(rng, size, ch, 0.0, 100.0)
            if f in ('png', 'jpg', 'jpeg'):
                data = np.rint(data * 2.55).astype(np.uint8)
                data = data[0] if ch == 1 else np.moveaxis(data, 0, -1)
            elif ch == 1:
                data = data[0]
            write_user_file(os.path.join(folder, f'{prefix}_{i:03d}.{f}'), data, f)
    return input_dir, target_dir


def write_pairs(root, inputs, targets, fmt='npy'):
    """Write {name: array} to root/Input and root/Target as `fmt` files (names sort as
    given); returns (input_dir, target_dir)."""
    dirs = []
    for role, arrays in (('Input', inputs), ('Target', targets)):
        folder = os.path.join(str(root), role)
        os.makedirs(folder, exist_ok=True)
        for name, array in arrays.items():
            write_user_file(os.path.join(folder, f'{name}.{fmt}'), array, fmt)
        dirs.append(folder)
    return tuple(dirs)


def copy_sample(root, n_train=6, n_test=3):
    """Copy the first few shipped sample FITS pairs; returns (train_in, train_tg, test_in)."""
    dirs = []
    for split, role, n in (('Train', 'Input', n_train), ('Train', 'Target', n_train),
                           ('Test', 'Input', n_test)):
        source = os.path.join(SAMPLE, split, role)
        dest = os.path.join(str(root), split, role)
        os.makedirs(dest, exist_ok=True)
        for name in sorted(os.listdir(source))[:n]:
            shutil.copy(os.path.join(source, name), dest)
        dirs.append(dest)
    return tuple(dirs)


# Cards of a real AIA 171 level-1 header (SDO/AIA, 2011-02-15, as sunpy's test data holds it;
# 128x128, so 19.18 arcsec pixels), and a few from real HMI and EIT headers: place, time and
# observer, which a generated map keeps, and the input's identity, exposure, calibration,
# value statistics, processing and file bookkeeping, which it must not.
AIA_PLACE_AND_TIME = [
    ('DATE-OBS', '2011-02-15T00:00:00.34'), ('T_OBS', '2011-02-15T00:00:01.34Z'),
    ('CTYPE1', 'HPLN-TAN'), ('CTYPE2', 'HPLT-TAN'), ('CUNIT1', 'arcsec'), ('CUNIT2', 'arcsec'),
    ('CRVAL1', -4.532172209851069), ('CRVAL2', 2.865574805180813),
    ('CDELT1', 19.183648), ('CDELT2', 19.183648), ('CROTA2', 0.019413),
    ('DSUN_OBS', 147724815128.0), ('HGLN_OBS', 0.0), ('HGLT_OBS', -6.820544),
    ('CRLN_OBS', 22.814522), ('CRLT_OBS', -6.820544), ('RSUN_OBS', 971.812597),
    ('RSUN_REF', 696000000.0), ('CAR_ROT', 2106)]
AIA_IDENTITY = [('TELESCOP', 'SDO/AIA'), ('INSTRUME', 'AIA_3'), ('WAVELNTH', 171),
                ('WAVEUNIT', 'angstrom'), ('ORIGIN', 'SDO/JSOC-SDP')]
INPUT_ONLY = [
    ('EXPTIME', 2.000191), ('EXPSDEV', 0.000132), ('INT_TIME', 2.273438), ('IMG_TYPE', 'LIGHT'),
    ('DN_GAIN', 17.7), ('EFF_AREA', 2.419), ('PIXLUNIT', 'DN'),
    ('DATAMIN', -6), ('DATAMAX', 12115), ('DATAMEAN', 250.34), ('DATAP01', 0.0),
    ('DATAP99', 1474.0), ('DATACENT', 240.91), ('NSATPIX', 0), ('TOTVALS', 16777216),
    ('PERCENTD', 100.0), ('NSPIKES', 18263), ('MISSVALS', 0),
    ('QUALITY', 0), ('LVL_NUM', 1.0), ('BLD_VERS', 'V5R12X'),
    ('FSN', 20781661), ('RECNUM', 69981867), ('DATE', '2012-10-12T23:56:57'),
    ('DATAMIN2', 185.617004), ('DATAMAX2', 69371.945312), ('CALVER64', 8466),  # HMI
    ('XPOSURE', 12.592), ('FILENAME', 'efz20040301.000010')]  # EIT


def aia_cube_header(size, channels=3, channels_last=False):
    """Header of a channels x size x size cube of AIA passbands (FITS axis 3 the wavelength:
    CTYPE3 = 'WAVE', as a user stacking AIA images writes it; axis 1 with channels_last),
    with the cards above and a BLANK card, as archive float files have."""
    from astropy.io import fits
    header = fits.Header()
    for key, value in AIA_PLACE_AND_TIME + AIA_IDENTITY + INPUT_ONLY:
        header[key] = value
    header['CRPIX1'] = header['CRPIX2'] = (size + 1) / 2
    header['WCSAXES'] = 3
    for key, value in (('CTYPE', 'WAVE'), ('CUNIT', 'Angstrom'), ('CRPIX', 1.0),
                       ('CRVAL', 171.0), ('CDELT', 22.0)):
        header[f'{key}3'] = value
    header['BLANK'] = -32768
    if channels_last:  # the wavelength is FITS axis 1: axes 1, 2, 3 -> 3, 1, 2 (roll)
        header = roll_wcs_axes(header)
    return header


def roll_wcs_axes(header):
    """`header` with its WCS axes 1, 2, 3 renumbered 2, 3, 1."""
    renamed = header.copy()
    for key in ('CTYPE', 'CUNIT', 'CRPIX', 'CRVAL', 'CDELT'):
        for axis in (1, 2, 3):
            renamed[f'{key}{axis % 3 + 1}'] = header[f'{key}{axis}']
    renamed.rename_keyword('CROTA2', 'CROTA3')
    return renamed


# ----------------------------------------------------------------------------------------
# Running the drivers
# ----------------------------------------------------------------------------------------


def load_script(path):
    """The module of the repository's script at `path` (relative to the repository:
    datasets/ and experiments/ are folders of scripts, not packages)."""
    import importlib.util
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_command(command, cwd, timeout=300, **env):
    """Run `command` in `cwd` with SUBPROCESS_ENV (plus `env`), capturing its output."""
    return subprocess.run([str(a) for a in command], cwd=str(cwd),
                          env=dict(SUBPROCESS_ENV, **env), capture_output=True, text=True,
                          timeout=timeout)


def run_script(script, args, cwd, timeout=300, **env):
    """Run a script as a user would (`python <script> args` in `cwd`)."""
    return run_command([sys.executable, script, *args], cwd, timeout, **env)


def blocked(tmp_path, *modules):
    """A PYTHONPATH folder in which importing any of `modules` fails, as where they are not
    installed."""
    folder = tmp_path / f"without_{'_'.join(modules)}"
    for module in modules:
        os.makedirs(folder / module, exist_ok=True)
        (folder / module / '__init__.py').write_text(f"raise ImportError('no {module}', "
                                                     f"name='{module}')\n")
    return str(folder)


def run_train(args, cwd, **env):
    return run_script(TRAIN_SCRIPT, args, cwd, **env)


def run_test(args, cwd):
    return run_script(TEST_SCRIPT, args, cwd)


# The training script under torchrun: two processes on this machine.
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            '--nproc_per_node=2', TRAIN_SCRIPT]


def run_torchrun(args, cwd, timeout=300):
    return run_command(TORCHRUN + list(args), cwd, timeout)


class Training:
    """A training process whose output is read line by line (to signal it at a given step)."""

    def __init__(self, args, cwd, command=None):
        command = command or [sys.executable, TRAIN_SCRIPT]
        self.proc = subprocess.Popen(command + [str(a) for a in args], cwd=str(cwd),
                                     env=dict(SUBPROCESS_ENV, PYTHONUNBUFFERED='1'),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines = []

    def wait_for(self, pattern, timeout=120):
        """Read output until a line matches `pattern`; returns the match."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        self.kill()
        raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout=120):
        """Wait for the end; (exit status, the whole output)."""
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return self.proc.returncode, ''.join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_in(root, argv):
    """Run the Test script in `root` as a user would from there (in-process); its exit
    status."""
    import pix2pixCC_Test
    from pix2pixCC_Options import run_main
    here = os.getcwd()
    os.chdir(root)
    try:
        return run_main(pix2pixCC_Test.main, ['--gpu_ids', '-1', '--n_workers', '0'] + argv)
    except SystemExit as exit:  # (argparse's refusals)
        return exit.code
    finally:
        os.chdir(here)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n" \
                                 f"stderr:\n{proc.stderr[-3000:]}"


def assert_usage_error(proc, *fragments):
    """Exit status 2, exactly one non-empty line on stderr, no traceback; the line holds
    every fragment."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n" \
                                 f"stderr:\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert 'Traceback' not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def checked_lines(*argv):
    """The lines check_dataset logs for the training folders in argv (TINY + argv)."""
    from machinery.data_checks import check_dataset
    from pix2pixCC_Pipeline import CustomDataset
    lines = []
    check_dataset(CustomDataset(train_opt(*argv)), 4, log=lines.append)
    return lines


def drawn_panel(monkeypatch, path, *args, **kwargs):
    """Save a panel with `save_panel(path, *args, **kwargs)` and return its matplotlib
    figure (to read the titles, colour limits and bars it was drawn with)."""
    from machinery.figures import save_panel
    return drawn_figure(monkeypatch, save_panel, path, *args, **kwargs)


def drawn_figure(monkeypatch, draw, path, *args, **kwargs):
    """Save a figure with `draw(path, *args, **kwargs)` (save_panel, save_loss_curve) and
    return its matplotlib figure."""
    import matplotlib.figure

    figures = []
    savefig = matplotlib.figure.Figure.savefig

    def keep(figure, *a, **k):
        figures.append(figure)
        return savefig(figure, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', keep)
    draw(str(path), *args, **kwargs)
    assert os.path.isfile(path) and len(figures) == 1
    return figures[0]


def constant_generator_checkpoint(opt, value, step=3):
    """Save a generator whose output is `value` everywhere (last conv: weight 0, bias value;
    one value for every channel, or one per channel) as step `step` of the run of `opt`."""
    from pix2pixCC_Networks import Generator
    G = Generator(opt)
    with torch.no_grad():
        G.model[-1].weight.zero_()
        bias = G.model[-1].bias
        bias.copy_(torch.as_tensor(value, dtype=torch.float32).expand_as(bias))
    os.makedirs(opt.model_dir, exist_ok=True)
    torch.save(G.state_dict(), os.path.join(opt.model_dir, f'{step}_G.pt'))


# ----------------------------------------------------------------------------------------
# Reading what a run wrote
# ----------------------------------------------------------------------------------------

REPORT = re.compile(r'Epoch:\s*(\d+)/(\d+).*?Current_step:\s*(\d+).*?D_loss:\s*(\S+).*?'
                    r'G_loss:\s*(\S+)')


def reports(stdout):
    """[(epoch, step, D_loss, G_loss)] of the report lines on a run's standard output."""
    out = []
    for line in stdout.splitlines():
        if 'Epoch:' in line:
            match = REPORT.search(line)
            assert match, line
            out.append((int(match.group(1)), int(match.group(3)), float(match.group(4)),
                        float(match.group(5))))
    return out


def reported_steps(stdout):
    return [step for _, step, _, _ in reports(stdout)]


def run_dir(root, name='pix2pixCC'):
    """./checkpoints/<name> of a run made in `root`."""
    return os.path.join(str(root), 'checkpoints', name)


def model_dir(root, name='pix2pixCC'):
    """./checkpoints/<name>/Model of a run made in `root`."""
    return os.path.join(run_dir(root, name), 'Model')


def copy_run(source_root, dest_root, name='pix2pixCC', only=None):
    """A private copy of the run folder `name` made in source_root, into dest_root (for tests
    that add, remove or resume; module-scoped runs stay as they are): the whole folder, or
    the entries `only` of it. Returns the copy's run folder."""
    source, dest = run_dir(source_root, name), pathlib.Path(run_dir(dest_root, name))
    if only is None:
        shutil.copytree(source, dest)
    for entry in only or ():
        if os.path.isdir(os.path.join(source, entry)):
            shutil.copytree(os.path.join(source, entry), dest / entry)
        else:
            os.makedirs(dest, exist_ok=True)
            shutil.copy(os.path.join(source, entry), dest)
    return dest


def saved_steps_in(folder, kind='G'):
    """Steps of the files <step>_<kind>.pt in `folder` (kind 'G', 'D', 'state'; or a file
    suffix such as '_real.png'), ascending."""
    suffix = kind if '.' in kind else f'_{kind}.pt'
    return sorted(int(name[:-len(suffix)]) for name in os.listdir(str(folder))
                  if name.endswith(suffix) and name[:-len(suffix)].isdigit())


def load(path):
    return torch.load(str(path), map_location='cpu', weights_only=True)


def checkpoint(root, file_name, name='pix2pixCC'):
    """The tensors of ./checkpoints/<name>/Model/<file_name> of a run made in `root`."""
    return load(os.path.join(model_dir(root, name), file_name))


def load_generator(opt, path):
    """The Generator of `opt` with the weights of `path`, in eval mode."""
    from pix2pixCC_Networks import Generator
    G = Generator(opt)
    G.load_state_dict(load(path), strict=True)
    return G.eval()


def generate(G, x):
    """G's output (C, H, W) for one normalised input x (C, H, W), as numpy."""
    with torch.no_grad():
        return G(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None])[0].numpy()


def read_csv_rows(path):
    """(column names, rows as dicts) of a CSV file such as loss_log.csv."""
    with open(str(path), newline='') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def loss_rows(root, name='pix2pixCC'):
    """The rows of loss_log.csv of a run made in `root`."""
    return read_csv_rows(os.path.join(run_dir(root, name), 'loss_log.csv'))[1]


def logged_steps(root, name='pix2pixCC'):
    """The steps of the rows of loss_log.csv of a run made in `root`."""
    return [int(row['step']) for row in loss_rows(root, name)]


# What a Test output folder records (README "Output files").
RECORD = 'test_run.json'


def record_in(folder):
    """The test_run.json of a Test output folder."""
    with open(os.path.join(str(folder), RECORD)) as f:
        return json.load(f)


def panel_text(path):
    """The Title and Description text chunks of a panel PNG."""
    from PIL import Image
    with Image.open(path) as image:
        return image.text.get('Title', ''), image.text.get('Description', '')


def snapshot(folder, with_dirs=False):
    """{relative path: (content, mtime_ns)} of every file (and, `with_dirs`, every folder)
    under `folder`: equal snapshots before and after mean nothing was written, added, removed
    or touched. The lock file is left out: every training run creates it and removes it at
    its end, refused runs too (so folders are recorded by name, not by their mtime, which
    that changes)."""
    out = {}
    for path, _, filenames in os.walk(str(folder)):
        if with_dirs:
            out[os.path.relpath(path, str(folder)) + '/'] = None
        for name in filenames:
            if name == 'train.lock':
                continue
            full = os.path.join(path, name)
            with open(full, 'rb') as f:
                out[os.path.relpath(full, str(folder))] = (f.read(), os.stat(full).st_mtime_ns)
    return out


# ----------------------------------------------------------------------------------------
# Comparing numbers
# ----------------------------------------------------------------------------------------

def lin_ccc(t, f):
    """Lin's concordance correlation coefficient with population moments, in float64."""
    t, f = np.asarray(t, np.float64).ravel(), np.asarray(f, np.float64).ravel()
    covariance = ((t - t.mean()) * (f - f.mean())).mean()
    return 2 * covariance / (t.var() + f.var() + (t.mean() - f.mean()) ** 2)


def state_of(weights):
    """A state_dict from a module, a checkpoint path or a state_dict."""
    if isinstance(weights, torch.nn.Module):
        return weights.state_dict()
    if isinstance(weights, (str, os.PathLike)):
        return load(weights)
    return weights


def assert_same_weights(a, b, tolerance=1e-6, skip=()):
    """Same keys, and every tensor of the same shape and type and within `tolerance`
    (absolute), except the keys in `skip`. a, b: modules, checkpoint paths or state_dicts."""
    a, b = state_of(a), state_of(b)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for key in a:
        if key in skip:
            continue
        assert (a[key].shape, a[key].dtype) == (b[key].shape, b[key].dtype), key
        if not a[key].numel():
            continue
        difference = float((a[key].double() - b[key].double()).abs().max())
        assert difference <= tolerance, f"{key}: max |difference| {difference:g}"


def assert_identical_weights(a, b):
    """The same weights bit for bit (what resuming on the CPU gives)."""
    assert_same_weights(a, b, tolerance=0)


def biases_before_norm(module):
    """Names of the convolution biases that an InstanceNorm2d or BatchNorm2d follows.

    The norm subtracts each channel's mean, so such a bias cannot change the output and its
    gradient is exactly zero in exact arithmetic; in floating point it is rounding noise,
    which Adam normalises into steps of about +-lr. Two computations that add up the same
    gradients in a different order (GEMM against oneDNN, two processes' all-reduce against
    one batch) therefore move these biases differently while every output stays the same:
    weight comparisons leave them out (and compare outputs instead).
    """
    names = set()
    for prefix, seq in module.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        for (name, layer), (_, following) in itertools.pairwise(seq.named_children()):
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and \
                    layer.bias is not None and \
                    isinstance(following, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d)):
                names.add(f'{prefix}.{name}.bias' if prefix else f'{name}.bias')
    return names


def models_and_data(opt, size=32, seed=0):
    """(G, D, input, target) from `seed`: the networks of `opt` initialised as for training,
    and a batch of random data in [-1, 1]."""
    from pix2pixCC_Networks import Discriminator, Generator, weights_init
    torch.manual_seed(seed)
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    input = torch.rand(opt.batch_size, opt.input_ch, size, size) * 2 - 1
    target = torch.rand(opt.batch_size, opt.target_ch, size, size) * 2 - 1
    return G, D, input, target


def profiled(function):
    """(function's result, {aten operator: number of calls}) (PyTorch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        result = function()
    return result, {event.key: event.count for event in profiler.key_averages()}


# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Training arguments for six 32x32 npy pairs (NPY_DATA scaling), one set per module."""
    root = tmp_path_factory.mktemp('data')
    input_dir, target_dir = make_pairs(root, 'npy', n=6, size=32)
    return ['--input_dir_train', input_dir, '--target_dir_train', target_dir]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in-process drivers with tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
