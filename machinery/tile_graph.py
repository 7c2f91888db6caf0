"""What the tiled path computes, read from the network's own forward (README
"Full-resolution images", What can be tiled).

The generator's forward is traced with torch.fx into a graph of calls, and each call is
classified by what it is, never by where it sits in the generator:

- `Conv`: a convolution (Conv2d or ConvTranspose2d, any kernel, stride, dilation, groups,
  bias, padding or padding_mode other than 'circular'), together with the padding layer and
  the x2 upsampling (bilinear or nearest) that feed only it;
- `Pointwise`: a call that maps each pixel by itself (activations, additions and scalings of
  maps or by constants, a concatenation of channels, BatchNorm or InstanceNorm with running
  statistics, Dropout in eval mode);
- `Norm`: a normalisation by the statistics of the image itself (InstanceNorm without running
  statistics): pointwise once the whole map's per-channel mean and variance are known.

Anything else -- a layer or function not listed, a value read for its shape, a forward that
cannot be traced -- raises `CannotTile` naming it. The plan is data only (`TilePlan`); the
tiles are run by machinery/tiles.py and the memory they need is estimated by
machinery/tile_memory.py.
"""
import math
import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


class CannotTile(Exception):
    """The tiled path cannot split this network; the message says which call and why."""


# Padding layers as F.pad names their modes (a ConstantPad2d keeps its value).
PAD_LAYERS = {nn.ReflectionPad2d: 'reflect', nn.ReplicationPad2d: 'replicate',
              nn.ZeroPad2d: 'constant', nn.ConstantPad2d: 'constant'}
# A convolution's own padding_mode as F.pad's mode ('zeros' is applied by the convolution).
PADDING_MODES = {'reflect': 'reflect', 'replicate': 'replicate'}

POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
    nn.Identity)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout)
POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos,
    operator.pow, operator.abs, torch.add, torch.sub, torch.subtract, torch.mul,
    torch.multiply, torch.div, torch.divide, torch.neg, torch.abs, torch.exp, torch.log,
    torch.log1p, torch.expm1, torch.sqrt, torch.rsqrt, torch.square, torch.pow, torch.sin,
    torch.cos, torch.tanh, torch.sigmoid, torch.relu, torch.clamp, torch.clip,
    torch.maximum, torch.minimum, torch.sign, torch.erf, torch.atan, torch.arctan,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.softplus, F.softsign, F.tanh, F.sigmoid, F.hardtanh, F.hardswish, F.hardsigmoid,
    F.logsigmoid, F.tanhshrink, F.softshrink, F.hardshrink, F.threshold}
POINTWISE_METHODS = {
    'add', 'sub', 'mul', 'div', 'neg', 'abs', 'exp', 'log', 'sqrt', 'square', 'pow', 'sin',
    'cos', 'tanh', 'sigmoid', 'relu', 'clamp', 'clip', 'sign', 'float', 'contiguous',
    'add_', 'sub_', 'mul_', 'div_', 'neg_', 'abs_', 'exp_', 'tanh_', 'sigmoid_', 'relu_',
    'clamp_', 'clip_'}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout, torch.dropout}
CHANNEL_CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}


