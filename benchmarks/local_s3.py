"""A local S3-protocol server (moto's, as s3fs's own tests use) and a fault-injecting proxy, for the tests and
`benchmarks.object_store`.

Both listen on the loopback interface only, on free ports; the server holds its buckets in memory. Credentials are
dummies: nothing here reaches a network.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's S3 server: `endpoint` is its URL; `environment()` the variables that point boto, s3fs and child
    processes at it. In a thread of this process by default; `separate_process` runs it in a process of its own,
    which a process that forks (DataLoader workers) needs: a fork copies the server's threads' locks, not them."""

    def __init__(self, separate_process: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process = self._server = None
        if separate_process:
            self._process = subprocess.Popen(
                [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not wait_for(self._listening, timeout=60):
                self.stop()
                raise RuntimeError(f"moto's server did not start on port {self.port}")
            return
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request on stderr
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def environment(self, endpoint: str | None = None) -> dict[str, str]:
        return {**DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload(self, local_folder, bucket: str, prefix: str) -> list[str]:
        """Every file of a local folder to s3://bucket/prefix/..., its URLs."""
        client, urls = self.client(), []
        for root, _, files in os.walk(local_folder):
            for name in sorted(files):
                path = os.path.join(root, name)
                key = f"{prefix}/{os.path.relpath(path, local_folder)}"
                client.upload_file(path, bucket, key)
                urls.append(f"s3://{bucket}/{key}")
        return urls

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._process is not None:
            self._process.terminate()
            self._process.wait()


@dataclass
class FaultCounts:
    requests: int = 0
    resets: int = 0
    slowdowns: int = 0
    lost_answers: int = 0


class FaultProxy:
    """An HTTP proxy on the loopback interface between a client and the S3 server that, for a share of the
    requests, answers 503 SlowDown, resets the connection before forwarding, or forwards the request and then
    resets the connection instead of answering (the request took effect, its answer was lost). At most `budget`
    faults in all, so that retries always get through in the end."""

    def __init__(self, target_port: int, *, share: float = 0.2, budget: int = 40, seed: int = 0,
                 kinds: tuple[str, ...] = ("slowdown", "reset", "lost_answer")) -> None:
        self.target_port, self.share, self.budget, self.kinds = target_port, share, budget, kinds
        self.random = random.Random(seed)
        self.counts = FaultCounts()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stopped = False
        self.deny_writes = False  # answer every PUT, POST and DELETE with 403 AccessDenied
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    def _fault(self) -> str | None:
        with self._lock:
            self.counts.requests += 1
            if self.budget <= 0 or self.random.random() >= self.share:
                return None
            self.budget -= 1
            return self.random.choice(self.kinds)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            while True:
                request = _read_message(client)
                if request is None:
                    return
                if self.deny_writes and request.split(b" ", 1)[0] in (b"PUT", b"POST", b"DELETE"):
                    client.sendall(_DENIED)
                    continue
                fault = self._fault()
                if fault == "slowdown":
                    self.counts.slowdowns += 1
                    client.sendall(_SLOWDOWN)
                    continue
                if fault == "reset":
                    self.counts.resets += 1
                    _reset(client)
                    return
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port))
                upstream.sendall(request)
                answer = _read_message(upstream, response=True, head=request.startswith(b"HEAD"))
                if answer is None:
                    return
                if fault == "lost_answer":
                    self.counts.lost_answers += 1
                    _reset(client)
                    return
                client.sendall(answer)
        except OSError:
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()


_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")
_SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
             + str(len(_SLOWDOWN_BODY)).encode() + b"\r\n\r\n" + _SLOWDOWN_BODY)


_DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")
_DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: "
           + str(len(_DENIED_BODY)).encode() + b"\r\n\r\n" + _DENIED_BODY)


def _reset(connection: socket.socket) -> None:
    import struct

    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
    connection.close()


def _read_message(connection: socket.socket, *, response: bool = False, head: bool = False) -> bytes | None:
    """One HTTP/1.1 message (head and body, by Content-Length or chunked), or None at the end of the stream."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    fields = {}
    for line in header.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if not response and fields.get(b"expect", b"").lower() == b"100-continue":
        # The client sends its body only once told to go on; the request is forwarded whole, without the header.
        connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        header = b"\r\n".join(line for line in header.split(b"\r\n") if not line.lower().startswith(b"expect:"))
    status = header.split(b" ", 2)[1] if response else b""
    if head or status in (b"204", b"304") or status.startswith(b"1"):
        return header + b"\r\n\r\n"
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            body += chunk
        return header + b"\r\n\r\n" + body
    length = int(fields.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = connection.recv(max(65536, length - len(body)))
        if not chunk:
            break
        body += chunk
    return header + b"\r\n\r\n" + body


def wait_for(condition, timeout: float = 60.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
