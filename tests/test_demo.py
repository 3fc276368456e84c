"""``python -m normkit demo`` (issue 6): runs end to end with few steps, with and without
matplotlib, explains what to install without scikit-learn, is reproducible, and its BatchNorm
network learns where the plain one has not yet."""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest

nk = pytest.importorskip("normkit")
from normkit import _demo  # noqa: E402
from normkit.__main__ import main  # noqa: E402


def needs_sklearn():
    pytest.importorskip("sklearn.datasets", reason="the demo's data ships with scikit-learn")


def run_demo(tmp_path, *args):
    out = io.StringIO()
    err = io.StringIO()
    png = tmp_path / "demo.png"
    argv = dict(steps=30, lr=0.5, seed=0, out=str(png))
    argv.update(args)
    rc = _demo.run(stdout=out, stderr=err, **argv)
    return rc, out.getvalue(), err.getvalue(), png


def table(text):
    """{step: (plain, bn)} from the printed accuracy table."""
    rows = re.findall(r"^\s*(\d+)\s+([01]\.\d{3})\s+([01]\.\d{3})\s*$", text, re.M)
    return {int(s): (float(a), float(b)) for s, a, b in rows}


def inference(text):
    """{statistics used: (accuracy, cross-entropy)} from the printed inference table."""
    rows = re.findall(r"^  (\S.*?)\s+([01]\.\d{3})\s+(\d+\.\d{4})$", text, re.M)
    return {name: (float(acc), float(loss)) for name, acc, loss in rows}


def test_demo_cli_with_matplotlib(tmp_path, capsys):
    needs_sklearn()
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig.png"
    assert main(["demo", "--steps", "40", "--seed", "3", "--lr", "0.5", "--out", str(png)]) == 0
    captured = capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"figure written to {png}" in captured.out
    rows = table(captured.out)
    assert rows[0] == (rows[0][0], rows[0][0])  # same initial weights: same accuracy at step 0
    assert 40 in rows and all(0 <= a <= 1 and 0 <= b <= 1 for a, b in rows.values())
    inf = inference(captured.out)
    assert set(inf) == {
        "running averages (momentum 0.1)",
        'recompute_statistics(method="paper")',
        'recompute_statistics(method="population")',
        "folded into the dense layers (fold_batch_norm)",
    }
    # folding changes nothing but round-off
    assert inf["folded into the dense layers (fold_batch_norm)"] == inf['recompute_statistics(method="population")']
    assert all(0 <= acc <= 1 and loss > 0 for acc, loss in inf.values())
    diff = float(re.search(r"largest logit difference (\S+)\)", captured.out).group(1))
    assert diff < 1e-9
    # the progress bar goes to stderr, one per run
    assert "without BatchNorm" in captured.err and "with BatchNorm" in captured.err
    assert captured.err.count("40/40") == 2


def test_demo_without_matplotlib_trains_and_prints(tmp_path, monkeypatch):
    needs_sklearn()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, out, err, png = run_demo(tmp_path)
    assert rc == 0
    assert not png.exists()
    assert "matplotlib is not installed, so no figure was written" in out
    assert 'pip install "normkit[demo]"' in out
    assert 30 in table(out) and len(inference(out)) == 4


@pytest.mark.parametrize("missing", ["sklearn", "sklearn.datasets"])
def test_demo_without_sklearn_says_what_to_install(tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    if missing == "sklearn.datasets":
        monkeypatch.setitem(sys.modules, "sklearn", None)
    rc, out, err, png = run_demo(tmp_path)
    assert rc == 1 and out == "" and not png.exists()
    assert 'pip install "normkit[demo]"' in err and "scikit-learn is not installed" in err


def test_demo_is_reproducible(tmp_path, monkeypatch):
    needs_sklearn()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    first = run_demo(tmp_path, ("seed", 5))[1]
    second = run_demo(tmp_path, ("seed", 5))[1]
    other = run_demo(tmp_path, ("seed", 6))[1]

    def strip(text):
        return re.sub(r"done in .*", "", text)

    assert strip(first) == strip(second)
    assert table(first) != table(other) or inference(first) != inference(other)


def test_batch_norm_network_learns_first():
    # The paper's claim at the demo's learning rate, on a fixed seed: after 150 steps the
    # BatchNorm network classifies most test digits while the plain sigmoid network is still
    # near chance (at step 150 the demo's default run has 0.96 against 0.11).
    needs_sklearn()
    data = _demo._load_digits(0)
    weights = _demo._initial_weights(data[0].shape[1], 0)
    quiet = io.StringIO()
    threads = nk.get_num_threads()
    with _demo.single_threaded():
        plain = _demo._train(weights, False, data, 150, _demo.DEFAULT_LR, 0, [0, 150], quiet)
        bn = _demo._train(weights, True, data, 150, _demo.DEFAULT_LR, 0, [0, 150], quiet)
    assert nk.get_num_threads() == threads  # restored
    assert plain["acc"][0] == bn["acc"][0]
    assert bn["acc"][-1] > 0.8 > 0.3 > plain["acc"][-1]
    # the watched sigmoid input: BatchNorm keeps its spread (15th to 85th percentile) of order one
    spread = bn["pct"][-1][2] - bn["pct"][-1][0]
    assert 0.5 < spread < 10
    assert np.all(np.diff(bn["pct"][-1]) >= 0)


@pytest.mark.parametrize("args", [["--steps", "-1"], ["--lr", "0"], ["--lr", "x"], ["--seed", "-2"]])
def test_demo_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", *args])
    assert e.value.code == 2
    assert "expected a" in capsys.readouterr().err


def test_demo_zero_steps(tmp_path, monkeypatch):
    needs_sklearn()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, out, err, _ = run_demo(tmp_path, ("steps", 0))
    assert rc == 0 and list(table(out)) == [0] and len(inference(out)) == 4
    assert err.count("0/0") == 2
