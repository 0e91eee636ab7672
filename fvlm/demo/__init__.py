"""The generated demo corpus: real CT anatomy with inserted findings of known ground truth."""
