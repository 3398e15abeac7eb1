"""Knee landmarks for T8 by the upstream KNEEL models (rule kneel_landmarks, conda env envs/kneel.yaml).

Runs in KNEEL's own environment (Python 3.7, PyTorch, the `kneel` package from github.com/Oulu-IMEDS/KNEEL),
without Snakemake or an installed medprobe: it imports medprobe.kneel and medprobe.gpu_job from the source tree
(both stay Python 3.7 compatible). It claims its GPU as every GPU job does (medprobe.gpu_job.GpuJob) and builds
KNEEL's pipeline on it as upstream's scripts/inference_new_data.py does,

    KneeAnnotatorPipeline(lc_snapshot_path, hc_snapshot_path, mean_std_path, device)
    .predict(img_name, roi_size_mm, pad, refine)

and medprobe.kneel.annotate runs it once per radiograph of the knee list and writes the two CSV files.

    python kneel_landmarks.py --knees knees_all.csv --data-dir DIR --snapshots snapshots_release \
        --landmarks landmarks.csv --undetected landmarks_undetected.csv [--device auto] [--no-refine]
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
from medprobe import kneel  # noqa: E402 - from the source tree, found through the line above
from medprobe.gpu_job import GpuJob  # noqa: E402

log = logging.getLogger("kneel_landmarks")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--knees", required=True, help="the knee list (file, side, ...)")
    parser.add_argument("--data-dir", required=True, help="folder the knee list's file paths are relative to")
    parser.add_argument("--snapshots", required=True, help="the unpacked snapshots_release folder")
    parser.add_argument("--landmarks", required=True, help="output landmarks.csv")
    parser.add_argument("--undetected", required=True, help="output landmarks_undetected.csv")
    parser.add_argument("--device", default="auto", help="auto (claim a GPU if there is one), cuda, cuda:N or cpu")
    parser.add_argument("--roi-size-mm", type=int, default=140)
    parser.add_argument("--pad", type=int, default=300)
    parser.add_argument("--no-refine", dest="refine", action="store_false", help="skip KNEEL's second pass")
    return parser.parse_args(argv)


def kneel_pipeline(snapshots, device):
    try:
        from kneel.inference.pipeline import KneeAnnotatorPipeline
    except ImportError as error:
        raise ImportError(
            f"KNEEL is not importable here ({error}): run this script in envs/kneel.yaml (snakemake --sdm conda), or "
            "install github.com/Oulu-IMEDS/KNEEL into this environment (pip install -e <clone>)"
        ) from error
    return KneeAnnotatorPipeline(str(snapshots["lc"]), str(snapshots["hc"]), str(snapshots["mean_std"]), device)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    knees = kneel.read_knee_list(args.knees)
    snapshots = kneel.check_snapshots(args.snapshots)
    # An interrupted run resumes only with the same models, settings and data folder.
    settings = {
        "snapshots": [kneel.LC_SNAPSHOT, kneel.HC_SNAPSHOT],
        "roi_size_mm": args.roi_size_mm,
        "pad": args.pad,
        "refine": args.refine,
        "data_dir": os.path.abspath(args.data_dir),
    }
    job = GpuJob.claim_devices(1) if args.device == "auto" else GpuJob.on(args.device)  # before CUDA starts
    with job:
        log.info("KNEEL on %s: %d radiograph(s) of %s", job.device, len(knees), args.knees)
        annotator = kneel_pipeline(snapshots, job.device)

        def predict(path):
            return annotator.predict(path, args.roi_size_mm, args.pad, args.refine)

        kneel.annotate(knees, args.data_dir, predict, args.landmarks, args.undetected, settings)


if __name__ == "__main__":
    main()
