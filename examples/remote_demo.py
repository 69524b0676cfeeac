"""tether remotely: SmolLM2 served by `tether serve`, traced with `remote=True` from a client that has no
weights, and a live chat whose tokens a `local()` block decodes and prints here as the server makes them.

    tether serve --model smollm2=smollm2 &        # prints `tether: serving on 127.0.0.1:PORT`
    TETHER_HOST=127.0.0.1:PORT python examples/remote_demo.py
    python examples/remote_demo.py --serve       # or start a server in this process
"""

from __future__ import annotations

import argparse
import time

import tether
from tether import CONFIG

PROMPT = "The Eiffel Tower is in the city of"
QUESTION = "Tell me about the Eiffel Tower."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="start a loopback server with SmolLM2 in-process")
    parser.add_argument("--host", help="the server's host:port (default: TETHER_HOST or CONFIG.API.HOST)")
    parser.add_argument("--model", default="smollm2", help="the hosted model's name (default smollm2)")
    parser.add_argument("--tokens", type=int, default=30, help="tokens to generate in the live chat")
    args = parser.parse_args(argv)

    server = None
    if args.serve:
        from tether.loading import load_smollm2
        from tether.server.app import start_server

        server = start_server({args.model: load_smollm2()}, host="127.0.0.1", port=0)
        CONFIG.API.HOST = server.address
    elif args.host:
        CONFIG.API.HOST = args.host
    try:
        run(args.model, args.tokens)
    finally:
        if server is not None:
            server.stop()


def run(name: str, tokens: int) -> None:
    start = time.perf_counter()
    llm = tether.LanguageModel(name)  # module tree and tokenizer from the server; no weights here
    print(f"{name}: {len(llm.model.layers)} layers from {CONFIG.API.HOST} in {time.perf_counter() - start:.1f} s")
    layers = llm.model.layers

    # 1. Read, remotely: the model's top next-token prediction.
    with llm.trace(PROMPT, remote=True):
        token_ids = llm.lm_head.output.argmax(dim=-1).save()  # (batch, seq)
    print(f"{PROMPT!r} -> {llm.tokenizer.decode(token_ids[0][-1])!r}")

    # 2. Write, remotely: zero the last four MLPs and watch the prediction change.
    with llm.trace(PROMPT, remote=True):
        for layer in layers[-4:]:
            layer.mlp.output[:] = 0
        token_ids = llm.lm_head.output.argmax(dim=-1).save()
    print(f"with the last 4 MLPs zeroed -> {llm.tokenizer.decode(token_ids[0][-1])!r}")

    # 3. Live chat: the server generates; at every step a local() block decodes the new token here.
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    print(f"\nuser: {QUESTION}\nassistant: ", end="", flush=True)
    CONFIG.APP.DISPLAY = False  # a status line would land in the middle of the streamed answer
    start = time.perf_counter()
    with llm.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, remote=True) as tracer:
        tracer.all()
        token = llm.lm_head.output[0, -1].argmax(dim=-1)  # the greedy next token, on the server
        with tracer.local():
            print(llm.tokenizer.decode(token, skip_special_tokens=True), end="", flush=True)  # runs here
    print(f"\n[{tokens} tokens generated remotely, each decoded by a local() block here, "
          f"in {time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
