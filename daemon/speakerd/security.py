"""Who may connect: loopback and ipc by default, CURVE keys for anything else.

Who is speaking, and the power to rename or forget voiceprints, are private. So a socket bound to
anything but loopback or ipc must use CURVE (encryption and client authentication through
``zmq.auth``), and ipc sockets must sit in a directory only this user can enter (0700), since the
socket file's own mode is not honoured everywhere. The control socket goes further: every local
user can reach loopback tcp and a Linux abstract ipc name (``ipc://@name``, which has no file and
so no directory to guard), so it binds those only with CURVE. Keys are made with ``zmq.auth`` and stored 0600
in a 0700 directory; clients allowed in are the public keys in ``authorized/``, and the daemon's
own key pair (so ``speakerd speakers`` on its machine can use ``daemon.curve_keys``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import SpeakerdError
from .paths import data_dir, ensure_private_dir

logger = logging.getLogger(__name__)

KEY_FILE_MODE = 0o600
SERVER = "server"
AUTHORIZED = "authorized"


class SecurityError(SpeakerdError):
    """An endpoint or key set-up that would expose speaker data; the message says what to do."""

    exit_code = 2


def default_keys_dir() -> Path:
    return data_dir() / "keys"


def is_local_endpoint(endpoint: str) -> bool:
    """ipc, inproc, or tcp on a loopback address: nothing another machine can reach.

    The tcp host must be ``localhost`` or a loopback literal (127.x.x.x, [::1]) as a whole: a
    name that merely starts like one (``localhost.example.net``, ``127.0.0.1.example.net``) is
    another machine."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def is_abstract_ipc(endpoint: str) -> bool:
    """``ipc://@name``: a Linux abstract socket, with no file whose directory could keep others out."""
    return endpoint.startswith("ipc://@")


def wants_ipv6(endpoint: str) -> bool:
    """Whether a tcp endpoint names an IPv6 literal (``tcp://[::1]:5560``), which ZeroMQ binds or
    connects only with ``zmq.IPV6`` set."""
    return endpoint.startswith("tcp://[")


def secure_ipc_dir(endpoint: str) -> None:
    """Make the directory of an ipc socket 0700 if it is new; refuse one others can enter."""
    if not endpoint.startswith("ipc://") or is_abstract_ipc(endpoint):
        return
    parent = Path(endpoint[len("ipc://") :]).expanduser().parent
    if not parent.exists():
        ensure_private_dir(parent)
        return
    mode = stat.S_IMODE(parent.stat().st_mode)
    if mode & 0o077:
        raise SecurityError(
            f"ipc socket directory {parent} is mode {mode:o}; other users could connect. "
            f"Use a directory that is 0700 (e.g. the default under {default_keys_dir().parent})"
        )


def prepare_endpoint(endpoint: str, curve: object | None, *, what: str) -> None:
    """Check an endpoint before binding: ipc in a private directory; non-local only with CURVE."""
    secure_ipc_dir(endpoint)
    if not is_local_endpoint(endpoint) and curve is None:
        raise SecurityError(
            f"the {what} endpoint {endpoint} is reachable from other machines; that needs CURVE keys "
            f"(`speakerd keys generate`; see docs/control.md), or bind 127.0.0.1 or ipc://"
        )


def prepare_control_endpoint(endpoint: str, curve: object | None) -> None:
    """``prepare_endpoint`` for the control socket, where any other local user must be kept out
    too: tcp (loopback included) and abstract ipc only with CURVE."""
    prepare_endpoint(endpoint, curve, what="control")
    if curve is not None:
        return
    if is_abstract_ipc(endpoint):
        reach = "an abstract ipc name, which every local user can connect to"
    elif endpoint.startswith("tcp://"):
        reach = "tcp, which every local user can connect to"
    else:
        return
    raise SecurityError(
        f"the control endpoint {endpoint} is {reach} and rename or forget voiceprints; use an ipc:// "
        "path in a 0700 directory (the default, control.endpoint unset) or set daemon.curve_keys "
        "(see docs/control.md)"
    )


def require_curve_to_connect(endpoint: str, curve: object | None, *, what: str, option: str) -> None:
    """Check an endpoint before connecting: a daemon binds a non-local one only with CURVE, so a
    client without keys would wait for a handshake that never happens. Refuse at once, naming the
    option that supplies the keys."""
    if not is_local_endpoint(endpoint) and curve is None:
        raise SecurityError(
            f"the {what} endpoint {endpoint} is not loopback or ipc, so the daemon there only admits "
            f"CURVE clients: pass {option} (a directory with this client's client.key_secret and the "
            f"daemon's server.key; see docs/control.md)"
        )


def _private_file(path: Path) -> None:
    os.chmod(path, KEY_FILE_MODE)


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """A new CURVE key pair ``name.key`` (public) and ``name.key_secret`` in a 0700 directory, 0600."""
    ensure_private_dir(directory)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    for p in (public, secret):
        _private_file(Path(p))
    return Path(public), Path(secret)


