"""Entitlement resolution (pure): order, dedup, whose grants apply."""

from __future__ import annotations

from lamina.manager.entitlements import Grant, layers_for


def g(user: int | None, via: str, layer: str, priority: int = 100, version: int = 1) -> Grant:
    return Grant(user, via, layer, version, f"m-{layer}-{version}", priority)  # type: ignore[arg-type]


def test_order_priority_then_user_group_machine_then_name() -> None:
    grants = [
        g(None, "machine", "os", 1000),
        g(None, "machine", "tools"),
        g(7, "group", "office"),
        g(7, "user", "zed"),
        g(7, "group", "browser"),
        g(7, "user", "first", 10),
    ]
    order = [x.layer for x in layers_for(7, grants)]
    assert order == ["first", "zed", "browser", "office", "tools", "os"]


def test_one_layer_once_first_entitlement_wins() -> None:
    grants = [g(7, "group", "office", version=2), g(7, "user", "office", version=3)]
    [only] = layers_for(7, grants)
    assert (only.via, only.version) == ("user", 3)


def test_other_users_grants_do_not_apply() -> None:
    grants = [g(8, "user", "secret"), g(8, "group", "team"), g(None, "machine", "os")]
    assert [x.layer for x in layers_for(7, grants)] == ["os"]
    assert [x.layer for x in layers_for(8, grants)] == ["secret", "team", "os"]
