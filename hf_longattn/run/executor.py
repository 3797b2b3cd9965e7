"""Where a run's processes come from: rank, world size, device, barriers and main-only work (local or accelerate).

An *executor* is what the steps ask about the processes of one launch; it never decides what to
compute. `LocalExecutor` is one process; `AccelerateExecutor` is every process started by
``accelerate launch`` or ``torchrun`` (gloo on CPU, NCCL on GPUs), through
`accelerate.PartialState`; `TaskExecutor` is one task started by another engine (datatrove, Ray),
which the driver's engine runs stage after stage (`hf_longattn.run.driver`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import LongAttnError

logger = logging.getLogger(__name__)

BARRIER_TIMEOUT = datetime.timedelta(hours=24)
"""How long a process waits for the others at a barrier (one may still be building windows or scoring)."""


class Executor:
    """The processes of one launch: override the attributes and the three collective methods."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        """The device this process scores on: ``cuda:<local rank>`` when there is a GPU, else ``cpu``."""
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu"

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        return value

    def run_on_main(self, function: Callable[[], Any]) -> None:
        """Run ``function`` on the main process while the others wait; if it fails, every process raises."""
        error = None
        if self.is_main:
            try:
                function()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other processes
                error = exc
        message = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise LongAttnError(f"the main process failed: {message}")


class LocalExecutor(Executor):
    """One process: rank 0 of 1; barriers and broadcasts are no-ops."""


class TaskExecutor(Executor):
    """Task ``rank`` of ``world_size`` started by another engine (datatrove, Ray): no collectives, no barrier.

    Like every process, it claims its units (the rank only picks where it starts looking); the
    engine runs the stages one after the other.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: str | None = None, local_rank: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size, self._device, self.local_rank = rank, world_size, device, local_rank

    @property
    def device(self) -> str:
        return self._device or super().device

    def barrier(self) -> None:
        raise RuntimeError("tasks of another engine cannot wait for each other: run the stages one after the other")


class AccelerateExecutor(Executor):
    """The processes of ``accelerate launch`` / ``torchrun``, through `accelerate.PartialState`."""

    def __init__(self) -> None:
        import torch
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
        self.rank = self.state.process_index
        self.world_size = self.state.num_processes
        self.local_rank = self.state.local_process_index

    @property
    def device(self) -> str:
        import torch

        return str(self.state.device) if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun / accelerate (1 when not launched by them)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def executor_from_environment() -> Executor:
    """`AccelerateExecutor` under ``accelerate launch`` or ``torchrun`` with several processes, else `LocalExecutor`."""
    if launched_world_size() > 1:
        return AccelerateExecutor()
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        logger.info(
            "hf_longattn: one process. `accelerate launch --cpu` always starts one process; for several CPU "
            "processes use `accelerate launch --multi_gpu --num_processes N` (gloo on CPU) or "
            "`torchrun --standalone --nproc_per_node N`."
        )
    return LocalExecutor()
