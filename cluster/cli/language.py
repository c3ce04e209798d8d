"""Language models on the command line: `kiln train --model lm` (its options and run),
`kiln generate`, `kiln models import hf:DIR` (and `kiln export --format hf`, in export.py).

`kiln train` declares the options below in a help panel of their own; a language-model option
given to a tabular model, or a tabular option given to `--model lm`, is one line and exit 2.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from kiln.cli.common import (
    AddressOpt,
    EpochProgress,
    HomeOpt,
    JsonOpt,
    KeyOpt,
    StorageOpt,
    app,
    connected,
    console,
    key_values,
    models_app,
    open_client,
    output,
    preload,
    require_gpu,
)
from kiln.options import LM_TRAIN_OPTIONS
from kiln.settings import Settings
from kiln.training.errors import KilnError

PANEL = "Language models (--model lm)"


def lm_option(text: str) -> Any:
    """An option of the language-model help panel."""
    return typer.Option(help=text, rich_help_panel=PANEL)


LMSizeOpt = Annotated[
    str,
    lm_option("tiny|small|base: about 1M, 10M, 100M parameters."),
]
LMLayersOpt = Annotated[
    int | None,
    lm_option("Transformer blocks (default: the size's)."),
]
LMDimOpt = Annotated[int | None, lm_option("Model width (default: the size's).")]
LMHeadsOpt = Annotated[int | None, lm_option("Attention heads (default: the size's).")]
LMKvHeadsOpt = Annotated[
    int | None,
    lm_option("Key/value heads (grouped-query attention)."),
]
LMBlockSizeOpt = Annotated[
    int | None,
    lm_option("Context length in tokens (default: the size's)."),
]
LMVocabSizeOpt = Annotated[int, lm_option("BPE vocabulary trained on the corpus.")]
LMTokenizerOpt = Annotated[
    str | None,
    lm_option("Reuse this version's tokenizer (NAME@VERSION)."),
]
LMTextFieldOpt = Annotated[
    str | None,
    lm_option("JSONL key or table column holding the text (default: text)."),
]
LMMaxStepsOpt = Annotated[int | None, lm_option("Optimizer steps (default: one pass).")]
LMMaxTokensOpt = Annotated[int | None, lm_option("Training tokens, over all workers.")]
LMMaxMinutesOpt = Annotated[float | None, lm_option("Stop after this much training time.")]
LMEvalEveryOpt = Annotated[
    int | None,
    lm_option("Steps between held-out evaluations (default: 20 a run)."),
]
LMWarmupOpt = Annotated[
    int | None,
    lm_option("Warmup steps (default: 5% of the steps, at most 200)."),
]
LMWeightDecayOpt = Annotated[float, lm_option("AdamW weight decay on matrices.")]
LMGradClipOpt = Annotated[float, lm_option("Global gradient-norm clip; 0: off.")]
LMStrategyOpt = Annotated[
    str,
    lm_option("ddp (whole model per worker) or fsdp (sharded)."),
]
LMPrecisionOpt = Annotated[
    str,
    lm_option("auto|fp32|bf16 (auto: bf16 where the device has it)."),
]
LMPlotOpt = Annotated[
    str | None,
    lm_option("Write the validation perplexity curve to this PNG."),
]

LM_ONLY = LM_TRAIN_OPTIONS
TABULAR_ONLY = (
    "label", "features", "categorical", "missing", "min_category_count", "epochs", "solver",
    "optimizer", "l2", "max_iter", "tol", "hidden", "lr_schedule", "test_fraction", "patience",
    "eval_data", "resume", "bucket_cap_mb", "pca",
)  # fmt: skip
SHARED = (
    "workers",
    "batch_size",
    "lr",
    "grad_accum",
    "seed",
    "gpu",
    "cpus_per_worker",
    "grad_sync",
)


def given_on_command_line(values: dict[str, Any]) -> set[str]:
    """The parameters of the running command that the user typed (not left at defaults)."""
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    context = get_current_context(silent=True)
    if context is None:  # called from Python: every non-default value counts as given
        return set(values)
    return {
        name for name in values if context.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }


def given_lm_options(values: dict[str, Any]) -> list[str]:
    given = given_on_command_line(values)
    return [name for name in LM_ONLY if name in given]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_option_families(values: dict[str, Any]) -> None:
    """One line for an option of the other family (tabular vs language model)."""
    given = given_on_command_line(values)
    if values["model"] != "lm":
        wrong = [n for n in LM_ONLY if n in given]
        raise KilnError(
            f"{flag(wrong[0])} is an option of language models; use it with --model lm "
            f"(got --model {values['model']})."
        )
    wrong = [n for n in TABULAR_ONLY if n in given]
    if wrong:
        raise KilnError(
            f"{flag(wrong[0])} is an option of tabular models; --model lm does not take it "
            "(see the Language models panel of kiln train --help)."
        )


def lm_request(values: dict[str, Any]) -> Any:
    """The `kiln train --model lm` request, checked before Ray starts."""
    from kiln.actors.catalog import NAME_PATTERN
    from kiln.lm_pipeline import LMTrainRequest
    from kiln.training.lm_config import LMTrainConfig

    check_option_families(values)
    given = given_on_command_line(values)
    data = values["data"]
    if not data:
        raise KilnError("Give --data text:URI (or a dataset name). See `kiln train --help`.")
    config = {name: values[name] for name in LM_ONLY if name not in ("text_field", "plot")}
    config.update({name: values[name] for name in SHARED if name in given or name == "workers"})
    config["gpu"], config["grad_sync"] = values["gpu"], values["grad_sync"]
    train = LMTrainConfig(**config)
    name = values["register"] or default_lm_name(data)
    if not NAME_PATTERN.match(name):
        raise KilnError(f'Got "{name}" for --register. Use lowercase letters, digits and "-".')
    val_fraction = values["val_fraction"] if "val_fraction" in given else 0.05
    return LMTrainRequest(
        data=data,
        train=train,
        name=name,
        text_field=values["text_field"],
        val_fraction=val_fraction,
    )


def default_lm_name(data: str) -> str:
    """`<corpus>-lm`: the last plain word of the URI (text:~/corpus/**/*.py -> corpus-lm)."""
    words = [w for w in data.removeprefix("text:").replace("\\", "/").split("/") if w]
    plain = [w for w in words if w.replace("-", "").replace("_", "").isalnum()]
    base = (plain[-1] if plain else "text").lower().replace("_", "-")
    return f"{base[:60]}-lm"


class EvalProgress(EpochProgress):
    """The epoch bar, counting optimizer steps from the evaluations' reports."""

    def evaluation(self, metrics: dict[str, Any]) -> None:
        self.progress.update(
            self.task,
            completed=metrics["step"],
            total=metrics["max_steps"],
            metrics=", ".join(
                f"{k} {metrics[k]:.3g}"
                for k in ("train_loss", "val_perplexity", "tokens_per_s")
                if k in metrics
            ),
        )


