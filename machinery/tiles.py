"""Exact tiled inference (README "Full-resolution images"): the network's output for a whole
image, computed over tiles so that memory holds only tiles.

The computation follows the network's traced forward (machinery/tile_graph.py), call by
call, over the whole (padded) image:

- a convolution writes its output to a store (memory, or a file for a large map): each
  output tile from the input rows and columns it needs (its halo), padded at the image
  border as the whole image is (`axis_plan`);
- a pointwise call is applied to a tile whenever its value is read, so it costs no store;
  a value that combines two stored maps (a residual addition) is written once, into a store
  that nothing reads any more when there is one (`schedule`);
- InstanceNorm uses the whole map's per-channel mean and variance, accumulated in float64
  over the tiles (during the convolution that writes the map, when it normalises that).

A store is closed (its file removed) as soon as no value still to be read needs it. Before
the first tiled image of a network, `check_tiles_agree` runs a small image both ways.
"""
import contextlib
import errno
import math
import os
import shutil
import tempfile
import weakref
from typing import NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from machinery.memory import return_freed_memory
from machinery.tile_graph import (CannotTile, Constant, Conv, Norm, Pointwise, level_of,
                                  tile_plan)
from pix2pixCC_Options import UserError
from pix2pixCC_Utils import bare, memory_format

FLOAT_BYTES = 4  # stores and tiles are float32
# An image slower than this (seconds) gets a progress bar of its layers or tiles.
PROGRESS_DELAY = 5
INPUT = ''  # the store key of the input image (never written into)
# The tiled result of the small image of `check_tiles_agree` may differ from the whole
# image's by float rounding only: this share of the output's range.
AGREEMENT = 1e-4


# ----------------------------------------------------------------------------------------
# Stores: maps read and written tile by tile
# ----------------------------------------------------------------------------------------


class MemoryStore:
    """A (1, C, H, W) tensor read and written tile by tile like a DiskStore (the input
    image, the output, and the maps small enough to stay in memory)."""

    def __init__(self, tensor):
        self.tensor, self.shape = tensor, tuple(tensor.shape[1:])

    def read(self, rows, cols, device):
        """A view where possible: callers never write into what they read."""
        return self.tensor[..., rows[0]:rows[1], cols[0]:cols[1]].to(device)

    def write(self, row, col, tile):
        self.tensor[..., row:row + tile.shape[2], col:col + tile.shape[3]] = tile

    def close(self):
        self.tensor = None


class DiskStore:
    """A (C, H, W) float32 map in a file, channel after channel, read and written with
    explicit reads and writes (never mapped), so that the process holds only the tiles it
    works on. A tile that spans whole rows (as they all do: `tiles`) is one contiguous run
    per channel."""

    def __init__(self, path, shape):
        self.path, self.shape = path, tuple(shape)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        if hasattr(os, 'posix_fallocate'):  # a full disk fails here, not half-way
            try:
                os.posix_fallocate(self.fd, 0, math.prod(self.shape) * FLOAT_BYTES)
            except OSError:
                self.close()
                raise

    def runs(self, rows, cols, array):
        """(file offset, part of `array` (C, h, w)) of each contiguous run of the tile's
        rows x columns."""
        _, height, width = self.shape
        if cols == (0, width):
            return [((channel * height + rows[0]) * width * FLOAT_BYTES, plane.reshape(-1))
                    for channel, plane in enumerate(array)]
        return [(((channel * height + row) * width + cols[0]) * FLOAT_BYTES, line)
                for channel, plane in enumerate(array)
                for row, line in zip(range(*rows), plane, strict=True)]

    def read(self, rows, cols, device):
        """Rows [r0, r1) x columns [c0, c1) as a (1, C, h, w) float32 tensor on `device`."""
        array = np.empty((self.shape[0], rows[1] - rows[0], cols[1] - cols[0]), np.float32)
        for offset, run in self.runs(rows, cols, array):
            if os.preadv(self.fd, [run], offset) != run.nbytes:
                raise OSError(errno.EIO, f'short read from {self.path}')
        return torch.from_numpy(array)[None].to(device)

    def write(self, row, col, tile):
        """`tile` (1, C, h, w) at rows from `row`, columns from `col`."""
        array = tile[0].cpu().numpy()
        rows, cols = (row, row + array.shape[1]), (col, col + array.shape[2])
        for offset, run in self.runs(rows, cols, array):
            run = np.ascontiguousarray(run)  # (a copy only where the tile was cropped)
            if os.pwrite(self.fd, run, offset) != run.nbytes:
                raise OSError(errno.ENOSPC, f'short write to {self.path}')

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            os.remove(self.path)
            self.fd = None


