"""Claims: at most one process works on an input shard at a time, across runs, ranks and nodes.

A claim is a record `claims/NAME.claim` in the dataset's store (`latent_vae.latents.storage`), published
exclusively and whole (of several processes one succeeds) holding its owner (host, pid, the pid's start time,
run id); a heartbeat refreshes it (a local file's mtime; an object store's claim rewritten if unchanged). A claim
is stale when its owner is surely gone (same host: no such process) or has not heartbeated for the timeout
(another host), and is then taken over by a compare-and-swap on what was seen, which one process wins. Claims
save work; what makes a shard's rows exactly once is the exclusive commit of its manifest
(`latent_vae.latents.writer.commit_shard`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from ..utils import option_values as values
from ..utils.atomic import pid_alive
from ..utils.errors import one_line
from ..utils.file_boundary import json_or_none
from .locations import open_store
from .storage import CLAIM_DIR, CLAIM_SUFFIX, DatasetStore, Seen, claim_key

HOST = socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a live pid from a reused one); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    except OSError:  # no /proc (not Linux): fall back to the pid alone
        return "alive" if pid_alive(pid) else None


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: the process that will commit the shard (the run's main process)."""

    host: str
    pid: int
    started: str | None
    run_id: str

    @classmethod
    def this_process(cls) -> Owner:
        return cls(HOST, os.getpid(), _process_start(os.getpid()), uuid.uuid4().hex)

    def alive(self) -> bool:
        """False only when surely dead: a process of this host that is gone (another host's is judged by heartbeat)."""
        return self.host != HOST or (_process_start(self.pid) is not None and
                                     self.started in (None, "alive", _process_start(self.pid)))


class Claims:
    """Claim records `claims/NAME.claim` of a dataset's store: published exclusively and whole, refreshed by a
    heartbeat, taken over (compare-and-swap) once stale: no heartbeat for `timeout` s, or a dead owner on this host."""

    def __init__(self, out: str | os.PathLike | DatasetStore, owner: Owner, timeout: float) -> None:
        self.store, self.owner, self.timeout = open_store(out), owner, values.timeout(timeout)

    def _content(self) -> bytes:
        # The time makes every write's bytes differ: an object store's heartbeat then changes the ETag, and a
        # conditional write retried after a lost answer can tell its own bytes from another writer's.
        return json.dumps({**asdict(self.owner), "claimed_at": time.time()}).encode()

    def try_claim(self, name: str) -> bool:
        key = claim_key(name)
        # Published whole (exclusive create of the complete record): a process killed while claiming leaves no
        # empty claim, which no owner could be read from and which would block every rerun for the whole timeout.
        content = self._content()
        if self.store.publish(key, content):
            return True
        stale, seen = self._staleness(key)
        if stale is None:  # released meanwhile: try once more
            return self.store.publish(key, content)
        return bool(stale) and self.store.take_over(key, seen, content)

    def handle(self, name: str) -> ClaimBeat:
        """What the heartbeat refreshes for shard `name` (the claim this process has just made)."""
        return ClaimBeat(self, name, self.store.seen(claim_key(name)))

    def held(self, name: str) -> bool:
        """Whether a live process holds shard `name` (a claim that is not stale)."""
        return self._staleness(claim_key(name))[0] is False

    def _staleness(self, key: str) -> tuple[bool | None, Seen | None]:
        """(None: no claim | False: live | True: stale, the claim as seen)."""
        seen = self.store.seen(key)
        if seen is None:
            return None, None
        try:
            holder = Owner(**{k: v for k, v in json_or_none(seen.content).items() if k in Owner.__dataclass_fields__})
        except (TypeError, AttributeError):
            return True, seen  # claims are published whole: one that does not parse is debris
        # A run that ended inside this very process (after an error, in a notebook) holds nothing any more.
        ended_run_here = (holder.host, holder.pid) == (self.owner.host, self.owner.pid) \
            and holder.run_id != self.owner.run_id
        stale = time.time() - seen.modified > self.timeout or ended_run_here or not holder.alive()
        return stale, seen

    def clear_stale(self) -> None:
        """Remove the stale claims of dead processes (one killed between its commit and its release), and the
        half-published claims of processes killed while claiming."""
        for name in self.store.list(CLAIM_DIR, CLAIM_SUFFIX):
            key = f"{CLAIM_DIR}/{name}"
            stale, seen = self._staleness(key)
            if stale:
                self.store.remove_if_unchanged(key, seen)
        for key in self.store.dead_leftovers(CLAIM_DIR):
            self.store.remove(key)

    def ours(self, seen: Seen | None) -> bool:
        """Whether a claim as seen is held by this run (by this process or by one of its DataLoader workers)."""
        record = json_or_none(seen.content) if seen is not None else None
        return isinstance(record, dict) and record.get("run_id") == self.owner.run_id

    def release(self, name: str) -> None:
        """Remove our claim (not one that another process has taken over meanwhile)."""
        key = claim_key(name)
        seen = self.store.seen(key)
        if self.ours(seen):
            self.store.remove_if_unchanged(key, seen)


