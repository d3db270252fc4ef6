"""Ramp load shape for the ctr-serve locustfile (see loadtests/shapes.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.shapes import RampShape  # noqa: E402,F401  (locust picks up the imported class)
