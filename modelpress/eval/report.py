"""The comparison's outputs: results.json, report.md (the table, sorted by size), pareto.png (size
against ppl, the Pareto front marked), speed.png (decode speed against ppl, its own front) and
report.html (table and plots in one page). Each file is
written under a temporary name and renamed when complete."""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

# (header, row key, format); None: the value is missing
COLUMNS = (("method", "method", "{}"), ("size MB", "size_bytes", "{:.1f}"),
           ("bits/weight", "bits_per_weight", "{:.2f}"), ("linear bits/weight", "linear_bits_per_weight", "{:.2f}"),
           ("ppl", "ppl", "{:.4f}"), ("ppl vs original", "ppl_change_pct", "{:+.2f} %"),
           ("ppl other text", "ppl_other", "{:.4f}"), ("other vs original", "ppl_other_change_pct", "{:+.2f} %"),
           ("mean KL", "kl_mean", "{:.5f}"), ("top-1 agree", "top1_agreement", "{:.2%}"),
           ("decode tok/s", "decode_tokens_per_s", "{:.1f}"), ("quantize s", "quantize_seconds", "{:.1f}"),
           ("peak MB", "peak_rss_bytes", "{:.0f}"))
_SCALE = {"size_bytes": 1e-6, "peak_rss_bytes": 1e-6}


# shown as value +- its standard error where the row has one: column key -> (its error's key, format)
_STDERR = {"ppl": ("ppl_stderr", "{:.2f}"), "kl_mean": ("kl_stderr", "{:.5f}")}
_OPTIONAL = {"ppl_other", "ppl_other_change_pct"}  # shown only where some row has them (compare --other-text)


def columns(rows: list[dict[str, Any]]) -> tuple:
    """COLUMNS, less the optional ones no row has."""
    return tuple(c for c in COLUMNS if c[1] not in _OPTIONAL or any(r.get(c[1]) is not None for r in rows))


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    text = fmt.format(v * _SCALE.get(key, 1))
    se_key, se_fmt = _STDERR.get(key, (None, ""))
    se = row.get(se_key) if se_key else None
    return f"{text} ± {se_fmt.format(se)}" if se else text


