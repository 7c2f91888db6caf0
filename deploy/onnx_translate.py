"""Translate a folder of FITS files with a pix2pixCC ONNX model, without PyTorch (README
"Sharing a model and running it elsewhere", ONNX).

    python deploy/onnx_translate.py --model EUV2Mag_150000.onnx --input_dir DIR --output_dir OUT

The model is one that `pix2pixCC_Test.py --export onnx` wrote. For every <name>.fits (.fts,
.fit) in --input_dir, sorted by name, this writes OUT/<name>_AI.<ext>: the file that the
Test script writes for that input, in the target's physical units, header included (the
input's place, time and WCS, the targets' identity cards and unit, the same HISTORY lines),
plus one HISTORY line that names this script and the ONNX Runtime version. What is the
model's comes from its metadata (its 'pix2pixCC' key): the scaling of each channel both ways,
the size multiple, --save_scale, the unit, the targets' identity cards and the HISTORY lines.
The rules of the header and the FITS writer are the Test script's own, machinery/products.py
(the card patterns that the metadata also carries are not needed).

1. Read the first HDU that holds an image, as C x H x W (H x W is one channel; a cube's
   channel axis is the first, unless only its last axis has the model's channel count).
2. Scale each channel to [-1, 1]; pad the bottom and right edges with edge values to a
   multiple of the size multiple; run the model; crop back.
3. Scale each channel back to physical units, times --save_scale; write float32 FITS under a
   hidden temporary name and rename it when complete.

Needs onnxruntime, numpy and astropy only: no torch, and of this repository only
pix2pixCC_Options (the one-line errors), which needs nothing but the standard library,
machinery/products.py (the products' header rules and writer) and machinery/data_profile.py
(the warnings about inputs unlike the training data), which need numpy and astropy (none
imports torch). The products are those of the Test script to the agreement of ONNX
Runtime with PyTorch (1e-4 of the output range or better, checked at export); no metrics,
panels or --compress here.
"""
import contextlib
import glob
import json
import os
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# (pix2pixCC_Options needs only the standard library: its one-line errors, nothing of torch)
from pix2pixCC_Options import (FITS_FORMATS, OneLineErrorParser, UserError,  # noqa: E402
                               run_main, str2bool)

try:
    import numpy as np
    import onnxruntime
    from astropy.io import fits
except ImportError as missing:  # one line, as for any other problem the user must fix
    print(f"onnx_translate.py: error: it needs onnxruntime, numpy and astropy ({missing.name} "
          f"is missing): pip install onnxruntime numpy astropy", file=sys.stderr)
    sys.exit(2)

# (after the check above: it needs numpy and astropy)
from machinery.data_profile import (profile_differences, sample_indices,  # noqa: E402
                                    side_profile)
from machinery.products import channel_axis, generated_header, write_array  # noqa: E402

# The metadata layout this script reads (machinery/sharing.py's ONNX_FORMAT and its version).
MODEL_FORMAT, MODEL_FORMAT_VERSION = 'pix2pixCC ONNX model', 1
# The HISTORY line by which its products differ from the Test script's (one 80-column card).
PROVENANCE = f'pix2pixCC: deploy/onnx_translate.py, ONNX Runtime {onnxruntime.__version__}'


def parse(argv=None):
    p = OneLineErrorParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True,
                   help='the ONNX model (pix2pixCC_Test.py --export onnx)')
    p.add_argument('--input_dir', required=True, help='folder of the FITS inputs')
    p.add_argument('--output_dir', required=True, help='folder of the products')
    p.add_argument('--skip_existing', type=str2bool, nargs='?', const=True, default=False,
                   metavar='BOOL', help='leave every product already there alone (a stopped '
                                        'conversion continues)')
    p.add_argument('--overwrite', type=str2bool, nargs='?', const=True, default=False,
                   metavar='BOOL', help='replace the products already there')
    p.add_argument('--threads', type=int, default=0,
                   help="ONNX Runtime's threads per model run (0: its default, one per core)")
    p.option_names += ['--model', '--input_dir', '--output_dir', '--skip_existing',
                       '--overwrite', '--threads']
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# The model and its metadata
# ----------------------------------------------------------------------------------------


