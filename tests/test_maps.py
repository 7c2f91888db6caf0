"""README "Sharing a model and running it elsewhere", From Python, with sunpy maps: a model file
translates sunpy maps (machinery/maps.py) into the Test script's products, the same float32
data bit for bit and the same FITS header card for card: one map of the sample, a list of
maps for a three-channel input (and a list of maps for two target channels), sunpy's real
AIA level-1 file, the README's example; the refusals, and without sunpy one line naming what
to install."""
import os
import re
import shutil
import sys
import warnings

import numpy as np
import pytest
import sunpy.data.test
import sunpy.map
from astropy.io import fits
from astropy.wcs import WCS

from conftest import (AIA_IDENTITY, AIA_PLACE_AND_TIME, INPUT_ONLY, REPO, SAMPLE, SAMPLE_DATA,
                      TINY, assert_ok, blocked, field, formats_and_limits, run_command, run_in,
                      run_train)
from machinery.maps import load_model
from machinery.products import WCS_CARD
from pix2pixCC_Options import UserError

STEP = 8
AIA_FILE = os.path.join(os.path.dirname(sunpy.data.test.__file__), 'aia_171_level1.fits')


def train(root, run, input_dir, target_dir, *extra):
    """A tiny run of one epoch in `root` (one sample a step) and the model file of its end
    (--export model)."""
    step = len(os.listdir(input_dir))
    assert_ok(run_train(TINY + ['--dataset_name', run, '--n_epochs', '1', '--save_freq',
                                str(step), '--seed', '1', '--n_workers', '0',
                                '--input_dir_train', str(input_dir), '--target_dir_train',
                                str(target_dir), *extra], cwd=root))
    assert run_in(root, ['--dataset_name', run, '--iteration', str(step), '--export',
                         'model']) == 0
    return str(root / 'checkpoints' / run / 'Export' / f'{run}_{step}.pt')


def products_of(model, inputs, out, *extra):
    """Run the Test script from `model` on the folder `inputs`; {input file: product path}."""
    assert run_in(out.parent, ['--model', model, '--input_dir_test', str(inputs), '--output_dir',
                               str(out), *extra]) == 0
    return {name: str(out / f'{os.path.splitext(name)[0]}_AI.fits')
            for name in sorted(os.listdir(inputs))}


@pytest.fixture(scope='module')
def sample(tmp_path_factory):
    """The sample's model (8 pairs, step 8), the Test script's products of 3 sample test
    inputs and sunpy's AIA 171 level-1 file."""
    root = tmp_path_factory.mktemp('maps_sample')
    folders = {}
    for role in ('Input', 'Target'):
        folders[role] = root / 'Train' / role
        os.makedirs(folders[role])
        for name in sorted(os.listdir(os.path.join(SAMPLE, 'Train', role)))[:8]:
            shutil.copy(os.path.join(SAMPLE, 'Train', role, name), folders[role])
    model = train(root, 'sample', folders['Input'], folders['Target'], *SAMPLE_DATA)
    inputs = root / 'inputs'
    os.makedirs(inputs)
    for name in sorted(os.listdir(os.path.join(SAMPLE, 'Test', 'Input')))[:3]:
        shutil.copy(os.path.join(SAMPLE, 'Test', 'Input', name), inputs)
    shutil.copy(AIA_FILE, inputs)
    return dict(model=model, inputs=inputs, products=products_of(model, inputs,
                                                                   root / 'products'))


def cards(header):
    """(keyword, value, comment) of every card, in order, but the blank COMMENT and HISTORY
    lines: sunpy's FITS reader joins a file's COMMENT (HISTORY) lines into one text and strips
    it, so that of the file read with sunpy loses them as a map's header does (sunpy's AIA
    test file has a blank HISTORY line)."""
    return [(card.keyword, card.value, card.comment) for card in header.cards
            if not (card.keyword in ('COMMENT', 'HISTORY') and not card.value.strip())]


def assert_same_product(made, path):
    """`made` (a sunpy map) holds the product at `path`: its data bit for bit, its header
    card for card (value and comment; the file's storage cards SIMPLE, BITPIX, NAXISn,
    EXTEND are those of its float32 data, so they are compared too), and the map sunpy reads
    from the file."""
    with fits.open(path) as hdul:
        data, header = hdul[0].data, hdul[0].header
        assert made.data.dtype == np.float32 and made.data.shape == data.shape
        assert made.data.astype('<f4').tobytes() == data.astype('<f4').tobytes()
        assert cards(made.fits_header) == cards(header)
    read = sunpy.map.Map(path)
    assert type(made) is type(read) and dict(made.meta) == dict(read.meta)
    assert [tuple(card) for card in made.fits_header.cards] == \
        [tuple(card) for card in read.fits_header.cards]
    assert made.unit == read.unit and made.date == read.date
    assert made.reference_coordinate == read.reference_coordinate


