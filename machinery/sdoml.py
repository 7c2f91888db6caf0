"""SDOMLv2 stores (the ML-ready SDO data set, github.com/SDOML/SDOMLv2) as pix2pixCC pairs:
open a store read-only, find each frame's time and header, pair input passbands with target
arrays by time, split the pairs into training and test by months, read a pair's data.

A store is a zarr group with a group per year ("2011") holding an array per AIA passband
("94A", ..., "1700A", "4500A") or HMI component ("Bx", "By", "Bz"), each N x H x W float32
(chunks of 15 or 120 frames, Blosc zstd). Every FITS header key is an attribute of its array
holding one value per frame: attrs["T_OBS"][i] is frame i's time. What this relies on:

- Frames are not in time order, and AIA passbands of a year have different frame counts: a
  frame is named by (array, year group, index) and found by its time, never its position.
- HMI's T_OBS is TAI in JSOC's form (2011.01.01_00:00:34.30_TAI), AIA's UTC
  (2011-01-01T00:00:07.84Z); every time here is UTC (astropy converts, leap seconds
  included: TAI - UTC is 34 s in 2011, 37 s since 2017). DATE-OBS stands in for a missing
  T_OBS. A frame's year group need not be its UTC year (HMI's 00:00 TAI on 1 January is
  23:59:26 UTC on 31 December), so a window's neighbouring year groups are read too.
- A store is only read: zarr opens it with mode='r', whose store refuses writes.

Pairing (`pair_frames`): each frame of the first target array in [start, end) is a pair's
time; the other target arrays (Bx, By beside Bz: one HMI record, one T_OBS) need a frame
within TARGET_COMPONENT_TOLERANCE_MINUTES of it, every input passband one within the
tolerance (default 6 minutes, prepare_pairs.py's --max_time_difference: AIA's cadence, half
HMI's; the Sun turns 0.06 degrees in 6 minutes, 0.2 px at disk centre at 512 px). A frame
serves one pair at most: when target frames compete for a frame, the one nearer in time
has it and the other takes its next nearest free frame within the tolerance, or stays
unpaired (`nearest_free`). A target frame lacking an array is reported unpaired with the
reason, and its frames go back to the others. Pairs come out in time order.

`split_pairs` applies prepare_pairs.py's rule (test months, a gap in days around test pairs
dropped from training) through its own `split`. Pairs are JSON-serialisable
(`pairs_to_json`, `pairs_from_json`) so that a run keeps its pair list and resumes on
exactly those frames (`verify_pairs` checks that they are still the store's).

Needs numpy and astropy, and zarr with numcodecs once a store is opened (pip install -r
requirements-sdoml.txt); no torch.
"""
import dataclasses
import datetime
import functools
import importlib.util
import os
import re
import types
from typing import NamedTuple

import numpy as np

from pix2pixCC_Options import UserError

REQUIREMENTS = 'requirements-sdoml.txt'
YEAR_GROUP = re.compile(r'\d{4}')
TIME_ATTRIBUTES = ('T_OBS', 'DATE-OBS', 'DATE_OBS')  # a frame's time, in this order
# JSOC's time strings (HMI's T_OBS), as prepare_pairs.py reads them
JSOC_TIME = re.compile(r'(\d{4})\.(\d\d)\.(\d\d)_(\d\d:\d\d:\d\d(?:\.\d*)?)(?:_(\w+))?$')
TIME_SCALES = {'TAI': 'tai', 'TT': 'tt', 'UTC': 'utc', 'UT': 'utc'}
TIME_UNIT = 'ms'  # T_OBS has at most 2 decimals
DEFAULT_TOLERANCE_MINUTES = 6.0
# HMI's Bx, By and Bz of a frame share T_OBS: a minute leaves room for rounding and is far
# below HMI's 12-minute cadence, so it never reaches a neighbouring frame.
TARGET_COMPONENT_TOLERANCE_MINUTES = 1.0
# A skip list's time marks the frames within this of it: listed times may be rounded (to the
# minute, or to the nominal slot), and 30 s is far below every cadence.
SKIP_TIME_TOLERANCE_SECONDS = 30.0
SPLITS = ('Train', 'Test', 'dropped')  # as prepare_pairs.py names them
PREPARE_PAIRS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'datasets', 'prepare_pairs.py')


# --- Times ------------------------------------------------------------------------------


