"""Shared by the tests that write shards of a synthetic CT source (fvlm.data.synthetic_ct)."""
from pathlib import Path

from fvlm.data import shards


def write_synthetic_shards(root: Path, src, organs, spacing_mm=None, info: dict | None = None,
                           whole_shape=(32, 32, 16)):
    """All cases of ``src`` in one shard under ``root`` with its index and dataset.json;
    returns ``(layout, records)``."""
    kw = {} if spacing_mm is None else {"spacing_mm": spacing_mm}
    layout = shards.ShardLayout(anatomies=organs, crop_shapes=dict(src.crop_shapes), whole_shape=whole_shape, **kw)
    recs = [src.get(c) for c in src.case_ids()]
    shards.write_shard(root / "shards" / "000-00000.h5", layout, recs, n=len(recs))
    shards.write_index(root / "index.jsonl", [
        {"case_id": r.case_id, "patient_id": r.patient_id or r.case_id, "split": r.split,
         "shard": "shards/000-00000.h5", "row": i, "anatomies": [a for a in organs if r.present.get(a)]}
        for i, r in enumerate(recs)])
    if info is None:
        shards.write_dataset_info(root, layout)
    else:
        shards.write_dataset_info(root, layout, info)
    return layout, recs
