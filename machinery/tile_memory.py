"""The choice between a whole image and tiles, before the first image (README
"Full-resolution images"): the memory a whole-image pass and a tiled pass need, the
temporary disk of the tiles, the memory this process may use, and the tile size of each
input.

The estimates are read from the network's tile plan (machinery/tile_graph.py); a network
the tiled path cannot split is run whole (with a notice when it looks too large), and an
explicit --tile_size for it is refused in one line.
"""
import math
import os
import shutil
import tempfile

import torch

from machinery.tile_graph import Conv, Pointwise, level_of
from machinery.tiles import (FLOAT_BYTES, ChannelMoments, conv_input_range, not_tileable_error,
                             plan_or_reason, schedule, tile_rows, tile_side)
from pix2pixCC_Networks import Generator
from pix2pixCC_Options import UserError
from pix2pixCC_Pipeline import stored_size

# Set to a number of bytes, the memory a whole-image pass may use (instead of what the
# machine, or the process's cgroup, has free): README "Full-resolution images".
MEMORY_LIMIT_VARIABLE = 'PIX2PIXCC_MEMORY_LIMIT'
# The memory limit of this process's control group (containers, SLURM jobs): v2, then v1.
# What a whole-image pass holds beyond its live values (a convolution's working copies, the
# allocator's free pieces): peak RSS was 2.5 times the live values at 2048x2048 (README
# "Full-resolution images").
WHOLE_IMAGE_FACTOR = 2.6
# Images above this many pixels get the notice that an untileable network runs them whole.
LARGE_IMAGE_PIXELS = 2048 * 2048
CGROUP_LIMITS = (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                 ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
                  '/sys/fs/cgroup/memory/memory.usage_in_bytes'))


def whole_image_bytes(plan, shape):
    """An estimate of the memory (bytes) of the network on a whole (padded) image of
    (C, H, W) `shape`: WHOLE_IMAGE_FACTOR times the most that the forward's values hold at
    once (each value from its call to its last reader, the call's output beside its
    inputs), and the input and output images."""
    shapes = plan.eager_shapes(shape)
    last_use = {}
    for index, (_, sources, _) in enumerate(plan.eager):
        for source in sources:
            last_use[source] = index
    peak, live = 0, {plan.input}
    for index, (name, _, _) in enumerate(plan.eager):
        peak = max(peak, sum(math.prod(shapes[value]) for value in live | {name}))
        live = {value for value in live | {name} if last_use.get(value, -1) > index}
    images = math.prod(shape) + math.prod(shapes[plan.output])
    return int(WHOLE_IMAGE_FACTOR * peak + images) * FLOAT_BYTES


def tile_extent(step, axis, length, out_length, rows):
    """The convolution input rows of an inner output tile of `rows` rows (the second)."""
    start = min(rows, out_length - 1)
    first, end, _ = conv_input_range(step.geometry(axis), length, start,
                                     min(start + rows, out_length))
    return end - first


def tiled_bytes(plan, shape, tile_size):
    """An estimate of the memory (bytes) of the tiled pass on a (padded) image of (C, H, W)
    `shape`: the input and output images, and the largest tile's working copies (the read
    tile and its padded form twice, the output three times) and statistics; a pointwise
    value written to a store holds a tile of each map it reads."""
    shapes, peak = plan.shapes(shape), 0
    for op in plan.ops:
        if not isinstance(op, (Conv, Pointwise)):
            continue
        output = shapes[op.name]
        rows = tile_rows(output, tile_side(tile_size, level_of(shape[1], output[1])))
        tile_out = output[0] * rows * output[2]
        if isinstance(op, Pointwise):
            peak = max(peak, (len(op.sources) + 2) * tile_out)
            continue
        source = shapes[op.source]
        middle = [op.step.input_length(axis, n) for axis, n in enumerate(source[1:])]
        tile_in = source[0] * tile_extent(op.step, 0, middle[0], output[1], rows) * middle[1]
        # (float64 statistics on a GPU: a chunk of the output tile, twice the bytes)
        peak = max(peak, 4 * tile_in + 3 * tile_out + 2 * min(ChannelMoments.CHUNK, tile_out))
    return (peak + math.prod(shape) + math.prod(shapes[plan.output])) * FLOAT_BYTES


