"""``--sort-into DIR2``: every judged film into ``DIR2/accept/<path>`` or ``DIR2/quarantine/<reason>/<path>``.

The folder is the film's first reason, as the node names its quarantine folders (``policy.reason_order``); the other
reasons are in results.csv. ``<path>`` is the results' path, so the tree mirrors the sources. Films are hard-linked
(no space used, the default), symlinked, or copied (``--sort-mode``); a hard link across file systems falls back to a
copy. Sorting again (a rerun) moves nothing that is in place and removes a film's entry from where an earlier run put
it, so the trees always match results.csv.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filmgate.sweep.store import Store

MODES = ("link", "symlink", "copy")


def target(root: Path, decision: str, reasons: str, path: str) -> Path:
    if decision == "accept":
        return root / "accept" / path
    first = next(filter(None, reasons.split(";")), "unknown")
    return root / "quarantine" / first / path


def place(src: Path, dst: Path, mode: str) -> None:
    """Put ``src`` at ``dst`` (atomically replaced) by hard link, symlink or copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".filmgate-tmp")
    tmp.unlink(missing_ok=True)
    if mode == "symlink":
        os.symlink(os.path.abspath(src), tmp)
    elif mode == "link":
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copy2(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def write_bytes(data: bytes, dst: Path) -> None:
    """A film that exists only in memory (from a PACS) written into its place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".filmgate-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


def sort_into(store: Store, fingerprint: str, root: Path, mode: str = "link") -> dict[str, int]:
    """Sort every current result of ``store`` into ``root``; returns counts by top folder (accept, quarantine/<r>),
    and ``not kept``: PACS films judged without --sort-into, whose bytes are gone."""
    if mode not in MODES:
        raise ValueError(f"--sort-mode must be one of {', '.join(MODES)}, not {mode!r}")
    counts: dict[str, int] = {}
    for row in store.results(fingerprint):
        dst = target(root, row["decision"], row["reasons"], row["path"])
        src = row["_abspath"]
        if not src:  # a PACS film whose bytes were not kept
            counts["not kept"] = counts.get("not kept", 0) + 1
            continue
        if Path(src).resolve() != dst.resolve():
            place(Path(src), dst, mode)
        group = dst.relative_to(root).parts[0] if row["decision"] == "accept" else "/".join(
            dst.relative_to(root).parts[:2])  # fmt: skip
        counts[group] = counts.get(group, 0) + 1
    _remove_stale(store, fingerprint, root)
    return counts


def _remove_stale(store: Store, fingerprint: str, root: Path) -> None:
    """Entries an earlier sort left that no longer match a film's decision (or a film no longer in the sources);
    each entry is checked against the store, so memory does not grow with the tree."""
    for top in ("accept", "quarantine"):
        base = root / top
        if not base.is_dir():
            continue
        for dirpath, _, files in os.walk(base, topdown=False):
            for name in files:
                entry = Path(dirpath, name)
                parts = entry.relative_to(root).parts
                path = "/".join(parts[1:] if top == "accept" else parts[2:])
                found = store.decision_of(path, fingerprint)
                if found is None or target(root, found[0], found[1], path) != entry:
                    entry.unlink()
            if dirpath != str(base) and not os.listdir(dirpath):
                os.rmdir(dirpath)
