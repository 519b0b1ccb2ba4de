"""plot_log.py: moving average, log parsing errors, and the PNG it writes."""
import fractions
import json
import os
import random
import subprocess
import sys
import threading

import pytest
from PIL import Image

import plot_log


def test_moving_average_is_a_trailing_mean():
    assert plot_log.moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert plot_log.moving_average([4, 0, 8], 1) == [4, 0, 8]
    assert plot_log.moving_average([3, 6, 9, 0], 3) == [3, 4.5, 6, 5]
    # no running sum that keeps 1e16's rounding
    assert plot_log.moving_average([1e16, 1, 3, 2.5], 1) == [1e16, 1, 3, 2.5]
    assert plot_log.moving_average([1e16, 1, 3, 2.5], 2) == [1e16, 5e15, 2, 2.75]
    assert plot_log.moving_average([], 3) == []


class Reads(list):
    """A list that counts the values read from it (by iteration, index or slice)."""

    def __init__(self, values):
        super().__init__(values)
        self.reads = 0

    def __iter__(self):
        self.reads += len(self)
        return super().__iter__()

    def __getitem__(self, key):
        got = super().__getitem__(key)
        self.reads += len(got) if isinstance(key, slice) else 1
        return got


def test_moving_average_reads_each_value_once_and_rounds_each_mean_once():
    """It summed each window anew: 2M log lines at --smooth 10000 took 4 minutes (2 cores of an AMD EPYC VM, against
    40 s unsmoothed). Now each value is read once whatever the window, and each mean is the exact one, rounded once."""
    rng = random.Random(0)
    values = [rng.choice([1e16, -3e15, 1e-300, 0.1, 7]) * rng.random() for _ in range(1000)]
    for window in (1, 3, 100, 5000):
        counted = Reads(values)
        means = plot_log.moving_average(counted, window)
        assert counted.reads <= len(values), (window, counted.reads)  # summing each window: 95,050 at 100
        exact = [float(sum(map(fractions.Fraction, values[max(0, i + 1 - window):i + 1])) / min(i + 1, window))
                 for i in range(len(values))]
        assert means == exact, window


def test_steps_and_epochs_get_whole_number_ticks():
    assert plot_log.x_ticks(4, 96, integral=True) == [4, 22, 41, 59, 78, 96]  # not 22.4, 40.8, ...
    assert plot_log.x_ticks(0, 2, integral=True) == [0, 1, 2]  # each once
    assert plot_log.x_ticks(0.0, 1.0, integral=False) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_a_missing_log_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"error: '.*missing.jsonl': no such file \(a run's log is log.jsonl"):
        plot_log.main([str(tmp_path / "missing.jsonl")])


def test_a_log_through_a_pipe_is_read(tmp_path):
    """plot_log.py <(grep -v skipped_image log.jsonl) and /dev/stdin are pipes: they were 'no such file'."""
    pipe = str(tmp_path / "pipe")
    os.mkfifo(pipe)
    lines = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 1}\n'
    writer = threading.Thread(target=lambda: open(pipe, "w").write(lines))
    writer.start()
    try:
        assert plot_log.read_log(pipe, "step", "loss") == [(1.0, 2.5), (2.0, 1.0)]
    finally:  # a reader, open until the writer is done: read_log may have refused the pipe unopened
        reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # open(pipe) waited forever for a writer already done
        writer.join()
        os.close(reader)


def test_non_finite_values_are_left_out_and_one_point_is_drawn(tmp_path):
    lines = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": float("inf")},
             {"step": 4, "loss": 0.5}, {"epoch": 0, "val_top1": 12.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))  # json writes NaN, Infinity
    assert plot_log.read_log(str(tmp_path / "log.jsonl"), "step", "loss") == [(2.0, 1.0), (4.0, 0.5)]
    plot_log.main([str(tmp_path / "log.jsonl"), "--x", "epoch", "--field", "val_top1", "--out", str(tmp_path / "one")])
    image = Image.open(tmp_path / "one").convert("RGB")  # no extension: written as a PNG
    # the point: x 0 of 0..1 at the left edge, y 12.5 of 12.45..13.55 (padded 5%) near the bottom; not the legend's
    # blue swatch (x 80..100, y 41..43)
    dot = (70, round(30 + 1.05 / 1.1 * 360))
    assert any(image.getpixel((dot[0] + dx, dot[1] + dy)) == (31, 119, 180) for dx in range(-3, 4)
               for dy in range(-3, 4))


