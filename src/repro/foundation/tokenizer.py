"""The tiny foundation models' tokenizer: CLIP's byte-level BPE, trained on the glyph captions.

The paper-scale models (SD 2.1's text encoder, CLIP ViT-B/16) use CLIP's tokenizer:
text NFC-normalised, whitespace collapsed and lower-cased, split into words, letters
and single digits by CLIP's regex, each word's bytes mapped to printable characters
(GPT-2's byte-level alphabet) and merged by BPE with "</w>" ending a word;
<|startoftext|> and <|endoftext|> wrap every text and <|endoftext|> pads it. This
module trains the same kind of tokenizer on the glyph captions (`train_bpe`, with the
normaliser and word splitter of transformers' CLIPTokenizer, itself run by the
`tokenizers` library), writes it as CLIP's vocab.json + merges.txt and loads it as
transformers' CLIPTokenizer, so the tiny models read text exactly as the hub ones do,
only with a vocabulary of a few hundred tokens instead of 49,408.

Every word of the captions (and of the generic prompts, "a glyph of the digit seven")
is one token: `build_tokenizer` checks it, since a word split into pieces is harder
for a tiny text encoder to learn.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from repro.core.errors import ReproInputError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _untrained():
    """transformers' CLIPTokenizer with no vocabulary: CLIP's normaliser, word splitter,
    byte-level alphabet, "</w>" word ends and special tokens. (The `tokenizers` library
    runs it; it is reached through transformers, which pins it, not imported here.)"""
    from transformers import CLIPTokenizer

    return CLIPTokenizer()


def _words(texts: Iterable[str]) -> Counter:
    """How often each word (CLIP pre-token, normalised, in byte-level characters) occurs."""
    backend = _untrained().backend_tokenizer
    counts: Counter = Counter()
    for text in texts:
        normal = backend.normalizer.normalize_str(text)
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normal))
    return counts


def words(texts: Iterable[str]) -> list[str]:
    """The distinct words (CLIP pre-tokens, normalised) of `texts`, sorted."""
    return sorted(_words(texts))


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins of the 256 bytes, in CLIP's vocabulary order."""
    order = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    order += range(ord("®"), ord("ÿ") + 1)
    chars, extra = [chr(b) for b in order], 0
    for b in range(256):
        if b not in order:
            order.append(b)
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_bpe(texts: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """BPE (Sennrich et al.) on CLIP's byte-level words: (vocab, merges) as CLIP's files hold them.

    The vocabulary has CLIP's layout: the 256 byte characters, the same with "</w>"
    (a word's last symbol; so any text can be encoded), one token per merge, then
    <|startoftext|> and <|endoftext|>. Merging stops when every word is one token or
    the vocabulary holds `vocab_size` tokens. The most frequent pair is merged first,
    ties broken by the pair's text. (The `tokenizers` library's BpeTrainer breaks
    ties by hash-map order: its merges, and with them the rows of the text encoder's
    embedding, differ from run to run. This one is a function of the texts alone.)
    """
    alphabet = _byte_alphabet()
    base = alphabet + [c + "</w>" for c in alphabet]
    corpus = {(*w[:-1], w[-1] + "</w>"): n for w, n in _words(texts).items()}
    merges: list[tuple[str, str]] = []
    while len(base) + len(merges) + 2 < vocab_size:
        pairs: Counter = Counter()
        for symbols, n in corpus.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        corpus = {_merge(symbols, best): n for symbols, n in corpus.items()}
    tokens = dict.fromkeys([*base, *("".join(m) for m in merges), BOS, EOS])
    return {t: i for i, t in enumerate(tokens)}, [" ".join(m) for m in merges]


def build_tokenizer(captions: list[str], vocab_size: int, *, model_max_length: int = 16):
    """A transformers CLIPTokenizer trained (train_bpe) on `captions`.

    `captions` should hold every text the models will read (the corpus captions and
    the generic prompts). Every word of them must come out as one token: a
    `vocab_size` too small for that is a ReproInputError naming vocab_size and the
    split words. Deterministic: the same set of captions gives the same tokenizer.
    `model_max_length` is the padded length (the text encoder's
    max_position_embeddings).
    """
    from transformers import CLIPTokenizer

    texts = sorted({str(c) for c in captions})
    if not texts:
        raise ReproInputError("build_tokenizer: no captions to train the tokenizer on")
    vocab, merges = train_bpe(texts, int(vocab_size))
    # Loaded from CLIP's two files: the same tokenizer as one read from the hub layout.
    with tempfile.TemporaryDirectory() as tmp:
        for file, text in _files(vocab, merges).items():
            (Path(tmp) / file).write_text(text, encoding="utf-8")
        tokenizer = CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"),
            merges=str(Path(tmp) / "merges.txt"),
            model_max_length=int(model_max_length),
        )
    split = [w for w in words(texts) if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise ReproInputError(
            f"vocab_size: {vocab_size} tokens are too few for one token per caption word "
            f"(split: {split[:10]}{' ...' if len(split) > 10 else ''})"
        )
    return tokenizer


def _files(vocab: dict[str, int], merges: list[str]) -> dict[str, str]:
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
    }


def vocab_files(tokenizer) -> dict[str, str]:
    """CLIP's vocab.json and merges.txt of `tokenizer` (as the hub's CLIP tokenizers ship)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return _files(model["vocab"], merges)


def load_tokenizer(params: dict, component: str | None = None):
    """The CLIPTokenizer of a foundation model (store.model_params' dict `params`),
    from `component` (a subfolder: "tokenizer" in an SD layout, None for CLIP's) at any
    scale: the built directory, a local one, or a hub checkpoint in the cache (whose
    tokenizer ships as vocab.json + merges.txt). Errors name foundation.<name>."""
    from transformers import CLIPTokenizer

    from repro.core.hub import loader_options

    name = params.get("name") or "?"
    source = params.get("pretrained")
    if not source:
        raise ReproInputError(f"foundation.{name}: params hold no 'pretrained' source")
    subfolder = "/".join(p.strip("/") for p in (params.get("subfolder"), component) if p) or None
    where = f"foundation.{name}: {source}" + (f" (subfolder {subfolder})" if subfolder else "")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(
            str(source), subfolder=subfolder or "", **loader_options(params)
        )
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise ReproInputError(f"{where}: cannot load a CLIPTokenizer ({err})") from err
    # A directory without vocab files loads as an empty tokenizer rather than failing.
    if len(tokenizer) <= 3:
        raise ReproInputError(f"{where}: no tokenizer vocabulary (vocab.json + merges.txt)")
    return tokenizer
