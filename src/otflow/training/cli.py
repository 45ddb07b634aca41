"""The ``otflow`` command line (also ``python -m otflow``).

    otflow fit DATA [--backend torch] [--config fit.toml] [--out model.safetensors] [--plot fit.png] ...
    otflow fit DATA.csv --context-columns 3,4 ...   (a conditional flow p(x | c): columns 3 and 4 are c)
    otflow sample MODEL -n 1000 -o samples.npy [--context 0.5,1.0 | --context contexts.npy]
    otflow log-prob MODEL DATA [-o logp.npy]
    otflow plot MODEL [-o model.png] [--data DATA]
    otflow datasets

Image data (an MNIST-style IDX file or directory, CIFAR-10's binary batches, an ``.npy``/
``.npz`` of uint8 images, ``digits-images``) train FFJORD's multiscale model; ``fit`` then
prints the held-out bits per dimension (the standard, dequantized number: on the source's
test part when it has one, else on the validation split), ``sample`` writes uint8 images
and ``plot`` a grid of samples beside data.

Exit status: 0 on success; 1 when training failed (``TrainingFailed``: repeated
numerical faults; the message names the last good checkpoint); 2 for bad input
(the message names the problem and the fix); 130 when interrupted (Ctrl-C or
SIGTERM during ``fit``: the final checkpoint and the model so far are written
first, and ``--resume CHECKPOINT`` continues the run exactly).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

# fit options exposed as flags (all others through --config or --set KEY=VALUE)
_FIT_FLAGS = {
    "max_iters": int, "batch_size": int, "lr": float, "method": str, "steps": int, "gradient": str,
    "lambda_kinetic": float, "lambda_jacobian": float, "max_time": float, "seed": int, "dtype": str,
    "rtol": float, "atol": float, "n_blocks": int, "eval_every": int, "checkpoint": str, "checkpoint_every": int,
    "history": str, "n_train": int, "T": float, "patience": int, "epochs": float, "max_steps": int,
    "max_failures": int, "lr_backoff": float, "n_scales": int, "blocks_per_scale": int, "logit_alpha": float,
    "objective": str, "coupling": str, "flow_matching_iters": int, "flow_matching_lr": float,
    "flow_matching_batch_size": int, "flow_matching_time_power": float,
}


def _standardize_flag(text: str):
    """``--standardize auto|true|false``."""
    value = {"auto": "auto", "true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")
    return value


_FIT_FLAGS["standardize"] = _standardize_flag


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otflow", description="RNODE continuous normalizing flows on torch and JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a flow on DATA (a dataset name, a .npy/.npz/.csv file, or image data: "
                       "IDX files, CIFAR-10 binary, uint8 .npy/.npz, digits-images)")
    f.add_argument("data")
    f.add_argument("--backend", default=None, help="torch or jax (default: torch if installed)")
    f.add_argument("--device", default=None, help="cpu, cuda, cuda:1, gpu ...")
    f.add_argument("--config", default=None, help="a TOML or YAML file of fit options")
    f.add_argument("--out", "-o", default="otflow_model.safetensors", help="where to save the trained flow")
    f.add_argument("--plot", default=None, help="also write a PNG of the result here")
    f.add_argument("--resume", default=None, help="continue from this checkpoint (written by --checkpoint); the "
                   "result equals an uninterrupted run")
    f.add_argument("--init", default=None, metavar="MODEL", help="start from this saved flow (e.g. a "
                   "--objective flow-matching result, fine-tuned with the RNODE objective)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--test-images", type=int, default=None, metavar="N",
                   help="image data: evaluate the held-out bits/dim on the first N test images (default: all)")
    f.add_argument("--context-columns", default=None, metavar="I,J,...",
                   help="fit a conditional flow p(x | c): these columns of the data file (0-based, comma-separated) "
                   "are the context c, the others are x")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any fit option, e.g. --set hidden=[32,32] (JSON values)")
    for name, typ in _FIT_FLAGS.items():
        f.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)

    s = sub.add_parser("sample", help="draw samples from a saved flow")
    s.add_argument("model")
    s.add_argument("-n", type=int, default=1000)
    s.add_argument("-o", "--out", required=True, help=".npy file to write (uint8 images for an image model)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--context", default=None, metavar="C",
                   help="a conditional flow's context: comma-separated values (one context for every sample) or a "
                   ".npy/.csv file of n rows (one per sample)")
    s.add_argument("--backend", default=None)
    s.add_argument("--device", default=None)

    lp = sub.add_parser("log-prob", help="log-density of DATA under a saved flow")
    lp.add_argument("model")
    lp.add_argument("data")
    lp.add_argument("-o", "--out", default=None, help=".npy file for the per-row values")
    lp.add_argument("--context-columns", default=None, metavar="I,J,...",
                    help="a conditional flow: the context columns of DATA (default: those it was fitted with)")
    lp.add_argument("--backend", default=None)
    lp.add_argument("--device", default=None)

    pl = sub.add_parser("plot", help="a PNG of a saved flow (2-D: density, samples, trajectories; images: a grid "
                        "of samples beside data)")
    pl.add_argument("model")
    pl.add_argument("-o", "--out", default=None)
    pl.add_argument("--data", default=None, help="data to draw beside the samples (name or file)")
    pl.add_argument("--backend", default=None)

    sub.add_parser("datasets", help="list the embedded datasets")
    return p


def _load_data(spec: str, n: int = 5000, seed: int = 12345) -> np.ndarray:
    from . import datasets

    if datasets.is_image_source(spec):
        return datasets.load_images(spec).train
    if spec in datasets.names():
        return datasets.sample(spec, n, seed=seed)
    return datasets.load_array(spec)


def _context_columns(spec: str) -> list[int]:
    """``"3,4"`` as column indices.

    :raises ValueError: for anything but comma-separated integers, or a repeated column.
    """
    try:
        columns = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--context-columns expects comma-separated column numbers (0-based), e.g. 3,4; "
                         f"got {spec!r}") from None
    if not columns or len(set(columns)) != len(columns):
        raise ValueError(f"--context-columns expects distinct column numbers (0-based), e.g. 3,4; got {spec!r}")
    return columns


def _split_columns(table: np.ndarray, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, c)``: the data file's columns other than ``columns``, and those.

    :raises ValueError: a table that is not 2-D, a column out of range, or no column left for x.
    """
    if table.ndim != 2:
        raise ValueError(f"--context-columns needs a table (n_samples, n_columns); the data have shape {table.shape}")
    d = table.shape[1]
    bad = [c for c in columns if not -d <= c < d]
    if bad:
        raise ValueError(f"--context-columns {bad} out of range: the data have {d} columns (0 to {d - 1})")
    chosen = sorted({c % d for c in columns})
    if len(chosen) != len(columns):
        raise ValueError(f"--context-columns names a column twice ({columns})")
    if len(chosen) == d:
        raise ValueError(f"--context-columns takes all {d} columns; leave at least one for x")
    rest = [i for i in range(d) if i not in chosen]
    return table[:, rest], table[:, [c % d for c in columns]]


