"""Dataset sources by URI, train/test splits and row-balanced shard slices. No Ray here.

URIs: `sklearn:<name>` (scikit-learn's bundled sets), `synthetic:classification?rows=..&
features=..&classes=..&seed=..` or `synthetic:regression?...` (generated block by block, so a
shard makes only its own rows), and Parquet/CSV/Arrow files or folders on any pyarrow
filesystem (local path, `file://`, `s3://`, `gs://`).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from kiln.training.data import make_batch, numpy_of
from kiln.training.errors import KilnError
from kiln.training.tabular import CATEGORICAL, NUMERIC, canonical

if TYPE_CHECKING:
    import pyarrow.dataset as pads

SKLEARN_SETS = ("digits", "breast_cancer", "diabetes", "iris", "wine")
SKLEARN_REGRESSION = ("diabetes",)
SYNTHETIC_KINDS = ("classification", "regression")
FILE_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "ipc",
    ".feather": "ipc",
    ".ipc": "ipc",
}
MISSING_MODES = ("impute", "error")
SYNTHETIC_BLOCK_ROWS = 65_536
BATCH_ROWS = 65_536

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """Where a dataset comes from and how it is split; travels to every ShardStore."""

    uri: str
    label: str | None = None
    """Label column; default `label`, `target`, or the last column."""
    features: tuple[str, ...] | None = None
    """Feature columns; default every usable column but the label (`plan_columns`)."""
    categorical: tuple[str, ...] | None = None
    """Columns read as categories whatever their type (low-cardinality integers)."""
    missing: str = "impute"
    """impute: missing feature values are imputed and rows without a label dropped;
    error: refuse a table with any missing value."""
    min_category_count: int = 1
    """Categories with fewer training rows than this share the "other" slot."""
    test_fraction: float = 0.2
    """Share of rows held out as the test split."""
    val_fraction: float = 0.0
    """Share of the non-test rows held out for validation (early stopping)."""
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> SourceSpec:
        """From its JSON form (where `features` became a list)."""

        def names(key: str) -> tuple[str, ...] | None:
            return tuple(raw[key]) if raw.get(key) is not None else None

        return cls(**{**raw, "features": names("features"), "categorical": names("categorical")})

    def __post_init__(self) -> None:
        for option, value in (
            ("--test-fraction", self.test_fraction),
            ("--val-fraction", self.val_fraction),
        ):
            if not 0.0 <= value < 1.0:
                raise KilnError(f'Got "{value}" for {option}. Use a value in [0, 1).')
        if self.missing not in MISSING_MODES:
            raise KilnError(
                f'Got "{self.missing}" for --missing. Choose one of: {", ".join(MISSING_MODES)}.'
            )
        if self.min_category_count < 1:
            raise KilnError(
                f'Got "{self.min_category_count}" for --min-category-count. Use 1 or more.'
            )


@dataclass(frozen=True)
class SyntheticSpec:
    kind: str
    rows: int
    features: int
    classes: int
    seed: int
    noise: float


# ---------------------------------------------------------------------------- synthetic


def parse_synthetic(uri: str) -> SyntheticSpec:
    parsed = urlparse(uri)
    kind = parsed.path
    if kind not in SYNTHETIC_KINDS:
        raise KilnError(
            f'Got "{uri}" for --data. Synthetic data is synthetic:classification?rows=N&... '
            "or synthetic:regression?rows=N&..."
        )
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    allowed = {"rows", "features", "classes", "seed", "noise"}
    unknown = set(query) - allowed
    if unknown:
        raise KilnError(
            f'Got unknown parameter "{sorted(unknown)[0]}" in "{uri}". '
            f"Synthetic data takes: {', '.join(sorted(allowed))}."
        )
    try:
        spec = SyntheticSpec(
            kind=kind,
            rows=int(query.get("rows", 10_000)),
            features=int(query.get("features", 16)),
            classes=int(query.get("classes", 2 if kind == "classification" else 0)),
            seed=int(query.get("seed", 0)),
            noise=float(query.get("noise", 0.1)),
        )
    except ValueError as exc:
        raise KilnError(f'Got "{uri}" for --data: {exc}. Use numbers, e.g. rows=5000.') from exc
    if spec.rows < 2 or spec.features < 1 or (kind == "classification" and spec.classes < 2):
        raise KilnError(f'Got "{uri}" for --data. Need rows >= 2, features >= 1 and classes >= 2.')
    return spec


def synthetic_rows(spec: SyntheticSpec, start: int, stop: int) -> pa.RecordBatch:
    """Rows [start, stop) of a synthetic set; identical whichever shard asks for them."""
    rng_w = np.random.default_rng((spec.seed, 0))
    weights = rng_w.normal(size=(spec.features, max(spec.classes, 1))).astype(np.float32)
    parts_x, parts_y = [], []
    first_block, last_block = start // SYNTHETIC_BLOCK_ROWS, (stop - 1) // SYNTHETIC_BLOCK_ROWS
    for block in range(first_block, last_block + 1):
        rng = np.random.default_rng((spec.seed, 1, block))
        block_start = block * SYNTHETIC_BLOCK_ROWS
        block_rows = min(SYNTHETIC_BLOCK_ROWS, spec.rows - block_start)
        x = rng.standard_normal((block_rows, spec.features), dtype=np.float32)
        noise = rng.standard_normal((block_rows, weights.shape[1]), dtype=np.float32) * spec.noise
        scores = x @ weights + noise
        lo, hi = max(start - block_start, 0), min(stop - block_start, block_rows)
        parts_x.append(x[lo:hi])
        if spec.kind == "classification":
            parts_y.append(scores[lo:hi].argmax(axis=1).astype(np.int64))
        else:
            parts_y.append(scores[lo:hi, 0].astype(np.float32))
    return make_batch(np.arange(start, stop), np.concatenate(parts_x), np.concatenate(parts_y))


# ---------------------------------------------------------------------------- tables


def load_sklearn(name: str) -> pa.Table:
    """A scikit-learn built-in set as a table, from this machine's cache when it has one.

    Importing sklearn.datasets takes about 2 s and reading the set 0.02 s, and every shard
    process (and the lineage hash) reads its source itself; so the table is written once per
    machine and scikit-learn version to an Arrow file that later reads map in milliseconds.
    """
    if name not in SKLEARN_SETS:
        raise KilnError(
            f'Got "sklearn:{name}" for --data. Built-in sets: '
            + ", ".join(f"sklearn:{n}" for n in SKLEARN_SETS)
            + "."
        )
    cached = sklearn_cache_path(name)
    if cached is not None:
        try:
            with pa.memory_map(str(cached)) as source:
                return pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowInvalid):
            pass  # not written yet, or unreadable: build it (again) below
    table = build_sklearn_table(name)
    if cached is not None:
        write_table_atomically(table, cached)
    return table


def build_sklearn_table(name: str) -> pa.Table:
    import sklearn.datasets as skd

    x, y = getattr(skd, f"load_{name}")(return_X_y=True)
    columns = {f"f{i}": x[:, i].astype(np.float32) for i in range(x.shape[1])}
    columns["target"] = y.astype(np.float32 if name in SKLEARN_REGRESSION else np.int64)
    return pa.table(columns)


def sklearn_cache_path(name: str) -> Path | None:
    """`$KILN_CACHE` (default ~/.cache/kiln)/sklearn-<version>/<name>.arrow; None: no cache."""
    from importlib import metadata

    try:
        version = metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        return None
    root = os.environ.get("KILN_CACHE") or os.path.join(Path.home(), ".cache", "kiln")
    return Path(root) / f"sklearn-{version}" / f"{name}.arrow"


def write_table_atomically(table: pa.Table, path: Path) -> None:
    """Write to a private temporary file, then rename: a concurrent reader sees all or none."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        os.replace(temporary, path)
    except OSError as exc:  # a read-only home: every read builds the table, as before
        logger.debug("could not cache %s: %s", path, exc)


