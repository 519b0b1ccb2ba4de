"""Plot fields of the JSONL logs the training scripts write (one JSON object per log step), Pillow only.

    python plot_log.py output/pretrain_demo/log.jsonl --field loss --out loss.png
    python plot_log.py runA/log.jsonl runB/log.jsonl --labels plain mto --field loss --smooth 10 --out cmp.png
    python plot_log.py plain/log.jsonl mto/log.jsonl --fields loss loss_dtm --out dtm_part.png
    python plot_log.py run/log.jsonl --x epochs_done --out loss.png   # a run resumed with another batch size

A last line cut short (a run killed while writing it) is left out, with a note. Where x goes back, a note says so (a
resume with another number of steps per epoch renumbers `step`; `epochs_done` keeps rising).
"""
import argparse
import itertools
import json
import math
import os
import shlex
import sys

from PIL import Image, ImageDraw

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def read_log(path: str, x_field: str, field: str):
    """[(x, y)] for the lines of a JSONL log that have both fields (null, e.g. the gradient norm of a step skipped
    by fp16's GradScaler, counts as absent; so do NaN and Infinity, which this repo's logs write as null). A last line
    cut short (a run killed while writing it; its resume drops it) is left out with a note."""
    points, without_x, seen, lines, back = [], 0, {}, 0, []
    if os.path.isdir(path):
        raise SystemExit(f"error: {path!r} is a folder; pass the log file in it "
                         f"({shlex.quote(os.path.join(path, 'log.jsonl'))})")
    if not os.path.exists(path):  # a pipe is read too: <(grep -v skipped_image log.jsonl), /dev/stdin
        raise SystemExit(f"error: {path!r}: no such file (a run's log is log.jsonl in its --output_dir)")
    with open(path, errors="replace") as f:  # a binary file (a checkpoint passed by mistake) fails on its first line
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number > 1 and not line.endswith("\n"):  # the last line (no newline), cut short
                    print(f"note: {path}:{number}: left out a last line cut short (a run killed while writing it)",
                          file=sys.stderr)
                    break
                raise SystemExit(f"error: {path}:{number} is not a JSON line ({e}); pass a log.jsonl written by "
                                 f"train_*.py")
            if not isinstance(record, dict):  # a .json file's array, a number, ...
                raise SystemExit(f"error: {path}:{number} is a JSON {type(record).__name__}, not an object; pass a "
                                 f"log.jsonl written by train_*.py")
            lines += 1
            seen.update(dict.fromkeys(record))
            if record.get(field) is not None and x_field not in record:
                without_x += 1
            if record.get(x_field) is not None and record.get(field) is not None:
                x, y = (_number(record[name], name, f"{path}:{number}") for name in (x_field, field))
                if math.isfinite(x) and math.isfinite(y):
                    if points and x < points[-1][0]:
                        back.append((number, points[-1][0], x))
                    points.append((x, y))
    if back:
        note_x_goes_back(path, x_field, back)
    if not lines:
        raise SystemExit(f"error: {path} is empty (a run that has not logged a step yet?); pass a log.jsonl with lines")
    if not points:
        missing = [name for name in dict.fromkeys((x_field, field)) if name not in seen]
        if missing:  # a misspelt --field / --fields / --x: name the fields there are
            raise SystemExit(f"error: {path}: no line has {' or '.join(map(repr, missing))}; its fields are "
                             f"{', '.join(seen)}")
        raise SystemExit(f"error: {path}: no line has both {x_field!r} and {field!r} with a value (null, NaN and "
                         f"Infinity count as none); plot another --field, or {field!r} by an --x logged in the same "
                         f"lines")
    if without_x:  # e.g. epochs_done in a run continued across versions: the lines written before it was logged
        print(f"note: {path}: left out {without_x} lines with {field!r} but no {x_field!r} (written by a version that "
              f"did not log it{'; plot by --x step to see them' if x_field != 'step' else ''})", file=sys.stderr)
    return points


def note_x_goes_back(path: str, x_field: str, back: list):
    """A line drawn in the log's order would turn back at these [(line number, x before, x)]: say where first (once,
    not at every line: --x lr falls at each line after the warmup), why and what to plot by."""
    (number, before, x), more = back[0], len(back) - 1
    why = (" (a run resumed with another number of steps per epoch renumbers its steps; plot by --x epochs_done)"
           if x_field == "step" else "")
    print(f"note: {path}:{number}: {x_field} goes back from {' to '.join(_shown((before, x)))}"
          f"{f', and at {more} more lines' if more else ''}{why}", file=sys.stderr)


