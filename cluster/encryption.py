"""`kiln keys rotate-master`: re-wrap every data key of a store under a new master key.

Only the `.kkey` files change (a few hundred bytes each), never the data they open. Each is
replaced whole (a rename on a local disk, one PUT on an object store) and says which master
key wrapped it, so a rotation killed midway leaves every file readable by the old or the new
key, and a rerun with the same keys skips the done ones and finishes the rest. The storage's
marker names the new key only once every key file has moved: until then the store still
opens with the old key, and only the rotation can go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.actors.storage import ArtifactStore
from kiln.settings import Settings
from kiln.training import encryption as enc
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rotation:
    old_key_id: str
    new_key_id: str
    rewrapped: int
    """Key files re-wrapped by this run."""
    already: int
    """Key files a run before this one had re-wrapped (a rerun after a kill)."""


def local_key_files(settings: Settings) -> list[Path]:
    """Sealed files Kiln keeps outside the storage: federated checkpoints under KILN_HOME."""
    root = settings.kiln_home.expanduser() / "federated"
    return sorted(root.rglob(f"*{enc.KEY_SUFFIX}")) if root.is_dir() else []


def rotate_master(
    settings: Settings,
    new: enc.MasterKey,
    on_file: Callable[[str], None] | None = None,
) -> Rotation:
    """Re-wrap every data key under `new`; the store must open with the current key."""
    store = ArtifactStore(settings.storage_uri)
    old = store.master
    if old is None:
        raise KilnError(
            f"storage {settings.storage_uri} is not encrypted: there is no master key to rotate "
            f"(turn encryption on with {enc.ENCRYPT_ENV}=1)"
        )
    if old.key_id == new.key_id:
        raise KilnError(f"--new-key is the current master key ({old.key_id}); give a new one")
    rewrapped = already = 0
    for relpath in store.key_files():
        if store.rewrap_key_file(relpath, old, new):
            rewrapped += 1
        else:
            already += 1
        if on_file is not None:
            on_file(relpath)
    for path in local_key_files(settings):
        done = enc.rewrap(path.read_bytes(), path.name, old, new)
        if done is None:
            already += 1
        else:
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(done)
            partial.replace(path)
            rewrapped += 1
        if on_file is not None:
            on_file(str(path))
    store.set_marker(new.key_id)
    logger.info("re-wrapped %d data keys under %s", rewrapped, new.key_id)
    return Rotation(old.key_id, new.key_id, rewrapped, already)
