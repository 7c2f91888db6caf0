"""Single convolutions of the default generator at their inference shapes: PyTorch's own
kernels (oneDNN) against the paths `pix2pixCC_Utils.prepare_network` gives them on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/conv_paths.py                 # 1024x1024, CPU time
    python benchmarks/conv_paths.py --size 1024 --repeats 7 --clock wall
    python benchmarks/conv_paths.py --band_bytes 1048576,4194304,16777216   # band sizes
    OMP_NUM_THREADS=1 python benchmarks/conv_paths.py --whole 4    # whole images, A/B

Each layer is built as the Generator builds it (default initialisation, fixed seed), given a
random input of the shape it sees in a `--size` inference, and run under
torch.inference_mode twice: as built (nn.Conv2d / nn.ConvTranspose2d) and as prepared
(`use_gemm_convolutions`). The two alternate, `--repeats` times, in a process that reuses
freed memory as the Test script does (README "Speed"); the figure is each one's best time,
by default the CPU time of this process (`time.process_time`: on a machine that other jobs
share, time-slicing inflates wall times but not CPU time; run it with one thread so that the
two measure the same). `path` says what the prepared layer runs: scatter (the
scattered-patch path of README "Speed"), Winograd (its F(2x2, 3x3) path), GEMM, or oneDNN
as built. The largest difference
between the two outputs is given relative to the output's range.

With --whole N it instead runs N pairs of whole images through the Test script's generator
(machinery.translation.load_generator, as benchmarks/profile_step.py --inference builds it), in one
process, alternating: PyTorch's kernels everywhere (`use_gemm_convolutions(G, False)`), then
the prepared paths; each image's CPU time (user + system: page faults included) and wall time.
"""
import argparse
import json
import sys
import time

import common  # noqa: F401 (puts the repository on sys.path)