def minutes(value):
    """A duration in minutes as a numpy timedelta in TIME_UNIT."""
    return np.timedelta64(int(round(float(value) * 60000)), TIME_UNIT)


def iso_and_scale(text):
    """('2011-01-01T00:00:34.30', 'tai') from JSOC's '2011.01.01_00:00:34.30_TAI'; ISO with
    or without its 'Z' is UTC; an unknown JSOC scale gives None."""
    text = str(text).strip()
    jsoc = JSOC_TIME.match(text)
    if jsoc:
        return (f'{jsoc[1]}-{jsoc[2]}-{jsoc[3]}T{jsoc[4]}',
                TIME_SCALES.get((jsoc[5] or 'UTC').upper()))
    return text[:-1] if text.endswith('Z') else text, 'utc'


def astropy_utc(texts, scale):
    """datetime64 (TIME_UNIT, rounded) of ISO strings in `scale`, in one astropy call (a
    year of AIA frames is 87 600 strings); ValueError if one is not a time."""
    from astropy.time import Time
    if scale is None:
        raise ValueError('unknown time scale')
    try:
        times = Time(texts, format='isot', scale=scale)
    except ValueError:  # 'YYYY-MM-DD HH:MM:SS' and the like: astropy finds the format
        times = Time(texts, scale=scale)
    nanoseconds = times.utc.datetime64.astype('datetime64[ns]').astype(np.int64)
    per_unit = np.timedelta64(1, TIME_UNIT) // np.timedelta64(1, 'ns')
    return ((nanoseconds + per_unit // 2) // per_unit).astype(f'datetime64[{TIME_UNIT}]')


def parse_times(values, where):
    """The UTC times (datetime64[ms]) of time strings (ISO UTC, JSOC's TAI form); a
    UserError naming `where` and the first value that is not a time."""
    values = list(values)
    parsed = [iso_and_scale(value) for value in values]
    result = np.empty(len(values), dtype=f'datetime64[{TIME_UNIT}]')
    for scale in {scale for _, scale in parsed}:
        chosen = [i for i, (_, s) in enumerate(parsed) if s == scale]
        try:
            result[chosen] = astropy_utc([parsed[i][0] for i in chosen], scale)
        except (ValueError, TypeError):  # find the culprit, one call each
            bad = next((i for i in chosen if not parses(*parsed[i])), chosen[0])
            raise UserError(f"{where}[{bad}] = '{values[bad]}' is not a time (ISO UTC, or "
                            f"JSOC's 2011.01.01_00:00:00_TAI)") from None
    return result


def parses(text, scale):
    try:
        astropy_utc([text], scale)
        return True
    except (ValueError, TypeError):
        return False


def window_time(value, name):
    """A window bound (None, a datetime, or a time string) as datetime64."""
    if value is None or isinstance(value, np.datetime64):
        return value if value is None else value.astype(f'datetime64[{TIME_UNIT}]')
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return np.datetime64(value, TIME_UNIT)
    return parse_times([value], name)[0]


def iso(time):
    """'2011-01-01T00:00:01.000': a datetime64 as the ISO UTC string pairs keep."""
    return str(np.datetime_as_string(np.datetime64(time, TIME_UNIT), unit=TIME_UNIT))


# --- Records: frames and pairs (JSON-serialisable) ---------------------------------------


@dataclasses.dataclass(frozen=True)
class Frame:
    """A frame of a store: its array ('171A', 'Bz'), year group ('2011'), index in that
    array, and UTC time (ISO, to the millisecond)."""
    array: str
    year: str
    index: int
    time: str

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record):
        try:
            frame = cls(str(record['array']), str(record['year']), int(record['index']),
                        str(record['time']))
            datetime.datetime.fromisoformat(frame.time)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f'not a frame of a pair list: {record!r} ({error})') from None
        return frame


@dataclasses.dataclass(frozen=True)
class Pair:
    """A frame of every input passband and of every target array, in the order asked for.
    Its time is its first target frame's; `split_pairs` sets `split` (Train, Test, dropped)."""
    inputs: tuple
    targets: tuple
    split: str = ''

    @property
    def time(self):
        return self.targets[0].time

    @property
    def datetime(self):
        """The pair's time as a naive UTC datetime (prepare_pairs.py's convention)."""
        return datetime.datetime.fromisoformat(self.time)

    def to_json(self):
        return {'time': self.time, 'split': self.split,
                'inputs': [frame.to_json() for frame in self.inputs],
                'targets': [frame.to_json() for frame in self.targets]}

    @classmethod
    def from_json(cls, record):
        if not isinstance(record, dict) or not record.get('inputs') or \
                not record.get('targets'):
            raise UserError(f'not a pair of a pair list (inputs and targets): {record!r}')
        return cls(tuple(map(Frame.from_json, record['inputs'])),
                   tuple(map(Frame.from_json, record['targets'])), str(record.get('split', '')))


