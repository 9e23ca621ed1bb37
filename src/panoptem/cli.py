"""The ``panoptem`` command line: models, 2D and 3D segmentation, and the demo.

Every user error prints one line starting with ``panoptem: error:`` and exits with status 2;
a cancelled run (Ctrl-C) exits with 130.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from panoptem.errors import Cancelled, PanoptemError

__all__ = ["main", "build_parser"]


#: The 2D fields each command offers (3D inference takes its label divisor from Params3D).
_FIELDS_2D = ("downsampling", "confidence_thr", "center_confidence_thr", "min_distance",
              "fine_boundaries", "semantic_only", "fill_holes", "max_objects", "tile_size")
_FIELDS_2D_IN_3D = _FIELDS_2D[:6]


def _add_param_options(group, cls, names) -> None:
    """One option per dataclass field, with its default, choices and the widget's label."""
    from panoptem._params import param_info

    for name in names:
        info = param_info(cls, name)
        flag = "--" + name.replace("_", "-")
        text = info.label + (f": {info.help}" if info.help else "")
        if isinstance(info.default, bool):
            group.add_argument(flag, dest=name, action="store_true", help=text)
        else:
            group.add_argument(flag, dest=name, type=type(info.default), default=info.default,
                               choices=info.choices, help=f"{text} (default %(default)s)")


def _add_2d_options(p: argparse.ArgumentParser, three_d: bool = False) -> None:
    from panoptem.inference.engine import Params2D

    g = p.add_argument_group("2D parameters (as in the 2D Inference widget)")
    _add_param_options(g, Params2D, _FIELDS_2D_IN_3D if three_d else _FIELDS_2D)


def _add_3d_options(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from panoptem.inference.volume import Params3D

    g = p.add_argument_group("3D parameters (as in the 3D Inference widget)")
    _add_param_options(g, Params3D, [f.name for f in fields(Params3D)])
    g.add_argument("--scale", type=_scale, default=(1.0, 1.0, 1.0), metavar="Z,Y,X",
                   help="voxel size of the volume, recorded in a .zarr output so napari shows "
                        "the layers at that scale (default 1,1,1)")


def _add_block_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "block-wise on dask.distributed (volumes bigger than one machine; see docs/big-volumes.md)")
    g.add_argument("--blocks", action="store_true",
                   help="cut the volume into overlapping blocks run as dask tasks and stitch them; "
                        "the output is OME-Zarr; a killed run started again resumes")
    g.add_argument("--block-size", metavar="Z,Y,X", help="block size in voxels (default 32,1024,1024 "
                   "for an xy stack, 192,384,384 for the other planes and ortho-plane)")
    g.add_argument("--overlap", metavar="Z,Y,X", help="margin around each block in voxels (default "
                   "from the model's padding factor, the median filter, erode and dilate)")
    g.add_argument("--mask", help="foreground mask volume at any resolution (zarr, OME-Zarr, tif, "
                   "npy): blocks without foreground are skipped")
    g.add_argument("--workers", type=int, help="worker processes of the local cluster (default: "
                   "one per GPU with --device cuda, else 1)")
    g.add_argument("--threads-per-worker", type=int, default=1,
                   help="blocks each worker runs at once (default %(default)s)")
    g.add_argument("--memory-limit", help="memory limit per worker of the local cluster, e.g. 8GiB "
                   "(default: dask's 'auto')")
    g.add_argument("--scheduler", help="address of a running dask scheduler (tcp://host:8786) "
                   "instead of a local cluster")


def _scale(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"give three positive numbers z,y,x (got '{text}')")
    return values


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--quantized", action="store_true",
                   help="use the model's int8 version on CPU when it has one")


