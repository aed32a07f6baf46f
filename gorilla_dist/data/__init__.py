"""Training data: prepare once (`python -m gorilla_dist.data.prepare`), stream for weeks.

    readers.py    input files (.txt, .jsonl[.gz], .parquet) → documents
    tokenizer.py  char | byte | Hugging Face | trained byte-level BPE, each with an <eod> token
    writer.py     documents → tokenized shards + document index + meta.json (multiprocess, resumable)
    prepare.py    its command line: python -m gorilla_dist.data.prepare
    dataset.py    a prepared directory memory-mapped and verified; packed fixed-length samples
    order.py      the table-free shuffle and the weighted blend of sources
    loader.py     samples → this rank's micro-batches (`Batch`), with a resumable state_dict

Kept free of torch imports here: the prepare tool's worker processes import this package.
"""