def pairs_to_json(pairs):
    """Pairs as JSON-serialisable data (json.dump writes it)."""
    return [pair.to_json() for pair in pairs]


def pairs_from_json(records):
    """The pairs of `pairs_to_json`'s data, in its order."""
    if not isinstance(records, list):
        raise UserError(f'a pair list is a JSON list of pairs, not {type(records).__name__}')
    return [Pair.from_json(record) for record in records]


# --- Stores -----------------------------------------------------------------------------


def import_zarr():
    try:
        import zarr
    except ImportError:
        raise UserError(f'reading SDOMLv2 stores needs zarr and numcodecs: pip install -r '
                        f'{REQUIREMENTS}') from None
    return zarr


def open_root(location):
    """The store's root group, read-only: a local folder, or a URL (s3://, gs://) through
    fsspec, anonymously for the public buckets."""
    zarr = import_zarr()
    if '://' in location:
        try:
            import fsspec  # noqa: F401 (zarr reads URLs through it)
            public = location.startswith(('s3://', 'gs://', 'gcs://'))
            return zarr.open_group(location, mode='r',
                                   storage_options={'anon': True} if public else {})
        except (OSError, ValueError, ImportError) as error:
            raise UserError(f'{location}: cannot open this store ({error}); a URL needs '
                            f'fsspec and s3fs (s3://) or gcsfs (gs://)') from None
    if not os.path.isdir(location):
        raise UserError(f'{location}: no such folder (an SDOMLv2 store is a folder such as '
                        f'sdomlv2_small.zarr)')
    try:
        return zarr.open_group(location, mode='r')
    except (OSError, ValueError):  # zarr's GroupNotFoundError is both
        raise UserError(f'{location}: not a zarr store (no .zgroup or zarr.json at its top); '
                        f'give the folder of an SDOMLv2 store such as sdomlv2_small.zarr') \
            from None