def _add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 runs the float model under autocast: faster for 3D on CPUs "
                        "with AVX-512 BF16 or AMX, with results that agree closely but not "
                        "exactly (default %(default)s; not with --quantized)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="panoptem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list, inspect and register models")
    msub = models.add_subparsers(dest="models_command")
    msub.add_parser("list", help="list the available models (the default)")
    info = msub.add_parser("info", help="describe one model")
    info.add_argument("name")
    reg = msub.add_parser("register", help="register a model from a config .yaml")
    reg.add_argument("name", help="name to register it under")
    reg.add_argument("config", help="model config .yaml (empanada format)")
    reg.add_argument("--model", dest="model_file", help="TorchScript .pth file or URL")
    reg.add_argument("--quantized-model", help="quantized TorchScript .pth file or URL")

    mexp = msub.add_parser("export", help="write a registered model into one .empanada archive file")
    mexp.add_argument("name", help="model to export")
    mexp.add_argument("output", help="archive file (.empanada) or folder")
    mexp.add_argument("--overwrite", action="store_true", help="replace an existing archive file")
    mimp = msub.add_parser("import", help="register the model inside a .empanada archive")
    mimp.add_argument("archive", help="the .empanada file (panoptem's or the original's)")
    mimp.add_argument("--name", help="name to register under (default: the archive's)")
    march = msub.add_parser("archive", help="move a user model out of the list into <home>/archived/")
    march.add_argument("name", help="user-registered model to archive")

    seg = sub.add_parser("segment", help="segment 2D images (a file, a stack or a folder)")
    seg.add_argument("image", help="a .tif/.png/.jpg/.npy image, a (N, H, W) stack, or a folder of images")
    seg.add_argument("-o", "--output", required=True,
                     help="output .tif (or a folder when IMAGE is a folder)")
    seg.add_argument("--model", default="MitoNet_v1", help="registered model name (default %(default)s)")
    seg.add_argument("--roi", help="mask image of the same size: only pixels inside it are segmented")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace output files that exist (otherwise refused before any work)")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_2d_options(seg)
    _add_device_options(seg)
    _add_precision_option(seg)

    seg3 = sub.add_parser("segment3d", help="segment a 3D volume (stack or ortho-plane)")
    seg3.add_argument("volume", help="a (Z, Y, X) .tif, .npy or .zarr volume (zarr and npy are read lazily)")
    seg3.add_argument("-o", "--output", required=True,
                      help="OUT.zarr (written chunk by chunk) or OUT.tif (one file per class)")
    seg3.add_argument("--model", default="MitoNet_v1", help="registered model name (default %(default)s)")
    seg3.add_argument("--overwrite", action="store_true",
                      help="replace an output that exists (otherwise refused before any work)")
    seg3.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_2d_options(seg3, three_d=True)
    _add_3d_options(seg3)
    _add_device_options(seg3)
    _add_precision_option(seg3)
    seg3.add_argument("--devices", help="several devices, comma separated (e.g. cuda:0,cuda:1 or "
                      "cpu,cpu): one process each, slices split between them")
    seg3.add_argument("--level", type=int, default=0,
                      help="pyramid level of an OME-Zarr input (default 0, full resolution)")
    _add_block_options(seg3)

    ev = sub.add_parser("evaluate", help="compare a segmentation with ground truth (IoU, F1@0.5, PQ)")
    ev.add_argument("pred", help="predicted labels (.tif/.png/.npy)")
    ev.add_argument("gt", help="ground truth: instance labels or a binary mask (objects = connected components)")
    ev.add_argument("--per-slice", action="store_true", help="a (N, H, W) stack of 2D images, not a volume")
    ev.add_argument("--iou-thr", type=float, default=0.5, help="IoU for a match (default %(default)s)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    ft = sub.add_parser("finetune", help="finetune a registered model on a dataset folder")
    ft.add_argument("train_dir", help="dataset folder: <dir>/<source>/images|masks/<same name>")
    ft.add_argument("--eval-dir", help="validation folder, same layout: IoU, F1@0.5 and PQ are "
                    "reported (at the end, or every --eval-every iterations)")
    ft.add_argument("--eval-every", type=int, default=0, help="iterations between validations "
                    "(default: at the end only)")
    ft.add_argument("--model", default="MitoNet_v1", help="model to finetune (default %(default)s)")
    ft.add_argument("--name", default="FinetunedModel", help="name of the new model (default %(default)s)")
    ft.add_argument("--model-dir", required=True, help="folder for the new .pth and .yaml")
    ft.add_argument("--iterations", type=int, default=100, help="Iterations (default %(default)s)")
    ft.add_argument("--patch-size", type=int, default=256, help="Patch size (default %(default)s)")
    ft.add_argument("--batch-size", type=int, default=16, help="batch size (default %(default)s)")
    ft.add_argument("--finetune-layer", default="none",
                    choices=["none", "stage4", "stage3", "stage2", "stage1", "all"],
                    help="Finetunable layers (default %(default)s)")
    ft.add_argument("--config", help="custom finetuning YAML (augmentations, schedule; see "
                    "custom_configs/custom_finetuning.yaml)")
    ft.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    ft.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")

    tr = sub.add_parser("train", help="train a model from scratch from a training config")
    tr.add_argument("--config", required=True,
                    help="training YAML (see custom_configs/custom_training_pdl.yaml)")
    tr.add_argument("--train-dir", help="dataset folder <dir>/<source>/images|masks (else TRAIN.train_dir)")
    tr.add_argument("--eval-dir", help="validation folder, same layout (else EVAL.eval_dir)")
    tr.add_argument("-o", "--model-dir", help="folder for the new .pth and .yaml (else TRAIN.model_dir)")
    tr.add_argument("--name", help="name of the new model (else model_name)")
    tr.add_argument("--dataset-labels", help="the classes, one per line or separated by ';': "
                    "id,name,instance|semantic (e.g. '1,mito,instance;2,er,semantic'), or a text "
                    "file holding them; one class trains a SingleClassInstanceDataset, several a "
                    "PanopticDataset (else the config's DATASET section)")
    tr.add_argument("--label-divisor", type=int, help="several classes: masks hold class * "
                    "divisor + k (else DATASET.label_divisor, 1000)")
    tr.add_argument("--iterations", type=int, help="training iterations (else TRAIN.iterations)")
    tr.add_argument("--patch-size", type=int, help="patch size (else TRAIN.patch_size, 256)")
    tr.add_argument("--batch-size", type=int, help="batch size (else TRAIN.batch_size)")
    tr.add_argument("--quantize", action="store_true", help="also write the int8 CPU model")
    tr.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    tr.add_argument("--log", help="JSON-lines file for the loss and validation metrics")
    tr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    exp = sub.add_parser("export", help="export a training checkpoint as a registered TorchScript model")
    exp.add_argument("checkpoint", help="<name>_checkpoint.pth.tar written by panoptem train")
    exp.add_argument("-o", "--model-dir", required=True, help="folder for the .pth and .yaml")
    exp.add_argument("--name", help="model name (default: the training config's model_name)")
    exp.add_argument("--quantize", action="store_true", help="also write the int8 CPU model")
    exp.add_argument("--calibration-dir", help="training images (dataset layout) to calibrate int8 on")

    qz = sub.add_parser("quantize", help="add an int8 CPU version to a registered model")
    qz.add_argument("name", help="user-registered model")
    qz.add_argument("--calibration-dir", required=True, help="training images (dataset layout)")
    src = qz.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="the model's training checkpoint (.pth.tar)")
    src.add_argument("--arch-config", help="training config that built the model (its MODEL section); "
                     "the weights are read from the registered TorchScript file")

    cnt = sub.add_parser("count", help="count labels per class (Count Labels), optionally as CSV")
    cnt.add_argument("labels", help="labels (.tif/.png/.npy)")
    cnt.add_argument("--label-divisor", type=int, help="class = label // divisor (default: one class)")
    cnt.add_argument("--per-plane", action="store_true", help="count each plane of a stack on its own")
    cnt.add_argument("--names", default="", help="class names as 'id,name' pairs, ';'-separated "
                     "(e.g. '1,mito;2,nucleus')")
    cnt.add_argument("-o", "--output", help="also write one row per label to this .csv")
    cnt.add_argument("--overwrite", action="store_true", help="replace an existing output")

    flt = sub.add_parser("filter", help="remove small or border-touching labels (Filter Labels)")
    flt.add_argument("labels", help="labels (.tif/.png/.npy), 2D or a 3D stack")
    flt.add_argument("-o", "--output", required=True, help="the filtered labels (.tif)")
    how = flt.add_mutually_exclusive_group()
    how.add_argument("--min-area", type=int, default=100,
                     help="remove labels of this many pixels/voxels or fewer (default %(default)s)")
    how.add_argument("--border", action="store_true", help="remove labels touching the border instead")
    flt.add_argument("--per-plane", action="store_true", help="each plane of a stack on its own "
                     "(the widget's '2D patches')")
    flt.add_argument("--overwrite", action="store_true", help="replace an existing output")

    tiles = sub.add_parser("tiles", help="cut a large 2D tif into tiles, or merge them back")
    tsub = tiles.add_subparsers(dest="tiles_command", required=True, metavar="{create,merge}")
    tcr = tsub.add_parser("create", help="cut IMAGE (and --mask) into square tiles in OUT_DIR")
    tcr.add_argument("image", help="a large 2D tif image")
    tcr.add_argument("out_dir", help="folder for im/, msk/ and metadata.tif (new or empty)")
    tcr.add_argument("--mask", help="its mask or labels, cut on the same grid")
    tcr.add_argument("--tile-size", type=int, default=512, help="tile size in pixels (default %(default)s)")
    tcr.add_argument("--quiet", action="store_true", help="no progress bar")
    tmg = tsub.add_parser("merge", help="put the tiles of TILE_DIR back together in OUT_DIR")
    tmg.add_argument("tile_dir", help="a folder made by 'tiles create' (or the original's Create Tiles)")
    tmg.add_argument("out_dir", help="folder for im.tif (and msk.tif); existing files are kept")
    tmg.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="segment the bundled sample image and write a picture")
    demo.add_argument("-o", "--output-dir", default="panoptem_demo", help="folder for the results")
    demo.add_argument("--image", help="use this image instead of the bundled sample")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace labels.tif and overlay.png of an earlier run in the folder")
    _add_device_options(demo)
    return parser


