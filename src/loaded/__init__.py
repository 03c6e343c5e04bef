"""loaded: a layer-3/4 load balancer for Linux on netfilter NFQUEUE."""

__version__ = "0.1.0"
