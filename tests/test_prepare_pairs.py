"""datasets/prepare_pairs.py, as README "Preparing solar data" documents it: the geometry of
the prepared maps (disk centred at the radius asked for, solar north up, a WCS that sunpy
reads back and that agrees with the data) on synthetic maps of known geometry, NaN that
never spreads beyond one source pixel, time matching and the split with its gap on made-up
timestamps, input cubes of several folders, one-line errors, and sunpy's real AIA and HMI
test files prepared, trained on and tested with their targets, end to end.
"""
import datetime
import os
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from conftest import (REPO, TINY, assert_ok, assert_usage_error, blocked, load_script,
                      read_csv_rows, run_script, run_test, run_train)
from pix2pixCC_Options import run_main

SCRIPT = os.path.join(REPO, 'datasets', 'prepare_pairs.py')
prepare_pairs = load_script('datasets/prepare_pairs.py')

RSUN_REF = 695700000.0  # m, sunpy's
# (astropy's note that it derived MJD-OBS from DATE-OBS when it reads these headers' WCS)
# and of the BLANK card of sunpy's float test files
pytestmark = [pytest.mark.filterwarnings('ignore::astropy.wcs.FITSFixedWarning'),
              pytest.mark.filterwarnings("ignore:Invalid 'BLANK' keyword")]


def hpc_arcsec(header, shape):
    """Helioprojective (Tx, Ty) in arcsec of every pixel of a map with `header`."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    tx, ty = WCS(header).celestial.wcs_pix2world(x, y, 0)  # degrees, longitude in [0, 360)
    return ((tx + 180.0) % 360.0 - 180.0) * 3600.0, ty * 3600.0


def solar_map(path, shape=(12, 12), scale=200.0, rsun=960.0, crpix=None, crval=(0.0, 0.0),
              crota=0.0, time='2011-10-20T00:00:00', **cards):
    """Write a synthetic map whose data follow its own WCS: 100 on the disk (radius `rsun`
    arcsec), 1000 on a marker at 0.75 R above the centre (solar north), 0 off the disk.
    crpix: (x, y) 1-based FITS pixel of helioprojective `crval`; the image centre if None."""
    header = fits.Header()
    crpix = crpix or ((shape[1] + 1) / 2, (shape[0] + 1) / 2)
    for axis, ctype in ((1, 'HPLN-TAN'), (2, 'HPLT-TAN')):
        header.update({f'CTYPE{axis}': ctype, f'CUNIT{axis}': 'arcsec',
                       f'CDELT{axis}': scale, f'CRPIX{axis}': crpix[axis - 1],
                       f'CRVAL{axis}': crval[axis - 1]})
    header['CROTA2'] = crota
    header.update({'DATE-OBS': time, 'RSUN_OBS': rsun, 'RSUN_REF': RSUN_REF,
                   'DSUN_OBS': RSUN_REF / np.sin(np.radians(rsun / 3600.0)),
                   'HGLN_OBS': 0.0, 'HGLT_OBS': 0.0, 'BUNIT': 'DN', 'EXPTIME': 2.0})
    header.update(cards)
    tx, ty = hpc_arcsec(header, shape)
    data = np.where(np.hypot(tx, ty) < rsun, 100.0, 0.0)
    data[np.hypot(tx, ty - 0.75 * rsun) < 0.12 * rsun] = 1000.0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fits.PrimaryHDU(data.astype(np.float32), header).writeto(path)
    return path


def prepare(*argv):
    """Run the script in-process: its exit status."""
    return run_main(prepare_pairs.main, [str(a) for a in argv])


def disk_of(data):
    """(centre x, centre y, radius) of the pixels >= 50 (half the disk's 100): the disk as
    the resampled data show it."""
    on = np.nan_to_num(data) >= 50
    y, x = np.nonzero(on)
    return x.mean(), y.mean(), np.sqrt(on.sum() / np.pi)


def marker_of(data):
    """(x, y) of the centroid of the pixels >= 550 (half-way from the disk to the marker)."""
    y, x = np.nonzero(np.nan_to_num(data) >= 550)
    return x.mean(), y.mean()


# ----------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tilted(tmp_path_factory):
    """A pair of known geometry prepared at --size 64 --disk_radius_px 24: an input with its
    disk off-centre, CROTA2 = 10 deg and 24"/px, a target seen from elsewhere (another solar
    radius) with 30"/px, its disk off-centre the other way and CROTA2 = 180 deg (HMI's)."""
    root = tmp_path_factory.mktemp('tilted')
    solar_map(root / 'in' / 'a.fits', shape=(100, 110), scale=24.0, rsun=960.0,
              crpix=(47.3, 53.6), crval=(-40.0, 25.0), crota=10.0)
    solar_map(root / 'tg' / 'b.fits', shape=(80, 80), scale=30.0, rsun=940.0,
              crpix=(45.2, 36.9), crota=180.0)
    assert prepare('--input_dir', root / 'in', '--target_dir', root / 'tg', '--output_dir',
                   root / 'out', '--size', 64, '--disk_radius_px', 24) == 0
    return root / 'out' / 'Train'


