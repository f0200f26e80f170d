"""Claims: at most one process works on an input shard at a time, across runs, ranks and nodes.

A claim is a file `DST/claims/NAME.claim` published exclusively and whole (a hard link: of several processes one
succeeds) holding its owner (host, pid, the pid's start time, run id); a heartbeat refreshes its mtime. A
claim is stale when its owner is surely gone (same host: no such process) or has not heartbeated for the
timeout (another host), and is then taken over by a rename, which one process wins. Claims save work; what
makes a shard's rows exactly once is the exclusive commit of its manifest (`latent_vae.latents.writer.commit_shard`).
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
from ..utils.atomic import left_by_dead_process, pid_alive, publish_exclusive
from ..utils.errors import one_line
from ..utils.file_boundary import json_or_none
from .format import CLAIM_DIR

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
    """Claim files `DST/claims/NAME.claim`: published exclusively and whole, refreshed by a heartbeat
    (their mtime), taken over by a rename once stale: no heartbeat for `timeout` s, or a dead owner on this host."""

    def __init__(self, out: Path, owner: Owner, timeout: float) -> None:
        self.folder, self.owner, self.timeout = out / CLAIM_DIR, owner, values.timeout(timeout)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.claim"

    def try_claim(self, name: str) -> bool:
        path = self.path(name)
        # Published whole (written aside, then hard-linked): a process killed while claiming leaves no empty
        # claim, which no owner could be read from and which would block every rerun for the whole timeout.
        content = json.dumps({**asdict(self.owner), "claimed_at": time.time()})
        for attempt in range(2):
            if publish_exclusive(path, content):
                return True
            if attempt or not self._take_over_if_stale(path):
                return False
        return False

    def held(self, name: str) -> bool:
        """Whether a live process holds shard `name` (a claim that is not stale)."""
        return self._staleness(self.path(name))[0] is False

    def _staleness(self, path: Path) -> tuple[bool | None, bytes]:
        """(None: no claim | False: live | True: stale, the claim's content)."""
        try:
            content, modified = path.read_bytes(), path.stat().st_mtime
        except FileNotFoundError:
            return None, b""
        try:
            holder = Owner(**{k: v for k, v in json_or_none(content).items() if k in Owner.__dataclass_fields__})
        except (TypeError, AttributeError):
            return True, content  # claims are published whole: one that does not parse is debris
        # A run that ended inside this very process (after an error, in a notebook) holds nothing any more.
        ended_run_here = (holder.host, holder.pid) == (self.owner.host, self.owner.pid) \
            and holder.run_id != self.owner.run_id
        stale = time.time() - modified > self.timeout or ended_run_here or not holder.alive()
        return stale, content

    def _take_over_if_stale(self, path: Path) -> bool:
        stale, content = self._staleness(path)
        if stale is None:
            return True  # released meanwhile: try again
        if not stale:
            return False
        aside = path.with_name(f".{path.name}.{self.owner.run_id}.stale")
        try:
            os.rename(path, aside)  # of several processes taking over, one moves it
        except FileNotFoundError:
            return True
        if aside.read_bytes() != content:  # a fresh claim was created between our look and the rename: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def clear_stale(self) -> None:
        """Remove the stale claims of dead processes (one killed between its commit and its release), and the
        half-published claims of processes killed while claiming."""
        for path in self.folder.glob("*.claim"):
            self._take_over_if_stale(path)
        for path in self.folder.glob(".*.tmp"):
            if left_by_dead_process(path):
                path.unlink(missing_ok=True)

    def release(self, name: str) -> None:
        """Remove our claim (not one that another process has taken over meanwhile)."""
        path = self.path(name)
        try:
            if (json_or_none(path.read_bytes()) or {}).get("run_id") == self.owner.run_id:
                path.unlink()
        except (FileNotFoundError, AttributeError):
            pass


class HeartbeatStopped(RuntimeError):
    """This process's heartbeat thread has stopped: its claims no longer beat, so it must not claim more."""


class Heartbeat:
    """A daemon thread that touches the claim files of the shards this process is working on. It cannot die
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

    def add(self, path: Path) -> None:
        with self._lock:
            self.paths.add(path)

    def discard(self, path: Path) -> None:
        with self._lock:
            self.paths.discard(path)

    def _run(self) -> None:
        try:
            while True:
                time.sleep(self.interval)
                with self._lock:
                    paths = list(self.paths)
                for path in paths:
                    try:
                        os.utime(path)
                    except FileNotFoundError:
                        pass  # taken over: the exclusive commit still decides who writes the shard
        except BaseException as error:  # noqa: BLE001 -- kept for check(), and said at once
            self.error = error
            print(f"latent-vae: the claim heartbeat of process {os.getpid()} stopped "
                  f"({one_line(error, with_type=True)}); this process stops claiming shards", file=sys.stderr)
