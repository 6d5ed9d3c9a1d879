"""The wire format of ``sdo serve-reward`` and :class:`~sdo_lightning.objectives.RemoteObjective`.

One message is::

    b"SDOR" | header length (uint32, big-endian) | header (UTF-8 JSON) | payload length (uint64) | payload

The header says what the message is (``op``), the protocol version, and for every tensor of the
payload its name, dtype and shape, in payload order; the payload is the tensors' raw bytes,
C-contiguous, little-endian. Nothing is ever unpickled: a peer can send numbers and strings only.

Requests (client -> server): ``hello``; ``forward`` (tensor ``images`` ``(B, C, H, W)`` in [0, 1],
the batch's tensors as ``batch.NAME``, its JSON-able fields under ``fields``, and ``keep``: keep
the autograd graph for a ``vjp``); ``vjp`` (``id`` of a kept forward, tensor ``weights`` ``(B,)``);
``forward_vjp`` (a forward and its vjp in one request, for a graph the server no longer holds).
Replies: ``ok: true`` with tensors ``losses`` ``(B,)``, ``terms.NAME`` and/or ``grad``, or
``ok: false`` with ``error``, one sentence.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import torch
from torch import Tensor

PROTOCOL_VERSION = 1
MAGIC = b"SDOR"
#: the largest header and payload a peer accepts (a bound on what a bad peer can make it allocate)
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 8 << 30
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class ProtocolError(ValueError):
    """A message that is not of this protocol (wrong magic, version, sizes or tensor layout)."""


def encode(header: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> bytes:
    """One message: ``header`` plus ``tensors`` (moved to the CPU; their layout goes into the header)."""
    chunks, layout = [], []
    for name, tensor in (tensors or {}).items():
        if tensor.dtype not in _NAMES:
            raise ProtocolError(f"tensor {name!r} has dtype {tensor.dtype}, which the reward protocol does not carry; "
                                f"use one of {', '.join(DTYPES)}.")
        flat = tensor.detach().to("cpu").contiguous()
        layout.append({"name": name, "dtype": _NAMES[tensor.dtype], "shape": list(flat.shape)})
        chunks.append(flat.reshape(-1).view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    head = json.dumps({**header, "protocol": PROTOCOL_VERSION, "tensors": layout}).encode()
    payload = b"".join(chunks)
    return MAGIC + struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)) + payload


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionResetError("the peer closed the connection mid-message")
        got += k
    return bytes(buf)


def receive(sock: socket.socket) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read one message; raise :class:`ProtocolError` for anything not of this protocol version,
    ``ConnectionResetError`` when the peer hangs up (EOF before a message is an empty read)."""
    magic = _exactly(sock, 4)
    if magic != MAGIC:
        raise ProtocolError(f"not an sdo reward-protocol message (starts with {magic!r}, expected {MAGIC!r}).")
    (head_len,) = struct.unpack(">I", _exactly(sock, 4))
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {head_len} bytes is over the limit of {MAX_HEADER_BYTES}.")
    try:
        header = json.loads(_exactly(sock, head_len).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"message header is not UTF-8 JSON ({err}).") from None
    (payload_len,) = struct.unpack(">Q", _exactly(sock, 8))
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object.")
    if header.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"the peer speaks reward protocol version {header.get('protocol')!r}, this side speaks "
                            f"{PROTOCOL_VERSION}; install the same sdo-lightning release on both sides.")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"message payload of {payload_len} bytes is over the limit of {MAX_PAYLOAD_BYTES}.")
    layout = header.get("tensors") or []
    sizes = []
    for entry in layout:
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if dtype is None or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ProtocolError(f"bad tensor entry in the header: {str(entry)[:120]}.")
        sizes.append(int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size())
    if sum(sizes) != payload_len:
        raise ProtocolError(f"the header's tensors take {sum(sizes)} bytes but the payload has {payload_len}.")
    payload = _exactly(sock, payload_len) if payload_len else b""
    tensors, offset = {}, 0
    for entry, size in zip(layout, sizes):
        raw = torch.frombuffer(bytearray(payload[offset:offset + size]), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        tensors[entry["name"]] = raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
        offset += size
    return header, tensors


def parse_address(address: str) -> tuple[int, Any]:
    """``(socket family, address)`` of ``HOST:PORT`` or ``unix:PATH``."""
    if address.startswith("unix:"):
        if not hasattr(socket, "AF_UNIX"):
            raise ValueError("unix: addresses need a system with Unix sockets; use HOST:PORT.")
        return socket.AF_UNIX, address[len("unix:"):]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"reward server address {address!r} is neither HOST:PORT (e.g. 127.0.0.1:8765) nor unix:PATH.")
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, (host.strip("[]"), int(port))


def is_loopback(address: str) -> bool:
    """True for a Unix socket or a loopback host (127.0.0.0/8, ::1, localhost)."""
    family, where = parse_address(address)
    if family != socket.AF_INET and family != socket.AF_INET6:
        return True
    host = where[0]
    return host == "localhost" or host == "::1" or host.startswith("127.")
