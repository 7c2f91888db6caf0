"""Errors and files: every file a run writes goes under a temporary name and is renamed when
complete (`atomic_path`), so a killed process never leaves a truncated one, and a failed write
is one line for the user (`WriteError`).

`save_torch` (durable torch.save), `save_image`, JSON and CSV files (`write_json`, `read_json`,
`write_csv`, `read_csv`), `options_record` (the options as JSON), `make_dirs`, `silent` (a log
that prints nothing).
"""
import contextlib
import csv
import json
import os

import torch
from PIL import Image

from pix2pixCC_Options import UserError


def silent(*args):
    """A `log` that prints nothing."""


class WriteError(UserError):
    """A file could not be written (no space, quota, I/O or permission error)."""

    def __init__(self, path, error):
        reason = error.strerror or str(error) if isinstance(error, OSError) else str(error)
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds.

    A process killed mid-write leaves a hidden `.tmp-*` file, never a truncated `path`; a
    failed write removes the temporary and raises WriteError (an OSError such as a full disk
    becomes one line for the user). The temporary name keeps the extension, so writers that
    infer the format still work.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f'.tmp-{os.getpid()}-{name}')
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise WriteError(path, error) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


class _RecordingFile:
    """A file whose write errors are remembered: torch.save swallows the OSError of a full
    disk and raises a RuntimeError about stream positions instead."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()

    def tell(self):
        return self.file.tell()


def save_torch(data, path):
    """torch.save `data` to `path` atomically and durably (flushed to the disk before the
    rename, so a crashed node never leaves a short file under the final name); a write
    failure raises WriteError with the operating system's reason."""
    with atomic_path(path) as temporary:
        with open(temporary, 'wb') as file:
            recording = _RecordingFile(file)
            try:
                torch.save(data, recording)
            except RuntimeError:
                if recording.error is not None:
                    raise recording.error from None
                raise
            file.flush()
            os.fsync(file.fileno())


def save_image(path, pixels):
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary)


def write_json(path, data):
    with atomic_path(path) as temporary:
        with open(temporary, 'w') as f:
            json.dump(data, f, indent=2, sort_keys=True)


def read_json(folder, name):
    """The dict in `folder/name`, or None when there is no such file."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def write_csv(path, rows, append=False):
    """Write `rows` (dicts with the same keys) as CSV; with `append`, after the rows already
    there. The whole file is rewritten under a temporary name and renamed, so a process
    killed mid-write leaves the previous complete file."""
    existing = []
    if append and os.path.isfile(path):
        with open(path, newline='') as f:
            existing = list(csv.DictReader(f))
    all_rows = existing + [dict(row) for row in rows]
    columns = list(dict.fromkeys(key for row in all_rows for key in row))
    with atomic_path(path) as temporary:
        with open(temporary, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(all_rows)


def read_csv(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def plain_data(value):
    """Whether `value` is JSON-like data: str, numbers, None, and lists, tuples and dicts
    (of str keys) of such data."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and plain_data(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain_data(item) for item in value)
    return isinstance(value, (str, int, float, bool, type(None)))


def options_record(opt):
    """The options as a JSON-able dict (what train_options.json and the state file hold):
    those that are plain data (`plain_data`: --metric_bins, the targets' FITS cards, the
    profile of the training data)."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in vars(opt).items() if plain_data(value)}


def make_dirs(*folders):
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create '{folder}': {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"'{folder}' is not writable")
