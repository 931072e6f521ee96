"""`control/`: requests from `relay queue` to the relay running on the spool.

A request is written as `<name>.tmp` and renamed `<name>.req`; the relay writes
its answer as `<name>.tmp`, renames it `<name>.done` and removes the `.req`.
Renames make each file appear whole, so neither side reads half a record.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from relay.records import ControlAnswer, ControlRequest, parse_control_answer, parse_control_request
from relay.spool.store import Spool

ANSWER_POLL = 0.05  # seconds between looks for the answer


def ask(spool: Spool, request: ControlRequest, wait: float) -> ControlAnswer | None:
    """Leave a request for the running relay; its answer, or None after `wait` seconds
    (the request is then withdrawn)."""
    return ask_all(spool, [request], wait)[0]


def ask_all(
    spool: Spool, requests: list[ControlRequest], wait: float
) -> list[ControlAnswer | None]:
    """Leave several requests at once (the relay carries out all that wait, in order, in
    one pass); their answers, None for each not answered within `wait` s (withdrawn)."""
    names = []
    for request in requests:
        name = f"{time.time_ns()}-{secrets.token_hex(4)}"
        tmp = spool.control / f"{name}.tmp"
        tmp.write_text(request.to_json())
        os.rename(tmp, spool.control / f"{name}.req")
        names.append(name)
    answers: dict[str, ControlAnswer] = {}
    deadline = time.monotonic() + wait
    while True:
        for name in names:
            done = spool.control / f"{name}.done"
            if name not in answers and done.exists():
                answers[name] = parse_control_answer(done.read_bytes())
                done.unlink(missing_ok=True)
        if len(answers) == len(names) or time.monotonic() >= deadline:
            break
        time.sleep(ANSWER_POLL)
    for name in names:
        if name not in answers:
            (spool.control / f"{name}.req").unlink(missing_ok=True)
    return [answers.get(name) for name in names]


def pending(spool: Spool) -> list[Path]:
    """The requests waiting for an answer, oldest first."""
    return sorted(spool.control.glob("*.req"))


def read(path: Path) -> ControlRequest:
    """One waiting request; FileNotFoundError when it was withdrawn meanwhile."""
    return parse_control_request(path.read_bytes())


def answer(path: Path, reply: ControlAnswer) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(reply))
    os.rename(tmp, path.with_suffix(".done"))
    path.unlink(missing_ok=True)
