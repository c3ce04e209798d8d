"""The long options of the `kiln` commands that the Python client runs as Ray Jobs.

`Kiln.submit_train(epochs=3)` becomes `kiln train --epochs 3` on the cluster; the client
checks each keyword against this table before submitting, so a typo fails on the caller's
machine and not in a job. The table is written out rather than read from the typer app: the
client must not import the CLI (it sits below it), and a test compares the table with the
app's real options, command by command, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations


def flags(spaced: str) -> frozenset[str]:
    return frozenset(spaced.split())


COMMAND_OPTIONS: dict[str, frozenset[str]] = {
    "train": flags(
        "--address --batch-size --bucket-cap-mb --cpus-per-worker --data --epochs --eval-data "
        "--features --gpu --grad-accum --hidden --home "
        "--json --l2 --label --lr --lr-schedule --max-iter --model --optimizer --patience "
        "--register --resume --seed --solver --storage --test-fraction --tol --val-fraction "
        "--workers"
    ),
    "tune": flags(
        "--address --base-batch-size --batch-size --data --depth --epochs --eval-data "
        "--features --grid-points --hidden --hidden-width --home --json --l2 --label --lr "
        "--metric --model --no-refit --optimizer --refit --register --resume --scheduler "
        "--search --seed --solver --space --storage --test-fraction --trials --val-fraction "
        "--workers-per-trial"
    ),
    "serve": flags(
        "--access-log --address --auth --batch-wait-timeout-s --emit-config --home --host "
        "--key --max-batch-size --max-replicas --min-replicas --no-access-log --no-auth "
        "--num-cpus --num-gpus --num-replicas --port --rate-burst --rate-limit --storage "
        "--target-ongoing-requests"
    ),
}
"""`kiln COMMAND` -> its long options, `--no-X` forms included (tests/cluster/test_options.py)."""
