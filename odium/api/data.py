"""Functions on nodes and data in and out of their namespaces: ``apply``, ``remote``,
``parallel``, ``push``, ``pull``, ``scatter``, ``gather`` (``Hub`` and ``Admin`` both, over
their ``run`` and ``run_each``).

Each is a command like a cell's, run in the session's namespace on each node (the notebook's
``default`` for a Hub), by ``odium.node.workers.data``. A function travels as the job queue
sends one (cloudpickle: by reference when the nodes can import its module, else by value),
its arguments as JSON or pickled. Data travels as ``odium.core.arrays`` encodes it: JSON,
NumPy arrays and bytes as their raw buffers in base64, in parts of ``CHUNK`` bytes when
larger. What comes back is decoded in this process as data (arrays of numbers and booleans,
bytes, JSON), never unpickled; a value that is not data comes back as its repr
(``odium.core.jobs.Repr``), as a cell's does.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..core import arrays as A
from ..core.jobs import Repr, pack_args, pack_function
from ..core.results import NodeResult, Result, Status
from ..errors import ConfigError, OdiumError

MOD = "__import__('odium.node.workers.data', fromlist=['_'])"


class ScatterError(OdiumError):
    """A scatter that could not give every node its part: none was given one. ``result``:
    each node's entry (the ones that failed, and why)."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


def call_code(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              app: str | None) -> str:
    if not callable(fn):
        raise ConfigError(f"apply needs a function, not {type(fn).__name__}")
    _, data = pack_function(fn, app)
    a, k, p = pack_args(args, kwargs)
    args_json = None if p else json.dumps([a or [], k or {}])
    return f"{MOD}.call(globals(), {data!r}, {args_json!r}, {p!r})"


def merge_results(each: Mapping[str, Result], hub_state: str) -> Result:
    """One Result of many, one node each (``run_each``): each node's own entry."""
    nodes = {}
    for n, r in each.items():
        nodes[n] = r.nodes.get(n) or NodeResult(n, Status.NOT_CONNECTED, error={
            "ename": "NotConnected", "evalue": f"{n} had no entry", "traceback": ""})
    return Result("each", nodes, hub_state)


def split_seq(seq: Any, n: int) -> list[Any]:
    """``seq`` in ``n`` parts as even as can be, in order (NumPy's ``array_split`` for an
    array, slices for a list, tuple, range or string)."""
    if type(seq).__module__ == "numpy" and hasattr(seq, "shape"):
        import numpy as np

        return list(np.array_split(seq, n))
    if not isinstance(seq, (list, tuple, range, str, bytes)):
        seq = list(seq)
    k, extra = divmod(len(seq), n)
    out, at = [], 0
    for i in range(n):
        step = k + (1 if i < extra else 0)
        out.append(list(seq[at:at + step]) if isinstance(seq, range) else seq[at:at + step])
        at += step
    return out


def join_parts(parts: list[Any]) -> Any:
    """Parts back in one: arrays concatenated, lists, tuples and strings joined; else the
    list of parts."""
    if parts and all(type(p).__module__ == "numpy" and hasattr(p, "shape") for p in parts):
        import numpy as np

        return np.concatenate(parts)
    for kind in (list, tuple, str, bytes):
        if parts and all(isinstance(p, kind) for p in parts):
            return functools.reduce(lambda a, b: a + b, parts)
    return parts


