"""The bf16 "auto" rule: on exactly where the CPU has AMX; explicit settings win."""

from __future__ import annotations

import torch

from conan_core import precision


def test_auto_follows_amx(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.resolve_cpu_bf16(None) is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.resolve_cpu_bf16(None) is False


def test_explicit_setting_wins(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.resolve_cpu_bf16(True) is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.resolve_cpu_bf16(False) is False


def test_missing_probe_means_no_amx(monkeypatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert precision.cpu_has_amx() is False
