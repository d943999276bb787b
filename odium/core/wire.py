"""The wire: the signed JSON envelope, every message type and its body, sealing and opening.

Pure: no sockets, no database. See docs/protocol.md for the written form.

A message on the wire is one JSON object. Its last member is ``"sig"``: the
Ed25519 signature (base64url, no padding) of the exact bytes of the object
without that member. The sender writes the canonical JSON of the envelope
(sorted keys, no spaces, ASCII), signs it, and splices ``,"sig":"..."`` in
before the closing brace. The receiver checks size, cuts the signature off
the end, verifies it with the key the link says the sender has, and only
then parses and validates.
"""

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from ..errors import AuthError, ProtocolError
from .encoding import SIG_HEAD, b64url, is_key_point
from .encoding import digest as digest  # re-exported: the wire's helpers, one import
from .encoding import encode_json as encode_json
from .encoding import new_id as new_id
from .encoding import peek_from as peek_from
from .encoding import peek_id as peek_id
from .encoding import peek_type as peek_type
from .encoding import split_signature as split_signature
from .encoding import to_builtins as to_builtins
from .guards import ReplayCache, check_depth
from .requirements import ASKED_RE, SENT_RE, STATE_RE
from .term import CONTROL

VERSION = 1
DEFAULT_PORTS = {"pub": 18202, "query": 18203, "jobs": 18220, "results": 18221}
MAX_MESSAGE = 16 * 1024 * 1024  # default limit on one frame, bytes

# Identifiers: validated everywhere, never used raw as paths or SQL.
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"
KEY_RE = r"^[A-Za-z0-9_-]{43}\Z"
ID_RE = r"^[0-9a-f]{32}\Z"
# (\Z, not $: a $ also matches before a trailing newline, and msgspec searches, unanchored)
LINE_RE = f"^[^{CONTROL}]*\\Z"  # one line of text: no control characters (odium.core.term)
HOST_RE = r"^([A-Za-z0-9_][A-Za-z0-9._-]{0,252})?\Z"

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE)]
LAUNCH_RE = r"^[A-Za-z][A-Za-z0-9_-]{0,31}\Z"  # a launch's id (odium.core.launching)
LaunchId = Annotated[str, msgspec.Meta(pattern=LAUNCH_RE)]
# a name in a tree of hubs: segments joined by "/" (``lab1/pc-1``), relative to whoever says it
MAX_DEPTH = 16
PATH_RE = (r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63})"
           f"{{0,{MAX_DEPTH - 1}}}\\Z")
NodePath = Annotated[str, msgspec.Meta(pattern=PATH_RE)]
KeyId = Annotated[str, msgspec.Meta(pattern=KEY_RE)]
MsgId = Annotated[str, msgspec.Meta(pattern=ID_RE)]
StateId = Annotated[str, msgspec.Meta(pattern=STATE_RE)]
Text = Annotated[str, msgspec.Meta(max_length=8 * 1024 * 1024)]
Glob = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)]
Line = Annotated[str, msgspec.Meta(max_length=4096, pattern=LINE_RE)]
Host = Annotated[str, msgspec.Meta(pattern=HOST_RE)]


Skew = Annotated[float, msgspec.Meta(ge=-1e9, le=1e9)]  # seconds a machine's clock is off


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every message body: unknown keys are errors."""


class Envelope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What every message carries around its body."""

    v: int
    type: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}\Z")]
    id: MsgId
    from_: KeyId = msgspec.field(name="from")
    ts: float
    state: StateId
    body: msgspec.Raw
    to: list[NodePath] = []
    seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    re: MsgId | None = None


# --- bodies --------------------------------------------------------------------------------


class HubBeat(Body):
    """Hub heartbeat on PUB: who the hub is this run, and the newest command sequence;
    ``above``: the digest of the authorities over the hub (odium.hub.tree), when it has any."""

    boot: MsgId
    interval: Seconds
    above: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{0,32}\Z")] = ""


class NodeBeat(Body):
    """Node heartbeat on PUSH."""

    boot: MsgId
    hub_boot: MsgId | None = None  # the hub boot this node last heard on its SUB socket
    seq: int = 0  # the newest command sequence the node has seen
    running: list[MsgId] = []
    skew: Skew = 0.0  # the node's wall clock minus its hub's time, s (odium.core.clock)