def test_plot_two_logs_and_errors(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for step in range(1, 21):
                f.write(json.dumps({"step": step, "loss": scale / step, "lr": 0.1}) + "\n")
    assert plot_log.read_log(str(tmp_path / "b.jsonl"), "step", "loss")[1] == (2.0, 1.0)
    with open(tmp_path / "a.jsonl", "a") as f:  # a step skipped by fp16's GradScaler: its gradient norm is null
        f.write(json.dumps({"step": 21, "loss": 0.05, "grad_norm": None}) + "\n")
        f.write(json.dumps({"step": 22, "loss": 0.04, "grad_norm": 0.5}) + "\n")
    assert plot_log.read_log(str(tmp_path / "a.jsonl"), "step", "grad_norm") == [(22.0, 0.5)]
    out = tmp_path / "cmp.png"
    plot_log.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--labels", "a", "b", "--smooth", "3",
                   "--out", str(out)])
    image = Image.open(out).convert("RGB")
    assert image.size == (720, 440)
    colors = {image.getpixel((x, y)) for x in range(80, 700, 3) for y in range(80, 380, 3)}  # below the legend
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # both curves were drawn
    plot_log.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--fields", "loss", "lr", "--out", str(out)])
    with pytest.raises(SystemExit, match="error: 2 logs but 1 fields"):
        plot_log.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--fields", "loss"])
    with pytest.raises(SystemExit, match="error: .*no line has 'epoch'; its fields are "):
        plot_log.main([str(tmp_path / "a.jsonl"), "--field", "epoch"])
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match="error: .*not a JSON line"):
        plot_log.main([str(tmp_path / "bad.jsonl")])
    (tmp_path / "list.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')  # an AttributeError before
    with pytest.raises(SystemExit, match="error: .*list.jsonl:2 is a JSON list, not an object"):
        plot_log.main([str(tmp_path / "list.jsonl")])
    (tmp_path / "number.jsonl").write_text('{"step": 1, "loss": 2.0}\n3.5\n')
    with pytest.raises(SystemExit, match="error: .*number.jsonl:2 is a JSON float, not an object"):
        plot_log.main([str(tmp_path / "number.jsonl")])
    (tmp_path / "checkpoint.pth").write_bytes(bytes(range(256)) * 4)  # a binary file: UnicodeDecodeError before
    with pytest.raises(SystemExit, match="error: .*checkpoint.pth:1 is not a JSON line"):
        plot_log.main([str(tmp_path / "checkpoint.pth")])
    (tmp_path / "checkpoint.pth").write_bytes(bytes(range(14, 256)))  # one line (no \n or \r): not one cut short
    with pytest.raises(SystemExit, match="error: .*checkpoint.pth:1 is not a JSON line"):
        plot_log.main([str(tmp_path / "checkpoint.pth")])
    for out, message in (("x.pngg", "Pillow writes no '.pngg' files"),
                         ("a.jsonl/x.png", "a.jsonl. is a file, not a folder"),  # mkdir -p of it failed
                         ("a.jsonl/b/c/x.png", "a.jsonl. is a file, not a folder"),
                         ("x.psd", "Pillow writes no '.psd' files")):  # a format Pillow reads only
        with pytest.raises(SystemExit, match=message):  # checked before reading the logs, not after (a traceback)
            plot_log.main([str(tmp_path / "a.jsonl"), "--out", str(tmp_path / out)])


@pytest.mark.parametrize("argv, message", [(["--smooth", "0"], "--smooth 0: the moving average needs >= 1"),
                                           (["--field", "loss", "--fields", "loss"],
                                            "^error: give --field \\(one field for every log\\) or --fields \\(one per "
                                            "log\\), not both$")])
def test_flags_that_would_be_ignored_are_refused(tmp_path, argv, message):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit, match=message):
        plot_log.main([str(log), *argv, "--out", str(tmp_path / "p.png")])


