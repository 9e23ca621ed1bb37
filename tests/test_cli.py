"""The command line: models, segment and demo, with one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from panoptem.cli import main
from testutils import model_config


@pytest.fixture
def registered(small_model_file, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    yaml.safe_dump(model_config("x.pth"), cfg.open("w"))
    assert main(["models", "register", "CliSmall", str(cfg), "--model", str(small_model_file)]) == 0
    return "CliSmall"


def test_models_list_and_info(capsys, registered):
    capsys.readouterr()
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    # MitoNet_v1 first, the original's built-ins, the bundled model, then user models
    assert names == ["MitoNet_v1", "MitoNet_v1_mini", "NucleoNet_base_v2", "DropNet_base_v1",
                     "panoptem_mito_small", "CliSmall"]
    assert main(["models", "info", "MitoNet_v1"]) == 0
    out = capsys.readouterr().out
    assert "16" in out and "mito" in out


def test_segment_png_to_tif(tmp_path, registered, lucchi_image, capsys):
    src = tmp_path / "img.png"
    Image.fromarray(lucchi_image[:256, :256]).save(src)
    out = tmp_path / "out" / "labels.tif"
    rc = main(
        [
            "segment",
            str(src),
            "-o",
            str(out),
            "--model",
            registered,
            "--quiet",
            "--confidence-thr",
            "0.3",
            "--tile-size",
            "128",
        ]
    )
    assert rc == 0
    labels = tifffile.imread(out)
    assert labels.shape == (256, 256) and labels.dtype in (np.uint8, np.uint16, np.int32)
    assert "labels in" in capsys.readouterr().out


def test_segment_stack_and_folder(tmp_path, registered, lucchi_image):
    stack = np.stack([lucchi_image[:128, :128], lucchi_image[128:256, :128]])
    np.save(tmp_path / "stack.npy", stack)
    out = tmp_path / "stack.tif"
    assert (
        main(
            [
                "segment",
                str(tmp_path / "stack.npy"),
                "-o",
                str(out),
                "--model",
                registered,
                "--quiet",
            ]
        )
        == 0
    )
    assert tifffile.imread(out).shape == (2, 128, 128)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"s{i}.tif", stack[i])
    (folder / "notes.txt").write_text("not an image")
    assert (
        main(
            ["segment", str(folder), "-o", str(tmp_path / "res"), "--model", registered, "--quiet"]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "s0_labels.tif",
        "s1_labels.tif",
    ]


@pytest.mark.parametrize(
    "argv_tail,match",
    [
        (["--model", "NoSuchModel"], "NoSuchModel"),
        (["--max-objects", "1"], "Max objects"),
    ],
)
def test_segment_errors_are_one_line(tmp_path, capsys, lucchi_image, argv_tail, match):
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, lucchi_image[:64, :64])
    rc = main(["segment", str(src), "-o", str(tmp_path / "o.tif"), *argv_tail])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("panoptem: error:") and match in err
    assert len(err.splitlines()) == 1


def test_segment_rgb_and_missing_file(tmp_path, capsys, registered):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(rgb)
    assert main(["segment", str(rgb), "-o", str(tmp_path / "o.tif"), "--model", registered]) == 2
    assert "RGB" in capsys.readouterr().err
    assert (
        main(
            [
                "segment",
                str(tmp_path / "nope.tif"),
                "-o",
                str(tmp_path / "o.tif"),
                "--model",
                registered,
            ]
        )
        == 2
    )
    assert "No such file" in capsys.readouterr().err


def test_demo_writes_labels_and_picture(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    labels = tifffile.imread(tmp_path / "demo" / "labels.tif")
    assert labels.shape == (512, 512)
    picture = np.asarray(Image.open(tmp_path / "demo" / "overlay.png"))
    assert picture.shape == (512, 512, 3)
    assert "objects in" in capsys.readouterr().out


@pytest.fixture
def em_volume_tif(tmp_path, em_volume):
    vol = em_volume[:6, :64, :80]
    out = tmp_path / "vol.tif"
    tifffile.imwrite(out, vol)
    return out


def test_segment3d_tif_and_zarr(tmp_path, registered, em_volume_tif, capsys):
    out = tmp_path / "seg.tif"
    assert (
        main(
            [
                "segment3d",
                str(em_volume_tif),
                "-o",
                str(out),
                "--model",
                registered,
                "--quiet",
                "--min-size",
                "20",
                "--return-stacks",
            ]
        )
        == 0
    )
    assert tifffile.imread(tmp_path / "seg_mito.tif").shape == (6, 64, 80)
    assert tifffile.imread(tmp_path / "seg_panoptic_xy.tif").shape == (6, 64, 80)
    zout = tmp_path / "seg.zarr"
    assert (
        main(
            [
                "segment3d",
                str(em_volume_tif),
                "-o",
                str(zout),
                "--model",
                registered,
                "--quiet",
                "--min-size",
                "20",
                "--chunk-size",
                "2,32,32",
            ]
        )
        == 0
    )
    import zarr

    arr = zarr.open_array(str(zout / "mito"), mode="r")
    assert arr.chunks == (2, 32, 32)
    np.testing.assert_array_equal(arr[:] > 0, tifffile.imread(tmp_path / "seg_mito.tif") > 0)
    assert "done in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--chunk-size", "a,b"], "Chunk size"),
        (["--vote-thr", "5"], "Voxel Vote Thr"),
    ],
)
def test_segment3d_bad_options(tmp_path, em_volume_tif, capsys, extra, match):
    rc = main(["segment3d", str(em_volume_tif), "-o", str(tmp_path / "o.zarr"), *extra])
    assert rc == 2 and match in capsys.readouterr().err


def test_segment3d_refuses_2d_image(tmp_path, registered, lucchi_image, capsys):
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, lucchi_image[:64, :64])
    assert main(["segment3d", str(src), "-o", str(tmp_path / "o.tif"), "--model", registered]) == 2
    assert "takes a volume" in capsys.readouterr().err


def test_evaluate_command(tmp_path, capsys):
    gt = np.zeros((40, 40), np.uint8)
    gt[5:15, 5:15] = 255
    gt[25:35, 25:35] = 255
    pred = np.zeros((40, 40), np.int32)
    pred[5:15, 5:15] = 10001
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    assert main(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.tif"), "--json"]) == 0
    import json

    out = capsys.readouterr()
    m = json.loads(out.out)
    assert m["tp"] == 1 and m["fn"] == 1 and m["f1"] == pytest.approx(2 / 3)
    assert "evaluating" in out.err  # the text progress bar goes to stderr, not into the JSON
    stack = np.stack([pred, pred, np.zeros_like(pred)])
    tifffile.imwrite(tmp_path / "pred3.tif", stack)
    tifffile.imwrite(tmp_path / "gt3.tif", np.stack([gt, gt, gt]))
    args = ["evaluate", str(tmp_path / "pred3.tif"), str(tmp_path / "gt3.tif"), "--per-slice"]
    assert main([*args, "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["tp"] == 2 and "evaluating" not in out.err
    assert main(args) == 0 and "evaluating slices" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "nope.tif")]) == 2