def within_noise(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{method: the next-better row by ppl} where the two ppls differ by less than their standard errors
    combined (sqrt(se1^2 + se2^2)): a difference the evaluation cannot tell from chance."""
    ranked = sorted((r for r in rows if r.get("ppl_stderr")), key=lambda r: r["ppl"])
    out = {}
    for better, r in zip(ranked, ranked[1:]):
        if r["ppl"] - better["ppl"] < (r["ppl_stderr"] ** 2 + better["ppl_stderr"] ** 2) ** 0.5:
            out[r["method"]] = better["method"]
    return out


# the plots: x key, its axis label, whether more is better, the file
AXES = {"size": ("size_bytes", "size on disk (MB)", False, "pareto.png"),
        "speed": ("decode_tokens_per_s", "decode tokens/s, batch 1 (higher is better)", True, "speed.png")}


def pareto_front(rows: list[dict[str, Any]], axis: str = "size") -> list[str]:
    """Methods that no other row beats on both the axis (size: smaller; speed: faster) and ppl (lower),
    one strictly."""
    key, _, more, _ = AXES[axis]
    sign = -1.0 if more else 1.0
    rows = [r for r in rows if r.get(key) is not None]
    front = []
    for r in rows:
        x = sign * r[key]
        dominated = any(o is not r and sign * o[key] <= x and o["ppl"] <= r["ppl"]
                        and (sign * o[key] < x or o["ppl"] < r["ppl"]) for o in rows)
        if not dominated:
            front.append(r["method"])
    return front


def table(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[cell(r, k, f) for _, k, f in columns(rows)] for r in sorted(rows, key=lambda r: r["size_bytes"])]


def source_note(kind: str) -> str:
    """What a quantized original means for the rows (compare.source_format)."""
    return (f"The original is a {kind} GGUF, dequantized: its weights already lie on {kind}'s grid, so a {kind} row "
            f"re-quantizes it exactly and formats whose grids fall close to {kind}'s lose less here than they would "
            "from the float weights. For a neutral reference, compare a float checkpoint (bf16 / fp32) of the model.")


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    rows = results["rows"]
    front = set(pareto_front(rows))
    lines = [f"# modelpress compare: {results['model']}", "",
             *(["## Recommendation", "", *(f"- {t}" for t in results["recommendation"]), ""]
               if results.get("recommendation") else []),
             f"Evaluation: {s['eval_windows']} windows of {s['ctx']} tokens of "
             f"{s['eval_text'] or 'the default text (pydoc topics)'}; calibration (GPTQ, AWQ, imatrix, auto): "
             f"{s['samples']} windows of {s['calib_text'] or 'the default text (pydoc topics and module docstrings)'}. KL: mean KL(original || method) "
             f"of the next-token distribution per token, nats. Decode: {s['decode_tokens']} greedy tokens, "
             f"batch 1. Peak MB: the row's process, load and quantize. Quantize s: the method alone (GGUF rows: writing the file, imatrix or allocation included). * on the Pareto front (size, ppl). "
             "± : the standard error of the mean over scored tokens (as llama-perplexity reports it; tokens taken as "
             "independent, so it understates the noise); ≈ X: within the combined error of the next-better row X.", "",
             *([f"Other text (out of domain): {s['other_text']}, the same windows' count; its ppl shows how a "
                "calibrated row holds on text unlike its calibration.", ""] if s.get("other_text") else []),
             *([source_note(results["source_format"]), ""] if results.get("source_format") else []),
             "| " + " | ".join(h for h, _, _ in columns(rows)) + " |", "|" + "---|" * len(columns(rows))]
    noise = within_noise(rows)
    for r, cells in zip(sorted(rows, key=lambda r: r["size_bytes"]), table(rows)):
        cells[0] = f"{cells[0]} *" if r["method"] in front else cells[0]
        if r["method"] in noise:
            cells[[k for _, k, _ in columns(rows)].index("ppl")] += f" (≈ {noise[r['method']]})"
        lines.append("| " + " | ".join(cells) + " |")
    for name, err in results.get("failed", {}).items():
        lines.append(f"\n{name}: failed ({err})")
    sens = results.get("sensitivity") or {}
    if sens:
        top = sorted(sens.items(), key=lambda kv: -kv[1])[:5]
        lines += ["", "Most sensitive layers (predicted mean KL with only that layer in 4-bit Q4_0; the map: "
                  "sensitivity.png): " + ", ".join(f"{f.removeprefix('model.layers.')} {v:.5f}" for f, v in top)]
    return "\n".join(lines) + "\n"


def _pyplot():  # noqa: ANN202
    """matplotlib's pyplot on the file backend, imported here, not at the top: only the plots need it, and
    its import is slow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:  # noqa: ANN001
    """The figure written under a temporary name, then renamed, and closed."""
    fig.tight_layout()
    tmp = path.with_name(path.name + ".part.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot(rows: list[dict[str, Any]], path: Path, axis: str = "size") -> None:
    """Size (MB) or decode speed against ppl, log ppl axis, the Pareto front joined."""
    plt = _pyplot()

    key, label, _, _ = AXES[axis]
    scale = _SCALE.get(key, 1)
    rows = [r for r in rows if r.get(key) is not None]
    front = set(pareto_front(rows, axis))
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    xs, ys = [r[key] * scale for r in rows], [r["ppl"] for r in rows]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for r, x, y in sorted(zip(rows, xs, ys), key=lambda t: t[1]):
        on = r["method"] in front
        ax.scatter(x, y, s=40, color="tab:red" if on else "tab:blue", zorder=3)
        near = sum(abs(x - px) < 0.06 * dx and abs(y - py) < 0.04 * dy for px, py in placed)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4 - 13 * near), fontsize=9)
        placed.append((x, y))
    pts = sorted((r[key] * scale, r["ppl"]) for r in rows if r["method"] in front)
    if len(pts) > 1:
        ax.plot(*zip(*pts), color="tab:red", lw=1, ls="--", label="Pareto front", zorder=2)
        ax.legend()
    ax.set_xlabel(label)
    ax.set_ylabel("perplexity (lower is better)")
    ppls = [r["ppl"] for r in rows]
    if max(ppls) > 3 * min(ppls):  # a wide range: log scale, plain numbers on the axis
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{axis} against perplexity")
    _save(fig, path)