class Store:
    """An SDOMLv2 store, opened read-only: its year groups and their arrays, each array's
    frame times and attributes (read once, kept), its frames' headers and data."""

    def __init__(self, location):
        self.location = str(location)
        self.root = open_root(self.location)
        self.years = sorted(name for name in self.root.group_keys() if YEAR_GROUP.fullmatch(name))
        if not self.years:
            held = ', '.join(sorted(self.root.keys())[:10]) or 'nothing'
            raise UserError(f'{self.location}: a zarr group, but no year groups (such as 2011) '
                            f'in it, so not an SDOMLv2 store; it holds: {held}')
        self._arrays, self._attributes, self._times, self._handles = {}, {}, {}, {}

    def arrays(self, year):
        """The names of the arrays of year group `year`."""
        if year not in self._arrays:
            self._arrays[year] = sorted(self.root[year].array_keys())
        return self._arrays[year]

    def arrays_by_year(self):
        return {year: self.arrays(year) for year in self.years}

    def has(self, name, year):
        return year in self.years and name in self.arrays(year)

    def where(self, name, year):
        """How messages name an array: '<store>: 2011/171A'."""
        return f'{self.location}: {year}/{name}'

    def check_arrays(self, names):
        """A UserError for the first of `names` that no year group holds, listing what is."""
        for name in names:
            if not any(self.has(name, year) for year in self.years):
                held = '; '.join(f'{year}: {" ".join(self.arrays(year)) or "none"}'
                                 for year in self.years)
                raise UserError(f"{self.location}: no array '{name}' in any year group (it "
                                f"holds {held})")

    def array(self, name, year):
        if not self.has(name, year):
            self.check_arrays([name])
            held = ' '.join(self.arrays(year)) if year in self.years else 'no such year group'
            raise UserError(f"{self.location}: no array '{name}' in year group {year} ({held})")
        # Kept open: opening an array makes zarr read and parse its metadata, and a real
        # store's attributes hold a year of header lists (40 MB: 1 s per opening), which
        # every frame read would pay again (BENCHMARKS.md, Loading SDOML pairs).
        if (name, year) not in self._handles:
            self._handles[name, year] = self.root[year][name]
        return self._handles[name, year]

    def frame_count(self, name, year, index=None):
        """The array's number of frames; a UserError if `index` is not one of them."""
        n = int(self.array(name, year).shape[0])
        if index is not None and not 0 <= index < n:
            raise UserError(f'{self.where(name, year)}: no frame {index} (it has {n})')
        return n

    def attributes(self, name, year):
        """The array's attributes: each header key's list of one value per frame (or one
        value for all); a UserError names a list of another length."""
        if (name, year) not in self._attributes:
            n = self.frame_count(name, year)
            attributes = self.array(name, year).attrs.asdict()
            for key, values in attributes.items():
                if isinstance(values, list) and len(values) != n:
                    raise UserError(f'{self.where(name, year)}: attribute {key} has '
                                    f'{len(values)} values for {n} frames (one per frame)')
            self._attributes[name, year] = attributes
        return self._attributes[name, year]

    def times(self, name, year):
        """Every frame's UTC time, by index (datetime64[ms]): T_OBS, else DATE-OBS."""
        if (name, year) not in self._times:
            attributes, where = self.attributes(name, year), self.where(name, year)
            key = next((key for key in TIME_ATTRIBUTES if key in attributes), None)
            if key is None:
                raise UserError(f'{where}: no {" or ".join(TIME_ATTRIBUTES)} attribute; each '
                                f'frame needs a time to be paired')
            if not isinstance(attributes[key], list):
                raise UserError(f'{where}: attribute {key} is not a list of a time per frame')
            self._times[name, year] = parse_times(attributes[key], f'{where} attribute {key}')
        return self._times[name, year]

    def frame_times(self, name, years=None):
        """FrameTimes of array `name` in the year groups `years` (None: all), in time order;
        a UserError if no year group has the array."""
        self.check_arrays([name])
        chosen = [year for year in (self.years if years is None else years)
                  if self.has(name, year)]
        times = [self.times(name, year) for year in chosen]
        empty = [np.empty(0, f'datetime64[{TIME_UNIT}]')]
        year_of = np.array([y for y, t in zip(chosen, times, strict=True) for _ in t], dtype=str)
        index = np.concatenate([np.arange(len(t)) for t in times] or [np.empty(0, np.int64)])
        times = np.concatenate(times or empty)
        order = np.lexsort((index, year_of, times))  # by time, then year group and index
        return FrameTimes(name, times[order], year_of[order], index[order].astype(np.int64))

    def frame_time(self, name, year, index):
        """A frame's UTC time as the ISO string pairs keep."""
        self.frame_count(name, year, index)
        return iso(self.times(name, year)[index])

    def frame_header(self, name, year, index):
        """Frame `index`'s header {key: value}: the values a FITS card can hold, so that
        astropy.io.fits.Header(header) takes it and sunpy reads it with the data as a map
        (left out: non-scalar values, NaN, infinities, None, non-ASCII strings)."""
        self.frame_count(name, year, index)
        header = {}
        for key, values in self.attributes(name, year).items():
            value = values[index] if isinstance(values, list) else values
            if fits_value(value):
                header[key] = value
        return header

    def read_frame(self, name, year, index, window=None):
        """Frame `index` as float32 H x W, or its window (top, left, size) only: zarr reads
        the chunk that holds it, and only the window is copied out."""
        self.frame_count(name, year, index)
        array = self.array(name, year)
        rows, columns = window_slices(array.shape[1:], window, self.where(name, year))
        return np.asarray(array[index, rows, columns], dtype=np.float32)


def fits_value(value):
    """Whether a FITS card can hold `value`: bool, int, finite float, printable ASCII."""
    if isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return bool(np.isfinite(value))
    return isinstance(value, str) and value.isascii() and value.isprintable()


def window_slices(shape, window, where):
    """(rows, columns) slices of the window (top, left, size) in an H x W frame, the whole
    frame for None; a UserError if it does not lie inside."""
    if window is None:
        return slice(None), slice(None)
    try:
        top, left, size = (int(v) for v in window)
    except (TypeError, ValueError):
        raise UserError(f'a window is (top, left, size) in pixels, not {window!r}') from None
    height, width = shape
    if size < 1 or top < 0 or left < 0 or top + size > height or left + size > width:
        raise UserError(f'{where}: the window (top {top}, left {left}, size {size}) does not '
                        f'lie inside its {height} x {width} frames')
    return slice(top, top + size), slice(left, left + size)


