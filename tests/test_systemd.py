"""The systemd face: the unit files are valid and keep their hardening, and sd_notify works.

The notify tests bind real ``AF_UNIX`` datagram sockets (a path and an abstract name) and read
what the daemon would tell systemd; one runs in a child process with ``NOTIFY_SOCKET`` in its
real environment. ``systemd-analyze verify`` checks the units where it is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from subwatch.service.notify import Notifier, status_line

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
MAIN_UNIT = UNITS / "subwatch.service"
TEMPLATE_UNIT = UNITS / "subwatch@.service"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sockets")


# --- sd_notify -----------------------------------------------------------------------------


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    # Only a guard against a hang if nothing arrives; a datagram on a local socket is immediate.
    sock.settimeout(10)
    return sock


def _fields(sock: socket.socket) -> dict[str, str]:
    """One datagram, as the service manager parses it: KEY=value per line."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n") if line)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to ~107 bytes; tmp_path can be long, so fall back to /tmp.
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) > 100:
        path = Path("/tmp") / f"subwatch-{uuid.uuid4().hex[:12]}.sock"
    sock = _receiver(str(path))
    try:
        yield sock, str(path)
    finally:
        sock.close()
        path.unlink(missing_ok=True)


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"subwatch-test-{uuid.uuid4().hex}"
    sock = _receiver(b"\0" + name.encode())
    try:
        yield sock, "@" + name
    finally:
        sock.close()


@linux_only
def test_messages_arrive_on_a_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    notifier.ready("starting up")
    assert _fields(sock) == {"READY": "1", "STATUS": "starting up"}
    notifier.ready()
    assert _fields(sock) == {"READY": "1"}
    notifier.status(status_line(42, 0, 2.314))
    assert _fields(sock) == {"STATUS": "42 frames done, queue 0, last FWHM 2.31 px"}
    notifier.watchdog()
    assert _fields(sock) == {"WATCHDOG": "1"}
    notifier.stopping()
    assert _fields(sock) == {"STOPPING": "1"}


@linux_only
def test_messages_arrive_on_an_abstract_socket(
    abstract_socket: tuple[socket.socket, str],
) -> None:
    sock, name = abstract_socket
    notifier = Notifier({"NOTIFY_SOCKET": name})
    assert notifier.notify(READY=1, STATUS="up") is True
    assert _fields(sock) == {"READY": "1", "STATUS": "up"}
    notifier.watchdog()
    assert _fields(sock) == {"WATCHDOG": "1"}


@linux_only
def test_reloading_carries_a_monotonic_timestamp(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _fields(sock)
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


@linux_only
def test_newlines_in_values_cannot_inject_assignments(
    path_socket: tuple[socket.socket, str],
) -> None:
    sock, path = path_socket
    Notifier({"NOTIFY_SOCKET": path}).status("bad file\nREADY=1")
    assert _fields(sock) == {"STATUS": "bad file READY=1"}


def test_without_notify_socket_everything_is_a_silent_no_op() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "60000000"})
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False
    notifier.ready("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.reloading()
    # Pings that could not be delivered are not asked for.
    assert notifier.watchdog_interval() is None


def test_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().enabled is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@subwatch-nobody-listens")
    assert Notifier().enabled is True


@linux_only
def test_a_missing_socket_returns_false_without_raising(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "no-such.sock")})
    assert notifier.enabled
    assert notifier.notify(READY=1) is False
    notifier.ready("x")
    notifier.watchdog()
    assert (
        Notifier({"NOTIFY_SOCKET": "@subwatch-nobody-" + uuid.uuid4().hex}).notify(WATCHDOG=1)
        is False
    )


