"""The project's exception types.

Rules:
- Anything that comes from the wire and cannot be balanced raises ``PacketError``
  and nothing else. Its ``reason`` is a short, stable token (see ``Reason``) that
  the worker counts; the packet is then dropped. A fuzzer may feed any bytes to
  the packet engine: the only exception it may see is ``PacketError``.
- A configuration that cannot be used raises ``ConfigError`` carrying every
  problem found, each naming the file, the line and the reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class LoadedError(Exception):
    """Base of every error this project raises on purpose."""


class Reason(enum.StrEnum):
    """Why a packet was dropped. Values are stable: they are metric labels."""

    # malformed input
    EMPTY = "empty"
    BAD_VERSION = "bad-ip-version"
    TRUNCATED_IP = "truncated-ip-header"
    BAD_IHL = "bad-ihl"
    BAD_TOTAL_LENGTH = "bad-total-length"
    BAD_PAYLOAD_LENGTH = "bad-payload-length"
    TRUNCATED_EXT = "truncated-extension-header"
    BAD_EXT = "bad-extension-header"
    TOO_MANY_EXT = "too-many-extension-headers"
    TRUNCATED_L4 = "truncated-l4-header"
    BAD_L4 = "bad-l4-header"
    TINY_FRAGMENT = "tiny-fragment"
    BAD_ICMP_CHECKSUM = "bad-icmp-checksum"
    BAD_EMBEDDED = "bad-embedded-packet"
    # well-formed, but not something we balance
    UNSUPPORTED_PROTOCOL = "unsupported-protocol"
    UNSUPPORTED_ICMP = "unsupported-icmp-type"
    ROUTING_HEADER = "routing-header-in-transit"
    NO_BACKEND = "no-backend"
    UNKNOWN_FLOW = "icmp-error-unknown-flow"


class PacketError(LoadedError):
    """A packet that cannot be balanced: the caller drops it and counts ``reason``."""

    __slots__ = ("reason",)

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about a configuration file."""

    file: str
    line: int  # 1-based; 0 when the problem belongs to the file as a whole
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.severity}: {self.message}"


class ConfigError(LoadedError):
    """A configuration with at least one error; ``problems`` lists them all."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