class TemporaryStores:
    """A temporary folder in `tmp_dir` (default: the system's) holding the DiskStores of
    one image; the folder and everything in it are removed at the end, also on an error or
    a stop signal (which the Test script turns into an exception)."""

    PREFIX = 'pix2pixCC-tiles-'

    def __init__(self, tmp_dir=None, device=None):
        self.tmp_dir, self.folder, self.stores, self.device = tmp_dir, None, [], device

    def __enter__(self):
        self.folder = tempfile.mkdtemp(prefix=self.PREFIX, dir=self.tmp_dir)
        return self

    def new(self, shape, in_memory):
        """A store of a (C, H, W) map, in memory or in a file."""
        if in_memory:
            return MemoryStore(torch.empty((1, *shape), device=self.device))
        path = os.path.join(self.folder, f'{len(self.stores)}.f32')
        try:
            self.stores.append(DiskStore(path, shape))
        except OSError as error:
            raise temporary_disk_error(self.folder, error) from None
        return self.stores[-1]

    def __exit__(self, *exc):
        for store in self.stores:
            with contextlib.suppress(OSError):
                store.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def temporary_disk_error(folder, error):
    return UserError(f"cannot write the temporary tiles in {folder}: "
                     f"{error.strerror or error}; give --tmp_dir a folder with more room")


# ----------------------------------------------------------------------------------------
# Tiles and the rows a convolution needs for them
# ----------------------------------------------------------------------------------------


