"""Float ONNX graphs of a student-form network, for the ONNX Runtime peers (project venv)."""

from __future__ import annotations

import numpy as np


def float_onnx(specs, params, inv_std, image_shape, path: str) -> None:
    """Student-form float params (kernel, alpha, beta) as an fp32 NCHW ONNX graph whose
    input is the normalised image (p − z)/255 that the network's first layer reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bnfree_jax.export.integerize import same_padding
    from bnfree_jax.nn.weights import along_input

    nodes, inits, x, hw = [], [], "input", tuple(image_shape[:2])
    for i, s in enumerate(specs):
        p = params[s.name]
        w = np.asarray(p["kernel"], np.float32) * np.asarray(p["alpha"], np.float32)
        if i == 0:
            w = w * along_input(np.asarray(inv_std, np.float32), w.shape)
        inits.append(numpy_helper.from_array(np.asarray(p["beta"], np.float32), f"b{i}"))
        if s.kind == "conv":
            (t, b), (l, r) = same_padding(hw, s.kernel, s.stride, s.padding)
            hw = ((hw[0] + t + b - s.kernel) // s.stride + 1, (hw[1] + l + r - s.kernel) // s.stride + 1)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1))), f"w{i}"))
            nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"y{i}"], kernel_shape=[s.kernel] * 2,
                                          strides=[s.stride] * 2, pads=[t, l, b, r]))
        else:
            if i > 0 and specs[i - 1].kind == "conv":  # our dense layers read the NHWC flattening
                nodes += [helper.make_node("Transpose", [x], [f"t{i}"], perm=[0, 2, 3, 1]),
                          helper.make_node("Flatten", [f"t{i}"], [f"f{i}"], axis=1)]
                x = f"f{i}"
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"])]
        x = f"y{i}"
        if not s.last:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
            if s.pool:
                nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], kernel_shape=[s.pool] * 2,
                                              strides=[s.pool] * 2))
                x = f"p{i}"
                hw = (hw[0] // s.pool, hw[1] // s.pool)
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    h, w_, c = image_shape
    graph = helper.make_graph(nodes, "folded_float_teacher",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w_])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", specs[-1].features])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def onnx_input(images: np.ndarray, zero_point) -> np.ndarray:
    """uint8 NHWC images → the ONNX graph's float NCHW input (p − z)/255."""
    x = (images.astype(np.float32) - np.asarray(zero_point, np.float32)) / np.float32(255.0)
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
