"""Seconds to load one training pair from an SDOMLv2 store against the same pair from FITS
files (BENCHMARKS.md "Loading SDOML pairs").

    python benchmarks/sdoml_loading.py [--workdir DIR] [--size 512] [--months 4] [--days 10]
        [--frames 3] [--workers 0 2] [--crop_sizes 0 256] [--epochs 3]
        [--attribute_frames 87600] [--json PATH]

The data (in a temporary folder, or --workdir, where a later run with the same data options
reuses them): an AIA store (171A 193A 304A) and an HMI store (Bx By Bz) of --size px float32
frames with SDOMLv2's layout and chunking (datasets/make_sdoml_sample.py: year groups,
frames out of time order, 15 frames a chunk, Blosc zstd with bit shuffle; its toy Sun, with
each frame's noise), --months x --days x --frames HMI frames (120 by default) and two AIA
frames of each passband per HMI frame; the pairs of the stores written as FITS files, as the
files equivalent to a StoreDataset (tests/test_sdoml_runs.py: 3 x H x W input cubes with the
171A frame's header, Bz targets, named by time); and the stores' copy with 1 frame a chunk
(datasets/rechunk_sdoml.py).

What is timed is what training runs: the options parsed by pix2pixCC_Options.TrainOption
(the folder options, or --sdoml_input/--sdoml_target with the arrays), the dataset of
machinery/sdoml_data.make_dataset (a CustomDataset of the files, a StoreDataset of the
stores) and the DataLoader of pix2pixCC_Train.make_loader (its EpochSampler: every pair once
an epoch in a random order, batch size 1; --n_workers loading processes, started anew each
epoch as in training), with the README's SDOML scaling, whole frames (--crop_size 0) or
random windows (--crop_size N: only the window is read, from the chunks that hold it). The
figure of an epoch is its seconds per pair once its first pair is there (the loading itself;
the workers' start and the stores' opening, once an epoch, are the seconds to the first pair,
reported beside it: over this benchmark's 120 pairs they would weigh more than over a real
store's thousands); the three sources take turns, --epochs epochs each, and the medians are
reported, with the share of the CPUs other processes used meanwhile.
The data are read from the page cache (written just before): what is measured is decoding
and the readers' own work, not the disk. Before timing, the first items of the three datasets
are checked to be equal (the same pairs, windows and values).

Then the cost of the metadata: opening an array makes zarr read its .zarray and .zattrs, and
an SDOMLv2 array's .zattrs holds a year of header lists; sdoml.Store opens each array once
per process and keeps it. `measure_attributes` times, on an array of --attribute_frames tiny
frames with the sample's header keys, a fresh Store's first read (the opening) and its later
reads, against reads through a zarr array handle of its own.

Prints a table and writes --json (default benchmarks/results/sdoml-loading-<cpu>.json).
"""
import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import types

# common also puts the repository on sys.path, for the pix2pixCC_* modules
from common import REPO, Interference, machine

AIA = ['171A', '193A', '304A']
# The README's scaling of the SDOML sample ("Training on SDOML")
SCALING = ['--logscale_input', 'True', '--saturation_lower_limit_input', '50', '100', '1',
           '--saturation_upper_limit_input', '6000', '8000', '200',
           '--saturation_lower_limit_target', '-3000', '--saturation_upper_limit_target', '3000']
SOURCES = ('fits', 'store', 'rechunked')
LABELS = {'fits': 'FITS files', 'store': 'store, 15-frame chunks',
          'rechunked': 'store, 1-frame chunks'}


def load_script(name):
    """A script of datasets/ (a folder of scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'datasets',
                                                                      name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def folder_mb(path):
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names) / 1e6


def write_fits(path, data, cards):
    """`data` as a FITS file with a frame's `cards` (its NAXISn left to the data), as
    tests/test_sdoml_runs.py writes the files equivalent to a store's pairs."""
    from astropy.io import fits
    header = fits.Header({key: value for key, value in cards.items()
                          if not key.startswith('NAXIS')})
    fits.PrimaryHDU(data, header=header).writeto(path)