def open_store(location):
    """An SDOMLv2 store, read-only: a local folder, or a URL when fsspec is installed (a
    Store is returned as it is)."""
    return location if isinstance(location, Store) else Store(location)


@dataclasses.dataclass
class FrameTimes:
    """Frames of an array in time order: UTC times (datetime64[ms]), year groups, indices."""
    array: str
    times: np.ndarray
    years: np.ndarray
    indices: np.ndarray

    def __len__(self):
        return len(self.times)

    def frame(self, k):
        return Frame(self.array, str(self.years[k]), int(self.indices[k]), iso(self.times[k]))

    def select(self, keep):
        return FrameTimes(self.array, self.times[keep], self.years[keep], self.indices[keep])

    def between(self, start, end):
        """The frames in [start, end) (None: unbounded)."""
        keep = np.ones(len(self), dtype=bool)
        if start is not None:
            keep &= self.times >= start
        if end is not None:
            keep &= self.times < end
        return self.select(keep)


# --- Skip lists -------------------------------------------------------------------------


@dataclasses.dataclass
class SkipList:
    """Frames to leave out: by time, of an array or of any (array None), and by (array,
    year, index)."""
    times: list = dataclasses.field(default_factory=list)      # [(array or None, datetime64)]
    indices: set = dataclasses.field(default_factory=set)      # {(array, year, index)}

    def excluded(self, frames):
        """Boolean mask over `frames` (FrameTimes): those listed."""
        mask = np.array([(frames.array, str(y), int(i)) in self.indices
                         for y, i in zip(frames.years, frames.indices, strict=True)], dtype=bool)
        tolerance = np.timedelta64(int(SKIP_TIME_TOLERANCE_SECONDS * 1000), 'ms')
        for array, time in self.times:
            if array in (None, frames.array):
                mask |= np.abs(frames.times - time) <= tolerance
        return mask


SKIP_INDEX = re.compile(r'(\d{4})/(\d+)$')


def parse_skip_lines(lines, source='skip list'):
    """A SkipList from lines 'TIME' (every array), 'ARRAY TIME' or 'ARRAY YEAR/INDEX' (an
    index needs its array: AIA's passbands are indexed apart); times as T_OBS writes them;
    '#' starts a comment."""
    skip = SkipList()
    for number, line in enumerate(lines, start=1):
        words, where = line.split('#', 1)[0].split(), f'{source} line {number}'
        if len(words) > 2:
            raise UserError(f"{where}: '{line.strip()}' is not 'TIME', 'ARRAY TIME' or "
                            f"'ARRAY YEAR/INDEX'")
        if not words:
            continue
        array, entry = (None, words[0]) if len(words) == 1 else words
        index = SKIP_INDEX.match(entry)
        if index and array is None:
            raise UserError(f"{where}: '{entry}' needs the array it indexes ('171A {entry}'): "
                            f"every array has its own indices")
        if index:
            skip.indices.add((array, index[1], int(index[2])))
        else:
            skip.times.append((array, parse_times([entry], where)[0]))
    return skip


def as_skip_list(skip):
    """None, a SkipList, the path of a skip-list file, or its lines, as a SkipList."""
    if skip is None or isinstance(skip, SkipList):
        return skip or SkipList()
    if not isinstance(skip, (str, os.PathLike)):
        return parse_skip_lines(skip)
    try:
        with open(skip) as f:
            return parse_skip_lines(f.readlines(), str(skip))
    except OSError as error:
        raise UserError(f'skip list {skip}: {error.strerror or error}') from None


# --- Pairing ----------------------------------------------------------------------------


@dataclasses.dataclass
class Unpaired:
    """A target frame left without a pair, and why."""
    frame: Frame
    reason: str


@dataclasses.dataclass
class Pairing:
    """What `pair_frames` found: the pairs in time order, the target frames left unpaired
    (and why), the frames the skip list left out, and how many frames of each input
    passband no pair uses (about half: AIA's 6-minute cadence against HMI's 12)."""
    pairs: list
    unpaired: list
    skipped: list
    unused: dict

    def summary(self, examples=3):
        """One line: the pairs, and the unpaired frames by reason with their first times."""
        line = f'{len(self.pairs)} pairs'
        if self.pairs:
            line += f' from {self.pairs[0].time} to {self.pairs[-1].time}'
        if self.unpaired:
            line += (f'; {len(self.unpaired)} target frames unpaired '
                     f'({reasons(self.unpaired, examples)})')
        if self.skipped:
            line += f'; {len(self.skipped)} frames skipped (skip list)'
        unused = ', '.join(f'{array} {n}' for array, n in self.unused.items() if n)
        return line + (f'; input frames no pair uses: {unused}' if unused else '')


