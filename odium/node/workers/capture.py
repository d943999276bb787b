"""What a worker captures of a run: its stdout and stderr (kept up to a limit, and streamed to
the node in chunks for a session's command), and its display outputs (``display(obj)``, open
matplotlib figures, a rich value), Jupyter style."""

from __future__ import annotations

import base64
import codecs
import importlib.abc
import io
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from .code import safe_repr

MAX_OUTPUTS = 8 * 1024 * 1024  # characters of display outputs (base64 images…) per command
FLUSH_EVERY = 0.05  # seconds between streamed output chunks
MAX_DISPLAYS = 1000  # display outputs of one command (a result carries no more)
STREAM_CHUNK = 1024 * 1024  # characters of output in one frame to the node (at most)

Event = dict[str, Any]
_MIME = re.compile(r"^[a-z]+/[A-Za-z0-9.+_-]{1,100}\Z")  # the wire's (odium.core.wire.Mime)


class Capture(io.TextIOBase):
    """A stdout or stderr that keeps what was written (up to ``limit`` characters) for the
    result, and, given ``send``, streams it to the node in chunks while a command runs (no
    more than ``limit`` + 1 characters a run: the node shows no more, and says so).

    Its ``buffer`` takes bytes, as a real stdout's does (``sys.stdout.buffer.write``): they
    are decoded as UTF-8, a byte that is not UTF-8 shown as U+FFFD, as a shell's output is.
    """

    def __init__(self, name: str, limit: int, send: Callable[[Event], None] | None = None
                 ) -> None:
        self.name = name
        self.limit = limit
        self._send = send
        self.cmd = ""
        self.kept: list[str] = []
        self.size = 0
        self.pending: list[str] = []
        self.waiting = 0  # characters in ``pending``
        self.streamed = 0  # characters of this run handed to ``send`` or pending
        self.last = 0.0
        self.buffer = _Bytes(self)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "replace"

    def start(self, cmd: str = "") -> None:
        """A new run (``cmd``: the command whose output is streamed) starts: keep nothing old."""
        self.cmd, self.kept, self.size, self.pending = cmd, [], 0, []
        self.waiting = self.streamed = 0
        self.buffer.reset()
        self.last = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.size < self.limit:
            self.kept.append(s[: self.limit - self.size])
        self.size += len(s)
        if self._send is not None and self.streamed <= self.limit:
            part = s[: self.limit + 1 - self.streamed]
            self.pending.append(part)
            self.streamed += len(part)
            self.waiting += len(part)
            # a line or not: output written without newlines streams too
            if self.waiting >= STREAM_CHUNK or time.monotonic() - self.last >= FLUSH_EVERY:
                self.flush()
        return len(s)

    def flush(self) -> None:
        if self.pending and self.cmd and self._send is not None:
            text = "".join(self.pending)
            self.pending, self.waiting = [], 0
            self.last = time.monotonic()
            for i in range(0, len(text), STREAM_CHUNK):  # frames the node reads in a moment
                self._send({"op": "out", "cmd": self.cmd, "stream": self.name,
                            "text": text[i:i + STREAM_CHUNK]})

    def finish(self) -> None:
        """The run ended: bytes of an unfinished character go as U+FFFD; the rest is sent."""
        self.buffer.finish()
        self.flush()

    def value(self) -> str:
        """What was kept (the first ``limit`` characters; ``into`` says how many there were)."""
        return "".join(self.kept)

    def into(self, res: Event) -> None:
        """Put what was kept into a result, with the true number of characters written (the
        result's note on a cut says it: odium.node.workers.results)."""
        res[self.name] = self.value()
        res.setdefault("sizes", {})[self.name] = self.size


