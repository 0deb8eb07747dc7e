"""The ``bnlab`` command: parse arguments, call the library, print. No logic of its own.

Errors a user can cause (:class:`bnlab.errors.BnlabError`) are printed as one line,
``bnlab: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
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


# ---------------------------------------------------------------- models

def cmd_models_list(args) -> int:
    from bnlab.models import ZOO

    rows = [{"name": n, "description": e["description"], "activation": e["activation"],
             "tutorial_bn": bool(e.get("tutorial_bn")), "datasets": e.get("datasets", [])} for n, e in ZOO.items()]
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:<15} {r['description']}")
        print(f"{'':<15} activation {r['activation']}; bn=tutorial {'yes' if r['tutorial_bn'] else 'no'}; "
              f"datasets: {', '.join(r['datasets'])}")
    return 0


def _input_for(dataset: str, data_dir, image_size=None, channels=None) -> tuple[tuple[int, ...], int]:
    """Input shape and class count of a dataset, reading only what is needed."""
    from bnlab.data import load

    opts = {k: v for k, v in (("image_size", image_size), ("channels", channels)) if v is not None}
    ds = load(dataset, "test", data_dir, **opts)
    return ds.input_shape, ds.num_classes


def cmd_models_show(args) -> int:
    from bnlab.models import build, format_summary, summary

    if args.input_shape:
        shape, classes = tuple(int(v) for v in args.input_shape.split(",")), args.classes
    else:
        shape, classes = _input_for(args.dataset, args.data_dir, args.image_size, args.channels)
    model = build(args.name, input_shape=shape, num_classes=classes, **{k: getattr(args, k) for k in MODEL_SETTINGS})
    s = summary(model, shape)
    if args.json:
        _print_json(s)
    else:
        print(format_summary(s, f"{args.name} (bn={args.bn}, norm={args.norm}) for {args.dataset or 'input'} {shape}"))
    return 0


# ---------------------------------------------------------------- train / evaluate / predict

def _finite(x):
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _workers(text: str):
    """``--workers``: a positive whole number or ``auto``."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or auto, got {text!r}")
    return n


def settings_from_args(args):
    """The TrainSettings named by the parsed options (every setting has its option, see below)."""
    from bnlab.train import TrainSettings
    from bnlab.train.settings import settings_fields

    return TrainSettings(**{f.name: getattr(args, f.name) for f in settings_fields()}).validate()


def cmd_train(args) -> int:
    from bnlab.train import distributed

    s = settings_from_args(args)
    distributed.check_world(s.nproc)
    if s.nproc > 1 and distributed.env_rank_world() is None:
        _check_train_inputs(args, s)  # every user mistake is one line here, not N processes' tracebacks
        return distributed.launch(args.argv, s.nproc)
    with distributed.process_group(s.device) as (rank, world):
        if world > 1:
            s = s.resolved()  # nproc = the group's size (under torchrun)
        return _train_and_report(args, s, lead=rank == 0)


def _check_train_inputs(args, s):
    from bnlab.train import load_data
    from bnlab.train.run import check_model

    if args.output:
        from bnlab._files import check_writable

        check_writable(args.output, "checkpoint")  # before anything is loaded or printed
    check_model(s)
    data = load_data(s)
    check_model(s, data[0].input_shape, data[0].num_classes)
    if s.batch_classes:
        data[0].num_batches(s.batch_size, classes=s.batch_classes)  # more classes than the data has: say so now
    return data


def _train_and_report(args, s, lead: bool = True) -> int:
    """Train and print; in a process group only rank 0 (``lead``) prints and writes files."""
    from bnlab.inspect.landscape import format_landscape
    from bnlab.train import EpochPrinter, load_data, train
    from bnlab.train.run import describe

    data = _check_train_inputs(args, s) if lead else load_data(s)
    if not args.json and lead:
        print(describe(s, *data), flush=True)
    res = train(s, datasets=data, callbacks=[] if (args.json or not lead) else [EpochPrinter()],
                progress=False if (args.quiet or args.json or not lead) else None,
                checkpoint=args.output if lead else None, tensorboard=args.tensorboard if lead else None)
    if not lead:
        return 0
    h, tracker = res.history, res.tracker
    out = {"status": h.status, "settings": s.to_dict(), "data": {"train": len(data[0]), "test": len(data[1]),
                                                                 "location": data[0].source},
           "epochs": h.epochs, "steps": h.steps, "stop_reason": h.stop_reason, "checkpoint": args.output}
    if tracker is not None:
        out["activations"] = tracker.summary()
    if res.probe is not None:
        out["landscape"] = res.probe.summary()
    if res.tensorboard is not None:
        out["tensorboard"] = str(res.tensorboard)
    if args.json:
        print(json.dumps(_finite(out)))
        return 0
    final = h.final()
    if tracker is not None:
        w1 = out["activations"]["ics_w1"]
        print(f"activation shift (mean W1 between snapshots every {s.track_every} steps): "
              + (f"{w1:.4f}" if w1 is not None else "not enough snapshots"))
    if res.probe is not None:
        print(format_landscape(out["landscape"], s.track_every))
    if h.status == "diverged":
        print(f"diverged: {h.stop_reason} (try a smaller --lr or --bn after)")
    elif final:
        print(f"done: {len(h.epochs)} epoch(s), {h.steps} steps, final train acc {final['train_acc']:.4f}, "
              f"test acc {final.get('test_acc', float('nan')):.4f}, {sum(e['seconds'] for e in h.epochs):.1f}s"
              + (f" ({h.stop_reason})" if h.stop_reason else ""))
    if args.output:
        print(f"checkpoint written to {args.output}")
    if res.tensorboard is not None:
        print(f"TensorBoard events in {res.tensorboard} (tensorboard --logdir {args.tensorboard})")
    return 0


