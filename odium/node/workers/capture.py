"""What a worker captures of a run: its stdout and stderr (kept up to a limit, and streamed to
the node in chunks for a session's command), and its display outputs (``display(obj)``, open
matplotlib figures, a rich value), Jupyter style."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from .code import safe_repr

MAX_OUTPUTS = 8 * 1024 * 1024  # characters of display outputs (base64 images…) per command
FLUSH_EVERY = 0.05  # seconds between streamed output chunks

Event = dict[str, Any]


class Capture(io.TextIOBase):
    """A stdout or stderr that keeps what was written (up to ``limit`` characters) for the
    result, and, given ``send``, streams it to the node in chunks while a command runs."""

    def __init__(self, name: str, limit: int, send: Callable[[Event], None] | None = None
                 ) -> None:
        self.name = name
        self.limit = limit
        self._send = send
        self.cmd = ""
        self.kept: list[str] = []
        self.size = 0
        self.pending: list[str] = []
        self.last = 0.0

    def start(self, cmd: str = "") -> None:
        """A new run (``cmd``: the command whose output is streamed) starts: keep nothing old."""
        self.cmd, self.kept, self.size, self.pending = cmd, [], 0, []
        self.last = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.size < self.limit:
            self.kept.append(s[: self.limit - self.size])
        self.size += len(s)
        if self._send is not None:
            self.pending.append(s)
            if "\n" in s and time.monotonic() - self.last >= FLUSH_EVERY:
                self.flush()
        return len(s)

    def flush(self) -> None:
        if self.pending and self.cmd and self._send is not None:
            text = "".join(self.pending)
            self.pending = []
            self.last = time.monotonic()
            self._send({"op": "out", "cmd": self.cmd, "stream": self.name, "text": text})

    def value(self) -> str:
        text = "".join(self.kept)
        if self.size > self.limit:
            text += f"\n[odium: output cut at {self.limit} of {self.size} characters]\n"
        return text


_RICH = (("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg"),
         ("_repr_svg_", "image/svg+xml"), ("_repr_html_", "text/html"),
         ("_repr_markdown_", "text/markdown"), ("_repr_latex_", "text/latex"),
         ("_repr_json_", "application/json"))


def mimebundle(obj: Any) -> dict[str, Any]:
    """An object's rich forms, Jupyter style (``_repr_*_``, matplotlib figures), plus text."""
    data: dict[str, Any] = {}
    try:
        if is_figure(obj):
            return {"image/png": _figure_png(obj), "text/plain": safe_repr(obj)}
        if hasattr(obj, "_repr_mimebundle_"):
            got = obj._repr_mimebundle_()
            got = got[0] if isinstance(got, tuple) else got
            if isinstance(got, dict):
                data.update(got)
        for method, mime in _RICH:
            if mime not in data and callable(getattr(obj, method, None)):
                value = getattr(obj, method)()
                value = value[0] if isinstance(value, tuple) else value
                if value is not None:
                    data[mime] = value
    except Exception as e:  # a broken _repr_*_ must not lose the result
        data["text/plain"] = f"<display failed: {e!r}>"
    for mime, value in list(data.items()):
        if isinstance(value, bytes):
            data[mime] = base64.b64encode(value).decode()
        elif not isinstance(value, str) and mime != "application/json":
            data[mime] = str(value)
    data.setdefault("text/plain", safe_repr(obj))
    return data


def is_figure(obj: Any) -> bool:
    mod = sys.modules.get("matplotlib.figure")
    return mod is not None and isinstance(obj, mod.Figure)


def _figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _open_figures() -> list[dict[str, Any]]:
    """Every open pyplot figure as an output, then closed (what Jupyter's inline backend does)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    out = []
    try:
        for num in plt.get_fignums():
            fig = plt.figure(num)
            out.append({"data": {"image/png": _figure_png(fig), "text/plain": safe_repr(fig)},
                        "metadata": {}})
        plt.close("all")
    except Exception as e:  # noqa: BLE001 - a figure that cannot be drawn is a note, not a crash
        out.append({"data": {"text/plain": f"<figure failed: {e!r}>"}, "metadata": {}})
    return out


class Displays:
    """``display(obj)`` inside a cell: each call is one output of the command."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []

    def __call__(self, *objs: Any, **_: Any) -> None:
        for obj in objs:
            self.outputs.append({"data": mimebundle(obj), "metadata": {}})

    def take(self, value: Any) -> list[dict[str, Any]]:
        """This command's outputs: display() calls, open figures, then a rich value."""
        outs, self.outputs = self.outputs, []
        outs += _open_figures()
        if value is not None and not is_figure(value):
            bundle = mimebundle(value)
            if set(bundle) - {"text/plain"}:
                outs.append({"data": bundle, "metadata": {}})
        size = sum(len(json.dumps(o, default=str)) for o in outs)
        if size > MAX_OUTPUTS:
            outs = [{"data": {"text/plain": f"[odium: {len(outs)} display outputs dropped: "
                                            f"{size} characters, more than {MAX_OUTPUTS}]"},
                     "metadata": {}}]
        return outs


__all__ = ["Capture", "Displays", "is_figure", "mimebundle"]
