"""Methods mixed into vLLM's worker (engine argument `worker_extension_cls`).

vLLM imports this module inside its worker processes, so it must stay light: no torch or
vLLM imports at module level, nothing of the server.
"""

from __future__ import annotations

from typing import Any


class WeightSwapExtension:
    """In-place weight swap that also refreshes what `reload_weights` leaves stale.

    On the CPU, a linear layer computes with a copy of its weight packed for oneDNN when
    the weights are processed. `reload_weights` reprocesses every layer it loads, but a
    tied output head loads nothing of its own (it shares the input embedding), so it kept
    computing with the old embedding: answers after a swap were garbage. Reprocessing the
    head from the (already reloaded) shared weight fixes it; on a GPU that is a no-op.
    """

    def swap_weights(self, weights_path: str) -> None:
        worker: Any = self
        worker.reload_weights(weights_path=weights_path)
        model = worker.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or getattr(head, "quant_method", None) is None:
            return
        if head.weight.data_ptr() == embed.weight.data_ptr():
            head.quant_method.process_weights_after_loading(head)
