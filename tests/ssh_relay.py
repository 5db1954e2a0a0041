"""``python tests/ssh_relay.py HOST PORT``: joins stdin/stdout to a TCP connection, as OpenSSH's
ProxyCommand expects. The cluster launcher's config has no SSH port setting; its
``auth.ssh_proxy_command`` is how the tests reach the SSH server they start on a free port."""

from __future__ import annotations

import os
import socket
import sys
import threading


def main() -> None:
    connection = socket.create_connection((sys.argv[1], int(sys.argv[2])))

    def upstream() -> None:
        while data := os.read(0, 65536):
            connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := connection.recv(65536):
        os.write(1, data)


if __name__ == "__main__":
    main()
