"""Checks of a whole dataset before training (README "What happens when…"), so that a bad
file fails in seconds, not hours: every pair's size (from the headers where the format
allows), NaN and infinite values, values beyond the saturation limits, and the pairing of
input and target files by the times in their names.
"""
import os

import numpy as np
from torch.utils.data import DataLoader, Dataset

from machinery.data_profile import sample_indices
from machinery.run_safety import ignore_stop_signals
from pix2pixCC_Options import UserError
from pix2pixCC_Pipeline import WINDOW_READERS, name_time, size_mismatch


NO_VALUES = {'counted': 0, 'outside': 0, 'inside_other': 0, 'min': np.inf, 'max': -np.inf}


def value_summary(array, own, other=None):
    """For each channel c of a C x H x W `array`, counts that tell whether its values suit
    its scaling `own.channel(c)` (see `check_dataset`).

    Each is {'counted' (the finite values that the scaling maps by their value, see
    `Scaling.by_value`), 'outside' (those beyond its limits), 'inside_other' (those within
    the limits of `other.channel(c)`, the other side's scaling; 0 without `other`), 'min',
    'max' (of all finite values)}.
    """
    return [channel_summary(channel, own.channel(c),
                            other.channel(c) if other is not None else None)
            for c, channel in enumerate(array)]


def channel_summary(values, own, other):
    """`value_summary` of one channel's `values`, with the Scalings `own` and `other`."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return dict(NO_VALUES)
    counted = own.by_value(finite)
    inside_other = 0 if other is None else \
        int(np.count_nonzero((counted >= other.lower) & (counted <= other.upper)))
    return {'counted': int(counted.size),
            'outside': int(np.count_nonzero((counted < own.lower) | (counted > own.upper))),
            'inside_other': inside_other, 'min': float(finite.min()), 'max': float(finite.max())}


def add_summary(total, summary):
    """Add one file's `channel_summary` to `total` (the same kind of dict)."""
    for key in ('counted', 'outside', 'inside_other'):
        total[key] += summary[key]
    total['min'], total['max'] = min(total['min'], summary['min']), \
        max(total['max'], summary['max'])


class _FileSummaries(Dataset):
    """Item i: for each side of pair `pairs[i]` (default: pair i), its (height, width), its
    NaN/Inf count and its `value_summary`, read as training reads it (the dataset's
    `read_input` and `read_target`: files or SDOML stores)."""

    def __init__(self, dataset, pairs=None):
        self.dataset = dataset
        self.pairs = range(len(dataset)) if pairs is None else pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        d, index = self.dataset, self.pairs[item]
        # The swapped-folder check compares channel c with the other side's channel c; with
        # other channel counts, swapped folders already fail on the channel count.
        comparable = d.opt.input_ch == d.opt.target_ch
        summary = {}
        for side, read, own, other in (
                ('input', d.read_input, d.input_scaling, d.target_scaling),
                ('target', d.read_target, d.target_scaling, d.input_scaling)):
            if side == 'target' and d.target_paths is None:
                continue
            array = read(index)
            summary[side] = (array.shape[1:], int(array.size - np.isfinite(array).sum()),
                             value_summary(array, own, other if comparable else None))
        return summary


# Share of a channel's counted values (`value_summary`) beyond its saturation limits above
# which the limits are probably not those of the data (a few saturated pixels are normal;
# most are not).
OUTSIDE_SHARE_WARNING = 0.2


def scaling_warnings(values, dataset):
    """Lines that warn about limits that do not fit the data; [] when the scaling looks right.

    `values`: {'input': totals, 'target': totals}, each a list of one channel's totals of
    `value_summary` over every file. A channel warns when more than OUTSIDE_SHARE_WARNING of
    its counted values (finite, and positive with log scale) lie outside its limits: one line
    per such channel, naming the channel when its side has several.
    The folders look swapped when, besides, each channel's values lie (all but that share)
    within the limits of the *other* side's channel: a magnetogram in the input folder fits
    the target's +-3000 G, and the EUV images in the target folder fit the input's 1..200.
    """
    scalings = {'input': dataset.input_scaling, 'target': dataset.target_scaling}

    def limits(side):
        """The side's limits, once when its channels share them, else one per channel."""
        return ', '.join(dict.fromkeys(
            f"[{scalings[side].channel(c).lower:g}, {scalings[side].channel(c).upper:g}]"
            for c in range(len(values[side]))))

    def observed(side):
        """The side's range of values, over all its channels."""
        return (f"{min(channel['min'] for channel in values[side]):.4g} to "
                f"{max(channel['max'] for channel in values[side]):.4g}")

    warned = [(side, c) for side, channels in values.items() for c, v in enumerate(channels)
              if v['counted'] and v['outside'] > OUTSIDE_SHARE_WARNING * v['counted']]
    if warned and len(values) == 2 and all(
            v['counted'] and v['inside_other'] >= (1 - OUTSIDE_SHARE_WARNING) * v['counted']
            for channels in values.values() for v in channels):
        return [(f"warning: the input and target folders look swapped: the input values "
                 f"({observed('input')}) fit the target limits {limits('target')} and the "
                 f"target values ({observed('target')}) the input limits {limits('input')}; "
                 f"check --input_dir_train and --target_dir_train")]
    return [outside_warning(side, c, len(values[side]), values[side][c],
                            scalings[side].channel(c)) for side, c in warned]


