"""Tokenizers generated locally, with the real vocabulary sizes and context lengths.

No tokenizer is downloaded: the CLIP tokenizer is a byte-level BPE written as
``vocab.json`` + ``merges.txt`` (the files ``CLIPTokenizer`` reads), the T5 tokenizer a
``tokenizers`` Unigram model saved as ``tokenizer.json`` (what ``T5TokenizerFast`` reads).
Their vocabularies are synthetic but structurally real: every id a text encoder can see is
reachable, special tokens sit where the models expect them, and ``model_max_length`` is 77
and 512. A generator is registered by name; a component file names the one it needs.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Callable
from pathlib import Path

from quantgate.errors import UnknownNameError

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_EXTRA_IDS = 100


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (256 entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_bpe_vocab(vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """A CLIP-shaped BPE vocabulary of exactly ``vocab_size`` entries and its merge list.

    Layout as in CLIP: 256 byte symbols, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id, which CLIP pools at). Merges
    grow lowercase letter strings breadth-first, so English words split into real pieces.
    """
    base = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for symbol in base:
        vocab[symbol] = len(vocab)
    for symbol in base:
        vocab[symbol + "</w>"] = len(vocab)
    n_merges = vocab_size - len(vocab) - 2
    if n_merges < 0:
        raise ValueError(f"a CLIP BPE vocabulary needs at least {len(vocab) + 2} entries, got {vocab_size}")
    merges: list[str] = []
    frontier = list(string.ascii_lowercase)
    while len(merges) < n_merges:
        grown = []
        for left in frontier:
            for right in string.ascii_lowercase:
                for suffix in ("", "</w>"):
                    if len(merges) == n_merges:
                        break
                    merges.append(f"{left} {right}{suffix}")
                    vocab[left + right + suffix] = len(vocab)
                    if not suffix:
                        grown.append(left + right)
        frontier = grown
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def build_clip_bpe(directory: Path, vocab_size: int, model_max_length: int, pad_token: str = CLIP_EOS) -> None:
    """Write a CLIPTokenizer directory (``vocab.json``, ``merges.txt``, config)."""
    vocab, merges = clip_bpe_vocab(vocab_size)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the generated vocabulary")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def t5_unigram_pieces(vocab_size: int) -> list[tuple[str, float]]:
    """A T5-shaped Unigram vocabulary: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, pieces, then
    ``<extra_id_99>`` ... ``<extra_id_0>`` as the last 100 ids (T5's sentinel layout)."""
    n_regular = vocab_size - T5_EXTRA_IDS
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(char, -12.0), ("▁" + char, -11.0)]
    if len(pieces) > n_regular:
        raise ValueError(f"a T5 Unigram vocabulary needs at least {len(pieces) + T5_EXTRA_IDS} entries, got {vocab_size}")
    # Longer pieces score higher per character, so whole words beat their letters.
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            if len(pieces) == n_regular:
                break
            pieces.append(("▁" + "".join(letters), -float(length)))
        if len(pieces) == n_regular:
            break
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    return pieces


def build_t5_unigram(directory: Path, vocab_size: int, model_max_length: int) -> None:
    """Write a T5TokenizerFast directory (``tokenizer.json`` + config)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(t5_unigram_pieces(vocab_size), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": model_max_length,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": T5_EXTRA_IDS,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)],
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


TOKENIZER_GENERATORS: dict[str, Callable[..., None]] = {
    "clip-bpe": build_clip_bpe,
    "t5-unigram": build_t5_unigram,
}


def generate_tokenizer(generator: str, directory: Path, config: dict) -> None:
    """Run the registered tokenizer generator ``generator`` into ``directory``."""
    try:
        build = TOKENIZER_GENERATORS[generator]
    except KeyError:
        raise UnknownNameError("tokenizer generator", generator, TOKENIZER_GENERATORS) from None
    build(directory, **config)
