#!/usr/bin/env python3
"""The peer of `cusa-pipe bench teacher`: the quickstart's teachers in Python on the same inputs.

    python3 teacher_python.py DATASET_DIR TEXT_MODEL TOKENIZER IMAGE_MODEL N_IMAGES

Prints one JSON line: texts/s (onnxruntime + tokenizers, batches of 64 sorted by length, mean
pooling, 2 threads), images/s end to end (PIL decode + bicubic resize + crop + numpy normalise +
onnxruntime, batches of 16, CLS of the internal backbone tensor) and images/s for decode +
preprocess alone (PIL + numpy, one process).
"""
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
from tokenizers import Tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from image_teacher import OUTPUT, preprocess  # noqa: E402


def session(model_bytes):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    dataset, text_model, tok_path, image_model, n_images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    texts = pq.read_table(os.path.join(dataset, "captions.parquet")).column("text_clean").to_pylist()
    paths = [os.path.join(dataset, p) for p in pq.read_table(os.path.join(dataset, "images.parquet")).column("path").to_pylist()][:n_images]

    tok = Tokenizer.from_file(tok_path)
    tok.no_padding()
    tok.enable_truncation(max_length=128)
    with open(text_model, "rb") as f:
        sess = session(f.read())
    t = time.perf_counter()
    enc = tok.encode_batch(texts)
    order = sorted(range(len(texts)), key=lambda i: len(enc[i].ids))
    for s in range(0, len(order), 64):
        idx = order[s:s + 64]
        n = max(len(enc[i].ids) for i in idx)
        ids = np.zeros((len(idx), n), dtype=np.int64)
        mask = np.zeros((len(idx), n), dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i].ids)] = enc[i].ids
            mask[r, :len(enc[i].ids)] = 1
        hidden = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    text_rate = len(texts) / (time.perf_counter() - t)

    t = time.perf_counter()
    for p in paths:
        preprocess(p)
    prep_rate = len(paths) / (time.perf_counter() - t)

    model = onnx.load(image_model)
    model.graph.output.append(onnx.ValueInfoProto(name=OUTPUT))
    sess = session(model.SerializeToString())
    name = sess.get_inputs()[0].name
    t = time.perf_counter()
    for s in range(0, len(paths), 16):
        x = np.concatenate([preprocess(p)[0] for p in paths[s:s + 16]])
        cls = sess.run([OUTPUT], {name: x})[0][:, 0]
        cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    image_rate = len(paths) / (time.perf_counter() - t)
    print(json.dumps({"texts_per_s": text_rate, "images_per_s": image_rate, "preprocess_per_s": prep_rate}))


if __name__ == "__main__":
    main()
