"""``onnxopt run --html``: a self-contained, escaped HTML report with per-layer costs, passes, validation, plots."""

from __future__ import annotations

import base64
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import cli, cost, graph
from onnxopt.cost import ModelCost, NodeCost
from onnxopt.manager import PassManager, PassRecord, RunReport, StageRecord
from onnxopt.pass_base import Change, Skip

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

from onnxopt import html_report  # noqa: E402  (needs matplotlib to render)

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny_mlp"
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = 'fc1 <script>alert("x")</script> & $x$ <iframe src=x>'


class _Page(HTMLParser):
    """Tables as lists of row cell texts, image sources, every tag and attribute seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [v or "" for _, v in attrs]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def _layer_table(page: _Page) -> dict[str, list[str]]:
    table = next(t for t in page.tables if t and t[0][:3] == ["layer", "op", "params before"])
    return {row[0]: row for row in table[1:]}


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _tiny_args(tmp_path: Path, model: Path = TINY / "tiny_mlp.onnx", *extra) -> list:
    return [
        "run", model, "--data", TINY / "calib.npz", "--eval", TINY / "eval.npz",
        "-o", tmp_path / "out.onnx", "--html", tmp_path / "report.html", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """prune (budget search) then int8 quant kept for size, with latency: every section of the report is filled.
    Static int8 (QDQ) by name: with prune's channel counts multiples of 16, 4-bit weights (MatMulNBits) fit and
    are smaller, and this report is about the QDQ one."""
    tmp_path = tmp_path_factory.mktemp("html")
    passes = ["--passes", "prune,quant", "--quant-objective", "size", "--quant-mode", "static"]
    argv = _tiny_args(tmp_path, TINY / "tiny_mlp.onnx", *passes)
    code = cli.main([str(a) for a in [*argv, "--latency", "--report", tmp_path / "report.json"]])
    assert code == 0
    return tmp_path


def test_report_lists_every_gemm_with_the_cost_model_numbers(tiny_report):
    text = (tiny_report / "report.html").read_text(encoding="utf-8")
    rows = _layer_table(_parse(text))
    before = cost.estimate(graph.load(TINY / "tiny_mlp.onnx"))
    after = {n.name: n for n in cost.estimate(graph.load(tiny_report / "out.onnx")).nodes}
    gemms = [n for n in before.nodes if n.op_type == "Gemm"]
    assert [n.name for n in gemms] == ["fc1", "fc2", "fc3"]
    for node in gemms:
        row = rows[node.name]
        assert row[1] == "Gemm"
        assert row[2] == f"{node.params:,}" and row[5] == f"{node.macs:,}"
        assert row[3] == f"{after[node.name].params:,}" and row[6] == f"{after[node.name].macs:,}"
        assert after[node.name].macs < node.macs  # pruned
    added = [name for name, row in rows.items() if row[-1] == "added"]
    assert added and all("DequantizeLinear" in name or "QuantizeLinear" in name for name in added)
    assert rows["total (model)"][2] == f"{before.params:,}"


def test_report_has_passes_validation_and_png_plots_and_nothing_external(tiny_report):
    text = (tiny_report / "report.html").read_text(encoding="utf-8")
    page = _parse(text)
    passes = next(t for t in page.tables if t and t[0][:2] == ["#", "pass"])
    assert [row[1] for row in passes[1:]] == ["simplify", "prune", "quant"]
    assert "reaches graph output" in text  # prune's skipped site and its reason
    assert "accuracy drop &lt;= 0.5 pp" in text and "OK" in text  # the budget and the verdict
    assert "latency (µs, median)" in text
    outputs = next(t for t in page.tables if t and t[0][0] == "output")
    assert outputs[1][0] == "logits"
    stages = next(t for t in page.tables if t and t[0][:2] == ["#", "stage"])
    assert [row[1] for row in stages[1:]] == ["original", "simplify", "prune", "quant"]
    assert len(page.images) == 2
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix) :], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert "http://" not in text and "https://" not in text
    assert not {"script", "link", "iframe", "object"} & set(page.tags)
    assert not [a for a in page.attributes if a.startswith(("http", "//"))]


def test_stage_records_match_the_validation_and_the_costs():
    report = PassManager(["prune"], data=str(TINY / "calib.npz"), eval_data=str(TINY / "eval.npz")).run(
        TINY / "tiny_mlp.onnx"
    )
    stages = report.stages
    assert [s.name for s in stages] == ["original"] + [r.name for r in report.passes]
    assert stages[0].bytes == report.before.bytes and stages[-1].bytes == report.after.bytes
    assert stages[0].accuracy == report.validation.accuracy["before"]
    assert stages[-1].accuracy == report.validation.accuracy["after"] and stages[-1].source == "validation"
    assert stages[1].source == "unchanged" and stages[1].accuracy == stages[0].accuracy
    assert stages[2].source == "budget check" and stages[2].bytes < stages[0].bytes  # prune's kept setting
    assert report.to_json().keys() == {"model", "passes", "validation", "seconds"}  # the JSON schema is unchanged


def test_hostile_node_name_is_escaped(tmp_path, capsys):
    proto = onnx.load(TINY / "tiny_mlp.onnx")
    proto.graph.node[0].name = HOSTILE
    onnx.save(proto, tmp_path / "hostile.onnx")
    code, _, err = _run(capsys, *_tiny_args(tmp_path, tmp_path / "hostile.onnx", "--passes", "simplify"))
    assert code == 0, err
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script" not in text and "<iframe" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; $x$ &lt;iframe src=x&gt;" in text
    rows = _layer_table(_parse(text))
    assert rows[HOSTILE][1] == "Gemm"
    assert not {"script", "iframe"} & set(_parse(text).tags)


def test_render_marks_removed_added_and_unnamed_layers_without_validation():
    def node(name, op, params, macs):
        return NodeCost(name, op, params, macs, 0, (1, 4))

    def model(*nodes):
        return ModelCost(tuple(nodes), sum(n.params for n in nodes), sum(n.macs for n in nodes), 0, 1000, 900)

    before = model(node("a", "Conv", 100, 1000), node("<gone>", "Conv", 50, 500), node("", "MatMul", 10, 10))
    after = model(node("a", "Conv", 60, 600), node("a_split", "Conv", 20, 200), node("", "MatMul", 10, 10))
    records = [PassRecord("split", True, [Change("a", "k×k -> k×1 + 1×k")], [Skip("<gone>", "rank <none>")], 0.5)]
    report = RunReport(None, before, after, records, None, 1.0, [StageRecord("original", 1000)])
    text = html_report.render(report, model_name="m<1>.onnx")
    rows = _layer_table(_parse(text))
    assert rows["<gone>"][3] == "–" and rows["<gone>"][-1] == "removed"
    assert rows["a_split"][2] == "–" and rows["a_split"][-1] == "added"
    assert rows["a"][4] == "0.600" and rows["a"][-1] == "changed"
    assert rows["(unnamed MatMul #2)"][-1] == ""
    assert list(rows)[:3] == ["a", "a_split", "<gone>"]  # an added layer follows the layer before it
    assert "--no-validate" in text and "rank &lt;none&gt;" in text and "m&lt;1&gt;.onnx" in text
    assert "<gone>" not in text


def test_no_html_when_validation_fails(tmp_path, capsys):
    rank1 = ["--passes", "svd", "--svd-rank", "1", "--no-svd-data-aware", "--no-simplify"]
    argv = _tiny_args(tmp_path, TINY / "tiny_mlp.onnx", *rank1)
    code, out, _ = _run(capsys, *argv, "--report", tmp_path / "report.json")
    assert code == 1 and "validation failed" in out
    assert (tmp_path / "report.json").exists()  # the JSON report is still written, as documented
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "out.onnx").exists()


def test_bad_html_path_is_a_one_line_usage_error(tmp_path, capsys):
    argv = _tiny_args(tmp_path, TINY / "tiny_mlp.onnx", "--passes", "simplify")
    argv[argv.index("--html") + 1] = tmp_path / "missing" / "report.html"
    code, out, err = _run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "out.onnx").exists() and out == ""


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, _, err = _run(capsys, *_tiny_args(tmp_path, TINY / "tiny_mlp.onnx", "--passes", "simplify"))
    assert code == 2 and err.count("\n") == 1 and "pip install 'onnxopt[report]'" in err
    assert not (tmp_path / "out.onnx").exists()


def test_missing_jinja2_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    code, _, err = _run(capsys, *_tiny_args(tmp_path, TINY / "tiny_mlp.onnx", "--passes", "simplify"))
    assert code == 2 and err.count("\n") == 1 and "--html needs jinja2: pip install 'onnxopt[report]'" in err
    assert not (tmp_path / "out.onnx").exists()


def test_template_files_are_package_data():
    """Every file under onnxopt/templates matches a package-data glob, so a wheel install can render the page."""
    import fnmatch
    import tomllib

    root = Path(html_report.__file__).resolve().parent
    config = tomllib.loads((root.parent / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["onnxopt"]
    files = [p.relative_to(root).as_posix() for p in (root / "templates").iterdir()]
    assert "templates/report.html.j2" in files
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny_report, tmp_path):
    shot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
        (tiny_report / "report.html").as_uri(),
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.read_bytes().startswith(PNG_MAGIC)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # not blank
    colors = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colors) > 100  # text, tables and the plots, not a blank or error page
    blue = (pixels[..., 2] > 0.8) & (pixels[..., 0] < 0.3)  # the "after" bars of the MACs plot
    assert blue.sum() > 2000
