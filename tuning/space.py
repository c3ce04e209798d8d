"""Search spaces for sweeps: parsed and validated once, then turned into Ray Tune domains.

A user writes ranges on the command line (`--lr 1e-4:1e-1 --l2 0,1e-6:1e-1`) or in a YAML
file; both become one `SearchSpace`. Every mistake (LOW above HIGH, a zero or negative learning
rate, an unknown optimiser) is a KilnError here, before Ray starts, never a failed trial.
The same space feeds random search, a full grid, Optuna's TPE and PBT's mutations.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.training.config import OPTIMIZERS, TrainConfig
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

L2_ZERO_BAND_DECADES = 1.0
"""With 0 in the λ range, λ is searched as log10(λ) over one extra decade below LOW; a sample
in that band means λ = 0. One float dimension keeps every searcher (Optuna included) usable."""
L2_LOG10_KEY = "l2_log10"
SPACE_KEYS = ("lr", "l2", "batch_size", "hidden_width", "depth", "optimizer")
DEFAULT_L2_RANGES = {"exact": "0,1e-3:1e5", "lbfgs": "1e-4:1e4", "minibatch": "0,1e-4:10"}
"""λ searched when the user names no range: the exact path is cheap (one solve per λ) and spans
the scales of standardised data, λ/m from 1e-8 to 1e3 on a thousand rows; the L-BFGS path
spans C = 1/λ from 1e-4 to 1e4, as scikit-learn's LogisticRegressionCV does."""


@dataclass(frozen=True, kw_only=True)
class LogRange:
    """A positive range searched on a log scale, optionally with 0 as one more choice."""

    low: float
    high: float
    include_zero: bool = False

    @property
    def fixed(self) -> bool:
        return self.low == self.high and not self.include_zero

    def grid(self, points: int) -> list[float]:
        """`points` log-spaced values from LOW to HIGH (0 first when it is included)."""
        values = [self.low] if self.low == self.high else _logspace(self.low, self.high, points)
        return ([0.0] if self.include_zero else []) + values

    def describe(self) -> str:
        zero = "0," if self.include_zero else ""
        return f"{zero}{self.low:g}:{self.high:g}"


def _logspace(low: float, high: float, points: int) -> list[float]:
    return [float(v) for v in np.geomspace(low, high, max(points, 2))]


def parse_log_range(text: str, option: str, allow_zero: bool) -> LogRange:
    """`LOW:HIGH`, a single value, or (for λ) `0,LOW:HIGH` to include zero."""
    example = "0,1e-6:1e-1" if allow_zero else "1e-4:1e-1"
    raw = str(text).strip().replace(" ", "")
    include_zero = False
    if raw.startswith("0,"):
        if not allow_zero:
            raise KilnError(
                f'Got "{text}" for {option}. {option} cannot include 0, e.g. {example}.'
            )
        include_zero, raw = True, raw[2:]
    low_text, _, high_text = raw.partition(":")
    try:
        low = float(low_text)
        high = float(high_text) if high_text else low
    except ValueError as exc:
        raise KilnError(
            f'Got "{text}" for {option}. Give LOW:HIGH as numbers, e.g. {option} {example}.'
        ) from exc
    if allow_zero and low == high == 0.0:
        return LogRange(low=0.0, high=0.0, include_zero=True)
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high <= 0:
        zero_hint = " (write 0,LOW:HIGH to also try 0)" if allow_zero else ""
        raise KilnError(
            f'Got "{text}" for {option}. Both ends must be greater than 0 on a log scale'
            f"{zero_hint}, e.g. {option} {example}."
        )
    if low > high:
        raise KilnError(
            f'Got "{text}" for {option}. LOW must not exceed HIGH, e.g. {option} {example}.'
        )
    if option == "--lr" and high >= 10:
        raise KilnError(
            f'Got "{text}" for --lr. Keep the learning rate below 10, e.g. --lr 1e-4:1e-1.'
        )
    return LogRange(low=low, high=high, include_zero=include_zero)