def _shown(values) -> list:
    """Different values as a note prints them: whole numbers (steps) in full, others with 6 significant digits or as
    many more as tell them apart (by :g, the lr's first fall after a long warmup read 'from 0.0015 to 0.0015')."""
    digits = next(d for d in range(6, 18) if len({f"{v:.{d}g}" for v in values}) == len(values))
    return [str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:.{digits}g}" for v in values]


def _number(value, name: str, where: str) -> float:
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range: Infinity, as json reads 1e400 (left out)
            return math.inf
    shown = json.dumps(value)
    raise SystemExit(f"error: {where}: {name!r} is {shown[:60] + ('...' if len(shown) > 60 else '')}, not a number; "
                     f"plot a field whose values are numbers (loss, lr, mIoU, ...)")


def moving_average(values, window: int):
    """Trailing mean over the last `window` values (window 1: unchanged), each the exact mean rounded once: from prefix
    sums of the values as integers (a float is an integer over a power of two), so each value is read once whatever the
    window (summing every window took 4 minutes for 2M log lines at --smooth 10000), and a value far larger than the
    rest (1e16) leaves no rounding behind once out of the window, as a running sum of floats would."""
    ratios = [float(value).as_integer_ratio() for value in values]
    scale = max((denominator for _, denominator in ratios), default=1)  # a power of two, as every denominator
    prefix = [0, *itertools.accumulate(numerator * (scale // denominator) for numerator, denominator in ratios)]
    return [(prefix[i + 1] - prefix[max(0, i + 1 - window)]) / (scale * min(i + 1, window)) for i in range(len(ratios))]


def x_ticks(x0, x1, integral: bool) -> list:
    """Six evenly spaced ticks over [x0, x1]; integral x (steps, epochs): whole numbers (step 96, not 95.2), each
    once."""
    ticks = [x0 + (x1 - x0) * i / 5 for i in range(6)]
    return sorted({round(t) for t in ticks}) if integral else ticks


def tick_labels(ticks) -> list:
    """Labels of evenly spaced ticks: whole numbers (x_ticks' integral ones) as they are, others with 4 significant
    digits, or as many more as tell neighbouring ticks apart (a plateau at 2.30258..2.30264 is not six times 2.303)."""
    for digits in range(4, 18):  # 17 tell any two floats apart
        labels = [str(t) if isinstance(t, int) else f"{t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            break
    return labels


def _span(values) -> tuple:
    """(lowest, highest) of values; all equal: widened by 1, or by a billionth where 1 is lost (1e17 + 1 == 1e17)."""
    low, high = min(values), max(values)
    return (low, high) if high > low else (low, low + max(1.0, abs(low) * 1e-9))


def plot(series, labels, title: str, x_label: str, y_label: str, size=(720, 440)):
    """series: list of [(x, y)] -> PIL image with axes, ticks and a legend."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    xs = [x for s in series for x, _ in s]
    ys = [y for s in series for _, y in s]
    (x0, x1), (y0, y1) = _span(xs), _span(ys)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (width - left - right),
                          top + (y1 - y) / (y1 - y0) * (height - top - bottom))
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    y_ticks = [y0 + (y1 - y0) * i / 5 for i in range(6)]
    for y, label in zip(y_ticks, tick_labels(y_ticks)):  # ticks and grid
        _, py = to_px(x0, y)
        draw.line([left, py, width - right, py], fill="#e0e0e0")
        draw.text((5, py - 6), label, fill="black")
    ticks = x_ticks(x0, x1, all(float(x).is_integer() for x in xs))
    for x, label in zip(ticks, tick_labels(ticks)):
        px, _ = to_px(x, y0)
        draw.text((px - 10, height - bottom + 6), label, fill="black")
    for k, (points, label) in enumerate(zip(series, labels)):
        color = COLORS[k % len(COLORS)]
        pixels = [to_px(x, y) for x, y in points]
        draw.line(pixels, fill=color, width=2)
        if len(pixels) == 1:  # a line through one point draws nothing: a dot
            (px, py), = pixels
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.line([left + 10, top + 12 + 16 * k, left + 30, top + 12 + 16 * k], fill=color, width=3)
        draw.text((left + 36, top + 6 + 16 * k), label, fill="black")
    draw.text((max(left, 15 + 6 * len(y_label)), 8), title, fill="black")  # right of the y label, not over it
    draw.text(((width - len(x_label) * 6) // 2, height - 22), x_label, fill="black")
    draw.text((5, top - 22), y_label, fill="black")
    return img


def check_out(path: str):
    """--out: an image file Pillow can write (by its extension; none: a PNG) in a folder that exists."""
    if os.path.isdir(path):
        raise SystemExit(f"error: --out {path!r} is a folder; name the image file to write (e.g. "
                         f"{shlex.quote(os.path.join(path, 'plot.png'))})")
    Image.init()
    extension = os.path.splitext(path)[1].lower()
    if extension and Image.registered_extensions().get(extension) not in Image.SAVE:  # unknown, or read-only
        raise SystemExit(f"error: --out {path!r}: Pillow writes no {extension!r} files; use .png (or .jpg, .pdf, ...)")
    folder = above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):  # a file in the path: mkdir -p cannot get past it
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise SystemExit(f"error: --out {path!r}: {above!r} is a file, not a folder; give a path in a folder")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --out {path!r}: {folder!r} is not a folder; create it first "
                         f"(mkdir -p {shlex.quote(folder)})")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot a field of JSONL training logs to a PNG (Pillow only).")
    parser.add_argument("logs", nargs="+", type=os.path.expanduser, help="log.jsonl files")
    parser.add_argument("--field", default=None, help="the field to plot for every log (default: loss)")
    parser.add_argument("--fields", nargs="+", help="one field per log instead of --field (e.g. loss loss_dtm)")
    parser.add_argument("--x", default="step", help="x-axis field (default: step; epochs_done across a resume with "
                        "another batch size)")
    parser.add_argument("--labels", nargs="+", help="one legend label per log (default: the paths, each with its "
                        "field where --fields differ)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="trailing moving average over this many log lines (default: 1, no smoothing)")
    parser.add_argument("--title", default="", help="the plot's title (default: the fields plotted, and the "
                        "--smooth window)")
    parser.add_argument("--out", default="plot.png", type=os.path.expanduser,  # --out=~/x.png: no shell expands it
                        help="the image written, of the type its extension names (none: PNG; default: plot.png)")
    args = parser.parse_args(argv)
    check_out(args.out)
    labels = args.labels or args.logs
    if len(labels) != len(args.logs):
        raise SystemExit(f"error: {len(args.logs)} logs but {len(labels)} labels")
    if args.smooth < 1:
        raise SystemExit(f"error: --smooth {args.smooth}: the moving average needs >= 1 log lines (1: none)")
    if args.field and args.fields:
        raise SystemExit("error: give --field (one field for every log) or --fields (one per log), not both")
    fields = args.fields or [args.field or "loss"] * len(args.logs)
    if len(fields) != len(args.logs):
        raise SystemExit(f"error: {len(args.logs)} logs but {len(fields)} fields")
    if not args.labels and len(set(fields)) > 1:  # the paths alone would not tell the curves apart
        labels = [f"{path} ({field})" for path, field in zip(args.logs, fields)]
    series = []
    for path, field in zip(args.logs, fields):
        points = read_log(path, args.x, field)
        smoothed = moving_average([y for _, y in points], args.smooth)
        series.append([(x, y) for (x, _), y in zip(points, smoothed)])
    smoothing = f" (moving average of {args.smooth})" if args.smooth > 1 else ""
    title = args.title or f"{'/'.join(dict.fromkeys(fields))}" + smoothing
    image = plot(series, labels, title, args.x, "/".join(dict.fromkeys(fields)))
    try:
        image.save(args.out, format=None if os.path.splitext(args.out)[1] else "PNG")  # no extension: a PNG
    except (OSError, ValueError) as e:  # a format Pillow lists but cannot write from RGB, a full disk, ...
        if isinstance(e, OSError) and e.errno is not None:  # the file system's refusal: the format is not the cause
            raise SystemExit(f"error: --out {args.out!r}: cannot write it ({e}); give a path in a folder you can "
                             f"write to, on a disk with room") from None
        raise SystemExit(f"error: --out {args.out!r}: Pillow could not write it ({e}); use .png") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # an --out stdout cannot encode (not UTF-8: b'r\xe9s.png'), escaped
        sys.stdout.reconfigure(errors="backslashreplace")  # as engine.escape_what_stdout_cannot_encode
    main()
