"""Render docs/PROTOCOL.md from the schema: ``python -m npud.ipc_schema.docgen > docs/PROTOCOL.md``.

The prose below explains the transport; every table is generated from
npud.ipc_schema.schema and npud.ipc_schema.errors, and a test checks that the committed
file equals this output, so the document cannot drift from the code.
"""

from __future__ import annotations

import json

from npud.attach import HELLO_TIMEOUT_S
from npud.config import Scheduling
from npud.emulator.config import TARGET_HASH_PREFIX, TARGET_KEYS, make_config
from npud.server import BULK_FRAME_BYTES, HELD_BYTES_PER_CONNECTION, RELEASING_OPS, WAITING_PER_CONNECTION

from .errors import ErrorCode
from .schema import (ATTACH_HELLO, ATTACH_REPLY, BINDING, BUFFER_INFO, CACHE_ENTRY, CLIENT, CLIENT_DEVICE,
                     COMPILE_CACHE_STATS, COMPILE_OPTIONS, DEVICE, DEVICE_PARAMS, ENGINE_BUSY, ERROR, EVENT,
                     EVENTS, FD_MESSAGE, HARD_FRAME_LIMIT, HISTOGRAM, JOB_INFO, JOB_STATS, JOB_STATUS, LAYER,
                     LIMITS, MACS_PER_CYCLE, MAX_ATTACH_PACKET, MAX_INLINE_BYTES, MAX_MESSAGE_BYTES, OPS,
                     PARTITION_STATS, PLACEMENT, PROBLEM, PROTOCOL_VERSION, REPLY, REPORT_ROW, REQUEST, TENSOR_INFO,
                     TRACE_EVENT, TRACE_MODEL, USER_USAGE)
from .types import Struct

_RELEASING = ", ".join(f"`{op}`" for op in sorted(RELEASING_OPS)[:-1]) + f" and `{sorted(RELEASING_OPS)[-1]}`"

