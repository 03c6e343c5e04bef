"""Run-time control of a running daemon: the control socket, its protocol, the CLI."""
