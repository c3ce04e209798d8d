#!/usr/bin/env python3
"""build/typecheck/kiln: the installed package's layout as symlinks, for mypy.

`kiln` is the cluster/ folder and kiln.actors, kiln.training, ... are the other five
(pyproject's [tool.setuptools.package-dir]). The editable install resolves that with an
import hook, which mypy does not run; mypy reads this tree instead (mypy_path). Run before
mypy (`make lint` does): it is rebuilt whole each time, so a new module is never missed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("actors", "training", "tuning", "serving", "federated")


def build(root: Path = ROOT) -> Path:
    tree = root / "build" / "typecheck" / "kiln"
    if tree.parent.exists():
        shutil.rmtree(tree.parent)
    tree.mkdir(parents=True)
    for entry in sorted((root / "cluster").iterdir()):
        if entry.name != "__pycache__":
            (tree / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        (tree / name).symlink_to(root / name)
    return tree


if __name__ == "__main__":
    print(build())