@pytest.mark.parametrize('side', ['Input', 'Target'])
def test_the_disk_is_centred_at_the_radius_asked_for_with_north_up(tilted, side):
    data, header = fits.getdata(tilted / side / '20111020_000000.fits', header=True)
    assert data.shape == (64, 64) and header['BITPIX'] == -32  # float32
    x, y, radius = disk_of(data)
    assert abs(x - 31.5) < 0.5 and abs(y - 31.5) < 0.5, (x, y)
    assert abs(radius - 24) < 0.5, radius
    # the marker at solar north lands at the top (FITS rows count upwards), 0.75 R above
    top_x, top_y = marker_of(data)
    assert abs(top_x - 31.5) < 0.5 and abs(top_y - (31.5 + 0.75 * 24)) < 0.5, (top_x, top_y)


@pytest.mark.parametrize('side', ['Input', 'Target'])
def test_sunpy_reads_a_header_that_agrees_with_the_data(tilted, side):
    import astropy.units as u
    import sunpy.map
    from astropy.coordinates import SkyCoord
    smap = sunpy.map.Map(tilted / side / '20111020_000000.fits')
    assert (smap.rsun_obs / smap.scale.axis1).to_value(u.pix) == pytest.approx(24, rel=1e-9)
    assert np.allclose(smap.rotation_matrix, np.eye(2))
    assert str(smap.date.isot).startswith('2011-10-20T00:00:00')
    assert smap.unit == u.DN and smap.observer_coordinate is not None
    # the WCS puts the Sun's centre and the north marker where the data have them
    centre = smap.wcs.world_to_pixel(SkyCoord(0 * u.arcsec, 0 * u.arcsec,
                                              frame=smap.coordinate_frame))
    assert np.allclose(np.array(centre, float), disk_of(smap.data)[:2], atol=0.5)
    top = smap.pixel_to_world(*marker_of(smap.data) * u.pix)
    assert abs(top.Tx) < 0.5 * u.pix * smap.scale.axis1
    assert abs(top.Ty - 0.75 * smap.rsun_obs) < 0.5 * u.pix * smap.scale.axis2


@pytest.mark.parametrize('order', [1, 3])
def test_nan_stays_nan_and_spreads_by_at_most_one_source_pixel(order):
    data = np.ones((20, 20))
    data[10, 10] = np.nan
    data[3, 4] = np.inf
    # a rotated, shrunk, shifted grid of source positions
    y, x = np.mgrid[0:30, 0:30] * 0.55
    angle = np.radians(25)
    rows = 2 + np.cos(angle) * y + np.sin(angle) * x
    columns = 1 + np.cos(angle) * x - np.sin(angle) * y
    out = prepare_pairs.resample(data, rows, columns, order)
    inside = (rows >= 0) & (rows <= 19) & (columns >= 0) & (columns <= 19)
    touches = np.zeros_like(inside)  # the stencil of a bilinear interpolation meets a bad pixel
    for r, c in ((10, 10), (3, 4)):
        touches |= (abs(rows - r) < 1) & (abs(columns - c) < 1)
    assert touches.sum() >= 4  # the test's grid does come near the bad pixels
    assert np.array_equal(np.isnan(out) & inside, touches & inside)
    assert np.isnan(out[~inside]).all()  # outside the source: no made-up values
    assert np.allclose(out[inside & ~touches], 1.0)


