"""The long options of the `kiln` commands that the Python client runs as Ray Jobs.

`Kiln.submit_train(epochs=3)` becomes `kiln train --epochs 3` on the cluster; the client
checks each keyword against these sets before submitting, so a typo fails on the caller's
machine and not in a job. `train` and `tune` options come from the signatures of
`TrainRequest.from_options` and `SweepRequest.from_options`, which the CLI commands call with
their options, plus the session options every command has. `serve` is written out (its flags
are not ServeArgs' field names). The client must not import the CLI (it sits below it); a test
compares these sets with the app's real options, command by command.
"""

from __future__ import annotations

from kiln.requests import SweepRequest, TrainRequest, option_names


def flags(spaced: str) -> frozenset[str]:
    return frozenset(spaced.split())


def request_flags(names: list[str], negatable: tuple[str, ...] = ()) -> frozenset[str]:
    """Python option names -> their `--kebab-case` flags (and `--no-X` for a bool switch)."""
    found = {"--" + n.replace("_", "-") for n in names}
    return frozenset(found | {"--no-" + n.replace("_", "-") for n in negatable})


LM_TRAIN_OPTIONS = (
    "size", "layers", "dim", "heads", "kv_heads", "block_size", "vocab_size", "tokenizer",
    "text_field", "max_steps", "max_tokens", "max_minutes", "eval_every", "warmup_steps",
    "weight_decay", "grad_clip", "strategy", "precision", "plot",
)  # fmt: skip
"""`kiln train --model lm`'s own options (cluster/cli/language.py declares them)."""

SESSION = flags("--address --home --storage --json --resume")
"""Options of `kiln train` and `kiln tune` that pick the cluster and the output, not the run."""

COMMAND_OPTIONS: dict[str, frozenset[str]] = {
    "train": SESSION
    | request_flags(option_names(TrainRequest.from_options))
    | request_flags(list(LM_TRAIN_OPTIONS)),
    "tune": SESSION | request_flags(option_names(SweepRequest.from_options), negatable=("refit",)),
    "serve": flags(
        "--access-log --address --auth --backend --batch-wait-timeout-s --emit-config --home "
        "--host --key --max-batch-size --max-replicas --min-replicas --no-access-log --no-auth "
        "--num-cpus --num-gpus --num-replicas --port --rate-burst --rate-limit --storage "
        "--target-ongoing-requests --log-sample --log-retention-days"
        " --lm-max-batch --kv-cache-tokens --max-waiting --json"
        " --log-mask --log-drop --log-mask-text --no-log-mask-text"
        " --tls-cert --tls-key --tls-ca --tls-self-signed --grpc-port --ingress"
        # the SLO choice
        " --slo-p99-ms --min-accuracy --target-rps --http-overhead-ms --dry-run --no-dry-run"
    ),
    "compress": flags(
        "--address --home --storage --json --quantize --prune --finetune-epochs --distill "
        "--no-distill --student --temperature --alpha --epochs --data --workers --register "
        "--register-as"
    ),
    "federate": flags(
        "--address --home --storage --json --data --clients --partition --min-partition-size "
        "--rounds --fraction --min-clients --local-epochs --batch-size --lr --optimizer --model "
        "--hidden --strategy --secure-agg --no-secure-agg --dp-clip --dp-noise --dp-delta "
        "--round-timeout-s --test-fraction --label --seed --register --name --resume"
    ),
}
"""`kiln COMMAND` -> its long options, `--no-X` forms included (tests/cluster/test_options.py)."""
