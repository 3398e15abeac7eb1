"""Knee landmarks for T8 by the upstream KNEEL models (rule kneel_landmarks, conda env envs/kneel.yaml).

Runs in KNEEL's own environment (Python 3.7, PyTorch, the `kneel` package from github.com/Oulu-IMEDS/KNEEL),
where medprobe is not installed: this file uses the standard library, numpy, pydicom and `kneel` only, and
stays Python 3.7 compatible. It calls KNEEL exactly as upstream's scripts/inference_new_data.py does:

    KneeAnnotatorPipeline(lc_snapshot_path, hc_snapshot_path, mean_std_path, device)
    .predict(img_name, roi_size_mm, pad, refine)

`predict` reads the DICOM itself and returns None when it cannot, else an array (1, 2, 16, 2): knee 0 is the
patient's right knee (the image's left half), knee 1 the left; 16 landmarks (9 tibial, then 7 femoral) as
(x, y) pixels of the original image. Each radiograph of knees.csv is run once. Written (atomically):

* landmarks.csv: file, side, landmark, x, y (long form, one row per landmark of each requested knee);
* landmarks_undetected.csv: file, side, reason for every requested knee KNEEL found no joint for (file
  missing or unreadable, an error, non-finite output, or a joint centre outside the image). Each is also
  logged; none is dropped silently: the recipe leaves them out and counts them in counts.json.

Progress is kept in <landmarks>.progress.jsonl, so an interrupted run resumes where it stopped (with the
same snapshots and settings) and ends with the same files as an uninterrupted one.

    python kneel_landmarks.py --knees knees.csv --data-dir DIR --snapshots snapshots_release \
        --landmarks landmarks.csv --undetected landmarks_undetected.csv [--device auto] [--no-refine]
"""

import argparse
import csv
import glob
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("kneel_landmarks")

SIDES = ("R", "L")  # index in KNEEL's output: 0 = patient's right knee, 1 = left knee
LANDMARK_COLUMNS = ["file", "side", "landmark", "x", "y"]
UNDETECTED_COLUMNS = ["file", "side", "reason"]
KNEE_COLUMNS = ["file", "side"]


def read_knees(path):
    """Radiographs of knees.csv in first-seen order, each with the sides asked for: [(file, [sides])]."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in KNEE_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError("{}: missing column(s) {}; found {}".format(path, missing, reader.fieldnames))
        order, sides = [], {}
        for number, row in enumerate(reader, start=2):
            side = (row["side"] or "").strip().upper()[:1]
            if side not in SIDES:
                raise ValueError("{}: row {}: side must be R or L, got {!r}".format(path, number, row["side"]))
            if row["file"] not in sides:
                order.append(row["file"])
                sides[row["file"]] = []
            if side not in sides[row["file"]]:
                sides[row["file"]].append(side)
    return [(file, sides[file]) for file in order]


def snapshot_paths(folder, lc_name, hc_name, mean_std_name):
    """(lc, hc, mean_std) paths in the released snapshot folder; raises naming every missing piece."""
    lc, hc, mean_std = (os.path.join(folder, name) for name in (lc_name, hc_name, mean_std_name))
    missing = [] if os.path.isfile(mean_std) else [mean_std]
    for snapshot in (lc, hc):
        if not os.path.isfile(os.path.join(snapshot, "session.pkl")):
            missing.append(os.path.join(snapshot, "session.pkl"))
        if not glob.glob(os.path.join(snapshot, "fold_*.pth")):
            missing.append(os.path.join(snapshot, "fold_*.pth"))
    if missing:
        raise FileNotFoundError("{}: not a KNEEL snapshot folder, missing {}".format(folder, missing))
    return lc, hc, mean_std


def image_size(path):
    """(columns, rows) from the DICOM header, or None when pydicom cannot tell."""
    try:
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(header.Columns), int(header.Rows)
    except Exception:  # the bounds check is a safeguard only; KNEEL itself decides what it can read
        return None


def knee_results(path, predict):
    """{side: ("ok", [[x, y], ...]) or ("undetected", reason)} for both knees of one radiograph."""
    if not os.path.isfile(path):
        return {side: ("undetected", "file not found") for side in SIDES}
    try:
        landmarks = predict(path)
    except Exception as error:  # one bad radiograph must not stop the others; it is reported
        reason = "KNEEL failed: {}: {}".format(type(error).__name__, error).replace("\n", " ")
        return {side: ("undetected", reason) for side in SIDES}
    if landmarks is None:
        return {side: ("undetected", "KNEEL could not read it (not a DICOM with pixel data and spacing?)") for side in SIDES}
    points = np.asarray(landmarks, dtype=float)
    if points.ndim == 4 and points.shape[0] == 1:
        points = points[0]
    if points.ndim != 3 or points.shape[0] != 2 or points.shape[2] != 2:
        reason = "unexpected KNEEL output of shape {}".format(list(np.shape(landmarks)))
        return {side: ("undetected", reason) for side in SIDES}
    size = image_size(path)
    results = {}
    for index, side in enumerate(SIDES):
        knee = points[index]
        if not np.isfinite(knee).all():
            results[side] = ("undetected", "no joint found")
            continue
        x, y = knee.mean(axis=0)
        if size is not None and not (0 <= x < size[0] and 0 <= y < size[1]):
            results[side] = ("undetected", "joint centre ({:.0f}, {:.0f}) outside the {}x{} image".format(x, y, *size))
            continue
        results[side] = ("ok", knee.tolist())
    return results


def read_progress(path, settings):
    """Results of an interrupted run with the same settings: {file: results}; a torn last line is ignored."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path) as handle:
        lines = handle.read().split("\n")
    try:
        if json.loads(lines[0]) != settings:
            log.info("%s was written with other settings; starting over", path)
            return done
    except ValueError:
        return done
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        done[entry["file"]] = {side: tuple(value) for side, value in entry["results"].items()}
    return done