def test_an_unsupported_address_returns_false() -> None:
    assert Notifier({"NOTIFY_SOCKET": "relative/notify.sock"}).notify(READY=1) is False
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).notify(READY=1) is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    base = {"NOTIFY_SOCKET": "@x"}
    assert Notifier({**base, "WATCHDOG_USEC": "60000000"}).watchdog_interval() == 30.0
    assert (
        Notifier(
            {**base, "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
        ).watchdog_interval()
        == 2.5
    )
    # Inherited from a parent that was the one being watched: not ours to answer.
    other = os.getpid() + 1
    assert (
        Notifier(
            {**base, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(other)}
        ).watchdog_interval()
        is None
    )
    assert Notifier(base).watchdog_interval() is None
    for bad in ("", "0", "-5", "sixty"):
        assert Notifier({**base, "WATCHDOG_USEC": bad}).watchdog_interval() is None
    bad_pid = {**base, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}
    assert Notifier(bad_pid).watchdog_interval() is None


def test_status_line() -> None:
    assert status_line(42, 0, 2.314) == "42 frames done, queue 0, last FWHM 2.31 px"
    assert status_line(1, 3, None) == "1 frame done, queue 3, last FWHM n/a"
    assert status_line(0, 0, float("nan")) == "0 frames done, queue 0, last FWHM n/a"


@linux_only
def test_notify_from_a_child_process_environment(path_socket: tuple[socket.socket, str]) -> None:
    """End to end through the real environment, as under systemd: no mapping passed in."""
    sock, path = path_socket
    script = (
        "from subwatch.service.notify import Notifier\n"
        "n = Notifier()\n"
        "assert n.enabled\n"
        "print(n.watchdog_interval())\n"
        "n.ready('up')\n"
        "n.watchdog()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID",)}
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="20000000")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "daemon"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "10.0"
    assert _fields(sock) == {"READY": "1", "STATUS": "up"}
    assert _fields(sock) == {"WATCHDOG": "1"}


# --- unit files: parsed ----------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd allows repeated keys; an empty one resets)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: assignment outside a section: {line}"
        assert "=" in line, f"{path.name}: not KEY=value: {line}"
        key, value = (part.strip() for part in line.split("=", 1))
        current.setdefault(key, []).append(value)
    return sections


def _one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "read-only",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0027",
}

# Keys that legitimately differ between the single unit and the per-rig template.
PER_INSTANCE = {"ExecStart", "StateDirectory", "CacheDirectory", "LogsDirectory", "Environment"}


