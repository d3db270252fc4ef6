"""Load shapes for a rollout: ramp, step and soak. Each is picked by adding its file to -f:

    locust -f loadtests/locustfile.py,loadtests/shape_ramp.py  --headless ...   # find the knee
    locust -f loadtests/locustfile.py,loadtests/shape_step.py  --headless ...   # staircase
    locust -f loadtests/locustfile.py,loadtests/shape_soak.py  --headless ...   # hours at peak

Their sizes come from the locustfile's options (--peak-users, --ramp-s, --hold-s, --step-users,
--step-s, --soak-s) and -r (spawn rate). Every shape ends by itself. The user counts over
time are the functions in profiles.py.
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.profiles import ramp_users, soak_users, step_users


class _Shape(LoadTestShape):
    abstract = True

    def opt(self, name: str, default):
        opts = getattr(self.runner.environment, "parsed_options", None) if self.runner else None
        value = getattr(opts, name, None) if opts is not None else None
        return default if value is None else value

    def result(self, users: int | None, per_s: float):
        if users is None:
            return None
        return users, float(self.opt("spawn_rate", 0) or max(1.0, per_s))


class RampShape(_Shape):
    """Linear from 0 to --peak-users over --ramp-s, hold --hold-s: shows where p99 bends."""

    abstract = False

    def tick(self):
        peak = int(self.opt("peak_users", 20))
        return self.result(ramp_users(self.get_run_time(), peak, float(self.opt("ramp_s", 60)), float(self.opt("hold_s", 60))), peak)


class StepShape(_Shape):
    """+--step-users every --step-s up to --peak-users, then one more step at the peak."""

    abstract = False

    def tick(self):
        step = int(self.opt("step_users", 5))
        return self.result(step_users(self.get_run_time(), int(self.opt("peak_users", 20)), step, float(self.opt("step_s", 30))), step)


class SoakShape(_Shape):
    """Ramp to --peak-users over --ramp-s, then hold for --soak-s: leaks, drift, slow growth."""

    abstract = False

    def tick(self):
        peak = int(self.opt("peak_users", 20))
        return self.result(soak_users(self.get_run_time(), peak, float(self.opt("ramp_s", 60)), float(self.opt("soak_s", 3600))), peak)
