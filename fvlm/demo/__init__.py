"""The generated demo corpus: real CT anatomy with inserted findings of known ground truth.

API: :func:`fvlm.demo.generate.generate_corpus` (``out_dir, n_cases, seed, preset``);
presets in ``configs/demo/``; layout in docs/FORMATS.md, "Demo corpus".
"""