def load_model(path, threads=0):
    """(an ONNX Runtime session of the model `path`, its 'pix2pixCC' metadata record);
    UserError in one line for a file that is not a pix2pixCC ONNX export of this version.
    The session uses the first of onnxruntime's providers (a GPU build's GPU)."""
    if not os.path.isfile(path):
        raise UserError(f"model {path} does not exist; check --model")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(path, options,
                                               providers=onnxruntime.get_available_providers())
    except Exception as error:  # (onnxruntime's own error types)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else 'unreadable'
        raise UserError(f"{path} is not a readable ONNX model ({reason}); copy or export it "
                        f"again") from None
    metadata = session.get_modelmeta().custom_metadata_map
    try:
        record = json.loads(metadata.get('pix2pixCC', 'null'))
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get('format') != MODEL_FORMAT:
        raise UserError(f"{path} is not a pix2pixCC ONNX model (make one with "
                        f"pix2pixCC_Test.py --export onnx)")
    if record.get('format_version') != MODEL_FORMAT_VERSION:
        raise UserError(f"{path} has metadata of format version {record.get('format_version')}"
                        f", but this script reads version {MODEL_FORMAT_VERSION}; use the "
                        f"pix2pixCC that exported it")
    problem = metadata_problem(record)
    if problem:
        raise UserError(f"{path} is not an ONNX model this code exported ({problem}); use a "
                        f"model made with pix2pixCC_Test.py --export onnx")
    return session, record


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metadata_problem(record):
    """What in the metadata this script uses is not as --export onnx writes it, else None: a
    shared model is data from elsewhere, and its product extension becomes part of a path,
    its cards part of every product's header."""
    fits_rules, scaling = record.get('fits'), record.get('scaling')
    if not all(is_count(record.get(key)) for key in ('input_channels', 'target_channels',
                                                     'size_multiple')):
        return 'its channel counts or size multiple are not counts'
    if not isinstance(fits_rules, dict) or fits_rules.get('extension') not in FITS_FORMATS:
        return 'its product extension is not one of ' + ', '.join(FITS_FORMATS)
    if not isinstance(scaling, dict) or any(
            not isinstance(scaling.get(side), list) or
            len(scaling[side]) != record[f'{side}_channels'] or
            not all(isinstance(channel, dict) and all(
                is_number(channel.get(key)) for key in ('lower', 'upper', 'offset', 'scale',
                                                        'nan')) for channel in scaling[side])
            for side in ('input', 'target')):
        return 'its scaling is not one set of numbers per channel'
    if not is_number(record.get('save_scale')) or not all(
            isinstance(name, str) for name in (record.get('input_name'),
                                               record.get('output_name'))):
        return 'its --save_scale or tensor names are not what the export writes'
    cards = fits_rules.get('identity')
    if not isinstance(cards, dict) or not all(
            isinstance(key, str) and isinstance(value, (str, int, float, bool))
            for key, value in cards.items()) or \
            not isinstance(fits_rules.get('history'), list) or \
            not all(isinstance(line, str) for line in fits_rules['history']) or \
            not isinstance(fits_rules.get('input_file'), str) or \
            not isinstance(fits_rules.get('bunit'), (str, type(None))):
        return "its header cards are not FITS cards"
    return None


def normalise(x, scaling):
    """One channel's physical values (H x W, float32) -> [-1, 1] at its limits, by its
    `scaling` record: NaN -> `nan`, +-Inf -> the limits; clip; log10 (values <= 0 -> lower);
    (x - offset) / scale."""
    lower, upper = np.float32(scaling['lower']), np.float32(scaling['upper'])
    x = np.where(np.isnan(x), np.float32(scaling['nan']), x)
    x = np.where(np.isposinf(x), upper, np.where(np.isneginf(x), lower, x))
    if scaling['clip']:
        x = np.clip(x, lower, upper)
    if scaling['log']:
        x = np.log10(np.where(x <= 0, lower, x))
    return ((x - scaling['offset']) / scaling['scale']).astype(np.float32)


def physical(y, scaling, save_scale):
    """One channel of the model's output (H x W) -> physical values times `save_scale`
    (float32): y * scale + offset; 10** with log; clipped with clip."""
    x = np.asarray(y, np.float64) * scaling['scale'] + scaling['offset']
    if scaling['log']:
        x = 10.0 ** x
    if scaling['clip']:
        x = np.clip(x, scaling['lower'], scaling['upper'])
    return (x * save_scale).astype(np.float32)


def normalised_input(record, data):
    """Physical C x H x W input -> [-1, 1] at each channel's limits (`normalise`)."""
    return np.stack([normalise(channel, scaling)
                     for channel, scaling in zip(data, record['scaling']['input'], strict=True)])


def translate_array(session, record, data):
    """Physical C x H x W input -> physical C' x H x W product (times --save_scale)."""
    x = normalised_input(record, data)
    multiple = record['size_multiple']
    height, width = x.shape[-2:]
    x = np.pad(x, ((0, 0), (0, -height % multiple), (0, -width % multiple)), mode='edge')
    y = session.run([record['output_name']], {record['input_name']: x[None]})[0][0]
    return np.stack([physical(channel[:height, :width], scaling, record['save_scale'])
                     for channel, scaling in zip(y, record['scaling']['target'], strict=True)])


# ----------------------------------------------------------------------------------------
# Reading FITS inputs
# ----------------------------------------------------------------------------------------


