"""TextShardStore actors on a real local Ray: loading, byte-proportional samples, tokenising
in the stores, token refs equal to encoding in the driver, and memory held once."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.experimental import get_object_locations
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.actors.text import (
    TextSourceSpec,
    list_text_files,
    load_documents,
    load_text_dataset,
    plan_parts,
    sample_for_tokenizer,
    tokenize_dataset,
    unigram_perplexity,
    unigram_perplexity_of,
)
from kiln.training.errors import KilnError
from kiln.training.tokenizer import encode_documents, tokenizer_to_bytes

STDLIB_JSON = f"text:{sysconfig.get_paths()['stdlib']}/json/*.py"


def byte_level_bpe(texts: list[str], vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE trained by `tokenizers` itself, with Kiln's special-token ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def uneven_corpus(tmp_path_factory) -> str:
    """Two JSONL files, the second holding 3x the first's bytes: one store each."""
    root = tmp_path_factory.mktemp("uneven")
    write_jsonl(root / "a.jsonl", [f"alpha {i:04d} " + "a" * 40 for i in range(200)])
    write_jsonl(root / "b.jsonl", [f"beta {i:04d} " + "b" * 41 for i in range(600)])
    return f"text:{root}/*.jsonl"


def test_stores_load_their_own_files_and_a_sample_follows_their_bytes(ray_local, uneven_corpus):
    spec = TextSourceSpec(uri=uneven_corpus, val_fraction=0.0)
    dataset = load_text_dataset(spec, 2, name="text-uneven")
    try:
        assert [s["train"]["documents"] for s in dataset.stats] == [200, 600]
        from kiln.actors.shards import describe_dataset, list_datasets

        listed = {d["name"]: d for d in list_datasets()}["text-uneven"]
        assert listed["kind"] == "text" and listed["shards"] == 2
        assert listed["documents"] == {"train": 800, "val": 0} and listed["tokens"] is None
        assert [d["index"] for d in describe_dataset("text-uneven")["text"]] == [0, 1]

        sample = sample_for_tokenizer(dataset, total_bytes=8000, seed=0)
        from_a = sum(len(t) for t in sample if t.startswith("alpha"))
        from_b = sum(len(t) for t in sample if t.startswith("beta"))
        assert 7000 < from_a + from_b <= 8000
        assert 2.7 < from_b / from_a < 3.3
        assert len(set(sample)) == len(sample)  # drawn without replacement
    finally:
        from kiln.actors.shards import drop_dataset

        assert drop_dataset("text-uneven") == 2


def test_tokens_made_in_the_stores_equal_encoding_in_the_driver(ray_local):
    spec = TextSourceSpec(uri=STDLIB_JSON, val_fraction=0.3, seed=1)
    dataset = load_text_dataset(spec, 2)
    try:
        tokenizer = byte_level_bpe(sample_for_tokenizer(dataset, total_bytes=200_000))
        counts = tokenize_dataset(dataset, tokenizer_to_bytes(tokenizer))
        assert counts["train"] > 0 and counts["val"] > 0
        parts = plan_parts(list_text_files(spec.uri), 2)
        histograms = {split: np.zeros(320, np.int64) for split in ("train", "val")}
        for handle, part in zip(dataset.handles, parts, strict=True):
            read = load_documents(spec, part, put=lambda array: array)
            for split, held in read.splits.items():
                documents = [t for chunk in held.chunks for t in chunk.to_pylist()]
                expected = encode_documents(tokenizer, documents)
                refs = ray.get(handle.token_refs.remote(split))
                stream = np.concatenate([ray.get(r).to_numpy() for r in refs] or [[]])
                assert stream.dtype == np.uint16 or not refs
                np.testing.assert_array_equal(stream, expected)
                histograms[split] += np.bincount(expected, minlength=320)
        assert sum(len(ray.get(r)) for r in dataset.token_refs("train")) == counts["train"]
        described = ray.get([h.describe.remote() for h in dataset.handles])
        assert sum(d["tokens"]["val"] for d in described) == counts["val"]
        expected_perplexity = unigram_perplexity_of(histograms["train"], histograms["val"])
        assert unigram_perplexity(dataset, 320) == pytest.approx(expected_perplexity)
    finally:
        dataset.release()


def test_tokens_are_held_once_in_the_object_store(ray_local):
    spec = TextSourceSpec(uri=STDLIB_JSON, val_fraction=0.0)
    dataset = load_text_dataset(spec, 1)
    try:
        tokenizer = byte_level_bpe(sample_for_tokenizer(dataset, total_bytes=100_000), 300)
        counts = tokenize_dataset(dataset, tokenizer_to_bytes(tokenizer))
        token_bytes = 2 * counts["train"]  # uint16
        refs = dataset.token_refs("train")
        sizes = [v["object_size"] for v in get_object_locations(refs).values()]
        assert token_bytes <= sum(sizes) <= 1.1 * token_bytes
        memory = ray.get(dataset.handles[0].memory_bytes.remote())
        assert memory["tokens"] == token_bytes
        assert memory["object_store"] == memory["tokens"] + memory["documents"]
        # A second tokenizer replaces the streams rather than adding to them.
        tokenize_dataset(dataset, tokenizer_to_bytes(tokenizer))
        assert ray.get(dataset.handles[0].memory_bytes.remote())["tokens"] == token_bytes
        stream = ray.get(refs[0]).to_numpy()
        assert not stream.flags.writeable  # mapped from the object store, not copied
    finally:
        dataset.release()


def test_a_source_without_text_is_refused_with_what_was_found(ray_local, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "b.bin").write_bytes(b"\x7fELF\x00" * 10)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(KilnError, match="has no text: 3 files, 2 skipped as binary"):
        load_text_dataset(TextSourceSpec(uri=f"text:{tmp_path}"), 2)
    with pytest.raises(KilnError, match="has no text: 0 files, 0 skipped as binary"):
        load_text_dataset(TextSourceSpec(uri=f"text:{tmp_path}/*.md"), 2)


def test_a_stores_error_reaches_the_driver_as_one_kiln_error(ray_local, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["one", "two"])
    spec = TextSourceSpec(uri=f"text:{tmp_path}/d.jsonl", text_field="body")
    with pytest.raises(KilnError, match='"body" for --text-field.*string keys: text'):
        load_text_dataset(spec, 1)