def _key_dir(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise SecurityError(
            f"CURVE key directory {directory} does not exist (keys are made with `speakerd keys generate`; see docs/control.md)"
        )
    if not directory.is_dir():
        raise SecurityError(f"CURVE key directory {directory} is not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise SecurityError(f"CURVE key directory {directory} cannot be read by this user")
    return directory


def _read_certificate(path: Path, *, hint: str) -> tuple[bytes, bytes | None]:
    """zmq.auth's (public, secret) of a key file, with SecurityError (not OSError/ValueError) for
    a file that is missing, unreadable or not a ZeroMQ certificate."""
    if not path.is_file():
        raise SecurityError(f"no CURVE key {path}; {hint}")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read CURVE key {path}: {e}") from None
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise SecurityError(f"CURVE key {path} is not a 40-character Z85 key; regenerate it with `speakerd keys generate`")
    return public, secret


def load_keypair(directory: Path, name: str) -> tuple[bytes, bytes]:
    """(public, secret) of ``name``; SecurityError if missing, unreadable or readable by others."""
    secret_path = _key_dir(directory) / f"{name}.key_secret"
    hint = f"create it with `speakerd keys generate --dir {directory}" + ("`" if name == SERVER else f" --name {name}`")
    try:
        mode = stat.S_IMODE(secret_path.stat().st_mode)
    except FileNotFoundError:
        raise SecurityError(f"no CURVE key {secret_path}; {hint}") from None
    except OSError as e:
        raise SecurityError(f"cannot read CURVE key {secret_path}: {e.strerror}") from None
    if mode & 0o077:
        raise SecurityError(f"CURVE secret key {secret_path} is mode {mode:o}; it must be 0600")
    public, secret = _read_certificate(secret_path, hint=hint)
    if secret is None:
        raise SecurityError(f"{secret_path} holds no secret key")
    return public, secret


def load_public_key(path: Path) -> bytes:
    public, _ = _read_certificate(Path(path), hint="copy the daemon's server.key here")
    return public


@dataclass
class CurveServer:
    """Server side of CURVE: the daemon's key pair, and the authenticator that admits only the
    public keys in ``<keys>/authorized/``. ``start`` runs zmq.auth's thread; ``close`` stops it."""

    keys_dir: Path

    def __post_init__(self) -> None:
        self.public, self.secret = load_keypair(self.keys_dir, SERVER)
        self.authorized = ensure_private_dir(Path(self.keys_dir) / AUTHORIZED)
        self._auth: ThreadAuthenticator | None = None

    def start(self, context: zmq.Context) -> None:
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.authorized))
        # Whoever can read server.key_secret (this user: 0600 in a 0700 directory) is admitted too, so
        # `speakerd speakers` on this machine reaches the daemon with the keys of daemon.curve_keys
        # (CurveClient.for_daemon_keys). It gains nothing: that user can already add keys to
        # authorized/ and edit the store directly.
        self._auth.certs.setdefault("*", {})[self.public] = True
        logger.info(
            "CURVE: admitting %d client key(s) from %s, and the daemon's own key",
            len(list(self.authorized.glob("*.key"))),
            self.authorized,
        )

    def apply_server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> CurveServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass
class CurveClient:
    """Client side: its own key pair (its public key must be in the server's ``authorized/``) and
    the server's public key. ``from_dir`` is how every client command (``speakerd listen
    --curve-keys``, ``speakerd speakers --curve-keys``) loads them."""

    public: bytes
    secret: bytes
    server_public: bytes
    keys_dir: Path | None = None
    """Where the keys came from, for messages."""
    name: str = "client"

    @classmethod
    def from_dir(cls, keys_dir: Path, name: str = "client") -> CurveClient:
        """``name.key_secret`` (0600) and the daemon's ``server.key`` from ``keys_dir``;
        SecurityError (exit 2) naming the file if the directory or a key is missing or unusable."""
        public, secret = load_keypair(keys_dir, name)
        return cls(public, secret, load_public_key(Path(keys_dir) / f"{SERVER}.key"), Path(keys_dir), name)

    @classmethod
    def for_daemon_keys(cls, keys_dir: Path) -> CurveClient:
        """The keys ``speakerd speakers`` uses without ``--curve-keys`` when the config sets
        ``daemon.curve_keys``: that directory is the daemon's own, made by ``speakerd keys
        generate`` (``server.key``/``server.key_secret``, clients' public keys in ``authorized/``).

        If this user can read ``server.key_secret`` there, the client authenticates as the daemon's
        own key pair, which ``CurveServer`` always admits, so no client key has to be made and
        authorised for use on the daemon's own machine. Otherwise the directory is read as a client
        key directory (``client.key_secret`` and ``server.key``), exactly as ``--curve-keys``."""
        keys_dir = _key_dir(Path(keys_dir))
        own = keys_dir / f"{SERVER}.key_secret"
        if own.is_file() and os.access(own, os.R_OK):
            public, secret = load_keypair(keys_dir, SERVER)
            return cls(public, secret, public, keys_dir, SERVER)
        if (keys_dir / "client.key_secret").is_file():
            return cls.from_dir(keys_dir)
        raise SecurityError(
            f"daemon.curve_keys {keys_dir} holds neither the daemon's {SERVER}.key_secret (readable by this "
            f"user) nor a client.key_secret, so `speakerd speakers` has no CURVE keys for the daemon: pass "
            f"--curve-keys DIR (a directory with client.key_secret and the daemon's {SERVER}.key; see docs/control.md)"
        )

    def apply_client(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public

    def rejection_hint(self) -> str:
        """What to check when a CURVE server does not answer: ZeroMQ never tells the client that
        the handshake failed, so a refused key and an absent daemon look the same."""
        where = self.keys_dir if self.keys_dir is not None else "the key directory"
        if self.name == SERVER:  # for_daemon_keys: the daemon's own pair, which a daemon using it admits
            return (
                f"these are the daemon keys in {where} (daemon.curve_keys), which a daemon started with that "
                "directory always admits, so the daemon there uses other keys, no CURVE at all, or is not "
                "there: check its daemon.curve_keys, or pass --curve-keys DIR with keys it accepts"
            )
        return (
            "either no daemon listens there or it refused these CURVE keys (ZeroMQ does not tell a "
            f"client that its handshake failed, so both look the same): check that {where}/{self.name}.key "
            f"is in the daemon's <keys>/{AUTHORIZED}/, that {where}/{SERVER}.key is the daemon's, and that "
            "the daemon runs with daemon.curve_keys"
        )
