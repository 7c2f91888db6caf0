"""Command-line options of pix2pixCC.

`TrainOption().parse(argv)` and `TestOption().parse(argv)` return the options namespace.
Option names and defaults are the public interface of the published pix2pixCC scripts; only
the parsing of booleans differs (see `str2bool`). Parsing has no side effects: the drivers
create folders and write the options file.
"""
import argparse
import difflib
import math
import os
import sys

DATA_FORMATS = ('tif', 'tiff', 'png', 'jpg', 'jpeg', 'npy', 'fits', 'fts', 'fit')
# Extensions that name the same kind of file: `--data_format_input tif` also lists .tiff files.
FORMAT_FAMILIES = (('tif', 'tiff'), ('jpg', 'jpeg'), ('fits', 'fts', 'fit'))
FITS_FORMATS = FORMAT_FAMILIES[2]
# The scaling options that take one value for every channel of their side or one value per
# channel (README "Your own data", Scaling); each exists as <name>_input and <name>_target.
PER_CHANNEL_OPTIONS = ('saturation_lower_limit', 'saturation_upper_limit', 'saturation_clip',
                       'logscale')


class UserError(Exception):
    """A problem the user must fix (bad option, bad data file, missing checkpoint).

    The drivers print it as one line and exit with status 2 (or `exit_status`), without a
    traceback.
    """
    exit_status = 2


