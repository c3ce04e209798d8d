"""Text sources and token shards for Kiln's language models: `text:` URIs read into actors.

A language model learns from documents, not rows, and its data is much larger than a table's:
so, as with the tabular ShardStore, the corpus is read once into TextShardStore actors, each
reading only its own files, and the documents never pass through the driver. A store holds its
documents as Arrow string arrays in the object store; only a sample in proportion to its bytes
leaves it to train a tokenizer, and the tokenizer then runs in every store at once, turning its
documents into one token stream per split (uint16 when the vocabulary fits) that Train workers
map without a copy on the same node. Validation documents are chosen by a hash of their
content, never by cutting a document, so the split is the same whatever the number of shards
or the order of the files, and identical documents always land in the same split.

URIs: `text:PATH`, `text:~/corpus/**/*.md` (`~` expanded, `**` any folders), `text:file:///..`,
`text:s3://bucket/prefix/*.md`, on any pyarrow filesystem. Plain files are one document each;
`.jsonl` one per line (its `--text-field` key); `.parquet`/`.arrow`/`.feather`/`.csv` one per row
of the `--text-field` column. Folders and globs skip hidden names (a leading "."), as a shell does.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kiln.actors.registry import NAMESPACE
from kiln.actors.shards import (
    actor_name,
    find_dataset_actors,
    reach_nodes,
    release_freed_memory,
    shard_targets,
)
from kiln.actors.sources import shard_bounds
from kiln.actors.startup import wait_started
from kiln.training.errors import KilnError, check_options

TEXT_SCHEME = "text:"
TEXT_SPLIT = "text"
"""The split part of a text store's actor name, `kiln-data:<name>:text:<i>`; the store holds
the train and validation documents both."""
DOCUMENT_SPLITS = ("train", "val")
DEFAULT_TEXT_FIELD = "text"
TABLE_FORMATS = {".parquet": "parquet", ".arrow": "ipc", ".feather": "ipc", ".csv": "csv"}
LINE_FORMATS = {".jsonl": "jsonl"}
GLOB_CHARS = "*?["
BINARY_PROBE_BYTES = 8192
"""A NUL byte in a file's first 8 KiB marks it binary (as git and grep decide)."""
CHUNK_BYTES = 32 * 2**20
"""Text per Arrow array put in the object store: the store builds one chunk at a time."""
DEFAULT_SAMPLE_BYTES = 32 * 2**20
"""Text drawn over all stores to train a tokenizer."""
LINE_READ_BYTES = 64 * 2**10
MAX_UINT16_VOCAB = 2**16

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TextSourceSpec:
    """Where a text corpus comes from and how it is split; travels to every TextShardStore."""

    uri: str
    """`text:` then a file, folder or glob on any pyarrow filesystem."""
    text_field: str | None = DEFAULT_TEXT_FIELD
    """The JSONL key or table column holding the text (None: `text`)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation, chosen by a hash of each document."""
    seed: int = 0
    """Salt of that hash: another seed, another validation set."""

    def __post_init__(self) -> None:
        if not self.uri.startswith(TEXT_SCHEME) or not self.location:
            raise KilnError(
                f'Got "{self.uri}" for --data. A text source is text:PATH, e.g. text:~/corpus, '
                "text:~/code/**/*.py or text:s3://bucket/prefix/*.md."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise KilnError(f'Got "{self.val_fraction}" for --val-fraction. Use a value in [0, 1).')
        if self.text_field is not None and not self.text_field.strip():
            raise KilnError(
                f'Got "{self.text_field}" for --text-field. Name the JSONL key or column of text.'
            )

    @property
    def location(self) -> str:
        return self.uri[len(TEXT_SCHEME) :]

    @property
    def field(self) -> str:
        return self.text_field or DEFAULT_TEXT_FIELD


def is_text_uri(uri: str) -> bool:
    return uri.startswith(TEXT_SCHEME)


# ---------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class TextFile:
    path: str
    """The path on the source's filesystem."""
    size: int


def split_glob(location: str) -> tuple[str, str | None]:
    """(the part before the first folder with a glob character, the glob after it or None)."""
    parts = location.split("/")
    for i, part in enumerate(parts):
        if any(char in part for char in GLOB_CHARS):
            base = "/".join(parts[:i]) or ("/" if location.startswith("/") else ".")
            return base, "/".join(parts[i:])
    return location, None


def glob_regex(pattern: str) -> re.Pattern[str]:
    """`**/` any folders (none included), `*` and `?` within one name, `[...]` a class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def open_location(uri: str) -> tuple[pafs.FileSystem, str, str | None]:
    """The filesystem of a `text:` URI, the path to list and the glob to filter with."""
    base, pattern = split_glob(uri[len(TEXT_SCHEME) :])
    if "://" not in base:
        path = os.path.abspath(os.path.expanduser(base))
        return pafs.LocalFileSystem(), path, pattern
    try:
        filesystem, path = pafs.FileSystem.from_uri(base)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise KilnError(f'Got "{uri}" for --data, which cannot be opened: {exc}.') from exc
    return filesystem, path.rstrip("/") or "/", pattern


def list_text_files(uri: str) -> list[TextFile]:
    """Every file a `text:` URI names, sorted by path: listed once, by the driver."""
    filesystem, base, pattern = open_location(uri)
    try:
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.File and pattern is None:
            return [TextFile(info.path, info.size or 0)]
        if info.type != pafs.FileType.Directory:
            if pattern is None:
                raise KilnError(
                    f'Got "{uri}" for --data, which does not exist. Give a text file, folder or '
                    "glob, e.g. text:~/corpus/**/*.md."
                )
            return []
        entries = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise KilnError(f'Got "{uri}" for --data, which cannot be listed: {exc}.') from exc
    matcher = glob_regex(pattern) if pattern else None
    files = []
    for entry in entries:
        relative = entry.path[len(base) :].lstrip("/")
        if entry.type != pafs.FileType.File or is_hidden(relative):
            continue
        if matcher is None or matcher.fullmatch(relative):
            files.append(TextFile(entry.path, entry.size or 0))
    return sorted(files, key=lambda f: f.path)


def is_hidden(relative: str) -> bool:
    return any(name.startswith(".") for name in relative.split("/"))


def suffix_of(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


# ---------------------------------------------------------------------------- shard plan


@dataclass(frozen=True)
class ShardPart:
    """What one TextShardStore reads: whole files, or one slice of one table or JSONL file."""

    files: tuple[TextFile, ...]
    slice_index: int = 0
    slice_count: int = 1
    """Above 1: `files` is one file and this store reads slice `slice_index` of its rows."""


def assign_by_bytes(sizes: list[int], num_shards: int) -> list[int]:
    """The shard of each file of the sorted list: contiguous runs of about equal bytes (a file
    goes to the shard whose share of the total holds its middle byte).

    By bytes rather than round-robin by count: a store's memory, its load and tokenisation time
    and its token count all follow bytes, and corpora mix many small files with a few large
    ones (generated code, whole books), which a count balances badly.
    """
    weights = np.asarray(sizes, dtype=np.float64) + 1.0  # +1: empty files spread too
    middles = np.cumsum(weights) - weights / 2
    shards = (middles * num_shards / weights.sum()).astype(np.int64)
    return np.minimum(shards, num_shards - 1).tolist()


def plan_parts(files: list[TextFile], num_shards: int) -> list[ShardPart]:
    """Each store's part: one table or JSONL file is split by rows among all the stores;
    several files are assigned whole (`assign_by_bytes`). Stores left with nothing are dropped."""
    check_options([(num_shards >= 1, "--shards", num_shards, "at least 1")])
    if len(files) == 1 and num_shards > 1 and file_format(files[0].path) != "plain":
        return [ShardPart(tuple(files), i, num_shards) for i in range(num_shards)]
    owners = assign_by_bytes([f.size for f in files], num_shards) if files else []
    parts = [
        ShardPart(tuple(f for f, owner in zip(files, owners, strict=True) if owner == i))
        for i in range(num_shards)
    ]
    return [part for part in parts if part.files]


# ---------------------------------------------------------------------------- reading


@dataclass
class ReadCounts:
    """What reading found besides documents: said in `loaded()` and `kiln data load`."""

    files: int = 0
    binary_files: int = 0
    empty_documents: int = 0
    skipped_lines: int = 0
    """JSONL lines that are not JSON objects or lack a string under the text field."""


def file_format(path: str) -> str:
    suffix = suffix_of(path)
    return TABLE_FORMATS.get(suffix) or LINE_FORMATS.get(suffix) or "plain"


def decode_text(data: bytes) -> tuple[str, int]:
    """UTF-8 text with undecodable bytes replaced by U+FFFD, and how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def clean_document(text: str) -> tuple[str, int]:
    """The text with lone surrogates (from JSON escapes; UTF-8 cannot hold them) replaced."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        cleaned = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return cleaned, cleaned.count("\ufffd") - text.count("\ufffd")


Document = tuple[str, int]
"""A document's text and how many of its characters were replaced."""


def iter_documents(
    filesystem: pafs.FileSystem, part: ShardPart, spec: TextSourceSpec, counts: ReadCounts
) -> Iterator[Document]:
    """The part's documents in file order; empty ones counted in `counts`, not yielded."""
    for file in part.files:
        counts.files += 1
        fmt = file_format(file.path)
        if fmt == "plain":
            found = read_plain(filesystem, file, counts)
        elif fmt == "jsonl":
            found = read_jsonl(filesystem, file, part, spec, counts)
        else:
            found = read_table(filesystem, file, part, spec)
        for text, replaced in found:
            if text.strip():
                yield text, replaced
            else:
                counts.empty_documents += 1


def read_plain(
    filesystem: pafs.FileSystem, file: TextFile, counts: ReadCounts
) -> Iterator[Document]:
    with filesystem.open_input_stream(file.path) as stream:
        data = stream.read()
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        counts.binary_files += 1
        return
    yield decode_text(data.removeprefix(codecs.BOM_UTF8))


def read_jsonl(
    filesystem: pafs.FileSystem,
    file: TextFile,
    part: ShardPart,
    spec: TextSourceSpec,
    counts: ReadCounts,
) -> Iterator[Document]:
    data = read_line_range(filesystem, file, part.slice_index, part.slice_count)
    checked = False
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        text, replaced = decode_text(line)
        try:
            value = json.loads(text)
        except ValueError:
            counts.skipped_lines += 1
            continue
        if not checked and isinstance(value, dict):
            check_json_field(value, spec, file.path)
            checked = True
        document = value.get(spec.field) if isinstance(value, dict) else None
        if not isinstance(document, str):
            counts.skipped_lines += 1
            continue
        cleaned, surrogates = clean_document(document)
        yield cleaned, replaced + surrogates


def check_json_field(first: dict[str, Any], spec: TextSourceSpec, path: str) -> None:
    """Refuse a file whose first object lacks the text field, naming the string keys it has."""
    if spec.field in first:
        return
    keys = [key for key, value in first.items() if isinstance(value, str)]
    raise KilnError(
        f'Got "{spec.field}" for --text-field, which is not a key of {path}. Its first line has '
        f"string keys: {', '.join(keys) or 'none'}."
    )


def read_line_range(filesystem: pafs.FileSystem, file: TextFile, index: int, count: int) -> bytes:
    """The bytes of the lines of `file` that start in slice `index` of `count` equal byte ranges
    (the whole file for one slice): each line is read by exactly one slice, none is cut."""
    if count == 1:
        with filesystem.open_input_stream(file.path) as stream:
            return bytes(stream.read())
    start, end = file.size * index // count, file.size * (index + 1) // count
    with filesystem.open_input_file(file.path) as handle:
        begin = 0
        if start > 0:  # skip the line that started in the slice before (it ends at or after start)
            handle.seek(start - 1)
            begin = start - 1 + len(through_newline(handle))
        if begin >= end:
            return b""
        handle.seek(begin)
        body = bytes(handle.read(end - begin))
        if not body.endswith(b"\n"):  # the last line starting here goes on past `end`
            body += through_newline(handle)
    return body


def through_newline(handle: Any) -> bytes:
    """Bytes from the handle's position up to and including the next newline (or the end)."""
    parts = []
    while block := bytes(handle.read(LINE_READ_BYTES)):
        cut = block.find(b"\n")
        if cut >= 0:
            parts.append(block[: cut + 1])
            break
        parts.append(block)
    return b"".join(parts)


def read_table(
    filesystem: pafs.FileSystem, file: TextFile, part: ShardPart, spec: TextSourceSpec
) -> Iterator[Document]:
    column = read_text_column(filesystem, file, part, spec)
    binary = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
    for chunk in column.chunks:
        for value in chunk.to_pylist():
            if value is None:
                continue
            yield decode_text(value) if binary else (value, 0)


def read_text_column(
    filesystem: pafs.FileSystem, file: TextFile, part: ShardPart, spec: TextSourceSpec
) -> pa.ChunkedArray:
    """This part's rows of the file's text column (its slice of the rows, or all of them)."""
    fmt = file_format(file.path)
    try:
        if fmt == "parquet":
            return read_parquet_column(filesystem, file, part, spec)
        table = (
            read_csv_column(filesystem, file, spec) if fmt == "csv" else read_ipc(filesystem, file)
        )
        check_text_column(table.schema, spec, file.path, binary_ok=fmt == "csv")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise KilnError(f"{spec.uri}: {file.path} could not be read as {fmt}: {exc}.") from exc
    lo, hi = shard_bounds(table.num_rows, part.slice_count, part.slice_index)
    return table.column(spec.field).slice(lo, hi - lo)


def is_string_type(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def check_text_column(
    schema: pa.Schema, spec: TextSourceSpec, path: str, binary_ok: bool = False
) -> None:
    """Refuse a table without a string column named by --text-field, naming those it has."""
    index = schema.get_field_index(spec.field)
    if index >= 0 and (is_string_type(schema.field(index).type) or binary_ok):
        return
    strings = [f.name for f in schema if is_string_type(f.type)]
    raise KilnError(
        f'Got "{spec.field}" for --text-field, which is not a string column of {path}. '
        f"String columns: {', '.join(strings) or 'none'}."
    )


def read_parquet_column(
    filesystem: pafs.FileSystem, file: TextFile, part: ShardPart, spec: TextSourceSpec
) -> pa.ChunkedArray:
    """Only the row groups that overlap this part's rows, and only the text column."""
    import pyarrow.parquet as pq

    with filesystem.open_input_file(file.path) as handle:
        parquet = pq.ParquetFile(handle)
        check_text_column(parquet.schema_arrow, spec, file.path)
        meta = parquet.metadata
        lo, hi = shard_bounds(meta.num_rows, part.slice_count, part.slice_index)
        starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        groups = [g for g in range(meta.num_row_groups) if starts[g] < hi and starts[g + 1] > lo]
        if not groups:
            return pa.chunked_array([], type=pa.string())
        table = parquet.read_row_groups(groups, columns=[spec.field])
    first = int(starts[groups[0]])
    return table.column(spec.field).slice(lo - first, hi - lo)


def read_ipc(filesystem: pafs.FileSystem, file: TextFile) -> pa.Table:
    """An Arrow IPC file (`.arrow`, Feather v2), or an IPC stream saved under that name."""
    with filesystem.open_input_file(file.path) as handle:
        try:
            return pa.ipc.open_file(handle).read_all()
        except pa.ArrowInvalid:
            handle.seek(0)
            return pa.ipc.open_stream(handle).read_all()


def read_csv_column(filesystem: pafs.FileSystem, file: TextFile, spec: TextSourceSpec) -> pa.Table:
    """The text column read as bytes, so bad UTF-8 is replaced and counted rather than fatal."""
    import pyarrow.csv as pacsv

    with filesystem.open_input_stream(file.path) as stream:
        schema = pacsv.open_csv(stream).schema
    if spec.field not in schema.names:  # named from the inferred schema: its string columns
        check_text_column(schema, spec, file.path)
    convert = pacsv.ConvertOptions(
        include_columns=[spec.field], column_types={spec.field: pa.binary()}
    )
    with filesystem.open_input_stream(file.path) as stream:
        return pacsv.read_csv(stream, convert_options=convert)


# ---------------------------------------------------------------------------- splits


def validation_key(seed: int) -> bytes:
    return str(seed).encode()


def is_validation(data: bytes, val_fraction: float, seed: int) -> bool:
    """Whether a document (its UTF-8 bytes) is held out: by a keyed hash of its content, so it
    does not depend on where the document is or which store reads it."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(data, digest_size=8, key=validation_key(seed)).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


@dataclass
class SplitCounts:
    documents: int = 0
    bytes: int = 0
    replaced_chars: int = 0


@dataclass
class SplitDocuments:
    """One split's documents as Arrow string arrays of about `chunk_bytes`, each handed to `put`
    as it fills (ray.put in a store, so only one chunk is ever built in its memory)."""

    put: Callable[[pa.Array], Any]
    chunk_bytes: int = CHUNK_BYTES
    chunks: list[Any] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    """Documents in each chunk."""
    chunk_lengths: list[np.ndarray] = field(default_factory=list)
    """UTF-8 bytes of each document of each chunk (to sample without reading the text)."""
    array_bytes: int = 0
    """Bytes of the Arrow arrays put (text and offsets)."""
    counts: SplitCounts = field(default_factory=SplitCounts)
    _pending: list[str] = field(default_factory=list)
    _pending_bytes: int = 0

    def add(self, text: str, size: int, replaced: int) -> None:
        self._pending.append(text)
        self._pending_bytes += size
        self.counts.documents += 1
        self.counts.bytes += size
        self.counts.replaced_chars += replaced
        if self._pending_bytes >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        array = pa.array(self._pending, type=pa.large_string())
        self._pending, self._pending_bytes = [], 0
        self.array_bytes += array.nbytes
        self.chunk_sizes.append(len(array))
        self.chunk_lengths.append(pc.binary_length(array).to_numpy().astype(np.int64))
        self.chunks.append(self.put(array))

    def lengths(self) -> np.ndarray:
        """UTF-8 bytes of every document, in order."""
        return np.concatenate(self.chunk_lengths) if self.chunk_lengths else np.zeros(0, np.int64)


@dataclass
class LoadedText:
    """What a store read: each split's documents, and what reading counted."""

    splits: dict[str, SplitDocuments]
    read: ReadCounts

    def stats(self) -> dict[str, Any]:
        return {
            "files": self.read.files,
            "binary_files": self.read.binary_files,
            "empty_documents": self.read.empty_documents,
            "skipped_lines": self.read.skipped_lines,
            **{split: vars(docs.counts).copy() for split, docs in self.splits.items()},
        }


def load_documents(
    spec: TextSourceSpec, part: ShardPart, put: Callable[[pa.Array], Any]
) -> LoadedText:
    """Read a part's documents into train and validation chunks (`put` stores each chunk)."""
    loaded = LoadedText({split: SplitDocuments(put) for split in DOCUMENT_SPLITS}, ReadCounts())
    filesystem = open_location(spec.uri)[0]
    for text, replaced in iter_documents(filesystem, part, spec, loaded.read):
        data = text.encode("utf-8")
        split = "val" if is_validation(data, spec.val_fraction, spec.seed) else "train"
        loaded.splits[split].add(text, len(data), replaced)
    for docs in loaded.splits.values():
        docs.flush()
    return loaded


# ---------------------------------------------------------------------------- sampling, tokens


def pick_documents(lengths: np.ndarray, max_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of documents in a random order, as many as fit in `max_bytes` (sorted)."""
    order = rng.permutation(len(lengths))
    fits = int(np.searchsorted(np.cumsum(lengths[order]), max_bytes, side="right"))
    return np.sort(order[:fits])


def take_documents(
    chunks: list[pa.Array], chunk_sizes: list[int], indices: np.ndarray
) -> list[str]:
    """The documents at sorted global `indices` of a split held as `chunks`."""
    out: list[str] = []
    starts = np.cumsum([0, *chunk_sizes])
    for chunk, start, stop in zip(chunks, starts[:-1], starts[1:], strict=True):
        inside = indices[(indices >= start) & (indices < stop)] - start
        if len(inside):
            out += chunk.take(pa.array(inside)).to_pylist()
    return out


def byte_quotas(store_bytes: list[int], total_bytes: int) -> list[int]:
    """Each store's share of a `total_bytes` sample, in proportion to its bytes."""
    whole = sum(store_bytes)
    if whole == 0:
        return [0] * len(store_bytes)
    return [math.ceil(total_bytes * size / whole) for size in store_bytes]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the memory of int32), else int32."""
    return np.dtype(np.uint16 if vocab_size <= MAX_UINT16_VOCAB else np.int32)


def tokenize_chunks(tokenizer: Any, chunks: list[pa.Array], dtype: np.dtype) -> np.ndarray:
    """One token stream of every document of `chunks` in order, eos after each: (N,) dtype."""
    from kiln.training.tokenizer import encode_documents

    parts = [encode_documents(tokenizer, chunk.to_pylist()).astype(dtype) for chunk in chunks]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def unigram_perplexity_of(reference: np.ndarray, scored: np.ndarray) -> float:
    """Perplexity of the tokens counted in `scored` under the add-one smoothed unigram
    frequencies of `reference` (both (vocab_size,) counts)."""
    probabilities = (reference + 1.0) / (reference.sum() + len(reference))
    return float(np.exp(-(scored * np.log(probabilities)).sum() / max(scored.sum(), 1)))


def private_memory_bytes() -> int:
    """This process's private memory, without its pages of the shared object store."""
    import psutil

    return sum(
        m.private_clean + m.private_dirty
        for m in psutil.Process().memory_maps(grouped=True)
        if "plasma" not in m.path
    )


# ---------------------------------------------------------------------------- the actor


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class TextShardStore:
    """One part of a text corpus: its train and validation documents, and once tokenised one
    token stream per split, as Arrow arrays in the object store owned by this actor.

    A restarted store reloads its documents from the source (its constructor does the loading);
    its tokens are gone until `tokenize` runs again (`token_refs` says so).
    """

    def __init__(self, spec: TextSourceSpec, part: ShardPart, index: int) -> None:
        self.spec, self.part, self.index = spec, part, index
        self._docs = LoadedText({s: SplitDocuments(ray.put) for s in DOCUMENT_SPLITS}, ReadCounts())
        self._tokens: dict[str, list[ray.ObjectRef]] | None = None
        self._token_counts: dict[str, int] = {}
        self._token_bytes = 0
        self._error: str | None = None
        try:
            self._docs = load_documents(spec, part, ray.put)
        except KilnError as exc:
            # Kept for `loaded` to return: raised here it would kill the actor and reach the
            # driver as an ActorDiedError with the message buried in it.
            self._error = str(exc)
        except Exception as exc:  # raised, it would restart the actor and fail again, forever
            logger.warning("text store %d of %s failed to load", index, spec.uri, exc_info=True)
            self._error = f"{spec.uri} could not be read: {type(exc).__name__}: {exc}"
        release_freed_memory()
        logger.info("text store %d of %s: %s", index, spec.uri, self._docs.stats())

    def source_spec(self) -> TextSourceSpec:
        return self.spec

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def loaded(self) -> tuple[dict[str, Any], str | None]:
        """What this store read (documents, bytes and replaced characters per split; files,
        binary files skipped), and why its loading stopped (None when it did not)."""
        return self._docs.stats(), self._error

    def sample_text(self, max_bytes: int, seed: int) -> list[str]:
        """Train documents drawn at random up to `max_bytes` (a lone larger one is cut to fit):
        the only text that leaves the store, to train a tokenizer."""
        docs = self._split("train")
        lengths = docs.lengths()
        if max_bytes <= 0 or len(lengths) == 0:
            return []
        rng = np.random.default_rng([seed, self.index])
        chosen = pick_documents(lengths, max_bytes, rng)
        chunks = ray.get(docs.chunks)
        if len(chosen) == 0:  # every document is larger than the quota: one, cut to fit
            one = take_documents(chunks, docs.chunk_sizes, rng.integers(len(lengths), size=1))[0]
            return [one.encode()[:max_bytes].decode("utf-8", "ignore")]
        return take_documents(chunks, docs.chunk_sizes, chosen)

    def tokenize(self, tokenizer_json: bytes) -> dict[str, int]:
        """Tokenise this store's documents here, eos after each, into one stream per split put
        in the object store; returns the tokens per split. Runs again with a new tokenizer."""
        from kiln.training.tokenizer import tokenizer_from_bytes

        tokenizer = tokenizer_from_bytes(tokenizer_json)
        dtype = token_dtype(tokenizer.get_vocab_size())
        self._tokens, self._token_counts, self._token_bytes = {}, {}, 0
        for split, docs in self._docs.splits.items():
            stream = tokenize_chunks(tokenizer, ray.get(docs.chunks), dtype)
            self._token_counts[split] = len(stream)
            self._token_bytes += stream.nbytes
            self._tokens[split] = [ray.put(pa.array(stream))] if len(stream) else []
            del stream
        release_freed_memory()
        return dict(self._token_counts)

    def token_refs(self, split: str) -> list[ray.ObjectRef]:
        """The split's token stream as Arrow integer arrays (empty when it has no text)."""
        self._split(split)
        if self._tokens is None:
            raise KilnError(
                f"{self.spec.uri} has not been tokenised (or its store restarted): "
                "run tokenize_dataset first."
            )
        return list(self._tokens[split])

    def token_histogram(self, split: str, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the split's stream: (vocab_size,) int64."""
        counts = np.zeros(vocab_size, np.int64)
        for array in ray.get(self.token_refs(split)):
            counts += np.bincount(array.to_numpy(), minlength=vocab_size)[:vocab_size]
        return counts

    def describe(self) -> dict[str, Any]:
        stats = self._docs.stats()
        return {
            "uri": self.spec.uri,
            "split": TEXT_SPLIT,
            "index": self.index,
            "files": stats["files"],
            "documents": {s: stats[s]["documents"] for s in DOCUMENT_SPLITS},
            "bytes": {s: stats[s]["bytes"] for s in DOCUMENT_SPLITS},
            "tokens": dict(self._token_counts) if self._tokens is not None else None,
        }

    def memory_bytes(self) -> dict[str, int]:
        """This actor's private memory (without the object store's pages) and the bytes it
        holds in the object store: documents and tokens."""
        documents = sum(d.array_bytes for d in self._docs.splits.values())
        return {
            "private": private_memory_bytes(),
            "object_store": documents + self._token_bytes,
            "documents": documents,
            "tokens": self._token_bytes,
        }

    def _split(self, split: str) -> SplitDocuments:
        if split not in DOCUMENT_SPLITS:
            raise KilnError(f'Got "{split}" for a text split. Choose one of: train, val.')
        return self._docs.splits[split]


# ---------------------------------------------------------------------------- the driver side


@dataclass
class TextDataset:
    """A text corpus resident in TextShardStore actors."""

    name: str | None
    spec: TextSourceSpec
    handles: list[Any]
    stats: list[dict[str, Any]]
    """Each store's `loaded()` statistics."""
    owned: bool = True
    """Loaded for this command (released at its end) rather than a named, shared dataset."""

    def documents(self, split: str) -> int:
        return sum(s[split]["documents"] for s in self.stats)

    def bytes_per_store(self, split: str = "train") -> list[int]:
        return [s[split]["bytes"] for s in self.stats]

    def summary(self) -> dict[str, Any]:
        """Documents, bytes and replaced characters per split; files and what was skipped."""
        totals = {
            key: sum(s[key] for s in self.stats)
            for key in ("files", "binary_files", "empty_documents", "skipped_lines")
        }
        for split in DOCUMENT_SPLITS:
            totals[split] = {
                key: sum(s[split][key] for s in self.stats)
                for key in ("documents", "bytes", "replaced_chars")
            }
        return totals

    def token_refs(self, split: str) -> list[ray.ObjectRef]:
        """Every store's token stream of the split, store by store."""
        parts = ray.get([h.token_refs.remote(split) for h in self.handles])
        return [ref for refs in parts for ref in refs]

    def release(self) -> None:
        if self.owned:
            kill_stores(self.handles)


def kill_stores(handles: list[Any]) -> None:
    for handle in handles:
        ray.kill(handle, no_restart=True)


def no_text_error(spec: TextSourceSpec, files: int, binary_files: int) -> KilnError:
    return KilnError(
        f"{spec.uri} has no text: {files} files, {binary_files} skipped as binary. "
        "Point it at text files, or name the text with --text-field."
    )


def load_text_dataset(
    spec: TextSourceSpec, num_shards: int, name: str | None = None, detached: bool = False
) -> TextDataset:
    """List the corpus once, start one TextShardStore per part spread over the nodes and wait
    until every one has loaded; raises the first store's KilnError."""
    check_options([(num_shards >= 1, "--shards", num_shards, "at least 1")])
    if name and find_dataset_actors(name):
        raise KilnError(
            f'A dataset named "{name}" is already loaded. Drop it first: kiln data drop {name}'
        )
    parts = plan_parts(list_text_files(spec.uri), num_shards)
    if not parts:
        raise no_text_error(spec, 0, 0)
    handles = start_text_stores(spec, parts, name, detached)
    try:
        found = wait_started(handles, "loaded")
    except BaseException:
        kill_stores(handles)
        raise
    errors = [error for _, error in found if error is not None]
    stats = [s for s, _ in found]
    dataset = TextDataset(name, spec, handles, stats, owned=not detached)
    if errors or not any(dataset.documents(split) for split in DOCUMENT_SPLITS):
        kill_stores(handles)
        if errors:  # a bad source: said once, as the store found it
            raise KilnError(errors[0])
        summary = dataset.summary()
        raise no_text_error(spec, summary["files"], summary["binary_files"])
    return dataset


def start_text_stores(
    spec: TextSourceSpec, parts: list[ShardPart], name: str | None, detached: bool
) -> list[Any]:
    """One store per part, round-robin over the live nodes (soft affinity, as ShardStores)."""
    targets = shard_targets(len(parts))
    if len(set(targets)) > 1:
        reach_nodes(sorted(set(targets)))
    store: Any = TextShardStore  # @ray.remote adds .options, which type checkers cannot see
    handles = []
    for index, (part, target) in enumerate(zip(parts, targets, strict=True)):
        options: dict[str, Any] = {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=target, soft=True)
        }
        if name:
            options["name"] = actor_name(name, TEXT_SPLIT, index)
            options["namespace"] = NAMESPACE
        if detached:
            options["lifetime"] = "detached"
        handles.append(store.options(**options).remote(spec, part, index))
    return handles


def attach_text_dataset(name: str) -> TextDataset | None:
    """The named text dataset loaded earlier by `kiln data load`, or None if there is none."""
    actor_names = find_dataset_actors(name).get(TEXT_SPLIT)
    if not actor_names:
        return None
    handles = [ray.get_actor(n, namespace=NAMESPACE) for n in actor_names]
    spec = cast(TextSourceSpec, ray.get(handles[0].source_spec.remote()))
    found = ray.get([h.loaded.remote() for h in handles])
    return TextDataset(name, spec, handles, [s for s, _ in found], owned=False)


def sample_for_tokenizer(
    dataset: TextDataset, total_bytes: int = DEFAULT_SAMPLE_BYTES, seed: int = 0
) -> list[str]:
    """About `total_bytes` of train documents drawn from every store in proportion to its
    bytes: the text a tokenizer learns from, and all that leaves the stores."""
    quotas = byte_quotas(dataset.bytes_per_store("train"), total_bytes)
    asked = [h.sample_text.remote(q, seed) for h, q in zip(dataset.handles, quotas, strict=True)]
    return [text for part in ray.get(asked) for text in part]


def tokenize_dataset(dataset: TextDataset, tokenizer_json: bytes) -> dict[str, int]:
    """Tokenise every store's documents in the stores themselves; the tokens per split, and
    `longest_train`: the longest store's training stream (what a context window must fit)."""
    tokenizer_ref = ray.put(tokenizer_json)
    counts = ray.get([h.tokenize.remote(tokenizer_ref) for h in dataset.handles])
    totals = {split: sum(c[split] for c in counts) for split in DOCUMENT_SPLITS}
    return {**totals, "longest_train": max((c["train"] for c in counts), default=0)}


def unigram_perplexity(dataset: TextDataset, vocab_size: int) -> float:
    """The validation tokens' perplexity under the training tokens' unigram frequencies: what
    a model blind to context scores, the floor a language model must beat (on the training
    tokens themselves when there is no validation text). Only counts leave the stores."""

    def histogram(split: str) -> np.ndarray:
        parts = ray.get([h.token_histogram.remote(split, vocab_size) for h in dataset.handles])
        return np.sum(parts, axis=0)

    train, val = histogram("train"), histogram("val")
    return unigram_perplexity_of(train, val if val.sum() else train)


def text_dataset_summary(name: str, described: list[dict[str, Any]]) -> dict[str, Any]:
    """One `kiln data ls` entry for a text dataset, from its stores' `describe()`."""
    tokenised = all(d["tokens"] is not None for d in described)
    return {
        "name": name,
        "kind": "text",
        "uri": described[0]["uri"] if described else None,
        "shards": len(described),
        "documents": {s: sum(d["documents"][s] for d in described) for s in DOCUMENT_SPLITS},
        "tokens": (
            {s: sum(d["tokens"][s] for d in described) for s in DOCUMENT_SPLITS}
            if tokenised and described
            else None
        ),
        "bytes": sum(sum(d["bytes"].values()) for d in described),
    }
