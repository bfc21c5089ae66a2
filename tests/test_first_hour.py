"""A newcomer's first hour (issue 19): a light demo, progress while `run` works, quiet runs."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onnxopt import cli, graph, registry
from onnxopt.manager import PassManager, PassRecord, ProgressEvent
from onnxopt.pass_base import Change, Skip
from onnxopt.progress import ProgressView, pass_lines, plural

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny_mlp"


def _tiny_run(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "run", str(TINY / "tiny_mlp.onnx"), "--passes", "prune", "--data", str(TINY / "calib.npz"),
        "--eval", str(TINY / "eval.npz"), "-o", str(tmp_path / "out.onnx"), *extra,
    ]  # fmt: skip


def test_demo_imports_no_framework_and_no_plotting(tmp_path):
    """`make demo` installs the core only: its command must not import torch, TensorFlow or matplotlib."""
    code = (
        "import sys\n"
        "from onnxopt import cli\n"
        f"assert cli.main({_demo_argv(tmp_path)!r}) == 0\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'matplotlib', 'keras', 'jinja2') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "tiny_mlp.opt.onnx").exists()


def _demo_argv(tmp_path: Path) -> list[str]:
    """The Makefile's demo command, read from the Makefile itself, with the outputs moved to ``tmp_path``."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    block = text[text.index("\ndemo:") :]
    line = next(ln for ln in block.splitlines() if "onnxopt run" in ln)
    argv = line.split("onnxopt", 1)[1].split()
    return [str(tmp_path / Path(a).name) if a.startswith("out/") else a for a in argv]


def test_makefile_demo_and_test_use_separate_stamps():
    """`make demo` then `make test` must still install the test extras: the two targets have their own stamps."""
    text = (ROOT / "Makefile").read_text()
    demo_deps = re.search(r"^demo:(.*)$", text, re.M).group(1).split()
    test_deps = re.search(r"^test:(.*)$", text, re.M).group(1).split()
    setup_deps = re.search(r"^setup:(.*)$", text, re.M).group(1).split()
    assert demo_deps == ["$(CORE_STAMP)"] and (test_deps == ["setup"] and setup_deps == ["$(STAMP)"])
    core_rule = text[text.index("$(CORE_STAMP):") :].split("\n\n")[0]
    full_rule = text[text.index("$(STAMP):") :].split("\n\n")[0]
    assert "-e ." in core_rule and "[" not in core_rule.split("-e", 1)[1]  # the core: no extras
    assert "touch $(CORE_STAMP)" in core_rule and "touch $(STAMP)" in full_rule
    for extra in ("dev", "tf", "torch", "models"):
        assert extra in full_rule.split("-e", 1)[1]


def test_piped_run_prints_plain_lines_in_order(tmp_path, capsys):
    code = cli.main(_tiny_run(tmp_path))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "\r" not in out and "\x1b" not in out  # no bars or cursor movement in a pipe
    lines = out.splitlines()

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    trials = [line for line in lines if line.startswith("prune search: trial ")]
    assert trials, out
    numbers = [int(re.match(r"prune search: trial (\d+) of (\d+)", t).group(1)) for t in trials]
    assert numbers == list(range(1, len(trials) + 1))
    total = int(re.match(r"prune search: trial \d+ of (\d+)", trials[0]).group(1))
    assert len(trials) <= total
    assert any("best: weights" in t for t in trials)
    # each pass's line comes when the pass ends: simplify before calibration, prune's after its search
    assert first("pass simplify:") < first("calibrating: 1,000 samples") < first("prune search: trial 1 ")
    assert first(trials[-1]) < first("pass prune:") < first("validating: 2,000 samples") < first("wrote ")
    assert first("validating:") < first("validation on")


def test_quiet_prints_nothing_but_errors(tmp_path, capsys):
    code = cli.main(_tiny_run(tmp_path, "--quiet"))
    out, err = capsys.readouterr()
    assert code == 0 and out == "" and err == ""
    assert (tmp_path / "out.onnx").exists()
    with pytest.raises(SystemExit) as exit_:  # a bad option still says why, on stderr
        cli.main(_tiny_run(tmp_path, "-q", "--max-accuracy-drop", "-1"))
    code = exit_.value.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("onnxopt: error:") and err.count("\n") == 1


