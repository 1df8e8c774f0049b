"""The processes of one run, through accelerate: one process unless the run was launched by
`torchrun` or `accelerate launch` (or `sheafscope run --processes N`, which starts torchrun)."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
import sys
from typing import TypeVar

from sheafscope.errors import ConfigError

T = TypeVar("T")

# How long a process that finished its units waits for the others before giving up.
WAIT_HOURS = 48


def launched_size() -> int:
    """How many processes the launcher started (1 when none did)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Processes:
    """This process's place among the run's processes: rank, count, barrier, sharing and the
    device it computes on. A single process needs no process group and starts none."""

    def __init__(self, device: str | None):
        self.state = None
        self.rank, self.size = 0, 1
        self.device = device
        if launched_size() > 1:
            from accelerate import PartialState

            cpu = device == "cpu" or (device is None and not _cuda())
            # gloo on the CPU, nccl with one GPU per process on CUDA (PartialState picks the device by local rank).
            self.state = PartialState(cpu=cpu, timeout=timedelta(hours=WAIT_HOURS))
            self.rank, self.size = self.state.process_index, self.state.num_processes
            if not cpu:
                if device not in (None, "cuda"):
                    raise ConfigError(f"--device {device} with {self.size} processes: each process takes its own GPU "
                                      "(cuda:LOCAL_RANK); omit --device or pass --device cuda")
                self.device = str(self.state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value: T) -> T:
        """The main process's `value`, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.is_main else None]
        broadcast_object_list(box)
        return box[0]

    def mine(self, items: list[T]) -> list[T]:
        """This process's contiguous share of `items` (accelerate's split)."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as part:
            return list(part)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def relaunch(processes: int, argv: list[str]) -> int:
    """Run `sheafscope ARGV` in `processes` processes under torchrun (this process waits and
    returns its exit status). The children see WORLD_SIZE and do not launch again."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "sheafscope", *argv]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return subprocess.call(cmd, env=env)
