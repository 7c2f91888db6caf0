"""Memory of CPU inference: a process that reuses the memory it frees instead of faulting in
fresh pages for every layer (`reuse_freed_memory`, `return_freed_memory`), and a generator
that holds a layer's weights, mapped from a private copy of its checkpoint (`take_snapshot`),
only while that layer runs (`release_mapped_weights_after_use`). Performance only: the
results are the same without.
"""
import ctypes
import functools
import hashlib
import io
import mmap
import os
import re
import shutil
import sys
import tempfile

from pix2pixCC_Options import UserError


# glibc gives every allocation above 32 MB a mapping of its own and hands it back to the
# kernel when it is freed. At full resolution nearly every layer's output is that large (64
# channels at 1024x1024: 268 MB), so each layer of an inference faulted in fresh zeroed pages
# for its output: 65,536 page faults for one such map; a quarter of a 1024x1024 image's
# CPU time (README "Speed"). Told to keep freed memory in its heap, glibc gives the next
# layer the pages the last one let go; the process's peak memory is what the pass holds at
# once, as before, but it stays resident until the process ends.
GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)
KEEP_FREED_BYTES = 2 ** 31 - 1  # free memory kept at the heap's top (mallopt takes an int)
KEEP_BETWEEN_LAYERS_BYTES = 2 ** 31  # free memory a tiled image keeps from layer to layer
MALLOC_ENVIRONMENT = ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_',
                      'MALLOC_TOP_PAD_')
freed_memory_kept = False  # whether reuse_freed_memory took effect in this process


