"""`kiln compress --quantize int8` of a language model on real Ray: a tiny LM trained on the
standard library's `json/*.py` is quantised, its held-out text reloaded from its lineage into
TextShardStores and tokenised with its own tokenizer, and the int8 version registered with the
perplexity change in its lineage, every tokenizer file, smaller files, and tokens to generate.
The refusals (--prune/--distill, no corpus) are checked against catalog rows, without Ray."""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path
from typing import Any, cast

import pytest
from safetensors.torch import load as load_safetensors

from kiln.actors.catalog import VersionRecord
from kiln.actors.registry import read_verified_files
from kiln.serving.variants import compare_rows
from kiln.training.artifacts import WEIGHTS_FILE, model_from_files
from kiln.training.errors import KilnError
from kiln.training.lm import lm_spec
from kiln.variants import CompressRequest, compress_and_register

CORPUS = f"text:{Path(sysconfig.get_paths()['stdlib'])}/json/*.py"


@pytest.fixture(scope="module")
def trained_lm(ray_local, settings_session, registry_session):
    """`kiln train --model lm` in-process: 2 workers, a 384-token BPE, 40 steps."""
    from kiln.lm_pipeline import LMTrainRequest, train_lm_and_register
    from kiln.training.lm_config import LMTrainConfig

    cfg = LMTrainConfig(
        workers=2, vocab_size=384, block_size=32, layers=2, dim=64, batch_size=8, max_steps=40
    )
    request = LMTrainRequest(data=CORPUS, train=cfg, name="json-lm-compress")
    return train_lm_and_register(settings_session, request, registry_session).record


@pytest.mark.slow  # about a minute: the training run
def test_int8_language_model_records_its_perplexity_change_and_generates(
    trained_lm, settings_session, registry_session
):
    from kiln.training.generate import generate
    from kiln.training.tokenizer import tokenizer_from_bytes

    request = CompressRequest(ref=trained_lm.ref, quantize="int8")
    done = compress_and_register(settings_session, request, registry_session)
    record = done.record
    assert (record.name, record.version) == (trained_lm.name, trained_lm.version + 1)
    assert record.lineage["parent"] == trained_lm.ref
    assert record.lineage["dataset_uri"] == CORPUS
    (step,) = record.lineage["compression"]
    assert step["method"] == "dynamic-int8" and step["eval_split"] == "val"
    assert abs(step["perplexity_change"]) < 0.02
    # The windows are the ones the parent's final evaluation scored: the same perplexity.
    assert step["perplexity_before"] == pytest.approx(trained_lm.metrics["perplexity"], rel=1e-3)
    assert record.metrics["perplexity"] == step["perplexity_after"]
    assert record.metrics["generate_tokens_per_s"] > 0

    files = read_verified_files(settings_session.storage_uri, record)
    parent_files = read_verified_files(settings_session.storage_uri, trained_lm)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert files[name] == parent_files[name]
    weights = load_safetensors(files[WEIGHTS_FILE])
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype.itemsize == 1

    # `kiln models compare` shows the int8 row with fewer bytes.
    versions = [r.to_dict() for r in (trained_lm, record)]
    rows = {r["ref"]: r for r in compare_rows(versions, [], settings_session.storage_uri)}
    assert rows[record.ref]["artifact_bytes"] < rows[trained_lm.ref]["artifact_bytes"]
    assert rows[record.ref]["metric"] == "perplexity"
    assert rows[record.ref]["compression"] == "dynamic-int8"

    # The new version generates.
    model, spec = cast(tuple[Any, dict], model_from_files(files))
    tokenizer = tokenizer_from_bytes(files["tokenizer.json"])
    prompt = spec["kiln_prompt_prefix"] + tokenizer.encode("def ").ids
    assert len(generate(model, spec, prompt, 12, stop_ids=[]).token_ids) == 12

    # Quantising the int8 version again is refused, before any text loads.
    again = CompressRequest(ref=record.ref, quantize="int8")
    with pytest.raises(KilnError, match="already quantised"):
        compress_and_register(settings_session, again, registry_session)


def lm_record(lineage: dict) -> VersionRecord:
    return VersionRecord(
        name="some-lm",
        version=1,
        created_at=time.time(),
        creator="test",
        spec=lm_spec("tiny", vocab_size=300, block_size=32),
        metrics={},
        lineage=lineage,
        artifacts={},
    )


@pytest.mark.parametrize(
    ("options", "lineage", "message"),
    [
        ({"prune": 0.5}, {"dataset_uri": CORPUS}, "--prune and --distill are for tabular models"),
        (
            {"distill": True, "student": "mlp:8"},
            {"dataset_uri": CORPUS},
            "are for tabular models",
        ),
        ({"quantize": "int8"}, {"dataset_uri": None}, "pass --data text:"),
        ({"quantize": "int8", "data": "sklearn:digits"}, {}, "scored on text"),
    ],
)
def test_a_language_model_request_is_refused_before_any_data_loads(options, lineage, message):
    request = CompressRequest(ref="some-lm@1", **options)
    with pytest.raises(KilnError, match=message):
        request.check_against(lm_record(lineage))


def test_an_imported_model_takes_its_text_from_data():
    request = CompressRequest(ref="some-lm@1", quantize="int8", data=CORPUS)
    request.check_against(lm_record({"dataset_uri": None}))  # accepted
