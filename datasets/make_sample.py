"""Make a small synthetic paired sample for pix2pixCC (EUV image -> magnetogram).

Each pair is a toy full-disk Sun, 64x64 px, disk radius 28 px, centred at
pixel (31.5, 31.5) (0-based), i.e. CRPIX = 32.5 in 1-based FITS terms.

Orientation convention (also written into every header as a COMMENT):
    array row index (y, FITS axis 2) increases to solar NORTH (+HPLT),
    array column index (x, FITS axis 1) increases to solar WEST  (+HPLN).
So with matplotlib's imshow(origin='lower') north is up and west is right.

Target (MAG-TOY, gauss, signed): line-of-sight magnetogram. Off-disk is 0.
  * quiet Sun: smoothed mixed-polarity noise, rms ~10 G;
  * 1-4 bipolar active regions at latitudes 5-35 deg N or S and
    longitudes within +-60 deg of central meridian.  Each is a pair of
    Gaussian blobs separated roughly east-west.  Hale's law: the leading
    (west, +x) polarity is POSITIVE in the north and NEGATIVE in the south.
    Joy's law: the leading blob sits slightly closer to the equator.
  * the radial field is projected on the line of sight (times mu = cos of
    the heliocentric angle) and clipped to +-3000 G.
Observer cards: RSUN_OBS 896", RSUN_REF 695700000 m (as sunpy uses), DSUN_OBS =
RSUN_REF / sin(RSUN_OBS) (about 1.07 AU: a toy distance, chosen for the disk's 28 px),
HGLN_OBS = HGLT_OBS = 0 (the toy Sun is drawn with B0 = 0), so that sunpy reads every
file, and the products made from the inputs, with a complete, consistent observer.
Input (EUV-TOY, 304 A, DN/s, strictly positive, clipped to [1, 200]):
  * dim disk (~12 at centre, ~20 at the limb: limb brightening),
  * faint corona off-disk (~3 at the limb decaying to 1),
  * bright plage that follows the smoothed unsigned field, ~ |B|^0.7,
  * 5 % multiplicative noise.
The input has no sign information: polarity must be inferred from the
hemisphere and the bipolar shape of the bright region.

Layout (file names match between Input and Target):
    <out>/Train/Input/sun_0000.fits ... <out>/Train/Target/sun_0000.fits ...
    <out>/Test/Input/sun_<n_train>.fits ...  <out>/Test/Target/...
Every pair i uses its own generator default_rng([SEED, i]), so the output is
deterministic and rerunning rewrites byte-identical files.

With --size S the frame is S x S px with the same Sun (R = 28/64 of the frame, RSUN_OBS
896"); with --passbands 3 each input is a 3 x S x S cube of toy 171, 193 and 304 A images
whose brightness differs by one to two orders of magnitude (PASSBANDS), as AIA's does.

Usage:  python datasets/make_sample.py [--out DIR] [--n_train 32] [--n_test 8]
                                       [--size 64] [--passbands 1]
"""
import argparse
import datetime
import os
from typing import NamedTuple

import numpy as np
from astropy.io import fits
from scipy.ndimage import gaussian_filter

SEED = 20110101
N = 64                     # image size (px)
R = 28.0                   # disk radius (px)
CDELT = 32.0               # arcsec / px
B_MAX = 3000.0             # |B| never exceeds this (G)
# The observer: the Sun's radius in metres as sunpy uses it (the IAU 2015 nominal value),
# and the distance at which it spans R * CDELT = 896" (1.07 AU: a toy, not the Earth's
# distance on the date), so that RSUN_OBS, RSUN_REF and DSUN_OBS agree and sunpy finds no
# "rsun mismatch". The toy Sun is drawn with its equator through the disk centre (B0 = 0),
# seen from the Earth's side: HGLN_OBS = HGLT_OBS = 0.
RSUN_REF = 695700000.0     # m
DSUN = RSUN_REF / np.sin(np.radians(R * CDELT / 3600.0))   # m
T0 = datetime.datetime(2011, 1, 1)



