"""Artifact storage on any pyarrow filesystem: a local folder, `file://`, `s3://`, `gs://`.

Only the Registry writes here. It never renames (object stores copy on rename): a version's
files are written in place under a version folder that no catalog row points at until they are
all there, and any such folder left by a crash is removed before the number is used again.

Encryption at rest (training/encryption.py) happens here, below every writer: a root that
holds `.kiln-encryption.json` seals every file it writes with a data key of its own, kept
beside it as `NAME.kkey`, and opens sealed files on read. Such a root refuses to open without
the master key that marker names, so no process starts, writes clear files among sealed ones
or fails later on the first read.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Iterator

import pyarrow.fs as pafs

from kiln.training import encryption as enc
from kiln.training.errors import CorruptArtifactError, KilnError

MARKER_FILE = ".kiln-encryption.json"
"""At the storage root of an encrypted store: the id of its master key (never the key)."""


class ArtifactStore:
    """Reads and writes whole files below one root URI."""

    def __init__(self, root_uri: str, encrypt: bool | None = None) -> None:
        """`encrypt`: seal new files (default: `KILN_ENCRYPT`); a root already marked
        encrypted stays so whatever it says."""
        try:
            if "://" in root_uri:
                self._fs, root = pafs.FileSystem.from_uri(root_uri)
            else:
                self._fs, root = pafs.LocalFileSystem(), root_uri
        except Exception as exc:  # pyarrow raises several types for a bad URI
            raise KilnError(
                f'Got "{root_uri}" for KILN_STORAGE, which cannot be opened: {exc}'
            ) from exc
        self.root_uri = root_uri
        self._root = root.rstrip("/")
        self._fs.create_dir(self._root, recursive=True)
        self.master: enc.MasterKey | None = None
        self._open_encryption(enc.encryption_requested() if encrypt is None else encrypt)

    # ----------------------------------------------------------------- encryption

    def encryption_marker(self) -> dict | None:
        """The root's encryption marker, or None for a clear store."""
        path = self._path(MARKER_FILE)
        if self._fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self._fs.open_input_stream(path) as src:
            return dict(json.loads(src.read()))

    def _open_encryption(self, requested: bool) -> None:
        marker = self.encryption_marker()
        if marker is None and not requested:
            return
        master = enc.env_master_key()
        if marker is not None:
            expected = marker["master_key"]
            if master is None:
                raise KilnError(
                    f"storage {self.root_uri} holds encrypted files (master key {expected}); "
                    f"set {enc.MASTER_KEY_ENV} to that master key to open it"
                )
            if master.key_id != expected:
                raise KilnError(
                    f"storage {self.root_uri} is encrypted under master key {expected}, but "
                    f"{enc.MASTER_KEY_ENV} holds {master.key_id}; set it to the store's key "
                    "(or finish `kiln keys rotate-master`)"
                )
        elif master is None:
            raise KilnError(
                f"{enc.ENCRYPT_ENV} is on but {enc.MASTER_KEY_ENV} is not set; make a key with "
                f"`kiln keys new-master FILE` and set {enc.MASTER_KEY_ENV}=FILE"
            )
        else:
            self.set_marker(master.key_id)
        self.master = master

    def set_marker(self, master_key_id: str) -> None:
        marker = {"master_key": master_key_id, "cipher": "AES-256-GCM", "at": time.time()}
        self._put(MARKER_FILE, json.dumps(marker).encode(), atomic=True)

    @property
    def encrypted(self) -> bool:
        return self.master is not None

    def key_files(self) -> Iterator[str]:
        """Every data key file below the root, as paths relative to it."""
        selector = pafs.FileSelector(self._root, recursive=True, allow_not_found=True)
        for info in self._fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.path.endswith(enc.KEY_SUFFIX):
                yield info.path[len(self._root) + 1 :]

    def rewrap_key_file(self, relpath: str, old: enc.MasterKey, new: enc.MasterKey) -> bool:
        """Re-wrap one data key under `new`, replaced whole; False when it already was."""
        rewrapped = enc.rewrap(self._get(relpath), relpath, old, new)
        if rewrapped is None:
            return False
        self._put(relpath, rewrapped, atomic=True)
        return True

    # ----------------------------------------------------------------- files

    def _get(self, relpath: str) -> bytes:
        with self._fs.open_input_stream(self._path(relpath)) as src:
            return bytes(src.read())

    def _put(self, relpath: str, data: bytes, atomic: bool = False) -> None:
        path = self._path(relpath)
        self._fs.create_dir(posixpath.dirname(path), recursive=True)
        if atomic and isinstance(self._fs, pafs.LocalFileSystem):
            with self._fs.open_output_stream(path + ".partial") as out:
                out.write(data)
            self._fs.move(path + ".partial", path)
            return
        with self._fs.open_output_stream(path) as out:
            out.write(data)

    def _path(self, relpath: str) -> str:
        normal = posixpath.normpath(relpath)
        if normal.startswith("..") or normal.startswith("/"):
            raise KilnError(f"artifact path {relpath!r} leaves the storage root")
        return f"{self._root}/{normal}"

    def write(self, relpath: str, data: bytes, atomic: bool = False) -> str:
        """Store a file (sealed on an encrypted store, its key file written first); returns
        the sha256 of the bytes on storage (the ciphertext when sealed)."""
        if self.master is not None:
            data, key_file = enc.encrypt_file_bytes(self.master, relpath, data)
            self._put(relpath + enc.KEY_SUFFIX, key_file, atomic)
        self._put(relpath, data, atomic)
        return hashlib.sha256(data).hexdigest()

    def publish(self, relpath: str, data: bytes) -> str:
        """Write a file that readers see whole or not at all: on a local disk it is written
        under a temporary name and renamed (atomic); an object store's upload becomes visible
        only when it completes."""
        return self.write(relpath, data, atomic=True)

    def delete_file(self, relpath: str) -> None:
        self._fs.delete_file(self._path(relpath))
        key_path = self._path(relpath + enc.KEY_SUFFIX)
        if self._fs.get_file_info(key_path).type == pafs.FileType.File:
            self._fs.delete_file(key_path)

    def read(self, relpath: str) -> bytes:
        return self.read_checked(relpath)[0]

    def read_checked(self, relpath: str, expected_sha256: str | None = None) -> tuple[bytes, str]:
        """(plaintext, sha256 of the bytes on storage); with `expected_sha256`, bytes on
        storage that differ from it raise CorruptArtifactError naming the file."""
        try:
            stored = self._get(relpath)
        except FileNotFoundError as exc:
            raise KilnError(f"artifact {relpath} is missing from {self.root_uri}") from exc
        digest = hashlib.sha256(stored).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise CorruptArtifactError(
                f"artifact {relpath} failed its checksum on storage (expected sha256 "
                f"{expected_sha256[:12]}..., got {digest[:12]}...); it was changed after "
                "registration"
            )
        if not enc.is_sealed(stored):
            return stored, digest
        if self.master is None:
            raise KilnError(
                f"artifact {relpath} is encrypted; set {enc.MASTER_KEY_ENV} to its master key"
            )
        try:
            key_file = self._get(relpath + enc.KEY_SUFFIX)
        except FileNotFoundError as exc:
            raise KilnError(f"artifact {relpath} has lost its key file {relpath}.kkey") from exc
        masters = {self.master.key_id: self.master}
        return enc.decrypt_file_bytes(masters, relpath, stored, key_file), digest

    def list_dirs(self, relpath: str) -> list[str]:
        """Names of the folders directly below `relpath` (none when it does not exist)."""
        selector = pafs.FileSelector(self._path(relpath), allow_not_found=True)
        return sorted(
            posixpath.basename(info.path)
            for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.Directory
        )

    def list_files(self, relpath: str) -> list[str]:
        selector = pafs.FileSelector(self._path(relpath), allow_not_found=True)
        return sorted(
            posixpath.basename(info.path)
            for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and not info.path.endswith((enc.KEY_SUFFIX, ".partial"))
            and posixpath.basename(info.path) != MARKER_FILE
        )

    def delete_dir(self, relpath: str) -> bool:
        """Remove a folder and everything in it; returns whether there was one."""
        path = self._path(relpath)
        if self._fs.get_file_info(path).type == pafs.FileType.NotFound:
            return False
        self._fs.delete_dir(path)
        return True
