"""machinery/sdoml.py on SDOMLv2 stores that datasets/make_sdoml_sample.py writes (the real
stores' layout: zarr format 2, year groups, a list of one value per frame for each header
key, frames out of time order, HMI times in TAI) and on small stores written here frame by
frame: pairing by time (nearest within the tolerance, TAI to UTC, every input passband
required, a frame used once, missing frames reported, the skip list), the split by months
with a gap, windows read from the chunks, headers, pair lists kept as JSON, every error as
one line naming what is wrong, and stores never written to.
"""
import dataclasses
import datetime
import json
import os
import sys

import numpy as np
import pytest
from astropy.io import fits

pytest.importorskip('zarr', reason='SDOMLv2 stores need zarr 3 (Python 3.11 or newer): '
                    'pip install -r requirements-sdoml.txt')

from conftest import load_script, snapshot  # noqa: E402
from machinery import sdoml  # noqa: E402
from pix2pixCC_Options import UserError  # noqa: E402

maker = load_script('datasets/make_sdoml_sample.py')

AIA = ['171A', '193A', '304A']
HMI = ['Bx', 'By', 'Bz']
# The sample's 12 HMI frames: 1 November 2011 to 1 February 2012, 3 a day (00, 08, 16 TAI);
# the 7th (2012.01.01_00:00:00_TAI, 23:59:26 UTC on 31 December) has no 304A frame.
SAMPLE = dict(size=32, first_month='2011-11', months=4, days=1, frames=3, missing=1)
UNPAIRED = '2011-12-31T23:59:26.000'


@pytest.fixture(scope='module')
def sample(tmp_path_factory):
    """(aia.zarr, hmi.zarr) of SAMPLE."""
    return maker.make_stores(tmp_path_factory.mktemp('sdoml'), **SAMPLE)


@pytest.fixture(scope='module')
def pairing(sample):
    return sdoml.pair_frames(sample[0], AIA, sample[1], HMI)


def frames_store(path, arrays, size=8, frames=None):
    """A store of `arrays` {year: {array: {attribute: [values]}}}; frame k of an array is
    filled with k + 0.5; `frames`: their number when not that of the first attribute."""
    content = {}
    for year, named in arrays.items():
        for name, attributes in named.items():
            n = frames or len(next(iter(attributes.values())))
            data = np.arange(n, dtype=np.float32)[:, None, None] + np.full((size, size), 0.5)
            content.setdefault(year, {})[name] = (data, attributes)
    return maker.write_store(path, content)


def times_store(path, name, times, size=8):
    """A store of one array whose frames have the T_OBS `times` (years from the strings)."""
    arrays = {}
    for time in times:
        year = time[:4]
        arrays.setdefault(year, {}).setdefault(name, {'T_OBS': []})['T_OBS'].append(time)
    return frames_store(path, arrays, size)


def message(call, *args, **kwargs):
    with pytest.raises(UserError) as error:
        call(*args, **kwargs)
    text = str(error.value)
    assert '\n' not in text
    return text


def test_the_sample_has_the_sdomlv2_layout(sample):
    import zarr
    aia, hmi = (zarr.open_group(path, mode='r') for path in sample)
    assert sorted(aia.group_keys()) == sorted(hmi.group_keys()) == ['2011', '2012']
    array = aia['2011']['171A']
    assert array.metadata.zarr_format == 2 and array.chunks[0] == 15
    with open(os.path.join(sample[0], '2011', '171A', '.zarray')) as f:
        compressor = json.load(f)['compressor']
    assert (compressor['id'], compressor['cname'], compressor['shuffle']) == ('blosc', 'zstd', 2)
    keys = {'T_OBS', 'DATE-OBS', 'WAVELNTH', 'EXPTIME', 'CDELT1', 'CDELT2', 'CRPIX1', 'CRPIX2',
            'CRVAL1', 'CRVAL2', 'CTYPE1', 'CTYPE2', 'CUNIT1', 'CUNIT2', 'R_SUN', 'RSUN_OBS',
            'DSUN_OBS', 'BUNIT', 'TELESCOP', 'INSTRUME', 'NAXIS1', 'NAXIS2', 'DEG_COR',
            'PIXLUNIT'}
    attrs = array.attrs.asdict()
    assert keys <= set(attrs) and all(len(attrs[key]) == array.shape[0] for key in keys)
    assert attrs['T_OBS'][0].endswith('Z') and attrs['PIXLUNIT'][0] == 'DN/s'
    bz = hmi['2011']['Bz']
    assert bz.attrs['T_OBS'][0].endswith('_TAI') and bz.shape[1:] == (32, 32)
    assert bz.attrs['T_OBS'] == hmi['2011']['Bx'].attrs['T_OBS']  # one record, one index
    assert list(attrs['T_OBS']) != sorted(attrs['T_OBS'])  # frames out of time order
    # the disk: radius 976" at SDOMLv2's scale, CDELT = RSUN_OBS / R_SUN
    assert attrs['R_SUN'][0] == pytest.approx(32 * 976 / 2457.6)
    assert attrs['CDELT1'][0] * attrs['R_SUN'][0] == pytest.approx(attrs['RSUN_OBS'][0])
    # 304A lost the frame at the 7th HMI frame: one fewer in 2012 than 171A
    assert aia['2012']['304A'].shape[0] == aia['2012']['171A'].shape[0] - 1


