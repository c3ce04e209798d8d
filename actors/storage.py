"""Artifact storage on any pyarrow filesystem: a local folder, `file://`, `s3://`, `gs://`.

Only the Registry writes here. It never renames (object stores copy on rename): a version's
files are written in place under a version folder that no catalog row points at until they are
all there, and any such folder left by a crash is removed before the number is used again.
"""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs

from training.errors import KilnError


class ArtifactStore:
    """Reads and writes whole files below one root URI."""

    def __init__(self, root_uri: str) -> None:
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

    def _path(self, relpath: str) -> str:
        normal = posixpath.normpath(relpath)
        if normal.startswith("..") or normal.startswith("/"):
            raise KilnError(f"artifact path {relpath!r} leaves the storage root")
        return f"{self._root}/{normal}"

    def write(self, relpath: str, data: bytes) -> None:
        path = self._path(relpath)
        self._fs.create_dir(posixpath.dirname(path), recursive=True)
        with self._fs.open_output_stream(path) as out:
            out.write(data)

    def publish(self, relpath: str, data: bytes) -> None:
        """Write a file that readers see whole or not at all: on a local disk it is written
        under a temporary name and renamed (atomic); an object store's upload becomes visible
        only when it completes."""
        if not isinstance(self._fs, pafs.LocalFileSystem):
            self.write(relpath, data)
            return
        self.write(relpath + ".partial", data)
        self._fs.move(self._path(relpath + ".partial"), self._path(relpath))

    def delete_file(self, relpath: str) -> None:
        self._fs.delete_file(self._path(relpath))

    def read(self, relpath: str) -> bytes:
        path = self._path(relpath)
        try:
            with self._fs.open_input_stream(path) as src:
                return src.read()
        except FileNotFoundError as exc:
            raise KilnError(f"artifact {relpath} is missing from {self.root_uri}") from exc

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
        )

    def delete_dir(self, relpath: str) -> bool:
        """Remove a folder and everything in it; returns whether there was one."""
        path = self._path(relpath)
        if self._fs.get_file_info(path).type == pafs.FileType.NotFound:
            return False
        self._fs.delete_dir(path)
        return True
