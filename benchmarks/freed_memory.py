"""CPU inference with and without reusing freed memory (README "Speed"): time, page faults
and peak memory per image of the Test script's generator.

    python benchmarks/freed_memory.py                          # default network, 1024x1024
    python benchmarks/freed_memory.py --size 2048 --images 2 --rounds 2 --json out.json

Each measurement is a fresh process (an allocator's state lasts a process's life): it
builds the generator as benchmarks/profile_step.py --inference does (the Test script's
load_generator on a checkpoint of the default initialisation, in a temporary folder removed
at the end), with or without `machinery.memory.reuse_freed_memory()` first, translates one
image to warm up, then --images images, and reports the median time per image, the minor
page faults per image (getrusage's ru_minflt: pages the kernel mapped in and zeroed for the
process) and the process's peak RSS. The two variants alternate, --rounds times each; the
table gives each variant's median over the rounds. "others" is the share of the CPUs other
processes used meanwhile (timings above 10% are not to be trusted).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# common also puts the repository on sys.path, for the pix2pixCC_* modules
from common import NETWORK_DEFAULTS, Interference, add_network_options, machine, peak_rss_mb

VARIANTS = ('plain', 'reuse')


def measure(args):
    """The child's side: one variant, printed as one JSON line."""
    import torch

    import benchmark
    import machinery.memory
    import profile_step
    network = [item for name, _ in NETWORK_DEFAULTS
               for item in (f'--{name}', str(getattr(args, name)))]
    opt = benchmark.train_options(['--gpu_ids', '-1', *network], 'driver')
    step, _ = profile_step.inference_setup(argparse.Namespace(size=args.size, plain=False), opt,
                                           reuse_freed_memory=args.child == 'reuse')
    times, faults = [], []
    for i in range(args.images + 1):  # the first warms up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({'seconds': statistics.median(times), 'times': times,
                      'page_faults': statistics.median(faults), 'faults': faults,
                      'peak_rss_mb': peak_rss_mb(), 'reused': machinery.memory.freed_memory_kept,
                      'torch_threads': torch.get_num_threads()}))
    return 0


def run_variant(args, variant):
    """One child process of `variant`: its figures, and the other processes' CPU share."""
    command = [sys.executable, os.path.abspath(__file__), *args.argv, '--child', variant]
    env = {k: v for k, v in os.environ.items()  # the variants, not the caller's settings
           if k != 'GLIBC_TUNABLES' and not k.startswith('MALLOC_')}
    monitor = Interference()
    monitor.start()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    others = monitor.stop()
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        sys.exit(f'{variant}: ' + ((proc.stderr or proc.stdout).strip().splitlines() or
                                   ['no output'])[-1])
    return {**json.loads(lines[-1]), 'others': others}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=1024, help='image size')
    add_network_options(p)
    p.add_argument('--images', type=int, default=3, help='timed images per process')
    p.add_argument('--rounds', type=int, default=2, help='processes per variant')
    p.add_argument('--json', default=None, help='write the figures to this file')
    p.add_argument('--child', choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the children's command line
    if args.child:
        return measure(args)

    runs = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            runs[variant].append(run_variant(args, variant))
    info = machine()
    print(f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
          f"{args.size}x{args.size}, {args.images} images x {args.rounds} processes each")
    print('| variant | time per image | page faults per image | peak RSS | others |')
    print('|---|---:|---:|---:|---:|')
    summary = {}
    for variant in VARIANTS:
        rows = runs[variant]
        summary[variant] = {key: statistics.median(row[key] for row in rows)
                            for key in ('seconds', 'page_faults', 'peak_rss_mb', 'others')}
        s = summary[variant]
        print(f"| {variant} | {s['seconds']:.2f} s | {s['page_faults']:,.0f} | "
              f"{s['peak_rss_mb']:.0f} MB | {s['others']:.0%} |")
    ratio = summary['reuse']['seconds'] / summary['plain']['seconds']
    print(f'reuse / plain time: {ratio:.2f}')
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ('json', 'child', 'argv')}
        with open(args.json, 'w') as f:
            json.dump({'machine': info, 'config': config,
                       'results': {'runs': runs, 'summary': summary, 'ratio': ratio}},
                      f, indent=2)
        print(f'written: {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
