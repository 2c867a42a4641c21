"""Files that must not change unnoticed: sha256 hashes, checked against a record of them.

A training checkpoint records the hash of each of its files (``lowmem_course.train``), and the
package ships ``students/MANIFEST.sha256``, the hashes of the shipped students and adapters, in the
format of ``sha256sum`` (``lowmem doctor`` checks it). After retraining a shipped file on purpose,
a maintainer rewrites the manifest with the standard tools::

    cd lowmem_course/students && find * -type f ! -name MANIFEST.sha256 | sort | xargs sha256sum > MANIFEST.sha256
    cd lowmem_course/students && sha256sum -c MANIFEST.sha256          # the same check as doctor's
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "MANIFEST.sha256"
_CHUNK = 2**20  # bytes read at a time


def sha256(path: Path) -> str:
    """The sha256 of the file at ``path``, as 64 hex digits (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def changed(folder: Path, hashes: dict[str, str]) -> list[str]:
    """The names in ``hashes`` (paths relative to ``folder``) whose file is missing or hashes otherwise."""
    return [name for name, expected in hashes.items()
            if not (folder / name).is_file() or sha256(folder / name) != expected]


def read_manifest(path: Path) -> dict[str, str]:
    """The ``{relative path: sha256}`` of a ``sha256sum`` file (lines ``HEX  PATH``);
    ``ValueError`` names a bad line."""
    hashes = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}:{number}: expected 'SHA256  PATH' as sha256sum writes it")
        hashes[name] = digest
    return hashes


def shipped_changes() -> list[str]:
    """The shipped files (students, adapters) that differ from ``students/MANIFEST.sha256`` or are missing.

    ``ValueError`` when the manifest itself is missing or malformed.
    """
    from lowmem_course import family

    manifest = family.STUDENTS_DIR / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"no {manifest}")
    return changed(family.STUDENTS_DIR, read_manifest(manifest))
