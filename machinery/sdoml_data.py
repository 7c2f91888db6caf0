"""SDOMLv2 stores as the data of a run (README "Training on SDOML"): the pairs that
machinery/sdoml.py makes (paired by time, in time order, split into training and test by
months with a gap) served as CustomDataset serves paired files, so that everything after
the dataset (scaling, --crop_size windows, checks, validation, metrics, products, tiles,
--skip_existing) is the same code for files and stores.

`StoreDataset` is a CustomDataset whose readers read a pair's frames from the stores (a
window from the chunks that hold it) and whose headers are the frames' attributes as the
FITS headers of files of that data; its `input_paths` and `target_paths` name each pair
'<store>/<time>' (UTC, YYYYmmdd_HHMMSS), so its products are '<time>_AI.fits' and sort in
time order. A training run keeps its pairs in checkpoints/<run>/sdoml_pairs.json, which a
resumed run reads instead of pairing again (`run_pairs`, `keep_run_pairs`).

Stores are only read, and opened once in each process that reads them (DataLoader workers
fork): `open_store`.
"""
import json
import os
import warnings

from astropy.io import fits

from machinery import sdoml
from machinery.files import read_json, write_json
from pix2pixCC_Options import UserError
from pix2pixCC_Pipeline import CustomDataset

PAIRS_FILE = 'sdoml_pairs.json'
# Cards a frame's attributes may hold that describe how a file stores its data: a header of
# the frame's data (`fits_header`) has them from the data instead.
STRUCTURE_CARDS = ('SIMPLE', 'BITPIX', 'NAXIS', 'EXTEND', 'XTENSION', 'PCOUNT', 'GCOUNT',
                   'BSCALE', 'BZERO', 'BLANK')
SPLIT_OF = {'train': 'Train', 'test': 'Test'}


def uses_stores(opt):
    return bool(getattr(opt, 'sdoml_input', None))


def make_dataset(opt, split=None, pairs=None, log=print):
    """The dataset of `split` ('train', 'test'; default: the script's): a CustomDataset of
    the folders, or with --sdoml_input a StoreDataset of that split's pairs (`pairs`: every
    pair of the run, from `run_pairs`; paired here when None)."""
    if not uses_stores(opt):
        return CustomDataset(opt, split)
    split = split or ('train' if opt.is_train else 'test')
    if pairs is None:
        pairs = store_pairs(opt, log)
    if split == 'test' and not opt.sdoml_test_months:
        log('notice: no --sdoml_test_months, so every pair of the window is a test pair (of a '
            'run trained on this window, its training pairs)')
    return StoreDataset(opt, split_pairs(opt, pairs, split), split)


def split_pairs(opt, pairs, split):
    """The pairs of `split`: 'train' the Train split (every pair without
    --sdoml_test_months), 'test' the Test split (every pair without test months: the Test
    script on a window of its own); a UserError when it holds none."""
    if split == 'test' and not opt.sdoml_test_months:
        return pairs
    chosen = [pair for pair in pairs if pair.split == SPLIT_OF[split]]
    if not chosen:
        months = f'--sdoml_test_months {" ".join(map(str, opt.sdoml_test_months or []))}'
        reason = (f'every one of the {len(pairs)} pairs falls in {months} or within '
                  f'--sdoml_gap_days {opt.sdoml_gap_days:g} of them') if split == 'train' \
            else f'none of the {len(pairs)} pairs falls in {months}'
        raise UserError(f"no {'training' if split == 'train' else 'test'} pairs in the "
                        f"stores: {reason}; change the months or the window (--sdoml_start, "
                        f"--sdoml_end)")
    return chosen


# The stores this process has opened, by (process id, location): each process (a DataLoader
# worker is a fork) opens a store once, and reads its frames' times and attributes once.
OPENED = {}


def open_store(location):
    """The sdoml.Store at `location` (a folder or URL), opened read-only once per process."""
    key = (os.getpid(), location if '://' in location else os.path.abspath(location))
    if key not in OPENED:
        OPENED[key] = sdoml.open_store(location)
    return OPENED[key]