INTRO = f"""\
# The npud protocol, version {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}

This document is generated from `npud/ipc_schema/schema.py` by
`python -m npud.ipc_schema.docgen`; a test keeps it identical.  It is enough to
write a client in any language with a ZeroMQ and a msgpack library.

## Transport

- The daemon binds a ZeroMQ **ROUTER** socket; a client connects a **DEALER**
  socket to the daemon's endpoint and sends each request as one frame, with no
  empty delimiter frame before it.  Not a REQ socket: REQ puts an empty frame
  before every message, so the daemon sees a request of two frames and answers
  `EPROTO` with `seq` 0, and REQ then discards that reply because it lacks the
  empty frame REQ expects (the client waits forever).  REQ also allows only one
  request in flight, while replies may come in any order (below).
- Endpoint rules, shared by npud, the client library and npuctl: an explicit
  endpoint; else `$NPUD_ENDPOINT`; else `ipc://$XDG_RUNTIME_DIR/npud/npud.sock`;
  else `ipc:///tmp/npud-$UID/npud.sock`.  The system service listens on
  `ipc:///run/npud/npud.sock`.
- Every request is **one frame** holding one msgpack map (a request of several
  frames is refused with `EPROTO`).  Every reply and event is one frame too.
- Frames larger than {MAX_MESSAGE_BYTES} bytes are answered with `EMSGSIZE`.  Frames
  larger than {HARD_FRAME_LIMIT} bytes (`ZMQ_MAXMSGSIZE`) make libzmq drop the
  connection before the daemon sees them; the client library refuses such
  frames locally with `EMSGSIZE`.  Inline payloads (buffer data, command
  streams, tensors) are at most {MAX_INLINE_BYTES} bytes: move bulk data
  through mapped buffers.

## Values on the wire

Each frame is exactly one msgpack object (trailing bytes are refused); every map in it
has msgpack str keys.  The tables below give each field's type and range:

- **int**: a request may use any msgpack integer family (fixint, uint 8/16/32/64,
  int 8/16/32/64); the daemon checks the value against the field's range, not the
  encoding.  The daemon writes each integer in the smallest family that holds it, so a
  reader must accept them all.  A range up to 18446744073709551615 needs an unsigned
  64-bit variable (`uint64_t`); a range starting at -1 (a `uid` the daemon does not
  know) needs a signed one (`int64_t`).
- **float**: the daemon writes msgpack float 64 (a C `double`).  No request field is a
  float.
- **bool**: msgpack `true`/`false`; an integer 0 or 1 is refused.
- **str**: msgpack str holding UTF-8; its limit counts characters (code points).
  **bin**: msgpack bin.  A str where bin is expected, or the other way round, is refused.
- **map** / **array**: as the tables say.  `nil` is never a valid value: leave an
  optional field out instead.  msgpack extension types are refused.
- In replies, a field marked required is always present and an optional one may be
  absent; a result field documented for a state (such as `error` for a failed job) is
  present exactly then.

## Requests, replies and events

A request names its op, carries a client-chosen `seq` (echoed in the reply,
so a client may pipeline requests) and the op's `args`.  A reply has the
request's `seq` and either a `result` or an `error`.  An error carries a stable
`code` (table below), a message for a person, and `retryable`: whether sending
the same request again can succeed.  A request that fails validation is
answered with an error and changes nothing; the session stays usable.
Replies to one connection may arrive in any order (ops that wait, like
`wait`, finish later than ops sent after them): match them by `seq`.  The daemon
does not check that `seq`s are distinct: keep those of requests in flight apart,
or their replies cannot be told apart.

What a malformed request gets:

| what is wrong | code | `seq` of the reply |
| --- | --- | --- |
| the frame is larger than `max_message_bytes` | `EMSGSIZE` | 0 |
| the request has more than one frame (a REQ socket's delimiter, say) | `EPROTO` | 0 |
| the frame is not one msgpack object, or not a map | `EPROTO` | 0 |
| `seq` is missing, not an int, or out of range | `EPROTO` | 0 |
| with a readable `seq`: `op` or `args` missing or of the wrong type, or another key in the envelope | `EINVAL` | the request's |
| an unknown op | `EINVAL` | the request's |
| an argument missing, of the wrong type, out of range, or not in the op's table | `EINVAL` | the request's |
| an op other than `hello` and `version` before `hello` | `ENOTCONN` (retryable) | the request's |

None of them changes anything or closes the session; the message names the offending
field.  Number your requests from 1, so that `seq` 0 never names one of them: a reply
with `seq` 0 answers a frame the daemon could not read, and that frame's request gets
no other reply.  The reply cannot say which request it was; a client with several
requests in flight should report the error (it means the client built a bad frame) and
let each request that stays unanswered time out on its own.  The `npu` library drops
such replies.

## Order

A client may send many requests before reading any reply.  Requests of one
session that touch the same object take effect in the order they were sent;
independent requests overlap.  Two requests *conflict* when both name:

- the same handle: a buffer (`write`, `read`, `map`, `free`, `submit`'s
  `bindings`, `run_model`'s `inputs` and `outputs`, the `model_buffer` or `model_buffers` of
  `load` and `check`) or a loaded model (`run_model`, `report`, `unload`);
- the same job id (`wait`, `wait_jobs`, `cancel`, `fence_export`, the `after`
  of `submit` and `run_model`);
- the session's job list: `submit`, `run_model`, `fence_import` and
  `inject_fault` conflict with each other, so job ids and fence points follow
  the order sent, and a request naming a job id not assigned yet waits for them.

A request starts once every earlier conflicting request of its session has been
answered; `wait` and `wait_jobs` only watch, so they count as done once they
have started (a `cancel` sent after a `wait` of the same job is not held up
until the wait ends), and a `run_model` with `wait_ms` counts as done once its
job is queued, except on its buffers (section *Running a model*).  `bye` takes
effect once every earlier request of its session on its objects has been
answered (waits, and runs with `wait_ms` whose job is queued, aside: `bye`
cancels their jobs; a `load` of inline bytes is not waited for, and fails with
`ENOTCONN` if it ends after `bye`), and requests sent after `bye` are handled
after it (a `hello` then opens a new session).
Nothing else is ordered: a slow `load` does not hold up a `ping` or a `read` of
another buffer, a `wait` does not hold up a `write`, and loads may finish (and
get their model handles) in any order.  Use a handle only once the reply that
created it has arrived.

A connection may have at most {WAITING_PER_CONNECTION} requests in progress that were not
answered at once (handled in the background or queued behind others), and the daemon
holds at most {HELD_BYTES_PER_CONNECTION} bytes for it: replies it has not read yet, plus the
payloads of its requests in progress (frames of {BULK_FRAME_BYTES} bytes or more, and the `size`
of a `read`).  A request past either limit fails with `EAGAIN` (retryable, with
`retry_after_ms`); one is always admitted while its connection holds nothing, and
{_RELEASING}, which release what is held, are never refused this way.

Events are frames the daemon sends unprompted; they have an `event` key
instead of `seq`.  A client must ignore events it does not know.

## Sessions

`hello` must come first on a connection and opens a session tied to that
connection (its ZeroMQ routing id).  A second `hello` on a connection that has a session
fails with `EINVAL` and leaves the session as it was: send `bye` first.

Buffer handles and job ids are the session's own names: no request can name
another session's objects (a foreign or stale handle is `ENOENT`).

A session ends with `bye`, when its companion socket closes, or — for a
session without one — after `lease_ms` without any request (send `ping` to
keep it).  Everything it held is freed then.

## Versions

`hello` carries the client's `[major, minor]` and its result the daemon's.  The majors
must match; otherwise `hello` fails with `EPROTO` naming both versions, and no session
is opened.  Any minor is accepted, and the lower of the two applies: a newer minor only
adds ops, optional request fields and reply fields.  The daemon does not adapt to the
client's minor (a 1.99 client is answered `[1, {PROTOCOL_VERSION[1]}]` and then spoken
to in {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}), so:

- a client newer than the daemon sends only the ops and fields of the daemon's minor.
  The daemon refuses what it does not know, an unknown op or an unknown field of
  `args`, with `EINVAL` naming it; it never ignores one, so a request cannot quietly
  lose part of its meaning.  A field added by a minor version says so in the tables
  ("since 1.5") and is optional, so a newer client learns from a reply field's
  absence that the daemon is too old to report it.  Versions before 1.5 did not
  record this: a client that must work with a daemon older than 1.5 checks that a
  reply field is present before using it;
- a client older than the daemon ignores reply fields and events it does not know:
  the daemon sends its own minor's fields to every client.

## Jobs: waiting, scheduling, cancelling

`submit` and `run_model` queue a job and answer with its id at once.  `wait` answers
when the job has finished, whether it succeeded (`state` `done`, `stats` filled in) or
failed (`state` `failed`, `error` saying why): a failed job is not an error of `wait`.
A `wait` whose `timeout_ms` passes first fails with `ETIMEDOUT` (retryable) and does
not touch the job, which stays queued or running: wait again.  `wait_jobs` does not
fail when its timeout passes: it answers with every job's state and `ready` false.

A device runs, whenever a core is free, a job of the highest priority class that has
one runnable (`context_create` sets a context's class; the session's default context
is `normal`), and within a class shares the device between contexts by weight
(modeled cycles used divided by `weight`).  A starvation guard bends strict priority:
a job of a lower class that has been runnable for more than `starvation_ms` (daemon
configuration, {Scheduling.starvation_ms} ms unless set) runs next, the one waiting longest
first, so work of a lower class is delayed, never starved.  A job of a higher class
stops a running model job at its next layer boundary (it resumes later); a raw command
stream runs to its end.

`cancel` fails a queued job with `ECANCELED` at once and a running model job at its next
layer boundary; jobs that depend on it (`after`) fail too.  A job id from
`fence_import` names another session's job: it may be waited for and named in `after`,
but `cancel` and `fence_export` of it fail with `EPERM`.

## Running a model

`load` lists a model's inputs and outputs (`tensor_info`); `run_model` takes one buffer
per input and one per output, in that order.  A tensor lives at offset 0 of its buffer,
its elements packed densely in C order (the last dimension varies fastest), each
little-endian: `float32` IEEE 754 binary32, `float16` binary16, `bool` one byte 0 or 1,
the integer types two's complement.  A buffer must hold at least the tensor's `size`
bytes and take no more pages than that size needs (`params.page_size`), or `run_model`
fails with `EINVAL`: allocate exactly `size` bytes.  Outputs are written in place; read
them once the job is done.

A `run_model` with `wait_ms` (since 1.8) is a run and its `wait` in one round trip: it
answers once the job has finished, with the job's `state`, `stats` and `error` as `wait`
gives them besides `job`, `context` and `point` (a heterogeneous model: its last job,
as without `wait_ms`).  A failed run is not an error of `run_model` (`state` `failed`,
`error` saying why: a device error, `ECANCELED`, `ETIME`).  If `wait_ms` passes first it
still succeeds, with `state` `queued` or `running`: the job runs on; `wait` for its id.
Only a request refused before the job was made is an error of `run_model`.  While it
waits it holds up later requests of its session on its `inputs` and `outputs` only
(a `write` of an input sent after it takes effect once the run has finished with it, a
`read` of an output sees the run's result), not requests on its model, its job or
other jobs: a `submit` or `run_model` of other buffers, a `cancel` or `wait` of its
job, sent after it, go ahead once its job is queued.

## The companion socket (local clients)

ZeroMQ cannot carry file descriptors, so a local client also connects the Unix
`SOCK_SEQPACKET` socket named by `hello`'s `attach_path` and sends one
`attach.hello` packet with the session id and `attach_token`.  The daemon
answers with `attach.reply`, learns the client's uid and pid from the kernel
(`SO_PEERCRED`), and from then on sends `attach.fd` packets, each with one
memfd in `SCM_RIGHTS` ancillary data, in answer to `map` requests (the packet
is sent before the `map` reply, tagged with the request's `seq`).  The client
never writes to it again.  When the client process exits, the kernel closes
the socket and the daemon frees the session at once.  Map the received fd with
`MAP_SHARED` for its full `size` (page-rounded); the first `size` bytes of the `map`
reply are the buffer's.

Every packet is one msgpack map (tables at the end), one SEQPACKET record of at most
{MAX_ATTACH_PACKET} bytes.  The client must send `attach.hello` within
{HELLO_TIMEOUT_S:g} s of connecting, or the daemon closes the socket without a word.  A refusal is
an `attach.reply` with `ok` false and an `error`, after which the daemon closes the
socket; the session itself lives on, unattached:

| `error.code` | why |
| --- | --- |
| `EPROTO` | the packet is not an `attach.hello` map (not msgpack, a key missing or unknown, a wrong type) |
| `EPERM` | no session has that id and token; the session is not an ipc one; or the socket's peer (`SO_PEERCRED`) is another uid than the session's |
| `EINVAL` | the session already has a companion socket |

Each `attach.fd` packet carries exactly one fd, and arrives before the reply to the
`map` request whose `seq` is its `tag`.

## Models and their data

`load` and `check` take a model's bytes (inline in `model`, in `model_buffer`, or, for a model
larger than one buffer may be (`max_buffer_bytes`), split in order over `model_buffers`: the
daemon hashes and compiles their concatenation, and the `npu` library splits by itself): either
plain ONNX, self-contained, or a *model container* for models over protobuf's 2 GiB limit
(layout in `npud/ipc_schema/model_container.py`: the magic `NPUDMDL\\0`, a version, the ModelProto's
length, the ModelProto, then a data section; tensors kept out of the protobuf name
`location = "\\0npud-container"` with `offset` and `length` into that section).  npud never
opens a file a model names: a tensor whose data lives in an external file is refused with
`EINVAL` naming it.  A client reads such data itself, next to the model and with its user's
permissions, and sends it inline or in a container (the `npu` library does so for a path).
"""