def open_file_dataset(uri: str) -> pads.Dataset:
    import pyarrow.dataset as pads  # only file sources need it (30 MB in each shard process)

    try:
        filesystem, path = (
            pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
        )
        info = filesystem.get_file_info(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise KilnError(f'Got "{uri}" for --data, which cannot be opened: {exc}.') from exc
    if info.type == pafs.FileType.NotFound:
        raise KilnError(
            f'Got "{uri}" for --data, which does not exist. Give a Parquet/CSV/Arrow file or '
            "folder, sklearn:<name> or synthetic:<kind>?rows=N."
        )
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    fmt = FILE_FORMATS.get(suffix, "parquet")
    if info.type == pafs.FileType.File and suffix not in FILE_FORMATS:
        raise KilnError(
            f'Got "{uri}" for --data, whose format is unknown. Use .parquet, .csv or .arrow files.'
        )
    file_format: Any = fmt
    if fmt == "csv":  # an empty cell is a missing value in every column, strings included
        import pyarrow.csv as pacsv

        convert = pacsv.ConvertOptions(strings_can_be_null=True)
        file_format = pads.CsvFileFormat(convert_options=convert)
    try:
        dataset = pads.dataset(path, filesystem=filesystem, format=file_format)
    except (pa.ArrowInvalid, OSError) as exc:
        raise KilnError(f'Got "{uri}" for --data, which is not valid {fmt}: {exc}.') from exc
    check_declared_rows(dataset, uri)
    return dataset


MAX_FILE_ROWS = 2**31
"""Rows one Parquet file may declare: past this, its footer is taken as damaged or hostile
(reading it would ask for memory no machine has) and the file is refused before any read."""


def unreadable(uri: str, exc: BaseException) -> KilnError:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return KilnError(f'Got "{uri}" for --data, which could not be read: {reason}.')


def check_declared_rows(dataset: pads.Dataset, uri: str) -> None:
    """Refuse a Parquet file whose footer declares more rows than MAX_FILE_ROWS."""
    import pyarrow.dataset as pads

    if not isinstance(dataset, pads.FileSystemDataset) or not isinstance(
        dataset.format, pads.ParquetFileFormat
    ):
        return
    for fragment in dataset.get_fragments():
        try:
            declared = fragment.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(uri, exc) from exc
        if declared > MAX_FILE_ROWS:
            raise KilnError(
                f'Got "{uri}" for --data: {fragment.path} declares {declared:,} rows, more than '
                f"the {MAX_FILE_ROWS:,} Kiln reads from one file; its footer is damaged, or "
                "split it into several files of a folder."
            )


def load_file_table(uri: str) -> pa.Table:
    try:
        table = open_file_dataset(uri).to_table()
    except (pa.ArrowException, MemoryError) as exc:
        raise unreadable(uri, exc) from exc
    if table.num_rows == 0:
        raise KilnError(f'Got "{uri}" for --data, which holds no rows. Give a non-empty dataset.')
    return table


@dataclass(frozen=True)
class ColumnPlan:
    """What each column of a table is for, decided once when the dataset loads.

    `inputs` are (name, kind, type) in table order, kind numeric or categorical; `ignored` are
    (name, reason) for the columns left out, which the CLI lists in one line.
    """

    label: str
    label_type: str
    inputs: tuple[tuple[str, str, str], ...]
    ignored: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.inputs]

    @property
    def numeric(self) -> list[str]:
        return [name for name, kind, _ in self.inputs if kind == NUMERIC]

    @property
    def categorical(self) -> list[str]:
        return [name for name, kind, _ in self.inputs if kind == CATEGORICAL]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": {"name": self.label, "type": self.label_type},
            "inputs": [{"name": n, "kind": k, "type": t} for n, k, t in self.inputs],
            "ignored": [{"name": n, "reason": r} for n, r in self.ignored],
        }