def reuse_freed_memory():
    """Let this process reuse the memory it frees instead of returning it to the kernel
    (glibc on Linux; see above). Left alone where glibc's malloc was configured through the
    environment (GLIBC_TUNABLES, MALLOC_*_) or is not the allocator in use: a user's
    choice wins. Returns whether the setting was made."""
    if not sys.platform.startswith('linux') or 'glibc.malloc' in \
            os.environ.get('GLIBC_TUNABLES', '') or any(os.environ.get(name) is not None
                                                        for name in MALLOC_ENVIRONMENT):
        return False
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
    if mallopt is None or 'malloc' in os.environ.get('LD_PRELOAD', ''):  # jemalloc, tcmalloc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # glibc's mallopt returns 1 on success (musl's stub returns 0: nothing to do there).
    global freed_memory_kept
    freed_memory_kept = (mallopt(GLIBC_M_MMAP_MAX, 0) == 1
                         and mallopt(GLIBC_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1)
    return freed_memory_kept


class MallocInfo(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc 2.33 and later)."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


def return_freed_memory(keep=KEEP_BETWEEN_LAYERS_BYTES):
    """Give the kept free memory back to the kernel (glibc's malloc_trim also releases the
    free pages inside the heap) when more than `keep` bytes of it are free, where
    reuse_freed_memory kept it. Asked after every layer of a tiled image, whose tiles change
    shape from layer to layer and may leave the heap's free memory in pieces later tiles do
    not fit: a bound on what a tiled image keeps. Given back after every layer, the peak of
    a 4096x4096 image fell from 2.5 to 2.2 GB, but each layer faulted its tiles' pages in
    again (2048x2048: 1.44x the whole image's time instead of 1.22x); above 2 GB it is a
    safety valve that those images do not reach. Returns whether it was given back."""
    if not freed_memory_kept:
        return False
    libc = ctypes.CDLL(None)
    mallinfo2 = getattr(libc, 'mallinfo2', None)
    if mallinfo2 is not None:
        mallinfo2.restype = MallocInfo
        if mallinfo2().fordblks <= keep:
            return False
    libc.malloc_trim(0)
    return True


MADV_DONTNEED = 4  # Linux: drop these pages; a file-backed page is read again when touched


# The weights a run maps come from a private copy of their file, taken as the run reads them.
# Their pages are given back after each layer and read again from the file for the next
# image (`release_mapped_weights_after_use`, below); mapped from the checkpoint or model file
# itself, a file overwritten in place while a conversion runs (`cp`, `rsync --inplace`)
# would change the products from then on, and one truncated would end the process with
# SIGBUS. A copy without a name (O_TMPFILE, or created and unlinked) can be neither opened,
# written nor truncated by anyone else. It goes on a disk, not into tmpfs, whose pages are
# memory the kernel cannot drop (it would hold the weights for good, as reading them into
# the process does).
RAM_FILESYSTEMS = ('tmpfs', 'ramfs')
# Bytes read, hashed and written at a time: small, as the heap keeps what the process frees
# (`reuse_freed_memory`): 1 and 4 MB blocks raised the Test script's peak memory by 4 MB.
COPY_BLOCK = 2 ** 16


class WeightsSnapshot:
    """The private copy of a weights file (`take_snapshot`): `file` (open until loaded),
    `sha256` (of the bytes copied: the weights that run), `inode` (None for a copy in
    memory) and `mappable`, the path that maps it (/proc/self/fd/N) or None where it cannot
    be mapped (no /proc: then it is read from `file`)."""

    def __init__(self, file, sha256):
        self.file, self.sha256 = file, sha256
        try:
            fd = file.fileno()
        except (OSError, io.UnsupportedOperation):  # (in memory)
            self.inode = self.mappable = None
            return
        self.inode = os.fstat(fd).st_ino
        proc = f'/proc/self/fd/{fd}'
        self.mappable = proc if os.path.exists(proc) else None


def take_snapshot(path):
    """A private copy of the weights file `path` (a WeightsSnapshot), hashed as it is copied.

    The file is copied once more when it changed during the copy (its size or times differ
    afterwards); when it changed again, UserError in one line: it is still being written."""
    for _ in range(2):
        try:
            with open(path, 'rb') as source:
                before = file_state(os.fstat(source.fileno()))
                copy = private_file(path, before[0])
                try:
                    size, sha256 = copy_and_hash(source, copy)
                    copy.flush()
                    copy.seek(0)  # (read from the start where it is not mapped)
                except OSError as error:
                    copy.close()
                    raise UserError(f"cannot copy {path} to a private file for this run "
                                    f"({getattr(copy, 'name', 'in memory')}): "
                                    f"{error.strerror or error}") from None
                after = file_state(os.fstat(source.fileno()))
        except OSError as error:
            raise UserError(f"cannot read {path}: {error.strerror or error}") from None
        if before == after and size == after[0]:
            return WeightsSnapshot(copy, sha256)
        copy.close()
    raise UserError(f"{path} changed while it was being read (it is still being written or "
                    f"copied); wait until it is completely written, then run again")


def file_state(stat):
    """What changes when a file is written: its size and times."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def copy_and_hash(source, destination):
    """Copy the open file `source` into `destination`; (bytes copied, their SHA-256)."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(COPY_BLOCK)
    view = memoryview(buffer)
    while count := source.readinto(buffer):
        digest.update(view[:count])
        destination.write(view[:count])
        size += count
    return size, digest.hexdigest()


def private_file(path, size):
    """An open file without a name for a copy of `path` (`size` bytes): in the folder of
    `path`, else in the system's temporary folder, the first that is writable, not in
    memory (tmpfs) and has room for twice the copy (it must not fill a disk others write
    to); else in memory (io.BytesIO: the weights are then read into the process)."""
    for folder in dict.fromkeys((os.path.dirname(os.path.abspath(path)),
                                 tempfile.gettempdir())):
        try:
            if ram_backed(folder) or shutil.disk_usage(folder).free < 2 * size:
                continue
            return tempfile.TemporaryFile(dir=folder)
        except OSError:  # (read-only, gone)
            continue
    return io.BytesIO()


def ram_backed(folder):
    """Whether `folder` is on a file system held in memory (tmpfs, ramfs): the mount that
    holds it in /proc/self/mounts (False where there is none: not Linux)."""
    try:
        with open('/proc/self/mounts') as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return False
    real, best = os.path.realpath(folder), ('', '')
    for point, kind in mounts:
        point = re.sub(r'\\([0-7]{3})', lambda m: chr(int(m.group(1), 8)), point)  # \040
        if (real == point or real.startswith(point.rstrip('/') + '/')) and \
                len(point) > len(best[0]):
            best = (point, kind)
    return best[1] in RAM_FILESYSTEMS


def mapped_ranges(snapshot):
    """The address ranges at which the private copy `snapshot` (a WeightsSnapshot) is mapped
    into this process (Linux's /proc/self/maps; empty elsewhere, or for a copy in memory).

    Told by the copy's inode and by its having no name (`(deleted)`), not by its device:
    on overlayfs (a container's /tmp) the device that /proc/self/maps shows can be the
    underlying file system's, not the one stat gives."""
    if snapshot is None or snapshot.inode is None:
        return []
    try:
        with open('/proc/self/maps') as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(snapshot.inode) and \
                fields[5].endswith(' (deleted)'):
            start, end = (int(value, 16) for value in fields[0].split('-'))
            ranges.append((start, end))
    return ranges


def release_mapped_weights_after_use(G, snapshot):
    """After each layer of G has run, give the pages of its weights that are mapped from the
    private copy `snapshot` of its checkpoint (`take_snapshot`) back to the operating system.

    The weights stay in the OS's page cache (reclaimable: the copy is on a disk), and the
    next image maps them again from there. So the process holds a layer's weights only while
    it runs: at 1024x1024 the full-resolution layers at the end, where the activations peak,
    no longer sit on the 680 MB of residual-block weights. Weights not mapped from the copy
    (a legacy-format checkpoint, a GPU, bfloat16 copies, a copy held in memory) are left
    alone. Returns the number of layers hooked.
    """
    ranges = mapped_ranges(snapshot)
    if not ranges or not sys.platform.startswith('linux'):
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    hooked = 0
    for layer in G.modules():
        spans = []
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            start = tensor.data_ptr()
            end = start + tensor.numel() * tensor.element_size()
            if tensor.device.type == 'cpu' and any(a <= start and end <= b for a, b in ranges):
                first, last = -(-start // page) * page, end // page * page  # whole pages only
                if last > first:
                    spans.append((first, last - first))
        if spans:
            layer.register_forward_hook(functools.partial(release, madvise, spans))
            hooked += 1
    return hooked


def release(madvise, spans, module, inputs, output):
    """Forward hook of release_mapped_weights_after_use (returns None: output unchanged)."""
    for start, size in spans:
        madvise(start, size, MADV_DONTNEED)
