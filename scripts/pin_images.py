"""Pin one image of a kustomization on a digest: `python3 scripts/pin_images.py KUSTOMIZATION NAME NEW_NAME DIGEST`.
Edits the `images:` entry whose `name:` is NAME in place (its newName and digest lines), keeping every comment
and the rest of the file as written. Standard library only: it runs before any virtualenv exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def pin(text: str, name: str, new_name: str, digest: str) -> str:
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    entry = re.compile(
        rf"(?P<indent>^[ ]*)- name: {re.escape(name)}\n"
        rf"(?P=indent)  newName: [^\n]+\n"
        rf"(?P=indent)  digest: sha256:[0-9a-f]{{64}}\n",
        re.M,
    )
    found = list(entry.finditer(text))
    if len(found) != 1:
        raise LookupError(f"{len(found)} `images:` entries named {name} with newName and digest lines")
    indent = found[0]["indent"]
    replacement = f"{indent}- name: {name}\n{indent}  newName: {new_name}\n{indent}  digest: {digest}\n"
    return text[: found[0].start()] + replacement + text[found[0].end() :]


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        sys.stderr.write("usage: pin_images.py KUSTOMIZATION NAME NEW_NAME DIGEST\n")
        return 2
    path, name, new_name, digest = Path(argv[0]), argv[1], argv[2], argv[3]
    path.write_text(pin(path.read_text(), name, new_name, digest))
    sys.stdout.write(f"{name} -> {new_name}@{digest}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
