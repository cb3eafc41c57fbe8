"""Shared storage, checked from where the ranks run.

The driver writes a fresh nonce into the run's storage and into the prepared data's; every
worker (and `dcgan doctor`'s task on every node) must read it back, and writes one beside the
run's, before its first step. A node without the shared mount, or without the store's
credentials, fails there by name, instead of training into its own disk or dying at its first
checkpoint.
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import NamedTuple

from pipeline import storage

log = logging.getLogger(__name__)

PROBE_DIR = ".storage-check"


class Probe(NamedTuple):
    """One nonce the driver wrote into one storage (a path or a URI)."""

    address: str
    nonce: str

    @property
    def name(self) -> str:
        return f"{PROBE_DIR}/{self.nonce}"


class StorageNotShared(RuntimeError):
    """A worker does not see, or cannot reach, the storage the driver writes to."""


def write_probes(addresses: list[str]) -> list[Probe]:
    nonce = uuid.uuid4().hex
    probes = [Probe(address, nonce) for address in addresses]
    for probe in probes:
        storage.location(probe.address).write_text(probe.name, nonce)
    return probes


def remove_probes(probes: list[Probe]) -> None:
    """The driver's probes and what the workers wrote beside them (only this job's: other jobs
    may share the prepared data)."""
    for probe in probes:
        base = storage.location(probe.address)
        try:
            for found in base.list(PROBE_DIR):
                if found.startswith(probe.nonce):
                    base.delete(f"{PROBE_DIR}/{found}")
        except OSError as err:  # a leftover probe costs nothing
            log.warning("could not remove the storage probes in %s: %s", base, err)


def this_node() -> str:
    """How errors name the node a process runs on: host, address and Ray's node id."""
    import ray
    import ray.util

    node_id = ray.get_runtime_context().get_node_id()
    return f"node {socket.gethostname()} ({ray.util.get_node_ip_address()}, Ray node {node_id[:12]})"


def check_probes(probes: list[Probe], writer: str) -> None:
    """Read each of the driver's probes, and write one beside the run's (the first, as
    `writer`): a node without the shared mount, or without the store's credentials, fails
    here, before its first step, naming itself and what is missing."""
    node = this_node()
    for index, probe in enumerate(probes):
        shown = storage.redacted(storage.join(probe.address, probe.name))
        try:
            base = storage.location(probe.address)
            seen = base.read_text(probe.name) if base.exists(probe.name) else None
            if seen is not None and index == 0:
                base.write_text(f"{probe.name}-{writer}", node)
        except OSError as err:
            raise StorageNotShared(f"{node} cannot use {shown}: {err}. {_credentials_hint(probe.address)}") from None
        if seen != probe.nonce:
            where = storage.redacted(probe.address)
            hint = (
                f"{where} is not shared storage. Every node must mount the same storage at the same path "
                "(NFS, a ReadWriteMany volume), or set runtime.storage_path / data.prepared_dir to an "
                "object-store URI (s3://bucket/prefix, gs://...)"
                if not storage.is_uri(probe.address)
                else f"{where} is another store from this node (its endpoint or bucket differs)"
            )
            raise StorageNotShared(f"{node} does not see {shown}, which the driver has just written: {hint}")


def _credentials_hint(address: str) -> str:
    if not storage.is_uri(address):
        return "The run's directory must be readable and writable from every node"
    variables = {
        "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the node's instance role)",
        "gs": "GOOGLE_APPLICATION_CREDENTIALS (or the node's service account)",
    }.get(storage.uri_scheme(address), "the store's credentials")
    return (
        f"The node's Ray processes need {variables} in the environment its `ray start` ran with "
        "(launch/node.sh, the pod spec), not only the driver's"
    )