def open_stores(opt):
    """(input store, target store) of the options (the same Store when they are one)."""
    return open_store(opt.sdoml_input), open_store(opt.sdoml_target)


def store_pairs(opt, log=print):
    """Every pair of the stores in the window (`sdoml.pair_frames`), in time order, each
    with its split (`sdoml.split_pairs`: Train, Test or dropped); one line says what was
    found."""
    start, end = (window_bound(opt, name) for name in ('sdoml_start', 'sdoml_end'))
    input_store, target_store = open_stores(opt)
    pairing = sdoml.pair_frames(input_store, opt.sdoml_input_arrays, target_store,
                                opt.sdoml_target_arrays, start, end, opt.sdoml_tolerance,
                                opt.sdoml_skip)
    by_split = sdoml.split_pairs(pairing.pairs, opt.sdoml_test_months or [], opt.sdoml_gap_days)
    pairs = sorted((pair for split in sdoml.SPLITS for pair in by_split[split]),
                   key=lambda pair: pair.time)  # (stable: each split is in time order)
    counts = ', '.join(f'{split.lower()} {len(by_split[split])}' for split in sdoml.SPLITS
                       if by_split[split] or split != 'dropped')
    gap = f' within --sdoml_gap_days {opt.sdoml_gap_days:g}' if by_split['dropped'] else ''
    log(f'SDOML: {pairing.summary()}; {counts}{gap}')
    return pairs


def window_bound(opt, name):
    """--sdoml_start or --sdoml_end as a time (None: open); a UserError naming the option."""
    value = getattr(opt, name)
    try:
        return sdoml.window_time(value, f'--{name}')
    except UserError:
        raise UserError(f"--{name} {value}: not a time; give a UTC time in ISO form, such as "
                        f"2011-01-01 or 2011-01-01T12:00") from None


def pairs_path(opt):
    return os.path.join(opt.checkpoint_dir, PAIRS_FILE)


def run_pairs(opt, log=print):
    """Every pair of the run on SDOML stores (None: a run on folders): a resumed run's
    from its PAIRS_FILE (so that it trains on exactly the frames it started with; checked
    against the stores by `sdoml.verify_pairs`), a new run's paired now (`store_pairs`)."""
    if not uses_stores(opt):
        return None
    if not opt.latest_iter:
        return store_pairs(opt, log)
    path = pairs_path(opt)
    kept = read_json(opt.checkpoint_dir, PAIRS_FILE)
    if kept is None:
        raise UserError(f'{path} does not exist: a run on SDOML stores resumes on the pairs '
                        f'it kept there, and this run has none (was it trained from '
                        f'folders?)')
    pairs = sdoml.pairs_from_json(kept.get('pairs') if isinstance(kept, dict) else kept)
    for side in ('input', 'target'):
        arrays = [frame.array for frame in getattr(pairs[0], f'{side}s')] if pairs else []
        if arrays != list(getattr(opt, f'sdoml_{side}_arrays')):
            raise UserError(f"the run's pairs ({path}) have the {side} arrays "
                            f"{' '.join(arrays)}, not --sdoml_{side}_arrays "
                            f"{' '.join(getattr(opt, f'sdoml_{side}_arrays'))}; a resumed "
                            f"run trains on its own pairs")
    sdoml.verify_pairs(*open_stores(opt), pairs)
    log(f'SDOML: resuming on the {len(pairs)} pairs of {path}')
    return pairs


def keep_run_pairs(opt, pairs):
    """A new run on SDOML stores writes its pairs (every split) into PAIRS_FILE, with the
    stores and arrays they were made from: the pair list is part of the run."""
    if pairs is None or opt.latest_iter:
        return
    write_json(pairs_path(opt), {
        'input_store': opt.sdoml_input, 'target_store': opt.sdoml_target,
        'input_arrays': list(opt.sdoml_input_arrays),
        'target_arrays': list(opt.sdoml_target_arrays), 'pairs': sdoml.pairs_to_json(pairs)})


def pair_names(pairs):
    """A name for each pair from its time, 'YYYYmmdd_HHMMSS' (UTC), as prepare_pairs.py
    names its files; a time met before gets '_2', '_3', ... ."""
    names, seen = [], {}
    for pair in pairs:
        name = pair.datetime.strftime('%Y%m%d_%H%M%S')
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f'{name}_{seen[name]}')
    return names