def default_l2_range(cfg: TrainConfig) -> str:
    return DEFAULT_L2_RANGES[cfg.resolved_solver]


def parse_int_choices(text: Any, option: str) -> list[int]:
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        values = [int(v) for v in items if str(v).strip()]
    except ValueError as exc:
        raise KilnError(
            f'Got "{text}" for {option}. Give whole numbers, e.g. {option} 32,64.'
        ) from exc
    if not values or min(values) < 1:
        raise KilnError(
            f'Got "{text}" for {option}. Give numbers of at least 1, e.g. {option} 32,64.'
        )
    return values


def parse_optimizers(text: Any) -> list[str]:
    items = text if isinstance(text, list) else str(text).split(",")
    values = [str(v).strip() for v in items if str(v).strip()]
    for value in values:
        if value not in OPTIMIZERS:
            raise KilnError(
                f'Got "{value}" for --optimizer. Choose from: {", ".join(OPTIMIZERS)}, '
                "e.g. --optimizer adam,sgd."
            )
    if not values:
        raise KilnError(f'Got "{text}" for --optimizer. Name one or more, e.g. adam,sgd.')
    return values


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """What a sweep varies. Empty choice lists keep the base training config's value."""

    lr: LogRange = LogRange(low=1e-4, high=1e-1)
    l2: LogRange = LogRange(low=1e-4, high=10.0, include_zero=True)
    batch_size: list[int] = field(default_factory=list)
    hidden_width: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    optimizer: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr.describe(),
            "l2": self.l2.describe(),
            "batch_size": self.batch_size,
            "hidden_width": self.hidden_width,
            "depth": self.depth,
            "optimizer": self.optimizer,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "the search space") -> SearchSpace:
        unknown = sorted(set(raw) - set(SPACE_KEYS))
        if unknown:
            raise KilnError(
                f'Got unknown key "{unknown[0]}" in {where}. Use: {", ".join(SPACE_KEYS)}.'
            )
        default = cls()
        return cls(
            lr=parse_log_range(raw["lr"], "--lr", allow_zero=False) if "lr" in raw else default.lr,
            l2=parse_log_range(raw["l2"], "--l2", allow_zero=True) if "l2" in raw else default.l2,
            batch_size=parse_int_choices(raw["batch_size"], "--batch-size")
            if raw.get("batch_size")
            else [],
            hidden_width=parse_int_choices(raw["hidden_width"], "--hidden-width")
            if raw.get("hidden_width")
            else [],
            depth=parse_int_choices(raw["depth"], "--depth") if raw.get("depth") else [],
            optimizer=parse_optimizers(raw["optimizer"]) if raw.get("optimizer") else [],
        )

    def categorical(self) -> dict[str, list[Any]]:
        """The choice dimensions that really vary or pin a value."""
        found: dict[str, list[Any]] = {
            "batch_size": self.batch_size,
            "hidden_width": self.hidden_width,
            "depth": self.depth,
            "optimizer": self.optimizer,
        }
        return {k: v for k, v in found.items() if v}


MAX_SPACE_FILE_BYTES = 64 * 1024
MAX_YAML_DEPTH = 16


