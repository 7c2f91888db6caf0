"""The whole-image pass in inference (README "Speed"): the network's forward, run call by call
(torch.fx) with a normalisation or an activation writing into its input where the graph
shows that nothing else reads that input, and with a convolution that a large padding layer
alone feeds computed in bands of rows from the unpadded map (the padded copy is never made).

At 1024x1024 every full-resolution normalisation and activation of the generator would
otherwise allocate a new 268 MB map; on the CPU the heap that keeps freed memory for reuse
then fragments, and its peak wandered from 1.1 to 2.4 GB from run to run of the same four
images (BENCHMARKS.md, "Inference side by side after the redesign"). Written in place, the
peak stays near what the pass holds at once.

Which calls write in place is read from the traced graph, never from the layer: the input
must be a fresh map (the output of a convolution, padding, upsampling, normalisation or
pointwise call, not the caller's image or a view) that has no other reader. Everything else
runs as the network's forward runs it. A network whose forward cannot be traced, a float32
run that differs on a small test image (every padded map in bands) from the forward by more
than float rounding, or any other precision, runs its forward itself (`inference_runner`).
"""
import operator
import weakref

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from machinery.tile_graph import PAD_LAYERS, ConvStep, LayerTracer, uses_running_statistics
from machinery.tiles import convolve_in_bands, difference_from_forward

# Calls whose output is a new tensor, never a view of another value.
FRESH_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
                 nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample, nn.modules.batchnorm._NormBase)
FRESH_FUNCTIONS = {F.mish, F.relu, F.leaky_relu, F.silu, F.gelu, F.elu, torch.tanh,
                   torch.sigmoid, operator.add, operator.sub, operator.mul, operator.truediv,
                   torch.add, torch.mul, torch.cat}
# Activations that can write into their input: the functional form with inplace=True.
IN_PLACE_FUNCTIONS = {F.mish, F.relu, F.leaky_relu, F.silu, F.elu}
IN_PLACE_MODULES = {nn.Mish: F.mish, nn.ReLU: F.relu, nn.SiLU: F.silu}
# How far the in-place pass may differ from the forward on the test image (of its range).
AGREEMENT = 1e-5
# A padding layer's output of at least this many bytes is not made: the convolution it feeds
# alone runs in bands of BAND_VALUES input values (a 64-channel 1030x1030 copy at the
# generator's output layer is 272 MB).
BANDED_BYTES = 2 ** 26
BAND_VALUES = 2 ** 22


def instance_norm_(x, norm):
    """InstanceNorm (image statistics) of x (B, C, H, W) written into x: the per-channel
    mean and biased variance by BatchNorm's statistics kernel, then one fused pass."""
    flat = x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])  # (a view where it can be)
    mean, var = torch.batch_norm_update_stats(flat, None, None, 0.0)
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.affine:
        weight, bias = norm.weight.repeat(x.shape[0]), norm.bias.repeat(x.shape[0])
        scale, shift = scale * weight, shift * weight + bias
    shape = (1, -1, 1, 1)
    return torch.addcmul(shift.view(shape), flat, scale.view(shape), out=flat).reshape(x.shape)


def uses_image_statistics(norm):
    """Whether `norm` normalises by the statistics of the map it is given (InstanceNorm;
    not BatchNorm, nor an InstanceNorm with running statistics in eval mode)."""
    return isinstance(norm, nn.modules.instancenorm._InstanceNorm) and \
        not uses_running_statistics(norm)


def is_fresh(module, node, written):
    """Whether `node`'s value is a new map that only its one reader sees."""
    if len(node.users) != 1:
        return False
    if node.name in written:
        return True
    if node.op == 'call_module':
        return isinstance(module.get_submodule(node.target), FRESH_MODULES)
    return node.op == 'call_function' and node.target in FRESH_FUNCTIONS and \
        not node.kwargs.get('inplace', False)


