"""``python -m medprobe.datasets.oai_most``: rule ``oai_most_files``, check T8's files and list every knee."""

import argparse
import json
import logging
import sys

from medprobe.datasets.oai_most.knees import prepare
from medprobe.datasets.oai_most.layout import KNEES_ALL


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="T8: check the OAI/MOST files and list every knee (rule oai_most_files)"
    )
    parser.add_argument("--data-dir", required=True, help="resources/datasets/oai_most")
    parser.add_argument("--knees-out", required=True, help=f"the knee list to write ({KNEES_ALL})")
    parser.add_argument("--receipt", required=True, help="the receipt to write (download.json)")
    parser.add_argument("--checksums", default="{}", help="JSON: file name below the data folder -> pinned SHA-256")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("medprobe").addHandler(handler)
    logging.getLogger("medprobe").setLevel(logging.INFO)
    prepare(args.data_dir, args.knees_out, args.receipt, json.loads(args.checksums))


if __name__ == "__main__":
    main()
