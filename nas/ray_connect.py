"""Connecting this process to Ray, for the search's evaluators and for training across workers.

``connect(address, cpus)`` starts a private local Ray with ``cpus`` CPUs when there is no address (never joining a
cluster that ``ray start`` left running on the machine: Ray would otherwise attach to it and refuse the CPU count),
and refuses more workers than the machine has CPUs. With an address it first checks that something listens there,
so a wrong address is an error within seconds instead of Ray's endless reconnection.
"""

from __future__ import annotations

import os
import socket
from typing import Any

RAY_INSTALL_HINT = 'pip install -c constraints.txt "ray[train]>=2.10"'
CONNECT_TIMEOUT_SECONDS = 5.0


class RayConnectError(RuntimeError):
    """Ray cannot be started or reached as asked (the message says why and what to do)."""


def import_ray(purpose: str) -> Any:
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"{purpose} needs Ray: {RAY_INSTALL_HINT}") from error
    return ray


def machine_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_address(address: str) -> None:
    """Raise ``RayConnectError`` unless ``address`` is ``auto`` or a ``HOST:PORT`` where something accepts a TCP
    connection within ``CONNECT_TIMEOUT_SECONDS``."""
    if address == "auto":
        return
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise RayConnectError(f"--address must be 'auto' or HOST:PORT of a Ray head node (e.g. 127.0.0.1:6379), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise RayConnectError(
            f"no Ray cluster answers at {address} ({error.strerror or error}): start one with `ray start --head --port={port}` "
            "on that machine, or correct --address"
        ) from None


def check(address: str | None, cpus: int) -> None:
    """What ``connect`` would refuse, checked before any work: an address nothing answers at, or a local Ray with
    more CPUs than the machine has."""
    if address:
        check_address(address)
        return
    available = machine_cpus()
    if cpus > available:
        raise RayConnectError(
            f"--workers {cpus} needs {cpus} CPUs and this machine has {available}: use at most {available}, or --address to use a Ray cluster"
        )


def connect(address: str | None, cpus: int, purpose: str) -> bool:
    """Initialise Ray for ``purpose`` unless this process already has; returns whether this call started it (the
    caller then shuts it down). ``cpus``: the workers a local Ray gets, at most the machine's CPUs."""
    ray = import_ray(purpose)
    if ray.is_initialized():
        return False
    check(address, cpus)
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(address="local", num_cpus=cpus, object_store_memory=256 * 1024**2, **options)
    return True


__all__ = ["RAY_INSTALL_HINT", "RayConnectError", "check", "check_address", "connect", "import_ray", "machine_cpus"]
