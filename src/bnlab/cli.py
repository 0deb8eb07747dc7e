"""The ``bnlab`` command: parse arguments, call the library, print. No logic of its own.

Errors a user can cause (:class:`bnlab.errors.BnlabError`) are printed as one line,
``bnlab: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from bnlab.errors import BnlabError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------- data

def cmd_data_list(args) -> int:
    from bnlab.data import SOURCES, find

    rows = []
    for name, src in SOURCES.items():
        where = "built in (scikit-learn)" if not src.needs_files else "needs --data-dir"
        if src.marker is not None:
            try:
                where = str(find(name, None))
            except BnlabError:
                where = "not found"
        rows.append({"name": name, "description": src.description, "location": where})
    if args.json:
        _print_json(rows)
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['description']}\n{'':<{width}}  -> {r['location']}")
    return 0


def _reader_options(args) -> dict:
    opts = {}
    for key in ("image_size", "channels"):
        if getattr(args, key, None) is not None:
            opts[key] = getattr(args, key)
    return opts


def cmd_data_info(args) -> int:
    from bnlab.data import info

    d = info(args.name, args.data_dir, **_reader_options(args))
    if args.json:
        _print_json(d)
        return 0
    print(f"{d['name']}: {d['description']}")
    print(f"  location     {d['location']}")
    print(f"  examples     train {d['train']}, test {d['test']}")
    print(f"  input shape  {tuple(d['input_shape'])} {d['dtype']}")
    print(f"  classes      {len(d['classes'])}: {', '.join(d['classes'])}")
    print(f"  train mean   {', '.join(f'{m:.4f}' for m in d['mean'])}")
    print(f"  train std    {', '.join(f'{s:.4f}' for s in d['std'])}")
    return 0


def cmd_data_show(args) -> int:
    from bnlab.data import load
    from bnlab.report.plots import sample_grid

    ds = load(args.name, args.split, args.data_dir, **_reader_options(args))
    path = sample_grid(ds, args.output, n=args.n, seed=args.seed)
    print(json.dumps({"output": str(path), "images": min(args.n, len(ds))}) if args.json else f"wrote {path}")
    return 0


def cmd_data_fetch(args) -> int:
    from bnlab.data.fetch import fetch

    say = None if args.json else (lambda msg: print(msg, file=sys.stderr))
    path = fetch(args.name, args.data_dir, mirror=args.mirror, progress=say)
    print(json.dumps({"name": args.name, "location": str(path)}) if args.json else f"{args.name} ready in {path}")
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from bnlab.data import info, load
    from bnlab.report.plots import sample_grid

    d = info("fashion-mnist", args.data_dir)
    print(f"fashion-mnist: train {d['train']}, test {d['test']}, shape {tuple(d['input_shape'])}, "
          f"mean {d['mean'][0]:.4f}, std {d['std'][0]:.4f} ({d['location']})")
    grid = sample_grid(load("fashion-mnist", "train", args.data_dir), f"{args.out}/fashion-mnist-grid.png")
    print(f"wrote {grid}")
    return 0


# ---------------------------------------------------------------- parser

def _add_data_dir(p) -> None:
    p.add_argument("--data-dir", help="directory holding the dataset's files (searched first)")


def _add_image_options(p) -> None:
    p.add_argument("--image-size", type=int, help="image-folder: resize images to this square size (default 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="image-folder: 1 = grayscale, 3 = RGB (default 3)")


def build_parser() -> argparse.ArgumentParser:
    from bnlab import __version__

    parser = argparse.ArgumentParser(prog="bnlab", description="A batch-normalization laboratory on PyTorch.")
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="list, inspect, show and fetch datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("list", help="the named datasets and where each was found")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_list)
    p = dsub.add_parser("info", help="counts, shape, classes, train mean/std, location")
    p.add_argument("name")
    _add_data_dir(p)
    _add_image_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_info)
    p = dsub.add_parser("show", help="save a labelled grid of sample images")
    p.add_argument("name")
    _add_data_dir(p)
    _add_image_options(p)
    p.add_argument("-o", "--output", default="grid.png", help="PNG file to write (default grid.png)")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("-n", type=int, default=36, help="number of images (default 36)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_show)
    p = dsub.add_parser("fetch", help="download mnist or fashion-mnist with MD5 verification")
    p.add_argument("name", choices=("fashion-mnist", "mnist"))
    _add_data_dir(p)
    p.add_argument("--mirror", help="base URL serving the same files (checksums still enforced)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("demo", help="the main job on the offline default data (what `make demo` runs)")
    _add_data_dir(p)
    p.add_argument("--out", default="out/demo", help="directory for the demo's files")
    p.set_defaults(func=cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"bnlab: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args) or 0
    except BnlabError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