def test_main_hands_plot_the_smoothed_series_of_each_logs_own_field(tmp_path, monkeypatch):
    """What main passes on to plot: each log's own --fields entry, the --smooth trailing mean, the --labels, and a title
    and y label that name the fields (and the smoothing)."""
    for name, rows in (("a", [(1, 4.0, 0.1), (2, 2.0, 0.2), (3, 0.0, 0.3)]), ("b", [(10, 1.0, 8.0), (20, 3.0, 6.0)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"step": s, "loss": l, "lr": r}) + "\n"
                                                        for s, l, r in rows))
    calls = []
    monkeypatch.setattr(plot_log, "plot", lambda *args, **kwargs: calls.append(args) or Image.new("RGB", (4, 4)))
    logs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    plot_log.main([*logs, "--fields", "loss", "lr", "--labels", "A", "B", "--smooth", "2",
                   "--out", str(tmp_path / "p.png")])
    series, labels, title, x_label, y_label = calls[-1]
    assert series == [[(1.0, 4.0), (2.0, 3.0), (3.0, 1.0)], [(10.0, 8.0), (20.0, 7.0)]]  # b: its lr, not its loss
    assert labels == ["A", "B"] and x_label == "step" and y_label == "loss/lr"
    assert title == "loss/lr (moving average of 2)"
    plot_log.main([*logs, "--title", "mine", "--out", str(tmp_path / "p.png")])  # default: --field loss, no smoothing
    series, labels, title, _, y_label = calls[-1]
    assert series == [[(1.0, 4.0), (2.0, 2.0), (3.0, 0.0)], [(10.0, 1.0), (20.0, 3.0)]]
    assert labels == logs and title == "mine" and y_label == "loss"


def test_a_falling_curve_is_drawn_from_top_left_to_bottom_right():
    """plot's axes: larger y higher up, larger x further right (the plot area is x 70..700, y 30..390, y padded 5%)."""
    image = plot_log.plot([[(0.0, 10.0), (10.0, 0.0)]], ["a"], "", "step", "loss")
    blue = (31, 119, 180)
    near = lambda px, py: any(image.getpixel((px + dx, py + dy)) == blue for dx in (-2, -1, 0, 1, 2)
                              for dy in (-2, -1, 0, 1, 2))
    top, bottom = round(30 + 0.5 / 11 * 360), round(30 + 10.5 / 11 * 360)  # y = 10 and y = 0
    assert near(72, top) and near(698, bottom)
    assert not near(72, bottom) and not near(698, top)


def test_labels_that_do_not_match_the_logs_are_refused(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit, match="error: 2 logs but 1 labels"):  # zip would drop the second curve
        plot_log.main([str(log), str(log), "--labels", "only", "--out", str(tmp_path / "p.png")])


