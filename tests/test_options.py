"""The options of both scripts, as README "Options" lists them (a test checks that the
table is complete): names, defaults, boolean parsing, derived values, the --help text, and
option errors (one line, exit status 2: the parser's side of README "What happens when…",
whose whole runs are in test_errors.py). What an option does to the networks, the data or
the outputs is tested where that behaviour lives.
"""
import argparse
import os
import re

import pytest

from conftest import REPO, TEST_SCRIPT, TINY, TRAIN_SCRIPT, assert_ok, assert_usage_error, \
    run_script, run_train
import pix2pixCC_Options
from pix2pixCC_Options import TrainOption, UserError, run_main, str2bool

# Not imported by its own name: pytest would try to collect a class named Test*.
TEST_OPTION = pix2pixCC_Options.TestOption

BASE_DEFAULTS = {
    'gpu_ids': '0', 'dataset_name': 'pix2pixCC',
    'data_format_input': 'tif', 'data_format_target': 'tif',
    'input_ch': 1, 'target_ch': 1, 'data_size': 1024,
    'logscale_input': False, 'logscale_target': False,
    'saturation_lower_limit_input': -1, 'saturation_upper_limit_input': 1,
    'saturation_lower_limit_target': -1, 'saturation_upper_limit_target': 1,
    'saturation_clip_input': False, 'saturation_clip_target': False,
    'batch_size': 1, 'n_downsample': 4, 'n_residual': 9, 'trans_conv': True,
    'n_D': 1, 'n_CC': 4, 'n_gf': 64, 'n_df': 64, 'data_type': 32, 'n_workers': 1,
    'norm_type': 'InstanceNorm2d', 'padding_type': 'replication', 'padding_size': 0,
    'max_rotation_angle': 0, 'report_freq': 100, 'save_freq': 10000, 'display_freq': 100,
    'save_scale': 1, 'display_scale': 1, 'image_mode': 'png', 'val_during_train': False,
}
TRAIN_DEFAULTS = {
    'input_dir_train': './datasets/Train/Input', 'target_dir_train': './datasets/Train/Target',
    'n_epochs': 150, 'latest_iter': 0, 'no_shuffle': False, 'lambda_LSGAN': 2.0,
    'lambda_FM': 10.0, 'lambda_CC': 5.0, 'ch_balance': 1, 'ccc': True, 'beta1': 0.5,
    'beta2': 0.999, 'lr': 0.0002,
}
TEST_DEFAULTS = {'input_dir_test': './datasets/Test/Input', 'iteration': -1,
                 'no_shuffle': True}

BOOLEAN_OPTIONS = ['logscale_input', 'logscale_target', 'saturation_clip_input',
                   'saturation_clip_target', 'trans_conv', 'val_during_train']


# ----------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('option_class, own_defaults', [(TrainOption, TRAIN_DEFAULTS),
                                                         (TEST_OPTION, TEST_DEFAULTS)])
def test_every_default_is_the_documented_one(option_class, own_defaults):
    opt = option_class().parse([])
    expected = {**BASE_DEFAULTS, **own_defaults}
    def differs(got, want):
        if isinstance(want, (bool, str)):
            return type(got) is not type(want) or got != want
        return isinstance(got, (bool, str)) or got != want
    wrong = {name: (getattr(opt, name, '<missing>'), value) for name, value in expected.items()
             if differs(getattr(opt, name, '<missing>'), value)}
    assert not wrong, f"(got, expected): {wrong}"
    # Booleans are real booleans, not strings.
    for name in BOOLEAN_OPTIONS:
        assert isinstance(getattr(opt, name), bool)


def test_train_only_and_test_only_options_are_separate():
    train, test = TrainOption().parse([]), TEST_OPTION().parse([])
    assert train.is_train is True and test.is_train is False
    assert not hasattr(test, 'lambda_CC') and not hasattr(test, 'n_epochs')
    assert not hasattr(train, 'iteration')


