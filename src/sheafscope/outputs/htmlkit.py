"""HTML pieces of the report: escaping, number formatting, tables and the page's CSS. Every string
from the run files goes through ``html.escape``: prompts, model ids and errors are arbitrary text."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

NOT_AVAILABLE = "not available"

_PCT_KEYS = {"error_pct", "mape_of_L", "mape_of_lstar", "mape"}

# Minimal CSS: readable tables, wide tables scroll instead of breaking the layout.
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0 auto;max-width:1240px;padding:1.2rem 1.6rem 3rem;color:#222;line-height:1.45;
 background:#fff}
h1{font-size:1.6rem;margin:.2rem 0 .3rem}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
h3{font-size:1rem;margin:1.1rem 0 .4rem}
.sub{color:#666;margin:0 0 1rem}
table{border-collapse:collapse;font-size:.82rem;margin:.4rem 0 1rem}
th,td{border:1px solid #d5d5d5;padding:.25rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f4f6;font-weight:600}
tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.failed td{background:#fdecea}
.scroll{overflow-x:auto}
.verdict{border:2px solid #888;border-radius:6px;padding:.8rem 1rem;margin:1rem 0;
 background:#f7f7f7}
.verdict.good{border-color:#27AE60;background:#eef9f1}
.verdict.bad{border-color:#C0392B;background:#fdf0ee}
.verdict.warn{border-color:#F39C12;background:#fef7ec}
.verdict .text{font-size:1.1rem;font-weight:600;margin:0 0 .5rem}
.na{color:#888;font-style:italic}
ul.warnings li{margin:.15rem 0}
pre,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.8rem}
pre{background:#f6f8fa;padding:.5rem;overflow-x:auto;white-space:pre-wrap}
details{margin:.5rem 0}
summary{cursor:pointer;font-weight:600}
dl.defs dt{font-weight:600;margin-top:.4rem}
dl.defs dd{margin-left:1.2rem}
figure{margin:1rem 0 2rem}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.85rem;margin-top:.3rem}
.fit table{width:100%;table-layout:auto}
.fit td,.fit td.num,.fit th{white-space:normal;overflow-wrap:anywhere;font-size:.76rem;padding:.2rem .3rem}
td.verdict-cell{font-weight:600}
td.verdict-cell.good{background:#eef9f1}
td.verdict-cell.bad{background:#fdf0ee}
td.verdict-cell.warn{background:#fef7ec}
ul.reasons li{margin:.3rem 0;font-size:.88rem}
"""

# The only script on the page: lets a headless browser test confirm the embedded images decoded.
IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), n = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { n++; }
  }
  document.body.dataset.imagesLoaded = String(n);
  document.body.dataset.imagesTotal = String(imgs.length);
  // Whether the summary table needs horizontal scrolling at this window width.
  var box = document.querySelector("#summary-table .scroll");
  if (box) { document.body.dataset.summaryOverflow = String(box.scrollWidth > box.clientWidth); }
});
</script>"""


# --------------------------------------------------------------------------- formatting


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def na_cell() -> str:
    return f'<span class="na">{NOT_AVAILABLE}</span>'


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, (list, dict, tuple)) else False
    except (TypeError, ValueError):
        return False


def _fmt_number(value: float, key: str = "") -> str:
    """Human-sized number: integers plain, large/small in scientific notation, else 4 digits."""
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if key in _PCT_KEYS:
        return f"{value:.1f} %"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    mag = abs(value)
    if mag >= 1e6 or (0 < mag < 1e-3):
        return f"{value:.3e}"
    if mag >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def _cell(value: Any, key: str = "") -> tuple[str, bool]:
    """HTML for one table cell and whether it is numeric (right-aligned)."""
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), False
    if is_missing(value):
        return "—", False
    if isinstance(value, (int, float)) or hasattr(value, "dtype"):
        try:
            return esc(_fmt_number(float(value), key)), True
        except (TypeError, ValueError):
            pass
    if isinstance(value, (dict, list, tuple)):
        return f"<code>{esc(json.dumps(value, default=str))}</code>", False
    if key == "exceeds_L" and str(value).strip().lower() in {"true", "false"}:
        return ("yes" if str(value).strip().lower() == "true" else "no"), False
    return esc(value), False


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
           row_class: Any = None, cell_class: Callable[[str, Any], str] | None = None) -> str:
    """An HTML table of ``rows`` (dicts); columns default to the union of keys, in order."""
    if not rows:
        return f"<p>{na_cell()}</p>"
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cls = row_class(row) if row_class else ""
        cells = []
        for col in columns:
            text, numeric = _cell(row.get(col), col)
            classes = " ".join(c for c in ("num" if numeric else "", cell_class(col, row.get(col)) if cell_class else "") if c)
            cells.append(f'<td class="{esc(classes)}">{text}</td>' if classes else f"<td>{text}</td>")
        attr = f' class="{esc(cls)}"' if cls else ""
        body.append(f"<tr{attr}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def html_kv_table(mapping: Any) -> str:
    if not isinstance(mapping, Mapping) or not mapping:
        return f"<p>{na_cell()}</p>"
    rows = []
    for key, value in mapping.items():
        text, numeric = _cell(value, str(key))
        cls = ' class="num"' if numeric else ""
        rows.append(f"<tr><th>{esc(key)}</th><td{cls}>{text}</td></tr>")
    return f'<div class="scroll"><table><tbody>{"".join(rows)}</tbody></table></div>'


def definitions_html(defs: Any) -> str:
    if not isinstance(defs, Mapping) or not defs:
        return f"<p>{na_cell()}</p>"
    items = []
    for key, value in defs.items():
        inner = definitions_html(value) if isinstance(value, Mapping) else f"<code>{esc(value)}</code>"
        items.append(f"<dt>{esc(key)}</dt><dd>{inner}</dd>")
    return f'<dl class="defs">{"".join(items)}</dl>'


def ordered(rows: Iterable[Mapping[str, Any]], preferred: Sequence[str]) -> list[str]:
    # Known columns first in their documented order, anything extra the analysis added after.
    rows = list(rows)
    present = {k for r in rows for k in r}
    cols = [c for c in preferred if c in present]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def interval_text(estimate: Any, ci: Any, unit: str = " %") -> str:
    """``12.3 % [4.5, 20.1]``, or "—" when the estimate is missing."""
    if is_missing(estimate):
        return "—"
    text = f"{float(estimate):.1f}{unit}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and not any(is_missing(v) for v in ci):
        text += f" [{float(ci[0]):.1f}, {float(ci[1]):.1f}]"
    return text