def cmd_evaluate(args) -> int:
    from bnlab.train import evaluate, format_evaluation, load_checkpoint

    ck = load_checkpoint(args.checkpoint, args.device)
    (data,) = _checkpoint_data(ck, args, (args.split,))
    name = data.name
    rep = evaluate(ck.model, data)
    if args.output:
        from bnlab.report.plots import confusion_matrix, run_title

        confusion_matrix(rep["confusion"], data.classes, args.output,
                         title=f"{run_title(ck.settings)}\non {name} {args.split}: accuracy {rep['accuracy']:.4f}")
        rep["confusion_png"] = args.output
    if args.json:
        _print_json(rep)
    else:
        print(format_evaluation(rep))
        if args.output:
            print(f"wrote {args.output}")
    return 0


def cmd_predict(args) -> int:
    from bnlab.train import load_checkpoint, predict_images
    from bnlab.train.evaluate import format_preprocess

    ck = load_checkpoint(args.checkpoint, args.device)
    results = predict_images(ck, args.images, args.top_k, args.invert, errors="report")
    if args.json:
        _print_json(results)
    for r in results:
        if "error" in r:
            print(f"bnlab: error: {r['error']}", file=sys.stderr)
        elif not args.json:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            print(f"{r['image']}: {top}\n  {format_preprocess(r['preprocess'])}")
            for w in r["warnings"]:
                print(f"  warning: {w}")
    return 2 if any("error" in r for r in results) else 0


# ---------------------------------------------------------------- experiments

def _store(args):
    """The run store named by --store; an error if it does not exist yet."""
    from bnlab.experiments import RunStore

    return RunStore(args.store, create=False)


def cmd_sweep(args) -> int:
    """Exit status: 0 when every run is done or diverged; 1 when a run failed or was interrupted
    (a line on stderr says which and how to see them); 3 when the only unfinished runs are still
    running in another process (run the command again later); 2 on an error, before any run."""
    from bnlab.experiments import load_config, parse_sets, run_sweep

    cfg = load_config(args.config).override(parse_sets(args.set))
    overrides = {"data_dir": args.data_dir} if args.data_dir else None
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    summary = run_sweep(cfg, args.store, workers=args.workers, executor=args.executor, ray_address=args.ray_address,
                        tensorboard=args.tensorboard, overrides=overrides, threads=args.threads,
                        max_runs=args.max_runs, lease=args.lease, log=log)
    statuses = list(summary.finished.values())
    line = (f"sweep {cfg.name!r}: {summary.total} run(s), {summary.skipped} already finished, "
            f"{statuses.count('done')} done, {statuses.count('diverged')} diverged, {statuses.count('failed')} failed "
            f"now ({summary.seconds:.1f}s); results: bnlab results --store {args.store} --sweep {cfg.name}")
    status = 1 if summary.failed or summary.interrupted else 3 if summary.still_running else 0
    if args.json:
        print(json.dumps({"sweep": cfg.name, "total": summary.total, "skipped": summary.skipped,
                          "finished": summary.finished, "seconds": summary.seconds, "store": args.store,
                          "counts": summary.counts, "failed": summary.failed, "interrupted": summary.interrupted,
                          "still_running": summary.still_running, "running_elsewhere": summary.running_elsewhere,
                          "threads": summary.threads, "config_version": summary.version, "exit_status": status}))
    else:
        print(line)
    if status:
        print(f"bnlab: {summary.unfinished(args.store)}", file=sys.stderr)
    return status


def _by_list(text: str | None) -> list[str] | None:
    return [g.strip() for g in text.split(",") if g.strip()] if text else None


