"""report.html in a real browser (headless Chromium, Debian's package; bin/setup test installs it where it
can): the page renders its table and every embedded plot offline, a click on a header sorts the rows, and a
screenshot of it is not blank."""
import shutil
import subprocess

import pytest

from modelpress.eval.report import write_reports

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")

# appended to a copy of the page: what the browser rendered, written into the DOM that --dump-dom prints
_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => i.complete ? i.naturalWidth : -1).join(',');
  const first = () => document.querySelector('#rows tr:nth-child(2) td').textContent;
  const before = first();
  document.querySelectorAll('th')[4].click();  /* ppl */
  document.body.setAttribute('data-probe', [imgs, document.querySelectorAll('#rows tr').length, before,
                                            first()].join('|'));
});</script></body>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           *args], capture_output=True, text=True, timeout=120)


def test_report_page_renders_offline_and_sorts(tmp_path):
    rows = [{"method": m, "size_bytes": mb * 1e6, "ppl": p, "ppl_stderr": 0.3, "ppl_change_pct": 0.0, "kl_mean": k,
             "decode_tokens_per_s": t} for m, mb, p, k, t in (("fp32", 538, 16.2, 0.0, 24.0), ("q8_0", 145, 16.3, 0.001, 160.0),
                                                              ("q4_k_m", 105, 17.3, 0.05, 99.0))]
    sens = {f"model.layers.{b}.{k}.{p}": 0.001 * (b + 1) for b in range(3)
            for k, p in (("self_attn", "q_proj"), ("mlp", "down_proj"))}
    results = {"model": "m", "rows": rows, "sensitivity": sens, "recommendation": ["**q4_k_m**: smallest."],
               "settings": {"eval_windows": 2, "ctx": 8, "eval_text": None, "samples": 1, "calib_text": None,
                            "decode_tokens": 1}}
    write_reports(tmp_path, results)
    page = (tmp_path / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE, 1))
    dom = _chromium("--dump-dom", probe.as_uri()).stdout
    assert 'data-probe="' in dom, dom[-2000:]
    imgs, n_rows, before, after = dom.split('data-probe="', 1)[1].split('"', 1)[0].split("|")
    widths = [int(w) for w in imgs.split(",")]
    assert len(widths) == 3 and min(widths) > 100                 # size, speed and sensitivity plots decoded
    assert int(n_rows) == 4 and before == "q4_k_m" and after == "fp32"  # sorted by size; a click: by ppl
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,1600", (tmp_path / "report.html").as_uri())
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 1600)
    lo, hi = img.getextrema()
    assert hi - lo > 100 and len(set(img.resize((64, 80)).getdata())) > 20  # text and plots, not a blank page