def test_stores_list_their_years_and_arrays(sample):
    store = sdoml.open_store(sample[0])
    assert store.years == ['2011', '2012']
    assert store.arrays_by_year() == {'2011': AIA, '2012': AIA}


def test_pairs_come_in_time_order_with_a_frame_of_every_passband(sample, pairing):
    pairs = pairing.pairs
    assert len(pairs) == 11
    assert [p.time for p in pairs] == sorted(p.time for p in pairs)
    for pair in pairs:
        assert [f.array for f in pair.inputs] == AIA and [f.array for f in pair.targets] == HMI
        assert len({(f.year, f.index, f.time) for f in pair.targets}) == 1
        for frame in pair.inputs:
            assert abs(datetime.datetime.fromisoformat(frame.time) - pair.datetime) \
                <= datetime.timedelta(minutes=6)
    # the store's frames are not in time order, the pairs are
    indices = [p.inputs[0].index for p in pairs if p.inputs[0].year == '2011']
    assert indices != sorted(indices)
    [unpaired] = pairing.unpaired
    assert (unpaired.frame.array, unpaired.frame.time) == ('Bx', UNPAIRED)
    assert unpaired.reason == 'no 304A frame within 6 min'
    summary = pairing.summary()
    assert '11 pairs' in summary and '1 target frames unpaired' in summary
    assert f'no 304A frame within 6 min (e.g. {UNPAIRED})' in summary
    # without 304A, that frame pairs too: only the passbands asked for are required
    assert len(sdoml.pair_frames(sample[0], ['171A', '193A'], sample[1], 'Bz').pairs) == 12


def test_hmi_tai_times_pair_with_aia_utc_times(tmp_path):
    """TAI - UTC is 34 s in 2011 and 37 s since 2017: HMI at 00:00:35 TAI in 2011 is
    00:00:01 UTC, nearer AIA's 00:00:00 than 00:01:05 (the other way round as UTC)."""
    aia = times_store(tmp_path / 'aia.zarr', '171A', [
        '2011-01-01T00:01:05.00Z', '2011-01-01T00:00:00.00Z',
        '2017-06-01T00:01:00.00Z', '2017-06-01T00:00:00.00Z'])
    hmi = times_store(tmp_path / 'hmi.zarr', 'Bz', ['2017.06.01_00:00:38_TAI',
                                                    '2011.01.01_00:00:35_TAI'])
    pairs = sdoml.pair_frames(aia, '171A', hmi, 'Bz').pairs
    assert [p.time for p in pairs] == ['2011-01-01T00:00:01.000', '2017-06-01T00:00:01.000']
    assert [p.inputs[0].time for p in pairs] == ['2011-01-01T00:00:00.000',
                                                 '2017-06-01T00:00:00.000']
    assert [(p.targets[0].year, p.targets[0].index) for p in pairs] == [('2011', 0),
                                                                        ('2017', 0)]


