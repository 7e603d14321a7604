"""Models behind every stage: `loading` (device, dtype, tokenizer padding, token budgets), `batching`
(per-item isolation), `captioner`, `judge` (with the vote rule), `predictor` (base + adapters), `tiny`
(offline tiny models for tests and the demo)."""
