"""pix2pixCC benchmarks of this repository's variants: training, data, inference (time, memory).

    python benchmarks/benchmark.py                      # this repository's variants (CPU)
    python benchmarks/benchmark.py --what train --size 256 --steps 7 --warmup 2 --json out.json
    python benchmarks/benchmark.py --what inference --inference_size 1024 --inference_runs 3

Side by side with the published pix2pixCC scripts is benchmarks/side_by_side.py (the
`--published DIR` of this script, from before it had its own file, still runs it).

Each part measures this repository's variants, each in its own Python process (so the peak
RSS reported is its own). Times are medians over the timed repetitions, after warm-up. The
table is printed; `--json` writes every figure and the machine.

On a shared machine, other processes distort timings (one test suite on a 2-core machine
halves the speed of a training step). For every timed run the benchmark records the share of
the CPUs that other processes used meanwhile (column `others`); runs above
`--max_interference` (default 10%) are dropped and repeated, and `--wait_quiet SECONDS` waits
for idle CPUs before each measurement. `--gpu_ids 0` measures on the first GPU (peak GPU
memory is then reported in the JSON too).

Variants (`--train_variants`, `--data_variants`, `--inference_variants`):

train     driver     the driver's own step: pix2pixCC_Train.train_step with
                     pix2pixCC_Train.make_optimizer (fused Adam where torch has it, gradients
                     released after the step), networks placed by
                     pix2pixCC_Utils.prepare_network (on the CPU: the GEMM path for the
                     widest convolutions)
          modifiers, appended with '+' (e.g. driver+bf16):
            +onednn   without the GEMM convolution path (shows that path's gain)
            +nomkldnn torch.backends.mkldnn.enabled = False: every convolution by
                      PyTorch's own im2col + GEMM kernels
            +cl       channels_last weights and inputs
            +bf16     --data_type 16 (bfloat16 autocast on the CPU and on bf16 GPUs)
            +compile  --compile (torch.compile through prepare_network; slow first step)
data      ours       CustomDataset.__getitem__ (float32, no interpolation at angle 0)
          loader     DataLoader over CustomDataset as the Train driver builds it
                     (--n_workers workers, persistent), per sample, steady state
inference ours       machinery.translation.generate under torch.inference_mode (as Test does)
          ours+bf16  ours under bfloat16 autocast (--data_type 16)
          ours_cl    ours with channels_last weights and input
          ours+plain ours with PyTorch's own kernels for every convolution (without the
                     CPU paths of machinery/fast_conv.py: shows their gain)
matmul    float32, bfloat16: one 4096 x 4096 matrix product (GFLOP/s of the machine's BLAS)
"""
import argparse
import statistics
import sys
import tempfile
import time

import common  # also puts the repository on sys.path, for the pix2pixCC_* modules
from common import network_argv, time_items, timed, wait_for_quiet, write_fits_pairs

PARTS = ('train', 'data', 'inference', 'matmul')
DEFAULT_VARIANTS = {'train': 'driver',
                    'data': 'ours,loader',
                    'inference': 'ours',
                    'matmul': 'float32,bfloat16'}


# ----------------------------------------------------------------------------------------
# Helpers shared with profile_step.py, side_by_side.py and the tests (test_benchmarks.py)
# ----------------------------------------------------------------------------------------


def training_setup(variant, opt, device, size):
    """A training variant ready to run: returns (step, G, D), where step() runs one training
    step on fixed random data of size x size and returns (loss_D, loss_G) detached."""
    import torch
    import pix2pixCC_Utils as utils
    from machinery.fast_conv import use_gemm_convolutions
    from pix2pixCC_Networks import Discriminator, Generator, Loss, weights_init
    from pix2pixCC_Train import make_optimizer, train_step
    base, modifiers = parse_train_variant(variant)
    precision = utils.Precision(opt, device)
    torch.manual_seed(0)
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    if 'nomkldnn' in modifiers:
        torch.backends.mkldnn.enabled = False  # PyTorch's own (im2col + GEMM) kernels
    # as pix2pixCC_Train.main does it
    G, D = utils.prepare_network(G, opt, device), utils.prepare_network(D, opt, device)
    if 'onednn' in modifiers:
        for module in (G, D):
            use_gemm_convolutions(module, enabled=False)
    optimisers = [make_optimizer(m.parameters(), opt) for m in (G, D)]
    layout = utils.memory_format(device)
    if 'cl' in modifiers:
        layout = torch.channels_last
        G, D = G.to(memory_format=layout), D.to(memory_format=layout)
    criterion = Loss(opt)
    shape = (opt.batch_size, opt.input_ch, size, size)
    input = (torch.rand(shape) * 2 - 1).to(device).contiguous(memory_format=layout)
    target = (torch.rand(shape[:1] + (opt.target_ch,) + shape[2:]) * 2 - 1).to(device) \
        .contiguous(memory_format=layout)

    def step():
        loss_D, loss_G, _, _ = train_step(criterion, G, D, *optimisers, precision, input,
                                          target)
        return loss_D.detach(), loss_G.detach()

    return step, G, D