def list_inputs(folder):
    """The FITS files (.fits, .fts, .fit, any case) in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise UserError(f"input folder '{folder}' does not exist; check --input_dir")
    extensions = tuple(f'.{ext}' for ext in FITS_FORMATS)
    paths = sorted(path for path in glob.glob(os.path.join(folder, '*'))
                   if os.path.isfile(path) and path.lower().endswith(extensions))
    if not paths:
        raise UserError(f"no {'/'.join(extensions)} files in input folder '{folder}'; check "
                        f"--input_dir")
    return paths


def read_input(path, channels):
    """(data C x H x W float32, header) of the first HDU of `path` that holds an image; the
    channel axis as `channel_axis` finds it (axes of length 1 beyond three dropped)."""
    try:
        with warnings.catch_warnings(), fits.open(path) as hdul:
            warnings.simplefilter('ignore')  # (archive files' non-standard cards)
            hdu = next((hdu for hdu in hdul if hdu.is_image and hdu.header.get('NAXIS', 0) and
                        all(hdu.header.get(f'NAXIS{i}', 0) for i in
                            range(1, hdu.header['NAXIS'] + 1))), None)
            if hdu is None:
                raise UserError(f"{path}: no HDU with image data")
            data, header = np.array(hdu.data), hdu.header.copy()
    except UserError:
        raise
    except Exception as error:  # corrupt or truncated files: name the file
        raise UserError(f"cannot read {path} as FITS: {str(error).splitlines()[0]}") from None
    shape = tuple(n for n in data.shape if n != 1) if data.ndim > 3 else data.shape
    shape = (1,) + shape if len(shape) == 2 else shape
    axis = channel_axis(shape, channels) if len(shape) == 3 else None
    if axis is None:
        raise UserError(f"{path}: shape {data.shape} is not an image of the model's {channels} "
                        f"channel(s)")
    return np.ascontiguousarray(np.moveaxis(data.reshape(shape), axis, 0), np.float32), header


# ----------------------------------------------------------------------------------------
# The products' headers and files: the Test script's rules (machinery/products.py)
# ----------------------------------------------------------------------------------------


def product_header(input_header, record, input_name):
    """The header the Test script gives the product of the input `input_name`
    (`generated_header`: the input's cards but those the rules leave out, a WCS of the
    product's axes, the targets' identity cards, BUNIT, ORIGIN and the HISTORY lines), then
    this script's provenance line."""
    rules = record['fits']
    history = [line.replace(rules['input_file'], input_name) for line in rules['history']]
    return generated_header(input_header, rules['identity'], rules['bunit'],
                            history + [PROVENANCE], input_channels=record['input_channels'],
                            channels=record['target_channels'])


def write_product(path, data, header):
    """float32 FITS (one channel as H x W) with `header` but the cards of how its data are
    stored (`write_array`, as the Test script writes it), under a hidden temporary name
    renamed to `path` when complete."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f'.tmp-{os.getpid()}-{name}')
    try:
        write_array(temporary, data, 'fits', header=header)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


# ----------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------


def product_path(output_dir, input_path, record):
    name = os.path.splitext(os.path.basename(input_path))[0]
    return os.path.join(output_dir, f"{name}_AI.{record['fits']['extension']}")


def pending_inputs(paths, output_dir, record, skip_existing, overwrite):
    """The inputs whose products are to be written: all, or with --skip_existing those
    without one. UserError when products are there and neither option says what to do:
    saved results are never replaced unasked."""
    existing = [path for path in paths if os.path.exists(product_path(output_dir, path, record))]
    if skip_existing:
        return [path for path in paths if path not in existing]
    if existing and not overwrite:
        raise UserError(f"{len(existing)} product(s) are already in {output_dir} (e.g. "
                        f"{os.path.basename(product_path(output_dir, existing[0], record))}); "
                        f"add --skip_existing to keep them or --overwrite to replace them")
    return paths


def warn_unlike_training(record, paths):
    """One warning line per kind of difference between the inputs (a sample of `paths`) and
    the model's training data, as the Test script warns (machinery/data_profile.py)."""
    if not record.get('training_data'):
        return  # (a model exported by an older version)
    samples = []
    for index in sample_indices(len(paths)):
        data, header = read_input(paths[index], record['input_channels'])
        samples.append(([header] * record['input_channels'], normalised_input(record, data)))
    for line in profile_differences(record['training_data'], {'input': side_profile(samples)},
                                    {'input': paths[0]}):
        print(line)


def main(argv=None):
    args = parse(argv)
    session, record = load_model(args.model, args.threads)
    paths = list_inputs(args.input_dir)
    warn_unlike_training(record, paths)
    os.makedirs(args.output_dir, exist_ok=True)
    pending = pending_inputs(paths, args.output_dir, record, args.skip_existing, args.overwrite)
    for path in pending:
        data, input_header = read_input(path, record['input_channels'])
        product = translate_array(session, record, data)
        header = product_header(input_header, record, os.path.basename(path))
        write_product(product_path(args.output_dir, path, record), product, header)
    print(f"{len(pending)} file(s) written to {args.output_dir}"
          f"{f' ({len(paths) - len(pending)} kept)' if len(pending) < len(paths) else ''} with "
          f"run {record['run']}, step {record['step']}")
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
