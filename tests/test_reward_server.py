"""sdo serve-reward and RemoteObjective: served losses and gradients equal in-process ones."""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from sdo_lightning import Objective
from sdo_lightning import reward_protocol as wire
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.training.checkpoint_io import read_checkpoint
from sdo_lightning.cli import clean_message
from sdo_lightning.training.data import SampleSet
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.objectives import CLIPScore, ClassifierObjective, RemoteObjective, WeightedSum
from sdo_lightning.objectives.remote import RewardServerError
from sdo_lightning.reward_server import RewardServer
from sdo_lightning.solvers import DDIM
from sdo_lightning.testing.tiny_models import build_tiny_clip


def start_server(*objective_args):
    """``sdo serve-reward`` in a subprocess on a free loopback port; returns (process, address)."""
    cmd = [sys.executable, "-m", "sdo_lightning", "serve-reward", *objective_args, "--address", "127.0.0.1:0",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the server prints its address once it listens
        lines.append(line)
        if "serving" in line:
            return proc, line.split(" on ")[1].split()[0]
    proc.wait()
    raise AssertionError("".join(lines[-20:]))


def stop(proc):
    proc.kill()
    proc.wait()
    proc.stderr.close()


@pytest.fixture(scope="module")
def classifier_server(tiny_digits_dir):
    proc, address = start_server("--objective", "ClassifierObjective", "--objective.path",
                                 str(tiny_digits_dir / "classifier"), "--objective.target_class", "7")
    yield address
    stop(proc)


def gradient_of(objective, images, batch, weights):
    x = images.clone().requires_grad_()
    losses = objective(x, batch)
    (grad,) = torch.autograd.grad((weights * losses).sum(), x)
    return losses.detach(), grad


def test_served_classifier_losses_and_gradient_equal_in_process(classifier_server, tiny_digits_dir):
    g = torch.Generator().manual_seed(0)
    images, weights = torch.rand(5, 1, 8, 8, generator=g), torch.randn(5, generator=g)
    batch = {"index": torch.arange(5), "prompt": [""] * 5}
    local = ClassifierObjective(str(tiny_digits_dir / "classifier"), target_class=7)
    remote = RemoteObjective(classifier_server)
    want_losses, want_grad = gradient_of(local, images, batch, weights)
    got_losses, got_grad = gradient_of(remote, images, batch, weights)
    assert torch.equal(got_losses, want_losses) and torch.equal(got_grad, want_grad)
    torch.testing.assert_close(remote.terms["target_prob"], local.terms["target_prob"], rtol=0, atol=0)
    # no gradient asked: the server keeps no graph, the losses are the same
    with torch.no_grad():
        assert torch.equal(remote(images, batch), want_losses)
    # inside WeightedSum and under another weight: the same vjp, scaled by the incoming gradient
    both = WeightedSum([remote, local], weights=[0.5, 2.0])
    mixed_losses, mixed_grad = gradient_of(both, images, batch, weights)
    torch.testing.assert_close(mixed_losses, 2.5 * want_losses)
    torch.testing.assert_close(mixed_grad, 2.5 * want_grad)


def test_served_clip_score_reads_the_batch_prompts(tmp_path_factory):
    root = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
    proc, address = start_server("--objective", "CLIPScore", "--objective.model", str(root))
    try:
        g = torch.Generator().manual_seed(1)
        images, weights = torch.rand(3, 3, 16, 16, generator=g), torch.randn(3, generator=g)
        batch = {"prompt": ["a red cat", "a dog", "a tree"], "index": torch.arange(3)}
        want = gradient_of(CLIPScore(str(root)), images, batch, weights)
        got = gradient_of(RemoteObjective(address), images, batch, weights)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    finally:
        stop(proc)


def sdo_fit(objective, tiny_digits_dir, tmp_path, steps=2, callbacks=()):
    module = LatentOptimization(objective=objective, backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4), lr=0.1)
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(module, datamodule=SampleSet(num_samples=3))
    return module


def test_an_sdo_fit_through_the_server_equals_the_in_process_fit(classifier_server, tiny_digits_dir, tmp_path):
    local = sdo_fit(ClassifierObjective(str(tiny_digits_dir / "classifier"), target_class=7), tiny_digits_dir, tmp_path)
    remote = sdo_fit(RemoteObjective(classifier_server), tiny_digits_dir, tmp_path)
    assert torch.equal(remote.variable.detach(), local.variable.detach())
    assert not torch.equal(local.variable.detach(), local.start_latent)  # it did move


