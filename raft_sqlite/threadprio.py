"""CPU priority of the library's background threads (backup copies, async snapshot streams).

A priority is data: an ``int`` 0..19 puts the calling thread at the process's nice value (its main thread's)
plus that much, never raising it (0: unchanged), and :data:`IDLE` puts it in Linux's ``SCHED_IDLE`` class.
Lowering is idempotent: a thread already that low (one started by a lowered thread, which inherits its
priority) is left as it is, so helper threads that lower themselves again do not end up lower. Why both:

* A nice value only weighs the thread's CPU share. On Linux's EEVDF scheduler a normal thread that wakes (an
  event loop's timer, the committer after an fsync) may still wait for the running low-priority thread's
  slice (1.4 ms by default on a 2-core machine) before it gets the CPU.
* A ``SCHED_IDLE`` thread is preempted as soon as any normal thread of the machine wakes, so an event loop's
  wake-ups are not delayed by it. Its share under full CPU load is tiny (weight 3 against 1024 for nice 0),
  so work in that class can take much longer on a machine whose CPUs are saturated: it runs in the idle
  time of the foreground work.

Threads a lowered thread starts inherit its class and nice value (Linux copies them at thread creation), so
lowering the thread that drives a stream or a backup covers the helper threads it starts. A thread cannot
raise its priority back without privileges: lower only threads of your own (the library lowers only
threads it created). Where the OS has neither call (not Linux), nothing is changed.
"""

from __future__ import annotations

import os
import threading

from .args import int_arg

__all__ = ["IDLE", "Priority", "current_thread_priority", "lower_current_thread", "priority_arg"]

#: the ``SCHED_IDLE`` class (Linux): runs only in CPU time no normal thread wants
IDLE = "idle"

#: a background priority: :data:`IDLE`, or a nice increment 0..19
Priority = int | str


def priority_arg(name: str, value: object) -> Priority:
    """Check a priority argument: :data:`IDLE` or an int 0..19 (``TypeError``/``ValueError`` otherwise)."""
    if isinstance(value, str):
        if value == IDLE:
            return IDLE
        raise ValueError(f"{name} must be {IDLE!r} or an int in 0..19, got {value!r}")
    return int_arg(name, value, 0, 19)


def lower_current_thread(priority: Priority) -> None:
    """Lower the calling thread's CPU priority to ``priority`` (see the module docstring). Best effort: where
    the OS lacks the call or refuses it, the thread is left as it was."""
    priority = priority_arg("priority", priority)
    if priority == IDLE:
        sched_idle = getattr(os, "SCHED_IDLE", None)
        if sched_idle is not None:
            try:
                os.sched_setscheduler(0, sched_idle, os.sched_param(0))  # 0: the calling thread (Linux)
                return
            except OSError:
                pass
        priority = 19  # no SCHED_IDLE here: the lowest nice value instead
    assert isinstance(priority, int)
    if priority <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + priority)  # the main thread's + priority
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:
        pass


def current_thread_priority() -> str:
    """The calling thread's scheduling class and nice value (tests, logs): ``"idle"`` (``SCHED_IDLE``) or
    ``"nice+N"`` (N: its nice value; ``"nice+0"`` for a normal thread)."""
    sched_idle = getattr(os, "SCHED_IDLE", None)
    if sched_idle is not None and os.sched_getscheduler(0) == sched_idle:
        return IDLE
    if not hasattr(os, "getpriority"):
        return "nice+0"
    return f"nice+{os.getpriority(os.PRIO_PROCESS, threading.get_native_id())}"

