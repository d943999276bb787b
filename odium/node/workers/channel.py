"""The connection between a node and one of its workers: length-prefixed frames over a stream
socket (one end of a socketpair), both ways."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator


class Channel:
    """Length-prefixed frames over a stream socket: one ``recv`` for a whole small frame, and a
    partial frame kept across an interrupt.

    A frame is sent whole, under a lock (a session worker's threads all write output), with
    SIGINT held back while it goes: an interrupt arrives after the frame, never inside it. A
    reader that waits on the socket's readiness reads every frame already buffered before it
    waits again (``buffered``): the socket is not readable for what has been read from it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.closed = False
        self.sent = 0  # frames sent whole
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        frame = len(data).to_bytes(4, "big") + data
        with self._lock:
            # blocked inside the try: pthread_sigmask runs a pending handler on its way out, so
            # a KeyboardInterrupt can come out of the call that blocks SIGINT, and SIGINT must
            # not stay blocked then (every later interrupt would wait for the kill). Unblocked,
            # not restored: no worker blocks SIGINT otherwise
            try:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                self.sock.sendall(frame)
                self.sent += 1
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def send_surely(self, data: bytes) -> None:
        """Send a frame that must go (a result): again if an interrupt came before it went (one
        that came after it is moot: a frame goes whole)."""
        sent = self.sent
        while self.sent == sent:
            try:
                self.send(data)
            except KeyboardInterrupt:
                continue

    def recv(self) -> bytes:
        """The next frame (blocking until it is whole); EOFError when the peer is gone. What
        arrives is added to one buffer in place: joining bytes afresh for each piece made a
        50 MB frame cost seconds of the node's loop (quadratic), and the node missed beats."""
        buf = self.buf
        while True:
            if len(buf) >= 4:
                n = int.from_bytes(buf[:4], "big")
                if len(buf) >= 4 + n:
                    with memoryview(buf) as view:
                        frame = bytes(view[4:4 + n])
                    del buf[:4 + n]
                    return frame
            want = 4 + (int.from_bytes(buf[:4], "big") if len(buf) >= 4 else 0) - len(buf)
            chunk = self.sock.recv(max(65536, min(want, 1 << 20)))
            if not chunk:
                raise EOFError("the other end closed the channel")
            buf += chunk

    def next_request(self) -> bytes | None:
        """A worker's wait for its node's next request: None when the node is gone. An
        interrupt that comes while it waits (between two commands) is let pass."""
        while True:
            try:
                return self.recv()
            except (EOFError, OSError):
                return None
            except KeyboardInterrupt:
                continue

    def buffered(self) -> bool:
        """Whether a whole frame has been read already (``recv`` returns it without waiting)."""
        buf = self.buf
        return (not self.closed and len(buf) >= 4
                and len(buf) >= 4 + int.from_bytes(buf[:4], "big"))

    def frames(self) -> Iterator[bytes]:
        """What the other end has sent, now that the socket is readable: one frame (waiting
        for it to be whole), then each one already read with it. EOFError (or OSError) when
        the other end is gone."""
        yield self.recv()
        while self.buffered():
            yield self.recv()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


__all__ = ["Channel"]