# ----------------------------------------------------------------------------------------
# Children: one measurement each (common.child prints it as one JSON line)
# ----------------------------------------------------------------------------------------


def reset_gpu_peak(device):
    """The peak GPU memory so far (warm-up: cuDNN's autotuner tries algorithms with large
    workspaces), then start counting afresh; None off CUDA."""
    if device.type != 'cuda':
        return None
    import torch
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return peak


def gpu_peaks(device, warmup_peak):
    """peak_gpu_mb of the timed repetitions, and that of the warm-up."""
    if device.type != 'cuda':
        return {}
    import torch
    return {'peak_gpu_mb': torch.cuda.max_memory_allocated() / 2**20,
            'peak_gpu_mb_warmup': warmup_peak}


TRAIN_BASES = ('driver',)
TRAIN_MODIFIERS = ('onednn', 'nomkldnn', 'cl', 'bf16', 'compile')


def parse_train_variant(variant):
    """'driver+cl+bf16' -> ('driver', {'cl', 'bf16'})."""
    base, *modifiers = variant.split('+')
    if base not in TRAIN_BASES or not set(modifiers) <= set(TRAIN_MODIFIERS):
        raise SystemExit(f'unknown training variant {variant!r}: a base of '
                         f'{", ".join(TRAIN_BASES)} with +modifiers of '
                         f'{", ".join(TRAIN_MODIFIERS)}')
    return base, set(modifiers)


def train_options(argv, variant):
    """The TrainOption namespace of a training variant (+bf16, +compile set options)."""
    from pix2pixCC_Options import TrainOption
    _, modifiers = parse_train_variant(variant)
    extra = ['--data_type', '16' if 'bf16' in modifiers else '32']
    if 'compile' in modifiers:
        extra += ['--compile', 'True']
    return TrainOption().parse(argv + extra)


def child_train(args, variant):
    import torch
    import pix2pixCC_Utils as utils
    opt = train_options(network_argv(args) + ['--data_size', str(args.size)], variant)
    device, _ = utils.select_device(opt, log=lambda *a: None)
    run, _, _ = training_setup(variant, opt, device, args.size)

    def step():
        loss_D, loss_G = run()
        float(loss_D + loss_G)  # wait for the device
        if device.type == 'cuda':
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()  # with --compile: compilation happens here
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    gpu_peak = reset_gpu_peak(device)  # the autotuner's trial workspaces are not the step's
    times, shares = timed(step, args.steps, args.max_interference, 3 * args.steps)
    result = {'seconds': statistics.median(times), 'times': times, 'interference': shares,
              'first_step_seconds': first}
    return result | gpu_peaks(device, gpu_peak)


def child_data(args, variant):
    import torch
    from pix2pixCC_Options import TrainOption
    from pix2pixCC_Pipeline import CustomDataset
    with tempfile.TemporaryDirectory(prefix='p2pcc-bench-') as folder:
        input_dir, target_dir = write_fits_pairs(folder, args.data_pairs, args.data_size)
        opt = TrainOption().parse(network_argv(args) + [
            '--data_format_input', 'fits', '--data_format_target', 'fits',
            '--input_dir_train', input_dir, '--target_dir_train', target_dir,
            '--data_size', str(args.data_size), '--n_workers', str(args.n_workers)])
        dataset = CustomDataset(opt)
        n = len(dataset)
        if variant != 'loader':
            return time_items(lambda i: dataset[(i, 1000 + i)], n, args)
        from torch.utils.data import DataLoader
        items = [(i % n, 1000 + i) for i in range(n * (args.data_repeats + 1))]
        loader = DataLoader(dataset, batch_size=opt.batch_size, sampler=items,
                            num_workers=opt.n_workers, pin_memory=torch.cuda.is_available(),
                            persistent_workers=opt.n_workers > 0)
        iterator = iter(loader)
        for _ in range(n):  # warm-up: workers started, files in the page cache
            next(iterator)
        start = time.perf_counter()
        count = 0
        for batch in iterator:
            count += batch[0].shape[0]
        seconds = (time.perf_counter() - start) / count
        # the workers' memory is not in this process's ru_maxrss
        return {'seconds': seconds, 'times': [seconds]}


