"""Sharing a model (README "Sharing a model and running it elsewhere"): --export model (one
file with the generator, its options and the targets' identity cards) and --export onnx (an
ONNX graph whose metadata carries the scaling and the FITS product rules), each written only
when it holds what was asked and never over another export unasked.
"""
import functools
import io
import json
import os
import warnings

import numpy as np
import torch

from machinery.files import atomic_path, make_dirs, save_torch
from machinery.products import (INPUT_FILE, LEFT_OUT_INPUT_CARD, ORIGIN_CARD, STORAGE_CARD,
                                WCS_KEY, data_unit, product_history, scaled_unit)
from pix2pixCC_Networks import Generator
from pix2pixCC_Options import DATA_OPTIONS, FITS_FORMATS, NETWORK_OPTIONS, UserError
from pix2pixCC_Pipeline import Scaling
from pix2pixCC_Utils import (fit_state_dict, float32_weights, load_model_file,
                             model_file_record, require_checkpoint, safe_load, saved_steps,
                             weights_sha256)


def export_path(opt, step):
    """checkpoints/<dataset_name>/Export/<dataset_name>_<step>.pt (_bf16.pt with
    --export_dtype 16, so that neither replaces the other; .onnx with --export onnx)."""
    suffix = {'onnx': '.onnx'}.get(opt.export, '_bf16.pt' if opt.export_dtype == 16 else '.pt')
    return os.path.join(opt.checkpoint_dir, 'Export', f'{opt.dataset_name}_{step}{suffix}')


def export_source(opt, model):
    """(step, float32 weights, the file they come from) of the generator to export: the
    --model file's, or Model/<--iteration>_G.pt of the run; checked against the network the
    options build."""
    if model is not None:
        step, weights, path = model['step'], float32_weights(model['weights']), opt.model
    else:
        if opt.iteration == -1:
            raise UserError(f"--export writes one generator: give --iteration N (saved steps "
                            f"in {opt.model_dir}: "
                            f"{', '.join(map(str, saved_steps(opt.model_dir))) or 'none'})")
        path = require_checkpoint(opt.model_dir, opt.iteration, 'G')
        step, weights = opt.iteration, safe_load(path, mmap=True)
    with torch.device('meta'):
        fit_state_dict(Generator(opt), weights, path, assign=True)  # (a one-line mismatch)
    return step, weights, path


def export(opt, model):
    """--export model (`export_model_file`) or --export onnx (`export_onnx`) of the generator
    of one step, under checkpoints/<dataset_name>/Export/; returns the file's path."""
    step, weights, source = export_source(opt, model)
    path = export_path(opt, step)
    write = export_onnx if opt.export == 'onnx' else export_model_file
    return write(opt, step, weights, source, path)


