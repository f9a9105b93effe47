"""Topic names and who may read them (issue 13): one module builds the names, ``Principal.may_read``
answers for every role."""

from __future__ import annotations

import pytest

from dispatchd.core import topics
from dispatchd.core.auth import Principal, Role
from dispatchd.core.errors import Forbidden

ADMIN = Principal("key_a", Role.ADMIN)
INTEGRATION = Principal("key_i", Role.INTEGRATION)
DRIVER = Principal("key_d", Role.DRIVER, subject=topics.driver("drv_1"))


def test_topic_names_are_kind_colon_id():
    assert topics.booking("bkg_1") == "booking:bkg_1"
    assert topics.driver("drv_1") == "driver:drv_1"
    assert topics.resource("res_1") == "resource:res_1"
    assert topics.conversation("cnv_1") == "conversation:cnv_1"
    assert topics.agent("agt_1") == "agent:agt_1"
    assert topics.split("driver:drv_1") == ("driver", "drv_1")
    with pytest.raises(ValueError):
        topics.split("driver")


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("booking:*", "booking:bkg_1", True),
        ("booking:*", "driver:drv_1", False),
        ("*", "resource:res_1", True),
        ("booking:bkg_1", "booking:bkg_1", True),
        ("booking:bkg_1", "booking:bkg_12", False),
        ("booking:bkg_1*", "booking:bkg_12", True),
    ],
)
def test_patterns(pattern, name, expected):
    assert topics.matches(pattern, name) is expected


@pytest.mark.parametrize("who", [ADMIN, INTEGRATION])
def test_staff_read_every_topic_and_patterns(who):
    for name in ("booking:bkg_1", "driver:drv_2", "resource:res_1", "booking:*", "*"):
        assert who.may_read(name)
    assert not who.may_read("not a topic")
    assert who.readable(None) == []  # everything


def test_a_driver_key_reads_only_its_own_topic():
    assert DRIVER.driver_id == "drv_1"
    assert DRIVER.may_read("driver:drv_1")
    for name in ("driver:drv_2", "booking:bkg_1", "driver:*", "*", "driver:drv_1*"):
        assert not DRIVER.may_read(name), name
    assert DRIVER.readable(None) == ["driver:drv_1"]
    with pytest.raises(Forbidden, match="driver:drv_2"):
        DRIVER.readable(["driver:drv_1", "driver:drv_2"])


def test_a_subject_bound_key_acts_only_as_its_subject():
    DRIVER.require_driver("drv_1")
    with pytest.raises(Forbidden):
        DRIVER.require_driver("drv_2")
    ADMIN.require_driver("drv_2")


def test_staff_read_topics_of_ids_with_dots_and_colons():
    for name in ("resource:room.1", "resource:site:a", "resource:room.*"):
        assert ADMIN.may_read(name), name
    assert not ADMIN.may_read("booking:*x")  # a star only at the end
    assert not ADMIN.may_read("booking:" + "x" * 200)  # longer than the event log's column
    assert not DRIVER.may_read("resource:room.1")
