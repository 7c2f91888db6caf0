"""Where a training step's or an inference's time goes: torch.profiler, top operators.

    python benchmarks/profile_step.py                       # the driver's step, 256x256
    python benchmarks/profile_step.py --variant driver+bf16
    python benchmarks/profile_step.py --size 256 --steps 2 --rows 15 --shapes
    python benchmarks/profile_step.py --inference --size 1024 --steps 1 --shapes

Variants are those of benchmark.py (driver, with +modifiers). With --inference, the
generator is the Test script's (pix2pixCC_Test.load_generator on a checkpoint of the default
initialisation) and the profiled work is pix2pixCC_Test.generate on one image. Prints the
operators sorted by their own CPU time (self time: a convolution's backward is counted once,
not again in every autograd node above it), and a summary by kind: convolution forward /
backward, optimiser, the rest.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402


INFERENCE_KINDS = {'aten::mish': 'Mish', 'aten::mish_': 'Mish',
                   'aten::native_batch_norm': 'normalisation',
                   'aten::_native_batch_norm_legit': 'normalisation',
                   'aten::_native_batch_norm_legit_no_training': 'normalisation',
                   'aten::replication_pad2d': 'padding', 'aten::reflection_pad2d': 'padding',
                   'aten::copy_': 'copies', 'aten::clone': 'copies', 'aten::contiguous': 'copies'}


def inference_setup(args, opt):
    """One image through the Test script's generator (loaded as Test loads it)."""
    import tempfile

    import torch
    import pix2pixCC_Test
    from pix2pixCC_Networks import Generator, weights_init
    folder = tempfile.mkdtemp(prefix='p2pcc-profile-')
    path = os.path.join(folder, '1_G.pt')
    torch.manual_seed(0)
    torch.save(Generator(opt).apply(weights_init).state_dict(), path)
    G = pix2pixCC_Test.load_generator(opt, path, torch.device('cpu')).eval()
    x = torch.rand(1, opt.input_ch, args.size, args.size) * 2 - 1

    def step():
        with torch.inference_mode():
            pix2pixCC_Test.generate(G, x, opt.n_downsample)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--variant', default='driver')
    p.add_argument('--size', type=int, default=256)
    p.add_argument('--n_gf', type=int, default=64)
    p.add_argument('--n_df', type=int, default=64)
    p.add_argument('--n_downsample', type=int, default=4)
    p.add_argument('--n_residual', type=int, default=9)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=2, help='profiled steps')
    p.add_argument('--rows', type=int, default=15)
    p.add_argument('--shapes', action='store_true', help='group by input shapes')
    p.add_argument('--inference', action='store_true',
                   help="profile the Test script's generator on one image per step")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    opt = benchmark.train_options(['--gpu_ids', '-1', '--n_gf', str(args.n_gf),
                                   '--n_df', str(args.n_df),
                                   '--n_downsample', str(args.n_downsample),
                                   '--n_residual', str(args.n_residual)], args.variant)
    if args.inference:
        step = inference_setup(args, opt)
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
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages)
    print(f"{'operator':<44}{'self s/step':>12}{'share':>8}{'calls/step':>11}")
    for e in events[:args.rows]:
        name = e.key if len(e.key) <= 43 else e.key[:40] + '...'
        print(f'{name:<44}{e.self_cpu_time_total / 1e6 / args.steps:>12.3f}'
              f'{e.self_cpu_time_total / total:>8.1%}{e.count / args.steps:>11.0f}')
    # Convolutions by their own time; the optimiser by the inclusive time of its step and
    # zero_grad (the for-loop Adam runs as many small aten ops underneath); the rest.
    kinds = {'convolution forward': 0, 'convolution backward': 0, 'optimiser': 0}
    if args.inference:
        kinds = {'convolution forward': 0, 'Mish': 0, 'normalisation': 0, 'padding': 0,
                 'copies': 0}
    for e in averages:
        if e.key in ('aten::mkldnn_convolution', 'aten::_slow_conv2d_forward',
                     'aten::slow_conv_transpose2d', 'aten::_convolution'):
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
    return 0


if __name__ == '__main__':
    sys.exit(main())
