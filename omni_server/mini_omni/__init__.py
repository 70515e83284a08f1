"""A clean-room mini-omni (v1) implementation, written from SPEC.md alone (see docs/mini-omni.md).

That spec is not part of this repository: docs/mini-omni.md describes the model as implemented here, and
the code's "docs/mini-omni.md §N" references point into it.

Model core: `config` (model_config.yaml), `recipe` (omni-recipe-v1 test weights and checkpoint files),
`whisper` (log-mel front end and encoder), `gpt` (the 8-stream GPT with its adapter; `MiniOmniModel`),
`head` (greedy picks from the tied head), `layers`/`mapped` (fast weight layouts, mapped loading),
`generate` (one request's decoding: a `Generation` yields `Step`s, then tells its `StopReason`) and
`batch` (continuous batching: a `Batcher` runs every generation on a model in one loop; `generate_steps`).
The engine side: `checkpoint`, `codec` (SNAC), `text`, `engine`.
"""