def str2bool(value):
    """Parse a boolean option value.

    The published code declares booleans with `type=bool`, for which `bool('False')` is True;
    here the usual spellings parse to what they say.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('true', 't', 'yes', 'y', '1', 'on'):
        return True
    if text in ('false', 'f', 'no', 'n', '0', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got '{value}'")


def lower_str(value):
    return str(value).strip().lower()


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2), and a mistyped
    option name gets the closest real one as a suggestion."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.option_names = []  # filled by BaseOption.add, for the suggestions

    def error(self, message):
        if message.startswith('unrecognized arguments:'):
            message += self.suggestion(message.split(':', 1)[1].split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def suggestion(self, arguments):
        for argument in arguments:
            name = argument.split('=', 1)[0]
            close = difflib.get_close_matches(name, self.option_names, n=1, cutoff=0.6)
            if name.startswith('--') and close:
                return f"; did you mean {close[0]}?"
        return ''


class BaseOption:
    """Options shared by training and test (network shape, data format and scaling).

    Every option belongs to one argument group of the --help text and has a one-line help
    (ArgumentDefaultsHelpFormatter prints a default only where there is help).
    """

    is_train = True
    # Titles of the --help sections, in order; `add` names one of them.
    GROUPS = ('data', 'SDOML stores', 'network', 'augmentation', 'checking',
              'training hyper-parameters', 'logging and saving', 'test')

    def __init__(self):
        p = OneLineErrorParser()
        self.parser = p
        self.groups = {title: p.add_argument_group(title) for title in self.GROUPS}
        # Every option is declared without a default, so that what argparse returns is what
        # the command line gave (`explicit`); `parse` adds these defaults after.
        self.defaults = {}
        self.ignored_here = set()  # training options that the Test script ignores
        # The Test script takes --input_ch/--target_ch from the training run (`adopt`) after
        # parsing; until then the per-channel scaling values cannot be counted against them.
        self.channels_known = self.is_train
        add = self.add

        add('data', '--data_format_input', type=lower_str, default='tif', choices=DATA_FORMATS,
            help='format of the input files (tif/tiff, jpg/jpeg and fits/fts/fit each also '
                 'list their family\'s other extensions)')
        add('data', '--data_format_target', type=lower_str, default='tif', choices=DATA_FORMATS,
            help='format of the target files, and of the generated files')
        add('data', '--input_ch', type=int, default=1, help='channels of each input file')
        add('data', '--target_ch', type=int, default=1, help='channels of each target file')
        add('data', '--data_size', type=int, default=1024,
            help='height/width of the data (informational; the files decide)')
        # The scaling options take one value for every channel or one per channel
        # (README "Your own data", Scaling).
        add('data', '--logscale_input', boolean=True, per_channel=True, default=False,
            help='take log10 of the input before normalising (one value, or one per channel)')
        add('data', '--logscale_target', boolean=True, per_channel=True, default=False,
            help='take log10 of the target before normalising (one value, or one per channel)')
        add('data', '--saturation_lower_limit_input', type=float, per_channel=True, default=-1,
            help='input value mapped to -1 (one value, or one per channel)')
        add('data', '--saturation_upper_limit_input', type=float, per_channel=True, default=1,
            help='input value mapped to +1 (one value, or one per channel)')
        add('data', '--saturation_lower_limit_target', type=float, per_channel=True, default=-1,
            help='target value mapped to -1 (one value, or one per channel)')
        add('data', '--saturation_upper_limit_target', type=float, per_channel=True, default=1,
            help='target value mapped to +1 (one value, or one per channel)')
        add('data', '--saturation_clip_input', boolean=True, per_channel=True, default=False,
            help='clip the input to its limits (one value, or one per channel)')
        add('data', '--saturation_clip_target', boolean=True, per_channel=True, default=False,
            help='clip the target to its limits, the Test inverse too (one value, or one per '
                 'channel)')
        add('data', '--target_unit', type=str, default=None,
            help="physical unit of the targets, e.g. G: BUNIT of generated FITS files and "
                 "the panels' label (None: BUNIT of the first FITS target)")
        add('data', '--n_workers', type=int, default=1, help='data-loading processes')
        self.add_store_options()

        add('network', '--gpu_ids', type=str, default='0',
            help="GPU index, '-1' for the CPU, '0,1' for several GPUs")
        add('network', '--n_downsample', type=int, default=4,
            help='stride-2 convolutions of the generator')
        add('network', '--n_residual', type=int, default=9,
            help='residual blocks of the generator')
        add('network', '--trans_conv', boolean=True, default=True,
            help='transposed convolutions (False: bilinear upsampling)')
        add('network', '--n_gf', type=int, default=64, help='generator base width')
        add('network', '--norm_type', type=str, default='InstanceNorm2d',
            choices=('InstanceNorm2d', 'BatchNorm2d'), help='normalisation of the generator')
        add('network', '--padding_type', type=lower_str, default='replication',
            choices=('reflection', 'replication', 'zero'), help='padding of the generator')
        add('network', '--n_D', type=int, default=1, in_test='hidden',
            help='number of discriminator scales')
        add('network', '--n_df', type=int, default=64, in_test='hidden',
            help='discriminator base width')
        add('network', '--n_CC', type=int, default=4, in_test='hidden',
            help='number of Inspector (CC) scales')
        add('network', '--data_type', type=int, default=32, choices=(16, 32),
            help='32: float32; 16: mixed precision')
        add('network', '--amp_dtype', type=lower_str, default='auto',
            choices=('auto', 'bfloat16', 'float16'),
            help='with --data_type 16: bfloat16 where supported (auto), or force one')
        add('network', '--compile', boolean=True, default=False,
            help='torch.compile the networks (faster steps after a slow first one)')

        add('augmentation', '--padding_size', type=int, default=0, in_test='hidden',
            help='pad by edge replication and crop back at a random offset')
        add('augmentation', '--max_rotation_angle', type=int, default=0, in_test='hidden',
            help='rotate by a random integer angle in degrees')
        add('augmentation', '--crop_size', type=int, default=0, in_test='hidden',
            help='train on a random N x N window of each pair, a multiple of 2**n_downsample '
                 '(0: whole images; test and validation use whole images)')

        add('checking', '--val_during_train', boolean=True, default=False, in_test='hidden',
            help='at every save, translate the test inputs (--input_dir_test)')
        add('checking', '--target_dir_test', type=str, default=None,
            help='targets of the test inputs: enables the metrics (CC, RMSE, flux)')
        add('checking', '--metric_bins', type=int, nargs='+', default=[1, 2, 4, 8],
            help='binning factors k (k x k block means) at which metrics are computed')
        # The regions of the metrics (README "Evaluating a model").
        add('checking', '--disk_fraction', type=float, default=0.98,
            help='disk metrics over the pixels within this fraction of the solar radius')
        add('checking', '--active_threshold', type=float, default=None,
            help='on-disk pixels whose real |value| >= T (target units) are active, the rest '
                 'quiet: active_ and quiet_ metrics (None: off)')
        add('checking', '--disk_center_px', type=float, nargs=2, default=None,
            metavar=('X', 'Y'),
            help="the disk's centre in pixels (column, row from 0), with --disk_radius_px; "
                 "overrides the FITS targets' WCS and RSUN cards")
        add('checking', '--disk_radius_px', type=float, default=None,
            help="the disk's radius in pixels, with --disk_center_px")
        add('checking', '--check_pairing', boolean=True, default=True,
            help='stop when input and target file names show a wrong pairing (training '
                 'pairs; in the Test script, --input_dir_test with --target_dir_test)')
        # Full-resolution images (README "Full-resolution images"): the Test script and
        # --val_during_train.
        add('checking', '--tile_size', type=int, default=0,
            help='translate images larger than N x N in tiles of N x N pixels (bands of '
                 'whole rows), with the whole-image result in bounded memory; a multiple of '
                 '2**n_downsample (0: whole images, or tiles when a whole image would not '
                 'fit in memory)')
        add('checking', '--tmp_dir', type=str, default=None,
            help="folder of the temporary files of tiled inference, removed at the end "
                 "(None: the system's temporary folder)")

        add('training hyper-parameters', '--batch_size', type=int, default=1, in_test='hidden',
            help='samples per iteration')

        add('logging and saving', '--dataset_name', type=str, default='pix2pixCC',
            help='name of the run: outputs go to ./checkpoints/<dataset_name>/')
        add('logging and saving', '--save_scale', type=float, default=1,
            help='generated data are multiplied by this when saved')
        add('logging and saving', '--report_freq', type=int, default=100, in_test='hidden',
            help='samples between report lines')
        add('logging and saving', '--save_freq', type=int, default=10000, in_test='hidden',
            help='samples between checkpoints')
        add('logging and saving', '--display_freq', type=int, default=100, in_test='hidden',
            help='samples between preview images')
        add('logging and saving', '--display_scale', type=float, default=1, in_test='hidden',
            help='brightness factor of the preview images')
        add('logging and saving', '--image_mode', type=lower_str, default='png', in_test='hidden',
            choices=('png', 'jpg', 'jpeg', 'tif', 'tiff', 'bmp'),
            help='file type of the preview images')

        # The published scripts declare --is_train (True in training, False in test); it is
        # accepted so that their command lines run, and the script, not the flag, decides.
        p.add_argument('--is_train', type=str2bool, nargs='?', const=True,
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.option_names.append('--is_train')

    def add(self, group, name, help, default, boolean=False, per_channel=False, in_test='shown',
            **kwargs):
        """Add option `name`, with its one line of `help` and its `default`, to the --help
        section `group`.

        boolean: parsed by `str2bool`; a bare `--flag` means True. per_channel: takes one
        value or several, one per channel (stored by `one_or_per_channel`). in_test: how the
        Test script treats the option: 'shown' in its --help; 'hidden' from its --help (it
        only matters in training) but parsed, with its default; 'ignored': a training option,
        parsed so that a training command line runs, absent from the options and named in a
        note when given (`ignored`).
        """
        if boolean:
            kwargs.update(type=str2bool, metavar='BOOL')
        if per_channel:
            # A bare boolean `--flag` gives [], which `one_or_per_channel` makes True.
            kwargs.update(nargs='*' if boolean else '+', metavar=kwargs.get('metavar', 'VALUE'))
        elif boolean:
            # nargs='?' lets a bare `--flag` mean True while `--flag False` means False.
            kwargs.update(nargs='?', const=True)
        dest = name.lstrip('-')
        if self.is_train or in_test == 'shown':
            help = help if '(default' in help else f'{help} (default: {default})'
        else:
            help = argparse.SUPPRESS
        if self.is_train or in_test != 'ignored':
            self.defaults[dest] = default
        else:
            self.ignored_here.add(dest)
        self.groups[group].add_argument(name, help=help, default=argparse.SUPPRESS, **kwargs)
        self.parser.option_names.append(name)

    def add_store_options(self):
        """Pairs from SDOMLv2 zarr stores instead of folders (README "Training on SDOML"):
        paired by time, split into training and test by months."""
        def add(name, **kwargs):
            self.add('SDOML stores', name, **kwargs)

        add('--sdoml_input', type=str, default=None, metavar='STORE',
            help='SDOMLv2 zarr store of the inputs (a folder such as aia.zarr), instead of '
                 'the input folders (None: folders)')
        add('--sdoml_target', type=str, default=None, metavar='STORE',
            help='SDOMLv2 store of the targets (such as hmi.zarr; may be the input store)')
        add('--sdoml_input_arrays', type=str, nargs='+', default=None, metavar='ARRAY',
            help='arrays of the input store that are the input channels, in order, e.g. '
                 '171A 193A 304A')
        add('--sdoml_target_arrays', type=str, nargs='+', default=['Bz'], metavar='ARRAY',
            help='arrays of the target store that are the target channels, e.g. Bz or Bx By Bz')
        add('--sdoml_start', type=str, default=None, metavar='TIME',
            help='pairs whose target time (UTC, ISO: 2011-01-01 or 2011-01-01T12:00) is at '
                 'or after this (None: the first frame)')
        add('--sdoml_end', type=str, default=None, metavar='TIME',
            help='pairs whose target time is before this (None: up to the last frame)')
        add('--sdoml_tolerance', type=float, default=6.0, metavar='MINUTES',
            help='largest time difference (minutes) between a target frame and the frame '
                 'of each input passband')
        add('--sdoml_test_months', type=int, nargs='*', default=None, metavar='MONTH',
            help='months (1-12) of the target times that form the test split (Test, '
                 '--val_during_train); the other pairs train (None: every pair trains, '
                 'and the Test script takes every pair)')
        add('--sdoml_gap_days', type=float, default=0.0, metavar='DAYS',
            help='leave out of training the pairs within this many days of a test pair')
        add('--sdoml_skip', type=str, default=None, metavar='FILE',
            help="frames to leave out, one a line: 'TIME' (every array), 'ARRAY TIME' or "
                 "'ARRAY YEAR/INDEX' (None: none)")

    def add_training_options(self):
        """The options of TrainOption (in TestOption: parsed, hidden, ignored)."""
        def add(group, name, **kwargs):
            self.add(group, name, in_test='ignored', **kwargs)

        add('data', '--input_dir_train', type=str, default='./datasets/Train/Input',
            help='folder of the training inputs')
        add('data', '--target_dir_train', type=str, default='./datasets/Train/Target',
            help='folder of the training targets (input i pairs with target i by sorted name)')
        add('training hyper-parameters', '--n_epochs', type=int, default=150,
            help='epochs at the constant --lr')
        add('training hyper-parameters', '--n_epochs_decay', type=int, default=0,
            help='epochs after --n_epochs in which the lr falls linearly towards 0')
        add('training hyper-parameters', '--lr', type=float, default=0.0002,
            help='Adam learning rate')
        add('training hyper-parameters', '--beta1', type=float, default=0.5, help='Adam beta1')
        add('training hyper-parameters', '--beta2', type=float, default=0.999, help='Adam beta2')
        add('training hyper-parameters', '--lambda_LSGAN', type=float, default=2.0,
            help='weight of the adversarial (LSGAN) loss')
        add('training hyper-parameters', '--lambda_FM', type=float, default=10.0,
            help='weight of the feature-matching loss')
        add('training hyper-parameters', '--lambda_CC', type=float, default=5.0,
            help='weight of the Inspector (1 - CC) loss')
        add('training hyper-parameters', '--ch_balance', type=float, default=1,
            help='channel balance of the discriminator input (<= 0: plain pair)')
        add('training hyper-parameters', '--ccc', boolean=True, default=True,
            help='concordance CC (False: Pearson CC)')
        add('training hyper-parameters', '--seed', type=int, default=None,
            help='random seed (weights, data order, augmentation); drawn and recorded in '
                 'the options file when not given')
        add('training hyper-parameters', '--latest_iter', type=int, default=0,
            help='resume from Model/<latest_iter>_G.pt, _D.pt and _state.pt; -1: the newest '
                 'complete checkpoint; 0: a new run')
        add('training hyper-parameters', '--keep_states', type=int, default=1,
            help='keep the training state (<step>_state.pt, to resume) of the K newest '
                 'checkpoints; 0: all')
        add('training hyper-parameters', '--tensorboard', boolean=True, default=False,
            help='write TensorBoard event files under checkpoints/<dataset_name>/tensorboard/')
        add('logging and saving', '--verbose', boolean=True, default=False,
            help='print every option at start-up (train_options.json always holds them)')

    def parse(self, argv=None):
        """Parse `argv` (default: the command line) and return the options namespace.

        The names given explicitly on the command line are kept in `self.explicit`.
        """
        given = vars(self.parser.parse_args(argv))
        self.explicit = set(given)
        opt = argparse.Namespace(**{**self.defaults, **given})
        opt.is_train = self.is_train
        self.take_store_layout(opt)
        self.finish(opt)
        return opt

    def take_store_layout(self, opt):
        """With SDOML stores (--sdoml_input) the arrays are the channels and the data FITS
        frames: --input_ch, --target_ch and the formats follow, unless given on the command
        line (`store_problems` refuses a contradiction; also one met later, with the options
        of a training run)."""
        if not opt.sdoml_input:
            return
        for side in ('input', 'target'):
            arrays = getattr(opt, f'sdoml_{side}_arrays')
            if arrays and f'{side}_ch' not in self.explicit:
                setattr(opt, f'{side}_ch', len(arrays))
            if f'data_format_{side}' not in self.explicit:
                setattr(opt, f'data_format_{side}', 'fits')

    def finish(self, opt):
        """Validate and set the derived options (eps, output folders)."""
        for side in ('input', 'target'):
            for name in PER_CHANNEL_OPTIONS:
                option = f'{name}_{side}'
                setattr(opt, option, one_or_per_channel(getattr(opt, option)))
        self.validate(opt)
        opt.eps = 1e-4 if opt.data_type == 16 else 1e-8
        opt.checkpoint_dir = os.path.join('./checkpoints', opt.dataset_name)
        opt.model_dir = os.path.join(opt.checkpoint_dir, 'Model')
        opt.image_dir = os.path.join(opt.checkpoint_dir, 'Image',
                                     'Train' if self.is_train else 'Test')

    def adopt(self, opt, saved, names, source, log=print):
        """Take options `names` from `saved` (a dict from a training run) unless they were
        given explicitly; explicit values win, and a difference is printed."""
        taken, overridden = [], []
        for name in names:
            if name not in saved or saved[name] == getattr(opt, name, None):
                continue
            if name in self.explicit:
                overridden.append(f"--{name} {as_argument(getattr(opt, name))} (trained with "
                                  f"{as_argument(saved[name])})")
            else:
                setattr(opt, name, saved[name])
                taken.append(f"--{name} {as_argument(saved[name])}")
        if taken:
            log(f"options from {source}: {' '.join(taken)}")
        if overridden:
            log(f"note: given on the command line, differing from {source}: "
                f"{', '.join(overridden)}")
        self.channels_known = True
        self.finish(opt)

    # Options that count something (at least 1), and options that must not be negative.
    COUNTS = ('input_ch', 'target_ch', 'batch_size', 'n_D', 'n_gf', 'n_df', 'report_freq',
              'save_freq', 'display_freq')
    NON_NEGATIVE = ('n_downsample', 'n_residual', 'n_CC', 'n_workers', 'padding_size',
                    'max_rotation_angle', 'n_epochs_decay', 'keep_states', 'crop_size',
                    'tile_size')

    def validate(self, opt):
        """Reject option values that cannot work, with a one-line message naming the option."""
        opt.gpu_ids = opt.gpu_ids.replace(' ', '')
        for problem in (*self.number_problems(opt), *self.store_use_problems(opt),
                        *self.scaling_problems(opt, self.channels_known)):
            self.parser.error(problem)  # exits with the first

    def number_problems(self, opt):
        if not all(part.lstrip('-').isdigit() for part in opt.gpu_ids.split(',')):
            yield (f"--gpu_ids '{opt.gpu_ids}' must be '-1' (CPU) or GPU indices such as '0' "
                   f"or '0,1'")
        for name in self.COUNTS:
            if getattr(opt, name) < 1:
                yield f"--{name} must be at least 1, got {getattr(opt, name)}"
        for name in self.NON_NEGATIVE:
            if getattr(opt, name, 0) < 0:  # (some are training options only)
                yield f"--{name} must not be negative, got {getattr(opt, name)}"
        stride = 2 ** opt.n_downsample
        # The generator's stride; the Test script knows the run's --n_downsample only once
        # it has taken the run's options (`adopt`, which checks again).
        for name in ('crop_size', 'tile_size') if self.channels_known else ('crop_size',):
            if getattr(opt, name) % stride:
                yield (f"--{name} must be a multiple of {stride} (2**--n_downsample), got "
                       f"{getattr(opt, name)}")
        if opt.tmp_dir is not None and not os.path.isdir(opt.tmp_dir):
            yield (f"--tmp_dir {opt.tmp_dir} is not a folder; give an existing folder with "
                   f"room for the temporary tiles")
        if min(opt.metric_bins) < 1:
            yield f"--metric_bins must be positive integers, got {opt.metric_bins}"
        yield from region_problems(opt)

    # The folders that SDOML stores replace (README "Training on SDOML").
    FOLDER_OPTIONS = ('input_dir_train', 'target_dir_train', 'input_dir_test', 'target_dir_test')

    def store_use_problems(self, opt):
        """The SDOML options: none without --sdoml_input, no folders beside the stores, and
        the rest of a run on stores (`store_problems`)."""
        explicit = getattr(self, 'explicit', set())
        if not self.channels_known:  # (the Test script: checked with the run's options)
            return
        if not opt.sdoml_input:
            given = sorted(name for name in explicit
                           if name.startswith('sdoml_') and getattr(opt, name) is not None)
            if given:
                yield f"--{given[0]} needs --sdoml_input STORE (the store of the inputs)"
            return
        folders = [name for name in self.FOLDER_OPTIONS if name in explicit]
        if folders:
            yield (f"--{folders[0]} names a folder, but --sdoml_input takes the pairs from "
                   f"stores; give folders or stores, not both")
        yield from store_problems(opt)

    @staticmethod
    def scaling_problems(opt, channels_known=True):
        """--save_scale, then the scaling options of each side (`side_scaling_problems`)."""
        if opt.save_scale == 0 or not math.isfinite(opt.save_scale):
            # FITS outputs' BUNIT is the unit divided by it (README "Output files")
            yield f"--save_scale must be a non-zero finite number, got {opt.save_scale:g}"
        for side in ('input', 'target'):
            yield from side_scaling_problems(opt, side, channels_known)

    @staticmethod
    def describe(opt):
        """All options as aligned `name: value` lines (pix2pixHD style)."""
        return '\n'.join(f'{key:>32}: {value}' for key, value in sorted(vars(opt).items()))


def region_problems(opt):
    """The options of the disk, active and quiet regions (README "Evaluating a model")."""
    if not 0 < opt.disk_fraction < math.inf:
        yield f"--disk_fraction must be a positive number, got {opt.disk_fraction:g}"
    if opt.active_threshold is not None and not 0 <= opt.active_threshold < math.inf:
        yield f"--active_threshold must be a number >= 0, got {opt.active_threshold:g}"
    if (opt.disk_center_px is None) != (opt.disk_radius_px is None):
        yield "--disk_center_px X Y and --disk_radius_px R go together: give both or neither"
    elif opt.disk_radius_px is not None and not (
            0 < opt.disk_radius_px < math.inf and all(map(math.isfinite, opt.disk_center_px))):
        yield (f"--disk_center_px must be finite and --disk_radius_px positive, got "
               f"{as_argument(opt.disk_center_px)} and {opt.disk_radius_px:g}")


def store_problems(opt):
    """The SDOML options of a run on stores (README "Training on SDOML"): a target store and
    arrays for both sides, as many as the channels, FITS data, the numbers."""
    if not opt.sdoml_input_arrays:
        yield ("--sdoml_input needs --sdoml_input_arrays: the arrays of the input channels, "
               "e.g. 171A 193A 304A")
    if not opt.sdoml_target:
        yield ("--sdoml_input needs --sdoml_target STORE: pairs are made at the times of the "
               "target frames (it may be the input store)")
    for side in ('input', 'target'):
        arrays, channels = getattr(opt, f'sdoml_{side}_arrays') or [], getattr(opt, f'{side}_ch')
        if side == 'target' and not arrays:
            yield "--sdoml_target_arrays needs one array or more, e.g. Bz"
        if arrays and len(arrays) != channels:
            yield (f"--sdoml_{side}_arrays names {len(arrays)} array(s) ({' '.join(arrays)}), "
                   f"one a channel, but --{side}_ch is {channels}; leave out --{side}_ch, or "
                   f"name {channels} array(s)")
        if getattr(opt, f'data_format_{side}') not in FITS_FORMATS:
            yield (f"--data_format_{side} {getattr(opt, f'data_format_{side}')}: SDOML frames "
                   f"have FITS headers, and the products are FITS; leave out "
                   f"--data_format_{side}")
    if opt.sdoml_tolerance < 0 or opt.sdoml_gap_days < 0:
        yield (f"--sdoml_tolerance and --sdoml_gap_days must not be negative, got "
               f"{opt.sdoml_tolerance:g} and {opt.sdoml_gap_days:g}")
    if any(not 1 <= month <= 12 for month in opt.sdoml_test_months or []):
        yield f"--sdoml_test_months are months 1 to 12, got {as_argument(opt.sdoml_test_months)}"
    if getattr(opt, 'val_during_train', False) and not opt.sdoml_test_months:
        yield ("--val_during_train with SDOML stores translates the test split: give "
               "--sdoml_test_months (the months of the test pairs)")


def sharing_problems(opt, run_known=True):
    """The Test script's options of export and conversion (README "Sharing a model and running
    it elsewhere"). run_known: the run's --data_format_target is taken (`adopt`), so that
    --compress can be checked against it."""
    step = opt.quantize_step
    if step is not None and not 0 < step < math.inf:
        yield f"--quantize_step must be a positive number in the target unit, got {step:g}"
    elif step is not None and not opt.compress:
        yield "--quantize_step rounds the values of --compress: add --compress"
    if opt.export_dtype != 32 and opt.export != 'model':
        yield "--export_dtype applies to --export model: add it, or leave out --export_dtype"
    if run_known and opt.compress and opt.data_format_target not in FITS_FORMATS:
        yield (f"--compress writes tile-compressed FITS, but the outputs are "
               f"{opt.data_format_target} (--data_format_target); leave out --compress")


def side_scaling_problems(opt, side, channels_known=True):
    """A scaling option of `side` with neither one value nor one per channel (--input_ch or
    --target_ch); when there is none, the limits of each channel (`limit_problems`).

    channels_known: False while the Test script's --input_ch/--target_ch may still come from
    the training run: the lists must then only agree with each other, and are counted
    against the channels when the run's options are taken (`adopt`).
    """
    counts = {f'{name}_{side}': len(getattr(opt, f'{name}_{side}'))
              for name in PER_CHANNEL_OPTIONS if isinstance(getattr(opt, f'{name}_{side}'), list)}
    channels = getattr(opt, f'{side}_ch') if channels_known else max(counts.values(), default=1)
    wrong = [(option, n) for option, n in counts.items() if n != channels]
    if not wrong:
        yield from limit_problems(opt, side, channels if counts else 1, per_channel=bool(counts))
    elif channels_known:
        option, n = wrong[0]
        yield (f"--{option} has {n} values, but --{side}_ch is {channels}: give one value for "
               f"every channel or one for all")


def limit_problems(opt, side, channels, per_channel):
    """The limits of each of `channels` channels of `side`: lower below upper, and positive
    for log10. per_channel: the side has a value per channel, so each line names its
    channel."""
    lower, upper, log = (channel_values(getattr(opt, f'{name}_{side}'), channels)
                         for name in ('saturation_lower_limit', 'saturation_upper_limit',
                                      'logscale'))
    for c in range(channels):
        where = f' for {side} channel {c}' if per_channel else ''
        if not lower[c] < upper[c]:
            yield (f"--saturation_lower_limit_{side} ({lower[c]:g}) must be below "
                   f"--saturation_upper_limit_{side} ({upper[c]:g}){where}")
        if log[c] and lower[c] <= 0:
            yield (f"--logscale_{side} needs a positive --saturation_lower_limit_{side} "
                   f"(got {lower[c]:g}){where}; log10 is undefined at or below 0")


def one_or_per_channel(value):
    """A per-channel option's value as the options hold it: one value as a scalar, as before
    these options took one per channel (so train_options.json files, checkpoints and
    test_run.json records stay as they were), several as a list; a bare boolean flag ([])
    means True."""
    if not isinstance(value, (list, tuple)):
        return value
    if not value:
        return True
    return value[0] if len(value) == 1 else list(value)


def channel_values(value, channels):
    """The value of each of `channels` channels: a list as it is, one value repeated."""
    return list(value) if isinstance(value, list) else [value] * channels


def as_argument(value):
    """An option's value as written on the command line (a list as its values)."""
    return ' '.join(map(str, value)) if isinstance(value, list) else value


