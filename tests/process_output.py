"""A process's output read line by line on a thread, so a test can wait for a line and act
(send a signal, stop a server) at that moment."""

from __future__ import annotations

import re
import threading


class Lines:
    """A process's output read on a thread: every line kept, and a wait for the first line
    (after ``start``) that matches a regular expression."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # the end
            self.changed.notify_all()

    def find(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, re.Match]:
        """(index, match) of the first line from index ``start`` on that matches ``pattern``."""
        def found():
            for index in range(start, len(self.lines)):
                if self.lines[index] is None:
                    raise AssertionError(f"the process ended with no line matching {pattern!r}:\n{self.text[-4000:]}")
                match = re.search(pattern, self.lines[index])
                if match:
                    return index, match
            return None
        with self.changed:
            hit = self.changed.wait_for(found, timeout)
        assert hit, f"no line matching {pattern!r} within {timeout} s:\n{self.text[-4000:]}"
        return hit

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        return self.find(pattern, timeout, start)[1]

    @property
    def text(self) -> str:
        return "".join(line for line in self.lines if line is not None)
