"""Utilities: device choice, precision, atomic writes, checkpoints, the step-crossing rule."""
import os

import numpy as np
import pytest
import torch

from conftest import train_opt
from pix2pixCC_Networks import Discriminator, Generator
from pix2pixCC_Options import UserError
from pix2pixCC_Train import crossed
from pix2pixCC_Utils import (atomic_path, load_state_dict, save_state_dict, saved_steps,
                             to_preview)


def test_atomic_path(tmp_path):
    target = tmp_path / 'out.npy'
    with atomic_path(str(target)) as temporary:
        assert temporary.endswith('.npy') and temporary != str(target)
        np.save(temporary, np.arange(3))
        assert not target.exists()
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_path(str(tmp_path / 'bad.npy')) as temporary:
            np.save(temporary, np.arange(3))
            raise RuntimeError('killed mid-write')
    assert sorted(os.listdir(tmp_path)) == ['out.npy']  # nothing partial, no temporary left


def test_state_dict_round_trip_and_prefix(tmp_path):
    torch.manual_seed(0)
    opt = train_opt()
    G = Generator(opt)
    path = str(tmp_path / '5_G.pt')
    save_state_dict(torch.nn.DataParallel(G), path)  # the wrapper's prefix is not saved
    state = torch.load(path, weights_only=True)
    assert set(state) == set(G.state_dict()) and not any(k.startswith('module.') for k in state)
    G2 = Generator(opt)
    load_state_dict(G2, path)
    for key, value in G.state_dict().items():
        assert torch.equal(value, G2.state_dict()[key])
    # A 'module.'-prefixed checkpoint (saved from a wrapper) loads too.
    torch.save({'module.' + k: v for k, v in G.state_dict().items()}, path)
    load_state_dict(Generator(opt), path)


def test_load_state_dict_mismatch_is_a_user_error(tmp_path):
    path = str(tmp_path / '1_G.pt')
    save_state_dict(Generator(train_opt('--n_gf', '16')), path)
    with pytest.raises(UserError) as error:
        load_state_dict(Generator(train_opt()), path)
    assert '--n_gf' in str(error.value) and '\n' not in str(error.value)
    save_state_dict(Generator(train_opt('--n_residual', '2')), path)
    with pytest.raises(UserError):
        load_state_dict(Generator(train_opt()), path)
    save_state_dict(Discriminator(train_opt('--n_D', '2')), path)
    with pytest.raises(UserError):
        load_state_dict(Discriminator(train_opt()), path)
    (tmp_path / 'junk_G.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError):
        load_state_dict(Generator(train_opt()), str(tmp_path / 'junk_G.pt'))


def test_saved_steps(tmp_path):
    for name in ['10_G.pt', '2_G.pt', '100_G.pt', '10_D.pt', 'x_G.pt', '5_G.pt.tmp', '7_D.pt']:
        (tmp_path / name).write_bytes(b'')
    assert saved_steps(str(tmp_path)) == [2, 10, 100]
    assert saved_steps(str(tmp_path), 'D') == [7, 10]
    assert saved_steps(str(tmp_path / 'missing')) == []


@pytest.mark.parametrize('previous, current, frequency, expected', [
    (0, 2, 3, False), (2, 4, 3, True), (4, 6, 3, True), (6, 8, 3, False), (8, 10, 3, True),
    (0, 1, 1, True), (99, 100, 100, True), (100, 101, 100, False), (0, 250, 100, True),
])
def test_crossed(previous, current, frequency, expected):
    assert crossed(previous, current, frequency) is expected


def test_every_multiple_triggers_whatever_the_batch_size():
    for batch in (1, 2, 3, 4, 7):
        for frequency in (1, 3, 5, 10):
            steps = range(batch, 60 + 1, batch)
            fired = {step for step in steps if crossed(step - batch, step, frequency)}
            # Each multiple of the frequency triggers the first step that reaches it ...
            for multiple in range(frequency, steps[-1] + 1, frequency):
                assert -(-multiple // batch) * batch in fired, (batch, frequency, multiple)
            # ... and nothing else triggers.
            for step in fired:
                assert any(m % frequency == 0 for m in range(step - batch + 1, step + 1))


def test_to_preview():
    t = torch.tensor([[[-1.0, 0.0, 1.0, 3.0]]])
    np.testing.assert_array_equal(to_preview(t), [[0, 127, 255, 255]])
    np.testing.assert_array_equal(to_preview(t, display_scale=0.5), [[0, 63, 127, 255]])
    assert to_preview(torch.zeros(3, 4, 5)).shape == (4, 5, 3)
    assert to_preview(torch.zeros(2, 4, 5)).shape == (4, 10)
