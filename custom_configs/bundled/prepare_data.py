"""Arrange the bundled model's training data in panoptem's dataset layout.

Usage: python custom_configs/bundled/prepare_data.py SHARED_DATA OUT_DIR

SHARED_DATA is the folder holding ``lucchi_pp/`` and ``cdeep3m_sbem_mito/`` (see their
SOURCE.md). OUT_DIR gets symbolic links (nothing is copied or converted):

    OUT_DIR/train/lucchi_pp/images|masks/lucchi_NNNN.png      Lucchi++ train slices
    OUT_DIR/train/cdeep3m_sbem/images|masks/cdeep3m_NNN.png    CDeep3M SBEM train slices
    OUT_DIR/val/lucchi_pp/images|masks/lucchi_NNNN.png         Lucchi++ train slices >= 148

The validation set is the last five Lucchi++ *train* slices (148..164), held out from
training; nothing under ``test/`` or ``volume3d/`` is used.
"""

import re
import sys
from pathlib import Path

VAL_FROM = 148


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def main(shared: Path, out: Path) -> None:
    lucchi = shared / "lucchi_pp" / "train"
    n_lucchi = 0
    for img in sorted((lucchi / "Train_In").glob("mask*.png")):
        index = int(re.fullmatch(r"mask(\d+)\.png", img.name).group(1))
        split = "val" if index >= VAL_FROM else "train"
        name = f"lucchi_{index:04d}.png"
        link(img, out / split / "lucchi_pp" / "images" / name)
        link(lucchi / "Train_Out" / f"{index}.png", out / split / "lucchi_pp" / "masks" / name)
        n_lucchi += 1
    cdeep = shared / "cdeep3m_sbem_mito" / "train"
    n_cdeep = 0
    for img in sorted((cdeep / "images").glob("images.*.png")):
        index = img.name.split(".")[1]
        name = f"cdeep3m_{index}.png"
        link(img, out / "train" / "cdeep3m_sbem" / "images" / name)
        link(cdeep / "labels" / f"mitos_3D.{index}.png", out / "train" / "cdeep3m_sbem" / "masks" / name)
        n_cdeep += 1
    if not n_lucchi or not n_cdeep:
        sys.exit(f"Found {n_lucchi} Lucchi++ and {n_cdeep} CDeep3M slices under {shared}; "
                 "give the folder that holds lucchi_pp/ and cdeep3m_sbem_mito/.")
    print(f"{n_lucchi} Lucchi++ slices ({sum(1 for _ in (out / 'val').rglob('images/*.png'))} held out "
          f"for validation) and {n_cdeep} CDeep3M slices linked under {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
