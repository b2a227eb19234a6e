"""`python -m copilot.runtime.writable DIR`: can this process's uid create, write, read back and remove a file in
DIR (made if missing)? Exit 0, or 1 with the reason: uid, gid, the folder's owner and mode, and what to change.
The init container of a shared volume runs it, so a ReadWriteMany class that ignores fsGroup (NFS, many CSI
drivers) stops the pod at start with that message instead of failing the first reference registered."""

from __future__ import annotations

import os
import stat
import sys
import uuid
from pathlib import Path


def check_writable(folder: Path) -> str | None:
    """None when a file can be made, written, read back and removed in `folder`; else why not."""
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    payload = b"copilot write test\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if probe.read_bytes() != payload:
            return f"{folder}: a file written there read back different bytes"
        probe.unlink()
    except OSError as error:
        try:
            info = folder.stat() if folder.exists() else folder.parent.stat()
            where = f"owner uid {info.st_uid} gid {info.st_gid}, mode {stat.filemode(info.st_mode)}"
        except OSError:
            where = "cannot stat it"
        return (
            f"uid {os.getuid()} (gid {os.getgid()}, groups {sorted(os.getgroups())}) cannot write {folder} "
            f"({where}): {error.strerror or error}. Give that uid or one of its groups write access on the volume "
            "(a storage class that applies fsGroup, the NFS export's anonuid/anongid, or a one-off chown)"
        )
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m copilot.runtime.writable DIR\n")
        return 2
    problem = check_writable(Path(argv[0]))
    if problem:
        sys.stderr.write(problem + "\n")
        return 1
    sys.stdout.write(f"{argv[0]} is writable by uid {os.getuid()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
