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
``Decoder(model, cache, out.logits[:, -1:].argmax(-1), positions)``; or `greedy_generate`, which does
what ``model.generate(..., do_sample=False)`` does for a left-padded batch (prefill, per-row stop at
EOS with padding after it, stop when every row has finished or at ``max_new_tokens``) on this path.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel

from lshe.cache import EvictingCache
from lshe.compiled import CompiledLayers, compiled_layers, last_argmax


class Decoder:
    """Greedy decode steps on a prefilled `EvictingCache`.

    Args:
        model: a causal LM whose attention implementation is ``"lshe"``.
        cache: the prefilled cache (its rows are the batch).
        tokens: (B, 1) the next input token of each row.
        positions: (B, 1) the position of that token.
        graph: capture one step in a CUDA graph and replay it (CUDA only).
        warmup: eager steps before the capture (they are real decode steps: the cache advances).
        eos_token_ids, pad_token_id: stop rows as ``generate`` does: a row that has produced an EOS
            token gets ``pad_token_id`` from then on (``finished`` tells which rows have).
        collect: keep every step's tokens (warm-up steps included) in ``history``.
        compile: run the decode steps through `lshe.compiled.CompiledLayers` (the decoder layers
            compiled by `torch.compile`, the cache step eager); with ``graph`` the compilation happens
            in the warm-up steps and the CUDA graph replays the compiled kernels. True uses the model's
            one `lshe.compiled.compiled_layers` (compiled once per model); a `CompiledLayers` may be
            passed instead.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cache: EvictingCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        graph: bool = False,
        warmup: int = 2,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        collect: bool = False,
        compile: bool | CompiledLayers = False,
    ) -> None:
        if graph and not tokens.is_cuda:
            raise ValueError("graph=True needs a CUDA device (CUDA graphs); use graph=False on CPU")
        if eos_token_ids and pad_token_id is None:
            raise ValueError("eos_token_ids needs a pad_token_id for the rows that have finished")
        self.model, self.cache = model, cache
        self.tokens = tokens.reshape(-1, 1).clone()
        self.positions = positions.reshape(-1, 1).to(device=tokens.device, dtype=torch.long).clone()
        device = self.tokens.device
        self.eos = torch.tensor(eos_token_ids or [], dtype=torch.long, device=device)
        self.pad = pad_token_id
        self.finished = torch.isin(self.tokens, self.eos)
        self.history: list[torch.Tensor] | None = [] if collect else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        if compile is True:
            compile = compiled_layers(model)
        self.compiled: CompiledLayers | None = compile or None
        if graph:
            self._capture(warmup)

    @torch.inference_mode()
    def _eager_step(self) -> None:
        with self.compiled.active() if self.compiled else contextlib.nullcontext():
            self._forward()

    def _forward(self) -> None:
        logits = self.model(
            input_ids=self.tokens,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        next_tokens = self.compiled.argmax(logits) if self.compiled else last_argmax(logits)
        if self.eos.numel():  # as generate: finished rows get padding, then EOS finishes a row
            next_tokens = torch.where(self.finished, self.pad, next_tokens)
            self.finished |= torch.isin(next_tokens, self.eos)
        self.tokens.copy_(next_tokens)
        self.positions.add_(1)

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph recommends
            for _ in range(warmup):
                self._eager_step()
                self.steps += 1
                self._keep()
        torch.cuda.current_stream().wait_stream(side)
        self.cache.refuse_growth()  # the captured step must not grow the storage
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
            self.cache.refuse_growth()  # host counts only: no synchronisation
            self.graph.replay()
            self.cache.advance_host_state(1)
        self.steps += 1
        self._keep()

    def _keep(self) -> None:
        if self.history is not None:
            self.history.append(self.tokens.clone())

    def close(self) -> None:
        """Release the captured graph (and its memory pool)."""
        self.graph = None


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    cache: EvictingCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    graph: bool = False,
    check_every: int = 8,
    watch=None,
    compile: bool | CompiledLayers = False,
) -> torch.Tensor:
    """The (B, n) new tokens ``model.generate(input_ids, attention_mask=..., do_sample=False,
    max_new_tokens=..., cache=cache)`` returns, decoded by `Decoder` (CUDA graphs with ``graph``,
    compiled decoder layers with ``compile``: see `Decoder`).

    Positions follow generate's rule for left padding (cumulative sum of the mask); a row that has
    produced an EOS token continues with ``pad_token_id``; decoding stops once every row has finished
    (checked on the host every ``check_every`` steps, and the surplus columns cut off) or after
    ``max_new_tokens``. Greedy only: sampling and beam search go through ``generate``. ``watch`` (an
    object with ``mark()``, e.g. `runners.measure.Stopwatch`) is marked when the prefill is done.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
        use_cache=True, logits_to_keep=1,
    ).logits  # fmt: skip
    first = logits[:, -1:].argmax(-1)
    if watch is not None:
        watch.mark()
    if max_new_tokens == 1:
        return first
    warmup = min(2, max_new_tokens - 1) if graph else 0
    decoder = Decoder(model, cache, first, positions[:, -1:] + 1, graph=graph, warmup=warmup,
                      eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, collect=True,
                      compile=compile)  # fmt: skip
    while decoder.steps < max_new_tokens - 1:
        if decoder.steps % check_every == 0 and bool(decoder.finished.all()):
            break
        decoder.step()
    decoder.close()
    tokens = torch.cat([first, *decoder.history], dim=1)[:, :max_new_tokens]
    done = (
        torch.isin(tokens, decoder.eos).int().cummax(dim=1).values.bool().all(dim=0)
    )  # every row finished by then
    if bool(done.any()):
        tokens = tokens[:, : int(done.nonzero()[0]) + 1]
    return tokens
