"""Findings and the report: one line per check, ok / warn / fail / skip, and a count of each."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Finding:
    """One check's outcome: `found` says what was seen, `fix` what to change (warn and fail)."""

    name: str
    status: Status
    found: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.found}"
        return f"{text}; fix: {self.fix}" if self.fix else text


@dataclass
class Checklist:
    """The findings of one diagnosis, in order; later checks ask `passed` about earlier ones."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    def ok(self, name: str, found: str) -> Finding:
        return self.add(Finding(name, "ok", found))

    def warn(self, name: str, found: str, fix: str) -> Finding:
        return self.add(Finding(name, "warn", found, fix))

    def fail(self, name: str, found: str, fix: str) -> Finding:
        return self.add(Finding(name, "fail", found, fix))

    def skip(self, name: str, because: str) -> Finding:
        return self.add(Finding(name, "skip", f"not run: {because}"))

    def skip_all(self, names: Iterable[str], because: str) -> None:
        for name in names:
            self.skip(name, because)

    def status(self, name: str) -> Status | None:
        found = [f.status for f in self.findings if f.name == name]
        return found[-1] if found else None

    def passed(self, name: str) -> bool:
        """True when the check `name` ran and did not fail (ok or warn)."""
        return self.status(name) in ("ok", "warn")

    @property
    def failed(self) -> bool:
        return any(f.status == "fail" for f in self.findings)


def render(findings: Iterable[Finding]) -> str:
    """One line per finding, then a count of each status."""
    findings = list(findings)
    counts = {s: sum(1 for f in findings if f.status == s) for s in ("ok", "warn", "fail", "skip")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return "\n".join([*(f.line() for f in findings), summary]) + "\n"


def size(nbytes: float) -> str:
    """A byte count for people: 512 B, 3.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