class Exec(Body):
    """A command: Python source or a shell command, for the nodes named in ``to``."""

    cmd: MsgId
    kind: Literal["python", "shell"]
    code: Text
    session: Name = "default"
    timeout: Seconds | None = None
    issuer: KeyId | None = None  # the admin key that asked for it, when not the hub itself
    ephemeral: bool = False  # close the session's namespace when the command ends
    require: Annotated[str, msgspec.Meta(pattern=SENT_RE)] = "any"
    deadline: float | None = None  # issued + timeout, in the hub's time: queued or running


class Interrupt(Body):
    cmd: MsgId


class NodeEvent(Body):
    """Something the hub should log on a node's behalf (e.g. a message the node rejected)."""

    kind: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}\Z")]
    detail: Annotated[str, msgspec.Meta(max_length=4000, pattern=LINE_RE)]
    level: Literal["info", "warning", "error"] = "warning"


class Ack(Body):
    cmd: MsgId


class Output(Body):
    cmd: MsgId
    stream: Literal["stdout", "stderr"]
    text: Text


class ErrorInfo(Body):
    ename: str
    evalue: str
    traceback: str = ""


Mime = Annotated[str, msgspec.Meta(pattern=r"^[a-z]+/[A-Za-z0-9.+_-]{1,100}\Z")]


class Display(Body):
    """One display output of a command (Jupyter's display_data): mime type -> content;
    binary types (image/png…) are base64 text."""

    data: dict[Mime, Any]
    metadata: dict[str, Any] = {}


class ResultBody(Body):
    """What a node sends back for one command."""

    cmd: MsgId
    status: Literal["ok", "error", "timeout", "interrupted", "state_mismatch"]
    started: float
    finished: float
    stdout: Text = ""
    stderr: Text = ""
    value: Any = None  # the last expression's value, as JSON
    value_repr: str | None = None  # repr() of it; the only form when it is not JSON
    value_json: bool = True
    error: ErrorInfo | None = None
    exit: int | None = None  # shell exit status
    mismatch: dict[str, Any] | None = None  # with state_mismatch: what was required, what is
    outputs: Annotated[list[Display], msgspec.Meta(max_length=1000)] = []  # display(), figures


class Join(Body):
    """Sent over a token's one-time key: the node's own key, with proof it holds it."""

    token: MsgId
    key: KeyId
    name: Name
    proof: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{86}\Z")]


class Register(Body):
    name: Name
    boot: MsgId
    capacity: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    pid: int = 0
    host: Host = ""
    app: Line = ""  # the node's application directory
    info: dict[str, Any] | None = None  # the node's StateInfo (odium.local.state), as JSON


class StateReport(Body):
    """A node's state changed (or was asked for): its whole StateInfo."""

    info: dict[str, Any]


class Sync(Body):
    """Hub -> nodes on PUB: bring yourself to this commit (then fetch the bundle)."""

    cmd: MsgId
    commit: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{40}\Z")]


