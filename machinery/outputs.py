"""Output folders: one Test run's outputs per folder (README "Output files"). A folder's
record (test_run.json) says what made its files; a run into a folder that holds another
run's outputs is refused, or with --overwrite the files a Test run writes are removed first.
"""
import fnmatch
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


# How the refusal names each part of a record that differs.
RECORD_LABELS = {'run': 'run (--dataset_name)', 'iteration': 'iteration (--iteration)',
                 'input_dir': 'input folder (--input_dir_test)', 'input_files': 'input files',
                 'target_dir': 'target folder (--target_dir_test)',
                 'target_files': 'target files',
                 'precision': 'precision (--data_type, --amp_dtype)'}


def run_record(opt, dataset, iteration, precision=None, panels=False):
    """What decides the outputs of one run into one folder, as its test_run.json holds it:
    the generator (run folder, or --model file, and iteration; -1: every saved one), the
    inputs and targets (folders and file names), the precision and every option that changes
    the files (the metric options and panels only count when there are targets, the
    compression when it is used)."""
    def names(paths):
        return [os.path.basename(path) for path in paths]

    targets = dataset.target_paths is not None
    options = {name: getattr(opt, name) for name in OUTPUT_OPTIONS}
    if targets:
        options.update({name: getattr(opt, name) for name in METRIC_OPTIONS},
                       save_panels=bool(panels))
    if getattr(opt, 'compress', False):  # (recorded when used: earlier records stay equal)
        options.update(compress=True, quantize_step=opt.quantize_step)
    model = getattr(opt, 'model', None)
    record = {'run': os.path.abspath(model or opt.checkpoint_dir), 'iteration': iteration,
              'input_dir': os.path.abspath(opt.input_dir_test),
              'input_files': names(dataset.input_paths),
              'target_dir': os.path.abspath(opt.target_dir_test) if targets else None,
              'target_files': names(dataset.target_paths) if targets else None,
              'precision': str(precision.dtype).replace('torch.', '')
              if precision is not None and precision.enabled else 'float32',
              'options': options}
    return json.loads(json.dumps(record))  # as it reads back from the file


def earlier_outputs(folder):
    """The files in `folder` that a Test run writes (OUTPUT_PATTERNS), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(entry.path for entry in os.scandir(folder) if entry.is_file() and
                  any(fnmatch.fnmatch(entry.name, pattern) for pattern in OUTPUT_PATTERNS))


def difference(folder, record):
    """None when `folder` may take the outputs of `record`'s run: it holds no Test outputs,
    or those of the same run (the same command again writes the same files). Otherwise what
    differs, in words for the refusal."""
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
               if key != 'options' and earlier.get(key) != record[key]]
    # (METRIC_OPTIONS and --save_panels are recorded only with targets: a change of targets
    # is named already.)
    options = earlier.get('options') or {}
    changed += [f'--{name}' for name in sorted(set(options) & set(record['options']))
                if options[name] != record['options'][name]]
    return f"made with another {', '.join(changed) or RECORD}"


def remove_outputs(folder):
    for path in earlier_outputs(folder):
        os.remove(path)


def take_folder(folder, record, log=print):
    """Make `folder` hold the outputs of `record`'s run alone, writing the record before any
    output (a run stopped half-way leaves a recorded folder that the same command completes).

    The Test script has already refused a folder of another run, or emptied it for
    --overwrite; so outputs of another run are found here only by training's
    --val_during_train, which replaces them: the generator of their step was just saved
    anew, so they no longer describe any checkpoint.
    """
    reason = difference(folder, record)
    if reason:
        remove_outputs(folder)
        log(f"notice: removed the earlier outputs in {folder} ({reason})")
    write_json(os.path.join(folder, RECORD), record)


def numbered_folders(folder):
    """The iterations of the <iteration>/ subfolders of `folder`."""
    if not os.path.isdir(folder):
        return []
    return [int(entry.name) for entry in os.scandir(folder)
            if entry.is_dir() and entry.name.isdigit()]


def output_plan(opt, iterations):
    """(the folder of each iteration's outputs, the folder of a --iteration -1 run's
    metrics_by_iteration.csv or None). One iteration: straight into --output_dir (default
    Image/Test/<iteration>); -1: into DIR/<iteration>/ (default DIR: Image/Test)."""
    if opt.iteration != -1:
        return {opt.iteration: opt.output_dir or os.path.join(opt.image_dir,
                                                              str(opt.iteration))}, None
    top = opt.output_dir or opt.image_dir
    # Every <iteration>/ of DIR belongs to the run that DIR records, with this run's
    # generators or not: all are checked, and all are emptied by --overwrite.
    every = sorted(set(iterations) | set(numbered_folders(top)))
    return {iteration: os.path.join(top, str(iteration)) for iteration in every}, top


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
