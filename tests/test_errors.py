"""Bad input: every mistake a user can make with the data, the options or the checkpoints
ends with exit status 2 and one line on stderr that says what to fix, never a traceback."""
import os

import numpy as np
import torch
from astropy.io import fits

from conftest import (TINY, assert_usage_error, make_pairs, run_test, run_train, train_opt)
from pix2pixCC_Networks import Generator

NPY = ['--data_format_input', 'npy', '--data_format_target', 'npy', '--n_epochs', '1']


def train_args(input_dir, target_dir, *extra):
    return TINY + NPY + ['--input_dir_train', input_dir, '--target_dir_train', target_dir,
                         *extra]


def test_missing_input_directory(tmp_path):
    _, target_dir = make_pairs(tmp_path, 'npy', n=2)
    proc = run_train(train_args(str(tmp_path / 'nowhere'), target_dir), cwd=tmp_path)
    assert_usage_error(proc, 'nowhere')
    assert not os.path.exists(tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model' / '1_G.pt')


def test_no_files_of_the_extension_lists_what_is_there(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'fits', n=2)
    proc = run_train(train_args(input_dir, target_dir), cwd=tmp_path)  # says npy, has fits
    assert_usage_error(proc, '.npy', '.fits')


def test_file_counts_differ(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=3)
    os.remove(os.path.join(target_dir, 'img_002.npy'))
    proc = run_train(train_args(input_dir, target_dir), cwd=tmp_path)
    assert_usage_error(proc, '3', '2')


def test_channel_count_mismatch(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=2, channels=3, target_channels=1)
    proc = run_train(train_args(input_dir, target_dir), cwd=tmp_path)  # --input_ch 1
    assert_usage_error(proc, 'img_000.npy')


def test_truncated_fits_file(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'fits', n=4)
    bad = os.path.join(input_dir, 'img_003.fits')
    content = open(bad, 'rb').read()
    with open(bad, 'wb') as f:
        f.write(content[:len(content) // 2])
    proc = run_train(TINY + ['--data_format_input', 'fits', '--data_format_target', 'fits',
                             '--input_dir_train', input_dir, '--target_dir_train', target_dir,
                             '--n_epochs', '1'], cwd=tmp_path)
    assert_usage_error(proc, 'img_003.fits')


def test_size_not_a_multiple_of_the_strides_in_training(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=2, size=30)
    proc = run_train(train_args(input_dir, target_dir), cwd=tmp_path)
    assert_usage_error(proc, '30')


def test_input_and_target_sizes_differ(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=2, size=32)
    np.save(os.path.join(target_dir, 'img_001.npy'), np.zeros((64, 64), np.float32))
    proc = run_train(train_args(input_dir, target_dir), cwd=tmp_path)
    assert_usage_error(proc, 'img_001.npy')


def test_bad_limits_on_the_command_line(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'npy', n=2)
    proc = run_train(train_args(input_dir, target_dir, '--saturation_lower_limit_target', '5',
                                '--saturation_upper_limit_target', '5'), cwd=tmp_path)
    assert_usage_error(proc, '--saturation_lower_limit_target')
    proc = run_train(train_args(input_dir, target_dir, '--logscale_target', 'True'), cwd=tmp_path)
    assert_usage_error(proc, '--logscale_target')


def test_test_without_any_checkpoint(tmp_path):
    input_dir, _ = make_pairs(tmp_path, 'npy', n=1)
    proc = run_test(TINY + ['--data_format_input', 'npy', '--data_format_target', 'npy',
                            '--input_dir_test', input_dir], cwd=tmp_path)
    assert_usage_error(proc, 'checkpoint')


def test_test_missing_input_directory(tmp_path):
    opt = train_opt()
    os.makedirs(tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model')
    torch.save(Generator(opt).state_dict(), tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model' /
               '1_G.pt')
    proc = run_test(TINY + ['--data_format_input', 'npy', '--input_dir_test',
                            str(tmp_path / 'absent')], cwd=tmp_path)
    assert_usage_error(proc, 'absent')


def test_test_with_a_checkpoint_of_another_network(tmp_path):
    input_dir, _ = make_pairs(tmp_path, 'npy', n=1)
    os.makedirs(tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model')
    torch.save(Generator(train_opt('--n_gf', '16')).state_dict(),
               tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model' / '1_G.pt')
    proc = run_test(TINY + ['--data_format_input', 'npy', '--data_format_target', 'npy',
                            '--input_dir_test', input_dir, '--iteration', '1'], cwd=tmp_path)
    assert_usage_error(proc, '1_G.pt', 'n_gf')


def test_test_with_a_truncated_checkpoint(tmp_path):
    input_dir, _ = make_pairs(tmp_path, 'npy', n=1)
    model_dir = tmp_path / 'checkpoints' / 'pix2pixCC' / 'Model'
    os.makedirs(model_dir)
    torch.save(Generator(train_opt()).state_dict(), model_dir / '1_G.pt')
    content = (model_dir / '1_G.pt').read_bytes()
    (model_dir / '1_G.pt').write_bytes(content[:len(content) // 2])
    proc = run_test(TINY + ['--data_format_input', 'npy', '--data_format_target', 'npy',
                            '--input_dir_test', input_dir, '--iteration', '1'], cwd=tmp_path)
    assert_usage_error(proc, '1_G.pt')


def test_fits_without_image_data(tmp_path):
    input_dir, target_dir = make_pairs(tmp_path, 'fits', n=2)
    fits.HDUList([fits.PrimaryHDU()]).writeto(os.path.join(input_dir, 'img_001.fits'),
                                              overwrite=True)
    proc = run_train(TINY + ['--data_format_input', 'fits', '--data_format_target', 'fits',
                             '--input_dir_train', input_dir, '--target_dir_train', target_dir,
                             '--n_epochs', '1'], cwd=tmp_path)
    assert_usage_error(proc, 'img_001.fits')