def _cmd_fit(args) -> int:
    from .checkpoint import jsonable
    from .loop import fit

    options = {k: getattr(args, k) for k in _FIT_FLAGS if getattr(args, k) is not None}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. --set hidden=[32,32]), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if isinstance(options.get("hidden"), list):
        options["hidden"] = tuple(options["hidden"])
    if args.quiet:
        options["quiet"] = True
    from . import datasets

    images = datasets.load_images(args.data) if datasets.is_image_source(args.data) else None
    data, context, columns = (images if images is not None else args.data), None, None
    if args.context_columns is not None:
        if images is not None or args.data in datasets.names():
            raise ValueError("--context-columns needs a table of numbers (.csv, .npy, .npz) whose columns hold x and "
                             f"c; {args.data!r} is {'image data' if images is not None else 'an embedded data set'}")
        if args.plot:
            raise ValueError("--plot draws unconditional flows; a conditional flow (--context-columns) has one "
                             "density per context: drop --plot and use otflow sample --context ...")
        columns = _context_columns(args.context_columns)
        data, context = _split_columns(datasets.load_array(args.data), columns)
    start = time.perf_counter()
    flow = fit(data, context=context, backend=args.backend, device=args.device,
               config=args.config, resume=args.resume, init=args.init, **options)
    info = flow.fit_info
    if info["data_parallel"]["rank"] != 0:
        return 0  # a data-parallel run (torchrun): the main process saves, reports and plots
    metadata = {"data": args.data, "fit": {k: v for k, v in info.items() if k != "last"}}
    if columns is not None:
        metadata["context_columns"] = columns
    if images is not None:
        metadata["n_levels"] = images.n_levels
    path = flow.save(args.out, metadata=jsonable(metadata))
    best = (f"best validation NLL {info['best_val_nll']:.4f} (iteration {info['best_iteration']})"
            if info["best_iteration"] >= 0 else "no validation")
    line = (f"trained {info['iterations']} iterations in {time.perf_counter() - start:.1f} s on {info['backend']}; "
            f"{best}; saved {path}")
    print(line)
    if info.get("interrupted"):
        ck = info.get("checkpoint")
        how = (f"checkpoint {ck}; continue with: otflow fit {args.data} --resume {ck}" if ck else
               "no --checkpoint was given, so the run cannot be resumed")
        print(f"otflow fit: interrupted at iteration {info['iterations']}; {how}", file=sys.stderr)
        return 130
    if images is not None:
        print(_held_out_bits_per_dim(flow, images, args.test_images))
        if args.plot:
            from .plotting import plot_image_samples

            print(f"plot: {plot_image_samples(flow, args.plot, data=images.train, n_levels=images.n_levels)}")
        return 0
    if args.data in datasets.names() and datasets.info(args.data).entropy is not None:
        last = info["last"] or {}
        ent = datasets.info(args.data).entropy
        if "val_nll" in last:
            print(f"KL gap (validation NLL − true entropy {ent:.4f}): {info['best_val_nll'] - ent:.4f} "
                  f"± {last.get('val_nll_se', float('nan')):.4f}")
    if args.plot:
        from .plotting import plot_flow

        data = _load_data(args.data) if args.data in datasets.names() else None
        print(f"plot: {plot_flow(flow, args.plot, data=data, title=f'otflow fit {args.data}')}")
    return 0


