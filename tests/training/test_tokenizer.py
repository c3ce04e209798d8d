"""Byte-level BPE: any text encodes and decodes back to itself, the special tokens hold their
ids, documents end in <|eos|>, and a corpus too small for the vocabulary says what would fit."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from tokenizers import Tokenizer

from kiln.training.errors import KilnError
from kiln.training.tokenizer import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    encode_documents,
    tokenizer_from_bytes,
    tokenizer_to_bytes,
    train_bpe,
)

VOCAB_SIZE = 400
AWKWARD_TEXTS = [
    "plain ascii, with  two spaces and a tab\there",
    "héllo wörld — naïve café",
    "中文字符和日本語のテキスト",
    "emoji 🔥🧱 and a family 👨‍👩‍👧 (zero-width joiners)",
    "combining: e\u0301 a\u0308 and RTL: שלום مرحبا \u202eevil\u202c",
    "controls \x00\x01\x07 and \r\n line endings\n\n\n",
    "   leading and trailing spaces   ",
    "\ufffd replacement char and \U0010ffff the last code point",
    "",
    "<|eos|> typed as text, in a document, is text",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(300)]
    texts = [" ".join(rng.choices(words, k=12)) for _ in range(300)]
    return train_bpe(texts, vocab_size=VOCAB_SIZE)


def test_vocabulary_size_and_special_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    ids = [tokenizer.token_to_id(token) for token in (BOS, EOS, PAD)]
    assert ids == [BOS_ID, EOS_ID, PAD_ID] == [0, 1, 2]


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_any_text_round_trips(tokenizer: Tokenizer, text: str) -> None:
    ids = encode_documents(tokenizer, [text]).tolist()
    assert ids.index(EOS_ID) == len(ids) - 1  # special tokens only where Kiln puts them
    assert tokenizer.decode(ids[:-1]) == text


def test_lone_surrogates_become_replacement_chars(tokenizer: Tokenizer) -> None:
    ids = encode_documents(tokenizer, ["a\ud800b"])
    assert tokenizer.decode(ids[:-1].tolist()) == "a\ufffd\ufffd\ufffdb"


def test_encode_documents_ends_each_with_eos(tokenizer: Tokenizer) -> None:
    texts = AWKWARD_TEXTS[:-1]  # encode() would read the last one's "<|eos|>" as the token
    ids = encode_documents(tokenizer, iter(texts))
    expected = [i for text in texts for i in [*tokenizer.encode(text).ids, EOS_ID]]
    assert ids.dtype == np.int32 and ids.tolist() == expected
    assert encode_documents(tokenizer, []).shape == (0,)
    assert encode_documents(tokenizer, ["x"], eos_id=PAD_ID)[-1] == PAD_ID


def test_encode_documents_spans_batches(tokenizer: Tokenizer) -> None:
    texts = [f"pot number {i}" for i in range(2500)]  # three batches of 1024
    ids = encode_documents(tokenizer, texts)
    assert (ids == EOS_ID).sum() == len(texts)
    assert tokenizer.decode(ids[: list(ids).index(EOS_ID)].tolist()) == "pot number 0"


def test_too_small_a_corpus_says_what_fits() -> None:
    with pytest.raises(KilnError, match=r"enough for (\d+): pass --vocab-size \1 ") as raised:
        train_bpe(["tiny corpus", "tiny"], vocab_size=5000)
    assert "\n" not in str(raised.value)


def test_vocab_size_below_the_byte_alphabet_is_refused() -> None:
    with pytest.raises(KilnError, match='Got "100" for --vocab-size'):
        train_bpe(["text"], vocab_size=100)


def test_bytes_round_trip(tokenizer: Tokenizer) -> None:
    copy = tokenizer_from_bytes(tokenizer_to_bytes(tokenizer))
    assert copy.encode(AWKWARD_TEXTS[3]).ids == tokenizer.encode(AWKWARD_TEXTS[3]).ids
    with pytest.raises(KilnError, match="cannot be read"):
        tokenizer_from_bytes(b"not json")
