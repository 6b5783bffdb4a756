"""Memory-mapped token datasets for GPT pretraining (Megatron-LM's mmap indexed dataset, simplified).

A dataset is two files sharing a prefix:

* ``prefix.bin``: every document's token ids, back to back (an EOD id after each
  document when written with ``eod=``), as ``uint16`` when the vocabulary fits in
  it, else ``int32``.
* ``prefix.idx``: a 32-byte header, then ``num_docs + 1`` int64 token offsets
  (document ``i`` is ``bin[offsets[i]:offsets[i + 1]]``)::

      bytes 0-7    magic   b"ATPIDX\\x00\\x00"
      bytes 8-15   version uint64 (1)
      bytes 16-23  dtype   uint64 code (see DTYPE_CODES)
      bytes 24-31  docs    uint64 number of documents
      bytes 32-    offsets int64 x (docs + 1)

Both are read with ``numpy.memmap``: opening a dataset reads no tokens.

``GPTDataset`` turns documents into training samples the way Megatron does:
the documents (in a seeded order per epoch) are read as one concatenated token
stream and cut into ``seq_len + 1``-token samples that cross document
boundaries, and the samples are visited in a seeded order per epoch. Samples
are a pure function of ``(seed, index)``, so every tensor-parallel rank reads
the same batches with no communication, and resuming needs only the number of
samples consumed.

Example::

    >>> write_indexed_dataset("/tmp/d", [[5, 6, 7], [8, 9]], dtype_for_vocab(512), eod=0)
    2
    >>> ds = IndexedDataset("/tmp/d")
    >>> len(ds), ds[1].tolist()
    (2, [8, 9, 0])
    >>> GPTDataset(ds, seq_len=3, seed=1234)[0].tolist()   # 4 tokens, may span documents
    [8, 9, 0, 5]
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["IndexedDatasetError", "write_indexed_dataset", "IndexedDataset", "GPTDataset", "dtype_for_vocab",
           "split_documents", "DTYPE_CODES"]

MAGIC = b"ATPIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 32
# Matches the dtype code stored in the header to the token dtype of the .bin file.
DTYPE_CODES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 3: np.dtype(np.int32), 4: np.dtype(np.int64)}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A ``.bin`` / ``.idx`` pair that is corrupt, truncated or inconsistent."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits in it, else ``int32``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _paths(prefix: str | os.PathLike) -> tuple[str, str]:
    prefix = os.fspath(prefix)
    return prefix + ".bin", prefix + ".idx"


def write_indexed_dataset(prefix: str | os.PathLike, docs: Iterable[Sequence[int]], dtype=np.uint16, *,
                          eod: int | None = None) -> int:
    """Write ``docs`` (lists of token ids) as ``prefix.bin`` / ``prefix.idx``.

    Args:
        prefix: path without extension; existing files are replaced atomically.
        docs: one sequence of token ids per document, streamed (never all in memory).
        dtype: token dtype of the ``.bin`` file (``dtype_for_vocab(vocab_size)``).
        eod: when given, this id is appended after every document (Megatron's
            ``--append-eod``) so that documents stay apart in the concatenated stream.

    Returns:
        The number of documents written.

    Raises:
        ValueError: a token id does not fit in ``dtype`` (the message names the document).
    """
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        raise ValueError(f"token dtype {dtype} is not supported; use one of {sorted(map(str, _CODE_OF))}")
    info = np.iinfo(dtype)
    if eod is not None and not info.min <= eod <= info.max:
        raise ValueError(f"eod id {eod} does not fit in {dtype} ([{info.min}, {info.max}])")
    bin_path, idx_path = _paths(prefix)
    offsets = [0]
    # Write next to the target and rename at the end: a crash never leaves a half-written pair.
    with open(bin_path + ".tmp", "wb") as f:
        for i, doc in enumerate(docs):
            arr = np.asarray(doc, dtype=np.int64)
            if arr.ndim != 1:
                raise ValueError(f"document {i} must be a flat sequence of token ids, got shape {arr.shape}")
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"document {i} has token ids in [{arr.min()}, {arr.max()}], which do not fit in "
                                 f"{dtype}; write with dtype=dtype_for_vocab(vocab_size)")
            if eod is not None:
                arr = np.append(arr, eod)
            f.write(arr.astype(dtype).tobytes())
            offsets.append(offsets[-1] + arr.size)
    header = np.array([VERSION, _CODE_OF[dtype], len(offsets) - 1], dtype="<u8").tobytes()
    with open(idx_path + ".tmp", "wb") as f:
        f.write(MAGIC + header + np.asarray(offsets, dtype="<i8").tobytes())
    os.replace(bin_path + ".tmp", bin_path)
    os.replace(idx_path + ".tmp", idx_path)
    return len(offsets) - 1


class IndexedDataset:
    """The documents of a ``prefix.bin`` / ``prefix.idx`` pair, memory-mapped.

    ``ds[i]`` is document ``i`` as a numpy array (a view into the map, EOD included
    when it was written); ``ds.sizes`` are the document lengths in tokens.

    Raises:
        FileNotFoundError: either file is missing.
        IndexedDatasetError: bad magic or version, unknown dtype, or a file shorter
            than its header says (a truncated copy).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        bin_path, idx_path = _paths(prefix)
        for path in (idx_path, bin_path):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} does not exist: an indexed dataset is the pair {self.prefix}.bin / {self.prefix}.idx. "
                    "Create it with `python examples/preprocess_data.py --input corpus.jsonl --output-prefix PREFIX` "
                    "(the dataset prefix is then PREFIX_text_document)")
        idx_bytes = os.path.getsize(idx_path)
        if idx_bytes < HEADER_BYTES:
            raise IndexedDatasetError(f"{idx_path} is {idx_bytes} bytes, shorter than the {HEADER_BYTES}-byte "
                                      "header: the file is truncated or not an autotp index")
        with open(idx_path, "rb") as f:
            magic = f.read(len(MAGIC))
            version, code, num_docs = (int(v) for v in np.frombuffer(f.read(24), dtype="<u8"))
        if magic != MAGIC:
            raise IndexedDatasetError(
                f"{idx_path} starts with {magic!r}, not the autotp index magic {MAGIC!r}: not a file written by "
                "autotp.data.write_indexed_dataset (Megatron's .idx files are not read; re-run preprocess_data.py)")
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path} has format version {version}; this autotp reads version {VERSION}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path} has unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        expected = HEADER_BYTES + 8 * (num_docs + 1)
        if idx_bytes != expected:
            raise IndexedDatasetError(
                f"{idx_path} is {idx_bytes} bytes but its header says {num_docs} documents, which need "
                f"{HEADER_BYTES} + 8 x {num_docs + 1} = {expected} bytes: the file is truncated or corrupt")
        self.dtype = DTYPE_CODES[code]
        self.offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(num_docs + 1,))
        num_tokens = int(self.offsets[-1])
        if self.offsets[0] != 0 or (num_docs and np.any(np.diff(self.offsets) < 0)):
            raise IndexedDatasetError(f"{idx_path} has offsets that do not start at 0 and never decrease: corrupt")
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != num_tokens * self.dtype.itemsize:
            raise IndexedDatasetError(
                f"{bin_path} is {bin_bytes:,} bytes but {idx_path} indexes {num_tokens:,} {self.dtype} tokens = "
                f"{num_tokens * self.dtype.itemsize:,} bytes: the pair is truncated or does not belong together")
        # an empty file cannot be memory-mapped
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if num_tokens
                       else np.empty(0, dtype=self.dtype))
        self.sizes = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a dataset of {n} documents")
        i %= n
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, docs={len(self)}, tokens={self.num_tokens:,}, dtype={self.dtype})"


