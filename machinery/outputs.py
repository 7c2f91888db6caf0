"""Output folders: one Test run's outputs per folder (README "Output files"). A folder's
record (test_run.json) says what made its files; a run into a folder that holds another
run's outputs is refused, or with --overwrite the files a Test run writes are removed first.
"""
import fnmatch
import functools
import hashlib
import json
import os

from machinery.files import read_json, write_json
from pix2pixCC_Options import DATA_OPTIONS, NETWORK_OPTIONS, UserError


RECORD = 'test_run.json'


# The files a Test run writes into a folder: what marks a folder as holding a run's outputs,
# and all that --overwrite removes (never other files a user keeps there).
OUTPUT_PATTERNS = ('*_AI.*', '*_panel.png', 'metrics.csv', 'metrics_summary.json',
                   'metrics_by_iteration.csv', RECORD)


# Options that change the written files, besides the generator and the data.
OUTPUT_OPTIONS = NETWORK_OPTIONS + DATA_OPTIONS + ('save_scale',)


# Options that change the metric files (recorded only with targets).
METRIC_OPTIONS = ('metric_bins', 'disk_fraction', 'active_threshold', 'disk_center_px',
                  'disk_radius_px')


# What only the evaluation beside the products depends on: the targets, the metric options
# and panels. A run that differs from a folder's record in these alone makes the same
# products: it may take the folder (its metrics and panels replace the earlier ones).
EVALUATION_KEYS = ('target_dir', 'target_files')
EVALUATION_OPTIONS = METRIC_OPTIONS + ('save_panels',)
# The files of the evaluation, removed when the targets change (the metric files are
# written anew by every run with targets).
EVALUATION_PATTERNS = ('*_panel.png', 'metrics.csv', 'metrics_summary.json')

# How the refusal names each part of a record that differs.
RECORD_LABELS = {'run': 'run (--dataset_name)', 'iteration': 'iteration (--iteration)',
                 'weights': "generator's weights (its checkpoint or model file changed)",
                 'input_dir': 'input folder (--input_dir_test, or --sdoml_input)',
                 'input_files': 'input files',
                 'target_dir': 'target folder (--target_dir_test, or --sdoml_target)',
                 'target_files': 'target files',
                 'sdoml_pairs': 'SDOML pairs (their frames)',
                 'precision': 'precision (--data_type, --amp_dtype)'}


def run_record(opt, dataset, iteration, precision=None, panels=False, weights=None):
    """What decides the outputs of one run into one folder, as its test_run.json holds it:
    the generator (run folder, or --model file, and iteration; -1: every saved one; its
    file's SHA-256: `weights`, that of the copy the generator was read from, else the
    file's now), the inputs and targets (folders and file names), the precision and every
    option that changes the files (the metric options and panels only count when there are
    targets, the compression when it is used): the inputs and targets as the dataset's
    `record` names them (folders and file names; SDOML stores and their pairs)."""
    targets = dataset.target_paths is not None
    options = {name: getattr(opt, name) for name in OUTPUT_OPTIONS}
    if targets:
        options.update({name: getattr(opt, name) for name in METRIC_OPTIONS},
                       save_panels=bool(panels))
    if getattr(opt, 'compress', False):  # (recorded when used: earlier records stay equal)
        options.update(compress=True, quantize_step=opt.quantize_step)
    model = getattr(opt, 'model', None)
    record = {'run': os.path.abspath(model or opt.checkpoint_dir), 'iteration': iteration,
              'weights': None if iteration == -1 else weights or weights_of(
                  model or os.path.join(opt.model_dir, f'{iteration}_G.pt')),
              **dataset.record(),
              'precision': str(precision.dtype).replace('torch.', '')
              if precision is not None and precision.enabled else 'float32',
              'options': options}
    return json.loads(json.dumps(record))  # as it reads back from the file


