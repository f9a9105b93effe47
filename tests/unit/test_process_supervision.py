"""``dispatchd worker``'s supervision rules and the drain rate shared by the processes of one command."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from limits import parse

from dispatchd.cli.worker import Child, Supervisor
from dispatchd.core.serving import share_rate


@pytest.mark.parametrize(
    ("rate", "processes", "share"),
    [
        ("80/second", 1, "80/second"),
        ("80/second", 2, "40 per 1 second"),
        ("80/second", 3, "26 per 1 second"),  # rounded down: 78 ≤ 80 together
        ("5 per 2 minutes", 10, "1 per 2 minute"),  # never 0: at least one each
        ("", 4, ""),
        (None, 4, None),
    ],
)
def test_a_process_drains_its_share_of_the_channel_rate(rate, processes, share):
    assert share_rate(rate, processes) == share
    if share and processes > 1:
        parse(share)  # the limits syntax the delivery lanes read


def supervisor(*children: Child) -> Supervisor:
    found = Supervisor(len(children), {}, None, stop_timeout_s=1)
    found.children = list(children)
    found.started = []
    found.start = lambda index: found.started.append(index) or Child(index, alive(), started())
    return found


def alive():
    return SimpleNamespace(exitcode=None, pid=1000)


def dead(code: int):
    return SimpleNamespace(exitcode=code, pid=1001)


def started() -> threading.Event:
    ready = threading.Event()
    ready.set()
    return ready


def test_a_child_that_dies_after_it_started_is_replaced():
    watched = supervisor(Child(0, alive(), started()), Child(1, dead(-9), started()))
    watched.keep_alive()
    assert watched.started == [1] and watched.children[1].process.exitcode is None
    assert not watched.failed and not watched.stopping.is_set()


def test_a_child_that_fails_before_it_started_stops_the_worker_with_exit_1():
    watched = supervisor(Child(0, alive(), started()), Child(1, dead(3), threading.Event()))
    watched.keep_alive()
    assert watched.started == [] and watched.failed and watched.stopping.is_set()
