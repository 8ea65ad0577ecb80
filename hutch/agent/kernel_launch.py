"""Starts a Python kernel as `python -m ipykernel_launcher` does, run by `python -c` (the agent's
package is not on the kernel's path), with one change: ipykernel's pipe for the output of forked
subprocesses listens on a Unix socket beside the connection file instead of on 127.0.0.1.

Every other socket of the kernel is already `ipc` (the connection file's transport). A TCP socket
that a thread polls cannot be saved by gVisor's checkpoint (runsc 2022-12-19: "endpoint still has
waiters upon save"), so with that pipe no gVisor sandbox running Python could hibernate.
"""

from __future__ import annotations


def _pipe_over_ipc(connection_file: str) -> None:
    try:
        import zmq
        from ipykernel.iostream import IOPubThread
    except ImportError:
        return
    address = f"ipc://{connection_file}.pipe"
    setup_in, setup_out = IOPubThread._setup_pipe_in, IOPubThread._setup_pipe_out

    def pipe_in(self):  # binds `bind_to_random_port("tcp://127.0.0.1")`, at the kernel's start
        def bind(sock, *args, **kwargs):
            sock.bind(address)
            return 0  # the "port" `_setup_pipe_out` connects to, ignored there

        original = zmq.Socket.bind_to_random_port
        zmq.Socket.bind_to_random_port = bind
        try:
            setup_in(self)
        finally:
            zmq.Socket.bind_to_random_port = original

    def pipe_out(self):  # connects to "tcp://127.0.0.1:<port>", in a forked child
        connect = zmq.Socket.connect
        zmq.Socket.connect = lambda sock, _addr: connect(sock, address)
        try:
            return setup_out(self)
        finally:
            zmq.Socket.connect = connect

    IOPubThread._setup_pipe_in = pipe_in  # type: ignore[method-assign]
    IOPubThread._setup_pipe_out = pipe_out  # type: ignore[method-assign]


def main() -> None:
    import sys

    args = sys.argv[1:]
    if "-f" in args[:-1]:
        _pipe_over_ipc(args[args.index("-f") + 1])
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


main()
