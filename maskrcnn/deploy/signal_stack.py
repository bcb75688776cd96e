"""The calling thread's alternate signal stack, kept across OpenVINO calls.

OpenVINO's CPU plugin gives the thread that creates a plugin engine or compiles a model an alternate
signal stack of its own (``sigaltstack``), and each compiled model's destructor puts back the stack that was
current when it was made. When compiled models are freed in another order than they were made (two
``Core`` objects, a model kept while another is dropped, the garbage collector's order), the thread is left
with a freed stack as its alternate signal stack. The next signal whose handler runs on that stack (Python's
own handlers do, a ``SIGCHLD`` when a subprocess ends, ``SIGINT``) cannot be delivered, and the kernel kills
the process with a segmentation fault, with no Python traceback (seen on AVX-512 CPUs, whose signal frames
need the larger stacks). :func:`kept_signal_stack` puts the caller's stack back when an OpenVINO call
returns, so that no compiled model ever records one of OpenVINO's stacks as the one to put back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager
from typing import Iterator, Optional


class _Stack(ctypes.Structure):
    """``stack_t`` of <signal.h> (Linux, macOS): base address, flags, size in bytes."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "sigaltstack") else None  # Windows has no sigaltstack: nothing to keep


_LIBC = _libc()


def current_signal_stack() -> Optional[tuple]:
    """The calling thread's alternate signal stack as ``(address, flags, size in bytes)``; None where the C
    library has no ``sigaltstack``."""
    if _LIBC is None:
        return None
    stack = _Stack()
    _LIBC.sigaltstack(None, ctypes.byref(stack))
    return stack.ss_sp or 0, stack.ss_flags, stack.ss_size


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Run the body (an OpenVINO compile, quantisation) and put the thread's alternate signal stack back as
    it was, whatever the body set."""
    if _LIBC is None:
        yield
        return
    before = _Stack()
    _LIBC.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        if before.ss_flags & 2:  # SS_DISABLE: there was none; disable whatever the body set
            before.ss_sp, before.ss_size = None, 0
        _LIBC.sigaltstack(ctypes.byref(before), None)
