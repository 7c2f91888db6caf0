"""Distributed: one process per device under torchrun (`Distributed`, this process's place
in the job, or a lone process).
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from pix2pixCC_Options import UserError
from pix2pixCC_Utils import cpu_requested, select_device


class Distributed:
    """This process's place in a torchrun job (DistributedDataParallel), or a lone process.

    torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. With more than one process, each drives
    one device: GPU `LOCAL_RANK` with NCCL, or the CPU with Gloo when `--gpu_ids -1` or no
    CUDA. Only rank 0 (`is_main`) writes files.
    """

    def __init__(self):
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.enabled = self.world_size > 1
        self.is_main = self.rank == 0

    def setup(self, opt, log=print):
        """Start the process group; returns (device, gpu_ids) like `select_device`."""
        if not self.enabled:
            return select_device(opt, log)
        use_cuda = not cpu_requested(opt) and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        device = torch.device(f'cuda:{self.local_rank}' if use_cuda else 'cpu')
        log(f"distributed: {self.world_size} processes "
            f"({'NCCL on GPUs' if use_cuda else 'Gloo on CPUs'})")
        return device, []

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, function):
        """Run `function` on rank 0 only; every rank gets its result, or raises its UserError
        (so a bad dataset stops all processes instead of leaving them waiting)."""
        result, error = None, None
        if self.is_main:
            try:
                result = function()
            except UserError as caught:
                if not self.enabled:
                    raise
                error = (str(caught), caught.exit_status)
        result, error = self.broadcast((result, error))
        if error is not None:
            failure = UserError(error[0])
            failure.exit_status = error[1]
            raise failure
        return result

    def max(self, value):
        """The largest of the ranks' integer `value`s (e.g. whether any rank was signalled)."""
        if not self.enabled:
            return value
        box = torch.tensor([value], dtype=torch.int64,
                           device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def mean(self, terms):
        """{name: 0-d tensor} averaged over all processes (the loss of the global batch)."""
        if not self.enabled:
            return terms
        values = torch.stack([value.float() for value in terms.values()])
        dist.all_reduce(values)
        return dict(zip(terms, values / self.world_size, strict=True))

    def all_finite(self, value):
        """True when `value` (a 0-d tensor) is finite on every rank."""
        finite = torch.isfinite(value.detach()).float()
        if self.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def wrap(self, module, device):
        """DistributedDataParallel around `module`; on GPUs BatchNorm becomes SyncBatchNorm
        (PyTorch has no SyncBatchNorm on the CPU, so there each process keeps its own batch
        statistics)."""
        if not self.enabled:
            return module
        if device.type == 'cuda':
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == 'cuda'
                                       else None)

    def close(self):
        if self.enabled:
            dist.destroy_process_group()