def reasons(unpaired, examples):
    """'5 no 193A frame within 6 min (e.g. 2011-01-01T00:00:01.000, ...); ...'"""
    by_reason = {}
    for u in unpaired:
        by_reason.setdefault(u.reason, []).append(u.frame.time)
    return '; '.join(f'{len(times)} {reason} (e.g. {", ".join(times[:examples])})'
                     for reason, times in sorted(by_reason.items(), key=lambda r: -len(r[1])))


def candidate_links(want, have, tolerance):
    """(want positions, have positions, |time differences|) of every link within
    `tolerance`, and each want's number of links; `have` is sorted."""
    low = np.searchsorted(have, want - tolerance, side='left')
    counts = np.searchsorted(have, want + tolerance, side='right') - low
    wanted = np.repeat(np.arange(len(want)), counts)
    had = np.arange(int(counts.sum())) + np.repeat(low - (np.cumsum(counts) - counts), counts)
    return wanted, had, np.abs(have[had] - want[wanted]).astype(np.int64), counts


def nearest_free(want, have, tolerance):
    """For each time of `want` (sorted), the position in `have` (sorted) of its frame or -1,
    and how many frames it had within `tolerance`. A frame goes to one time at most: links
    are taken in order of their time difference (ties: the earlier time, then the earlier
    frame), so a frame goes to the nearest time that still wants one, and a time whose
    nearest frame went to a nearer time takes its next nearest free one."""
    wanted, had, difference, counts = candidate_links(want, have, tolerance)
    chosen = np.full(len(want), -1, dtype=np.int64)
    taken = np.zeros(len(have), dtype=bool)
    for link in np.lexsort((had, wanted, difference)):
        w, h = wanted[link], had[link]
        if chosen[w] < 0 and not taken[h]:
            chosen[w], taken[h] = h, True
    return chosen, counts


def describe(tolerance):
    return f'{tolerance:g} min' if tolerance >= 1 else f'{tolerance * 60:g} s'


def match_frames(reference, sources):
    """Match each reference frame with a frame of every source ((FrameTimes, tolerance in
    minutes) each): (the matched reference positions, for each source the positions chosen
    for them, {reference position: reason} of the others). A reference frame lacking a
    source is dropped and the matching redone without it, so that its frames go back to the
    others (a few rounds at most, only around data gaps)."""
    active, dropped = np.arange(len(reference)), {}
    while True:
        found = [nearest_free(reference.times[active], frames.times, minutes(tolerance))
                 for frames, tolerance in sources]
        missing = np.zeros(len(active), dtype=bool)
        for (frames, tolerance), (chosen, counts) in zip(sources, found, strict=True):
            new = (chosen < 0) & ~missing
            within = f'within {describe(tolerance)}'
            for j in np.flatnonzero(new):
                dropped[int(active[j])] = (
                    f'no {frames.array} frame {within}' if counts[j] == 0 else
                    f'its {frames.array} frames {within} went to target frames nearer them')
            missing |= new
        if not missing.any():
            return active, [chosen for chosen, _ in found], dropped
        active = active[~missing]


def check_names(names, what):
    names = [str(name) for name in ([names] if isinstance(names, str) else names)]
    if not names or len(set(names)) < len(names):
        raise UserError(f'{what}: {" ".join(names) or "none"}; give one or more, each once')
    return names


def years_near(store, start, end):
    """The store's year groups that can hold frames in [start, end): a day's margin, as a
    frame's year group is not always its UTC year."""
    def year(time, sign):
        return int((time + sign * np.timedelta64(1, 'D')).astype('datetime64[Y]').astype(int)) \
            + 1970
    return [y for y in store.years if (start is None or int(y) >= year(start, -1)) and
            (end is None or int(y) <= year(end, 1))]


def without_skipped(frames, skip, skipped):
    """`frames` less those the skip list names (added to `skipped`)."""
    excluded = skip.excluded(frames)
    skipped.extend(frames.frame(k) for k in np.flatnonzero(excluded))
    return frames.select(~excluded)


