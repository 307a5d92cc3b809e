"""The rule table: defaults, globs, editing, storage (pure)."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidInput, UsageError
from lamina.rebase.rules import Rule, RuleTable


@pytest.mark.parametrize(
    ("path", "rule", "glob"),
    [
        ("home/alice/.bashrc", Rule.USER, "/home/**"),
        ("home", Rule.USER, "/home/**"),
        ("root/.profile", Rule.USER, "/root/**"),
        ("etc/ssh/sshd_config", Rule.MERGE, "/etc/**"),
        ("usr/bin/python3", Rule.ADMIN, "/usr/**"),
        ("bin/sh", Rule.ADMIN, "/bin/**"),
        ("lib/x86_64-linux-gnu/libc.so.6", Rule.ADMIN, "/lib*/**"),
        ("lib64/ld-linux-x86-64.so.2", Rule.ADMIN, "/lib*/**"),
        ("opt/app/bin/run", Rule.ADMIN, "/opt/**"),
        ("var/lib/dpkg/status", Rule.MERGE, "/**"),
        ("homer/x", Rule.MERGE, "/**"),
        ("etcetera", Rule.MERGE, "/**"),
    ],
)
def test_defaults(path: str, rule: Rule, glob: str) -> None:
    assert RuleTable().rule(path) == (rule, glob)


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("/etc/*.conf", "etc/a.conf", True),
        ("/etc/*.conf", "etc/sub/a.conf", False),
        ("/etc/**/*.conf", "etc/sub/deep/a.conf", True),
        ("/etc/ssh/**", "etc/ssh", True),
        ("/etc/ssh/**", "etc/sshd", False),
        ("/var/lib/?pkg/**", "var/lib/dpkg/status", True),
        ("/srv/[ab]*", "srv/alpha", True),
        ("/srv/[!ab]*", "srv/alpha", False),
        ("/srv/[!ab]*", "srv/cat", True),
        ("/weird.(x)+", "weird.(x)+", True),
    ],
)
def test_globs(glob: str, path: str, matches: bool) -> None:
    table = RuleTable.of([(glob, "admin")])
    assert (table.rule(path)[1] == glob) is matches


def test_first_match_wins_and_edits() -> None:
    table = RuleTable().set("/etc/ssh/**", "admin")
    assert table.rules[0] == ("/etc/ssh/**", Rule.ADMIN)
    assert table.rule_of("etc/ssh/key") is Rule.ADMIN and table.rule_of("etc/hosts") is Rule.MERGE
    replaced = table.set("/etc/**", "user")
    assert [g for g, _ in replaced.rules] == [g for g, _ in table.rules]  # in place
    assert replaced.rule_of("etc/hosts") is Rule.USER
    last = table.set("/srv/**", "user", at=100)
    assert last.rules[-1] == ("/srv/**", Rule.USER)
    assert table.remove("/etc/ssh/**") == RuleTable()
    with pytest.raises(UsageError):
        table.remove("/nope/**")
    assert RuleTable.of([]).rule_of("anything") is Rule.MERGE  # no catch-all: merge


def test_storage_round_trip_and_bad_input() -> None:
    table = RuleTable().set("/srv/**", "user")
    assert RuleTable.from_json(table.to_json()) == table
    with pytest.raises(InvalidInput):
        RuleTable.from_json("{not json")
    for bad in [("etc/**", "user"), ("/etc/**", "mine")]:
        with pytest.raises(UsageError):
            RuleTable.of([bad])
    with pytest.raises(UsageError, match="only once"):
        RuleTable.of([("/a", "user"), ("/a", "admin")])
