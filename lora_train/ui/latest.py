"""Keep the newest answer of an event that can run more than once at a time.

Several events write the Train tab's plan panel: Check, Estimate, and leaving any dataset field.
gradio 4 runs each listener on its own worker, and our queue lets four events run at once, so a
slow first plan (it imports the dataset code) can finish after the plan for the fields the user set
next and put the old numbers back. Each call takes a ticket when it starts; an answer older than one
already shown is dropped. The tickets are the server's, not a session's: two people planning at the
same moment can drop each other's older answer, never show a wrong one.
"""

from __future__ import annotations

import threading


class Newest:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = 0
        self._shown = 0

    def start(self) -> int:
        with self._lock:
            self._started += 1
            return self._started

    def keep(self, ticket: int) -> bool:
        """Whether the answer of the call holding `ticket` may be shown (nothing newer was)."""
        with self._lock:
            if ticket < self._shown:
                return False
            self._shown = ticket
            return True
