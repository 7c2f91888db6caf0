"""Copy an SDOMLv2 store into a local store with fewer frames a chunk, for training on it
(README "Training on SDOML", BENCHMARKS.md "Loading SDOML pairs").

    python datasets/rechunk_sdoml.py SRC DST [--frames_per_chunk 1]

SDOMLv2's arrays are chunked 15 (or 120) frames along the time axis, so reading one frame
decompresses its whole chunk: 15 frames for the one a training step asks for, as training
takes the pairs in random order. The copy holds the same year groups, arrays, data and
attributes (every header list, the groups' and the root's), in zarr format 2 with Blosc
zstd bit shuffle (the source array's own numcodecs compressor and filters when it has
them), but chunks of --frames_per_chunk x H x W: a frame then costs its own decompression
only. SRC is read a source chunk at a time (memory: one chunk, at most
MAX_SLAB_BYTES), so a store larger than memory can be copied. SRC may be a URL (s3://,
gs://) when fsspec is installed (machinery/sdoml.py); DST is a new local folder, written
under DST.partial-<pid> and renamed when complete (nothing is left at DST if it fails).

An existing DST, a SRC that is not an SDOMLv2 store, or --frames_per_chunk below 1 is one
line and exit status 2.
"""
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from machinery import sdoml  # noqa: E402
from pix2pixCC_Options import OneLineErrorParser, UserError, run_main  # noqa: E402

MAX_SLAB_BYTES = 512 * 2**20  # most bytes of source data held at once


def sdoml_compressor():
    """SDOMLv2's compressor: Blosc zstd with bit shuffle (numcodecs)."""
    from numcodecs import Blosc
    return Blosc(cname='zstd', clevel=5, shuffle=Blosc.BITSHUFFLE)


def codecs_of(array):
    """(compressor, filters) for the copy of `array`: a zarr format 2 array's own (numcodecs
    codecs), else SDOMLv2's compressor and no filters."""
    metadata = array.metadata
    if getattr(metadata, 'zarr_format', None) == 2 and metadata.compressor is not None:
        return metadata.compressor, metadata.filters
    return sdoml_compressor(), None


def chunks_of(array, frames_per_chunk):
    """(frames_per_chunk, H, W) for a stack of frames; another array keeps its chunks."""
    if array.ndim != 3:
        return tuple(array.chunks)
    return (frames_per_chunk,) + tuple(max(1, int(n)) for n in array.shape[1:])


def slab_frames(array, frames_per_chunk):
    """Frames read and written at once: a source chunk (or a copy's chunk, if longer), at
    most MAX_SLAB_BYTES of data."""
    frame_bytes = array.dtype.itemsize
    for n in array.shape[1:]:
        frame_bytes *= max(1, int(n))
    step = max(int(array.chunks[0]), frames_per_chunk)
    return max(1, min(step, MAX_SLAB_BYTES // frame_bytes))


def copy_array(source, group, name, frames_per_chunk):
    """Array `name` of `group`: `source`'s data and attributes in chunks of
    `frames_per_chunk` frames; returns its number of frames."""
    compressor, filters = codecs_of(source)
    separator = getattr(source.metadata, 'dimension_separator', None) or '.'
    target = group.create_array(
        name, shape=source.shape, dtype=source.dtype,
        chunks=chunks_of(source, frames_per_chunk), compressors=compressor,
        filters=filters, fill_value=source.fill_value, order='C',
        chunk_key_encoding={'name': 'v2', 'separator': separator},
        attributes=source.attrs.asdict())
    if source.ndim == 0:
        target[...] = source[...]
        return 1
    step = slab_frames(source, frames_per_chunk)
    for start in range(0, int(source.shape[0]), step):
        target[start:start + step] = source[start:start + step]
    return int(source.shape[0])


def copy_group(source, target, frames_per_chunk, counts):
    """Every group and array under `source` into `target` (the attributes of each);
    `counts` gathers [arrays, frames]."""
    import zarr
    target.attrs.update(source.attrs.asdict())
    for name, member in sorted(source.members(), key=lambda item: item[0]):
        if isinstance(member, zarr.Group):
            copy_group(member, target.create_group(name), frames_per_chunk, counts)
        else:
            counts[1] += copy_array(member, target, name, frames_per_chunk)
            counts[0] += 1


def check_destination(src, dst):
    """A UserError for a DST that exists, is a URL, or lies inside SRC."""
    if '://' in dst:
        raise UserError(f'{dst}: the copy is a local folder, not a URL')
    if os.path.lexists(dst):
        raise UserError(f'{dst} exists; give a new DST or remove it')
    if '://' not in src and os.path.isdir(src):
        inside = os.path.commonpath([os.path.abspath(src), os.path.abspath(dst)])
        if inside == os.path.abspath(src):
            raise UserError(f'{dst} lies inside {src}; give a DST outside the store')


def rechunk(src, dst, frames_per_chunk=1):
    """Copy the SDOMLv2 store `src` into the new local store `dst` with chunks of
    `frames_per_chunk` frames; returns (arrays, frames, year groups) copied."""
    src, dst = str(src), str(dst)
    if frames_per_chunk < 1:
        raise UserError(f'--frames_per_chunk {frames_per_chunk}: give 1 or more')
    store = sdoml.Store(src)  # a UserError unless an SDOMLv2 store (year groups)
    check_destination(src, dst)
    import zarr
    partial = f'{dst.rstrip(os.sep)}.partial-{os.getpid()}'
    counts = [0, 0]
    try:
        root = zarr.open_group(partial, mode='w-', zarr_format=2)
        copy_group(store.root, root, frames_per_chunk, counts)
        os.rename(partial, dst)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    return counts[0], counts[1], len(store.years)


def folder_size(path):
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)


def parser():
    p = OneLineErrorParser(prog='rechunk_sdoml.py', description=__doc__.split('\n')[0])
    p.add_argument('src', metavar='SRC', help='the SDOMLv2 store to copy (a folder or URL)')
    p.add_argument('dst', metavar='DST', help='the new local store (must not exist)')
    p.add_argument('--frames_per_chunk', type=int, default=1,
                   help='frames in a chunk of the copy (default 1)')
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    arrays, frames, years = rechunk(a.src, a.dst, a.frames_per_chunk)
    print(f'wrote {a.dst}: {arrays} arrays ({frames} frames) in {years} year groups, chunks '
          f'of {a.frames_per_chunk} frame(s); {folder_size(a.dst) / 1e6:.1f} MB')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
