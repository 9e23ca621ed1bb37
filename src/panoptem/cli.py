"""The ``panoptem`` command line: models, 2D segmentation and the demo.

Every user error prints one line starting with ``panoptem: error:`` and exits with status 2;
a cancelled run (Ctrl-C) exits with 130.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from panoptem.errors import Cancelled, PanoptemError

__all__ = ["main", "build_parser"]


def _add_2d_options(p: argparse.ArgumentParser) -> None:
    from panoptem.inference.engine import DOWNSAMPLING_FACTORS, Params2D

    d = Params2D()
    g = p.add_argument_group("2D parameters (as in the 2D Inference widget)")
    g.add_argument("--downsampling", type=int, default=d.downsampling, choices=DOWNSAMPLING_FACTORS,
                   help="Image Downsampling (default %(default)s)")
    g.add_argument("--confidence-thr", type=float, default=d.confidence_thr,
                   help="Segmentation Confidence Thr (default %(default)s)")
    g.add_argument("--center-confidence-thr", type=float, default=d.center_confidence_thr,
                   help="Center Confidence Thr (default %(default)s)")
    g.add_argument("--min-distance", type=int, default=d.min_distance,
                   help="Centers Min Distance (default %(default)s)")
    g.add_argument("--fine-boundaries", action="store_true", help="Fine boundaries")
    g.add_argument("--semantic-only", action="store_true", help="Semantic only")
    g.add_argument("--fill-holes", action="store_true", help="Fill holes in segmentation")
    g.add_argument("--max-objects", type=int, default=d.max_objects,
                   help="Max objects per class = label divisor (default %(default)s)")
    g.add_argument("--tile-size", type=int, default=d.tile_size,
                   help="Tile size in pixels, 0 = no tiling (default %(default)s)")


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--quantized", action="store_true",
                   help="use the model's int8 version on CPU when it has one")


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

    seg = sub.add_parser("segment", help="segment 2D images (a file, a stack or a folder)")
    seg.add_argument("image", help="a .tif/.png/.jpg/.npy image, a (N, H, W) stack, or a folder of images")
    seg.add_argument("-o", "--output", required=True,
                     help="output .tif (or a folder when IMAGE is a folder)")
    seg.add_argument("--model", default="MitoNet_v1", help="registered model name (default %(default)s)")
    seg.add_argument("--roi", help="mask image of the same size: only pixels inside it are segmented")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_2d_options(seg)
    _add_device_options(seg)

    demo = sub.add_parser("demo", help="segment the bundled sample image and write a picture")
    demo.add_argument("-o", "--output-dir", default="panoptem_demo", help="folder for the results")
    demo.add_argument("--image", help="use this image instead of the bundled sample")
    _add_device_options(demo)
    return parser


def _version() -> str:
    from panoptem import __version__

    return f"panoptem {__version__}"


def _params(args):
    from panoptem.inference.engine import Params2D

    return Params2D(
        downsampling=args.downsampling, confidence_thr=args.confidence_thr,
        center_confidence_thr=args.center_confidence_thr, min_distance=args.min_distance,
        fine_boundaries=args.fine_boundaries, semantic_only=args.semantic_only,
        fill_holes=args.fill_holes, max_objects=args.max_objects, tile_size=args.tile_size,
    ).validated()


def _cmd_models(args) -> int:
    from panoptem import registry

    if args.models_command == "info":
        print(registry.model_info(args.name).summary())
    elif args.models_command == "register":
        name = registry.register_model(args.name, args.config, args.model_file, args.quantized_model)
        print(f"registered '{name}' in {registry.config_dir() / (name + '.yaml')}")
    else:
        for name in registry.list_models():
            print(name)
    return 0


def _cmd_segment(args) -> int:
    import numpy as np

    from panoptem.inference.engine import Engine2D
    from panoptem.io import IMAGE_SUFFIXES, read_image, write_labels
    from panoptem.progress import TextProgress

    params = _params(args)
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
    roi = read_image(args.roi) if args.roi else None
    engine = Engine2D(args.model, device=args.device, quantized=args.quantized)
    progress = TextProgress(disable=args.quiet)
    try:
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
    finally:
        progress.close()
    return 0


def _cmd_demo(args) -> int:
    from panoptem.demo import run_demo

    result = run_demo(args.output_dir, image=args.image, device=args.device, quantized=args.quantized)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"models": _cmd_models, "segment": _cmd_segment, "demo": _cmd_demo}
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