def test_mask_limb_and_exposure_normalise(tmp_path):
    solar_map(tmp_path / 'in' / 'a.fits', shape=(40, 40), scale=60.0)
    solar_map(tmp_path / 'tg' / 'b.fits', shape=(40, 40), scale=60.0, BUNIT='G')
    assert prepare('--input_dir', tmp_path / 'in', '--target_dir', tmp_path / 'tg',
                   '--output_dir', tmp_path / 'out', '--size', 32, '--disk_radius_px', 12,
                   '--mask_limb', 1.1, '--exposure_normalise') == 0
    y, x = np.mgrid[0:32, 0:32]
    r = np.hypot(x - 15.5, y - 15.5)
    for side, unit, disk in (('Input', 'DN / s', 50.0), ('Target', 'G', 100.0)):
        data, header = fits.getdata(tmp_path / 'out' / 'Train' / side / '20111020_000000.fits',
                                    header=True)
        assert np.isnan(data[r > 1.1 * 12]).all() and np.isfinite(data[r <= 1.1 * 12]).all()
        assert header['BUNIT'] == unit  # only inputs are divided by EXPTIME (2 s)
        assert np.median(data[r < 8]) == pytest.approx(disk)


# ----------------------------------------------------------------------------------------
# Time matching and the split
# ----------------------------------------------------------------------------------------

TARGETS = {  # file: (time, QUALITY)
    'a.fits': ('2011-10-30T00:00:00', 0),   # Train, but 2 days before a Test pair
    'b.fits': ('2011-10-20T00:00:00', 0),   # Train
    'c.fits': ('2011-10-20T00:12:00', 0),   # Train: the 00:10 input, not 00:04
    'd.fits': ('2011-10-21T00:00:00', 0),   # no input within 6 min (7 min)
    'e.fits': ('2011-11-01T00:00:00', 0),   # Test; its nearest input has a bad QUALITY
    'f.fits': ('2011-12-03T00:00:00', 1024),  # bad quality
}
INPUTS = {
    'i1.fits': ('2011-10-30T00:02:00', 0), 'i2.fits': ('2011-10-20T00:01:00', 0),
    'i3.fits': ('2011-10-20T00:04:00', 0), 'i4.fits': ('2011-10-20T00:10:00', 0),
    'i5.fits': ('2011-10-21T00:07:00', 0), 'i6.fits': ('2011-10-31T23:58:00', 0),
    'i7.fits': ('2011-11-01T00:00:30', 8), 'i8.fits': ('2011-12-03T00:00:00', 0),
}


@pytest.fixture
def timed(tmp_path):
    for folder, files in (('tg', TARGETS), ('in', INPUTS)):
        for name, (time, quality) in files.items():
            solar_map(tmp_path / folder / name, time=time, QUALITY=quality)
    return tmp_path


def prepared(root, *extra):
    """Prepare `root`/in and /tg as 16 px pairs; (summary line, pairs.csv rows)."""
    argv = ['--input_dir', root / 'in', '--target_dir', root / 'tg', '--output_dir',
            root / 'out', '--size', 16, '--disk_radius_px', 6, *extra]
    assert prepare(*argv) == 0
    return read_csv_rows(root / 'out' / 'pairs.csv')[1]


def pair_rows(rows):
    """{target file: (split, input file(s), minutes)} of the pairs in pairs.csv's rows."""
    def names(files):
        return ';'.join(os.path.basename(path) for path in files.split(';'))
    return {os.path.basename(r['target_file']): (r['split'], names(r['input_files']),
                                                 r['minutes'])
            for r in rows if r['split'] != 'skipped'}


def skipped_rows(rows):
    return {os.path.basename(r['target_file'] or r['input_files']): r['reason']
            for r in rows if r['split'] == 'skipped'}


def test_each_target_takes_the_nearest_input_and_the_split_keeps_a_gap(timed, capsys):
    rows = prepared(timed, '--test_months', 11, 12, '--gap_days', 2)
    assert pair_rows(rows) == {'b.fits': ('Train', 'i2.fits', '1.000'),
                               'c.fits': ('Train', 'i4.fits', '-2.000'),
                               'a.fits': ('dropped', 'i1.fits', '2.000'),
                               'e.fits': ('Test', 'i6.fits', '-2.000')}
    skipped = skipped_rows(rows)
    assert 'no input within 6 min' in skipped['d.fits']
    assert 'QUALITY = 1024' in skipped['f.fits'] and 'QUALITY = 8' in skipped['i7.fits']
    assert all('not the nearest' in skipped[name] for name in ('i3.fits', 'i5.fits', 'i8.fits'))
    dropped = next(r for r in rows if r['split'] == 'dropped')
    assert 'within 2 days of Test pair 20111101_000000' in dropped['reason']
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith('4 pairs (train 2, test 1, dropped 1 within --gap_days 2); '
                              'skipped 3 (2 bad quality, 1 no partner); 3 input files unused')
    out = timed / 'out'
    for side in ('Input', 'Target'):  # input and target of a pair have the same name
        assert sorted(os.listdir(out / 'Train' / side)) == ['20111020_000000.fits',
                                                            '20111020_001200.fits']
        assert os.listdir(out / 'Test' / side) == ['20111101_000000.fits']


