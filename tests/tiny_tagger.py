"""A tiny WD14-style tagger built without the `onnx` package (the host pins protobuf 3.20, which
current onnx rejects): the ONNX protobuf is written by hand. Its scores are known in closed form,
so tests can state exactly which tags an image gets.

    input  "input"  float32 [batch, SIZE, SIZE, 3]  (BGR, 0-255)
    means  = ReduceMean(input, axes=[1, 2])          [batch, 3]
    scores = Sigmoid(MatMul(means, W) + B)           [batch, len(TAGS)]
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SIZE = 32


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# (name, category, weights on the B, G, R channel means (0-255), probability for a black image)
TAGS = [
    ("general", 9, (0, 0, 0), 0.70),
    ("sensitive", 9, (0, 0, 0), 0.20),
    ("questionable", 9, (0, 0, 0), 0.05),
    ("explicit", 9, (0, 0, 0), 0.02),
    ("long_hair", 0, (0, 0, 0), 0.40),  # just above the 0.35 default
    ("^_^", 0, (0, 0, 0), 0.36),
    ("pokemon_(creature)", 0, (0, 0, 0), 0.34),  # just below it
    ("red_theme", 0, (0, 0, 8 / 255), 0.018),  # p = sigmoid(8 * R/255 - 4)
    ("blue_theme", 0, (8 / 255, 0, 0), 0.018),
    ("hatsune_miku", 4, (0, 0, 0), 0.86),  # over the 0.85 character default
    ("kagamine_rin", 4, (0, 0, 0), 0.80),
]


def expected_probs(bgr_means) -> np.ndarray:
    b, g, r = bgr_means
    return np.array([1 / (1 + math.exp(-(w[0] * b + w[1] * g + w[2] * r + logit(p0)))) for _, _, w, p0 in TAGS])


# -- protobuf wire format ---------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(n)


def _bytes(field: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _key(field, 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:  # TensorProto
    array = np.ascontiguousarray(array, dtype=np.float32)
    return b"".join(_int(1, d) for d in array.shape) + _int(2, 1) + _bytes(8, name) + _bytes(9, array.tobytes())


def _value_info(name: str, dims) -> bytes:  # ValueInfoProto with a float tensor type
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, 1) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs, outputs, attrs: bytes = b"") -> bytes:  # NodeProto
    return b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(4, op) + attrs


def _ints_attr(name: str, values) -> bytes:  # AttributeProto INTS
    return _bytes(5, _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7))


def _int_attr(name: str, value: int) -> bytes:  # AttributeProto INT
    return _bytes(5, _bytes(1, name) + _int(3, value) + _int(20, 2))


def model_bytes(batch: int | str = "batch") -> bytes:
    weights = np.array([w for _, _, w, _ in TAGS], dtype=np.float32).T  # [3, tags]
    bias = np.array([logit(p0) for _, _, _, p0 in TAGS], dtype=np.float32)
    nodes = [
        _node("ReduceMean", ["input"], ["means"], _ints_attr("axes", [1, 2]) + _int_attr("keepdims", 0)),
        _node("MatMul", ["means", "W"], ["z"]),
        _node("Add", ["z", "B"], ["logits"]),
        _node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = (b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "tiny_tagger")
             + _bytes(5, _tensor("W", weights)) + _bytes(5, _tensor("B", bias))
             + _bytes(11, _value_info("input", [batch, SIZE, SIZE, 3])) + _bytes(12, _value_info("output", [batch, len(TAGS)])))
    opset = _bytes(1, "") + _int(2, 13)
    return _int(1, 8) + _bytes(2, "lora-train-tests") + _bytes(7, graph) + _bytes(8, opset)


def build(folder: Path, batch: int | str = "batch") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model_bytes(batch))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{1000 - i}" for i, (name, cat, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder
