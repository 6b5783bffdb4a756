"""Tokenize a jsonl corpus into an autotp indexed dataset (Megatron-LM's tools/preprocess_data.py).

Train a byte-level BPE tokenizer on the corpus itself (GPT-2's tokenizer type) and write
the dataset and the tokenizer:

    python examples/preprocess_data.py --input examples/data/corpus.jsonl \\
        --output-prefix /tmp/stdlib --vocab-size 8192 --append-eod

or tokenize with an existing GPT-2 vocabulary (as in the seed):

    python examples/preprocess_data.py --input corpus.jsonl --output-prefix my-gpt2 \\
        --vocab-file vocab.json --merge-file merges.txt --append-eod

Writes ``PREFIX_text_document.bin`` / ``.idx`` (pass ``PREFIX_text_document`` as
``--data-path`` to pretrain_gpt.py) and, when training a tokenizer,
``PREFIX-vocab.json`` / ``PREFIX-merges.txt`` (pass them as ``--vocab-file`` /
``--merge-file``). The end-of-document token is ``<|endoftext|>``, as in GPT-2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

EOD_TOKEN = "<|endoftext|>"


def read_jsonl(path: str, key: str):
    """Yield the ``key`` field of every line of a jsonl file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON object ({e}); expected one {{\"{key}\": ...}} per line")
            if key not in record:
                raise SystemExit(f"{path}:{n}: no {key!r} field (fields: {sorted(record)}); pick one with --json-keys")
            yield record[key]


def build_tokenizer(args):
    from tokenizers import ByteLevelBPETokenizer

    if args.vocab_file or args.merge_file:
        if not (args.vocab_file and args.merge_file):
            raise SystemExit("--vocab-file and --merge-file go together (GPT-2's vocab.json and merges.txt)")
        return ByteLevelBPETokenizer(args.vocab_file, args.merge_file), None
    t0 = time.perf_counter()
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(read_jsonl(args.input, args.json_keys), vocab_size=args.vocab_size,
                            min_frequency=args.min_frequency, special_tokens=[EOD_TOKEN], show_progress=False)
    out_dir, name = os.path.split(os.path.abspath(args.output_prefix))
    files = tok.save_model(out_dir, name)  # PREFIX-vocab.json, PREFIX-merges.txt
    print(f"trained a byte-level BPE tokenizer of {tok.get_vocab_size()} tokens in "
          f"{time.perf_counter() - t0:.1f} s: {', '.join(files)}")
    return tok, files


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="jsonl -> byte-level BPE -> PREFIX_text_document.bin/.idx")
    ap.add_argument("--input", required=True, help="jsonl file, one {\"text\": ...} object per line")
    ap.add_argument("--json-keys", default="text", help="the field holding each document's text")
    ap.add_argument("--output-prefix", required=True, help="path prefix of the files written")
    ap.add_argument("--vocab-size", type=int, default=8192, help="size of the BPE vocabulary to train")
    ap.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge it")
    ap.add_argument("--vocab-file", help="GPT-2 style vocab.json: tokenize with it instead of training")
    ap.add_argument("--merge-file", help="GPT-2 style merges.txt, with --vocab-file")
    ap.add_argument("--append-eod", action="store_true", help=f"append {EOD_TOKEN} after every document")
    ap.add_argument("--batch-size", type=int, default=256, help="documents tokenized per batch")
    ap.add_argument("--log-interval", type=int, default=100, help="report progress every N documents")
    args = ap.parse_args(argv)

    from autotp.data import IndexedDataset, dtype_for_vocab, write_indexed_dataset

    if not os.path.exists(args.input):
        raise SystemExit(f"--input {args.input} does not exist")
    print(f"Opening {args.input}")
    tok, _ = build_tokenizer(args)
    vocab_size = tok.get_vocab_size()
    eod = tok.token_to_id(EOD_TOKEN)
    if args.append_eod and eod is None:
        raise SystemExit(f"--append-eod: the vocabulary has no {EOD_TOKEN} token")
    print(f"Vocab size: {vocab_size}  EOD id: {eod}  Output prefix: {args.output_prefix}")

    t0, stats = time.perf_counter(), {"docs": 0, "bytes": 0, "tokens": 0}

    def documents():
        batch = []
        for text in read_jsonl(args.input, args.json_keys):
            batch.append(text)
            if len(batch) == args.batch_size:
                yield from encode(batch)
                batch = []
        yield from encode(batch)

    def encode(texts):
        for text, enc in zip(texts, tok.encode_batch(texts) if texts else []):
            stats["docs"] += 1
            stats["bytes"] += len(text.encode("utf-8"))
            stats["tokens"] += len(enc.ids)
            if stats["docs"] % args.log_interval == 0:
                dt = time.perf_counter() - t0
                print(f"Processed {stats['docs']} documents ({stats['docs'] / dt:.1f} docs/s, "
                      f"{stats['bytes'] / dt / 2**20:.2f} MB/s).")
            yield enc.ids

    prefix = f"{args.output_prefix}_{args.json_keys}_document"
    write_indexed_dataset(prefix, documents(), dtype_for_vocab(vocab_size), eod=eod if args.append_eod else None)
    ds = IndexedDataset(prefix)
    print(f"wrote {prefix}.bin/.idx: {len(ds)} documents, {ds.num_tokens:,} tokens ({ds.dtype}), "
          f"{stats['bytes'] / max(stats['tokens'], 1):.2f} bytes/token, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
