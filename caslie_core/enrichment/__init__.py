"""Catalog enrichment, Ray-free: `stages` (parse, fetch, decode, caption, judge, finalize over rows),
`cache` (caption de-duplication), `assemble` (uniM3: kept captions into the text), `pipeline` (stage
order, provenance, summary counts, the one-process reference loop)."""