def _held_out_bits_per_dim(flow, images, limit: int | None) -> str:
    """The line ``otflow fit`` prints for image data: the standard bits/dim on the test part
    (its first ``limit`` images), or the best validation bits/dim when there is no test part."""
    estimator = ((flow.fit_info or {}).get("options") or {}).get("eval_estimator") or "exact"
    how = "exact trace" if estimator == "exact" else "Hutchinson divergence estimate"
    if images.test is not None:
        test = images.test if limit is None else images.test[:limit]
        bpd = flow.bits_per_dim(test, n_bins=images.n_levels, estimator=estimator)
        return (f"held-out bits/dim (standard: uniform dequantization, {how}) on {len(test)} test images "
                f"({images.n_levels} levels): {bpd.mean:.4f} ± {bpd.standard_error:.4f}")
    values = [r["val_bpd"] for r in flow.history or [] if r.get("val_bpd") is not None]
    if not values:
        return "held-out bits/dim: none (no test part and no validation split: val_fraction=0)"
    return (f"held-out bits/dim (standard: uniform dequantization, {how}) on the validation split, best "
            f"evaluation ({images.n_levels} levels; the data have no test part): {min(values):.4f}")


def _image_levels_of(model_path) -> int:
    """The pixel levels an image model was trained on (saved by ``otflow fit``; else 256)."""
    from ..cnf.serialize import read_file

    _, header = read_file(model_path)
    return int((header.get("metadata") or {}).get("n_levels", 256))


def _is_image_model(flow) -> bool:
    return hasattr(flow, "sample_levels")


def _cmd_sample(args) -> int:
    from ..cnf.flow import load

    flow = load(args.model, backend=args.backend, device=args.device)
    if _is_image_model(flow):
        x = flow.sample_levels(args.n, seed=args.seed, n_bins=_image_levels_of(args.model))
        np.save(args.out, x)
        print(f"wrote {args.n} uint8 images of shape {x.shape[1:]} to {args.out}")
        return 0
    context = _sample_context(args.context, flow, args.n)
    x = flow.sample(args.n, seed=args.seed) if context is None else flow.sample(args.n, seed=args.seed,
                                                                                context=context)
    np.save(args.out, x)
    print(f"wrote {args.n} samples of shape {x.shape[1:]} to {args.out}")
    return 0


