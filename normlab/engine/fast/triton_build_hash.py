"""Triton's hash of its own build, once per process, on a thread started as soon as the process
knows it will launch Triton kernels, and waited for before the first one.

Triton keys its kernel cache by a hash of its build (libtriton.so's 500 MB among it), which a
process computes at its first kernel: 0.3-0.4 s on an H200's host. hashlib lets go of the
interpreter's lock, so on a thread the hash runs beside torch's import. Triton keeps the key
with functools.lru_cache, which does not wait for a call under way: a first kernel launched
before the thread is done hashes the build a second time beside it. That happened in every
engine process once Dynamo's import left the trainer's build (the thread, then started after
torch's import, had 0.3 s to do it): the prepare took 1.0 s, of which 0.41 s hashing on its own
thread (h200-2026-12-02b-prepare-profile.txt). So the first kernel waits for the thread here."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_thread: threading.Thread | None = None


def start() -> None:
    """Start hashing on a thread, once per process; without Triton, nothing (its first kernel,
    if any, pays the hash). Imports no torch."""
    global _thread
    with _lock:
        if _thread is not None:
            return
        try:
            from triton.runtime.cache import triton_key  # imported here: the thread then only reads and hashes
        except ImportError:
            _thread = threading.Thread(target=lambda: None)  # nothing to hash: a thread done at once
        else:
            def hash_build() -> None:
                try:
                    triton_key()  # kept by its lru_cache for the process's first kernel
                except Exception:  # that kernel meets it again, and reports it
                    pass

            _thread = threading.Thread(target=hash_build, name="normlab-triton-build-hash", daemon=True)
        _thread.start()


def wait() -> None:
    """Before a process's first Triton kernel: the hash, started now if it was not, done."""
    start()
    _thread.join()