def tile_side(tile_size, level):
    """The side of the square whose pixels a tile at `level` holds (the map is 2**level
    times smaller than the image): tile_size at full resolution, then halved every second
    level, where the channels have grown fourfold, so that a tile holds at most as many
    values at every level."""
    return max(1, tile_size >> ((level + 1) // 2))


def tile_rows(shape, side):
    """The rows of a tile of a (C, H, W) map: the tiles span whole rows (so that each is one
    run per channel in its store) and hold as many pixels as a `side` x `side` square."""
    return max(1, min(shape[1], side * side // shape[2]))


def tiles(shape, side):
    """[(rows, columns)] of the tiles covering a (C, H, W) map (`tile_rows`)."""
    height = tile_rows(shape, side)
    return [((row, min(row + height, shape[1])), (0, shape[2]))
            for row in range(0, shape[1], height)]


def conv_input_range(geometry, length, start, stop):
    """(first, end, crop): the convolution's input rows [first, end) (of `length`) from
    which it computes output rows [start, stop) exactly, and the index of row `start` in
    its output for that input. `geometry`: ConvStep.geometry.

    Its own zero padding lies where the whole input's does at the borders, and elsewhere
    only touches output rows before `crop` or after the tile, which are dropped.
    """
    extent, s, p, transposed, output_padding = geometry
    if transposed:
        # Output row o takes input rows (o + p - k + 1) / s ... (o + p) / s.
        first = max(0, min(-(-(start + p - extent + 1) // s), start // s))
        end = min(length, (stop - 1 + p) // s + 1)
        while end < length and (end - first - 1) * s - 2 * p + extent + \
                output_padding < stop - first * s:
            end += 1
        return first, end, start - first * s
    # Output row o takes input rows o * s - p ... o * s - p + extent - 1.
    first = max(0, (start - -(-p // s)) * s)
    return first, min(length, (stop - 1) * s - p + extent), start - first // s


def padded_rows(rows, length, mode):
    """(row of the unpadded map, weight) of each of `rows` (numpy, may lie outside
    [0, length)) after padding of `mode` (F.pad's); the weight is 0 for zero padding."""
    if mode == 'reflect':
        rows = np.abs(rows)
        rows = np.where(rows >= length, 2 * (length - 1) - rows, rows)
    weight = (rows >= 0) & (rows < length) if mode == 'constant' else np.ones(rows.shape, bool)
    return np.clip(rows, 0, length - 1), weight.astype(np.float32)


def upsampled_rows(rows, length, mode, align_corners):
    """The two rows of a map of `length` and their weights that a x2 upsampling of `mode`
    mixes into each of `rows` of its output, computed in float32 as PyTorch does."""
    if mode == 'nearest':
        low = rows // 2
        return low, low, np.ones(rows.shape, np.float32), np.zeros(rows.shape, np.float32)
    if align_corners:
        scale = np.float32((length - 1) / (2 * length - 1)) if length > 1 else np.float32(0)
        source = scale * rows.astype(np.float32)
    else:  # half-pixel centres, clamped at the first row
        source = np.maximum(np.float32(0.5) * (rows.astype(np.float32) + np.float32(0.5)) -
                            np.float32(0.5), np.float32(0))
    low = np.minimum(source.astype(np.int64), length - 1)
    high = np.minimum(low + 1, length - 1)
    weight = np.clip(source - low, 0, 1).astype(np.float32)
    return low, high, np.float32(1) - weight, weight


class AxisPlan(NamedTuple):
    """How a tile's rows (or columns) are made from a step's input along one axis: read
    rows [start, stop) of the input, then either pad them by (before, after) rows of the
    step's padding (`pad`; where the tile reaches beyond the image) or, after an
    upsampling, mix rows `low` and `high` of them with weights `w_low` and `w_high`
    (`upsampling`, else None). `crop`: the first row of the convolution's output kept."""
    start: int
    stop: int
    pad: tuple
    upsampling: tuple
    crop: int


def pad_mode(step):
    """The step's padding as F.pad's mode ('constant' also without a padding layer)."""
    return step.pad[0] if step.pad is not None else 'constant'


def axis_plan(step, axis, length, start, stop, device):
    """The AxisPlan of output rows [start, stop) of `step` whose input has `length` rows."""
    first, end, crop = conv_input_range(step.geometry(axis), step.input_length(axis, length),
                                        start, stop)
    before, _ = step.pad_widths(axis)
    first, end = first - before, end - before  # rows of the map before its padding
    if step.upsample is None:  # the rows read, padded at the image's border
        read = max(first, 0), min(end, length)
        return AxisPlan(*read, (read[0] - first, end - read[1]), None, crop)
    rows, weight = padded_rows(np.arange(first, end), 2 * length, pad_mode(step))
    low, high, w_low, w_high = upsampled_rows(rows, length, *step.upsample)
    read = int(low.min()), int(high.max()) + 1
    upsampling = tuple(torch.as_tensor(values, device=device) for values in (
        low - read[0], high - read[0], w_low * weight, w_high * weight))
    return AxisPlan(*read, (0, 0), upsampling, crop)


def upsample_rows(tile, plan, dim):
    """The rows (dim 2) or columns (dim 3) of the upsampled and padded `tile` that `plan`
    makes of it."""
    low, high, w_low, w_high = plan.upsampling
    shape = [1, 1, 1, 1]
    shape[dim] = -1
    return tile.index_select(dim, low) * w_low.view(shape) + \
        tile.index_select(dim, high) * w_high.view(shape)


def step_input(step, tile, row_plan, col_plan):
    """The convolution's input tile from the `tile` read for it."""
    if step.upsample is not None:
        return upsample_rows(upsample_rows(tile, row_plan, 2), col_plan, 3)
    padding = (*col_plan.pad, *row_plan.pad)
    if not any(padding):
        return tile
    # F.pad, as the whole image's padding: the rows read reach the image's border wherever
    # a tile is padded, so they are padded as the image is.
    if pad_mode(step) == 'constant':
        return F.pad(tile, padding, value=step.pad[1] if step.pad is not None else 0.0)
    return F.pad(tile, padding, mode=pad_mode(step))


# ----------------------------------------------------------------------------------------
# Values: what reading a tile of each call's output means
# ----------------------------------------------------------------------------------------


class Stored(NamedTuple):
    store: object

    @property
    def shape(self):
        return self.store.shape

    def read(self, rows, cols, device):
        return self.store.read(rows, cols, device)


class Fixed(NamedTuple):
    """A tensor of the module, constant over the image."""
    tensor: torch.Tensor

    def read(self, rows, cols, device):
        return self.tensor


class Lazy(NamedTuple):
    """A pointwise call on the tiles of its inputs (`values`: name -> value)."""
    op: Pointwise
    values: dict
    shape: tuple

    def read(self, rows, cols, device):
        tiles_read = {name: value.read(rows, cols, device) for name, value in self.values.items()}
        if self.op.in_place:  # (its first input may be a view of a store)
            first = self.op.node.all_input_nodes[0].name
            tiles_read[first] = tiles_read[first].clone()
        args, kwargs = fx.node.map_arg((self.op.node.args, self.op.node.kwargs),
                                       lambda node: tiles_read[node.name])
        call = self.op.call
        if isinstance(call, str):  # a method of its first argument
            return getattr(args[0], call)(*args[1:], **kwargs)
        return call(*args, **kwargs)


class Normalised(NamedTuple):
    """`value` normalised by whole-map statistics: (x - center) * scale + offset."""
    value: object
    center: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    @property
    def shape(self):
        return self.value.shape

    def read(self, rows, cols, device):
        tile = self.value.read(rows, cols, device).float()
        return (tile - self.center) * self.scale + self.offset


def normalised(value, norm, moments, device):
    """`value` normalised as `norm` (InstanceNorm) does, with the map's `moments`."""
    scale = 1 / torch.sqrt(moments.variance.to(device) + norm.eps)
    offset = torch.zeros_like(scale)
    if norm.affine:
        scale = scale * norm.weight.double().to(device)
        offset = norm.bias.double().to(device)
    center, scale, offset = (v.float().view(1, -1, 1, 1)
                             for v in (moments.mean.to(device), scale, offset))
    return Normalised(value, center, scale, offset)


class ChannelMoments:
    """Per-channel mean and biased variance of a map seen tile by tile: each tile's, merged
    in float64 by Chan et al.'s pairwise rule."""

    CHUNK = 2 ** 22  # values converted to float64 at a time (GPU)

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, tile):
        """`tile`: (1, C, h, w) float32."""
        n = tile.shape[2] * tile.shape[3]
        if tile.device.type == 'cpu':
            # BatchNorm's statistics kernel: two passes, accumulated in float64 on the CPU,
            # 4x faster than var_mean (Welford) there.
            mean, var = (value.double() for value in
                         torch.batch_norm_update_stats(tile.contiguous(), None, None, 0.0))
        else:
            step = max(1, self.CHUNK // max(n, 1))
            parts = [torch.var_mean(chunk.double(), dim=(0, 2, 3), correction=0)
                     for chunk in tile.split(step, dim=1)]
            var, mean = (torch.cat(values) for values in zip(*parts, strict=True))
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta * delta * (self.count * n / total)
        self.count = total

    @property
    def variance(self):
        return self.m2 / self.count


# ----------------------------------------------------------------------------------------
# The schedule: where each value lives, and when a store can go
# ----------------------------------------------------------------------------------------


class Schedule(NamedTuple):
    """writes: {name: store key} of the convolutions and of the pointwise values written
    (a key equal to the name is a new store; another is a store written over in place);
    in_memory: {store key: bool}; closes: [store keys no longer needed after op i];
    moments: {convolution name: [names of the InstanceNorms of its output]}."""
    writes: dict
    in_memory: dict
    closes: list
    moments: dict


def schedule(plan, shapes, in_memory_values):
    """The Schedule of `plan` for the value shapes `shapes` (TilePlan.shapes): a map of at
    most `in_memory_values` values, or one that reaches the output through pointwise calls
    only, stays in memory."""
    last_use = {}
    for index, op in enumerate(plan.ops):
        for name in op_sources(op):
            last_use[name] = index
    last_use[plan.output] = len(plan.ops)
    feeds_output = output_feeders(plan)
    stores_of, writes, in_memory, closes, opened = {plan.input: {INPUT}}, {}, {}, [], []
    moments = {op.name: [] for op in plan.ops if isinstance(op, Conv)}
    for index, op in enumerate(plan.ops):
        name = op.name
        needed = set().union(*(stores_of[source] for source in op_sources(op)))
        if isinstance(op, Norm) and op.source in moments:
            moments[op.source].append(name)  # (gathered while the convolution writes)
        if isinstance(op, Conv) or (isinstance(op, Pointwise) and (
                len(needed) > 1 or name == plan.output)):
            key = name if isinstance(op, Conv) else reusable_store(
                name, index, needed, shapes, stores_of, last_use)
            if key == name:
                opened.append(key)
                in_memory[key] = name in feeds_output or \
                    math.prod(shapes[name]) <= in_memory_values
            writes[name], stores_of[name] = key, {key}
        else:  # read through: a constant, a normalisation, a call on one stored map
            stores_of[name] = needed
        alive = set().union(*(keys for value, keys in stores_of.items()
                              if last_use.get(value, -1) > index))
        closes.append([key for key in opened if key not in alive])
        opened = [key for key in opened if key in alive]
    return Schedule(writes, in_memory, closes, moments)


def op_sources(op):
    if isinstance(op, Conv):
        return (op.source,)
    if isinstance(op, Norm):
        return (op.source,)
    if isinstance(op, Pointwise):
        return op.sources
    return ()


def output_feeders(plan):
    """The names whose value reaches the output through pointwise calls only."""
    ops, feeders, pending = {op.name: op for op in plan.ops}, set(), [plan.output]
    while pending:
        name = pending.pop()
        if name in feeders or name not in ops:
            continue
        feeders.add(name)
        if isinstance(ops[name], (Pointwise, Norm)):
            pending.extend(op_sources(ops[name]))
    return feeders


def reusable_store(name, index, needed, shapes, stores_of, last_use):
    """A store among `needed` that no value still to be read needs and that has the shape of
    `name`'s value (written over in place, tile by tile), else `name` (a new store)."""
    for key in sorted(needed - {INPUT}):
        holders = [value for value, keys in stores_of.items()
                   if key in keys and last_use.get(value, -1) > index]
        if not holders and shapes[key] == shapes[name]:
            return key
    return name


# ----------------------------------------------------------------------------------------
# Running a plan
# ----------------------------------------------------------------------------------------


def tiled_generate(G, input, tile_size, precision=None, tmp_dir=None, desc=None, multiple=16):
    """G on a (B, C, H, W) input whose H and W are multiples of 2**n_downsample, in tiles
    of tile_size x tile_size pixels (`tiles`): the output of G(input) (to float rounding;
    README "Full-resolution images"), holding only tiles in memory besides the input and
    the output. Returns (B, C_out, H, W) float32 on the input's device. UserError when the
    network has a call the tiled path cannot split. `multiple`: what the network's strides
    need the image's sides to be a multiple of (2**n_downsample)."""
    plan = checked_plan(G, input, multiple)
    return torch.cat([run_plan(plan, sample, tile_size, precision, tmp_dir, desc)
                      for sample in input.split(1)])


def run_plan(plan, input, tile_size, precision=None, tmp_dir=None, desc=None):
    """`tiled_generate` of one sample (1, C, H, W) by its TilePlan."""
    device = input.device
    shapes = plan.shapes(tuple(input.shape[1:]))
    plan_of = schedule(plan, shapes, tile_size * tile_size * shapes[plan.input][0] // 4)
    sides = {name: tile_side(tile_size, level_of(input.shape[2], shape[1]))
             for name, shape in shapes.items()}
    with TemporaryStores(tmp_dir, device) as stores, \
            tqdm(total=tile_count(plan, plan_of, shapes, sides), desc=desc, unit='tile',
                 leave=False, disable=None, delay=PROGRESS_DELAY) as bar:
        run = Run(plan, plan_of, shapes, sides, stores, device, precision, bar)
        run.values[plan.input] = Stored(MemoryStore(input.float()))
        try:
            for index, op in enumerate(plan.ops):
                run.op(op)
                for key in plan_of.closes[index]:
                    run.opened.pop(key).close()
                return_freed_memory()  # the next layer's tiles have other shapes
            return run.output()
        except OSError as error:  # a full disk, or a store that cannot be read back
            raise temporary_disk_error(stores.folder, error) from None


def tile_count(plan, plan_of, shapes, sides):
    """The tiles a pass writes or reads for statistics (the progress bar's total)."""
    gathered = {name for names in plan_of.moments.values() for name in names}
    passes = [op.name for op in plan.ops if op.name in plan_of.writes or (
        isinstance(op, Norm) and op.name not in gathered)]
    return sum(len(tiles(shapes[name], sides[name])) for name in passes)


class Run:
    """The values of one sample's pass, op by op (`run_plan`)."""

    def __init__(self, plan, plan_of, shapes, sides, stores, device, precision, bar):
        self.plan, self.schedule, self.shapes, self.sides = plan, plan_of, shapes, sides
        self.stores, self.device, self.precision, self.bar = stores, device, precision, bar
        self.values, self.opened, self.moments = {}, {}, {}

    def op(self, op):
        if isinstance(op, Constant):
            self.values[op.name] = Fixed(op.tensor.to(self.device))
        elif isinstance(op, Conv):
            self.values[op.name] = Stored(self.convolve(op))
        elif isinstance(op, Norm):
            moments = self.moments.pop(op.name, None) or self.gather(op.source)
            self.values[op.name] = normalised(self.values[op.source], op.norm, moments,
                                              self.device)
        else:
            value = Lazy(op, {name: self.values[name] for name in op.sources},
                         self.shapes[op.name])
            if op.name in self.schedule.writes:
                value = Stored(self.write(op.name, value))
            self.values[op.name] = value

    def store(self, name):
        """The store the schedule gives `name`'s value: a new one, or one written over."""
        key = self.schedule.writes[name]
        if key not in self.opened:
            self.opened[key] = self.stores.new(self.shapes[name], self.schedule.in_memory[key])
        return self.opened[key]

    def convolve(self, op):
        """Every tile of the convolution `op` into its store; the moments of the
        InstanceNorms of its output are gathered on the way."""
        source, target = self.values[op.source], self.store(op.name)
        moments = [self.moments.setdefault(name, ChannelMoments())
                   for name in self.schedule.moments[op.name]]
        step, plans = op.step, {}

        def plan(axis, span):
            if (axis, *span) not in plans:
                plans[(axis, *span)] = axis_plan(step, axis, source.shape[axis + 1], *span,
                                                 self.device)
            return plans[(axis, *span)]

        layout = memory_format(self.device)  # (what the network's layers get on the device)
        for rows, cols in tiles(target.shape, self.sides[op.name]):
            row_plan, col_plan = plan(0, rows), plan(1, cols)
            tile = step_input(step, source.read(row_plan[:2], col_plan[:2], self.device),
                              row_plan, col_plan).contiguous(memory_format=layout)
            with self.autocast():
                out = step.run(tile)
            del tile
            out = out[..., row_plan.crop:row_plan.crop + rows[1] - rows[0],
                      col_plan.crop:col_plan.crop + cols[1] - cols[0]].float()
            for moment in moments:
                moment.add(out)
            target.write(rows[0], cols[0], out)
            self.bar.update()
        return target

    def autocast(self):
        return self.precision.autocast() if self.precision is not None else \
            contextlib.nullcontext()

    def gather(self, name):
        """The moments of `name`'s value, read tile by tile."""
        moments = ChannelMoments()
        for rows, cols in tiles(self.shapes[name], self.sides[name]):
            moments.add(self.values[name].read(rows, cols, self.device).float())
            self.bar.update()
        return moments

    def write(self, name, value):
        """`value` into `name`'s store, tile by tile (a tile is read whole before it is
        written, so a store read by `value` may be written over)."""
        target = self.store(name)
        for rows, cols in tiles(self.shapes[name], self.sides[name]):
            target.write(rows[0], cols[0], value.read(rows, cols, self.device).float())
            self.bar.update()
        return target

    def output(self):
        """The result as a (1, C, H, W) tensor."""
        value = self.values[self.plan.output]
        if isinstance(value, Stored) and isinstance(value.store, MemoryStore) and \
                self.schedule.writes.get(self.plan.output) is not None:
            return value.store.tensor
        shape = self.shapes[self.plan.output]
        out = MemoryStore(torch.empty((1, *shape), device=self.device))
        for rows, cols in tiles(shape, self.sides[self.plan.output]):
            out.write(rows[0], cols[0], value.read(rows, cols, self.device).float())
        return out.tensor


# ----------------------------------------------------------------------------------------
# The plan of a network, checked once against its whole-image output
# ----------------------------------------------------------------------------------------

# {network: its TilePlan, or the CannotTile it raised}: a network is traced and checked once.
_checked = weakref.WeakKeyDictionary()


def not_tileable_error(reason):
    return UserError(f"this network has a call the tiled path cannot split: {reason}; run "
                     f"it whole (leave out --tile_size), or change the network (README "
                     f"\"Full-resolution images\", What can be tiled)")


def plan_or_reason(G):
    """(TilePlan, None) of the bare network G, or (None, why it cannot be tiled)."""
    try:
        return tile_plan(G), None
    except CannotTile as error:
        return None, str(error)


def checked_plan(G, input, multiple):
    """The TilePlan of G (or of the network a wrapper holds), checked once per network by
    `check_tiles_agree` on a small image like `input`; UserError when it cannot be tiled."""
    G = bare(G)
    if G not in _checked:
        plan, reason = plan_or_reason(G)
        if plan is not None:
            reason = check_tiles_agree(G, plan, input, multiple)
        _checked[G] = plan if reason is None else CannotTile(reason)
    if isinstance(_checked[G], CannotTile):
        raise not_tileable_error(_checked[G])
    return _checked[G]


def check_tiles_agree(G, plan, like, multiple):
    """None when the plan's tiles reproduce G's whole-image output on a small random image
    of 3 x 3 tiles of `multiple` pixels (like `like` in its channels and device), else why
    not: a guard against a call the plan reads differently from the network."""
    difference = difference_from_forward(G, lambda x: run_plan(plan, x, multiple), like,
                                         multiple)
    if not difference <= AGREEMENT:
        return (f'its tiles differ from the whole image by {difference:.2g} of the output\'s '
                f'range on a test image')
    return None


def difference_from_forward(G, compute, like, multiple):
    """The largest |compute(x) - G(x)| over the range of G(x), in inference, for a random
    image x of 3 x 3 multiples of `multiple` pixels with the channels and device of `like`:
    how a path that computes G another way (the tiles, the whole-image pass) is checked
    once per network."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, like.shape[1], 3 * multiple, 3 * multiple),
                    generator=generator).to(like.device)
    with torch.inference_mode():
        expected = G(x).float()
        got = compute(x.clone()).float()
    span = float(expected.max() - expected.min()) or 1.0
    return float((got - expected).abs().max()) / span


def convolve_in_bands(step, x, rows):
    """The convolution of `step` (a ConvStep: its padding and upsampling included) over x
    (B, C, H, W), computed in bands of `rows` output rows: each band from the input rows it
    needs, padded at the image's border as the whole map is, so that the padded (or
    upsampled) map itself is never made. The whole-image pass uses it for a large map
    (machinery/whole_image.py)."""
    shape = step.output_shape(tuple(x.shape[1:]))
    out = x.new_empty((x.shape[0], *shape))
    col_plan = axis_plan(step, 1, x.shape[3], 0, shape[2], x.device)
    for start in range(0, shape[1], rows):
        stop = min(start + rows, shape[1])
        row_plan = axis_plan(step, 0, x.shape[2], start, stop, x.device)
        band = step_input(step, x[:, :, row_plan.start:row_plan.stop,
                                  col_plan.start:col_plan.stop], row_plan, col_plan)
        result = step.run(band)
        out[:, :, start:stop] = result[:, :, row_plan.crop:row_plan.crop + stop - start,
                                       col_plan.crop:col_plan.crop + shape[2]]
    return out
