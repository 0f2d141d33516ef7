"""Graceful stop on SIGTERM / SIGINT (preemption, scancel, Ctrl-C).

First signal: remember it; the trainer finishes the optimizer step in progress, all ranks agree to stop
at the same step (`should_stop` all-reduces the flag), save a checkpoint and exit 0 with a message.
Second signal: exit at once (status 128 + signal number). A repeat within `REPEAT_WINDOW_S` of the first
is taken for the same request: launchers forward the signal they get (deepspeed's launch.py sends SIGTERM
to ranks that SLURM or Ctrl-C signalled a millisecond before), and that must not cancel the save.

Launchers (deepspeed, SLURM, Ctrl-C to the process group) signal the data loader's worker processes
too; a worker killed that way would make PyTorch raise in the training process in the middle of the
final save. While the handlers are installed, processes forked by this one (DataLoader workers) start
with SIGTERM and SIGINT blocked: they keep serving batches, and exit with the training process.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0
_block_in_children = False


def _after_fork_in_child() -> None:
    if _block_in_children:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


os.register_at_fork(after_in_child=_after_fork_in_child)


class StopRequest:
    """Context manager: installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self, world_size: int = 1):
        self.signum: int | None = None
        self._first_at = 0.0
        self.world_size = world_size
        self._previous: dict = {}
        self._pid = os.getpid()
        self._group = None
        if world_size > 1 and dist.is_initialized():
            # A gloo group keeps the per-step agreement on the CPU: no GPU synchronization.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child that inherited the handler: not ours to act on
            return
        name = signal.Signals(signum).name
        if self.signum is not None and time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the same request, forwarded by a launcher
        if self.signum is not None:
            print(f"\n{name} again: exiting now without saving (the last checkpoint is kept)",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()
        print(f"\n{name} received: finishing the current step, then saving a checkpoint and stopping "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        global _block_in_children
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            _block_in_children = True
        return self

    def __exit__(self, *exc) -> None:
        global _block_in_children
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        _block_in_children = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def should_stop(self) -> bool:
        """True on every rank when any rank got a signal (call it on all ranks at the same point)."""
        if self._group is None:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "stop request"
