"""Memory of CPU inference: a process that reuses the memory it frees instead of faulting in
fresh pages for every layer (`reuse_freed_memory`, `return_freed_memory`), and a generator
that holds a layer's weights mapped from its checkpoint only while that layer runs
(`release_mapped_weights_after_use`). Performance only: the results are the same without.
"""
import ctypes
import functools
import mmap
import os
import sys


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


def mapped_ranges(path):
    """The address ranges at which `path` is mapped into this process (Linux's
    /proc/self/maps; empty elsewhere)."""
    try:
        with open('/proc/self/maps') as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    real, ranges = os.path.realpath(path), []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            start, end = (int(value, 16) for value in fields[0].split('-'))
            ranges.append((start, end))
    return ranges


def release_mapped_weights_after_use(G, path):
    """After each layer of G has run, give the pages of its weights that are mapped from the
    checkpoint `path` back to the operating system.

    The weights stay in the OS's page cache (shared with any other process reading the file,
    and reclaimable), and the next image maps them again from there. So the process holds a
    layer's weights only while it runs: at 1024x1024 the full-resolution layers at the end,
    where the activations peak, no longer sit on the 680 MB of residual-block weights.
    Weights not mapped from the file (a legacy-format checkpoint, a GPU, bfloat16 copies) are
    left alone. Returns the number of layers hooked.
    """
    ranges = mapped_ranges(path)
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
