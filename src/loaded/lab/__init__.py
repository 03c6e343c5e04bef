"""Network-namespace lab for running and testing the balancer on one machine.

See :mod:`loaded.lab.topology` for the layout; :mod:`loaded.lab.server` is the
backend test server and :mod:`loaded.lab.traffic` the client helpers.
"""

from .netns import in_netns, list_netns, netns_socket, read_proc_net, run_in_netns
from .topology import Backend, Lab, LabError, cleanup_stale, sigterm_as_exit

__all__ = [
    "Backend",
    "Lab",
    "LabError",
    "cleanup_stale",
    "in_netns",
    "list_netns",
    "netns_socket",
    "read_proc_net",
    "run_in_netns",
    "sigterm_as_exit",
]
