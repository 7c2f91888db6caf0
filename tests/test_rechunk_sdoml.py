"""datasets/rechunk_sdoml.py (README "Training on SDOML"): the copy of a store holds the same
year groups, arrays, data and attributes in chunks of the frames asked for, zarr format 2
with Blosc zstd bit shuffle, and pairs as the original does; an existing DST, a SRC that is
not a store and a bad --frames_per_chunk are one line and exit status 2, with nothing
written."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip('zarr', reason='SDOMLv2 stores need zarr 3 (Python 3.11 or newer): '
                    'pip install -r requirements-sdoml.txt')

from conftest import (REPO, SUBPROCESS_ENV, assert_usage_error, load_script,  # noqa: E402
                      snapshot)
from machinery import sdoml  # noqa: E402
from pix2pixCC_Options import run_main  # noqa: E402

SCRIPT = os.path.join(REPO, 'datasets', 'rechunk_sdoml.py')
AIA = ['171A', '193A', '304A']


maker = load_script('datasets/make_sdoml_sample.py')
script = load_script('datasets/rechunk_sdoml.py')


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
    """(aia.zarr, hmi.zarr): 32 px, 15 frames a chunk, two year groups, one 304A gap."""
    return tuple(str(path) for path in maker.make_stores(
        tmp_path_factory.mktemp('sdoml'), size=32, months=3, days=2, frames=3, missing=1))


def rechunk(*argv):
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv)], env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=60)


def rechunk_here(capsys, *argv):
    """The script in this process (faster than a new one): (returncode, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = run_main(script.main, [*map(str, argv)])
    except SystemExit as exit:  # (argparse's refusals)
        code = exit.code
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def members(group):
    """{path: (is a group, attributes, array or None)} of every member under `group`."""
    import zarr
    found = {}
    for name, member in group.members(max_depth=None):
        is_group = isinstance(member, zarr.Group)
        found[name] = (is_group, member.attrs.asdict(), None if is_group else member)
    return found


@pytest.mark.parametrize('frames_per_chunk', [1, 4])
def test_the_copy_holds_the_store_in_the_chunks_asked_for(stores, tmp_path, frames_per_chunk):
    import zarr
    from numcodecs import Blosc
    for source in stores:
        copy = tmp_path / os.path.basename(source)
        proc = rechunk(source, copy, '--frames_per_chunk', frames_per_chunk)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f'wrote {copy}: ') and 'in 2 year groups' in proc.stdout
        assert not [name for name in os.listdir(tmp_path) if '.partial-' in name]
        original, rechunked = (zarr.open_group(path, mode='r') for path in (source, copy))
        assert rechunked.metadata.zarr_format == 2
        assert rechunked.attrs.asdict() == original.attrs.asdict()
        before, after = members(original), members(rechunked)
        assert sorted(before) == sorted(after) and len(before) > 2
        for name, (is_group, attributes, array) in before.items():
            assert after[name][:2] == (is_group, attributes), name
            if array is None:
                continue
            copied = after[name][2]
            assert copied.metadata.zarr_format == 2
            assert copied.chunks == (frames_per_chunk, 32, 32)
            assert copied.dtype == array.dtype and copied.shape == array.shape
            compressor = copied.metadata.compressor
            assert (compressor.cname, compressor.shuffle) == ('zstd', Blosc.BITSHUFFLE)
            np.testing.assert_array_equal(copied[...], array[...])
    # pairing the copies gives the original's pairs, and the same data
    copies = [str(tmp_path / os.path.basename(source)) for source in stores]
    pairs = sdoml.pair_frames(stores[0], AIA, stores[1], 'Bz')
    again = sdoml.pair_frames(copies[0], AIA, copies[1], 'Bz')
    assert pairs.pairs == again.pairs and len(pairs.pairs) == 3 * 2 * 3 - 1
    for pair in pairs.pairs[:3]:
        a, b = sdoml.read_pair(*stores, pair), sdoml.read_pair(*copies, pair)
        np.testing.assert_array_equal(a.input, b.input)
        np.testing.assert_array_equal(a.target, b.target)
        assert (a.input_header, a.target_header) == (b.input_header, b.target_header)


def test_bad_sources_and_destinations_are_one_line(stores, tmp_path, capsys):
    held = tmp_path / 'held'
    held.mkdir()
    before = snapshot(tmp_path, with_dirs=True)
    for argv, fragment in [((stores[0], held), 'held exists'),
                           ((tmp_path / 'nowhere', tmp_path / 'copy'), 'no such folder'),
                           ((held, tmp_path / 'copy'), 'not a zarr store'),
                           ((stores[1], tmp_path / 'copy', '--frames_per_chunk', 0),
                            '--frames_per_chunk 0'),
                           ((stores[1], tmp_path / 'copy', '--frames_per_chunk', 'x'),
                            'invalid int value'),
                           ((stores[1], os.path.join(stores[1], 'copy')), 'inside')]:
        assert_usage_error(rechunk_here(capsys, *argv), fragment)
    assert_usage_error(rechunk(stores[0], held), 'held exists')  # (the command itself)
    assert snapshot(tmp_path, with_dirs=True) == before
    assert not os.path.exists(os.path.join(stores[1], 'copy'))


def test_a_source_chunk_larger_than_the_memory_bound_is_read_in_parts(stores, tmp_path,
                                                                      monkeypatch, capsys):
    """With room for 2 frames at a time (MAX_SLAB_BYTES), the 15-frame chunks are read 2
    frames at a time into chunks of 3: the same data."""
    import zarr
    monkeypatch.setattr(script, 'MAX_SLAB_BYTES', 2 * 32 * 32 * 4)
    reads = []
    original = zarr.Array.__getitem__

    def recorded(array, selection):
        reads.append(selection)
        return original(array, selection)

    monkeypatch.setattr(zarr.Array, '__getitem__', recorded)
    proc = rechunk_here(capsys, stores[1], tmp_path / 'copy', '--frames_per_chunk', 3)
    assert proc.returncode == 0, proc.stderr
    slabs = [s.stop - s.start for s in reads if isinstance(s, slice)]
    assert slabs and max(slabs) == 2
    monkeypatch.undo()
    source, copy = (zarr.open_group(path, mode='r') for path in (stores[1], tmp_path / 'copy'))
    for year in ('2011', '2012'):
        assert copy[year]['Bz'].chunks == (3, 32, 32)
        np.testing.assert_array_equal(copy[year]['Bz'][...], source[year]['Bz'][...])
