"""The configuration's precedence, each level against the one below it: built-in default <
lamina.toml (LAMINA_CONFIG) < LAMINA_* variables < flags; and a bad file is one line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import LAMINA, Result


def run(tmp_path: Path, *args: str, file: str | None = "", **env: str) -> Result:
    """``lamina ARGS`` with no LAMINA_* variable but ``env``, and ``file`` as lamina.toml."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    if file is not None:
        (tmp_path / "lamina.toml").write_text(file)
        clean["LAMINA_CONFIG"] = str(tmp_path / "lamina.toml")
    clean.update(env)
    proc = subprocess.run(
        [LAMINA, *args], capture_output=True, text=True, env=clean, timeout=120, check=False
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def settings(tmp_path: Path, *args: str, file: str = "", **env: str) -> Any:
    result = run(tmp_path, "config", "show", "--json", *args, file=file, **env)
    assert result.code == 0, result.err
    return result.json()["settings"]


FILE = """
home = "/srv/from-file"
[serve]
nbd = "0.0.0.0:10809"
http = "127.0.0.1:9000"
"""


def test_default_when_nothing_is_set(tmp_path: Path) -> None:
    s = settings(tmp_path, HOME=str(tmp_path))
    assert s["home"] == str(tmp_path / ".local/share/lamina")
    assert s["serve"]["nbd"] == "127.0.0.1:10809" and s["database_url"] is None


def test_the_file_overrides_the_defaults(tmp_path: Path) -> None:
    s = settings(tmp_path, file=FILE)
    assert s["home"] == "/srv/from-file"
    assert s["serve"] == {**s["serve"], "nbd": "0.0.0.0:10809", "http": "127.0.0.1:9000"}


def test_variables_override_the_file_key_by_key(tmp_path: Path) -> None:
    s = settings(
        tmp_path, file=FILE, LAMINA_HOME="/srv/from-env", LAMINA_SERVE__HTTP="127.0.0.1:9001"
    )
    assert s["home"] == "/srv/from-env"
    # one key of [serve] from the variable, the other still from the file
    assert (s["serve"]["nbd"], s["serve"]["http"]) == ("0.0.0.0:10809", "127.0.0.1:9001")


def test_flags_override_the_variables(tmp_path: Path) -> None:
    s = settings(tmp_path, "--home", "/srv/from-flag", file=FILE, LAMINA_HOME="/srv/from-env")
    assert s["home"] == "/srv/from-flag"


def test_a_command_uses_the_home_of_the_file(tmp_path: Path) -> None:
    home = tmp_path / "configured"
    assert run(tmp_path, "init", file=f'home = "{home}"\n').code == 0
    assert (home / "home.json").exists()
    assert run(tmp_path, "image", "list", file=f'home = "{home}"\n').code == 0


def test_the_token_is_not_printed(tmp_path: Path) -> None:
    assert settings(tmp_path, LAMINA_TOKEN="s3cret")["token"] == "(set)"
    assert "s3cret" not in run(tmp_path, "config", "show", LAMINA_TOKEN="s3cret").out


def test_bad_configuration_is_one_line(tmp_path: Path) -> None:
    for file, env, says in [
        ("home = [", {}, "not valid TOML"),
        ("hme = '/x'\n", {}, "hme: Extra inputs are not permitted"),
        ("[serve]\nworkers = 'many'\n", {}, "serve.workers"),
        ("", {"LAMINA_SERVE__WORKERS": "many"}, "LAMINA_SERVE__WORKERS"),
    ]:
        result = run(tmp_path, "image", "list", file=file, **env)
        assert result.code == 2 and says in result.err, (file, result.err)
        assert len(result.err.strip().splitlines()) == 1
    missing = run(tmp_path, "image", "list", file=None, LAMINA_CONFIG=str(tmp_path / "no.toml"))
    assert missing.code == 2 and "no such configuration file" in missing.err


def test_only_the_settings_read_lamina_variables() -> None:
    """Every LAMINA_* variable is read by lamina.settings (file < variable < flag); no
    module reads one from os.environ, nor a typer option by envvar=."""
    src = Path(__file__).resolve().parents[2] / "src" / "lamina"
    reads = re.compile(r"(environ|getenv|envvar=)[^\n]*LAMINA_")
    found = [
        f"{path.relative_to(src)}: {match.group(0)}"
        for path in src.rglob("*.py")
        if path.parent.name != "settings"
        for match in reads.finditer(path.read_text())
    ]
    assert not found, found


def test_serve_listens_where_the_file_and_variables_say(tmp_path: Path) -> None:
    """lamina serve with no flag: NBD on the file's port, HTTP on the variable's (which
    beats the file's); a flag beats both (--no-nbd)."""
    from tests.servers import free_port, wait_port

    nbd, http_file, http_env = free_port(), free_port(), free_port()
    (tmp_path / "lamina.toml").write_text(
        f'home = "{tmp_path / "home"}"\n[serve]\n'
        f'nbd = "127.0.0.1:{nbd}"\nhttp = "127.0.0.1:{http_file}"\nworkers = 0\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    env |= {"LAMINA_CONFIG": str(tmp_path / "lamina.toml")}
    env |= {"LAMINA_SERVE__HTTP": f"127.0.0.1:{http_env}"}
    subprocess.run([LAMINA, "init"], env=env, check=True, capture_output=True)
    for flags, ports in (((), (nbd, http_env)), (("--no-nbd",), (http_env,))):
        log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([LAMINA, "serve", *flags], env=env, stdout=log, stderr=log)
        try:
            for port in ports:
                wait_port(port, proc, timeout=60)
            with socket.socket() as s:  # the file's HTTP port was overridden: free
                s.bind(("127.0.0.1", http_file))
            if flags:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", nbd))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
