"""Several training processes (torchrun / accelerate launch): who writes, and a check that
every process ended with the same weights.

The TRL stages run data-parallel under a launcher: each process trains a shard of every
global batch and gradients are averaged, so the weights stay identical. Files and registry
entries are written by the main process only; the others would race it (two renames of
`model/`, duplicated metric lines, two registry versions).

`retrain` is not one of them: it stays one process and starts its training stage under
torchrun (`launch_command`), on one node or, through a c10d rendezvous, on several.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tuneloop.trainer.config import TrainerSettings

T = TypeVar("T")

log = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a single process, and in the process of global rank 0 under a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_command(settings: TrainerSettings, cli_args: list[str], rendezvous_id: str | None = None) -> list[str]:
    """torchrun running `tuneloop.trainer.cli *cli_args` on this node's share of the processes.

    One node: `--standalone` (a rendezvous on a free local port). Several: every node starts
    the same command and they meet at node 0's c10d store; node 0 hosts it (is_host) rather
    than leaving it to whichever agent resolves the endpoint to itself first.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(settings.processes_per_node)]
    if settings.nodes == 1:
        command.append("--standalone")
    else:
        command += [
            "--nnodes", str(settings.nodes),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", str(settings.rendezvous_endpoint),
            "--rdzv-id", settings.rendezvous_id or rendezvous_id or "tuneloop",
            "--rdzv-conf", f"is_host={'true' if settings.node_rank == 0 else 'false'}",
        ]  # fmt: skip
        if settings.local_addr:
            command += ["--local-addr", settings.local_addr]
    return [*command, "-m", "tuneloop.trainer.cli", *cli_args]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def ddp_backend() -> str | None:
    """`gloo` for several processes without a GPU (NCCL, the GPU default, has no CPU path)."""
    import torch

    return "gloo" if world_size() > 1 and not torch.cuda.is_available() else None


def weights_digest(model: Any) -> str:
    """SHA-256 of a model's parameters and buffers, by name, in a fixed order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(model: Any) -> str:
    """The digest of `model`'s weights, after checking every process holds the same ones.

    Data parallelism keeps replicas identical only if every process saw the same updates; a
    process that diverged (a rank-dependent code path, a missed all-reduce) would otherwise
    go unnoticed, since only the main process's weights are saved.
    """
    import torch.distributed as dist

    mine = weights_digest(model)
    log.info("trained weights", extra={"fields": {"rank": int(os.environ.get("RANK", "0")), "weights_sha256": mine}})
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the processes ended with different weights: {digests}")
    return mine


def on_main(fn: Callable[[], T]) -> T:
    """Runs `fn` (a registry write, say) in the main process only; every process gets its result.

    An error in the main process is raised in every process, so none waits for a result
    that will not come.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # handed to the others, then raised here too
            box[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"the main process failed: {value}")
    return value