def test_a_map_gives_the_test_scripts_product(sample):
    model = load_model(sample['model'], device='cpu')
    assert (model.run, model.step, model.input_channels, model.target_channels, model.unit) \
        == ('sample', STEP, 1, 1, 'G')
    names = [name for name in sample['products'] if name.startswith('sun_')]
    for name in names:
        made = model.translate(sunpy.map.Map(str(sample['inputs'] / name)), name=name)
        assert isinstance(made, sunpy.map.GenericMap)
        assert_same_product(made, sample['products'][name])
    # Without a name, the HISTORY line says where the product came from all the same.
    made = model.translate(sunpy.map.Map(str(sample['inputs'] / names[0])))
    assert 'pix2pixCC: generated from a sunpy map' in str(made.fits_header['HISTORY'])
    assert 'pix2pixCC: run sample, iteration 8' in str(made.fits_header['HISTORY'])


def test_sunpys_aia_file_gives_the_test_scripts_product(sample):
    """A real archive header (189 cards, int16 data with BSCALE and BZERO, COMMENT and
    HISTORY), given to a model of one input channel: the product's header rules (README
    "Output files") and the data of the Test script; its warnings about data unlike the
    training data, once per model."""
    model = load_model(sample['model'], device='cpu')
    aia = sunpy.map.Map(AIA_FILE)
    with pytest.warns(UserWarning, match=r'data unlike the training data \(unit\).*in DN'):
        made = model.translate(aia, name='aia_171_level1.fits')
    assert_same_product(made, sample['products']['aia_171_level1.fits'])
    header = made.fits_header
    assert header['ORIGIN'] == 'pix2pixCC' and header['BUNIT'] == 'G'
    assert header['INSTRUME'] == 'MAG-TOY' and 'WAVELNTH' not in header  # the targets'
    assert not {'EXPTIME', 'DATAMEAN', 'LVL_NUM', 'PIXLUNIT', 'QUALITY'} & set(header)
    # The input's place, time, observer and WCS (sunpy reads the product as a generic map
    # of the targets' instrument, not as an AIA map)
    assert made.dimensions == aia.dimensions
    for key in ('DATE-OBS', 'T_OBS', 'DSUN_OBS', 'HGLT_OBS', 'CRPIX1', 'CRVAL2', 'CDELT1',
                'CROTA2', 'CTYPE1', 'COMMENT'):
        assert made.meta[key] == aia.meta[key], key
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # said once
        model.translate(aia)