def weights_of(path):
    """The SHA-256 of the generator file at `path` (a checkpoint or a model file), None
    where there is none: what tells one generator's products from another's, also after a
    resumed run saved a new checkpoint of the same step or a model file was exported anew
    under the same name."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return file_sha256(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=64)
def file_sha256(path, size, mtime_ns, inode):
    """(cached while the file's size, time and inode stay the same)"""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2 ** 22), b''):
            digest.update(block)
    return digest.hexdigest()


def earlier_outputs(folder, patterns=OUTPUT_PATTERNS):
    """The files in `folder` that a Test run writes (`patterns`), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(entry.path for entry in os.scandir(folder) if entry.is_file() and
                  any(fnmatch.fnmatch(entry.name, pattern) for pattern in patterns))


def difference(folder, record):
    """None when `folder` may take the outputs of `record`'s run: it holds no Test outputs,
    or products the run would write the same (the same generator, inputs and options that
    change the files; the evaluation beside them may differ). Otherwise what differs, in
    words for the refusal."""
    if not earlier_outputs(folder):
        return None
    try:
        earlier = read_json(folder, RECORD)
    except UserError:
        return f'its {RECORD} is unreadable'
    if earlier is None:
        return f'no {RECORD} says what made them'
    if earlier == record:
        return None
    changed = [RECORD_LABELS.get(key, key) for key in record
               if key not in ('options',) + EVALUATION_KEYS and earlier.get(key) != record[key]]
    options = earlier.get('options') or {}
    changed += [f'--{name}' for name in sorted(set(options) & set(record['options']))
                if name not in EVALUATION_OPTIONS and options[name] != record['options'][name]]
    return f"made with another {', '.join(changed)}" if changed else None


def remove_outputs(folder, patterns=OUTPUT_PATTERNS):
    for path in earlier_outputs(folder, patterns):
        os.remove(path)


def take_folder(folder, record, log=print):
    """Make `folder` hold the outputs of `record`'s run alone, writing the record before any
    output (a run stopped half-way leaves a recorded folder that the same command completes).
    Panels and metrics of other targets go (they no longer describe the folder's products).

    The Test script has already refused a folder of another run, or emptied it for
    --overwrite; so outputs of another run are found here only by training's
    --val_during_train, which replaces them: the generator of their step was just saved
    anew, so they no longer describe any checkpoint.
    """
    reason = difference(folder, record)
    if reason:
        remove_outputs(folder)
        log(f"notice: removed the earlier outputs in {folder} ({reason})")
    elif earlier_outputs(folder, EVALUATION_PATTERNS):
        earlier = read_json(folder, RECORD) or {}
        if any(earlier.get(key) != record[key] for key in EVALUATION_KEYS):
            remove_outputs(folder, EVALUATION_PATTERNS)
    write_json(os.path.join(folder, RECORD), record)


def output_plan(opt, iterations):
    """(the folder of each iteration's outputs, the folder of a --iteration -1 run's
    metrics_by_iteration.csv or None). One iteration: straight into --output_dir (default
    Image/Test/<iteration>); -1: into DIR/<iteration>/ (default DIR: Image/Test), for this
    run's iterations only: another numbered folder of DIR (a year's products, another run's
    step) is neither checked nor touched, also with --overwrite."""
    if opt.iteration != -1:
        return {opt.iteration: opt.output_dir or os.path.join(opt.image_dir,
                                                              str(opt.iteration))}, None
    top = opt.output_dir or opt.image_dir
    return {iteration: os.path.join(top, str(iteration)) for iteration in iterations}, top


def claim_output_folders(opt, folders, record_of):
    """Before anything is written: refuse (one line naming --output_dir and --overwrite) a
    folder of `folders` ({iteration: folder}, -1 for DIR itself) that holds another run's
    outputs; with --overwrite, remove every earlier output from them instead."""
    for iteration, folder in folders.items():
        if opt.overwrite:
            remove_outputs(folder)
            continue
        reason = difference(folder, record_of(iteration))
        if reason:
            raise UserError(f"{folder} holds outputs of another run ({reason}); choose "
                            f"another --output_dir, or add --overwrite to replace them")