def check_plain_yaml(text: str, path: str) -> None:
    """Refuse YAML a search space never needs and an attacker would send: aliases (a few
    lines of them expand to billions of nodes: "billion laughs") and deep nesting (the
    composer recurses per level). Read from the parser's event stream, before composing."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise KilnError(
                f'Got "{path}" for --space, which uses YAML anchors or aliases (&, *). '
                "Write each value out."
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise KilnError(
                    f'Got "{path}" for --space, nested deeper than {MAX_YAML_DEPTH} levels. '
                    'A search space is a flat mapping, e.g. "lr: 1e-4:1e-1".'
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_space_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML search-space file (keys as in SPACE_KEYS)."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise KilnError(f'Got "{path}" for --space, which does not exist. Give a YAML file.')
    if file.stat().st_size > MAX_SPACE_FILE_BYTES:
        raise KilnError(
            f'Got "{path}" for --space, which is {file.stat().st_size} bytes; a search space '
            f"is a few lines (at most {MAX_SPACE_FILE_BYTES // 1024} KiB)."
        )
    try:
        text = file.read_text()
        check_plain_yaml(text, path)
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise KilnError(f'Got "{path}" for --space, which is not valid YAML: {exc}') from exc
    if not isinstance(raw, dict):
        raise KilnError(f'Got "{path}" for --space. It must hold a mapping, e.g. "lr: 1e-4:1e-1".')
    return raw


# ----------------------------------------------------------------------------- to Ray Tune


def param_space(space: SearchSpace, search: str, grid_points: int) -> dict[str, Any]:
    """Ray Tune's param_space: the grid's values as choices for `grid` (the points themselves
    come from `grid_configs`, in a shuffled order), sampling domains otherwise."""
    from ray import tune  # Tune itself only when a sweep is built

    if search == "grid":
        axes = grid_axes(space, grid_points)
        return {k: tune.choice(v) if len(v) > 1 else v[0] for k, v in axes.items()}
    params = {"lr": _log_domain(space.lr)}
    if space.l2.include_zero and space.l2.high > 0:
        top = math.log10(space.l2.high)
        params[L2_LOG10_KEY] = tune.uniform(math.log10(space.l2.low) - L2_ZERO_BAND_DECADES, top)
        params["l2_low"] = space.l2.low  # where the zero band ends, for decode_l2 in the trial
    elif space.l2.include_zero:
        params["l2"] = 0.0
    else:
        params["l2"] = _log_domain(space.l2)
    params.update(
        {k: tune.choice(v) if len(v) > 1 else v[0] for k, v in space.categorical().items()}
    )
    return params


def _log_domain(rng: LogRange) -> Any:
    from ray import tune  # Tune itself only when a sweep is built

    return rng.low if rng.fixed else tune.loguniform(rng.low, rng.high)


def pbt_mutations(space: SearchSpace) -> dict[str, Any]:
    """What PBT may perturb: the continuous dimensions (choices stay with their trial)."""
    from ray import tune  # Tune itself only when a sweep is built

    mutations: dict[str, Any] = {}
    if not space.lr.fixed:
        mutations["lr"] = tune.loguniform(space.lr.low, space.lr.high)
    if space.l2.high > 0 and not space.l2.include_zero and not space.l2.fixed:
        mutations["l2"] = tune.loguniform(space.l2.low, space.l2.high)
    if space.l2.include_zero and space.l2.high > 0:
        low = math.log10(space.l2.low) - L2_ZERO_BAND_DECADES
        mutations[L2_LOG10_KEY] = tune.uniform(low, math.log10(space.l2.high))
    return mutations


def decode_l2(config: dict[str, Any]) -> float:
    """λ of a trial config: `l2` itself, or 0 / 10**l2_log10 from the zero-band encoding."""
    if L2_LOG10_KEY not in config:
        return float(config.get("l2", 0.0))
    exponent = float(config[L2_LOG10_KEY])
    if exponent < math.log10(float(config["l2_low"])):
        return 0.0
    return float(10.0**exponent)


def grid_axes(space: SearchSpace, grid_points: int) -> dict[str, list[Any]]:
    return {
        "lr": space.lr.grid(grid_points),
        "l2": space.l2.grid(grid_points),
        **space.categorical(),
    }


def grid_size(space: SearchSpace, grid_points: int) -> int:
    return math.prod(len(values) for values in grid_axes(space, grid_points).values())


def grid_configs(space: SearchSpace, grid_points: int, seed: int) -> list[dict[str, Any]]:
    """Every point of the grid once, in a seeded random order.

    Order matters to asynchronous successive halving: it ranks each trial against those that
    reached a rung before it. In axis order the grid starts with the smallest learning rates
    (usually the worst), so every rung filled with poor trials first and each later, better one
    went on: on the tune_efficiency digits grid ASHA then ran 79% of the grid's trial-epochs.
    """
    axes = grid_axes(space, grid_points)
    points = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    order = np.random.default_rng(seed).permutation(len(points))
    return [points[i] for i in order]