class BundleRequest(Body):
    """Node -> hub: the commits of a sync, given the commits the node has."""

    cmd: MsgId
    have: list[Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{40}\Z")]] = []


class SyncRequest(Body):
    """Admin request: sync the matching nodes to the hub's commit."""

    nodes: Glob = "*"
    timeout: Seconds = 300.0


class Fetch(Body):
    since: Annotated[int, msgspec.Meta(ge=0)]


class Run(Body):
    """Admin request: broadcast a command and answer with the whole result."""

    code: Text
    nodes: Glob = "*"
    kind: Literal["python", "shell"] = "python"
    session: Name | None = None
    timeout: Seconds | None = None
    require: Annotated[str, msgspec.Meta(pattern=ASKED_RE)] = (
        "default")
    ephemeral: bool = False  # close the session's namespace on each node when it ends


class Query(Body):
    """Admin request with no arguments beyond an optional limit/filter."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 50
    pattern: Glob | None = None


class KeyAction(Body):
    action: Literal["accept", "reject", "revoke"]
    pattern: Glob  # a key id, a fingerprint, a node name, or a glob over names
    role: Literal["node", "admin"] | None = None  # names and globs choose node keys by default


class TokenRequest(Body):
    ttl: Seconds = 3600.0


class LaunchOpen(Body):  # admin -> hub: open a launch of ``count`` nodes (odium.hub.launches)
    kind: Literal["ssh", "slurm", "manual"]
    count: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    names: list[Name] | None = None
    place: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    ttl: Seconds | None = None
    launch: LaunchId | None = None


class LaunchNote(Body):  # launch_note: what a launcher did (job id, hosts...); launch_stop
    launch: LaunchId
    detail: dict[str, Any] = {}


class Reply(Body):
    """Answer to a request on the query socket."""

    data: Any = None


class ErrorReply(Body):
    kind: str
    message: str


class Empty(Body):
    pass


# --- the job queue (docs/protocol.md, "Job queue") ------------------------------------------

JobId = Annotated[str, msgspec.Meta(pattern=NAME_RE)]
FnHash = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}\Z")]
B64 = Annotated[str, msgspec.Meta(max_length=8 * 1024 * 1024)]
Requirement = Annotated[str, msgspec.Meta(pattern=SENT_RE)]


class JobSpec(Body):
    """One job as a node runs it: a code string, or a function (by hash into the batch's
    ``fns``) with arguments as JSON, or pickled when they are not JSON."""

    id: JobId
    kind: Literal["python", "call"]
    code: Text = ""
    fn: FnHash | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    args_pickle: B64 | None = None
    timeout: Seconds | None = None
    nodes: Glob = "*"  # the node checks its own name against it
    require: Requirement = "any"  # the node checks its own state against it
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1


class JobBatch(Body):
    """Hub -> nodes on the jobs socket (PUSH): jobs for whichever node gets the message."""

    jobs: list[JobSpec]
    fns: dict[FnHash, B64] = {}  # function hash -> base64 cloudpickle


class JobOutcome(Body):
    """How one job ended on a node."""

    id: JobId
    status: Literal["done", "failed", "timeout", "cancelled", "lost"]
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1
    started: float = 0.0
    finished: float = 0.0
    stdout: Text = ""
    stderr: Text = ""
    value: Any = None
    value_repr: str | None = None
    value_json: bool = True
    error: ErrorInfo | None = None


class JobReport(Body):
    """Node -> hub: what it did with the batches that reached it (``batches`` it opened, and
    of their jobs those ``taken`` and ``declined``: sent at once when it declined any; the
    ``unopened`` ones, sealed to other nodes), and finished jobs (``results``; the node keeps
    each until the hub acknowledges it). ``free``: its free job slots after all that. The hub
    counts a job's report only from a node that reported the batch that carried it."""

    batches: list[MsgId] = []
    taken: list[JobId] = []
    declined: list[JobId] = []
    results: list[JobOutcome] = []
    free: Annotated[int, msgspec.Meta(ge=0)] = 0
    unopened: list[MsgId] = []  # batches that reached this node but were not sealed to it


class JobState(Body):
    """Node -> hub: its job slots and the jobs it runs (after registering, when they change,
    and every 10 beats when they do not)."""

    capacity: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    free: Annotated[int, msgspec.Meta(ge=0)]
    running: list[JobId] = []
    relay: bool = False  # its slots are its subtree's too: what it holds outlives its restarts


class JobAck(Body):
    """Hub -> nodes on PUB: results recorded (committed to the store), per node name. Each
    node only looks up its own name (1,000 nodes' ids are not checked one by one on each)."""

    acks: dict[str, list[str]]


class JobCancel(Body):
    """Admin -> hub (query): cancel these jobs. Hub -> nodes (PUB): stop running them."""

    jobs: list[JobId]


class JobRequest(Body):
    """One job as an admin submits it."""

    kind: Literal["python", "call"] = "python"
    code: Text = ""
    fn: FnHash | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    args_pickle: B64 | None = None
    id: JobId | None = None  # idempotent: a job with this id already is that job
    nodes: Glob = "*"
    retries: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    timeout: Seconds | None = None
    require: Annotated[str, msgspec.Meta(pattern=ASKED_RE)] = (
        "default")


class Submit(Body):
    """Admin request: queue jobs. Answered with their ids once they are in the store."""

    jobs: list[JobRequest]
    fns: dict[FnHash, B64] = {}


class JobQuery(Body):
    """Admin request: jobs by id (``job``; ``wait`` seconds for them to finish), or a list
    (``jobs``; by status, newest first)."""

    ids: list[JobId] = []
    status: Literal["queued", "assigned", "running", "done", "failed", "timeout",
                    "cancelled"] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 50
    wait: Annotated[float, msgspec.Meta(ge=0, le=7 * 86400)] = 0.0


# --- trees of hubs (docs/protocol.md, "Relays") ---------------------------------------------

Signed = Annotated[str, msgspec.Meta(max_length=64 * 1024 * 1024)]  # one whole signed message


class SubNode(Body):
    """One instance below a relay as the relay knows it (``path``: relative to the relay)."""

    path: NodePath
    key: KeyId
    status: Literal["offline", "connecting", "ready", "lost", "left", "restarting"]
    state: StateId = "unknown"
    host: Host = ""
    capacity: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    skew: Skew = 0.0  # its wall clock minus the time it uses (the relay's: the root's)


class Subtree(Body):  # relay -> its hub (results): every instance below it, whole each time
    nodes: Annotated[list[SubNode], msgspec.Meta(max_length=100_000)] = []


class Relay(Body):
    """Hub -> relays (PUB), and on down: ``msg``, signed by an authority, byte for byte, for
    ``paths`` (relative to the receiver); ``cmd``: its command (whose results go back up)."""

    msg: Signed
    paths: Annotated[list[NodePath], msgspec.Meta(min_length=1, max_length=100_000)]
    cmd: MsgId | None = None


class Relayed(Body):  # relay -> its hub (results): a message signed at ``path`` below it
    path: NodePath
    msg: Signed


# --- sealed payloads (odium.core.sealing) ---------------------------------------------------

GroupId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{12}\Z")]


class Sealed(Body):
    """The body of a ``sealed`` message (odium.core.sealing): nonce, one wrapped key per recipient
    (by a tag only that recipient can compute), and the box holding the inner message."""

    n: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{32}$")]  # the nonce, base64url
    # the wrapped keys: base64url of records of (9-byte tag, 48-byte wrapped key); its form is
    # checked where a receiver finds and decodes its own record, not over every recipient's
    k: Annotated[str, msgspec.Meta(max_length=8 * 1024 * 1024)]
    box: Annotated[str, msgspec.Meta(max_length=64 * 1024 * 1024)]
    bn: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{32}$")] | None = None  # box's nonce
    g: GroupId | None = None  # the readers' group, whose key a reader keeps (then k may be "")


class GroupKeys(Body):
    """Node -> hub: the keys of these groups of readers, which this node lacks."""

    g: Annotated[list[GroupId], msgspec.Meta(min_length=1, max_length=16)]


# type -> body struct. One entry per message type; see docs/protocol.md.
BODIES: dict[str, type[Body]] = {
    "hb": HubBeat,
    "exec": Exec,
    "interrupt": Interrupt,
    "node_hb": NodeBeat,
    "ack": Ack,
    "event": NodeEvent,
    "output": Output,
    "result": ResultBody,
    "join": Join,
    "register": Register,
    "fetch": Fetch,
    "run": Run,
    "nodes": Query,
    "log": Query,
    "keys": Query,
    "key": KeyAction,
    "token": TokenRequest,
    "launch": LaunchOpen,  # launches (odium.hub.launches)
    "launch_note": LaunchNote,
    "launches": Query,
    "launch_stop": LaunchNote,  # (its detail empty)
    "ping": Empty,
    "bye": Empty,
    "restarting": Empty,
    "state": StateReport,
    "sync": Sync,
    "bundle": BundleRequest,
    "sync_nodes": SyncRequest,
    "state_diff": Query,
    "forget": Query,  # pattern: the nodes to forget
    "reply": Reply,
    "reply_part": Reply,  # data {part, count, text}: a reply too large for one message, in parts
    "error": ErrorReply,
    # the job queue
    "job_batch": JobBatch,
    "job_report": JobReport,
    "job_state": JobState,
    "job_ack": JobAck,
    "job_cancel": JobCancel,
    "submit": Submit,
    "job": JobQuery,
    "jobs": JobQuery,
    "subtree": Subtree,  # trees of hubs
    "relay": Relay,
    "relayed": Relayed,
    "sealed": Sealed,  # exec, sync, job_batch and node replies travel sealed
    "group": Sealed,  # hub -> nodes on PUB: a readers' group's key, wrapped for each (no box)
    "group_key": GroupKeys,
}

def _key_fields(body: type[Body]) -> tuple[str, ...]:
    """The fields of a body that hold key ids (KeyId, KeyId | None, list[KeyId])."""
    shapes = (KeyId, KeyId | None, list[KeyId], list[KeyId] | None)
    return tuple(f.name for f in msgspec.structs.fields(body) if f.type in shapes)


_KEY_FIELDS = {t: f for t, b in BODIES.items() if (f := _key_fields(b))}
_env_decoder = msgspec.json.Decoder(Envelope)
_body_decoders = {t: msgspec.json.Decoder(b) for t, b in BODIES.items()}


class Message(msgspec.Struct, frozen=True):
    """An opened message: its envelope and its decoded body."""

    env: Envelope
    body: Body

    @property
    def type(self) -> str:
        return self.env.type

    @property
    def sender(self) -> str:
        return self.env.from_


def seal(
    key: SigningKey,
    sender: str,
    state: str,
    type_: str,
    body: Body,
    *,
    to: list[str] | None = None,
    seq: int = 0,
    re: str | None = None,
    msg_id: str | None = None,
    ts: float | None = None,
) -> bytes:
    """Encode and sign one message; returns the exact bytes for the wire (``ts``: the time
    to stamp, by default the wall clock's)."""
    if type(body) is not BODIES.get(type_):
        raise ProtocolError(f"message type {type_!r} takes {BODIES.get(type_)}, not {type(body)}")
    env: dict[str, Any] = {
        "v": VERSION,
        "type": type_,
        "id": msg_id or new_id(),
        "from": sender,
        "ts": time.time() if ts is None else ts,
        "state": state,
        "body": body,
    }
    if to:
        env["to"] = to
    if seq:
        env["seq"] = seq
    if re:
        env["re"] = re
    raw = encode_json(env)
    sig = key.sign(raw).signature
    return raw[:-1] + SIG_HEAD + b64url(sig).encode("ascii") + b'"}'


class Signer:
    """One sender's signing endpoint: its key and key id, and its state id, read afresh for
    every message (a node's state changes while it runs), and its clock (odium.core.clock).
    Every message an instance sends is made here."""

    def __init__(self, key: SigningKey, sender: str, state: Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.key, self.sender, self._state, self.clock = key, sender, state, clock

    def __call__(self, type_: str, body: Body, *, to: list[str] | None = None, seq: int = 0,
                 re: str | None = None, msg_id: str | None = None) -> bytes:
        return seal(self.key, self.sender, self._state(), type_, body, to=to, seq=seq, re=re,
                    msg_id=msg_id, ts=self.clock())


def open_message(
    data: bytes,
    verify_key: VerifyKey,
    expected_sender: str,
    *,
    max_size: int = MAX_MESSAGE,
    replay: "ReplayCache | None" = None,
    now: float | None = None,
) -> Message:
    """Verify, then parse, then validate one message from ``expected_sender``.

    Raises ProtocolError for a malformed message and AuthError for one that fails
    authentication (bad signature, wrong sender, stale, replayed).
    """
    signed, sig = split_signature(data, max_size)
    try:
        verify_key.verify(signed, sig)
    except BadSignatureError:
        raise AuthError("bad signature") from None
    check_depth(signed)
    try:
        env = _env_decoder.decode(signed)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"bad envelope: {e}") from None
    if env.v != VERSION:
        raise ProtocolError(f"protocol version {env.v} is not supported (expected {VERSION})")
    if env.from_ != expected_sender:
        raise AuthError(
            f"'from' {env.from_[:12]}… does not match the link's identity {expected_sender[:12]}…"
        )
    if replay is not None:
        replay.check(env.id, env.ts, now)
    return Message(env, decode_body(env))


def decode_body(env: Envelope) -> Body:
    dec = _body_decoders.get(env.type)
    if dec is None:
        raise ProtocolError(f"unknown message type {env.type!r}")
    try:
        body = dec.decode(env.body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"bad body for {env.type!r}: {e}") from None
    for name in _KEY_FIELDS.get(env.type, ()):  # a key id must be a real key, not just its shape
        value = getattr(body, name)
        for key in value if isinstance(value, list) else (value,):
            if key is not None and not is_key_point(key):
                raise ProtocolError(f"bad body for {env.type!r}: {name} {key[:12]}… is not an "
                                    "Ed25519 public key (not a point on the curve)")
    return body

