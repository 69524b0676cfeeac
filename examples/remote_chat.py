"""The walkthrough, remotely: SmolLM2 on `tether serve`, a remote trace, an ablation, and a live chat
whose tokens a `local()` block decodes and prints on this machine as the server generates them.

Run with `make demo` (which starts the server), or against your own: TETHER_HOST=host:port python ...
"""

from __future__ import annotations

import time

import tether
from tether import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"
CHAT = "The Eiffel Tower is a famous landmark in Paris. It was built"


def main() -> None:
    start = time.perf_counter()
    llm = LanguageModel("smollm2")  # structure and tokenizer come from the server: no weights here
    print(f"[remote] model spec from {tether.CONFIG.API.HOST} in {time.perf_counter() - start:.1f} s: "
          f"{type(llm._module).__name__}, {len(llm.model.layers)} layers")

    with llm.trace(PROMPT, remote=True):
        token_ids = llm.lm_head.output.argmax(dim=-1).save()
    print(f"[remote] {PROMPT!r} -> {llm.tokenizer.decode(token_ids[0][-1])!r}")

    with llm.trace(PROMPT, remote=True):
        for layer in llm.model.layers[-4:]:
            layer.mlp.output[:] = 0
        ablated = llm.lm_head.output.argmax(dim=-1).save()
    print(f"[remote] with the last 4 MLPs zeroed -> {llm.tokenizer.decode(ablated[0][-1])!r}")

    print(f"[remote] live chat, 30 tokens decoded on this machine as they arrive:\n{CHAT}", end="", flush=True)
    tether.CONFIG.APP.DISPLAY = False  # the status line would land in the middle of the streamed text
    start = time.perf_counter()
    with llm.generate(CHAT, max_new_tokens=30, remote=True):
        llm.all()
        token = llm.lm_head.output[0, -1].argmax(dim=-1)
        with tether.local():
            print(llm.tokenizer.decode(token), end="", flush=True)
    print(f"\n[remote] 30 tokens, each decoded by a local() block, in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
