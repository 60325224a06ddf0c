"""Write the examples' data again: ``python -m examples.make`` (deterministic; needs the train extra).

* ``shapes/{circle,square,triangle}/``: 32 x 32 RGB images, one sub-folder per class (``shapes.toml``);
* ``textdet/textdet.onnx``: a small text detector declared as Paddle2ONNX writes them (input
  ``[-1, 3, '?', '?']``, output a probability map ``[-1, 1, '?', '?']``), with hand-set weights that find dark
  strokes on paper; ``textdet/calib/`` and ``textdet/val/``: 48 x 192 images of text lines;
* ``regressor/net.pt``, ``regressor/calib.npz``, ``regressor/val.npz``: the regressor's trained weights and data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPES = ("circle", "square", "triangle")
LINE_H, LINE_W = 48, 192


def shapes(out: Path, per_class: int = 24, seed: int = 0) -> None:
    """Coloured shapes on light backgrounds, varied in size, position and colour."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for label in SHAPES:
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = tuple(int(v) for v in rng.integers(190, 256, 3))
            img = Image.new("RGB", (32, 32), bg)
            draw = ImageDraw.Draw(img)
            fill = tuple(int(v) for v in rng.integers(0, 140, 3))
            r = int(rng.integers(7, 13))
            cx, cy = (int(v) for v in rng.integers(r + 1, 32 - r - 1, 2))
            if label == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif label == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            img.save(out / label / f"{label}-{i:02d}.png", optimize=True)


def text_lines(out: Path, n: int, seed: int) -> None:
    """Grey paper with a shading gradient and a few dark words made of letter-sized strokes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shade = np.linspace(0.0, float(rng.uniform(-0.08, 0.08)), LINE_W)[None, :]
        page = np.full((LINE_H, LINE_W), float(rng.uniform(0.78, 0.92))) + shade
        x = int(rng.integers(2, 20))
        top, height = int(rng.integers(8, 20)), int(rng.integers(10, 20))
        while x < LINE_W - 16:
            for _ in range(int(rng.integers(2, 7))):  # the letters of one word
                w = int(rng.integers(3, 7))
                if x + w >= LINE_W - 2:
                    break
                page[top:top + height, x:x + w] = float(rng.uniform(0.1, 0.3))
                x += w + int(rng.integers(1, 3))
            x += int(rng.integers(8, 24))  # the space between words
        rgb = np.clip(page[:, :, None] * rng.uniform(0.95, 1.05, 3)[None, None, :], 0.0, 1.0)
        Image.fromarray((255 * rgb).astype(np.uint8)).save(out / f"line-{i:02d}.png", optimize=True)


def textdet_model(path: Path) -> None:
    """Conv 3x3 (darkness of each pixel and of its vertical neighbours), ReLU, 2 x 2 max-pool, a 1 x 1 conv to
    one channel, Sigmoid, and a x2 nearest Resize back to the input's size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = np.zeros((4, 3, 3, 3), np.float32)
    w1[:, :, 1, 1] = -1.0 / 3.0
    w1[1:, :, 0, 1] = w1[1:, :, 2, 1] = -1.0 / 6.0
    inits = [numpy_helper.from_array(w1, "conv1.weight"),
             numpy_helper.from_array(np.ones(4, np.float32), "conv1.bias"),
             numpy_helper.from_array(np.full((1, 4, 1, 1), 3.0, np.float32), "head.weight"),
             numpy_helper.from_array(np.array([-5.4], np.float32), "head.bias"),
             numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["conv1"], pads=[1, 1, 1, 1],
                              name="conv1"),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
             helper.make_node("Conv", ["pool1", "head.weight", "head.bias"], ["logits"], name="head"),
             helper.make_node("Sigmoid", ["logits"], ["half"], name="sigmoid"),
             helper.make_node("Resize", ["half", "", "scales"], ["prob"], mode="nearest", name="upsample")]
    graph = helper.make_graph(
        nodes, "textdet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [-1, 1, "?", "?"])], inits)
    model = helper.make_model(graph, producer_name="paddle2onnx-style", opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def regressor(out: Path, seed: int = 0) -> None:
    """Train the regressor (full-batch Adam, a few seconds) and write its weights and data."""
    import torch

    from examples.regressor import make_net, readings, targets

    rng = np.random.default_rng(seed)
    x, xv = readings(rng, 2000), readings(rng, 256)
    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(targets(x))
    for _ in range(600):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(xt), yt)
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), out / "net.pt")
    np.savez(out / "calib.npz", input=x[:256])
    np.savez(out / "val.npz", input=xv)
    with torch.no_grad():
        mse = float(torch.nn.functional.mse_loss(net(torch.from_numpy(xv)), torch.from_numpy(targets(xv))))
    print(f"regressor: validation MSE {mse:.4f}")


def main() -> None:
    shapes(HERE / "shapes")
    text_lines(HERE / "textdet" / "calib", 32, seed=1)
    text_lines(HERE / "textdet" / "val", 32, seed=2)
    textdet_model(HERE / "textdet" / "textdet.onnx")
    regressor(HERE / "regressor")


if __name__ == "__main__":
    main()