def _version() -> str:
    from panoptem import __version__

    return f"panoptem {__version__}"


def _params(args, cls, names=None):
    """The ``cls`` parameters given on the command line (validated)."""
    from dataclasses import fields

    names = names or [f.name for f in fields(cls)]
    return cls(**{n: getattr(args, n) for n in names}).validated()


def _cmd_models(args) -> int:
    from panoptem import registry

    if args.models_command == "info":
        print(registry.model_info(args.name).summary())
    elif args.models_command in ("export", "import"):
        from panoptem import model_archive
        from panoptem.progress import TextProgress

        with TextProgress() as progress:
            if args.models_command == "export":
                path = model_archive.export_model(args.name, args.output, progress=progress,
                                                  overwrite=args.overwrite)
                message = f"exported '{args.name}' to {path}"
            else:
                name = model_archive.import_model(args.archive, args.name, progress=progress)
                message = f"imported and registered '{name}'"
        print(message)
    elif args.models_command == "archive":
        from panoptem import model_archive

        print(f"archived '{args.name}' in {model_archive.archive_model(args.name)}")
    elif args.models_command == "register":
        name = registry.register_model(args.name, args.config, args.model_file, args.quantized_model)
        print(f"registered '{name}' in {registry.config_dir() / (name + '.yaml')}")
    else:
        for name in registry.list_models():
            print(name)
    return 0


