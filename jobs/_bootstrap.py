"""Makes `pipeline` importable when a job runs as `python jobs/NAME.py` from any directory
(Ray's --working-dir included), without requiring the package to be installed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
