"""Weight swaps in a running vLLM engine, for the generation service and the trainer.

`WeightSwapExtension` is mixed into vLLM's worker (engine argument `worker_extension_cls`);
vLLM imports this module inside its worker processes, so it must stay light: no torch or
vLLM imports at module level. `swap_weights` is the same swap as a function of the worker,
for `LLM.collective_rpc` on an engine whose worker runs in this process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def swap_weights(worker: Any, weights_path: str | None = None, weights: Iterable[tuple[str, Any]] | None = None) -> None:
    """Replaces the worker's weights in place, from a folder or from (name, tensor) pairs.

    On the CPU, a linear layer computes with a copy of its weight packed for oneDNN when
    the weights are processed. `reload_weights` reprocesses every layer it loads, but a
    tied output head loads nothing of its own (it shares the input embedding), so it kept
    computing with the old embedding: answers after a swap were garbage. Reprocessing the
    head from the (already reloaded) shared weight fixes it; on a GPU that is a no-op.
    """
    if weights is not None:
        worker.reload_weights(weights_iterator=weights)
    else:
        worker.reload_weights(weights_path=weights_path)
    model = worker.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "quant_method", None) is None:
        return
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.quant_method.process_weights_after_loading(head)


class WeightSwapExtension:
    """`swap_weights` as a worker method, for `collective_rpc("swap_weights", ...)` across processes."""

    def swap_weights(self, weights_path: str) -> None:
        swap_weights(self, weights_path=weights_path)