def layers(size, n_gf=64, n_downsample=4, input_ch=1, target_ch=1):
    """(label, module, input shape) of the default generator's first layer, a residual
    block's convolution, the transposed convolutions and the output layer at a size x size
    inference."""
    import torch.nn as nn
    full = size + 6  # the 7x7 layers see the image padded by 3
    found = [('7x7 %d->%d at %d^2' % (input_ch, n_gf, size),
              nn.Conv2d(input_ch, n_gf, 7), (1, input_ch, full, full))]
    channels, side = n_gf * 2 ** n_downsample, size // 2 ** n_downsample
    found.append((f'3x3 {channels}->{channels} at {side}^2 (residual block)',
                  nn.Conv2d(channels, channels, 3), (1, channels, side + 2, side + 2)))
    for _ in range(n_downsample):
        found.append((f'transposed 3x3 {channels}->{channels // 2} at {2 * side}^2',
                      nn.ConvTranspose2d(channels, channels // 2, 3, 2, 1, 1),
                      (1, channels, side, side)))
        channels, side = channels // 2, side * 2
    found.append((f'7x7 {n_gf}->{target_ch} at {size}^2 (output layer)',
                  nn.Conv2d(n_gf, target_ch, 7), (1, n_gf, full, full)))
    return found


def path_of(layer, x):
    """Which path the prepared `layer` takes for `x` (inside inference mode)."""
    if hasattr(layer, 'gemm_pays') and layer.gemm_pays(x):
        return 'GEMM'
    if hasattr(layer, 'scatter_pays') and layer.scatter_pays(x):
        return 'scatter'
    if hasattr(layer, 'winograd_pays') and layer.winograd_pays(x):
        return 'Winograd'
    return 'oneDNN'


def compare(label, built, shape, repeats, clock):
    """Best times of the layer as built and as prepared, alternating; returns a result row."""
    import copy

    import torch

    import machinery.fast_conv
    import pix2pixCC_Networks
    torch.manual_seed(0)
    pix2pixCC_Networks.weights_init(built)
    prepared = machinery.fast_conv.use_gemm_convolutions(copy.deepcopy(built))
    x = torch.rand(shape) * 2 - 1
    best = {'built': float('inf'), 'prepared': float('inf')}
    with torch.inference_mode():
        outputs = {name: module(x) for name, module in
                   (('built', built), ('prepared', prepared))}  # (also warms both up)
        reference = outputs['built']
        difference = float((outputs['prepared'] - reference).abs().max() /
                           (reference.max() - reference.min()))
        path = path_of(prepared, x)
        del outputs, reference
        for _ in range(repeats):
            for name, module in (('built', built), ('prepared', prepared)):
                start = clock()
                module(x)
                best[name] = min(best[name], clock() - start)
    return {'layer': label, 'path': path, 'built_s': best['built'],
            'prepared_s': best['prepared'], 'ratio': best['prepared'] / best['built'],
            'difference_of_range': difference}


def whole_images(args):
    """--whole: alternate whole inferences without and with the CPU paths, one process."""
    import os

    import benchmark
    import profile_step

    import machinery.fast_conv
    opt = benchmark.train_options(['--gpu_ids', '-1'], 'driver')
    step, G = profile_step.inference_setup(argparse.Namespace(size=args.size, plain=False),
                                           opt)
    step()  # warm-up
    times = {'plain': [], 'prepared': []}
    for _ in range(args.whole):
        for name in times:
            machinery.fast_conv.use_gemm_convolutions(G, enabled=name == 'prepared')
            before = os.times()
            step()
            after = os.times()
            cpu = after.user - before.user + after.system - before.system
            times[name].append((cpu, after.elapsed - before.elapsed))
            print(f'{name:<9} cpu {cpu:7.2f} s   wall {after.elapsed - before.elapsed:7.2f} s',
                  flush=True)
    best = {name: [min(column) for column in zip(*rows, strict=True)]
            for name, rows in times.items()}
    print(f"best: plain cpu {best['plain'][0]:.2f} s wall {best['plain'][1]:.2f} s; prepared "
          f"cpu {best['prepared'][0]:.2f} s wall {best['prepared'][1]:.2f} s; ratio cpu "
          f"{best['prepared'][0] / best['plain'][0]:.3f} wall "
          f"{best['prepared'][1] / best['plain'][1]:.3f}")
    return {'times': times, 'best': best}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=1024)
    p.add_argument('--n_gf', type=int, default=64, help="the generator's first channels")
    p.add_argument('--glibc_defaults', action='store_true',
                   help="leave malloc's settings alone (as a training process does), instead "
                        'of reusing freed memory as the Test script does')
    p.add_argument('--any_winograd', action='store_true',
                   help='let every 3x3 convolution take the Winograd path, whatever its '
                        'size (to see where it pays)')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--clock', choices=('cpu', 'wall'), default='cpu')
    p.add_argument('--band_bytes', default='',
                   help='comma-separated SCATTER_BAND_BYTES to try (default: the code\'s)')
    p.add_argument('--whole', type=int, default=0, metavar='N',
                   help='N pairs of whole images without and with the paths instead')
    p.add_argument('--json', help='write the rows to this file')
    args = p.parse_args(argv)
    if args.whole:
        result = whole_images(args)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'machine': common.machine(), 'config': vars(args)} | result, f,
                          indent=2)
        return 0

    import torch

    import machinery.fast_conv
    import machinery.memory
    if not args.glibc_defaults:
        machinery.memory.reuse_freed_memory()  # as the Test script does on the CPU
    if args.any_winograd:
        machinery.fast_conv.WINOGRAD_MIN_WEIGHTS = machinery.fast_conv.WINOGRAD_MIN_PIXELS = 0
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    bands = [int(b) for b in args.band_bytes.split(',') if b] or \
        [machinery.fast_conv.SCATTER_BAND_BYTES]
    print(f'# {args.size}x{args.size}, {torch.get_num_threads()} threads, best {args.clock} '
          f'time of {args.repeats}, built (oneDNN) and prepared alternating')
    print(f"{'layer':<42}{'band':>9}{'path':>9}{'built s':>9}{'prepared s':>11}{'ratio':>7}"
          f"{'diff/range':>11}")
    rows = []
    for band in bands:
        machinery.fast_conv.SCATTER_BAND_BYTES = band
        for label, module, shape in layers(args.size, args.n_gf):
            row = compare(label, module, shape, args.repeats, clock) | {'band_bytes': band}
            rows.append(row)
            print(f"{label:<42}{band:>9}{row['path']:>9}{row['built_s']:>9.3f}"
                  f"{row['prepared_s']:>11.3f}{row['ratio']:>7.2f}"
                  f"{row['difference_of_range']:>11.1e}", flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': common.machine(), 'config': vars(args), 'rows': rows}, f,
                      indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
