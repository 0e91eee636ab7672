"""``fvlm preprocess``: raw CT (+ reports) -> HDF5 training shards (docs/FORMATS.md §2).

    fvlm preprocess --manifest cases.csv --out shards/ [--num-workers 4]
    fvlm preprocess --input CT-RATE/dataset --out shards/            # CT-RATE layout detected
    fvlm preprocess --input ct_folder/ --out shards/ --shard-index 3 --num-shards 16   # one SLURM array task
    fvlm preprocess merge shards/                                     # after all array tasks
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from preprocess.config import PreprocessConfig

from ..cli import resolve_config, shorthand
from ..config import dump_config
from ..errors import CasesFailedError, FvlmError
from ..interrupts import interrupts
from ..logs import setup_logging

HELP = "turn raw CT volumes + reports into training shards (crops, masks, whole volumes, labels)"
DESCRIPTION = (HELP + ". Re-running the same command resumes: finished shards are kept, half-written ones "
               "are completed. `fvlm preprocess merge DIR` joins the index files of --num-shards parts.")
SCHEMA = PreprocessConfig
DEFAULT_CONFIG = "preprocess/default.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["run", "merge"], default="run",
                   help="run (default) or merge: join index/errors/summary of all --num-shards parts of DIR")
    p.add_argument("merge_dir", nargs="?", metavar="DIR", help="output directory to merge (with 'merge')")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifest", metavar="FILE", help="CSV or JSONL manifest (case_id, patient_id, split, image, "
                                                        "mask/mask_dir, findings, impressions, report)")
    src.add_argument("--input", metavar="DIR", help="folder of .nii/.nii.gz files and/or DICOM series folders, "
                                                    "or a CT-RATE download")
    p.add_argument("--out", metavar="DIR", help="output directory (shards/, index.jsonl, errors.jsonl, summary)")
    p.add_argument("--num-workers", type=int, default=1, metavar="N", help="parallel worker processes")
    p.add_argument("--shard-index", type=int, default=0, metavar="I", help="this job's part (0-based)")
    p.add_argument("--num-shards", type=int, default=1, metavar="N", help="number of parts the corpus is split into")
    shorthand(p, "--anatomy-set", "anatomy_set", "anatomy set name or YAML")
    shorthand(p, "--samples-per-shard", "shards.samples_per_shard", "cases per HDF5 shard", type=int)
    shorthand(p, "--mask-source", "masks.source", "auto, totalsegmentator, precomputed or none")
    shorthand(p, "--masks", "masks.dir", "folder of TotalSegmentator label maps named by case id / VolumeName "
                                         "(<name>.nii.gz or <name>/<class>.nii.gz)")


def run(args) -> int:
    from preprocess import inputs, lock, pipeline   # numpy, h5py, the labeler: loaded when the command runs

    if args.action == "merge":
        d = args.merge_dir or args.out
        if not d:
            raise FvlmError("merge needs the output directory: fvlm preprocess merge DIR")
        log = setup_logging(d, "preprocess-merge", quiet=args.quiet)
        s = pipeline.merge_parts(d)
        log.info("merged: %d cases, %d failed", s["cases_ok"], s["cases_failed"])
        print(f"{d}: {s['cases_ok']} cases, {s['cases_failed']} failed -> index.jsonl")
        return 0
    if args.merge_dir:
        raise FvlmError(f"unexpected argument {args.merge_dir!r} (did you mean `fvlm preprocess merge DIR`?)")
    if not args.out:
        raise FvlmError("--out DIR is required")
    if not (args.manifest or args.input):
        raise FvlmError("give --manifest FILE or --input DIR")
    if args.num_workers < 1:
        raise FvlmError("--num-workers must be >= 1")
    cfg = resolve_config(args)
    if not 0 <= cfg.max_error_fraction <= 1:
        raise FvlmError(f"max_error_fraction must be in [0, 1] (got {cfg.max_error_fraction})")
    out = Path(args.out)
    if args.manifest:
        check_manifest(args.manifest)

    specs = inputs.collect_cases(args.manifest, args.input, cfg.layout, cfg=cfg)
    tag = "" if args.num_shards == 1 else "-" + pipeline.part_tag(max(0, args.shard_index), args.num_shards)
    pipeline.check_output(cfg, out)  # a refused re-run writes nothing: no log, no config.yaml, no lock
    with interrupts(), lock.RunLock(out / f".preprocess{tag}.lock"):
        log = setup_logging(out, f"preprocess{tag}", quiet=args.quiet)
        dump_config(cfg, out / f"config{tag}.yaml")
        log.info("fvlm preprocess: %d cases from %s -> %s", len(specs), args.manifest or args.input, out)
        s = pipeline.run_preprocess(cfg, specs, out, num_workers=args.num_workers, shard_index=args.shard_index,
                           num_shards=args.num_shards)
    msg = (f"{out}: {s['cases_ok']} cases written, {s['cases_failed']} failed"
           + (f" ({', '.join(f'{k} {v}' for k, v in s['failed_by_stage'].items())}; see errors{tag}.jsonl)"
              if s["cases_failed"] else "")
           + f"; this run processed {s['this_run']['processed_ok']}, reused {s['this_run']['reused']}")
    log.info(msg)
    print(msg)
    n = s["cases_ok"] + s["cases_failed"]
    if n and not s["cases_ok"]:
        raise CasesFailedError(f"no case was written: all {n} failed (see {out / f'errors{tag}.jsonl'})")
    if n and s["cases_failed"] / n > cfg.max_error_fraction:
        raise CasesFailedError(f"{s['cases_failed']} of {n} cases failed, more than max_error_fraction="
                               f"{cfg.max_error_fraction:g} (see {out / f'errors{tag}.jsonl'}); the "
                               f"{s['cases_ok']} good cases are written")
    return 0


def check_manifest(path) -> None:
    """One-line errors for a manifest that cannot be read as text or has rows longer than its header."""
    p = Path(path)
    if p.is_dir():
        raise FvlmError(f"--manifest {p} is a directory (did you mean --input {p}?)")
    if not p.exists():
        return  # read_manifest says "manifest not found"
    try:
        raw = p.read_bytes()
    except PermissionError:
        raise FvlmError(f"{p}: cannot read the manifest (permission denied)") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FvlmError(f"{p}:{line}: the manifest is not UTF-8 text (byte {raw[e.start:e.start + 1]!r}); "
                        "save it as UTF-8") from None
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None) or []
    for row in reader:
        if len(row) > len(header):
            raise FvlmError(f"{p}:{reader.line_num}: {len(row)} fields but the header has {len(header)} "
                            "(an unquoted comma? quote fields that contain commas)")
