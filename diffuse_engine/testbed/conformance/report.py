"""The conformance report: one line per check, with its time and outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffuse_engine.core.errors import DiffuseError

CHECKABLE_KINDS = ("sde", "solver")


@dataclass
class CheckResult:
    """One check: did it pass, what was measured, against which bound."""

    check: str
    passed: bool
    measured: str
    bound: str = ""
    detail: str = ""


@dataclass
class ConformanceReport:
    """All checks of one component."""

    kind: str
    name: str
    settings: dict[str, Any]
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        return [
            (r.check, "PASS" if r.passed else "FAIL", r.measured, r.bound, r.detail)
            for r in self.results
        ]

    def format(self) -> str:
        """A plain-text table (for assertion messages and logs)."""
        head = ("check", "result", "measured", "bound", "detail")
        rows = [head] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            f"{self.kind} {self.name!r}: "
            f"{'PASS' if self.passed else 'FAIL'} "
            f"({len(self.results) - len(self.failures)}/{len(self.results)} checks, "
            f"{self.seconds:.1f}s; {_settings(self.settings)})"
        ]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join(lines)


def _settings(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)


class _Collector:
    """Runs checks, turning an unexpected exception into a failed check."""

    def __init__(self, report: ConformanceReport):
        self.report = report

    def run(self, check: str, fn: Callable[[], list[CheckResult] | CheckResult]) -> None:
        try:
            out = fn()
        except DiffuseError as exc:
            out = CheckResult(check, False, "error", detail=str(exc).splitlines()[0][:200])
        except Exception as exc:  # a contract violation is a failed check, not a crash
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            out = CheckResult(check, False, "exception", detail=msg)
        self.report.results.extend(out if isinstance(out, list) else [out])


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)
