"""Where a training step's time goes: torch.profiler over a few steps, top operators.

    python benchmarks/profile_step.py                       # the driver's step, 256x256
    python benchmarks/profile_step.py --variant published   # the re-created published step
    python benchmarks/profile_step.py --size 256 --steps 2 --rows 15 --shapes

Variants are those of benchmark.py (published, driver, with +modifiers). Prints the
operators sorted by their own CPU time (self time: a convolution's backward is counted once,
not again in every autograd node above it), and a summary by kind: convolution forward /
backward, optimiser, the rest.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402


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
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    opt = benchmark.train_options(['--gpu_ids', '-1', '--n_gf', str(args.n_gf),
                                   '--n_df', str(args.n_df),
                                   '--n_downsample', str(args.n_downsample),
                                   '--n_residual', str(args.n_residual)], args.variant)
    step, _, _ = benchmark.training_setup(args.variant, opt, torch.device('cpu'), args.size)

    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    averages = prof.key_averages(group_by_input_shape=args.shapes)
    print(f'# {args.variant}, {args.size}x{args.size}, {args.steps} profiled steps, '
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
    for e in averages:
        if e.key in ('aten::mkldnn_convolution', 'aten::_slow_conv2d_forward',
                     'aten::slow_conv_transpose2d'):
            kinds['convolution forward'] += e.self_cpu_time_total
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