# Options that decide the generator's shape and the data's units: the Test script takes them
# from the training run unless they are given on its command line.
NETWORK_OPTIONS = ('input_ch', 'target_ch', 'n_downsample', 'n_residual', 'trans_conv', 'n_gf',
                   'norm_type', 'padding_type')
DATA_OPTIONS = ('data_format_input', 'data_format_target', 'logscale_input', 'logscale_target',
                'saturation_lower_limit_input', 'saturation_upper_limit_input',
                'saturation_lower_limit_target', 'saturation_upper_limit_target',
                'saturation_clip_input', 'saturation_clip_target', 'target_unit')
# The SDOML options (README "Training on SDOML"): the Test script takes them from the
# training run too, unless test folders are given (`store_options`).
SDOML_OPTIONS = ('sdoml_input', 'sdoml_target', 'sdoml_input_arrays', 'sdoml_target_arrays',
                 'sdoml_start', 'sdoml_end', 'sdoml_tolerance', 'sdoml_test_months',
                 'sdoml_gap_days', 'sdoml_skip')


def store_options(explicit):
    """The SDOML options the Test script takes from the training run (those not given on
    its command line, `explicit`): all, unless it names test folders."""
    if explicit & {'input_dir_test', 'target_dir_test'}:
        return ()
    return SDOML_OPTIONS