def _cmd_export(args) -> int:
    from panoptem.progress import TextProgress
    from panoptem.training.publish import publish_checkpoint

    with TextProgress() as progress:
        out = publish_checkpoint(args.checkpoint, args.model_dir, name=args.name,
                                 quantize=args.quantize, calibration_dir=args.calibration_dir,
                                 progress=progress)
    print(f"registered '{out.name}': {out.model_path} + {out.config_path}")
    return 0


def _cmd_quantize(args) -> int:
    from panoptem.progress import TextProgress
    from panoptem.training.publish import quantize_registered

    with TextProgress() as progress:
        out = quantize_registered(args.name, args.calibration_dir, checkpoint=args.checkpoint,
                                  arch_config=args.arch_config, progress=progress)
    print(f"'{args.name}' now has an int8 model: {out}")
    return 0


def _cmd_segment(args) -> int:
    from panoptem._files import check_output
    from panoptem.inference.engine import Engine2D, Params2D
    from panoptem.io import IMAGE_SUFFIXES, read_image, write_labels
    from panoptem.progress import TextProgress

    params = _params(args, Params2D, _FIELDS_2D)
    src, out = Path(args.image), Path(args.output)
    if src.is_dir():
        files = sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PanoptemError(f"The folder {src} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        if out.suffix:
            raise PanoptemError(f"IMAGE is a folder, so -o must be a folder too (got '{out}').")
        jobs = [(f, out / f"{f.stem}_labels.tif") for f in files]
    else:
        if out.suffix.lower() not in (".tif", ".tiff"):
            raise PanoptemError(f"The output must be a .tif file (got '{out}').")
        jobs = [(src, out)]
    for image, out_path in jobs:  # before any work: every output can be written, none exists
        check_output(out_path, "output", overwrite=args.overwrite, source=image)
    roi = read_image(args.roi) if args.roi else None
    engine = Engine2D(args.model, device=args.device, quantized=args.quantized,
                      precision=args.precision)
    with TextProgress(disable=args.quiet) as progress:
        if len(jobs) > 1:
            progress.stage("images", len(jobs))
        for image_path, out_path in jobs:
            image = read_image(image_path)
            t0 = time.perf_counter()
            if image.ndim == 3 and image.shape[-1] not in (3, 4) and min(image.shape) > 1:
                labels = engine.segment_batch(image, params, progress=progress)
            else:
                labels = engine.segment(image, params, roi=roi, progress=progress if len(jobs) == 1 else None)
            write_labels(out_path, labels)
            n = len(np.unique(labels[labels > 0]))
            print(f"{image_path.name}: {n} labels in {time.perf_counter() - t0:.1f} s -> {out_path}")
            if len(jobs) > 1:
                progress.advance()
    return 0


def _read_volume(path: Path, level: int = 0):
    """A volume for 3D inference; zarr (OME-Zarr at ``level``) and npy stay on disk and
    are read slice by slice."""
    if path.is_dir():
        from panoptem import ngff

        return ngff.open_image(path, level)[0]
    if level:
        raise PanoptemError(f"--level picks a resolution level of an OME-Zarr volume; {path.name} "
                            "has one level: leave --level out.")
    if path.suffix.lower() == ".npy" and path.exists():
        return np.load(path, mmap_mode="r")
    from panoptem.io import read_image

    return read_image(path)


def _cmd_segment3d(args) -> int:
    from panoptem._files import check_output
    from panoptem.inference.engine import Params2D
    from panoptem.inference.volume import Engine3D, Params3D
    from panoptem.inference.zarr_store import StoreInfo
    from panoptem.io import write_labels
    from panoptem.progress import TextProgress

    out = Path(args.output)
    if out.suffix.lower() not in (".zarr", ".tif", ".tiff"):
        raise PanoptemError(f"The output must end in .zarr or .tif (got '{out}').")
    p2 = Params2D(**{n: getattr(args, n) for n in _FIELDS_2D_IN_3D})
    p3 = _params(args, Params3D)
    if args.precision != "float32" and (args.blocks or args.devices):
        raise PanoptemError(f"--precision {args.precision} runs with one device only: drop "
                            f"{'--blocks' if args.blocks else '--devices'}, or use float32.")
    if args.blocks:
        return _segment3d_blocks(args, out, p2, p3)
    given = [f"--{n.replace('_', '-')}" for n in ("block_size", "overlap", "mask", "workers",
                                                   "memory_limit", "scheduler")
             if getattr(args, n) is not None]
    if given:
        raise PanoptemError(f"{', '.join(given)} only apply with --blocks; add --blocks or leave them out.")
    zarr_path = out if out.suffix.lower() == ".zarr" else None
    # before any work: the output (every file of it) can be written and does not exist yet
    names = [out] if zarr_path else [out.with_name(f"{out.stem}_{n}{out.suffix}")
                                     for n in _output_names(_config(args.model), p3)]
    for target in names if len(names) > 1 else [out]:
        check_output(target, "output", overwrite=args.overwrite, folder=zarr_path is not None,
                     source=args.volume)
    volume = _read_volume(Path(args.volume), args.level)
    info = StoreInfo(Path(args.volume).stem, scale=args.scale)
    t0 = time.perf_counter()
    with TextProgress(disable=args.quiet) as progress:
        if args.devices:
            from panoptem.inference.distributed import segment_volume_distributed

            devices = [d.strip() for d in args.devices.split(",") if d.strip()]
            result = segment_volume_distributed(args.model, volume, p2, p3, devices=devices,
                                                zarr_path=zarr_path, store_info=info,
                                                progress=progress)
        else:
            engine = Engine3D(args.model, device=args.device, quantized=args.quantized,
                              precision=args.precision)
            result = engine.segment(volume, p2, p3, zarr_path=zarr_path, store_info=info,
                                    progress=progress)
    arrays = {**result.classes, **{f"panoptic_{ax}": a for ax, a in result.stacks.items()}}
    for name, arr in arrays.items():
        if zarr_path is not None:  # already on disk; not loaded back into memory
            print(f"{name}: -> {out / name}")
            continue
        target = out if len(arrays) == 1 else out.with_name(f"{out.stem}_{name}{out.suffix}")
        write_labels(target, arr)
        counted = name in result.classes and arr.dtype != np.uint8
        print(f"{name}: {f'{len(np.unique(arr[arr > 0]))} objects, ' if counted else ''}-> {target}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _segment3d_blocks(args, out: Path, p2, p3) -> int:
    from panoptem.inference.blockwise import Cluster, segment_blocks
    from panoptem.inference.zarr_store import StoreInfo
    from panoptem.progress import TextProgress

    if args.devices:
        raise PanoptemError("--devices and --blocks do not go together: with --blocks each worker "
                            "takes one GPU (--device cuda, --workers N).")
    if out.suffix.lower() != ".zarr":
        raise PanoptemError(f"With --blocks the output is an OME-Zarr store: give a path ending in .zarr (got '{out}').")
    if not Path(args.volume).exists():
        raise PanoptemError(f"{args.volume} does not exist.")
    scale = None if args.scale == (1.0, 1.0, 1.0) else args.scale
    from panoptem.inference.blockwise import open_volume

    vol_scale = open_volume(args.volume, args.level)[1]
    info = StoreInfo(Path(args.volume).stem, scale=scale or vol_scale)
    cluster = Cluster(workers=args.workers, threads_per_worker=args.threads_per_worker,
                      memory_limit=args.memory_limit, scheduler=args.scheduler)
    t0 = time.perf_counter()
    with TextProgress(disable=args.quiet) as progress:
        result = segment_blocks(args.model, args.volume, p2, p3, output=out,
                                block_shape=args.block_size, overlap=args.overlap, mask=args.mask,
                                level=args.level, cluster=cluster, device=args.device,
                                quantized=args.quantized, store_info=info,
                                overwrite=args.overwrite, progress=progress)
    for name in result.classes:
        print(f"{name}: -> {out / 'labels' / name}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _config(model: str) -> dict:
    """The config of ``--model``: a registered name or a config .yaml."""
    from panoptem import registry

    if model.lower().endswith(".yaml") and Path(model).is_file():
        return registry.read_config(model)
    return registry.get_config(model)


def _output_names(config: dict, p3) -> list[str]:
    """The arrays a 3D run writes: one per class, then the stacks when asked."""
    names = [str(config["class_names"].get(c, c)) for c in config.get("labels", config["class_names"])]
    axes = ("xy", "xz", "yz") if p3.ortho_plane else (p3.plane,)
    return names + ([f"panoptic_{ax}" for ax in axes] if p3.return_stacks else [])


def _cmd_evaluate(args) -> int:
    import json

    from panoptem.evaluation import evaluate_files
    from panoptem.progress import TextProgress

    with TextProgress(disable=args.quiet) as progress:
        metrics = evaluate_files(args.pred, args.gt, per_slice=args.per_slice,
                                 iou_thr=args.iou_thr, progress=progress)
    print(json.dumps(metrics.as_dict()) if args.json else metrics.summary())
    return 0


def _class_names(text: str) -> dict[int, str]:
    from panoptem.proofread import parse_class_names

    return parse_class_names(text.replace(";", "\n"))


def _cmd_count(args) -> int:
    from panoptem import io, proofread
    from panoptem._files import check_output

    names = _class_names(args.names)
    if args.output and Path(args.output).suffix.lower() != ".csv":
        raise PanoptemError(f"The counts are written as CSV: give an output ending in .csv (got '{args.output}').")
    out = check_output(args.output, "CSV file", args.overwrite, source=args.labels) if args.output else None
    labels = io.read_label_image(args.labels)
    rows = proofread.count_labels(labels, label_divisor=args.label_divisor, per_plane=args.per_plane)
    for cid, ids in proofread.labels_per_class(rows).items():
        print(f"class {cid} ({names.get(cid, '-')}): {len(ids)} labels")
    if not rows:
        print("no labels")
    if out is not None:
        proofread.write_counts_csv(out, rows, names)
        print(f"wrote {out}")
    return 0


def _cmd_filter(args) -> int:
    from panoptem import io, proofread
    from panoptem._files import check_output

    out = check_output(args.output, "output", args.overwrite, source=args.labels)
    labels = io.read_label_image(args.labels)
    scope = "2D patches" if args.per_plane else ("3D image or z-stack" if labels.ndim == 3 else "Current image")
    kept, removed = proofread.filter_labels(labels, min_area=args.min_area, border=args.border, apply_to=scope)
    io.write_labels(out, kept.astype(labels.dtype, copy=False))
    print(f"removed {len(removed)} labels; wrote {out}")
    return 0


def _cmd_tiles(args) -> int:
    from panoptem.progress import TextProgress
    from panoptem.tiles import create_tiles, merge_tiles

    with TextProgress(disable=args.quiet) as progress:
        if args.tiles_command == "create":
            out = create_tiles(args.image, args.out_dir, tile_size=args.tile_size,
                               mask_path=args.mask, progress=progress)
            print(f"wrote tiles and metadata.tif to {out}")
        else:
            image, mask = merge_tiles(args.tile_dir, args.out_dir, progress=progress)
            print(f"wrote {image}" + (f" and {mask}" if mask else ""))
    return 0


def _cmd_finetune(args) -> int:
    from panoptem.progress import TextProgress
    from panoptem.training.finetune import finetune_model

    with TextProgress(disable=args.quiet) as progress:
        out = finetune_model(args.model, args.train_dir, args.model_dir, name=args.name,
                             iterations=args.iterations, patch_size=args.patch_size,
                             finetune_layer=args.finetune_layer, batch_size=args.batch_size,
                             device=args.device, seed=args.seed, config=args.config,
                             eval_dir=args.eval_dir, eval_every=args.eval_every,
                             progress=progress)
    _print_validations(out)
    print(f"registered '{out.exported.name}': {out.exported.model_path} + "
          f"{out.exported.config_path}")
    return 0


def _print_validations(out) -> None:
    for ev in out.evaluations:
        print(f"validation at {ev['iteration']}: IoU {ev['iou']:.3f}  F1@0.5 {ev['f1']:.3f}  "
              f"PQ {ev['pq']:.3f}")


def _cmd_train(args) -> int:
    from panoptem.progress import TextProgress
    from panoptem.training.train import train_model

    with TextProgress(disable=args.quiet) as progress:
        out = train_model(args.config, train_dir=args.train_dir, model_dir=args.model_dir,
                          name=args.name, iterations=args.iterations, patch_size=args.patch_size,
                          batch_size=args.batch_size, eval_dir=args.eval_dir, device=args.device,
                          seed=args.seed, quantize=args.quantize, log_path=args.log,
                          dataset_labels=_text_or_file(args.dataset_labels),
                          label_divisor=args.label_divisor, progress=progress)
    _print_validations(out)
    print(f"trained in {out.seconds / 60:.1f} min; registered '{out.exported.name}': "
          f"{out.exported.model_path} + {out.exported.config_path}")
    if out.quantized_path:
        print(f"quantized model: {out.quantized_path}")
    return 0


def _text_or_file(value: str | None) -> str | None:
    """The text of an option that takes either the text itself or a file holding it."""
    if value and Path(value).is_file():
        return Path(value).read_text()
    return value


def _cmd_demo(args) -> int:
    from panoptem.demo import run_demo

    result = run_demo(args.output_dir, image=args.image, device=args.device, quantized=args.quantized,
                      overwrite=args.overwrite)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"models": _cmd_models, "segment": _cmd_segment, "segment3d": _cmd_segment3d,
                "evaluate": _cmd_evaluate, "finetune": _cmd_finetune, "train": _cmd_train,
                "export": _cmd_export, "quantize": _cmd_quantize, "count": _cmd_count,
                "filter": _cmd_filter, "tiles": _cmd_tiles, "demo": _cmd_demo}
    try:
        return commands[args.command](args)
    except PanoptemError as err:
        print(f"panoptem: error: {err}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("panoptem: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
