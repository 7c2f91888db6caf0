"""Make small synthetic SDOMLv2 stores (AIA and HMI) for pix2pixCC's SDOML reader
(machinery/sdoml.py) and its tests: the layout of the real stores, toy data.

    python datasets/make_sdoml_sample.py OUT_DIR [--size 64] [--frames 3] [--days 2]
        [--months 6] [--first_month 2011-11] [--passbands 171A 193A 304A] [--missing 0]
        [--chunk 15] [--seed 20110101]

writes OUT_DIR/aia.zarr and OUT_DIR/hmi.zarr (refused if they exist).

Layout, as SDOMLv2's conversion scripts write it (github.com/SDOML/SDOMLv2): zarr format 2,
a group per year ("2011"), in it an array per AIA passband ("171A", ...) or HMI component
("Bx", "By", "Bz"), N x S x S float32, chunks of --chunk frames (15 as SDOMLv2; other copies
use 120), Blosc zstd with bit shuffle. Every header key is an array attribute holding a list
with one value per frame: T_OBS (AIA: UTC, '2011-11-01T00:00:07.84Z'; HMI: TAI in JSOC's
form, '2011.11.01_00:00:00_TAI'), DATE-OBS (UTC; AIA's is the exposure's start), WAVELNTH,
EXPTIME, the WCS (CTYPE, CUNIT, CRPIX, CRVAL, CDELT 1 and 2), NAXIS1/2 (floats, as the
conversion leaves them), R_SUN (disk radius, px), RSUN_OBS, RSUN_REF, DSUN_OBS, HGLN_OBS,
HGLT_OBS, BUNIT (AIA 'DN' and HMI 'Mx/cm^2', as in the source files, while the data are
DN/s and gauss: PIXLUNIT says so), TELESCOP, INSTRUME, QUALITY, and for AIA DEG_COR (the
degradation factor the data are already divided by).

Times: --months months from --first_month (the default spans two year groups), --days
observing days in each, --frames HMI frames a day, evenly spaced (every 8 h by default).
HMI frames sit at whole TAI slots, so 34 s before the slot in UTC (2011-2012). AIA has two
frames of each passband per HMI frame, at its 6-minute cadence: a few seconds after the
slot (UTC, each passband its own offset) and 6 minutes later (no HMI frame pairs with it).
An HMI frame goes in the year group of its TAI time, an AIA frame in that of its UTC time,
and each array's frames are written in a shuffled order, as real stores have frames out of
time order. --missing N leaves out the last passband's frame at N HMI frames, whose
neighbour 6 minutes later is more than 6 minutes from the HMI frame: N unpairable frames.

Data: a toy Sun whose radius is the same fraction of the frame as SDOMLv2's 976" (0.397 of
the frame: 203 px at 512, 25 px at 64), centred. Each observing day has 1-4 bipolar active
regions (Hale's and Joy's laws, as datasets/make_sample.py draws them) that turn with the
Sun (13.2 degrees a day) through the day's frames, on a quiet-Sun field. Bz is the radial
field (G, 10 G noise a frame), Bx and By horizontal components pointing away from positive
polarity; every AIA passband is bright above strong |Bz| (make_sample.py's toy EUV), so a
network can learn the field from the EUV. 0 off the disk for HMI. Every frame draws from
its own seed (--seed, the day, the slot, the array), so the stores are deterministic.
"""
import argparse
import datetime
import importlib.util
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pix2pixCC_Options import UserError, run_main  # noqa: E402

SEED = 20110101
# SDOMLv2 rescales the Sun to 976" at AIA's 0.6"/px of 4096 px, then bins to the store's
# size: the radius is 976 / (0.6 * 4096) of the frame at every size.
RADIUS_FRACTION = 976.0 / (0.6 * 4096)
RSUN_REF = 696000000.0      # m, as AIA's headers give it
AU = 149597870700.0         # m
ROTATION_DEG_PER_DAY = 13.2  # synodic, near the equator
B_MAX = 3000.0
AIA_CADENCE = datetime.timedelta(minutes=6)
AIA_TIME_FORMAT = '%Y-%m-%dT%H:%M:%S.%f'
HMI_TIME_FORMAT = '%Y.%m.%d_%H:%M:%S'
HMI_ARRAYS = ('Bx', 'By', 'Bz')
DEFAULT_PASSBANDS = ('171A', '193A', '304A')