def source_frames(store, name, start, end, tolerance, skip, skipped):
    """The frames of array `name` that can pair with a target in [start, end)."""
    low = None if start is None else start - minutes(tolerance)
    high = None if end is None else end + minutes(tolerance)
    frames = store.frame_times(name, years_near(store, low, high)).between(low, high)
    return without_skipped(frames, skip, skipped)


def check_frame_sizes(store, names, years, role):
    """A side's arrays must have frames of one size: they are stacked as channels."""
    sizes = {}
    for name in names:
        for year in years:
            if store.has(name, year):
                sizes.setdefault(tuple(store.array(name, year).shape[1:]), f'{year}/{name}')
    if len(sizes) > 1:
        found = ', '.join(f'{where} {h} x {w}' for (h, w), where in sizes.items())
        raise UserError(f'{store.location}: the {role} arrays have frames of different sizes '
                        f'({found}); they are stacked as channels')


def pair_frames(input_store, input_arrays, target_store, target_arrays, start=None, end=None,
                tolerance_minutes=DEFAULT_TOLERANCE_MINUTES, skip=None):
    """Pair the target arrays' frames in [start, end) with frames of every input passband
    (the module's notes say how). `input_arrays` ('171A' or ['171A', '193A']) become the
    input's channels, `target_arrays` ('Bz' or ['Bx', 'By', 'Bz']) the target's, in that
    order; the stores (paths or Stores) may be one. `skip`: a SkipList, a skip-list file or
    its lines. Returns a Pairing; a UserError when the window holds no pair."""
    input_store, target_store = open_store(input_store), open_store(target_store)
    input_arrays = check_names(input_arrays, 'input arrays')
    target_arrays = check_names(target_arrays, 'target arrays')
    if not tolerance_minutes >= 0:
        raise UserError(f'the time tolerance must be 0 or more minutes, not {tolerance_minutes}')
    start, end = window_time(start, 'the window start'), window_time(end, 'the window end')
    if start is not None and end is not None and start >= end:
        raise UserError(f'the window [{iso(start)}, {iso(end)}) is empty: its start must come '
                        f'before its end')
    input_store.check_arrays(input_arrays)
    target_store.check_arrays(target_arrays)
    skip, skipped = as_skip_list(skip), []
    years = years_near(target_store, start, end)
    check_frame_sizes(input_store, input_arrays, years_near(input_store, start, end), 'input')
    check_frame_sizes(target_store, target_arrays, years, 'target')
    reference = target_store.frame_times(target_arrays[0], years).between(start, end)
    reference = without_skipped(reference, skip, skipped)
    if not len(reference):
        raise UserError(no_target_reason(target_store, target_arrays[0], start, end, skipped))
    component = TARGET_COMPONENT_TOLERANCE_MINUTES
    sources = [(source_frames(target_store, name, start, end, component, skip, skipped),
                component) for name in target_arrays[1:]]
    sources += [(source_frames(input_store, name, start, end, tolerance_minutes, skip,
                               skipped), tolerance_minutes) for name in input_arrays]
    pairing = pairing_record(reference, sources, *match_frames(reference, sources),
                             len(target_arrays))
    pairing.skipped = sorted(set(skipped), key=lambda f: (f.time, f.array, f.year, f.index))
    if not pairing.pairs:
        raise UserError(f'no pairs in {window_text(start, end)}: {len(reference)} frames of '
                        f'{target_arrays[0]} in it, none paired: '
                        f'{reasons(pairing.unpaired, 3)}')
    return pairing


def pairing_record(reference, sources, paired, chosen, dropped, n_targets):
    """The Pairing of match_frames' result; sources[:n_targets - 1] are the other target
    arrays, the rest the input passbands."""
    pairs = []
    for j, r in enumerate(paired):
        frames = [frames.frame(positions[j])
                  for (frames, _), positions in zip(sources, chosen, strict=True)]
        pairs.append(Pair(tuple(frames[n_targets - 1:]),
                          (reference.frame(r), *frames[:n_targets - 1])))
    unpaired = [Unpaired(reference.frame(r), reason) for r, reason in sorted(dropped.items())]
    unused = {frames.array: len(frames) - len(paired) for frames, _ in sources[n_targets - 1:]}
    return Pairing(pairs, unpaired, [], unused)


def window_text(start, end):
    return (f'[{"the first frame" if start is None else iso(start)}, '
            f'{"the last frame" if end is None else iso(end)})')