def test_quiet_validation_failure_goes_to_stderr(tmp_path, capsys):
    argv = _tiny_run(tmp_path, "-q", "--no-simplify")
    argv[argv.index("prune")] = "svd"
    code = cli.main([*argv, "--svd-rank", "1", "--no-svd-data-aware"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "validation failed: nothing written" in err and not (tmp_path / "out.onnx").exists()


def test_engine_prints_nothing_and_emits_events_in_order(capsys):
    events: list[ProgressEvent] = []
    report = PassManager(["prune"], data=str(TINY / "calib.npz"), eval_data=str(TINY / "eval.npz"),
                         progress=events.append).run(TINY / "tiny_mlp.onnx")  # fmt: skip
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    kinds = [(e.kind, e.stage) for e in events]
    starts = [e.stage for e in events if e.kind == "pass_start"]
    ends = [e.record.name for e in events if e.kind == "pass_end"]
    assert starts == ends == [r.name for r in report.passes] == ["simplify", "prune", "simplify"]
    prune_start, prune_end = kinds.index(("pass_start", "prune")), kinds.index(("pass_end", "prune"))
    trials = [e for e in events[prune_start:prune_end] if e.kind == "trial"]
    assert [t.done for t in trials] == list(range(1, len(trials) + 1)) and trials[0].total >= len(trials)
    passing = [t for t in trials if t.ok]
    assert passing and all(0 < t.best_weights < 1 for t in passing)  # prune keeps fewer weights
    assert [t.best_weights for t in passing] == sorted((t.best_weights for t in passing), reverse=True)
    calibrating = [e for e in events[prune_start:prune_end] if e.kind == "samples"]
    assert calibrating and calibrating[-1].stage == "calibrating" and calibrating[-1].done == calibrating[-1].total
    validating = [e for e in events[kinds.index(("pass_end", "simplify"), prune_end) :] if e.kind == "samples"]
    assert validating[-1].stage == "validating" and validating[-1].done == report.validation.samples


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_view_draws_bars_with_eta_and_prints_pass_lines():
    stream = _Terminal()
    view = ProgressView(stream, min_interval=0)
    assert view.live
    view(ProgressEvent("pass_start", "prune", 1, 3))
    for done in (100, 200):
        view(ProgressEvent("samples", "calibrating", done, 400))
    view(ProgressEvent("trial", "prune", 1, 12, ok=False))
    view(ProgressEvent("trial", "prune", 2, 12, ok=True, best_weights=0.62))
    record = PassRecord("prune", True, [Change("fc1", "8 of 32 channels")], [Skip("fc3", "reaches graph output")], 3.5)
    view(ProgressEvent("pass_end", "prune", 2, 3, record=record))
    view.close()
    text = stream.getvalue()
    assert "calibrating" in text and "200/400" in text and "\r" in text  # a bar redrawn in place
    assert "prune search" in text and "2/12" in text and re.search(r"<\d\d:\d\d", text)  # trial k of n, with ETA
    assert "pass prune: changed, 1 site rewritten, 1 skipped, 3.50 s" in text
    assert text.index("2/12") < text.index("pass prune:")


def test_plain_view_waits_for_an_open_ended_stage_and_pluralizes():
    stream = io.StringIO()
    view = ProgressView(stream)
    assert not view.live
    view(ProgressEvent("samples", "calibrating", 1, None))  # the data does not say how many samples
    assert stream.getvalue() == ""
    view.close()
    assert re.fullmatch(r"calibrating: 1 sample, \d+\.\d s\n", stream.getvalue())
    assert plural(1, "channel") == "1 channel" and plural(1000, "channel") == "1,000 channels"
    record = PassRecord("svd", False, [], [Skip(f"fc{i}", "rank") for i in range(12)], 0.25)
    lines = pass_lines(record)
    assert lines[0] == "pass svd: unchanged, 0 sites rewritten, 12 skipped, 0.25 s"
    assert lines[-1] == "  ... 2 more skipped sites in the report" and len(lines) == 12


def _dynamic_conv_net(tmp_path: Path) -> Path:
    """builders.conv_net with symbolic height and width: random inputs cannot be drawn without --input-shape."""
    import onnx

    from tests import builders

    proto = builders.conv_net(size=10)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = tmp_path / "dyn.onnx"
    onnx.save(proto, path)
    return path


def test_everything_missing_is_reported_in_one_message_before_any_pass(tmp_path, capsys):
    model = _dynamic_conv_net(tmp_path)
    out_path = tmp_path / "o.onnx"
    code = cli.main(["run", str(model), "--passes", "prune", "-o", str(out_path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1  # no pass ran (its line would be on stdout)
    assert "pass 'prune' needs calibration data: give --data" in err
    assert "input 'x' has a dynamic dim 2; give --data or --input-shape x=..." in err
    assert not out_path.exists()
    code = cli.main(["run", str(model), "--passes", "prune", "-o", str(out_path), "--input-shape", "x=1,3,10,10"])
    out, err = capsys.readouterr()
    assert code == 2 and "needs calibration data" in err and "dynamic dim" not in err
    code = cli.main(["run", str(model), "--passes", "quant", "--quant-mode", "static", "--no-validate", "-o",
                     str(out_path), "--input-shape", "x=1,3,10,10"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and "pass 'quant' needs calibration data" in err


def test_run_without_passes_still_names_a_bad_model_first(tmp_path, capsys):
    missing = tmp_path / "nope.onnx"
    code = cli.main(["run", str(missing), "-o", str(tmp_path / "o.onnx")])
    _, err = capsys.readouterr()
    assert code == 2 and "no such file" in err and "nothing to do" not in err
    code = cli.main(["run", str(TINY / "tiny_mlp.onnx"), "-o", str(tmp_path / "o.onnx")])
    _, err = capsys.readouterr()
    assert code == 2 and "nothing to do: give --passes" in err and not (tmp_path / "o.onnx").exists()


def test_outputs_get_ordinary_modes_and_each_is_announced(tmp_path, capsys):
    """Report and HTML are 0644 like the model (mkstemp made them 0600); "wrote" names each file written."""
    import os

    pytest.importorskip("matplotlib")
    pytest.importorskip("jinja2")
    report, page = tmp_path / "r.json", tmp_path / "r.html"
    old = os.umask(0o022)
    try:
        code = cli.main(_tiny_run(tmp_path, "--prune-ratio", "0.25", "--report", str(report), "--html", str(page)))
    finally:
        os.umask(old)
    out, err = capsys.readouterr()
    assert code == 0, err
    for path in (tmp_path / "out.onnx", report, page):
        assert path.stat().st_mode & 0o777 == 0o644, path
    wrote = [line for line in out.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {tmp_path / 'out.onnx'}", f"wrote {report}", f"wrote {page}"]


def test_unchanged_model_is_written_byte_for_byte(tmp_path, capsys):
    argv = _tiny_run(tmp_path, "--svd-rank", "100000", "--no-svd-data-aware")  # no layer can take that rank
    argv[argv.index("prune")] = "svd"
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "pass svd: unchanged" in out and "would not save work" in out  # the reason is given
    assert (tmp_path / "out.onnx").read_bytes() == (TINY / "tiny_mlp.onnx").read_bytes()


def test_svd_says_why_it_left_every_layer(tmp_path):
    from tests import builders

    model = graph.from_proto(builders.conv_net())  # one Gemm, 6 inputs x 5 outputs: below min_size
    result = registry.make_pass("svd", rank=2, min_size=8)(model)
    assert not result.modified and [(s.site, s.reason) for s in result.skipped] == [
        ("fc", "6x5: smaller than --svd-min-size 8")
    ]
    result = registry.make_pass("svd", rank=2)(graph.from_proto(_conv_only()))
    assert [(s.site, s.reason) for s in result.skipped] == [("model", "no Gemm or MatMul node")]


def _conv_only():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from tests import builders

    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    return builders.make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w],
    )


def test_prune_reports_the_fraction_it_removed():
    report = PassManager([registry.make_pass("prune", ratio=0.3)], data=str(TINY / "calib.npz"), simplify=False).run(
        TINY / "tiny_mlp.onnx"
    )
    fc1 = next(c.what for c in report.passes[0].changes if c.site == "fc1")
    match = re.fullmatch(r"(\d+) -> (\d+) channels \(([\d.]+) removed; ratio 0\.3\)", fc1)
    assert match, fc1
    before, after, fraction = int(match[1]), int(match[2]), float(match[3])
    assert fraction == float(f"{(before - after) / before:.3g}")
    assert (before, after) == (256, report.model.graph.initializers["fc1.weight"].shape[0])


def test_run_report_repr_is_one_short_line():
    report = PassManager(["simplify"], data=str(TINY / "calib.npz")).run(TINY / "tiny_mlp.onnx")
    text = repr(report)
    assert "\n" not in text and len(text) < 300 and "ir.Model" not in text and "Gemm" not in text
    assert text.startswith("RunReport(passes=simplify,") and "params 235,146 -> 235,146" in text


def test_one_sample_is_singular(tmp_path, capsys):
    import numpy as np

    data = np.load(TINY / "eval.npz")
    one = tmp_path / "one.npz"
    np.savez(one, **{k: v[:1] for k, v in data.items()})
    code = cli.main(["run", str(TINY / "tiny_mlp.onnx"), "--passes", "simplify", "--eval", str(one), "-o",
                     str(tmp_path / "o.onnx")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "validation on 1 sample of" in out and "1 samples" not in out


RECIPE = """
passes = ["prune"]
data = "calib.npz"      # beside the recipe
eval = "eval.npz"
seed = 3

[budget]
max_accuracy_drop = 1

[options.prune]
ratio = 0.3
align = 4
"""


def _recipe_dir(tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "recipe"
    folder.mkdir()
    for name in ("calib.npz", "eval.npz"):
        shutil.copyfile(TINY / name, folder / name)
    (folder / "recipe.toml").write_text(RECIPE)
    return folder


def test_recipe_runs_like_the_flags_and_the_report_repeats_it(tmp_path, capsys):
    import json

    from onnxopt import recipe

    folder = _recipe_dir(tmp_path)
    model = str(TINY / "tiny_mlp.onnx")
    first, report = tmp_path / "a.onnx", tmp_path / "a.json"
    assert (
        cli.main(["run", model, "--config", str(folder / "recipe.toml"), "-o", str(first), "--report", str(report)])
        == 0
    )
    flags = tmp_path / "flags.onnx"
    assert cli.main(["run", model, "--passes", "prune", "--data", str(TINY / "calib.npz"), "--eval",
                     str(TINY / "eval.npz"), "--seed", "3", "--max-accuracy-drop", "1", "--prune-ratio", "0.3",
                     "--prune-align", "4", "-o", str(flags)]) == 0  # fmt: skip
    capsys.readouterr()
    assert first.read_bytes() == flags.read_bytes()
    effective = json.loads(report.read_text())["recipe"]
    assert effective["passes"] == ["simplify", "prune", "simplify"] and effective["seed"] == 3
    assert effective["data"] == str((folder / "calib.npz").resolve())  # relative to the recipe's folder
    assert effective["budget"] == {"max_accuracy_drop": 1.0}
    assert effective["options"]["prune"]["ratio"] == 0.3 and effective["options"]["prune"]["align"] == 4
    assert effective["options"]["prune"]["criterion"] == "ratio"  # defaults recorded too: exact repetition
    again = tmp_path / "again.toml"
    again.write_text(recipe.to_toml(effective))
    second, report2 = tmp_path / "b.onnx", tmp_path / "b.json"
    assert cli.main(["run", model, "--config", str(again), "-o", str(second), "--report", str(report2)]) == 0
    assert second.read_bytes() == first.read_bytes()
    assert json.loads(report2.read_text())["recipe"] == effective


def test_flags_win_over_the_recipe(tmp_path, capsys):
    import json

    folder = _recipe_dir(tmp_path)
    argv = [
        "run",
        str(TINY / "tiny_mlp.onnx"),
        "--config",
        str(folder / "recipe.toml"),
        "--prune-ratio",
        "0.5",
        "--max-accuracy-drop",
        "4",
        "-o",
        str(tmp_path / "o.onnx"),
        "--report",
        str(tmp_path / "r.json"),
    ]
    assert cli.main(argv) == 0
    capsys.readouterr()
    effective = json.loads((tmp_path / "r.json").read_text())["recipe"]
    assert effective["options"]["prune"]["ratio"] == 0.5 and effective["options"]["prune"]["align"] == 4
    assert effective["budget"] == {"max_accuracy_drop": 4.0} and effective["seed"] == 3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("passes = 'prune'\nbogus = 1\n", "unknown key 'bogus'"),
        ("passes = 'prune'\n[budget]\nmax_drop = 1\n", "unknown [budget] key 'max_drop'"),
        ("passes = 'prune'\n[options.prune]\nratoi = 0.3\n", "pass 'prune' has no option 'ratoi'"),
        ("passes = 'prune'\n[options.prune]\nratio = 'high'\n", "options.prune.ratio = 'high': expected float"),
        ("passes = 'prune'\n[options.zap]\nx = 1\n", "unknown pass 'zap'"),
        ("passes = [prune\n", "not valid TOML"),
        ("passes = 'prune'\n[budget]\nmin_cosine = 'x'\n", "budget.min_cosine = 'x': expected a number"),
    ],
)
def test_bad_recipe_is_one_line_exit_2(tmp_path, capsys, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code = cli.main(["run", str(TINY / "tiny_mlp.onnx"), "--config", str(path), "-o", str(tmp_path / "o.onnx")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "o.onnx").exists()


def _other_kinds(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files people mistake for ONNX models, made from their formats' first bytes, with the kind named."""
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    files = {
        "w.safetensors": (struct.pack("<Q", len(header)) + header + bytes(8), "a safetensors file"),
        "m.tflite": (b"\x1c\x00\x00\x00TFL3" + bytes(64), "a TFLite model"),
        "m.h5": (b"\x89HDF\r\n\x1a\n" + bytes(64), "a Keras HDF5 model"),
        "old.pth": (b"\x80\x02\x8a\x0alZ\xfc\x9cF\xf9 j\xa8P\x19." + bytes(32), "a PyTorch checkpoint"),
    }
    out = {}
    for name, (blob, kind) in files.items():
        (folder / name).write_bytes(blob)
        out[name] = (folder / name, kind)
    saved = folder / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"\x08\x01")
    out["saved"] = (saved, "a TensorFlow SavedModel directory")
    return out


def test_other_model_kinds_point_to_convert(tmp_path, capsys):
    for name, (path, kind) in _other_kinds(tmp_path).items():
        code = cli.main(["run", str(path), "--passes", "simplify", "-o", str(tmp_path / "o.onnx")])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1, (name, err)
        assert f"this is {kind}" in err and "not an ONNX model" in err, (name, err)
        assert "onnxopt convert" in err or "from_torch" in err, (name, err)
        assert not (tmp_path / "o.onnx").exists()


def test_torchscript_is_detected_and_converted_with_input_shapes(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    import numpy as np
    import onnx

    from tests import builders

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 8, 8)), str(scripted))
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    code = cli.main(["run", str(scripted), "--passes", "simplify", "-o", str(tmp_path / "o.onnx")])
    _, err = capsys.readouterr()
    assert code == 2 and "this is a TorchScript archive" in err and "onnxopt convert" in err and "--input-shape" in err
    code = cli.main(["convert", str(scripted), "-o", str(tmp_path / "net.onnx")])
    _, err = capsys.readouterr()
    assert code == 2 and "give --input-shape" in err and not (tmp_path / "net.onnx").exists()
    code = cli.main(
        ["convert", str(tmp_path / "weights.pth"), "--input-shape", "x=1,3,8,8", "-o", str(tmp_path / "w.onnx")]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "weights without the network" in err
    code = cli.main(["convert", str(scripted), "--input-shape", "x=1,3,8,8", "-o", str(tmp_path / "net.onnx")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "validated against the source on 1 sample" in out
    converted = onnx.load(tmp_path / "net.onnx")
    assert [i.name for i in converted.graph.input] == ["x"]
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)  # another batch size
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = next(iter(builders.run(converted, {"x": x}).values()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_export_writes_the_ort_file_at_o_with_its_config_and_judges_mobile_providers(tmp_path, capsys):
    import numpy as np
    import onnxruntime as ort

    from onnxopt.export import mobile_usability

    target = tmp_path / "tiny.ort"
    argv = ["export", str(TINY / "tiny_mlp.onnx"), "-o", str(target), "--input-shape", "input=1,784"]
    assert cli.main(argv) == 0
    out, _ = capsys.readouterr()
    config = tmp_path / "tiny.required_operators.config"
    assert (
        target.is_file()
        and config.is_file()
        and sorted(p.name for p in tmp_path.iterdir())
        == [
            "tiny.ort",
            "tiny.required_operators.config",
        ]
    )
    text = config.read_text()
    assert str((TINY / "tiny_mlp.onnx").resolve()) in text and "onnxopt-export-" not in text  # not a temporary path
    assert "ai.onnx;13;Gemm" in text
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 784]  # --input-shape fixed it, as NNAPI and CoreML need
    x = np.load(TINY / "eval.npz")["input"][:1]
    reference = ort.InferenceSession(str(TINY / "tiny_mlp.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], reference.run(None, {"input": x})[0], atol=1e-5)
    assert "NNAPI: 5 of 5 nodes in 1 partition; worth trying: YES" in out
    assert "CoreML MLProgram:" in out and "XNNPACK is not covered" in out
    dynamic = {s.provider: s for s in mobile_usability(TINY / "tiny_mlp.onnx")}  # batch axis left dynamic
    assert dynamic["NNAPI"].supported == 0 and dynamic["NNAPI"].dynamic_shape_nodes == 5
    assert dynamic["NNAPI"].verdict == "NO"


def test_export_input_shape_errors_are_one_line(tmp_path, capsys):
    for shape, fragment in (("inp=1,784", "has no input 'inp'"), ("input=1,785", "fixed size of 784")):
        code = cli.main(["export", str(TINY / "tiny_mlp.onnx"), "-o", str(tmp_path / "t.ort"), "--input-shape", shape])
        out, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
        assert not (tmp_path / "t.ort").exists()


def _run_help() -> str:
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["run", "--help"])
    assert exit_.value.code == 0
    return buffer.getvalue()


def test_run_help_leads_with_the_common_case_and_shows_defaults():
    text = _run_help()
    assert "PASS__" not in text and "BATCH_SIZE" not in text and "OUTPUT" not in text  # plain metavars
    first_screen = "\n".join(text.splitlines()[:40])
    assert first_screen.startswith("usage: onnxopt run MODEL --passes P1,P2,... -o OUT")
    assert "onnxopt run model.onnx --passes prune,quant --data calib.npz --eval eval.npz -o out.onnx" in first_screen
    for flag in ("--passes P1,P2,...", "-o OUT, --output OUT", "--data DATA", "--eval DATA", "--config RECIPE.toml"):
        assert flag in first_screen, flag
    assert "'prune' pass options" not in first_screen  # pass options come after the common ones
    sections = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    passes = [s for s in sections if s.endswith("pass options:")]
    assert passes[:2] == ["'simplify' pass options:", "'prune' pass options:"]
    flat = " ".join(text.split())
    assert "--prune-ratio X ratio: fraction per layer (<0: search) (default: -1.0)" in flat
    assert "--prune-align N" in flat and "(default: 16)" in flat
    assert "--svd-data-aware, --no-svd-data-aware whiten with the input Gram matrix (default: on)" in flat
    assert "--seed N seed for random inputs and passes (default: 0)" in flat
    assert "re-fit every linear layer downstream" in flat  # as the README says


def test_version_and_verbose_after_the_sub_command(capsys):
    from onnxopt import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"onnxopt {__version__}"
    parser = cli.build_parser()
    after = parser.parse_args(["run", "m.onnx", "-o", "o.onnx", "-v", "--debug"])
    before = parser.parse_args(["-v", "run", "m.onnx", "-o", "o.onnx"])
    neither = parser.parse_args(["inspect", "m.onnx"])
    assert (after.verbose, after.debug) == (True, True)
    assert (before.verbose, before.debug) == (True, False)
    assert (neither.verbose, neither.debug) == (False, False)
    assert parser.parse_args(["inspect", "m.onnx", "-v"]).verbose
