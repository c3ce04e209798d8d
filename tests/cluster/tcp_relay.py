"""stdin/stdout <-> one TCP connection: an SSH ProxyCommand reaching sshd on any port.

Ray's cluster YAML has no SSH port (it always dials 22); `auth.ssh_proxy_command` running
`python tcp_relay.py HOST PORT` reaches an sshd listening elsewhere, for ssh and rsync alike.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int) -> None:
    conn = socket.create_connection((host, port))
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    selector.register(conn, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == stdin:
                data = os.read(stdin, 65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    selector.unregister(stdin)
                    continue
                conn.sendall(data)
            else:
                data = conn.recv(65536)
                if not data:
                    return
                os.write(stdout, data)


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
