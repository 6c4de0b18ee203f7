"""The sync group: a torch.distributed process group of sources and receivers, separate from any group
the process already belongs to (a Megatron trainer has its own), with a timeout on every collective.

gloo on CPU and NCCL on CUDA through the same calls. Each member keeps a heartbeat in the group's
TCPStore, so when a collective fails (a peer crashed: gloo reports a closed connection; or nothing
came within the timeout) the error names the members that stopped beating.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

HEARTBEAT_S = 0.5
DEAD_AFTER_S = 5.0  # while a collective waits: a member whose heartbeat is this old is taken for dead
_ABANDONED: list = []  # process groups left with a collective stuck on a dead member (see `close`)


class SyncError(RuntimeError):
    """A push failed; the message names the step, the bucket and the members that stopped answering."""


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_port(host: str = "") -> int:
    """A TCP port free on this host now (for a process group's rendezvous); `host`: the address it
    will be bound to ("" for every interface)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_host() -> str:
    """This node's address as the Ray cluster knows it: loopback in a single-node run, whose local
    cluster binds to 127.0.0.1 (rl/cluster.py); outside Ray, loopback."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def node_address() -> tuple[str, int]:
    """This node's address and a port free on it now: a rendezvous point processes on other nodes can
    reach (in a single-node run, one on loopback only)."""
    host = node_host()
    return host, free_port(host if host in LOOPBACK else "")


def tcp_store(host: str, port: int, world_size: Optional[int], is_master: bool, timeout: timedelta,
              wait_for_workers: bool = True) -> dist.TCPStore:
    """A torch TCPStore at host:port. torch's server listens on every interface; when the group meets
    at a loopback address (a single-node run) the server is handed a socket bound to loopback only."""
    if not (is_master and host in LOOPBACK):
        return dist.TCPStore(host, port, world_size, is_master=is_master, timeout=timeout,
                             wait_for_workers=wait_for_workers)
    listener = socket.socket(socket.AF_INET6 if host == "::1" else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:  # the name rl/actors.py retries on
            raise RuntimeError(f"EADDRINUSE: port {port} on {host} is taken") from None
        raise
    listener.listen(1024)
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=wait_for_workers,
                         master_listen_fd=listener.detach())  # the store owns the socket from here


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


@dataclass
class Pollable:
    """A started collective whose completion can be polled (a broadcast): `SyncGroup.wait` watches the
    members' heartbeats while it waits for one."""
    work: object

    def wait(self, timeout=None) -> bool:
        return self.work.wait(timeout) if timeout is not None else self.work.wait()


class SyncGroup:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, device: str,
                 timeout_s: float, member_names: Optional[list[str]] = None, prefix: str = "tandem-sync"):
        self.rank, self.world_size, self.device, self.timeout_s = rank, world_size, device, timeout_s
        self.member_names = member_names or [f"rank {r}" for r in range(world_size)]
        timeout = timedelta(seconds=timeout_s)
        self.store = tcp_store(master_addr, master_port, world_size, rank == 0, timeout)
        store = dist.PrefixStore(prefix, self.store)
        if backend_for(device) == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self.broken = False  # a collective was given up on while a dead member kept it waiting
        self._beating = True
        self._beat()
        self._heart = threading.Thread(target=self._heartbeat, daemon=True, name="sync-heartbeat")
        self._heart.start()

    # --- liveness -----------------------------------------------------------------------------------
    def _beat(self) -> None:
        self.store.set(f"heartbeat/{self.rank}", repr(time.time()))

    def _heartbeat(self) -> None:
        while self._beating:
            time.sleep(HEARTBEAT_S)
            try:
                self._beat()
            except Exception:
                return  # the store (rank 0) is gone; `silent_members` reports it

    def silent_members(self, stale_s: float = 4 * HEARTBEAT_S) -> list[str]:
        """Members whose heartbeat is older than `stale_s` (rank 0 too when its store cannot be reached)."""
        deadline = time.time() - stale_s
        silent = []
        try:
            for r in range(self.world_size):
                if r != self.rank and float(self.store.get(f"heartbeat/{r}")) < deadline:
                    silent.append(self.member_names[r])
        except Exception:
            return [self.member_names[0] + " (its store is unreachable)"]
        return silent

    def failure(self, what: str, exc: BaseException) -> SyncError:
        time.sleep(2 * HEARTBEAT_S)  # give a just-crashed peer's heartbeat time to go stale
        silent = self.silent_members()
        who = f"unresponsive: {', '.join(silent)}" if silent else "no member stopped beating"
        return SyncError(f"{what} failed ({who}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")

    # --- collectives (each waits at most timeout_s) --------------------------------------------------
    def wait(self, work) -> None:
        """Until `work` completes, within the timeout. A broadcast whose peer died can wait until then
        (gloo does not notice every closed connection), so while one is waited for the members'
        heartbeats are checked: one silent for DEAD_AFTER_S ends the wait at once, naming it. (Other
        gloo works cannot be polled: `is_completed` stays false for a reduce-scatter, and gloo's
        `abort` does not end a wait; they wait as they are.)"""
        if isinstance(work, Pollable):
            return self._poll(work.work)
        if not work.wait(timedelta(seconds=self.timeout_s)):
            raise TimeoutError(f"no completion within {self.timeout_s:g} s")

    def _poll(self, work) -> None:
        start = time.monotonic()
        poll, next_check = 1e-4, start + 2 * HEARTBEAT_S
        while not work.is_completed():
            now = time.monotonic()
            if now - start > self.timeout_s:
                raise TimeoutError(f"no completion within {self.timeout_s:g} s")
            if now > next_check:
                next_check = now + HEARTBEAT_S
                if silent := self.silent_members(DEAD_AFTER_S):
                    self.broken = True
                    raise SyncError(f"members stopped answering: {', '.join(silent)}")
            time.sleep(poll)
            poll = min(2 * poll, 5e-3)  # at most 5 ms after completion
        work.wait()  # raises the collective's own error, if it failed

    def broadcast(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        work = Pollable(self.pg.broadcast([tensor], opts))
        return work if async_op else self.wait(work)

    def reduce_scatter(self, output: torch.Tensor, inputs: list[torch.Tensor], async_op: bool = False):
        """Sum `inputs[r]` over members into member r's `output` (sizes may differ between members)."""
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        work = self.pg.reduce_scatter([output], [inputs], opts)
        return work if async_op else self.wait(work)

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0):
        """Start sending `tensor` to member `dst`; returns the work."""
        return self.pg.send([tensor], dst, tag)

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0):
        """Start receiving into `tensor` from member `src`; returns the work."""
        return self.pg.recv([tensor], src, tag)

    def all_reduce_max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.wait(self.pg.allreduce([tensor], opts))
        return int(tensor.item())

    def close(self) -> None:
        """Leave the group. One with a collective still stuck on a dead member is not shut down (that
        would wait for the collective's timeout): it is kept aside until the process ends."""
        self._beating = False
        pg, self.pg = self.pg, None
        if pg is not None and self.broken:
            _ABANDONED.append(pg)
        elif pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:
                pass