def no_target_reason(store, name, start, end, skipped):
    """Why a window holds no target frame: the skip list, or the store's span of frames."""
    window = window_text(start, end)
    if skipped:
        return f'no pairs in {window}: the skip list leaves out all {len(skipped)} frames ' \
               f'of {name} in it'
    every = store.frame_times(name)
    span = f'{iso(every.times[0])} to {iso(every.times[-1])}' if len(every) else 'none'
    return (f'no pairs in {window}: {store.location} has no frame of {name} in it (its frames '
            f'of {name}: {span}; year groups {", ".join(store.years)})')


# --- Training and test ------------------------------------------------------------------


@functools.cache
def prepare_pairs_module():
    """datasets/prepare_pairs.py, whose split rule the pairs share (a script, not a module
    of a package: imported by its path)."""
    spec = importlib.util.spec_from_file_location('prepare_pairs', PREPARE_PAIRS)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SystemExit:  # it exits when scipy or astropy is missing, after saying so
        raise UserError('splitting pairs uses datasets/prepare_pairs.py, which needs numpy, '
                        'scipy and astropy: pip install -r requirements-prep.txt') from None
    return module


def split_pairs(pairs, test_months, gap_days=0.0):
    """{'Train': [...], 'Test': [...], 'dropped': [...]}: a pair whose UTC time falls in one
    of `test_months` (1-12) is Test, any other Train, or dropped when within `gap_days` days
    of a Test pair (so that nearly the same Sun is not in both): prepare_pairs.py's rule,
    by its `split`. The pairs come back with `split` set, in their order."""
    test_months = {int(month) for month in test_months}
    if any(not 1 <= month <= 12 for month in test_months):
        raise UserError(f'test months are 1 to 12, not {sorted(test_months)}')
    if not gap_days >= 0:
        raise UserError(f'the gap around test pairs cannot be negative ({gap_days} days)')
    # what prepare_pairs.split reads of a pair (target.time, name) and sets (split, note)
    stand_ins = [types.SimpleNamespace(target=types.SimpleNamespace(time=pair.datetime),
                                       name=pair.time, split='Train', note='')
                 for pair in pairs]
    prepare_pairs_module().split(stand_ins, test_months, float(gap_days))
    result = {split: [] for split in SPLITS}
    for pair, stand_in in zip(pairs, stand_ins, strict=True):
        result[stand_in.split].append(dataclasses.replace(pair, split=stand_in.split))
    return result


# --- Reading pairs ----------------------------------------------------------------------


class PairData(NamedTuple):
    """A pair's data: input and target C x H x W float32 (channels in the pair's order), the
    headers of the first input channel's frame and of the first target's."""
    input: np.ndarray
    target: np.ndarray
    input_header: dict
    target_header: dict


def read_frames(store, frames, window=None):
    """C x H x W float32: the frames (or their windows) stacked in order."""
    return np.stack([store.read_frame(f.array, f.year, f.index, window) for f in frames])


def read_pair(input_store, target_store, pair, window=None):
    """PairData of `pair`; `window` (top, left, size) reads only that square of each frame."""
    input_store, target_store = open_store(input_store), open_store(target_store)
    first_input, first_target = pair.inputs[0], pair.targets[0]
    return PairData(
        read_frames(input_store, pair.inputs, window),
        read_frames(target_store, pair.targets, window),
        input_store.frame_header(first_input.array, first_input.year, first_input.index),
        target_store.frame_header(first_target.array, first_target.year, first_target.index))


def verify_pairs(input_store, target_store, pairs):
    """A UserError if a kept pair list no longer names the stores' frames (a frame gone or
    at another time): a resumed run must read exactly the frames it paired."""
    input_store, target_store = open_store(input_store), open_store(target_store)
    for pair in pairs:
        for store, frames in ((input_store, pair.inputs), (target_store, pair.targets)):
            for frame in frames:
                if not store.has(frame.array, frame.year):
                    raise UserError(f'the pair at {pair.time} names {frame.year}/{frame.array}, '
                                    f'which {store.location} does not hold')
                found = store.frame_time(frame.array, frame.year, frame.index)
                if found != frame.time:
                    raise UserError(f'the pair at {pair.time} names '
                                    f'{store.where(frame.array, frame.year)} frame '
                                    f'{frame.index} at {frame.time}, but the store has it at '
                                    f'{found}: the store changed since the pairs were made')
