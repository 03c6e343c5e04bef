"""The sans-I/O core: packets, checksums, configuration, pools, strategies, client tables.

Nothing in this package opens a socket, talks netlink, starts a process or reads a
clock: time is passed in as ``now`` (seconds, monotonic), bytes in and bytes out.
The I/O layers around it (``loaded.io``) feed it and carry out what it decides.
"""
