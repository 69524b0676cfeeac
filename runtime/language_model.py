"""LanguageModel: NNsight for Hugging Face causal LMs — prompts in, tokenizer attached, generation.

Inputs may be a string, a list of strings, token ids (list or tensor) or a tokenizer's output; invokes
are padded on the left into one batch. A model named by directory loads as a meta-device skeleton and
gets its weights on the first run (`dispatch=True` loads at once). Nothing is fetched from a hub.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .batching import left_padded_positions
from .errors import TetherError
from .interleaver import Request, current_mediator
from .loading import adopt_weights, parse_dtype
from .model import NNsight, Prepared, device_of
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
                 dispatch: bool = False, rename: dict | None = None, **kwargs: Any):
        """`model`: a torch module, or a local directory / cached Hugging Face id, loaded (on the first run,
        or at once with `dispatch=True`) with `device_map` ("auto", "cuda:0", a dict) and `dtype`
        (`torch.bfloat16` or its name; `torch_dtype=` as Hugging Face spells it). `rename`: aliases for
        modules ({path or class: alias}), as nnsight takes them."""
        dtype = parse_dtype(_one_dtype(dtype, kwargs.pop("torch_dtype", None)))
        source, declared = None, None
        if isinstance(model, torch.nn.Module):
            module = model
        else:
            source = str(model)
            module, tokenizer, declared = _skeleton(source, tokenizer, dtype)
        super().__init__(module)
        self._rename(rename, declared)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_remote_name", source)  # the server's name for it; kept after dispatch
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
        """`with model.generate(prompt, max_new_tokens=n):` — generation with per-step interventions."""
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
        device = device_of(self._module)
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
        if self._source is None:
            return
        if not _is_meta(self._module):
            object.__setattr__(self, "_source", None)  # real weights: later traces skip the parameter scan
            return
        from transformers import AutoModelForCausalLM

        placed = {"device_map": self._device_map, "dtype": self._dtype}
        try:
            real = AutoModelForCausalLM.from_pretrained(
                self._source, local_files_only=True, **{k: v for k, v in placed.items() if v is not None})
        except OSError:
            raise TetherError(
                f"The weights of {self._source!r} are not on this machine (its structure came from a server). "
                "Run it there with `remote=True`."
            ) from None
        adopt_weights(self._module, real)
        self._module.eval()
        object.__setattr__(self, "_source", None)


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


def _skeleton(source: str, tokenizer: Any, dtype: Any = None) -> tuple[torch.nn.Module, Any, dict | None]:
    """A meta-device model, its tokenizer, and the aliases a server declares for it (None: it came from a
    local directory or the local Hugging Face cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as error:
        from .remote import load_spec

        remote = load_spec(source)
        if remote is not None:
            module, tokenizer, aliases = remote
            return module, tokenizer, aliases or {}
        raise TetherError(
            f"No local model named {source!r}: tether never downloads weights. Give a local directory, a "
            "model already in the Hugging Face cache, a torch module, or use `remote=True` with a server "
            f"that hosts it. ({error})"
        ) from None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    with torch.device("meta"):  # in the dtype it will load in, so scans report it
        module = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if isinstance(dtype, torch.dtype) else {}))
    return module.eval(), tokenizer, None
