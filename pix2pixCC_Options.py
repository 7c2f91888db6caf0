"""Command-line options of pix2pixCC.

`TrainOption().parse(argv)` and `TestOption().parse(argv)` return the options namespace.
Option names and defaults are the public interface of the published pix2pixCC scripts; only
the parsing of booleans differs (see `str2bool`). Parsing has no side effects: the drivers
create folders and write the options file.
"""
import argparse
import os
import sys

DATA_FORMATS = ('tif', 'tiff', 'png', 'jpg', 'jpeg', 'npy', 'fits', 'fts', 'fit')


class UserError(Exception):
    """A problem the user must fix (bad option, bad data file, missing checkpoint).

    The drivers print it as one line and exit with status 2, without a traceback.
    """


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
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class BaseOption:
    """Options shared by training and test (network shape, data format and scaling)."""

    def __init__(self):
        p = OneLineErrorParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.parser = p

        def add_bool(name, default, help):
            # nargs='?' lets a bare `--flag` mean True while `--flag False` means False.
            p.add_argument(name, type=str2bool, nargs='?', const=True, default=default,
                           metavar='BOOL', help=help)
        self.add_bool = add_bool

        p.add_argument('--gpu_ids', type=str, default='0',
                       help="GPU index, '-1' for the CPU, '0,1' for several GPUs")
        p.add_argument('--dataset_name', type=str, default='pix2pixCC',
                       help='outputs go to ./checkpoints/<dataset_name>/')
        p.add_argument('--data_format_input', type=lower_str, default='tif', choices=DATA_FORMATS)
        p.add_argument('--data_format_target', type=lower_str, default='tif', choices=DATA_FORMATS)

        p.add_argument('--input_ch', type=int, default=1)
        p.add_argument('--target_ch', type=int, default=1)
        p.add_argument('--data_size', type=int, default=1024,
                       help='height/width of the data (informational; the files decide)')

        add_bool('--logscale_input', False, 'take log10 of the input before normalising')
        add_bool('--logscale_target', False, 'take log10 of the target before normalising')
        p.add_argument('--saturation_lower_limit_input', type=float, default=-1)
        p.add_argument('--saturation_upper_limit_input', type=float, default=1)
        p.add_argument('--saturation_lower_limit_target', type=float, default=-1)
        p.add_argument('--saturation_upper_limit_target', type=float, default=1)
        add_bool('--saturation_clip_input', False, 'clip the input to its limits')
        add_bool('--saturation_clip_target', False, 'clip the target to its limits')

        p.add_argument('--batch_size', type=int, default=1)
        p.add_argument('--n_downsample', type=int, default=4)
        p.add_argument('--n_residual', type=int, default=9)
        add_bool('--trans_conv', True, 'transposed convolutions (False: bilinear upsampling)')
        p.add_argument('--n_D', type=int, default=1, help='number of discriminator scales')
        p.add_argument('--n_CC', type=int, default=4, help='number of Inspector (CC) scales')
        p.add_argument('--n_gf', type=int, default=64, help='generator base width')
        p.add_argument('--n_df', type=int, default=64, help='discriminator base width')
        p.add_argument('--data_type', type=int, default=32, choices=(16, 32),
                       help='32: float32; 16: mixed precision')
        p.add_argument('--amp_dtype', type=lower_str, default='auto',
                       choices=('auto', 'bfloat16', 'float16'),
                       help='with --data_type 16: bfloat16 where supported (auto), or force one')
        add_bool('--compile', False, 'torch.compile the networks (faster steps after a '
                                     'slow first one)')
        p.add_argument('--n_workers', type=int, default=1, help='data-loading processes')
        p.add_argument('--norm_type', type=str, default='InstanceNorm2d',
                       choices=('InstanceNorm2d', 'BatchNorm2d'))
        p.add_argument('--padding_type', type=lower_str, default='replication',
                       choices=('reflection', 'replication', 'zero'))
        p.add_argument('--padding_size', type=int, default=0,
                       help='augmentation: pad by edge replication and crop back at random')
        p.add_argument('--max_rotation_angle', type=int, default=0,
                       help='augmentation: rotate by a random integer angle in degrees')

        p.add_argument('--report_freq', type=int, default=100, help='in samples')
        p.add_argument('--save_freq', type=int, default=10000, help='in samples')
        p.add_argument('--display_freq', type=int, default=100, help='in samples')
        p.add_argument('--save_scale', type=float, default=1,
                       help='generated data are multiplied by this when saved')
        p.add_argument('--display_scale', type=float, default=1,
                       help='brightness factor of the PNG previews')
        p.add_argument('--image_mode', type=lower_str, default='png',
                       choices=('png', 'jpg', 'jpeg', 'tif', 'tiff', 'bmp'),
                       help='file type of the training previews')
        add_bool('--val_during_train', False,
                 'at every save, translate the test inputs (--input_dir_test)')
        p.add_argument('--target_dir_test', type=str, default=None,
                       help='targets of the test inputs: enables the metrics (CC, RMSE, flux)')
        p.add_argument('--metric_bins', type=int, nargs='+', default=[1, 2, 4, 8],
                       help='binning factors k (k x k block means) at which metrics are computed')

    def parse(self, argv=None):
        """Parse `argv` (default: the command line) and return the options namespace.

        The names given explicitly on the command line are kept in `self.explicit`.
        """
        opt = self.parser.parse_args(argv)
        self.explicit = self.explicit_names(argv)
        opt.is_train = self.is_train
        self.finish(opt)
        return opt

    def finish(self, opt):
        """Validate and set the derived options (eps, output folders)."""
        self.validate(opt)
        opt.eps = 1e-4 if opt.data_type == 16 else 1e-8
        opt.checkpoint_dir = os.path.join('./checkpoints', opt.dataset_name)
        opt.model_dir = os.path.join(opt.checkpoint_dir, 'Model')
        opt.image_dir = os.path.join(opt.checkpoint_dir, 'Image',
                                     'Train' if self.is_train else 'Test')

    def explicit_names(self, argv):
        """Option names given on the command line (parsed again with every default hidden)."""
        actions = [a for a in self.parser._actions if a.dest != 'help']
        defaults = [a.default for a in actions]
        for action in actions:
            action.default = argparse.SUPPRESS
        try:
            return set(vars(self.parser.parse_args(argv)))
        finally:
            for action, default in zip(actions, defaults):
                action.default = default

    def adopt(self, opt, saved, names, source, log=print):
        """Take options `names` from `saved` (a dict from a training run) unless they were
        given explicitly; explicit values win, and a difference is printed."""
        taken, overridden = [], []
        for name in names:
            if name not in saved or saved[name] == getattr(opt, name, None):
                continue
            if name in self.explicit:
                overridden.append(f"--{name} {getattr(opt, name)} (trained with {saved[name]})")
            else:
                setattr(opt, name, saved[name])
                taken.append(f"--{name} {saved[name]}")
        if taken:
            log(f"options from {source}: {' '.join(taken)}")
        if overridden:
            log(f"note: given on the command line, differing from {source}: "
                f"{', '.join(overridden)}")
        self.finish(opt)

    def validate(self, opt):
        """Reject option values that cannot work, with a one-line message naming the option."""
        def fail(message):
            self.parser.error(message)

        gpu_ids = opt.gpu_ids.replace(' ', '')
        if not all(part.lstrip('-').isdigit() for part in gpu_ids.split(',')):
            fail(f"--gpu_ids '{opt.gpu_ids}' must be '-1' (CPU) or GPU indices such as '0' "
                 f"or '0,1'")
        opt.gpu_ids = gpu_ids
        for name in ('input_ch', 'target_ch', 'batch_size', 'n_D', 'n_gf', 'n_df',
                     'report_freq', 'save_freq', 'display_freq'):
            if getattr(opt, name) < 1:
                fail(f"--{name} must be at least 1, got {getattr(opt, name)}")
        if min(opt.metric_bins) < 1:
            fail(f"--metric_bins must be positive integers, got {opt.metric_bins}")
        for name in ('n_downsample', 'n_residual', 'n_CC', 'n_workers', 'padding_size',
                     'max_rotation_angle', 'n_epochs_decay', 'keep_states'):
            if getattr(opt, name, 0) < 0:  # (some are training options only)
                fail(f"--{name} must not be negative, got {getattr(opt, name)}")
        for side in ('input', 'target'):
            lower = getattr(opt, f'saturation_lower_limit_{side}')
            upper = getattr(opt, f'saturation_upper_limit_{side}')
            if not lower < upper:
                fail(f"--saturation_lower_limit_{side} ({lower:g}) must be below "
                     f"--saturation_upper_limit_{side} ({upper:g})")
            if getattr(opt, f'logscale_{side}') and lower <= 0:
                fail(f"--logscale_{side} needs a positive --saturation_lower_limit_{side} "
                     f"(got {lower:g}); log10 is undefined at or below 0")

    @staticmethod
    def describe(opt):
        """All options as aligned `name: value` lines (pix2pixHD style)."""
        return '\n'.join(f'{key:>32}: {value}' for key, value in sorted(vars(opt).items()))


