"""README "Sharing a model and running it elsewhere", ONNX: ONNX Runtime (CPU) gives the
generator's output to 1e-4 of its range for every network option and size; `--export onnx`
writes the model with the metadata the README documents; deploy/onnx_translate.py, without
torch, writes the Test script's products, headers included."""
import json
import os
import re
import shutil

import numpy as np
import onnxruntime
import pytest
import torch
from astropy.io import fits

from machinery import sharing
from conftest import (REPO, SAMPLE, SAMPLE_DATA, TINY, TINY_NETWORK, aia_cube_header, assert_ok,
                      assert_usage_error, blocked, field, make_test_opt, run_in, run_script,
                      run_train, write_user_file)
from pix2pixCC_Networks import Generator, weights_init

TRANSLATE = os.path.join(REPO, 'deploy', 'onnx_translate.py')
TOLERANCE = 1e-4  # of the output's range
RUN, STEP = 'onnx', 8


# ----------------------------------------------------------------------------------------
# ONNX Runtime against PyTorch
# ----------------------------------------------------------------------------------------


def random_generator(opt, seed=0):
    """A Generator of `opt` with the published initialisation and random biases, in eval
    mode; BatchNorm's running statistics are those of a few random inputs, as training
    leaves them (statistics far from the activations' would give an almost constant output,
    whose range says nothing)."""
    torch.manual_seed(seed)
    G = Generator(opt)
    G.apply(weights_init)
    with torch.no_grad():
        for module in G.modules():
            if getattr(module, 'bias', None) is not None:
                module.bias.normal_(0, 0.1)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # (a plain mean over the batches below)
        G.train()(torch.rand(4, opt.input_ch, 64, 64) * 2 - 1)
    return G.eval()


def onnx_session(G, opt):
    data = sharing.onnx_graph(G, opt)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(data, options, providers=['CPUExecutionProvider'])


def relative_difference(G, session, channels, height, width, seed=1):
    """Largest |ONNX Runtime - PyTorch| over the range of PyTorch's output, for a random
    normalised input of (1, channels, height, width)."""
    x = torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(seed))
    x = x * 2 - 1
    with torch.no_grad():
        expected = G(x).numpy()
    output = session.run(None, {'input': x.numpy()})[0]
    assert output.shape == expected.shape
    return float(np.abs(output - expected).max() / np.ptp(expected))


NETWORKS = [(norm, trans_conv, padding, channels)
            for norm in ('InstanceNorm2d', 'BatchNorm2d') for trans_conv in (True, False)
            for padding in ('reflection', 'replication', 'zero') for channels in (1, 3)]


@pytest.mark.parametrize('norm, trans_conv, padding, channels', NETWORKS)
def test_onnx_runtime_gives_pytorchs_output_at_64_and_256(norm, trans_conv, padding, channels):
    opt = make_test_opt(norm_type=norm, trans_conv=trans_conv,
                        padding_type=padding, input_ch=channels, target_ch=channels)
    G = random_generator(opt)
    session = onnx_session(G, opt)  # traced at 16 x 16: height and width are dynamic
    for height, width in ((64, 64), (256, 256), (64, 96)):
        assert relative_difference(G, session, channels, height, width) <= TOLERANCE, \
            (height, width)


@pytest.mark.parametrize('norm, trans_conv, padding, channels', [
    ('InstanceNorm2d', False, 'reflection', 3), ('BatchNorm2d', True, 'replication', 1)])
def test_onnx_runtime_gives_pytorchs_output_at_1024(norm, trans_conv, padding, channels):
    """At full resolution, where InstanceNorm's statistics run over a million pixels."""
    opt = make_test_opt(norm_type=norm, trans_conv=trans_conv,
                        padding_type=padding, input_ch=channels, target_ch=channels)
    G = random_generator(opt)
    assert relative_difference(G, onnx_session(G, opt), channels, 1024, 1024) <= TOLERANCE


# ----------------------------------------------------------------------------------------
# --export onnx
# ----------------------------------------------------------------------------------------