def fits_header(cards, shape):
    """The header of a FITS file holding data of `shape` (C x H x W, one channel stored as
    H x W, as the products are) with a frame's `cards` (`Store.frame_header`): SIMPLE BITPIX
    NAXISn EXTEND of float32 data, as astropy writes them, then the frame's cards but those
    (STRUCTURE_CARDS and NAXISn, which describe the frame as its source file stored it)."""
    shape = tuple(shape[1:]) if shape[0] == 1 else tuple(shape)
    header = fits.Header([('SIMPLE', True), ('BITPIX', -32), ('NAXIS', len(shape))] +
                         [(f'NAXIS{i + 1}', n) for i, n in enumerate(reversed(shape))] +
                         [('EXTEND', True)])
    with warnings.catch_warnings():  # (astropy's notes on long keys: HIERARCH cards)
        warnings.simplefilter('ignore')
        for key, value in cards.items():
            if key.upper() in STRUCTURE_CARDS or key.upper().startswith('NAXIS'):
                continue
            try:
                header[key] = value
            except (ValueError, KeyError):  # (a key or value a FITS card cannot hold)
                continue
    return header


class StoreDataset(CustomDataset):
    """The pairs of SDOML stores (machinery/sdoml.py `Pair`s, in time order) with
    CustomDataset's interface: the same items, augmentation and windows, read from the
    stores (README "Training on SDOML"). Every pair has a target."""

    def __init__(self, opt, pairs, split):
        self.pairs = list(pairs)
        super().__init__(opt, split)

    def find_pairs(self):
        names = pair_names(self.pairs)
        self.input_dir, self.target_dir = self.opt.sdoml_input, self.opt.sdoml_target
        self.input_paths = [f'{self.input_dir.rstrip("/")}/{name}' for name in names]
        self.target_paths = [f'{self.target_dir.rstrip("/")}/{name}' for name in names]

    def side(self, side, index):
        """(the store, the frames) of pair `index`'s `side` ('input' or 'target'); the
        stores are opened in the process that reads them (`open_store`)."""
        input_store, target_store = open_stores(self.opt)
        pair = self.pairs[index]
        return (input_store, pair.inputs) if side == 'input' else (target_store, pair.targets)

    def read_input(self, index, window=None):
        return sdoml.read_frames(*self.side('input', index), window)

    def read_target(self, index, window=None):
        return sdoml.read_frames(*self.side('target', index), window)

    def frame_size(self, side, index):
        store, frames = self.side(side, index)
        return tuple(int(n) for n in store.array(frames[0].array, frames[0].year).shape[1:])

    def input_size(self, index):
        return self.frame_size('input', index)

    def target_size(self, index):
        return self.frame_size('target', index)

    def headers(self, side, index):
        """The header of each channel's frame, as the FITS header of a file holding the
        side's C x H x W data with that frame's cards (`fits_header`)."""
        store, frames = self.side(side, index)
        shape = (len(frames), *self.frame_size(side, index))
        return [fits_header(store.frame_header(frame.array, frame.year, frame.index), shape)
                for frame in frames]

    def kind(self):
        return (f"SDOML {' '.join(self.opt.sdoml_input_arrays)} -> "
                f"{' '.join(self.opt.sdoml_target_arrays)}")

    def input_source(self, index):
        """'aia.zarr 171A 2011/12 193A 2011/40': the store and the input frames."""
        store, frames = self.side('input', index)
        return ' '.join([os.path.basename(store.location.rstrip('/'))] +
                        [f'{frame.array} {frame.year}/{frame.index}' for frame in frames])

    def record(self):
        """CustomDataset's record (the stores as the folders, the pairs' names as the files)
        with every pair's frames."""
        def location(path):
            return path if '://' in path else os.path.abspath(path)
        return {**super().record(), 'input_dir': location(self.input_dir),
                'target_dir': location(self.target_dir),
                'sdoml_pairs': json.loads(json.dumps(sdoml.pairs_to_json(self.pairs)))}
