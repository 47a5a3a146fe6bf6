"""Greedy decoding with the evicting cache, one token per step, eagerly or by CUDA-graph replay.

`Decoder` holds the static inputs of a decode step, (B, 1) token ids and (B, 1) positions, and a step
writes the argmax of the logits back into the token buffer and advances the positions, all on the
device. Because the evicting cache's decode step makes no host synchronisation and updates its state
in place, the whole step (model forward, eviction, attention, argmax) can be captured once in a CUDA
graph and replayed per token: `Decoder(..., graph=True)`. What the capture cannot replay is the
cache's Python-side counters; the decoder undoes the capture's effect on them and advances them per
replay (`EvictingCache.host_state`). A policy's decode step must therefore draw no random numbers
from a generator of its own (the built-in random policy hashes instead).

Use after a prefill: ``out = model(ids, cache=cache, logits_to_keep=1)``, then
``Decoder(model, cache, out.logits[:, -1:].argmax(-1), positions)``.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lshe.cache import EvictingCache


class Decoder:
    """Greedy decode steps on a prefilled `EvictingCache`.

    Args:
        model: a causal LM whose attention implementation is ``"lshe"``.
        cache: the prefilled cache (its rows are the batch).
        tokens: (B, 1) the next input token of each row.
        positions: (B, 1) the position of that token.
        graph: capture one step in a CUDA graph and replay it (CUDA only).
        warmup: eager steps before the capture (they are real decode steps: the cache advances).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cache: EvictingCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        graph: bool = False,
        warmup: int = 2,
    ) -> None:
        if graph and not tokens.is_cuda:
            raise ValueError("graph=True needs a CUDA device (CUDA graphs); use graph=False on CPU")
        self.model, self.cache = model, cache
        self.tokens = tokens.reshape(-1, 1).clone()
        self.positions = positions.reshape(-1, 1).to(device=tokens.device, dtype=torch.long).clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        if graph:
            self._capture(warmup)

    @torch.inference_mode()
    def _eager_step(self) -> None:
        logits = self.model(
            input_ids=self.tokens,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        self.tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.positions.add_(1)

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph recommends
            for _ in range(warmup):
                self._eager_step()
                self.steps += 1
        torch.cuda.current_stream().wait_stream(side)
        state = self.cache.host_state()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self._eager_step()
        finally:
            self.cache.set_host_state(state)  # the capture ran the Python once but no kernel

    def step(self) -> None:
        """One decode step: the next tokens land in ``self.tokens``. No host synchronisation."""
        if self.graph is None:
            self._eager_step()
        else:
            self.graph.replay()
            self.cache.advance_host_state(1)
        self.steps += 1

    def close(self) -> None:
        """Release the captured graph (and its memory pool)."""
        self.graph = None
