"""Carry the bundled model to a machine whose torch cannot load its TorchScript file.

The bundled ``panoptem_mito_small.pth`` was scripted by torch 2.13. Files scripted by torch
2.12 or later name ``aten::_upsample_lanczos2d_aa`` (scripted ``F.interpolate``), which
older torch lacks. A lent GPU machine ran torch 2.11. On such a machine, re-script the
model from its weights there:

    # here (any torch that loads the file): its weights, as the fused model holds them
    .venv/bin/python benchmarks/device_kit.py dump DIR/bundled_state.pt
    # there, from the repository root, with the package on PYTHONPATH
    python3 benchmarks/device_kit.py build DIR/bundled_state.pt

``build`` overwrites the bundled file in that machine's copy of the tree. Its outputs equal
the original file's (``dump`` checks the round trip here). The architecture comes from the
bundled model's training config (``custom_configs/bundled/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "src" / "panoptem" / "data" / "models" / "panoptem_mito_small.pth"
TRAINING_CONFIG = ROOT / "custom_configs" / "bundled" / "panoptem_mito_small.yaml"


def fused_model():
    """The bundled architecture, BatchNorm folded as in the exported file, in eval mode."""
    import torch

    from panoptem.models import build_model
    from panoptem.training.config import load_training_config

    model = build_model(load_training_config(TRAINING_CONFIG)["MODEL"]).eval()
    with torch.no_grad():
        model.fuse_model()
    return model


def dump(state_path: Path) -> None:
    import torch

    scripted = torch.jit.load(str(MODEL_FILE))
    state = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    model = fused_model()
    model.load_state_dict(state)
    x = torch.randn(1, 1, 256, 256)
    with torch.inference_mode():
        want, got = scripted(x, 2, False), model(x, 2, False)
    worst = max(float((want[k] - got[k]).abs().max()) for k in want)
    if worst > 1e-5:
        raise SystemExit(f"the rebuilt model differs from the file by {worst}; nothing written")
    torch.save(state, state_path)
    print(f"wrote {state_path} ({len(state)} tensors); rebuilt outputs differ by {worst}")


def build(state_path: Path) -> None:
    import torch

    from panoptem.models import export_torchscript

    model = fused_model()
    model.load_state_dict(torch.load(state_path, weights_only=True))
    export_torchscript(model, MODEL_FILE, fuse=False)
    print(f"re-scripted {MODEL_FILE} with torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["dump", "build"])
    ap.add_argument("state", type=Path, help="the weights file (.pt) to write or read")
    args = ap.parse_args()
    (dump if args.what == "dump" else build)(args.state)


if __name__ == "__main__":
    main()
