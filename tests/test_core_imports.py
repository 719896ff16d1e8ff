"""The core (plan, block, models, counting, convert, inference, export's entry point) imports with torch alone."""

import subprocess
import sys

from conftest import ROOT

BLOCKED = ("matplotlib", "yaml", "PIL", "tqdm", "onnx", "onnxruntime", "onnxscript", "openvino", "transformers")

SCRIPT = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
import torch, gpconv
model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=16, skip_strides=3)
assert gpconv.count_parameters(model) == 623226
fast = gpconv.prepare_for_inference(model, example_input=torch.rand(2, 3, 32, 32))
print("ok")
"""


def test_import_gpconv_needs_only_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