# Options of a training run that a resumed run does not take from the saved run.
# target_header and training_data are read from the data again at every start.
# dataset_name: the run folder is always the one the command line names (or the default),
# so a run folder copied under another name is resumed there, never in the original.
NOT_RESUMED = ('latest_iter', 'gpu_ids', 'is_train', 'eps', 'checkpoint_dir', 'model_dir',
               'image_dir', 'verbose', 'target_header', 'training_data', 'dataset_name',
               'tile_size', 'tmp_dir')


class TrainOption(BaseOption):
    is_train = True

    def __init__(self):
        super().__init__()
        self.add_training_options()
        self.add('checking', '--input_dir_test', type=str, default='./datasets/Test/Input',
                 help='inputs translated at every save with --val_during_train')
        self.add('training hyper-parameters', '--no_shuffle', boolean=True, default=False,
                 help='keep the files in name order')


class TestOption(BaseOption):
    is_train = False

    def __init__(self):
        super().__init__()
        # The defaults shown are the parser's; a run's own options decide (README "Options").
        self.parser.description = (
            "Translate the test inputs with a trained generator. The network and data "
            "options (formats, channels, scaling, network shape) default to the run's "
            "checkpoints/<dataset_name>/train_options.json when it exists; the defaults shown "
            "below apply to a run without one (e.g. one trained with the published code).")
        self.add_training_options()
        self.add('test', '--input_dir_test', type=str, default='./datasets/Test/Input',
                 help='inputs to translate')
        self.add('test', '--iteration', type=int, default=-1,
                 help='use Model/<iteration>_G.pt; -1: every saved generator, in order')
        self.add('test', '--save_panels', boolean=True, default=False,
                 help='with --target_dir_test: a PNG panel input | real | generated | '
                      'difference per file')
        self.add('test', '--output_dir', type=str, default=None,
                 help='folder of the outputs (default: checkpoints/<dataset_name>/Image/Test/'
                      '<iteration>); with --iteration -1, each generator\'s go into '
                      'DIR/<iteration>/ (default DIR: checkpoints/<dataset_name>/Image/Test)')
        self.add('test', '--overwrite', boolean=True, default=False,
                 help='replace the outputs of an earlier, different Test run in --output_dir '
                      '(only the files a Test run writes are removed), or another --export '
                      'of the same step')
        # Sharing a model and converting an archive (README "Sharing a model and running it
        # elsewhere").
        self.add('test', '--model', type=str, default=None,
                 help='run from this model file alone (made with --export model): its network, '
                      'scaling, unit and step replace the run folder\'s')
        self.add('test', '--export', type=lower_str, default=None, choices=('model', 'onnx'),
                 help='with one --iteration N (or --model): write the generator as one model '
                      'file, checkpoints/<dataset_name>/Export/<dataset_name>_<N>.pt (model), '
                      'or as an ONNX model with its scaling and unit, ..._<N>.onnx (onnx), '
                      'then stop (none: translate)')
        self.add('test', '--export_dtype', type=int, default=32, choices=(16, 32),
                 help='with --export model: 32 stores float32 weights, 16 bfloat16 (half the '
                      'size; cast back to float32 to run)')
        self.add('test', '--skip_existing', boolean=True, default=False,
                 help='leave every complete output alone, so a stopped conversion continues '
                      'where it was (the metrics still cover every file)')
        self.add('test', '--compress', boolean=True, default=False,
                 help='FITS outputs tile-compressed: lossless, or with --quantize_step '
                      'rounded to that step')
        self.add('test', '--quantize_step', type=float, default=None,
                 help='with --compress: round the values to multiples of this step, in the '
                      'target unit (every value within step/2; none: lossless)')
        self.add('test', '--select_metric', type=str, default=None,
                 help='with --iteration -1: the metric key that picks the best generator '
                      '(highest CC/CCC, lowest RMSE/MAE), e.g. disk_cc_8x8 (default: CC at the '
                      'largest --metric_bins of the first channel, cc_8x8)')
        self.add('test', '--no_shuffle', boolean=True, default=True, in_test='hidden',
                 help='kept for compatibility; test order is by name')

    def validate(self, opt):
        super().validate(opt)
        for problem in sharing_problems(opt, self.channels_known):
            self.parser.error(problem)

    def ignored(self):
        """Training options given on the command line (they have no effect here)."""
        return sorted(self.explicit & self.ignored_here)


def run_main(main_function, argv=None):
    """Run a driver's main, turning a UserError into one line on stderr and exit status 2."""
    try:
        return main_function(argv)
    except UserError as error:
        # An error raised in a DataLoader worker arrives wrapped with the worker's traceback;
        # the user's message is its last line.
        message = str(error).strip().splitlines()[-1] if str(error).strip() else 'error'
        message = message.split('UserError: ', 1)[-1]
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside training (e.g. in the Test script)
        print(f"{os.path.basename(sys.argv[0])}: interrupted (SIGINT)", file=sys.stderr)
        return 130