def test_keep_bad_quality_and_no_gap(timed):
    rows = prepared(timed, '--test_months', 11, '--keep_bad_quality')
    pairs = pair_rows(rows)
    assert pairs['e.fits'] == ('Test', 'i7.fits', '0.500')
    assert pairs['f.fits'][:2] == ('Train', 'i8.fits') and pairs['a.fits'][0] == 'Train'


def test_several_input_folders_make_one_cube_with_a_channel_axis(timed):
    shutil.copytree(timed / 'in', timed / 'in2')
    for name in INPUTS:
        fits.setval(timed / 'in2' / name, 'WAVELNTH', value=193)
    prepare('--input_dir', timed / 'in', '--input_dir', timed / 'in2', '--target_dir',
            timed / 'tg', '--output_dir', timed / 'out', '--size', 16, '--disk_radius_px', 6)
    rows = read_csv_rows(timed / 'out' / 'pairs.csv')[1]
    assert pair_rows(rows)['b.fits'][1] == 'i2.fits;i2.fits'
    data, header = fits.getdata(timed / 'out' / 'Train' / 'Input' / '20111020_000000.fits',
                                header=True)
    assert data.shape == (2, 16, 16)
    wcs = WCS(header)
    assert wcs.naxis == 3 and header['CTYPE3'] == 'CHANNEL'
    assert wcs.celestial.wcs_world2pix(0, 0, 0) == pytest.approx([7.5, 7.5])
    assert wcs.sub([3]).wcs_pix2world([0, 1], 0)[0] == pytest.approx([0, 1])  # channel index
    assert 'WAVELNTH' not in header and header['CHAN2'].endswith('193')


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


def empty_target_folder(root):
    os.makedirs(root / 'tg')


def target_without_radius(root):
    solar_map(root / 'tg' / 'y.fits', RSUN_OBS=0.0, RSUN_REF=0.0)


def target_without_wcs(root):
    path = target(root)
    for key in ('CTYPE1', 'CTYPE2'):
        fits.delval(path, key)


def target_without_time(root):
    solar_map(root / 'tg' / 'y.fits', time='')


def target(root):
    return solar_map(root / 'tg' / 'y.fits')


def input_per_second(root):
    target(root)
    fits.setval(root / 'in' / 'x.fits', 'BUNIT', value='DN/s')


def earlier_output(root):
    target(root)
    os.makedirs(root / 'out' / 'Train')