class ConvStep(NamedTuple):
    """A convolution and what feeds only it: `upsample` ('bilinear' or 'nearest',
    align_corners) for a x2 upsampling, then `pad` (mode, value, (left, right, top, bottom))
    for a padding layer or a padding_mode other than 'zeros'; `zero_padding` (rows, columns):
    the zero padding the convolution applies itself (to every tile, cropped where it is not
    the image's border); `own_pad`: True where `pad` is the convolution's padding_mode (the
    convolution then runs with no padding of its own)."""
    conv: nn.Module
    upsample: tuple = None
    pad: tuple = None
    zero_padding: tuple = (0, 0)
    own_pad: bool = False

    def run(self, tile):
        if not self.own_pad:
            return self.conv(tile)
        conv = self.conv
        return F.conv2d(tile, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    def geometry(self, axis):
        """(kernel extent, stride, zero padding, transposed, output_padding) along `axis`."""
        conv = self.conv
        extent = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
        transposed = isinstance(conv, nn.ConvTranspose2d)
        return (extent, conv.stride[axis], self.zero_padding[axis], transposed,
                conv.output_padding[axis] if transposed else 0)

    def pad_widths(self, axis):
        """(before, after) of `pad` along `axis` (0: rows, 1: columns)."""
        if self.pad is None:
            return 0, 0
        left, right, top, bottom = self.pad[2]
        return (top, bottom) if axis == 0 else (left, right)

    def input_length(self, axis, length):
        """The length of the convolution's input (upsampled, padded) for `length`."""
        before, after = self.pad_widths(axis)
        return length * (2 if self.upsample else 1) + before + after

    def output_length(self, axis, length):
        extent, stride, padding, transposed, output_padding = self.geometry(axis)
        n = self.input_length(axis, length)
        if transposed:
            return (n - 1) * stride - 2 * padding + extent + output_padding
        return (n + 2 * padding - extent) // stride + 1

    def output_shape(self, shape):
        """(C, H, W) of the convolution's output for a step input of (C, H, W) `shape`."""
        return (self.conv.out_channels,
                *(self.output_length(axis, n) for axis, n in enumerate(shape[1:])))


class Conv(NamedTuple):
    name: str
    source: str
    step: ConvStep


class Pointwise(NamedTuple):
    """A call applied to tiles; `node`: its graph node (args refer to other nodes by name);
    `call`: the module, function or method; `in_place`: it writes into its input (which no
    other call reads), so its input tile is copied first."""
    name: str
    sources: tuple
    node: fx.Node
    call: object
    in_place: bool = False


class Norm(NamedTuple):
    """Normalisation by the map's own per-channel statistics (then `norm`'s affine)."""
    name: str
    source: str
    norm: nn.Module


class Constant(NamedTuple):
    """A tensor of the module (get_attr) used by pointwise calls, constant over the image."""
    name: str
    tensor: torch.Tensor


class TilePlan(NamedTuple):
    """`ops` in the order of the forward; `input`, `output`: the names of the image and of
    the result; `eager`: every call of the traced forward as (name, sources), for the
    whole-image memory estimate."""
    ops: tuple
    input: str
    output: str
    eager: tuple

    def shapes(self, shape):
        """{name: (C, H, W)} of every value for an input of (C, H, W) `shape`."""
        shapes = {self.input: tuple(shape)}
        for op in self.ops:
            if isinstance(op, Conv):
                shapes[op.name] = op.step.output_shape(shapes[op.source])
            elif isinstance(op, Norm):
                shapes[op.name] = shapes[op.source]
            elif isinstance(op, Pointwise):
                shapes[op.name] = pointwise_shape(op, shapes)
        return shapes

    def eager_shapes(self, shape):
        """{name: (C, H, W)} of every call of the forward, the folded paddings and
        upsamplings too (what a whole-image pass holds)."""
        shapes = self.shapes(shape)
        for name, sources, grow in self.eager:
            if name not in shapes:  # a padding or upsampling before a convolution
                c, h, w = shapes[sources[0]]
                shapes[name] = (c, h * grow[0] + grow[1], w * grow[0] + grow[2])
        return shapes


def pointwise_shape(op, shapes):
    """The (C, H, W) of a pointwise call: its maps' (which must agree in H, W), with the
    channels of a concatenation added up."""
    inputs = [shapes[name] for name in op.sources if name in shapes]
    sizes = {shape[1:] for shape in inputs}
    if len(sizes) > 1:
        raise CannotTile(f'{describe(op.node)} combines maps of different sizes')
    if op.call in CHANNEL_CONCATENATIONS:
        return (sum(shape[0] for shape in inputs), *inputs[0][1:])
    return (max(shape[0] for shape in inputs), *inputs[0][1:])


# ----------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------


class LayerTracer(fx.Tracer):
    """torch.fx's tracer, which keeps the layers of torch.nn as calls, also when a subclass
    of one replaces it (the CPU's fast convolutions); everything else is traced through, as
    is a layer made inside a forward (`Mish()(x)`), which the network does not hold."""

    MADE_IN_FORWARD = '<made in forward>'

    def path_of_module(self, module):
        try:
            return super().path_of_module(module)
        except NameError:
            return self.MADE_IN_FORWARD

    def is_leaf_module(self, module, qualified_name):
        if qualified_name == self.MADE_IN_FORWARD:
            return False
        return isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, *PAD_LAYERS)) or \
            super().is_leaf_module(module, qualified_name)


def describe(node):
    """A call of the graph as a reader knows it: 'model.3 (Conv2d(...))', 'torch.tanh'."""
    if node.op == 'call_module':
        return f'{node.target} ({node.graph.owning_module.get_submodule(node.target)})'
    if node.op == 'call_function':
        module = getattr(node.target, '__module__', None) or ''
        name = getattr(node.target, '__qualname__', str(node.target))
        return f'{module}.{name}' if module else name
    if node.op == 'call_method':
        return f'.{node.target}()'
    return f'{node.op} {node.target}'