class _Bytes(io.RawIOBase):
    """A Capture's ``buffer``: bytes written are decoded as UTF-8 (an incomplete character is
    held until its next bytes come) and written to the Capture as text."""

    def __init__(self, text: Capture) -> None:
        super().__init__()
        self.text = text
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def reset(self) -> None:
        self.decoder.reset()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        text = self.decoder.decode(data)
        if text:
            self.text.write(text)
        return len(data)

    def finish(self) -> None:
        text = self.decoder.decode(b"", final=True)
        if text:
            self.text.write(text)

    def flush(self) -> None:
        self.text.flush()


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
    """``display(obj)`` inside a cell: each call is one output of the command (``raw``: obj
    is a mimebundle already, as IPython's ``display(..., raw=True)`` takes)."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []

    def __call__(self, *objs: Any, raw: bool = False, metadata: Any = None, **_: Any) -> None:
        meta = dict(metadata) if isinstance(metadata, dict) else {}
        for obj in objs:
            data = dict(obj) if raw and isinstance(obj, dict) else mimebundle(obj)
            self.outputs.append({"data": data, "metadata": meta})

    def take(self, value: Any) -> list[dict[str, Any]]:
        """This command's outputs: display() calls, open figures, then a rich value; as many
        and as large as a result carries (what is left out says so)."""
        outs, self.outputs = self.outputs, []
        outs += _open_figures()
        if value is not None and not is_figure(value):
            bundle = mimebundle(value)
            if set(bundle) - {"text/plain"}:
                outs.append({"data": bundle, "metadata": {}})
        for o in outs:  # a mime type the wire refuses would make the hub refuse the result
            o["data"] = {k: v for k, v in o["data"].items()
                         if isinstance(k, str) and _MIME.match(k)} or {"text/plain": ""}
        if len(outs) > MAX_DISPLAYS:
            outs = outs[:MAX_DISPLAYS - 1] + [_note(f"[odium: {len(outs)} display outputs; "
                                                    f"the first {MAX_DISPLAYS - 1} are shown]")]
        return _within(outs, MAX_OUTPUTS)


def _note(text: str) -> dict[str, Any]:
    return {"data": {"text/plain": text}, "metadata": {}}


def _within(outs: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Outputs within ``limit`` characters of JSON: the largest parts (an image…) give way
    first, each leaving a note in its output's text saying what and how large."""
    size = sum(len(json.dumps(o, default=str)) for o in outs)
    if size <= limit:
        return outs
    parts = sorted(((len(json.dumps(v, default=str)), i, mime) for i, o in enumerate(outs)
                    for mime, v in o["data"].items() if mime != "text/plain"), reverse=True)
    for n, i, mime in parts:
        if size <= limit:
            break
        data = outs[i]["data"]
        del data[mime]
        data["text/plain"] = (f"{data.get('text/plain', '')}\n[odium: its {mime} ({n} "
                              f"characters) was not sent: a command's display outputs may "
                              f"take {limit}]")
        size -= n
    if size > limit:
        return [_note(f"[odium: {len(outs)} display outputs dropped: {size} characters, more "
                      f"than {limit}]")]
    return outs


# --- IPython's display() in a worker ---------------------------------------------------------

_IPY_DISPLAY = "IPython.core.display_functions"


def route_ipython_display(displays: Displays) -> None:
    """IPython's ``display()`` (and ``publish_display_data``) show through ``displays`` in this
    worker: outside a kernel IPython only prints an object's repr, so an image displayed came
    back as the text ``<IPython.core.display.Image object>``. Patched now if IPython is loaded
    already, else the moment it is (nothing is imported for it: most cells never use it)."""
    mod = sys.modules.get(_IPY_DISPLAY)
    if mod is not None:
        _patch_display(mod, displays)
    elif not any(isinstance(f, _WhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported(_IPY_DISPLAY,
                                              lambda m: _patch_display(m, displays)))


def _patch_display(mod: Any, displays: Displays) -> None:
    def display(*objs: Any, raw: bool = False, metadata: Any = None, **_: Any) -> None:
        displays(*objs, raw=raw, metadata=metadata)

    def publish_display_data(data: Any, metadata: Any = None, *_: Any, **__: Any) -> None:
        displays(data, raw=True, metadata=metadata)

    mod.display, mod.publish_display_data = display, publish_display_data


class _WhenImported(importlib.abc.MetaPathFinder):
    """Finds one module as the other finders do, and calls ``then(module)`` once it has run."""

    def __init__(self, name: str, then: Callable[[Any], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.name:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if finder is not self and find else None
            if spec is not None and spec.loader is not None:
                spec.loader = _ThenLoader(spec.loader, self.then)
                return spec
        return None


class _ThenLoader(importlib.abc.Loader):
    """A module's own loader, and ``then(module)`` after it ran the module."""

    def __init__(self, loader: Any, then: Callable[[Any], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.then(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package…: the module's loader's
        return getattr(self.loader, name)


__all__ = ["Capture", "Displays", "is_figure", "mimebundle", "route_ipython_display"]