def _target_hash_section() -> str:
    """How to compute a device's target hash, with the `edge` preset worked through."""
    edge = make_config("edge")
    params = edge.to_dict()
    canon = json.dumps({k: params[k] for k in TARGET_KEYS}, sort_keys=True, separators=(",", ":"))
    keys = ", ".join(f"`{k}`" for k in sorted(TARGET_KEYS))
    left_out = ", ".join(f"`{k}`" for k in params if k not in TARGET_KEYS)
    prefix = TARGET_HASH_PREFIX.decode()
    return f"""## Command streams and the target hash

`submit` runs a binary command stream (format in docs/ISA.md).  Its header carries an
8-byte *target hash* (bytes 8 to 15); a device refuses a stream whose hash is not its own
with `EINVAL` (the message names both hashes), so a stream built for one set of parameters
never runs on another.  `devices` reports each device's hash as `target_hash` (since 1.5);
a client can also compute it from the device's `params`:

1. Take these keys of `params`:
   {keys}.
   The others ({left_out}) say how the daemon hosts the device, not what a stream
   may do, and stay out.
2. Write them as one JSON object with the keys sorted (by their bytes) at every level
   (`macs_per_cycle` is a nested object), integers in decimal, and no whitespace at all:
   `,` between members and `:` between a key and its value.
3. Put the ASCII bytes `{prefix}` in front (no terminating NUL).
4. Hash those bytes with unkeyed BLAKE2b whose digest length is 8 bytes.  The digest
   length is a BLAKE2b parameter, so this is *not* the first 8 bytes of BLAKE2b-512:
   libsodium's `crypto_generichash(out, 8, data, len, NULL, 0)`, Python's
   `hashlib.blake2b(data, digest_size=8)`.

For the `edge` preset the bytes hashed are

```
{prefix}{canon}
```

and its target hash is `{edge.target_hash().hex()}` (hex, in the order the bytes appear in
the header).
"""


