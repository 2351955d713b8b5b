"""Who trains a run right now: a lease in the run's own tags, so two processes never train
(or resume) the same run at once, and a dead owner's claim runs out by itself.

The owner writes ``normlab.owner`` and ``normlab.lease_until`` and renews them from a
background thread while it trains. Another process that sees a lease of someone else's
that has not run out refuses the run. Two processes taking the same free run at the same
moment both write, wait a little and read back: the one whose write was last keeps it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from mlflow.tracking import MlflowClient

from normlab.errors import LeaseHeld

OWNER_TAG = "normlab.owner"
UNTIL_TAG = "normlab.lease_until"
SETTLE_S = 0.5  # time between writing a lease and reading it back


def lease_seconds() -> float:
    """How long a lease lasts unless renewed (renewed every third of it)."""
    return float(os.environ.get("NORMLAB_LEASE_SECONDS", "60"))


OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder(tags: dict[str, str], now: float | None = None) -> str | None:
    """The owner of a lease that has not run out, other than this thread; else None. An owner
    on this host whose process is gone holds nothing (no need to wait for the lease to lapse)."""
    owner, until = tags.get(OWNER_TAG), float(tags.get(UNTIL_TAG) or 0)
    if owner and owner != _owner() and until > (now or time.time()) and not _dead_here(owner):
        return owner
    return None


def _dead_here(owner: str) -> bool:
    """Whether the owner ran on this host in a process that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _owner() -> str:
    return f"{OWNER}:{threading.get_ident()}"


def check_free(run_id: str, client: MlflowClient | None = None) -> None:
    """Raise LeaseHeld when another live process trains the run."""
    client = client or MlflowClient()
    other = holder(client.get_run(run_id).data.tags)
    if other:
        raise LeaseHeld(f"run {run_id} is being trained by another process ({other}); wait for it to "
                        f"end, or, if that process is gone, for its lease to run out "
                        f"(at most {lease_seconds():.0f} s)")


class Lease:
    """This thread's claim on a run, renewed until ``release``."""

    def __init__(self, run_id: str, contested: bool = True):
        """``contested=False`` for a run this process just created: nobody else can race for it."""
        self.run_id = run_id
        self.client = MlflowClient()
        self.owner = _owner()
        self.stopped = threading.Event()
        if contested:
            check_free(run_id, self.client)
        self._write()
        if contested:
            time.sleep(SETTLE_S)
            if self.client.get_run(run_id).data.tags.get(OWNER_TAG) != self.owner:
                check_free(run_id, self.client)  # someone else's write came last
        self.thread = threading.Thread(target=self._renew, name=f"lease-{run_id[:8]}", daemon=True)
        self.thread.start()

    def _write(self, until: float | None = None) -> None:
        self.client.set_tag(self.run_id, OWNER_TAG, self.owner)
        self.client.set_tag(self.run_id, UNTIL_TAG, f"{until if until is not None else time.time() + lease_seconds():.1f}")

    def _renew(self) -> None:
        while not self.stopped.wait(lease_seconds() / 3):
            try:
                self._write()
            except Exception:  # an outage: the run's own calls report it; the lease may lapse
                pass

    def release(self) -> None:
        """End the lease at once (best effort: a store that is down lets it run out)."""
        self.stopped.set()
        try:
            self._write(until=0)
        except Exception:
            pass


def break_lease(run_id: str) -> None:
    """End the lease of an owner known to be dead (its worker process or node died)."""
    try:
        MlflowClient().set_tag(run_id, UNTIL_TAG, "0")
    except Exception:  # the retry then waits for the lease to run out
        pass