def test_lines_without_the_x_field_are_left_out_with_a_note(tmp_path, capsys):
    """A run continued across versions: its older lines lack epochs_done, which the resume message says to plot by;
    they were left out without a word."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"loss": 3.0}\n{"step": 2, "loss": 0.5}\n{"step": 3}\n{"step": 4, "loss": null}\n')
    assert plot_log.read_log(str(log), "step", "loss") == [(2.0, 0.5)]
    assert capsys.readouterr().err == (f"note: {log}: left out 1 lines with 'loss' but no 'step' (written by a version "
                                       f"that did not log it)\n")
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "epochs_done": 0.5, "loss": 0.5}\n')
    assert plot_log.read_log(str(log), "epochs_done", "loss") == [(0.5, 0.5)]
    assert capsys.readouterr().err == (f"note: {log}: left out 1 lines with 'loss' but no 'epochs_done' (written by a "
                                       f"version that did not log it; plot by --x step to see them)\n")
    log.write_text('{"step": 2, "loss": 0.5}\n{"step": 3, "loss": null}\n')
    plot_log.read_log(str(log), "step", "loss")
    assert capsys.readouterr().err == ""  # a null value (a skipped step's norm) is not a missing x
    log.write_text('{"step": 1, "loss": 0.5, "grad_norm": 2.0}\n{"step": 2, "loss": 0.4, "grad_norm": null}\n')
    assert plot_log.read_log(str(log), "grad_norm", "loss") == [(2.0, 0.5)]
    assert capsys.readouterr().err == ""  # nor is a null x: the line logged it


def test_title_names_each_field_once_and_mentions_smoothing_only_when_smoothed(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    calls = []
    monkeypatch.setattr(plot_log, "plot", lambda *args, **kwargs: calls.append(args) or Image.new("RGB", (4, 4)))
    plot_log.main([str(log), str(log), "--out", str(tmp_path / "p.png")])  # --smooth 1 (default), loss twice
    _, _, title, _, y_label = calls[-1]
    assert title == "loss" and y_label == "loss"


def test_blank_lines_and_an_upper_case_extension_are_accepted(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "loss": 0.5}\n   \n')  # a blank line, a trailing one
    assert plot_log.read_log(str(log), "step", "loss") == [(1.0, 1.0), (2.0, 0.5)]
    plot_log.main([str(log), "--out", str(tmp_path / "LOSS.PNG")])
    assert Image.open(tmp_path / "LOSS.PNG").format == "PNG"


def test_a_non_finite_x_is_left_out(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": float("nan"), "loss": 1.0}, {"step": float("inf"), "loss": 2.0}, {"step": 3, "loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_log.read_log(str(log), "step", "loss") == [(3.0, 0.5)]


def test_fractional_x_gets_fractional_ticks_and_a_seventh_curve_reuses_the_first_color(monkeypatch):
    seen = []
    x_ticks = plot_log.x_ticks
    monkeypatch.setattr(plot_log, "x_ticks",
                        lambda x0, x1, integral: seen.append(integral) or x_ticks(x0, x1, integral))
    plot_log.plot([[(0.0, 1.0), (0.5, 2.0), (1.0, 3.0)]], ["a"], "", "epoch", "loss")
    plot_log.plot([[(0.0, 1.0), (2.0, 2.0)]], ["a"], "", "step", "loss")
    assert seen == [False, True]  # 0.5 is not a whole number: 0.2, 0.4, ... not rounded to 0, 0, 1, ...
    # six curves, each flat at its own height; the sixth is brown, a seventh blue again
    image = plot_log.plot([[(0.0, float(k)), (10.0, float(k))] for k in range(7)], list("abcdefg"), "", "step", "y")
    row = lambda k: round(30 + (6.3 - k) / 6.6 * 360)  # y padded 5%: 0..6 -> -0.3..6.3
    assert image.getpixel((400, row(5))) == (140, 86, 75) and image.getpixel((400, row(6))) == (31, 119, 180)


def test_a_field_that_is_not_a_number_is_named(tmp_path):
    """Segmentation's IoU is a list per class and an evaluation line's mode a string: a one-line error, not a
    traceback from float()."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "IoU": [0.5, 0.25], "mIoU": 37.5, "mode": "eval"}\n')
    assert plot_log.read_log(str(log), "step", "mIoU") == [(1.0, 37.5)]
    with pytest.raises(SystemExit, match=r"error: .*log.jsonl:1: 'IoU' is \[0.5, 0.25\], not a number; plot a field"):
        plot_log.main([str(log), "--field", "IoU", "--out", str(tmp_path / "p.png")])
    with pytest.raises(SystemExit, match=r"log.jsonl:1: 'mode' is \"eval\", not a number"):
        plot_log.read_log(str(log), "step", "mode")
    with pytest.raises(SystemExit, match=r"log.jsonl:1: 'mode' is \"eval\", not a number"):
        plot_log.read_log(str(log), "mode", "mIoU")


def test_a_last_line_cut_short_is_left_out_with_a_note_and_a_torn_line_before_it_is_an_error(tmp_path, capsys):
    """A run killed while writing a line leaves it without its newline (its resume drops it): plotted without it."""
    good = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    (tmp_path / "log.jsonl").write_text(good + '{"step": 4, "loss": 0.2')
    assert plot_log.read_log(str(tmp_path / "log.jsonl"), "step", "loss") == [(1.0, 1.0), (2.0, 0.5), (3.0, 1 / 3)]
    assert "log.jsonl:4: left out a last line cut short" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text(good + '{"step": 4, "loss": 0.2\n')  # with its newline: not cut short
    with pytest.raises(SystemExit, match=r"log.jsonl:4 is not a JSON line"):
        plot_log.read_log(str(tmp_path / "log.jsonl"), "step", "loss")
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 0.2\n' + good)  # torn, then more lines: an error
    with pytest.raises(SystemExit, match=r"log.jsonl:1 is not a JSON line"):
        plot_log.read_log(str(tmp_path / "log.jsonl"), "step", "loss")


