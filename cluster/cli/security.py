"""`kiln keys new-master`, `kiln keys rotate-master` (encryption at rest) and `kiln evaluate
--attack` (a version's robustness report)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    StorageOpt,
    app,
    console,
    keys_app,
    load_settings,
    output,
)
from kiln.training.errors import KilnError


@keys_app.command("new-master")
def keys_new_master(
    path: Annotated[Path, typer.Argument(help="File to write the new 256-bit key to (0600).")],
) -> None:
    """Write a new random master key for encryption at rest (KILN_MASTER_KEY=FILE)."""
    from kiln.training.encryption import LocalMasterKey, new_master_key_text, parse_key_text

    if path.exists():
        raise KilnError(f'Got "{path}" for PATH, which exists. Give a new file name.')
    text = new_master_key_text()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    key_id = LocalMasterKey(parse_key_text(text.encode())).key_id
    console.print(
        f"wrote master key {key_id} to {path}; keep a copy: without it nothing opens",
        soft_wrap=True,
    )


@keys_app.command("rotate-master")
def keys_rotate_master(
    new_key: Annotated[
        str,
        typer.Option(help="The new master key: a key file, the key in hex, or aws-kms:KEY_ID."),
    ],
    as_json: JsonOpt = False,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Re-wrap every data key under a new master key, without rewriting any data.

    KILN_MASTER_KEY holds the current key. Safe to stop midway: run it again to finish. Then
    set KILN_MASTER_KEY to the new key.
    """
    from kiln.encryption import rotate_master
    from kiln.training.encryption import master_key_from

    settings = load_settings(home=home, storage=storage)
    new = master_key_from(new_key)
    assert new is not None  # typer refuses an empty option value
    with console.status("re-wrapping data keys"):
        done = rotate_master(settings, new)
    output(
        dataclasses.asdict(done),
        as_json,
        lambda r: (
            f"re-wrapped {r['rewrapped']} data keys under {r['new_key_id']} "
            f"({r['already']} were already); set KILN_MASTER_KEY to the new key"
        ),
    )


@app.command("evaluate")
def evaluate(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@N or NAME@ALIAS of a classifier.")],
    attack: Annotated[str, typer.Option(help="fgsm or pgd.")],
    epsilon: Annotated[
        float, typer.Option(help="Largest change to each input, in standardised units (L-inf).")
    ],
    steps: Annotated[int, typer.Option(help="PGD's iterations (ignored by fgsm).")] = 10,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Accuracy under an adversarial attack next to clean accuracy, on the version's test
    split; stored with the version (kiln models compare, the console's model page)."""
    from kiln.robustness import AttackRequest, evaluate_robustness

    request = AttackRequest(attack=attack, epsilon=epsilon, steps=steps)
    settings = load_settings(address=address, home=home, storage=storage)
    report = evaluate_robustness(settings, ref, request)
    output(report, as_json, robustness_lines)


def robustness_lines(report: dict[str, Any]) -> str:
    return (
        f"{report['ref']}: accuracy {report['clean_accuracy']:.4f} clean, "
        f"{report['attacked_accuracy']:.4f} under {report['attack']} "
        f"(epsilon {report['epsilon']:g}) on {report['rows']} test rows"
    )
