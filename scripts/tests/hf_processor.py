#!/usr/bin/env python3
"""Loads an exported CLIP folder the way its users do and prints what the processors make.

    hf_processor.py FOLDER IMAGE CAPTION...

`CLIPProcessor.from_pretrained(FOLDER)` and `AutoProcessor.from_pretrained(FOLDER)` (both read
preprocessor_config.json, tokenizer_config.json, vocab.json and merges.txt; PyTorch is not
needed), then the processor on IMAGE and the CAPTIONs. Prints one JSON object: the classes
loaded, the token ids of each caption (no padding) and the pixel values of the image
([3, H, W], row-major). The tests compare both with cusa-pipe's own preprocessing.
"""

import json
import sys

import numpy as np
from PIL import Image
from transformers import AutoProcessor, CLIPProcessor


def main():
    folder, image, captions = sys.argv[1], sys.argv[2], sys.argv[3:]
    processor = CLIPProcessor.from_pretrained(folder)
    auto = AutoProcessor.from_pretrained(folder)
    ids = [processor.tokenizer(c)["input_ids"] for c in captions]
    pixels = processor(images=[Image.open(image).convert("RGB")], return_tensors="np")["pixel_values"]
    print(
        json.dumps(
            {
                "processor": type(processor).__name__,
                "auto": type(auto).__name__,
                "tokenizer": type(processor.tokenizer).__name__,
                "image_processor": type(processor.image_processor).__name__,
                "ids": ids,
                "auto_ids": [auto.tokenizer(c)["input_ids"] for c in captions],
                "pixels_shape": list(pixels.shape[1:]),
                "pixels": np.asarray(pixels[0], dtype=np.float64).ravel().tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
