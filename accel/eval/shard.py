"""Data-parallel evaluation with accelerate: work split by batch, results gathered on the main process.

The same command runs on one process or under ``accelerate launch``:

    accel eval --model fashion-sd ...                                          # one process
    accelerate launch --multi_gpu --num_processes 2 -m accel.cli eval ...       # two GPUs (or CPU, below)
    accelerate launch --multi_gpu --num_machines 2 --machine_rank R --main_process_ip HOST \\
        --main_process_port 29500 --num_processes 16 -m accel.cli eval ...     # two 8-GPU nodes

On CPUs, ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...`` starts two
processes; ``--num_processes 2 --cpu`` silently starts one (measured with accelerate 1.x).

Why the images equal a one-process run's: the work is cut into batches of a fixed size before it is
shared out (batch ``i`` goes to rank ``i mod world``), so every image is computed in the same batch,
with the same per-prompt seeds, whatever the number of processes; and each process runs with the
same fixed thread count (``threads``), since a CPU matmul's reduction order can depend on it.
On GPUs the same holds on one kind of GPU with deterministic kernels; across GPU models, or with
kernels that pick their algorithm at run time (cuDNN benchmark mode, atomics in some attention
backwards), images can differ in the last bits and, through the sampler, visibly: compare such
runs by PSNR, not by equality.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

__all__ = ["Shard", "batches"]


def batches(count: int, size: int) -> List[range]:
    """``range``s of ``size`` consecutive indices covering ``range(count)`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch must be >= 1; got {size}")
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass
class Shard:
    """This process's place in the run: ``rank`` of ``world``, and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_accelerate(cls, cpu: Optional[bool] = None, threads: Optional[int] = None) -> "Shard":
        """The process group ``accelerate launch`` set up (or a single process without it). ``cpu``:
        default True when no GPU is visible. ``threads``: torch's thread count, the same in every
        process (default: the cores shared evenly among the processes on this machine)."""
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, local)))
        return cls(rank=state.process_index, world=state.num_processes, device=state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, work: Sequence[Any]) -> List[int]:
        """Indices of the items of ``work`` (batches) this process computes: ``i mod world == rank``."""
        return [i for i in range(len(work)) if i % self.world == self.rank]

    def gather(self, payload: Any) -> List[Any]:
        """Every process's ``payload`` (picklable; tensors on the CPU), in rank order, on every process."""
        if self.world == 1:
            return [payload]
        from accelerate.utils import gather_object

        return list(gather_object([payload]))

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def close(self) -> None:
        """Wait for every process, then take the process group down. A process that exits with the
        group still up can abort in its teardown ("terminate called without an active exception",
        seen with two CPU processes on a busy machine), failing the whole launch."""
        if self.world > 1:
            import torch.distributed as dist

            self.barrier()
            if dist.is_initialized():
                dist.destroy_process_group()
