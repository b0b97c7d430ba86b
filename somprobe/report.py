"""One self-contained HTML report of a run: figures, tables, metadata, commands.

The report embeds every PNG of ``run.figures_dir`` as base64, renders small summary tables in
full and links big ones by relative path, and lists the model, code stores, SOMs and attacks
from their JSON files and the commands from ``run.commands_log``. It needs no network, CDN or
JavaScript. Every text read from a file is HTML-escaped. Missing parts say which command makes
them instead of failing.
"""
from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import html
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .plots import natural_key, natural_sorted
from .run import Run, atomic_write_bytes

__all__ = ["write_report", "render_report", "SECTIONS", "SMALL_TABLES", "FLOAT_FORMAT", "TABLE_GLOBS"]

#: How numbers in rendered tables are formatted (4 significant digits).
FLOAT_FORMAT = "{:.4g}"
#: Tables rendered in full (at most ``_MAX_ROWS`` rows); others are linked with their row count.
SMALL_TABLES = ("weight_similarity", "correct_incorrect", "shift_summary", "attacks")
SMALL_TABLES += ("detect/summary",)  # somprobe detect (issue 11)
SMALL_TABLES += ("geometry/table1", "geometry/noise")  # somprobe geometry (issue 11)
SMALL_TABLES += ("decoders/cards",)  # somprobe decoder (issue 9)
_MAX_ROWS = 300
_MAX_CELL = 300

# (section id, heading, figure-name pattern, command that makes its content)
SECTIONS = (
    ("model", "Model & data", r"^(model|data|samples|classifier)([-_].*)?$", "somprobe train"),
    ("soms", "SOM training", r"^(curves|som|umatrix)([-_].*)?$", "somprobe fit"),
    ("density", "BMU density", r"^density([-_].*)?$", "somprobe analyze"),
    ("class-bmus", "BMUs per class", r"^class-bmus([-_].*)?$", "somprobe analyze"),
    ("dclass", "D_class: distance to the class centre", r"^(dclass|centres)([-_].*)?$", "somprobe analyze"),
    ("weights", "Unit-weight similarity", r"^weight-(distances|similarity)([-_].*)?$", "somprobe analyze"),
    ("centres", "Class-centre similarity", r"^centre-similarity([-_].*)?$", "somprobe analyze"),
    ("correct", "Correct vs incorrect predictions", r"^correct-incorrect([-_].*)?$", "somprobe analyze"),
    ("attacks", "Attacks", r"^attacks?([-_].*)?$", "somprobe attack"),
    ("shifts", "BMU shifts under perturbation", r"^shifts?([-_].*)?$", "somprobe shift"),
    ("geometry", "Decision-boundary geometry (study 002)", r"^geometry([-_].*)?$",
     "somprobe geometry"),  # issue 11
    ("detect", "Adversarial detection", r"^detect([-_].*)?$", "somprobe detect"),  # issue 11
    ("decoders", "Decoders: latent → image", r"^decoders([-_].*)?$", "somprobe decoder"),  # issue 9
    ("connectivity", "Connectivity: linear and NEB paths (study 001)", r"^paths([-_].*)?$",
     "somprobe connect"),  # issue 9
    ("barriers", "Barriers, region paths and convexity (studies 000, 002)",
     r"^(barrier|region|convexity)([-_].*)?$",
     "somprobe connect --method linear,barrier,regions (and somprobe convexity)"),  # issue 10
)
#: Tables outside ``analysis/`` that the report shows (globs under the run root).
TABLE_GLOBS: tuple[str, ...] = ()
TABLE_GLOBS += ("detect/*.csv",)  # somprobe detect (issue 11)
TABLE_GLOBS += ("geometry/*.csv",)  # somprobe geometry (issue 11)
TABLE_GLOBS += ("decoders/*.csv",)  # somprobe decoder (issue 9)
TABLE_GLOBS += ("paths/*/convexity_summary.csv",)  # somprobe convexity (issue 10)
TABLE_GLOBS += ("paths/*/table1.csv", "paths/*/paths_summary.csv", "paths/*/paths.csv",
                "paths/*/pairs.csv")  # somprobe connect (issue 9)
