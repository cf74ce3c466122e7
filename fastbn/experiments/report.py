"""The report: ``report.html`` (self-contained, figures embedded as base64 PNG), ``report.md``,
``figures/*.png`` and ``metrics.json`` (every number the report quotes)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np

__all__ = ["write_report", "to_jsonable", "unbacked_numbers", "VERDICT_TEXT"]

VERDICT_TEXT = {
    "supported": "supported",
    "mixed": "partly supported",
    "not supported": "not supported (no clear difference)",
    "opposite": "contradicted (BN did worse)",
}


def to_jsonable(obj):
    """Convert numpy scalars/arrays and tuples to JSON types; non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _numbers_in(obj, out):
    if isinstance(obj, dict):
        for v in obj.values():
            _numbers_in(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _numbers_in(v, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out.append(float(obj))
    return out


_NUMBER = re.compile(r"(?<![\w.^])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w.]\w)")
#: tokens that are not measurements: citation years.
_IGNORED = re.compile(r"(?:Szegedy|al\.)\s*\(?(?:19|20)\d\d|Fig\. \d|experiment \d")


def unbacked_numbers(text, metrics):
    """Return the numbers in `text` that no value in `metrics` rounds to.

    A token such as ``67.3%`` is backed if some metric ``v`` gives ``f"{100*v:.1f}"``; a
    plain token with ``d`` decimals (or in ``e`` notation) is backed if some ``v`` rounds to
    it at that precision (or to 3 significant digits, as :func:`fmt_num` prints). Citation
    years are ignored.
    """
    values = _numbers_in(to_jsonable(metrics), [])
    text = _IGNORED.sub(" ", text)
    bad = []
    for tok in _NUMBER.findall(text):
        pct = tok.endswith("%")
        t = tok.rstrip("%")
        x = float(t)
        mant = t.split("e")[0]
        decimals = len(mant.split(".")[1]) if "." in mant else 0
        sig = max(1, len(mant.replace("-", "").replace(".", "").lstrip("0")))
        half_ulp = 0.5 * 10.0 ** (-decimals) * (1 + 1e-9)
        cands = [100 * v for v in values] if pct else values
        if not any(("e" not in t and abs(v - x) <= half_ulp) or float(f"{v:.{sig}g}") == x
                   for v in cands):
            bad.append(tok)
    return bad


def _summary_rows(results):
    return [{"experiment": r.name, "claim": r.claim, "measured": r.measured, "verdict": r.verdict}
            for r in results]


def _intro(results, meta):
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICT_TEXT}
    meta["verdict_counts"] = counts
    parts = [f"{n} {VERDICT_TEXT[v]}" for v, n in counts.items() if n]
    return (f"Of the {len(results)} claims tested: {'; '.join(parts)}. Every number below comes from "
            f"this run and is in metrics.json.")


def write_report(results, meta, out_dir):
    """Write the report folder and return the paths written.

    Parameters
    ----------
    results : list of Result
        From :func:`fastbn.experiments.run_experiment`, in report order.
    meta : dict
        Run configuration (tier, dataset, device, seeds, timings, versions); stored in
        ``metrics.json`` and shown in the report header.
    out_dir : str or Path

    Returns
    -------
    dict
        ``{"html": Path, "md": Path, "metrics": Path, "figures": [Path, ...]}``.
    """
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    pngs, figpaths = {}, []
    for r in results:
        pngs[r.name] = _png(r.figure)
        p = figdir / f"{r.name}.png"
        p.write_bytes(pngs[r.name])
        figpaths.append(p)
    meta = dict(meta)
    intro = _intro(results, meta)
    metrics = {
        "meta": meta,
        "summary": _summary_rows(results),
        "experiments": {r.name: {"title": r.title, "claim": r.claim, "verdict": r.verdict,
                                 "measured": r.measured, "seconds": r.seconds, "findings": r.findings,
                                 "metrics": r.metrics} for r in results},
    }
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=1, allow_nan=False))

    header = (f"Data set: {meta['dataset']}. Budget: {meta['tier']}. Device: {meta['device']}. "
              f"Seeds: {', '.join(str(s) for s in meta['seeds'])}. "
              f"Total time: {meta['total_seconds']:.0f} s.")
    # ---- Markdown
    md = ["# What batch normalization does: measured", "", header, "", intro, "",
          "## Summary", "", "| experiment | claim | measured effect | verdict |", "| --- | --- | --- | --- |"]
    for r in results:
        md.append(f"| {r.name} | {r.claim} | {r.measured} | {VERDICT_TEXT[r.verdict]} |")
    md += ["", "Verdict rule: a difference between the BN and no-BN arms counts only if it exceeds "
               "two standard errors over seeds (and a minimum size that matters in practice); "
               "see each section for the measure used.", ""]
    for i, r in enumerate(results, 1):
        md += [f"## {i}. {r.title}", "", f"**Claim.** {r.claim}", "", f"**Method.** {r.method}", "",
               "**Findings.**", ""]
        md += [f"- {f}" for f in r.findings]
        md += ["", f"**Verdict:** {VERDICT_TEXT[r.verdict]}. ({r.seconds:.0f} s)", "",
               f"![{r.title}](figures/{r.name}.png)", ""]
    (out / "report.md").write_text("\n".join(md))

    # ---- HTML
    e = html.escape
    h = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
         "<title>What batch normalization does: measured</title>",
         "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
         "line-height:1.45;color:#222}table{border-collapse:collapse;width:100%}"
         "td,th{border:1px solid #ccc;padding:.4em .6em;text-align:left;vertical-align:top}"
         "th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}"
         ".supported{color:#1a7f37}.opposite{color:#b42318}.mixed{color:#9a6700}"
         ".not-supported{color:#57606a}</style></head><body>",
         "<h1>What batch normalization does: measured</h1>", f"<p>{e(header)}</p>", f"<p>{e(intro)}</p>",
         "<h2>Summary</h2>", "<table><tr><th>experiment</th><th>claim</th><th>measured effect</th>"
         "<th>verdict</th></tr>"]
    for r in results:
        cls = r.verdict.replace(" ", "-")
        h.append(f"<tr><td><a href='#{r.name}'>{e(r.name)}</a></td><td>{e(r.claim)}</td>"
                 f"<td>{e(r.measured)}</td><td class='{cls}'>{e(VERDICT_TEXT[r.verdict])}</td></tr>")
    h.append("</table><p>Verdict rule: a difference between the BN and no-BN arms counts only if it "
             "exceeds two standard errors over seeds (and a minimum size that matters in practice); "
             "see each section for the measure used.</p>")
    for i, r in enumerate(results, 1):
        b64 = base64.b64encode(pngs[r.name]).decode("ascii")
        cls = r.verdict.replace(" ", "-")
        h += [f"<h2 id='{r.name}'>{i}. {e(r.title)}</h2>", f"<p><b>Claim.</b> {e(r.claim)}</p>",
              f"<p><b>Method.</b> {e(r.method)}</p>", "<p><b>Findings.</b></p><ul>"]
        h += [f"<li>{e(f)}</li>" for f in r.findings]
        h += ["</ul>", f"<p><b>Verdict:</b> <span class='{cls}'>{e(VERDICT_TEXT[r.verdict])}</span>"
                       f" ({r.seconds:.0f} s)</p>",
              f"<img alt='{e(r.title)}' src='data:image/png;base64,{b64}'>"]
    h.append("</body></html>")
    (out / "report.html").write_text("\n".join(h))
    return {"html": out / "report.html", "md": out / "report.md", "metrics": out / "metrics.json",
            "figures": figpaths}