def _sample_context(spec: str | None, flow, n: int):
    """The contexts of ``otflow sample --context``: None, one vector, or one row per sample.

    :raises ValueError: a context for an unconditional flow, none for a conditional one, or
        values that are neither numbers nor a readable file.
    """
    dim = getattr(flow, "context_dim", 0)
    if spec is None:
        if dim:
            raise ValueError(f"this flow is conditional (a context of {dim} value(s)); pass --context with {dim} "
                             "comma-separated values, or a .npy/.csv file of one row per sample")
        return None
    if not dim:
        raise ValueError("this flow is unconditional; drop --context")
    if Path(spec).exists():
        from . import datasets

        return datasets.load_array(spec)
    try:
        return np.asarray([float(v) for v in spec.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"--context {spec!r} is neither {dim} comma-separated numbers nor an existing file") from None


def _model_context_columns(model_path) -> list[int] | None:
    """The context columns a conditional model was fitted with (saved by ``otflow fit``)."""
    from ..cnf.serialize import read_file

    _, header = read_file(model_path)
    return (header.get("metadata") or {}).get("context_columns")


def _cmd_log_prob(args) -> int:
    from ..cnf.flow import load

    flow = load(args.model, backend=args.backend, device=args.device)
    x = _load_data(args.data)
    if getattr(flow, "context_dim", 0):
        spec = args.context_columns
        columns = _context_columns(spec) if spec is not None else _model_context_columns(args.model)
        if columns is None:
            raise ValueError("this flow is conditional; pass --context-columns to say which columns of DATA hold "
                             "the context")
        x, context = _split_columns(x, columns)
        logp = np.asarray(flow.log_prob(x, context=context), dtype=np.float64)
        return _report_log_prob(logp, args.out)
    if _is_image_model(flow):
        bpd = flow.bits_per_dim(x, n_bins=_image_levels_of(args.model))
        print(f"bits/dim (standard: uniform dequantization, exact trace) = {bpd.mean:.6f} ± {bpd.standard_error:.6f} "
              f"over {len(x)} images")
        if args.out:
            np.save(args.out, bpd.per_image)
        return 0
    return _report_log_prob(np.asarray(flow.log_prob(x), dtype=np.float64), args.out)


def _report_log_prob(logp: np.ndarray, out) -> int:
    se = logp.std(ddof=1) / np.sqrt(len(logp)) if len(logp) > 1 else float("nan")
    print(f"mean log p = {logp.mean():.6f} ± {se:.6f} (standard error) over {len(logp)} rows; NLL = {-logp.mean():.6f}")
    if out:
        np.save(out, logp)
    return 0


def _cmd_plot(args) -> int:
    from ..cnf.flow import load
    from .plotting import plot_flow

    flow = load(args.model, backend=args.backend)
    out = args.out or str(Path(args.model).with_suffix(".png"))
    data = _load_data(args.data) if args.data else None
    if _is_image_model(flow):
        from .plotting import plot_image_samples

        print(f"wrote {plot_image_samples(flow, out, data=data, n_levels=_image_levels_of(args.model))}")
        return 0
    print(f"wrote {plot_flow(flow, out, data=data)}")
    return 0


def _cmd_datasets(args) -> int:
    from . import datasets

    for name in datasets.names():
        info = datasets.info(name)
        extra = f", true entropy {info.entropy:.4f}" if info.entropy is not None else ""
        print(f"{name:14s} dim {info.dim}{extra}: {info.description}")
    return 0


def main(argv=None) -> int:
    """Run the ``otflow`` command line.

    :param argv: the arguments (``sys.argv[1:]`` when None).
    :returns: the exit status: 0 success, 1 training failed, 2 bad input, 130 interrupted.
    """
    args = _parser().parse_args(argv)
    handler = {"fit": _cmd_fit, "sample": _cmd_sample, "log-prob": _cmd_log_prob, "plot": _cmd_plot,
               "datasets": _cmd_datasets}[args.command]
    from ..base.errors import OtflowError
    from .faults import TrainingFailed

    try:
        return handler(args)
    except TrainingFailed as e:
        print(f"otflow {args.command}: training failed: {e}", file=sys.stderr)
        return 1
    except (OtflowError, ValueError, TypeError, OSError, ImportError) as e:
        print(f"otflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"otflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
