"""``fvlm embed``: one row of image embeddings per case of a shard directory (Parquet or NPZ), streamed.

Rows are encoded by the suite's own code (``fvlm.eval.embed.encode_cases`` with the
checkpoint's input transform), so a vector equals the one ``fvlm zeroshot`` caches.
Work is done in chunks: each chunk becomes one Parquet part file under ``<out>.parts/``
(written atomically), so a killed run resumes at the first case not yet written; the
parts are then joined into ``<out>`` one part at a time. Only one chunk of embeddings is
ever in memory for Parquet (NPZ, a zip of whole arrays, holds them all at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from ..atomic import replacing
from ..errors import FvlmError
from ..interrupts import check_interrupted
from ..version import __version__

HELP = "embed every case of a shard directory: case/patient/split ids + global and per-anatomy vectors"
DESCRIPTION = (HELP + " (embeddings.parquet: streamed, resumable; or .npz). For probes, retrieval, clustering. "
               "Format: docs/FORMATS.md 'Embeddings'.")

FORMAT = "fvlm-embeddings"
VERSION = 1
#: dictionary encoding only for the id columns: on float vectors it costs 15% in size and
#: 16x in write time, measured (benchmarks/embed_bench.py); zstd saves ~8% over snappy
PARQUET_OPTIONS = {"use_dictionary": ["case_id", "patient_id", "split"], "compression": "zstd"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="model.pt or a model directory")
    p.add_argument("--data", required=True, metavar="SHARDS", help="shard directory written by `fvlm preprocess`")
    p.add_argument("--out", required=True, metavar="FILE.parquet|FILE.npz", help="output file")
    p.add_argument("--split", help="only cases of this split (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="cases per image forward (default 8)")
    p.add_argument("--chunk", type=int, default=256, help="cases per resumable part (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _table(emb, ids_rows: list[dict], names: list[str], anatomies: list[str]):
    import numpy as np
    import pyarrow as pa

    cols = {"case_id": pa.array([r["case_id"] for r in ids_rows], pa.string()),
            "patient_id": pa.array([r["patient_id"] for r in ids_rows], pa.string()),
            "split": pa.array([r["split"] for r in ids_rows], pa.string())}
    for n in names:
        a = np.ascontiguousarray(emb.arrays[n], np.float32)
        cols[f"emb_{n}"] = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
    for n in anatomies:
        cols[f"present_{n}"] = pa.array(np.asarray(emb.present[n], bool))
    return pa.table(cols)


def _ids(ds, case_ids: list[str]) -> list[dict]:
    rows = []
    for c in case_ids:
        r = ds.index_row(c)
        rows.append({"case_id": c, "patient_id": str(r.get("patient_id") or ""), "split": str(r.get("split") or "")})
    return rows


def _file_meta(state: dict) -> dict:
    return {b"fvlm": json.dumps(state, ensure_ascii=False).encode()}


def _done_ids(parts: Path) -> set[str]:
    import pyarrow.parquet as pq

    done: set[str] = set()
    for p in sorted(parts.glob("part-*.parquet")):
        done.update(pq.read_table(p, columns=["case_id"]).column("case_id").to_pylist())
    return done


def _join_parquet(parts: Path, out: Path, state: dict) -> int:
    import pyarrow.parquet as pq

    files = sorted(parts.glob("part-*.parquet"))
    n = 0
    if not files:
        return n
    with replacing(out) as tmp:
        writer = None
        try:
            for f in files:
                t = pq.read_table(f)
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), t.schema.with_metadata(_file_meta(state)), **PARQUET_OPTIONS)
                writer.write_table(t.replace_schema_metadata(_file_meta(state)))
                n += t.num_rows
        finally:
            if writer is not None:
                writer.close()
    return n


def _join_npz(parts: Path, out: Path, state: dict) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(f) for f in sorted(parts.glob("part-*.parquet"))])
    payload = {"case_id": np.asarray(t.column("case_id").to_pylist(), str),
               "patient_id": np.asarray(t.column("patient_id").to_pylist(), str),
               "split": np.asarray(t.column("split").to_pylist(), str),
               "fvlm": np.asarray(json.dumps(state, ensure_ascii=False))}
    for name in t.column_names:
        if name.startswith("emb_"):
            col = t.column(name).combine_chunks()
            payload[name] = col.flatten().to_numpy().reshape(len(col), -1).astype(np.float32)
        elif name.startswith("present_"):
            payload[name] = np.asarray(t.column(name).to_pylist(), bool)
    with replacing(out, ".tmp.npz") as tmp:
        np.savez(tmp, **payload)
    return t.num_rows


def _embed_chunks(args, ds, case_ids, model, make_batch, parts: Path, names, anatomies) -> int:
    """Encode the cases not yet in a part file, one part per chunk -> how many were done before."""
    import pyarrow.parquet as pq
    import torch

    from ..eval.embed import encode_cases
    from ..progress import progress

    done = _done_ids(parts)
    todo = [c for c in case_ids if c not in done]
    next_part = len(list(parts.glob("part-*.parquet")))
    bar = progress(total=len(case_ids), desc="embed", unit="case", initial=len(case_ids) - len(todo))
    with torch.inference_mode():
        for i in range(0, len(todo), args.chunk):
            check_interrupted()
            ids = todo[i:i + args.chunk]
            emb = encode_cases(model, ds, ids, make_batch, args.batch_size, None, "embed chunk",
                               getattr(make_batch, "get_kwargs", None))
            t = _table(emb, _ids(ds, ids), names, anatomies)
            p = parts / f"part-{next_part:05d}.parquet"
            with replacing(p) as tmp:
                pq.write_table(t, str(tmp), **PARQUET_OPTIONS)
            next_part += 1
            bar.update(len(ids))
    bar.close()
    return len(case_ids) - len(todo)


def run(args) -> int:
    from ..eval import loading
    from ..eval.embed import data_fingerprint

    out = Path(args.out)
    if out.suffix not in (".parquet", ".npz"):
        raise FvlmError(f"--out {out}: use a .parquet or .npz file name")
    if out.is_dir():
        raise FvlmError(f"--out {out}: is a directory")
    if args.batch_size < 1 or args.chunk < 1:
        raise FvlmError("--batch-size and --chunk must be >= 1")
    sha = loading.checkpoint_sha256(args.checkpoint)
    ds = loading.open_shards(args.data)
    state = {"format": FORMAT, "version": VERSION, "fvlm_version": __version__,
             "checkpoint": {"path": str(args.checkpoint), "sha256": sha},
             "data": {"path": str(args.data), "hash": data_fingerprint(args.data)}, "split": args.split}
    parts = _parts_dir(out)
    state_file = parts / "state.json"
    if out.is_file() and not parts.exists():
        raise FvlmError(f"--out {out} exists (a finished run); remove it or choose another name")
    shutil.rmtree(parts.with_name(parts.name + ".done"), ignore_errors=True)   # a finished run's, stopped while removed
    if parts.is_dir() and not state_file.exists() and not any(parts.glob("part-*.parquet")):
        shutil.rmtree(parts)   # a run stopped before it wrote anything (killed between mkdir and its state)
    if parts.is_dir():
        try:
            old = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = {}
        if not isinstance(old, dict) or {k: old.get(k) for k in ("checkpoint", "data", "split")} != \
                {k: state[k] for k in ("checkpoint", "data", "split")}:
            raise FvlmError(f"{parts} holds parts of another run (other checkpoint, data or split); "
                            "remove it to start over")
    # everything that can be refused is checked before the parts folder is made, so a corrected
    # command is never blocked by the state of one that did nothing
    case_ids = ds.case_ids(args.split)
    if not case_ids:
        splits = sorted({str(ds.index_row(c).get("split") or "") for c in ds.case_ids()})
        raise FvlmError(f"no cases{' in split ' + repr(args.split) if args.split else ''} in {args.data}"
                        + (f" (its splits: {', '.join(splits)})" if args.split and splits else ""))
    model, meta, make_batch = loading.load_model(args.checkpoint, args.device)
    names = [str(n) for n in getattr(model, "names", [])]
    anatomies = [n for n in names if n != "global"]
    state.update(names=names, anatomies=anatomies, embed_dim=int(meta.get("embed_dim") or 0))
    created = not parts.exists()
    try:
        parts.mkdir(parents=True, exist_ok=True)
        with replacing(state_file) as tmp_state:
            tmp_state.write_text(json.dumps(state, ensure_ascii=False, indent=1), encoding="utf-8")
        # signals raise KeyboardInterrupt here: fvlm.cli runs every command inside fvlm.interrupts
        before = _embed_chunks(args, ds, case_ids, model, make_batch, parts, names, anatomies)
        check_interrupted()   # one a __del__ swallowed: stop before joining the parts
    except BaseException:
        if created and not any(parts.glob("part-*.parquet")):  # nothing to resume: leave no state behind
            shutil.rmtree(parts, ignore_errors=True)
        raise
    n = (_join_parquet if out.suffix == ".parquet" else _join_npz)(parts, out, state)
    done = parts.with_name(parts.name + ".done")   # renamed first: a stop while removing leaves no half parts folder
    os.replace(parts, done)
    shutil.rmtree(done)
    print(f"wrote {out}: {n} cases ({before} from an earlier run), "
          f"{len(names)} embeddings of size {state['embed_dim']}")
    return 0
