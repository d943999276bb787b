"""Progress of the jobs a client waits for: a map's bar, one job's status line.

Shown on a terminal (stderr a TTY) as one line rewritten in place, in a notebook (a kernel) as
one display updated in place, and in no other output: a pipe, a log, a script's captured
stderr get nothing. ``progress=`` chooses: None (that rule), True (on stderr even when it is no
terminal), False (never). At most ``RATE`` refreshes a second, whatever the jobs' pace.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ..core.progress import RATE, Pacer, bar, summary
from ..core.term import clean
from ..errors import ConfigError
from ..errors import TimeoutError as OdiumTimeout

T = TypeVar("T")
V = TypeVar("V")
SLICE = 1.0 / RATE  # seconds a waiter that shows progress waits at a time
JOB_SLICE = 0.25  # the same for one job's status line (each look asks for the job's info)
SHOW_AFTER = 0.3  # one job's status line appears only once it has waited this long


def where(progress: bool | None = None) -> str | None:
    """Where progress is shown: ``"notebook"``, ``"terminal"`` or None (nowhere)."""
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress is True, False or None (only where it can be seen), "
                          f"not {progress!r}")
    if progress is False:
        return None
    if _in_kernel():
        return "notebook"
    if progress or _tty(sys.stderr):
        return "terminal"
    return None


def _in_kernel() -> bool:
    """Whether this is a Jupyter kernel (a display to update), not terminal IPython."""
    ipython = sys.modules.get("IPython")  # imported by whoever uses IPython; never here
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by something without one, or closed
        return False


class Progress:
    """One progress display: ``show`` at most RATE times a second (``force`` for the last),
    then ``close`` (the last state stays) or ``close(keep=False)`` (it goes)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.started = time.monotonic()
        self._pacer = Pacer()
        self._handle: Any = None
        self._shown = False

    def show(self, text: str, done: int | None = None, total: int | None = None,
             force: bool = False) -> None:
        if not self._pacer.due(time.monotonic()) and not force:
            return
        self._shown = True
        if self.where == "terminal":
            line = text if total is None else f"{bar(done or 0, total)} {text}"
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
            return
        bundle = {"text/plain": text, "text/html": _html(text, done, total)}
        from IPython.display import display

        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)

    def close(self, keep: bool = True) -> None:
        if not self._shown:
            return
        if self.where == "terminal":
            sys.stderr.write("\n" if keep else "\r\x1b[K")
            sys.stderr.flush()
        elif not keep and self._handle is not None:
            self._handle.update({"text/plain": ""}, raw=True)


def _html(text: str, done: int | None, total: int | None) -> str:
    pct = 0 if not total else 100 * (done or 0) // total
    meter = ("" if total is None else
             '<div style="height:4px;background:rgba(128,128,128,.2);width:240px;'
             f'border-radius:2px"><div style="height:4px;width:{pct}%;background:#0969da;'
             'border-radius:2px"></div></div>')
    return (f'<div class="odium-progress" style="margin:2px 0 4px 0">'
            f'<span>{html.escape(text)}</span>{meter}</div>')


class JobBar(Progress):
    """"k of n jobs done", with a bar: ``track`` counts what finishes (done callbacks, cheap
    enough for thousands a second); ``update`` shows it."""

    def __init__(self, where: str, total: int, what: str = "jobs") -> None:
        super().__init__(where)
        self.total = total
        self.what = what
        self.finished: list[None] = []  # one entry per finished item (append is atomic)

    def track(self, items: Iterable[Any]) -> None:
        """Count each of ``items`` (a Job or a Future) as it finishes."""
        note = self.finished.append
        for item in items:
            item.add_done_callback(lambda _item: note(None))

    def update(self, done: int | None = None, force: bool = False) -> None:
        n = len(self.finished) if done is None else done
        self.show(summary(n, self.total, self.what, time.monotonic() - self.started), n,
                  self.total, force)

    def follow(self, it: Iterator[T]) -> Iterator[T]:
        """``it``'s items, counting each as done (``as_completed``)."""
        n = 0
        self.update(0, force=True)
        try:
            for x in it:
                n += 1
                self.update(n)
                yield x
        finally:
            self.update(n, force=True)
            self.close()

    def in_order(self, items: Sequence[V], get: Callable[[V, float], T],
                 deadline: float | None) -> Iterator[T]:
        """``get(item, seconds)`` of each item in order, waiting in slices to show progress
        meanwhile; odium.TimeoutError once ``deadline`` (monotonic) has passed."""
        self.track(items)
        self.update(force=True)
        try:
            for item in items:
                while True:
                    rest = None if deadline is None else deadline - time.monotonic()
                    try:
                        value = get(item, SLICE if rest is None else max(0.0, min(SLICE, rest)))
                        break
                    except (OdiumTimeout, TimeoutError):
                        if rest is not None and rest <= SLICE:
                            raise OdiumTimeout(f"{self.total - len(self.finished)} of "
                                               f"{self.total} {self.what} not finished "
                                               "in time") from None
                        self.update()
                self.update()
                yield value
        finally:
            self.update(force=True)
            self.close()


def job_bar(total: int, progress: bool | None, what: str = "jobs") -> JobBar | None:
    """A bar for ``total`` jobs, or None where progress is not shown."""
    at = where(progress)
    return None if at is None else JobBar(at, total, what)


def wait_job(job: Any, timeout: float | None = None, progress: bool | None = None
             ) -> dict[str, Any]:
    """``job.wait(timeout)`` (an odium Job), showing "job ID running on NODE · 3.2 s" while
    it waits longer than SHOW_AFTER; the line goes once the job has finished."""
    at = where(progress)
    if at is None:
        return dict(job.wait(timeout))
    line = Progress(at)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            rest = None if deadline is None else deadline - time.monotonic()
            try:
                return dict(job.wait(JOB_SLICE if rest is None else
                                     max(0.0, min(JOB_SLICE, rest))))
            except OdiumTimeout:
                if rest is not None and rest <= JOB_SLICE:
                    raise
            elapsed = time.monotonic() - line.started
            if elapsed >= SHOW_AFTER:
                info = job.info()
                node = f" on {info['node']}" if info.get("node") else ""
                line.show(clean(f"job {job.id[:12]} {info.get('status')}{node} · "
                                f"{elapsed:.1f} s"))
    finally:
        line.close(keep=False)


__all__ = ["where", "Progress", "JobBar", "job_bar", "wait_job", "SLICE"]