@pytest.mark.parametrize('make, extra, fragments', [
    (empty_target_folder, [], ['--target_dir', 'no FITS files']),
    (target_without_radius, [], ['y.fits', 'no solar radius', 'RSUN_OBS']),
    (target_without_wcs, [], ['y.fits', 'no helioprojective WCS']),
    (target_without_time, [], ['y.fits', 'no observation time', 'DATE-OBS']),
    (target, ['--size', '40'], ['--size 40 is smaller than the disk']),
    (input_per_second, ['--exposure_normalise'], ['x.fits', "'DN/s' is already per second"]),
    (earlier_output, [], ['already holds prepared pairs']),
], ids=['no FITS files', 'no radius', 'no WCS', 'no time', 'size', 'per second',
        'output exists'])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, make, extra, fragments):
    solar_map(tmp_path / 'in' / 'x.fits')
    make(tmp_path)
    status = prepare('--input_dir', tmp_path / 'in', '--target_dir', tmp_path / 'tg',
                     '--output_dir', tmp_path / 'out', '--size', 64, '--disk_radius_px', 24,
                     *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert all(fragment in err[0] for fragment in fragments), err[0]
    assert not os.path.exists(tmp_path / 'out' / 'pairs.csv')


def test_a_run_that_writes_no_pair_leaves_nothing_and_its_retry_runs(tmp_path, capsys):
    """README "Preparing solar data": when no target has a partner within
    --max_time_difference (here 30 minutes apart), the one line says why with an example,
    nothing is written, and the rerun with a corrected option into the same folder runs."""
    solar_map(tmp_path / 'in' / 'x.fits', time='2011-10-20T00:00:00')
    solar_map(tmp_path / 'tg' / 'y.fits', time='2011-10-20T00:30:00')
    argv = ['--input_dir', tmp_path / 'in', '--target_dir', tmp_path / 'tg', '--output_dir',
            tmp_path / 'out', '--size', 16, '--disk_radius_px', 6]
    assert prepare(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'nothing was written' in err[0] and 'y.fits' in err[0], err
    assert not os.path.exists(tmp_path / 'out')
    assert prepare(*argv, '--max_time_difference', 40) == 0
    assert os.path.exists(tmp_path / 'out' / 'pairs.csv')


def test_missing_dependencies_are_named_in_one_line(tmp_path):
    proc = run_script(SCRIPT, ['--help'], tmp_path, PYTHONPATH=blocked(tmp_path, 'scipy'))
    assert_usage_error(proc, 'scipy is missing', 'pip install -r requirements-prep.txt')


# ----------------------------------------------------------------------------------------
# End to end: sunpy's real AIA and HMI files -> pairs -> training -> Test with targets
# ----------------------------------------------------------------------------------------


def real_copies(root):
    """Copies of sunpy's AIA 171 (twice: as 171 and as a made-up second passband) and HMI
    test files with DATE-OBS moved to 4 February days and 2 March days (the AIA files 20 s
    after the HMI file's), so that they make 6 pairs; the HMI file is a continuum image
    (DN/s) rotated by 180 deg, with NaN off the disk."""
    from sunpy.data.test import get_test_filepath
    days = [datetime.datetime(2011, 2, d) for d in (15, 16, 17, 18)] + \
        [datetime.datetime(2011, 3, d) for d in (17, 18)]
    sources = (('AIA171', 'aia_171_level1.fits', 20, {}),
               ('AIA193', 'aia_171_level1.fits', 20, {'WAVELNTH': 193}),
               ('HMI', 'resampled_hmi.fits', 0, {}))
    for folder, source, seconds, cards in sources:
        os.makedirs(root / folder)
        with fits.open(get_test_filepath(source)) as hdul:
            header = hdul[0].header
            header.update(cards)
            for day in days:
                time = (day + datetime.timedelta(seconds=seconds)).isoformat()
                header['DATE-OBS'] = header['T_OBS'] = time
                hdul.writeto(root / folder / f'{folder}_{day:%m%d}.fits')


def test_real_aia_and_hmi_files_prepare_train_and_test(tmp_path):
    real_copies(tmp_path)
    prep = run_script(SCRIPT, ['--input_dir', 'AIA171', '--input_dir', 'AIA193',
                               '--target_dir', 'HMI', '--output_dir', 'EUV2Mag', '--size', '64',
                               '--disk_radius_px', '28', '--exposure_normalise',
                               '--mask_limb', '1.1', '--test_months', '3'],
                      tmp_path, PYTHONPATH=blocked(tmp_path, 'torch'))  # needs no torch
    assert_ok(prep)
    assert prep.stdout.strip().splitlines()[-1].startswith('6 pairs (train 4, test 2)')
    data = ['--data_format_input', 'fits', '--data_format_target', 'fits', '--input_ch', '2',
            '--logscale_input', 'True', '--saturation_lower_limit_input', '1',
            '--saturation_upper_limit_input', '3000', '--saturation_lower_limit_target', '0',
            '--saturation_upper_limit_target', '70000']
    assert_ok(run_train(TINY + data + [
        '--dataset_name', 'EUV2Mag', '--input_dir_train', 'EUV2Mag/Train/Input',
        '--target_dir_train', 'EUV2Mag/Train/Target', '--n_epochs', '1', '--seed', '1'],
        tmp_path))
    test = run_test(TINY + ['--dataset_name', 'EUV2Mag', '--iteration', '4',
                            '--input_dir_test', 'EUV2Mag/Test/Input',
                            '--target_dir_test', 'EUV2Mag/Test/Target'], tmp_path)
    assert_ok(test)
    assert 'no solar disk' not in test.stdout + test.stderr
    folder = tmp_path / 'checkpoints' / 'EUV2Mag' / 'Image' / 'Test' / '4'
    columns, rows = read_csv_rows(folder / 'metrics.csv')
    assert len(rows) == 2 and 'disk_cc_1x1' in columns
    assert all(np.isfinite(float(row['disk_rmse_1x1'])) for row in rows)
    import astropy.units as u
    import sunpy.map
    product = sunpy.map.Map(folder / '20110317_000000_AI.fits')  # the input cube's plane
    assert product.unit == u.Unit('DN/s')  # the target's
    assert (product.rsun_obs / product.scale.axis1).to_value(u.pix) == pytest.approx(28)
