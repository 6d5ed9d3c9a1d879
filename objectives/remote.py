"""RemoteObjective: an objective served by ``sdo serve-reward`` in another process."""

from __future__ import annotations

import socket
import time
from typing import Any

import torch
from torch import Tensor

from sdo_lightning import reward_protocol as wire
from sdo_lightning.contracts import Objective


class RewardServerError(ConnectionError):
    """The reward server is missing, went away, speaks another protocol or answered wrongly."""


class RemoteObjective(Objective):
    """An objective that runs in a reward server (``sdo serve-reward``), for rewards whose
    dependencies cannot be installed beside this project.

    The forward pass sends the images (and the batch fields the served objective reads) and
    returns the server's per-sample losses; when the images need a gradient the server keeps the
    forward's graph, and the backward pass asks it for ``d(sum_i g_i loss_i)/d images`` with the
    incoming gradient ``g``, so the loss behaves as an in-process objective under every gradient
    mode, ``WeightedSum`` and ``Checkpointed``. A connection that fails is retried (a restarted
    server is reconnected; a vjp whose graph it lost is computed anew from the images).

    Args:
        address: the server's ``HOST:PORT`` or ``unix:PATH`` (what ``sdo serve-reward`` printed).
        token: the server's shared secret, if it was started with ``--token``.
        timeout: seconds to wait for one reply.
        retries: how often a failed connection or request is tried again (with a growing pause).
        fields: the batch entries to send (tensors, or lists of strings/numbers); None sends
            every such entry the batch has (prompts, targets, reference images, ...).
    """

    def __init__(self, address: str = "127.0.0.1:8765", token: str | None = None, timeout: float = 120.0,
                 retries: int = 3, fields: list[str] | None = None) -> None:
        super().__init__()
        wire.parse_address(address)  # a malformed address fails here, in one sentence
        if timeout <= 0 or retries < 0:
            raise ValueError(f"RemoteObjective needs timeout > 0 and retries >= 0, got {timeout} and {retries}.")
        self.address = address
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.fields = fields
        self._sock: socket.socket | None = None

    # -- transport ------------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        family, where = wire.parse_address(self.address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(where)
        except OSError:
            sock.close()
            raise
        return sock

    def request(self, header: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> tuple[dict, dict]:
        """Send one request and return the server's ``(header, tensors)``; retry a failed connection."""
        message = wire.encode({**header, "token": self.token}, tensors)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.25 * 2 ** (attempt - 1), 4.0))
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(message)
                reply, out = wire.receive(self._sock)
                break
            except wire.ProtocolError as err:
                self.close()
                raise RewardServerError(f"the reward server at {self.address} answered out of protocol: {err}") from None
            except socket.timeout:
                self.close()
                raise RewardServerError(f"the reward server at {self.address} gave no answer within {self.timeout:g} s; "
                                        "raise RemoteObjective(timeout=...) or check the server.") from None
            except OSError as err:  # refused, reset, broken pipe: reconnect and try again
                self.close()
                last = err
        else:
            raise RewardServerError(
                f"no reward server answers at {self.address} ({type(last).__name__}: {last}, {self.retries + 1} tries); "
                "start one with `sdo serve-reward --objective NAME --address ADDRESS`."
            ) from None
        if not reply.get("ok"):
            if reply.get("unknown_id"):
                return reply, out
            raise RewardServerError(f"the reward server at {self.address} refused the request: {reply.get('error')}")
        return reply, out

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __getstate__(self) -> dict[str, Any]:  # deep copies and checkpoints carry no socket
        state = self.__dict__.copy()
        state["_sock"] = None
        return state

    # -- the objective ----------------------------------------------------------------------------
    def _payload(self, images: Tensor, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        names = list(batch) if self.fields is None else self.fields
        fields, tensors = {}, {"images": images.detach()}
        for name in names:
            if name not in batch:
                raise KeyError(f"RemoteObjective(fields=...) names {name!r}, which the batch lacks; it has {sorted(batch)}.")
            value = batch[name]
            if isinstance(value, Tensor):
                tensors[f"batch.{name}"] = value
            elif _jsonable(value):
                fields[name] = value
            elif self.fields is not None:
                raise TypeError(f"RemoteObjective cannot send batch[{name!r}] ({type(value).__name__}): only tensors, "
                                "strings, numbers and lists of them travel to a reward server.")
        return {"fields": fields}, tensors

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        return _RemoteLosses.apply(images, self, batch)

    def _check(self, name: str, got: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        if got is None or tuple(got.shape) != shape:
            found = "nothing" if got is None else f"shape {tuple(got.shape)}"
            raise RewardServerError(f"the reward server at {self.address} returned {found} for {name}, expected shape "
                                    f"{shape}; is it serving an objective that follows the Objective contract?")
        return got


class _RemoteLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, images: Tensor, remote: RemoteObjective, batch: dict[str, Any]) -> Tensor:
        keep = bool(ctx.needs_input_grad[0])
        header, tensors = remote._payload(images, batch)
        reply, out = remote.request({"op": "forward", "keep": keep, **header}, tensors)
        losses = remote._check("the losses", out.get("losses"), (len(images),))
        remote.terms = {k[len("terms."):]: v.to(images.device) for k, v in out.items() if k.startswith("terms.")}
        ctx.remote, ctx.batch, ctx.graph_id = remote, batch, reply.get("id")
        ctx.save_for_backward(images)
        return losses.to(images.device)

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, None, None]:
        (images,) = ctx.saved_tensors
        remote = ctx.remote
        weights = {"weights": grad_losses.detach().float()}
        reply, out = remote.request({"op": "vjp", "id": ctx.graph_id}, weights)
        if reply.get("unknown_id"):  # the server restarted or dropped the graph: forward and vjp anew
            header, tensors = remote._payload(images, ctx.batch)
            reply, out = remote.request({"op": "forward_vjp", **header}, {**tensors, **weights})
        grad = remote._check("the image gradient", out.get("grad"), tuple(images.shape))
        return grad.to(images.device, images.dtype), None, None


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    return isinstance(value, (list, tuple)) and all(_jsonable(v) for v in value)
