"""Who may talk to the sidecar, and how much of it one peer may take.

The trainer socket drives remediation, so a connection is admitted in steps:

1. the Unix socket and its folder are not world-accessible (``socket_mode``,
   ``socket_group``), so only the pod's trainer containers can connect;
2. on a Unix socket the peer's credentials (``SO_PEERCRED``) are checked
   against ``allowed_uids`` / ``allowed_gids`` when either is set;
3. when ``secret_file`` is set, the HELLO must carry the same ``secret``
   (compared in constant time; the secret never reaches the run state);
4. a HELLO is refused when its (job, rank) is held by a live connection, when
   the rank is not below the world size, when the world size differs from
   that of the job's live ranks, when the sidecar holds ``max_trainers`` already,
   or when its param groups would create more than ``max_series_per_trainer``.

Every refusal is counted in ``adamwatch_sidecar_connections_refused_total{reason}``
by one of :data:`REFUSAL_REASONS` and closes that connection only.

    >>> Admission(secret="s3cret").check_secret({"secret": "s3cret"})
    >>> Admission(secret="s3cret").check_secret({})
    Traceback (most recent call last):
    ...
    adamwatch_sidecar.admission.Refused: bad_secret: HELLO carries no secret
"""

from __future__ import annotations

import hmac
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["REFUSAL_REASONS", "Refused", "Admission", "PeerCredentials", "peer_credentials",
           "estimated_series", "read_secret", "SECRET_ENV"]

# Environment variable through which a trainer finds the secret's file.
SECRET_ENV = "ADAMWATCH_SECRET_FILE"

# Every reason a connection or its HELLO is refused (the metric's label values).
REFUSAL_REASONS: tuple[str, ...] = (
    "peer_not_allowed",  # SO_PEERCRED uid/gid not in allowed_uids/allowed_gids
    "bad_secret",  # HELLO without the shared secret, or with another one
    "rank_in_use",  # (job, rank) is held by a live connection: never displaced
    "rank_out_of_range",  # rank >= world_size
    "world_size_mismatch",  # world_size differs from the job's live ranks'
    "too_many_trainers",  # the sidecar holds max_trainers already
    "too_many_series",  # the HELLO's param groups would exceed max_series_per_trainer
    "buffer_limit",  # partial frames over max_buffered_bytes in total
    "stalled_frame",  # a partial frame made no progress within partial_frame_timeout_seconds
)

# Series a trainer creates: a fixed set per trainer plus, per param group, the
# learning rate, grad norm, 2 x 5 deep quantiles and 4 deep scalars.
_SERIES_PER_TRAINER = 60
_SERIES_PER_GROUP = 16


def estimated_series(param_groups: int) -> int:
    """Upper bound of the series one trainer with ``param_groups`` groups creates."""
    return _SERIES_PER_TRAINER + _SERIES_PER_GROUP * param_groups


class Refused(Exception):
    """A connection or HELLO is refused; ``reason`` is one of REFUSAL_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in REFUSAL_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a Unix socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | None) -> PeerCredentials | None:
    """``SO_PEERCRED`` of a connected Unix socket, or None where unavailable (TCP, non-Linux)."""
    if sock is None or not hasattr(socket, "SO_PEERCRED") or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def read_secret(path: str) -> str:
    """The secret held in ``path`` (surrounding whitespace stripped).

    Raises:
        ValueError: the file is empty.
        OSError: it cannot be read.
    """
    with open(path, encoding="utf-8") as fh:
        secret = fh.read().strip()
    if not secret:
        raise ValueError(f"secret file {path!r} is empty")
    return secret


class Admission:
    """The checks a connection passes before its frames reach the run state.

    Args:
        allowed_uids: peer uids allowed on a Unix socket (empty with empty
            ``allowed_gids``: any peer the socket's mode lets in).
        allowed_gids: peer gids allowed.
        secret: the shared secret a HELLO must carry, or None.
        max_trainers: trainers one sidecar holds.
        max_series_per_trainer: series one trainer may create.
    """

    def __init__(self, allowed_uids: tuple[int, ...] = (), allowed_gids: tuple[int, ...] = (),
                 secret: str | None = None, max_trainers: int = 2048, max_series_per_trainer: int = 2000):
        self.allowed_uids = frozenset(allowed_uids)
        self.allowed_gids = frozenset(allowed_gids)
        self._secret = secret.encode("utf-8") if secret is not None else None
        self.max_trainers = max_trainers
        self.max_series_per_trainer = max_series_per_trainer
        # job -> [world_size, live connections]: world size consistency in O(1)
        self._jobs: dict[str, list[int]] = {}

    def check_peer(self, creds: PeerCredentials | None) -> None:
        """Refuse a Unix peer whose uid and gid are both outside the allowed sets."""
        if not (self.allowed_uids or self.allowed_gids) or creds is None:
            return
        if creds.uid == os.getuid() or creds.uid in self.allowed_uids or creds.gid in self.allowed_gids:
            return
        raise Refused("peer_not_allowed", f"peer uid {creds.uid} gid {creds.gid} (pid {creds.pid}) is not allowed")

    def check_secret(self, payload: dict[str, Any]) -> None:
        """Check and remove the HELLO's ``secret`` (it must never be stored or exported)."""
        given = payload.pop("secret", None)
        if self._secret is None:
            return
        if not isinstance(given, str):
            raise Refused("bad_secret", "HELLO carries no secret")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self._secret):
            raise Refused("bad_secret", "HELLO carries a wrong secret")

    def check_hello(self, payload: dict[str, Any], *, held: bool, known: bool, trainers: int) -> None:
        """The HELLO's identity and size; O(1) in the job's rank count.

        Args:
            payload: the validated HELLO (secret already removed).
            held: a live connection holds this (job, rank).
            known: the sidecar already holds state for this (job, rank).
            trainers: trainers the sidecar holds now.
        """
        job, rank, world = payload["job"], payload["rank"], payload["world_size"]
        if held:
            raise Refused("rank_in_use", f"job {job!r} rank {rank} is held by a live connection")
        if not 0 <= rank < world:
            raise Refused("rank_out_of_range", f"job {job!r} rank {rank} is not below world_size {world}")
        entry = self._jobs.get(job)
        if entry is not None and entry[1] > 0 and entry[0] != world:
            raise Refused("world_size_mismatch",
                          f"job {job!r} world_size {world} differs from its live ranks' {entry[0]}")
        if not known and trainers >= self.max_trainers:
            raise Refused("too_many_trainers", f"the sidecar holds {trainers} trainers (max_trainers)")
        groups = payload["optimizer"].get("param_groups", [])
        series = estimated_series(len(groups) if isinstance(groups, list) else 0)
        if series > self.max_series_per_trainer:
            raise Refused("too_many_series", f"{len(groups)} param groups would create about {series} series "
                                             f"(max_series_per_trainer {self.max_series_per_trainer})")

    def joined(self, job: str, world_size: int) -> None:
        """A HELLO of ``job`` was accepted."""
        entry = self._jobs.get(job)
        if entry is None or entry[1] == 0:
            self._jobs[job] = [world_size, 1]
        else:
            entry[1] += 1

    def left(self, job: str) -> None:
        """A connection of ``job`` that had been admitted closed."""
        entry = self._jobs.get(job)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._jobs[job]