@pytest.mark.parametrize('option_class', [TrainOption, TEST_OPTION])
def test_the_published_is_train_flag_is_accepted_and_changes_nothing(option_class, capsys):
    """Published command lines carry --is_train; the script, not the flag, decides."""
    for text in ('True', 'False'):
        opt = option_class().parse(['--is_train', text])
        assert opt.is_train is (option_class is TrainOption)
    assert capsys.readouterr().err == ''


@pytest.mark.parametrize('option_class', [TrainOption, TEST_OPTION])
@pytest.mark.parametrize('typed, meant', [('--lamda_CC', '--lambda_CC'),
                                          ('--saturation_upper_limit_inpt',
                                           '--saturation_upper_limit_input'),
                                          ('--data_formt_input=fits', '--data_format_input')])
def test_a_mistyped_option_suggests_the_closest_one(option_class, typed, meant, capsys):
    with pytest.raises(SystemExit) as exit_info:
        option_class().parse([typed])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'unrecognized arguments' in lines[0]
    assert f'did you mean {meant}?' in lines[0], lines[0]


@pytest.mark.parametrize('option_class', [TrainOption, TEST_OPTION])
def test_parse_has_no_side_effects(option_class, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    option_class().parse(['--dataset_name', 'nothing_here'])
    assert os.listdir(tmp_path) == []


def test_readme_options_table_lists_every_option():
    """README "Options": every option of both scripts has a row."""
    with open(os.path.join(REPO, 'README.md')) as f:
        section = f.read().split('\n## Options\n', 1)[1].split('\n## ', 1)[0]
    first_cells = ' '.join(line.split('|')[1] for line in section.splitlines()
                           if line.startswith('|'))
    listed = set(re.findall(r'`(--\w+)', first_cells))
    options = {name for option_class in (TrainOption, TEST_OPTION)
               for name in option_class().parser.option_names}
    assert options - listed == set()


# ----------------------------------------------------------------------------------------
# Booleans (README "Differences from the reference code": the published type=bool made
# 'False' true)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('text, value', [
    ('True', True), ('False', False), ('true', True), ('false', False), ('1', True),
    ('0', False), ('yes', True), ('no', False), ('TRUE', True), ('FALSE', False)])
@pytest.mark.parametrize('name', BOOLEAN_OPTIONS)
def test_boolean_spellings(name, text, value):
    opt = TrainOption().parse([f'--{name}', text] +
                              (['--saturation_lower_limit_input', '1',
                                '--saturation_upper_limit_input', '2'] if name == 'logscale_input'
                               else []) +
                              (['--saturation_lower_limit_target', '1',
                                '--saturation_upper_limit_target', '2']
                               if name == 'logscale_target' else []))
    assert getattr(opt, name) is value


@pytest.mark.parametrize('name, option_class', [('ccc', TrainOption), ('no_shuffle', TrainOption),
                                                ('no_shuffle', TEST_OPTION)])
@pytest.mark.parametrize('text, value', [('False', False), ('True', True), ('0', False),
                                         ('yes', True)])
def test_train_and_test_booleans(name, option_class, text, value):
    assert getattr(option_class().parse([f'--{name}', text]), name) is value


def test_bare_boolean_flag_means_true():
    opt = TrainOption().parse(['--logscale_input', '--saturation_lower_limit_input', '1',
                               '--saturation_upper_limit_input', '10', '--saturation_clip_target',
                               '--val_during_train', '--no_shuffle'])
    assert opt.logscale_input is True and opt.saturation_clip_target is True
    assert opt.val_during_train is True and opt.no_shuffle is True
    # A bare flag followed by another option does not swallow that option.
    opt = TrainOption().parse(['--trans_conv', '--n_gf', '8'])
    assert opt.trans_conv is True and opt.n_gf == 8


