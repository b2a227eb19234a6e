"""requirements.py PYPROJECT [EXTRA]: print the project's base dependencies plus one extra's, one a line
(the extra's references to other extras of the project resolved), so an image installs its dependencies in
a layer that only pyproject.toml invalidates, before the project itself."""

import re
import sys
import tomllib


def requirements(project: dict, extra: str | None) -> list[str]:
    name = project["name"]
    extras = project.get("optional-dependencies", {})
    found = [] if extra else list(project.get("dependencies", []))
    pending = [extra] if extra else []
    seen = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for requirement in extras[current]:
            own = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", requirement.strip())
            if own:
                pending.extend(part.strip() for part in own.group(1).split(","))
            else:
                found.append(requirement)
    return found


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as handle:
        pyproject = tomllib.load(handle)["project"]
    for line in requirements(pyproject, sys.argv[2] if len(sys.argv) > 2 else None):
        print(line)
