"""The rollout gate: per-variant statistics, the A/B split check and the SLO verdict.

Locust's own stats give latency and failures; this module adds what a ranking SLO is
written in (rows/s, not requests/s) and what an A/B rollout must prove: that users are split
by the configured weights (a sample-ratio mismatch invalidates any comparison) and that
every user stays in one variant.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SLO:
    p99_ms: float = 50.0
    max_error_rate: float = 0.005
    min_rows_per_s: float = 0.0
    min_requests: int = 1


def parse_weights(text: str | None) -> dict[str, float]:
    """'control=95,treatment=5' -> {'control': 0.95, 'treatment': 0.05}."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        if not name.strip() or not w.strip():
            raise ValueError(f"bad weight {part!r}: expected name=weight")
        out[name.strip()] = float(w)
    total = sum(out.values())
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return {k: v / total for k, v in out.items()}


def weights_from_config(path: str) -> dict[str, float]:
    """Variant weights from a ctr-serve config file (YAML or JSON), normalised."""
    import json
    from pathlib import Path

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    variants = data.get("variants") or []
    return parse_weights(",".join(f"{v.get('name', 'main')}={v.get('weight', 1.0)}" for v in variants))


@dataclass
class VariantTally:
    """Counts the locust stats do not keep: rows and distinct users per variant."""

    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    users: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    user_variant: dict[str, str] = field(default_factory=dict)
    switched_users: int = 0
    forced: bool = False

    def add(self, variant: str, user_id: str, rows: int) -> None:
        self.rows[variant] += rows
        self.users[variant].add(user_id)
        prev = self.user_variant.setdefault(user_id, variant)
        if prev != variant and not self.forced:
            self.switched_users += 1

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def split_check(tally: VariantTally, weights: dict[str, float], sigmas: float = 4.0) -> list[str]:
    """Distinct-user shares against the weights (the hash assigns users, not requests).

    A share passes when it is within `sigmas` binomial standard errors of its weight (and
    within 1 percentage point, for small runs where the error bar is wide anyway).
    """
    problems: list[str] = []
    n = len(tally.user_variant)
    if not weights or n == 0:
        return problems
    for name in sorted(set(tally.users) - set(weights)):
        problems.append(f"variant {name!r} answered but is not in the configured weights")
    for name, w in weights.items():
        share = len(tally.users.get(name, ())) / n
        tol = max(0.01, sigmas * math.sqrt(max(w * (1 - w), 1e-12) / n))
        if abs(share - w) > tol:
            problems.append(f"variant {name!r}: {share:.3f} of {n} users, expected {w:.3f} +/- {tol:.3f}")
    if tally.switched_users:
        problems.append(f"{tally.switched_users} users were answered by more than one variant")
    return problems


def variant_rows(stats: Any, tally: VariantTally, elapsed_s: float, prefix: str = "/score [") -> list[dict[str, Any]]:
    """One summary row per variant from locust's per-name stats entries."""
    out = []
    for (name, _method), entry in sorted(stats.entries.items()):
        if not name.startswith(prefix):
            continue
        variant = name[len(prefix) : -1]
        out.append(
            {
                "variant": variant,
                "requests": entry.num_requests,
                "failures": entry.num_failures,
                "error_rate": entry.fail_ratio,
                "p50_ms": entry.get_response_time_percentile(0.5),
                "p99_ms": entry.get_response_time_percentile(0.99),
                "rows": tally.rows.get(variant, 0),
                "rows_per_s": tally.rows.get(variant, 0) / elapsed_s if elapsed_s > 0 else 0.0,
                "users": len(tally.users.get(variant, ())),
            }
        )
    return out


def verdict(stats: Any, tally: VariantTally, elapsed_s: float, slo: SLO, weights: dict[str, float]) -> dict[str, Any]:
    """Everything the gate decides on, and the list of reasons it fails (empty = pass)."""
    total = stats.total
    rows_per_s = tally.total_rows / elapsed_s if elapsed_s > 0 else 0.0
    summary = {
        "requests": total.num_requests,
        "failed_requests": total.num_failures,
        "error_rate": total.fail_ratio,
        "p50_ms": total.get_response_time_percentile(0.5) if total.num_requests else None,
        "p99_ms": total.get_response_time_percentile(0.99) if total.num_requests else None,
        "requests_per_s": total.num_requests / elapsed_s if elapsed_s > 0 else 0.0,
        "rows": tally.total_rows,
        "rows_per_s": rows_per_s,
        "elapsed_s": elapsed_s,
        "variants": variant_rows(stats, tally, elapsed_s),
        "user_share": {k: len(v) / max(1, len(tally.user_variant)) for k, v in tally.users.items()},
        "weights": weights,
        "slo": asdict(slo),
    }
    failures: list[str] = []
    if total.num_requests < slo.min_requests:
        failures.append(f"only {total.num_requests} requests (< {slo.min_requests})")
    if total.num_requests and summary["p99_ms"] > slo.p99_ms:
        failures.append(f"p99 {summary['p99_ms']:.1f} ms > {slo.p99_ms:g} ms")
    if total.fail_ratio > slo.max_error_rate:
        failures.append(f"error rate {total.fail_ratio:.4f} > {slo.max_error_rate:g}")
    if rows_per_s < slo.min_rows_per_s:
        failures.append(f"throughput {rows_per_s:.0f} rows/s < {slo.min_rows_per_s:g}")
    for v in summary["variants"]:
        if v["requests"] and v["p99_ms"] > slo.p99_ms:
            failures.append(f"variant {v['variant']!r}: p99 {v['p99_ms']:.1f} ms > {slo.p99_ms:g} ms")
    failures += split_check(tally, weights) if not tally.forced else []
    summary["failures"] = failures
    summary["passed"] = not failures
    return summary


def render_table(summary: dict[str, Any]) -> str:
    lines = [f"{'variant':<14}{'requests':>10}{'err%':>8}{'p50 ms':>9}{'p99 ms':>9}{'rows/s':>10}{'users':>8}"]
    for v in summary["variants"]:
        lines.append(
            f"{v['variant']:<14}{v['requests']:>10}{100 * v['error_rate']:>8.2f}{v['p50_ms']:>9.0f}{v['p99_ms']:>9.0f}"
            f"{v['rows_per_s']:>10.0f}{v['users']:>8}"
        )
    p50 = summary["p50_ms"] or 0
    p99 = summary["p99_ms"] or 0
    lines.append(
        f"{'total':<14}{summary['requests']:>10}{100 * summary['error_rate']:>8.2f}{p50:>9.0f}{p99:>9.0f}"
        f"{summary['rows_per_s']:>10.0f}{sum(v['users'] for v in summary['variants']):>8}"
    )
    return "\n".join(lines)
