"""What a run's data fingerprint costs (lesa.engine.run_data): listing an ImageNet-shaped folder, as training
does anyway, against listing it and fingerprinting every file's path and size.

    python benchmarks/bench_fingerprint.py --files 200000 --classes 1000 --rounds 3

Makes ``--files`` small files in ``--classes`` class folders under a temporary folder (removed at the end),
then times, in a fresh process per measurement, interleaved, the median of ``--rounds``: the listing
(:func:`lesa.data.list_image_folder`) and the listing plus :func:`lesa.engine.run_data.fingerprint_files`.
Prints a Markdown row with the per-file costs and their extrapolation to ImageNet's 1,281,167 training
images. The files are in the page cache (just written): a network file system's stat calls cost more.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_TRAIN = 1_281_167

CHILD = """
import json, sys, time
from lesa.data import list_image_folder
from lesa.engine.run_data import fingerprint_files
root, fingerprint = sys.argv[1], sys.argv[2] == "1"
t0 = time.perf_counter()
listing = list_image_folder(root)
if fingerprint:
    fingerprint_files(root, [path for path, _ in listing.samples])
print(json.dumps({"seconds": time.perf_counter() - t0, "files": len(listing.samples)}))
"""


def make_tree(root: Path, files: int, classes: int) -> None:
    payload = b"\xff\xd8" + b"\0" * 1000  # the size is what the fingerprint reads
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c, files, classes):
            (folder / f"n{c:08d}_{i}.JPEG").write_bytes(payload)


def measure(root: Path, fingerprint: bool) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), "1" if fingerprint else "0"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        t0 = time.perf_counter()
        make_tree(root, args.files, args.classes)
        print(f"made {args.files} files in {args.classes} classes in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for fingerprint in (False, True):
                times[fingerprint].append(measure(root, fingerprint))
    listing, both = statistics.median(times[False]), statistics.median(times[True])
    per_file = (both - listing) / args.files
    print("| files | listing (s) | listing + fingerprint (s) | fingerprint per file (us) | "
          "ImageNet train, extrapolated (s) |")
    print("|---|---|---|---|---|")
    print(f"| {args.files:,} in {args.classes} classes | {listing:.2f} | {both:.2f} | {per_file * 1e6:.2f} | "
          f"{both / args.files * IMAGENET_TRAIN:.1f} (listing {listing / args.files * IMAGENET_TRAIN:.1f}) |")


if __name__ == "__main__":
    main()
