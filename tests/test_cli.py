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


# ----------------------------------------------------------------------------- nothing lost
@pytest.fixture
def no_inference(monkeypatch):
    """Fails the test if a model is loaded: the refusals below come before any work."""
    from panoptem import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("command", ["segment", "segment3d"])
@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_unwritable_output_is_refused_before_any_work(
    tmp_path, registered, em_volume_tif, capsys, no_inference, command, where
):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    folder = "/proc/panoptem-test" if where == "proc" else str(blocker)
    out = f"{folder}/out.{'tif' if command == 'segment' else 'zarr'}"
    src = em_volume_tif
    if command == "segment":
        src = tmp_path / "img.tif"
        tifffile.imwrite(src, tifffile.imread(em_volume_tif)[0])
    assert main([command, str(src), "-o", out, "--model", registered, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("panoptem: error: ")
    if where == "proc":
        assert "Cannot write to the folder of the output /proc/panoptem-test" in err[0]
        assert "choose a folder you can write to" in err[0]
    else:
        assert f"{blocker} is a file, not a folder; choose a folder" in err[0]


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_existing_output_is_kept_unless_overwrite(
    tmp_path, registered, em_volume_tif, capsys, suffix
):
    out = tmp_path / f"seg{suffix}"
    args = ["segment3d", str(em_volume_tif), "-o", str(out), "--model", registered, "--quiet",
            "--min-size", "20"]
    assert main(args) == 0
    produced = out if suffix == ".zarr" else out
    stamp = produced.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert produced.stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0


def test_segment_existing_output_and_overwrite(tmp_path, registered, lucchi_image, capsys):
    src = tmp_path / "img.png"
    Image.fromarray(lucchi_image[:64, :64]).save(src)
    out = tmp_path / "labels.tif"
    out.write_bytes(b"the user's own file")
    assert main(["segment", str(src), "-o", str(out), "--model", registered, "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's own file"
    assert main(["segment", str(src), "-o", str(out), "--model", registered, "--quiet",
                 "--overwrite"]) == 0
    assert tifffile.imread(out).shape == (64, 64)


def test_written_files_get_ordinary_permissions(tmp_path, registered, lucchi_image, panoptem_home):
    """Files are written to a temporary file and renamed: the result must not keep the
    temporary file's owner-only 0o600 (colleagues on a facility server could not read it),
    and a replaced file keeps its own permissions."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    config = panoptem_home / "configs" / f"{registered}.yaml"  # written by `models register`
    assert config.stat().st_mode & 0o777 == 0o666 & ~umask
    src = tmp_path / "img.png"
    Image.fromarray(lucchi_image[:64, :64]).save(src)
    new = tmp_path / "new.tif"
    assert main(["segment", str(src), "-o", str(new), "--model", registered, "--quiet"]) == 0
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    mine = tmp_path / "mine.tif"
    mine.write_bytes(b"the user's own file")
    mine.chmod(0o640)
    assert main(["segment", str(src), "-o", str(mine), "--model", registered, "--quiet",
                 "--overwrite"]) == 0
    assert tifffile.imread(mine).shape == (64, 64)
    assert mine.stat().st_mode & 0o777 == 0o640


def test_segment3d_zarr_records_what_the_reader_needs(tmp_path, registered, em_volume_tif):
    import zarr

    out = tmp_path / "seg.zarr"
    assert main(["segment3d", str(em_volume_tif), "-o", str(out), "--model", registered,
                 "--quiet", "--min-size", "20", "--scale", "4,2,2", "--max-objects", "0"]) == 0
    info = zarr.open_group(str(out), mode="r").attrs["panoptem"]
    assert info["image"] == em_volume_tif.stem and info["scale"] == [4.0, 2.0, 2.0]
    assert info["translate"] == [0.0, 0.0, 0.0] and info["model"] == registered
    assert info["params3d"]["min_size"] == 20 and info["params3d"]["max_objects"] == 0
    assert info["params2d"]["confidence_thr"] == 0.5


def test_cli_defaults_are_the_dataclass_defaults():
    from dataclasses import asdict

    from panoptem._params import param_info
    from panoptem.cli import build_parser
    from panoptem.inference.engine import Params2D
    from panoptem.inference.volume import Params3D

    args = vars(build_parser().parse_args(["segment", "x.tif", "-o", "y.tif"]))
    assert {k: args[k] for k in asdict(Params2D())} == asdict(Params2D())
    args3 = vars(build_parser().parse_args(["segment3d", "x.tif", "-o", "y.zarr"]))
    assert {k: args3[k] for k in asdict(Params3D())} == asdict(Params3D())
    for name in ("downsampling", "confidence_thr", "center_confidence_thr", "min_distance"):
        assert args3[name] == getattr(Params2D(), name)
    helps = build_parser()._subparsers._group_actions[0].choices["segment"].format_help()
    for name in asdict(Params2D()):
        assert param_info(Params2D, name).label in " ".join(helps.split())


@pytest.mark.parametrize("command", ["finetune", "train", "export"])
def test_unwritable_model_folder_is_refused_before_any_work(tmp_path, capsys, command):
    """The folder for the new model is checked first: nothing is trained or loaded for an
    output that could not be saved."""
    from pathlib import Path

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = str(blocker / "models")
    config = Path(__file__).resolve().parents[1] / "custom_configs" / "custom_training_pdl.yaml"
    args = {
        "finetune": ["finetune", str(tmp_path / "no_dataset"), "--model-dir", target],
        "train": ["train", "--config", str(config), "--train-dir", str(tmp_path / "no_dataset"),
                  "-o", target, "--name", "X", "--iterations", "1"],
        "export": ["export", str(tmp_path / "no_checkpoint.pth.tar"), "-o", target],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"panoptem: error: Cannot write to the model folder {blocker / 'models'} "
                   "(Not a directory); choose a folder you can write to."], err


# -- label tools: count, filter, tiles ----------------------------------------------------
def _labels_tif(tmp_path, name="mito.tif", three_d=False):
    from testutils import mito_instances_2d, mito_instances_3d

    labels = mito_instances_3d() if three_d else mito_instances_2d()
    path = tmp_path / name
    tifffile.imwrite(path, labels)
    return path, labels


def test_count_command_prints_per_class_and_writes_csv(tmp_path, capsys):
    import csv

    path, labels = _labels_tif(tmp_path)
    panoptic = np.where(labels > 0, labels + np.where(labels % 2, 1000, 2000), 0).astype(np.uint32)
    tifffile.imwrite(path, panoptic)
    out = tmp_path / "counts.csv"
    assert main(["count", str(path), "--label-divisor", "1000", "--names", "1,mito;2,other", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    odd = int(np.sum(np.unique(labels[labels > 0]) % 2 == 1))
    assert f"class 1 (mito): {odd} labels" in text and "class 2 (other)" in text
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    ids, counts = np.unique(panoptic[panoptic > 0], return_counts=True)
    assert [int(r["label_id"]) for r in rows] == ids.tolist()
    assert [int(r["voxels"]) for r in rows] == counts.tolist()
    # an existing CSV is refused before any work
    assert main(["count", str(path), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_filter_command_small_and_border(tmp_path, capsys):
    from scipy import ndimage as ndi
    from skimage.segmentation import clear_border

    path, labels = _labels_tif(tmp_path, three_d=True)
    out = tmp_path / "kept.tif"
    assert main(["filter", str(path), "-o", str(out), "--min-area", "500"]) == 0
    sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, labels.max() + 1))
    small = np.arange(1, labels.max() + 1)[sizes <= 500]
    assert np.array_equal(tifffile.imread(out), np.where(np.isin(labels, small), 0, labels))
    assert f"removed {len(small)} labels" in capsys.readouterr().out
    out2 = tmp_path / "inner.tif"
    assert main(["filter", str(path), "-o", str(out2), "--border", "--per-plane"]) == 0
    assert np.array_equal(tifffile.imread(out2), np.stack([clear_border(p) for p in labels]))
    assert main(["filter", str(path), "-o", str(out2), "--border"]) == 2  # exists: refused


def test_tiles_commands_round_trip(tmp_path, capsys):
    from testutils import em_png, mito_instances_2d

    image = np.tile(em_png("cdeep3m_train_010_y0_x0.png"), (2, 3))[:1000, :1300]
    mask = np.tile(mito_instances_2d(), (2, 3))[:1000, :1300]
    tifffile.imwrite(tmp_path / "big.tif", image)
    tifffile.imwrite(tmp_path / "big_mask.tif", mask)
    tiles = tmp_path / "tiles"
    assert main(["tiles", "create", str(tmp_path / "big.tif"), str(tiles), "--mask",
                 str(tmp_path / "big_mask.tif"), "--tile-size", "384", "--quiet"]) == 0
    assert len(list((tiles / "im").glob("*.tif"))) == 3 * 4
    assert main(["tiles", "merge", str(tiles), str(tmp_path / "merged"), "--quiet"]) == 0
    im, msk = tifffile.imread(tmp_path / "merged" / "im.tif"), tifffile.imread(tmp_path / "merged" / "msk.tif")
    assert im.dtype == image.dtype and np.array_equal(im, image)
    assert msk.dtype == mask.dtype and np.array_equal(msk, mask)
    # tiles are never written over
    assert main(["tiles", "create", str(tmp_path / "big.tif"), str(tiles), "--quiet"]) == 2
    assert "panoptem: error" in capsys.readouterr().err


def test_segment3d_bfloat16_and_its_refusals(tmp_path, registered, em_volume_tif, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    outs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / f"{precision}.tif"
        assert main(["segment3d", str(em_volume_tif), "-o", str(out), "--model", registered,
                     "--quiet", "--min-size", "20", "--precision", precision]) == 0
        outs[precision] = tifffile.imread(out)
    assert outs["bfloat16"].shape == (6, 64, 80)
    fg32, fg16 = outs["float32"] > 0, outs["bfloat16"] > 0
    assert fg32.any() and (fg32 & fg16).sum() / (fg32 | fg16).sum() > 0.9
    capsys.readouterr()
    for extra, match in [(["--quantized"], "either the quantized"),
                         (["--blocks"], "one device only: drop --blocks"),
                         (["--devices", "cpu,cpu"], "one device only: drop --devices")]:
        out = tmp_path / ("o.zarr" if "--blocks" in extra else "o.tif")
        rc = main(["segment3d", str(em_volume_tif), "-o", str(out), "--model", registered,
                   "--precision", "bfloat16", *extra])
        assert rc == 2 and match in capsys.readouterr().err, extra
        assert not out.exists()


# -- bad input to the label tools, the demo and the block options --------------------------
@pytest.mark.parametrize("case, match", [
    ("rgb", "looks like an RGB(A) picture"), ("4d", "give a 2D label image"),
    ("float", "non-integer values"), ("empty", "is empty"), ("negative", "negative values"),
])
def test_count_and_filter_refuse_what_is_no_label_image(tmp_path, capsys, case, match):
    rng = np.random.default_rng(0)
    arrays = {"rgb": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
              "4d": rng.integers(0, 5, (2, 3, 16, 16), dtype=np.uint8),
              "float": np.full((16, 16), 0.5, np.float32), "empty": np.zeros((0, 16), np.uint8),
              "negative": np.where(rng.random((16, 16)) > 0.5, -1, 3).astype(np.int16)}
    path = tmp_path / f"{case}.tif"
    tifffile.imwrite(path, arrays[case], photometric="minisblack" if case == "4d" else None)
    for cmd in (["count", str(path)], ["filter", str(path), "-o", str(tmp_path / "f.tif")]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert err.startswith("panoptem: error:") and match in err, err
    assert not (tmp_path / "f.tif").exists()


def test_label_tools_refuse_a_folder_the_input_or_a_non_csv_as_output(tmp_path, capsys):
    path, labels = _labels_tif(tmp_path)
    (tmp_path / "d.tif").mkdir()
    (tmp_path / "d.csv").mkdir()
    for cmd, match in [(["filter", str(path), "-o", str(tmp_path / "d.tif"), "--overwrite"], "is a folder"),
                       (["count", str(path), "-o", str(tmp_path / "d.csv"), "--overwrite"], "is a folder"),
                       (["filter", str(path), "-o", str(path), "--overwrite"], "is the input itself"),
                       (["count", str(path), "-o", str(path), "--overwrite"], "ending in .csv")]:
        assert main(cmd) == 2, cmd
        assert match in capsys.readouterr().err, cmd
    assert np.array_equal(tifffile.imread(path), labels)  # the input is untouched


def test_float_labels_of_whole_numbers_are_counted(tmp_path, capsys):
    path, labels = _labels_tif(tmp_path)
    tifffile.imwrite(path, labels.astype(np.float32))
    assert main(["count", str(path)]) == 0
    assert f"class 1 (-): {len(np.unique(labels[labels > 0]))} labels" in capsys.readouterr().out


def test_demo_refuses_to_replace_earlier_results_and_bad_folders(tmp_path, capsys, lucchi_image):
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, lucchi_image[:128, :128])
    out = tmp_path / "demo"
    out.mkdir()
    (out / "labels.tif").write_bytes(b"the user's own file")
    assert main(["demo", "-o", str(out), "--image", str(img)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "labels.tif").read_bytes() == b"the user's own file"
    assert not (out / "overlay.png").exists()
    assert main(["demo", "-o", str(out), "--image", str(img), "--overwrite"]) == 0
    assert tifffile.imread(out / "labels.tif").shape == (128, 128)
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "-o", str(tmp_path / "afile"), "--image", str(img)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"not a tif")
    assert main(["demo", "-o", str(tmp_path / "demo2"), "--image", str(corrupt)]) == 2
    assert not (tmp_path / "demo2").exists()  # refused before the folder was made


@pytest.mark.parametrize("option, match", [
    (["--threads-per-worker", "0"], "at least 1 thread per worker"),
    (["--threads-per-worker", "-2"], "at least 1 thread per worker"),
    (["--memory-limit", "lots"], "is no size"),
    (["--scheduler", "notaurl"], "give it as tcp://host:8786"),
])
def test_block_options_dask_would_refuse_are_refused_first(tmp_path, capsys, em_volume_tif, registered,
                                                           option, match):
    out = tmp_path / "b.zarr"
    assert main(["segment3d", str(em_volume_tif), "-o", str(out), "--model", registered, "--quiet",
                 "--blocks", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("panoptem: error:") and match in err, err
    assert not out.exists()


def test_level_of_a_single_level_volume_is_refused(tmp_path, capsys, em_volume_tif, registered):
    out = tmp_path / "l.zarr"
    assert main(["segment3d", str(em_volume_tif), "-o", str(out), "--model", registered, "--quiet",
                 "--level", "3"]) == 2
    assert "leave --level out" in capsys.readouterr().err
    assert not out.exists()