def test_the_nearest_frame_within_the_tolerance_and_each_frame_once(tmp_path):
    day = '2011-03-01T'
    aia = times_store(tmp_path / 'aia.zarr', '171A', [day + t + 'Z' for t in (
        '00:00:40', '00:05:50', '00:11:00', '00:36:30',  # nearest; 6.5 min away
        '02:03:00',                                      # wanted by 02:00 and 02:04
        '03:01:30', '02:57:00')])                        # 03:02 has the nearer claim
    hmi = times_store(tmp_path / 'hmi.zarr', 'Bz', [day + t for t in (
        '00:00:00', '00:12:00', '00:30:00', '02:00:00', '02:04:00', '03:00:00', '03:02:00')])
    pairing = sdoml.pair_frames(aia, '171A', hmi, 'Bz')
    matched = {p.time[11:19]: p.inputs[0].time[11:19] for p in pairing.pairs}
    assert matched == {'00:00:00': '00:00:40', '00:12:00': '00:11:00', '02:04:00': '02:03:00',
                       '03:00:00': '02:57:00', '03:02:00': '03:01:30'}
    reasons = {u.frame.time[11:19]: u.reason for u in pairing.unpaired}
    assert reasons == {'00:30:00': 'no 171A frame within 6 min',
                       '02:00:00': 'its 171A frames within 6 min went to target frames '
                                   'nearer them'}
    assert pairing.unused == {'171A': 2}
    wider = sdoml.pair_frames(aia, '171A', hmi, 'Bz', tolerance_minutes=7)
    assert {p.time[11:19]: p.inputs[0].time[11:19] for p in wider.pairs}['00:30:00'] == \
        '00:36:30'


def test_the_skip_list_leaves_frames_out(sample, pairing, tmp_path):
    first, second = pairing.pairs[0], pairing.pairs[1]
    skip_file = tmp_path / 'skip.txt'
    skip_file.write_text(f'# bad frames\n{first.time[:16]}   # rounded to the minute\n'
                         f'171A {second.inputs[0].year}/{second.inputs[0].index}\n')
    skipped = sdoml.pair_frames(sample[0], AIA, sample[1], HMI, skip=str(skip_file))
    times = [p.time for p in skipped.pairs]
    assert len(times) == 9 and first.time not in times and second.time not in times
    assert second.inputs[0] in skipped.skipped
    assert {f.array for f in skipped.skipped if f.time == first.time} == set(HMI)
    assert any(u.frame.time == second.time and '171A' in u.reason for u in skipped.unpaired)
    assert '4 frames skipped' in skipped.summary()
    # in a list of lines, a time in JSOC's TAI form marks the same frames
    tai = sdoml.pair_frames(sample[0], AIA, sample[1], HMI,
                            skip=['2011.11.01_00:00:00_TAI']).pairs
    assert first.time not in [p.time for p in tai]
    assert 'line 2' in message(sdoml.parse_skip_lines, ['', 'not a time'], 'skip.txt')
    assert "needs the array it indexes ('171A 2011/5')" in message(sdoml.parse_skip_lines,
                                                                   ['2011/5'])


def test_the_split_by_months_with_a_gap(pairing):
    pairs = pairing.pairs
    split = sdoml.split_pairs(pairs, [12])
    assert split['Test'] == [dataclasses.replace(p, split='Test') for p in pairs
                             if p.datetime.month == 12]
    assert len(split['Test']) == 2 and not split['dropped']
    assert len(split['Train']) == 9 and {p.split for p in split['Train']} == {'Train'}
    # 23:59:26 UTC on 30 November (the 1 December 00:00 TAI frame) is a day from the Test
    # pair at 07:59:26 on 1 December: dropped with a 1-day gap, kept without
    gapped = sdoml.split_pairs(pairs, [12], gap_days=1)
    assert [p.time for p in gapped['dropped']] == ['2011-11-30T23:59:26.000']
    assert 'test months are 1 to 12' in message(sdoml.split_pairs, pairs, [13])


def test_window_reads_equal_the_slice_of_the_whole_frame(sample, pairing):
    pair = pairing.pairs[3]
    whole = sdoml.read_pair(sample[0], sample[1], pair)
    assert whole.input.shape == (3, 32, 32) and whole.target.shape == (3, 32, 32)
    assert whole.input.dtype == whole.target.dtype == np.float32
    window = sdoml.read_pair(sample[0], sample[1], pair, window=(3, 5, 16))
    np.testing.assert_array_equal(window.input, whole.input[:, 3:19, 5:21])
    np.testing.assert_array_equal(window.target, whole.target[:, 3:19, 5:21])
    # physically shaped: bright EUV where |Bz| is strong; nothing off the disk in Bz
    assert np.corrcoef(np.abs(whole.target[2]).ravel(), whole.input[0].ravel())[0, 1] > 0.3
    assert whole.target[2, 0, 0] == 0 and (whole.input > 0).all()
    header = fits.Header(whole.input_header)
    assert header['WAVELNTH'] == 171 and header['T_OBS'] == pair.inputs[0].time[:22] + 'Z'
    assert whole.target_header['T_OBS'].endswith('_TAI')
    text = message(sdoml.read_pair, sample[0], sample[1], pair, window=(20, 0, 16))
    assert '/171A: the window (top 20, left 0, size 16) does not lie inside' in text


