"""A sweep's report: a tidy table (parquet + CSV), PNG figures shaped like the paper's Figures 2–6,
and ``report.md`` linking each run's result JSON.

Figures: the mean over seeds as a line, ±1 std shaded (the paper's Figures 2, 4–6 shade one std),
a log x-axis where the spec asks for one, and the clean (unpoisoned) control drawn dashed in the
same colour: as a line when the clean value depends on x (patch size, data size, model), else
as a horizontal band.

Plots are declared in the spec's ``report.plots``::

    - name: z                      # file name: fig-<name>.png
      title: "..."
      x: n_poisons                 # any table column (n_poisons, poison_rate, backdoor.patch_size, ...)
      logx: true
      facet: backdoor.placement    # optional: one panel per value
      hue: train.model             # optional: one line per value
      y: {backdoor_z_consistent: "test: consistent", backdoor_z_random: "test: random"}
      ylabel: "z-score"
"""
from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import UserError, atomic_write_bytes, read_json

CONFIG_SECTIONS = ("world", "real_world", "backdoor", "targeted", "craft", "train", "eval", "finetune")


def _sweep_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "results").is_dir():
        return p
    if p.name == "results" and p.is_dir():
        return p.parent
    raise UserError(f"{p} holds no results/ folder; pass the folder given to `clip-poison sweep --out`")