class DataVerbs:
    """The data verbs over ``run``, ``run_each`` and ``nodes`` (Hub and Admin have them)."""

    def run(self, code: str, nodes: str = "*", *, shell: bool = False,
            timeout: float | None = None, session: str | None = None,
            require: str | None = None, end_session: bool = False) -> Result:
        raise NotImplementedError

    def run_each(self, codes: Mapping[str, str], *, timeout: float | None = None,
                 session: str | None = None) -> Result:
        """Run a code of its own on each named node; one Result with each node's entry (a
        scatter's parts, a parallel call's). A Hub runs them all at once; an Admin one
        after another (it has one request out at a time)."""
        submit = getattr(self, "submit_broadcast", None)
        if submit is not None:
            handles = {n: submit(c, n, timeout=timeout, session=session)
                       for n, c in codes.items()}
            each = {n: h.wait() for n, h in handles.items()}
        else:
            each = {n: self.run(c, n, timeout=timeout, session=session)
                    for n, c in codes.items()}
        return merge_results(each, str(getattr(self, "state", "unknown")))

    def nodes(self, pattern: str | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _app_dir(self) -> str:
        """The application's directory, whose modules the nodes import too (functions of
        it travel by reference): a Hub's app, else this process's directory (as jobs)."""
        core = getattr(self, "_core", None)  # (a Hub's, once started)
        return str(core.rt.app) if core is not None else os.getcwd()

    # --- functions ------------------------------------------------------------------------

    def apply(self, fn: Callable[..., Any], *args: Any, nodes: str = "*",
              **kwargs: Any) -> Result:
        """Call ``fn(*args, **kwargs)`` on every node matching ``nodes``, in its session's
        namespace; a ``Ref("x")`` argument is each node's own ``x``. The Result's values
        are what each node's call returned (arrays and bytes as such)."""
        return self._decoded(self.run(call_code(fn, args, kwargs, self._app_dir()), nodes))

    def remote(self, nodes: str = "*", *, timeout: float | None = None,
               session: str | None = None) -> Callable[[Callable[..., Any]], Any]:
        """``@hub.remote(nodes="gpu*")``: calling the function runs it on those nodes (as
        ``apply``) and returns the Result."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Result]:
            @functools.wraps(fn)
            def remote_call(*args: Any, **kwargs: Any) -> Result:
                code = call_code(fn, args, kwargs, self._app_dir())
                return self._decoded(self.run(code, nodes, timeout=timeout, session=session))
            return remote_call
        return wrap

    def parallel(self, nodes: str = "*", *, timeout: float | None = None,
                 session: str | None = None) -> Callable[[Callable[..., Any]], Any]:
        """``@hub.parallel(nodes=...)``: calling the function with a sequence splits it
        across the ready matching nodes in name order, calls the function on each part there
        (further arguments as they are), and joins the parts of the answer in that order.
        An error on a node raises it (RemoteError)."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def parallel_call(seq: Any, *args: Any, **kwargs: Any) -> Any:
                targets = self._ready(nodes)
                parts = split_seq(seq, len(targets))
                app = self._app_dir()
                r = self._decoded(self.run_each(
                    {n: call_code(fn, (p, *args), kwargs, app) for n, p in zip(
                        targets, parts, strict=True)}, timeout=timeout, session=session))
                r.raise_for_error()
                return join_parts([r[n].value for n in targets])
            return parallel_call
        return wrap

    # --- data -----------------------------------------------------------------------------

    def push(self, values: Mapping[str, Any], nodes: str = "*", *,
             timeout: float | None = None, session: str | None = None) -> Result:
        """Give each matching node these names, with these values, in its namespace."""
        return self._send(_encode_names(values), nodes, timeout=timeout, session=session)

    def pull(self, name: str, nodes: str = "*", *, timeout: float | None = None,
             session: str | None = None) -> dict[str, Any]:
        """Each ready matching node's value of ``name``: {node: value}. A node without it,
        or lost meanwhile, raises its error (RemoteError)."""
        r = self._pull(name, nodes, timeout, session)
        return {n: e["value"] for n, e in r.items()}

    def scatter(self, name: str, seq: Any, nodes: str = "*", *,
                timeout: float | None = None, session: str | None = None
                ) -> dict[str, tuple[int, int]]:
        """Split ``seq`` across the ready matching nodes in name order and give each its
        part as ``name``: {node: (start, stop)} of ``seq``. Every node is given its part,
        or none is (ScatterError, with each node's entry)."""
        targets = self._ready(nodes)
        parts = split_seq(seq, len(targets))
        spans, at = {}, 0
        for n, p in zip(targets, parts, strict=True):
            spans[n] = (at, at + len(p))
            at += len(p)
        docs = {n: _encode_names({name: p}) for n, p in zip(targets, parts, strict=True)}
        key = f"scatter-{secrets.token_hex(8)}"
        staged = self._send_each(docs, targets, timeout, session, key)
        if not staged.ok:
            bad = ", ".join(f"{n} {r.status}" for n, r in staged.errors.items())
            self.run_each({n: f"{MOD}.drop(globals(), [{name!r}, {key!r}])" for n in targets
                           if n not in staged.errors}, timeout=30.0, session=session)
            raise ScatterError(f"scatter of {name!r} not done: {bad}; no node was given "
                               "its part", staged)
        done = self.run(f"{MOD}.commit(globals(), [{name!r}])", ",".join(targets),
                        timeout=timeout, session=session)
        if not done.ok:
            bad = ", ".join(f"{n} {r.status}" for n, r in done.errors.items())
            raise ScatterError(f"scatter of {name!r}: {bad} at the last step (the other "
                               "nodes have their parts)", done)
        return spans

    def gather(self, name: str, nodes: str = "*", *, timeout: float | None = None,
               session: str | None = None) -> Any:
        """The ready matching nodes' values of ``name`` joined in one, in the order a scatter
        gave the parts (else in name order): arrays concatenated, lists joined. Parts of a
        scatter missing (their node gone) is an error, not a shorter answer."""
        got = self._pull(name, nodes, timeout, session)
        index = {n: tuple(e["index"]) for n, e in got.items() if e["index"]}
        totals = {t for _, t in index.values()}
        if len(totals) > 1 or (totals and sorted(i for i, _ in index.values())
                               != list(range(totals.pop()))):
            have = sorted(i for i, _ in index.values())
            raise OdiumError(f"gather of {name!r}: the ready nodes hold parts {have} of a "
                             "scatter, not all of them (a node that had one is gone); "
                             "scatter again")
        order = sorted(got, key=lambda n: (n not in index, index.get(n, (0, 0))[0], n))
        return join_parts([got[n]["value"] for n in order])

    # --- the parts ------------------------------------------------------------------------

    def _ready(self, nodes: str) -> list[str]:
        targets = [n["name"] for n in self.nodes(nodes) if n["status"] == "ready"]
        if not targets:
            raise OdiumError(f"no ready node matches {nodes!r}")
        return sorted(targets)

    def _pull(self, name: str, nodes: str, timeout: float | None,
              session: str | None) -> dict[str, dict[str, Any]]:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"pull needs a variable name, not {name!r}")
        r = self._decoded(self.run(f"{MOD}.pull(globals(), {name!r})",
                                   ",".join(self._ready(nodes)), timeout=timeout,
                                   session=session))
        r.raise_for_error()
        out = {}
        for n, e in r.items():
            v = e.value
            out[n] = v if isinstance(v, dict) else {"index": None, "value": v}
        return out

    def _send(self, cut: tuple[Any, list[A.Part]], nodes: str, *, timeout: float | None,
              session: str | None) -> Result:
        """A push to every matching node: one command, or its parts (each made as it goes:
        one part in memory at a time) then the last one."""
        skeleton, parts = cut
        key = f"push-{secrets.token_hex(8)}"
        for i, make in enumerate(parts):
            r = self.run(f"{MOD}.take_part(globals(), {key!r}, {i}, {make()!r})", nodes,
                         timeout=timeout, session=session)
            if not r.ok:
                self.run(f"{MOD}.drop(globals(), [{key!r}])", nodes, timeout=30.0,
                         session=session)
                return r
        return self.run(_push_code(skeleton, key if parts else None, False, None), nodes,
                        timeout=timeout, session=session)

    def _send_each(self, cut: dict[str, tuple[Any, list[A.Part]]], targets: list[str],
                   timeout: float | None, session: str | None, key: str) -> Result:
        """Each node its own data, staged: all nodes at once, part by part (under ``key``)."""
        total = len(targets)
        most = max(len(parts) for _, parts in cut.values())
        for i in range(most):
            codes = {n: f"{MOD}.take_part(globals(), {key!r}, {i}, {parts[i]()!r})"
                     for n, (_, parts) in cut.items() if i < len(parts)}
            r = self.run_each(codes, timeout=timeout, session=session)
            if not r.ok:
                return r
        return self.run_each({n: _push_code(sk, key if parts else None, True,
                                            (targets.index(n), total))
                              for n, (sk, parts) in cut.items()},
                             timeout=timeout, session=session)

    def _decoded(self, r: Result) -> Result:
        """The Result with each node's value decoded as data (fetching parts left there)."""
        nodes = {}
        for n, e in r.items():
            if e.ok and e.value_json and e.value is not None:
                try:
                    e = replace(e, value=A.decode(self._whole(n, e.value)))
                except (ValueError, OdiumError) as err:
                    e = replace(e, status=Status.ERROR, value=None, error={
                        "ename": "DataError", "evalue": f"what {n} sent is not data: {err}",
                        "traceback": ""})
            elif e.ok and not e.value_json and e.value_repr is not None:
                e = replace(e, value=Repr(e.value_repr))
            nodes[n] = e
        return replace(r, nodes=nodes)

    def _whole(self, node: str, doc: Any) -> Any:
        """A value with its parts in, where the node kept them (``{"$odium": "parts"}``)."""
        if isinstance(doc, dict) and set(doc) == {"index", "value"}:  # (a pull's answer)
            return {**doc, "value": self._whole(node, doc["value"])}
        if not (isinstance(doc, dict) and doc.get(A.TAG) == "parts"):
            return doc
        token, count = doc.get("id"), doc.get("count")
        if not isinstance(token, str) or not token.isalnum() or type(count) is not int:
            raise ValueError("a parts reference is malformed")
        parts = []
        for i in range(count):
            r = self.run(f"{MOD}.part(globals(), {token!r}, {i})", node)
            e = r[node]
            if not e.ok or not isinstance(e.value, str):
                raise OdiumError(f"part {i} of {count} did not come ({e.status})")
            parts.append(base64.b64decode(e.value, validate=True))
        return A.join(doc.get("skeleton"), parts)


def _encode_names(values: Mapping[str, Any]) -> tuple[Any, list[A.Part]]:
    if not isinstance(values, Mapping) or not values:
        raise ConfigError("push takes a dict of names and values, e.g. {'x': arr}")
    for k in values:
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"a name to push is a variable name, not {k!r}")
    try:
        return A.encode_parts(dict(values))
    except ValueError as e:
        raise ConfigError(f"cannot push: {e}") from None


def _push_code(skeleton: Any, key: str | None, stage: bool,
               index: tuple[int, int] | None) -> str:
    return (f"{MOD}.push(globals(), {json.dumps(skeleton)!r}, key={key!r}, stage={stage!r}, "
            f"index={index!r})")


__all__ = ["DataVerbs", "ScatterError", "call_code", "join_parts", "merge_results",
           "split_seq"]