def test_renumbered_steps_are_noted_and_epochs_done_rises_through_them(tmp_path, capsys):
    """A run resumed with another number of steps per epoch (6, then 3) renumbers step 6 as step 3: by step the
    curve would turn back, so read_log says so and names the x that does not (epochs_done, as the trainers log it)."""
    lines = [{"step": s, "epochs_done": round(s / 6, 6), "loss": 1.0} for s in range(1, 7)]
    lines += [{"step": s, "epochs_done": round(s / 3, 6), "loss": 0.5} for s in (4, 5)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    plot_log.read_log(str(tmp_path / "log.jsonl"), "step", "loss")
    assert capsys.readouterr().err == ("note: " + str(tmp_path / "log.jsonl") + ":7: step goes back from 6 to 4 (a run "
                                       "resumed with another number of steps per epoch renumbers its steps; plot by "
                                       "--x epochs_done)\n")
    points = plot_log.read_log(str(tmp_path / "log.jsonl"), "epochs_done", "loss")
    assert [x for x, _ in points] == sorted(x for x, _ in points) and capsys.readouterr().err == ""


def test_the_default_labels_name_the_field_where_the_fields_differ(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "loss_dtm": 0.5}) + "\n")
    calls = []
    monkeypatch.setattr(plot_log, "plot", lambda *args, **kwargs: calls.append(args) or Image.new("RGB", (4, 4)))
    log = str(tmp_path / "a.jsonl")
    plot_log.main([log, log, "--fields", "loss", "loss_dtm", "--out", str(tmp_path / "p.png")])
    assert calls[-1][1] == [f"{log} (loss)", f"{log} (loss_dtm)"]
    plot_log.main([log, log, "--fields", "loss", "loss_dtm", "--labels", "A", "B", "--out", str(tmp_path / "p.png")])
    assert calls[-1][1] == ["A", "B"]