def disk_bytes(plan, shape, tile_size):
    """The temporary disk (bytes) of the tiled pass on a (padded) image of (C, H, W) `shape`:
    the most that its stores in files hold at once (`schedule`)."""
    shapes = plan.shapes(shape)
    steps = schedule(plan, shapes, tile_size * tile_size * shape[0] // 4)
    on_disk = {key: math.prod(shapes[key]) for key, memory in steps.in_memory.items()
               if not memory}
    peak, open_keys = 0, set()
    for op, closed in zip(plan.ops, steps.closes, strict=True):
        key = steps.writes.get(op.name)
        if key in on_disk:
            open_keys.add(key)
        peak = max(peak, sum(on_disk[key] for key in open_keys))
        open_keys -= set(closed)
    return peak * FLOAT_BYTES


def available_memory(device, log=None):
    """(bytes a pass may use on `device`, where that figure comes from): $PIX2PIXCC_MEMORY_
    LIMIT when set; on the CPU the smaller of /proc/meminfo's MemAvailable and what this
    process's cgroup (a container, a SLURM job) has left under its limit; on a GPU its free
    memory and what PyTorch's allocator holds unused. (None, None) when unknown (then a
    whole image is tried)."""
    limit = os.environ.get(MEMORY_LIMIT_VARIABLE)
    if limit:
        try:
            return int(float(limit)), MEMORY_LIMIT_VARIABLE
        except ValueError:
            raise UserError(f"{MEMORY_LIMIT_VARIABLE}={limit!r} is not a number of bytes; "
                            f"set it to e.g. 8e9, or unset it") from None
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device),
                'the GPU')
    choices = [(memory, source) for memory, source in
               (meminfo_available(), cgroup_available()) if memory is not None]
    return min(choices) if choices else (None, None)


def meminfo_available(path='/proc/meminfo'):
    try:
        with open(path) as f:
            fields = dict(line.split(':', 1) for line in f)
        return int(fields['MemAvailable'].split()[0]) * 1024, 'MemAvailable'
    except (OSError, KeyError, ValueError):
        return None, None


def cgroup_available():
    """(limit - usage of this process's memory cgroup, its file) or (None, None) where no
    limit applies ('max', or v1's 'unlimited' number) or none is readable."""
    for limit_path, usage_path in CGROUP_LIMITS:
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == 'max' or not limit.isdigit() or int(limit) >= 2 ** 60:
            return None, None
        return max(0, int(limit) - usage), limit_path
    return None, None


def automatic_tile_size(plan, shape, multiple, memory):
    """The tile size for a (padded) image of (C, H, W) `shape` when a whole-image pass does
    not fit `memory` bytes: the largest power-of-two multiple of `multiple` below the image
    whose tiles take at most half of it (leaving room for the stores' file cache), else the
    smallest; 0 when the whole image fits or `memory` is None."""
    if memory is None or whole_image_bytes(plan, shape) <= memory:
        return 0
    size = multiple
    while 2 * size < max(shape[1:]) and tiled_bytes(plan, shape, 2 * size) <= memory / 2:
        size *= 2
    return size


def gigabytes(n_bytes):
    """A memory or disk size for a message: GB, or MB below 0.1 GB (not '0.0 GB')."""
    return f'{n_bytes / 1e9:.1f} GB' if n_bytes >= 1e8 else f'{n_bytes / 1e6:.1f} MB'


def padded_shape(channels, size, multiple):
    """(C, H, W) of an input of `size` (H, W) padded to multiples of `multiple`."""
    return (channels, *(n + -n % multiple for n in size))