# click a header: sort the table's rows by that column (numbers as numbers), again: the other way
_SORT_JS = ("document.querySelectorAll('#rows th').forEach((th, i) => th.onclick = () => {"
            "const t = document.getElementById('rows'), rows = [...t.rows].slice(1), up = th.dataset.up !== '1';"
            "th.dataset.up = up ? '1' : '0';"
            "rows.sort((a, b) => { const x = a.cells[i].textContent, y = b.cells[i].textContent,"
            " nx = parseFloat(x), ny = parseFloat(y);"
            " const c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny; return up ? c : -c; });"
            "rows.forEach(r => t.appendChild(r)); });")


_ALT = {"sensitivity": "per-layer sensitivity map"}


def page(results: dict[str, Any], pngs: dict[str, bytes]) -> str:
    rows = results["rows"]
    front = set(pareto_front(rows))
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in columns(rows))
    body = ""
    for r, cells in zip(sorted(rows, key=lambda r: r["size_bytes"]), table(rows)):
        style = ' class="front"' if r["method"] in front else ""
        body += f"<tr{style}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>\n"
    notes = "".join(f"<p>{html.escape(p)}</p>" for p in markdown(results).split("\n\n")
                    if p.startswith(("Evaluation:", "The original is")))
    advice = "".join(f"<li>{html.escape(t).replace('**', '')}</li>" for t in results.get("recommendation") or [])
    return ("<!doctype html><html><head><meta charset='utf-8'><title>modelpress compare</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "tr.front td:first-child{font-weight:bold;color:#b00}th{cursor:pointer}</style></head><body>"
            f"<h1>modelpress compare: {html.escape(results['model'])}</h1>"
            + (f"<h2>Recommendation</h2><ul>{advice}</ul>" if advice else "")
            + f"{notes}<p>Click a column's header to sort by it.</p>"
            f"<table id='rows'><tr>{head}</tr>\n{body}</table>"
            + "".join(f"<p><img alt='{html.escape(_ALT.get(name, name + ' against perplexity'))}' "
                      f"src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>" for name, png in pngs.items())
            + f"<script>{_SORT_JS}</script></body></html>\n")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_sensitivity(sens: dict[str, float], path: Path) -> None:
    """The per-layer sensitivity map: blocks (rows) x projections (columns), colour = predicted KL (log)."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    from .sensitivity import KIND, grid

    blocks, names, values = grid(sens)
    data = [[float("nan") if v is None else max(v, 1e-9) for v in row] for row in values]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 0.22 * len(blocks) + 2), dpi=120)
    im = ax.imshow(data, aspect="auto", cmap="magma_r", norm=LogNorm())
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_ylabel("block")
    fig.colorbar(im, ax=ax, label=f"predicted mean KL (nats) with only this layer in {KIND}")
    ax.set_title("per-layer sensitivity")
    _save(fig, path)


def write_reports(out: Path, results: dict[str, Any]) -> None:
    _atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    _atomic(out / "report.md", markdown(results))
    rows = results["rows"]
    axes = {axis: name for axis, (key, _, _, name) in AXES.items() if any(r.get(key) is not None for r in rows)}
    for axis, name in axes.items():
        plot(rows, out / name, axis)
    if results.get("sensitivity"):
        plot_sensitivity(results["sensitivity"], out / "sensitivity.png")
        axes["sensitivity"] = "sensitivity.png"
    if rows:
        _atomic(out / "report.html", page(results, {axis: (out / name).read_bytes() for axis, name in axes.items()}))


def text_table(rows: list[dict]) -> str:
    """Rows of equal keys as aligned text columns (the CLI's tables)."""
    if not rows:
        return ""
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]}
    return "\n".join("  ".join(f"{str(r[k]) if r is not None else k:<{w}}" for k, w in widths.items())
                     for r in [None, *rows])
