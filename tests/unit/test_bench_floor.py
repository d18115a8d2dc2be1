"""The floor benchmark's wire (tools/bench/floor.py): what it measures is only worth its name if
it carries every tensor the split sends, in the memory order a layer left it."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from tools.bench.floor import ACTIVATION, GRADIENT, ROUND_END, _recv, _send


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _send_all(sock: socket.socket, *messages: tuple[int, torch.Tensor]) -> threading.Thread:
    """Send from a thread: a message larger than the socket's buffer waits for the reader."""
    thread = threading.Thread(target=lambda: [_send(sock, kind, t) for kind, t in messages])
    thread.start()
    return thread


def test_a_channels_last_activation_arrives_equal_and_channels_last(pair):
    a, b = pair
    x = torch.randn(32, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    sender = _send_all(a, (ACTIVATION, x))
    kind, y = _recv(b)
    sender.join()
    assert kind == ACTIVATION
    assert torch.equal(y, x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_a_row_major_gradient_and_a_round_end_arrive_in_order(pair):
    a, b = pair
    g = torch.randn(32, 32, 4, 4)
    sender = _send_all(a, (GRADIENT, g), (ROUND_END, torch.zeros(1)))
    kind, got = _recv(b)
    assert kind == GRADIENT and got.is_contiguous() and torch.equal(got, g)
    kind, end = _recv(b)
    sender.join()
    assert kind == ROUND_END and end.numel() == 1


def test_a_closed_socket_ends_the_stream(pair):
    a, b = pair
    a.close()
    with pytest.raises(EOFError):
        _recv(b)
