"""The channel between a node and its workers, under interrupts: a worker interrupted while it
sends (a cell that prints in a loop, stopped) never keeps SIGINT blocked afterwards."""

from __future__ import annotations

import subprocess
import sys

# CPython runs a pending signal handler on the way out of signal.pthread_sigmask: a SIGINT
# that arrived just before a send raises KeyboardInterrupt out of the very call that blocks
# SIGINT. The child makes that happen on every send, deterministically (the real call, then
# the interrupt its handler would raise), and checks that SIGINT is unblocked afterwards.
CHILD = r"""
import signal, socket, sys, threading
from odium.node.workers import channel

real = signal.pthread_sigmask
def sigmask_then_interrupt(how, mask):
    old = real(how, mask)
    if how == signal.SIG_BLOCK and signal.SIGINT in mask:
        raise KeyboardInterrupt  # what the pending handler does on the way out
    return old
channel.signal.pthread_sigmask = sigmask_then_interrupt

a, b = socket.socketpair()
ch = channel.Channel(a)
threading.Thread(target=lambda: [None for _ in iter(lambda: b.recv(65536), b"")],
                 daemon=True).start()
for _ in range(3):
    try:
        ch.send(b"x" * 200)
    except KeyboardInterrupt:
        pass
    if signal.SIGINT in real(signal.SIG_BLOCK, []):
        print("SIGINT left blocked")
        sys.exit(1)
print("ok")
"""


def test_an_interrupt_during_a_send_never_leaves_sigint_blocked() -> None:
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       timeout=60)
    assert (p.returncode, p.stdout.strip()) == (0, "ok"), p.stdout + p.stderr