def test_options_win_over_the_files_as_on_the_command_line(sample, tmp_path):
    """save_scale and tile_size given to load_model are the Test script's --save_scale and
    --tile_size: the same product (here in tiles of 32 px, values in mG)."""
    inputs = tmp_path / 'inputs'
    os.makedirs(inputs)
    shutil.copy(AIA_FILE, inputs)
    expected = products_of(sample['model'], inputs, tmp_path / 'products', '--save_scale',
                           '1000', '--tile_size', '32')['aia_171_level1.fits']
    model = load_model(sample['model'], device='cpu', save_scale=1000, tile_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # (data unlike the training data, as above)
        made = model.translate(sunpy.map.Map(AIA_FILE), name='aia_171_level1.fits')
    assert_same_product(made, expected)
    assert made.fits_header['BUNIT'] == '10**-3 G'


def cube_header(size):
    """An AIA-like header of 3 passbands whose WCS describes the image plane only
    (WCSAXES = 2), as a list of one map per passband would give it."""
    header = fits.Header()
    for key, value in AIA_PLACE_AND_TIME + AIA_IDENTITY + INPUT_ONLY:
        header[key] = value
    header['CRPIX1'] = header['CRPIX2'] = (size + 1) / 2
    header['WCSAXES'] = 2
    header['BUNIT'] = 'DN/s'
    return header


@pytest.fixture(scope='module')
def passbands(tmp_path_factory):
    """A model of 3 input channels and 2 target channels, and the Test script's products of 2
    input cubes."""
    root = tmp_path_factory.mktemp('maps_passbands')
    folders = {role: root / role for role in ('Input', 'Target', 'inputs')}
    for folder in folders.values():
        os.makedirs(folder)
    target_header = fits.Header([('TELESCOP', 'SDO/HMI'), ('BUNIT', 'G')])
    for i in range(6):
        fits.PrimaryHDU(field(3, seed=i, size=32), cube_header(32)).writeto(
            folders['inputs' if i >= 4 else 'Input'] / f'cube_{i}.fits')
        if i < 4:
            fits.PrimaryHDU(field(2, seed=10 + i, size=32), target_header).writeto(
                folders['Target'] / f'cube_{i}.fits')
    model = train(root, 'passbands', folders['Input'], folders['Target'],
                  *formats_and_limits('fits'), '--input_ch', '3', '--target_ch', '2')
    return dict(model=model, inputs=folders['inputs'],
                products=products_of(model, folders['inputs'], root / 'products'))


def test_a_list_of_maps_one_per_input_channel(passbands):
    """Three maps (one per passband) give what the Test script gives for a cube of them, one
    map per target channel: each target channel's data bit for bit, and the header of a
    one-channel product (the file's third WCS axis, the channel, is the list's index)."""
    model = load_model(passbands['model'], device='cpu')
    for name, path in passbands['products'].items():
        cube = fits.getdata(passbands['inputs'] / name)
        header = fits.getheader(passbands['inputs'] / name)
        made = model.translate([sunpy.map.Map((cube[c], header)) for c in range(3)], name=name)
        assert isinstance(made, list) and len(made) == 2
        with fits.open(path) as hdul:
            data, product = hdul[0].data, hdul[0].header
        pixels = np.array([[0, 0], [31, 0], [0, 31], [15.5, 15.5]])
        for c, one in enumerate(made):
            assert one.data.astype('<f4').tobytes() == data[c].astype('<f4').tobytes()
            # Every card but those of the WCS and of the axes is the product's, in order,
            # but the two that astropy writes beside a WCS it rewrites (MJDREF, MJD-OBS):
            # the product's WCS, which has a channel axis, is rewritten (in degrees); the
            # map's is the input's image plane as it was, the same world coordinates.
            assert other_cards(one.fits_header) == \
                [card for card in other_cards(product) if card[0] not in ('MJDREF', 'MJD-OBS')]
            assert np.allclose(WCS(one.fits_header).wcs_pix2world(pixels, 0),
                               WCS(product).sub([1, 2]).wcs_pix2world(pixels, 0),
                               rtol=1e-12, atol=1e-12)
            assert (one.fits_header['BUNIT'], one.fits_header['TELESCOP']) == ('G', 'SDO/HMI')


def other_cards(header):
    """The cards of `header` but those of its WCS and its axes' lengths (NAXIS...)."""
    return [card for card in cards(header)
            if not WCS_CARD.fullmatch(card[0]) and not card[0].startswith('NAXIS')]


def test_what_translate_refuses(passbands, sample):
    model = load_model(passbands['model'], device='cpu')
    aia = sunpy.map.Map(AIA_FILE)
    with pytest.raises(UserError, match=r'takes 3 input channel\(s\), one map each; got 1'):
        model.translate(aia)
    small = sunpy.map.Map((aia.data[:64, :64], aia.meta))
    with pytest.raises(UserError, match='the maps differ in size'):
        model.translate([aia, aia, small])
    with pytest.raises(TypeError, match='a sunpy map or a list of them'):
        model.translate(aia.data)
    with pytest.raises(UserError, match=r'unrecognized arguments: --tile_sise 32; did you '
                                         r'mean --tile_size\?$'):
        load_model(sample['model'], device='cpu', tile_sise=32)
    with pytest.raises(UserError, match='is not a pix2pixCC model file'):
        load_model(os.path.join(str(sample['model']).rsplit('Export', 1)[0], 'Model',
                                f'{STEP}_G.pt'))


def readme_example():
    """The README's sunpy example."""
    with open(os.path.join(REPO, 'README.md')) as f:
        section = f.read().split('\n### From Python, with sunpy maps\n', 1)[1] \
            .split('\n### ', 1)[0]
    return re.search(r'```python\n(.*?)```', section, re.DOTALL).group(1)


def test_the_readme_example_gives_the_test_scripts_product(sample, tmp_path, monkeypatch):
    code = readme_example()
    assert len(code.strip().splitlines()) == 5
    name = next(name for name in sample['products'] if name.startswith('sun_'))
    shutil.copy(sample['inputs'] / name, tmp_path / 'sun_0032.fits')
    shutil.copy(sample['model'], tmp_path / 'EUV2Mag_sample_2560.pt')
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code, namespace)
    assert_same_product(namespace['magnetogram'], sample['products'][name])
    saved = fits.getdata(tmp_path / 'sun_0032_AI.fits')  # sunpy's save of the map
    assert np.array_equal(saved, fits.getdata(sample['products'][name]))


def test_without_sunpy_one_line_names_what_to_install(sample, tmp_path):
    code = f"from machinery.maps import load_model\nload_model({str(sample['model'])!r})"
    proc = run_command([sys.executable, '-c', code], REPO,
                       PYTHONPATH=os.pathsep.join([blocked(tmp_path, 'sunpy'), REPO]))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: machinery.maps translates sunpy maps and needs sunpy: "
        "pip install \"sunpy[map]\"")
