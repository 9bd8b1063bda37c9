"""The DDP strategy of ``conf/trainer/ddp.yaml`` and ``ddp_sim.yaml``: Lightning's ``DDPStrategy`` with a process-group
timeout in minutes that a user can set, no buffer broadcast and gradients as bucket views.

* ``timeout_min``: how long a collective may wait for a missing rank before the process group gives up (NCCL's
  watchdog then ends the rank; gloo raises). torch's default is 30 minutes for gloo and 10 for NCCL; a rank blocked in
  a collective or a CUDA sync runs no Python signal handler, so this is the bound on a hang when a peer is gone
  without a word (see :func:`ddpm_lightning.signals.abort_on_sigterm` for a peer that got SIGTERM).
* ``broadcast_buffers=false``: DDP would broadcast every buffer from rank zero before every forward; this project's
  buffers are constants (the noise schedule, deepinv's, the DiffUNet adapter's embedding frequencies), equal on every
  rank by construction.
* ``gradient_as_bucket_view=true``: the gradients are views into DDP's all-reduce buckets (one copy less per step and
  the memory of one gradient set less).
"""

from __future__ import annotations

import math
from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy

from ddpm_lightning.errors import check_bool, invalid, is_number


def ddp_strategy(
    timeout_min: float = 10.0,
    broadcast_buffers: bool = False,
    gradient_as_bucket_view: bool = True,
    find_unused_parameters: bool = False,
    process_group_backend: str | None = None,
) -> DDPStrategy:
    """``DDPStrategy(timeout=timedelta(minutes=timeout_min), broadcast_buffers=..., gradient_as_bucket_view=...,
    find_unused_parameters=..., process_group_backend=...)``; ``process_group_backend`` None = Lightning's choice
    (NCCL on GPUs, gloo on CPUs).

    Raises:
        ConfigError: ``timeout_min`` not a finite number > 0, or a flag that is not a bool.
    """
    if not is_number(timeout_min) or not 0 < timeout_min < math.inf:
        raise invalid("timeout_min", timeout_min, "must be a finite number of minutes > 0, e.g. 10")
    for key, flag in (
        ("broadcast_buffers", broadcast_buffers),
        ("gradient_as_bucket_view", gradient_as_bucket_view),
        ("find_unused_parameters", find_unused_parameters),
    ):
        check_bool(key, flag)
    return DDPStrategy(
        timeout=timedelta(minutes=timeout_min),
        process_group_backend=process_group_backend,
        broadcast_buffers=broadcast_buffers,
        gradient_as_bucket_view=gradient_as_bucket_view,
        find_unused_parameters=find_unused_parameters,
    )