def write_csv(path, columns, rows):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, "." + os.path.basename(path) + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    os.replace(temporary, path)


def annotate(knees, data_dir, predict, landmarks_path, undetected_path, settings=None):
    """Run ``predict`` (KNEEL's pipeline) once per radiograph of ``knees`` and write the two CSV files.

    Returns (knees with landmarks, knees undetected)."""
    settings = dict(settings or {})
    progress_path = landmarks_path + ".progress.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(landmarks_path)), exist_ok=True)
    done = read_progress(progress_path, settings)
    if done:
        log.info("resuming: %d of %d radiograph(s) done before", sum(file in done for file, _ in knees), len(knees))
    mode = "a" if done else "w"
    started = time.time()
    with open(progress_path, mode) as progress:
        if not done:
            progress.write(json.dumps(settings) + "\n")
        for number, (file, _) in enumerate(knees, start=1):
            if file in done:
                continue
            results = knee_results(os.path.join(data_dir, file), predict)
            done[file] = results
            progress.write(json.dumps({"file": file, "results": results}) + "\n")
            progress.flush()
            if number % 100 == 0:
                log.info("%d/%d radiographs (%.1f s each)", number, len(knees), (time.time() - started) / number)
    found, missed = [], []
    for file, sides in knees:
        for side in sides:
            status, value = done[file][side]
            if status == "ok":
                found.extend([file, side, k, round(x, 2), round(y, 2)] for k, (x, y) in enumerate(value))
            else:
                missed.append([file, side, value])
                log.warning("no landmarks for %s knee %s: %s", file, side, value)
    write_csv(undetected_path, UNDETECTED_COLUMNS, missed)
    write_csv(landmarks_path, LANDMARK_COLUMNS, found)
    os.remove(progress_path)
    knees_found = len({(row[0], row[1]) for row in found})
    log.info("%d knee(s) with landmarks -> %s; %d without -> %s", knees_found, landmarks_path, len(missed), undetected_path)
    return knees_found, len(missed)


def claim_device(requested):
    """The torch device: ``requested`` unless ``auto``; ``auto`` claims one GPU like the extraction jobs do
    (medprobe.devices, imported from the source tree: it needs the standard library only), else the CPU."""
    if requested != "auto":
        return requested, None
    claim = None
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
    try:
        from medprobe.devices import claim_devices

        claim = claim_devices(1)
    finally:
        sys.path.pop(0)
    try:
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu"), claim
    except ImportError:
        return "cpu", claim


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--knees", required=True, help="knees.csv (file, side, ...)")
    parser.add_argument("--data-dir", required=True, help="folder the knees.csv file paths are relative to")
    parser.add_argument("--snapshots", required=True, help="the unpacked snapshots_release folder")
    parser.add_argument("--lc-snapshot", default="lext-devbox_2019_07_14_16_04_41")
    parser.add_argument("--hc-snapshot", default="lext-devbox_2019_07_14_19_25_40")
    parser.add_argument("--mean-std", default="mean_std.npy")
    parser.add_argument("--landmarks", required=True, help="output landmarks.csv")
    parser.add_argument("--undetected", required=True, help="output landmarks_undetected.csv")
    parser.add_argument("--device", default="auto", help="auto (claim a GPU if there is one), cuda, cuda:N or cpu")
    parser.add_argument("--roi-size-mm", type=int, default=140)
    parser.add_argument("--pad", type=int, default=300)
    parser.add_argument("--no-refine", dest="refine", action="store_false", help="skip KNEEL's second pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    knees = read_knees(args.knees)
    lc, hc, mean_std = snapshot_paths(args.snapshots, args.lc_snapshot, args.hc_snapshot, args.mean_std)
    device, claim = claim_device(args.device)
    try:
        from kneel.inference.pipeline import KneeAnnotatorPipeline
    except ImportError as error:
        raise ImportError(
            "KNEEL is not importable here ({}): run this script in envs/kneel.yaml (snakemake --sdm conda), or "
            "install github.com/Oulu-IMEDS/KNEEL into this environment (pip install -e <clone>)".format(error)
        ) from error

    log.info("KNEEL on %s: %d radiograph(s) of %s", device, len(knees), args.knees)
    annotator = KneeAnnotatorPipeline(lc, hc, mean_std, device)

    def predict(path):
        return annotator.predict(path, args.roi_size_mm, args.pad, args.refine)

    settings = {"snapshots": [os.path.basename(lc), os.path.basename(hc)], "roi_size_mm": args.roi_size_mm,
                "pad": args.pad, "refine": args.refine, "data_dir": os.path.abspath(args.data_dir)}
    annotate(knees, args.data_dir, predict, args.landmarks, args.undetected, settings)
    if claim is not None:
        claim.release()


if __name__ == "__main__":
    main()