def test_frame_headers_hold_what_a_fits_card_can(tmp_path):
    path = frames_store(tmp_path / 's.zarr', {'2011': {'171A': {
        'T_OBS': ['2011-01-01T00:00:00Z', '2011-01-01T00:06:00Z'], 'EXPTIME': [2.0, 2.9],
        'BAD': [float('nan'), 1.0], 'LIST': [[1, 2], [3, 4]], 'TELESCOP': 'SDO/AIA'}}})
    store = sdoml.open_store(path)
    first, second = (store.frame_header('171A', '2011', i) for i in (0, 1))
    assert first == {'T_OBS': '2011-01-01T00:00:00Z', 'EXPTIME': 2.0, 'TELESCOP': 'SDO/AIA'}
    assert second['EXPTIME'] == 2.9 and second['BAD'] == 1.0
    fits.Header(first)
    assert 'no frame 2 (it has 2)' in message(store.frame_header, '171A', '2011', 2)


def test_pair_lists_round_trip_through_json(sample, pairing):
    text = json.dumps(sdoml.pairs_to_json(pairing.pairs))
    again = sdoml.pairs_from_json(json.loads(text))
    assert again == pairing.pairs
    sdoml.verify_pairs(sample[0], sample[1], again)
    frame = again[1].inputs[0]  # another frame, claiming the first pair's time
    forged = sdoml.Frame(frame.array, frame.year, frame.index, again[0].inputs[0].time)
    text = message(sdoml.verify_pairs, sample[0], sample[1],
                   [dataclasses.replace(again[0], inputs=(forged,))])
    assert 'the store changed since the pairs were made' in text
    assert 'not a pair' in message(sdoml.pairs_from_json, [{'inputs': []}])
    assert 'not a frame' in message(sdoml.pairs_from_json,
                                    [{'inputs': [{'array': '171A'}], 'targets': [{}]}])


def test_every_error_is_one_line_naming_what_is_wrong(sample, tmp_path):
    assert 'no such folder' in message(sdoml.open_store, tmp_path / 'nothing')
    assert 'not a zarr store' in message(sdoml.open_store, tmp_path)
    import zarr
    zarr.open_group(str(tmp_path / 'empty.zarr'), mode='w', zarr_format=2).create_group('misc')
    assert 'no year groups' in message(sdoml.open_store, tmp_path / 'empty.zarr')
    text = message(sdoml.pair_frames, sample[0], ['171A', '94A'], sample[1], 'Bz')
    assert "no array '94A'" in text and '2011: 171A 193A 304A; 2012: 171A 193A 304A' in text
    assert "no array 'Bq'" in message(sdoml.pair_frames, sample[0], '171A', sample[1], 'Bq')
    text = message(sdoml.pair_frames, sample[0], AIA, sample[1], HMI,
                   start='2013-01-01', end='2013-02-01')
    assert text.startswith('no pairs in [2013-01-01T00:00:00.000, 2013-02-01T00:00:00.000)')
    assert 'has no frame of Bx in it' in text and '2011-10-31T23:59:26.000 to' in text
    text = message(sdoml.pair_frames, sample[0], AIA, sample[1], HMI,
                   start='2011-12-31T23:00:00', end='2012-01-01')
    assert '1 frames of Bx in it, none paired: 1 no 304A frame within 6 min' in text
    assert 'is empty' in message(sdoml.pair_frames, sample[0], AIA, sample[1], HMI,
                                 start='2012-01-01', end='2011-12-01')
    assert 'each once' in message(sdoml.pair_frames, sample[0], ['171A', '171A'],
                                  sample[1], 'Bz')


