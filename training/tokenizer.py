"""Byte-level BPE tokenizers for Kiln's language models, trained with Hugging Face `tokenizers`.

A tokenizer is a `tokenizer.json` any tool can open, so a model Kiln trains leaves it with the
tokenizer it was trained with. Byte-level BPE starts from the 256 byte values, so every text
encodes (no unknown token) and decodes back to itself. The special tokens take the first ids,
which `kiln.training.lm.lm_spec` writes into the model's config: <|bos|> 0, <|eos|> 1, <|pad|> 2.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.training.errors import KilnError, check_options

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
ENCODE_BATCH_SIZE = 1024
"""Documents per `encode_batch_fast` call: enough for the Rust side to use every core."""

logger = logging.getLogger(__name__)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens learned from `texts`."""
    check_options([(vocab_size >= MIN_VOCAB_SIZE, "--vocab-size", vocab_size, "at least 259")])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((clean_text(text) for text in texts), trainer=trainer)
    learned = tokenizer.get_vocab_size()
    if learned < vocab_size:
        raise KilnError(
            f"The corpus is too small to learn {vocab_size} tokens; it holds enough for "
            f"{learned}: pass --vocab-size {learned} or give more text."
        )
    return tokenizer


def clean_text(text: str) -> str:
    """The text, with lone surrogates (which no UTF-8 can hold) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def encode_documents(
    tokenizer: Tokenizer, texts: Iterable[str], eos_id: int | None = None
) -> np.ndarray:
    """Token ids of every document, each followed by the end-of-sequence id: (N,) int32.
    Special-token text inside a document stays text. `eos_id` defaults to <|eos|>."""
    eos = tokenizer.token_to_id(EOS) if eos_id is None else eos_id
    if eos is None:
        raise KilnError(f"The tokenizer has no {EOS} token: train it with train_bpe.")
    chunks: list[np.ndarray] = []
    end = np.array([eos], dtype=np.int32)
    literal = tokenizer_from_bytes(tokenizer_to_bytes(tokenizer))
    # A document that contains the text "<|eos|>" must not end there: special tokens are
    # Kiln's to place, so the documents' own text is encoded as plain text.
    literal.encode_special_tokens = True
    for batch in batches(texts, ENCODE_BATCH_SIZE):
        encodings = literal.encode_batch_fast(batch, add_special_tokens=False)
        for encoding in encodings:
            chunks += [np.asarray(encoding.ids, dtype=np.int32), end]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)


def batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := [clean_text(text) for text in islice(iterator, size)]:
        yield batch


def tokenizer_to_bytes(tokenizer: Tokenizer) -> bytes:
    """The tokenizer as the bytes of its tokenizer.json."""
    return tokenizer.to_str().encode("utf-8")


def tokenizer_from_bytes(data: bytes) -> Tokenizer:
    """A tokenizer from the bytes of a tokenizer.json."""
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise KilnError(f"The tokenizer.json cannot be read ({error}): re-save it.") from error


PROMPT_PREFIX_KEY = "kiln_prompt_prefix"
"""Spec key of the token ids a prompt follows: a model Kiln trained saw every document after
the previous one's eos, so a prompt starts as a document does (an imported model has none)."""


def prompt_token_ids(spec: dict[str, Any], tokenizer: Any, prompt: str) -> list[int]:
    """A text prompt's tokens after the spec's prompt prefix: what `kiln generate` and the
    OpenAI routes feed the model."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    return [int(t) for t in spec.get(PROMPT_PREFIX_KEY, [])] + [int(t) for t in ids]