def tile_sizes(opt, input_paths, device, log=print, image_sizes=None):
    """The tile size of each of `input_paths` (0: the whole image at once): --tile_size for
    the inputs larger than it; without it, tiles for the inputs whose whole-image pass would
    not fit in memory (`available_memory`, less the generator's weights on a GPU), with one
    notice line. Raises UserError, before any output, when --tile_size is asked of a network
    the tiled path cannot split, or when the tiled inputs' temporary stores would not fit
    the free disk of --tmp_dir, or the smallest tiles the memory. Sizes come from the files'
    headers (or `image_sizes`, (H, W) of each, where `input_paths` only name the images:
    machinery/maps.py), the network from the options (built without memory)."""
    with torch.device('meta'):
        G = Generator(opt).eval()
    plan, reason = plan_or_reason(G)
    multiple = 2 ** opt.n_downsample
    if image_sizes is None:
        image_sizes = [stored_size(path, opt.data_format_input, opt.input_ch)
                       for path in input_paths]
    shapes = [padded_shape(opt.input_ch, size, multiple) for size in image_sizes]
    if opt.tile_size:
        sizes = [opt.tile_size if max(shape[1:]) > opt.tile_size else 0 for shape in shapes]
        if plan is None and any(sizes):
            raise not_tileable_error(reason)
    elif plan is None:  # (the whole image is the only way: nothing to choose)
        largest = max(shapes, key=math.prod, default=None)
        if largest and (os.environ.get(MEMORY_LIMIT_VARIABLE) or
                        math.prod(largest[1:]) > LARGE_IMAGE_PIXELS):
            log(f"notice: this network has a call the tiled path cannot split ({reason}): "
                f"every image is translated whole, which for the largest "
                f"({largest[1]}x{largest[2]}) may need more memory than there is")
        return [0] * len(shapes)
    else:
        memory, source = available_memory(device)
        # (The Test script asks before loading it; in training this counts it twice.)
        if memory is not None and device.type == 'cuda':
            memory -= sum(p.numel() for p in G.parameters()) * FLOAT_BYTES
        chosen = {shape: automatic_tile_size(plan, shape, multiple, memory)
                  for shape in set(shapes)}
        sizes = [chosen[shape] for shape in shapes]
    tiled = [index for index, size in enumerate(sizes) if size]
    if not tiled:
        return sizes
    largest = max(tiled, key=lambda index: math.prod(shapes[index]))
    name, shape = os.path.basename(input_paths[largest]), shapes[largest]
    check_room_for_tiles(plan, shape, sizes[largest], name, opt.tmp_dir,
                         None if opt.tile_size else memory)
    if not opt.tile_size:
        log(f"notice: a whole-image pass over {len(tiled)} of the {len(sizes)} input(s) "
            f"(the largest {name}, {shape[1]}x{shape[2]}) needs about "
            f"{gigabytes(whole_image_bytes(plan, shape))} of memory, more than the "
            f"{gigabytes(memory)} available ({source}): translating "
            f"{'it' if len(tiled) == 1 else 'them'} in tiles of {sizes[largest]} px, with "
            f"the same result (--tile_size N sets it)")
    return sizes


def check_room_for_tiles(plan, shape, tile_size, name, tmp_dir, memory=None):
    """UserError when the temporary stores of a (padded) image of (C, H, W) `shape` would
    not fit the free disk of `tmp_dir`, or (with `memory`) its tiles that memory."""
    tmp_dir = tmp_dir or tempfile.gettempdir()
    need, free = disk_bytes(plan, shape, tile_size), shutil.disk_usage(tmp_dir).free
    if need > free:
        raise UserError(f"translating {name} ({shape[1]}x{shape[2]}) in tiles needs "
                        f"{gigabytes(need)} of temporary disk in {tmp_dir}, which has "
                        f"{gigabytes(free)} free; give --tmp_dir a folder with more room")
    need = tiled_bytes(plan, shape, tile_size)
    if memory is not None and need > memory:
        raise UserError(f"translating {name} ({shape[1]}x{shape[2]}) needs about "
                        f"{gigabytes(need)} of memory even in tiles of {tile_size} px, more "
                        f"than the {gigabytes(memory)} available; free memory or use a "
                        f"larger machine")
