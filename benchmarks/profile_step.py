"""Where a training step's or an inference's time goes: torch.profiler, top operators.

    python benchmarks/profile_step.py                       # the driver's step, 256x256
    python benchmarks/profile_step.py --variant driver+bf16
    python benchmarks/profile_step.py --size 256 --steps 2 --rows 15 --shapes
    python benchmarks/profile_step.py --inference --size 1024 --steps 1 --shapes
    python benchmarks/profile_step.py --inference --size 1024 --conv_rates
    python benchmarks/profile_step.py --inference --size 1024 --conv_rates --plain

Variants are those of benchmark.py (driver, with +modifiers). With --inference, the
generator is the Test script's (machinery.translation.load_generator on a checkpoint of the default
initialisation) and the profiled work is machinery.translation.generate on one image. Prints the
operators sorted by their own CPU time (self time: a convolution's backward is counted once,
not again in every autograd node above it), and a summary by kind: convolution forward /
backward, optimiser, the rest.

With --conv_rates (inference only) it instead times each convolution of one image and gives
its arithmetic rate (GFLOP/s, a multiply-add counted as 2) beside the best rate this machine
reaches in a float32 matrix product of the same threads: how far any faster convolution
kernel could take inference without changing its arithmetic. A convolution that took the
scatter path of machinery/fast_conv.py (matrix product + col2im) is marked [scatter], one
that took its Winograd path [Winograd] (its GFLOP are those of the direct convolution, so
its rate can exceed the CPU's); `--plain` runs every convolution on PyTorch's own kernels
instead, for comparison.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import common  # noqa: E402
import conv_paths  # noqa: E402


INFERENCE_KINDS = {'aten::mish': 'Mish', 'aten::mish_': 'Mish',
                   'aten::native_batch_norm': 'normalisation',
                   'aten::_native_batch_norm_legit': 'normalisation',
                   'aten::_native_batch_norm_legit_no_training': 'normalisation',
                   'aten::replication_pad2d': 'padding', 'aten::reflection_pad2d': 'padding',
                   'aten::copy_': 'copies', 'aten::clone': 'copies', 'aten::contiguous': 'copies'}


def inference_setup(args, opt, reuse_freed_memory=True):
    """One image through the Test script's generator (loaded as Test loads it): the step
    and the generator. The process reuses freed memory as the Test script does on the CPU,
    unless `reuse_freed_memory` is False. The checkpoint's folder goes when the process
    ends (the generator's weights are mapped from the file until then)."""
    import atexit
    import shutil
    import tempfile

    import torch
    import machinery.fast_conv
    import machinery.memory
    import machinery.translation
    from pix2pixCC_Networks import Generator, weights_init
    folder = tempfile.mkdtemp(prefix='p2pcc-profile-')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, '1_G.pt')
    torch.manual_seed(0)
    torch.save(Generator(opt).apply(weights_init).state_dict(), path)
    if reuse_freed_memory:
        machinery.memory.reuse_freed_memory()
    G = machinery.translation.load_generator(opt, path, torch.device('cpu')).eval()
    if args.plain:
        machinery.fast_conv.use_gemm_convolutions(G, enabled=False)
    x = torch.rand(1, opt.input_ch, args.size, args.size) * 2 - 1

    def step():
        with torch.inference_mode():
            machinery.translation.generate(G, x, opt.n_downsample)

    return step, G


def conv_flops(module, input, output, transposed):
    """Multiply-adds ×2 of one convolution (for a transposed one, each input pixel is
    multiplied by the whole kernel)."""
    kernel = module.weight.shape[2] * module.weight.shape[3]
    if transposed:
        return 2 * input.numel() * module.out_channels // module.groups * kernel
    return 2 * output.numel() * module.in_channels // module.groups * kernel


