"""Tokenize STS-B sentence pairs into an onnxopt data file for a BERT-style sentence encoder (MiniLM).

    python models/stsb_data.py --stsb ../shared/data/stsb --tokenizer ../shared/data/stsb/bert_uncased_tokenizer.json \
        --split dev --pairs 200 --out /tmp/stsb_dev.npz                  (evaluation: --metric spearman)
    python models/stsb_data.py --stsb ../shared/data/stsb --tokenizer ... --split train --sentences 256 \
        --out /tmp/stsb_calib.npz                                        (calibration: sentences, no labels)

The STS benchmark files are tab-separated; columns 5 and 6 (0-based) hold the two sentences and column 4 the
gold similarity (0-5). Evaluation data keeps each pair on rows 2k and 2k+1 with one gold score per pair in
``labels`` (the layout ``--metric spearman`` reads); ``--sentences N`` writes the first N sentences of the split
(both sentences of each pair in turn) without labels, for calibration. Sentences are tokenized with the
``tokenizers`` package (the ``text`` extra), truncated to ``--max-length`` tokens (128, as the MiniLM card) and
padded to the longest sentence in the file; ``input_ids`` and ``attention_mask`` are int64 (add
``token_type_ids`` with ``--token-type-ids`` for encoders that take it). Nothing is copied into the project: the
output goes where ``--out`` says.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

SPLITS = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}


def read_pairs(path: Path) -> list[tuple[str, str, float]]:
    """(sentence 1, sentence 2, gold score) of every row of an STS-B file."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                pairs.append((row[5], row[6], float(row[4])))
    return pairs


def encode(sentences: list[str], tokenizer_file: Path, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and token_type_ids (int64, padded to the longest sentence)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    encodings = tokenizer.encode_batch(sentences)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), np.int64)
    mask = np.zeros((len(encodings), width), np.int64)
    types = np.zeros((len(encodings), width), np.int64)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = enc.attention_mask
        types[row, : len(enc.ids)] = enc.type_ids
    return ids, mask, types


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stsb", type=Path, required=True, help="folder with sts-{train,dev,test}.csv")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json for the `tokenizers` package")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    parser.add_argument("--split", choices=sorted(SPLITS), default="dev")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pairs", type=int, help="first N pairs, on rows 2k/2k+1, with gold scores (default: all)")
    group.add_argument("--sentences", type=int, help="first N sentences, no labels (calibration data)")
    parser.add_argument("--max-length", type=int, default=128, help="truncation in tokens (default 128)")
    parser.add_argument("--token-type-ids", action="store_true", help="also write token_type_ids")
    args = parser.parse_args(argv)

    pairs = read_pairs(args.stsb / SPLITS[args.split])
    if not pairs:
        print(f"no sentence pairs in {args.stsb / SPLITS[args.split]}", file=sys.stderr)
        return 2
    arrays: dict[str, np.ndarray] = {}
    if args.sentences is not None:
        sentences = [s for a, b, _ in pairs for s in (a, b)][: args.sentences]
    else:
        pairs = pairs[: args.pairs] if args.pairs is not None else pairs
        sentences = [s for a, b, _ in pairs for s in (a, b)]
        arrays["labels"] = np.array([score for _, _, score in pairs], np.float32)
    ids, mask, types = encode(sentences, args.tokenizer, args.max_length)
    arrays |= {"input_ids": ids, "attention_mask": mask}
    if args.token_type_ids:
        arrays["token_type_ids"] = types
    np.savez(args.out, **arrays)
    what = f"{len(sentences) // 2} pairs" if "labels" in arrays else f"{len(sentences)} sentences"
    print(f"wrote {args.out}: {what} of sts-{args.split}, {ids.shape[1]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
