"""Writes the real EM crops the tests use, from the project's shared data folder.

Run once from the repository root, with the folder of the project's shared EM data
(``python tests/data/em/make_test_data.py <data folder>``); the tests read only the files it
wrote (see SOURCE.md here). Every crop is a plain
sub-array of a source file: nothing is resampled, filtered or relabelled.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

HERE = Path(__file__).resolve().parent


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def save_png(array: np.ndarray, name: str) -> None:
    Image.fromarray(np.ascontiguousarray(array)).save(HERE / name, optimize=True)


def main(shared: Path) -> None:
    lucchi, cdeep = shared / "lucchi_pp", shared / "cdeep3m_sbem_mito" / "train"
    # Lucchi++ test slice 0, whole (768 x 1024), and its mask (the source file as it is: RGBA)
    save_png(png(lucchi / "test" / "Test_In" / "mask0000.png"), "lucchi_test_0000.png")
    shutil.copy(lucchi / "test" / "Test_Out" / "0.png", HERE / "lucchi_test_0000_mask.png")
    # a 64 x 128 x 128 corner of the derived Lucchi++ test volume (z 0-63, y 0-127, x 192-319)
    vol = tifffile.imread(lucchi / "volume3d" / "test_image_z0-63_y0-255_x192-447.tif")
    tifffile.imwrite(HERE / "lucchi_volume_z0-63_y0-127_x192-319.tif", vol[:, :128, :128],
                     compression="zlib")
    # three 128 x 128 crops of Lucchi++ train slices (rows 300-427, cols 400-527) + masks
    for n in (0, 40, 80):
        img = png(lucchi / "train" / "Train_In" / f"mask{n:04d}.png")[300:428, 400:528]
        mask = png(lucchi / "train" / "Train_Out" / f"{n}.png")[300:428, 400:528]
        save_png(img, f"lucchi_train_{n:04d}_y300_x400.png")
        save_png(mask, f"lucchi_train_{n:04d}_y300_x400_mask.png")
    # two 512 x 512 crops of CDeep3M SBEM train slices (rows 0-511, cols 0-511) + masks
    for n in ("010", "012"):
        img = png(cdeep / "images" / f"images.{n}.png")[:512, :512]
        mask = png(cdeep / "labels" / f"mitos_3D.{n}.png")[:512, :512]
        save_png(img, f"cdeep3m_train_{n}_y0_x0.png")
        save_png(mask.astype(np.uint8), f"cdeep3m_train_{n}_y0_x0_mask.png")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_test_data.py <folder holding lucchi_pp/ and cdeep3m_sbem_mito/>")
    main(Path(sys.argv[1]))
