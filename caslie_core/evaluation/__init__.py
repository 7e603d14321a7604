"""Evaluation, Ray-free: `ablations` (kept / none / all prompts), `metrics` (the research metrics),
`plan` (checks before any actor starts), `report` (scores, paper table, chart, summary)."""
