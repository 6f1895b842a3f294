"""The order of one session's requests: what touches the same object takes effect in the order sent.

A client may pipeline requests; the daemon runs some inline and others as tasks
(npud/server.py), so without a rule a `read` sent after a `write` of the same
buffer could run first.  Each request names the objects it touches as *keys*
(``touches`` in npud/handlers.py: a buffer handle, a model, a job, the
session's job list).  A ``Sequencer`` keeps, per key, a FIFO queue of the
session's requests that touch it and are not finished: a request runs once it
is at the head of every queue it is in, so two requests sharing a key take
effect in arrival order, and requests without a shared key overlap freely.
Because every request joins all its queues at arrival, the queues agree on one
order and the oldest waiting request can always run: no deadlock.

Two refinements:

- an *observer* (``wait``, ``wait_jobs``) takes effect when it starts (it only
  looks at a job): the requests behind it may run as soon as it has started;
- a request that *queues* work and then waits for it (``run_model`` with
  ``wait_ms``) ``release``-s the keys it no longer needs once the work is
  queued (its model, its job, the job list), keeping only those whose later
  use must see the work done (its buffers) until it is answered; a barrier
  does not wait for it then (``bye`` cancels its work);
- a *barrier* (``bye``) runs once every earlier request in the queues has
  finished, and every later request waits for it.  Requests that touch none of
  the session's objects (a load of inline bytes, cache and device ops) are
  never entered, so they do not hold up ``bye``: everything the session holds
  is freed then anyway, and a compile can take minutes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable


class Ticket:
    """One request's place in its session's queues."""

    __slots__ = ("keys", "launch", "barrier", "blocked", "launched", "released", "left")

    def __init__(self, keys: tuple, launch: Callable[["Ticket"], None] | None, barrier: bool):
        self.keys = keys
        self.launch = launch
        self.barrier = barrier
        self.blocked = 0          # queues in which it is not yet at the head
        self.launched = False
        self.released = False     # ``release``-d: only its kept keys are left, no barrier waits for it
        self.left = False


class Sequencer:
    """A session's per-object queues (see the module docstring)."""

    __slots__ = ("_queues", "_active", "_barrier", "_held", "_ready", "_draining")

    def __init__(self):
        self._queues: dict[Hashable, deque[Ticket]] = {}
        self._active = 0                      # tickets entered and not yet left
        self._barrier: Ticket | None = None   # the barrier entered and not yet left
        self._held: deque[Callable[[], None]] = deque()   # requests that arrived behind the barrier
        self._ready: deque[Ticket] = deque()
        self._draining = False

    @property
    def barrier_pending(self) -> bool:
        """Whether a barrier has not finished: a new request must be ``hold``-ed until it has."""
        return self._barrier is not None

    def must_wait(self, keys: Iterable[Hashable], barrier: bool = False) -> bool:
        """Whether a request touching ``keys`` (or a barrier) could not run at once."""
        if self._barrier is not None:
            return True
        if barrier:
            return self._active > 0
        queues = self._queues
        for key in keys:   # a loop, not any(): this is on every request's path
            if key in queues:
                return True
        return False

    def enter(self, keys: Iterable[Hashable], launch: Callable[[Ticket], None], barrier: bool = False) -> Ticket:
        """Register a request; ``launch(ticket)`` is called (now, or when its turn comes) to start it.
        The caller must ``leave(ticket)`` once the request has taken effect.  Not while a barrier is
        pending (``hold`` then)."""
        assert self._barrier is None
        ticket = Ticket(tuple(dict.fromkeys(keys)), launch, barrier)
        self._active += 1
        if barrier:
            self._barrier = ticket
            if self._active == 1:
                self._ready.append(ticket)
        else:
            queues = self._queues
            for key in ticket.keys:
                queue = queues.get(key)
                if queue is None:
                    queues[key] = deque((ticket,))
                else:
                    queue.append(ticket)
                    ticket.blocked += 1
            if not ticket.blocked:
                self._ready.append(ticket)
        self._drain()
        return ticket

    def hold(self, resume: Callable[[], None]) -> None:
        """Keep a request that arrived behind a pending barrier; ``resume()`` is called, in arrival
        order, once the barrier has finished (the request is then dispatched afresh: the barrier
        may have closed its session)."""
        self._held.append(resume)

    @property
    def held(self) -> int:
        return len(self._held)

    def holds_up(self, ticket: Ticket) -> bool:
        """Whether some later request waits for ``ticket`` to leave."""
        if self._barrier is not None and self._barrier is not ticket:
            return True
        return any(len(self._queues[key]) > 1 for key in ticket.keys)

    def release(self, ticket: Ticket, keep: Iterable[Hashable]) -> None:
        """``ticket``'s request has taken effect on all its objects but those in ``keep``: start
        those it held up on the others.  It stays entered (``leave`` it once it is done)."""
        keep = set(keep)
        if ticket.left or ticket.released or not ticket.launched:
            return
        ticket.released = True
        self._active -= 1   # a barrier need not wait for the rest: its work is queued, bye cancels it
        self._pop(ticket, [key for key in ticket.keys if key not in keep])
        ticket.keys = tuple(key for key in ticket.keys if key in keep)
        self._barrier_may_run()
        self._drain()

    def _pop(self, ticket: Ticket, keys: Iterable[Hashable]) -> None:
        """Take a launched ``ticket`` off the head of ``keys``' queues; ready whoever that unblocks."""
        queues = self._queues
        for key in keys:
            queue = queues[key]
            queue.popleft()   # it ran, so it was at the head of each of its queues
            if not queue:
                del queues[key]
                continue
            head = queue[0]   # it joined this queue behind ``ticket``: one wait less
            head.blocked -= 1
            if not head.blocked:
                self._ready.append(head)

    def leave(self, ticket: Ticket) -> None:
        """``ticket``'s request has taken effect: start those it held up (safe to call twice)."""
        if ticket.left:
            return
        ticket.left = True
        if not ticket.released:
            self._active -= 1
        self._pop(ticket, ticket.keys)
        barrier = self._barrier
        if ticket is barrier:
            self._barrier = None
            held, self._held = self._held, deque()
            self._drain()
            for resume in held:   # a new barrier among them holds the rest again, in order
                if self._barrier is not None:
                    self._held.append(resume)
                else:
                    resume()
            return
        self._barrier_may_run()
        self._drain()

    def _barrier_may_run(self) -> None:
        """Ready the pending barrier once it is the only request entered."""
        barrier = self._barrier
        if barrier is not None and not barrier.launched and self._active == 1 and barrier not in self._ready:
            self._ready.append(barrier)

    def _drain(self) -> None:
        """Launch the ready tickets in order; a launch that finishes at once and leaves (an inline
        handler) only queues what it frees, so a long chain runs in a loop, not a recursion."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._ready:
                ticket = self._ready.popleft()
                ticket.launched = True
                launch, ticket.launch = ticket.launch, None   # the callback holds the request, which
                launch(ticket)                                # holds the ticket: break the cycle
        finally:
            self._draining = False
