"""Tiny model files and configs for the registry, loading and download tests.

Import as ``from modelfiles import ...`` (a module, not conftest.py: see testutils.py).
Model files are tiny scripted modules with the empanada interface, written into tmp_path.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Dict  # noqa: UP035  (TorchScript wants typing.Dict in annotations)

import torch
import yaml

from testutils import FINETUNE

#: The tests build their model files with torch.jit.script/save, which torch 2.13 marks
#: deprecated; modules using these helpers filter that warning with this mark's text.
JIT_DEPRECATION = r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"


class Tiny(torch.nn.Module):
    """Smallest module with the empanada model interface."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 1)

    def forward(
        self, x: torch.Tensor, render_steps: int = 2, interpolate_ins: bool = True
    ) -> Dict[str, torch.Tensor]:  # noqa: UP006
        y = self.conv(x)
        return {"sem_logits": y[:, :1], "ctr_hmp": y[:, 1:2], "offsets": y[:, 2:4]}


class Broken(torch.nn.Module):
    """Loads fine, fails when run (like a quantized file torch can no longer execute)."""

    def forward(
        self, x: torch.Tensor, render_steps: int = 2, interpolate_ins: bool = True
    ) -> Dict[str, torch.Tensor]:  # noqa: UP006
        raise RuntimeError("quantized op not supported")


def save_scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def make_config(**overrides) -> dict:
    config = {
        "class_names": {1: "mito"},
        "labels": [1],
        "thing_list": [1],
        "model": "unset.pth",
        "model_quantized": None,
        "padding_factor": 16,
        "norms": {"mean": 0.57571, "std": 0.12765},
        "description": "A test model.",
        "FINETUNE": FINETUNE,
    }
    config.update(overrides)
    return config


def write_yaml(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