def test_an_out_that_is_a_folder_or_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    log = str(tmp_path / "log.jsonl")
    with pytest.raises(SystemExit,
                       match=r"error: --out '.*' is a folder; name the image file to write \(e.g. .*plot.png\)"):
        plot_log.main([log, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"error: --out '.*p.xbm': Pillow could not write it \(.*\); use .png"):
        plot_log.main([log, "--out", str(tmp_path / "p.xbm")])  # a format Pillow lists, for 1-bit images only
    with pytest.raises(SystemExit, match=r"error: '.*' is a folder; pass the log file in it \(.*log.jsonl\)"):
        plot_log.main([str(tmp_path), "--out", str(tmp_path / "p.png")])


def test_an_out_the_shell_left_a_tilde_in_or_under_a_file_is_taken_or_named(tmp_path, monkeypatch):
    """--out=~/loss.png (no shell expands ~ after '=') was written into a folder named '~' here, or refused with
    mkdir -p 'CWD/~', which made that folder; an --out under a file named mkdir -p of it, which fails (File exists).
    The examples of a folder's file printed the path unquoted, which a shell splits at its spaces."""
    home, work = tmp_path / "home", tmp_path / "my runs"
    home.mkdir(), work.mkdir()
    (work / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    plot_log.main(["log.jsonl", "--out=~/loss.png"])
    assert (home / "loss.png").is_file() and sorted(os.listdir(work)) == ["log.jsonl"]
    with pytest.raises(SystemExit, match=r"^error: --out 'log.jsonl/sub/p.png': '.*log.jsonl' is a file, not a "
                                         r"folder; give a path in a folder$"):
        plot_log.main(["log.jsonl", "--out", "log.jsonl/sub/p.png"])
    with pytest.raises(SystemExit, match=rf"\(e.g. '{work}/plot.png'\)$"):
        plot_log.main(["log.jsonl", "--out", str(work)])
    with pytest.raises(SystemExit, match=rf"\('{work}/log.jsonl'\)$"):
        plot_log.main([str(work)])


def test_lines_that_share_an_x_are_not_noted_as_going_back(tmp_path, capsys):
    """A training log plotted by --x epoch: every line of an epoch has the same epoch, which is not x going back."""
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "epoch": (s - 1) // 2, "loss": 1 / s}) + "\n" for s in range(1, 7)))
    points = plot_log.read_log(str(path), "epoch", "loss")
    assert [x for x, _ in points] == [0, 0, 1, 1, 2, 2]
    assert "goes back" not in capsys.readouterr().err


def test_a_misspelt_field_names_the_logs_fields_and_an_empty_log_says_so(tmp_path):
    """A typo in --field or --x named neither the fix nor the fields; an empty log read as if the field were absent."""
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    with pytest.raises(SystemExit, match=r"^error: .*log.jsonl: no line has 'los'; its fields are step, loss, lr$"):
        plot_log.main([str(log), "--field", "los", "--out", str(tmp_path / "p.png")])
    with pytest.raises(SystemExit, match=r"no line has 'stpe' or 'lss'; its fields are step, loss, lr$"):
        plot_log.main([str(log), "--x", "stpe", "--field", "lss", "--out", str(tmp_path / "p.png")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match=r"^error: .*empty.jsonl is empty \(a run that has not logged a step yet\?\)"):
        plot_log.main([str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "p.png")])


def test_fields_that_are_never_both_logged_with_a_value_name_the_fix(tmp_path):
    """No test made this refusal; it named no fix, and of a field null in every line it said no line had both
    fields although every line had both."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(record) + "\n" for record in (
        {"step": 1, "loss": 2.0, "grad_norm": None}, {"step": 2, "mode": "eval", "mIoU": 0.5})))
    for argv, x, field in ((["--field", "grad_norm"], "step", "grad_norm"), (["--x", "mIoU"], "mIoU", "loss")):
        with pytest.raises(SystemExit, match=f"^error: {log}: no line has both '{x}' and '{field}' with a value "
                                             r"\(null, NaN and Infinity count as none\); plot another --field, or "
                                             f"'{field}' by an --x logged in the same lines$"):
            plot_log.main([str(log), *argv, "--out", str(tmp_path / "p.png")])
    plot_log.main([str(log), "--x", "step", "--out", str(tmp_path / "p.png")])  # the fix: loss by step
    assert (tmp_path / "p.png").exists()


def test_an_out_in_a_missing_or_unwritable_folder_names_the_fix_not_the_format(tmp_path, monkeypatch):
    """A missing folder named no fix; a file system's refusal (errno set) said "use .png" of a .png."""
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    new = tmp_path / "it's $HOME" / "new"  # the fix as printed, pasted into a shell: this folder, not "it's /root"
    with pytest.raises(SystemExit, match=r"new.? is not a folder; create it first \(mkdir -p ") as e:
        plot_log.main([str(log), "--out", str(new / "p.png")])
    subprocess.run(["bash", "-c", str(e.value).split("create it first (")[1][:-1]], check=True)
    assert new.is_dir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(plot_log.Image.Image, "save", refuse)
    with pytest.raises(SystemExit, match=r"cannot write it \(.*Permission denied\); give a path in a folder you can"):
        plot_log.main([str(log), "--out", str(tmp_path / "p.png")])


def test_all_equal_values_too_large_for_plus_one_are_plotted():
    """One point, or a flat curve, at 1e17: the axis was widened by 1, which 1e17 + 1 == 1e17 loses (a division by
    zero)."""
    for points in ([(1e17, 2.0)], [(1.0, 1e17), (2.0, 1e17)], [(-1e17, -1e17)]):
        image = plot_log.plot([points], ["a"], "", "step", "loss")
        assert image.size == (720, 440)
        assert any(image.getpixel((x, y)) == (31, 119, 180) for x in range(70, 700) for y in range(30, 390))


def drawn_text(monkeypatch):
    texts = []
    draw_text = plot_log.ImageDraw.ImageDraw.text
    monkeypatch.setattr(plot_log.ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, **kwargs: texts.append(text) or draw_text(self, xy, text, **kwargs))
    return texts


def test_tick_labels_tell_neighbouring_ticks_apart(monkeypatch):
    """A loss on a plateau (2.30258..2.30264) had six y labels that all read 2.303, epochs done 100..100.25 the x labels
    100, 100, 100.1, 100.2, 100.2: labels get the significant digits that tell them apart (4 at least)."""
    texts = drawn_text(monkeypatch)
    plot_log.plot([[(100.0, 2.30258), (100.1, 2.30264), (100.25, 2.3026)]], ["a"], "", "epochs_done", "loss")
    y_labels, x_labels = texts[:6], texts[6:12]
    assert y_labels == ["2.30258", "2.30259", "2.3026", "2.30262", "2.30263", "2.30264"]  # ticks 1.32e-5 apart
    assert x_labels == ["100", "100.05", "100.1", "100.15", "100.2", "100.25"]
    texts.clear()
    plot_log.plot([[(0.0, 1.0), (1.0, 3.0)]], ["a"], "", "step", "loss")  # 4 digits are enough: as before
    assert texts[:8] == ["0.9", "1.34", "1.78", "2.22", "2.66", "3.1", "0", "1"]
    assert plot_log.tick_labels([0, 25000, 50000]) == ["0", "25000", "50000"]  # steps, not 2.5e+04
    assert plot_log.tick_labels([0.0, 0.24691, 0.49382]) == ["0", "0.2469", "0.4938"]  # 4 digits where 3 tell apart


def test_the_legend_names_each_curve_beside_its_colour(monkeypatch):
    texts = []
    draw_text = plot_log.ImageDraw.ImageDraw.text
    spy = lambda self, xy, text, **kwargs: texts.append((xy, text)) or draw_text(self, xy, text, **kwargs)
    monkeypatch.setattr(plot_log.ImageDraw.ImageDraw, "text", spy)
    labels = ["low", "mid", "high"]
    image = plot_log.plot([[(0.0, float(k)), (10.0, float(k))] for k in range(3)], labels, "", "step", "y")
    row = lambda k: round(30 + (2.1 - k) / 2.2 * 360)  # curve k flat at y = k; y padded 5%: -0.1..2.1
    legend = [(y, text) for (x, y), text in texts if text in labels]
    assert sorted(text for _, text in legend) == sorted(labels)
    for y, text in legend:  # its swatch (x 80..100, 6 px below the text's top) has its curve's colour
        assert image.getpixel((90, y + 6)) == image.getpixel((400, row(labels.index(text)))) != (255, 255, 255)


def test_x_going_back_at_many_lines_is_one_note(tmp_path, capsys):
    """Loss by --x lr: the lr falls after its warmup, which printed one note per line (1800 for this log)."""
    log = tmp_path / "log.jsonl"
    lrs = [s / 200 for s in range(1, 201)] + [1 - s / 1800 for s in range(1, 1801)]
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "lr": lr}) + "\n" for s, lr in enumerate(lrs, 1)))
    assert len(plot_log.read_log(str(log), "lr", "loss")) == 2000
    assert capsys.readouterr().err == f"note: {log}:201: lr goes back from 1 to 0.999444, and at 1799 more lines\n"


