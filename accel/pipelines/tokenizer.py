"""A CLIP tokenizer with the project's own vocabulary, learnt from its captions.

CLIP's BPE works on byte-level characters with ``</w>`` marking the end of a word. The
vocabulary here holds every byte-level character (alone and word-final), so any text
tokenizes, plus the merges learnt from the caption corpus by byte-pair encoding (Sennrich
et al., 2016), so every corpus word is a single token.
"""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

__all__ = ["SPECIAL_TOKENS", "learn_bpe", "build_clip_tokenizer", "write_vocab_files"]

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")  # CLIP's pre-tokenizer, roughly


def _words(corpus: Iterable[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for text in corpus:
        counts.update(_WORD.findall(text.lower()))
    return counts


def learn_bpe(corpus: Iterable[str], max_merges: int = 10_000) -> List[Tuple[str, str]]:
    """Merges, most frequent pair first, until every word of ``corpus`` is one symbol.

    Ties are broken by the pair itself, so the result depends only on the corpus.
    """
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in _words(corpus).items()}
    merges: List[Tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter = collections.Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def _vocab(merges: List[Tuple[str, str]]) -> Dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = list(SPECIAL_TOKENS) + alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab: Dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_clip_tokenizer(corpus: Iterable[str], max_length: int = 16):
    """A ``transformers.CLIPTokenizer`` whose vocabulary is learnt from ``corpus``."""
    from transformers import CLIPTokenizer

    merges = learn_bpe(list(corpus))
    tokenizer = CLIPTokenizer(vocab=_vocab(merges), merges=list(merges))
    tokenizer.model_max_length = max_length
    return tokenizer


def write_vocab_files(tokenizer, folder: Path) -> None:
    """Also write the classic ``vocab.json`` and ``merges.txt`` beside ``save_pretrained``'s files."""
    folder = Path(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