def copy_sample_inputs(folder, n):
    os.makedirs(folder)
    source = os.path.join(SAMPLE, 'Test', 'Input')
    for name in sorted(os.listdir(source))[:n]:
        shutil.copy(os.path.join(source, name), folder)
    return str(folder)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run on 8 sample FITS pairs (step 8) and its ONNX export."""
    root = tmp_path_factory.mktemp('onnx_run')
    train_in = copy_sample_inputs(root / 'Train' / 'Input', 8)
    train_tg = root / 'Train' / 'Target'
    os.makedirs(train_tg)
    for name in sorted(os.listdir(os.path.join(SAMPLE, 'Train', 'Target')))[:8]:
        shutil.copy(os.path.join(SAMPLE, 'Train', 'Target', name), train_tg)
    assert_ok(run_train(TINY + SAMPLE_DATA + [
        '--dataset_name', RUN, '--n_epochs', '1', '--save_freq', str(STEP), '--seed', '1',
        '--n_workers', '0', '--input_dir_train', train_in, '--target_dir_train', train_tg],
        cwd=root))
    assert run_in(root, ['--dataset_name', RUN, '--iteration', str(STEP), '--export',
                         'onnx']) == 0
    return dict(root=root, model=root / 'checkpoints' / RUN / 'Export' / f'{RUN}_{STEP}.onnx')


def metadata(path):
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    props = session.get_modelmeta().custom_metadata_map
    return props, json.loads(props['pix2pixCC'])


def test_the_export_carries_what_a_pipeline_needs(trained):
    props, record = metadata(trained['model'])
    assert (props['run'], props['step'], props['unit'], props['size_multiple']) == \
        (RUN, str(STEP), 'G', '4')
    assert record['scaling']['input'] == [dict(lower=1.0, upper=200.0, clip=False, log=True,
                                               offset=np.log10(200) / 2,
                                               scale=np.log10(200) / 2, nan=1.0)]
    assert record['scaling']['target'] == [dict(lower=-3000.0, upper=3000.0, clip=True,
                                                log=False, offset=0.0, scale=3000.0, nan=0.0)]
    assert record['fits']['identity']['BUNIT'] == 'G'
    session = onnxruntime.InferenceSession(str(trained['model']),
                                           providers=['CPUExecutionProvider'])
    assert [(i.name, i.shape) for i in session.get_inputs()] == \
        [('input', ['batch', 1, 'height', 'width'])]


def readme_example():
    """The README's onnxruntime example (physical input -> physical output)."""
    with open(os.path.join(REPO, 'README.md')) as f:
        section = f.read().split('\n### ONNX\n', 1)[1].split('\n### ', 1)[0]
    return re.search(r'```python\n(.*?)```', section, re.DOTALL).group(1)


def test_the_readme_example_gives_the_test_scripts_product(trained, tmp_path):
    root = trained['root']
    inputs = copy_sample_inputs(tmp_path / 'inputs', 1)
    assert run_in(root, ['--dataset_name', RUN, '--iteration', str(STEP), '--input_dir_test',
                         inputs, '--output_dir', str(tmp_path / 'test')]) == 0
    name = os.listdir(inputs)[0]
    code = readme_example().replace('EUV2Mag_sample_2560.onnx', str(trained['model'])) \
        .replace('sun_0032.fits', os.path.join(inputs, name))
    namespace = {}
    exec(code, namespace)
    expected = fits.getdata(tmp_path / 'test' / name.replace('.fits', '_AI.fits'))
    assert np.abs(namespace['gauss'] - expected).max() <= TOLERANCE * np.ptp(expected)


def test_export_again_keeps_the_file_and_refuses_another(trained, capsys):
    root, model = trained['root'], trained['model']
    before = model.read_bytes()
    argv = ['--dataset_name', RUN, '--iteration', str(STEP), '--export', 'onnx']
    assert run_in(root, argv) == 0
    assert 'left as it is' in capsys.readouterr().out
    assert run_in(root, argv + ['--save_scale', '1000']) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert model.read_bytes() == before


def test_export_needs_onnx_and_says_how_to_install_it(trained, tmp_path):
    proc = run_script(os.path.join(REPO, 'pix2pixCC_Test.py'), [
        '--gpu_ids', '-1', '--dataset_name', RUN, '--iteration', str(STEP), '--export', 'onnx',
        '--overwrite'], trained['root'], PYTHONPATH=blocked(tmp_path, 'onnx'))
    assert_usage_error(proc, 'onnx is missing', 'pip install onnx onnxruntime')