def cmd_recipes_list(args) -> int:
    from bnlab.experiments import load_recipe, recipe_names

    rows = []
    for name in recipe_names():
        cfg = load_recipe(name)
        rows.append({"name": name, "sweep": cfg.name, "dataset": cfg.dataset, "runs": cfg.size(),
                     "grid": cfg.grid, "description": cfg.description, "claim": cfg.claim.get("text", "")})
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        grid = ", ".join(f"{k} {v}" for k, v in r["grid"].items()) or "no grid"
        print(f"{r['name']:<11} {r['description'] or r['sweep']}\n{'':<11} {r['dataset']}; {grid}; {r['runs']} runs")
    print("\nrun one: bnlab sweep NAME (try --set epochs=1), or bnlab reproduce NAME; "
          "edit a copy: bnlab recipes show NAME > mine.toml")
    return 0


def cmd_recipes_show(args) -> int:
    from bnlab.experiments.config import recipe_path

    path = recipe_path(args.name)
    if args.json:
        from bnlab.experiments import load_recipe

        _print_json({"name": args.name, "path": str(path), **load_recipe(args.name).to_dict()})
    else:
        sys.stdout.write(path.read_text(encoding="utf-8"))
    return 0


def cmd_results(args) -> int:
    from bnlab.report.sweeps import results_table

    with _store(args) as store:
        if args.sweep is None and not args.all:
            sweeps = store.sweeps()
            if args.format == "json":
                _print_json(sweeps)
                return 0
            if not sweeps:
                print(f"no sweeps in {args.store} yet")
                return 0
            print(f"sweeps in {args.store} (pick one with --sweep NAME, or --all):")
            for sw in sweeps:
                print(f"  {sw['name']:<30} {sw['finished']}/{sw['runs']} runs finished")
            return 0
        fmt = "json" if args.json else args.format
        print(results_table(store, args.sweep, args.where, args.sort, _by_list(args.by), fmt))
    return 0


def cmd_compare(args) -> int:
    from bnlab.experiments import compare, rows
    from bnlab.report.sweeps import format_compare

    from bnlab.experiments.analysis import check_where_matches

    with _store(args) as store:
        runs = store.runs(args.sweep)
        selected = rows(runs, args.where)
        check_where_matches(runs, args.where, selected)
        c = compare(selected, args.by, args.metric)
    if args.json:
        print(json.dumps(_finite(c), indent=2))
    else:
        print(format_compare(c))
    return 0