def make_data(work, args):
    """The stores, their 1-frame copy and the FITS pairs under `work` (kept from an earlier
    run with the same data options); {name: path} and what making them took."""
    from machinery import sdoml
    data = {'options': {k: getattr(args, k) for k in ('size', 'months', 'days', 'frames',
                                                      'chunk', 'first_month')}}
    made = os.path.join(work, 'made.json')
    if os.path.exists(made):
        with open(made) as f:
            kept = json.load(f)
        if kept.get('options') == data['options']:
            print(f'reusing the data of {work}')
            return kept
        sys.exit(f'{work} holds data made with other options ({made}); give another --workdir')
    maker, rechunker = load_script('make_sdoml_sample'), load_script('rechunk_sdoml')
    start = time.perf_counter()
    stores = maker.make_stores(os.path.join(work, 'stores'), args.size, args.first_month,
                               args.months, args.days, args.frames, AIA, chunk=args.chunk)
    data['make_stores_s'] = time.perf_counter() - start
    start = time.perf_counter()
    copies = [os.path.join(work, 'rechunked', os.path.basename(store)) for store in stores]
    os.makedirs(os.path.dirname(copies[0]))
    for store, copy in zip(stores, copies, strict=True):
        rechunker.rechunk(store, copy, 1)
    data['rechunk_s'] = time.perf_counter() - start
    start = time.perf_counter()
    files = {role: os.path.join(work, 'fits', role) for role in ('Input', 'Target')}
    for folder in files.values():
        os.makedirs(folder)
    pairs = sdoml.pair_frames(copies[0], AIA, copies[1], 'Bz').pairs
    for pair in pairs:  # (read from the copy: the same data, faster)
        pair_data = sdoml.read_pair(copies[0], copies[1], pair)
        name = pair.datetime.strftime('%Y%m%d_%H%M%S') + '.fits'
        write_fits(os.path.join(files['Input'], name), pair_data.input, pair_data.input_header)
        write_fits(os.path.join(files['Target'], name), pair_data.target[0],
                   pair_data.target_header)
    data['write_fits_s'] = time.perf_counter() - start
    data.update(pairs=len(pairs), aia=stores[0], hmi=stores[1], aia_rechunked=copies[0],
                hmi_rechunked=copies[1], fits_input=files['Input'], fits_target=files['Target'])
    data['mb'] = {'store': folder_mb(os.path.join(work, 'stores')),
                  'rechunked': folder_mb(os.path.join(work, 'rechunked')),
                  'fits': folder_mb(os.path.join(work, 'fits'))}
    with open(made, 'w') as f:
        json.dump(data, f, indent=2)
    return data


def source_argv(source, data):
    """The options that name the data of `source`, as a user gives them."""
    if source == 'fits':
        return ['--input_ch', '3', '--data_format_input', 'fits', '--data_format_target', 'fits',
                '--input_dir_train', data['fits_input'], '--target_dir_train',
                data['fits_target']]
    suffix = '_rechunked' if source == 'rechunked' else ''
    return ['--sdoml_input', data['aia' + suffix], '--sdoml_target', data['hmi' + suffix],
            '--sdoml_input_arrays', *AIA, '--sdoml_target_arrays', 'Bz']


def loader_of(source, data, crop_size, workers, seed):
    """(dataset, DataLoader) of `source` as the training script makes them."""
    import torch

    from machinery.sdoml_data import make_dataset
    from pix2pixCC_Options import TrainOption
    from pix2pixCC_Train import make_loader
    opt = TrainOption().parse(['--gpu_ids', '-1', '--batch_size', '1', '--seed', str(seed),
                               '--n_workers', str(workers), '--crop_size', str(crop_size),
                               *SCALING, *source_argv(source, data)])
    dataset = make_dataset(opt, log=lambda line: None)
    cluster = types.SimpleNamespace(world_size=1, rank=0)  # one process, as a plain run
    return dataset, make_loader(dataset, opt, cluster, torch.device('cpu'))