# ----------------------------------------------------------------------------------------
# deploy/onnx_translate.py
# ----------------------------------------------------------------------------------------


def translate(args, cwd, tmp_path):
    """Run the translator as a user would, where torch cannot be imported."""
    return run_script(TRANSLATE, [*args, '--threads', '1'], cwd,
                      PYTHONPATH=blocked(tmp_path, 'torch'))


def assert_same_products(test_dir, onnx_dir):
    """Every product of `onnx_dir` has the Test script's data to 1e-4 of its range and its
    header card for card, plus one HISTORY line naming the translator."""
    names = sorted(name for name in os.listdir(test_dir) if name.endswith('_AI.fits'))
    assert names and sorted(os.listdir(onnx_dir)) == names
    for name in names:
        with fits.open(os.path.join(test_dir, name)) as a, \
                fits.open(os.path.join(onnx_dir, name)) as b:
            expected, got = a[0].data, b[0].data
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert np.abs(got - expected).max() <= TOLERANCE * np.ptp(expected), name
            cards = [tuple(card) for card in b[0].header.cards]
            assert cards[:-1] == [tuple(card) for card in a[0].header.cards], name
            assert cards[-1][0] == 'HISTORY' and 'onnx_translate.py' in cards[-1][1]


def sample_inputs_with_odd_and_real_files(folder):
    """Three sample inputs, one cut to 50 x 46 (not a multiple of 4), and sunpy's real AIA
    level-1 file with its archive header."""
    inputs = copy_sample_inputs(folder, 3)
    first = sorted(os.listdir(inputs))[0]
    with fits.open(os.path.join(inputs, first)) as hdul:
        fits.PrimaryHDU(hdul[0].data[:50, :46], hdul[0].header).writeto(
            os.path.join(inputs, 'odd_size.fits'))
    import sunpy.data.test
    shutil.copy(os.path.join(os.path.dirname(sunpy.data.test.__file__), 'aia_171_level1.fits'),
                inputs)
    return inputs


def test_the_translator_writes_the_test_scripts_products_without_torch(trained, tmp_path):
    root = trained['root']
    inputs = sample_inputs_with_odd_and_real_files(tmp_path / 'inputs')
    assert run_in(root, ['--dataset_name', RUN, '--iteration', str(STEP), '--input_dir_test',
                         inputs, '--output_dir', str(tmp_path / 'test')]) == 0
    proc = translate(['--model', trained['model'], '--input_dir', inputs, '--output_dir',
                      tmp_path / 'onnx'], root, tmp_path)
    assert_ok(proc)
    assert '5 file(s) written' in proc.stdout
    assert_same_products(tmp_path / 'test', tmp_path / 'onnx')


def cube_run(root, channels_last):
    """A run of 3 passbands to 3 channels with per-channel limits (a random generator, no
    training), exported to ONNX, and two 32 x 32 AIA-like cubes (channel axis first, or last
    with the WCS axes rolled) with their archive cards; returns (model, inputs, Test argv)."""
    argv = [*TINY_NETWORK, '--dataset_name', 'cube', '--iteration', '3', '--input_ch', '3',
            '--target_ch', '3', '--data_format_input', 'fits', '--data_format_target', 'fits',
            '--saturation_lower_limit_input', '0', '--saturation_upper_limit_input', '100',
            '200', '300', '--saturation_lower_limit_target', '-10', '-20', '-30',
            '--target_unit', 'G']
    opt = make_test_opt(*argv)
    os.makedirs(os.path.join(root, 'checkpoints', 'cube', 'Model'))
    torch.save(random_generator(opt).state_dict(),
               os.path.join(root, 'checkpoints', 'cube', 'Model', '3_G.pt'))
    assert run_in(root, argv + ['--export', 'onnx']) == 0
    inputs = os.path.join(root, 'inputs')
    os.makedirs(inputs)
    for i in range(2):
        data = field(3, 0, 100, seed=i, size=32)
        header = aia_cube_header(32, channels_last=channels_last)
        write_user_file(os.path.join(inputs, f'cube_{i}.fits'),
                        np.moveaxis(data, 0, -1) if channels_last else data, 'fits',
                        header=header)
    return os.path.join(root, 'checkpoints', 'cube', 'Export', 'cube_3.onnx'), inputs, argv


