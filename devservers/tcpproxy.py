"""A TCP proxy that a test drives to simulate a flaky LTE link between a client and a server.

`TcpProxy(target_host, target_port)` listens on 127.0.0.1:<port> and forwards every connection to the
target. Faults, applied to live connections at once:
- `reset()`: abort every live connection with a TCP RST (SO_LINGER 0); new connections still work;
- `refuse()`: close the listening socket, so new connects get ECONNREFUSED; live ones keep going;
- `blackhole()`: bytes in both directions vanish; sockets stay open, so only an application keep-alive
  notices (a dead radio link); new connections are accepted but never reach the target;
- `restore()`: forward again; black-holed connections are reset (a TCP stream cannot recover lost
  bytes), so clients reconnect.

`tap`, if given, is called in the loop thread with every chunk of bytes as it is delivered:
`tap(connection_number, "up" | "down", data)` (up: client to target). bench/uplink.py feeds it to
`devservers.mqttwire.WireCounter` to count an MQTT client's bytes per topic at the TCP level.

It runs its own selector loop in a daemon thread, so sync and asyncio tests use it alike; every control
call returns once the loop thread has applied it.
"""

from __future__ import annotations

import errno
import logging
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Literal, Self

log = logging.getLogger(__name__)

_RECV_SIZE = 65_536
# Stop reading a side while this much is waiting for the other: back-pressure instead of unbounded RAM.
_MAX_BUFFERED = 1 << 20
_CONTROL_TIMEOUT_S = 10.0
_LISTEN_BACKLOG = 128

Direction = Literal["client", "server"]
Tap = Callable[[int, Literal["up", "down"], bytes], None]


@dataclass(frozen=True)
class ProxyStats:
    """Counters; bytes are those delivered (up: to the target, down: to the client)."""

    connections_total: int = 0
    active_connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_dropped: int = 0


@dataclass(eq=False)
class _Side:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    read_eof: bool = False
    shutdown_pending: bool = False
    closed: bool = False
    registered_mask: int = 0


@dataclass(eq=False)
class _Pipe:
    number: int
    client: _Side
    server: _Side | None
    connecting: bool = False
    blackholed: bool = False

    def side(self, which: Direction) -> _Side | None:
        return self.client if which == "client" else self.server

    def sides(self) -> list[_Side]:
        return [s for s in (self.client, self.server) if s is not None]


@dataclass(frozen=True, eq=False)
class _Key:
    """What the selector hands back for a proxied socket: which connection, which end."""

    pipe: _Pipe
    which: Direction


