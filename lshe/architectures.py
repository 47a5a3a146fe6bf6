"""What the ``lshe`` attention honours of a transformers attention call, and one clear refusal for the rest.

Every decoder in transformers 5.24 calls its attention function with ``scaling``, ``dropout`` and,
depending on the family, ``sliding_window``, ``softcap`` and ``s_aux`` (docs/architectures.md lists
them per family). The ``lshe`` attention (`lshe.attention.lshe_attention`) honours exactly:

* ``scaling`` (any logit scale);
* ``sliding_window`` per layer (a query at position p sees keys p-W+1 .. p);
* ``softcap`` (Gemma2's logit soft-capping, in every attention path);
* ``s_aux`` (gpt-oss's attention sinks: one learned logit per query head that joins every softmax
  and is dropped after it), in every attention path.

`check_attention_call` refuses, with a ValueError naming the feature and the model, at the first
attention call (before any token is generated), and with or without an evicting cache:

* attention dropout (a module in training mode with ``attention_dropout > 0``): the cache is for
  inference; dropping weights silently would change the numbers;
* non-causal attention (``is_causal = False``, e.g. Gemma with ``use_bidirectional_attention``);
* chunked attention (``config.attention_chunk_size``, Llama4): built by the mask function, which
  ``lshe`` replaces with the padding mask;
* multi-head latent attention (MLA, ``config.kv_lora_rank``: DeepSeek-V2/V3 and relatives):
  transformers expands the latent into per-head keys and values before the cache sees them, so the
  slots (and their memory) would describe another model than the one being studied;
* any other keyword argument with a value, which this module does not know: refusing is safer
  than ignoring something that changes the attention.
"""

from __future__ import annotations

import torch

HONOURED = frozenset({"scaling", "dropout", "sliding_window", "softcap", "s_aux"})
# Arguments that reach the attention function but need nothing (positions are inside the keys).
IGNORED = frozenset(
    {
        "position_ids",
        "use_cache",
        "cache_position",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",  # MoE models (gpt-oss) forward it to every submodule
    }
)


def model_name(module: torch.nn.Module) -> str:
    """The model's ``model_type`` (e.g. ``"gemma2"``), or the attention module's class name."""
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or type(module).__name__


def check_attention_call(module: torch.nn.Module, dropout: float, kwargs: dict) -> None:
    """Raise a ValueError naming the feature and the model if this attention call asks for something
    the ``lshe`` attention does not implement; return None if every argument is honoured or inert.

    Args:
        module: the model's attention module (``self`` of its forward).
        dropout: the ``dropout`` argument (non-zero only in training mode).
        kwargs: every other keyword argument of the call except ``scaling``, ``sliding_window``,
            ``softcap`` and ``s_aux`` (which the caller takes itself).
    """
    name = model_name(module)
    config = getattr(module, "config", None)
    fix = "load the model with attn_implementation='sdpa' or 'eager' and without an EvictingCache"
    if getattr(config, "kv_lora_rank", None):
        raise ValueError(
            f"model {name!r} uses multi-head latent attention (MLA, config.kv_lora_rank="
            f"{config.kv_lora_rank}), which the lshe attention does not support: transformers expands "
            f"the latent into per-head keys and values, so the evicting cache would not hold the "
            f"model's real cache; {fix}"
        )
    if dropout:
        raise ValueError(
            f"model {name!r} asks for attention dropout={dropout} (training mode), which the lshe "
            f"attention does not implement; call model.eval() (the evicting cache is for inference)"
        )
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(
            f"model {name!r} uses non-causal (bidirectional) attention, which the lshe attention and "
            f"the evicting cache do not support; {fix}"
        )
    if getattr(config, "attention_chunk_size", None):
        raise ValueError(
            f"model {name!r} uses chunked attention (config.attention_chunk_size="
            f"{config.attention_chunk_size}), which the lshe attention does not implement; {fix}"
        )
    unknown = sorted(
        key
        for key, value in kwargs.items()
        if value is not None and key not in HONOURED | IGNORED | {"is_causal"}
    )
    if unknown:
        raise ValueError(
            f"model {name!r} passes attention argument(s) {unknown} that the lshe attention does not "
            f"know (it honours {sorted(HONOURED)} and ignores {sorted(IGNORED)}); {fix}"
        )


def check_window(sliding_window, module: torch.nn.Module) -> int | None:
    """The layer's sliding window as an int >= 1, or None; anything else is a ValueError."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(
            f"model {model_name(module)!r} passes sliding_window={sliding_window!r}; expected an integer >= 1"
        )
    return sliding_window


def check_softcap(softcap, module: torch.nn.Module) -> float | None:
    """The layer's logit soft-cap as a float > 0, or None; anything else is a ValueError."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise ValueError(f"model {model_name(module)!r} passes softcap={softcap!r}; expected a number > 0")
    return float(softcap)


def check_sinks(s_aux, module: torch.nn.Module, query_heads: int) -> torch.Tensor | None:
    """The layer's attention sinks as a detached float32 (Hq,) tensor, or None; a tensor of another
    shape is a ValueError."""
    if s_aux is None:
        return None
    if not isinstance(s_aux, torch.Tensor) or s_aux.shape != (query_heads,):
        shape = tuple(s_aux.shape) if isinstance(s_aux, torch.Tensor) else type(s_aux).__name__
        raise ValueError(
            f"model {model_name(module)!r} passes s_aux (attention sinks) of shape {shape}; expected one "
            f"logit per query head, ({query_heads},)"
        )
    return s_aux.detach().float()