def trace(G):
    """The torch.fx graph module of G's forward (G: the bare network); CannotTile when the
    forward cannot be traced (e.g. it branches on the values of a tensor)."""
    try:
        graph = LayerTracer().trace(G)
    except Exception as error:  # fx raises many kinds: TraceError, TypeError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(
            error).__name__
        raise CannotTile(f'its forward cannot be traced by torch.fx ({first})') from None
    return fx.GraphModule(G, graph)


def tile_plan(G):
    """The TilePlan of the network G (bare: no DataParallel or torch.compile wrapper), for
    inference (eval mode); CannotTile names the first call the tiled path cannot split."""
    module = trace(G)
    nodes = list(module.graph.nodes)
    inputs = [node for node in nodes if node.op == 'placeholder']
    if len(inputs) != 1:
        raise CannotTile(f'its forward takes {len(inputs)} inputs, not one image')
    folded, convs = set(), {}
    for node in nodes:  # first, what each convolution folds in (it comes before it)
        if node.op == 'call_module' and isinstance(module.get_submodule(node.target),
                                                   (nn.Conv2d, nn.ConvTranspose2d)):
            convs[node.name] = Conv(node.name, *conv_step(
                module, node, module.get_submodule(node.target), folded))
    ops, eager = [], []
    for node in nodes:
        if node.op in ('placeholder', 'output'):
            continue
        if node.name in folded:
            eager.append((node.name, sources_of(node), growth(module, node)))
            continue
        ops.append(convs.get(node.name) or classify(module, node))
        eager.append((node.name, sources_of(node), (1, 0, 0)))
    output = next(node for node in nodes if node.op == 'output')
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise CannotTile('its forward returns more than one image')
    plan = TilePlan(tuple(ops), inputs[0].name, result.name, tuple(eager))
    plan.shapes((1, 8, 8))  # (checks that the maps of every pointwise call agree in size)
    return plan


def sources_of(node):
    return tuple(arg.name for arg in node.all_input_nodes)


def growth(module, node):
    """(factor, rows added, columns added) of a folded padding or upsampling."""
    layer = module.get_submodule(node.target)
    if isinstance(layer, nn.Upsample):
        return 2, 0, 0
    left, right, top, bottom = layer.padding
    return 1, top + bottom, left + right


def classify(module, node):
    """The op of one call of the graph other than a convolution; CannotTile when it is none
    the tiled path can split."""
    if node.op == 'get_attr':
        return constant(module, node)
    if node.op == 'call_module':
        return module_op(node, module.get_submodule(node.target))
    if node.op == 'call_function':
        return function_op(node)
    if node.op == 'call_method' and node.target in POINTWISE_METHODS:
        return pointwise(node, node.target, node.target.endswith('_'))
    raise CannotTile(f'{describe(node)} is not a call the tiled path can split')


def module_op(node, layer):
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        return norm_op(node, layer)
    if isinstance(layer, (*PAD_LAYERS, nn.Upsample)):
        raise CannotTile(f'{describe(node)} does not feed a convolution alone')
    if isinstance(layer, DROPOUT_MODULES) and layer.training:
        raise CannotTile(f'{describe(node)} is in training mode (random)')
    if isinstance(layer, POINTWISE_MODULES + DROPOUT_MODULES):
        return pointwise(node, layer, getattr(layer, 'inplace', False))
    raise CannotTile(f'{describe(node)} is not a call the tiled path can split')


def function_op(node):
    target = node.target
    if target in DROPOUT_FUNCTIONS and target is not torch.dropout and \
            node.kwargs.get('training', True) is not False:  # (F.dropout's default: True)
        raise CannotTile(f'{describe(node)} is called with training=True (random)')
    if target in POINTWISE_FUNCTIONS | DROPOUT_FUNCTIONS:
        return pointwise(node, target, node.kwargs.get('inplace', False))
    if target in CHANNEL_CONCATENATIONS:
        dim = node.kwargs.get('dim', node.args[1] if len(node.args) > 1 else 0)
        if dim not in (1, -3):
            raise CannotTile(f'{describe(node)} concatenates along dimension {dim}, not the '
                             f'channels')
        return pointwise(node, target)
    raise CannotTile(f'{describe(node)} is not a call the tiled path can split')


