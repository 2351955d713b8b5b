"""normlab: normalization experiments on small CNNs, tracked in MLflow."""

__version__ = "0.1.0"

import time as _time

IMPORTED_AT = _time.time()  # about when the command started: what the sweep's timings count from
