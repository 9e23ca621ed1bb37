"""The training loop: loss goes down, frozen stages stay frozen, cancel, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from panoptem.errors import Cancelled, PanoptemError
from panoptem.models import build_model
from panoptem.progress import Progress
from panoptem.training.loop import save_checkpoint, set_trainable, train
from panoptem.training.losses import PanopticLoss
from testutils import SMALL_ARCH


class DiskSet(torch.utils.data.Dataset):
    """Dark disks on a bright background with exact targets (64 x 64)."""

    def __init__(self, n=6, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        yy, xx = np.indices((64, 64))
        for _ in range(n):
            img = np.full((64, 64), 0.8, np.float32)
            sem = np.zeros((64, 64), np.float32)
            hmp = np.zeros((64, 64), np.float32)
            off = np.zeros((2, 64, 64), np.float32)
            for _ in range(2):
                cy, cx = rng.integers(14, 50, size=2)
                d = (yy - cy) ** 2 + (xx - cx) ** 2
                inside = d <= 64
                img[inside], sem[inside] = 0.2, 1.0
                hmp = np.maximum(hmp, np.exp(-d / 72.0))
                off[0][inside], off[1][inside] = (cy - yy)[inside], (cx - xx)[inside]
            self.items.append(
                {
                    "image": torch.from_numpy((img - 0.5) / 0.2)[None],
                    "sem": torch.from_numpy(sem)[None],
                    "ctr_hmp": torch.from_numpy(hmp)[None],
                    "offsets": torch.from_numpy(off),
                }
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def batch_loss(model, ds):
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)  # PointRend samples points at random in train mode
    model.train()
    with torch.no_grad():
        return PanopticLoss()(model(batch["image"]), batch)[0].item()


def test_few_iterations_lower_the_loss():
    torch.manual_seed(0)
    model = build_model(SMALL_ARCH)
    ds = DiskSet()
    before = batch_loss(model, ds)
    res = train(model, ds, iterations=25, batch_size=4, max_lr=0.003, seed=1)
    assert len(res.losses) == 25
    assert batch_loss(model, ds) < 0.7 * before


def test_stage4_trains_only_layer4_decoders_and_heads():
    torch.manual_seed(0)
    model = build_model(SMALL_ARCH)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    train(model, DiskSet(2), iterations=2, batch_size=2, finetune_layer="stage4")
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    enc = {k for k in changed if k.startswith("encoder.")}
    assert enc and all(k.startswith("encoder.layer4.") for k in enc)
    assert any(k.startswith("semantic_decoder.") or "decoder" in k for k in changed)
    assert any(k.startswith("semantic_head.") for k in changed)
    # none freezes the whole encoder, all opens it, stage1 opens layer1..4 but not the stem
    assert not any(n.startswith("encoder.") for n in set_trainable(model, "none"))
    assert any(n.startswith("encoder.conv1") for n in set_trainable(model, "all"))
    s1 = set_trainable(model, "stage1")
    assert any(n.startswith("encoder.layer1.") for n in s1) and not any(
        n.startswith("encoder.conv1") for n in s1
    )


def test_evaluate_checkpoint_and_cancel(tmp_path):
    torch.manual_seed(0)
    model = build_model(SMALL_ARCH)
    seen = []
    res = train(
        model,
        DiskSet(2),
        iterations=4,
        batch_size=2,
        evaluate=lambda m: {"ok": not m.training},
        eval_every=2,
        checkpoint=lambda m, it: seen.append(it),
        save_every=3,
    )
    assert [e["iteration"] for e in res.evaluations] == [2, 4] and all(
        e["ok"] for e in res.evaluations
    )
    assert seen == [3, 4]
    path = save_checkpoint(
        tmp_path / "m_checkpoint.pth.tar", model, SMALL_ARCH, {"mean": 0.5, "std": 0.2}, 4
    )
    state = torch.load(path, weights_only=False)
    fresh = build_model(state["config"])
    fresh.load_state_dict(state["state_dict"])

    class StopAtTwo(Progress):
        def on_advance(self, done, total):
            if done == 2:
                self.cancel()

    with pytest.raises(Cancelled):
        train(model, DiskSet(2), iterations=10, batch_size=2, progress=StopAtTwo())


def test_bad_training_input():
    model = build_model(SMALL_ARCH)
    with pytest.raises(PanoptemError, match="Finetunable layers"):
        train(model, DiskSet(2), iterations=2, finetune_layer="stage5")
    with pytest.raises(PanoptemError, match="Iterations"):
        train(model, DiskSet(2), iterations=0)