class Geometry:
    """The pixel grid of one image size: the disk keeps R = 28/64 of the frame and RSUN_OBS
    896", so --size 256 gives R = 112 px at 8"/px; lengths in px (active regions, smoothing)
    scale with the frame, so every size draws the same Sun."""

    def __init__(self, size=N):
        self.n = size
        self.scale = size / N                       # px lengths relative to the 64 px sample
        self.c = (size - 1) / 2.0
        self.r = R * self.scale
        self.cdelt = CDELT / self.scale
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        self.x, self.y = x, y
        self.rho = np.hypot(x - self.c, y - self.c) / self.r   # radius in units of R_sun
        self.on_disk = self.rho < 1.0
        self.mu = np.sqrt(np.clip(1.0 - self.rho ** 2, 0.0, 1.0))  # cos(heliocentric angle)


def blob(g, x0, y0, sigma):
    return np.exp(-((g.x - x0) ** 2 + (g.y - y0) ** 2) / (2.0 * sigma ** 2))


def active_region(g, rng):
    """One bipole (radial field, G) obeying Hale's and Joy's laws."""
    hemi = rng.choice([-1.0, 1.0])                    # +1 north, -1 south
    lat = np.radians(hemi * rng.uniform(5.0, 35.0))
    lon = np.radians(rng.uniform(-60.0, 60.0))
    xc = g.c + g.r * np.cos(lat) * np.sin(lon)        # orthographic projection
    yc = g.c + g.r * np.sin(lat)
    half = 0.5 * rng.uniform(4.0, 8.0) * g.scale      # half separation (px)
    tilt = 0.5 * abs(lat)                             # Joy's law: ~lat/2
    dx = half * np.cos(tilt) * np.cos(lon)            # E-W gets foreshortened
    dy = -hemi * half * np.sin(tilt)                  # leader nearer equator
    b_lead = rng.uniform(500.0, 2500.0)
    b_trail = b_lead * rng.uniform(0.6, 0.9)          # trailer weaker, wider
    s_lead = rng.uniform(1.3, 2.0) * g.scale
    s_trail = s_lead * rng.uniform(1.1, 1.5)
    lead = hemi * b_lead * blob(g, xc + dx, yc + dy, s_lead)     # Hale's law
    trail = -hemi * b_trail * blob(g, xc - dx, yc - dy, s_trail)
    return lead + trail


def magnetogram(g, rng):
    """Signed line-of-sight field (G); 0 off the disk."""
    quiet = gaussian_filter(rng.normal(0.0, 1.0, (g.n, g.n)), g.scale)
    b_r = 10.0 * quiet / quiet.std()
    for _ in range(rng.integers(1, 5)):
        b_r += active_region(g, rng)
    b_los = np.clip(b_r * g.mu, -B_MAX, B_MAX)        # radial field seen at mu
    return np.where(g.on_disk, b_los, 0.0)


class Passband(NamedTuple):
    """A toy EUV passband (DN/s): disk level and limb brightening, off-limb corona (level at
    the limb above the floor, its e-folding length in px of the 64 px sample), and plage
    brightness gain * |B|^power, clipped to [floor, ceiling]."""
    name: str
    wavelength: int
    disk: float
    limb: float
    floor: float
    corona: float
    corona_length: float
    gain: float
    power: float
    ceiling: float


# 304 is the one-channel sample's input; 171 and 193 are brighter by one to two orders of
# magnitude, as the AIA coronal passbands are, so each needs its own limits (--passbands 3).
PASSBANDS = {304: Passband('304-like', 304, 12.0, 8.0, 1.0, 2.0, 5.0, 1.3, 0.7, 200.0),
             171: Passband('171-like', 171, 400.0, 200.0, 20.0, 300.0, 10.0, 15.0, 0.8, 8000.0),
             193: Passband('193-like', 193, 800.0, 400.0, 50.0, 500.0, 10.0, 20.0, 0.8, 12000.0)}


