"""Generate the ctr-serve Grafana dashboard (deploy/grafana/dashboards/ctr-serve.json).

The dashboard is code so every panel's PromQL lives in one readable list; the JSON is
committed so Grafana provisioning needs no build step. After editing this file run

    python deploy/grafana/dashboard.py

and commit both. A test regenerates the JSON and fails when the two differ, and another
runs every query below against a real Prometheus scraping a real service.

Counters with labels (rejections, misses, degraded calls) have no series until the first
event, so their panels add `or ... * 0` to draw a flat zero line instead of "No data".
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "ctr-serve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
V = 'variant=~"$variant"'
R = "$__rate_interval"


def q(expr: str, legend: str, ref: str, instant: bool = False) -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": not instant, "instant": instant}
    if instant:
        t["format"] = "table"
    return t


def quantiles(metric: str, by: str, sel: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
    return [
        q(
            f"histogram_quantile({x}, sum by ({by}, le) (rate({metric}_bucket{'{' + sel + '}' if sel else ''}[{R}])))",
            f"p{int(x * 100)} {{{{{by}}}}}",
            "ABCDEFGH"[i],
        )
        for i, x in enumerate(qs)
    ]


def zero_for(by: str) -> str:
    """A zero series per variant: the fallback for counters that have not counted yet."""
    return f"sum by ({by}) (rate(ctr_request_seconds_count{{{V}}}[{R}])) * 0"


PANELS: list[tuple[str, str, str, list[dict]]] = [
    # (title, unit, description, targets)
    ("Request rate by variant", "reqps", "POST /score calls per second, all statuses.", [
        q(f"sum by (variant) (rate(ctr_request_seconds_count{{{V}}}[{R}]))", "{{variant}}", "A"),
    ]),
    ("Rows scored by variant", "rowsps", "Candidates scored per second (batcher rows).", [
        q(f"sum by (variant) (rate(ctr_batch_rows_sum{{{V}}}[{R}]))", "{{variant}}", "A"),
    ]),
    ("Latency p50 / p95 / p99 by variant", "s", "Successful /score calls, end to end inside the service. SLO: p99 <= 50 ms.",
        quantiles("ctr_request_seconds", "variant", f'{V}, status="200"')),
    ("Error rate by variant", "percentunit", "Share of /score calls answered 5xx (503 rejections included).", [
        q(
            f'(sum by (variant) (rate(ctr_request_seconds_count{{{V}, status=~"5.."}}[{R}])) or {zero_for("variant")})'
            f" / sum by (variant) (rate(ctr_request_seconds_count{{{V}}}[{R}]))",
            "{{variant}}", "A",
        ),
    ]),
    ("503 rejections by variant and reason", "reqps",
     "Shed by admission control before any work (inflight_requests, inflight_rows, queue_wait), "
     "or by the batcher (queue_full, deadline), or while draining.", [
        q(f"sum by (variant, reason) (rate(ctr_rejected_total{{{V}}}[{R}])) or {zero_for('variant')}", "{{variant}} {{reason}}", "A"),
    ]),
    ("Admission row limit and completion rate", "short",
     "The adaptive row limit (halved when an admitted request times out in the queue) and the rows/s completed "
     "at capacity, summed over pods. A limit far below its bound while 503s rise: admission is backing off.", [
        q("sum(ctr_admission_row_limit)", "row limit", "A"),
        q("sum(ctr_admission_completion_rate_rows)", "completion rate (rows/s)", "B"),
    ]),
    ("Test-time model work per row", "short",
     "Model passes per scored row for variants with test-time paths (MATT: the row plus its paths; "
     "SGCTR: the denoiser runs of its refinement). 1 is plain scoring.", [
        # Variants that score plain have no test-time series: they show as 1.
        q(f"(sum by (variant, method) (rate(ctr_test_time_model_passes_total{{{V}}}[{R}]))"
          f" / sum by (variant, method) (rate(ctr_test_time_rows_total{{{V}}}[{R}])))"
          f" or ({zero_for('variant')} + 1)", "{{variant}} {{method}}", "A"),
    ]),
    ("Batch rows by variant", "short", "Rows per onnxruntime call (before padding); mean and percentiles.", [
        q(f"sum by (variant) (rate(ctr_batch_rows_sum{{{V}}}[{R}])) / sum by (variant) (rate(ctr_batch_rows_count{{{V}}}[{R}]))", "mean {{variant}}", "A"),
        *[dict(t, refId="BC"[i]) for i, t in enumerate(quantiles("ctr_batch_rows", "variant", V, (0.5, 0.99)))],
    ]),
    ("Queue seconds by variant", "s", "Time rows wait in the batcher before their onnxruntime call.",
        quantiles("ctr_queue_seconds", "variant", V, (0.5, 0.99))),
    ("Inference seconds by variant", "s", "onnxruntime run time per batch.",
        quantiles("ctr_inference_seconds", "variant", V, (0.5, 0.99))),
    ("In-flight rows by variant", "short", "Rows accepted and not yet answered; the HPA scales on its per-pod average.", [
        q(f"sum by (variant) (ctr_inflight_rows{{{V}}})", "{{variant}}", "A"),
    ]),
    ("Feature fetch seconds by store", "s", "One pipelined feature-store round trip per request.",
        quantiles("ctr_feature_fetch_seconds", "store", "", (0.5, 0.99))),
    ("Feature misses by entity", "ops", "Entities or fields served with the OOV/default token.", [
        q(f"sum by (entity) (rate(ctr_feature_missing_total[{R}])) or sum(rate(ctr_request_seconds_count[{R}])) * 0", "{{entity}}", "A"),
    ]),
    ("Item cache hit rate", "percentunit", "In-process item cache in front of the feature store.", [
        q(
            f"sum(rate(ctr_cache_hits_total[{R}])) / (sum(rate(ctr_cache_hits_total[{R}])) + sum(rate(ctr_cache_misses_total[{R}])))",
            "hit rate", "A",
        ),
    ]),
    ("Degraded calls by reason", "reqps", "Calls served with default features because the store did not answer.", [
        q(f"sum by (reason) (rate(ctr_degraded_total[{R}])) or sum(rate(ctr_request_seconds_count[{R}])) * 0", "{{reason}}", "A"),
    ]),
    ("Mean prediction by variant", "percentunit", "Mean predicted CTR; variants see the same traffic mix, so lines far apart mean miscalibration.", [
        q(f"sum by (variant) (rate(ctr_prediction_sum{{{V}}}[{R}])) / sum by (variant) (rate(ctr_prediction_count{{{V}}}[{R}]))", "{{variant}}", "A"),
    ]),
    ("Model reloads", "short", "Loads per variant and result in the last hour; a failed load keeps the old version serving.", [
        q(f"sum by (variant, result) (increase(ctr_reload_total{{{V}}}[1h])) or {zero_for('variant')}", "{{variant}} {{result}}", "A"),
    ]),
]

TABLE = (
    "Model version and provider",
    "The package each variant serves and the onnxruntime provider really in use, per pod.",
    q(f"max by (instance, variant, name, version, provider) (ctr_model_info{{{V}}})", "", "A", instant=True),
)


def panel(pid: int, title: str, unit: str, desc: str, targets: list[dict], x: int, y: int) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 8}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets,
    }


def build() -> dict:
    panels = []
    title, desc, target = TABLE
    panels.append({
        "id": 1, "type": "table", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": 5, "w": 24, "x": 0, "y": 0},
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "targets": [target],
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
    })
    for i, (t, unit, d, targets) in enumerate(PANELS):
        panels.append(panel(i + 2, t, unit, d, targets, x=(i % 3) * 8, y=5 + (i // 3) * 8))
    return {
        "uid": "ctr-serve",
        "title": "ctr-serve",
        "description": "Online CTR scoring: traffic, latency and errors by A/B variant, batcher, features, models.",
        "tags": ["ctr-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "ctr-prometheus"}, "hide": 0},
            {"name": "variant", "label": "Variant", "type": "query", "datasource": DS,
             "query": {"query": "label_values(ctr_model_info, variant)", "refId": "variant"},
             "definition": "label_values(ctr_model_info, variant)",
             "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2,
             "current": {"text": ["All"], "value": ["$__all"]}, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
