"""Text sources without Ray: `text:` URIs, formats, counts, the hashed validation split, parts."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from kiln.actors.text import (
    ShardPart,
    TextFile,
    TextSourceSpec,
    assign_by_bytes,
    byte_quotas,
    glob_regex,
    is_validation,
    list_text_files,
    load_documents,
    pick_documents,
    plan_parts,
    take_documents,
    token_dtype,
    unigram_perplexity_of,
)
from kiln.training.errors import KilnError


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def read_all(uri: str, num_shards: int = 1, **options) -> tuple[dict[str, list[str]], dict]:
    """Every document of every part, by split, and the summed statistics, as the stores do."""
    spec = TextSourceSpec(uri=uri, **options)
    docs: dict[str, list[str]] = {"train": [], "val": []}
    totals: dict = {}
    for part in plan_parts(list_text_files(uri), num_shards):
        loaded = load_documents(spec, part, put=lambda array: array)
        for split, held in loaded.splits.items():
            docs[split] += [t for chunk in held.chunks for t in chunk.to_pylist()]
        for key, value in loaded.stats().items():
            if isinstance(value, dict):
                inner = totals.setdefault(key, {})
                for k, v in value.items():
                    inner[k] = inner.get(k, 0) + v
            else:
                totals[key] = totals.get(key, 0) + value
    return docs, totals


def names(files: list[TextFile]) -> list[str]:
    return [Path(f.path).name for f in files]


# ---------------------------------------------------------------------------- URIs


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write(root / "a.md", "# A\n")
    write(root / "b.txt", "bee\n")
    write(root / "pkg" / "c.py", "print('c')\n")
    write(root / "pkg" / "deep" / "d.py", "print('d')\n")
    write(root / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(root / "pkg" / ".hidden.py", "secret = 1\n")
    return root


def test_a_folder_is_every_file_under_it_sorted_without_hidden_ones(corpus):
    files = list_text_files(f"text:{corpus}")
    assert names(files) == ["a.md", "b.txt", "c.py", "d.py"]
    assert [f.path for f in files] == sorted(f.path for f in files)
    assert all(f.size > 0 for f in files)


def test_globs_match_within_a_folder_and_across_folders_with_two_stars(corpus):
    assert names(list_text_files(f"text:{corpus}/*.md")) == ["a.md"]
    assert names(list_text_files(f"text:{corpus}/**/*.py")) == ["c.py", "d.py"]
    assert names(list_text_files(f"text:{corpus}/pkg/*.py")) == ["c.py"]
    assert names(list_text_files(f"text:{corpus}/[ab].*")) == ["a.md", "b.txt"]
    assert list_text_files(f"text:{corpus}/*.rst") == []


def test_home_is_expanded_and_file_uris_and_single_files_work(corpus, monkeypatch):
    monkeypatch.setenv("HOME", str(corpus.parent))
    assert names(list_text_files("text:~/corpus/**/*.py")) == ["c.py", "d.py"]
    assert names(list_text_files(f"text:file://{corpus}/b.txt")) == ["b.txt"]
    assert names(list_text_files(f"text:file://{corpus}/**/*.md")) == ["a.md"]
    assert names(list_text_files(f"text:{corpus}/a.md")) == ["a.md"]


def test_the_standard_library_is_a_real_corpus():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = list_text_files(f"text:{stdlib}/json/*.py")
    assert names(files) == sorted(p.name for p in (stdlib / "json").glob("*.py"))
    docs, stats = read_all(f"text:{stdlib}/json/*.py", val_fraction=0.0)
    assert stats["train"]["documents"] == len(files)
    assert any("def dumps(" in doc for doc in docs["train"])


def test_glob_regex_reads_like_a_shell():
    assert glob_regex("**/*.py").fullmatch("a.py")
    assert glob_regex("**/*.py").fullmatch("x/y/a.py")
    assert not glob_regex("*.py").fullmatch("x/a.py")
    assert glob_regex("a?c.[!x]d").fullmatch("abc.md")
    assert not glob_regex("a?c.[!x]d").fullmatch("abc.xd")


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"uri": "/no/scheme"}, "A text source is text:PATH"),
        ({"uri": "text:"}, "A text source is text:PATH"),
        ({"uri": "text:x", "val_fraction": 1.5}, 'Got "1.5" for --val-fraction'),
        ({"uri": "text:x", "text_field": " "}, "for --text-field"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(options, fragment):
    with pytest.raises(KilnError, match=fragment.replace("[", r"\[")):
        TextSourceSpec(**options)


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(KilnError, match="does not exist"):
        list_text_files(f"text:{tmp_path}/nope")


# ---------------------------------------------------------------------------- formats


def test_jsonl_is_one_document_per_line_from_the_text_field(tmp_path):
    lines = [{"body": f"line {i}", "id": i} for i in range(5)] + [{"id": 9}]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    write(tmp_path / "d.jsonl", text)
    docs, stats = read_all(f"text:{tmp_path}/d.jsonl", text_field="body", val_fraction=0.0)
    assert docs["train"] == [f"line {i}" for i in range(5)]
    assert stats["skipped_lines"] == 2
    with pytest.raises(KilnError, match=r'"text" for --text-field.*string keys: body\.'):
        read_all(f"text:{tmp_path}/d.jsonl")


def table_of(texts: list[str | None]) -> pa.Table:
    return pa.table({"id": list(range(len(texts))), "body": texts, "note": ["n"] * len(texts)})


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow", ".feather"])
def test_tables_are_one_document_per_row_of_the_text_column(tmp_path, suffix):
    table = table_of([f"row {i}" for i in range(7)] + [None])
    path = tmp_path / f"t{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path, row_group_size=3)
    elif suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    docs, stats = read_all(f"text:{path}", text_field="body", val_fraction=0.0)
    assert docs["train"] == [f"row {i}" for i in range(7)]
    with pytest.raises(KilnError, match='"text" for --text-field.*String columns: body, note'):
        read_all(f"text:{path}")


def test_a_column_that_is_not_text_is_refused(tmp_path):
    pq.write_table(table_of(["x"]), tmp_path / "t.parquet")
    with pytest.raises(KilnError, match='"id" for --text-field, which is not a string column'):
        read_all(f"text:{tmp_path}/t.parquet", text_field="id")


def test_bad_bytes_are_replaced_and_counted_binary_files_and_empty_ones_skipped(tmp_path):
    write(tmp_path / "bad.txt", b"ab\xffcd\xfe and a real \xef\xbf\xbd")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(tmp_path / "empty.txt", b"  \n")
    write(tmp_path / "bad.csv", b"text\nok\nx\xffy\n")
    docs, stats = read_all(f"text:{tmp_path}", val_fraction=0.0)
    assert sorted(docs["train"]) == sorted(["ab\ufffdcd\ufffd and a real \ufffd", "ok", "x\ufffdy"])
    assert stats["train"]["replaced_chars"] == 3  # the real U+FFFD is not counted
    assert stats["binary_files"] == 1 and stats["empty_documents"] == 1
    assert stats["files"] == 4


# ---------------------------------------------------------------------------- splits


def test_the_validation_split_follows_each_documents_content_and_never_cuts_one(tmp_path):
    documents = [f"document {i}\n" + "text " * (i % 7) for i in range(600)]
    for i, doc in enumerate(documents):
        write(tmp_path / f"{i:04d}.txt", doc)
    one, _ = read_all(f"text:{tmp_path}", num_shards=1, val_fraction=0.2, seed=3)
    three, _ = read_all(f"text:{tmp_path}", num_shards=3, val_fraction=0.2, seed=3)
    assert sorted(one["val"]) == sorted(three["val"])  # whichever store read each
    assert sorted(one["train"] + one["val"]) == sorted(documents)  # whole documents, each once
    assert 0.14 < len(one["val"]) / len(documents) < 0.26
    assert all(is_validation(doc.encode(), 0.2, 3) for doc in one["val"])
    other, _ = read_all(f"text:{tmp_path}", val_fraction=0.2, seed=4)
    assert sorted(other["val"]) != sorted(one["val"])  # the seed picks another held-out set


def test_identical_documents_share_a_split():
    assert is_validation(b"same", 0.5, 0) == is_validation(b"same", 0.5, 0)
    assert not any(is_validation(f"{i}".encode(), 0.0, 0) for i in range(100))


# ---------------------------------------------------------------------------- parts


def test_every_file_goes_to_exactly_one_store_with_bytes_balanced():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 10_000, size=200).tolist()
    files = [TextFile(f"/c/{i:04d}.txt", size) for i, size in enumerate(sizes)]
    parts = plan_parts(files, 4)
    held = [f for part in parts for f in part.files]
    assert sorted(held, key=lambda f: f.path) == files and len(held) == len(files)
    owners = assign_by_bytes(sizes, 4)
    assert owners == sorted(owners)  # contiguous runs of the sorted list
    per_store = [sum(f.size for f in part.files) for part in parts]
    assert max(per_store) < 1.1 * min(per_store)


def test_stores_left_without_files_are_dropped():
    files = [TextFile("/c/big.txt", 10_000), TextFile("/c/small.txt", 10)]
    assert [len(p.files) for p in plan_parts(files, 4)] == [1, 1]


@pytest.mark.parametrize("num_shards", [2, 3, 7])
def test_one_big_jsonl_file_is_split_by_lines_among_stores(tmp_path, num_shards):
    lines = [f"row {i} " + "x" * (i % 13) for i in range(50)]
    write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in lines))
    parts = plan_parts(list_text_files(f"text:{tmp_path}/d.jsonl"), num_shards)
    assert len(parts) == num_shards and {p.slice_count for p in parts} == {num_shards}
    docs, _ = read_all(f"text:{tmp_path}/d.jsonl", num_shards=num_shards, val_fraction=0.0)
    assert docs["train"] == lines  # in order, each line once, none cut


def test_one_big_parquet_file_is_split_by_rows_among_stores(tmp_path):
    texts = [f"row {i}" for i in range(40)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=6)
    for num_shards in (3, 5):
        docs, _ = read_all(f"text:{tmp_path}/t.parquet", num_shards=num_shards, val_fraction=0)
        assert docs["train"] == texts


def test_a_line_range_read_covers_a_file_without_a_final_newline(tmp_path):
    write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"}')
    spec = TextSourceSpec(uri=f"text:{tmp_path}/d.jsonl", val_fraction=0.0)
    file = list_text_files(spec.uri)[0]
    found = []
    for i in range(4):
        loaded = load_documents(spec, ShardPart((file,), i, 4), put=lambda a: a)
        found += [t for c in loaded.splits["train"].chunks for t in c.to_pylist()]
    assert found == ["a", "b", "c"]


# ---------------------------------------------------------------------------- sampling, tokens


def test_a_sample_fits_its_byte_budget_and_takes_whole_documents():
    chunks = [pa.array(["aa", "bbbb"], pa.large_string()), pa.array(["c", "dddddd", "ee"])]
    lengths = np.array([2, 4, 1, 6, 2])
    chosen = pick_documents(lengths, 7, np.random.default_rng(0))
    assert lengths[chosen].sum() <= 7 and list(chosen) == sorted(chosen)
    taken = take_documents(chunks, [2, 3], chosen)
    assert taken == [["aa", "bbbb", "c", "dddddd", "ee"][i] for i in chosen]


def test_byte_quotas_follow_each_stores_bytes():
    assert byte_quotas([1000, 3000], 400) == [100, 300]
    assert byte_quotas([0, 0], 400) == [0, 0]


def test_token_streams_are_uint16_when_the_vocabulary_fits():
    assert token_dtype(8192) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.int32


def test_a_text_store_process_imports_neither_torch_nor_scipy_nor_sklearn():
    """A store holds its imports as long as the corpus is resident: tokenising needs only
    `tokenizers` and numpy, not the model's torch."""
    import subprocess
    import sys

    probe = (
        "import sys, kiln.actors.text, kiln.training.tokenizer; "
        "print(sorted({'torch', 'scipy', 'sklearn'} & set(sys.modules)))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert found.stdout.strip() == "[]", found.stderr


def test_unigram_perplexity_is_the_vocabulary_for_uniform_tokens():
    uniform = np.full(10, 1000)
    assert unigram_perplexity_of(uniform, uniform) == pytest.approx(10.0)
    peaked = np.array([1000, 0, 0, 0])
    assert unigram_perplexity_of(peaked, np.array([5, 0, 0, 0])) < 1.01


# ---------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["data", "show", "corpus"], "kiln data show needs a running Ray cluster"),
        (["data", "load", "text:/does/not/exist", "--name", "c"], "does not exist"),
        (["data", "load", "text:/tmp", "--name", "c", "--val-fraction", "2"], "--val-fraction"),
        (["data", "load", "sklearn:iris", "--name", "c", "--text-field", "t"], "text: sources"),
    ],
)
def test_kiln_data_refuses_text_mistakes_in_one_line_before_ray(
    args, fragment, tmp_path, monkeypatch, capsys
):
    from kiln.cli import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], lines


def test_text_datasets_list_with_documents_and_tokens():
    from kiln.cli.data import datasets_table, shards_table

    def store(index: int) -> dict:
        return {
            "uri": "text:x",
            "split": "text",
            "index": index,
            "files": 1,
            "documents": {"train": 3, "val": 1},
            "bytes": {"train": 300, "val": 100},
            "tokens": {"train": 90, "val": 30},
        }

    described = [store(0), store(1)]
    from kiln.actors.text import text_dataset_summary

    summary = text_dataset_summary("corpus", described)
    assert summary["documents"] == {"train": 6, "val": 2} and summary["bytes"] == 800
    assert summary["tokens"] == {"train": 180, "val": 60}
    assert datasets_table([summary]).row_count == 1
    assert shards_table({"name": "corpus", "shards": described}).row_count == 2