@pytest.mark.parametrize('channels_last', [False, True])
def test_the_translator_writes_multi_channel_products_and_their_wcs(tmp_path, channels_last):
    model, inputs, argv = cube_run(tmp_path, channels_last)
    assert run_in(tmp_path, argv + ['--input_dir_test', inputs, '--output_dir',
                                    str(tmp_path / 'test')]) == 0
    assert_ok(translate(['--model', model, '--input_dir', inputs, '--output_dir',
                         tmp_path / 'onnx'], tmp_path, tmp_path))
    assert_same_products(tmp_path / 'test', tmp_path / 'onnx')
    with fits.open(tmp_path / 'onnx' / 'cube_0_AI.fits') as hdul:
        assert hdul[0].header['CTYPE3'] == 'CHANNEL'  # (the passband axis replaced)


def test_the_translator_keeps_or_refuses_existing_products(trained, tmp_path):
    root = trained['root']
    inputs = copy_sample_inputs(tmp_path / 'inputs', 2)
    out = tmp_path / 'onnx'
    args = ['--model', trained['model'], '--input_dir', inputs, '--output_dir', out]
    assert_ok(translate(args, root, tmp_path))
    first = sorted(os.listdir(out))[0]
    (out / first).write_bytes(b'kept')  # a product a user has already
    assert_usage_error(translate(args, root, tmp_path), '--skip_existing', '--overwrite')
    proc = translate(args + ['--skip_existing'], root, tmp_path)
    assert_ok(proc)
    assert '0 file(s) written' in proc.stdout and (out / first).read_bytes() == b'kept'
    assert_ok(translate(args + ['--overwrite'], root, tmp_path))
    assert (out / first).read_bytes() != b'kept'


def test_the_translator_refuses_other_files_and_names_missing_packages(trained, tmp_path):
    inputs = copy_sample_inputs(tmp_path / 'inputs', 1)
    not_onnx = tmp_path / 'model.onnx'
    not_onnx.write_bytes(b'not a model')
    assert_usage_error(translate(['--model', not_onnx, '--input_dir', inputs, '--output_dir',
                                  tmp_path / 'out'], tmp_path, tmp_path),
                       'not a readable ONNX model')
    proc = run_script(TRANSLATE, ['--model', trained['model'], '--input_dir', inputs,
                                  '--output_dir', tmp_path / 'out'], tmp_path,
                      PYTHONPATH=blocked(tmp_path, 'onnxruntime'))
    assert_usage_error(proc, 'onnxruntime is missing', 'pip install onnxruntime')


@pytest.mark.parametrize('change, problem', [
    (lambda r: r['fits'].update(extension='../../escape'), 'product extension'),
    (lambda r: r.update(input_channels='1'), 'channel counts'),
    (lambda r: r['scaling']['input'][0].update(scale='x'), 'scaling'),
    (lambda r: r['fits']['identity'].update(BUNIT=['G']), 'header cards'),
])
def test_the_translator_refuses_metadata_it_did_not_write(trained, tmp_path, change, problem):
    """A shared model is data from elsewhere: its extension (part of every product's path)
    and cards are checked before anything is written."""
    import onnx
    model = onnx.load(str(trained['model']))
    props = {prop.key: prop for prop in model.metadata_props}
    record = json.loads(props['pix2pixCC'].value)
    change(record)
    props['pix2pixCC'].value = json.dumps(record)
    edited = tmp_path / 'edited.onnx'
    onnx.save(model, str(edited))
    inputs = copy_sample_inputs(tmp_path / 'inputs', 1)
    assert_usage_error(translate(['--model', edited, '--input_dir', inputs, '--output_dir',
                                  tmp_path / 'out'], tmp_path, tmp_path),
                       'not an ONNX model this code exported', problem)
    assert not os.path.exists(tmp_path / 'out')