def cmd_plot(args) -> int:
    from bnlab.report.sweeps import plot_sweep

    with _store(args) as store:
        path = plot_sweep(store, args.sweep, args.output, args.metric, _by_list(args.by), args.where)
    print(json.dumps({"output": str(path)}) if args.json else f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from bnlab.report.sweeps import html_report

    with _store(args) as store:
        path = html_report(store, args.sweep, args.output, args.by)
    print(json.dumps({"output": str(path)}) if args.json else f"wrote {path}")
    return 0


def _checkpoint_data(ck, args, splits=("train", "test")):
    """The splits of the checkpoint's dataset (or --dataset), standardized as in training."""
    from bnlab.data import load
    from bnlab.errors import ConfigError, DataNotFoundError

    st = ck.settings
    name = args.dataset or st.get("dataset")
    data_dir = args.data_dir if args.data_dir is not None else st.get("data_dir")
    opts = {k: st[k] for k in ("image_size", "channels") if st.get(k) is not None}
    out = []
    for split in splits:
        try:
            ds = load(name, split, data_dir, standardize=ck.standardizer, **opts)
        except DataNotFoundError:
            if args.data_dir is not None or data_dir is None:
                raise
            # the folder the checkpoint was trained from no longer holds the data: look where bnlab looks
            data_dir = None
            ds = load(name, split, None, standardize=ck.standardizer, **opts)
        if tuple(ds.input_shape) != ck.input_shape or ds.num_classes != len(ck.classes):
            raise ConfigError(f"{name} has inputs {ds.input_shape} and {ds.num_classes} classes, but the checkpoint "
                              f"expects {ck.input_shape} and {len(ck.classes)}: use the dataset it was trained on")
        out.append(ds)
    return out


def cmd_doctor(args) -> int:
    from bnlab.inspect.doctor import accuracy, diagnose, fix, format_diagnosis
    from bnlab.train import load_checkpoint, save_checkpoint

    if args.fix and not args.output:
        from bnlab.errors import ConfigError

        raise ConfigError("--fix needs -o OUT: the recalibrated checkpoint is written there (the original is kept)")
    if args.fix:
        from bnlab._files import check_writable

        check_writable(args.output, "checkpoint")
    ck = load_checkpoint(args.checkpoint, args.device)
    train, test = _checkpoint_data(ck, args)
    rep = diagnose(ck.model, train, test, batch_size=ck.settings.get("batch_size"), stats_limit=args.limit)
    if args.fix:
        before = accuracy(ck.model, test)
        fix(ck.model, train, args.limit)
        after = accuracy(ck.model, test)
        save_checkpoint(args.output, ck.model, spec=ck.spec, build=ck.build, standardizer=ck.standardizer,
                        classes=ck.classes, settings=ck.settings, history=ck.history, extra=ck.extra)
        rep["fix"] = {"output": args.output, "eval_acc_before": before, "eval_acc_after": after}
    status = 1 if rep["problems"] else 0  # documented: scripts can test `bnlab doctor CKPT`
    if args.json:
        _print_json(_finite(rep))
        return status
    print(format_diagnosis(rep, fixed=args.fix))  # with --fix, no advice to run --fix
    if args.fix:
        f = rep["fix"]
        print(f"recalibrated on {min(len(train), args.limit)} training images: test accuracy "
              f"{f['eval_acc_before']:.4f} -> {f['eval_acc_after']:.4f}; wrote {args.output}")
    return status


def cmd_fold(args) -> int:
    from bnlab._files import check_writable
    from bnlab.train import evaluate, fold_checkpoint, load_checkpoint

    check_writable(args.output, "checkpoint")
    ck = load_checkpoint(args.checkpoint)
    report = fold_checkpoint(ck, args.output)
    out = {"output": args.output, **report.to_dict()}
    if args.check:
        (test,) = _checkpoint_data(ck, args, ("test",))
        out["accuracy_before"] = evaluate(ck.model, test)["accuracy"]
        out["accuracy_after"] = evaluate(load_checkpoint(args.output).model, test)["accuracy"]
    if args.json:
        _print_json(out)
        return 0
    print(report)
    if args.check:
        print(f"test accuracy {out['accuracy_before']:.4f} before, {out['accuracy_after']:.4f} after folding")
    print(f"wrote {args.output}")
    return 0


def cmd_export(args) -> int:
    from bnlab._files import check_writable
    from bnlab.export import export_checkpoint
    from bnlab.train import load_checkpoint

    check_writable(args.output, "ONNX file")
    ck = load_checkpoint(args.checkpoint)
    check = None
    if not args.no_data_check:
        from bnlab.errors import DataError

        try:
            (check,) = _checkpoint_data(ck, args, ("test",))
        except DataError as e:  # no data here: random inputs in the data's range still check the file
            print(f"bnlab: warning: checking on random inputs ({e})", file=sys.stderr)
    report = export_checkpoint(ck, args.output, bake_standardization=args.bake_standardization, check_data=check,
                               opset=args.opset)
    if args.json:
        _print_json(_finite(report.to_dict()))
    else:
        print(report)
    return 0


def cmd_plot_activations(args) -> int:
    from bnlab.report.plots import activation_percentiles, run_title

    checkpoint = args.checkpoint or args.checkpoint_option
    if (args.run is None) == (checkpoint is None):
        from bnlab.errors import ConfigError

        raise ConfigError("give either a checkpoint (bnlab plot-activations CKPT) or --run ID (a sweep run in --store)")
    if args.run is not None:
        with _store(args) as store:
            rid = store.find_run(args.run)
            records = store.activations(rid)
            settings = next(r["settings"] for r in store.runs() if r["run_id"] == rid)
        title = f"{run_title(settings)} (run {rid[:8]})"
    else:
        from bnlab.train import load_checkpoint

        ck = load_checkpoint(checkpoint)
        records = ck.extra.get("activations", [])
        title = f"{run_title(ck.settings)} ({checkpoint})"
    path = activation_percentiles(records, args.output, args.layer, title)
    print(json.dumps({"output": str(path)}) if args.json else f"wrote {path}")
    return 0


def _early_workers(argv: list[str]) -> None:
    """Start the sweep workers' fork server first thing, before this process imports torch (which
    building the parser does): both import it at once, on different cores (see
    bnlab.experiments.workers). Only for the commands that may run local worker processes, read
    from the raw arguments with a lenient pre-parser; the real parser checks them afterwards."""
    if not argv or argv[0] not in ("sweep", "reproduce", "demo") or "-h" in argv or "--help" in argv:
        return
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--executor", default="local")
    pre.add_argument("--workers", default="auto")
    try:
        known, _ = pre.parse_known_args(argv[1:])
    except (argparse.ArgumentError, SystemExit):
        return
    if known.workers != "auto":
        try:
            if int(known.workers) <= 1:
                return
        except ValueError:
            return  # the real parser says what is wrong with it
    if known.executor == "local":
        from bnlab.experiments.workers import start_worker_server

        start_worker_server()


def cmd_reproduce(args) -> int:
    from bnlab.experiments import RunStore
    from bnlab.errors import DataNotFoundError
    from bnlab.experiments.reproduce import reproduce
    from bnlab.report.reproductions import format_comparison, reproduction_figure

    if args.output:
        from bnlab._files import check_writable

        check_writable(args.output, "figure")  # now, not after the runs
    log = (lambda m: None) if (args.quiet or args.json) else (lambda m: print(m, flush=True))
    try:
        cfg, c = reproduce(args.name, args.store, epochs=args.epochs, seeds=args.seeds, dataset=args.dataset,
                           data_dir=args.data_dir, workers=args.workers, executor=args.executor, log=log,
                           quick=args.quick)
    except DataNotFoundError as e:
        if args.dataset is not None or args.data_dir is not None:
            raise
        raise DataNotFoundError(f"{e} (or run the recipe on Fashion-MNIST, which is here offline: "
                                "--dataset fashion-mnist)") from None
    with RunStore(args.store) as store:
        default = f"{cfg.name}-{'fig1' if cfg.fixed.get('track_activations') else cfg.claim.get('axis', 'fig')}.png"
        figure = reproduction_figure(store, cfg, args.output or default)
    if figure is not None:
        c["figure"] = str(figure)
    if args.json:
        print(json.dumps(_finite(c), indent=2))
    else:
        print()
        print(format_comparison(c))
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    """A reduced deeplizard BN-vs-no-BN sweep: results table, verdict, curves.png, report.html."""
    from bnlab.data import info, load
    from bnlab.experiments import RunStore, load_recipe, run_sweep
    from bnlab.experiments.reproduce import adapt, comparison
    from bnlab.report.plots import sample_grid
    from bnlab.report.reproductions import format_comparison
    from bnlab.report.sweeps import html_report, plot_sweep, results_table

    say = (lambda *a: None) if args.json else print
    out = args.output
    d = info("fashion-mnist", args.data_dir)
    say(f"fashion-mnist: train {d['train']}, test {d['test']}, shape {tuple(d['input_shape'])}, "
        f"train mean {d['mean'][0]:.4f}, std {d['std'][0]:.4f} ({d['location']})")
    grid = sample_grid(load("fashion-mnist", "train", args.data_dir), f"{out}/fashion-mnist-grid.png")
    say(f"wrote {grid}")
    cfg = adapt(load_recipe("deeplizard"), epochs=args.epochs, seeds=args.seeds)
    store_path = f"{out}/bnlab.db"
    say(f"\nsweep {cfg.name}: deeplizard-cnn with bn=none and bn=tutorial, {args.epochs} epochs, "
        f"{args.seeds} seeds, Adam lr 0.01, batch 1000 ("
        + ("workers chosen for the network" if args.workers == "auto" else f"{args.workers} workers") + ")")
    run_sweep(cfg, store_path, workers=args.workers, overrides={"data_dir": args.data_dir} if args.data_dir else None,
              log=(lambda m: None) if args.json else print)
    with RunStore(store_path) as store:
        c = comparison(store, cfg)
        say()
        say(results_table(store, cfg.name, sort="test_acc"))
        say()
        say(format_comparison(c))
        curves = plot_sweep(store, cfg.name, f"{out}/curves.png", "test_acc", ["bn"])
        report = html_report(store, cfg.name, f"{out}/report.html", "bn")
    if args.json:
        print(json.dumps(_finite({"dataset": d, "sweep": cfg.name, "store": store_path, "comparison": c,
                                  "files": [str(grid), str(curves), str(report)]}), indent=2))
    say(f"\nwrote {curves} and {report}; the full 20-epoch, 3-seed run: bnlab reproduce deeplizard --workers 2")
    return 0


# ---------------------------------------------------------------- parser

def _add_json(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON on stdout")


def _add_data_dir(p) -> None:
    p.add_argument("--data-dir", help="directory holding the dataset's files (searched first)")


def _add_checkpoint(p, data_use: str) -> None:
    """The checkpoint argument, and where the data it is used with comes from (:func:`_checkpoint_data`)."""
    p.add_argument("checkpoint", help="a checkpoint written by bnlab train -o")
    p.add_argument("--dataset", help=f"{data_use} (default: the dataset it was trained on)")
    _add_data_dir(p)


def _add_device(p) -> None:
    from bnlab.devices import DEVICES

    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="where to run the network: auto picks cuda, then mps, then cpu")


def _add_image_options(p) -> None:
    p.add_argument("--image-size", type=int, help="image-folder: resize images to this square size (default 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="image-folder: 1 = grayscale, 3 = RGB (default 3)")


MODEL_SETTINGS = ("bn", "bn_impl", "norm", "norm_groups", "weight_std", "activation")


def _add_settings_options(p, only=None) -> None:
    """One option per training setting (or those named in ``only``), with its type, default, choices
    and help taken from :class:`bnlab.train.TrainSettings`."""
    from bnlab.train.settings import setting_type, settings_fields

    for f in settings_fields():
        if only is not None and f.name not in only:
            continue
        m = f.metadata
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        kind, _ = setting_type(f)
        if kind is bool:
            p.add_argument(flag, dest=f.name, action="store_true", help=m["help"])
            continue
        default = f" (default {f.default})" if f.default is not None else ""
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=m["choices"], metavar=m["metavar"],
                       help=m["help"] + default)


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the help already names it)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if (action.option_strings and "default" not in h and h is not argparse.SUPPRESS
                and action.default not in (None, False, [], argparse.SUPPRESS)):
            h += " (default %(default)s)"
        return h


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)

    def error(self, message):
        """A usage mistake is one line, as every other mistake is (argparse prints the whole
        usage first), naming the help to read; exit status 2."""
        import re

        from bnlab.errors import suggest

        wrong = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if wrong:  # "did you mean" (argparse itself suggests only from Python 3.14)
            options = re.findall(r"'([^']*)'", wrong.group(2))
            message += suggest(wrong.group(1), options)
        self.exit(2, f"bnlab: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from bnlab import __version__

    parser = _Parser(prog="bnlab", description="A batch-normalization laboratory on PyTorch.")
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="list, inspect, show and fetch datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("list", help="the named datasets and where each was found")
    _add_json(p)
    p.set_defaults(func=cmd_data_list)
    p = dsub.add_parser("info", help="counts, shape, classes, train mean/std, location")
    p.add_argument("name")
    _add_data_dir(p)
    _add_image_options(p)
    _add_json(p)
    p.set_defaults(func=cmd_data_info)
    p = dsub.add_parser("show", help="save a labelled grid of sample images")
    p.add_argument("name")
    _add_data_dir(p)
    _add_image_options(p)
    p.add_argument("-o", "--output", default="grid.png", help="PNG file to write (default grid.png)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="the split to draw from")
    p.add_argument("-n", type=int, default=36, help="number of images (default 36)")
    p.add_argument("--seed", type=int, default=0, help="which images (a random draw)")
    _add_json(p)
    p.set_defaults(func=cmd_data_show)
    p = dsub.add_parser("fetch", help="download mnist or fashion-mnist with MD5 verification")
    p.add_argument("name", choices=("fashion-mnist", "mnist"))
    _add_data_dir(p)
    p.add_argument("--mirror", help="base URL serving the same files (checksums still enforced)")
    _add_json(p)
    p.set_defaults(func=cmd_data_fetch)

    models = sub.add_parser("models", help="list and show the network zoo")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="the reference networks")
    _add_json(p)
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("show", help="a Keras-style summary: layers, output shapes, parameters")
    p.add_argument("name", help="zoo name or spec .toml file")
    _add_settings_options(p, only=MODEL_SETTINGS)
    p.add_argument("--dataset", default="fashion-mnist", help="dataset whose input shape and classes to use")
    _add_data_dir(p)
    _add_image_options(p)
    p.add_argument("--input-shape", help="e.g. 1,28,28 (instead of --dataset)")
    p.add_argument("--classes", type=int, default=10, help="with --input-shape: number of classes")
    _add_json(p)
    p.set_defaults(func=cmd_models_show)

    p = sub.add_parser("train", help="train one network and report per-epoch train/test metrics",
                       description="Train one network; prints the effective settings first, then one line per "
                                   "epoch. Every option below is a setting of bnlab.train.TrainSettings.")
    _add_settings_options(p)
    p.add_argument("-o", "--output", "--checkpoint", dest="output", metavar="CKPT",
                   help="write the trained network here (.pt)")
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files under DIR/train/<run id>")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, loss, per-class precision/recall/F1 of a checkpoint")
    _add_checkpoint(p, "the data to evaluate on")
    _add_device(p)
    p.add_argument("--split", default="test", choices=("train", "test"), help="the split to evaluate on")
    p.add_argument("-o", "--output", "--confusion", dest="output", metavar="PNG",
                   help="write the confusion matrix as a PNG")
    _add_json(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files with a checkpoint",
                       description="Unreadable files are reported one line each while the others are "
                                   "predicted; the exit status is then 2.")
    p.add_argument("checkpoint", help="a checkpoint written by bnlab train -o")
    p.add_argument("images", nargs="+",
                   help="image files, directories (their image files, not recursive) or quoted glob patterns")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    p.add_argument("--invert", nargs="?", const="yes", default="auto", choices=("auto", "yes", "no"),
                   help="invert pixel values (dark objects on a light background, for MNIST-style models); "
                        "auto (default): when the picture's border is light and the training images are dark; "
                        "a bare --invert means yes (put it after the images or write --invert=yes)")
    _add_device(p)
    _add_json(p)
    p.set_defaults(func=cmd_predict)

    from bnlab.experiments.store import DEFAULT_STORE

    def add_store(p):
        p.add_argument("--store", default=DEFAULT_STORE, help=f"SQLite run store (default {DEFAULT_STORE})")

    p = sub.add_parser("sweep", help="run a grid of settings x seeds from a TOML config; re-running resumes",
                       description="Run a grid of settings x seeds from a TOML config; re-running resumes. Exit "
                                   "status: 0 when every run is done or diverged, 1 when a run failed or was "
                                   "interrupted, 3 when runs are still running in another process, 2 on an error "
                                   "(found before any run starts).")
    from bnlab.experiments.config import MAX_RUNS
    from bnlab.experiments.store import DEFAULT_LEASE

    p.add_argument("config", help="a recipe's name (bnlab recipes list) or a sweep config .toml")
    add_store(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="fix a setting for this sweep, e.g. --set epochs=1 --set train_limit=10000 (repeatable; "
                        "a gridded setting becomes fixed; --set seeds=[0,1]); recorded in the stored config")
    p.add_argument("--workers", type=_workers, default="auto", metavar="N|auto",
                   help="parallel worker processes (torch threads = cores / N); auto (default): one per core for "
                        "dense networks, one using every core for convolutional ones")
    p.add_argument("--threads", type=int, help="torch threads per worker (same value = bit-identical results)")
    p.add_argument("--executor", default="local", choices=("local", "ray"), help="where runs execute")
    p.add_argument("--ray-address", help="existing Ray cluster (default: start a local Ray)")
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files per run under DIR")
    _add_data_dir(p)
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    p.add_argument("--max-runs", type=int, default=MAX_RUNS, metavar="N",
                   help=f"refuse a grid of more than N runs (default {MAX_RUNS:,})")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE, metavar="SECONDS",
                   help="a running run whose owner sent no heartbeat for this long is rerun (default "
                        f"{DEFAULT_LEASE:.0f}); the only check for runs of another host")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("results", help="one row per run (or per group, with mean/std/95%% CI over seeds)")
    add_store(p)
    p.add_argument("--sweep", help="sweep name (without it: list the sweeps)")
    p.add_argument("--all", action="store_true", help="every run in the store")
    p.add_argument("--where", help='filter, e.g. "bn=after,lr=0.01"')
    p.add_argument("--sort", default="test_acc", help="column to sort by (default test_acc, best first)")
    p.add_argument("--by", "--group-by", dest="by", metavar="SETTINGS",
                   help="group by these settings, e.g. model,bn: mean, std and 95%% CI over seeds")
    p.add_argument("--format", default="table", choices=("table", "csv", "json"), help="how to print the rows")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("compare", help="the effect of one setting, with a Welch t-test over seeds")
    add_store(p)
    p.add_argument("--sweep", required=True, help="sweep name (bnlab results lists them)")
    p.add_argument("--by", required=True, help="the setting to compare, e.g. bn")
    p.add_argument("--metric", default="test_acc", help="train_acc, test_acc, train_loss or test_loss")
    p.add_argument("--where", help='restrict to runs matching, e.g. "lr=0.01"')
    _add_json(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="learning curves of a sweep: mean over seeds with a band")
    add_store(p)
    p.add_argument("--sweep", required=True, help="sweep name (bnlab results lists them)")
    p.add_argument("--metric", default="test_acc", help="train_acc, test_acc, train_loss or test_loss")
    p.add_argument("--by", "--group-by", dest="by", metavar="SETTINGS",
                   help="one curve per value of these settings (default: the gridded ones)")
    p.add_argument("--where", help='restrict to runs matching, e.g. "lr=0.01"')
    p.add_argument("-o", "--output", default="curves.png", help="PNG file to write")
    _add_json(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("report", help="one self-contained HTML report of a sweep")
    add_store(p)
    p.add_argument("--sweep", required=True, help="sweep name (bnlab results lists them)")
    p.add_argument("--by", help="setting whose effect to test (default: the first gridded one)")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    _add_json(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("doctor", help="check a checkpoint's BN layers against the data (and --fix them)",
                       description="Check every BN layer of a checkpoint against the data. Exit status: 0 when "
                                   "healthy, 1 when it finds a problem (also with --fix: the status describes the "
                                   "checkpoint given), 2 on an error.")
    _add_checkpoint(p, "the data to check it against")
    _add_device(p)
    p.add_argument("--limit", type=int, default=10000, help="training images used for statistics (default 10000)")
    p.add_argument("--fix", action="store_true", help="recalibrate the running statistics (precise BN)")
    p.add_argument("-o", "--output", help="with --fix: where to write the recalibrated checkpoint")
    _add_json(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("fold", help="merge a checkpoint's BN layers into their Conv/Linear neighbours (for shipping)")
    _add_checkpoint(p, "with --check: the data to compare on")
    p.add_argument("-o", "--output", required=True, help="where to write the folded checkpoint")
    p.add_argument("--check", action="store_true", help="compare test accuracy before and after folding")
    _add_json(p)
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("export", help="write a checkpoint as ONNX, BN folded first, checked in onnxruntime",
                       description="Fold BN, export to ONNX with a dynamic batch dimension, and check the file in "
                                   "onnxruntime on 256 test images (outputs within 1e-4, same top-1 class), else "
                                   "fail and write nothing. Needs: pip install 'bnlab[export]'.")
    _add_checkpoint(p, "the test images the file is checked on")
    p.add_argument("-o", "--output", required=True, metavar="ONNX", help="the .onnx file to write")
    p.add_argument("--bake-standardization", action=argparse.BooleanOptionalAction, default=True,
                   help="put the training standardization in the graph, so it takes raw pixel values 0..255 as "
                        "float32 (--no-bake-standardization: standardized input; mean/std in the metadata)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-data-check", action="store_true", help="check on random inputs instead of test images")
    _add_json(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot-activations", help="percentiles of tracked layer inputs over training")
    add_store(p)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint trained with --track-activations")
    p.add_argument("--checkpoint", dest="checkpoint_option", help=argparse.SUPPRESS)  # the older spelling
    p.add_argument("--run", help="instead of a checkpoint: a sweep run id (or unique prefix) from `bnlab results`")
    p.add_argument("--layer", help="one layer (e.g. 9 or 9:Sigmoid); default: every tracked layer")
    p.add_argument("-o", "--output", default="ics.png", help="PNG file to write")
    _add_json(p)
    p.set_defaults(func=cmd_plot_activations)

    from bnlab.experiments.reproduce import recipe_names

    p = sub.add_parser("reproduce", help="rerun a tutorial's experiment and show it next to the tutorial's claim")
    p.add_argument("name", help=f"the recipe: {', '.join(recipe_names())}")
    add_store(p)
    p.add_argument("--quick", action="store_true",
                   help="the recipe's small size (about 3 minutes on 2 cores; a separate sweep <name>-quick)")
    p.add_argument("--epochs", type=int, help="fewer (or more) epochs than the recipe")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the recipe's)")
    p.add_argument("--dataset", help="run the recipe on another dataset (e.g. fashion-mnist when MNIST is absent)")
    _add_data_dir(p)
    p.add_argument("--workers", type=_workers, default="auto", metavar="N|auto",
                   help="parallel worker processes (default auto: see bnlab sweep --help)")
    p.add_argument("--executor", default="local", choices=("local", "ray"), help="where runs execute")
    p.add_argument("-o", "--output", "--figure", dest="output", metavar="PNG",
                   help="where to write the recipe's figure (ioffe: the Fig. 1 trio, <sweep>-fig1.png; a sweep over "
                        "a numeric setting: the metric against it, <sweep>-<setting>.png)")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    _add_json(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("demo", help="the main job on the offline default data (what `make demo` runs)")
    _add_data_dir(p)
    p.add_argument("-o", "--output", "--out", dest="output", default="out/demo", metavar="DIR",
                   help="directory for the demo's files")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per setting (default 2)")
    p.add_argument("--workers", type=_workers, default="auto", metavar="N|auto",
                   help="parallel workers (default auto: one process using both cores for the demo's CNN)")
    _add_json(p)
    p.set_defaults(func=cmd_demo)

    recipes = sub.add_parser("recipes", help="the sweep configs shipped with bnlab (run one: bnlab sweep NAME)")
    rsub = recipes.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)
    p = rsub.add_parser("list", help="each recipe with its dataset, grid and size")
    _add_json(p)
    p.set_defaults(func=cmd_recipes_list)
    p = rsub.add_parser("show", help="print a recipe's TOML (a starting point for your own config)")
    p.add_argument("name", help="a recipe's name")
    _add_json(p)
    p.set_defaults(func=cmd_recipes_show)
    parser.commands = sub.choices  # name -> its parser, for errors about its options
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"bnlab: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    from bnlab.train.distributed import env_rank_world, exit_group_process

    if env_rank_world() is not None:  # one process of a data-parallel group (`--nproc`, torchrun)
        exit_group_process(code)
    return code


def _main(argv: list[str] | None) -> int:
    _early_workers(list(argv) if argv is not None else sys.argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would blame the top-level parser; name the command's options instead
        cmd = parser.commands.get(args.command, parser)
        from bnlab.errors import suggest

        flags = [o for a in cmd._actions for o in a.option_strings]
        hints = "".join(suggest(x.split("=")[0], flags) for x in extra if x.startswith("--"))
        cmd.error(f"unrecognized arguments: {' '.join(extra)}{hints}")
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `train --nproc N` runs it again N times
    warnings.showwarning = _show_warning
    try:
        return args.func(args) or 0
    except BnlabError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        return 130
    except sqlite3.Error as e:  # the run store failed under us (disk, another program): finished runs are kept
        print(f"bnlab: error: the run store failed ({e}): the runs finished so far are kept; check the disk and "
              "run the same command again to resume", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`bnlab results | head`): stop quietly, as Unix tools do; stdout is
        # pointed at /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
