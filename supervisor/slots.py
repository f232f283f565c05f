"""Shared-memory slots: where each worker posts the attempt it is running, and its state.

The supervisor reads them to enforce timeouts, to know what a dead worker held and which
worker to wake for a new job, without a pipe message (and a wake-up) per job. The state
is one byte, written only by the worker. For the attempt, one writer per slot; a sequence
number, odd while a write is under way, makes a read that raced a write retry instead of
seeing a torn value. A writer killed mid-write leaves it odd: reads give up on it, and the
next write (the supervisor's clear before a new worker starts) makes it whole again.
"""
import mmap
import struct
from typing import NamedTuple, Optional

_LAYOUT = struct.Struct("=Qqqdd")  # sequence, job id, attempt, deadline (monotonic), timeout
_STATE_AT = _LAYOUT.size          # then one byte: the worker's state
_SIZE = _LAYOUT.size + 8
BUSY, CLAIMING, WAITING = 0, 1, 2  # running handlers / asking for jobs / asleep until woken
_READ_TRIES = 10_000  # a live writer finishes a write in microseconds


class Running(NamedTuple):
    job_id: int
    attempt: int
    deadline: float
    timeout_s: float


class Slot:
    def __init__(self, memory, index):
        self._memory = memory
        self._offset = index * _SIZE

    @property
    def state(self):
        return self._memory[self._offset + _STATE_AT]

    @state.setter
    def state(self, value):
        self._memory[self._offset + _STATE_AT] = value

    def start(self, job_id, attempt, deadline, timeout_s):
        self._write(job_id, attempt, deadline, timeout_s)

    def clear(self):
        self._write(0, 0, 0.0, 0.0)

    def writes(self):
        """How many times the slot was written: each start and each clear is one."""
        return _LAYOUT.unpack_from(self._memory, self._offset)[0] // 2

    def torn(self):
        """Whether a writer died mid-write (the sequence number is left odd): reads give up
        on the slot until its next write."""
        return _LAYOUT.unpack_from(self._memory, self._offset)[0] % 2 == 1

    def read(self) -> Optional[Running]:
        """The posted attempt; None when there is none, or when the slot stays torn."""
        for _ in range(_READ_TRIES):
            before, job_id, attempt, deadline, timeout_s = _LAYOUT.unpack_from(
                self._memory, self._offset)
            after = _LAYOUT.unpack_from(self._memory, self._offset)[0]
            if before == after and before % 2 == 0:
                return Running(job_id, attempt, deadline, timeout_s) if job_id else None
        return None

    def _write(self, job_id, attempt, deadline, timeout_s):
        sequence = _LAYOUT.unpack_from(self._memory, self._offset)[0]
        sequence += sequence % 2  # left odd by a writer that died mid-write
        struct.pack_into("=Q", self._memory, self._offset, sequence + 1)
        _LAYOUT.pack_into(self._memory, self._offset, sequence + 1, job_id, attempt,
                          deadline, timeout_s)
        struct.pack_into("=Q", self._memory, self._offset, sequence + 2)


def allocate(count):
    """Slots in anonymous shared memory, inherited by every child forked afterwards."""
    memory = mmap.mmap(-1, max(1, count) * _SIZE)
    return [Slot(memory, i) for i in range(count)]
