"""ctr-serve load test: realistic /score traffic, per-variant stats, A/B split check, SLO gate.

A rollout engineer proving a variant before it takes traffic (see docs/operations.md):

    locust -f loadtests/locustfile.py,loadtests/shape_step.py --headless \\
        --host http://ctr-serve.ctr.svc:80 \\
        --users-table data/users.parquet --items-table data/items.parquet \\
        --spec models/ctr/7/feature_spec.json --variant treatment \\
        --slo-p99-ms 50 --slo-max-error-rate 0.005 --slo-min-rows-per-s 20000 \\
        --csv out/treatment --summary-json out/treatment.json

Locust exits non-zero when the SLO (or, with --ab-weights/--ab-config, the A/B split) fails.
Each variant gets its own stats row, named "/score [<variant>]" after the variant that
actually answered. Without a shape file, -u/-r/-t set a constant load.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from locust import FastHttpUser, constant, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.slo import SLO, VariantTally, parse_weights, render_table, verdict, weights_from_config  # noqa: E402
from loadtests.traffic import TrafficConfig, TrafficGenerator  # noqa: E402

_state: dict = {"tally": VariantTally(), "start": None, "lock": threading.Lock(), "gen": None}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("ctr-serve traffic")
    g.add_argument("--users-table", env_var="CTR_LT_USERS_TABLE", default="data/users.parquet", help="users table (parquet/csv) with user_id")
    g.add_argument("--items-table", env_var="CTR_LT_ITEMS_TABLE", default="data/items.parquet", help="items table (parquet/csv) with item_id")
    g.add_argument("--spec", env_var="CTR_LT_SPEC", default="", help="a package's feature_spec.json: context values are drawn from it")
    g.add_argument("--zipf-users", type=float, default=1.05)
    g.add_argument("--zipf-items", type=float, default=1.1)
    g.add_argument("--min-items", type=int, default=20, help="fewest candidates per request")
    g.add_argument("--max-items", type=int, default=500, help="most candidates per request")
    g.add_argument("--cold-item-frac", type=float, default=0.01, help="share of candidates unknown to the store")
    g.add_argument("--variant", default="", help="send every request to this variant (explicit override)")
    g.add_argument("--think-ms", type=float, default=0.0, help="pause between a user's requests")
    g.add_argument("--seed", type=int, default=0)
    gate = parser.add_argument_group("SLO gate")
    gate.add_argument("--slo-p99-ms", type=float, default=50.0)
    gate.add_argument("--slo-max-error-rate", type=float, default=0.005)
    gate.add_argument("--slo-min-rows-per-s", type=float, default=0.0)
    gate.add_argument("--slo-min-requests", type=int, default=1)
    gate.add_argument("--ab-weights", default="", help="expected split, e.g. control=95,treatment=5")
    gate.add_argument("--ab-config", default="", help="read the expected split from a ctr-serve config file")
    gate.add_argument("--summary-json", default="", help="write the per-variant summary and verdict here")
    shape = parser.add_argument_group("load shapes (shape_*.py)")
    shape.add_argument("--peak-users", type=int, default=20)
    shape.add_argument("--ramp-s", type=float, default=60.0)
    shape.add_argument("--hold-s", type=float, default=60.0)
    shape.add_argument("--step-users", type=int, default=5)
    shape.add_argument("--step-s", type=float, default=30.0)
    shape.add_argument("--soak-s", type=float, default=3600.0)


def _generator(opts) -> TrafficGenerator:
    with _state["lock"]:
        if _state["gen"] is None:
            _state["gen"] = TrafficGenerator(
                TrafficConfig(
                    users_table=opts.users_table,
                    items_table=opts.items_table,
                    spec=opts.spec or None,
                    zipf_users=opts.zipf_users,
                    zipf_items=opts.zipf_items,
                    min_items=opts.min_items,
                    max_items=opts.max_items,
                    cold_item_frac=opts.cold_item_frac,
                    seed=opts.seed,
                )
            )
        return _state["gen"]


@events.init.add_listener
def _preload(environment, runner=None, **_kw) -> None:
    """Load the tables at init: locust starts the --run-time clock before test_start fires, so
    loading them there spent the first seconds of a short run with no users spawned."""
    from locust.runners import MasterRunner

    if environment.parsed_options is not None and not isinstance(runner, MasterRunner):
        _generator(environment.parsed_options)


@events.test_start.add_listener
def _on_start(environment, **_kw) -> None:
    opts = environment.parsed_options
    _generator(opts)  # already loaded at init, except where init had no options
    _state["tally"] = VariantTally(forced=bool(opts.variant))
    _state["start"] = time.monotonic()


class ScoreUser(FastHttpUser):
    """One ranking-tier caller: POST /score in a loop."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.gen = _generator(opts)
        self.variant = opts.variant or None
        self.pause = max(0.0, opts.think_ms / 1000.0)

    @task
    def score(self) -> None:
        body = self.gen.request(self.variant)
        n = len(body["items"])
        with self.client.post("/score", data=json.dumps(body), headers={"content-type": "application/json"}, name="/score", catch_response=True) as resp:
            variant = self.variant or "unassigned"
            if resp.status_code == 200:
                try:
                    out = json.loads(resp.content)
                    variant = out["variant"]
                    if len(out["scores"]) != n:
                        resp.failure(f"{len(out['scores'])} scores for {n} items")
                    else:
                        _state["tally"].add(variant, body["user_id"], n)
                except (ValueError, KeyError) as exc:
                    resp.failure(f"bad response body: {exc}")
            else:
                resp.failure(f"HTTP {resp.status_code}")
            resp.request_meta["name"] = f"/score [{variant}]"
        if self.pause:
            time.sleep(self.pause)


@events.quitting.add_listener
def _gate(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None or _state["start"] is None:
        return
    elapsed = max(1e-9, time.monotonic() - _state["start"])
    weights = parse_weights(opts.ab_weights) if opts.ab_weights else (weights_from_config(opts.ab_config) if opts.ab_config else {})
    slo = SLO(p99_ms=opts.slo_p99_ms, max_error_rate=opts.slo_max_error_rate, min_rows_per_s=opts.slo_min_rows_per_s, min_requests=opts.slo_min_requests)
    summary = verdict(environment.stats, _state["tally"], elapsed, slo, weights)
    print(render_table(summary), file=sys.stderr)
    if opts.summary_json:
        Path(opts.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.summary_json).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if summary["failures"]:
        for reason in summary["failures"]:
            print(f"SLO gate FAILED: {reason}", file=sys.stderr)
        environment.process_exit_code = 1
    else:
        print(
            f"SLO gate passed: p99 {summary['p99_ms']:.0f} ms, error rate {summary['error_rate']:.4f}, {summary['rows_per_s']:.0f} rows/s",
            file=sys.stderr,
        )
        # The gate, not locust's "any failure at all" rule, decides: a tolerated error rate passes.
        environment.process_exit_code = 0
