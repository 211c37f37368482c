"""The baseline: a bare gevent StreamServer that answers each line with one line.

    python -m bench.echo_server PORT

Each received line is sent back as the reply (read with a plain buffer over
``recv``, answered with one ``sendall`` per read); at the client's EOF it
closes. This is the transport limit of the stack the herd is built on: the
same gevent, the same loopback, no parsing, no store, no logs, no flooding.
"""

from __future__ import annotations

import socket
import sys

from gevent.server import StreamServer

RECV_BYTES = 65536


def handle(sock: socket.socket, address: object) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    try:
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                return
            pending += data
            end = pending.rfind(b"\n") + 1
            if end:
                sock.sendall(pending[:end])  # one reply line per request line
                pending = pending[end:]
    except OSError:
        return


def main(argv: list[str]) -> int:
    port = int(argv[1]) if len(argv) > 1 else 0
    server = StreamServer(("127.0.0.1", port), handle, backlog=1024)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
