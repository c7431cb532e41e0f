"""The demo's data and models: scikit-learn's bundled digits, the edge and cloud MLPs
exported to ONNX, and drift injection. Behind the `demo` extra; a device never imports it.
"""
