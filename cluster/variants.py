"""`kiln compress`: a registered version made smaller and faster, registered as a new version.

Reads as its steps: resolve the version and check the request against its spec (before any
data loads), bring its dataset back into ShardStore actors from its lineage (same source,
split seed and fractions, so the test rows are the ones its metrics came from), then distil →
prune → quantise, as asked, evaluating after each step, and register the result with every
step in `lineage.compression` and the exact `name@N` it came from in `lineage.parent`.

Distillation and the fine-tuning after pruning run through Ray Train over the shards, as
`kiln train` does; each worker loads the teacher from the registry itself (`compress_loop`).

A language model takes its own path (`compress_lm_and_register`): its `text:` corpus back in
TextShardStores (same val_fraction and seed, as many stores as it trained with workers),
tokenised in the stores with the version's own tokenizer.json, the held-out windows its final
evaluation scored (`lm_held_out_windows`), then the int8 model scored on those windows beside
the fp32 one, and registered with every tokenizer file of its parent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, cast

import ray
from safetensors.torch import save as save_safetensors

from kiln.actors.catalog import VersionRecord, validate_name
from kiln.actors.lineage import code_version
from kiln.actors.registry import read_verified_files
from kiln.actors.shards import Dataset, attach_dataset, load_dataset, looks_like_dataset_name
from kiln.actors.sources import SourceSpec
from kiln.pipeline import (
    ProgressFn,
    StepFn,
    evaluate_on,
    fit,
    load_best_model,
    load_eval_set,
    register_model,
)
from kiln.references import reference_files
from kiln.requests import unique_name
from kiln.settings import Settings
from kiln.training.artifacts import model_from_files, model_to_files
from kiln.training.checkpoints import state_tensors
from kiln.training.compress import (
    check_distillation,
    check_fraction,
    count_parameters,
    is_quantized,
    parse_student,
    prune_model,
    quantize_model,
    student_spec,
)
from kiln.training.config import TrainConfig
from kiln.training.errors import KilnError
from kiln.training.loop import train_func
from kiln.training.models import KilnModel

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)
LM_LINEAGE_FIELDS = ("dataset_uri", "dataset_name", "tokenizer_source", "train_config", "source")
"""What an int8 language model inherits of its parent's lineage: the same corpus, tokenizer
and training (the weights are the parent's, rounded)."""
LM_METRIC_FIELDS = ("parameters", "context_length", "chat_template", "unigram_perplexity")
DEFAULT_LM_VAL_FRACTION = 0.05
"""`kiln train --model lm`'s --val-fraction default (its lineage does not record the value)."""
DEFAULT_LM_EVAL_TOKENS = 65_536
MAX_IMPORTED_EVAL_BLOCK = 1024
"""Window of a model Kiln did not train (no training evaluation to repeat): long enough for
perplexity to mean something, short enough for a small --data corpus to fill."""
LINEAGE_DATA_FIELDS = (
    "dataset_uri",
    "dataset_sha256",
    "dataset_name",
    "schema",
    "test_fraction",
    "val_fraction",
    "split_seed",
    "eval_data",
    "code_version",
)


@dataclass(kw_only=True)
class CompressRequest:
    """One `kiln compress`; every field is the option of the same name."""

    ref: str
    quantize: str | None = None
    prune: float | None = None
    finetune_epochs: int = 5
    distill: bool = False
    student: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    epochs: int | None = None
    """Distillation epochs (None: the teacher's, else kiln train's plan)."""
    data: str | None = None
    workers: int = 2
    register_as: str | None = None
    seed: int = 0
    student_hidden: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.student is not None and not self.distill:
            raise KilnError(f'Got --student "{self.student}" without --distill. Add --distill.')
        if self.quantize is None and self.prune is None and not self.distill:
            raise KilnError(
                "Nothing to do: give --quantize int8, --prune FRACTION, or --distill --student "
                "mlp:64 (they combine)."
            )
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise KilnError(f'Got "{self.quantize}" for --quantize. Choose one of: int8.')
        if self.prune is not None:
            check_fraction(self.prune)
        if self.distill:
            if self.student is None:
                raise KilnError("--distill needs a student: add --student mlp:64 (or mlp:128,64).")
            self.student_hidden = parse_student(self.student)
            check_distillation(self.temperature, self.alpha)
        for option, value in (
            ("--finetune-epochs", self.finetune_epochs),
            ("--workers", self.workers - 1),
            ("--epochs", 1 if self.epochs is None else self.epochs - 1),
        ):
            if value < 0:
                raise KilnError(
                    f'Got "{value if option == "--finetune-epochs" else value + 1}" for {option}. '
                    f"{option} must be at least {0 if option == '--finetune-epochs' else 1}."
                )
        if self.register_as is not None:
            validate_name(self.register_as)

    @property
    def trains(self) -> bool:
        """Whether a step runs Ray Train (and so needs the training shards)."""
        return self.distill or (self.prune is not None and self.finetune_epochs > 0)

    def check_against(self, record: VersionRecord) -> None:
        """What the version's spec rules out, said before any data loads."""
        spec = record.spec
        if spec.get("kind") == "lm":
            self.check_language_model(record)
        if self.quantize and is_quantized(spec):
            raise KilnError(
                "this version is already quantised (int8): quantising it twice would only lose "
                "accuracy. Quantise its fp32 parent (lineage.parent) instead."
            )
        if self.prune is not None and not self.distill:
            if is_quantized(spec):
                raise KilnError("this version is quantised (int8); prune its fp32 parent instead")
            if spec["kind"] in ("linear", "ridge", "logistic"):
                raise KilnError(
                    f"--prune removes hidden units, and a {spec['kind']} model has none: nothing "
                    "to prune. Distil it into an MLP (--distill --student mlp:64) or quantise it."
                )

    def check_language_model(self, record: VersionRecord) -> None:
        """A language model is quantised only, and needs text to score it on."""
        if self.prune is not None or self.distill:
            raise KilnError(
                f"--prune and --distill are for tabular models; {record.ref} is a language "
                "model: compress it with --quantize int8."
            )
        if is_quantized(record.spec):
            return  # said below, as for any model
        if self.data is not None:
            if not (self.data.startswith("text:") or looks_like_dataset_name(self.data)):
                raise KilnError(
                    f'Got "{self.data}" for --data. A language model is scored on text: give a '
                    "text: URI (text:~/corpus/**/*.py) or a dataset loaded with kiln data load."
                )
        elif not (record.lineage.get("dataset_uri") or record.lineage.get("dataset_name")):
            raise no_corpus_error(record)


@dataclass
class Compressed:
    record: VersionRecord
    parent: VersionRecord
    steps: list[dict[str, Any]]
    metrics: dict[str, Any]
    parent_metrics: dict[str, Any]
    parameters: int
    parent_parameters: int
    elapsed_s: float = 0.0


# ----------------------------------------------------------------------------- data


def lineage_source(record: VersionRecord, data: str | None = None) -> SourceSpec:
    """The SourceSpec that reads a version's training data again: its columns (from the schema
    in its lineage), split seed and fractions; `data` replaces the URI."""
    lineage = record.lineage
    uri = data or lineage.get("dataset_uri")
    if not uri:
        raise KilnError(
            f"{record.ref} records no dataset in its lineage; give the data with --data URI"
        )
    schema = lineage.get("schema") or {}
    inputs = schema.get("inputs") or []
    categorical = tuple(i["name"] for i in inputs if i.get("kind") == "categorical")
    return SourceSpec(
        uri=uri,
        label=(schema.get("label") or {}).get("name"),
        features=tuple(i["name"] for i in inputs) or None,
        categorical=categorical or None,
        test_fraction=0.0 if lineage.get("eval_data") else float(lineage.get("test_fraction", 0.2)),
        val_fraction=float(lineage.get("val_fraction") or 0.0),
        seed=int(lineage.get("split_seed") or 0),
    )


def lineage_data(
    settings: Settings | None, record: VersionRecord, data: str | None = None, workers: int = 1
) -> Dataset:
    """The version's dataset resident again: the named dataset it was trained on if that is
    still loaded, else its source re-read with the same split (`data` replaces the source).
    `test` holds the rows its metrics came from (its --eval-data, if it had one)."""
    del settings  # the shards are found through Ray; kept for a uniform signature
    name = data if data is not None else record.lineage.get("dataset_name")
    if name and looks_like_dataset_name(name):
        attached = attach_dataset(name)
        if attached is not None:
            return attached
        if data is not None:
            raise KilnError(f'Got "{data}" for --data: no dataset of that name is loaded.')
    source = lineage_source(record, data if data and not looks_like_dataset_name(data) else None)
    loaded = load_dataset(source, workers)
    eval_data = record.lineage.get("eval_data")
    if eval_data and data is None:
        evaluated_on = load_eval_set(eval_data, loaded.train)
        assert evaluated_on is not None  # eval_data is set
        loaded.test.release()
        loaded = replace(loaded, test=evaluated_on)
    return loaded


# ----------------------------------------------------------------------------- training


def compress_loop(config: dict[str, Any]) -> None:
    """The Train worker of a distillation or fine-tuning: load the teacher (if any) from the
    registry on this worker, then run the ordinary loop."""
    config = dict(config)
    teacher_of = config.pop("teacher_of", None)
    teacher = None
    if teacher_of is not None:
        files = read_verified_files(teacher_of["storage_uri"], teacher_of["record"])
        teacher, _ = model_from_files(files)
    train_func(config, teacher=teacher)


def step_config(request: CompressRequest, teacher: VersionRecord, **changes: Any) -> TrainConfig:
    """The Train settings of a compression step: the teacher's batch size, optimiser and seed
    (where it trained with minibatches), kiln train's defaults otherwise."""
    base = teacher.lineage.get("train_config") or {}
    keep = {k: base[k] for k in ("batch_size", "optimizer", "lr", "seed") if k in base}
    if base.get("solver") in ("exact", "lbfgs"):
        keep.pop("lr", None)
    cfg = TrainConfig(model="mlp", workers=request.workers, gpu="off", l2=0.0, patience=0, **keep)
    return dataclasses.replace(cfg, **changes)


def run_training(
    cfg: TrainConfig,
    spec: dict[str, Any],
    data: Dataset,
    settings: Settings,
    extra: dict[str, Any],
    on_epoch: ProgressFn | None,
) -> tuple[KilnModel, int]:
    """Ray Train over the shards with `compress_loop`; the best weights and epochs run."""
    run_name = unique_name("compress")
    result, history = fit(
        cfg, spec, data, settings, run_name, on_epoch, extra_loop_config=extra, loop=compress_loop
    )
    return load_best_model(result.checkpoint, spec), len(history)


# ----------------------------------------------------------------------------- the steps


def distil_step(
    request: CompressRequest,
    teacher: VersionRecord,
    spec: dict[str, Any],
    data: Dataset,
    settings: Settings,
    on_epoch: ProgressFn | None,
) -> tuple[KilnModel, dict[str, Any], dict[str, Any]]:
    student = student_spec(spec, request.student_hidden)
    epochs = request.epochs or (teacher.lineage.get("train_config") or {}).get("epochs")
    cfg = step_config(request, teacher, hidden=request.student_hidden, epochs=epochs)
    cfg = cfg.planned(-(-data.train.num_rows // cfg.workers))
    extra = {
        "distill": {"temperature": request.temperature, "alpha": request.alpha},
        "teacher_of": {"record": teacher, "storage_uri": settings.storage_uri},
    }
    model, epochs_run = run_training(cfg, student, data, settings, extra, on_epoch)
    step = {
        "method": "distill",
        "student": request.student,
        "temperature": request.temperature,
        "alpha": request.alpha,
        "epochs": epochs_run,
        "teacher": teacher.ref,
        "train_config": cfg.to_dict(),
    }
    return model, student, step


def prune_step(
    request: CompressRequest,
    teacher: VersionRecord,
    model: KilnModel,
    spec: dict[str, Any],
    data: Dataset,
    settings: Settings,
    on_epoch: ProgressFn | None,
) -> tuple[KilnModel, dict[str, Any], dict[str, Any]]:
    assert request.prune is not None
    before = body_shape(spec)
    pruned, pruned_spec = prune_model(model, spec, request.prune)
    step: dict[str, Any] = {
        "method": "prune",
        "fraction": request.prune,
        "criterion": "weight norm (in × out) per hidden unit / channel",
        "from": before,
        "to": body_shape(pruned_spec),
        "finetune_epochs": request.finetune_epochs,
    }
    if request.finetune_epochs > 0:
        cfg = step_config(
            request,
            teacher,
            hidden=pruned_spec.get("hidden", [1]),
            epochs=request.finetune_epochs,
            model="mlp" if pruned_spec["kind"] == "mlp" else "cnn",
        )
        init = save_safetensors(state_tensors(pruned))
        pruned, _ = run_training(cfg, pruned_spec, data, settings, {"init_weights": init}, on_epoch)
        step["train_config"] = cfg.to_dict()
    return pruned, pruned_spec, step


def body_shape(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "cnn":
        return {"channels": list(spec.get("channels", [32, 64]))}
    return {"hidden": list(spec.get("hidden", []))}


def compress_and_register(
    settings: Settings,
    request: CompressRequest,
    registry: Any,
    on_epoch: ProgressFn | None = None,
    on_step: StepFn | None = None,
) -> Compressed:
    """The whole of `kiln compress` (see the module docstring)."""
    started = time.perf_counter()
    step_to = on_step or (lambda _: None)
    parent: VersionRecord = ray.get(registry.resolve.remote(request.ref))
    request.check_against(parent)
    if parent.spec.get("kind") == "lm":
        return compress_lm_and_register(settings, request, registry, parent, step_to)
    model, spec = model_from_files(read_verified_files(settings.storage_uri, parent))
    parent_parameters = count_parameters(model)
    step_to("loading shards")
    data = lineage_data(settings, parent, request.data, request.workers if request.trains else 1)
    steps: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    try:
        if request.distill:
            step_to("distilling")
            model, spec, step = distil_step(request, parent, spec, data, settings, on_epoch)
            metrics = evaluated(steps, step, model, spec, data)
        if request.prune is not None:
            step_to("pruning")
            model, spec, step = prune_step(request, parent, model, spec, data, settings, on_epoch)
            metrics = evaluated(steps, step, model, spec, data)
        if request.quantize:
            step_to("quantising")
            model, spec = quantize_model(model, spec)
            step = {"method": spec["quantization"]["method"], **spec["quantization"]}
            metrics = evaluated(steps, step, model, spec, data)
        step_to("registering")
        lineage = variant_lineage(parent, steps, data)
        name = request.register_as or parent.name
        extra = reference_files(data.train, model, spec)  # drift monitoring
        record = register_model(registry, name, model, spec, metrics, lineage, extra)
    finally:
        data.release()
    return Compressed(
        record=record,
        parent=parent,
        steps=steps,
        metrics=metrics,
        parent_metrics=parent.metrics,
        parameters=count_parameters(model),
        parent_parameters=parent_parameters,
        elapsed_s=time.perf_counter() - started,
    )


def evaluated(
    steps: list[dict[str, Any]],
    step: dict[str, Any],
    model: KilnModel,
    spec: dict[str, Any],
    data: Dataset,
) -> dict[str, Any]:
    """Append the step, with the parameters and test accuracy (or R²) of the model it made, to
    `steps`; returns that model's test metrics."""
    found = evaluate_on(model, spec, data.test)
    headline = {f"test_{k}": found[k] for k in ("accuracy", "r2") if k in found}
    steps.append({**step, "parameters": count_parameters(model), **headline})
    return found


def variant_lineage(
    parent: VersionRecord, steps: list[dict[str, Any]], data: Dataset
) -> dict[str, Any]:
    """The parent's data lineage (the variant was tested on the same rows), the parent's exact
    ref, and every compression step."""
    inherited = {k: parent.lineage.get(k) for k in LINEAGE_DATA_FIELDS}
    return {
        **inherited,
        "code_version": code_version(),
        "parent": parent.ref,
        "compression": steps,
        "train_rows": data.train.num_rows,
        "test_rows": data.test.num_rows,
        "train_config": next(
            (s["train_config"] for s in reversed(steps) if "train_config" in s), {}
        ),
    }


# ----------------------------------------------------------------------------- language models


@dataclass(frozen=True)
class HeldOutText:
    """Where a language model's held-out text comes from and how its windows are cut."""

    data: str
    """A `text:` URI or the name of a loaded text dataset."""
    val_fraction: float
    seed: int
    workers: int
    """Stores to load, and the ranks whose evaluation windows are repeated."""
    block_size: int
    eval_tokens: int
    trained_on: bool
    """Whether the model trained on this corpus (else all of it is new to the model)."""


def no_corpus_error(record: VersionRecord) -> KilnError:
    return KilnError(
        f"{record.ref} records no text corpus (an imported model) to measure the int8 model's "
        "perplexity on: pass --data text:PATH."
    )


def held_out_text(parent: VersionRecord, data: str | None) -> HeldOutText:
    """The corpus and split a version's final evaluation read (`--data` replaces the corpus)."""
    from kiln.training.lm import context_length

    lineage = parent.lineage
    config = lineage.get("train_config") or {}
    recorded = lineage.get("dataset_uri") or lineage.get("dataset_name")
    source = data or recorded
    if not source:
        raise no_corpus_error(parent)
    context = context_length(parent.spec)
    return HeldOutText(
        data=source,
        val_fraction=float(lineage.get("val_fraction") or DEFAULT_LM_VAL_FRACTION),
        seed=int(config.get("seed") or 0),
        workers=max(1, int(config.get("workers") or 1)),
        block_size=context if config else min(context, MAX_IMPORTED_EVAL_BLOCK),
        eval_tokens=int(config.get("eval_tokens") or DEFAULT_LM_EVAL_TOKENS),
        trained_on=bool(config) and source == recorded,
    )


def load_held_out_text(held_out: HeldOutText) -> Any:
    """The corpus in TextShardStores: a named dataset, or the URI loaded with the version's
    split (documents go to the validation split by a seeded hash of their text)."""
    from kiln.actors.text import TextSourceSpec, attach_text_dataset, load_text_dataset

    if looks_like_dataset_name(held_out.data):
        found = attach_text_dataset(held_out.data)
        if found is None:
            raise KilnError(
                f'No text dataset named "{held_out.data}" is loaded: load it with kiln data '
                f"load, or pass --data text:PATH."
            )
        return found
    source = TextSourceSpec(
        uri=held_out.data, val_fraction=held_out.val_fraction, seed=held_out.seed
    )
    return load_text_dataset(source, held_out.workers)


def lm_held_out_windows(dataset: Any, held_out: HeldOutText) -> tuple[Any, str]:
    """The (N, block + 1) windows to score, and their split: the union of what every rank of
    the version's training evaluated (training/lm_loop.py cuts them so), or, for a model that
    never saw this corpus, the training documents too when the validation ones hold none."""
    import numpy as np

    from kiln.training.lm_loop import fetch_streams, my_shards, validation_batches

    world, block = held_out.workers, held_out.block_size
    for split in ("val", "train"):
        windows = []
        for rank in range(world):
            shards, shared = my_shards(dataset.handles, rank, world)
            per_rank = max(1, held_out.eval_tokens // block // (1 if shared else world))
            streams = fetch_streams(shards, split)
            windows += validation_batches(streams, block, per_rank, rank, world, shared)
        if windows:
            return np.concatenate(windows), split
        if held_out.trained_on:
            break  # its training documents would flatter it
    raise KilnError(
        f"The held-out text of {held_out.data} has no window of {block + 1} tokens to score "
        "perplexity on: pass --data text:PATH with more text."
    )


def compress_lm_and_register(
    settings: Settings,
    request: CompressRequest,
    registry: Any,
    parent: VersionRecord,
    step_to: StepFn,
) -> Compressed:
    """`kiln compress --quantize int8` of a language model (see the module docstring)."""
    from kiln.actors.text import tokenize_dataset
    from kiln.language import TOKENIZER_FILE, generation_speed
    from kiln.training.lm import num_parameters
    from kiln.training.lm_compress import perplexity_of, perplexity_step, quantize_lm

    started = time.perf_counter()
    files = read_verified_files(settings.storage_uri, parent)
    if TOKENIZER_FILE not in files:
        raise KilnError(f"{parent.ref} has no tokenizer.json: its held-out text cannot be scored")
    model, spec = cast(tuple[Any, dict[str, Any]], model_from_files(files))  # a CausalLM
    held_out = held_out_text(parent, request.data)
    step_to("loading text")
    dataset = load_held_out_text(held_out)
    try:
        step_to("tokenising in the shards")
        tokenize_dataset(dataset, files[TOKENIZER_FILE])
        windows, split = lm_held_out_windows(dataset, held_out)
    finally:
        dataset.release()
    step_to("quantising")
    quantized, new_spec = quantize_lm(model, spec)
    step_to(f"scoring {len(windows)} held-out windows")
    before, after = perplexity_of(model, windows), perplexity_of(quantized, windows)
    quantization = new_spec["quantization"]
    step = {
        **{k: v for k, v in quantization.items() if k != "layers"},
        "int8_layers": len(quantization["layers"]),
        "parameters": num_parameters(spec),
        **perplexity_step(before, after, windows),
        "eval_data": held_out.data,
        "eval_split": split,
        "generate_tokens_per_s_before": generation_speed(model, spec),
        "generate_tokens_per_s_after": generation_speed(quantized, new_spec),
    }
    step_to("registering")
    new_files = {**files, **model_to_files(cast(Any, quantized), new_spec)}  # tokenizer files kept
    metrics = lm_variant_metrics(parent.metrics, step)
    lineage = {
        **{k: parent.lineage.get(k) for k in LM_LINEAGE_FIELDS if k in parent.lineage},
        "code_version": code_version(),
        "parent": parent.ref,
        "compression": [step],
    }
    record: VersionRecord = ray.get(
        registry.register.remote(
            request.register_as or parent.name,
            new_files,
            new_spec,
            metrics,
            lineage,
            request_id=uuid.uuid4().hex,
        )
    )
    return Compressed(
        record=record,
        parent=parent,
        steps=[step],
        metrics=metrics,
        parent_metrics=parent.metrics,
        parameters=step["parameters"],
        parent_parameters=step["parameters"],
        elapsed_s=time.perf_counter() - started,
    )


def lm_variant_metrics(parent_metrics: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """The int8 model's own held-out perplexity and decode speed, and what it shares with its
    parent (size, context, the unigram floor); nothing of the parent's training run."""
    after = float(step["perplexity_after"])
    return {
        **{k: parent_metrics[k] for k in LM_METRIC_FIELDS if k in parent_metrics},
        "perplexity": after,
        "val_loss": math.log(after),
        "perplexity_change": step["perplexity_change"],
        "generate_tokens_per_s": step["generate_tokens_per_s_after"],
    }