def export_model_file(opt, step, weights, source, path):
    """The generator, its options, the targets' identity cards and its step as one model file
    (`model_file_record`) at `path`."""
    options = {name: getattr(opt, name) for name in NETWORK_OPTIONS + DATA_OPTIONS}
    record = model_file_record(weights, step, opt.dataset_name, options, opt.target_header,
                               bfloat16=opt.export_dtype == 16,
                               training_data=getattr(opt, 'training_data', None))
    if keep_existing_export(path, functools.partial(holds_model_record, record=record),
                            opt.overwrite):
        print(f"{path} already holds this export; left as it is")
        return path
    make_dirs(os.path.dirname(path))
    save_torch(record, path)
    print(f"exported step {step} of {source} to {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path


def holds_model_record(path, record):
    """Whether the model file `path` holds `record` (same weights, options, cards, step)."""
    try:
        existing = load_model_file(path)
    except UserError:
        return False
    fields = ('weights_sha256', 'options', 'target_header', 'training_data', 'step', 'run')
    return all(existing.get(field) == record[field] for field in fields)


def keep_existing_export(path, holds_this, overwrite):
    """Whether the export `path` already holds this export (`holds_this(path)`): then it is
    left as it is. UserError when it holds another export, unless `overwrite`: a saved file
    is never replaced unasked."""
    if not os.path.exists(path) or overwrite:
        return False
    if holds_this(path):
        return True
    raise UserError(f"{path} already holds another export (other weights or options); add "
                    f"--overwrite to replace it, or move it away")


def adopt_model_file(option, opt, log=print):
    """The options of the model file --model (`opt.model`): its run name and step
    (--dataset_name and --iteration, which may only repeat them), its network and data
    options (options given explicitly to `option`, a TestOption, win, as over
    train_options.json), the targets' identity cards and the profile of the training data.
    Returns the file's record (`load_model_file`). The Test script's --model and
    machinery/maps.py's `load_model` take a model file this way."""
    model = load_model_file(opt.model)
    for name, value in (('dataset_name', model['run']), ('iteration', model['step'])):
        if name in option.explicit and getattr(opt, name) != value:
            raise UserError(f"--{name} {getattr(opt, name)} differs from the model file's: "
                            f"{opt.model} holds run {model['run']}, step {model['step']}; "
                            f"leave out --{name} (--output_dir chooses the output folder)")
        setattr(opt, name, value)
    option.adopt(opt, model['options'], NETWORK_OPTIONS + DATA_OPTIONS, opt.model, log=log)
    opt.target_header = model['target_header']
    opt.training_data = model.get('training_data')
    return model


# The ONNX model (README "Sharing a model and running it elsewhere", ONNX): its tensors'
# names, the opset, the layout of its metadata, and how closely ONNX Runtime must agree with
# PyTorch before the file is written (of the output's range).
ONNX_INPUT, ONNX_OUTPUT = 'input', 'output'


ONNX_OPSET = 17


ONNX_FORMAT = 'pix2pixCC ONNX model'


ONNX_FORMAT_VERSION = 1


ONNX_TOLERANCE = 1e-4


def require_onnx():
    """(onnx, onnxruntime), or UserError in one line naming what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as missing:
        raise UserError(f"--export onnx needs the onnx and onnxruntime packages "
                        f"({missing.name} is missing): pip install onnx onnxruntime") from None
    return onnx, onnxruntime


def export_onnx(opt, step, weights, source, path):
    """The generator as an ONNX model at `path`, with dynamic batch, height and width
    (multiples of 2**n_downsample), and the metadata (`onnx_record`) that takes physical
    input to the products of this script; written only after ONNX Runtime agreed with
    PyTorch (`onnx_difference`)."""
    onnx, onnxruntime = require_onnx()
    record = onnx_record(opt, step, weights)
    if keep_existing_export(path, functools.partial(holds_onnx_record, record=record),
                            opt.overwrite):
        print(f"{path} already holds this export; left as it is")
        return path
    with torch.device('meta'):
        G = Generator(opt)
    fit_state_dict(G, weights, source, assign=True)
    model = onnx.load_model_from_string(onnx_graph(G.eval(), opt))
    model.doc_string = (f"pix2pixCC generator of run {opt.dataset_name}, step {step}: "
                        f"normalised input -> normalised output; the 'pix2pixCC' metadata "
                        f"holds the scaling both ways")
    onnx.helper.set_model_props(model, onnx_metadata(record))
    data = model.SerializeToString()
    size, difference = onnx_difference(G, data, opt, onnxruntime)
    make_dirs(os.path.dirname(path))
    with atomic_path(path) as temporary, open(temporary, 'wb') as f:
        f.write(data)
    print(f"exported step {step} of {source} to {path} ({len(data) / 1e6:.1f} MB); ONNX "
          f"Runtime agrees with PyTorch to {difference:.1e} of the output range at "
          f"{size}x{size}")
    return path


def onnx_graph(G, opt):
    """The ONNX bytes of the generator G (eval mode, on the CPU).

    torch.onnx's TorchScript exporter (dynamo=False, opset 17): it writes dynamic height and
    width from one traced example and needs only onnx, where the dynamo exporter also needs
    onnxscript and was much slower (README "Sharing a model and running it elsewhere",
    ONNX); Mish becomes x * tanh(softplus(x)) (the Mish operator needs opset 18), which
    `onnx_difference` checks. Traced with autograd on, as the network is traced for
    training: a network computes the same either way (README "Differences from the
    reference code").
    """
    multiple = 2 ** opt.n_downsample
    example = torch.zeros(1, opt.input_ch, multiple * 4, multiple * 4)
    axes = {0: 'batch', 2: 'height', 3: 'width'}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter('ignore')  # (the exporter's deprecation and tracing notes)
        torch.onnx.export(G, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: axes})
    return buffer.getvalue()


def onnx_difference(G, data, opt, onnxruntime, size=None):
    """(size, the largest difference between ONNX Runtime's output (CPU) of the ONNX model
    `data` and G's, over the range of G's output or of [-1, 1] (the targets' saturation
    limits) if larger) for one size x size input drawn uniformly in [-1, 1] (by default the
    multiple of 2**n_downsample at or above 64). UserError above ONNX_TOLERANCE: a model
    that would give other products is never written."""
    multiple = 2 ** opt.n_downsample
    size = size or multiple * -(-64 // multiple)
    generator = torch.Generator().manual_seed(0)
    input = torch.rand(1, opt.input_ch, size, size, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = G(input).numpy()
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    output = session.run([ONNX_OUTPUT], {ONNX_INPUT: input.numpy()})[0]
    # (at least [-1, 1]: the output of a generator not trained yet can be almost constant,
    # and float32 rounding would be a large part of its range)
    difference = float(np.abs(output - expected).max() / max(np.ptp(expected), 2.0))
    if not difference <= ONNX_TOLERANCE:
        raise UserError(f"ONNX Runtime's output differs from PyTorch's by {difference:.1e} of "
                        f"its range at {size}x{size} (at most {ONNX_TOLERANCE:g} is accepted), "
                        f"so no ONNX file was written; report this with your torch, onnx and "
                        f"onnxruntime versions")
    return size, difference


def onnx_record(opt, step, weights):
    """The JSON document of an ONNX export's 'pix2pixCC' metadata (README "Sharing a model
    and running it elsewhere", ONNX): the tensors' names and the size multiple; each
    channel's scaling both ways (`Scaling.record`) and --save_scale; the unit; what a FITS
    product's header takes (the targets' identity cards, BUNIT, ORIGIN, the HISTORY lines,
    the input cards left out, the WCS and storage cards); the network and data options, the
    profile of the training data (machinery/data_profile.py), the step, the run and the
    SHA-256 of the float32 weights."""
    unit = data_unit(opt)
    return {
        'format': ONNX_FORMAT, 'format_version': ONNX_FORMAT_VERSION,
        'run': opt.dataset_name, 'step': int(step),
        'input_name': ONNX_INPUT, 'output_name': ONNX_OUTPUT,
        'size_multiple': 2 ** opt.n_downsample,
        'input_channels': opt.input_ch, 'target_channels': opt.target_ch,
        'scaling': {side: [Scaling.from_options(opt, side).channel(c).record()
                           for c in range(getattr(opt, f'{side}_ch'))]
                    for side in ('input', 'target')},
        'save_scale': float(opt.save_scale), 'unit': unit,
        'fits': {'extension': opt.data_format_target if opt.data_format_target in
                 FITS_FORMATS else 'fits',
                 'bunit': scaled_unit(unit, opt.save_scale),
                 'identity': opt.target_header or {}, 'origin': list(ORIGIN_CARD),
                 'history': product_history(opt, step), 'input_file': INPUT_FILE,
                 'left_out_input_cards': LEFT_OUT_INPUT_CARD.pattern,
                 'wcs_cards': WCS_KEY.pattern, 'storage_cards': STORAGE_CARD.pattern},
        'options': {name: getattr(opt, name)
                    for name in NETWORK_OPTIONS + DATA_OPTIONS + ('save_scale',)},
        'training_data': getattr(opt, 'training_data', None),
        'weights_sha256': weights_sha256(weights)}


def onnx_metadata(record):
    """The ONNX model's metadata_props: the whole `record` as JSON under 'pix2pixCC', and
    readable keys for a look without parsing it."""
    return {'pix2pixCC': json.dumps(record), 'run': record['run'],
            'step': str(record['step']), 'unit': record['unit'] or '',
            'size_multiple': str(record['size_multiple'])}


def holds_onnx_record(path, record):
    """Whether the ONNX file `path` carries `record` as its 'pix2pixCC' metadata."""
    onnx, _ = require_onnx()
    try:
        props = {prop.key: prop.value for prop in onnx.load(path).metadata_props}
        return json.loads(props.get('pix2pixCC', 'null')) == json.loads(json.dumps(record))
    except Exception:  # (a damaged or foreign file: it holds another export)
        return False