SMALL_TABLES += ("table1", "paths_summary")  # somprobe connect (issue 9)
SMALL_TABLES += ("convexity_summary",)  # issue 10
# Which tables belong to which section (rendered or linked there; the rest under "Tables").
# Entries are table names or fnmatch patterns ("paths/*/table1").
_SECTION_TABLES = {
    "dclass": ("dclass", "dclass_samples", "centres"),
    "density": ("density",),
    "class-bmus": ("class_bmus",),
    "weights": ("weight_similarity",),
    "centres": ("centre_similarity",),
    "correct": ("correct_incorrect",),
    "attacks": ("attacks",),
    "shifts": ("shift_summary", "shifts"),
    "detect": ("detect/summary", "detect/attacks", "detect/scores", "detect/roc"),  # issue 11
    "geometry": ("geometry/table1", "geometry/noise", "geometry/curvature", "geometry/eigenvalues",
                 "geometry/projections", "geometry/hsweep"),  # issue 11
    "decoders": ("decoders/cards",),  # issue 9
    "connectivity": ("paths/*/table1", "paths/*/paths_summary", "paths/*/paths",
                     "paths/*/pairs"),  # issue 9
    "barriers": ("paths/*/convexity_summary",),  # issue 10
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1200px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #0072b2;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em;display:block;max-width:100%;
overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f2f4f7}td.t,th.t{text-align:left}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
.missing{color:#8a4b00;background:#fff6e5;padding:.4em .7em;border-left:3px solid #e69f00}
nav ul{columns:2}code{background:#f2f4f7;padding:0 .2em}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else FLOAT_FORMAT.format(float(v))
    if isinstance(v, (dict, list, tuple)):
        s = json.dumps(v, default=str)
        return s if len(s) <= _MAX_CELL else s[: _MAX_CELL - 1] + "…"
    if v is None:
        return ""
    return str(v)


def _missing(what: str, command: str) -> str:
    return (f'<p class="missing">{_e(what)} — not run yet: run '
            f'<code>{_e(command)}</code></p>')


def _read_json(path: Path):
    """(object, None) or (None, error text): a broken file is reported, never fatal."""
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"could not read {path.name}: {e}"


def _flatten(obj, prefix="") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v and len(v) <= 20:
                out.update(_flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix or "value"] = obj
    return out


def _kv_table(obj: dict) -> str:
    rows = "".join(f'<tr><th class="t">{_e(k)}</th><td class="t">{_e(_fmt(v))}</td></tr>'
                   for k, v in _flatten(obj).items())
    return f"<table>{rows}</table>"


def _wide_table(records: dict[str, dict], first: str) -> str:
    """One column per record (e.g. per split), one row per (flattened) key."""
    flat = {name: _flatten(r) for name, r in records.items()}
    keys: list[str] = []
    for f in flat.values():
        keys += [k for k in f if k not in keys]
    head = f'<tr><th class="t">{_e(first)}</th>' + "".join(
        f'<th class="t">{_e(n)}</th>' for n in flat) + "</tr>"
    body = "".join(
        f'<tr><th class="t">{_e(k)}</th>' + "".join(
            f'<td class="t">{_e(_fmt(f.get(k)))}</td>' for f in flat.values()) + "</tr>"
        for k in keys)
    return f"<table>{head}{body}</table>"


def _sort_tidy(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("layer", "size", "split", "perturbation", "class", "correct", "attack")
            if c in df.columns]
    if not keys:
        return df
    return df.sort_values(keys, key=lambda s: s.map(lambda v: tuple(natural_key(v))), kind="stable")


def _df_table(df: pd.DataFrame, *, index: bool = False) -> str:
    if index:
        df = df.reset_index()
    more = ""
    if len(df) > _MAX_ROWS:
        more = f"<p>showing the first {_MAX_ROWS} of {len(df)} rows</p>"
        df = df.head(_MAX_ROWS)
    head = "<tr>" + "".join(f'<th class="t">{_e(c)}</th>' for c in df.columns) + "</tr>"
    rows = []
    for rec in df.itertuples(index=False, name=None):
        cells = "".join(
            f'<td class="t">{_e(_fmt(v))}</td>' if isinstance(v, str) else f"<td>{_e(_fmt(v))}</td>"
            for v in rec)
        rows.append(f"<tr>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>{more}"


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
    return max(lines - 1, 0)


def _link(run: Run, path: Path) -> str:
    rel = path.relative_to(run.root).as_posix()
    return f'<a href="{_e(quote(rel))}"><code>{_e(rel)}</code></a>'


def _read_table(path: Path):
    try:
        return pd.read_csv(path), None
    except pd.errors.EmptyDataError:
        return pd.DataFrame(), None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        return None, f"could not read {path.name}: {e}"


def _dclass_medians(df: pd.DataFrame) -> pd.DataFrame | None:
    """Median over classes of D_class, one row per layer, one column per (size, split)."""
    need = {"layer", "size", "split", "d_class"}
    if not need <= set(df.columns) or df.empty:
        return None
    d = df.assign(d_class=pd.to_numeric(df["d_class"], errors="coerce"),
                  size=df["size"].astype(str), split=df["split"].astype(str),
                  layer=df["layer"].astype(str))
    piv = d.pivot_table(index="layer", columns=["size", "split"], values="d_class",
                        aggfunc="median")
    piv = piv.reindex(natural_sorted(d["layer"]))
    cols = sorted(piv.columns, key=lambda c: (natural_key(c[0]),
                                              {"som-tr": 0, "som-val": 1}.get(c[1], 2),
                                              natural_key(c[1])))
    piv = piv[cols]
    piv.columns = [f"{s} {sp}" for s, sp in piv.columns]
    piv.index.name = "layer"
    return piv


def _figure_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = path.stem
    return (f'<figure id="fig-{_e(name)}"><img alt="{_e(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(name)} '
            f"(<code>{_e(path.name)}</code>)</figcaption></figure>")


def _section_of(figure_name: str) -> str:
    for sid, _, pattern, _ in SECTIONS:
        if re.match(pattern, figure_name):
            return sid
    return "other"


def _collect(run: Run) -> dict:
    """Everything the report shows, read from disk; nothing is computed beyond table medians."""
    info: dict = {"errors": []}
    info["meta"] = None
    if run.model_meta.is_file():
        info["meta"], err = _read_json(run.model_meta)
        if err:
            info["errors"].append(err)
    manifests = {}
    if run.codes_root.is_dir():
        for p in sorted(run.codes_root.glob("*/manifest.json"), key=lambda p: natural_key(p.parent.name)):
            obj, err = _read_json(p)
            manifests[p.parent.name] = obj if obj is not None else {"error": err}
    info["manifests"] = manifests
    soms = {}
    if run.soms_dir.is_dir():
        for p in sorted(run.soms_dir.glob("*.json"), key=lambda p: natural_key(p.stem)):
            obj, err = _read_json(p)
            soms[p.stem] = obj if obj is not None else {"error": err}
    info["soms"] = soms
    attacks = {}
    attacks_root = run.root / "attacks"
    if attacks_root.is_dir():
        for p in sorted(attacks_root.glob("*/summary.json"), key=lambda p: natural_key(p.parent.name)):
            obj, err = _read_json(p)
            attacks[p.parent.name] = obj if obj is not None else {"error": err}
    info["attacks"] = attacks
    tables = ({p.stem: p for p in sorted(run.analysis_dir.glob("*.csv"),
                                          key=lambda p: natural_key(p.stem))}
              if run.analysis_dir.is_dir() else {})
    # Capabilities with a folder of their own (paths/, geometry/, detect/): tables are named by
    # their path under the run without ".csv", e.g. "paths/default/table1".
    for pattern in TABLE_GLOBS:
        for p in sorted(run.root.glob(pattern), key=lambda p: natural_key(str(p))):
            tables[p.relative_to(run.root).with_suffix("").as_posix()] = p
    info["tables"] = tables
    info["curves"] = run.curves_csv if run.curves_csv.is_file() else None
    info["figures"] = (sorted(run.figures_dir.glob("*.png"), key=lambda p: natural_key(p.stem))
                       if run.figures_dir.is_dir() else [])
    info["commands"] = None
    if run.commands_log.is_file():
        try:
            info["commands"] = [ln for ln in run.commands_log.read_text(errors="replace").splitlines()
                                if ln.strip()]
        except OSError as e:
            info["errors"].append(f"could not read {run.commands_log.name}: {e}")
    return info


def _table_block(run: Run, name: str, path: Path) -> str:
    df, err = _read_table(path)
    if err:
        return f'<p class="missing">{_e(err)}</p>'
    title = f"<h3>Table <code>{_e(name)}</code></h3>"
    if name in SMALL_TABLES or name.rsplit("/", 1)[-1] in SMALL_TABLES:
        if df.empty:
            return title + f"<p>{_link(run, path)}: no rows</p>"
        return title + f"<p>{_link(run, path)}, {len(df)} rows</p>" + _df_table(_sort_tidy(df))
    out = title + f"<p>{_link(run, path)}, {_count_rows(path)} rows</p>"
    if name == "dclass":
        med = _dclass_medians(df)
        if med is not None:
            out += ("<p>Median D_class over classes (torus distance, grid units), per layer; "
                    "columns are SOM size and split:</p>" + _df_table(med, index=True))
    return out


def render_report(run: Run | str | os.PathLike, *, title: str | None = None) -> str:
    """The report of ``run`` as an HTML string (see :func:`write_report`)."""
    run = run if isinstance(run, Run) else Run(run)
    info = _collect(run)
    anything = (info["meta"] is not None or info["manifests"] or info["soms"] or info["attacks"]
                or info["tables"] or info["figures"] or info["curves"] is not None)
    if not anything:
        raise AnalysisError(
            f"run directory {run.root} has nothing to report (no model, code stores, SOMs, "
            "tables or figures): run `somprobe train` (or pass a pretrained model), then "
            "`somprobe extract`, `somprobe fit` and `somprobe analyze` first"
        )
    title = title or f"somprobe report: {run.root.name or run.root}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    figures_by_section: dict[str, list[Path]] = {}
    for p in info["figures"]:
        figures_by_section.setdefault(_section_of(p.stem), []).append(p)
    tables = dict(info["tables"])
    body: list[str] = []
    nav: list[str] = []

    def section(sid: str, heading: str, content: str):
        nav.append(f'<li><a href="#{_e(sid)}">{_e(heading)}</a></li>')
        body.append(f'<section id="{_e(sid)}"><h2>{_e(heading)}</h2>{content}</section>')

    # commands --------------------------------------------------------------------------------
    if info["commands"]:
        cmds = "<pre>" + "\n".join(_e(c) for c in info["commands"]) + "</pre>"
    else:
        cmds = ("<p>No command log (<code>commands.txt</code>): commands run through the "
                "<code>somprobe</code> CLI are recorded there.</p>")
    section("commands", "Commands", cmds)

    for sid, heading, _, command in SECTIONS:
        parts: list[str] = []
        if sid == "model":
            if info["meta"] is not None:
                parts.append(f"<h3>Model ({_link(run, run.model_meta)})</h3>")
                parts.append(_kv_table(info["meta"]) if isinstance(info["meta"], dict)
                             else f"<pre>{_e(_fmt(info['meta']))}</pre>")
            else:
                parts.append(_missing("trained model metadata (model/meta.json)",
                                      "somprobe train"))
            if info["manifests"]:
                parts.append("<h3>Code stores</h3>" + _wide_table(info["manifests"], "split"))
            else:
                parts.append(_missing("code stores", "somprobe extract"))
        elif sid == "soms":
            if info["soms"]:
                parts.append("<h3>SOMs</h3>" + _wide_table(info["soms"], "SOM"))
            else:
                parts.append(_missing("SOMs", "somprobe fit"))
            if info["curves"] is not None:
                parts.append(f"<p>Training curves: {_link(run, info['curves'])}, "
                             f"{_count_rows(info['curves'])} rows</p>")
        elif sid == "attacks" and info["attacks"]:
            parts.append("<h3>Attack summaries</h3>" + _wide_table(info["attacks"], "attack"))
        parts += [_figure_html(p) for p in figures_by_section.get(sid, [])]
        for t in _SECTION_TABLES.get(sid, ()):
            for name in [n for n in tables if fnmatch.fnmatchcase(n, t)]:
                parts.append(_table_block(run, name, tables.pop(name)))
        if sid not in ("model", "soms") and not parts:
            parts.append(_missing(heading, command))
        elif sid == "soms" and info["curves"] is not None and not figures_by_section.get(sid):
            parts.append("<p>No training-curve figure yet: figures are drawn by <code>somprobe analyze</code> "
                         "(or <code>somprobe.plots.plot_run</code>).</p>")
        section(sid, heading, "".join(parts))

    if figures_by_section.get("other"):
        section("other", "Other figures", "".join(_figure_html(p) for p in figures_by_section["other"]))
    if tables:
        section("tables", "Other tables", "".join(_table_block(run, n, p) for n, p in tables.items()))
    if info["errors"]:
        section("problems", "Files that could not be read",
                "<ul>" + "".join(f"<li>{_e(e)}</li>" for e in info["errors"]) + "</ul>")

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p>Run directory <code>{_e(run.root)}</code>; "
        f"generated {_e(now)}; {len(info['figures'])} figures, {len(info['tables'])} tables.</p>"
        f"<nav><ul>{''.join(nav)}</ul></nav>{''.join(body)}</body></html>\n"
    )


def write_report(run: Run | str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the self-contained HTML report of ``run`` to ``run.report`` atomically.

    Figures are the PNGs already in ``run.figures_dir`` (make them with
    :func:`somprobe.plots.plot_run`), embedded as base64 in a fixed section order (model & data,
    SOM training, density, class BMUs, D_class, weights, centres, correct/incorrect, attacks,
    shifts, other). Small summary tables are shown in full, big ones linked with their row
    counts; model, code-store, SOM and attack metadata and the command log are listed. Parts not
    made yet say which ``somprobe`` command makes them.

    Parameters
    ----------
    run : Run or path
        The run directory.
    title : str, optional
        Page title; default ``"somprobe report: <run name>"``.

    Returns
    -------
    pathlib.Path
        ``run.report``.

    Raises
    ------
    somprobe.errors.AnalysisError
        When the run directory holds nothing to report; the message names the commands to run.
    """
    run = run if isinstance(run, Run) else Run(run)
    text = render_report(run, title=title)
    # Built fully in memory first, then temp file + rename: a failure leaves the old report.
    atomic_write_bytes(run.report, text.encode("utf-8"))
    return run.report
