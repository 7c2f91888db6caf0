"""Inference driver: translate every test input with one or every saved generator.

    python pix2pixCC_Test.py --iteration 10000 [data and network options as in training]

writes ./checkpoints/<dataset_name>/Image/Test/<iteration>/<name>_AI.<data_format_target>
(or into --output_dir), in the target's physical units, beside a record of what made them
(test_run.json).
"""
import difflib
import functools
import os
import sys

from machinery.evaluation import (check_test_pairs, metric_keys, selection_key, target_disks,
                                  target_sizes, write_best_iteration, write_metrics)
from machinery.data_profile import warn_unlike_training
from machinery.files import make_dirs, read_json, silent
from machinery.memory import reuse_freed_memory
from machinery.outputs import claim_output_folders, output_plan, run_record, take_folder
from machinery.run_safety import GracefulStop
from machinery.sharing import adopt_model_file, export
from machinery.sdoml_data import make_dataset
from machinery.translation import input_tile_sizes, load_generator, translate
from pix2pixCC_Options import (DATA_OPTIONS, NETWORK_OPTIONS, TestOption, UserError,
                               run_main, store_options)
from pix2pixCC_Utils import (Precision, checkpoint_path, require_checkpoint, saved_steps,
                             select_device)


def require_run(opt):
    """Raise UserError when ./checkpoints/<dataset_name> does not exist, naming the runs that
    do (without it, a typo in --dataset_name would surface later as a puzzling data or
    checkpoint error)."""
    if os.path.isdir(opt.checkpoint_dir):
        return
    root = os.path.dirname(opt.checkpoint_dir)
    if not os.path.isdir(root):
        raise UserError(f"no run '{opt.dataset_name}': there is no {root} folder here; run the "
                        f"Test script from the folder you trained in")
    # Folders without a generator (a run refused at start, a copy in progress) are no runs.
    runs = sorted(name for name in os.listdir(root)
                  if saved_steps(os.path.join(root, name, 'Model'), 'G'))
    close = difflib.get_close_matches(opt.dataset_name, runs, n=1)
    raise UserError(f"no run '{opt.dataset_name}' in {root}"
                    f"{f' (did you mean {close[0]!r}?)' if close else ''}; runs there: "
                    f"{', '.join(runs) if runs else 'none'}; check --dataset_name")


SATURATION_LIMITS = ('saturation_lower_limit_input', 'saturation_upper_limit_input',
                     'saturation_lower_limit_target', 'saturation_upper_limit_target')


def default_limits_notice(opt, explicit):
    """A line for a run without train_options.json (a run of the published code) whose
    saturation limits are left at this script's defaults, else None: the published code's
    defaults differ (README "Differences from the reference code"), and wrong limits give
    outputs in the wrong units without any error."""
    left = [f'--{name}' for name in SATURATION_LIMITS if name not in explicit]
    if not left:
        return None
    return (f"notice: {opt.checkpoint_dir} has no train_options.json and {' '.join(left)} "
            f"{'is' if len(left) == 1 else 'are'} at this script's defaults (lower -1, upper "
            f"1; the published code's are 0 and 255 since June 2022): pass the saturation "
            f"limits the model was trained with")


def main(argv=None):
    """Options (the network and the data's units travel with the model, from the run folder
    or a --model file), then an --export, or the translation of every input."""
    option = TestOption()
    opt = option.parse(argv)
    with GracefulStop(early='before any output was written',
                      pending='stopping after the file in progress') as stop:
        model = take_model_options(option, opt) if opt.model else take_run_options(option, opt)
        if opt.export:
            export(opt, model)
            return 0
        return test(opt, option, model, stop)