class KillServer(Callback):
    def __init__(self, proc, after):
        self.proc, self.after = proc, after

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.after:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def test_a_killed_server_ends_the_run_in_one_sentence_and_the_last_checkpoint_stays_valid(tiny_digits_dir, tmp_path):
    proc, address = start_server("--objective", "ClassifierObjective", "--objective.path",
                                 str(tiny_digits_dir / "classifier"), "--objective.target_class", "7")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    try:
        with pytest.raises(RewardServerError) as info:
            sdo_fit(RemoteObjective(address, retries=1), tiny_digits_dir, tmp_path, steps=4,
                    callbacks=[checkpoints, KillServer(proc, after=2)])
    finally:
        stop(proc)
    message = clean_message(info.value)
    assert message.startswith("RewardServerError: no reward server answers at") and "sdo serve-reward" in message
    assert "\n" not in message
    saved = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert saved["global_step"] == 2


# -- protocol edges, on a server in a thread of this process -----------------------------------
class Brightness(Objective, register=False):
    def forward(self, images, batch):
        return images.flatten(1).mean(1) * batch["scale"]


@pytest.fixture
def thread_server():
    servers = []

    def make(objective=None, token=None, address="127.0.0.1:0"):
        server = RewardServer(objective or Brightness(), address, token=token)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.close()


def test_a_lost_graph_is_recomputed_and_batch_tensors_travel(thread_server):
    server = thread_server()
    remote = RemoteObjective(server.address)
    images = torch.rand(2, 3, 4, 4).requires_grad_()
    batch = {"scale": torch.tensor([2.0, -1.0])}
    losses = remote(images, batch)
    torch.testing.assert_close(losses, images.detach().flatten(1).mean(1) * batch["scale"])
    server._graphs.clear()  # as after a restart: the vjp must not fail
    (grad,) = torch.autograd.grad(losses.sum(), images)
    torch.testing.assert_close(grad, batch["scale"].view(2, 1, 1, 1).expand(2, 3, 4, 4) / 48)


def test_the_token_is_required_off_loopback_and_checked(thread_server):
    with pytest.raises(ValueError, match="needs --token"):
        RewardServer(Brightness(), "0.0.0.0:0")
    server = thread_server(token="s3cret")
    batch = {"scale": torch.ones(1)}
    with pytest.raises(RewardServerError, match="needs its token"):
        RemoteObjective(server.address)(torch.rand(1, 1, 2, 2), batch)
    assert RemoteObjective(server.address, token="s3cret")(torch.rand(1, 1, 2, 2), batch).shape == (1,)


def test_no_server_is_one_sentence_naming_the_command():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RewardServerError, match="no reward server answers at 127.0.0.1.*sdo serve-reward"):
        RemoteObjective(f"127.0.0.1:{port}", retries=1)(torch.rand(1, 1, 2, 2), {})


def fake_server(reply_header, reply_tensors):
    """A one-shot server that answers any request with the given message."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def answer():
        conn, _ = sock.accept()
        with conn:
            wire.receive(conn)
            message = wire.encode(reply_header, reply_tensors)
            if reply_header.get("protocol_override"):
                message = message.replace(b'"protocol": 1', b'"protocol": 7', 1)
            conn.sendall(message)
        sock.close()

    threading.Thread(target=answer, daemon=True).start()
    return "127.0.0.1:%d" % sock.getsockname()[1]


def test_another_protocol_version_and_a_wrong_shape_are_one_sentence_each():
    address = fake_server({"ok": True, "protocol_override": True}, {"losses": torch.zeros(2)})
    with pytest.raises(RewardServerError, match="version 7, this side speaks 1"):
        RemoteObjective(address)(torch.rand(2, 1, 2, 2), {})
    address = fake_server({"ok": True}, {"losses": torch.zeros(3)})
    with pytest.raises(RewardServerError, match=r"returned shape \(3,\) for the losses, expected shape \(2,\)"):
        RemoteObjective(address)(torch.rand(2, 1, 2, 2), {})


def test_garbage_on_the_server_socket_gets_an_answer_not_a_crash(thread_server):
    server = thread_server()
    family, where = wire.parse_address(server.address)
    with socket.create_connection(where, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        header, _ = wire.receive(s)
    assert not header["ok"] and "not an sdo reward-protocol message" in header["error"]
    assert RemoteObjective(server.address)(torch.rand(1, 1, 2, 2), {"scale": torch.ones(1)}).shape == (1,)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets")
def test_a_unix_socket_serves_too(thread_server, tmp_path):
    server = thread_server(address=f"unix:{tmp_path / 'r.sock'}")
    assert server.address == f"unix:{tmp_path / 'r.sock'}" and os.path.exists(tmp_path / "r.sock")
    assert RemoteObjective(server.address)(torch.rand(1, 1, 2, 2), {"scale": torch.ones(1)}).shape == (1,)