def outside_warning(side, c, channels, values, scaling):
    """The line for channel `c` (of `channels`) of `side` whose `values` (totals of
    `value_summary`) lie mostly outside the limits of its `scaling`."""
    name = f'{side} channel {c}' if channels > 1 else side
    several = ' (one value for every channel, or one per channel)' if channels > 1 else ''
    return (f"warning: {100 * values['outside'] / values['counted']:.0f}% of the {name} values "
            f"lie outside the saturation limits [{scaling.lower:g}, {scaling.upper:g}] "
            f"(observed range {values['min']:.4g} to {values['max']:.4g}); set "
            f"--saturation_lower_limit_{side} and --saturation_upper_limit_{side} to the range "
            f"that matters{several}")


def check_training_size(path, size, multiple, crop_size=0):
    """Raise UserError when the image of `path`, of `size`, cannot be trained on: smaller
    than --crop_size, or (whole images) not multiples of `multiple` (the generator's
    stride; a window has the size of --crop_size, which is a multiple)."""
    if crop_size and min(size) < crop_size:
        raise UserError(f"{path} is {size[0]}x{size[1]}, smaller than --crop_size {crop_size}; "
                        f"lower --crop_size or use larger images")
    if not crop_size and multiple > 1 and (size[0] % multiple or size[1] % multiple):
        raise UserError(f"{path} is {size[0]}x{size[1]}, but the network needs height and "
                        f"width that are multiples of {multiple} (2**--n_downsample); crop or "
                        f"pad the data, or lower --n_downsample")


# With --crop_size, the pairs whose files the check reads whole for its warnings: the first,
# the last and evenly spread between (README "What happens when…").
CHECK_SAMPLE = 5


def sample_pairs(n, k=CHECK_SAMPLE):
    """Up to `k` of the indices 0..n-1: the first, the last and evenly spread between."""
    return sample_indices(n, k)


def checked_pairs(dataset, crop_size):
    """The pairs `check_dataset` reads whole: every pair, or with --crop_size and formats
    whose windows are read alone (WINDOW_READERS), a sample (`sample_pairs`), as training
    then never reads a whole file and the check should not either (README "Your own data",
    Windows). None: every pair."""
    formats = (dataset.opt.data_format_input, dataset.opt.data_format_target)
    if crop_size and all(fmt in WINDOW_READERS for fmt in formats):
        return sample_pairs(len(dataset))
    return None


def check_sizes_from_headers(dataset, multiple, crop_size, progress=None):
    """Check every pair's height and width from its files' headers (`CustomDataset.pair_size`,
    which also refuses a truncated FITS or npy file) against the training's needs
    (`check_training_size`); returns the first pair's size."""
    pairs = range(len(dataset))
    for index in progress(pairs) if progress is not None else pairs:
        check_training_size(dataset.input_paths[index], dataset.pair_size(index), multiple,
                            crop_size)
    return dataset.pair_size(0)


