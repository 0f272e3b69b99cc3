"""A small reader for the project's Dockerfile and .dockerignore (enough for this one file).

Used by test_dockerfile.py (structure) and test_image_install.py (which replays the install step).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    cmd: str  # upper-case keyword
    args: str  # the rest, continuation lines joined

    def flags(self) -> dict[str, str]:
        """`--from=builder --chown=1:1 src dst` -> {'from': 'builder', 'chown': '1:1'}."""
        out: dict[str, str] = {}
        for word in shlex.split(self.args):
            if not word.startswith("--"):
                break
            key, _, value = word[2:].partition("=")
            out[key] = value
        return out

    def operands(self) -> list[str]:
        words = shlex.split(self.args)
        return [w for w in words if not w.startswith("--")]

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


@dataclass
class Stage:
    base: str  # image reference with ARG defaults substituted
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction | None:
        found = self.all(cmd)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            words = shlex.split(ins.args)
            if len(words) == 2 and "=" not in words[0]:  # legacy `ENV KEY value`
                out[words[0]] = words[1]
                continue
            for word in words:
                key, sep, value = word.partition("=")
                assert sep, f"ENV {ins.args!r}: expected KEY=value"
                out[key] = value
        return out


def instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        cmd, _, args = full.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def parse(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions(path.read_text()):
        if ins.cmd == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip()
            continue
        if ins.cmd == "FROM":
            words = ins.operands()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name))
            continue
        assert stages, f"{ins.cmd} before the first FROM"
        stages[-1].instructions.append(ins)
    return args, stages


# ------------------------------------------------------------------------------------------------
# .dockerignore, with Docker's rules: patterns in order, the last match wins, `!` re-includes,
# a pattern that matches a directory matches everything below it, `**` spans directories.

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            out += pattern[i:j + 1]
            i = j + 1
            continue
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "(?:/.*)?$")


def ignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def in_context(relpath: str, rules: list[tuple[bool, re.Pattern[str]]] | None = None) -> bool:
    """Whether `relpath` (relative to the repository root, with /) is sent to the builder."""
    excluded = False
    for negate, rx in rules if rules is not None else ignore_rules():
        if rx.match(relpath):
            excluded = not negate
    return not excluded
