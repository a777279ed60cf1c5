"""Locally generated tokenizers load through transformers with the real sizes and lengths."""

import pytest
from transformers import CLIPTokenizer, T5TokenizerFast

from quantgate.errors import UnknownNameError
from quantgate.models.tokenizers import (
    build_clip_bpe,
    build_t5_unigram,
    clip_bpe_vocab,
    generate_tokenizer,
    t5_unigram_pieces,
)

PROMPT = "a red fox asleep in fresh snow, 35mm photograph"


@pytest.fixture(scope="module")
def clip_full(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    build_clip_bpe(directory, vocab_size=49408, model_max_length=77)
    return CLIPTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def t5_full(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5")
    build_t5_unigram(directory, vocab_size=32100, model_max_length=512)
    return T5TokenizerFast.from_pretrained(directory)


def test_clip_vocabulary_has_clips_layout():
    vocab, merges = clip_bpe_vocab(49408)
    assert len(vocab) == 49408
    assert len(merges) == 49408 - 512 - 2  # CLIP's 48894 merges
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len(set(vocab.values())) == len(vocab)


def test_clip_tokenizer_encodes_a_prompt_to_77_tokens(clip_full):
    assert len(clip_full) == 49408 and clip_full.model_max_length == 77
    ids = clip_full(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == 49406
    assert 49407 in ids and all(0 <= i < 49408 for i in ids)
    # Words are merged into multi-letter pieces, not spelled out byte by byte.
    unpadded = clip_full(PROMPT).input_ids
    assert len(unpadded) < len(PROMPT) // 2


def test_t5_tokenizer_has_t5s_layout(t5_full):
    assert len(t5_full) == 32100 and t5_full.model_max_length == 512
    assert (t5_full.pad_token_id, t5_full.eos_token_id, t5_full.unk_token_id) == (0, 1, 2)
    assert t5_full.convert_tokens_to_ids("<extra_id_0>") == 32099
    ids = t5_full(PROMPT, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(ids) == 512
    unpadded = t5_full(PROMPT).input_ids
    assert unpadded[-1] == 1 and 2 not in unpadded  # ends with </s>, nothing unknown


def test_t5_pieces_count_matches_the_requested_size():
    pieces = t5_unigram_pieces(1000)
    assert len(pieces) == 1000 and pieces[-1][0] == "<extra_id_0>"


@pytest.mark.parametrize(("build", "size"), [(clip_bpe_vocab, 100), (t5_unigram_pieces, 150)])
def test_a_vocabulary_too_small_for_the_layout_is_refused(build, size):
    with pytest.raises(ValueError, match="needs at least"):
        build(size)


def test_unknown_generator_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownNameError, match="clip-bpe, t5-unigram"):
        generate_tokenizer("sentencepiece", tmp_path, {})
