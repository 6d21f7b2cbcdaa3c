"""Telling systemd how the daemon is doing: the sd_notify protocol.

When systemd starts a ``Type=notify`` service it binds a Unix datagram socket and passes its
address in ``NOTIFY_SOCKET``. The service reports its state by sending datagrams of
newline-separated ``KEY=value`` assignments to that address:

- ``READY=1`` once start-up is done (checkpoint resumed, folders scanned): only then does
  ``systemctl start`` return and do units ordered after subwatch start;
- ``STATUS=...`` a one-line human summary that ``systemctl status`` shows
  (here: frames done, queue depth, last FWHM, see ``status_line``);
- ``WATCHDOG=1`` a keep-alive. With ``WatchdogSec=`` in the unit, systemd passes
  ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) and kills and restarts a service that stays silent
  longer than that. The pings must come from the loop that proves the daemon is alive, at about
  half the interval (``watchdog_interval``);
- ``RELOADING=1`` when a SIGHUP reload starts (followed by ``READY=1`` when it is done) and
  ``STOPPING=1`` when shutdown starts, so ``systemctl`` shows what is going on.

An address starting with ``@`` names a socket in Linux's abstract namespace (the ``@`` stands for
a leading NUL byte); anything else must be an absolute path. Without ``NOTIFY_SOCKET`` (run from a
terminal, under another supervisor, in tests) every call is a silent no-op, so the daemon can
call these methods unconditionally.

The protocol is a dozen lines on a standard socket, so this module implements it directly rather
than depending on ``systemd-python`` (needs libsystemd headers to build, absent from most wheels
and from non-systemd systems) or ``sdnotify`` (one more dependency for the same dozen lines).
A failed send is logged at debug level and reported by the return value, never raised: being
unable to tell systemd about a frame must never stop the frame.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "status_line"]


class Notifier:
    """Sends state changes to the service manager named by ``NOTIFY_SOCKET``.

    The environment is read once, at construction, from ``environ`` (``os.environ`` by default;
    tests pass a plain dict). Each message opens, uses and closes its own socket, so one
    ``Notifier`` is safe to share between the pipeline thread and a watchdog thread, and a
    service manager that re-created its socket is still reached.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket_name = env.get("NOTIFY_SOCKET", "")
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self.enabled: bool = bool(self._socket_name)
        """True when a service manager asked for notifications (``NOTIFY_SOCKET`` is set)."""

    def _address(self) -> str | bytes | None:
        """The address to send to, or None when it is not one this module can reach.

        Abstract names go out as bytes with a leading NUL so that Python does not append a
        terminating NUL of its own. Other schemes (``vsock:``, newer systemd in VMs) are not
        supported and are reported, not guessed at.
        """
        name = self._socket_name
        if name.startswith("@"):
            return b"\0" + name[1:].encode()
        if name.startswith("/"):
            return name
        return None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines, one per field, in one datagram; True if it was sent.

        ``notify(READY=1, STATUS="starting")`` sends ``READY=1\\nSTATUS=starting``. Newlines in
        values are replaced by spaces, since a newline would start another assignment. Returns
        False, without raising, when notifications are off, the address is unsupported, or the
        send fails (socket gone, manager not listening): the caller has nothing useful to do
        about it beyond what is logged.
        """
        if not self.enabled or not fields:
            return False
        address = self._address()
        if address is None:
            log.debug("NOTIFY_SOCKET=%r: unsupported address, not notifying", self._socket_name)
            return False
        lines = []
        for key, value in fields.items():
            text = str(int(value)) if isinstance(value, bool) else str(value)
            lines.append(f"{key}={text.replace(chr(10), ' ').replace(chr(13), ' ')}")
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(message)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._socket_name, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete: ``READY=1``, with an optional ``STATUS=``."""
        if status is None:
            self.notify(READY=1)
        else:
            self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> None:
        """Replace the one-line status ``systemctl status`` shows."""
        self.notify(STATUS=text)

    def watchdog(self) -> None:
        """Keep-alive ping: ``WATCHDOG=1``; systemd restarts the service if these stop."""
        self.notify(WATCHDOG=1)

    def stopping(self) -> None:
        """Shutdown has begun (finishing the current frame, writing stacks): ``STOPPING=1``."""
        self.notify(STOPPING=1)

    def reloading(self) -> None:
        """A reload has begun: ``RELOADING=1`` with ``MONOTONIC_USEC``; send ``ready()`` after.

        systemd 253 and later require the CLOCK_MONOTONIC timestamp with ``RELOADING=1`` under
        ``Type=notify-reload`` to tell this reload from an earlier one; older versions ignore
        the extra field, so it is always sent.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, MONOTONIC_USEC=now_usec)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None for no pings.

        Half the timeout leaves a full interval of slack for a slow frame or a loaded disk.
        None when notifications are off, when no (or an unreadable) ``WATCHDOG_USEC`` was
        given, or when ``WATCHDOG_PID`` names another process: the watchdog variables were then
        meant for a parent and merely inherited.
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000


def status_line(frames_done: int, queue: int, last_fwhm: float | None) -> str:
    """The ``STATUS=`` text: ``"42 frames done, queue 0, last FWHM 2.31 px"``.

    Short enough for the one line of ``systemctl status``; the FWHM (pixels) is the quickest
    sign of focus and seeing, and reads ``n/a`` until a frame has been measured.
    """
    noun = "frame" if frames_done == 1 else "frames"
    measured = last_fwhm is not None and math.isfinite(last_fwhm)
    fwhm = f"{last_fwhm:.2f} px" if measured else "n/a"
    return f"{frames_done} {noun} done, queue {queue}, last FWHM {fwhm}"