def euv(g, b_los, rng, band=PASSBANDS[304]):
    """Positive EUV-like brightness (DN/s) that only sees |B|."""
    disk = band.disk + band.limb * (1.0 - g.mu)       # limb brightening
    corona = band.floor + band.corona * np.exp(-(g.rho - 1.0) * g.r
                                               / (band.corona_length * g.scale))
    base = np.where(g.on_disk, disk, corona)
    plage = band.gain * gaussian_filter(np.abs(b_los), 1.5 * g.scale) ** band.power
    img = (base + plage) * (1.0 + 0.05 * rng.normal(size=(g.n, g.n)))
    return np.clip(img, band.floor, band.ceiling)


def header(g, i, instrume, bunit, wavelengths=()):
    """One wavelength: the WAVELNTH card; several: a channel axis (FITS axis 3) whose name
    lists them in the cube's order."""
    h = fits.Header()
    h['TELESCOP'] = 'SYNTHETIC'
    h['INSTRUME'] = instrume
    if len(wavelengths) == 1:
        h['WAVELNTH'] = (wavelengths[0], 'angstrom')
        h['WAVEUNIT'] = 'angstrom'
    h['DATE-OBS'] = (T0 + datetime.timedelta(days=i)).isoformat()
    for ax, ctype in ((1, 'HPLN-TAN'), (2, 'HPLT-TAN')):
        h['CTYPE%d' % ax] = ctype
        h['CUNIT%d' % ax] = 'arcsec'
        h['CDELT%d' % ax] = g.cdelt
        h['CRPIX%d' % ax] = g.c + 1.0                 # FITS pixels are 1-based
        h['CRVAL%d' % ax] = 0.0
    if len(wavelengths) > 1:
        h['CTYPE3'] = 'CHANNEL'
        h['CNAME3'] = 'EUV passband: ' + ', '.join('%d A' % w for w in wavelengths)
        h['CRPIX3'], h['CRVAL3'], h['CDELT3'] = 1.0, 1.0, 1.0
    h['RSUN_OBS'] = (g.r * g.cdelt, 'arcsec')
    h['RSUN_REF'] = (RSUN_REF, 'm')
    h['DSUN_OBS'] = (DSUN, 'm, arcsin(RSUN_REF/DSUN_OBS) = RSUN_OBS')
    h['HGLN_OBS'] = (0.0, 'deg')
    h['HGLT_OBS'] = (0.0, 'deg, B0: the toy Sun is drawn with B0 = 0')
    h['BUNIT'] = bunit
    h['COMMENT'] = 'Synthetic pix2pixCC sample made by datasets/make_sample.py'
    h['COMMENT'] = 'seed %d, pair index %d' % (SEED, i)
    h['COMMENT'] = 'Row index increases to solar north, column index to west.'
    return h


def write(path, data, hdr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fits.PrimaryHDU(data.astype(np.float32), header=hdr).writeto(
        path, overwrite=True)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=os.path.join(here, 'Sample'))
    p.add_argument('--n_train', type=int, default=32)
    p.add_argument('--n_test', type=int, default=8)
    p.add_argument('--size', type=int, default=N,
                   help='image size in px (the disk keeps 28/64 of it)')
    p.add_argument('--passbands', type=int, choices=(1, 3), default=1,
                   help='1: a 304-like input; 3: 171-, 193- and 304-like channels (C x H x W)')
    a = p.parse_args()
    g = Geometry(a.size)
    wavelengths = (304,) if a.passbands == 1 else (171, 193, 304)
    for i in range(a.n_train + a.n_test):
        rng = np.random.default_rng([SEED, i])
        b = magnetogram(g, rng)
        # 304 first: the one-passband sample's draws are unchanged
        images = {w: euv(g, b, rng, PASSBANDS[w]) for w in (304,) + wavelengths[:-1]}
        img = np.stack([images[w] for w in wavelengths]) if a.passbands > 1 else images[304]
        split = 'Train' if i < a.n_train else 'Test'
        name = 'sun_%04d.fits' % i
        write(os.path.join(a.out, split, 'Input', name), img,
              header(g, i, 'EUV-TOY', 'DN/s', wavelengths))
        write(os.path.join(a.out, split, 'Target', name), b,
              header(g, i, 'MAG-TOY', 'G'))
    print('wrote %d pairs to %s' % (a.n_train + a.n_test, a.out))


if __name__ == '__main__':
    main()