def split_documents(num_docs: int, weights: Sequence[float]) -> list[np.ndarray]:
    """Split document indices ``0..num_docs-1`` into contiguous ranges in proportion to ``weights``.

    Megatron's ``--split 949,50,1``: a split with a positive weight gets at least one
    document.

    Example::

        >>> [r.tolist() for r in split_documents(10, [8, 2])]
        [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"split weights must be non-negative with a positive sum, got {list(weights)}")
    wanted = int((w > 0).sum())
    if num_docs < wanted:
        raise ValueError(f"cannot split {num_docs} documents into {wanted} non-empty parts (weights "
                         f"{list(weights)}); use more documents or fewer splits")
    bounds = np.round(np.concatenate([[0.0], np.cumsum(w / w.sum())]) * num_docs).astype(np.int64)
    bounds[-1] = num_docs
    for k in range(1, len(w)):  # give every positive-weight split at least one document...
        bounds[k] = max(bounds[k], bounds[k - 1] + (1 if w[k - 1] > 0 else 0))
    for k in range(len(w) - 1, 0, -1):  # ...without running past the end
        bounds[k] = min(bounds[k], bounds[k + 1] - (1 if w[k] > 0 else 0))
    return [np.arange(bounds[k], bounds[k + 1]) for k in range(len(w))]


class GPTDataset:
    """``seq_len + 1``-token samples over the concatenated documents, in a seeded order.

    Epoch ``e`` reads the documents in the order ``permutation(seed, e)`` as one token
    stream and cuts it into ``len(self) = (tokens - 1) // seq_len`` samples; sample
    ``k`` of the stream is ``stream[k * seq_len : k * seq_len + seq_len + 1]`` (a
    sample's last token is the next one's first, as in Megatron, so every token is a
    target once). Samples are then visited in a second seeded order.
    ``sample(i)`` for ``i >= len(self)`` reads epoch ``i // len(self)``.

    Args:
        indexed: the documents.
        seq_len: the model's sequence length; a sample has ``seq_len + 1`` tokens
            (inputs ``sample[:-1]``, targets ``sample[1:]``).
        seed: the shuffle seed; the same seed gives the same samples on every rank.
        documents: the indices of the documents to use (``split_documents``); all by default.
        shuffle: visit documents and samples in seeded orders (``False``: file order).
    """

    def __init__(self, indexed: IndexedDataset, seq_len: int, seed: int, *, documents: Sequence[int] | None = None,
                 shuffle: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.indexed, self.seq_len, self.seed, self.shuffle = indexed, int(seq_len), int(seed), shuffle
        self.documents = (np.arange(len(indexed)) if documents is None
                          else np.asarray(documents, dtype=np.int64).reshape(-1))
        self.num_tokens = int(indexed.sizes[self.documents].sum()) if len(self.documents) else 0
        if self.num_tokens < self.seq_len + 1:
            raise ValueError(
                f"{len(self.documents)} documents of {indexed.prefix} hold {self.num_tokens} tokens, fewer than one "
                f"sample of seq_len + 1 = {self.seq_len + 1}: use a shorter sequence length, a larger split, "
                "or more data")
        self._epoch: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        """Samples per epoch."""
        return (self.num_tokens - 1) // self.seq_len

    def _epoch_order(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                docs = self.documents[rng.permutation(len(self.documents))]
                samples = rng.permutation(len(self))
            else:
                docs, samples = self.documents, np.arange(len(self))
            starts = np.concatenate([[0], np.cumsum(self.indexed.sizes[docs])])  # stream offset of each doc
            self._epoch = (epoch, docs, starts, samples)
        return self._epoch[1:]

    def sample(self, i: int) -> np.ndarray:
        """Sample ``i`` (any ``i >= 0``; epochs repeat in new orders) as ``seq_len + 1`` int64 ids."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, k = divmod(int(i), len(self))
        docs, starts, samples = self._epoch_order(epoch)
        pos = int(samples[k]) * self.seq_len  # first token of the sample in this epoch's stream
        need = self.seq_len + 1
        d = int(np.searchsorted(starts, pos, side="right")) - 1
        pieces = []
        while need:
            doc = self.indexed[int(docs[d])]
            piece = doc[pos - starts[d]:pos - starts[d] + need]
            pieces.append(piece)
            need -= len(piece)
            pos += len(piece)
            d += 1
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for an epoch of {len(self)} samples (use .sample(i) to "
                             "read later epochs)")
        return self.sample(i)

    def batch(self, start: int, size: int) -> np.ndarray:
        """Samples ``start .. start + size - 1`` stacked: ``(size, seq_len + 1)`` int64."""
        return np.stack([self.sample(start + j) for j in range(size)])