# Options that decide the generator's shape and the data's units: the Test script takes them
# from the training run unless they are given on its command line.
NETWORK_OPTIONS = ('input_ch', 'target_ch', 'n_downsample', 'n_residual', 'trans_conv', 'n_gf',
                   'norm_type', 'padding_type')
DATA_OPTIONS = ('data_format_input', 'data_format_target', 'logscale_input', 'logscale_target',
                'saturation_lower_limit_input', 'saturation_upper_limit_input',
                'saturation_lower_limit_target', 'saturation_upper_limit_target',
                'saturation_clip_input', 'saturation_clip_target')
# Options of a training run that a resumed run does not take from the saved run.
NOT_RESUMED = ('latest_iter', 'gpu_ids', 'is_train', 'eps', 'checkpoint_dir', 'model_dir',
               'image_dir')


class TrainOption(BaseOption):
    is_train = True

    def __init__(self):
        super().__init__()
        p = self.parser
        p.add_argument('--input_dir_train', type=str, default='./datasets/Train/Input')
        p.add_argument('--target_dir_train', type=str, default='./datasets/Train/Target')
        p.add_argument('--input_dir_test', type=str, default='./datasets/Test/Input',
                       help='inputs translated at every save with --val_during_train')
        p.add_argument('--n_epochs', type=int, default=150,
                       help='epochs at the constant --lr')
        p.add_argument('--n_epochs_decay', type=int, default=0,
                       help='epochs after --n_epochs in which the lr falls linearly towards 0')
        p.add_argument('--keep_states', type=int, default=1,
                       help='keep the training state (<step>_state.pt, to resume) of the K '
                            'newest checkpoints; 0: all')
        self.add_bool('--tensorboard', False,
                      'write TensorBoard event files under checkpoints/<dataset_name>/tensorboard/')
        p.add_argument('--latest_iter', type=int, default=0,
                       help='resume from Model/<latest_iter>_G.pt and _D.pt')
        self.add_bool('--no_shuffle', False, 'keep the files in name order')
        self.add_bool('--check_pairing', True,
                      'stop when input and target file names show a wrong pairing')
        p.add_argument('--seed', type=int, default=None,
                       help='random seed (weights, data order, augmentation); drawn and '
                            'recorded in the options file when not given')
        p.add_argument('--lambda_LSGAN', type=float, default=2.0)
        p.add_argument('--lambda_FM', type=float, default=10.0)
        p.add_argument('--lambda_CC', type=float, default=5.0)
        p.add_argument('--ch_balance', type=float, default=1,
                       help='channel balance of the discriminator input (<= 0: plain pair)')
        self.add_bool('--ccc', True, 'concordance CC (False: Pearson CC)')
        p.add_argument('--beta1', type=float, default=0.5)
        p.add_argument('--beta2', type=float, default=0.999)
        p.add_argument('--lr', type=float, default=0.0002)


class TestOption(BaseOption):
    is_train = False

    def __init__(self):
        super().__init__()
        p = self.parser
        p.add_argument('--input_dir_test', type=str, default='./datasets/Test/Input')
        p.add_argument('--iteration', type=int, default=-1,
                       help='use Model/<iteration>_G.pt; -1: every saved generator')
        self.add_bool('--no_shuffle', True, 'kept for compatibility; test order is by name')
        self.add_bool('--save_panels', False,
                      'with --target_dir_test: a PNG panel input | real | generated | difference '
                      'per file')


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
        return 2