def _abort(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN, like a NAT or a radio link dropping the flow."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        log.debug("SO_LINGER failed on a dead socket err=%s", exc)
    sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, with injectable faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        tap: Tap | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self._tap = tap
        self.listen_host = listen_host
        self._requested_port = listen_port
        self._port = 0
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], Future[None]]] = queue.SimpleQueue()
        self._pipes: dict[int, _Pipe] = {}
        self._next_number = 0
        self._refusing = False
        self._blackholing = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = ProxyStats()
        self._stats_changed = threading.Condition()
        self._failure: BaseException | None = None

    # -- public API (any thread) -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return self.listen_host

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("TcpProxy already started")
        self._open_listener()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"tcpproxy-{self._port}", daemon=True)
        self._thread.start()
        log.info("tcp proxy started port=%d target=%s:%d", self._port, *self.target)

    def stop(self) -> None:
        """Abort every connection, close the listener and end the loop thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._close_resources()
            return
        self._call(self._do_stop)
        thread.join(timeout=_CONTROL_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"tcp proxy thread on port {self._port} did not stop")
        log.info("tcp proxy stopped port=%d stats=%s", self._port, self.stats())

    def reset(self) -> None:
        self._call(self._do_reset)

    def refuse(self) -> None:
        self._call(self._do_refuse)

    def blackhole(self) -> None:
        self._call(self._do_blackhole)

    def restore(self) -> None:
        self._call(self._do_restore)

    def stats(self) -> ProxyStats:
        with self._stats_changed:
            return self._stats

    def wait_until(self, predicate: Callable[[ProxyStats], bool], timeout: float) -> ProxyStats:
        """Block until `predicate(stats)` holds (e.g. a client reconnected); TimeoutError otherwise."""
        with self._stats_changed:
            if not self._stats_changed.wait_for(lambda: predicate(self._stats), timeout=timeout):
                raise TimeoutError(f"tcp proxy on port {self._port}: condition not met, stats={self._stats}")
            return self._stats

    @property
    def connections_total(self) -> int:
        return self.stats().connections_total

    @property
    def active_connections(self) -> int:
        return self.stats().active_connections

    @property
    def bytes_up(self) -> int:
        return self.stats().bytes_up

    @property
    def bytes_down(self) -> int:
        return self.stats().bytes_down

    @property
    def bytes_dropped(self) -> int:
        return self.stats().bytes_dropped

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TcpProxy(port={self._port}, target={self.target[0]}:{self.target[1]})"

    def _call(self, action: Callable[[], None]) -> None:
        """Run `action` on the loop thread and wait for it, so the fault is in force on return."""
        if self._failure is not None:
            raise RuntimeError(f"tcp proxy loop failed: {self._failure!r}") from self._failure
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("tcp proxy is not running")
        done: Future[None] = Future()
        self._commands.put((action, done))
        self._wake_w.send(b"x")
        done.result(timeout=_CONTROL_TIMEOUT_S)

    def _bump(self, **deltas: int) -> None:
        with self._stats_changed:
            current = self._stats
            self._stats = replace(current, **{k: getattr(current, k) + v for k, v in deltas.items()})
            self._stats_changed.notify_all()

    # -- loop thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._selector.select():
                    self._dispatch(key.data, mask)
        except BaseException as exc:
            log.exception("tcp proxy loop crashed port=%d", self._port)
            self._failure = exc
            self._fail_pending_commands(exc)
            raise
        finally:
            self._close_resources()

    def _dispatch(self, data: object, mask: int) -> None:
        if data == "wake":
            self._run_commands()
        elif data == "listen":
            self._accept()
        elif isinstance(data, _Key):
            self._on_io(data.pipe, data.which, mask)

    def _run_commands(self) -> None:
        # Readable per the selector, so this does not block; several wake bytes may be drained at once.
        self._wake_r.recv(4096)
        while True:
            try:
                action, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                action()
            except OSError as exc:
                # e.g. restore() cannot re-bind the port: the caller gets the error, the loop carries on.
                log.warning("tcp proxy command failed port=%d err=%s", self._port, exc)
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _fail_pending_commands(self, exc: BaseException) -> None:
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                return
            done.set_exception(RuntimeError(f"tcp proxy loop failed: {exc!r}"))

    def _open_listener(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Keep the port across refuse()/restore() so clients reconnect to the same address.
        sock.bind((self.listen_host, self._port or self._requested_port))
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        self._listener = sock
        self._selector.register(sock, selectors.EVENT_READ, "listen")

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._next_number += 1
        pipe = _Pipe(number=self._next_number, client=_Side(client), server=None)
        if self._blackholing:
            pipe.blackholed = True
        else:
            pipe.server = _Side(self._connect_upstream())
            pipe.connecting = True
        self._pipes[pipe.number] = pipe
        self._bump(connections_total=1, active_connections=1)
        log.debug("proxy accepted conn=%d blackholed=%s", pipe.number, pipe.blackholed)
        self._update_interest(pipe)

    def _connect_upstream(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(self.target)
        if code not in (0, errno.EINPROGRESS):
            log.debug("upstream connect failed at once target=%s err=%d", self.target, code)
        # Any failure also shows up as SO_ERROR once the socket is writable; handled there.
        return sock

    def _on_io(self, pipe: _Pipe, which: Direction, mask: int) -> None:
        if pipe.number not in self._pipes:
            return
        side = pipe.side(which)
        if side is None or side.closed:
            return
        try:
            if which == "server" and pipe.connecting and mask & selectors.EVENT_WRITE:
                self._finish_connect(pipe, side)
            if mask & selectors.EVENT_WRITE and side.out:
                self._flush(pipe, which, side)
            if mask & selectors.EVENT_READ:
                self._read(pipe, which, side)
        except OSError as exc:
            log.debug("proxy conn=%d aborted side=%s err=%s", pipe.number, which, exc)
            self._abort_pipe(pipe)
            return
        if pipe.number in self._pipes:
            self._finish_if_done(pipe)
        if pipe.number in self._pipes:
            self._update_interest(pipe)

    def _finish_connect(self, pipe: _Pipe, server: _Side) -> None:
        err = server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionRefusedError(err, f"upstream {self.target}: {errno.errorcode.get(err, err)}")
        pipe.connecting = False

    def _read(self, pipe: _Pipe, which: Direction, side: _Side) -> None:
        data = side.sock.recv(_RECV_SIZE)
        other = pipe.side("server" if which == "client" else "client")
        if not data:
            side.read_eof = True
            if pipe.blackholed:
                # The far end of a dead link never sees this FIN; only this side goes away.
                self._close_side(side)
            elif other is not None:
                other.shutdown_pending = True
                self._maybe_shutdown(other)
            return
        if pipe.blackholed or other is None:
            self._bump(bytes_dropped=len(data))
            return
        other.out += data

    def _flush(self, pipe: _Pipe, which: Direction, side: _Side) -> None:
        sent = side.sock.send(side.out)
        if self._tap is not None and sent:
            self._tap(pipe.number, "up" if which == "server" else "down", bytes(side.out[:sent]))
        del side.out[:sent]
        if which == "server":
            self._bump(bytes_up=sent)
        else:
            self._bump(bytes_down=sent)
        self._maybe_shutdown(side)

    @staticmethod
    def _maybe_shutdown(side: _Side) -> None:
        """Pass a FIN on once everything read before it has been written."""
        if side.shutdown_pending and not side.out and not side.closed:
            side.shutdown_pending = False
            side.sock.shutdown(socket.SHUT_WR)

    def _finish_if_done(self, pipe: _Pipe) -> None:
        sides = pipe.sides()
        if all(s.closed for s in sides):
            self._drop_pipe(pipe)
        elif not pipe.blackholed and all(s.read_eof and not s.out for s in sides) and len(sides) == 2:
            for s in sides:
                self._close_side(s)
            self._drop_pipe(pipe)

    def _update_interest(self, pipe: _Pipe) -> None:
        directions: tuple[Direction, Direction] = ("client", "server")
        for which in directions:
            side = pipe.side(which)
            if side is None or side.closed:
                continue
            other = pipe.side("server" if which == "client" else "client")
            mask = 0
            room = other is None or len(other.out) < _MAX_BUFFERED
            upstream_ready = which == "client" or not pipe.connecting
            if not side.read_eof and room and upstream_ready:
                mask |= selectors.EVENT_READ
            if side.out or (which == "server" and pipe.connecting):
                mask |= selectors.EVENT_WRITE
            self._set_mask(side, mask, _Key(pipe, which))

    def _set_mask(self, side: _Side, mask: int, data: _Key) -> None:
        if mask == side.registered_mask:
            return
        if side.registered_mask == 0:
            self._selector.register(side.sock, mask, data)
        elif mask == 0:
            self._selector.unregister(side.sock)
        else:
            self._selector.modify(side.sock, mask, data)
        side.registered_mask = mask

    def _close_side(self, side: _Side, *, rst: bool = False) -> None:
        if side.closed:
            return
        if side.registered_mask:
            self._selector.unregister(side.sock)
            side.registered_mask = 0
        side.closed = True
        side.out.clear()
        if rst:
            _abort(side.sock)
        else:
            side.sock.close()

    def _abort_pipe(self, pipe: _Pipe) -> None:
        for side in pipe.sides():
            self._close_side(side, rst=True)
        self._drop_pipe(pipe)

    def _drop_pipe(self, pipe: _Pipe) -> None:
        if self._pipes.pop(pipe.number, None) is not None:
            self._bump(active_connections=-1)
            log.debug("proxy conn=%d closed", pipe.number)

    # -- commands (run on the loop thread) ---------------------------------------------------------

    def _do_reset(self) -> None:
        live = list(self._pipes.values())
        for pipe in live:
            self._abort_pipe(pipe)
        log.info("tcp proxy reset port=%d aborted=%d", self._port, len(live))

    def _do_refuse(self) -> None:
        self._refusing = True
        self._close_listener()
        log.info("tcp proxy refusing port=%d", self._port)

    def _do_blackhole(self) -> None:
        self._blackholing = True
        for pipe in self._pipes.values():
            pipe.blackholed = True
            for side in pipe.sides():
                if side.out:
                    self._bump(bytes_dropped=len(side.out))
                side.out.clear()
                side.shutdown_pending = False
            self._update_interest(pipe)
        log.info("tcp proxy blackholing port=%d live=%d", self._port, len(self._pipes))

    def _do_restore(self) -> None:
        dead = [pipe for pipe in self._pipes.values() if pipe.blackholed]
        for pipe in dead:
            self._abort_pipe(pipe)
        self._blackholing = False
        if self._refusing:
            self._refusing = False
            self._open_listener()
        log.info("tcp proxy restored port=%d reset_blackholed=%d", self._port, len(dead))

    def _do_stop(self) -> None:
        self._do_reset()
        self._close_listener()
        self._stopping = True

    def _close_resources(self) -> None:
        for pipe in list(self._pipes.values()):
            self._abort_pipe(pipe)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
