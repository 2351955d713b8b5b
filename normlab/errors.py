"""Every error normlab reports to a user: each names the problem and what to do, and is
raised before any expensive work where it can be."""


class ConfigError(ValueError):
    """A user-supplied setting that cannot work; raised before any expensive work."""


class NoGpuHere(ConfigError):
    """--device names a CUDA GPU this machine does not have."""

    def __init__(self, requested: str, gpus: int, hidden_note: str = ""):
        why = f" ({hidden_note})" if hidden_note else ""
        if gpus == 0:
            super().__init__(f"--device {requested} was requested but no CUDA GPU is available here{why}; "
                             f"use --device cpu or auto")
        else:
            which = "1 CUDA GPU (cuda:0)" if gpus == 1 else f"{gpus} CUDA GPUs (cuda:0 to cuda:{gpus - 1})"
            where = "CUDA sees" if hidden_note else "this machine has"
            super().__init__(f"--device {requested} was requested but {where} {which}{why}; "
                             f"use one of them, cuda, cpu or auto")


class DataError(RuntimeError):
    """Data that is missing, unreadable or corrupt; the message says how to fix it."""


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite: training diverged and cannot recover."""


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer; the message says which URI and what to do."""


class SelectionError(LookupError):
    """The runs asked for cannot be compared (none match, unknown name, bad filter)."""


class ResumeError(RuntimeError):
    """The run cannot be continued (no such run, no checkpoint, nothing left to do)."""


class LeaseHeld(RuntimeError):
    """Another live process trains this run."""