class ClaimBeat:
    """One claim that the heartbeat keeps fresh; it stops beating once another process has taken it over."""

    def __init__(self, claims: Claims, name: str, seen: Seen | None) -> None:
        self.claims, self.key, self.seen = claims, claim_key(name), seen

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClaimBeat) and other.key == self.key and other.claims is self.claims

    def beat(self) -> bool:
        """Refresh the claim; False once it is gone or taken over (the exclusive commit still decides who writes)."""
        if self.seen is None:
            return False
        fresh = self.claims.store.refresh(self.key, self.seen, self.claims._content())
        if fresh is None:  # changed since we saw it: by this run's other beater (a worker), or taken over
            current = self.claims.store.seen(self.key)
            fresh = current if self.claims.ours(current) else None
        self.seen = fresh
        return fresh is not None


def _beat(target: ClaimBeat | os.PathLike) -> bool:
    """Refresh one claim: a ClaimBeat, or a local claim file given by its path (its mtime is the heartbeat)."""
    if isinstance(target, ClaimBeat):
        return target.beat()
    try:
        os.utime(target)
    except FileNotFoundError:
        return False
    return True


class HeartbeatStopped(RuntimeError):
    """This process's heartbeat thread has stopped: its claims no longer beat, so it must not claim more."""


class Heartbeat:
    """A daemon thread that refreshes the claims of the shards this process is working on. It cannot die
    silently: an error that stops it is printed and kept, and `check` (called before every claim) raises
    HeartbeatStopped from then on, so the process stops claiming shards that nothing would keep claimed."""

    _per_process: ClassVar[dict[int, Heartbeat]] = {}

    def __init__(self, interval: float) -> None:
        self.interval = values.timeout(interval)  # finite: time.sleep(inf) raises, and a claim would never beat
        self.paths, self._lock = set(), threading.Lock()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise HeartbeatStopped if the thread has stopped (naming why)."""
        if self.error is not None or not self._thread.is_alive():
            why = one_line(self.error, with_type=True) if self.error is not None else "the thread is gone"
            raise HeartbeatStopped(f"the claim heartbeat of process {os.getpid()} stopped ({why}): it claims no more "
                                   "shards; the shards it held are taken over once stale, and a rerun finishes them")

    @classmethod
    def of_this_process(cls, interval: float) -> Heartbeat:
        """One heartbeat thread per process (a DataLoader worker is a process of its own), however many passes."""
        beat = cls._per_process.get(os.getpid())
        if beat is None or beat.interval != interval or beat.error is not None:  # a stopped one ended its run
            beat = cls._per_process[os.getpid()] = cls(interval)
        return beat

    def add(self, path: ClaimBeat | Path) -> None:
        with self._lock:
            self.paths.add(path)

    def discard(self, path: ClaimBeat | Path) -> None:
        with self._lock:
            self.paths.discard(path)

    def _run(self) -> None:
        try:
            while True:
                time.sleep(self.interval)
                with self._lock:
                    paths = list(self.paths)
                for target in paths:
                    if not _beat(target):
                        self.discard(target)  # gone or taken over: the exclusive commit decides who writes
        except BaseException as error:  # noqa: BLE001 -- kept for check(), and said at once
            self.error = error
            print(f"latent-vae: the claim heartbeat of process {os.getpid()} stopped "
                  f"({one_line(error, with_type=True)}); this process stops claiming shards", file=sys.stderr)
