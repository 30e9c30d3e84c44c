"""Summaries, ratios and the printed table of a benchmark run.

A *point* is one h2load measurement of one path at one load.  Points with the
same (kind, in-flight, path) are repetitions; the summary takes the median of
each metric over them.  Ratios between two paths are computed per round (the
two measurements taken side by side in the same repetition) and the median of
those paired ratios is reported, so drift of the machine between rounds
cancels out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Point:
    """One measurement of one path.

    Attributes:
        kind: Call kind name (``unary``, ``stream``...).
        inflight: Calls in flight (connections x streams).
        path: Path name (``direct``, ``nginx``...).
        round: Repetition index; points of one round were measured side by side.
        seconds: Measured duration.
        calls: Calls that completed with HTTP 2xx.
        failed: Calls that failed.
        calls_per_s: ``calls / seconds``.
        p50_ms: Median latency.
        p99_ms: 99th percentile latency.
        proxy_cpu_s: CPU seconds of the proxy process tree (None for direct).
        backend_cpu_s: CPU seconds of the echo backend.
        generator_cpu_s: CPU seconds of h2load.
        other_cpu_s: Busy time of the proxy CPU not charged to the proxy or
            the backend (other processes, interrupts, steal).
    """

    kind: str
    inflight: int
    path: str
    round: int
    seconds: float
    calls: int
    failed: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_s: float | None
    backend_cpu_s: float
    generator_cpu_s: float
    other_cpu_s: float

    def per_call_us(self, cpu_s: float | None) -> float | None:
        """CPU seconds spread over the calls, in microseconds per call."""
        if cpu_s is None:
            return None
        return cpu_s / self.calls * 1e6 if self.calls else math.nan

    def metrics(self) -> dict[str, float | None]:
        """The per-point metrics that are summarized and compared."""
        proxy = self.per_call_us(self.proxy_cpu_s)
        backend = self.per_call_us(self.backend_cpu_s)
        return {
            "calls_per_s": self.calls_per_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "proxy_us_per_call": proxy,
            "backend_us_per_call": backend,
            "total_us_per_call": (proxy or 0.0) + backend if backend is not None else None,
            "generator_us_per_call": self.per_call_us(self.generator_cpu_s),
            "other_cpu_pct": 100 * self.other_cpu_s / self.seconds if self.seconds else math.nan,
        }


#: Metrics compared in the ratio table: (key, column title).
RATIO_METRICS = (
    ("calls_per_s", "calls/s"),
    ("p50_ms", "p50"),
    ("p99_ms", "p99"),
    ("proxy_us_per_call", "proxy CPU/call"),
    ("total_us_per_call", "proxy+backend CPU/call"),
)


def _median(values: Iterable[float | None]) -> float | None:
    """Median of the non-None, non-NaN values (None if there are none)."""
    usable = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(usable) if usable else None


def summarize(points: Sequence[Point]) -> list[dict[str, Any]]:
    """Median of every metric per (kind, inflight, path), in measurement order."""
    groups: dict[tuple[str, int, str], list[Point]] = {}
    for point in points:
        groups.setdefault((point.kind, point.inflight, point.path), []).append(point)
    rows = []
    for (kind, inflight, path), group in groups.items():
        metrics = [p.metrics() for p in group]
        row: dict[str, Any] = {"kind": kind, "inflight": inflight, "path": path}
        row["rounds"] = len(group)
        row["failed_calls"] = sum(p.failed for p in group)
        for key in metrics[0]:
            row[key] = _median(m[key] for m in metrics)
        rates = [p.calls_per_s for p in group]
        row["calls_per_s_min"], row["calls_per_s_max"] = min(rates), max(rates)
        rows.append(row)
    return rows


def paired_ratios(points: Sequence[Point], subject: str, others: Sequence[str]) -> list[dict[str, Any]]:
    """Median over rounds of ``subject / other`` for each metric.

    Only rounds in which both paths were measured are paired.  A metric the
    other path lacks (proxy CPU of ``direct``) gives None.
    """
    by_key = {(p.kind, p.inflight, p.path, p.round): p for p in points}
    loads = list(dict.fromkeys((p.kind, p.inflight) for p in points))
    rows = []
    for kind, inflight in loads:
        for other in others:
            pairs = [
                (
                    by_key[(kind, inflight, subject, r)].metrics(),
                    by_key[(kind, inflight, other, r)].metrics(),
                )
                for r in sorted({p.round for p in points})
                if (kind, inflight, subject, r) in by_key and (kind, inflight, other, r) in by_key
            ]
            if not pairs:
                continue
            row: dict[str, Any] = {"kind": kind, "inflight": inflight, "subject": subject}
            row["other"] = other
            row["rounds"] = len(pairs)
            for key, _title in RATIO_METRICS:
                row[key] = _median(_ratio(mine[key], theirs[key]) for mine, theirs in pairs)
            rows.append(row)
    return rows


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    """``mine / theirs``, or None when either is missing or ``theirs`` is 0."""
    if mine is None or theirs is None or theirs == 0:
        return None
    return mine / theirs


def _fmt(value: float | None, digits: int, width: int, suffix: str = "") -> str:
    """Right-aligned number, or ``-`` when missing."""
    if value is None or math.isnan(value):
        return "-".rjust(width)
    return f"{value:.{digits}f}{suffix}".rjust(width)


def format_summary(rows: Sequence[dict[str, Any]], kind_titles: dict[str, str]) -> str:
    """The main table: one block per kind, one line per (in-flight, path)."""
    header = (
        f"{'in-flight':>9}  {'path':<16}{'calls/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'proxy us/call':>15}{'backend us/call':>17}{'h2load us/call':>16}"
        f"{'other CPU %':>13}{'failed':>8}"
    )
    lines: list[str] = []
    last_kind = last_inflight = None
    for row in rows:
        if row["kind"] != last_kind:
            if lines:
                lines.append("")
            lines += [kind_titles.get(row["kind"], row["kind"]), header]
            last_kind, last_inflight = row["kind"], None
        elif row["inflight"] != last_inflight:
            lines.append("")
        last_inflight = row["inflight"]
        lines.append(
            f"{row['inflight']:>9}  {row['path']:<16}"
            + _fmt(row["calls_per_s"], 0, 9)
            + _fmt(row["p50_ms"], 2, 9)
            + _fmt(row["p99_ms"], 2, 9)
            + _fmt(row["proxy_us_per_call"], 1, 15)
            + _fmt(row["backend_us_per_call"], 1, 17)
            + _fmt(row["generator_us_per_call"], 1, 16)
            + _fmt(row["other_cpu_pct"], 1, 13)
            + f"{row['failed_calls']:>8}"
        )
    return "\n".join(lines)


def format_ratios(rows: Sequence[dict[str, Any]]) -> str:
    """The ratio table: subject / other per load, one line per other path."""
    widths = [max(9, len(title) + 2) for _key, title in RATIO_METRICS]
    header = f"{'kind':<8}{'in-flight':>9}  {'ratio':<26}" + "".join(
        f"{title:>{width}}" for (_key, title), width in zip(RATIO_METRICS, widths, strict=True)
    )
    lines = [header]
    for row in rows:
        line = f"{row['kind']:<8}{row['inflight']:>9}  {row['subject'] + ' / ' + row['other']:<26}"
        for (key, _title), width in zip(RATIO_METRICS, widths, strict=True):
            line += _fmt(row[key], 2, width, "x")
        lines.append(line)
    return "\n".join(lines)


def points_as_dicts(points: Sequence[Point]) -> list[dict[str, Any]]:
    """The raw points, with their derived metrics, for the JSON file."""
    return [{**asdict(p), **p.metrics()} for p in points]