def _flat_config(cfg: dict) -> dict:
    out = {}
    for sec in CONFIG_SECTIONS:
        for k, v in (cfg.get(sec) or {}).items():
            out[f"{sec}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def load_results(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """The tidy table (one row per run, or per (clean run, trigger) for clean controls measured
    against several triggers) and the raw result dicts."""
    d = _sweep_dir(sweep_dir)
    raws = []
    for f in sorted((d / "results").glob("*.json")):
        r = read_json(f, what="sweep result")
        r["_file"] = f"results/{f.name}"
        raws.append(r)
    if not raws:
        raise UserError(f"{d / 'results'} has no result JSONs yet; run `clip-poison sweep` first")
    rows = []
    for r in raws:
        if r.get("status") != "ok":
            continue
        base = {"run_id": r["id"], "seed": r["seed"], "clean": bool(r["clean"]), "attack": r["attack"],
                "n_train": r["n_train"], "n_poisons": r["n_poisons"], "poison_rate": r["poison_rate"],
                "result": r["_file"], **_flat_config(r["config"])}
        if r["clean"] and r["attack"] == "backdoor":
            # One row per trigger this clean victim was measured against.
            for b in r["backdoor"]:
                rows.append({**base, "backdoor.patch_size": b["patch_size"], "backdoor.trigger": b["trigger"],
                             "backdoor.target_label": b["label"], "backdoor.n_poisons": 0,
                             "zeroshot_accuracy": r["metrics"]["zeroshot_accuracy"],
                             # the victim's own scans (one victim, so the same on each trigger's row)
                             **{k: v for k, v in r["metrics"].items() if k.startswith("model_scan/")},
                             "backdoor_asr_consistent": b["asr_consistent"], "backdoor_asr_random": b["asr_random"],
                             "backdoor_z_consistent": b["z_consistent"], "backdoor_z_random": b["z_random"],
                             **({"probe_accuracy": r["metrics"]["probe_accuracy"]} if "probe_accuracy" in r["metrics"] else {}),
                             **({"probe_backdoor_asr_consistent": b["probe_asr_consistent"],
                                 "probe_backdoor_asr_random": b["probe_asr_random"]} if "probe_asr_consistent" in b else {})})
        else:
            rows.append({**base, **r["metrics"]})
    return pd.DataFrame(rows), raws


def _agg(df: pd.DataFrame, by: list[str], y: str) -> pd.DataFrame:
    g = df.groupby(by, dropna=False)[y]
    # ddof=0: with 2 seeds the sample std is unstable; report the spread the seeds actually show.
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=0).fillna(0.0), "n": g.count()}).reset_index()


def _default_plots(spec: dict, df: pd.DataFrame) -> list[dict]:
    axes = [k for k in (spec.get("axes") or {}) if k in df.columns]
    x = axes[0] if axes else "seed"
    ys = [c for c in ("backdoor_asr_consistent", "backdoor_z_consistent", "targeted_success_rate",
                      "zeroshot_accuracy") if c in df.columns]
    return [{"name": y, "x": x, "y": {y: y}, "hue": axes[1] if len(axes) > 1 else None} for y in ys]


def _is_rate(col: str) -> bool:
    return any(w in col for w in ("asr", "accuracy", "success_rate"))


def _band(y: str, a: pd.DataFrame) -> tuple:
    """mean ± 1 std, clipped to [0, 1] for rates (a band below 0 % success means nothing)."""
    lo, hi = a["mean"] - a["std"], a["mean"] + a["std"]
    return (lo.clip(0, 1), hi.clip(0, 1)) if _is_rate(y) else (lo, hi)


def plot(df: pd.DataFrame, p: dict, title_prefix: str = "", axes: dict | None = None):
    """One figure (a panel per facet value, in the spec's axis order); returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, ys = p["x"], p["y"] if isinstance(p["y"], dict) else {c: c for c in p["y"]}
    facet, hue = p.get("facet"), p.get("hue")
    pois, clean = df[~df["clean"]], df[df["clean"]]
    clean_only = pois.empty
    if clean_only:  # a sweep of clean victims only (attack: none): they are the lines
        pois, clean = clean, clean.iloc[0:0]
    def order(col: str) -> list:
        seen = list(dict.fromkeys(pois[col]))
        listed = [v for v in (axes or {}).get(col, []) if v in seen]
        return listed + [v for v in seen if v not in listed]

    facets = order(facet) if facet else [None]
    hues = order(hue) if hue else [None]
    fig, axs = plt.subplots(1, len(facets), figsize=(5.2 * len(facets), 4), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # A categorical x (e.g. train.model) is placed at 0..n-1 in the order the sweep lists it.
    cats = None if pd.api.types.is_numeric_dtype(df[x]) else order(x)
    xpos = (lambda v: v.astype(float)) if cats is None else (lambda v: v.map({c: i for i, c in enumerate(cats)}))
    for ax, fv in zip(axs[0], facets):
        sub = pois if fv is None else pois[pois[facet] == fv]
        k, drawn = 0, set()
        for y, ylab in ys.items():
            if y not in df.columns:
                continue
            for hv in hues:
                s = sub if hv is None else sub[sub[hue] == hv]
                if s.empty or s[y].isna().all():
                    continue
                a = _agg(s, [x], y)
                a = a.assign(_x=xpos(a[x])).sort_values("_x")
                c = colours[k % len(colours)]
                k += 1
                lab = ylab if hv is None else f"{ylab}, {hue.split('.')[-1]}={hv}"
                xv = a["_x"]
                ax.plot(xv, a["mean"], "o-", color=c, label=lab)
                # Every seed as a small dot: at small scale success is often bimodal, which a mean hides.
                ax.scatter(xpos(s[x]), s[y], s=9, color=c, alpha=0.45, linewidths=0)
                lo, hi = _band(y, a)
                ax.fill_between(xv, lo, hi, color=c, alpha=0.2)
                # Clean victims do not vary along attack-only hues (poison count): one clean line then.
                per_hue = hv is not None and hue in clean.columns and (clean[hue] == hv).any()
                cs = clean[clean[hue] == hv] if per_hue else clean
                if (y, hv if per_hue else None) in drawn:
                    continue
                drawn.add((y, hv if per_hue else None))
                lab = lab if per_hue else ylab
                if not cs.empty and y in cs.columns and cs[y].notna().any():
                    if x in cs.columns and cs[x].nunique(dropna=True) > 1:
                        ca = _agg(cs, [x], y)
                        ca = ca.assign(_x=xpos(ca[x])).sort_values("_x")
                        ax.plot(ca["_x"], ca["mean"], "--", color=c, alpha=0.8, label=f"clean, {lab}")
                        lo, hi = _band(y, ca)
                        ax.fill_between(ca["_x"], lo, hi, color=c, alpha=0.08)
                    else:
                        m, sd = cs[y].mean(), cs[y].std(ddof=0)
                        ax.axhline(m, ls="--", color=c, alpha=0.8, label=f"clean, {lab}")
                        ax.axhspan(m - sd, m + sd, color=c, alpha=0.08)
        if cats is not None:
            ax.set_xticks(range(len(cats)), [str(c) for c in cats])
        elif p.get("logx"):
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log", base=2 if x.endswith("patch_size") else 10)
            # Ticks at the sweep's own x values, written plainly (25, 50, 150 rather than 10^2).
            ticks = sorted(pois[x].dropna().unique().tolist())
            if len(ticks) <= 12:
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(p.get("xlabel", x))
        ax.set_title(f"{facet.split('.')[-1]} = {fv}" if fv is not None else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axs[0][0].set_ylabel(p.get("ylabel", ", ".join(ys.values())))
    n_seeds = df["seed"].nunique()
    import textwrap

    title = textwrap.fill(f"{title_prefix}{p.get('title', p.get('name', ''))}", width=int(65 * len(facets)))
    clipped = "rates clipped to [0, 1]; " if any(_is_rate(c) for c in ys) else ""
    fig.suptitle(f"{title}\nmean ± 1 std over {n_seeds} seed(s), dots: single seeds\n{clipped}"
                 + ("clean victims only" if clean_only else "dashed: clean victims"), fontsize=9)
    fig.tight_layout()
    return fig


def plot_similarity(raws: list[dict], title_prefix: str = ""):
    """Figure 3 from the runs' stored similarity data (fixed bins, so runs average bin by bin).
    Left: P(same zero-shot label) vs pair similarity (log y, as the paper). Right: clean and
    triggered pair-similarity densities of the poisoned victims, with the clean normal curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in raws if r.get("status") == "ok" and (r.get("similarity") or {}).get("available")]
    if not ok:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4))
    for clean, c in ((False, "C1"), (True, "C0")):
        rs = [r["similarity"] for r in ok if bool(r["clean"]) == clean]
        if not rs:
            continue
        name = "clean victims" if clean else "poisoned victims"
        x = np.array(rs[0]["same_prediction"]["bin_centers"])
        p_same = np.array([[np.nan if v is None else v for v in s["same_prediction"]["p_same"]] for s in rs], float)
        with warnings.catch_warnings():  # empty bins are NaN in every run: nothing to average there
            warnings.simplefilter("ignore", RuntimeWarning)
            m, sd = np.nanmean(p_same, 0), np.nanstd(p_same, 0)
        # a log axis cannot show p = 0: bins where no pair shared a label are left out of the
        # line and the band (counted in the legend) rather than drawn as a box down to the floor
        zero = int(np.sum(m == 0))
        m, sd = np.where(m > 0, m, np.nan), np.where(m > 0, sd, np.nan)
        a1.plot(x, m, "o-", color=c, label=name + (f" ({zero} bins with p = 0 not drawn)" if zero else ""))
        # mean − std is often ≤ 0 here; stop the band one decade below the mean so it stays drawable
        a1.fill_between(x, np.clip(m - sd, m / 10, None), m + sd, color=c, alpha=0.2)
        hx = np.array(rs[0]["histograms"]["bin_centers"])
        for key, ls, lab in (("clean_density", ":", "clean pairs"), ("triggered_density", "-", "triggered pairs")):
            d = np.array([s["histograms"][key] for s in rs])
            a2.plot(hx, d.mean(0), ls, color=c, label=f"{name}: {lab}")
            a2.fill_between(hx, d.mean(0) - d.std(0), d.mean(0) + d.std(0), color=c, alpha=0.15)
        zs = [s["histograms"]["z"] for s in rs]
        a2.plot([], [], " ", label=f"{name}: z = {np.mean(zs):.2f} ± {np.std(zs):.2f}")
    a1.set_yscale("log")
    a1.set_xlabel("cosine similarity of two eval images")
    a1.set_ylabel("P(same zero-shot label)")
    a1.set_title("similarity predicts same label")
    a2.set_xlabel("pairwise cosine similarity")
    a2.set_ylabel("density")
    a2.set_title("clean vs triggered (upper-left) pairs")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{title_prefix}Figure 3 analyses\nmean ± 1 std over {len(ok)} victims", fontsize=9)
    fig.tight_layout()
    return fig


HEADLINE = ("zeroshot_accuracy", "probe_accuracy", "backdoor_asr_consistent", "probe_backdoor_asr_consistent",
            "backdoor_asr_random", "probe_backdoor_asr_random", "backdoor_z_consistent", "backdoor_z_random",
            "targeted_success_rate", "probe_targeted_success_rate")
# A victim the attack "worked" on (small-scale success is mostly all-or-nothing per seed, so reports
# count such victims beside the mean).
WORKED_ASR = 0.5


def _worked(v) -> str:
    """'k/n': how many of the ASRs ``v`` exceed ``WORKED_ASR``."""
    v = np.asarray(v, dtype=float)
    return f"{int((v > WORKED_ASR).sum())}/{v.size}"


ASR_COLUMNS = ("backdoor_asr_consistent", "probe_backdoor_asr_consistent", "targeted_success_rate",
               "probe_targeted_success_rate")


def statistics_md(df: pd.DataFrame, axes: list[str], metrics: list[str], axis_values: dict | None = None) -> list[str]:
    """§4–5 statistics over seeds as markdown: 95 % t intervals of each headline number, how many
    seeds the attack worked in (ASR > 0.5; small-scale success is often bimodal, which a mean
    hides), and whether poisoned victims' clean accuracy is significantly lower than the clean
    controls' (one-sided paired t-test over seeds, as the paper's "none significantly lower")."""
    from ..metrics.stats import compare_accuracy_paired, summarize

    lines = ["## Statistics over seeds", "",
             "95 % Student-t interval of the mean over seeds; `worked` = seeds with ASR > 0.5; accuracy "
             "test: one-sided paired t-test over seeds (each poisoned victim minus the clean control with its "
             "seed and non-attack axes; interval of the mean difference), H1: poisoned accuracy < clean.", ""]
    attack_axes = [a for a in axes if a.split(".")[0] in ("backdoor", "targeted", "craft")]
    other = [a for a in axes if a not in attack_axes]
    clean = df[df["clean"]].drop_duplicates("run_id")
    rows = []
    for key, g in df[~df["clean"]].groupby(axes or ["clean"], dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = {a: v for a, v in zip(axes, key)} if axes else {}
        for m in metrics:
            v = g[m].dropna().to_numpy(float)
            if v.size == 0:
                continue
            s = summarize(v)
            row[m] = (f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s["n"] > 1
                      else f"{s['mean']:.3f} (n=1)")
            if m in ASR_COLUMNS:
                row[f"{m} worked"] = _worked(v)
        cs = clean
        for a in other:
            cs = cs[cs[a] == row[a]] if a in cs.columns else cs
        if not cs.empty and "zeroshot_accuracy" in g:
            # Clean controls share the poisoned victims' seeds (same init, same clean order): pair by seed.
            pairs = g[["seed", "zeroshot_accuracy"]].merge(cs[["seed", "zeroshot_accuracy"]], on="seed",
                                                           suffixes=("_p", "_c"))
            t = compare_accuracy_paired(pairs["zeroshot_accuracy_p"].to_numpy(float),
                                        pairs["zeroshot_accuracy_c"].to_numpy(float)) if len(pairs) else None
            ok = t is not None and not math.isnan(t["p_value"])
            row["accuracy poisoned − clean [95 % CI]"] = (
                "n/a" if t is None else f"{t['mean_difference']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]"
                if t["n_pairs"] > 1 else f"{t['mean_difference']:+.3f} (1 pair)")
            row["p (lower, paired)"] = f"{t['p_value']:.3f}" if ok else "n/a"
            row["significantly lower"] = ("yes" if t["significantly_lower"] else "no") if ok else "n/a"
        rows.append(row)
    if not rows:  # a clean-only sweep: intervals of the clean victims per point
        for key, g in clean.groupby(axes or ["clean"], dropna=False, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            row = {a: v for a, v in zip(axes, key)} if axes else {}
            for m in metrics:
                v = g[m].dropna().to_numpy(float)
                if v.size:
                    s = summarize(v)
                    row[m] = (f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s["n"] > 1
                              else f"{s['mean']:.3f} (n=1)")
            rows.append(row)
    t = pd.DataFrame(rows)
    if axes and axis_values and not t.empty:  # the spec's own order of its axis values
        rank = {a: {v: i for i, v in enumerate(axis_values.get(a) or [])} for a in axes}
        t = t.sort_values(axes, key=lambda col: col.map(lambda v: rank[col.name].get(v, len(rank[col.name]))),
                          kind="stable")
    return lines + [_md_table(t), ""] if not t.empty else []


def counts_md(df: pd.DataFrame, raws: list[dict], axes: list[str], axis_values: dict | None = None) -> list[str]:
    """Where the attack worked, as counts (the paper's way: "300 poisons work from 50k to 3M pairs"):
    one column per poison count (the sweep's ``backdoor.n_poisons`` / ``targeted.n_poisons`` axis),
    clean controls first, and one row per value of at most one other axis (data size, epochs,
    placement in the poisons, model). Backdoor: seeds with ASR > 0.5 of seeds; targeted: (x', y')
    pairs classified y' of the pairs scored (each run's own per-target results). Zero-shot and
    linear probe. Sweeps with another shape (no count axis, two other axes) get no table."""
    count_axes = [a for a in axes if a in ("backdoor.n_poisons", "targeted.n_poisons")]
    other = [a for a in axes if a not in count_axes]
    if len(count_axes) != 1 or len(other) > 1 or df.empty:
        return []
    count, row_axis = count_axes[0], (other[0] if other else None)
    targeted = count.startswith("targeted")
    scored = {r["id"]: r.get("targeted") or [] for r in raws if r.get("status") == "ok"}
    d = df[df["clean"] | df[count].notna()]
    d = d.assign(_count=np.where(d["clean"], 0, d[count].fillna(0)).astype(int))

    def order(axis: str | None, vals: list) -> list:
        listed = list(((axis_values or {}).get(axis) or []) if axis else [])
        rest = [v for v in vals if v not in listed]  # numbers by value, then names
        return [v for v in listed if v in vals] + sorted(
            rest, key=lambda v: (0, float(v), "") if isinstance(v, numbers.Number) else (1, 0.0, str(v)))

    def shown(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    clean = d[d["clean"]]
    counts = ([0] if not clean.empty else []) + order(count, [c for c in d.loc[~d["clean"], "_count"].unique().tolist()])
    rows = order(row_axis, d.loc[~d["clean"], row_axis].dropna().unique().tolist()) if row_axis else [None]
    unit = "poisons per target" if targeted else "poisons"
    what = "(x', y') pairs classified y' / pairs scored" if targeted else "seeds with ASR > 0.5 / seeds"
    lines = ["## Where it worked (counts)", "",
             f"Cells: {what}; columns: {unit}" + ("; 0 = the clean controls (same seeds)" if not clean.empty else "")
             + ".", ""]
    for metric, label, probe in ((("targeted_success_rate", "zero-shot", False),
                                  ("probe_targeted_success_rate", "linear probe", True)) if targeted else
                                 (("backdoor_asr_consistent", "zero-shot", False),
                                  ("probe_backdoor_asr_consistent", "linear probe", True))):
        if metric not in d.columns:
            continue
        table = []
        for rv in rows:
            row = {row_axis or "": shown(rv) if rv is not None else "all"}
            for c in counts:
                g = d[d["_count"] == c]
                # clean controls do not vary along an attack-only row axis (placement): all of them, then
                if rv is not None and (c or g[row_axis].notna().any()):
                    g = g[g[row_axis] == rv]
                g = g.dropna(subset=[metric])
                if g.empty:
                    row[str(c)] = "–"
                elif targeted:
                    ts = [t.get("probe", {}) if probe else t for i in g["run_id"] for t in scored.get(i, [])]
                    ts = [t for t in ts if "success" in t]
                    row[str(c)] = f"{sum(bool(t['success']) for t in ts)}/{len(ts)}"
                else:
                    row[str(c)] = _worked(g[metric])
            table.append(row)
        lines += [f"{label}:", "", _md_table(pd.DataFrame(table)), ""]
    return lines


SCAN_METRICS = {"roc_auc": "ROC-AUC (higher is better; 0.5 = chance)", "pr_auc": "PR-AUC (average precision; "
                "chance = the poison fraction)", "fpr_at_95tpr": "FPR at 95 % TPR (clean pairs a filter drops to "
                "remove 95 % of the poisons; lower is better)"}


def _axis_label(axis: str, value) -> str:
    name = {"targeted.n_poisons": "poisons per target", "backdoor.n_poisons": "poisons"}.get(axis, axis.split(".")[-1])
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{name} {value}"


def _interval(v: np.ndarray, digits: int = 3, bounds: tuple | None = (0.0, 1.0)) -> str:
    """mean [95 % t interval] (n=...), the interval clipped to ``bounds`` (a rate cannot leave [0, 1])."""
    from ..metrics.stats import summarize

    sm = summarize(v)
    if sm["n"] < 2:
        return f"{sm['mean']:.{digits}f} (n=1)"
    lo, hi = sm["ci_low"], sm["ci_high"]
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return f"{sm['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n={sm['n']})"


def detection_md(df: pd.DataFrame, axes: list[str], axis_values: dict | None = None,
                 detectors: list[str] | None = None) -> list[str]:
    """The data scan (columns ``scan/<detector>/<metric>``): per metric one table, a row per detector
    (in the spec's order, each ``+ref`` variant after its detector), a column per point of the
    attack's axes, each cell the mean over seeds [95 % t interval, clipped to [0, 1]]."""
    cols = [c for c in df.columns if c.startswith("scan/")]
    if not cols:
        return []
    pois = df[~df["clean"]]
    attack_axes = [a for a in axes if a in pois.columns]
    found = list(dict.fromkeys(c.split("/")[1] for c in cols))
    order = [d for base in (detectors or []) for d in (base, f"{base}+ref") if d in found]
    found = order + [d for d in found if d not in order]
    rank = {a: {v: i for i, v in enumerate((axis_values or {}).get(a) or [])} for a in attack_axes}
    groups = sorted(pois.groupby(attack_axes or ["clean"], dropna=False),
                    key=lambda kg: tuple(rank.get(a, {}).get(v, 0) for a, v in
                                         zip(attack_axes, kg[0] if isinstance(kg[0], tuple) else (kg[0],))))
    lines = ["## Data scan: detecting the poisons in the training set", "",
             "Every poisoned victim's training set (clean pairs + its poison set) scanned by each detector under "
             "the victim's own embeddings (`clip-poison scan data`); `+ref`: scored against clean reference "
             "images instead of the scanned set itself. Mean over seeds [95 % t interval, clipped to [0, 1]].", ""]
    success = next((c for c in ("backdoor_asr_consistent", "targeted_success_rate") if c in pois.columns), None)
    for metric, what in SCAN_METRICS.items():
        rows = []
        if success and metric == "roc_auc":  # where the attack worked, beside what the scans saw
            row = {"detector": f"(attack: {success.replace('_', ' ')}, victims > 0.5)"}
            for key, g in groups:
                key = key if isinstance(key, tuple) else (key,)
                v = g[success].dropna().to_numpy(float)
                row[", ".join(_axis_label(a, x) for a, x in zip(attack_axes, key)) or "poisoned"] = \
                    f"{v.mean():.2f} ({_worked(v)})"
            rows.append(row)
        for det in found:
            c = f"scan/{det}/{metric}"
            if c not in pois.columns:
                continue
            row = {"detector": det}
            for key, g in groups:
                key = key if isinstance(key, tuple) else (key,)
                label = ", ".join(_axis_label(a, v) for a, v in zip(attack_axes, key)) or "poisoned"
                v = g[c].dropna().to_numpy(float)
                if v.size:
                    row[label] = _interval(v)
            rows.append(row)
        lines += [f"### {what}", "", _md_table(pd.DataFrame(rows)), ""]
    return lines


def model_scan_md(df: pd.DataFrame, raws: list[dict], axes: list[str], out: Path) -> list[str]:
    """The blind model scan (columns ``model_scan/pl1``, ``model_scan/z``): how well each separates
    backdoored from clean victims (ROC-AUC over victims: a smaller PL1, a larger z = more
    suspicious), per point PL1 and z [95 % t interval], and a figure of the inverted stamps beside
    the true trigger."""
    from sklearn.metrics import roc_auc_score

    from ..metrics.stats import summarize

    if "model_scan/pl1" not in df.columns:
        return []
    v = df.dropna(subset=["model_scan/pl1"]).drop_duplicates("run_id")
    y = (~v["clean"]).to_numpy(int)
    lines = ["## Model scan: is the victim backdoored? (blind trigger inversion)", "",
             "`clip-poison scan model` on every victim: the smallest mask m (and pattern p) whose stamp "
             "x' = (1-m)x + mp makes the image embeddings of clean photos collapse (mean pairwise cosine >= "
             "0.99, DECREE's threshold); PL1 = ||m||_1 / (H W). z: Definition 1's z-score of the inverted "
             "stamp on held-out clean photos. The scan never sees the true trigger.", ""]
    def auc(score: np.ndarray) -> str:
        ok = np.isfinite(score)  # z is undefined (NaN) where the held-out clean pairs do not vary
        if not 0 < y[ok].sum() < ok.sum():
            return "n/a"
        return f"**{roc_auc_score(y[ok], score[ok]):.3f}**" + (f" ({int((~ok).sum())} victims without one left out)"
                                                              if (~ok).any() else "")

    if 0 < y.sum() < len(y):
        lines += [f"Separation over {int(y.sum())} backdoored and {int(len(y) - y.sum())} clean victims "
                  f"(ROC-AUC; 0.5 = chance): PL1 (smaller = suspicious) {auc(-v['model_scan/pl1'].to_numpy(float))}, "
                  f"blind z (larger = suspicious) {auc(v['model_scan/z'].to_numpy(float))}.", ""]
    attack_axes = [a for a in axes if a in v.columns and a.split(".")[0] in ("backdoor", "targeted", "craft")]
    rows = []
    # clean victims are one group whatever attack they were measured against
    groups = list(v[~v["clean"]].groupby(attack_axes, dropna=False, sort=True)) if attack_axes else [((), v[~v["clean"]])]
    for key, g in groups + [("clean", v[v["clean"]])]:
        key = key if isinstance(key, tuple) else (key,)
        if g.empty:
            continue
        row = {"victims": "clean" if key == ("clean",) else ", ".join(_axis_label(a, x) for a, x in zip(attack_axes, key))}
        for m in ("model_scan/pl1", "model_scan/z"):
            vals = g[m].to_numpy(float)
            ok = np.isfinite(vals)
            row[m.split("/")[1]] = _interval(vals[ok], 3, (0.0, 1.0) if m.endswith("pl1") else None) if ok.any() else "n/a"
        rows.append(row)
    lines += [_md_table(pd.DataFrame(rows)), ""]
    fig_path = _inverted_triggers_figure(raws, out)
    if fig_path is not None:
        lines += [f"![inverted triggers]({fig_path.name})", ""]
    return lines


# (zero-shot ASR, linear-probe ASR) of each attack, and the clean accuracies beside them
MITIGATION_COLUMNS = {
    "backdoor": ("backdoor_asr_consistent", "probe_backdoor_asr_consistent"),
    "targeted": ("targeted_success_rate", "probe_targeted_success_rate"),
}


def mitigation_rows(raws: list[dict]) -> pd.DataFrame:
    """One row per (victim or mitigated model, seed): ``method`` (clean victim, no defense, robust
    training, each repair, each filter-and-retrain), its ASRs and clean accuracies."""
    rows = []
    for r in raws:
        if r.get("status") != "ok" or r["attack"] not in MITIGATION_COLUMNS:
            continue
        asr, pasr = MITIGATION_COLUMNS[r["attack"]]
        defense = (r["config"].get("train") or {}).get("defense", "none")

        def row(method: str, m: dict, order: float, **extra) -> dict:
            return {"method": method, "order": order, "seed": r["seed"], "attack": r["attack"],
                    "n_targets": int(r["config"].get("n_targets", 1)) if r["attack"] == "targeted" else None,
                    "asr": m.get(asr), "probe_asr": m.get(pasr), "accuracy": m.get("zeroshot_accuracy"),
                    "probe_accuracy": m.get("probe_accuracy"), **extra}
        if r["clean"]:
            rows.append(row("clean victim (no poisons)", r["metrics"], 0))
            continue
        rows.append(row("no defense" if defense == "none" else f"robust training: {defense}", r["metrics"],
                        1 if defense == "none" else 3))
        for rep in (r.get("mitigate") or {}).get("repair", []):
            tag = " (default)" if rep["lr_default"] else ""
            rows.append(row(f"repair (CleanCLIP) lr {rep['lr']:g}{tag}", rep["metrics"], 2 if tag else 2 + rep["lr"],
                            lr=rep["lr"], lr_default=rep["lr_default"]))
        for f in (r.get("mitigate") or {}).get("filter", []):
            rows.append(row(f"filter top {f['fraction']:.0%} by {f['detector']}, retrain", f["metrics"], 4,
                            poisons_removed=f["poisons_removed"], n_poisons=f["n_poisons"]))
    return pd.DataFrame(rows)


def mitigation_md(raws: list[dict], out: Path) -> list[str]:
    """The mitigations table and the ASR-vs-clean-accuracy figure (``fig-mitigate.png``): per method
    the mean over seeds [95 % t interval], the seeds where the attack still works (ASR > 0.5)."""
    t = mitigation_rows(raws)
    if t.empty or not (t["method"] != "no defense").any() or len(t["method"].unique()) < 3:
        return []
    lines = ["## Mitigations: attack success vs clean accuracy", "",
             "Each poisoned victim (no defense) and what each mitigation made of it, measured like the victim "
             "(the same eval photos, x' and triggers). Repair: CleanCLIP fine-tuning of the victim on clean pairs "
             "of X (its default learning rate fixed before any ASR was seen); robust training: a victim of its "
             "own, trained on the same X ∪ P; filter: the data scan's top-ranked pairs removed and the victim's "
             "recipe retrained from scratch. Mean over seeds [95 % t interval, clipped to [0, 1]]; `works` = "
             "seeds with ASR > 0.5. Our victims were pre-trained with the plain CLIP loss (CleanCLIP is reported "
             "to fail when pre-training used an in-modal loss).", ""]
    rows = []
    for (order, method), g in t.groupby(["order", "method"], sort=True):
        row = {"method": method}
        for c, name in (("asr", "zero-shot ASR"), ("probe_asr", "linear-probe ASR"),
                        ("accuracy", "clean zero-shot acc"), ("probe_accuracy", "clean probe acc")):
            v = g[c].dropna().to_numpy(float)
            if v.size:
                row[name] = _interval(v)
                if "ASR" in name:
                    row[f"{name.split()[0]} works"] = _worked(v)
        if g["n_targets"].notna().all():  # a targeted rate over 4 targets hides counts: give them
            for c, name in (("asr", "targets moved"), ("probe_asr", "probe: targets moved")):
                v = g[[c, "n_targets"]].dropna()
                if len(v):
                    row[name] = f"{int(round((v[c] * v['n_targets']).sum()))}/{int(v['n_targets'].sum())}"
        if "poisons_removed" in g and g["poisons_removed"].notna().any():
            pr = g["poisons_removed"].astype(int)
            row["poisons removed per seed"] = (f"{pr.min()}–{pr.max()} of {int(g['n_poisons'].iloc[0])} "
                                               f"({pr.sum() / g['n_poisons'].sum():.1%} in all)")
        rows.append(row)
    lines += [_md_table(pd.DataFrame(rows).fillna("")), ""]
    fig = _mitigation_figure(t)
    import io

    import matplotlib.pyplot as plt

    b = io.BytesIO()
    fig.savefig(b, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(out / "fig-mitigate.png", b.getvalue())
    return lines + ["![mitigations](fig-mitigate.png)", ""]


def _pareto(points: np.ndarray) -> np.ndarray:
    """Indices of the (accuracy, ASR) points no other point beats on both (higher accuracy, lower ASR)."""
    keep = [i for i, (a, s) in enumerate(points)
            if not any((a2 >= a and s2 <= s) and (a2 > a or s2 < s) for a2, s2 in points)]
    return np.array(sorted(keep, key=lambda i: points[i][0]), dtype=int)


def _mitigation_figure(t: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(11, 5.2))
    colours = iter(["tab:green", "tab:olive", "tab:blue", "tab:cyan", "tab:purple", "tab:brown", "tab:pink"])
    style: dict = {}  # one colour and marker per method, the same in both panels

    def look(method: str) -> tuple[str, str]:
        if method not in style:
            style[method] = (("k", "*") if method.startswith("clean victim") else ("tab:red", "X") if method == "no defense"
                             else ("grey", "s") if method.startswith("repair") and "default" not in method
                             else (next(colours, "tab:gray"), "s" if method.startswith("repair") else
                                   "D" if method.startswith("robust") else "^"))
        return style[method]

    for ax, (acc, asr, what) in zip(axs, (("accuracy", "asr", "zero-shot"), ("probe_accuracy", "probe_asr", "linear probe"))):
        g = t.dropna(subset=[acc, asr]).groupby(["order", "method"], sort=True)[[acc, asr]]
        m, sd = g.mean().reset_index(), g.std(ddof=0).fillna(0).reset_index()
        if m.empty:
            ax.set_visible(False)
            continue
        rep = m["method"].str.startswith("repair")
        if rep.any():  # the learning-rate sweep as one line, in lr order, each point labelled
            r = m[rep].sort_values("order")
            ax.plot(r[acc], r[asr], "-", color="grey", alpha=0.6, lw=1, zorder=1)
            for _, x in r.iterrows():
                ax.annotate(x["method"].split(" lr ")[1].replace(" (default)", "*"), (x[acc], x[asr]),
                            fontsize=7, xytext=(4, -9), textcoords="offset points")
        grey_labelled = False
        for i, x in m.iterrows():
            c, mk = look(x["method"])
            label = x["method"] if ax is axs[0] else None
            if c == "grey":  # one legend entry for the swept learning rates (each point is labelled)
                label, grey_labelled = (None if grey_labelled or label is None else
                                        "repair (CleanCLIP), other learning rates"), True
            ax.errorbar(x[acc], x[asr], xerr=sd.loc[i, acc], yerr=sd.loc[i, asr], fmt=mk, color=c, ms=8 if mk == "*" else 6,
                        capsize=2, elinewidth=0.8, alpha=0.9, label=label)
        # the trade-off a defender can pick from: the victim and its mitigations (not the clean reference)
        d = m[~m["method"].str.startswith("clean victim")]
        front = _pareto(d[[acc, asr]].to_numpy(float))
        ax.plot(d[acc].to_numpy()[front], d[asr].to_numpy()[front], ":", color="k", lw=1,
                label="Pareto front (mitigations)" if ax is axs[0] else None)
        ax.set_xlabel(f"clean {what} accuracy")
        ax.set_ylabel(f"{what} attack success")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(what)
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    attack = t["attack"].iloc[0]
    fig.suptitle(f"{attack}: attack success vs clean accuracy per mitigation (mean ± 1 std over "
                 f"{t['seed'].nunique()} seeds)\ngrey squares: CleanCLIP repair across learning rates (* = the default); "
                 "star: clean victim, no poisons", fontsize=9)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    return fig


def _inverted_triggers_figure(raws: list[dict], out: Path) -> Path | None:
    """Inverted stamps (on mid-grey) per victim, a row per point, beside the true trigger stamped
    on mid-grey at its consistent position."""
    import base64
    import io

    import matplotlib.pyplot as plt

    from ..attacks.triggers import get_trigger
    from ..io import decode_image

    ok = [r for r in raws if r.get("status") == "ok" and "scan_model" in (r.get("defense") or {})]
    if not ok:
        return None
    def label(r):
        if r["clean"]:
            return "clean"
        b = r["config"].get("backdoor") or {}
        return f"{b.get('trigger', r['attack'])}, {r['n_poisons']} poisons"
    groups: dict[str, list[dict]] = {}
    for r in sorted(ok, key=lambda r: (not r["clean"], r["n_poisons"], str(label(r)), r["seed"])):
        groups.setdefault(label(r), []).append(r)
    ncol = 1 + max(len(g) for g in groups.values())
    fig, axs = plt.subplots(len(groups), ncol, figsize=(max(6.0, 1.35 * ncol), 1.6 * len(groups) + 0.5),
                            squeeze=False)
    for ax in axs.ravel():
        ax.axis("off")
    for row, (name, rs) in enumerate(groups.items()):
        b = next((r["config"].get("backdoor") for r in rs if r["config"].get("backdoor")), None)
        if b is not None and not rs[0]["clean"]:
            size = rs[0]["defense"]["scan_model"]["input_size"][0]
            t = get_trigger(b["trigger"], b.get("patch_size"), size)
            grey = np.full((size, size, 3), 128, np.uint8)
            axs[row][0].imshow(t.stamp(grey, t.position(grey.shape, "consistent")), interpolation="nearest")
            axs[row][0].set_title(f"true trigger\n{name}", fontsize=7)
        else:
            axs[row][0].text(0.5, 0.5, f"{name}\nvictims", ha="center", va="center", fontsize=8)
        for col, r in enumerate(rs, start=1):
            sm = r["defense"]["scan_model"]
            img = decode_image(base64.b64decode(sm["trigger_png_base64"]))
            axs[row][col].imshow(img, interpolation="nearest")
            axs[row][col].set_title(f"seed {r['seed']}\nPL1 {sm['pl1']:.3f}, z {sm['z']:.2f}", fontsize=6)
    fig.suptitle("Model scan: inverted stamps m·p on mid-grey (blind) beside the true trigger", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    path = out / "fig-model-scan.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    fmt = lambda v: ("n/a" if math.isnan(v) else f"{v:.3f}") if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _pooled(sweeps: list[Path]) -> tuple[pd.DataFrame, list[dict], dict]:
    """Several sweeps read as one (e.g. victims of two sweeps for a model scan judged on more clean
    victims): the rows and results of all, the first spec's report settings, every spec's axes."""
    metas, frames, raws = [], [], []
    for sweep in sweeps:
        df, rs = load_results(sweep)
        meta = read_json(sweep / "sweep.json")["spec"] if (sweep / "sweep.json").is_file() else {}
        if not meta:  # results carry their sweep's report spec too
            meta = next((r.get("sweep") for r in rs if r.get("sweep")), {}) or {}
        metas.append(meta)
        frames.append(df.assign(sweep=meta.get("name", sweep.name)))
        raws += rs
    if len(sweeps) == 1:
        return frames[0].drop(columns="sweep"), raws, metas[0]
    # a clean control may fill several rows of its own sweep (one per trigger); across sweeps, none
    ids = pd.concat([f["run_id"].drop_duplicates() for f in frames])
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise UserError(f"runs {dup[:3]} appear in more than one of the sweeps; pool sweeps of different runs")
    # each sweep a group of its own: pooled victims of different recipes (e.g. undefended and
    # SafeCLIP victims of one attack) are never averaged together
    axes = {**{k: v for m in metas for k, v in (m.get("axes") or {}).items()},
            "sweep": [m.get("name", s.name) for m, s in zip(metas, sweeps)]}
    meta = {**metas[0], "name": " + ".join(m.get("name", "?") for m in metas), "axes": axes, "size": None,
            "description": " ".join(m.get("description", "") for m in metas), "report": {}}
    return pd.concat(frames, ignore_index=True), raws, meta


def build_report(sweep_or_results: str | Path | list, out: str | Path | None = None) -> dict:
    """Write table.parquet, table.csv, fig-*.png and report.md; returns their paths. Several sweep
    folders are pooled into one report (``out`` is then required)."""
    import io

    many = list(sweep_or_results) if isinstance(sweep_or_results, (list, tuple)) else [sweep_or_results]
    if len(many) > 1 and out is None:
        raise UserError("a report pooling several sweeps needs --out DIR (it belongs to none of them)")
    sweeps = [_sweep_dir(s) for s in many]
    sweep = sweeps[0]
    out = Path(out) if out else sweep
    df, raws, meta = _pooled(sweeps)
    failed = [r for r in raws if r.get("status") != "ok"]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table_csv": out / "table.csv", "table_parquet": out / "table.parquet", "report_md": out / "report.md",
             "figures": [], "n_ok": len(raws) - len(failed), "n_failed": len(failed)}
    if df.empty:
        raise UserError(f"every run in {sweep / 'results'} failed ({len(failed)}); see their `error` fields")
    atomic_write_bytes(paths["table_csv"], df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(paths["table_parquet"], buf.getvalue())

    # pooled mitigation sweeps (victims of different recipes, no shared x axis): fig-mitigate is their figure
    mitigations = any(r.get("mitigate") or (r.get("config", {}).get("train") or {}).get("defense", "none") != "none"
                      for r in raws)
    plots = (meta.get("report") or {}).get("plots") or ([] if mitigations and len(sweeps) > 1 else _default_plots(meta, df))
    name = meta.get("name", sweep.name)
    md = [f"# {name}" + (f" ({meta['size']})" if meta.get("size") else ""), ""]
    if meta.get("figure"):
        md.append(f"Mirrors the paper's {meta['figure']} (Carlini & Terzis, ICLR 2022).")
    if meta.get("description"):
        md += ["", meta["description"]]
    md += ["", f"{paths['n_ok']} runs ok, {paths['n_failed']} failed; seeds {sorted(df['seed'].unique().tolist())}. "
           "Lines: mean over seeds, shaded ±1 std (population std over seeds); dashed: clean victims "
           "(no poisons) with the same seeds.", ""]
    import matplotlib.pyplot as plt

    for p in plots:
        fig = plot_similarity(raws, f"{name}: ") if p.get("kind") == "similarity" else plot(df, p, f"{name}: ", meta.get("axes"))
        if fig is None:
            md += [f"## {p.get('title', p['name'])}", "", "(no run stored this analysis)", ""]
            continue
        b = io.BytesIO()
        fig.savefig(b, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        f = out / f"fig-{p['name']}.png"
        atomic_write_bytes(f, b.getvalue())
        paths["figures"].append(f)
        md += [f"## {p.get('title', p['name'])}", "", f"![{p['name']}]({f.name})", ""]

    # Summary: mean ± std per point of the sweep.
    axes = [k for k in (meta.get("axes") or {}) if k in df.columns]
    metrics = [c for c in HEADLINE if c in df.columns]
    by = ["clean"] + [a for a in axes if a in df.columns]
    g = df.groupby(by, dropna=False)
    summ = g[metrics].mean().round(3).astype(str) + " ± " + g[metrics].std(ddof=0).fillna(0).round(3).astype(str)
    summ.insert(0, "seeds", g["seed"].nunique())
    md += ["## Summary (mean ± std over seeds)", "", _md_table(summ.reset_index()), ""]
    md += counts_md(df, raws, axes, meta.get("axes"))
    md += statistics_md(df, axes, metrics, meta.get("axes"))
    md += detection_md(df, axes, meta.get("axes"), (meta.get("defense") or {}).get("scan_data", {}).get("detectors"))
    md += model_scan_md(df, raws, axes, out)
    mit = mitigation_md(raws, out)
    if mit:
        paths["figures"].append(out / "fig-mitigate.png")
    md += mit
    cols = ["run_id", "seed", "clean"] + axes + ["n_poisons", "poison_rate"] + metrics
    runs = df[[c for c in dict.fromkeys(cols) if c in df.columns]].copy()
    if len(sweeps) == 1:  # a pooled report's results live in their own sweeps' folders
        runs["run_id"] = [f"[{i}](results/{i}.json)" for i in runs["run_id"]]
    md += ["## Runs", "", "Each run's resolved config, seed, versions and full metrics are in its result JSON.", "",
           _md_table(runs), ""]
    if failed:
        md += ["## Failed runs", ""] + [f"- [{r['id']}]({r['_file']}): {r.get('error', '?')}" for r in failed] + [""]
    aug = next((r["train"]["augmentation"] for r in raws if r.get("status") == "ok"), None)
    if aug:
        md += [f"Training augmentation: RandomResizedCrop scale {aug['random_resized_crop_scale']} "
               "((1.0, 1.0) = no random crop)."]
    atomic_write_bytes(paths["report_md"], ("\n".join(md) + "\n").encode())
    return paths