def load_sibling(name):
    """A script beside this one (datasets/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = load_sibling('make_sample')  # the toy Sun's active regions and EUV passbands


class AIAPassband:
    """An AIA passband of the sample: its toy EUV brightness (make_sample.Passband), the
    seconds after the slot its frames' T_OBS falls, its exposure (s) and camera."""

    def __init__(self, wavelength, brightness, offset, exposure, camera):
        self.wavelength, self.brightness = wavelength, brightness
        self.offset, self.exposure, self.camera = offset, exposure, camera


def passband_table():
    """Every passband the sample can write; 171, 193 and 304 are make_sample.py's, the others
    scaled from them (the coronal lines fainter, the UV continuum brighter)."""
    band = toy.PASSBANDS
    return {
        '94A': AIAPassband(94, band[193]._replace(name='94-like', wavelength=94, disk=1.5,
                                                 limb=0.5, floor=0.2, corona=1.0, gain=0.06,
                                                 ceiling=300.0), 1.12, 2.9, 'AIA_4'),
        '131A': AIAPassband(131, band[193]._replace(name='131-like', wavelength=131, disk=6.0,
                                                   limb=2.0, floor=0.5, corona=3.0, gain=0.3,
                                                   ceiling=1500.0), 8.62, 2.9, 'AIA_1'),
        '171A': AIAPassband(171, band[171], 9.35, 2.0, 'AIA_3'),
        '193A': AIAPassband(193, band[193], 6.84, 2.0, 'AIA_2'),
        '211A': AIAPassband(211, band[193]._replace(name='211-like', wavelength=211, disk=250.0,
                                                   limb=120.0, floor=15.0, corona=150.0,
                                                   gain=8.0), 11.62, 2.9, 'AIA_2'),
        '304A': AIAPassband(304, band[304], 7.13, 2.9, 'AIA_4'),
        '335A': AIAPassband(335, band[193]._replace(name='335-like', wavelength=335, disk=15.0,
                                                   limb=6.0, floor=1.0, corona=8.0, gain=0.6,
                                                   ceiling=2000.0), 1.62, 2.9, 'AIA_1'),
        '1600A': AIAPassband(1600, band[304]._replace(name='1600-like', wavelength=1600,
                                                      disk=150.0, limb=-60.0, floor=1.0,
                                                      corona=0.0, gain=5.0,
                                                      ceiling=5000.0), 15.13, 1.0, 'AIA_3'),
        '1700A': AIAPassband(1700, band[304]._replace(name='1700-like', wavelength=1700,
                                                      disk=2000.0, limb=-900.0, floor=1.0,
                                                      corona=0.0, gain=20.0,
                                                      ceiling=20000.0), 17.72, 1.0, 'AIA_3'),
    }


PASSBANDS = passband_table()


# ----------------------------------------------------------------------------------------
# When: observing days and slots
# ----------------------------------------------------------------------------------------


def month_starts(first_month, months):
    """The first day of each of `months` months from 'YYYY-MM'."""
    try:
        year, month = (int(part) for part in first_month.split('-'))
        datetime.datetime(year, month, 1)
    except ValueError:
        raise UserError(f"--first_month {first_month}: not a month 'YYYY-MM'") from None
    starts = []
    for k in range(months):
        y, m = divmod(month - 1 + k, 12)
        starts.append(datetime.datetime(year + y, m + 1, 1))
    return starts