@pytest.mark.parametrize("path", [MAIN_UNIT, TEMPLATE_UNIT], ids=lambda p: p.name)
def test_unit_keeps_notify_watchdog_restart_and_hardening(path: Path) -> None:
    unit = parse_unit(path)
    service = "Service"
    assert _one(unit, service, "Type") == "notify"
    assert _one(unit, service, "NotifyAccess") == "main"
    watchdog = _one(unit, service, "WatchdogSec")
    assert re.fullmatch(r"[1-9]\d*s?", watchdog), watchdog
    assert _one(unit, service, "Restart") == "on-failure"
    assert _one(unit, service, "RestartSec")
    assert _one(unit, service, "KillSignal") == "SIGTERM"
    # The daemon needs up to 10 s after SIGTERM to finish a frame and write the stacks.
    assert int(_one(unit, service, "TimeoutStopSec").rstrip("s")) > 10
    assert _one(unit, service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _one(unit, service, "User") == "subwatch"
    assert _one(unit, service, "Group") == "subwatch"
    for key, expected in HARDENING.items():
        assert _one(unit, service, key) == expected, key
    families = set(_one(unit, service, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in _one(unit, service, "SystemCallFilter").split()
    assert "-/data/captures" in _one(unit, service, "ReadOnlyPaths").split()
    # The capture software keeps priority over the disk and the CPU.
    assert int(_one(unit, service, "Nice")) > 0
    assert _one(unit, service, "IOSchedulingClass") in {"best-effort", "idle"}
    assert _one(unit, "Install", "WantedBy") == "multi-user.target"
    exec_start = _one(unit, service, "ExecStart").split()
    assert exec_start[:4] == ["/opt/subwatch/bin/subwatch", "run", "--config", exec_start[3]]
    assert exec_start[3].startswith("/etc/subwatch/")


def test_single_unit_paths() -> None:
    unit = parse_unit(MAIN_UNIT)
    assert _one(unit, "Service", "ExecStart").endswith("--config /etc/subwatch/subwatch.yaml")
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert _one(unit, "Service", key) == "subwatch", key


def test_template_unit_is_per_instance() -> None:
    unit = parse_unit(TEMPLATE_UNIT)
    assert _one(unit, "Service", "ExecStart").endswith("--config /etc/subwatch/%i.yaml")
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory"):
        assert _one(unit, "Service", key) == "subwatch/%i", key
    assert _one(unit, "Service", "ConfigurationDirectory") == "subwatch"


def test_template_matches_the_single_unit_apart_from_instance_paths() -> None:
    """A setting changed in one unit and forgotten in the other fails here."""
    single, template = parse_unit(MAIN_UNIT), parse_unit(TEMPLATE_UNIT)
    assert single.keys() == template.keys()
    for section in single:
        ignore = PER_INSTANCE | ({"Description"} if section == "Unit" else set())
        mine = {k: v for k, v in single[section].items() if k not in ignore}
        theirs = {k: v for k, v in template[section].items() if k not in ignore}
        assert mine == theirs, section
    assert set(single["Service"]) == set(template["Service"])


# --- unit files: systemd-analyze verify ------------------------------------------------------

# Messages about the machine running the test, not about the unit.
ENVIRONMENT_ONLY = [
    re.compile(r"Failed to resolve (user|group)", re.IGNORECASE),
    re.compile(r"(user|group) .*(does not exist|not found|unknown)", re.IGNORECASE),
    re.compile(r"System has not been booted with systemd"),
    re.compile(r"Failed to connect to (the )?bus"),
    re.compile(r"Running in chroot"),
]
# Messages meaning verify could not run here at all: skip, not pass.
CANNOT_RUN = re.compile(r"Failed to (initialize|allocate) manager|Failed to lookup .* path")
TRUE = "/bin/true" if os.access("/bin/true", os.X_OK) else shutil.which("true") or "/bin/true"


def _prepare(src: Path, dest_dir: Path, name: str) -> Path:
    """Copy a unit for verification on this machine.

    ``ExecStart`` always points at ``/opt/subwatch``, which a test machine lacks; other commands
    are replaced only if their binary is missing here (``/bin/kill`` comes with procps, which
    minimal systems omit). Both are deployment facts, checked by the parsing tests above.
    """
    lines = []
    for line in src.read_text().splitlines():
        match = re.match(r"(Exec\w+)=([-@:+!]*)(\S+)(.*)", line)
        if match and (match[1] == "ExecStart" or not os.access(match[3], os.X_OK)):
            line = f"{match[1]}={match[2]}{TRUE}{match[4]}"
        lines.append(line)
    dest = dest_dir / name
    dest.write_text("\n".join(lines) + "\n")
    return dest


def verify_problems(unit: Path) -> list[str]:
    """Run ``systemd-analyze verify`` on one unit; the lines that are real problems with it."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"},
    )
    output = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0 and any(CANNOT_RUN.search(line) for line in output):
        pytest.skip("systemd-analyze verify cannot run here: " + " / ".join(output))
    problems = []
    for line in output:
        if not line.strip() or any(p.search(line) for p in ENVIRONMENT_ONLY):
            continue
        # Complaints about other units pulled in as dependencies are not ours to fix.
        if unit.name not in line and str(unit) not in line and proc.returncode == 0:
            continue
        problems.append(line)
    if proc.returncode != 0 and not problems:
        problems.append(f"systemd-analyze verify exited {proc.returncode}: {output}")
    return problems


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@needs_analyze
@pytest.mark.parametrize(
    ("src", "name"),
    [(MAIN_UNIT, "subwatch.service"), (TEMPLATE_UNIT, "subwatch@rig1.service")],
    ids=["subwatch.service", "subwatch@rig1.service"],
)
def test_systemd_analyze_verify(src: Path, name: str, tmp_path: Path) -> None:
    unit = _prepare(src, tmp_path, name)
    assert verify_problems(unit) == []


@needs_analyze
def test_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above would notice a typo: systemd only warns and still exits 0."""
    text = MAIN_UNIT.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
    text = text.replace("Type=notify", "Type=notfy")
    broken = tmp_path / "src.service"
    broken.write_text(text)
    problems = verify_problems(_prepare(broken, tmp_path, "subwatch.service"))
    assert any("ProtectClok" in p for p in problems), problems
    assert any("notfy" in p or "service type" in p for p in problems), problems