def _struct_table(struct: Struct) -> str:
    rows = ["| field | type | required | meaning |", "| --- | --- | --- | --- |"]
    for name, f in struct.fields.items():
        since = f"(since {f.since[0]}.{f.since[1]}) " if f.since else ""
        rows.append(f"| `{name}` | {f.type.describe()} | {'no' if f.optional else 'yes'} | {since}{f.doc} |")
    if not struct.fields:
        rows.append("| | (empty map) | | |")
    return "\n".join(rows)


def _section(title: str, struct: Struct) -> str:
    doc = f"\n{struct.doc}\n" if struct.doc else ""
    return f"### `{struct.name}`\n{doc}\n{_struct_table(struct)}\n"


def render() -> str:
    parts = [INTRO, _target_hash_section(), "## Envelopes\n"]
    for struct in (REQUEST, REPLY, ERROR, EVENT):
        parts.append(_section(struct.name, struct))
    parts.append("## Errors\n\n| code | retryable by default | meaning |\n| --- | --- | --- |")
    parts += [f"| `{c.value}` | {'yes' if c.retryable else 'no'} | {c.meaning} |" for c in ErrorCode]
    parts.append("\n## Ops\n")
    for op in OPS.values():
        parts.append(f"### `{op.name}`\n\n{op.doc}"
                     + ("" if op.needs_session else " Allowed before `hello`.")
                     + (f" Errors it may return besides validation errors: "
                        f"{', '.join(f'`{e}`' for e in op.errors)}." if op.errors else "")
                     + f"\n\n**args**\n\n{_struct_table(op.args)}\n\n**result**\n\n{_struct_table(op.result)}\n")
    parts.append("## Events\n")
    for name, struct in EVENTS.items():
        parts.append(_section(name, struct))
    parts.append("## Shared structures\n")
    for struct in (DEVICE, DEVICE_PARAMS, MACS_PER_CYCLE, HISTOGRAM, CLIENT, CLIENT_DEVICE, LIMITS, BINDING,
                   TENSOR_INFO, COMPILE_OPTIONS, PROBLEM, REPORT_ROW, PLACEMENT, CACHE_ENTRY, COMPILE_CACHE_STATS,
                   USER_USAGE, JOB_STATUS, JOB_STATS, PARTITION_STATS, ENGINE_BUSY, JOB_INFO, TRACE_EVENT, TRACE_MODEL, LAYER,
                   BUFFER_INFO):
        parts.append(_section(struct.name, struct))
    parts.append("## Companion socket packets\n")
    for struct in (ATTACH_HELLO, ATTACH_REPLY, FD_MESSAGE):
        parts.append(_section(struct.name, struct))
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
