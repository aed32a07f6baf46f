"""The prepared-dataset format, shared by the writer (prepare.py) and the reader (dataset.py)."""

import numpy as np

FORMAT = 1
"""meta.json's `format`: bumped when the layout of a prepared directory changes."""
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
"""Token id storage, by meta.json's `dtype`."""
VERIFY = ("checksum", "size")
"""How a dataset's files are checked against meta.json when opened (data.verify)."""