def in_place_calls(module):
    """{node name: how it writes in place} of the traced `module`: 'norm' (an InstanceNorm
    by the image's statistics) or the in-place function of an activation."""
    written = {}
    for node in module.graph.nodes:
        if not node.args or not isinstance(node.args[0], fx.Node) or \
                not is_fresh(module, node.args[0], written):
            continue
        if node.op == 'call_module':
            layer = module.get_submodule(node.target)
            if uses_image_statistics(layer) and not layer.training:
                written[node.name] = 'norm'
            elif type(layer) in IN_PLACE_MODULES:
                written[node.name] = IN_PLACE_MODULES[type(layer)]
        elif node.op == 'call_function' and node.target in IN_PLACE_FUNCTIONS:
            written[node.name] = node.target
    return written


def banded_convolutions(module):
    """{padding node name: the ConvStep of the convolution it alone feeds} (Conv2d with zero
    padding_mode and numeric padding), whose padded map need not be made."""
    steps = {}
    for node in module.graph.nodes:
        source = node.args[0] if node.args else None
        if node.op != 'call_module' or not isinstance(source, fx.Node) or \
                source.op != 'call_module' or len(source.users) != 1:
            continue
        conv, pad = module.get_submodule(node.target), module.get_submodule(source.target)
        if not isinstance(conv, nn.Conv2d):  # (ConvTranspose2d is none)
            continue
        if type(pad) in PAD_LAYERS and conv.padding_mode == 'zeros' and \
                not isinstance(conv.padding, str) and len(node.args) == 1:
            steps[source.name] = ConvStep(conv, pad=(PAD_LAYERS[type(pad)], float(
                getattr(pad, 'value', 0.0)), tuple(pad.padding)), zero_padding=tuple(conv.padding))
    return steps


class Unpadded:
    """A padding layer's input, standing for its output, which its convolution reads in
    bands (`banded_convolutions`)."""

    def __init__(self, tensor, step):
        self.tensor, self.step = tensor, step


class InPlaceRunner(fx.Interpreter):
    """The traced forward, call by call (each value freed after its last reader), with the
    calls of `written` writing into their input and the large padded maps of `banded` never
    made."""

    def __init__(self, module, written, banded=None):
        super().__init__(module)
        self.written, self.banded = written, banded or {}
        self.band_bytes, self.band_values = BANDED_BYTES, BAND_VALUES

    def run_node(self, node):
        if node.name in self.banded:
            x = self.fetch_args_kwargs_from_env(node)[0][0]
            if x.numel() * x.element_size() >= self.band_bytes:
                return Unpadded(x, self.banded[node.name])
        if node.args and isinstance(node.args[0], fx.Node) and \
                isinstance(self.env.get(node.args[0]), Unpadded):
            source = self.env[node.args[0]]
            x = source.tensor
            rows = max(1, self.band_values // max(1, x.shape[0] * x.shape[1] * x.shape[3]))
            return convolve_in_bands(source.step, x, rows)
        how = self.written.get(node.name)
        if how is None:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        if how == 'norm':
            return instance_norm_(args[0], self.module.get_submodule(node.target))
        if node.op == 'call_module':
            return how(args[0], inplace=True)
        return how(*args, **{**kwargs, 'inplace': True})


# {network: its runner, or None where its forward runs itself}: decided once a network.
_runners = weakref.WeakKeyDictionary()


def inference_runner(G, like, multiple):
    """A callable that computes G(x) for float32 inference: the InPlaceRunner of G's traced
    forward when it writes anything in place and agrees with G on a small random image like
    `like` (3 x 3 multiples of `multiple`), else G itself."""
    if G not in _runners:
        _runners[G] = checked_runner(G, like, multiple)
    runner = _runners[G]
    return G if runner is None else runner.run


def checked_runner(G, like, multiple):
    try:
        module = fx.GraphModule(G, LayerTracer().trace(G))
    except Exception:  # (not traceable: the forward runs as it is)
        return None
    written, banded = in_place_calls(module), banded_convolutions(module)
    if not written and not banded:
        return None
    runner = InPlaceRunner(module, written, banded)
    # (every padded map in bands of a few rows here, to check the bands too)
    runner.band_bytes, runner.band_values = 0, 3 * multiple * 3
    try:
        difference = difference_from_forward(G, runner.run, like, multiple)
    except Exception:
        return None
    runner.band_bytes, runner.band_values = BANDED_BYTES, BAND_VALUES
    return runner if difference <= AGREEMENT else None
