"""Helpers shared by the sos-server and replicate tests."""

import os
import socket

import blob
import wire
import sos
from conftest import InProcess, get_json, request


def stop_hard(srv):
    """Stop an in-process blob-server as a crash would: the listener closes
    and its open keep-alive connections are cut (InProcess.stop leaves them
    served, so a pooled connection would quietly keep working)."""
    srv.stop()
    with srv.srv._watch_lock:
        handlers = list(srv.srv._watched)
    for h in handlers:
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def blob_path(store, blob_id):
    d1, d2 = wire.shard(blob_id)
    return os.path.join(store.root if hasattr(store, "root") else store,
                        d1, d2, blob_id)


def flip_byte(store, blob_id, offset=0):
    with open(blob_path(store, blob_id), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


class Front:
    """An in-process sos-server over given groups (for clusters that mix
    in-process and real-process blob-servers)."""

    def __init__(self, groups, timeout=10, max_upload=1 << 30, **options):
        self.groups = groups
        pool = sos.Pool(connect_timeout=1, timeout=timeout)
        self.cluster = sos.Cluster(groups, pool=pool, **options)
        up, down = sos.make_servers(self.cluster, "127.0.0.1", 0, 0,
                                    max_upload=max_upload)
        self.up, self.down = InProcess(up), InProcess(down)

    def upload(self, data, headers=None):
        return get_json(self.up.url + "/upload", "POST", data, headers)

    def fetch(self, blob_id, method="GET", headers=None):
        return request(self.down.url + "/fetch/" + blob_id, method, headers=headers)

    def stop(self):
        self.up.stop()
        self.down.stop()