def pointwise(node, call, in_place=False):
    if in_place and any(len(arg.users) > 1 for arg in node.all_input_nodes[:1]):
        raise CannotTile(f'{describe(node)} writes in place into a value that is read again')
    return Pointwise(node.name, sources_of(node), node, call, bool(in_place))


def constant(module, node):
    tensor = operator.attrgetter(node.target)(module)
    if not isinstance(tensor, torch.Tensor) or (
            tensor.numel() > 1 and (tensor.dim() < 3 or tuple(tensor.shape[-2:]) != (1, 1))):
        raise CannotTile(f'the tensor {node.target} is not constant over the image')
    return Constant(node.name, tensor)


def uses_running_statistics(norm):
    """Whether a BatchNorm or InstanceNorm normalises by stored statistics (eval mode with
    running statistics): then it acts pixel by pixel."""
    return norm.track_running_stats and not norm.training and norm.running_mean is not None


def norm_op(node, norm):
    """BatchNorm or InstanceNorm: pointwise with running statistics (eval mode), a Norm with
    the image's own statistics."""
    if uses_running_statistics(norm):
        return pointwise(node, norm)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise CannotTile(f'{describe(node)} is in training mode (statistics of the batch)')
    return Norm(node.name, node.args[0].name, norm)


def only_user(node, user):
    return list(node.users) == [user]


def conv_step(module, node, conv, folded):
    """(source, ConvStep) of a convolution node: the padding layer and the x2 upsampling
    that feed only it are folded into the step."""
    if len(node.args) != 1 or node.kwargs:
        raise CannotTile(f'{describe(node)} is called with more than one input')
    if isinstance(conv.padding, str):  # 'same' (odd extents, stride 1) or 'valid'
        extents = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if conv.padding == 'same' and any(e % 2 for e in extents):
            raise CannotTile(f"{describe(node)} has padding='same' with an even kernel extent")
        zero = tuple(e // 2 for e in extents) if conv.padding == 'same' else (0, 0)
    else:
        zero = tuple(conv.padding)
    if isinstance(conv, nn.ConvTranspose2d) and tuple(conv.dilation) != (1, 1):
        raise CannotTile(f'{describe(node)} is a dilated transposed convolution')
    step = {'zero_padding': zero}
    if conv.padding_mode != 'zeros':
        if conv.padding_mode not in PADDING_MODES:
            raise CannotTile(f"{describe(node)} has padding_mode='{conv.padding_mode}'")
        step.update(pad=(PADDING_MODES[conv.padding_mode], 0.0,
                         (zero[1], zero[1], zero[0], zero[0])), zero_padding=(0, 0),
                    own_pad=True)
    source = node.args[0]
    source = fold_padding(module, source, node, step, folded)
    source = fold_upsampling(module, source, step, folded)
    return source.name, ConvStep(conv, **step)


def fold_padding(module, source, node, step, folded):
    if source.op != 'call_module' or not only_user(source, node):
        return source
    layer = module.get_submodule(source.target)
    if type(layer) not in PAD_LAYERS:
        return source
    if 'pad' in step:
        raise CannotTile(f'{describe(source)} pads a convolution with padding_mode '
                         f"'{step['pad'][0]}'")
    step['pad'] = (PAD_LAYERS[type(layer)], float(getattr(layer, 'value', 0.0)),
                   tuple(layer.padding))
    folded.add(source.name)
    return source.args[0]


def fold_upsampling(module, source, step, folded):
    if source.op != 'call_module' or len(source.users) != 1:
        return source
    layer = module.get_submodule(source.target)
    if not isinstance(layer, nn.Upsample):
        return source
    scale = layer.scale_factor
    scales = tuple(scale) if isinstance(scale, tuple) else (scale, scale)
    if layer.size is not None or any(s is None or float(s) != 2.0 for s in scales) or \
            layer.mode not in ('bilinear', 'nearest'):
        raise CannotTile(f'{describe(source)} is not a x2 bilinear or nearest upsampling')
    if step.get('pad') is not None and step['pad'][1] != 0:
        raise CannotTile(f'{describe(source)} is padded with a value other than 0')
    step['upsample'] = (layer.mode, bool(layer.align_corners))
    folded.add(source.name)
    return source.args[0]


def level_of(full_height, height):
    """How many times a map of `height` is smaller than the image (0 at full resolution)."""
    return max(0, round(math.log2(full_height / height)))