def train_language_model(
    settings: Settings, values: dict[str, Any], as_json: bool, started: float
) -> None:
    from kiln.runtime import registry_for

    request = lm_request(values)
    preload("kiln.lm_pipeline", "kiln.training.lm_loop")
    bar = EvalProgress(None, quiet=False)
    with bar.progress, connected(settings):
        from kiln.lm_pipeline import train_lm_and_register

        if request.train.gpu == "on":
            require_gpu()
        registry = registry_for(settings)
        outcome = train_lm_and_register(settings, request, registry, bar.evaluation, bar.step)
        bar.step("shutting down")
    if values["plot"]:
        plot_perplexity(outcome.history, outcome.metrics.get("unigram_perplexity"), values["plot"])
    output(
        {
            "model": outcome.record.name,
            "version": outcome.record.version,
            "metrics": outcome.metrics,
            "num_workers": outcome.num_workers,
            "grad_sync": outcome.grad_sync,
            "run": outcome.run_name,
            "elapsed_s": time.perf_counter() - started,
            "timings_s": bar.timings(),
        },
        as_json,
        key_values(f"kiln train: {outcome.record.ref}"),
    )


def plot_perplexity(history: list[dict[str, Any]], unigram: float | None, path: str) -> None:
    """Validation perplexity against tokens seen, with the unigram model's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["tokens_seen"], h["val_perplexity"]) for h in history if "val_perplexity" in h]
    if not points:
        raise KilnError("no held-out evaluation to plot: the corpus gave no validation tokens")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="validation")
    if unigram:
        ax.axhline(unigram, color="grey", linestyle="--", label=f"unigram model ({unigram:.0f})")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- generate


@app.command()
def generate(
    ref: Annotated[str, typer.Argument(help="A language-model version: NAME, NAME@VERSION.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_tokens: Annotated[int, typer.Option(help="Most new tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest; 0: all.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop before this text; repeat for more.")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Continue a prompt with a language model, offline (KV cache; prints tokens/s)."""
    from kiln.language import generate_text

    with open_client(address, home, storage, key) as client:
        result = generate_text(
            client, ref, prompt, max_tokens, temperature, top_p, top_k, seed, stop
        )
    if as_json:
        output(result, True, lambda r: r)
        return
    print(result["text"], flush=True)
    console.print(
        f"[dim]{result['tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s, "
        f"finish: {result['finish_reason']}[/]"
    )


# ----------------------------------------------------------------------------- import


@models_app.command("import")
def models_import(
    uri: Annotated[str, typer.Argument(help="hf:DIR, a local Hugging Face model folder.")],
    register: Annotated[
        str | None, typer.Option(help="Registry name (default: the folder's name).")
    ] = None,
    name: Annotated[str | None, typer.Option(hidden=True)] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Register a local Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2; safetensors)."""
    from kiln.cli.aliases import renamed
    from kiln.language import import_hf

    register = renamed(register, name, "--register", "--name")
    with open_client(address, home, storage, key) as client:
        record = import_hf(client, uri, register)
    output(
        {"ref": record.ref, "files": sorted(record.artifacts), "metrics": record.metrics},
        as_json,
        lambda r: f"imported {r['ref']} ({', '.join(r['files'])})",
    )
