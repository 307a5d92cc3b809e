"""Desired vs mounted -> live actions (pure)."""

from __future__ import annotations

from lamina.agent.reconcile import Attach, Detach, Have, Pending, Stale, Want, plan, plan_session


def test_nothing_to_do_when_equal() -> None:
    layers = ("app1@1", "os@1")
    assert plan({"a": Want("a", layers, "w-a")}, {"a": Have("a", layers, "w-a")}) == []


def test_new_entitlements_attach_lowest_priority_first() -> None:
    want = Want("a", ("app3@1", "app2@1", "app1@1", "os@1"))
    have = Have("a", ("app1@1", "os@1"))
    # attach puts a layer on top: app2 first, then app3, which then wins over app2
    assert plan_session(want, have) == [Attach("a", "app2@1"), Attach("a", "app3@1")]


def test_removed_entitlement_detaches_and_new_version_replaces() -> None:
    want = Want("a", ("app1@2", "os@1"))
    have = Have("a", ("app2@1", "app1@1", "os@1"))
    assert plan_session(want, have) == [
        Detach("a", "app2"),
        Detach("a", "app1"),
        Attach("a", "app1@2"),
    ]


def test_base_and_writable_changes_wait_for_the_next_login() -> None:
    want = Want("a", ("app1@1", "os@2"), "w-new")
    have = Have("a", ("app1@1", "os@1"), "w-old")
    assert plan_session(want, have) == [
        Pending("a", "base os@1 -> os@2"),
        Pending("a", "writable layer w-old -> w-new"),
    ]
    # a new base *name* is not attached on top, the old base not detached
    swapped = plan_session(Want("a", ("app1@1", "fedora@1")), Have("a", ("app1@1", "os@1")))
    assert swapped == [Pending("a", "base os@1 -> fedora@1")]


def test_sessions_without_layers_or_gone_at_the_manager() -> None:
    assert plan_session(Want("a", ()), Have("a", ("os@1",))) == [
        Pending("a", "no layers are entitled")
    ]
    wants = {"a": Want("a", ("os@1",))}
    haves = {"a": Have("a", ("os@1",)), "b": Have("b", ("os@1",))}
    assert plan(wants, haves) == [Stale("b")]
    # users the manager lists but this host has not mounted are left to their login
    assert plan({"c": Want("c", ("os@1",))}, {}) == []
