"""``sdo serve-reward``: an objective in a process (and a Python environment) of its own.

    sdo serve-reward --objective ClassifierObjective --objective.target_class 7       # 127.0.0.1:8765
    sdo serve-reward --config reward.yaml --address unix:/tmp/reward.sock
    sdo serve-reward --objective MyReward --address 0.0.0.0:8765 --token "$SECRET"     # off loopback

Any registered objective (built-in or a plugin installed beside the server) is served: a client,
:class:`~sdo_lightning.objectives.RemoteObjective`, sends a batch of images in [0, 1] and the
batch fields the objective reads, and gets the per-sample losses and, for a gradient, the
vector-Jacobian product ``d(sum_i w_i loss_i)/d images`` (wire format:
:mod:`sdo_lightning.reward_protocol`). The server keeps the autograd graph of the last few
forwards that asked for it, so a vjp costs a backward pass only; requests are served one at a
time. Off a loopback address a shared ``--token`` is required. Randomness inside the objective
(augmentations) draws from the server's generator, seeded with ``--seed``.
"""

from __future__ import annotations

import hmac
import os
import socket
import sys
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from sdo_lightning import reward_protocol as wire
from sdo_lightning.contracts import Objective

DEFAULT_ADDRESS = "127.0.0.1:8765"


class RewardServer:
    """Serve ``objective`` at ``address`` (``HOST:PORT``, port 0 for a free one, or ``unix:PATH``).

    Args:
        objective: the objective to serve.
        address: where to listen; a loopback host or a Unix socket unless ``token`` is set.
        token: a shared secret every request must carry; required off loopback.
        device: where the objective runs (``cpu``, ``cuda``, ``cuda:1``).
        keep_graphs: how many forwards' autograd graphs wait for their vjp (oldest dropped first).
    """

    def __init__(self, objective: Objective, address: str = DEFAULT_ADDRESS, token: str | None = None,
                 device: str = "cpu", keep_graphs: int = 8) -> None:
        if not wire.is_loopback(address) and not token:
            raise ValueError(f"serving on {address}, off the loopback interface, needs --token SECRET (clients pass the "
                             "same token); or listen on 127.0.0.1:PORT or unix:PATH.")
        self.objective = objective.to(device).eval()
        for p in self.objective.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.token = token
        self.keep_graphs = keep_graphs
        self._graphs: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        self._next_id = 0
        family, where = wire.parse_address(address)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            if os.path.exists(where):
                os.unlink(where)
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(where)
        self.sock.listen(4)
        bound = self.sock.getsockname()
        self.address = f"unix:{bound}" if family == socket.AF_UNIX else f"{bound[0]}:{bound[1]}"

    # -- requests -----------------------------------------------------------------------------
    def handle(self, header: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The reply to one request (``ok: false`` with one sentence for a bad one)."""
        if self.token is not None and not hmac.compare_digest(str(header.get("token") or ""), self.token):
            return {"ok": False, "error": "the reward server needs its token: pass RemoteObjective(token=...) "
                                          "(the --token the server was started with)."}, {}
        op = header.get("op")
        try:
            if op == "hello":
                return {"ok": True, "objective": type(self.objective).__name__}, {}
            if op == "forward":
                return self._forward(header, tensors, keep=bool(header.get("keep")))
            if op == "vjp":
                graph = self._graphs.pop(header.get("id"), None)
                if graph is None:
                    return {"ok": False, "unknown_id": True, "error": f"no kept graph with id {header.get('id')!r}."}, {}
                return {"ok": True}, {"grad": self._vjp(*graph, tensors.get("weights"))}
            if op == "forward_vjp":
                reply, out = self._forward(header, tensors, keep=True)
                images, losses = self._graphs.pop(reply.pop("id"))
                out["grad"] = self._vjp(images, losses, tensors.get("weights"))
                return reply, out
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            return {"ok": False, "error": f"{type(self.objective).__name__} failed on this request: "
                                          f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}, {}
        return {"ok": False, "error": f"unknown request {op!r}; known: hello, forward, vjp, forward_vjp."}, {}

    def _forward(self, header: dict[str, Any], tensors: dict[str, Tensor], keep: bool) -> tuple[dict, dict]:
        images = tensors.get("images")
        if images is None or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("a forward request needs 'images', a floating-point (B, C, H, W) tensor in [0, 1].")
        batch: dict[str, Any] = dict(header.get("fields") or {})
        batch.update({k[len("batch."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("batch.")})
        images = images.to(self.device).requires_grad_(keep)
        self.objective.terms = {}
        with torch.set_grad_enabled(keep):
            losses = self.objective(images, batch)
        if losses.shape != (len(images),):
            raise ValueError(f"the objective returned losses of shape {tuple(losses.shape)}, not ({len(images)},).")
        reply: dict[str, Any] = {"ok": True}
        out = {"losses": losses.detach()}
        out.update({f"terms.{k}": v.detach() for k, v in self.objective.terms.items() if isinstance(v, Tensor)})
        if keep:
            reply["id"] = self._next_id
            self._graphs[self._next_id] = (images, losses)
            self._next_id += 1
            while len(self._graphs) > self.keep_graphs:
                self._graphs.popitem(last=False)
        return reply, out

    @staticmethod
    def _vjp(images: Tensor, losses: Tensor, weights: Tensor | None) -> Tensor:
        if weights is None or weights.shape != losses.shape:
            raise ValueError(f"a vjp request needs 'weights' of shape {tuple(losses.shape)}.")
        (grad,) = torch.autograd.grad(losses, images, weights.to(losses.device, losses.dtype), allow_unused=True)
        return torch.zeros_like(images) if grad is None else grad

    # -- the loop -----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Answer clients one at a time until interrupted."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self.sock.fileno() == -1:  # closed: stop serving
                    return
                raise
            with conn:
                self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        while True:
            try:
                header, tensors = wire.receive(conn)
            except (ConnectionError, OSError):
                return  # the client went away
            except wire.ProtocolError as err:
                try:
                    conn.sendall(wire.encode({"ok": False, "error": str(err)}))
                finally:
                    return
            reply, out = self.handle(header, tensors)
            try:
                conn.sendall(wire.encode(reply, out))
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def build_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="sdo serve-reward", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with the options below")
    parser.add_subclass_arguments(Objective, "objective", required=True,
                                  help="the objective to serve: a class name (ClassifierObjective) and its options")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="HOST:PORT (port 0: a free one) or unix:PATH")
    parser.add_argument("--token", type=str | None, default=None, help="shared secret; required off loopback")
    parser.add_argument("--device", default="cpu", help="where the objective runs: cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the objective's random draws (augmentations)")
    return parser


def serve(argv: list[str]) -> None:
    from sdo_lightning import registry

    registry.load_plugins()
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    objective = parser.instantiate_classes(cfg).objective
    server = RewardServer(objective, cfg.address, cfg.token, cfg.device)
    # the line a launcher (or a test) waits for: the address, with the port if 0 was asked for
    print(f"sdo serve-reward: serving {type(objective).__name__} on {server.address} "
          f"(protocol {wire.PROTOCOL_VERSION})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