def observing_days(first_month, months, days):
    """`days` days in each month, spread over its first 28 days."""
    step = max(28 // max(days, 1), 1)
    return [start + datetime.timedelta(days=j * step)
            for start in month_starts(first_month, months) for j in range(days)]


def slots(day, frames):
    """`frames` HMI slots of a day, evenly spaced from 00:00 (whole minutes, multiples of 12
    as HMI's 720 s cadence has them)."""
    step = (24 * 60 // max(frames, 1)) // 12 * 12 or 12
    return [day + datetime.timedelta(minutes=k * step) for k in range(frames)]


def tai_minus_utc(time):
    """TAI - UTC in seconds at a UTC time (astropy's leap-second table)."""
    from astropy.time import Time
    t = Time(time, scale='utc')
    return float((t.tai.datetime - t.datetime).total_seconds())


# ----------------------------------------------------------------------------------------
# The toy Sun
# ----------------------------------------------------------------------------------------


class Disk:
    """The pixel grid of a store of size S: the attributes make_sample.euv reads (n, scale,
    c, r, rho, on_disk, mu, x, y), with SDOMLv2's radius, RADIUS_FRACTION * S."""

    def __init__(self, size):
        self.n = size
        self.scale = size / toy.N           # make_sample's lengths are for 64 px
        self.c = (size - 1) / 2.0
        self.r = RADIUS_FRACTION * size
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        self.x, self.y = x, y
        self.rho = np.hypot(x - self.c, y - self.c) / self.r
        self.on_disk = self.rho < 1.0
        self.mu = np.sqrt(np.clip(1.0 - self.rho ** 2, 0.0, 1.0))


def draw_regions(rng):
    """A day's active regions: (hemisphere, latitude and longitude at 00:00 in radians, half
    separation in 64-px units, leader and trailer field and width) each."""
    regions = []
    for _ in range(rng.integers(1, 5)):
        hemisphere = rng.choice([-1.0, 1.0])
        b_lead = rng.uniform(500.0, 2500.0)
        s_lead = rng.uniform(1.3, 2.0)
        regions.append(dict(hemisphere=hemisphere,
                            latitude=np.radians(hemisphere * rng.uniform(5.0, 35.0)),
                            longitude=np.radians(rng.uniform(-70.0, 40.0)),
                            half=0.5 * rng.uniform(4.0, 8.0), b_lead=b_lead,
                            b_trail=b_lead * rng.uniform(0.6, 0.9), s_lead=s_lead,
                            s_trail=s_lead * rng.uniform(1.1, 1.5)))
    return regions


def bipole(disk, region, hours):
    """One region's radial field (G) `hours` after 00:00: Hale's law (the leader, west,
    positive in the north), Joy's law (the leader nearer the equator), turned with the Sun.
    A region behind the limb gives nothing."""
    longitude = region['longitude'] + np.radians(ROTATION_DEG_PER_DAY * hours / 24.0)
    if abs(longitude) >= np.radians(85.0):
        return 0.0
    latitude, hemisphere = region['latitude'], region['hemisphere']
    xc = disk.c + disk.r * np.cos(latitude) * np.sin(longitude)
    yc = disk.c + disk.r * np.sin(latitude)
    half, tilt = region['half'] * disk.scale, 0.5 * abs(latitude)
    dx = half * np.cos(tilt) * np.cos(longitude)
    dy = -hemisphere * half * np.sin(tilt)
    lead = hemisphere * region['b_lead'] * toy.blob(disk, xc + dx, yc + dy,
                                                   region['s_lead'] * disk.scale)
    trail = -hemisphere * region['b_trail'] * toy.blob(disk, xc - dx, yc - dy,
                                                      region['s_trail'] * disk.scale)
    return lead + trail


def quiet_sun(disk, rng):
    """A day's quiet-Sun field: smoothed mixed polarity, rms 10 G."""
    from scipy.ndimage import gaussian_filter
    field = gaussian_filter(rng.normal(size=(disk.n, disk.n)), disk.scale)
    return 10.0 * field / field.std()


def radial_field(disk, day, hours, frame_rng):
    """Bz (G) at `hours` after the day's 00:00: the day's regions and quiet Sun (`day`: its
    regions and quiet field), plus the frame's own 10 G noise; 0 off the disk."""
    regions, quiet = day
    b = quiet + sum((bipole(disk, region, hours) for region in regions), np.zeros_like(quiet))
    b = b + frame_rng.normal(0.0, 10.0, b.shape)
    return np.where(disk.on_disk, np.clip(b, -B_MAX, B_MAX), 0.0)


def horizontal_field(disk, bz):
    """(Bx, By): a horizontal field pointing away from positive polarity, -L grad(Bz) with L
    the regions' width, so it is as strong as Bz around the spots; 0 off the disk."""
    from scipy.ndimage import gaussian_filter
    length = 1.5 * disk.scale
    by, bx = np.gradient(gaussian_filter(bz, length))
    return tuple(np.where(disk.on_disk, -length * b, 0.0) for b in (bx, by))


# ----------------------------------------------------------------------------------------
# Headers: one dict of scalars per frame
# ----------------------------------------------------------------------------------------


def observer(time):
    """(RSUN_OBS in arcsec, DSUN_OBS in m) on a date: the Earth's distance over the year
    (perihelion on 3 January), and the angular radius it gives with RSUN_REF."""
    day = time.timetuple().tm_yday
    distance = AU * (1.0 - 0.0167 * np.cos(2.0 * np.pi * (day - 3) / 365.25))
    return float(np.degrees(np.arcsin(RSUN_REF / distance)) * 3600.0), float(distance)


def geometry_cards(size, time):
    """The WCS and observer of a frame: the disk centred, RADIUS_FRACTION * size px for the
    day's RSUN_OBS (SDOMLv2's CDELT = RSUN_OBS / R_SUN), north up."""
    rsun_obs, dsun = observer(time)
    radius = RADIUS_FRACTION * size
    cards = {'NAXIS': 2, 'NAXIS1': float(size), 'NAXIS2': float(size), 'R_SUN': radius,
             'RSUN_OBS': rsun_obs, 'RSUN_REF': RSUN_REF, 'DSUN_OBS': dsun,
             'HGLN_OBS': 0.0, 'HGLT_OBS': 0.0, 'CROTA2': 0.0}
    for axis, ctype in ((1, 'HPLN-TAN'), (2, 'HPLT-TAN')):
        cards.update({f'CTYPE{axis}': ctype, f'CUNIT{axis}': 'arcsec',
                      f'CRPIX{axis}': (size + 1) / 2.0, f'CRVAL{axis}': 0.0,
                      f'CDELT{axis}': rsun_obs / radius})
    return cards


def aia_time(time):
    return time.strftime(AIA_TIME_FORMAT)[:-4]  # to the hundredth of a second, as AIA's


def aia_header(size, name, time):
    """An AIA frame's cards; `time` is its T_OBS (UTC), the exposure's middle."""
    band = PASSBANDS[name]
    start = time - datetime.timedelta(seconds=band.exposure / 2.0)
    days_in_orbit = (time - datetime.datetime(2010, 5, 1)).days
    return {'T_OBS': aia_time(time) + 'Z', 'DATE-OBS': aia_time(start),
            'TELESCOP': 'SDO/AIA', 'INSTRUME': band.camera, 'WAVELNTH': band.wavelength,
            'WAVEUNIT': 'angstrom', 'EXPTIME': band.exposure, 'QUALITY': 0, 'BUNIT': 'DN',
            'PIXLUNIT': 'DN/s', 'DEG_COR': round(1.0 - 1e-4 * days_in_orbit, 6),
            **geometry_cards(size, time)}


def hmi_header(size, tai_slot, utc_time):
    """An HMI frame's cards: T_OBS the TAI slot in JSOC's form, DATE-OBS its UTC time."""
    return {'T_OBS': tai_slot.strftime(HMI_TIME_FORMAT) + '_TAI',
            'DATE-OBS': utc_time.strftime(AIA_TIME_FORMAT)[:-4], 'TELESCOP': 'SDO/HMI',
            'INSTRUME': 'HMI_SIDE1', 'WAVELNTH': 6173.0, 'WAVEUNIT': 'angstrom',
            'EXPTIME': 135.0, 'QUALITY': 0, 'BUNIT': 'Mx/cm^2', 'PIXLUNIT': 'Gauss',
            **geometry_cards(size, utc_time)}


# ----------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------


class Frames:
    """The frames of a store as they are made: {year: {array: ([images], [headers])}}."""

    def __init__(self):
        self.years = {}

    def add(self, year, name, image, header):
        images, headers = self.years.setdefault(year, {}).setdefault(name, ([], []))
        images.append(np.asarray(image, dtype=np.float32))
        headers.append(header)


def hours_after(time, day_start):
    return (time - day_start).total_seconds() / 3600.0


def hmi_frame(disk, sun, slot, frame_rng, size, offset):
    """(the three components, the header) of the HMI frame at TAI `slot`; `sun` is (the
    observing day's start, its regions and quiet field)."""
    utc = slot - datetime.timedelta(seconds=offset)
    day_start, day = sun
    bz = radial_field(disk, day, hours_after(utc, day_start), frame_rng)
    bx, by = horizontal_field(disk, bz)
    return (bx, by, bz), hmi_header(size, slot, utc)


def aia_frame(disk, sun, name, time, frame_rng, size):
    """(the image in DN/s, the header) of passband `name` at UTC `time`, from the same Sun
    as the HMI frames (the regions turned to that time)."""
    day_start, day = sun
    bz = radial_field(disk, day, hours_after(time, day_start), frame_rng)
    return toy.euv(disk, bz, frame_rng, PASSBANDS[name].brightness), aia_header(size, name, time)


def missing_slots(n_slots, missing):
    """Which HMI slots lose the last passband's frame: `missing` of them, evenly spread."""
    return {(k + 1) * n_slots // (missing + 1) for k in range(missing)}


def draw_frames(size, first_month, months, days, frames, passbands, missing, seed):
    """(AIA Frames, HMI Frames) of the sample (see the module's notes)."""
    disk = Disk(size)
    aia, hmi = Frames(), Frames()
    all_slots = [(d, day, slot) for d, day in enumerate(observing_days(first_month, months,
                                                                      days))
                 for slot in slots(day, frames)]
    gaps = missing_slots(len(all_slots), missing)
    days_drawn = {}
    for s, (d, day, slot) in enumerate(all_slots):
        if d not in days_drawn:
            rng = np.random.default_rng([seed, d])
            days_drawn[d] = (day, (draw_regions(rng), quiet_sun(disk, rng)))
        offset = tai_minus_utc(slot)
        components, header = hmi_frame(disk, days_drawn[d], slot,
                                       np.random.default_rng([seed, d, s, 0]), size, offset)
        for name, image in zip(HMI_ARRAYS, components, strict=True):
            hmi.add(str(slot.year), name, image, header)
        for p, name in enumerate(passbands):
            for k in range(2):  # at the slot, and AIA's next frame 6 minutes later
                if k == 0 and s in gaps and p == len(passbands) - 1:
                    continue
                offset_s = datetime.timedelta(seconds=PASSBANDS[name].offset)
                time = slot + k * AIA_CADENCE + offset_s
                image, header = aia_frame(disk, days_drawn[d], name, time,
                                          np.random.default_rng([seed, d, s, p + 1, k]), size)
                aia.add(str(time.year), name, image, header)
    return aia, hmi


# ----------------------------------------------------------------------------------------
# Writing a store
# ----------------------------------------------------------------------------------------


def attribute_lists(headers):
    """{key: [value of frame 0, 1, ...]}: SDOMLv2's attributes, from one header per frame
    (the frames of an array have the same keys)."""
    keys = list(headers[0])
    return {key: [header[key] for header in headers] for key in keys}


def write_store(path, content, chunk=15):
    """Write an SDOMLv2 store: `content` is {year: {array: (N x S x S data, {key: [N
    values]})}}; zarr format 2, chunks of `chunk` frames, Blosc zstd with bit shuffle."""
    import zarr
    from numcodecs import Blosc
    compressor = Blosc(cname='zstd', clevel=5, shuffle=Blosc.BITSHUFFLE)
    root = zarr.open_group(str(path), mode='w-', zarr_format=2)
    for year, arrays in sorted(content.items()):
        group = root.create_group(str(year))
        for name, (data, attributes) in arrays.items():
            data = np.asarray(data, dtype=np.float32)
            array = group.create_array(name, shape=data.shape, dtype='f4',
                                       chunks=(chunk,) + data.shape[1:],
                                       compressors=compressor, fill_value=0.0)
            array[...] = data
            array.attrs.update(attributes)
    return str(path)


def shuffled_content(frames, rng, shared=()):
    """Frames as write_store's content, each array's frames in a shuffled order (the arrays
    named in `shared` in one order: HMI's components of a frame share its index)."""
    content = {}
    for year, arrays in frames.years.items():
        content[year] = {}
        common = None
        for name, (images, headers) in arrays.items():
            if name in shared and common is not None:
                order = common
            else:
                order = rng.permutation(len(images))
                common = order if name in shared else common
            content[year][name] = (np.stack([images[i] for i in order]),
                                   attribute_lists([headers[i] for i in order]))
    return content


def make_stores(out_dir, size=64, first_month='2011-11', months=6, days=2, frames=3,
                passbands=DEFAULT_PASSBANDS, missing=0, chunk=15, seed=SEED):
    """Write OUT_DIR/aia.zarr and OUT_DIR/hmi.zarr; returns their paths."""
    unknown = [name for name in passbands if name not in PASSBANDS]
    if unknown:
        raise UserError(f'no passband {unknown[0]} in the sample: {" ".join(PASSBANDS)}')
    paths = [os.path.join(out_dir, name) for name in ('aia.zarr', 'hmi.zarr')]
    held = [path for path in paths if os.path.exists(path)]
    if held:
        raise UserError(f'{held[0]} exists; give a new OUT_DIR or remove it')
    aia, hmi = draw_frames(size, first_month, months, days, frames, tuple(passbands), missing,
                           seed)
    rng = np.random.default_rng([seed, 1])
    os.makedirs(out_dir, exist_ok=True)
    write_store(paths[0], shuffled_content(aia, rng), chunk)
    write_store(paths[1], shuffled_content(hmi, rng, shared=HMI_ARRAYS), chunk)
    return tuple(paths)


def folder_size(path):
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('out_dir', metavar='OUT_DIR', help='folder for aia.zarr and hmi.zarr')
    p.add_argument('--size', type=int, default=64, help='frame height and width (px)')
    p.add_argument('--frames', type=int, default=3, help='HMI frames a day')
    p.add_argument('--days', type=int, default=2, help='observing days a month')
    p.add_argument('--months', type=int, default=6, help='months')
    p.add_argument('--first_month', default='2011-11', help='first month, YYYY-MM')
    p.add_argument('--passbands', nargs='+', default=list(DEFAULT_PASSBANDS),
                   choices=list(PASSBANDS), metavar='PASSBAND', help='AIA arrays to write')
    p.add_argument('--missing', type=int, default=0,
                   help='HMI frames whose last passband frame is left out')
    p.add_argument('--chunk', type=int, default=15, help='frames a chunk')
    p.add_argument('--seed', type=int, default=SEED, help='seed of every draw')
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    if min(a.size, a.frames, a.days, a.months, a.chunk) < 1 or a.missing < 0:
        raise UserError('--size, --frames, --days, --months and --chunk must be positive')
    paths = make_stores(a.out_dir, a.size, a.first_month, a.months, a.days, a.frames,
                        a.passbands, a.missing, a.chunk, a.seed)
    n_hmi = a.months * a.days * a.frames
    fewer = f', {a.missing} fewer of {a.passbands[-1]}' if a.missing else ''
    print(f'wrote {paths[0]} ({" ".join(a.passbands)}: {2 * n_hmi} frames each{fewer}; '
          f'{folder_size(paths[0]) / 1e6:.1f} MB) and {paths[1]} ({" ".join(HMI_ARRAYS)}: '
          f'{n_hmi} frames each; {folder_size(paths[1]) / 1e6:.1f} MB)')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
