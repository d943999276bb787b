"""A node's side of a sync: check out the hub's commit from the bundle it sends, install the
declared packages, and restart in place (the process after the restart answers the sync)."""

from __future__ import annotations

import base64
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import wire as P
from ..core.statediff import StateInfo
from ..core.term import clean
from ..errors import ConfigError, OdiumError
from ..local.appstate import load_declaration, snapshot
from ..local.files import atomic_write
from ..local.sync import apply_bundle, head_ref, install_declared, restore_head
from .commands import Received
from .ports import Asks, NodeRuntime, Sends

log = logging.getLogger(__name__)

Fail = Callable[..., None]  # fail(why, ename="SyncRefused"): the sync's result is an error


class Syncer:
    """Syncs for the node called ``name``. ``running()``: the commands running here (a sync is
    refused while any does); ``restart()``: stop the node, to run again in place."""

    def __init__(self, rt: NodeRuntime, name: str, send: Sends, ask: Asks, received: Received,
                 running: Callable[[], list[str]], restart: Callable[[], None],
                 find_links: str | None = None, index_url: str | None = None) -> None:
        self.rt = rt
        self.name = name
        self.send = send
        self.ask = ask
        self.received = received
        self.running = running
        self.restart = restart
        self.find_links, self.index_url = find_links, index_url
        self.syncing: set[str] = set()

    def on_sync(self, msg: P.Message, body: P.Sync) -> None:
        if self.name not in msg.env.to or not self.received.first(body.cmd):
            return
        self.send("ack", P.Ack(body.cmd))
        started = time.time()
        self.syncing.add(body.cmd)

        def fail(why: str, ename: str = "SyncRefused") -> None:
            self.syncing.discard(body.cmd)
            self.send("result", P.ResultBody(body.cmd, "error", started, time.time(),
                                             error=P.ErrorInfo(ename, why)), keep=True)

        try:
            info = snapshot(self.rt.app)
        except ConfigError as e:
            fail(f"refused: this node's declaration is malformed: {e}")
            return
        self.rt.watch.take(info)
        if info.commit == body.commit and not info.dirty_files and info.state == body.commit:
            self._there(body, info, started, fail)
            return
        why = self._refusal(info)
        if why:
            fail(why)
            return
        have = [info.commit] if info.commit else []
        self.ask("bundle", P.BundleRequest(body.cmd, have),
                 lambda data: self._got_bundle(body.commit, data, fail),
                 lambda why: fail(why, "SyncFailed"))

    def _there(self, body: P.Sync, info: StateInfo, started: float, fail: Fail) -> None:
        """At the hub's commit already (perhaps since the restart of this sync): answer it."""
        if info.unsatisfied:
            fail("at the hub's commit, but installed packages do not satisfy its "
                 f"declaration: {'; '.join(info.unsatisfied)}", "Unsatisfied")
            return
        self.syncing.discard(body.cmd)
        note = self._take_note(body.cmd)
        self.send("result", P.ResultBody(
            body.cmd, "ok", started, time.time(), stdout=note or f"at {body.commit}\n",
            value={"state": info.state, "fingerprint": info.fingerprint.id}), keep=True)

    def _refusal(self, info: StateInfo) -> str:
        """Why this node cannot move to another commit now ("" if it can)."""
        if info.state == "unversioned":
            return "this node's application is not a git checkout; sync needs one"
        if info.dirty_files or "+dirty" in info.state:
            files = ", ".join(info.dirty_files[:10]) or "untracked or changed files"
            return (f"refused: uncommitted changes would be lost ({files}); commit or stash "
                    "them on the node first")
        if self.running():
            return f"refused: {len(self.running())} command(s) still running here"
        return ""

    def _got_bundle(self, commit: str, data: Any, fail: Fail) -> None:
        if data.get("commit") != commit:
            fail("the hub sent a bundle for another commit")
            return
        app = self.rt.app
        before = head_ref(app)

        def work() -> None:
            moved = False
            try:
                apply_bundle(app, base64.b64decode(data["bundle"]), commit)
                moved = True
                done = self._install(data)
                self.rt.loop.call_soon_threadsafe(lambda: self._synced(commit, done))
            except OdiumError as e:
                why = str(e)
                if moved:  # never leave the node on code it cannot run: go back where it was
                    try:
                        restore_head(app, before)
                        why += f"; the checkout was put back to {before[1][:12]}"
                    except OdiumError as e2:
                        why += f"; putting the checkout back failed too: {e2}"
                self.rt.loop.call_soon_threadsafe(lambda: fail(why, "SyncFailed"))

        threading.Thread(target=work, name="odium-sync", daemon=True).start()

    def _install(self, data: Any) -> list[str]:
        """Install what the checked-out declaration asks for (the hub's wheels, if it sent
        some); what was done. In the sync's thread."""
        decl = load_declaration(self.rt.app)
        if not decl.pip:
            return []
        with tempfile.TemporaryDirectory(prefix="odium-wheels-") as d:
            for fname, b64 in (data.get("wheels") or {}).items():
                if "/" in fname or not fname.endswith(".whl"):
                    raise OdiumError(f"bad wheel name from hub: {fname!r}")
                Path(d, fname).write_bytes(base64.b64decode(b64))
            return install_declared(decl, find_links=d if data.get("wheels")
                                    else self.find_links, index_url=self.index_url)

    def _take_note(self, cmd: str) -> str:
        """What the process before the restart did for this sync (it left a note)."""
        path = self.rt.home / "sync.json"
        try:
            note = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return ""
        return str(note.get("text", "")) + "\n" if note.get("cmd") == cmd else ""

    def _synced(self, commit: str, installed: list[str]) -> None:
        """Checked out and installed: restart in place; the new process answers the sync."""
        info = self.rt.watch.info
        before = info.commit if info else None
        text = f"synced from {before or 'nothing'} to {commit}"
        if installed:
            text += "; " + "; ".join(installed)
        cmd = next(iter(self.syncing), "")
        # read by the process after the restart (a torn note would lose the sync's answer)
        atomic_write(self.rt.home / "sync.json",
                     json.dumps({"cmd": cmd, "text": text + "; restarted"}))
        log.info("%s; restarting", text)
        self.send("event", P.NodeEvent("synced", clean(f"{text}; restarting")[:4000], "info"))
        self.send("restarting", P.Empty())
        self.restart()


__all__ = ["Syncer"]
