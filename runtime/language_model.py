"""LanguageModel: NNsight for Hugging Face causal LMs — prompts in, tokenizer attached, generation.

Inputs may be a string, a list of strings, token ids (list or tensor) or a tokenizer's output; invokes
are padded on the left into one batch. A model named by directory loads as a meta-device skeleton and
gets its weights on the first run (`dispatch=True` loads at once). Nothing is fetched from a hub.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from tether.loading import adopt_weights, load_named, named_spec, parse_dtype

from .batching import left_padded_positions
from .errors import TetherError
from .mediator import Request, current_mediator
from .model import NNsight, Prepared
from .model_options import OWN, check_load_kwargs, remote_defaults, unexpected
from .tracer import Tracer

__all__ = ["LanguageModel"]

_GENERATE_ONLY = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                  "num_beams", "max_length", "eos_token_id", "pad_token_id", "repetition_penalty")


class _Generator:
    """`model.generator`: its `.output` is what `generate()` returns (all token ids)."""

    def __init__(self, model: LanguageModel):
        self._model = model

    @property
    def output(self) -> Any:
        mediator = current_mediator()
        if mediator is None:
            raise TetherError("`model.generator.output` is only available inside `with model.generate(...):`.")
        return mediator.request(Request(self, "output", mediator.iteration, "get", path="model.generator"))

    def __repr__(self) -> str:
        return "Generator(\n  (streamer): Streamer()\n)"


class LanguageModel(NNsight):
    """A causal LM with its tokenizer: `trace("prompt")`, `generate("prompt", max_new_tokens=n)`."""

    def __init__(self, model: Any, *, tokenizer: Any = None, device_map: Any = None, dtype: Any = None,
                 dispatch: bool = False, rename: dict | None = None, api_key: str | None = None,
                 backend: Any = None, host: str | None = None, **load_kwargs: Any):
        """`LanguageModel(torch_module, tokenizer=tok)`, or `LanguageModel(name)` where name is a local model
        directory, a Hugging Face id in the local cache, a model a tether server hosts (its module tree and
        tokenizer come from the server), or a SPEC `tether serve` accepts (`tiny`, `smollm2`, `module:factory`),
        loaded here when no server hosts it.

        Keywords: `tokenizer=`; `dispatch=True` loads real weights now rather than at the first local run;
        `device_map=` ("auto", "cuda:0", a dict) and `dtype=` (`torch.bfloat16` or its name; `torch_dtype=` as
        Hugging Face spells it) place the weights when they load; `rename=` ({path or class: alias}) adds
        module aliases, as nnsight takes them; `host=`/`backend=` ("host:port") and `api_key=` pick the server
        for the spec and for remote traces; other keywords go to Hugging Face `from_pretrained`
        (`revision=`...), and one it does not take is a TypeError.
        """
        dtype = parse_dtype(_one_dtype(dtype, load_kwargs.pop("torch_dtype", None)))
        source, declared = None, None
        owner = type(self).__name__
        defaults = remote_defaults(owner, api_key, backend, host)
        if isinstance(model, torch.nn.Module):
            if load_kwargs:
                raise unexpected(owner, list(load_kwargs), _OWN_KEYWORDS,
                                 " (Hugging Face loader keywords apply only when loading by name)")
            module = model
        else:
            source = str(model)
            module, tokenizer, declared = _resolve(source, tokenizer, defaults, load_kwargs, dtype)
        super().__init__(module, **defaults)
        self._rename(rename, declared)
        object.__setattr__(self, "_source", source)  # the name: also the server's name for it (remote=True)
        object.__setattr__(self, "_remote_name", source)  # kept after dispatch
        object.__setattr__(self, "_unloaded", source is not None and _is_meta(module))  # weights come on dispatch
        object.__setattr__(self, "_load_kwargs", load_kwargs)
        object.__setattr__(self, "_device_map", device_map)
        object.__setattr__(self, "_dtype", dtype)
        object.__setattr__(self, "_tokenizer", _ready(tokenizer) if tokenizer is not None else None)
        object.__setattr__(self, "_generator", _Generator(self))
        if dispatch and declared is None:  # a server's model stays a remote handle (nnsight: dispatch=True)
            self._dispatch()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def __repr__(self) -> str:
        """The model's module tree with the `(generator)` module `generate()` feeds, as nnsight prints it."""
        tree = super().__repr__()
        if not tree.endswith("\n)") or not hasattr(self._module, "generate"):  # (a plain torch model cannot generate)
            return tree
        generator = repr(self._generator).replace("\n", "\n  ")
        return f"{tree[:-2]}\n  (generator): {generator}\n)"

    @property
    def generator(self) -> _Generator:
        return self._generator

    def generate(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """`with model.generate(prompt, max_new_tokens=n):` — generation with per-step interventions.

        Keywords: those of `trace` (remote, backend, blocking, api_key, model_name, verbose, scan);
        generation keywords (max_new_tokens, do_sample, temperature...) go to Hugging Face `generate`.
        """
        return self._tracer("generate", inputs, kwargs)

    # ---- NNsight hooks -------------------------------------------------------------------------
    def _split_kwargs(self, mode: str, kwargs: dict) -> tuple[dict, dict]:
        return {}, dict(kwargs)

    def _prepare(self, args: tuple, kwargs: dict) -> Prepared:
        if not args:
            raise TetherError("Give the invoke an input: a prompt, a list of prompts or token ids.")
        rows = self._rows(args[0], kwargs)
        return Prepared((rows,), {}, len(rows))

    def _rows(self, value: Any, tokenizer_kwargs: dict) -> list[list[int]]:
        if isinstance(value, str):
            return [self._encode(value, tokenizer_kwargs)]
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if hasattr(value, "keys") and "input_ids" in value:
            ids, mask = value["input_ids"], value.get("attention_mask")
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
            ids = ids if ids and isinstance(ids[0], list) else [ids]
            if mask is not None:
                mask = mask if mask and isinstance(mask[0], list) else [mask]
                ids = [[t for t, m in zip(row, mrow) if m] for row, mrow in zip(ids, mask)]
            return ids
        if isinstance(value, (list, tuple)) and value:
            if all(isinstance(v, int) for v in value):
                return [list(value)]
            if all(isinstance(v, str) for v in value):
                return [self._encode(v, tokenizer_kwargs) for v in value]
            if all(isinstance(v, (list, tuple)) for v in value):
                return [list(v) for v in value]
        raise TetherError(f"LanguageModel cannot use an input of type {type(value).__name__}: give a string, "
                          "a list of strings, token ids or a tokenizer's output.")

    def _encode(self, text: str, tokenizer_kwargs: dict) -> list[int]:
        if self._tokenizer is None:
            raise TetherError("This LanguageModel has no tokenizer: pass `tokenizer=` or give token ids.")
        return list(self._tokenizer(text, **tokenizer_kwargs)["input_ids"])

    def _batch(self, prepared: list[Prepared]) -> tuple[tuple, dict, list[slice], int]:
        rows, slices, start = [], [], 0
        for p in prepared:
            rows.extend(p.args[0])
            slices.append(slice(start, start + p.rows))
            start += p.rows
        width = max(len(r) for r in rows)
        pad = self._pad_id()
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        device = self._device()
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if any(len(r) < width for r in rows) and self._takes_positions():
            kwargs["position_ids"] = left_padded_positions([len(r) for r in rows], width).to(device)
        return (), kwargs, slices, len(rows)

    def _takes_positions(self) -> bool:
        """Whether the model's forward accepts `position_ids` (every Hugging Face causal LM here does)."""
        return "position_ids" in inspect.signature(self._module.forward).parameters

    def _pad_id(self) -> int:
        tok = self._tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        config = getattr(self._module, "config", None)
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return 0

    def _run(self, mode: str, args: tuple, kwargs: dict, run_kwargs: dict) -> Any:
        if mode == "generate":  # generate derives the same positions from the mask, and extends them per step
            run_kwargs = {"pad_token_id": self._pad_id(), **run_kwargs}
            kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
            return self._module.generate(**kwargs, **run_kwargs)
        return self._module(**kwargs, **{k: v for k, v in run_kwargs.items() if k not in _GENERATE_ONLY})

    def _generator_key(self) -> Any:
        return self._generator

    def _dispatch(self) -> None:
        """Give a meta skeleton its real weights, keeping every module object (and so every Envoy)."""
        if not self._unloaded:
            return
        if not _is_meta(self._module):
            object.__setattr__(self, "_unloaded", False)  # real weights: later traces skip the parameter scan
            return
        if named_spec(self._source):
            loaded = load_named(self._source)
            real = loaded[0] if isinstance(loaded, tuple) else loaded
        else:
            from transformers import AutoModelForCausalLM

            placed = {"device_map": self._device_map, "dtype": self._dtype}
            try:
                real = AutoModelForCausalLM.from_pretrained(
                    self._source, local_files_only=True, **self._load_kwargs,
                    **{k: v for k, v in placed.items() if v is not None})
            except OSError:
                raise TetherError(
                    f"The weights of {self._source!r} are not on this machine (its structure came from a "
                    "server). Run it there with `remote=True`."
                ) from None
        adopt_weights(self._module, real)
        self._module.eval()
        object.__setattr__(self, "_unloaded", False)


def _is_meta(module: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


def _ready(tokenizer: Any) -> Any:
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _one_dtype(dtype: Any, torch_dtype: Any) -> Any:
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise TetherError(f"LanguageModel got dtype={dtype!r} and torch_dtype={torch_dtype!r}: give one of them.")
    return dtype if dtype is not None else torch_dtype


_OWN_KEYWORDS = ("tokenizer", "dispatch", "device_map", "dtype", "torch_dtype", "rename", *OWN)


def _resolve(source: str, tokenizer: Any, remote: dict, load_kwargs: dict, dtype: Any = None
             ) -> tuple[torch.nn.Module, Any, dict | None]:
    """`(module, tokenizer, aliases the server declares)` for a model named `source`: a local directory or
    cached Hugging Face id (a meta skeleton in `dtype`, weights on dispatch; no aliases: None), else the
    server's spec, else a tether SPEC loaded here (real weights). Raises, naming the server address it
    tried, when none of them has it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        config = None
    if config is not None:
        check_load_kwargs("LanguageModel", load_kwargs, config)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        with torch.device("meta"):  # in the dtype it will load in, so scans report it
            module = AutoModelForCausalLM.from_config(
                config, **({"dtype": dtype} if isinstance(dtype, torch.dtype) else {}))
        return module.eval(), tokenizer, None
    from .remote import load_spec

    found = load_spec(source, host=remote.get("backend"), api_key=remote.get("api_key"))
    if not isinstance(found, str):
        check_load_kwargs("LanguageModel", load_kwargs)
        module, served_tokenizer, aliases = found
        return module, tokenizer if tokenizer is not None else served_tokenizer, aliases or {}
    if named_spec(source):
        if load_kwargs:
            raise unexpected("LanguageModel", list(load_kwargs), _OWN_KEYWORDS,
                             f" ({source!r} is a tether model SPEC, loaded without Hugging Face keywords)")
        loaded = load_named(source)
        module, own_tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
        return module, tokenizer if tokenizer is not None else own_tokenizer, None
    raise TetherError(
        f"No model named {source!r} here: it is not a local directory nor in the local Hugging Face cache, and "
        f"{found}. tether never downloads weights. Start a server that hosts it (`tether serve --model "
        f"NAME=SPEC` listens on 127.0.0.1:8765, where clients look by default), point at one with "
        f"`LanguageModel({source!r}, host='host:port')`, `tether.CONFIG.API.HOST` or TETHER_HOST, or give a "
        "local model directory (or `tiny`, `smollm2`, `module:factory`)."
    )
