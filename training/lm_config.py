"""What a language-model run is told: the model's shape, its length and its optimiser.

Validated once on the driver (`LMTrainConfig.__post_init__`), with messages that name the
`kiln train --model lm` option to change; the Train workers parse the same dataclass first.
The run's length is planned here too (`plan_steps`): `--max-steps`, `--max-tokens`, or by
default one pass over the training tokens; `--max-minutes` caps any of them by time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from kiln.training.config import GPU_MODES, GRAD_SYNCS, require_choice
from kiln.training.errors import KilnError

SIZES = ("tiny", "small", "base")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_BATCH = {"tiny": 16, "small": 8, "base": 4}
"""Sequences per micro-batch per worker when --batch-size is not given."""
DEFAULT_LR = {"tiny": 3e-3, "small": 1e-3, "base": 6e-4}
"""Peak learning rates for AdamW at the presets' widths (nanoGPT-like scales: smaller models
take larger steps)."""
EVALS_PER_RUN = 20
"""Held-out evaluations over a run when --eval-every is not given."""


def _require(ok: bool, option: str, value: Any, rule: str) -> None:
    if not ok:
        raise KilnError(f'Got "{value}" for {option}. {option} must be {rule}.')


@dataclass(kw_only=True)
class LMTrainConfig:
    """`kiln train --model lm`: every field is the option of the same name."""

    size: str = "tiny"
    """Preset shape: tiny (~1M parameters), small (~10M), base (~100M)."""
    layers: int | None = None
    dim: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    block_size: int | None = None
    """Context length in tokens (default: the preset's)."""
    vocab_size: int = 8192
    """BPE vocabulary trained on the corpus (ignored with --tokenizer)."""
    tokenizer: str | None = None
    """A registered version (NAME@VERSION) whose tokenizer.json to reuse."""
    workers: int = 2
    batch_size: int | None = None
    """Sequences per micro-batch on each worker (default per --size)."""
    grad_accum: int = 1
    lr: float | None = None
    """Peak learning rate of AdamW (default per --size); warmup then cosine to a tenth."""
    warmup_steps: int | None = None
    """Linear warmup (default: 5% of the steps, at most 200)."""
    weight_decay: float = 0.1
    """AdamW's decoupled decay on matrices (norms and embeddings' biases excluded)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    max_steps: int | None = None
    max_tokens: int | None = None
    """Training tokens to see in all (across workers)."""
    max_minutes: float | None = None
    """Stop after this much training time; the schedule is planned from the first steps'
    speed."""
    eval_every: int | None = None
    """Steps between held-out evaluations (default: 20 per run)."""
    eval_tokens: int = 65_536
    """Held-out tokens each evaluation reads (across workers)."""
    seed: int = 0
    gpu: str = "auto"
    precision: str = "auto"
    """auto: bf16 autocast where the device computes it natively (CUDA with bf16, CPUs with
    AVX-512 BF16 or AMX), else fp32."""
    strategy: str = "ddp"
    """ddp: every worker holds the whole model (gradients averaged in shared memory on one
    CPU node, DDP otherwise); fsdp: parameters sharded across workers (torch FSDP)."""
    grad_sync: str = "auto"
    cpus_per_worker: int | None = None

    def __post_init__(self) -> None:
        require_choice(self.size, SIZES, "--size")
        require_choice(self.gpu, GPU_MODES, "--gpu")
        require_choice(self.precision, PRECISIONS, "--precision")
        require_choice(self.strategy, STRATEGIES, "--strategy")
        require_choice(self.grad_sync, GRAD_SYNCS, "--grad-sync")
        for option, value in (
            ("--workers", self.workers),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--max-steps", self.max_steps),
            ("--max-tokens", self.max_tokens),
            ("--eval-every", self.eval_every),
            ("--eval-tokens", self.eval_tokens),
            ("--cpus-per-worker", self.cpus_per_worker),
            ("--warmup-steps", None if self.warmup_steps is None else self.warmup_steps + 1),
        ):
            _require(value is None or value >= 1, option, value, "at least 1")
        _require(self.lr is None or 0 < self.lr < 1, "--lr", self.lr, "in (0, 1), e.g. 1e-3")
        _require(self.weight_decay >= 0, "--weight-decay", self.weight_decay, "0 or more")
        _require(self.grad_clip >= 0, "--grad-clip", self.grad_clip, "0 (off) or more")
        _require(
            self.max_minutes is None or self.max_minutes > 0,
            "--max-minutes",
            self.max_minutes,
            "greater than 0",
        )
        if self.max_steps and self.max_tokens:
            raise KilnError("Give one of --max-steps and --max-tokens (--max-minutes may join).")
        if self.strategy == "fsdp" and self.workers < 2:
            raise KilnError("--strategy fsdp shards the model across workers: use --workers 2+.")

    @property
    def micro_batch(self) -> int:
        return self.batch_size or DEFAULT_BATCH[self.size]

    @property
    def peak_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.size]

    def tokens_per_step(self, block_size: int) -> int:
        """Tokens one optimizer step trains on, over every worker."""
        return self.workers * self.micro_batch * self.grad_accum * block_size

    def plan_steps(self, train_tokens: int, block_size: int) -> int:
        """Optimizer steps of the run: --max-steps, --max-tokens over the tokens per step, or
        one pass over the training tokens (at least one step). --max-minutes may end it
        sooner (the workers replan from their measured speed)."""
        if self.max_steps:
            return self.max_steps
        per_step = self.tokens_per_step(block_size)
        tokens = self.max_tokens or train_tokens
        return max(1, math.ceil(tokens / per_step))

    def planned_warmup(self, steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, steps)
        return min(200, max(1, steps // 20))

    def planned_eval_every(self, steps: int) -> int:
        return self.eval_every or max(1, steps // EVALS_PER_RUN)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to `peak_lr` over `warmup_steps`, then cosine down to a tenth of it at
    `total_steps` (the schedule of nanoGPT and Llama's training)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak_lr / 10
    return floor + 0.5 * (peak_lr - floor) * (1 + math.cos(math.pi * progress))