def child_inference(args, variant):
    import torch
    import pix2pixCC_Utils as utils
    from machinery.fast_conv import use_gemm_convolutions
    from pix2pixCC_Networks import Generator, weights_init
    from pix2pixCC_Options import TestOption
    from machinery.translation import generate
    base, *modifiers = variant.split('+')
    extra = ['--data_type', '16'] if 'bf16' in modifiers else []
    opt = TestOption().parse(network_argv(args) + ['--data_size', str(args.inference_size)]
                             + extra)
    device, _ = utils.select_device(opt, log=lambda *a: None)
    precision = utils.Precision(opt, device)
    torch.manual_seed(0)
    G = utils.prepare_network(Generator(opt).apply(weights_init).eval(), opt, device)
    if 'plain' in modifiers:
        use_gemm_convolutions(G, enabled=False)
    layout = utils.memory_format(device)
    if base == 'ours_cl':
        layout = torch.channels_last
        G = G.to(memory_format=layout)
    input = (torch.rand(1, opt.input_ch, args.inference_size, args.inference_size) * 2 - 1)

    def run():
        with torch.inference_mode():
            x = input.to(device, memory_format=layout)
            return generate(G, x, opt.n_downsample, precision).cpu().numpy().shape

    run()  # warm-up
    gpu_peak = reset_gpu_peak(device)
    times, shares = timed(run, args.inference_runs, args.max_interference,
                          3 * args.inference_runs)
    result = {'seconds': statistics.median(times), 'times': times, 'interference': shares}
    return result | gpu_peaks(device, gpu_peak)


def child_matmul(args, variant):
    """Seconds of one (n x n) @ (n x n) product and the GFLOP/s it reaches: what the
    machine's BLAS can do, to judge the convolutions' share of a step against."""
    import torch
    n = args.matmul_size
    dtype = getattr(torch, variant)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times, shares = timed(lambda: a @ b, 5, args.max_interference, 15)
    seconds = statistics.median(times)
    return {'seconds': seconds, 'times': times, 'interference': shares,
            'gflops': 2 * n ** 3 / seconds / 1e9}


CHILDREN = {'train': child_train, 'data': child_data, 'inference': child_inference,
            'matmul': child_matmul}


# ----------------------------------------------------------------------------------------
# Parent: run every (part, variant) in its own process, print the table, write JSON
# ----------------------------------------------------------------------------------------


def variants(args, argv, parts):
    """This repository's variants, each in its own process; prints the table."""
    results = []
    header = f"{'part':<10}{'variant':<14}{'size':>5}{'seconds':>10}{'vs first':>9}" \
             f"{'peak RSS MB':>12}{'n':>4}{'others':>8}"
    print(header)
    print('-' * len(header))
    for part in parts:
        size = {'train': args.size, 'data': args.data_size,
                'inference': args.inference_size, 'matmul': args.matmul_size}[part]
        names = [v.strip() for v in getattr(args, f'{part}_variants').split(',') if v.strip()]
        first = None
        for variant in names:
            quiet = wait_for_quiet(args.wait_quiet)
            result = common.run_child(__file__, argv, part, variant, args.threads)
            result['quiet_before'] = quiet
            result.update(part=part, variant=variant, size=size)
            results.append(result)
            if 'error' in result:
                print(f"{part:<10}{variant:<14}{size:>5}  failed: {result['error']}")
                continue
            first = first or result['seconds']
            shares = sorted(x for x in result.get('interference', []) if x is not None)
            others = f"{statistics.median(shares):.0%}" if shares else '-'
            if shares and statistics.median(shares) > args.max_interference:
                others += '!'  # could not get undisturbed timings: do not trust this row
            print(f"{part:<10}{variant:<14}{size:>5}{result['seconds']:>10.4f}"
                  f"{result['seconds'] / first:>9.3f}{result['peak_rss_mb']:>12.0f}"
                  f"{len(result['times']):>4}{others:>8}"
                  + (f"  {result['gflops']:.0f} GFLOP/s" if 'gflops' in result else ''),
                  flush=True)
    unit = {'train': 's/step', 'data': 's/pair', 'inference': 's/image',
            'matmul': 's/product'}
    print('seconds: median ' + ', '.join(f'{p} {unit[p]}' for p in parts) +
          '; vs first: ratio to the first variant of the part; n: timings kept; others: '
          'median share of the CPUs other processes used meanwhile (!: above '
          '--max_interference even after retries: the row is not reliable)')
    return results


def parse_args(argv=None):
    p = common.argument_parser(__doc__, PARTS)
    p.add_argument('--steps', type=int, default=7, help='timed training steps')
    p.add_argument('--warmup', type=int, default=2, help='untimed training steps first')
    p.add_argument('--inference_runs', type=int, default=3, help='timed runs after one warm-up')
    p.add_argument('--matmul_size', type=int, default=4096)
    for part in PARTS:
        p.add_argument(f'--{part}_variants', default=DEFAULT_VARIANTS[part])
    return common.parse(p, argv)


def side_by_side_argv(argv):
    """The command line of side_by_side.py for an old `--published DIR ...` one, else None."""
    old = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    old.add_argument('--published')
    known, rest = old.parse_known_args(argv)
    return None if known.published is None else [known.published, *rest]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    forwarded = side_by_side_argv(argv)
    if forwarded is not None:
        import side_by_side
        return side_by_side.main(forwarded)
    args = parse_args(argv)
    if args.child:
        return common.child(args, CHILDREN)
    parts = common.parts_of(args, PARTS)
    return common.record(args, lambda: variants(args, argv, parts))


if __name__ == '__main__':
    sys.exit(main())
