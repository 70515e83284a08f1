"""A clean-room mini-omni (v1) implementation written from SPEC.md: whisper front end, GPT, batch-2 decoding."""