def test_x_going_back_by_less_than_six_digits_tell_is_noted_with_the_digits_that_do(tmp_path, capsys):
    """Loss by --x lr of a long cosine schedule: its first fall after the peak (by 1.1e-10) read 'lr goes back from
    0.0015 to 0.0015'; steps past a million, 'step goes back from 1.00001e+06 to 1.00001e+06'."""
    log = tmp_path / "log.jsonl"
    why = " (a run resumed with another number of steps per epoch renumbers its steps; plot by --x epochs_done)"
    for name, values, said in (("lr", (0.0014999999637920478, 0.0014999998521973638), "0.0015 to 0.0014999999"),
                               ("step", (1000010, 1000005), f"1000010 to 1000005{why}")):
        log.write_text("".join(json.dumps({name: v, "loss": 1.0}) + "\n" for v in values))
        plot_log.read_log(str(log), name, "loss")
        assert capsys.readouterr().err == f"note: {log}:2: {name} goes back from {said}\n"
    log.write_text("".join(json.dumps({"tokens": v, "loss": 1.0}) + "\n" for v in (1e20, 1e19)))
    plot_log.read_log(str(log), "tokens", "loss")  # whole, but past 2 ** 53: not 10000000000000000000
    assert capsys.readouterr().err == f"note: {log}:2: tokens goes back from 1e+20 to 1e+19\n"



def test_an_integer_beyond_floats_range_is_left_out_like_infinity(tmp_path):
    """json reads 1e400 as Infinity, which is left out; an integer as large raised float's OverflowError."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1' + "0" * 400 + '}\n{"step": 2' + "0" * 400 + ', "loss": 0.5}\n'
                   '{"step": 3, "loss": 0.25}\n')
    assert plot_log.read_log(str(log), "step", "loss") == [(3.0, 0.25)]


def test_an_out_stdout_cannot_encode_is_printed_escaped(tmp_path):
    """An --out in a folder named by a Latin-1 machine (b'r\\xe9s': 'r\\udce9s' here): a UTF-8 locale's stdout (errors
    'strict' without Python's UTF-8 mode; PYTHONIOENCODING=utf-8 here) raised UnicodeEncodeError once the PNG was
    written, a traceback and exit status 1."""
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    folder = tmp_path / os.fsdecode(b"r\xe9s")
    folder.mkdir()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot_log.py")
    result = subprocess.run([sys.executable, script, str(tmp_path / "log.jsonl"), "--out", str(folder / "p.png")],
                            capture_output=True, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {tmp_path}/r\\udce9s/p.png\n".encode() and (folder / "p.png").is_file()
