"""What judging produces: one series' verdict with everything needed to explain it, and
the scope it was judged in. Shared by the threshold judge (``judge.py``) and the
sequential one (``compare_judge.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from rollbackd.checks.base import Span, Threshold
from rollbackd.core.samples import Labels, Verdict, format_labels
from rollbackd.core.sequential import Evidence


@dataclass(frozen=True)
class Baseline:
    """What the current version is compared with for ``max_increase``."""

    value: float
    source: str
    """In words: ``stable track (version v1)``, ``last known good v1, recorded when it baked``."""


@dataclass(frozen=True)
class Scope:
    """What the evaluator knows about the service while judging."""

    version_label: str | None = None
    """The label the check's series are grouped by, when versions are judged apart."""
    current_version: str | None = None
    stable_version: str | None = None
    """While a canary runs: the stable track's version, whose series are the baseline."""
    baseline: Baseline | None = None
    """Outside a canary: the last known good version's value of this check."""
    span: Span | None = None
    """When the judged version went live, for checks that count since then (``compare``)."""


@dataclass(frozen=True)
class Measurement:
    """One series' verdict and everything needed to explain it."""

    check: str
    labels: Labels
    verdict: Verdict
    value: float | None
    threshold: Threshold | None
    baseline: Baseline | None
    traffic: float | None
    query: str
    reason: str
    evidence: Evidence | None = None
    """A ``compare`` check's sequential test: what the verdict rests on."""

    @property
    def series(self) -> str:
        return format_labels(self.labels) if self.labels else ""