def test(opt, option, model, stop):
    """Data and checkpoints, the output folders, then every generator asked for (the one of
    the `model` file when there is one); a stop signal ends the run after the file in
    progress."""
    # Without CUDA the default --gpu_ids 0 quietly runs on the CPU; a notice is for a GPU
    # asked for by name.
    device, _ = select_device(opt, print if 'gpu_ids' in option.explicit else silent)
    if device.type == 'cpu':
        reuse_freed_memory()  # each layer's output reuses the pages of the one before
    precision = Precision(opt, device)
    notice = precision.notice()
    if notice:
        print(notice)

    # Data and checkpoints
    dataset = make_dataset(opt)  # the input files, or the test pairs of SDOML stores
    check_test_pairs(dataset, opt)
    warn_unlike_training(getattr(opt, 'training_data', None), dataset)  # a user may mean it
    disks = target_disks(dataset, opt)
    # Checked before any output: the metric that picks the best of several generators.
    key = selection_key(opt, metric_keys(opt, disks)) if disks is not None else None
    iterations = [opt.iteration] if model else iterations_asked_for(opt)
    sizes = input_tile_sizes(opt, dataset, device)  # whole images or tiles

    # Output folders: refused or emptied (--overwrite) before anything is written.
    record_of = functools.partial(run_record, opt, dataset, precision=precision,
                                  panels=opt.save_panels)
    folders, top = output_plan(opt, iterations)
    claim_output_folders(opt, {**folders, **({-1: top} if top else {})}, record_of)
    if top:
        make_dirs(top)
        take_folder(top, record_of(-1))

    # Translate with every generator asked for; metrics when targets are given.
    stop.defer()
    by_iteration = []
    for iteration in iterations:
        G = load_generator(opt, opt.model or checkpoint_path(opt.model_dir, iteration, 'G'),
                           device, model['weights'] if model else None)
        rows = translate(G, dataset, folders[iteration], opt, device, iteration, precision,
                         panels=opt.save_panels, disks=disks, stop=stop, sizes=sizes)
        print(f"iteration {iteration}: {len(dataset)} file(s) written to {folders[iteration]}")
        if rows:
            by_iteration.append(write_metrics(rows, folders[iteration], iteration, opt))
    if len(by_iteration) > 1:
        write_best_iteration(by_iteration, top, key, target_sizes(dataset, opt))
    return 0


def take_run_options(option, opt):
    """The options of the run folder (`require_run`, `take_training_options`); None: there
    is no model file."""
    require_run(opt)
    take_training_options(option, opt)
    return None


def note_ignored(option):
    if option.ignored():
        print(f"note: training options have no effect here: "
              f"{' '.join('--' + name for name in option.ignored())}")


def take_training_options(option, opt):
    """The network and data options of the training run (train_options.json) unless given
    on the command line (and its SDOML stores, arrays and split, unless test folders are:
    `store_options`), and the targets' FITS identity cards (unit, instrument, ...) for
    generated headers; for a run without that file (a run of the published code), a notice
    when the saturation limits are left at this script's defaults."""
    note_ignored(option)
    trained = read_json(opt.checkpoint_dir, 'train_options.json')
    # Also without the file: the per-channel scaling values are then counted against the
    # channels of the command line.
    option.adopt(opt, trained or {}, NETWORK_OPTIONS + DATA_OPTIONS +
                 store_options(option.explicit),
                 os.path.join(opt.checkpoint_dir, 'train_options.json'))
    if trained is None:
        notice = default_limits_notice(opt, option.explicit)
        if notice:
            print(notice)
    opt.target_header = (trained or {}).get('target_header')
    opt.training_data = (trained or {}).get('training_data')


def take_model_options(option, opt):
    """--model FILE: its run name and step (--dataset_name and --iteration, which may only
    repeat them), its network and data options (options given on the command line win, as
    over train_options.json) and the targets' identity cards (`adopt_model_file`). Returns
    the file's record (`load_model_file`)."""
    note_ignored(option)
    return adopt_model_file(option, opt)


def iterations_asked_for(opt):
    """The steps of the generators to run: --iteration, or every saved one for -1."""
    if opt.iteration != -1:
        require_checkpoint(opt.model_dir, opt.iteration, 'G')
        return [opt.iteration]
    iterations = saved_steps(opt.model_dir, 'G')
    if not iterations:
        raise UserError(f"no generator checkpoints (*_G.pt) in {opt.model_dir}; train first or "
                        f"check --dataset_name")
    return iterations


if __name__ == '__main__':
    sys.exit(run_main(main))
