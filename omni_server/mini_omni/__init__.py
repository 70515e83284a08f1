"""A clean-room mini-omni (v1) implementation, written from SPEC.md alone.

Model core: `config` (model_config.yaml), `recipe` (omni-recipe-v1 test weights and checkpoint files),
`whisper` (log-mel front end and encoder), `gpt` (the 8-stream GPT with its adapter; `MiniOmniModel`),
`head` (greedy picks from the tied head), `layers`/`mapped` (fast weight layouts, mapped loading) and
`generate` (the batch-2 decoding: `generate_steps` yields `Step`s, then tells its `StopReason`).
The engine side: `checkpoint`, `codec` (SNAC), `text`, `engine`.
"""