def check_same_items(datasets, seed):
    """The first items of the datasets are equal: the same pairs, windows and values."""
    import torch
    n = {len(dataset) for dataset in datasets.values()}
    if len(n) != 1:
        sys.exit(f'the sources hold different numbers of pairs: {n}')
    for index in (0, len(datasets['fits']) // 2):
        items = {source: dataset[(index, seed + index)] for source, dataset in datasets.items()}
        for source, (x, y) in items.items():
            if not (torch.equal(x, items['fits'][0]) and torch.equal(y, items['fits'][1])):
                sys.exit(f'item {index} of {source} differs from the FITS files\' one')


def epoch_seconds(loader, epoch):
    """One epoch of `loader` (its workers started and ended inside): seconds per pair once
    the first pair is there (the loading itself: `per_pair`), seconds to the first pair
    (workers starting, stores opened: `first_s`), and the epoch's seconds per pair."""
    loader.sampler.set_epoch(epoch)
    start, first, n = time.perf_counter(), None, 0
    for x, _ in loader:
        n += x.shape[0]
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {'per_pair': (end - first) / max(1, n - 1), 'first_s': first - start,
            'epoch_per_pair': (end - start) / n}


def measure(data, args):
    """{crop_size: {workers: {source: figures}}}, each source's epochs taking turns."""
    results = {}
    for crop_size in args.crop_sizes:
        for workers in args.workers:
            loaders = {source: loader_of(source, data, crop_size, workers, args.seed)
                       for source in SOURCES}
            check_same_items({source: dataset for source, (dataset, _) in loaders.items()},
                             args.seed)
            for _, loader in loaders.values():  # (imports and first reads: not timed)
                for k, _ in enumerate(loader):
                    if k == 2:
                        break
            epochs = {source: [] for source in SOURCES}
            shares = {source: [] for source in SOURCES}
            for epoch in range(args.epochs):
                for source, (_, loader) in loaders.items():
                    monitor = Interference().start()
                    epochs[source].append(epoch_seconds(loader, epoch))
                    shares[source].append(monitor.stop())
            row = {source: {key: statistics.median(e[key] for e in epochs[source])
                            for key in ('per_pair', 'first_s', 'epoch_per_pair')}
                   for source in SOURCES}
            for source in SOURCES:
                row[source].update(
                    epochs=epochs[source], interference=shares[source],
                    ratio_to_fits=row[source]['per_pair'] / row['fits']['per_pair'],
                    epoch_ratio_to_fits=(row[source]['epoch_per_pair'] /
                                         row['fits']['epoch_per_pair']))
            results.setdefault(str(crop_size), {})[str(workers)] = row
            print_row(crop_size, workers, row, args.size)
    return results


def measure_attributes(work, args):
    """Seconds of Store.read_frame on an array whose attributes hold --attribute_frames
    frames' header lists (a year of AIA at its 6-minute cadence by default; tiny 8 x 8
    frames, so that the data cost nothing), against reading the same frames through an
    array handle held open: what opening the array's metadata (.zarray, .zattrs) costs each
    read."""
    import datetime

    import numpy as np

    from machinery import sdoml
    maker = load_script('make_sdoml_sample')
    path = os.path.join(work, 'attributes.zarr')
    n = args.attribute_frames
    if not os.path.exists(path):
        first = datetime.datetime(2011, 1, 1, 0, 0, 9)
        headers = [maker.aia_header(args.size, '171A', first + datetime.timedelta(minutes=6 * i))
                   for i in range(n)]
        maker.write_store(path, {'2011': {'171A': (np.zeros((n, 8, 8), np.float32),
                                                   maker.attribute_lists(headers))}})
    indices = np.random.default_rng(args.seed).integers(0, n, 5).tolist()
    sdoml.Store(path).read_frame('171A', '2011', indices[0])  # (imports: not timed)
    store = sdoml.Store(path)
    start = time.perf_counter()
    store.read_frame('171A', '2011', indices[0])  # opens the array: its metadata are read
    opening = time.perf_counter() - start
    times = []
    for index in indices:
        start = time.perf_counter()
        store.read_frame('171A', '2011', index)
        times.append(time.perf_counter() - start)
    array = store.root['2011']['171A']
    held = []
    for index in indices:
        start = time.perf_counter()
        np.asarray(array[index], dtype=np.float32)
        held.append(time.perf_counter() - start)
    result = {'frames': n, 'keys': len(store.attributes('171A', '2011')),
              'zattrs_mb': os.path.getsize(os.path.join(path, '2011', '171A', '.zattrs')) / 1e6,
              'first_read_s': opening,
              'read_frame_s': statistics.median(times), 'read_frame_times': times,
              'held_array_s': statistics.median(held)}
    print(f"Store.read_frame of an 8x8 frame from an array with {n} frames' attributes "
          f"({result['keys']} keys, .zattrs {result['zattrs_mb']:.1f} MB): "
          f"the first (opening the array) {result['first_read_s']:.2f} s, then "
          f"{result['read_frame_s'] * 1e3:.2f} ms (median of {len(times)}); through a zarr "
          f"array handle: {result['held_array_s'] * 1e3:.2f} ms", flush=True)
    return result


def print_row(crop_size, workers, row, size):
    frames = f'{crop_size} px windows' if crop_size else f'{size} px, whole'
    cells = [f"{row['fits']['per_pair'] * 1e3:.1f} ms"]
    for source in SOURCES[1:]:
        cells.append(f"{row[source]['per_pair'] * 1e3:.1f} ms "
                     f"({row[source]['ratio_to_fits']:.2f}x)")
    first = ' / '.join(f"{row[source]['first_s']:.2f}" for source in SOURCES)
    others = max(share or 0 for figures in row.values() for share in figures['interference'])
    print(f'| {frames} | {workers} | ' + ' | '.join(cells) + f' | {first} | {others:.0%} |',
          flush=True)


def cpu_name(info):
    name = re.sub(r'[^a-z0-9]+', '-', info['cpu'].lower()).strip('-')
    return f"{name}-{info['cpu_count']}core"


def parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--workdir', default=None,
                   help='folder for the data, kept (default: a temporary folder, removed)')
    p.add_argument('--size', type=int, default=512, help='frame height and width (px)')
    p.add_argument('--months', type=int, default=4, help='months of frames')
    p.add_argument('--days', type=int, default=10, help='observing days a month')
    p.add_argument('--frames', type=int, default=3, help='HMI frames a day')
    p.add_argument('--first_month', default='2011-11', help='first month (YYYY-MM)')
    p.add_argument('--chunk', type=int, default=15, help="frames a chunk of the stores")
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2],
                   help='--n_workers values')
    p.add_argument('--crop_sizes', type=int, nargs='+', default=[0, 256],
                   help='--crop_size values (0: whole frames)')
    p.add_argument('--epochs', type=int, default=3, help='timed epochs of each source')
    p.add_argument('--seed', type=int, default=1, help="the run's --seed (order, windows)")
    p.add_argument('--attribute_frames', type=int, default=87600,
                   help="frames' attributes of the array whose metadata cost is timed "
                        "(87600: a year at AIA's 6-minute cadence; 0: not timed)")
    p.add_argument('--json', default=None,
                   help='write the results here (default: '
                        'benchmarks/results/sdoml-loading-<cpu>.json)')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    import numcodecs
    import torch
    import zarr
    info = machine()
    info.update(zarr=zarr.__version__, numcodecs=numcodecs.__version__,
                blosc_threads=numcodecs.blosc.get_nthreads())
    print(f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} "
          f"({torch.get_num_threads()} threads), zarr {info['zarr']}, numcodecs "
          f"{info['numcodecs']}, load average {info['load_average']}", flush=True)
    work = args.workdir or tempfile.mkdtemp(prefix='sdoml-loading-')
    os.makedirs(work, exist_ok=True)
    try:
        start = time.perf_counter()
        data = make_data(work, args)
        print(f"data: {data['pairs']} pairs of {args.size} px; stores {data['mb']['store']:.0f} "
              f"MB, 1-frame copy {data['mb']['rechunked']:.0f} MB, FITS "
              f"{data['mb']['fits']:.0f} MB ({time.perf_counter() - start:.0f} s)", flush=True)
        print('| frames | workers | ' + ' | '.join(LABELS[s] for s in SOURCES) +
              ' | first pair, s | others |\n|---|---:|---:|---:|---:|---:|---:|', flush=True)
        results = measure(data, args)
        attributes = measure_attributes(work, args) if args.attribute_frames else None
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    path = args.json or os.path.join(REPO, 'benchmarks', 'results',
                                     f'sdoml-loading-{cpu_name(info)}.json')
    config = {k: v for k, v in vars(args).items() if k != 'json'}
    with open(path, 'w') as f:
        json.dump({'machine': info, 'config': config, 'command': ' '.join(sys.argv),
                   'data': {k: v for k, v in data.items() if k.endswith(('_s', 'mb', 'pairs'))},
                   'results': results, 'attributes': attributes}, f, indent=2)
    print(f'written: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
