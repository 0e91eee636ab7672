"""Anatomy sets (configs/anatomy/*.yaml) load, validate and map TotalSegmentator ids."""
import numpy as np
import pytest

from fvlm.anatomy import load_anatomy_set, load_class_map
from fvlm.errors import FormatError, FvlmError

FVLM15 = ["lung", "heart", "aorta", "esophagus", "liver", "gallbladder", "pancreas", "spleen", "kidney",
          "adrenal_gland", "stomach", "small_bowel", "colon", "urinary_bladder", "bone"]


def test_shipped_sets():
    a = load_anatomy_set("fvlm15")
    assert a.ids == FVLM15 and a.class_map == "v2" and set(a.class_maps) == {"v1", "v2"}
    assert load_anatomy_set("ctrate4").ids == ["lung", "heart", "esophagus", "aorta"]
    assert a["lung"].classes_for("v2") == a["lung"].classes_for("v1")  # lobes have the same names
    assert a.label("lung") == 1 and a.label("bone") == 15


def test_lookup_v1_v2_differ(ct_samples):
    a = load_anatomy_set("fvlm15")
    v2, v1 = a.lookup("v2"), a.lookup("v1")
    assert v2[7] == a.label("pancreas") and v1[7] == a.label("aorta")  # id 7 differs between maps
    assert v2[51] == a.label("heart") and v1[44] == a.label("heart")
    assert len(load_class_map("v1")) == 104 and len(load_class_map("v2")) == 117
    import nibabel as nib
    seg = np.asarray(nib.load(ct_samples / "example_seg.nii.gz").dataobj)
    lab = v2[seg]
    assert (lab == a.label("liver")).sum() == 38634


@pytest.mark.parametrize("body,msg", [
    ("format: other\nversion: 1\n", "not an anatomy set"),
    ("format: fvlm-anatomy\nversion: 9\nanatomies: []\n", "version 9"),
    ("format: fvlm-anatomy\nversion: 1\nanatomies:\n - {id: a, classes: [livr]}\n", "did you mean 'liver'"),
    ("format: fvlm-anatomy\nversion: 1\nanatomies:\n - {id: a, classes: [liver]}\n - {id: b, classes: [liver]}\n",
     "in both"),
    ("format: fvlm-anatomy\nversion: 1\nanatomies:\n - {id: a, classes: [liver], crop_shape: [1, 2]}\n",
     "crop_shape"),
])
def test_bad_sets(tmp_path, body, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(FormatError, match=msg):
        load_anatomy_set(p)


def test_unknown_name():
    with pytest.raises(FvlmError, match="fvlm15"):
        load_anatomy_set("nope")
    with pytest.raises(FvlmError, match="not in anatomy set"):
        load_anatomy_set("ctrate4")["liver"]
