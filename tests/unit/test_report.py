"""The end-of-run curves: accuracy, loss and round time per round, as a PNG in the output folder."""

from __future__ import annotations

import json

import matplotlib.image
from matplotlib.text import Text

from p2psl.cli.report import CURVES, draw_curves, main, write_curves


def rounds(n: int) -> list[dict]:
    return [{"event": "round", "round": r, "train_loss": 2.0 / r, "test_accuracy": 0.5 + 0.04 * r,
             "test_loss": 1.5 / r, "seconds": 1.0 + 0.1 * r, "predicted_seconds": 1.1} for r in range(1, n + 1)]


def write_run(folder, records: list[dict], summary: dict | None = None) -> None:
    lines = records + [{"event": "peer", "name": "alice", "role": "data_owner", "peak_rss_bytes": 1,
                        "bytes_sent": 2, "bytes_received": 3}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def test_curves_png_decodes_to_a_sensible_image(tmp_path):
    write_run(tmp_path, rounds(10))
    path = write_curves(tmp_path)
    assert path == tmp_path / CURVES
    image = matplotlib.image.imread(path)
    assert image.shape[1] >= 1000 and 300 <= image.shape[0] <= 800
    assert image[..., :3].std() > 0.05   # not a blank canvas


def test_curves_plot_every_round_and_the_centralized_reference():
    fig = draw_curves(rounds(4), centralized=0.97, title="run")
    acc, loss, seconds = fig.axes
    assert list(acc.lines[0].get_xdata()) == [1, 2, 3, 4]
    assert list(acc.lines[0].get_ydata()) == [0.54, 0.58, 0.62, 0.66]
    assert [line.get_label() for line in loss.lines] == ["train (mean over batches)", "test"]
    assert [line.get_label() for line in seconds.lines] == ["measured", "predicted before the round"]
    text = "\n".join(t.get_text() for t in fig.findobj(Text))
    assert "centralized 0.970" in text and "final test accuracy 0.6600" in text


def test_centralized_accuracy_is_read_from_the_summary(tmp_path):
    write_run(tmp_path, rounds(2), {"ok": True, "centralized_accuracy": 0.9})
    write_curves(tmp_path)
    assert (tmp_path / CURVES).stat().st_size > 10_000


def test_a_diverged_loss_leaves_a_gap_not_a_crash(tmp_path):
    records = rounds(3)
    records[1]["train_loss"] = None
    fig = draw_curves(records)
    assert list(fig.axes[1].lines[0].get_xdata()) == [1, 3]


def test_no_round_no_picture(tmp_path, capsys):
    write_run(tmp_path, [])
    assert write_curves(tmp_path) is None
    assert not (tmp_path / CURVES).exists()
    assert main([str(tmp_path)]) == 1
    assert "no round" in capsys.readouterr().err


def test_command_says_a_folder_without_metrics_is_no_run(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl there" in capsys.readouterr().err


def test_command_redraws_a_finished_run(tmp_path, capsys):
    write_run(tmp_path, rounds(3))
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / CURVES)
