"""Profiles: the reference tables, measuring, JSON round trip, the cache, one profile per peer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2psl.errors import ConfigError
from p2psl.planning.profile import Profile, measure_profile, peer_profiles, read_profile_csv
from p2psl.topology import parse_topology

_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = _ROOT / "reference" / "profiles"  # the authors' tables, kept in the repository
RESNET = REFERENCE / "resnet101_cifar10_bs128.csv"
VGG = REFERENCE / "vgg19_cifar10_bs128.csv"


def test_resnet_vm_columns_in_seconds_and_bytes():
    p = read_profile_csv(RESNET, "VM")
    assert p.num_layers == 37 and p.batch_size == 128
    assert p.fwd[0] == pytest.approx(3.231e-3) and p.bwd[0] == pytest.approx(5.769e-3) and p.opt[0] == 0.0
    assert p.opt[9] == pytest.approx(1.077e-3)
    assert p.act_bytes[0] == round(8193.568 * 1024) and p.param_bytes[32] == round(18467.6 * 1024)


def test_vgg_d1_columns():
    p = read_profile_csv(VGG, "d1")
    assert p.num_layers == 25
    assert p.fwd[22] == pytest.approx(1.05015) and p.opt[22] == pytest.approx(1.83954)
    assert p.param_bytes[22] == round(401427.057 * 1024)


def test_gaps_are_estimated_not_free():
    kept = read_profile_csv(RESNET, "d2", gaps="keep")
    filled = read_profile_csv(RESNET, "d2")
    assert kept.fwd[3] == kept.bwd[3] == 0.0
    assert 4 in filled.estimated and filled.fwd[3] > 0 and filled.bwd[3] > 0
    assert filled.fwd[0] == kept.fwd[0]            # measured layers are untouched
    assert 1 not in filled.estimated


def test_missing_device_lists_the_devices():
    with pytest.raises(ConfigError) as info:
        read_profile_csv(RESNET, "tpu")
    message = str(info.value)
    assert "tpu" in message and str(RESNET) in message
    for device in ("VM", "laptop", "d1", "d2", "jetson-cpu", "jetson-gpu"):
        assert device in message


def test_bad_number_and_gap_in_layers_name_file_and_column(tmp_path):
    bad = tmp_path / "m_bs8.csv"
    bad.write_text("layer,act_KiB,param_KiB,x_fwd_ms,x_bwd_ms,x_opt_ms\n1,1,1,1,1,1\n2,1,1,oops,1,1\n")
    with pytest.raises(ConfigError, match=r"m_bs8\.csv.*x_fwd_ms.*layer 2"):
        read_profile_csv(bad, "x")
    gap = tmp_path / "g_bs8.csv"
    gap.write_text("layer,act_KiB,param_KiB,x_fwd_ms,x_bwd_ms,x_opt_ms\n1,1,1,1,1,1\n3,1,1,1,1,1\n")
    with pytest.raises(ConfigError, match=r"g_bs8\.csv.*'layer'"):
        read_profile_csv(gap, "x")
    nobatch = tmp_path / "model.csv"
    nobatch.write_text("layer,act_KiB,param_KiB,x_fwd_ms,x_bwd_ms,x_opt_ms\n1,1,1,1,1,1\n")
    with pytest.raises(ConfigError, match="batch size"):
        read_profile_csv(nobatch, "x")
    assert read_profile_csv(nobatch, "x", batch_size=4).batch_size == 4


def test_scaling_and_batch_size():
    p = Profile("d", 10, (1.0, 2.0), (2.0, 4.0), (0.5, 0.0), (100, 200), (7, 0))
    fast = p.scaled(2.0)
    assert fast.fwd == (0.5, 1.0) and fast.opt == (0.25, 0.0) and fast.act_bytes == p.act_bytes
    big = p.at_batch(20)
    assert big.fwd == (2.0, 4.0) and big.bwd == (4.0, 8.0) and big.opt == p.opt
    assert big.act_bytes == (200, 400) and big.param_bytes == p.param_bytes


def test_json_round_trip_and_validation():
    p = Profile("d", 10, (1.0, 2.0), (2.0, 4.0), (0.5, 0.0), (100, 200), (7, 0), (2,))
    data = json.loads(json.dumps(p.to_json()))
    assert Profile.from_json(data) == p
    for broken in ({**data, "fwd": [1.0]}, {**data, "act_bytes": [1, -2]}, {**data, "batch_size": 0},
                   {**data, "bwd": "x"}, {k: v for k, v in data.items() if k != "opt"}, [1, 2],
                   {**data, "fwd": [2**1100, 1.0]}, {**data, "fwd": [float("inf"), 1.0]}):  # a peer's, off the wire
        with pytest.raises(ValueError):
            Profile.from_json(broken)


def _tiny_model():
    import torch.nn as nn

    return [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)]


def test_measure_profile_times_and_sizes():
    import torch

    threads = torch.get_num_threads()
    layers = _tiny_model()
    before = layers[0].weight.detach().clone()
    p = measure_profile(layers, (8,), batch_size=4, warmup=1, repeats=3)
    assert torch.get_num_threads() == threads
    assert torch.equal(layers[0].weight, before)          # the caller's weights never change
    assert p.num_layers == 3 and all(t > 0 for t in p.fwd) and all(t > 0 for t in p.bwd)
    assert p.opt[1] == 0.0 and p.opt[0] > 0
    assert p.act_bytes == (4 * 16 * 4, 4 * 16 * 4, 4 * 4 * 4)
    assert p.param_bytes == ((8 * 16 + 16) * 4, 0, (16 * 4 + 4) * 4)


def _topology(profile: str | None = None) -> str:
    training = '[training]\nbatch_size = 64\n' + (f'profile = "{profile}"\n' if profile else "")
    peers = [("alice", "data_owner", None, 1.0), ("bob", "data_owner", "laptop", 1.0),
             ("c1", "compute", None, 2.0), ("c2", "compute", "d1", 1.0)]
    text = [training]
    for index, (name, role, device, speed) in enumerate(peers):
        text.append(f'[[peer]]\nname = "{name}"\nrole = "{role}"\naddress = "127.0.0.1:{7000 + index}"\n'
                    f'memory = "1GiB"\nspeed = {speed}\n' + (f'device = "{device}"\n' if device else ""))
    return "\n".join(text)


def test_peer_profiles_from_the_table():
    topo = parse_topology(_topology(str(RESNET)))
    profiles = peer_profiles(topo)
    vm, d1, laptop = (read_profile_csv(RESNET, d) for d in ("VM", "d1", "laptop"))
    assert profiles["c1"].fwd[0] == pytest.approx(vm.fwd[0] / 2 / 2)       # speed 2, batch 64 of 128
    assert profiles["c2"].fwd[0] == pytest.approx(d1.fwd[0] / 2)
    assert profiles["alice"].device == "d1" and profiles["bob"].bwd[5] == pytest.approx(laptop.bwd[5] / 2)
    assert profiles["c1"].batch_size == 64


def test_peer_profiles_from_one_measurement():
    topo = parse_topology(_topology())
    measured = Profile("local", 64, (1.0,), (2.0,), (0.0,), (10,), (5,))
    profiles = peer_profiles(topo, measured)
    assert profiles["c1"].fwd == (0.5,) and profiles["alice"].fwd == (1.0,)
    with pytest.raises(ConfigError):
        peer_profiles(topo, None)
