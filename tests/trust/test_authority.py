"""The home's CA and the credentials it issues, checked by real TLS handshakes (OpenSSL,
through in-memory BIOs) and against the database."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from lamina.errors import InvalidInput
from lamina.home import Home
from lamina.manager.services import credentials, machines
from lamina.trust.authority import CA_CERT, CA_KEY, Authority, Issued, install, load_copy
from lamina.trust.contexts import client_context, server_context
from lamina.trust.principal import Kind, presented
from tests.conftest import Cli


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, host: str
) -> tuple[bytes | None, str | None]:
    """A TLS handshake between two contexts in memory: (the client certificate the server
    saw, the error), like a socket would give, without one."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=host)
    done = {"s": False, "c": False}
    for _ in range(20):
        for side, obj, out, into in (("c", cli, c_out, s_in), ("s", srv, s_out, c_in)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    return None, f"{side}: {exc.reason or exc}"
            if out.pending:
                into.write(out.read())
        if all(done.values()):
            # TLS 1.3: the server's verdict on the client's certificate comes after the
            # client thinks it is done; one more read surfaces it.
            try:
                cli.write(b"x")
                s_in.write(c_out.read())
                srv.read(1)
            except ssl.SSLError as exc:
                return None, f"s: {exc.reason or exc}"
            return srv.getpeercert(binary_form=True), None
    return None, "no progress"


def client_with(ca: Path, issued: Issued | None, tmp_path: Path) -> ssl.SSLContext:
    context = client_context(ca)
    if issued is not None:
        (tmp_path / "c.pem").write_bytes(issued.cert_pem)
        (tmp_path / "k.pem").write_bytes(issued.key_pem)
        context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    return context


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority.open(tmp_path / "tls")


def test_the_ca_is_made_once_with_a_private_key(ca: Authority, tmp_path: Path) -> None:
    assert (ca.directory / CA_KEY).stat().st_mode & 0o777 == 0o600
    again = Authority.open(tmp_path / "tls")
    assert again.cert == ca.cert
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca


def test_a_copied_ca_is_checked_then_installed_whole(ca: Authority, tmp_path: Path) -> None:
    cert_pem, key_pem = load_copy(ca.directory)
    target = tmp_path / "joined" / "tls"
    assert install(target, cert_pem, key_pem) and not install(target, cert_pem, key_pem)
    assert (target / CA_KEY).stat().st_mode & 0o777 == 0o600
    assert target.stat().st_mode & 0o777 == 0o700
    assert Authority.open(target).cert == ca.cert
    # a server certificate is no CA; another CA's key is not this one's
    cert, key = ca.server_certificate(["127.0.0.1"])
    leaf = tmp_path / "leaf"
    leaf.mkdir()
    (leaf / CA_CERT).write_bytes(cert.read_bytes())
    (leaf / CA_KEY).write_bytes(key.read_bytes())
    (leaf / CA_KEY).chmod(0o600)
    with pytest.raises(InvalidInput, match="not a certificate authority"):
        load_copy(leaf)
    other = Authority.open(tmp_path / "other")
    (leaf / CA_CERT).write_bytes(ca.cert_pem)
    (leaf / CA_KEY).write_bytes((other.directory / CA_KEY).read_bytes())
    with pytest.raises(InvalidInput, match="is not the key of"):
        load_copy(leaf)
    # a folder holding another CA is not overwritten
    with pytest.raises(InvalidInput, match="holds another certificate authority"):
        install(other.directory, cert_pem, key_pem)
    assert Authority.open(other.directory).cert == other.cert


def test_server_certificate_names_every_address(ca: Authority, tmp_path: Path) -> None:
    cert, key = ca.server_certificate(["10.1.2.3", "127.0.0.1", "::1", "boot.example"])
    server = server_context(cert, key, ca.directory / CA_CERT)
    for host in ("127.0.0.1", "::1", "10.1.2.3", "boot.example"):
        _, error = handshake(server, client_with(ca.directory, None, tmp_path), host)
        assert error is None, (host, error)
    _, error = handshake(server, client_with(ca.directory, None, tmp_path), "10.9.9.9")
    assert error is not None and "CERTIFICATE_VERIFY_FAILED" in error


def test_server_certificate_is_kept_while_it_covers_the_names(ca: Authority) -> None:
    cert, _ = ca.server_certificate(["127.0.0.1", "10.0.0.1"])
    first = cert.read_bytes()
    ca.server_certificate(["10.0.0.1"])
    assert cert.read_bytes() == first
    ca.server_certificate(["10.0.0.2"])
    assert cert.read_bytes() != first


def test_client_certificates_chain_to_the_ca_and_expire(ca: Authority, tmp_path: Path) -> None:
    cert, key = ca.server_certificate(["127.0.0.1"])
    server = server_context(cert, key, ca.directory / CA_CERT)
    good = ca.issue_client("machine", "desk-001")
    der, error = handshake(server, client_with(ca.directory, good, tmp_path), "127.0.0.1")
    assert error is None
    shown = presented(der)
    assert shown is not None and (shown.unit, shown.name) == ("machine", "desk-001")
    assert shown.serial == good.serial

    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    expired = ca.issue_client("machine", "desk-001", not_before=past - dt.timedelta(days=2),
                              not_after=past)  # fmt: skip
    _, error = handshake(server, client_with(ca.directory, expired, tmp_path), "127.0.0.1")
    assert error is not None and "s:" in error  # the server refused it

    other = Authority.open(tmp_path / "other-ca")
    stranger = other.issue_client("admin", "admin")
    _, error = handshake(server, client_with(ca.directory, stranger, tmp_path), "127.0.0.1")
    assert error is not None and "s:" in error


def test_a_client_trusting_another_ca_refuses_the_server(ca: Authority, tmp_path: Path) -> None:
    cert, key = ca.server_certificate(["127.0.0.1"])
    other = Authority.open(tmp_path / "other-ca")
    server = server_context(cert, key, None)
    _, error = handshake(server, client_with(other.directory, None, tmp_path), "127.0.0.1")
    assert error is not None and "CERTIFICATE_VERIFY_FAILED" in error


def test_without_a_certificate_the_handshake_passes_and_names_nobody(
    ca: Authority, tmp_path: Path
) -> None:
    cert, key = ca.server_certificate(["127.0.0.1"])
    server = server_context(cert, key, ca.directory / CA_CERT)
    der, error = handshake(server, client_with(ca.directory, None, tmp_path), "127.0.0.1")
    assert error is None and presented(der) is None


@pytest.fixture
def fleet(home: Home, cli: Cli, tmp_path: Path) -> Home:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\1" * 65536)
    cli("image", "import", "base", str(raw))
    cli("machine", "add", "desk-001", "--image", "base")
    cli("machine", "add", "desk-002", "--image", "base")
    return home


def who(home: Home, issued: Issued) -> tuple[Kind, str, str]:
    shown = presented(issued.cert.public_bytes(Encoding.DER))
    with home.session() as session:
        p = credentials.principal_of(session, shown)
    return p.kind, p.name, p.reason


def test_rotation_revokes_the_earlier_credential(fleet: Home) -> None:
    ca = Authority.open(fleet.tls_dir)
    with fleet.session() as session:
        first = credentials.issue(session, ca, Kind.MACHINE, "desk-001")
        also = credentials.issue(session, ca, Kind.MACHINE, "desk-001")
    assert who(fleet, first)[:2] == (Kind.MACHINE, "desk-001")
    assert who(fleet, also)[:2] == (Kind.MACHINE, "desk-001")
    with fleet.session() as session:
        rotated = credentials.issue(session, ca, Kind.MACHINE, "desk-001", rotate=True)
    for old in (first, also):
        kind, _, reason = who(fleet, old)
        assert kind is Kind.NOBODY and "revoked" in reason
    assert who(fleet, rotated)[:2] == (Kind.MACHINE, "desk-001")


def test_a_removed_machine_credential_stays_refused_when_the_name_returns(fleet: Home) -> None:
    ca = Authority.open(fleet.tls_dir)
    with fleet.session() as session:
        issued = credentials.issue(session, ca, Kind.MACHINE, "desk-002")
    machines.remove(fleet, name="desk-002")
    assert who(fleet, issued)[0] is Kind.NOBODY
    with fleet.session() as session:
        machines.add(session, name="desk-002", image="base")
    kind, _, reason = who(fleet, issued)
    assert kind is Kind.NOBODY and "no longer exists" in reason


def test_a_certificate_the_database_never_recorded_is_refused(fleet: Home) -> None:
    ca = Authority.open(fleet.tls_dir)
    forged = ca.issue_client("admin", "admin")  # signed by the CA, never recorded
    kind, _, reason = who(fleet, forged)
    assert kind is Kind.NOBODY and "unknown" in reason
    with fleet.session() as session:
        admin = credentials.issue(session, ca, Kind.ADMIN)
    assert who(fleet, admin)[:2] == (Kind.ADMIN, "admin")