def matmul_rate(repeats=5):
    """Best float32 GFLOP/s of torch.mm on square matrices of a few sizes (the same intra-op
    threads as the convolutions): a practical ceiling for this CPU."""
    import time

    import torch
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.rand(n, n), torch.rand(n, n)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def conv_rates(args, opt):
    """Each convolution of one inference: its time (forward hooks, best of --steps images
    after --warmup) and GFLOP/s, grouped by (kind, channels, kernel, output size)."""
    import time

    import torch
    step, G = inference_setup(args, opt)
    convs = [m for m in G.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    started, seconds, flops, label = {}, {}, {}, {}

    def before(module, input):
        started[module] = time.perf_counter()

    def after(module, input, output):
        elapsed = time.perf_counter() - started[module]
        seconds[module] = min(seconds.get(module, elapsed), elapsed)
        transposed = isinstance(module, torch.nn.ConvTranspose2d)
        flops[module] = conv_flops(module, input[0], output, transposed)
        kind = 'transposed ' if transposed else ''
        path = conv_paths.path_of(module, input[0])
        path = '' if path == 'oneDNN' else f' [{path}]'
        label[module] = (f'{kind}{module.kernel_size[0]}x{module.kernel_size[1]} '
                         f'{module.in_channels}->{module.out_channels} '
                         f'at {output.shape[-2]}x{output.shape[-1]}{path}')

    hooks = [h for m in convs for h in (m.register_forward_pre_hook(before),
                                        m.register_forward_hook(after))]
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    for h in hooks:
        h.remove()
    groups = {}
    for m in convs:
        g = groups.setdefault(label[m], [0, 0.0, 0])
        g[0] += 1
        g[1] += seconds[m]
        g[2] += flops[m]
    ceiling = matmul_rate()
    print(f'# inference {args.size}x{args.size}, {torch.get_num_threads()} threads; '
          f'each convolution: best of {args.steps} after {args.warmup} warm-up')
    print(f"{'convolution':<50}{'count':>6}{'s':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'of mm':>7}")
    conv_seconds = conv_flops_total = 0
    for name, (count, s, f) in groups.items():
        conv_seconds += s
        conv_flops_total += f
        print(f'{name:<50}{count:>6}{s:>8.3f}{f / 1e9:>9.1f}{f / s / 1e9:>9.1f}'
              f'{f / s / 1e9 / ceiling:>7.0%}')
    print(f"{'all convolutions':<50}{len(convs):>6}{conv_seconds:>8.3f}"
          f'{conv_flops_total / 1e9:>9.1f}{conv_flops_total / conv_seconds / 1e9:>9.1f}'
          f'{conv_flops_total / conv_seconds / 1e9 / ceiling:>7.0%}')
    print(f'float32 torch.mm, best of 1024/2048/4096 squares: {ceiling:.1f} GFLOP/s; '
          f'last whole image {total:.3f} s, of which convolutions {conv_seconds / total:.0%}; '
          f'with every convolution at the mm rate: '
          f'{total - conv_seconds + conv_flops_total / ceiling / 1e9:.3f} s')
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--variant', default='driver')
    p.add_argument('--size', type=int, default=256)
    common.add_network_options(p)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=2, help='profiled steps')
    p.add_argument('--rows', type=int, default=15)
    p.add_argument('--shapes', action='store_true', help='group by input shapes')
    p.add_argument('--inference', action='store_true',
                   help="profile the Test script's generator on one image per step")
    p.add_argument('--plain', action='store_true',
                   help='with --inference: PyTorch\'s own kernels for every convolution (not '
                        'the CPU paths of machinery/fast_conv.py)')
    p.add_argument('--conv_rates', action='store_true',
                   help='with --inference: time each convolution and give its GFLOP/s '
                        "against this machine's float32 matrix-product rate")
    args = p.parse_args(argv)
    if (args.conv_rates or args.plain) and not args.inference:
        p.error('--conv_rates and --plain need --inference')

    import torch
    from torch.profiler import ProfilerActivity, profile

    opt = benchmark.train_options(['--gpu_ids', '-1', '--n_gf', str(args.n_gf),
                                   '--n_df', str(args.n_df),
                                   '--n_downsample', str(args.n_downsample),
                                   '--n_residual', str(args.n_residual)], args.variant)
    if args.conv_rates:
        return conv_rates(args, opt)
    if args.inference:
        step, _ = inference_setup(args, opt)
    else:
        step, _, _ = benchmark.training_setup(args.variant, opt, torch.device('cpu'), args.size)

    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    averages = prof.key_averages(group_by_input_shape=args.shapes)
    print(f"# {'inference' if args.inference else args.variant}, {args.size}x{args.size}, "
          f"{args.steps} profiled steps, "
          f'{torch.get_num_threads()} threads, times per step')
    total = sum(e.self_cpu_time_total for e in averages)
    print_operators(averages, total, args)
    print_kinds(averages, total, args)
    return 0


def print_operators(averages, total, args):
    """The --rows operators with the most time of their own, per step."""
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"{'operator':<44}{'self s/step':>12}{'share':>8}{'calls/step':>11}")
    for e in events[:args.rows]:
        name = e.key if len(e.key) <= 43 else e.key[:40] + '...'
        print(f'{name:<44}{e.self_cpu_time_total / 1e6 / args.steps:>12.3f}'
              f'{e.self_cpu_time_total / total:>8.1%}{e.count / args.steps:>11.0f}')


def print_kinds(averages, total, args):
    """Convolutions by their own time; the optimiser by the inclusive time of its step and
    zero_grad (the for-loop Adam runs as many small aten ops underneath); the rest."""
    kinds = {'convolution forward': 0, 'convolution backward': 0, 'optimiser': 0}
    if args.inference:
        kinds = {'convolution forward': 0, 'Mish': 0, 'normalisation': 0, 'padding': 0,
                 'copies': 0}
    for e in averages:
        if e.key in ('aten::mkldnn_convolution', 'aten::_slow_conv2d_forward',
                     'aten::slow_conv_transpose2d', 'aten::_convolution') or \
                (args.inference and e.key in ('aten::mm', 'aten::col2im')):
            # (the scatter path: a matrix product and col2im per band)
            # (oneDNN's transposed convolution runs inside aten::_convolution's own time)
            kinds['convolution forward'] += e.self_cpu_time_total
        elif args.inference and e.key in INFERENCE_KINDS:
            kinds[INFERENCE_KINDS[e.key]] += e.self_cpu_time_total
        elif e.key in ('aten::convolution_backward', 'aten::_slow_conv2d_backward'):
            kinds['convolution backward'] += e.self_cpu_time_total
        elif e.key.startswith('Optimizer.'):
            kinds['optimiser'] += e.cpu_time_total
    kinds['other'] = total - sum(kinds.values())
    print('by kind (s/step): ' + ', '.join(f'{k} {v / 1e6 / args.steps:.3f} ({v / total:.0%})'
                                           for k, v in kinds.items())
          + f'; total {total / 1e6 / args.steps:.3f}')

if __name__ == '__main__':
    sys.exit(main())