def test_bad_frame_attributes_are_named(tmp_path):
    times = ['2011-01-01T00:00:00Z', '2011-01-01T00:06:00Z']
    short = frames_store(tmp_path / 'short.zarr',
                         {'2011': {'171A': {'T_OBS': times, 'EXPTIME': [2.0]}}}, frames=2)
    text = message(sdoml.pair_frames, short, '171A', short, '171A')
    assert f'{short}: 2011/171A: attribute EXPTIME has 1 values for 2 frames' in text
    bad = frames_store(tmp_path / 'bad.zarr',
                       {'2011': {'Bz': {'T_OBS': [times[0], 'not a time']}}})
    text = message(sdoml.pair_frames, bad, 'Bz', bad, 'Bz')
    assert f"{bad}: 2011/Bz attribute T_OBS[1] = 'not a time' is not a time" in text
    untimed = frames_store(tmp_path / 'untimed.zarr', {'2011': {'Bz': {'EXPTIME': [1.0]}}})
    text = message(sdoml.pair_frames, untimed, 'Bz', untimed, 'Bz')
    assert f'{untimed}: 2011/Bz: no T_OBS or DATE-OBS or DATE_OBS attribute' in text
    # DATE-OBS stands in for a missing T_OBS
    dated = frames_store(tmp_path / 'dated.zarr', {'2011': {
        'Bz': {'DATE-OBS': ['2011-01-01T00:00:00.00']},
        '171A': {'DATE-OBS': ['2011-01-01T00:01:00.00']}}})
    assert len(sdoml.pair_frames(dated, '171A', dated, 'Bz').pairs) == 1
    sizes = tmp_path / 'sizes.zarr'
    maker.write_store(sizes, {'2011': {name: (np.zeros((1, size, size)), {'T_OBS': times[:1]})
                                       for name, size in (('171A', 8), ('193A', 16))}})
    text = message(sdoml.pair_frames, sizes, ['171A', '193A'], dated, 'Bz')
    assert 'input arrays have frames of different sizes' in text


def test_without_zarr_the_error_says_what_to_install(sample, monkeypatch):
    monkeypatch.setitem(sys.modules, 'zarr', None)  # import zarr raises ImportError
    assert 'pip install -r requirements-sdoml.txt' in message(sdoml.open_store, sample[0])


def test_reading_never_writes_to_the_store(sample, tmp_path):
    before = [snapshot(path, with_dirs=True) for path in sample]
    store = sdoml.open_store(sample[0])
    pairing = sdoml.pair_frames(store, AIA, sample[1], HMI, skip=['171A 2011/0'])
    for pair in pairing.pairs[:3]:
        sdoml.read_pair(store, sample[1], pair, window=(0, 0, 8))
    sdoml.split_pairs(pairing.pairs, [1], 5)
    sdoml.verify_pairs(store, sample[1], pairing.pairs)
    with pytest.raises(ValueError):  # zarr's read-only store refuses
        store.root['2011']['171A'].attrs['EXPTIME'] = [0.0]
    assert [snapshot(path, with_dirs=True) for path in sample] == before


def test_the_sample_script_is_deterministic_and_refuses_to_overwrite(tmp_path):
    argv = ['--size', '16', '--months', '2', '--days', '1', '--frames', '2', '--chunk', '2']
    assert maker.main([str(tmp_path / 'a')] + argv) == 0
    assert maker.main([str(tmp_path / 'b')] + argv) == 0
    for name in ('aia.zarr', 'hmi.zarr'):
        first, second = (snapshot(tmp_path / run / name) for run in 'ab')
        assert {k: v[0] for k, v in first.items()} == {k: v[0] for k, v in second.items()}
    assert 'exists' in message(maker.main, [str(tmp_path / 'a')] + argv)


def test_a_store_by_url_is_read_through_fsspec(tmp_path):
    """s3:// and gs:// go the same way (anonymously); fsspec's memory:// needs no network."""
    pytest.importorskip('fsspec')  # installed with torch (one of its requirements)
    url = f'memory://{tmp_path.name}/aia.zarr'
    times_store(url, '171A', ['2011-01-01T00:00:00Z', '2011-01-01T00:06:00Z'])
    store = sdoml.open_store(url)
    assert store.arrays_by_year() == {'2011': ['171A']}
    assert store.frame_time('171A', '2011', 1) == '2011-01-01T00:06:00.000'
    assert 'cannot open this store' in message(sdoml.open_store, url + '-not-there')
