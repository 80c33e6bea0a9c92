"""Data-parallel training across processes: the few collectives the trainer needs, no-ops in one process.

Launch the trainer with ``accelerate launch`` (or ``torchrun``); every process is a rank holding a full replica of
the policy::

    accelerate launch --config_file configs/accelerate/ddp.yaml -m acrl.app.cli train --config ... --out RUN

One step with global batch B = ``train.problems_per_step`` over W ranks:

* rank r takes problems ``[r B/W, (r+1) B/W)`` of the step, samples their captions and runs their episodes;
* the episodes are all-gathered, so every rank holds the whole batch's groups and computes the same rewards, the
  same BNPO Beta fit and the same metrics; each rank then keeps the advantages of its own rows;
* the loss is normalised by the global number of caption tokens / sequences, so the per-rank gradients *sum* to the
  single-process gradient; they are summed over ranks before clipping, and every rank takes the same optimiser
  step, which keeps the replicas identical (the trainable parameters are broadcast from rank 0 once at the start).

This is what DDP does, written out: DDP itself would need every forward to go through its wrapper, which the
``Policy`` protocol (generate / logprobs / answer) does not offer. The process group is set up by accelerate's
``PartialState`` from the launcher's environment: NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.
DeepSpeed and FSDP launches are refused: parameters sharded by them cannot be used through the policy's own
methods (see docs/scaling.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the run. The default is the single-process run, where every method is a no-op."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes metrics, transcripts and checkpoints."""
        return self.rank == 0

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over ranks (a new tensor on ``x``'s device)."""
        if self.world == 1:
            return x.clone()
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y)
        return y.to(x.device)

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum ``p.grad`` over ranks in place. A parameter without a gradient on every rank keeps ``grad = None``
        (as it would in one process); one with a gradient on some ranks counts zeros for the others."""
        if self.world == 1:
            return
        has = self.all_sum(torch.tensor([float(p.grad is not None) for p in params]))
        for p, h in zip(params, has.tolist()):
            if h == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            dist.barrier()

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``params`` to every rank."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


SINGLE = Dist()


def setup(timeout_minutes: float = 180.0) -> Dist:
    """The process group of a multi-process launch, or :data:`SINGLE` when this is the only process.

    Call it before building the policy: on GPUs it selects this rank's device, so that ``device: cuda`` in the
    config means ``cuda:LOCAL_RANK``. Idempotent. ``timeout_minutes`` bounds how long a rank waits in a collective
    (rank 0 runs the periodic evaluation alone while the others wait at the next step's gather).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return SINGLE
    for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(flag, "false").lower() == "true":
            raise ValueError(f"acrl's trainer runs data-parallel replicas (configs/accelerate/ddp.yaml); a {name} "
                             "launch shards parameters that the policy's generate/logprobs calls use directly. "
                             "See docs/scaling.md")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank=state.process_index, world=state.num_processes, device=torch.device(state.device))


def shard(n: int, d: Dist) -> slice:
    """This rank's contiguous share of ``n`` items (``n`` must divide evenly: every rank does the same work)."""
    if n % d.world:
        raise ValueError(f"train.problems_per_step={n} must be a multiple of the number of processes ({d.world})")
    k = n // d.world
    return slice(d.rank * k, (d.rank + 1) * k)