def ignored_line(ignored: list[tuple[str, str]]) -> str | None:
    """`ignored: id (unique per row); say --features to include`, or None."""
    if not ignored:
        return None
    listed = ", ".join(f"{name} ({reason})" for name, reason in ignored)
    return f"ignored: {listed}; say --features to include"


def _type_name(dtype: pa.DataType) -> str:
    if pa.types.is_dictionary(dtype):
        return _type_name(dtype.value_type)
    if pa.types.is_large_string(dtype):
        return "string"
    return str(dtype)


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype)


def _is_categorical(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_categorical(dtype.value_type) or _is_numeric(dtype.value_type)
    return (
        pa.types.is_boolean(dtype) or pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    )


def choose_label(names: list[str], spec: SourceSpec) -> str:
    label = spec.label or next((n for n in ("label", "target") if n in names), names[-1])
    if label not in names:
        raise KilnError(
            f'Got "{label}" for --label, which is not a column of {spec.uri}. '
            f"Columns: {', '.join(names)}."
        )
    return label


def plan_columns(schema: pa.Schema, spec: SourceSpec, table: pa.Table | None = None) -> ColumnPlan:
    """Classify every column: the label, numeric and categorical inputs, and the rest ignored.

    By type: integers, floats and decimals are numeric; strings, booleans and dictionary-encoded
    columns categorical; `--categorical` makes any named column categorical (low-cardinality
    integers). With the whole `table`, columns the user did not name are also left out when
    they cannot help: every value missing, or one value per row (an id: every string distinct,
    or integers all distinct that count up or are named like an id).
    """
    names = schema.names
    label = choose_label(names, spec)
    named = list(spec.features) if spec.features else None
    categorical = set(spec.categorical or ())
    for option, given in (("--features", named or []), ("--categorical", sorted(categorical))):
        missing = [f for f in given if f not in names]
        if missing:
            raise KilnError(
                f'Got "{missing[0]}" in {option}, which is not a column of {spec.uri}. '
                f"Columns: {', '.join(names)}."
            )
    if named and label in named:
        raise KilnError(f'Got "{label}" in --features, but it is the label. Leave it out.')
    if named and categorical - set(named):
        extra = sorted(categorical - set(named))[0]
        raise KilnError(
            f'Got "{extra}" in --categorical, which is not in --features. Add it to --features.'
        )
    if label in categorical:
        raise KilnError(
            f'Got "{label}" in --categorical, but it is the label; integer and string labels '
            "are classes already."
        )
    inputs: list[tuple[str, str, str]] = []
    ignored: list[tuple[str, str]] = []
    for name in named or [n for n in names if n != label]:
        dtype = schema.field(name).type
        kind = (
            CATEGORICAL
            if name in categorical or _is_categorical(dtype)
            else NUMERIC
            if _is_numeric(dtype)
            else None
        )
        reason = unusable_reason(table, name, kind, dtype) if named is None else None
        if kind is None and named is not None:
            raise KilnError(
                f'Column "{name}" of {spec.uri} is {dtype}, which Kiln cannot read as a feature. '
                "Choose numeric, string or boolean columns with --features."
            )
        if kind is None or reason is not None:
            ignored.append((name, reason or f"type {dtype}"))
            continue
        inputs.append((name, kind, _type_name(dtype)))
    if not inputs:
        raise KilnError(
            f"{spec.uri} has no usable feature columns besides the label {label!r}"
            + (f" ({ignored_line(ignored)})" if ignored else "")
            + ". Choose them with --features."
        )
    return ColumnPlan(label, _type_name(schema.field(label).type), tuple(inputs), tuple(ignored))


ID_MIN_ROWS = 20
"""Below this many rows a column of distinct values may just be a small table: kept."""


def unusable_reason(
    table: pa.Table | None, name: str, kind: str | None, dtype: pa.DataType
) -> str | None:
    """Why a column the user did not name is left out, from its values; None keeps it."""
    if table is None or kind is None:
        return None
    column = table.column(name)
    if column.null_count == len(column):
        return "all missing"
    is_string = pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    if (
        len(column) < ID_MIN_ROWS
        or column.null_count
        or not (is_string or pa.types.is_integer(dtype))
    ):
        return None
    distinct = pc.count_distinct(column).as_py()
    if distinct < len(column):
        return None
    if is_string:
        return "unique per row"
    if pa.types.is_integer(dtype):
        low, high = pc.min_max(column).values()
        counts_up = high.as_py() - low.as_py() + 1 == distinct
        if counts_up or looks_like_id(name):
            return "unique per row"
    return None


def looks_like_id(name: str) -> bool:
    """`id`, `customer_id`, `order-id`, `customerId`, `userID`."""
    return (
        name.lower() == "id"
        or name.lower().endswith(("_id", "-id", " id"))
        or name.endswith(("Id", "ID"))
    )


@dataclass
class TableColumns:
    """A table's rows as shards store them: labelled rows only."""

    plan: ColumnPlan
    row_ids: np.ndarray
    """Each kept row's position in the table."""
    numeric: np.ndarray
    """(N, numeric inputs) float32, NaN where missing."""
    categorical: list[pa.Array]
    """One canonical-string array per categorical input, null where missing."""
    labels: np.ndarray
    dropped_rows: int
    """Rows left out because their label was missing."""


def table_columns(table: pa.Table, spec: SourceSpec) -> TableColumns:
    """The plan's columns of a whole table; rows without a label are dropped (and counted)."""
    plan = plan_columns(table.schema, spec, table)
    label = table.column(plan.label)
    if _is_numeric(label.type):
        missing_label = label.is_null(nan_is_null=True)
    elif pa.types.is_string(label.type) or pa.types.is_large_string(label.type):
        missing_label = pc.or_kleene(label.is_null(), pc.equal(label, "")).fill_null(True)
    else:
        missing_label = label.is_null()
    dropped = pc.sum(missing_label).as_py() or 0
    if dropped and spec.missing == "error":
        raise missing_error(spec, plan.label, dropped)
    row_ids = np.arange(table.num_rows)
    if dropped:
        row_ids = row_ids[~numpy_of(missing_label)]
        table = table.filter(pc.invert(missing_label))
    numeric = np.empty((table.num_rows, len(plan.numeric)), dtype=np.float32)
    for j, name in enumerate(plan.numeric):
        values = numpy_of(pc.cast(table.column(name), pa.float64()))
        numeric[:, j] = values
        if spec.missing == "error" and np.isnan(numeric[:, j]).any():
            raise missing_error(spec, name, int(np.isnan(numeric[:, j]).sum()))
    categorical = [canonical_strings(table.column(name)) for name in plan.categorical]
    if spec.missing == "error":
        for name, values in zip(plan.categorical, categorical, strict=True):
            if values.null_count:
                raise missing_error(spec, name, values.null_count)
    labels = label_values(table.column(plan.label))
    return TableColumns(plan, row_ids, numeric, categorical, labels, dropped)


def missing_error(spec: SourceSpec, column: str, count: int) -> KilnError:
    return KilnError(
        f'Column "{column}" of {spec.uri} has {count} missing values and --missing is error. '
        "Use --missing impute (the default) or fill them in."
    )


def canonical_strings(column: pa.ChunkedArray) -> pa.Array:
    """A column as canonical category strings (kiln.training.tabular.canonical), null where
    missing."""
    values = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if pa.types.is_boolean(values.type):
        return pc.if_else(values, "true", "false").cast(pa.string())
    if pa.types.is_integer(values.type) or pa.types.is_string(values.type):
        values = values.cast(pa.string())
        return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    return pa.array([canonical(v) for v in values.to_pylist()], pa.string())


def label_values(column: pa.ChunkedArray) -> np.ndarray:
    """Labels as numpy: numbers as they are, strings as an object array of str."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_large_string(column.type):
        column = column.cast(pa.string())
    return numpy_of(column)


def task_of_labels(y: np.ndarray) -> str:
    return "regression" if y.dtype.kind == "f" else "classification"


# ---------------------------------------------------------------------------- split & shards


def split_indices(
    y: np.ndarray, test_fraction: float, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test row indices, seeded; stratified by label for classification.

    ceil(test_fraction * n) rows go to test (scikit-learn's count). Stratified, each class
    gives its share, floors first and then the largest remainders (ties in a seeded order),
    so class shares match to within a row. numpy only: scikit-learn's train_test_split cost
    every shard process 2.7 s to import and about 160 MB to hold. Not the same rows as
    train_test_split with the same seed.
    """
    rows = np.arange(len(y))
    num_test = math.ceil(test_fraction * len(y))
    if num_test == 0:
        return rows, rows[:0]
    rng = np.random.default_rng(seed)
    if not stratify:
        picked = rng.permutation(len(y))[:num_test]
    else:
        classes, members = np.unique(y, return_inverse=True)
        counts = np.bincount(members, minlength=len(classes))
        share = counts * (num_test / len(y))
        take = np.floor(share).astype(np.int64)
        order = rng.permutation(len(classes))  # seeded tie-break among equal remainders
        order = order[np.argsort(-(share - take)[order], kind="stable")]
        take[order[: num_test - int(take.sum())]] += 1
        by_class = np.argsort(members, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        picked = np.concatenate(
            [
                rng.permutation(by_class[start : start + count])[:k]
                for start, count, k in zip(starts, counts, take, strict=True)
            ]
        )
    is_test = np.zeros(len(y), dtype=bool)
    is_test[picked] = True
    return rows[~is_test], rows[is_test]


def shard_bounds(num_rows: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, stop) of shard `index`: sizes differ by at most one row."""
    base, extra = divmod(num_rows, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


SPLITS = ("train", "val", "test", "all")


def synthetic_split_range(spec: SourceSpec, num_rows: int, split: str) -> tuple[int, int]:
    """Synthetic rows are i.i.d., so splits are contiguous ranges: train | val | test."""
    num_test = int(round(num_rows * spec.test_fraction))
    num_val = int(round((num_rows - num_test) * spec.val_fraction))
    num_train = num_rows - num_test - num_val
    return {
        "train": (0, num_train),
        "val": (num_train, num_train + num_val),
        "test": (num_train + num_val, num_rows),
        "all": (0, num_rows),
    }[split]


def split_rows(y: np.ndarray, spec: SourceSpec, split: str) -> np.ndarray:
    """Row indices of one split: test first, then validation carved from the rest (seeded)."""
    if split == "all":
        return np.arange(len(y))
    stratify = task_of_labels(y) == "classification"
    rest, test = split_indices(y, spec.test_fraction, spec.seed, stratify)
    if split == "test":
        return test
    train_pos, val_pos = split_indices(y[rest], spec.val_fraction, spec.seed + 1, stratify)
    return rest[train_pos] if split == "train" else rest[val_pos]


def read_shard(spec: SourceSpec, split: str, index: int, num_shards: int) -> list[pa.RecordBatch]:
    """The record batches of one shard of one split: train, val, test or all."""
    return list(iter_shard(spec, split, index, num_shards))


def iter_shard(
    spec: SourceSpec, split: str, index: int, num_shards: int
) -> Iterator[pa.RecordBatch]:
    """The same batches one at a time, so a reader can store each before the next is made."""
    return open_shard(spec, split, index, num_shards).batches


@dataclass
class ShardSource:
    """One shard of one split: the source's column plan and the shard's batches, made lazily."""

    plan: ColumnPlan
    dropped_rows: int
    """Rows of the whole source dropped for a missing label."""
    batches: Iterator[pa.RecordBatch]


def synthetic_plan(synthetic: SyntheticSpec) -> ColumnPlan:
    label_type = "int64" if synthetic.kind == "classification" else "float"
    inputs = tuple((f"x{i}", NUMERIC, "float") for i in range(synthetic.features))
    return ColumnPlan("label", label_type, inputs)


def open_shard(spec: SourceSpec, split: str, index: int, num_shards: int) -> ShardSource:
    """Plan the columns, split the labelled rows and slice out shard `index` of `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if spec.uri.startswith("synthetic:"):
        synthetic = parse_synthetic(spec.uri)
        lo, hi = synthetic_split_range(spec, synthetic.rows, split)
        start, stop = shard_bounds(hi - lo, num_shards, index)
        made = (
            synthetic_rows(synthetic, lo + s, lo + min(s + BATCH_ROWS, stop))
            for s in range(start, stop, BATCH_ROWS)
        )
        return ShardSource(synthetic_plan(synthetic), 0, made)
    if spec.uri.startswith("sklearn:"):
        table = load_sklearn(spec.uri.split(":", 1)[1])
    else:
        table = load_file_table(spec.uri)
    columns = table_columns(table, spec)
    del table
    rows = split_rows(columns.labels, spec, split)
    start, stop = shard_bounds(len(rows), num_shards, index)
    return ShardSource(columns.plan, columns.dropped_rows, shard_batches(columns, rows[start:stop]))


def shard_batches(columns: TableColumns, mine: np.ndarray) -> Iterator[pa.RecordBatch]:
    names = columns.plan.categorical
    for s in range(0, len(mine), BATCH_ROWS):
        part = mine[s : s + BATCH_ROWS]
        categorical = {n: c.take(part) for n, c in zip(names, columns.categorical, strict=True)}
        yield make_batch(
            columns.row_ids[part], columns.numeric[part], columns.labels[part], categorical
        )


SKLEARN_MAX_ROWS = 1_797
"""Rows of the largest built-in set (digits)."""


def source_rows(spec: SourceSpec) -> int | None:
    """Rows of the whole source when known without reading its rows: a synthetic set's
    parameter, a built-in set (at most SKLEARN_MAX_ROWS), Parquet files' footers; None for
    CSV and Arrow files."""
    if spec.uri.startswith("synthetic:"):
        return parse_synthetic(spec.uri).rows
    if spec.uri.startswith("sklearn:"):
        return SKLEARN_MAX_ROWS
    import pyarrow.dataset as pads

    dataset = open_file_dataset(spec.uri)
    if not isinstance(dataset, pads.FileSystemDataset) or not isinstance(
        dataset.format, pads.ParquetFileFormat
    ):
        return None
    try:
        return sum(fragment.metadata.num_rows for fragment in dataset.get_fragments())
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(spec.uri, exc) from exc


def check_source(spec: SourceSpec) -> None:
    """Fail fast on the driver for a URI that cannot be read, before any actor starts."""
    if spec.uri.startswith("synthetic:"):
        parse_synthetic(spec.uri)
    elif spec.uri.startswith("sklearn:"):
        name = spec.uri.split(":", 1)[1]
        if name not in SKLEARN_SETS or spec.label or spec.features or spec.categorical:
            plan_columns(load_sklearn(name).schema, spec)  # the name, then the columns
    else:
        dataset = open_file_dataset(spec.uri)
        try:
            head = dataset.head(1)
        except (pa.ArrowException, MemoryError) as exc:
            raise unreadable(spec.uri, exc) from exc
        if head.num_rows == 0:
            raise KilnError(
                f'Got "{spec.uri}" for --data, which holds no rows. Give a non-empty dataset.'
            )
        plan_columns(head.schema, spec)
