"""One `uringtgt serve` per control socket in this process, shared by reference count.

Jumpstarter's exporter builds a new driver tree for each lease while the previous one still
lives, so two driver instances for one socket must share the target rather than each spawn one
(the second would find the socket live and stop). A socket some other process already serves is
attached to instead.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml

from .common import ConfigurationError, ControlClient, ISCSIError

ENV_BIN = "URINGTGT_BIN"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)

# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process. Driver
# code runs on short-lived worker threads, so every spawn happens on this one thread, which lives
# as long as the interpreter.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uringtgt-spawn")
_lock = threading.Lock()
_targets: dict[str, "_Target"] = {}

log = logging.getLogger("jumpstarter_driver_uringtgt.uringtgt")


def find_binary() -> str:
    """`$URINGTGT_BIN`, else `uringtgt` on PATH."""
    env = os.environ.get(ENV_BIN)
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise ConfigurationError(f"{ENV_BIN}={env} is not an executable file")
        return env
    found = shutil.which("uringtgt")
    if found is None:
        raise ConfigurationError(
            f"uringtgt not found: put it on PATH or set {ENV_BIN} (build it with `cargo build --release`)"
        )
    return found


def _die_with_parent(parent: int) -> None:
    # Runs in the child between fork and exec: the target must not outlive the exporter.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Target:
    socket: str
    refs: int = 0
    proc: subprocess.Popen | None = None
    workdir: str | None = None
    listening: str = ""
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def spawned(self) -> bool:
        return self.proc is not None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return ControlClient(self.socket, timeout=5).answers()


def acquire(socket_path: str, config: dict[str, Any], logger: logging.Logger) -> "_Target":
    """The target serving `socket_path`: this process's (reference added), an already running
    one (attached), or a new `uringtgt serve` with `config` started and awaited."""
    with _lock:
        t = _targets.get(socket_path)
        if t is not None and t.alive():
            t.refs += 1
            logger.info("sharing uringtgt on %s (%d driver instances)", socket_path, t.refs)
            return t
        if t is not None:
            _targets.pop(socket_path)
            _reap(t)
        t = _Target(socket=socket_path)
        if ControlClient(socket_path, timeout=5).answers():
            logger.info("attaching to the uringtgt already serving %s", socket_path)
        else:
            _spawn(t, config, logger)
        t.refs = 1
        _targets[socket_path] = t
        return t


def release(t: "_Target") -> None:
    """Drops a reference; the last one stops a target this process started."""
    with _lock:
        t.refs -= 1
        if t.refs > 0:
            return
        if _targets.get(t.socket) is t:
            del _targets[t.socket]
        _reap(t)


def _spawn(t: _Target, config: dict[str, Any], logger: logging.Logger) -> None:
    binary = find_binary()
    t.workdir = tempfile.mkdtemp(prefix="uringtgt-driver-")
    path = os.path.join(t.workdir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    argv = [binary, "serve", "--config", path]
    logger.info("starting %s", " ".join(argv))
    parent = os.getpid()
    # util-linux's setpriv sets the death signal and execs uringtgt, so no Python code runs in
    # the forked child: a preexec_fn there can meet gRPC's fork handlers and abort the child.
    setpriv = shutil.which("setpriv")
    spawn: dict[str, Any] = {}
    if setpriv:
        argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
    else:
        spawn["preexec_fn"] = lambda: _die_with_parent(parent)
    try:
        t.proc = _spawner.submit(
            subprocess.Popen,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **spawn,
        ).result()
    except OSError as e:
        shutil.rmtree(t.workdir, ignore_errors=True)
        raise ConfigurationError(f"cannot start {binary}: {e}") from e

    ready = threading.Event()

    def read_stdout(stream):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("listening on ") and not ready.is_set():
                t.listening = line
                ready.set()
            log.info("%s", line)
        ready.set()

    def read_stderr(stream):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            t.stderr_tail.append(line)
            log.info("%s", line)

    threading.Thread(target=read_stdout, args=(t.proc.stdout,), daemon=True, name="uringtgt-stdout").start()
    err_reader = threading.Thread(target=read_stderr, args=(t.proc.stderr,), daemon=True, name="uringtgt-stderr")
    err_reader.start()

    if not ready.wait(START_TIMEOUT) or not t.listening:
        # stdout closed without the line (the process is exiting), or the time ran out.
        try:
            rc = t.proc.wait(STOP_TIMEOUT if ready.is_set() else 0)
        except subprocess.TimeoutExpired:
            _reap(t)
            raise ISCSIError(f"uringtgt did not report `listening on` within {START_TIMEOUT:.0f} s") from None
        err_reader.join(5)
        why = _last_error(t)
        _reap(t)
        raise ConfigurationError(f"uringtgt exited with status {rc}: {why}")
    logger.info("uringtgt: %s (control socket %s)", t.listening, t.socket)


def _last_error(t: _Target) -> str:
    # The uringtgt error line reads `uringtgt: <what>: <why>`; prefer it to log lines.
    lines = list(t.stderr_tail)
    for line in reversed(lines):
        if line.startswith("uringtgt: "):
            return line[len("uringtgt: ") :]
    return lines[-1] if lines else "no output"


def _reap(t: _Target) -> None:
    if t.proc is not None and t.proc.poll() is None:
        t.proc.terminate()
        try:
            t.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            t.proc.kill()
            t.proc.wait()
    if t.workdir is not None:
        shutil.rmtree(t.workdir, ignore_errors=True)
        t.workdir = None


@atexit.register
def _stop_all() -> None:
    with _lock:
        for t in list(_targets.values()):
            _reap(t)
        _targets.clear()