def check_dataset(dataset, multiple, n_workers=0, log=print, progress=None, crop_size=0):
    """Read every file once and check what training needs; raise UserError on the first problem.

    Checks: readable, channel count, input/target height and width equal, height and width
    multiples of `multiple` (the generator's stride), or at least `crop_size` (--crop_size)
    when training takes windows (`check_training_size`). NaN/Inf values are counted and reported
    in one line per side that has any (`nonfinite_warning`; the scaling replaces them).
    Limits that do not fit the data (a large share of a channel's values outside them, or
    folders that look swapped) are warned about in one line each (`scaling_warnings`).
    With --crop_size and npy or FITS data (`checked_pairs`), the sizes are checked from every
    file's header and the values (NaN/Inf, limits) from a sample of CHECK_SAMPLE pairs.
    Returns the (height, width) of the first pair.
    """
    pairs = checked_pairs(dataset, crop_size)
    first_size = None
    if pairs is not None:
        first_size = check_sizes_from_headers(dataset, multiple, crop_size, progress)
    loader = DataLoader(_FileSummaries(dataset, pairs), batch_size=None, num_workers=n_workers,
                        worker_init_fn=ignore_stop_signals)
    if progress is not None:
        loader = progress(loader)
    paths = {'input': dataset.input_paths, 'target': dataset.target_paths}
    nonfinite = {}  # side: [values, files, first file]
    totals = {}
    for item, summary in enumerate(loader):
        index = item if pairs is None else pairs[item]
        size = summary['input'][0]
        if 'target' in summary and summary['target'][0] != size:
            raise size_mismatch(dataset.input_paths[index], size, dataset.target_paths[index],
                                summary['target'][0])
        check_training_size(dataset.input_paths[index], size, multiple, crop_size)
        for side, (_, bad, values) in summary.items():
            if bad:
                count = nonfinite.setdefault(side, [0, 0, paths[side][index]])
                count[0] += bad
                count[1] += 1
            for total, channel in zip(totals.setdefault(side, [dict(NO_VALUES) for _ in values]),
                                      values, strict=True):
                add_summary(total, channel)
        first_size = first_size or size
    for side, (n_values, n_files, first) in sorted(nonfinite.items()):  # input, then target
        sampled = '' if pairs is None else \
            f" (in {len(pairs)} of the {len(dataset)} pairs: --crop_size checks a sample)"
        log(nonfinite_warning(side, n_values, n_files, first,
                              getattr(dataset, f'{side}_scaling'), len(totals[side])) + sampled)
    for line in scaling_warnings(totals, dataset):
        log(line)
    return first_size


def nonfinite_warning(side, n_values, n_files, first, scaling, channels=1):
    """The line that reports the NaN/Inf values of one side (input or target) and what the
    `scaling` of its `channels` channels makes of them: the side and file are named, as they
    are where to look."""
    logs = {scaling.channel(c).log for c in range(channels)}
    if logs == {True}:
        nan = 'the lower limit'
    elif logs == {False}:
        nan = '0'
    else:
        nan = 'the lower limit in log-scaled channels and 0 in the others'
    return (f"warning: {n_values} NaN/Inf value(s) in {n_files} {side} file(s) (first: "
            f"{first}); NaN becomes {nan}, +Inf the upper and -Inf the lower limit")


# Names can mislead (a timestamp in the name that is not the observation's time): the user
# may know the pairing is right.
SKIP_PAIRING = '; --check_pairing False skips this check'


def check_pairing(input_paths, target_paths):
    """Raise UserError when the pairing by sorted name visibly joins the wrong files.

    Input i pairs with target i. When both sides use the same names, pair i must have the same
    name; when every name holds a date/time, target i must be the target closest in time to
    input i. Names that share neither tell nothing and pass.
    """
    inputs, targets = ([os.path.splitext(os.path.basename(p))[0] for p in paths]
                       for paths in (input_paths, target_paths))
    shared = set(inputs) & set(targets)
    if len(shared) >= len(inputs) / 2:
        for i, (a, b) in enumerate(zip(inputs, targets, strict=True)):
            if a != b:
                raise UserError(f"pair {i}: input {input_paths[i]} would be paired with target "
                                f"{target_paths[i]} (files pair by sorted name); a file with the "
                                f"same name is missing on one side{SKIP_PAIRING}")
        return
    input_times = [name_time(p) for p in input_paths]
    target_times = [name_time(p) for p in target_paths]
    if None in input_times or None in target_times:
        return
    for i, time in enumerate(input_times):
        offset = abs(target_times[i] - time)
        rivals = [j for j in range(len(target_times))
                  if j != i and abs(target_times[j] - time) <= offset]
        if offset and rivals:  # another target is as close or closer: the pairing is a guess
            raise UserError(f"pair {i}: input {input_paths[i]} ({time}) would be paired with "
                            f"target {target_paths[i]} ({target_times[i]}), but "
                            f"{target_paths[rivals[0]]} is as close in time; a file is missing "
                            f"on one side (files pair by sorted name){SKIP_PAIRING}")
