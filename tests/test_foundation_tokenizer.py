"""The tiny foundation models' tokenizer: CLIP's byte-level BPE trained on the glyph captions.

Every caption word is one token, texts round-trip, the vocabulary is a function of
the captions alone, and it reloads from CLIP's two files (vocab.json + merges.txt,
as the hub ships SD's and CLIP's tokenizers) to the same ids.
"""

import pytest
from transformers import CLIPTokenizer

from repro.core.data import DIGIT_NAMES, FONTS, char_name, glyph_caption
from repro.core.errors import ReproInputError
from repro.foundation.tokenizer import (
    BOS,
    EOS,
    build_tokenizer,
    load_tokenizer,
    vocab_files,
    words,
)

CHARS = "0123456789abcXYZ"


def every_caption(chars=CHARS):
    """Every caption the corpus can hold (each char in each font) and the generic ones."""
    captions = [glyph_caption(ch, f) for ch in chars for f in range(len(FONTS))]
    return captions + [f"a glyph of {char_name(ch)}" for ch in chars]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(every_caption(), 600)


def test_every_word_of_the_captions_and_prompts_is_one_token(tokenizer):
    vocab = words(every_caption())
    # CLIP's splitter: lower case, "sans-serif" -> sans, -, serif; single letters are words.
    assert {"sans", "-", "serif", "monospace", "glyph", "digit", "capital", "x", "seven"} <= set(
        vocab
    )
    assert "X" not in vocab and "sans-serif" not in vocab
    for word in vocab:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer("a glyph of the digit seven").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + 6  # bos, six words, eos
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == [BOS, EOS]
    # CLIP's conventions: pad is the end token, and padding fills up to model_max_length.
    assert tokenizer.pad_token == EOS and tokenizer.model_max_length == 16
    padded = tokenizer("a glyph", padding="max_length", max_length=16).input_ids
    assert len(padded) == 16 and padded[4:] == [tokenizer.pad_token_id] * 12


def test_texts_round_trip(tokenizer):
    for text in every_caption()[::7] + [f"a glyph of the digit {n}" for n in DIGIT_NAMES]:
        ids = tokenizer(text).input_ids
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        # CLIP decodes every word end ("</w>") as a space: "sans-serif" -> "sans - serif".
        assert decoded == text.lower().replace("-", " - ")
        assert tokenizer(decoded).input_ids == ids


def test_the_vocabulary_is_a_function_of_the_captions(tokenizer):
    shuffled = every_caption()[::-1] + every_caption()[:5]  # order and repeats do not matter
    again = build_tokenizer(shuffled, 600)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert vocab_files(again) == vocab_files(tokenizer)


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ReproInputError, match=r"vocab_size: 530 .* one token per caption word"):
        build_tokenizer(every_caption(), 530)
    # Below CLIP's 512 byte tokens + 2 specials: no merge at all, still the same error.
    with pytest.raises(ReproInputError, match=r"vocab_size: 300 .* one token per caption word"):
        build_tokenizer(every_caption(), 300)
    with pytest.raises(ReproInputError, match="no captions"):
        build_tokenizer([], 600)


def test_clips_two_files_reload_to_the_same_ids(tokenizer, tmp_path):
    """The hub layout: vocab.json + merges.txt (+ tokenizer_config.json), no tokenizer.json."""
    for name, text in vocab_files(tokenizer).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=16)
    for text in every_caption()[::5]:
        assert reloaded(text).input_ids == tokenizer(text).input_ids
    params = {"name": "clip", "pretrained": str(tmp_path), "local_files_only": True}
    assert load_tokenizer(params).get_vocab() == tokenizer.get_vocab()


def test_a_directory_without_a_vocabulary_is_named(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    params = {"name": "t2i", "pretrained": str(tmp_path), "local_files_only": True}
    with pytest.raises(
        ReproInputError, match=rf"foundation.t2i: {tmp_path} \(subfolder tokenizer\)"
    ):
        load_tokenizer(params, "tokenizer")