@pytest.mark.parametrize('text', ['maybe', 'Flase', '2', 'none', ''])
def test_bad_boolean_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TrainOption().parse(['--trans_conv', text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert '--trans_conv' in lines[0]


def test_str2bool():
    assert str2bool(True) is True and str2bool(False) is False
    assert str2bool(' Yes ') is True and str2bool('N') is False
    with pytest.raises(argparse.ArgumentTypeError, match="got 'perhaps'"):
        str2bool('perhaps')


def test_bad_boolean_on_the_command_line_exits_2_with_one_line(tmp_path):
    proc = run_train(TINY + ['--logscale_input', 'perhaps'], cwd=tmp_path)
    assert_usage_error(proc, '--logscale_input', 'perhaps')
    assert not os.path.exists(tmp_path / 'checkpoints')


# ----------------------------------------------------------------------------------------
# Derived values and validation
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('data_type, eps', [('16', 1e-4), ('32', 1e-8)])
@pytest.mark.parametrize('option_class', [TrainOption, TEST_OPTION])
def test_eps_follows_data_type(option_class, data_type, eps):
    opt = option_class().parse(['--data_type', data_type])
    assert opt.data_type == int(data_type)
    assert opt.eps == eps


def test_data_type_other_than_16_or_32_is_rejected():
    with pytest.raises(SystemExit) as exit_info:
        TrainOption().parse(['--data_type', '8'])
    assert exit_info.value.code == 2


@pytest.mark.parametrize('option_class, subdir', [(TrainOption, 'Train'), (TEST_OPTION, 'Test')])
def test_output_folders(option_class, subdir):
    opt = option_class().parse(['--dataset_name', 'EUV2Mag'])
    assert os.path.normpath(opt.model_dir) == os.path.normpath('./checkpoints/EUV2Mag/Model')
    assert os.path.normpath(opt.image_dir) == \
        os.path.normpath(f'./checkpoints/EUV2Mag/Image/{subdir}')


@pytest.mark.parametrize('argv, fragment', [
    (['--saturation_lower_limit_input', '5', '--saturation_upper_limit_input', '5'],
     '--saturation_lower_limit_input'),
    (['--saturation_lower_limit_target', '3', '--saturation_upper_limit_target', '-3'],
     '--saturation_lower_limit_target'),
    (['--logscale_input', 'True'], '--logscale_input'),  # default lower limit -1
    (['--logscale_target', 'True', '--saturation_lower_limit_target', '0'], '--logscale_target'),
    (['--logscale_input', '--saturation_lower_limit_input', '-5',
      '--saturation_upper_limit_input', '100'], '--logscale_input'),
])
def test_invalid_limits_are_usage_errors(argv, fragment, capsys):
    for option_class in (TrainOption, TEST_OPTION):
        with pytest.raises(SystemExit) as exit_info:
            option_class().parse(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0], err


@pytest.mark.parametrize('value', ['0', 'nan', 'inf'])
def test_save_scale_must_be_a_non_zero_finite_number(value, capsys):
    """FITS outputs' BUNIT is the unit divided by --save_scale (README "Output files")."""
    for option_class in (TrainOption, TEST_OPTION):
        with pytest.raises(SystemExit) as exit_info:
            option_class().parse(['--save_scale', value])
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and '--save_scale must be a non-zero finite number' in lines[0]


def test_valid_log_limits_are_accepted():
    opt = TrainOption().parse(['--logscale_input', 'True', '--saturation_lower_limit_input', '1',
                               '--saturation_upper_limit_input', '200'])
    assert opt.logscale_input is True
    assert (opt.saturation_lower_limit_input, opt.saturation_upper_limit_input) == (1, 200)


def test_formats_are_case_insensitive_and_checked(capsys):
    opt = TrainOption().parse(['--data_format_input', 'FITS', '--data_format_target', 'Npy'])
    assert (opt.data_format_input, opt.data_format_target) == ('fits', 'npy')
    with pytest.raises(SystemExit) as exit_info:
        TrainOption().parse(['--data_format_input', 'gif'])
    assert exit_info.value.code == 2


def test_run_main_turns_user_error_into_one_line_and_status_2(capsys):
    def failing(argv):
        raise UserError('something the user must fix')
    assert run_main(failing, []) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'something the user must fix' in err

    def wrapped(argv):  # as re-raised from a DataLoader worker: message on the last line
        raise UserError('Caught UserError in DataLoader worker process 0.\nTraceback (most '
                        'recent call last):\n  File "x"\nUserError: bad file x.fits')
    assert run_main(wrapped, []) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'bad file x.fits' in err and 'Traceback' not in err

    assert run_main(lambda argv: 0, []) == 0


# ----------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------

GROUPS = ['data:', 'network:', 'augmentation:', 'checking:', 'training hyper-parameters:',
          'logging and saving:']


def help_entries(text):
    """{'--name': its help entry} of a --help text."""
    entries = re.split(r'\n  (?=--)', text.split('\n\n', 1)[1])
    return {entry.split()[0]: ' '.join(entry.split()) for entry in entries
            if entry.startswith('--')}


def help_sections(text):
    """{'section title:': [option names]} of a --help text."""
    sections = {}
    for block in text.split('\n\n')[1:]:
        title, _, body = block.partition('\n')
        sections[title] = re.findall(r'^  (--\w+)', body, re.MULTILINE)
    return sections


def test_train_help_groups_every_option_with_help_and_default(tmp_path):
    proc = run_script(TRAIN_SCRIPT, ['--help'], cwd=tmp_path)
    assert_ok(proc)
    positions = [proc.stdout.index('\n' + group + '\n') for group in GROUPS]
    assert positions == sorted(positions)
    entries = help_entries(proc.stdout)
    for name in vars(TrainOption().parse([])):
        if name in ('is_train', 'eps', 'checkpoint_dir', 'model_dir', 'image_dir'):
            continue  # derived, not options
        assert f'--{name}' in entries, name
        assert '(default:' in entries[f'--{name}'], entries[f'--{name}']
    assert '(default: tif)' in entries['--data_format_input']
    assert '(default: -1)' in entries['--saturation_lower_limit_input']
    assert '-1' in entries['--latest_iter'].split('(default')[0]
    sections = help_sections(proc.stdout)
    for name in ('--n_epochs_decay', '--keep_states', '--tensorboard', '--lr', '--n_epochs'):
        assert name in sections['training hyper-parameters:'], name
    assert '--max_rotation_angle' in sections['augmentation:']
    assert '--data_format_input' in sections['data:'] and '--n_gf' in sections['network:']
    assert os.listdir(tmp_path) == []


def test_test_help_shows_only_test_options_but_training_ones_still_parse(tmp_path):
    proc = run_script(TEST_SCRIPT, ['--help'], cwd=tmp_path)
    assert_ok(proc)
    entries = help_entries(proc.stdout)
    for name in ('--iteration', '--input_dir_test', '--target_dir_test', '--save_panels',
                 '--dataset_name', '--saturation_upper_limit_target', '--target_unit',
                 '--check_pairing', '--output_dir', '--overwrite'):
        assert name in entries and '(default:' in entries[name], name
    for name in ('--lr', '--lambda_CC', '--n_epochs', '--n_epochs_decay', '--keep_states',
                 '--tensorboard', '--beta1', '--seed', '--latest_iter', '--display_freq'):
        assert name not in proc.stdout, name
    assert '--iteration' in help_sections(proc.stdout)['test:']
    opt = TEST_OPTION().parse(['--lr', '0.1', '--n_epochs', '5',
                                                '--lambda_CC', '2'])
    assert opt.iteration == -1  # parsed, and nothing else changes


def test_test_help_says_the_runs_options_replace_the_defaults_shown(tmp_path):
    """The Test script takes the network and data options from train_options.json: --help
    says so, rather than suggest its defaults (tif, -1/1, 4 downsamplings) apply."""
    proc = run_script(TEST_SCRIPT, ['--help'], cwd=tmp_path)
    assert_ok(proc)
    description = ' '.join(proc.stdout.split('\n\n')[1].split())
    assert 'train_options.json' in description and 'defaults shown' in description, \
        description
    assert 'network' in description and 'data options' in description
